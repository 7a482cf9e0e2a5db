#!/usr/bin/python3
"""Each round of a bench-lcclients run, step by step: where cohortd's loop thread was
(on a CPU, runnable, asleep), how many cores the clients and cohortd's pool used, how
many were idle, and how many clients had their model and their UpdateAck by then.

    perf script -i sched.data -F cpu,time,event,trace | \\
        bench/round_timeline.py LCCLIENTS_OUTPUT.jsonl --server-pid PID [--step-ms 20]

The recording is the one of sched_phases.py (bench_server.py round --sched DIR writes
both: sched-TAG.md and timeline-TAG.md). A round runs from the previous round's
RoundResult to its own, as the clients saw them. Read it for how the loop's work
overlaps the clients': a round whose acks follow the models closely and whose loop is
never asleep while uploads wait has no tail. Shares are of the step's length; the last
step of a round may be shorter. "unknown" is what the recording cannot split (see
sched_trace.py).
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
    ap.add_argument("lc", help="bench-lcclients output (JSON lines with t_models, t_acks)")
    ap.add_argument("--server-pid", type=int, required=True, help="cohortd's pid (= its loop)")
    ap.add_argument("--step-ms", type=float, default=20.0)
    a = ap.parse_args()
    lines = [json.loads(l) for l in open(a.lc) if l.startswith("{")]
    t0 = next(l for l in lines if l["name"] == "lc_summary")["t0_monotonic"]
    rounds = {l["params"]["round"]: l for l in lines if l["name"] == "lc_round"}
    if not any("t_models" in l for l in rounds.values()):
        sys.exit("no t_models in %s: a bench-lcclients from before the timelines" % a.lc)
    events = sched_trace.parse(sys.stdin.read().splitlines())
    iv = sched_trace.Intervals(events)
    loop = a.server_pid
    states = sched_trace.thread_states(events, iv, loop)
    step = a.step_ms / 1e3
    print("Switches lost by the recording: %d. Per step: the loop's share on a CPU / "
          "runnable / asleep / unknown, then cores used by the clients, cohortd's pool and "
          "nobody (idle), and how many clients had their model and their ack by the step's "
          "end.\n" % iv.breaks)
    for r in sorted(rounds):
        if r < 2 or r - 1 not in rounds:
            continue
        d = rounds[r]
        a0, b0 = t0 + rounds[r - 1]["t_result"], t0 + d["t_result"]
        models = sorted(t0 + x for x in d.get("t_models", []))
        acks = sorted(t0 + x for x in d.get("t_acks", []))
        if not models or not acks:
            continue

        def ms(x):
            return (x - a0) * 1e3
        print("round %d: %.0f ms; models %.0f..%.0f ms, acks %.0f..%.0f ms" % (
            r, ms(b0), ms(models[0]), ms(models[-1]), ms(acks[0]), ms(acks[-1])))
        print("")
        print("| ms | loop on | runnable | asleep | unknown | clients | pool | idle | models | acks |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        tot = collections.Counter()
        lo = a0
        while lo < b0 - 1e-6:
            hi = min(b0, lo + step)
            st = collections.Counter()
            for s, e, k in states:
                st[k] += max(0.0, min(e, hi) - max(s, lo))
            cores = collections.Counter()
            for _, s, e, pid, comm in iv.spans:
                cores[sched_trace.kind(pid, comm, loop, "pool")] += max(0.0, min(e, hi) - max(s, lo))
            tot.update(st)
            w = hi - lo
            print("| %.0f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %d | %d |" % (
                ms(lo), st["on"] / w, st["runnable"] / w, st["asleep"] / w, st["unknown"] / w,
                cores["clients"] / w, cores["pool"] / w, cores["idle"] / w,
                sum(1 for x in models if x < hi), sum(1 for x in acks if x < hi)))
            lo = hi
        print("\nloop thread in round %d: on a CPU %.0f ms, runnable %.0f, asleep %.0f, "
              "unknown %.0f\n" % (r, tot["on"] * 1e3, tot["runnable"] * 1e3,
                                 tot["asleep"] * 1e3, tot["unknown"] * 1e3))


if __name__ == "__main__":
    main()
