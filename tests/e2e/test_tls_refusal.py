"""End to end: a client with no certificate and one with a certificate from
another CA are refused with a logged reason, while the honest clients' round
completes and equals what they alone produce."""
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from cohort_e2e import Check, Env, flat, rel_err, st_read, wait  # noqa

LAYOUT = [("w", [8, 8]), ("b", [8])]


def main():
    t = Check("e2e-tls-refusal")
    env = Env(os.environ.get("COHORT_BUILD", "build"), nclients=2, name="tls")
    try:
        other = env.other_ca()
        init, ups = env.model_files(LAYOUT, (11, 12), 0.1)
        srv = env.start_server(init, ["--rounds", "1", "--min-clients", "2", "--round-timeout", "30"])
        ca = os.path.join(env.certs, "ca.pem")
        # The intruders come first, so the round is open while they are refused.
        nocert = subprocess.run(
            [env.cohort, "client", "--server", "127.0.0.1:%d" % env.port, "--ca", ca,
             "--update", ups[0], "--examples", "1", "--max-attempts", "2", "--retry-ms", "50:100"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
        t.ok(nocert.returncode != 0, "client without a certificate gives up with an error")
        wrongca = subprocess.run(
            [env.cohort, "client", "--server", "127.0.0.1:%d" % env.port, "--ca", ca,
             "--cert", os.path.join(other, "client-1.pem"), "--key", os.path.join(other, "client-1.key"),
             "--update", ups[0], "--examples", "1", "--max-attempts", "2", "--retry-ms", "50:100"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
        t.ok(wrongca.returncode != 0, "client with another CA's certificate gives up with an error")
        t.ok("cert" in (nocert.stdout + wrongca.stdout).lower(),
             "the refused clients say the certificate was the problem")
        honest = [env.start_client(i, ["--update", ups[i - 1], "--examples", "10"]) for i in (1, 2)]
        t.ok(wait(srv, 60, "cohortd") == 0, "cohortd completes the round and exits 0")
        for c in honest:
            t.ok(wait(c, 30, "client") == 0, "honest client exits 0")
        log = env.log()
        t.ok("TLS handshake failed" in log and "certificate" in log,
             "cohortd logs the refusals with a reason")
        refusals = [l for l in log.splitlines() if "TLS handshake failed" in l]
        t.ok(any("peer did not return a certificate" in l or "certificate required" in l
                 for l in refusals), "no-certificate refusal names the missing certificate")
        t.ok(any("certificate verify failed" in l for l in refusals),
             "wrong-CA refusal names the failed verification")
        x = flat(st_read(init))
        d = [flat(st_read(p)) for p in ups]
        want = [a + (b + c) / 2 for a, b, c in zip(x, d[0], d[1])]
        err = rel_err(flat(st_read(env.checkpoint(1))), want)
        t.ok(err < 1e-5, "round 1 equals the honest clients' average (rel err %.2e)" % err)
        db = env.db()
        names = sorted(r[0] for r in db.execute("SELECT name FROM clients"))
        t.ok(names == ["client-1", "client-2"], "only the honest clients are registered (%s)" % names)
    finally:
        env.cleanup()
    t.done()


if __name__ == "__main__":
    main()
