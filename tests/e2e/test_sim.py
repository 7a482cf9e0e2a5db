"""`cohort sim` end to end on a small setting (20 clients, 60 rounds, Bernoulli
participation tied to the data): the compared strategies see identical
participation draws, a run is reproducible bit for bit, the CSVs hold one row per
round with test accuracy at the evaluation rounds, and FedAU's weights differ
from FedAvg's (so the two models differ)."""
import csv
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from cohort_e2e import Check  # noqa

ROUNDS = 60


def run_sim(build, out):
    cmd = [os.path.join(build, "client", "cli", "cohort"), "sim", "--clients", "20", "--rounds",
           str(ROUNDS), "--pattern", "bernoulli", "--pbar", "0.3", "--eval-every", "20",
           "--avg-last", "40", "--seed", "7", "--no-progress", "--compare", "fedavg:uniform,fedau:K=10",
           "--out", out]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=280)
    sys.stdout.write(r.stdout)
    return r.returncode


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def main():
    t = Check("e2e-sim")
    build = os.environ.get("COHORT_BUILD", "build")
    d = tempfile.mkdtemp(prefix="cohort-simtest-")
    a, b = os.path.join(d, "a"), os.path.join(d, "b")
    t.ok(run_sim(build, a) == 0, "cohort sim --compare exits 0")
    fa, fu = rows(a + "-fedavg_uniform.csv"), rows(a + "-fedau_K10.csv")
    t.ok(len(fa) == ROUNDS and len(fu) == ROUNDS, "one CSV row per round (%d, %d)" % (len(fa), len(fu)))
    t.ok([r["participants"] for r in fa] == [r["participants"] for r in fu],
         "both strategies saw identical participation draws")
    parts = [int(r["participants"]) for r in fa]
    t.ok(0 < sum(parts) < 20 * ROUNDS, "partial participation (%d of %d offers)" % (sum(parts), 20 * ROUNDS))
    evald = [int(r["round"]) for r in fa if r["test_accuracy"]]
    t.ok(evald == [20, 40, 60], "test accuracy at the evaluation rounds (%s)" % evald)
    acc = [float(r["test_accuracy"]) for r in fa if r["test_accuracy"]]
    t.ok(all(0.3 < x <= 1.0 for x in acc), "accuracies are plausible after training (%s)" % acc)
    acc_u = [float(r["test_accuracy"]) for r in fu if r["test_accuracy"]]
    t.ok(acc != acc_u, "FedAU's model differs from FedAvg's (%s vs %s)" % (acc, acc_u))
    summ = rows(a + "-summary.csv")
    t.ok(len(summ) == 2, "summary CSV has one row per strategy")
    t.ok(run_sim(build, b) == 0, "a second identical run exits 0")
    same = all(open(a + s).read() == open(b + s).read()
               for s in ("-fedavg_uniform.csv", "-fedau_K10.csv"))
    t.ok(same, "the same seed reproduces both CSVs exactly")
    t.done()


if __name__ == "__main__":
    main()
