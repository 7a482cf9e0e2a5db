#!/usr/bin/python3
"""Benchmarks that need a running cohortd (issue 5, docs/performance.md).

    bench_server.py BENCH --build BUILD_DIR [--quick] [--perf DIR] [--out FILE]

BENCH is one of:
  ingest  N event-driven TLS clients (cohort-loadgen) upload P-float updates to a real
          cohortd on 127.0.0.1; bytes accepted per second next to single-core
          AES-GCM decryption of the same byte count (cohort-loadgen aesref) in this run.
  round   real cohortd + N libcohort clients (bench-lcclients: threads in one process,
          each its own connection and certificate) at the four (N, P) points of the
          issue; median round time over rounds 2..R and cohortd's peak RSS, next to
          the Flower figures from issue 5.
  memory  cohortd's peak RSS at P = 1e6 for N = 10, 100, 1000 (cohort-loadgen clients)
          against 3 x model size + 64 KiB x N.
  scale   10,000 idle heartbeating connections held by one cohortd (heartbeat
          round-trip p50/p99, RSS), then a round with 1,000 clients at P = 1e5.
  client  libcohort's size (static and shared, stripped; a -Dserver=false build) and a
          client process's peak RSS during rounds at P = 1e6.

Every measurement is printed as one JSON line (name, params, value, unit, ref, ratio)
and appended to BUILD_DIR/bench/results.jsonl. A process's peak RSS is its VmHWM read
from /proc until it exits (HwmWatch; not wait4's ru_maxrss, which a child started from
Python inherits from the interpreter). Python standard library only (Debian's python3);
the measuring loops are the C programs.
"""
import argparse
import json
import resource
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

# free_port, kill_all and wait_port are the end-to-end tests' (standard library only too).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests", "e2e"))
from cohort_e2e import free_port, kill_all, wait_port  # noqa: E402

MiB = 1 << 20
# Issue 5: Flower 1.6 on a 2-vCPU machine, N clients x P float32, TLS on.
FLOWER = {(10, 1000000): (0.35, 528e6), (10, 10000000): (5.0, 3.9e9),
          (50, 1000000): (2.85, 2.0e9), (100, 100000): (0.78, 436e6)}

OUT = None
PERF_DIR = None
SCHED_DIR = None
CPU_DIR = None
ONLY = None


def wanted(tag):
    return not ONLY or ONLY in tag


def emit(obj):
    obj.setdefault("loadavg", round(os.getloadavg()[0], 2))
    obj.setdefault("nice", os.nice(0))
    obj.setdefault("autogroup_nice", autogroup_nice())
    line = json.dumps(obj)
    print(line, flush=True)
    if OUT:
        with open(OUT, "a") as f:
            f.write(line + "\n")


def ratio_line(name, params, value, unit, ref_name, ref_value, **extra):
    o = {"name": name, "params": params, "value": value, "unit": unit}
    if ref_name is not None:
        o["ref"] = {"name": ref_name, "value": ref_value}
        o["ratio"] = round(value / ref_value, 4) if ref_value else None
    o.update(extra)
    emit(o)


def set_nice(nice):
    try:
        os.setsid()
    except OSError:
        pass
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        pass
    os.nice(nice - os.nice(0))


def same_autogroup_nice(pid):
    nice = autogroup_nice()
    if nice is None:
        return
    try:
        with open("/proc/%d/autogroup" % pid, "w") as f:
            f.write(str(nice))
    except OSError:
        pass


def autogroup_nice():
    try:
        with open("/proc/self/autogroup") as f:
            return int(f.read().split()[-1])
    except (OSError, ValueError):
        return None


class Bench:
    def __init__(self, build, name):
        self.build = os.path.abspath(build)
        self.cohortd = os.path.join(self.build, "server", "cohortd")
        self.cohort = os.path.join(self.build, "client", "cli", "cohort")
        self.loadgen = os.path.join(self.build, "bench", "cohort-loadgen")
        self.lcclients = os.path.join(self.build, "bench", "bench-lcclients")
        self.tlsfloor = os.path.join(self.build, "bench", "bench-tlsfloor")
        self.dir = tempfile.mkdtemp(prefix="cohort-bench-%s-" % name)
        self.certs = os.path.join(self.dir, "certs")
        self.ncerts = 0
        self.models = {}
        self.procs = []

    def make_certs(self, n):
        if n > self.ncerts or not os.path.exists(self.certs):
            shutil.rmtree(self.certs, ignore_errors=True)
            run([self.cohort, "certs", "--out", self.certs, "--clients", str(n)])
            self.ncerts = n

    def model(self, p):
        if p not in self.models:
            path = os.path.join(self.dir, "model-%d.safetensors" % p)
            run([self.loadgen, "mkmodel", "--out", path, "--params", str(p)])
            self.models[p] = path
        return self.models[p]

    def ca(self):
        return os.path.join(self.certs, "ca.pem"), os.path.join(self.certs, "ca.key")

    def start_server(self, p, tag, extra=(), hwm_interval=0.01):
        """cohortd on a fresh state dir with a P-float model; returns (proc, port, state)."""
        self.make_certs(max(self.ncerts, 1))
        port = free_port()
        state = os.path.join(self.dir, "state-%s" % tag)
        shutil.rmtree(state, ignore_errors=True)
        args = [self.cohortd, "--listen", "127.0.0.1:%d" % port, "--state-dir", state,
                "--ca", os.path.join(self.certs, "ca.pem"),
                "--cert", os.path.join(self.certs, "server.pem"),
                "--key", os.path.join(self.certs, "server.key"),
                "--model", self.model(p), "--round-timeout", "3600",
                "--idle-timeout-ms", "3600000", "--upload-timeout-ms", "3600000",
                "--handshake-timeout-ms", "600000", "--frame-timeout-ms", "3600000",
                "--log-level", "notice"] + list(extra)
        # Extra cohortd flags for trying settings (e.g. "--max-uploads 2"); the
        # figures in docs/performance.md are taken without.
        args += os.environ.get("COHORT_BENCH_SERVER_ARGS", "").split()
        log = open(os.path.join(self.dir, "cohortd-%s.log" % tag), "w")
        # cohortd in a session (and so a scheduling autogroup) of its own, with the
        # benchmark's autogroup nice value: as a service runs in its own cgroup. In the
        # clients' session its one loop thread would get one 51st of the CPU while
        # 50 client threads are runnable, and rounds would measure that.
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        same_autogroup_nice(proc.pid)
        proc.hwm = HwmWatch(proc.pid, hwm_interval)
        self.procs.append(proc)
        wait_port(port, proc, timeout=30)
        proc.perf = None
        if PERF_DIR:
            data = os.path.join(PERF_DIR, "perf-%s.data" % tag)
            proc.perf = subprocess.Popen(["perf", "record", "--call-graph", "dwarf,16384",
                                          "-F", "999", "-q", "-o", data, "-p", str(proc.pid)],
                                         stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            time.sleep(0.3)
        return proc, port, state

    def finish_server(self, proc, timeout=600, term=False):
        """Waits for cohortd (SIGTERM first when term); returns (exit code, peak RSS bytes:
        VmHWM, see HwmWatch). proc.cpu_s gets its user + system CPU seconds (all threads,
        whole life)."""
        if term and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        end = time.time() + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.time() > end:
                proc.kill()
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.cpu_s = ru.ru_utime + ru.ru_stime
        if proc.perf is not None:
            proc.perf.send_signal(signal.SIGINT)
            proc.perf.wait()
        return proc.returncode, proc.hwm.stop()

    def cleanup(self, keep=False):
        kill_all(self.procs)
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def run(args, timeout=900, check=True):
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError("%s failed (%d): %s %s" % (" ".join(args), r.returncode,
                                                       r.stdout[-2000:], r.stderr[-2000:]))
    return r


def json_lines(text):
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def server_durations(state, first=2):
    db = sqlite3.connect(os.path.join(state, "cohort.db"))
    rows = db.execute("SELECT round, duration_s FROM rounds WHERE round >= ? ORDER BY round",
                      (first,)).fetchall()
    db.close()
    return [d for _, d in rows]


def tcp_mem_pages():
    """Pages of kernel memory in TCP buffers (all sockets of the host)."""
    try:
        with open("/proc/net/sockstat") as f:
            for line in f:
                if line.startswith("TCP:"):
                    parts = line.split()
                    return int(parts[parts.index("mem") + 1])
    except (OSError, ValueError):
        pass
    return None


class HwmWatch:
    """A child's peak RSS: the last VmHWM read from /proc before it exits (read every
    10 ms; VmHWM only grows, and a process does not set a new peak while exiting).

    Not ru_maxrss from wait4: at exec the kernel copies the high-water mark of the
    memory the child had before exec into its ru_maxrss, and a child started from
    Python had the interpreter's (with vfork as much as with fork). So ru_maxrss is
    max(this script's RSS, the child's): 16-20 MiB for any small child here."""

    def __init__(self, pid, interval=0.01):
        self.pid = pid
        self.hwm = 0
        self.interval = interval
        self.done = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def read(self):
        try:
            with open("/proc/%d/status" % self.pid) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.hwm = max(self.hwm, int(line.split()[1]) * 1024)
                        return True
        except (OSError, ValueError):
            pass
        return False

    def run(self):
        while self.read() and not self.done.wait(self.interval):
            pass

    def stop(self):
        """The peak in bytes (call after the child exited, before reaping it is fine)."""
        self.done.set()
        self.t.join()
        return self.hwm


class LoopCpu:
    """CPU seconds of cohortd's loop thread (the task whose id is the pid) over time,
    sampled every 5 ms with time.monotonic() (CLOCK_MONOTONIC, the clock
    bench-lcclients reports t0_monotonic in), so the benchmark can take the loop's CPU
    between two round results. Everything the loop does is sequential: a round cannot
    be shorter than the loop's CPU in it."""

    def __init__(self, pid):
        # schedstat's first field: time on the CPU in ns (stat's utime+stime are 10 ms ticks)
        self.path = "/proc/%d/task/%d/schedstat" % (pid, pid)
        self.samples = []
        self.done = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.done.wait(0.005):
            try:
                t0 = time.monotonic()
                with open(self.path) as f:
                    v = f.read().split()
                t1 = time.monotonic()
            except (OSError, ValueError, IndexError):
                return
            # A read that took long (this thread was preempted) has no clear time.
            # Field 1 (on a CPU, ns) moves at scheduler ticks (4 ms here), field 2
            # (waiting for a CPU) when a wait ends: a window's figures are good to
            # a tick or one wait at each end.
            if t1 - t0 < 0.001:
                self.samples.append(((t0 + t1) / 2, int(v[0]) / 1e9, int(v[1]) / 1e9))

    def at(self, t, field=1):
        """The loop's CPU seconds (field 2: seconds waiting for a CPU) at monotonic time
        t, interpolated between the samples around it; None when there are none within
        50 ms (the sampler was starved or had stopped)."""
        prev = None
        for smp in self.samples:
            ts = smp[0]
            if ts >= t:
                if prev is None or ts - prev[0] > 0.05:
                    return None
                t0, c0, c1 = prev[0], prev[field], smp[field]
                return c0 + (c1 - c0) * (t - t0) / (ts - t0) if ts > t0 else c1
            prev = smp
        return None

    def stop(self):
        self.done.set()
        self.t.join()


def sched_phases(tag, rec, data, lc_stdout, server_pid):
    """Writes SCHED_DIR/sched-TAG.md from a finished perf recording (see --sched)."""
    out = os.path.join(SCHED_DIR, "sched-%s.md" % tag)
    err = rec.stderr.read().decode(errors="replace") if rec.stderr else ""
    if rec.returncode not in (0, -signal.SIGINT) or not os.path.exists(data):
        with open(out, "w") as f:
            f.write("perf record failed (exit %s): %s\n" % (rec.returncode, err[-500:]))
        return
    lc_out = os.path.join(SCHED_DIR, "lcclients-%s.jsonl" % tag)
    with open(lc_out, "w") as f:
        f.write(lc_stdout)
    ps = subprocess.run(["perf", "script", "-i", data, "-F", "cpu,time,event,trace"],
                        capture_output=True, text=True)
    ph = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                         "sched_phases.py"), lc_out, "--server-pid", str(server_pid)],
                        input=ps.stdout, capture_output=True, text=True)
    with open(out, "w") as f:
        f.write("# scheduler view of %s (bench/sched_phases.py)\n\n" % tag)
        f.write(ph.stdout if ph.returncode == 0 and ph.stdout else
                "sched_phases.py failed: %s %s\n" % (ph.stderr[-500:], ps.stderr[-300:]))
    tl = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                         "round_timeline.py"), lc_out, "--server-pid", str(server_pid)],
                        input=ps.stdout, capture_output=True, text=True)
    with open(os.path.join(SCHED_DIR, "timeline-%s.md" % tag), "w") as f:
        f.write("# round timelines of %s (bench/round_timeline.py)\n\n" % tag)
        f.write(tl.stdout if tl.returncode == 0 and tl.stdout else
                "round_timeline.py failed: %s\n" % tl.stderr[-500:])


def cpu_record(tag):
    """With --cpu: starts a host-wide perf recording (all CPUs, kernel call chains,
    CLOCK_MONOTONIC stamps) for cpu_kinds(); None otherwise."""
    if not CPU_DIR:
        return None
    data = os.path.join(CPU_DIR, "cpu-%s.data" % tag)
    rec = subprocess.Popen(["perf", "record", "-q", "-a", "-g", "-F", "1999", "-k", "mono",
                            "-o", data], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rec.data = data
    time.sleep(0.3)
    return rec


def perf_stop(rec, timeout=120):
    """Ends a perf recording (SIGINT lets it write its file), killing it if it hangs."""
    if rec is None:
        return
    rec.send_signal(signal.SIGINT)
    try:
        rec.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rec.kill()
        rec.wait()


def cpu_kinds(rec, tag, params, window, rounds, roles, loop_tid=None):
    """Emits a round_cpu_kinds line: the host's core-ms per round in the window by
    process role and kind of work (bench/cpu_kinds.py); the JSON also goes to
    CPU_DIR/cpu-TAG.json."""
    if rec is None:
        return
    args = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         "cpu_kinds.py"), rec.data,
            "--window", "%.6f" % window[0], "%.6f" % window[1], "--rounds", str(rounds)]
    args += ["--role=%d=%s" % (pid, name) for pid, name in roles.items()]
    if loop_tid is not None:
        args += ["--loop-tid", str(loop_tid)]
    ck = subprocess.run(args, capture_output=True, text=True)
    if ck.returncode != 0 or not ck.stdout:
        emit({"name": "round_cpu_kinds", "params": params,
              "error": "cpu_kinds.py failed: %s" % ck.stderr[-500:]})
        return
    with open(os.path.join(CPU_DIR, "cpu-%s.json" % tag), "w") as f:
        f.write(ck.stdout)
    d = json.loads(ck.stdout)
    emit({"name": "round_cpu_kinds", "params": params, "value": d["core_ms_per_round"],
          "unit": "core-ms per round", "samples": d["samples"], "by": d["by"],
          "note": "perf record -a -g -F 1999 over rounds 2..R; idle = the swapper"})


def rss_parts(pid):
    """(RssAnon, RssFile) of a process in bytes, None when it is gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            v = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f
                 if l.startswith(("RssAnon:", "RssFile:"))}
        return v["RssAnon"], v["RssFile"]
    except (OSError, KeyError, ValueError, IndexError):
        return None


class Monitor:
    """Peak of the host's TCP buffer memory while a load runs (sampled every 0.25 s) and,
    given a pid, the peak of that process's anonymous memory (sampled every 5 ms).

    Peak RSS counts the pages of the shared libraries a process has touched (RssFile:
    libcrypto, OpenBLAS, libc, SQLite: about 10 MiB for cohortd). RssAnon is what the
    process itself allocated: heap, model buffers, stacks. Model-sized buffers live for
    milliseconds at least, so 5 ms sampling sees them."""

    def __init__(self, pid=None):
        pages = tcp_mem_pages()
        self.base_mib = round(pages * 4096 / MiB, 1) if pages is not None else None
        self.peak = pages or 0
        self.pid = pid
        self.anon_peak = 0
        self.file_at_anon_peak = 0
        self.samples = 0
        self.done = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        next_tcp = 0.0
        while not self.done.wait(0.005 if self.pid else 0.25):
            now = time.monotonic()
            if now >= next_tcp:
                self.peak = max(self.peak, tcp_mem_pages() or 0)
                next_tcp = now + 0.25
            if self.pid:
                r = rss_parts(self.pid)
                if r:
                    self.samples += 1
                    if r[0] > self.anon_peak:
                        self.anon_peak, self.file_at_anon_peak = r

    def stop(self):
        self.done.set()
        self.t.join()
        self.peak_mib = round(self.peak * 4096 / MiB, 1)


def loadgen_upload(b, n, p, rounds, tag, extra_server=(), timeout=300, extra_gen=()):
    """cohortd + cohort-loadgen upload; returns (per-round dicts, summary, rss, rc, state)."""
    proc, port, state = b.start_server(p, tag, ["--min-clients", str(n), "--rounds", str(rounds),
                                                "--max-connections", str(n + 100)]
                                       + list(extra_server))
    ca, cakey = b.ca()
    # Many uploads wait for a slot with their data in socket buffers (cohortd stops
    # reading them); small send buffers keep that from exhausting the host's TCP memory.
    sndbuf = ["--sndbuf", "131072"] if n >= 500 else []
    mon = Monitor(proc.pid)
    r = run([b.loadgen, "upload", "--server", "127.0.0.1:%d" % port, "--ca", ca, "--ca-key",
             cakey, "--clients", str(n), "--rounds", str(rounds), "--server-pid", str(proc.pid),
             "--prefix", tag, "--timeout", str(timeout)] + sndbuf + list(extra_gen),
            timeout=timeout + 60,
            check=False)
    mon.stop()
    # A failed load generator leaves the round open: stop cohortd instead of waiting.
    rc, rss = b.finish_server(proc, timeout=120, term=r.returncode != 0)
    lines = json_lines(r.stdout)
    per = [l for l in lines if l["name"] == "loadgen_round"]
    summ = next((l for l in lines if l["name"] == "loadgen_summary"), {})
    summ["tcp_mem_base_mib"] = mon.base_mib
    summ["tcp_mem_peak_mib"] = mon.peak_mib
    summ["anon_peak"] = mon.anon_peak
    summ["file_at_anon_peak"] = mon.file_at_anon_peak
    summ["rss_samples"] = mon.samples
    if r.returncode != 0 or rc != 0:
        sys.stderr.write("loadgen rc=%d cohortd rc=%d: %s\n%s\n" % (
            r.returncode, rc, summ.get("first_error", ""), r.stderr[-2000:]))
    return per, summ, rss, rc, state


# ---------------------------------------------------------------------------

def bench_ingest(b, quick):
    points = [(10, 10000000), (50, 1000000)] if not quick else [(4, 1000000)]
    rounds = 5 if not quick else 3
    b.make_certs(max(n for n, _ in points))
    for n, p in points:
        if not wanted("ingest-%d-%d" % (n, p)):
            continue
        # Uploads start once every client has its model: the window holds uploads only
        # (the broadcast is the round benchmark's business).
        per, summ, rss, rc, state = loadgen_upload(
            b, n, p, rounds, "ingest-%d-%d" % (n, p), ["--durability", "relaxed"],
            extra_gen=["--after-all-models", "1"])
        for x in per:
            # The raw timeline of every round (seconds since the load generator started).
            tl = {k: x[k] for k in ("t_offer", "t_models", "t_first_begin", "t_last_end",
                                    "t_last_ack", "t_result", "accepted",
                                    "server_cpu_upload_s", "server_loop_cpu_upload_s",
                                    "loadgen_cpu_upload_s", "server_cpu_round_s")}
            emit({"name": "ingest_timeline", "params": {"N": n, "P": p,
                                                        "round": x["params"]["round"]}, **tl})
        use = [x for x in per if x["params"]["round"] >= 2 and x["accepted"] == n]
        if len(use) < rounds - 1:
            emit({"name": "ingest", "params": {"N": n, "P": p}, "error":
                  "only %d of %d measured rounds completed: %s" % (
                      len(use), rounds - 1, summ.get("first_error", ""))})
            continue
        nbytes = sum(x["bytes"] for x in use)
        t_up = sum(x["t_last_ack"] - x["t_first_begin"] for x in use)
        t_round = sum(x["t_last_ack"] - x["t_offer"] for x in use)
        cpu = sum(x["server_cpu_upload_s"] for x in use)
        loop_cpu = sum(x["server_loop_cpu_upload_s"] for x in use)
        gen_cpu = sum(x["loadgen_cpu_upload_s"] for x in use)
        ref = json_lines(run([b.loadgen, "aesref", "--params", str(nbytes)]).stdout)[0]
        # Same-run floor: the same uploads over TLS on loopback with no application.
        fl = tls_floor(b, n, p, rounds, 0, upload_only=True)
        floor_gbps = n * 4 * p / fl["value"] / 1e9 if "value" in fl else None
        emit({"name": "ingest_tls_floor", "params": {"N": n, "P": p, "rounds": "2..%d" % rounds},
              "value": round(floor_gbps, 4) if floor_gbps else None, "unit": "GB/s",
              "error": fl.get("error"),
              "note": "bench-tlsfloor --upload-only: N clients send 4P bytes each over TLS 1.3 "
                      "(AES-128-GCM) on loopback to a server with a thread per connection; "
                      "no cohort code"})
        # The same floor with cohortd's shape (one event loop for every connection) and
        # with two loops.
        loops_gbps = {}
        for k in (1, 2):
            lf = tls_floor(b, n, p, rounds, k, upload_only=True)
            loops_gbps[k] = n * 4 * p / lf["value"] / 1e9 if "value" in lf else None
            emit({"name": "ingest_tls_floor_loops", "params": {"N": n, "P": p, "server_loops": k,
                                                               "rounds": "2..%d" % rounds},
                  "value": round(loops_gbps[k], 4) if loops_gbps[k] else None, "unit": "GB/s",
                  "server_cpu_s_per_round": lf.get("server_cpu_s_per_round"),
                  "error": lf.get("error"),
                  "note": "bench-tlsfloor --upload-only --server-loops %d: as ingest_tls_floor, "
                          "the server %d epoll loop(s), connection i on loop i mod %d"
                          % (k, k, k)})
        loop_gbps = loops_gbps[1]
        g_up = nbytes / t_up / 1e9
        g_round = nbytes / t_round / 1e9
        params = {"N": n, "P": p, "rounds": "2..%d" % rounds, "durability": "relaxed",
                  "bytes_per_round": nbytes // len(use)}
        ratio_line("ingest_upload", params, round(g_up, 4), "GB/s", "aes128gcm_decrypt_1core",
                   ref["aes128gcm_gbps"], target_ratio=0.5,
                   met=g_up / ref["aes128gcm_gbps"] >= 0.5,
                   ratio_aes256=round(g_up / ref["aes256gcm_gbps"], 4),
                   ref_aes256gcm=ref["aes256gcm_gbps"], cipher=summ.get("cipher"),
                   tls_floor_gbps=round(floor_gbps, 4) if floor_gbps else None,
                   of_tls_floor=round(g_up / floor_gbps, 3) if floor_gbps else None,
                   tls_floor_one_loop_gbps=round(loop_gbps, 4) if loop_gbps else None,
                   of_one_loop_floor=round(g_up / loop_gbps, 3) if loop_gbps else None,
                   tls_floor_two_loops_gbps=round(loops_gbps[2], 4) if loops_gbps[2] else None,
                   floor_over_aes=round(floor_gbps / ref["aes128gcm_gbps"], 3) if floor_gbps
                   else None,
                   window="first UpdateBegin sent .. last UpdateAck received (uploads start "
                          "once every client has its model)")
        ratio_line("ingest_round", params, round(g_round, 4), "GB/s", "aes128gcm_decrypt_1core",
                   ref["aes128gcm_gbps"], target_ratio=0.5,
                   met=g_round / ref["aes128gcm_gbps"] >= 0.5,
                   window="RoundOffer received (first client) .. last UpdateAck received; "
                          "includes the model broadcast")
        if cpu > 0:
            ratio_line("ingest_per_server_cpu", params, round(nbytes / cpu / 1e9, 4), "GB/s",
                       "aes128gcm_decrypt_1core", ref["aes128gcm_gbps"],
                       server_cpu_s=round(cpu, 3), server_loop_thread_cpu_s=round(loop_cpu, 3),
                       loop_thread_busy=round(loop_cpu / t_up, 3),
                       loadgen_cpu_s=round(gen_cpu, 3), upload_wall_s=round(t_up, 3),
                       note="bytes accepted per second of cohortd CPU time (all threads) in "
                            "the upload window; /proc tick resolution 10 ms")
        emit({"name": "ingest_server_rss", "params": params, "value": round(rss / 1e6, 1),
              "unit": "MB"})
        ingest_lc(b, n, p, rounds, ref["aes128gcm_gbps"], floor_gbps, loops_gbps)


def ingest_lc(b, n, p, rounds, aes, floor_gbps, loops_gbps):
    """Ingest with the floors' kind of sender: N libcohort clients as threads of one
    process (bench-lcclients --upload-barrier), where cohort-loadgen sends from one
    thread (which, on two cores, can be what paces the uploads: see loadgen_cpu_s)."""
    tag = "ingest-lc-%d-%d" % (n, p)
    proc, port, state = b.start_server(p, tag, [
        "--min-clients", str(n), "--rounds", str(rounds), "--durability", "relaxed",
        "--max-connections", str(n + 100)])
    loop_cpu = LoopCpu(proc.pid)
    params = {"N": n, "P": p, "rounds": "2..%d" % rounds, "durability": "relaxed",
              "clients": "libcohort threads in one process"}
    try:
        r = run([b.lcclients, "--server", "127.0.0.1:%d" % port, "--ca",
                 os.path.join(b.certs, "ca.pem"), "--certs", b.certs, "--clients", str(n),
                 "--upload-barrier"], timeout=900, check=False)
    except subprocess.TimeoutExpired:
        loop_cpu.stop()
        b.finish_server(proc, timeout=30, term=True)
        emit({"name": "ingest_upload_lc", "params": params,
              "error": "bench-lcclients did not finish in 900 s"})
        return
    loop_cpu.stop()
    rc, rss = b.finish_server(proc, term=r.returncode != 0)
    lines = json_lines(r.stdout)
    per = {l["params"]["round"]: l for l in lines if l["name"] == "lc_round"}
    summ = next((l for l in lines if l["name"] == "lc_summary"), {})
    use = [per[k] for k in range(2, rounds + 1)
           if per.get(k, {}).get("acks") == n and per[k].get("t_release")]
    if r.returncode != 0 or rc != 0 or len(use) < rounds - 1 or summ.get("barrier_broken"):
        emit({"name": "ingest_upload_lc", "params": params,
              "error": "run failed (clients rc=%d, cohortd rc=%d, %d rounds%s): %s %s" % (
                  r.returncode, rc, len(use),
                  ", the upload barrier timed out" if summ.get("barrier_broken") else "",
                  summ.get("first_error", ""), r.stderr[-300:])})
        return
    t_up = sum(x["t_last_ack"] - x["t_release"] for x in use)
    g = n * 4 * p * len(use) / t_up / 1e9
    t0m = summ.get("t0_monotonic")

    def over_windows(field):
        # the loop thread's schedstat field summed over the windows, or None
        if not t0m:
            return None
        parts = [(loop_cpu.at(t0m + x["t_release"], field),
                  loop_cpu.at(t0m + x["t_last_ack"], field)) for x in use]
        if any(a is None or z is None for a, z in parts):
            return None
        return sum(z - a for a, z in parts)
    on, waiting = over_windows(1), over_windows(2)
    ratio_line("ingest_upload_lc", params, round(g, 4), "GB/s", "aes128gcm_decrypt_1core", aes,
               target_ratio=0.5, met=g / aes >= 0.5,
               tls_floor_gbps=round(floor_gbps, 4) if floor_gbps else None,
               of_tls_floor=round(g / floor_gbps, 3) if floor_gbps else None,
               of_one_loop_floor=round(g / loops_gbps[1], 3) if loops_gbps.get(1) else None,
               loop_thread_busy=round(on / t_up, 3) if on is not None else None,
               loop_thread_runnable=round(waiting / t_up, 3) if waiting is not None else None,
               loop_thread_asleep=round(max(0.0, 1 - (on + waiting) / t_up), 3)
               if on is not None and waiting is not None else None,
               upload_wall_s=round(t_up, 3),
               window="the last client has its model (every callback waits for it) .. last "
                      "UpdateAck; loop thread: on a CPU / runnable / asleep, from its "
                      "schedstat")


def tls_floor(b, n, p, rounds, loops, upload_only=False):
    """One bench-tlsfloor run with its server as `loops` epoll loops (0: a thread per
    connection): its JSON line, or {"error": why} when it failed."""
    rec = None if upload_only else cpu_record("floor-%d-%d-loops%d" % (n, p, loops))
    try:
        fr = run([b.tlsfloor, "--certs", b.certs, "--clients", str(n), "--bytes", str(4 * p),
                  "--rounds", str(rounds), "--server-loops", str(loops)]
                 + (["--upload-only"] if upload_only else []), timeout=600, check=False)
    except subprocess.TimeoutExpired:
        perf_stop(rec)
        return {"error": "bench-tlsfloor did not finish in 600 s"}
    perf_stop(rec)
    fl = json_lines(fr.stdout)
    if fr.returncode == 0 and fl and fl[0].get("value"):
        w = fl[0].get("window_mono")
        if rec is not None and w and fl[0].get("server_pid"):
            # The clients are threads of bench-tlsfloor itself, the server its child.
            cpu_kinds(rec, "floor-%d-%d-loops%d" % (n, p, loops),
                      {"N": n, "P": p, "what": "tls floor", "server_loops": loops,
                       "rounds": "2..%d" % rounds}, w, rounds - 1,
                      {fl[0]["server_pid"]: "server", fl[0].get("pid", -1): "clients"})
        return fl[0]
    return {"error": "bench-tlsfloor failed (%d): %s" % (fr.returncode, fr.stderr[-300:])}


def bench_round(b, quick):
    points = [(10, 1000000), (10, 10000000), (50, 1000000), (100, 100000)]
    if quick:
        points = [(10, 1000000), (20, 100000)]
    rounds = 5 if not quick else 3
    b.make_certs(max(n for n, _ in points))
    ca = os.path.join(b.certs, "ca.pem")
    for n, p in points:
        floor = floor_cpu = floor_srv = None
        loop_floors = {}
        for durability in (["full", "relaxed"] if not quick else ["full"]):
            tag = "round-%d-%d-%s" % (n, p, durability)
            if not wanted(tag):
                continue
            if floor is None:
                # Same-run floor: the round's bytes over TLS on loopback and nothing else.
                fl = tls_floor(b, n, p, rounds, 0)
                floor = fl.get("value", 0)
                floor_cpu = fl.get("host_cpu_s_per_round")
                floor_srv = fl.get("server_cpu_s_per_round")
                emit({"name": "round_tls_floor", "params": {"N": n, "P": p, "rounds": "2..%d" % rounds},
                      "value": floor, "unit": "s", "rounds_s": fl.get("rounds_s"),
                      "host_cpu_s_per_round": floor_cpu,
                      "host_cores_busy": fl.get("host_cores_busy"),
                      "server_cpu_s_per_round": floor_srv,
                      "note": "bench-tlsfloor: each client gets 4P bytes and sends 4P back over "
                              "TLS 1.3 (AES-128-GCM) on loopback; no cohort code",
                      "error": fl.get("error")})
                # The floor with cohortd's shape (one event loop) and with two loops: what
                # one loop costs with no application at all, and what a second would gain.
                for k in (1, 2):
                    lf = tls_floor(b, n, p, rounds, k)
                    loop_floors[k] = lf.get("value")
                    emit({"name": "round_tls_floor_loops",
                          "params": {"N": n, "P": p, "server_loops": k, "rounds": "2..%d" % rounds},
                          "value": lf.get("value"), "unit": "s",
                          "rounds_s": lf.get("rounds_s"),
                          "host_cpu_s_per_round": lf.get("host_cpu_s_per_round"),
                          "host_cores_busy": lf.get("host_cores_busy"),
                          "server_cpu_s_per_round": lf.get("server_cpu_s_per_round"),
                          "error": lf.get("error"),
                          "note": "bench-tlsfloor --server-loops %d: as round_tls_floor, the server "
                                  "%d epoll loop(s), connection i on loop i mod %d" % (k, k, k)})
            # bench-lcclients reads cohortd's loop CPU and VmHWM at each round result
            # (--server-pid): polling /proc from here every 5-10 ms took about 15
            # core-ms per round from the rounds it measured. The watch stays as a
            # slow safety net for the peak.
            proc, port, state = b.start_server(p, tag, [
                "--min-clients", str(n), "--rounds", str(rounds), "--durability", durability,
                "--max-connections", str(n + 100)], hwm_interval=0.5)
            t_start = time.time()
            sched = None
            if SCHED_DIR:
                sched_data = os.path.join(SCHED_DIR, "sched-%s.data" % tag)
                sched = subprocess.Popen(["perf", "record", "-q", "-k", "mono", "-a", "-e",
                                          "sched:sched_switch", "-e", "sched:sched_wakeup",
                                          "-e", "sched:sched_wakeup_new",
                                          "-o", sched_data],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                time.sleep(0.3)
            cpu_rec = cpu_record(tag)
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            try:
                r = run([b.lcclients, "--server", "127.0.0.1:%d" % port, "--ca", ca, "--certs",
                         b.certs, "--clients", str(n), "--server-pid", str(proc.pid)],
                        timeout=900, check=False)
                wall = time.time() - t_start
                ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            finally:
                perf_stop(cpu_rec)
                perf_stop(sched, 60)
            if sched:
                sched_phases(tag, sched, sched_data, r.stdout, proc.pid)
            clients_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
            rc, rss = b.finish_server(proc)
            lines = json_lines(r.stdout)
            per = {l["params"]["round"]: l for l in lines if l["name"] == "lc_round"}
            summ = next((l for l in lines if l["name"] == "lc_summary"), {})
            ok = r.returncode == 0 and rc == 0 and all(
                per.get(k, {}).get("acks") == n for k in range(1, rounds + 1))
            params = {"N": n, "P": p, "rounds": "2..%d" % rounds, "durability": durability,
                      "clients": "libcohort threads in one process"}
            if not ok:
                emit({"name": "round_time", "params": params,
                      "error": "run failed (clients rc=%d, cohortd rc=%d): %s %s" % (
                          r.returncode, rc, summ.get("first_error", ""), r.stderr[-500:])})
                continue
            times = [per[k]["t_result"] - per[k - 1]["t_result"] for k in range(2, rounds + 1)]
            if summ.get("t0_monotonic") is not None:
                t0m = summ["t0_monotonic"]
                cpu_kinds(cpu_rec, tag, dict(params, what="cohort"),
                          (t0m + per[1]["t_result"], t0m + per[rounds]["t_result"]), rounds - 1,
                          {proc.pid: "cohortd", summ.get("pid", -1): "clients"},
                          loop_tid=proc.pid)
            srv = server_durations(state)
            med = statistics.median(times)
            # The host's CPU per round (all processes; the machine runs only this): with
            # the cores busy throughout, round time = CPU per round / cores, and CPU per
            # round against the floor's is what cohort adds to moving the bytes.
            busy = per[rounds]["host_busy_s"] - per[1]["host_busy_s"]
            span = per[rounds]["t_result"] - per[1]["t_result"]
            cpu_round = busy / (rounds - 1)
            l1 = per[1].get("server_loop_cpu_s")
            lr = per[rounds].get("server_loop_cpu_s")
            loop_round = (lr - l1) / (rounds - 1) if l1 and lr else None
            rss = max(rss, summ.get("server_hwm_kib", 0) * 1024)
            # How soon the first update is taken once the first client has the model:
            # while cohortd writes the broadcast, uploads wait unless it reads between.
            first_ack = [per[k]["t_first_ack"] - per[k]["t_first_train"]
                         for k in range(2, rounds + 1) if per[k].get("t_first_ack")]
            fl_t, fl_rss = FLOWER.get((n, p), (None, None))
            extra = {"first_ack_after_first_model_ms":
                     round(statistics.median(first_ack) * 1e3, 1) if first_ack else None,
                     "last_ack_after_last_model_ms":
                     round(statistics.median(per[k]["t_last_ack"] - per[k]["t_last_train"]
                                             for k in range(2, rounds + 1)) * 1e3, 1),
                     "server_duration_median_s": round(statistics.median(srv), 4) if srv else None,
                     "rounds_s": [round(t, 4) for t in times],
                     "server_cpu_s": round(proc.cpu_s, 2), "clients_cpu_s": round(clients_cpu, 2),
                     "run_wall_s": round(wall, 2),
                     "host_cpu_s_per_round": round(cpu_round, 3),
                     "loop_cpu_s_per_round": round(loop_round, 3) if loop_round is not None else None,
                     "host_cpus": os.cpu_count(),
                     "sched_recorded": bool(SCHED_DIR),
                     "tls_floor_server_cpu_s_per_round": floor_srv,
                     "host_cores_busy": round(busy / span, 2) if span > 0 else None,
                     "tls_floor_host_cpu_s_per_round": floor_cpu,
                     "cpu_over_floor_cpu": round(cpu_round / floor_cpu, 2) if floor_cpu else None,
                     "tls_floor_s": floor or None,
                     "over_tls_floor": round(med / floor, 2) if floor else None,
                     "tls_floor_one_loop_s": loop_floors.get(1),
                     "tls_floor_two_loops_s": loop_floors.get(2),
                     "over_one_loop_floor": round(med / loop_floors[1], 2)
                     if loop_floors.get(1) else None,
                     "client_process_maxrss_mb": round(summ.get("maxrss_kib", 0) * 1024 / 1e6, 1)}
            if fl_t:
                ratio_line("round_time", params, round(med, 4), "s", "flower_1.6", fl_t,
                           target_ratio=0.1, met=med <= 0.1 * fl_t,
                           better_x=round(fl_t / med, 1), **extra)
                ratio_line("round_server_rss", params, round(rss / 1e6, 1), "MB", "flower_1.6",
                           fl_rss / 1e6, target_ratio=0.1, met=rss <= 0.1 * fl_rss,
                           better_x=round(fl_rss / rss, 1))
            else:
                ratio_line("round_time", params, round(med, 4), "s", None, None, **extra)
                ratio_line("round_server_rss", params, round(rss / 1e6, 1), "MB", None, None)


def idle_rss(b, p, tag):
    """RSS of a cohortd that loaded a P-float model and has no clients."""
    proc, port, state = b.start_server(p, tag, ["--min-clients", "1000000"])
    time.sleep(1.0)
    with open("/proc/%d/status" % proc.pid) as f:
        rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) * 1024
    smaps = smaps_breakdown(proc.pid)
    b.finish_server(proc, term=True)
    return rss, smaps


def smaps_breakdown(pid):
    """Resident KiB per mapping (library file, [heap], anonymous), largest first."""
    per = {}
    name = None
    try:
        with open("/proc/%d/smaps" % pid) as f:
            for line in f:
                parts = line.split()
                if "-" in parts[0] and len(parts) >= 5 and ":" not in parts[0]:
                    name = os.path.basename(parts[5]) if len(parts) > 5 else "[anonymous]"
                elif parts[0] == "Rss:" and name is not None:
                    per[name] = per.get(name, 0) + int(parts[1])
    except OSError:
        return {}
    return dict(sorted(((k, v) for k, v in per.items() if v > 0), key=lambda kv: -kv[1]))


def bench_memory(b, quick):
    p = 1000000
    ns = [10, 100, 1000] if not quick else [10, 50]
    b.make_certs(1)
    # The floor: cohortd with its model loaded and no client (P = 1e5 shows the part that
    # does not depend on the model: code, libraries, OpenBLAS and SQLite buffers).
    for pp in (100000, p):
        rss_idle, smaps = idle_rss(b, pp, "memory-idle-%d" % pp)
        emit({"name": "memory_idle_server_rss", "params": {"P": pp},
              "value": round(rss_idle / MiB, 1), "unit": "MiB",
              "note": "cohortd with the model loaded, no clients",
              "resident_kib_by_mapping": smaps})
    base = rss_idle
    model = p * 4
    # Two settings: the default (two uploads staged at once) and --max-uploads 1, which
    # holds exactly three model-sized buffers (x_t, the accumulator, one staging buffer).
    for mu in (2, 1):
        for n in ns:
            if not wanted("memory-%d" % n):
                continue
            memory_point(b, n, p, mu, base)


def memory_point(b, n, p, mu, base):
    model = p * 4
    # N = 1000: one round. From the second round on, the receive buffers that TCP
    # autotuning grew during round 1 let ~900 paused uploads park ~1.7 MB each in the
    # kernel; the host hits TCP memory pressure and the active uploads crawl
    # (docs/performance.md, "memory").
    rounds = 3 if n < 1000 else 1
    per, summ, rss, rc, state = loadgen_upload(
        b, n, p, rounds, "memory-%d-mu%d" % (n, mu),
        ["--durability", "relaxed", "--max-uploads", str(mu)])
    target = 3 * model + 64 * 1024 * n
    ok = rc == 0 and all(x["accepted"] == n for x in per) and len(per) == rounds
    anon = summ.get("anon_peak", 0)
    params = {"N": n, "P": p, "rounds": rounds, "max_uploads": mu, "clients": "cohort-loadgen"}
    ratio_line("memory_server_peak_anon", params,
               round(anon / MiB, 1), "MiB", "target_3xmodel_plus_64KiBxN",
               round(target / MiB, 1), target_ratio=1.0, met=ok and 0 < anon <= target,
               model_mib=round(model / MiB, 2), anon_over_model=round(anon / model, 2),
               file_backed_at_peak_mib=round(summ.get("file_at_anon_peak", 0) / MiB, 1),
               samples=summ.get("rss_samples"), completed=ok,
               note="RssAnon sampled every 5 ms: the server's own allocations, without "
                    "the shared-library pages peak RSS also counts")
    ratio_line("memory_server_peak_rss", params,
               round(rss / MiB, 1), "MiB", "target_3xmodel_plus_64KiBxN",
               round(target / MiB, 1),
               target_ratio=1.0, met=rss <= target, model_mib=round(model / MiB, 2),
               rss_over_model=round(rss / model, 2),
               rss_minus_idle_mib=round((rss - base) / MiB, 1),
               completed=ok, kernel_tcp_mem_peak_mib=summ.get("tcp_mem_peak_mib"),
               kernel_tcp_mem_before_mib=summ.get("tcp_mem_base_mib"),
               first_error=summ.get("first_error"))


def bench_scale(b, quick):
    n = 10000 if not quick else 500
    b.make_certs(1)
    ca, cakey = b.ca()
    proc, port, state = b.start_server(100000, "scale-idle", [
        "--min-clients", "1000000", "--max-connections", str(n + 1000),
        "--heartbeat-ms", "1000"])
    r = run([b.loadgen, "idle", "--server", "127.0.0.1:%d" % port, "--ca", ca, "--ca-key", cakey,
             "--clients", str(n), "--hb-interval-ms", "1000", "--warmup", "3",
             "--duration", "15" if not quick else "5", "--server-pid", str(proc.pid),
             "--parallel", "64", "--prefix", "idle", "--timeout", "600"],
            timeout=900, check=False)
    rc, rss = b.finish_server(proc, term=True)
    lines = json_lines(r.stdout)
    idle = next((l for l in lines if l["name"] == "loadgen_idle"), None)
    params = {"N": n, "hb_interval_ms": 1000}
    if not idle:
        emit({"name": "scale_idle", "params": params, "error": r.stderr[-1000:]})
    else:
        ratio_line("scale_heartbeat_rtt_p99", params, idle["rtt_p99_ms"], "ms", "target", 100.0,
                   target_ratio=1.0, met=idle["rtt_p99_ms"] <= 100 and idle["ready"] == n,
                   rtt_p50_ms=idle["rtt_p50_ms"], rtt_p999_ms=idle["rtt_p999_ms"],
                   rtt_max_ms=idle["rtt_max_ms"], hb_sent=idle["hb_sent"],
                   hb_answered=idle["hb_answered"], connected=idle["ready"],
                   failed=idle["failed"], connect_s=idle["connect_s"],
                   handshakes_per_s=idle["connect_rate"], server_cpu_pct=idle["server_cpu_pct"],
                   loadgen_cpu_pct=idle["loadgen_cpu_pct"], nofile_limit=idle["nofile_limit"],
                   server_cpu_us_per_hb=idle.get("server_cpu_us_per_hb"),
                   durability="full (default): one SQLite commit per Hello",
                   first_error=idle.get("first_error"))
        ratio_line("scale_server_rss", params, round(idle["server_rss_kib"] / 1024, 1), "MiB",
                   "target", 1024.0, target_ratio=1.0,
                   met=idle["server_rss_kib"] / 1024 <= 1024 and idle["ready"] == n,
                   per_connection_kib=round(idle["server_rss_kib"] / max(idle["ready"], 1), 1),
                   server_peak_rss_mib=round(rss / MiB, 1),
                   note="VmRSS with all connections up, after the heartbeat window")
    # A round with 1,000 participating clients at P = 1e5.
    nr = 1000 if not quick else 100
    p = 100000
    per, summ, rss, rc, state = loadgen_upload(b, nr, p, 3, "scale-round",
                                               ["--durability", "relaxed"])
    done = [x for x in per if x["accepted"] == nr]
    times = [per[i]["t_result"] - per[i - 1]["t_result"] for i in range(1, len(per))
             if per[i]["t_result"] > 0 and per[i - 1]["t_result"] > 0]
    emit({"name": "scale_round_1000", "params": {"N": nr, "P": p, "rounds": 3,
                                                 "clients": "cohort-loadgen"},
          "value": round(statistics.median(times), 4) if times else None, "unit": "s",
          "completed": len(done) == 3 and rc == 0, "rounds_completed": len(done),
          "accepted_per_round": [x["accepted"] for x in per],
          "server_peak_rss_mib": round(rss / MiB, 1),
          "server_durations_s": [round(d, 3) for d in server_durations(state, 1)],
          "kernel_tcp_mem_peak_mib": summ.get("tcp_mem_peak_mib"),
          "first_error": summ.get("first_error")})


def file_size(path):
    return os.path.getsize(path)


def bench_client(b, quick, src):
    # Size: the edge build, as tests/client_only_build.sh makes it.
    for buildtype in (["debugoptimized", "minsize"] if not quick else ["debugoptimized"]):
        out = os.path.join(b.dir, "client-only-%s" % buildtype)
        run(["meson", "setup", out, src, "-Dserver=false", "-Dtests=disabled",
             "-Dbuildtype=" + buildtype], timeout=600)
        run(["ninja", "-C", out], timeout=900)
        a = os.path.join(out, "client", "libcohort.a")
        so = next(os.path.join(out, "client", f) for f in sorted(os.listdir(
            os.path.join(out, "client"))) if f.startswith("libcohort.so.") and f.count(".") == 4)
        sa, sso = a + ".stripped", so + ".stripped"
        shutil.copy(a, sa)
        shutil.copy(so, sso)
        run(["strip", "--strip-debug", sa])
        run(["strip", "--strip-unneeded", sso])
        dyn = run(["readelf", "-d", sso]).stdout.splitlines()
        needed = [l.split("[")[1].rstrip("]") for l in dyn if "NEEDED" in l]
        emit({"name": "client_lib_size", "params": {"kind": "static", "buildtype": buildtype,
                                                    "stripped": "--strip-debug"},
              "value": round(file_size(sa) / 1024, 1), "unit": "KiB",
              "unstripped_kib": round(file_size(a) / 1024, 1),
              "note": "libcohort.a incl. common/ and the generated protobuf code"})
        emit({"name": "client_lib_size", "params": {"kind": "shared", "buildtype": buildtype,
                                                    "stripped": "--strip-unneeded"},
              "value": round(file_size(sso) / 1024, 1), "unit": "KiB",
              "unstripped_kib": round(file_size(so) / 1024, 1), "needed": needed})
    # RSS: one libcohort client process through 3 rounds at P = 1e6.
    p = 1000000
    model = p * 4
    target = 3 * model + 4 * MiB
    b.make_certs(2)
    ca = os.path.join(b.certs, "ca.pem")
    base = json_lines(run([b.lcclients, "--server", "127.0.0.1:1", "--ca", ca, "--certs", b.certs,
                           "--clients", "1", "--mode", "baseline"]).stdout)[0]
    emit({"name": "client_baseline_rss", "params": {}, "value": round(base["maxrss_kib"] / 1024, 1),
          "unit": "MiB", "note": "process with libcohort + OpenSSL initialized and one client "
                                  "made (certificates loaded), not connected"})
    for kind in ("single", "inplace", "cli-update"):
        proc, port, state = b.start_server(p, "client-%s" % kind, [
            "--min-clients", "1", "--rounds", "3", "--durability", "relaxed"])
        if kind in ("single", "inplace"):
            args = [b.lcclients, "--server", "127.0.0.1:%d" % port, "--ca", ca, "--certs",
                    b.certs, "--clients", "1", "--mode", kind]
            what = ("bench-lcclients --mode single: trains in params, one model buffer "
                    "(cohort_opts_set_single_buffer), sends trained weights"
                    if kind == "single" else
                    "bench-lcclients --mode inplace: trains in params, two model buffers")
        else:
            upd = os.path.join(b.dir, "update.safetensors")
            shutil.copy(b.model(p), upd)
            args = [b.cohort, "client", "--server", "127.0.0.1:%d" % port, "--ca", ca,
                    "--cert", os.path.join(b.certs, "client-1.pem"),
                    "--key", os.path.join(b.certs, "client-1.key"),
                    "--update", upd, "--examples", "100"]
            what = "cohort client --update FILE (the CLI holds the update file as well)"
        cp = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        mon, hwm = Monitor(cp.pid), HwmWatch(cp.pid)
        _, status, _ = os.wait4(cp.pid, 0)
        mon.stop()
        crss = hwm.stop()
        cp.stdout.close()
        cp.stderr.close()
        rc, _ = b.finish_server(proc)
        ratio_line("client_peak_rss", {"P": p, "client": kind, "rounds": 3},
                   round(crss / MiB, 1), "MiB", "target_3xmodel_plus_4MiB", round(target / MiB, 1),
                   target_ratio=1.0, met=crss <= target,
                   rss_over_model=round(crss / model, 2),
                   anon_peak_mib=round(mon.anon_peak / MiB, 1),
                   file_backed_at_anon_peak_mib=round(mon.file_at_anon_peak / MiB, 1),
                   ok=os.waitstatus_to_exitcode(status) == 0 and rc == 0, what=what)


def main():
    global OUT, PERF_DIR, ONLY, SCHED_DIR, CPU_DIR
    ap = argparse.ArgumentParser()
    ap.add_argument("bench", choices=["ingest", "round", "memory", "scale", "client"])
    ap.add_argument("--build", required=True)
    ap.add_argument("--src", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--quick", action="store_true", help="small points, for trying it out")
    ap.add_argument("--perf", help="record cohortd with perf record (DWARF call graphs) into "
                    "this directory, one perf-TAG.data per cohortd")
    ap.add_argument("--sched", help="round: record the scheduler (perf sched_switch, all CPUs) "
                    "during the clients' run and write sched-TAG.md into this directory: "
                    "per round phase, the core-ms of cohortd's loop, its pool, the clients "
                    "and idle (bench/sched_phases.py); and timeline-TAG.md: each round "
                    "step by step (bench/round_timeline.py)")
    ap.add_argument("--cpu", help="round: record the whole host (perf record -a -g) during "
                    "each cohort run and each TLS floor run, and emit round_cpu_kinds lines: "
                    "core-ms per round by process and kind of work (bench/cpu_kinds.py); "
                    "the recordings and their tables go into this directory")
    ap.add_argument("--only", help="only the points whose tag contains this (e.g. 10-10000000)")
    ap.add_argument("--out", help="append JSON lines here (default BUILD/bench/results.jsonl)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    a = ap.parse_args()
    OUT = a.out or os.environ.get("COHORT_BENCH_OUT") or os.path.join(
        os.path.abspath(a.build), "bench", "results.jsonl")
    PERF_DIR = os.path.abspath(a.perf) if a.perf else None
    ONLY = a.only
    SCHED_DIR = os.path.abspath(a.sched) if a.sched else None
    if SCHED_DIR:
        os.makedirs(SCHED_DIR, exist_ok=True)
    if PERF_DIR:
        os.makedirs(PERF_DIR, exist_ok=True)
    CPU_DIR = os.path.abspath(a.cpu) if a.cpu else None
    if CPU_DIR:
        os.makedirs(CPU_DIR, exist_ok=True)
    # A shared machine: COHORT_BENCH_NICE=-10 gives the benchmark's processes (cohortd
    # and the clients inherit it) priority over other work; recorded in every line.
    # With the kernel's autogroups, nice only ranks processes inside one session, so
    # the benchmark becomes its own session and sets that autogroup's nice.
    nice = int(os.environ.get("COHORT_BENCH_NICE", "0") or 0)
    if nice:
        set_nice(nice)
    b = Bench(a.build, a.bench)
    t0 = time.time()
    try:
        if a.bench == "ingest":
            bench_ingest(b, a.quick)
        elif a.bench == "round":
            bench_round(b, a.quick)
        elif a.bench == "memory":
            bench_memory(b, a.quick)
        elif a.bench == "scale":
            bench_scale(b, a.quick)
        elif a.bench == "client":
            bench_client(b, a.quick, a.src)
    finally:
        b.cleanup(a.keep)
    sys.stderr.write("bench %s: %.1f s\n" % (a.bench, time.time() - t0))


if __name__ == "__main__":
    main()
