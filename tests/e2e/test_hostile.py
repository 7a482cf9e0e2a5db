"""End to end: hostile clients (tests/e2e/hostile.c) against one real cohortd while two
honest `cohort client` processes take part in every round. For every case the hostile
program must see the documented reaction (its exit status), cohortd must log a line naming
the client (or its peer address) and the reason, a round the client was offered must get a
`rejected`/`dropped` participation row with a reason, cohortd must keep serving, and every
checkpoint must equal the FedAvg of the honest updates alone.

Set-up: model fc1.weight[16x12] fc1.bias[16] fc2.weight[3x16] fc2.bias[3] (259 floats),
honest client-1 (100 examples) and client-2 (300 examples) whose trainer waits 1.2 s and
then sends a fixed update, cohortd --rounds 3 --min-clients 7 (2 honest + 5 hostile per
round) --frame-timeout-ms 2000 --handshake-timeout-ms 2000 --max-frame-bytes 65536 --crl.
A round therefore opens when the 5 hostile clients of its batch have joined, and closes when
everyone answered (the hostile ones are gone before the honest ones answer, so the next
round waits for the next batch). Each hostile identity is its own certificate h-CASE-1.
"Honest contributions": client-1, client-2, plus the first (correct) update of `duplicate`
(round 2) and the control case `honest` (round 3), 50 examples each, values
((i % 7) - 3) * 0.01.

| case        | when            | expected server reaction (hostile exit 0 iff seen)        | participation row                                   |
|-------------|-----------------|-----------------------------------------------------------|-----------------------------------------------------|
| early       | before round 1  | Hello+update pipelined, no round open: Error EROUND        | none (no round open); client registered              |
| plaintext   | during round 1  | TLS handshake fails ("wrong version number"), closed       | none, not registered                                 |
| nocert      | during round 1  | alert "certificate required", closed; log: "peer did not return a certificate" | none                 |
| othercca    | during round 1  | alert "unknown ca"; log: "certificate verify failed"; its CN is client-1, the honest client-1 keeps its connection | none |
| expired     | during round 1  | alert "certificate expired"; log: "certificate has expired" | none, not registered                                |
| revoked     | during round 1  | alert "certificate revoked" (--crl); log: "certificate revoked" | none, not registered                            |
| badversion  | during round 1  | Error EVERSION fatal, closed                               | none, not registered                                 |
| badnames    | round 1         | Error ESHAPE (non-fatal), no ack                           | rejected "tensor 0 is 'evil.weight', expected ..."   |
| badshapes   | round 1         | Error ESHAPE                                               | rejected "tensor 'fc1.weight' has the wrong shape"   |
| badcount    | round 1         | Error ESHAPE                                               | rejected "3 tensors, the model has 4"                |
| nan         | round 1         | Error ENONFINITE                                           | rejected "update contains NaN or Inf (element 129)"  |
| inf         | round 1         | Error ENONFINITE                                           | rejected "update contains NaN or Inf (element 129)"  |
| closedround | round 2         | update for round 1: Error EROUND, offer stands             | dropped "disconnected: peer closed the connection"   |
| futureround | round 2         | update for round 7: Error EROUND, offer stands             | dropped "disconnected: peer closed the connection"   |
| badchecksum | round 2         | Error ECHECKSUM                                            | rejected "sha256 of the update does not match ..."   |
| badxxh      | round 2         | Error ECHECKSUM                                            | rejected "XXH3-128 of the update does not match ..." |
| duplicate   | round 2         | first update acked, second: Error EDUP (logged)            | accepted (the first update, counted once)            |
| slowloris   | round 2         | 1 byte/s: Error ETIMEDOUT fatal after ~2-3 s, closed       | dropped "disconnected: incomplete frame for more than 2000 ms (slow sender)" |
| notoffered  | round 2 (joins while open) | Hello+update pipelined before the offer could arrive: Error EOFFER, offer stands | dropped "disconnected: peer closed the connection" |
| burst       | after round 2's notoffered | 1000 connects dropped (close, ClientHello then close, RST, ClientHello then RST); a probe after it gets Error EVERSION | none |
| bigframe    | round 3         | Error ETOOBIG fatal, closed                                | dropped "disconnected: frame of 65537 bytes exceeds max_frame_bytes=65536" |
| undecodable | round 3         | Error EFRAME fatal, closed                                 | dropped "disconnected: frame of 16 bytes does not decode ..." |
| truncated   | round 3         | half an UpdateBegin, half-close: server closes             | dropped "disconnected: peer closed the connection inside a frame ..." |
| midupload   | round 3         | UpdateBegin + 2 of 5 chunks, half-close: server closes     | dropped "disconnected during the upload: peer closed the connection" |
| honest      | round 3         | control: UpdateAck accepted                                | accepted                                             |
"""
import os
import re
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from cohort_e2e import Check, Env, flat, rel_err, run, st_read, wait  # noqa

LAYOUT = [("fc1.weight", [16, 12]), ("fc1.bias", [16]), ("fc2.weight", [3, 16]), ("fc2.bias", [3])]
LAYOUT_ARG = ",".join("%s:%s" % (n, "x".join(str(d) for d in s)) for n, s in LAYOUT)
HONEST = [("client-1", 100), ("client-2", 300)]
HOSTILE_EXAMPLES = 50
MAX_FRAME = 65536
BATCH = {
    1: ["badnames", "badshapes", "badcount", "nan", "inf"],
    2: ["closedround", "futureround", "badchecksum", "badxxh", "duplicate", "slowloris"],
    3: ["bigframe", "undecodable", "truncated", "midupload", "honest"],
}
TLS_CASES = ["plaintext", "nocert", "othercca", "expired", "revoked"]
# case -> (round, status, reason substring or None)
ROWS = {
    "badnames": (1, "rejected", "tensor 0 is 'evil.weight', expected 'fc1.weight'"),
    "badshapes": (1, "rejected", "tensor 'fc1.weight' has the wrong shape"),
    "badcount": (1, "rejected", "3 tensors, the model has 4"),
    "nan": (1, "rejected", "update contains NaN or Inf"),
    "inf": (1, "rejected", "update contains NaN or Inf"),
    "closedround": (2, "dropped", "disconnected: peer closed the connection"),
    "futureround": (2, "dropped", "disconnected: peer closed the connection"),
    "badchecksum": (2, "rejected", "sha256 of the update does not match"),
    "badxxh": (2, "rejected", "XXH3-128 of the update does not match"),
    "duplicate": (2, "accepted", None),
    "slowloris": (2, "dropped", "disconnected: incomplete frame for more than 2000 ms"),
    "notoffered": (2, "dropped", "disconnected: peer closed the connection"),
    "bigframe": (3, "dropped", "disconnected: frame of %d bytes exceeds max_frame_bytes=%d"
                 % (MAX_FRAME + 1, MAX_FRAME)),
    "undecodable": (3, "dropped", "disconnected: frame of 16 bytes does not decode"),
    "truncated": (3, "dropped", "disconnected: peer closed the connection inside a frame"),
    "midupload": (3, "dropped", "disconnected during the upload: peer closed the connection"),
    "honest": (3, "accepted", None),
}
# case -> what cohortd must log on a line naming the client (CN=h-CASE-1) or its peer address
LOGS = {
    "early": "update for round 1 refused: round 0 is waiting",
    "plaintext": "TLS handshake failed: wrong version number",
    "nocert": "TLS handshake failed: peer did not return a certificate",
    "othercca": "TLS handshake failed: certificate verify failed: unable to get local issuer",
    "expired": "TLS handshake failed: certificate verify failed: certificate has expired",
    "revoked": "TLS handshake failed: certificate verify failed: certificate revoked",
    "badversion": "closing: incompatible protocol version 99",
    "badnames": "update rejected: tensor 0 is 'evil.weight'",
    "badshapes": "update rejected: tensor 'fc1.weight' has the wrong shape",
    "badcount": "update rejected: 3 tensors, the model has 4",
    "nan": "update rejected: update contains NaN or Inf",
    "inf": "update rejected: update contains NaN or Inf",
    "closedround": "update for round 1 refused: round 2 is open",
    "futureround": "update for round 7 refused: round 2 is open",
    "badchecksum": "update rejected: sha256 of the update does not match UpdateEnd",
    "badxxh": "update rejected: XXH3-128 of the update does not match UpdateEnd",
    "duplicate": "update for round 2 refused: this client already answered it",
    "slowloris": "closing: incomplete frame for more than 2000 ms (slow sender)",
    "notoffered": "update for round 2 refused: it was sent before the round offer",
    "burst": "closing: incompatible protocol version 99",
    "bigframe": "closing: frame of %d bytes exceeds max_frame_bytes=%d" % (MAX_FRAME + 1, MAX_FRAME),
    "undecodable": "closing: frame of 16 bytes does not decode",
    "truncated": "closing: peer closed the connection inside a frame",
    "midupload": "closing: peer closed the connection",
    "honest": "joined as client",
}
# case -> what the hostile program itself must have observed (besides its PASS)
SEEN = {
    "plaintext": "closed",
    "nocert": "alert certificate required",
    "othercca": "alert unknown ca",
    "expired": "alert certificate expired",
    "revoked": "alert certificate revoked",
    "badversion": "error code=-4005 fatal=1",
    "early": "error code=-4002 fatal=0",
    "badnames": "error code=-4008 fatal=0",
    "badshapes": "error code=-4008 fatal=0",
    "badcount": "error code=-4008 fatal=0",
    "nan": "error code=-4003 fatal=0",
    "inf": "error code=-4003 fatal=0",
    "closedround": "error code=-4002 fatal=0 round=1 ",
    "futureround": "error code=-4002 fatal=0 round=7 ",
    "badchecksum": "error code=-4009 fatal=0",
    "badxxh": "error code=-4009 fatal=0",
    "duplicate": "error code=-4012 fatal=0",
    "slowloris": "error code=-110 fatal=1",
    "notoffered": "error code=-4019 fatal=0",
    "burst": "error code=-4005 fatal=1",
    "bigframe": "error code=-4004 fatal=1",
    "undecodable": "error code=-4001 fatal=1",
    "truncated": "closed",
    "midupload": "closed",
    "honest": "ack round=3 accepted=1",
}


def pattern(n, scale=1.0):
    """The update hostile.c sends: float32(((i % 7) - 3) * 0.01 * scale)."""
    return [struct.unpack("<f", struct.pack("<f", ((i % 7) - 3) * 0.01 * scale))[0] for i in range(n)]


def main():
    t0 = time.time()
    t = Check("e2e-hostile")
    env = Env(os.environ.get("COHORT_BUILD", "build"), nclients=2, name="hostile")
    hostile = os.environ.get("COHORT_HOSTILE") or os.path.join(env.build, "tests", "hostile")
    srv = None
    try:
        # ---- certificates: one identity per case, another CA, an expired and a revoked one
        ca, cakey = os.path.join(env.certs, "ca.pem"), os.path.join(env.certs, "ca.key")
        named = ["early", "badversion", "burst", "revoked"] + [c for b in BATCH.values() for c in b] + ["notoffered"]
        for case in named:
            run([env.cohort, "certs", "--out", env.certs, "--ca-cert", ca, "--ca-key", cakey,
                 "--clients", "1", "--name-prefix", "h-%s-" % case], quiet=True)
        run([env.cohort, "certs", "--out", env.certs, "--ca-cert", ca, "--ca-key", cakey,
             "--clients", "1", "--name-prefix", "h-expired-", "--expired"], quiet=True)
        crl = os.path.join(env.certs, "crl.pem")
        run([env.cohort, "certs", "--out", env.certs, "--ca-cert", ca, "--ca-key", cakey,
             "--crl", crl, "--revoke", os.path.join(env.certs, "h-revoked-1.pem")], quiet=True)
        other = env.other_ca()

        # ---- model and the honest updates
        init, upd = env.model_files(LAYOUT, (11, 12), 0.05)

        srv = env.start_server(init, [
            "--rounds", "3", "--min-clients", str(len(HONEST) + 5), "--round-timeout", "20",
            "--frame-timeout-ms", "2000", "--handshake-timeout-ms", "2000",
            "--max-frame-bytes", str(MAX_FRAME), "--chunk-bytes", "1024", "--crl", crl,
            "--durability", "relaxed"])
        addr = "127.0.0.1:%d" % env.port
        outs, procs = {}, {}

        def launch(case, extra=()):
            if case == "othercca":
                cert = ["--cert", os.path.join(other, "client-1.pem"), "--key", os.path.join(other, "client-1.key")]
            elif case in ("plaintext", "nocert"):
                cert = []
            else:
                cert = ["--cert", os.path.join(env.certs, "h-%s-1.pem" % case),
                        "--key", os.path.join(env.certs, "h-%s-1.key" % case)]
            if any(case in b for b in BATCH.values()):
                extra = ["--model-layout-from-offer"] + list(extra)
            mode = case
            out = os.path.join(env.dir, "hostile-%s.out" % case)
            outs[case] = out
            f = open(out, "w")
            procs[case] = subprocess.Popen(
                [hostile, mode, "--server", addr, "--ca", ca, "--timeout-ms", "20000",
                 "--examples", str(HOSTILE_EXAMPLES)] + cert + list(extra),
                stdout=f, stderr=subprocess.STDOUT)
            env.procs.append(procs[case])

        def finish(cases, timeout=40):
            for case in cases:
                rc = wait(procs[case], timeout, "hostile %s" % case)
                with open(outs[case]) as f:
                    out = f.read()
                t.ok(rc == 0, "%s: hostile saw the expected reaction (exit %d: %s)"
                     % (case, rc, out.strip().splitlines()[-1] if out.strip() else "no output"))
                t.ok(SEEN[case] in out, "%s: hostile observed '%s'" % (case, SEEN[case]))

        def committed(r, timeout=30):
            end = time.time() + timeout
            while time.time() < end:
                try:
                    if env.db().execute("SELECT 1 FROM rounds WHERE round=?", (r,)).fetchone():
                        return True
                except Exception:
                    pass
                if srv.poll() is not None:
                    return False
                time.sleep(0.05)
            return False

        def wait_log(text, timeout=20):
            end = time.time() + timeout
            while time.time() < end:
                if text in env.log():
                    return True
                time.sleep(0.02)
            return False

        # ---- before any round: an update pipelined after Hello while no round is open
        launch("early", ["--round", "1", "--layout", LAYOUT_ARG])
        finish(["early"])

        # ---- round 1: bad tensor tables and non-finite values, TLS refusals meanwhile
        slow = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_update.sh")
        honest = [env.start_client(i + 1, ["--exec", "sh %s 1.2 %s" % (slow, upd[i]),
                                           "--examples", str(HONEST[i][1])]) for i in range(2)]
        for case in BATCH[1] + TLS_CASES + ["badversion"]:
            launch(case)
        finish(TLS_CASES + ["badversion"] + BATCH[1])
        t.ok(committed(1), "round 1 committed")
        t.ok(srv.poll() is None, "cohortd still running after round 1")

        # ---- round 2: wrong rounds, bad checksum, duplicate, slow sender; a late joiner
        # pipelines an update before its offer; then a burst of dropped connections
        for case in BATCH[2]:
            launch(case)
        t.ok(wait_log("round 2: open"), "round 2 opened")
        launch("notoffered", ["--round", "2", "--layout", LAYOUT_ARG])
        finish(["notoffered"])
        launch("burst", ["--count", "1000"])
        finish(["burst"], timeout=120)
        finish(BATCH[2])
        t.ok(committed(2), "round 2 committed")
        t.ok(srv.poll() is None, "cohortd still running after round 2 and the burst")

        # ---- round 3: broken framing, truncation, an upload cut off, and a control
        for case in BATCH[3]:
            launch(case)
        finish(BATCH[3])
        t.ok(wait(srv, 40, "cohortd") == 0, "cohortd commits round 3 and exits 0")
        for i, c in enumerate(honest):
            t.ok(wait(c, 30, "honest client") == 0, "honest client-%d exits 0 at the end of the run" % (i + 1))

        # ---- log lines: every case is named with its reason
        log = env.log()
        lines = log.splitlines()
        for case, text in LOGS.items():
            if case in TLS_CASES:
                with open(outs[case]) as f:
                    m = re.search(r"^local (\S+)$", f.read(), re.M)
                who = "(%s)" % (m.group(1) if m else "?")
            else:
                who = "CN=h-%s-1," % case
            hit = [l for l in lines if who in l and text in l]
            t.ok(len(hit) >= 1, "%s: cohortd logs '%s' naming %s" % (case, text, who))
        burst_lines = [l for l in lines if re.search(r"conn \d+ \((127\.0\.0\.1:\d+|\?)\): "
                                                     r"(closing: |TLS handshake failed)", l)]
        t.ok(len(burst_lines) >= 1000 + len(TLS_CASES),
             "every burst connection is logged as closed (%d unnamed closes)" % len(burst_lines))
        t.ok(not re.search(r"\b(ERR|CRIT)\b", log), "cohortd logged no ERR line")
        t.ok("deadline of" not in log, "no round needed its deadline: every hostile got a verdict")

        # ---- participation rows
        db = env.db()
        rows = db.execute("SELECT p.round, c.name, p.status, p.reason FROM participation p "
                          "JOIN clients c ON c.id = p.client ORDER BY p.round, c.name").fetchall()
        for case, (r, status, reason) in ROWS.items():
            mine = [x for x in rows if x[1] == "h-%s-1" % case]
            ok = len(mine) == 1 and mine[0][0] == r and mine[0][2] == status and (
                reason is None and mine[0][3] is None or reason is not None and mine[0][3] and reason in mine[0][3])
            t.ok(ok, "%s: one participation row (%d, %s, %s) (got %s)" % (case, r, status, reason, mine))
        for name, _ in HONEST:
            mine = [(x[0], x[2]) for x in rows if x[1] == name]
            t.ok(mine == [(1, "accepted"), (2, "accepted"), (3, "accepted")],
                 "%s accepted in every round (got %s)" % (name, mine))
        t.ok(len(rows) == len(ROWS) + 3 * len(HONEST),
             "no other participation rows (%d rows)" % len(rows))
        names = set(r[0] for r in db.execute("SELECT name FROM clients"))
        for case in ["expired", "revoked", "badversion", "burst"]:
            t.ok("h-%s-1" % case not in names, "%s: never registered as a client" % case)
        t.ok("h-early-1" in names, "early: registered by its Hello, but no participation row")
        rounds = db.execute("SELECT round, offered, participants, close_reason FROM rounds "
                            "WHERE round > 0 ORDER BY round").fetchall()
        t.ok(rounds == [(1, 7, 2, "all answered"), (2, 9, 3, "all answered"), (3, 7, 3, "all answered")],
             "rounds: offered 7/9/7 (round 2: 6 hostile + notoffered + 2 honest), accepted 2/3/3, all closed by answers (got %s)" % rounds)
        t.ok(db.execute("PRAGMA integrity_check").fetchone()[0] == "ok", "integrity_check ok")

        # ---- every checkpoint equals the FedAvg of the honest contributions alone
        x = flat(st_read(init))
        d = [flat(st_read(p)) for p in upd]
        pat = pattern(len(x))
        for r in (1, 2, 3):
            contrib = [(HONEST[0][1], d[0]), (HONEST[1][1], d[1])]
            if r >= 2:  # round 2: duplicate's first update; round 3: the honest control
                contrib.append((HOSTILE_EXAMPLES, pat))
            total = float(sum(n for n, _ in contrib))
            x = [x[j] + sum(n * u[j] for n, u in contrib) / total for j in range(len(x))]
            err = rel_err(flat(st_read(env.checkpoint(r))), x)
            t.ok(err < 1e-5, "checkpoint %d equals the honest-only FedAvg (rel err %.2e)" % (r, err))
    finally:
        env.cleanup()
    print("wall time %.1f s" % (time.time() - t0))
    t.done()


if __name__ == "__main__":
    main()
