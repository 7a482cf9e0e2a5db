#!/usr/bin/python3
"""The whole host's CPU during a window of a run, by who and by what: from a
`perf record -a -g -k mono` file (bench_server.py round --cpu DIR writes one per
cohortd run and per TLS floor run). Every sample is one core-tick: idle (the
swapper), or one process role (given by pid) and one kind of work (from the leaf
symbol, and for kernel samples from the call chain: the network, file writes or
other). Prints a JSON object with core-ms per round by role and kind.

    cpu_kinds.py DATA --window T0 T1 --rounds R --role PID=NAME [--role ...]
                 [--loop-tid TID] [--freq HZ]
    cpu_kinds.py --md LABEL=cpu-TAG.json ...     (a side-by-side Markdown table)

Samples of pids not named are "other processes". --loop-tid splits that process's
samples into its "loop" thread and its other threads ("pool").
"""
import argparse
import collections
import json
import re
import subprocess
import sys

KINDS = [
    # (kind, regular expression on the leaf symbol), first match wins
    ("AES-GCM", re.compile(r"aesni_gcm|aes_gcm|gcm_ghash|gcm_gmult|gcm_init|aesni_ctr32|"
                           r"_aesni_|aesni_|ghash|ossl_gcm|gcm128")),
    ("SHA-256", re.compile(r"sha256|SHA256")),
    ("XXH3", re.compile(r"XXH|coh_xxh")),
    ("aggregation (fold, finite and overflow checks, apply)",
     re.compile(r"saxpy|sscal|scopy|axpy|fold_|coh_abs_bound|coh_first_nonfinite|coh_vc_|"
                r"finalize_block")),
    ("memcpy/memset (user space)", re.compile(r"memmove|memcpy|memset")),
]
KERNEL_COPY = re.compile(r"copy_user|rep_movs|copy_to_iter|copy_from_iter|copyin|copyout|"
                         r"copy_page|memcpy|clear_page|rep_stos")
NET = re.compile(r"tcp_|sock_|skb|sock_write_iter|sock_read_iter|__sys_sendto|__sys_recvfrom|inet_|ip_|net_rx|__netif|"
                 r"loopback|sk_stream|__napi|do_softirq|__dev_queue")
FILE = re.compile(r"ext4|iomap|filemap|generic_perform_write|vfs_fsync|file_write|"
                  r"page_cache|writeback|jbd2|blk_|submit_bio|sync_file_range|vfs_write")


def classify(frames, role):
    """frames: [(sym, dso)] leaf first; role: the sample's process role."""
    sym, dso = frames[0] if frames else ("", "")
    if "kernel" in dso or dso.startswith("["):
        syms = " ".join(s for s, _ in frames)
        # A socket write also passes vfs_write: the network test comes first.
        where = "network" if NET.search(syms) else "file I/O" if FILE.search(syms) else "other"
        copy = "copies" if KERNEL_COPY.search(sym) else "rest"
        return "kernel: %s, %s" % (where, copy)
    for kind, rx in KINDS:
        if rx.search(sym):
            return kind
    if "libcrypto" in dso and sym == "[unknown]":
        # Debian's libcrypto exports no symbols for its assembly. Outside the
        # handshakes (not in the window), the only such work on cohortd's pool is
        # the checkpoint's SHA-256 (its own thread); on the loop and in the clients
        # it is the record layer's AES-GCM and GHASH.
        return "SHA-256" if role.endswith(" pool") else "AES-GCM"
    if "libcrypto" in dso:
        return "libcrypto (other)"
    if "libssl" in dso:
        return "libssl"
    if "sqlite" in dso:
        return "SQLite"
    if "libc.so" in dso:
        return "libc (other)"
    return "other"


HEAD = re.compile(r"^\s*(\S.*?)\s+(\d+)/(\d+)\s+(\d+\.\d+):")


def samples(data):
    p = subprocess.run(["perf", "script", "-i", data, "-F", "comm,pid,tid,time,ip,sym,dso"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit("perf script failed: %s" % p.stderr[-500:])
    cur = None
    for line in p.stdout.splitlines():
        m = HEAD.match(line)
        if m:
            if cur:
                yield cur
            cur = [m.group(1), int(m.group(2)), int(m.group(3)), float(m.group(4)), []]
            continue
        line = line.strip()
        if cur and line:
            parts = line.split(None, 1)
            rest = parts[1] if len(parts) > 1 else ""
            dso = rest[rest.rfind("(") + 1:-1] if rest.endswith(")") else ""
            sym = rest[:rest.rfind("(")].strip() if "(" in rest else rest
            cur[4].append((sym, dso))
    if cur:
        yield cur


def side(role):
    if role == "idle":
        return "idle"
    if role.startswith(("cohortd", "server")):
        return "server"
    if role == "clients":
        return "clients"
    return "other"


def markdown(files):
    """Side-by-side table of several cpu-*.json files (LABEL=FILE): core-ms per round
    by kind, split into the server's and the clients' processes."""
    runs = []
    for f in files:
        label, path = f.split("=", 1) if "=" in f else (f, f)
        with open(path) as fh:
            runs.append((label, json.load(fh)))
    kinds = collections.OrderedDict()
    for _, d in runs:
        for e in sorted(d["by"], key=lambda e: -e["core_ms_per_round"]):
            kinds.setdefault(e["kind"], None)
    cols = []
    for label, d in runs:
        t = collections.Counter()
        for e in d["by"]:
            t[(side(e["role"]), e["kind"])] += e["core_ms_per_round"]
        cols.append((label, d, t))
    head = ["kind"]
    for label, _, _ in cols:
        head += ["%s: server" % label, "%s: clients" % label]
    print("| " + " | ".join(head) + " |")
    print("| --- |" + " ---: |" * (len(head) - 1))
    for k in kinds:
        if k == "idle":
            continue
        row = [k]
        for _, _, t in cols:
            row += ["%.1f" % t[("server", k)], "%.1f" % t[("clients", k)]]
        print("| " + " | ".join(row) + " |")
    for name, pick in (("all work", lambda t, s_: sum(v for (s2, k), v in t.items()
                                                       if s2 == s_ and k != "idle")),):
        row = ["**%s**" % name]
        for _, _, t in cols:
            row += ["**%.1f**" % pick(t, "server"), "**%.1f**" % pick(t, "clients")]
        print("| " + " | ".join(row) + " |")
    row = ["other processes, idle"]
    for _, d, t in cols:
        other = sum(v for (s2, k), v in t.items() if s2 == "other")
        row += ["%.1f" % other, "idle %.1f" % t[("idle", "idle")]]
    print("| " + " | ".join(row) + " |")
    row = ["samples / round wall-time ms"]
    for _, d, _ in cols:
        row += ["%d" % d["samples"], "%.1f" % (d["window_s"] * 1000.0 / d["rounds"])]
    print("| " + " | ".join(row) + " |")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--md":
        markdown(sys.argv[2:])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--window", nargs=2, type=float, required=True,
                    help="CLOCK_MONOTONIC seconds: the rounds to count")
    ap.add_argument("--rounds", type=int, required=True, help="rounds in the window")
    ap.add_argument("--role", action="append", default=[], help="PID=NAME")
    ap.add_argument("--loop-tid", type=int)
    ap.add_argument("--freq", type=float, default=1999.0)
    a = ap.parse_args()
    roles = {}
    for r in a.role:
        pid, name = r.split("=", 1)
        roles[int(pid)] = name
    t0, t1 = a.window
    table = collections.Counter()
    n = 0
    for comm, pid, tid, t, frames in samples(a.data):
        if t < t0 or t > t1:
            continue
        n += 1
        if pid == 0:
            table[("idle", "idle")] += 1
            continue
        role = roles.get(pid, "other processes")
        if a.loop_tid is not None and pid == a.loop_tid:
            role += " loop" if tid == a.loop_tid else " pool"
        table[(role, classify(frames, role))] += 1
    # Each sample stands for 1/freq s of one CPU.
    ms = 1000.0 / a.freq / a.rounds
    out = {"samples": n, "window_s": round(t1 - t0, 4), "rounds": a.rounds,
           "core_ms_per_round": round(n * ms, 1),
           "by": [{"role": r, "kind": k, "core_ms_per_round": round(c * ms, 2)}
                  for (r, k), c in table.most_common()]}
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
