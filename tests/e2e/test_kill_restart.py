"""End to end: cohortd is killed with SIGKILL in the middle of a run and
restarted on the same state directory (with --model given again, which must be
ignored); the clients reconnect on their own. Every round 1..R is committed
exactly once, no round committed before the kill is lost, every checkpoint is
the exact FedAvg result, and PRAGMA integrity_check is ok."""
import hashlib
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from cohort_e2e import Check, Env, flat, rel_err, st_read, wait  # noqa

LAYOUT = [("fc.weight", [10, 50]), ("fc.bias", [10])]
EXAMPLES = [100, 300, 600]
ROUNDS = 40


def committed(env):
    try:
        db = env.db()
        rows = db.execute("SELECT round, sha256 FROM rounds ORDER BY round").fetchall()
        db.close()
        return rows
    except Exception:
        return []


def main():
    t = Check("e2e-kill-restart")
    env = Env(os.environ.get("COHORT_BUILD", "build"), nclients=3, name="kill")
    try:
        init, ups = env.model_files(LAYOUT, (1, 2, 3), 0.05)
        args = ["--rounds", str(ROUNDS), "--min-clients", "3", "--round-timeout", "30"]
        srv = env.start_server(init, args)
        # Each round takes at least 30 ms (the --exec trainer sleeps), so the kills
        # below land mid-run; --exec also covers the external-trainer path.
        slow = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_update.sh")
        clients = [env.start_client(i + 1, ["--exec", "sh %s 0.03 %s" % (slow, ups[i]),
                                            "--examples", str(EXAMPLES[i]),
                                            "--retry-ms", "20:200"]) for i in range(3)]
        kills = 0
        before = []
        for target in (5, 17, 29):
            end = time.time() + 60
            while time.time() < end and len(committed(env)) <= target:
                time.sleep(0.002)
            if srv.poll() is not None:
                break
            os.kill(srv.pid, signal.SIGKILL)
            srv.wait()
            kills += 1
            before = committed(env)
            srv = env.start_server(init, args)
        t.ok(kills == 3, "cohortd was SIGKILLed 3 times mid-run (%d)" % kills)
        t.ok(wait(srv, 120, "cohortd") == 0, "restarted cohortd finishes every round and exits 0")
        for i, c in enumerate(clients):
            t.ok(wait(c, 30, "client") == 0, "client %d reconnected on its own and exits 0" % (i + 1))
        rows = committed(env)
        t.ok([r[0] for r in rows] == list(range(ROUNDS + 1)),
             "rounds 0..%d each committed exactly once" % ROUNDS)
        t.ok(all(r in rows for r in before), "no round committed before the last kill was lost")
        log = env.log()
        t.ok("--model %s ignored" % init in log, "a restart ignores --model: the state directory wins")
        t.ok("resuming after round" in log, "restarts resume after the last committed round")
        x = flat(st_read(init))
        total = float(sum(EXAMPLES))
        d = [flat(st_read(p)) for p in ups]
        step = [sum(EXAMPLES[i] * d[i][j] for i in range(3)) / total for j in range(len(x))]
        worst = 0.0
        for r in range(1, ROUNDS + 1):
            want = [a + r * s for a, s in zip(x, step)]
            worst = max(worst, rel_err(flat(st_read(env.checkpoint(r))), want))
        t.ok(worst < 1e-5, "every checkpoint is the exact FedAvg model (worst rel err %.2e)" % worst)
        ok_sha = True
        for r, sha in rows:
            with open(env.checkpoint(r), "rb") as f:
                ok_sha &= hashlib.sha256(f.read()).hexdigest() == sha
        t.ok(ok_sha, "every checkpoint matches the sha256 recorded in the store")
        db = env.db()
        t.ok(db.execute("PRAGMA integrity_check").fetchone()[0] == "ok", "integrity_check ok")
        n = db.execute("SELECT count(*) FROM participation WHERE status='accepted'").fetchone()[0]
        t.ok(n == 3 * ROUNDS, "3 accepted rows per round (%d)" % n)
    finally:
        env.cleanup()
    t.done()


if __name__ == "__main__":
    main()
