"""Crash safety: cohortd is SIGKILLed at random moments (during uploads, folds,
checkpoint writes and commits alike) COHORT_KILLS times (default 20; see
docs/security.md for a 200-kill run) and restarted each time on its state
directory, while three clients with fixed updates reconnect on their own.
At the end every round 1..R is committed exactly once, every checkpoint's
sha256 matches the store, PRAGMA integrity_check is ok, and every checkpoint
(so also the final model) equals an uninterrupted run's: x0 + r * step.

The kills happen while cohortd runs with no round limit, so a fast machine
cannot finish the federation before the kills are done; the last restart then
sets the limit a few rounds past what was committed (at least COHORT_ROUNDS)."""
import hashlib
import os
import random
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from cohort_e2e import Check, Env, flat, rel_err, st_read, st_write, wait  # noqa

ROWS, COLS = 128, 1024          # a 512 KiB model: uploads and folds take real time
MIN_ROUNDS = int(os.environ.get("COHORT_ROUNDS", "100"))
EXAMPLES = [100, 300, 600]


def tensor(seed, scale):
    rnd = random.Random(seed)
    base = [rnd.uniform(-1, 1) for _ in range(997)]
    return [base[(i * 31) % 997] * scale for i in range(ROWS * COLS)]


def main():
    t = Check("e2e-crash-safety")
    kills_wanted = int(os.environ.get("COHORT_KILLS", "20"))
    seed = int(os.environ.get("COHORT_KILL_SEED", str(int(time.time()))))
    print("# kills %d, seed %d" % (kills_wanted, seed))
    rnd = random.Random(seed)
    env = Env(os.environ.get("COHORT_BUILD", "build"), nclients=3, name="crash")
    try:
        init = os.path.join(env.dir, "init.safetensors")
        st_write(init, [("w", [ROWS, COLS], tensor(0, 1.0)), ("b", [COLS], [0.0] * COLS)])
        ups = []
        for i in range(3):
            p = os.path.join(env.dir, "u%d.safetensors" % (i + 1))
            st_write(p, [("w", [ROWS, COLS], tensor(i + 1, 0.01)), ("b", [COLS], [0.001 * (i + 1)] * COLS)])
            ups.append(p)
        common = ["--min-clients", "3", "--round-timeout", "30",
                "--chunk-bytes", "65536", "--log-level", "notice"]
        slow = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_update.sh")
        srv = env.start_server(init, ["--rounds", "1000000"] + common)
        clients = [env.start_client(i + 1, ["--exec", "sh %s 0.02 %s" % (slow, ups[i]),
                                            "--examples", str(EXAMPLES[i]), "--retry-ms", "10:100"])
                   for i in range(3)]
        kills = 0
        while kills < kills_wanted:
            time.sleep(rnd.uniform(0.03, 0.35))
            if srv.poll() is not None:
                break  # cohortd died on its own: reported below
            os.kill(srv.pid, signal.SIGKILL)
            srv.wait()
            kills += 1
            if kills < kills_wanted:
                srv = env.start_server(init, ["--rounds", "1000000"] + common)
        t.ok(kills >= kills_wanted, "cohortd SIGKILLed %d times at random moments" % kills)
        db = env.db()
        done = db.execute("SELECT coalesce(max(round), 0) FROM rounds").fetchone()[0]
        db.close()
        ROUNDS = max(MIN_ROUNDS, done + 10)
        print("# %d rounds committed during the kills; finishing at %d" % (done, ROUNDS))
        srv = env.start_server(init, ["--rounds", str(ROUNDS)] + common)
        t.ok(wait(srv, 180, "cohortd") == 0, "the last restart finishes all %d rounds" % ROUNDS)
        for c in clients:
            t.ok(wait(c, 30, "client") == 0, "client reconnected on its own every time and exits 0")
        db = env.db()
        rows = db.execute("SELECT round, checkpoint, sha256 FROM rounds ORDER BY round").fetchall()
        t.ok([r[0] for r in rows] == list(range(ROUNDS + 1)), "rounds 0..%d committed exactly once" % ROUNDS)
        bad = [r[0] for r in rows
               if hashlib.sha256(open(os.path.join(env.state, r[1]), "rb").read()).hexdigest() != r[2]]
        t.ok(not bad, "every checkpoint's sha256 matches the store (mismatches: %s)" % bad)
        t.ok(db.execute("PRAGMA integrity_check").fetchone()[0] == "ok", "PRAGMA integrity_check ok")
        n = db.execute("SELECT count(*) FROM participation WHERE status='accepted'").fetchone()[0]
        t.ok(n == 3 * ROUNDS, "3 accepted updates per committed round (%d)" % n)
        x0 = flat(st_read(init))
        total = float(sum(EXAMPLES))
        d = [flat(st_read(p)) for p in ups]
        step = [(EXAMPLES[0] * a + EXAMPLES[1] * b + EXAMPLES[2] * c) / total for a, b, c in zip(*d)]
        worst = 0.0
        for r in (1, ROUNDS // 2, ROUNDS):
            want = [a + r * s for a, s in zip(x0, step)]
            worst = max(worst, rel_err(flat(st_read(env.checkpoint(r))), want))
        t.ok(worst < 1e-5, "checkpoints equal the uninterrupted run's (worst rel err %.2e)" % worst)
        leftovers = [f for f in os.listdir(os.path.join(env.state, "checkpoints")) if f.endswith(".tmp")]
        t.ok(not leftovers, "no temporary checkpoint files left behind (%s)" % leftovers)
    finally:
        env.cleanup()
    t.done()


if __name__ == "__main__":
    main()
