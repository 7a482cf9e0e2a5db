"""Server lifecycle corners, end to end:
- a client that trains longer than --idle-timeout-ms is not dropped while the
  round it was offered is open;
- the state directory may be given relative to any working directory: a
  restart from another directory resumes (checkpoint paths are stored relative);
- SIGTERM during an open round ends cohortd cleanly without committing the
  half-answered round, and the next start redoes it."""
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from cohort_e2e import Check, Env, random_tensors, st_write, wait, wait_port  # noqa

LAYOUT = [("w", [4, 4]), ("b", [4])]


def server(env, cwd, state, rounds, log):
    args = [env.cohortd, "--listen", "127.0.0.1:%d" % env.port, "--state-dir", state,
            "--ca", os.path.join(env.certs, "ca.pem"), "--cert", os.path.join(env.certs, "server.pem"),
            "--key", os.path.join(env.certs, "server.key"), "--rounds", str(rounds),
            "--min-clients", "2", "--idle-timeout-ms", "1000", "--round-timeout", "60",
            "--log-level", "info", "--model", os.path.join(env.dir, "init.safetensors")]
    p = subprocess.Popen(args, cwd=cwd, stdout=open(os.path.join(env.dir, log), "a"),
                         stderr=subprocess.STDOUT)
    env.procs.append(p)
    wait_port(env.port, p)
    return p


def main():
    t = Check("e2e-lifecycle")
    env = Env(os.environ.get("COHORT_BUILD", "build"), nclients=2, name="life")
    try:
        st_write(os.path.join(env.dir, "init.safetensors"), random_tensors(0, LAYOUT, 1.0))
        u = os.path.join(env.dir, "u.safetensors")
        st_write(u, random_tensors(1, LAYOUT, 0.1))
        slow = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_update.sh")
        fast = ["--update", u, "--examples", "1"]
        slow_args = ["--exec", "sh %s 2.5 %s" % (slow, u), "--examples", "1"]

        # 1. relative state dir; a 2.5 s training callback against a 1 s idle timeout
        srv = server(env, env.dir, "state", 1, "a.log")
        c1 = env.start_client(1, fast)
        c2 = env.start_client(2, slow_args)
        t.ok(wait(srv, 60, "cohortd") == 0, "round 1 completes")
        wait(c1, 20, "client 1")
        wait(c2, 20, "client 2")
        db = env.db()
        st = [r[0] for r in db.execute("SELECT status FROM participation WHERE round=1")]
        t.ok(sorted(st) == ["accepted", "accepted"],
             "a client training longer than the idle timeout is not dropped (%s)" % st)
        ck = db.execute("SELECT checkpoint FROM rounds WHERE round=1").fetchone()[0]
        t.ok(not os.path.isabs(ck), "checkpoint path stored relative to the state dir (%s)" % ck)
        db.close()

        # 2. restart from another working directory; SIGTERM while round 2 is half answered
        srv = server(env, "/", env.state, 2, "b.log")
        c1 = env.start_client(1, fast)
        c2 = env.start_client(2, slow_args)
        log = os.path.join(env.dir, "b.log")
        end = time.time() + 20
        while time.time() < end and "resuming after round 1" not in open(log).read():
            time.sleep(0.05)
        t.ok("resuming after round 1" in open(log).read(), "restart from / resumes after round 1")
        end = time.time() + 20
        db = env.db()
        while time.time() < end:
            n = db.execute("SELECT count(*) FROM clients").fetchone()[0]
            if "round 2: open" in open(log).read():
                break
            time.sleep(0.05)
        time.sleep(1.0)  # client 1 has answered, client 2 is still training
        srv.send_signal(signal.SIGTERM)
        t.ok(wait(srv, 20, "cohortd") == 0, "SIGTERM during an open round: clean exit 0")
        rounds = [r[0] for r in db.execute("SELECT round FROM rounds ORDER BY round")]
        t.ok(rounds == [0, 1], "the half-answered round 2 was not committed (%s)" % rounds)
        t.ok("SIGTERM" in open(log).read(), "the shutdown is logged with its cause")
        for c in (c1, c2):
            c.kill()
            c.wait()

        # 3. the next start redoes round 2
        srv = server(env, env.dir, "state", 2, "c.log")
        c1 = env.start_client(1, fast)
        c2 = env.start_client(2, fast)
        t.ok(wait(srv, 60, "cohortd") == 0, "restarted cohortd redoes round 2")
        rounds = [r[0] for r in db.execute("SELECT round FROM rounds ORDER BY round")]
        t.ok(rounds == [0, 1, 2], "rounds 0..2 committed once each (%s)" % rounds)
        wait(c1, 20, "client 1")
        wait(c2, 20, "client 2")
    finally:
        env.cleanup()
    t.done()


if __name__ == "__main__":
    main()
