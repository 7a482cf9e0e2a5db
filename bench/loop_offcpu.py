#!/usr/bin/python3
"""Where cohortd's loop thread is during the upload windows of a bench-lcclients run
with --upload-barrier (bench/ingest_sched.sh records one).

    loop_offcpu.py PERF_DATA LC_STDOUT LOOP_TID [ROUND]

PERF_DATA is `perf record -k mono -a -e sched:sched_switch -e sched:sched_wakeup
-e sched:sched_wakeup_new`,
LC_STDOUT what bench-lcclients printed (its rounds' t_release and t_last_ack are seconds
after its t0_monotonic, the clock perf -k mono uses). Prints, over the windows of rounds
2..R (the last client has its model .. the last UpdateAck), the loop thread's time on a
CPU, runnable (preempted, or woken and waiting for a CPU) and asleep (waiting for input),
and the core-seconds of the other threads, of idle and of what the recording cannot tell
(see sched_trace.py). With ROUND, also that round's window in 10 ms steps.
"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sched_trace  # noqa: E402

BUCKET = 0.010


def windows(lc_path):
    lines = [json.loads(l) for l in open(lc_path) if l.startswith("{")]
    t0 = next(l for l in lines if l["name"] == "lc_summary")["t0_monotonic"]
    return {l["params"]["round"]: (t0 + l["t_release"], t0 + l["t_last_ack"])
            for l in lines if l["name"] == "lc_round" and l.get("t_release")}


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    data, lc, loop = sys.argv[1], sys.argv[2], int(sys.argv[3])
    one = int(sys.argv[4]) if len(sys.argv) > 4 else None
    wins = windows(lc)
    use = [w for r, w in sorted(wins.items()) if r >= 2]
    if not use:
        sys.exit("no upload windows in %s (was it run with --upload-barrier?)" % lc)
    out = subprocess.run(["perf", "script", "-i", data, "-F", "cpu,time,event,trace"],
                         capture_output=True, text=True, check=True).stdout
    events = sched_trace.parse(out.splitlines())
    if not any(e[0] == "w" for e in events):
        sys.exit("no sched_wakeup events in %s: record with -e sched:sched_wakeup" % data)
    iv = sched_trace.Intervals(events)
    total = sum(w1 - w0 for w0, w1 in use)

    cores = {}
    for cpu, s, e, pid, comm in iv.spans:
        c = sched_trace.kind(pid, comm, loop, "cohortd pool")
        cores[c] = cores.get(c, 0.0) + sched_trace.clip(s, e, use)
    states = {"on": 0.0, "runnable": 0.0, "asleep": 0.0, "unknown": 0.0}
    for s, e, st in sched_trace.thread_states(events, iv, loop):
        states[st] += sched_trace.clip(s, e, use)
    told = sum(states.values())
    ncpu = len({e[2] for e in events if e[0] == "s"})

    print("upload windows of rounds 2..%d: %.3f s; switches lost by the recording: %d, of "
          "which %d placed by a wakeup" % (max(wins), total, iv.breaks, iv.recovered))
    print("loop thread: " + ", ".join(
        "%s %.3f s (%.0f %%)" % (k, states[k], 100 * states[k] / total)
        for k in ("on", "runnable", "asleep", "unknown")) +
        " (unknown: it ran for part of a stretch the recording lost)")
    if abs(told - total) > 0.01 * total:
        print("WARNING: the loop's states cover %.3f of %.3f s" % (told, total))
    print("core-seconds (of %.3f on %d CPUs): " % (ncpu * total, ncpu) +
          ", ".join("%s %.3f" % (k, v) for k, v in sorted(cores.items())))
    print("windows ms: " + " ".join("%.0f" % ((w1 - w0) * 1e3) for w0, w1 in use))
    if not one or one not in wins:
        return
    b0, b1 = wins[one]
    nb = int((b1 - b0) / BUCKET) + 1
    cats = ["loop", "cohortd pool", "clients", "other", "idle", "unknown"]
    grid = {c: [0.0] * nb for c in cats}
    for cpu, s, e, pid, comm in iv.spans:
        c = sched_trace.kind(pid, comm, loop, "cohortd pool")
        for i in range(nb):
            lo, hi = b0 + i * BUCKET, min(b1, b0 + (i + 1) * BUCKET)
            grid[c][i] += max(0.0, min(e, hi) - max(s, lo))
    print("\nround %d, %.1f ms: cores used per step (the last step may be shorter)" %
          (one, (b1 - b0) * 1e3))
    print("| ms | " + " | ".join(cats) + " |")
    print("| ---: | " + " | ".join("---:" for _ in cats) + " |")
    for i in range(nb):
        width = min(b1, b0 + (i + 1) * BUCKET) - (b0 + i * BUCKET)
        print("| %d | " % (i * 10) + " | ".join("%.2f" % (grid[c][i] / width) for c in cats)
              + " |")


if __name__ == "__main__":
    main()
