#!/usr/bin/python3
"""Where cohortd's loop thread is during the upload windows of a bench-lcclients run
with --upload-barrier (bench/ingest_sched.sh records one).

    loop_offcpu.py PERF_DATA LC_STDOUT LOOP_TID [ROUND]

PERF_DATA is `perf record -k mono -a -e sched:sched_switch`, LC_STDOUT what
bench-lcclients printed (its rounds' t_release and t_last_ack are seconds after its
t0_monotonic, the clock perf -k mono uses). Prints, over the windows of rounds 2..R
(the last client has its model .. the last UpdateAck), the loop thread's time on a CPU,
asleep (it waited for input: switched out in state S or D) and runnable (switched out
in state R: another thread had its CPU), and the core-seconds of the other threads and
of idle. With ROUND, also that round's window in 10 ms buckets.
"""
import json
import re
import subprocess
import sys

SWITCH = re.compile(r"\[(\d+)\]\s+([\d.]+): prev_comm=(.*) prev_pid=(\d+) prev_prio=\S+ "
                    r"prev_state=(\S+) ==> next_comm=(.*) next_pid=(\d+)")
BUCKET = 0.010


def windows(lc_path):
    lines = [json.loads(l) for l in open(lc_path) if l.startswith("{")]
    t0 = next(l for l in lines if l["name"] == "lc_summary")["t0_monotonic"]
    return {l["params"]["round"]: (t0 + l["t_release"], t0 + l["t_last_ack"])
            for l in lines if l["name"] == "lc_round" and l.get("t_release")}


def switches(data):
    out = subprocess.run(["perf", "script", "-i", data, "-F", "cpu,time,trace"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        m = SWITCH.search(line)
        if m:
            yield (int(m.group(1)), float(m.group(2)), m.group(3).strip(), int(m.group(4)),
                   m.group(5), m.group(6).strip(), int(m.group(7)))


def category(pid, comm, loop):
    if pid == 0:
        return "idle"
    if pid == loop:
        return "loop"
    if comm.startswith("cohortd"):
        return "cohortd pool"
    if comm.startswith("bench-lcclient"):
        return "clients"
    return "other"


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    data, lc, loop = sys.argv[1], sys.argv[2], int(sys.argv[3])
    one = int(sys.argv[4]) if len(sys.argv) > 4 else None
    wins = windows(lc)
    use = [w for r, w in sorted(wins.items()) if r >= 2]
    if not use:
        sys.exit("no upload windows in %s (was it run with --upload-barrier?)" % lc)

    def clip(a, b, ws=use):
        return sum(max(0.0, min(b, w1) - max(a, w0)) for w0, w1 in ws)

    per_cpu = {}                    # cpu -> (category, since)
    cores = {}                      # category -> core-seconds inside the windows
    loop_state, loop_since = None, None
    off = {"asleep": 0.0, "runnable": 0.0}
    bw = wins.get(one) if one else None
    nb = int((bw[1] - bw[0]) / BUCKET) + 1 if bw else 0
    buckets = {}

    def add_bucket(cat, a, b):
        a, b = max(a, bw[0]), min(b, bw[1])
        while a < b:
            i = min(int((a - bw[0]) / BUCKET), nb - 1)
            e = min(b, bw[0] + (i + 1) * BUCKET)
            if e <= a:              # a sits on a boundary that rounding put in bucket i
                i = min(i + 1, nb - 1)
                e = min(b, bw[0] + (i + 1) * BUCKET)
                if e <= a:
                    break
            buckets.setdefault(cat, [0.0] * nb)[i] += e - a
            a = e

    for cpu, t, pcomm, ppid, pstate, ncomm, npid in switches(data):
        if cpu in per_cpu:
            cat, since = per_cpu[cpu]
            cores[cat] = cores.get(cat, 0.0) + clip(since, t)
            if bw:
                add_bucket(cat, since, t)
        per_cpu[cpu] = (category(npid, ncomm, loop), t)
        if ppid == loop:
            loop_state = "runnable" if pstate.startswith("R") else "asleep"
            loop_since = t
        elif npid == loop and loop_state:
            off[loop_state] += clip(loop_since, t)
            loop_state = None

    total = sum(w1 - w0 for w0, w1 in use)
    on = cores.get("loop", 0.0)
    print("upload windows of rounds 2..%d: %.3f s" % (max(wins), total))
    print("loop thread: on a CPU %.3f s (%.0f %%), asleep %.3f s (%.0f %%), runnable %.3f s "
          "(%.0f %%)" % (on, 100 * on / total, off["asleep"], 100 * off["asleep"] / total,
                         off["runnable"], 100 * off["runnable"] / total))
    print("core-seconds: " + ", ".join("%s %.3f" % (k, v) for k, v in sorted(cores.items())))
    print("windows ms: " + " ".join("%.0f" % ((w1 - w0) * 1e3) for w0, w1 in use))
    if bw:
        print("\nround %d, %.1f ms, cores busy per 10 ms:" % (one, (bw[1] - bw[0]) * 1e3))
        cats = sorted(buckets)
        print("| ms | " + " | ".join(cats) + " |")
        print("| ---: | " + " | ".join("---:" for _ in cats) + " |")
        for i in range(nb):
            print("| %d | " % (i * 10) + " | ".join("%.2f" % (buckets[c][i] / BUCKET)
                                                   for c in cats) + " |")


if __name__ == "__main__":
    main()
