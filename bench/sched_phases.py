#!/usr/bin/python3
"""Where a round's CPU time goes, phase by phase, from the scheduler's view.

    perf record -k mono -a -e sched:sched_switch -e sched:sched_wakeup \
        -e sched:sched_wakeup_new -o sched.data
        (during bench-lcclients)
    perf script -i sched.data -F cpu,time,event,trace | \\
        bench/sched_phases.py LCCLIENTS_OUTPUT.jsonl --server-pid PID

bench_server.py round --sched DIR does all of it. Each round (2..R) is cut into
the phases the clients see: offer (RoundResult r-1 -> first model received),
broadcast (-> last model received), tail (-> last UpdateAck), finalize (-> first
RoundResult r). For each phase: its length and the core-milliseconds spent by
cohortd's loop thread (tid = pid), its other threads (the thread pool), the
clients, other processes, nobody (idle), and what the recording cannot tell
(unknown: see sched_trace.py; this VM's recordings lose the switches out of idle on
one CPU). On two cores a phase of T ms has 2T core-ms.
"""
import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sched_trace  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("lcclients_jsonl")
    ap.add_argument("--server-pid", type=int, required=True)
    ap.add_argument("--json", action="store_true", help="one JSON line per phase")
    a = ap.parse_args()
    lines = [json.loads(l) for l in open(a.lcclients_jsonl) if l.startswith("{")]
    rounds = [l for l in lines if l["name"] == "lc_round"]
    summ = next(l for l in lines if l["name"] == "lc_summary")
    t0 = summ["t0_monotonic"]
    phases = []
    for prev, cur in zip(rounds, rounds[1:]):
        r = cur["params"]["round"]
        marks = [prev["t_result"], cur["t_first_train"], cur["t_last_train"],
                 cur["t_last_ack"], cur["t_result"]]
        for name, lo, hi in zip(("offer", "broadcast", "tail", "finalize"), marks, marks[1:]):
            phases.append((r, name, t0 + lo, t0 + hi))
    spent = collections.defaultdict(float)
    server = a.server_pid

    events = sched_trace.parse(sys.stdin)
    iv = sched_trace.Intervals(events)
    for cpu, since, t, tid, comm in iv.spans:
        k = sched_trace.kind(tid, comm, server)
        for (r, name, lo, hi) in phases:
            d = min(hi, t) - max(lo, since)
            if d > 0:
                spent[(r, name, k)] += d
    kinds = ["loop", "pool", "clients", "other", "idle", "unknown"]
    if not a.json:
        print("Switches lost by the recording: %d, of which %d placed by a wakeup.\n"
              % (iv.breaks, iv.recovered))
    if not a.json:
        print("| round | phase | ms | " + " | ".join(k + " core-ms" for k in kinds) + " |")
        print("| ---: | --- | ---: | " + " | ".join("---:" for _ in kinds) + " |")
    for (r, name, lo, hi) in phases:
        row = [round(spent[(r, name, k)] * 1e3, 1) for k in kinds]
        if a.json:
            print(json.dumps({"round": r, "phase": name, "ms": round((hi - lo) * 1e3, 1),
                              **dict(zip(kinds, row))}))
        else:
            print("| %d | %s | %.1f | %s |" % (r, name, (hi - lo) * 1e3,
                                              " | ".join("%.1f" % v for v in row)))


if __name__ == "__main__":
    main()
