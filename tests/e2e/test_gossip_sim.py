"""End to end: `cohort sim --gossip` on a small network (8 real gossip daemons,
degree 3, 15 local steps each, plus the federation run). It writes the CSV files
and the summary, every method learns, and the vanishing-variance effect shows:
plain merging of independently initialised models shrinks the first layer's
weight spread, variance-corrected merging keeps it at the initial level."""
import csv
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from cohort_e2e import Check  # noqa


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def main():
    t = Check("e2e-gossip-sim")
    build = os.path.abspath(os.environ.get("COHORT_BUILD", "build"))
    cohort = os.path.join(build, "client", "cli", "cohort")
    out = tempfile.mkdtemp(prefix="cohort-gossip-sim-")
    r = subprocess.run([cohort, "sim", "--gossip", "--nodes", "8", "--degree", "3",
                        "--steps", "15", "--step-ms", "250", "--eval-every", "5",
                        "--test-examples", "2000", "--out", out],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    print("\n".join("# " + line for line in r.stdout.splitlines()))
    t.ok(r.returncode == 0, "cohort sim --gossip exits 0")
    names = ["variance-corrected", "plain", "fl"]
    ok = all(os.path.exists(os.path.join(out, "gossip-%s.csv" % n)) for n in names)
    t.ok(ok and os.path.exists(os.path.join(out, "gossip-summary.csv")),
         "per-method CSV files and the summary are written")
    if ok:
        data = {n: rows(os.path.join(out, "gossip-%s.csv" % n)) for n in names}
        t.ok(all([int(x["step"]) for x in data[n]] == [0, 5, 10, 15] for n in names),
             "accuracy every 5 local steps, 0..15")
        for n in names:
            first, last = float(data[n][0]["mean_accuracy"]), float(data[n][-1]["mean_accuracy"])
            t.ok(last > first + 0.1, "%s learns: mean accuracy %.3f -> %.3f" % (n, first, last))
        vc = float(data["variance-corrected"][-1]["weight_std"])
        pl = float(data["plain"][-1]["weight_std"])
        init = float(data["plain"][0]["weight_std"])
        t.ok(pl < 0.75 * init and vc > 0.9 * init,
             "weight spread: initial %.4f, plain %.4f (shrinks), variance-corrected %.4f (kept)"
             % (init, pl, vc))
        t.ok(float(data["plain"][-1]["sd_accuracy"]) > 0 and
             float(data["fl"][-1]["sd_accuracy"]) == 0,
             "gossip nodes differ, the federation has one model")
    shutil.rmtree(out, ignore_errors=True)
    t.done()


if __name__ == "__main__":
    main()
