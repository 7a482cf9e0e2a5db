"""End to end: a free upload slot goes to an upload that has arrived, not to the
longest-waiting one. cohortd runs with one slot (--max-uploads 1). Three hostile
clients answer the round with honest updates (tests/e2e/hostile.c, mode trickle):
H begins first and trickles its update over 2 s, so it holds the slot; S begins
0.3 s later and trickles over 4 s; F begins 0.6 s later and sends everything at
once. When H's upload ends, S has waited longer but F's update is all in cohortd's
socket buffer: F must get the slot (and its ack) while S is still sending, and S
must still be taken after it. Handing slots out first come, first served made F
wait for S's slow upload. The model (32 KiB of update) fits the initial TCP receive
buffer, so an upload sent at once arrives whole while it waits. cohortd's debug log
says which rule gave each slot; the clients' clocks (CLOCK_MONOTONIC, one per host)
say when each was sent and acknowledged."""
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from cohort_e2e import Check, Env, st_write, random_tensors, wait  # noqa

LAYOUT = [("w", [64, 128])]
GRANT_MAX_PASSES = 32


def run_round(t, hostile, plan, name):
    """One round with --max-uploads 1 and one hostile trickle client per plan entry
    (name -> (delay ms, spread ms)); -> ({name: {begin, sent, acked}}, [(client, why)]
    in the order cohortd gave slots to waiting uploads), and Env.cleanup()."""
    env = Env(os.environ.get("COHORT_BUILD", "build"), nclients=len(plan), name=name)
    try:
        init = os.path.join(env.dir, "init.safetensors")
        st_write(init, random_tensors(0, LAYOUT, 1.0))
        srv = env.start_server(init, ["--rounds", "1", "--min-clients", str(len(plan)),
                                      "--max-uploads", "1", "--round-timeout", "60",
                                      "--log-level", "debug"])
        procs, cn = {}, {}
        for i, (who, (delay, spread)) in enumerate(plan.items(), 1):
            cert, key = env.cert(i)
            cn["client-%d" % i] = who
            procs[who] = subprocess.Popen(
                [hostile, "trickle", "--server", "127.0.0.1:%d" % env.port,
                 "--ca", os.path.join(env.certs, "ca.pem"), "--cert", cert, "--key", key,
                 "--model-layout-from-offer", "--timeout-ms", "30000",
                 "--send-delay-ms", str(delay), "--count", str(spread)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        times, failed = {}, []
        for who, p in procs.items():
            out, _ = p.communicate(timeout=120)
            got = dict(re.findall(r"^trickle (begin|sent|acked) t=([\d.]+)$", out, re.M))
            times[who] = {k: float(v) for k, v in got.items()}
            if p.returncode != 0 or "acked" not in got:
                failed.append(who)
                print("\n".join("# %s: %s" % (who, l) for l in out.strip().splitlines()))
        t.ok(not failed, "%s: every update is accepted (not: %s)" % (name, failed))
        t.ok(wait(srv, 60, "cohortd") == 0, "%s: cohortd completes the round and exits 0" % name)
        grants = [(cn.get(c, c), why) for c, why in re.findall(
            r"CN=(client-\d+),.*: upload slot after \d+ ms: (.*)$", env.log(), re.M)]
        print("\n".join("# %s: slot to %s: %s" % (name, c, why) for c, why in grants))
        rows = env.db().execute("SELECT status FROM participation WHERE round = 1").fetchall()
        t.ok(sorted(r[0] for r in rows) == ["accepted"] * len(plan),
             "%s: all %d are accepted in round 1" % (name, len(plan)))
        return times, grants
    finally:
        env.cleanup()


def held_upload(t, hostile):
    """A libcohort client (`cohort client --exec`) whose upload must wait while a
    trickling client holds the only slot: 16 MiB, far more than the kernel buffers
    of a paused socket hold, so its sends stop part-way (libcohort gathers an
    update's records 64 KiB at a time and retries a gathered block the socket
    refused) and go on when the slot frees. cohortd checks the update's XXH3 over
    every byte it received, so the acceptance says the bytes arrived in order."""
    env = Env(os.environ.get("COHORT_BUILD", "build"), nclients=2, name="held-upload")
    try:
        shape, n = [4096, 1024], 4096 * 1024
        init = os.path.join(env.dir, "init.safetensors")
        upd = os.path.join(env.dir, "u.safetensors")
        st_write(init, [("w", shape, [0.0] * n)])
        st_write(upd, [("w", shape, [0.001 * (i % 7) for i in range(n)])])
        srv = env.start_server(init, ["--rounds", "1", "--min-clients", "2",
                                      "--max-uploads", "1", "--round-timeout", "120",
                                      "--log-level", "debug"])
        cert, key = env.cert(1)
        h = subprocess.Popen(
            [hostile, "trickle", "--server", "127.0.0.1:%d" % env.port,
             "--ca", os.path.join(env.certs, "ca.pem"), "--cert", cert, "--key", key,
             "--model-layout-from-offer", "--timeout-ms", "60000",
             "--send-delay-ms", "0", "--count", "3000"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        slow = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_update.sh")
        u = env.start_client(2, ["--exec", "sh %s 0.5 %s" % (slow, upd), "--examples", "10"])
        out, _ = h.communicate(timeout=120)
        t.ok(h.returncode == 0, "held-upload: the trickling client's update is accepted")
        t.ok(wait(srv, 120, "cohortd") == 0, "held-upload: cohortd completes the round")
        t.ok(wait(u, 30, "client") == 0, "held-upload: the libcohort client exits 0")
        waited = [int(ms) for ms in re.findall(
            r"CN=client-2,.*: upload slot after (\d+) ms", env.log())]
        t.ok(len(waited) == 1 and waited[0] >= 1000,
             "held-upload: the 16 MiB upload waited for the slot (%s ms)" % waited)
        rows = dict(env.db().execute(
            "SELECT c.name, p.status FROM participation p JOIN clients c ON c.id = p.client "
            "WHERE p.round = 1").fetchall())
        t.ok(rows.get("client-2") == "accepted",
             "held-upload: the held update arrived whole and was accepted (%s)" % rows)
    finally:
        env.cleanup()


def main():
    t = Check("e2e-upload-slots")
    hostile = os.environ.get("COHORT_HOSTILE")
    held_upload(t, hostile)

    times, grants = run_round(t, hostile, {"H": (0, 2000), "S": (300, 4000), "F": (600, 0)},
                              "arrived-first")
    h, s, f = times["H"], times["S"], times["F"]
    if all("acked" in x and "begin" in x for x in (h, s, f)):
        t.ok(h["begin"] < s["begin"] < f["begin"],
             "the uploads began in the order H, S, F (%.2f, %.2f, %.2f s)" %
             (0, s["begin"] - h["begin"], f["begin"] - h["begin"]))
        t.ok(f["acked"] < s["sent"] - 0.5,
             "F got the slot when H's upload ended, before S finished sending "
             "(F acked %.2f s, S sent its last byte %.2f s after H's ack)" %
             (f["acked"] - h["acked"], s["sent"] - h["acked"]))
        t.ok(s["acked"] > f["acked"], "S, slower, was taken after F")
    t.ok([c for c, _ in grants] == ["F", "S"],
         "after H, the slot went to F, then to S (got %s)" % [c for c, _ in grants])
    t.ok(grants[:1] == [("F", "its upload has arrived")],
         "F got it because its upload had arrived, although S had waited longer")

    # Bounded passing over: S must not wait behind every fast upload that comes.
    nfast = GRANT_MAX_PASSES + 2
    plan = {"H": (0, 2000), "S": (300, 6000)}
    plan.update(("F%d" % k, (600, 0)) for k in range(nfast))
    times, grants = run_round(t, hostile, plan, "passed-over")
    order = [c for c, _ in grants]
    t.ok(len(order) == nfast + 1 and order.index("S") == GRANT_MAX_PASSES,
         "S got the slot after %d fast uploads went before it (at %s of %s)" %
         (GRANT_MAX_PASSES, order.index("S") if "S" in order else None, len(order)))
    t.ok("S" in order and "passed over %d times" % GRANT_MAX_PASSES in grants[order.index("S")][1],
         "cohortd says why: S was passed over %d times" % GRANT_MAX_PASSES)
    if "acked" in times["S"]:
        t.ok(sum(1 for k in range(nfast) if times["F%d" % k].get("acked", 0) > times["S"]["acked"])
             == nfast - GRANT_MAX_PASSES,
             "the last %d fast uploads waited for S" % (nfast - GRANT_MAX_PASSES))
    t.done()


if __name__ == "__main__":
    main()
