"""The README's demo: `cohort demo` (10 clients, 10 rounds of FedAvg, MLP on IID
Fashion-MNIST over mutual TLS) must finish every round and reach a test accuracy
of at least 0.85, and its store must hold 10 accepted rows per round."""
import os
import re
import sqlite3
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from cohort_e2e import Check  # noqa


def main():
    t = Check("e2e-demo")
    build = os.environ.get("COHORT_BUILD", "build")
    d = tempfile.mkdtemp(prefix="cohort-demo-")
    r = subprocess.run([os.path.join(build, "client", "cli", "cohort"), "demo", "--dir", d],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=280)
    sys.stdout.write(r.stdout)
    t.ok(r.returncode == 0, "cohort demo exits 0")
    rounds = [l for l in r.stdout.splitlines() if re.match(r"^\s+\d+\s+10\s", l)]
    t.ok(len(rounds) == 10, "one line per round with 10 participants (%d)" % len(rounds))
    m = re.search(r"accuracy=([0-9.]+)", r.stdout)
    acc = float(m.group(1)) if m else 0.0
    t.ok(acc >= 0.85, "final test accuracy %.4f >= 0.85" % acc)
    db = sqlite3.connect(os.path.join(d, "state", "cohort.db"))
    n = db.execute("SELECT count(*) FROM participation WHERE status='accepted'").fetchone()[0]
    t.ok(n == 100, "100 accepted participation rows (%d)" % n)
    t.ok(os.path.exists(os.path.join(d, "state", "checkpoints", "round-000010.safetensors")),
         "checkpoint of round 10 exists")
    t.ok(re.search(r"dashboard at http://127\.0\.0\.1:\d+/", r.stdout) is not None,
         "the demo prints the dashboard's URL")
    ev = db.execute("SELECT value FROM eval_metrics WHERE round = 10 AND name = 'accuracy'")
    row = ev.fetchone()
    t.ok(row is not None and abs(row[0] - acc) < 1e-3,
         "the demo's evaluator reported the final model's accuracy (%s)" % (row and row[0]))
    t.done()


if __name__ == "__main__":
    main()
