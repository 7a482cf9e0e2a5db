#!/usr/bin/env python3
"""Turns the output of tools/fedau_experiments.sh into the tables and plots of
docs/results.md: final test accuracy (mean over the evaluations in the last 500
rounds) as mean +- std over seeds, per participation pattern and strategy, the
gain over FedAvg-over-participants, and one SVG per pattern (accuracy against
rounds, averaged over seeds).
    tools/fedau_table.py RESULTS_DIR DOCS_DIR"""
import csv
import glob
import os
import statistics
import subprocess
import sys

SPECS = ["fedavg:uniform", "fedavg:all:lr=10", "fedau", "fedau:K=50"]
LABEL = {"fedavg:uniform": "FedAvg over participants", "fedavg:all:lr=10": "FedAvg over all (eta 10)",
         "fedau": "FedAU (K unlimited)", "fedau:K=50": "FedAU (K = 50)"}


def fname(spec):
    return spec.replace(":", "_").replace("=", "")


def main():
    res, docs = sys.argv[1], sys.argv[2]
    out = []
    for pat in ("bernoulli", "markov", "cyclic"):
        rows = {}
        secs = []
        seeds = []
        for f in sorted(glob.glob(os.path.join(res, "%s-s*-summary.csv" % pat))):
            got = list(csv.DictReader(open(f)))
            if sorted(r["spec"] for r in got) != sorted(SPECS):
                continue  # a seed still running: compare complete seeds only
            seeds.append(os.path.basename(f).split("-")[1])
            for r in got:
                rows.setdefault(r["spec"], []).append(float(r["final_acc"]))
                secs.append(float(r["seconds"]))
        if not rows:
            continue
        n = min(len(v) for v in rows.values())
        out.append("\n### %s participation (%d seed%s)\n" % (pat.capitalize(), n, "" if n == 1 else "s"))
        out.append("| strategy | final test accuracy | vs FedAvg over participants |")
        out.append("| --- | --- | --- |")
        base = rows.get("fedavg:uniform")
        for spec in SPECS:
            v = rows.get(spec)
            if not v:
                continue
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            gain = ""
            if base and spec != "fedavg:uniform":
                d = [a - b for a, b in zip(v, base)]
                gain = "%+.2f points (%s)" % (100 * statistics.mean(d),
                                              ", ".join("%+.2f" % (100 * x) for x in d))
            out.append("| %s | %.4f ± %.4f | %s |" % (LABEL[spec], statistics.mean(v), sd, gain))
        out.append("\nSeconds per 2000-round run: median %.0f, max %.0f." %
                   (statistics.median(secs), max(secs)))
        # Plot: accuracy against rounds, averaged over seeds at each evaluated round.
        series = []
        for spec in SPECS:
            curves = {}
            for f in [os.path.join(res, "%s-%s-%s.csv" % (pat, sd, fname(spec))) for sd in seeds]:
                for r in csv.DictReader(open(f)):
                    if r["test_accuracy"]:
                        curves.setdefault(int(r["round"]), []).append(float(r["test_accuracy"]))
            if not curves:
                continue
            path = os.path.join(res, "plot-%s-%s.csv" % (pat, fname(spec)))
            with open(path, "w") as g:
                g.write("round,participants,test_accuracy,train_loss\n")
                for k in sorted(curves):
                    g.write("%d,,%.5f,\n" % (k, statistics.mean(curves[k])))
            series += [path, LABEL[spec]]
        svg = os.path.join(docs, "results-fedau-%s.svg" % pat)
        subprocess.run(["sh", os.path.join(os.path.dirname(__file__), "plot_results.sh"), svg,
                        "Fashion-MNIST, 250 clients, %s participation (mean of seeds)" % pat] + series,
                       check=True)
        out.append("\n![%s](results-fedau-%s.svg)\n" % (pat, pat))
    print("\n".join(out))


if __name__ == "__main__":
    main()
