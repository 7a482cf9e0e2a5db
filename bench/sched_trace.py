"""Reading `perf script -F cpu,time,event,trace` output of a recording of
sched:sched_switch, sched:sched_wakeup and sched:sched_wakeup_new on all CPUs (perf record
-k mono -a), for sched_phases.py and loop_offcpu.py.

On the 2-vCPU VM of docs/performance.md the recording misses every switch *out of idle*
on CPU 1 (thousands of switches into idle there, none out; CPU 0 has both), so a
reader that charges each stretch of a CPU to the task switched in last would count
whatever ran after idle on CPU 1 as idle. Here each CPU's time is checked for
continuity instead: when a switch names as `prev` another task than the one switched
in last, the switch in was lost. When the CPU was idle and the task had been woken onto
it, it is taken to have started when it was woken (an idle CPU runs a woken task at
once); otherwise the stretch is "unknown" and counted as such. On this VM the wakeups
onto that CPU are mostly lost too, so few stretches are placed (36 of 3,189 in one
recording): read "unknown" as time the recording cannot split. Recording the wakeups costs: rounds run slower under it than
without, so take times from the benchmark and shares from here.
"""
import re

SWITCH = re.compile(r"\[(\d+)\]\s+([\d.]+):\s+sched:sched_switch:\s+prev_comm=(.*?) "
                    r"prev_pid=(\d+) prev_prio=\S+ prev_state=(\S+) ==> next_comm=(.*?) "
                    r"next_pid=(\d+)")
WAKEUP = re.compile(r"\[(\d+)\]\s+([\d.]+):\s+sched:sched_wakeup(?:_new)?:\s+comm=(.*?) "
                    r"pid=(\d+) prio=\S+ target_cpu=(\d+)")


def parse(lines):
    """Events in time order: ("s", t, cpu, prev_comm, prev_pid, prev_state, next_comm,
    next_pid) and ("w", t, target_cpu, comm, pid)."""
    ev = []
    for line in lines:
        m = SWITCH.search(line)
        if m:
            ev.append(("s", float(m.group(2)), int(m.group(1)), m.group(3), int(m.group(4)),
                       m.group(5), m.group(6), int(m.group(7))))
            continue
        m = WAKEUP.search(line)
        if m:
            ev.append(("w", float(m.group(2)), int(m.group(5)), m.group(3), int(m.group(4))))
    ev.sort(key=lambda e: e[1])
    return ev


class Intervals:
    """What each CPU ran: `spans` is a list of (cpu, start, end, pid, comm), pid 0 for
    idle and None for a stretch that cannot be told; `unknown_ended_by` maps each such
    stretch's (cpu, start, end) to the task that switched out at its end (it ran for
    some unknown part of it); `breaks` counts the lost switches, `recovered` those whose
    start a wakeup gave."""

    def __init__(self, events):
        self.spans, self.breaks, self.recovered = [], 0, 0
        self.unknown_ended_by = {}
        cur = {}                    # cpu -> (since, pid, comm)
        woken = {}                  # cpu -> {pid: first wakeup time onto it since idle}
        for e in events:
            if e[0] == "w":
                _, t, cpu, comm, pid = e
                if cur.get(cpu, (0, -1))[1] == 0:
                    woken.setdefault(cpu, {}).setdefault(pid, t)
                continue
            _, t, cpu, pcomm, ppid, _, ncomm, npid = e
            if cpu in cur:
                since, pid, comm = cur[cpu]
                if pid == ppid:
                    self.spans.append((cpu, since, t, pid, comm))
                else:
                    self.breaks += 1
                    w = woken.get(cpu, {}).get(ppid) if pid == 0 else None
                    if w is not None and since <= w <= t:
                        self.recovered += 1
                        self.spans.append((cpu, since, w, 0, "idle"))
                        self.spans.append((cpu, w, t, ppid, pcomm))
                    else:
                        self.spans.append((cpu, since, t, None, "unknown"))
                        self.unknown_ended_by[(cpu, since, t)] = ppid
            cur[cpu] = (t, npid, ncomm)
            woken.pop(cpu, None)


def thread_states(events, iv, tid):
    """(start, end, state) for one thread between its first and last switch: "on" (on a
    CPU, from the intervals), "runnable" (switched out preempted, or woken and not yet on
    a CPU), "asleep" (switched out to wait, not yet woken) or "unknown" (an unknown
    stretch of a CPU that ended with this thread switching out: it ran for part of it)."""
    out = _thread_states(events, iv.spans, tid)
    unk = sorted((s, e) for (_, s, e), who in iv.unknown_ended_by.items() if who == tid)
    if not unk:
        return out
    res = []
    for s, e, st in out:
        if st == "on":
            res.append((s, e, st))
            continue
        cur = s
        for us, ue in unk:
            if ue <= cur or us >= e:
                continue
            if us > cur:
                res.append((cur, us, st))
            res.append((max(us, cur), min(ue, e), "unknown"))
            cur = min(ue, e)
        if cur < e:
            res.append((cur, e, st))
    return res


def _thread_states(events, spans, tid):
    on = sorted((s, e) for _, s, e, pid, _ in spans if pid == tid)
    outs = {}                       # switch-out time -> state letter
    wakes = []
    for e in events:
        if e[0] == "s" and e[4] == tid:
            outs[e[1]] = e[5]
        elif e[0] == "w" and e[4] == tid:
            wakes.append(e[1])
    out = []
    wi = 0
    for (s0, e0), (s1, _) in zip(on, on[1:]):
        out.append((s0, e0, "on"))
        if s1 <= e0:
            continue
        state = outs.get(e0, "S")
        if state.startswith("R"):
            out.append((e0, s1, "runnable"))
            continue
        while wi < len(wakes) and wakes[wi] < e0:
            wi += 1
        w = wakes[wi] if wi < len(wakes) and wakes[wi] <= s1 else s1
        out.append((e0, w, "asleep"))
        if w < s1:
            out.append((w, s1, "runnable"))
    if on:
        out.append((on[-1][0], on[-1][1], "on"))
    return out


def kind(pid, comm, loop, pool="pool"):
    """What ran: cohortd's loop thread (its id is cohortd's pid), cohortd's other threads,
    the bench-lcclients threads, anything else, idle, or unknown (pid None)."""
    if pid is None:
        return "unknown"
    if pid == 0:
        return "idle"
    if pid == loop:
        return "loop"
    if comm.startswith("cohortd"):
        return pool
    if comm.startswith("bench-lcclient"):
        return "clients"
    return "other"


def clip(a, b, windows):
    """How much of [a, b] lies inside the (start, end) windows."""
    return sum(max(0.0, min(b, w1) - max(a, w0)) for w0, w1 in windows)
