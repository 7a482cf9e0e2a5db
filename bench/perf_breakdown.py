#!/usr/bin/python3
"""Where cohortd's CPU time goes, from a `perf record --call-graph dwarf` file
(bench_server.py --perf DIR writes one per cohortd). Every sample is put in one
phase (the innermost cohortd function or library entry point of a known kind on
its stack) and one kind (what the leaf is doing), and the table of both is printed
as Markdown, per thread (the libuv loop thread vs the thread pool).

    perf_breakdown.py perf-TAG.data [--top 25]
"""
import collections
import subprocess
import sys

# Innermost match wins (stack is scanned from the leaf toward the root).
PHASES = [
    ("round_on_chunk", "chunk: staging copy (round_on_chunk, chunks not read in place)"),
    ("start_direct", "chunk: data already buffered into staging (start_direct)"),
    ("upload_absorb", "chunk: finite check + XXH3 as it arrives (upload_absorb)"),
    ("verify_work", "verify: sha256 of an update (verify_work)"),
    ("finalize_block", "finalize: apply + finite + checksums per block (finalize_block)"),
    ("XXH3", "checksum (XXH3)"),
    ("fold_accumulate", "fold: saxpy (fold_work)"),
    ("fold_set", "fold: first update, copy + scale (fold_set)"),
    ("coh_vc_moments", "fold: variance moments"),
    ("blob_build", "finalize: hash the new model (blob_build)"),
    ("coh_st_save", "finalize: checkpoint write (coh_st_save_blocks)"),
    ("coh_model_clone", "finalize: clone model (coh_model_clone)"),
    ("coh_model_all_finite", "finalize: finite check of the new model"),
    ("fold_apply", "finalize: apply (fold_apply_into)"),
    ("pstore_", "SQLite (pstore_*)"),
    ("sqlite3_", "SQLite (pstore_*)"),
    ("SSL_do_handshake", "TLS handshake"),
    ("SSL_read", "TLS read + decrypt (SSL_read)"),
    ("SSL_write", "TLS encrypt (SSL_write: model broadcast, acks)"),
    ("SSL_shutdown", "TLS shutdown"),
    ("write_ex", "ciphertext out: into the write buffer (connio write_ex)"),
    ("read_ex", "ciphertext in: from the read buffer (connio read_ex)"),
    ("conn_write_now", "ciphertext out: a whole record from OpenSSL's buffer (conn_write_now)"),
    ("conn_flush", "ciphertext out: uv_try_write / uv_write (conn_flush)"),
    ("stream_step", "model broadcast: chunk head + slice (stream_step)"),
    ("on_write", "write completion (on_write)"),
    ("on_read", "ciphertext in (on_read)"),
    ("coh_wire_decode", "protobuf decode"),
    ("coh_wire_encode", "protobuf encode"),
    ("coh_wire_pack_into", "protobuf encode"),
    ("dispatch_frame", "dispatch (other)"),
    ("conn_sweep", "connection sweep timer"),
    ("fold_done", "fold done + UpdateAck"),
    ("finalize_done", "commit (finalize_done)"),
    ("uv__io_poll", "event loop (epoll, other)"),
]
# Stacks with none of the above (libuv is stripped, so uv__read is [unknown]).
FALLBACK = [
    (("__GI___libc_read", "__libc_read", "read"), "socket read (recv, libuv)"),
    (("__GI___libc_write", "__libc_write", "write", "writev"), "socket write (libuv)"),
    (("munmap", "__GI_munmap", "__GI___libc_free"), "free/munmap"),
    (("epoll_wait",), "event loop (epoll, other)"),
]


# What the loop was doing, by priority (the first key found anywhere on the stack).
CONTEXTS = [
    ("handshake", "TLS handshake"),
    ("on_hello", "Hello: register the client (SQLite)"),
    ("on_heartbeat", "heartbeat reply"),
    ("round_on_chunk", "upload: UpdateChunk"),
    ("start_direct", "upload: UpdateChunk"),
    ("round_direct_data", "upload: UpdateChunk"),
    ("verify_work", "verify job (pool)"),
    ("round_on_begin", "upload: UpdateBegin"),
    ("round_on_end", "upload: UpdateEnd"),
    ("fold_work", "fold job (pool)"),
    ("fold_done", "fold done + UpdateAck"),
    ("finalize_work", "finalize job (pool)"),
    ("pump", "model broadcast"),
    ("stream_step", "model broadcast"),
    ("conn_send_blob", "model broadcast"),
    ("send_offer", "model broadcast"),
    ("on_write", "model broadcast (pump from on_write)"),
    ("broadcast_result", "RoundResult broadcast"),
    ("pstore_commit_round", "commit: SQLite transaction"),
    ("finalize_done", "commit: other"),
    ("finalize", "finalize (loop)"),
    ("conn_sweep", "sweep timer"),
    ("SSL_read", "receive: decrypt"),
    ("on_read", "receive: other"),
]


def context(frames):
    names = [s for s, d in frames if "kernel" not in d]
    for key, name in CONTEXTS:
        if any(n == key or n.startswith(key + " ") for n in names):
            return name
    if any(n in ("__GI___libc_read", "__libc_read", "read") for n in names):
        return "receive: recv"
    if any(n == "epoll_wait" for n in names):
        return "event loop"
    return "other"


def kind(frames):
    """frames: [(sym, dso)] leaf first."""
    syms = [s for s, _ in frames[:12]]
    leaf, dso = frames[0]
    if any(k in s for s in syms for k in ("page_fault", "clear_page", "handle_mm_fault",
                                          "do_anonymous_page", "do_wp_page")):
        return "page faults (fresh memory)"
    if any("munmap" in s or "unmap_" in s for s in syms):
        return "munmap"
    if any("sha256" in s.lower() for s in syms[:3]):
        return "sha256"
    if any("XXH" in s for s in syms[:3]):
        return "xxh3"
    if "saxpy" in leaf:
        return "saxpy (OpenBLAS)"
    if "libcrypto" in dso:
        return "libcrypto (AES-GCM, EC, ...)"
    if "libssl" in dso:
        return "libssl"
    if any(k in leaf for k in ("memcpy", "memmove", "memset")):
        return "memcpy/memset"
    if any(k in leaf for k in ("malloc", "free", "_int_", "realloc", "calloc")):
        return "malloc/free"
    if "sqlite" in dso:
        return "SQLite"
    if "protobuf" in dso:
        return "protobuf-c"
    if "kernel" in dso or leaf.startswith("[k]"):
        if any(k in s for s in syms for k in ("fsync", "ext4_sync", "jbd2", "file_write")):
            return "kernel: file I/O"
        if any(k in s for s in syms for k in ("tcp_", "sock_", "ip_", "skb")):
            return "kernel: TCP"
        return "kernel: other"
    if "cohortd" in dso:
        return "cohortd code"
    return "other"


def samples(path):
    p = subprocess.Popen(["perf", "script", "-i", path, "-F", "tid,ip,sym,dso"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         errors="replace")
    tid, frames = None, []
    for line in p.stdout:
        line = line.rstrip("\n")
        if not line.strip():
            if tid is not None and frames:
                yield tid, frames
            tid, frames = None, []
            continue
        if not line.startswith(("\t", " ")) or tid is None and line.strip().split()[0].isdigit():
            try:
                tid = int(line.split()[0])
            except ValueError:
                tid = -1
            frames = []
            continue
        parts = line.strip().split(None, 1)
        if len(parts) < 2:
            continue
        rest = parts[1]
        dso = ""
        if rest.endswith(")") and "(" in rest:
            dso = rest[rest.rfind("(") + 1:-1]
            rest = rest[:rest.rfind("(")].strip()
        sym = rest.split("+0x")[0]
        frames.append((sym, dso))
    if tid is not None and frames:
        yield tid, frames
    p.wait()


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    path = sys.argv[1]
    top = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[2] == "--top" else 25
    ctxs = collections.Counter()
    by = collections.Counter()
    threads = collections.Counter()
    total = 0
    # The loop thread is the process's first thread: the smallest tid.
    all_samples = list(samples(path))
    main_tid = min((t for t, _ in all_samples), default=None)
    for tid, frames in all_samples:
        ph = None
        for sym, dso in frames:
            if "kernel" in dso:
                continue
            hit = next((name for key, name in PHASES if sym.startswith(key)), None)
            if hit:
                ph = hit
                break
        if ph is None:
            names = {s for s, _ in frames}
            ph = next((name for keys, name in FALLBACK if any(k in names for k in keys)),
                      "other")
        by[(tid, ph, kind(frames))] += 1
        ctxs[("loop" if tid == main_tid else "pool", context(frames))] += 1
        threads[tid] += 1
        total += 1
    if not total:
        sys.exit("no samples in %s" % path)
    print("%d samples; loop thread = tid %d (%.1f%%), pool threads %.1f%%\n" % (
        total, main_tid, 100.0 * threads[main_tid] / total,
        100.0 * (total - threads[main_tid]) / total))
    agg = collections.Counter()
    for (tid, ph, k), n in by.items():
        agg[("loop" if tid == main_tid else "pool", ph, k)] += n
    print("| thread | phase | leaf kind | % of samples |")
    print("| --- | --- | --- | ---: |")
    for (th, ph, k), n in agg.most_common(top):
        print("| %s | %s | %s | %.1f |" % (th, ph, k, 100.0 * n / total))
    print()
    print("| thread | context | % of samples |")
    print("| --- | --- | ---: |")
    for (th, cx), n in ctxs.most_common(top):
        print("| %s | %s | %.1f |" % (th, cx, 100.0 * n / total))
    print()
    phases = collections.Counter()
    for (th, ph, k), n in agg.items():
        phases[(th, ph)] += n
    print("| thread | phase | % of samples |")
    print("| --- | --- | ---: |")
    for (th, ph), n in phases.most_common(top):
        print("| %s | %s | %.1f |" % (th, ph, 100.0 * n / total))


if __name__ == "__main__":
    main()
