#!/usr/bin/python3
"""Turns the benchmarks' JSON lines (BUILD/bench/results.jsonl) into the Markdown
tables of docs/performance.md. The last line of each (name, params) wins, so a
results file that several runs appended to shows the latest run.

    report.py BUILD/bench/results.jsonl
"""
import json
import sys


def load(path):
    last = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                o = json.loads(line)
            except ValueError:
                continue
            key = (o.get("name"), json.dumps(o.get("params", {}), sort_keys=True))
            last[key] = o
    return list(last.values())


def pick(rows, name, **params):
    for r in rows:
        if r.get("name") != name:
            continue
        p = r.get("params", {})
        if all(p.get(k) == v for k, v in params.items()):
            return r
    return None


def fmt(v, nd=2):
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return ("%." + str(nd) + "f") % v
    return str(v)


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(" ---: " for _ in head) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |")
    return "\n".join(out)


def loads(rows, names):
    la = [r.get("loadavg") for r in rows if r.get("name") in names and r.get("loadavg") is not None]
    return "load average during these runs: %s–%s" % (min(la), max(la)) if la else ""


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    rows = load(sys.argv[1])
    out = []

    sizes = sorted({r["params"]["P"] for r in rows if r.get("name") == "fold_fedavg"})
    if sizes:
        t = []
        for p in sizes:
            g = lambda n: (pick(rows, n, P=p) or {}).get("value")
            fa = pick(rows, "fold_fedavg", P=p) or {}
            # The fold's own reference: the axpy samples taken alternating with its
            # samples (ref_axpy_c is one separate measurement, noisier on this VM).
            t.append([p, "%.1f" % (p * 4 / 1e6), g("fold_fedavg"), g("fold_fedau"),
                      fa.get("ref", {}).get("value", g("ref_axpy_c")),
                      g("ref_triad_c"), fa.get("ratio"), fa.get("met"), g("vc_moments"),
                      g("finite_chunk"), g("finite_model"), g("memcpy"), g("sha256"), g("xxh3")])
        out.append("### fold (GB/s of update bytes, median of 11, one thread)\n")
        out.append(table(["P", "MB", "FedAvg fold", "FedAU fold", "axpy (C), alternating",
                          "triad (C)",
                          "FedAvg / axpy", "≥ 0.8", "vc moments", "finite (chunk loop)",
                          "finite (model)", "memcpy", "sha256", "xxh3"], t))
        aes = [r for r in rows if r.get("name", "").endswith("gcm_decrypt")]
        if aes:
            out.append("\nAES-GCM decryption, one core, OpenSSL EVP: " + ", ".join(
                "%s %s-byte records %.2f GB/s" % (r["name"].split("_")[0],
                                                  r["params"]["record_bytes"], r["value"])
                for r in aes))
        out.append("\n" + loads(rows, {"fold_fedavg"}) + "\n")

    ing = [r for r in rows if r.get("name") == "ingest_upload"]
    if ing:
        t = []
        for r in ing:
            p = r["params"]
            rd = pick(rows, "ingest_round", N=p["N"], P=p["P"]) or {}
            cpu = pick(rows, "ingest_per_server_cpu", N=p["N"], P=p["P"]) or {}
            rss = pick(rows, "ingest_server_rss", N=p["N"], P=p["P"]) or {}
            lc = pick(rows, "ingest_upload_lc", N=p["N"], P=p["P"]) or {}
            t.append([p["N"], p["P"], r["value"], r["ref"]["value"], r.get("ratio"), r.get("met"),
                      r.get("tls_floor_gbps"), r.get("floor_over_aes"), r.get("of_tls_floor"),
                      r.get("tls_floor_one_loop_gbps"), r.get("of_one_loop_floor"),
                      r.get("tls_floor_two_loops_gbps"),
                      rd.get("value"), cpu.get("value"), cpu.get("ratio"),
                      cpu.get("loop_thread_busy"), rss.get("value"), lc.get("value"),
                      lc.get("ratio"), lc.get("of_one_loop_floor"), lc.get("loop_thread_busy"),
                      lc.get("loop_thread_runnable"), lc.get("loop_thread_asleep")])
        out.append("### ingest (rounds 2..R, cohort-loadgen clients, --durability relaxed)\n")
        out.append(table(["N", "P", "upload GB/s", "AES-128-GCM 1 core", "upload / AES", "≥ 0.5",
                          "TLS floor GB/s", "floor / AES", "upload / floor",
                          "one-loop floor GB/s", "upload / one-loop floor",
                          "two-loop floor GB/s",
                          "offer→last ack GB/s", "GB per server CPU-s", "per CPU-s / AES",
                          "loop thread busy", "server RSS MB",
                          "libcohort clients: upload GB/s", "/ AES", "/ one-loop floor",
                          "loop on a CPU", "loop runnable", "loop asleep"], t))
        out.append("\n" + loads(rows, {"ingest_upload"}) + "\n")

    rt = [r for r in rows if r.get("name") == "round_time" and "value" in r]
    if rt:
        t = []
        for r in rt:
            p = r["params"]
            m = pick(rows, "round_server_rss", N=p["N"], P=p["P"], durability=p["durability"]) or {}
            ref = r.get("ref", {}).get("value")
            mref = m.get("ref", {}).get("value")
            t.append([p["N"], p["P"], p["durability"], r["value"],
                      r.get("server_duration_median_s"),
                      ref, r.get("better_x"), r.get("met"), r.get("tls_floor_s"),
                      r.get("over_tls_floor"), round(ref / 10 / r["tls_floor_s"], 2)
                      if ref and r.get("tls_floor_s") else None,
                      r.get("tls_floor_one_loop_s"), r.get("over_one_loop_floor"),
                      r.get("tls_floor_two_loops_s"),
                      m.get("value"), mref,
                      m.get("better_x"), m.get("met"), r.get("server_cpu_s"),
                      r.get("clients_cpu_s")])
        out.append("### round (median of rounds 2..5; libcohort clients as threads of one "
                   "process)\n")
        out.append(table(["N", "P", "durability", "round s", "server-side s", "Flower s",
                          "× better", "≥ 10×", "TLS floor s", "round / floor",
                          "10× target / floor", "one-loop floor s", "round / one-loop floor",
                          "two-loop floor s", "server peak RSS MB", "Flower MB", "× better",
                          "≥ 10×", "cohortd CPU s (5 rounds)", "clients CPU s"], t))
        cpu = []
        for r in rt:
            p = r["params"]
            if r.get("host_cpu_s_per_round") is None:
                continue
            fl = pick(rows, "round_tls_floor", N=p["N"], P=p["P"]) or {}
            f1 = pick(rows, "round_tls_floor_loops", N=p["N"], P=p["P"], server_loops=1) or {}
            ref = r.get("ref", {}).get("value")
            c = r["host_cpu_s_per_round"]
            ncpu = r.get("host_cpus") or 2
            cpu.append([p["N"], p["P"], p["durability"], r["value"], c,
                        r.get("host_cores_busy"), round(c / ncpu, 4),
                        r.get("loop_cpu_s_per_round"), r.get("tls_floor_server_cpu_s_per_round"),
                        r.get("tls_floor_s"),
                        r.get("tls_floor_host_cpu_s_per_round"), fl.get("host_cores_busy"),
                        r.get("cpu_over_floor_cpu"),
                        f1.get("server_cpu_s_per_round"), f1.get("host_cpu_s_per_round"),
                        f1.get("host_cores_busy"),
                        round(ref / 10 * ncpu, 3) if ref else None])
        if cpu:
            out.append("\n#### round: the host's CPU per round (rounds 2..5, all processes)\n")
            out.append(table(["N", "P", "durability", "round s", "host CPU s / round",
                              "cores busy", "CPU / cores s", "cohortd loop thread CPU s / round",
                              "floor's server CPU s / round (all threads)", "TLS floor s",
                              "floor host CPU s / round", "floor cores busy",
                              "CPU / floor CPU", "one-loop floor server CPU s / round",
                              "one-loop floor host CPU s / round", "one-loop floor cores busy",
                              "CPU the 10× target leaves (all cores) s"], cpu))
        out.append("\n" + loads(rows, {"round_time"}) + "\n")

    mem = [r for r in rows if r.get("name") == "memory_server_peak_rss"]
    if mem:
        idle = pick(rows, "memory_idle_server_rss", P=1000000) or {}
        idle5 = pick(rows, "memory_idle_server_rss", P=100000) or {}
        t = []
        for r in sorted(mem, key=lambda r: (-r["params"].get("max_uploads", 2),
                                            r["params"]["N"])):
            pr = r["params"]
            an = pick(rows, "memory_server_peak_anon", N=pr["N"],
                      max_uploads=pr.get("max_uploads", 2)) or {}
            t.append([pr.get("max_uploads", 2), pr["N"], r["value"], an.get("value"),
                      r["ref"]["value"], r.get("ratio"), r.get("met"), an.get("ratio"),
                      an.get("met"), an.get("file_backed_at_peak_mib"),
                      r.get("rss_minus_idle_mib"), r.get("completed"), pr.get("rounds"),
                      r.get("kernel_tcp_mem_peak_mib")])
        out.append("### memory (P = 1e6, model 3.81 MiB; idle cohortd with this model: %s MiB, "
                   "with a P = 1e5 model: %s MiB)\n" % (fmt(idle.get("value"), 1),
                                                       fmt(idle5.get("value"), 1)))
        out.append(table(["--max-uploads", "N", "peak RSS MiB", "peak anon MiB", "target MiB",
                          "RSS / target", "RSS met", "anon / target", "anon met",
                          "file-backed at anon peak MiB", "RSS − idle MiB", "completed",
                          "rounds", "host TCP buffers peak MiB"], t))
        if idle.get("resident_kib_by_mapping"):
            top = list(idle["resident_kib_by_mapping"].items())[:12]
            out.append("\nIdle cohortd (P = 1e6), resident KiB by mapping: " +
                       ", ".join("%s %d" % kv for kv in top) + "\n")
        out.append("\n" + loads(rows, {"memory_server_peak_rss"}) + "\n")

    hb = pick(rows, "scale_heartbeat_rtt_p99")
    if hb:
        rss = pick(rows, "scale_server_rss") or {}
        sr = pick(rows, "scale_round_1000") or {}
        out.append("### scale\n")
        out.append(table(["connections", "connect s", "handshakes/s", "hb/s", "RTT p50 ms",
                          "RTT p99 ms", "RTT p99.9 ms", "RTT max ms", "p99 ≤ 100 ms",
                          "server RSS MiB", "KiB / conn", "≤ 1 GiB", "server CPU %",
                          "server µs / hb"],
                         [[hb.get("connected"), hb.get("connect_s"), hb.get("handshakes_per_s"),
                           round(1000.0 / hb["params"]["hb_interval_ms"] * hb.get("connected", 0)),
                           hb.get("rtt_p50_ms"), hb["value"], hb.get("rtt_p999_ms"),
                           hb.get("rtt_max_ms"), hb.get("met"), rss.get("value"),
                           rss.get("per_connection_kib"), rss.get("met"),
                           hb.get("server_cpu_pct"), hb.get("server_cpu_us_per_hb")]]))
        if sr:
            out.append("\nRound with %s clients at P = %s: completed %s, median round %s s "
                       "(server-side %s s), accepted per round %s, cohortd peak RSS %s MiB." % (
                           sr["params"]["N"], sr["params"]["P"], fmt(sr.get("completed")),
                           fmt(sr.get("value"), 3), sr.get("server_durations_s"),
                           sr.get("accepted_per_round"), fmt(sr.get("server_peak_rss_mib"), 1)))
        out.append("\n" + loads(rows, {"scale_heartbeat_rtt_p99", "scale_round_1000"}) + "\n")

    sz = [r for r in rows if r.get("name") == "client_lib_size"]
    if sz:
        out.append("### client\n")
        out.append(table(["library", "build type", "stripped KiB", "unstripped KiB"],
                         [[r["params"]["kind"], r["params"]["buildtype"], r["value"],
                           r.get("unstripped_kib")] for r in sz]))
        base = pick(rows, "client_baseline_rss") or {}
        crs = [r for r in rows if r.get("name") == "client_peak_rss"]
        out.append("")
        out.append(table(["client process", "peak RSS MiB", "peak anon MiB", "target MiB",
                          "RSS / target", "met", "RSS / model"],
                         [[r["params"]["client"], r["value"], r.get("anon_peak_mib"),
                           r["ref"]["value"], r.get("ratio"), r.get("met"),
                           r.get("rss_over_model")] for r in crs]))
        out.append("\nBaseline (libcohort + OpenSSL initialized, not connected): %s MiB.\n"
                   % fmt(base.get("value"), 1))
    print("\n".join(out))


if __name__ == "__main__":
    main()
