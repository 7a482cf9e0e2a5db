"""End to end: frames sent while a model download has stalled part-way through a chunk.

cohortd streams the model in 16 KiB slices and stops while a client's socket is full. A
RoundResult (or an Error, a RunEnd, a GossipAck) sent at that moment must go after the
chunk being streamed, never inside it. Here one client (tests/e2e/hostile.c, mode
slowread, with a 32 KiB receive buffer) takes the round offer of a 16 MB model sent in
1 MiB chunks, then reads nothing for 3 s. The round (1 s deadline) ends meanwhile and its
RoundResult goes out while the stream is stalled mid-chunk (15 times in 16 at least). The
client then reads on: every frame must decode, the chunks must be contiguous, the model
must match the offer's XXH3-128, and the RoundResult must have arrived. cohortd then runs
round 2 and exits 0."""
import os
import struct
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from cohort_e2e import Check, Env, wait  # noqa

ROWS, COLS = 4000, 1000     # 16 MB: more than the server's socket buffer can absorb


def write_model(path):
    pattern = struct.pack("<1000f", *[((i * 37) % 1000 - 500) * 1e-3 for i in range(1000)])
    data = pattern * (ROWS * COLS // 1000)
    h = ('{"w":{"dtype":"F32","shape":[%d,%d],"data_offsets":[0,%d]}}' % (ROWS, COLS, len(data))).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


def main():
    t = Check("e2e-midstream")
    hostile = os.environ.get("COHORT_HOSTILE")
    env = Env(os.environ.get("COHORT_BUILD", "build"), nclients=2, name="midstream")
    try:
        init = os.path.join(env.dir, "init.safetensors")
        write_model(init)
        srv = env.start_server(init, ["--rounds", "2", "--min-clients", "1", "--round-timeout", "1",
                                      "--chunk-bytes", str(1 << 20),
                                      "--max-frame-bytes", str(2 << 20)])
        cert, key = env.cert(1)
        out = subprocess.run([hostile, "slowread", "--server", "127.0.0.1:%d" % env.port,
                              "--ca", os.path.join(env.certs, "ca.pem"), "--cert", cert, "--key", key,
                              "--count", "3000", "--timeout-ms", "30000"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
        print("\n".join("# " + l for l in out.stdout.strip().splitlines()))
        t.ok(out.returncode == 0 and "PASS" in out.stdout,
             "the RoundResult and the rest of the model arrive as whole frames after a stall "
             "(%s)" % (out.stdout.strip().splitlines() or ["no output"])[-1])
        t.ok("result round=1" in out.stdout, "the client saw round 1's RoundResult")
        t.ok(wait(srv, 60, "cohortd") == 0, "cohortd finishes both rounds and exits 0")
        t.ok("round 1: deadline" in env.log(), "round 1 ended at its deadline during the stall")

        # Offers carry model_sha256 only for clients that do not announce XXH3. The state
        # dir resumes after round 2, so this server runs round 3 with both clients offered.
        srv = env.start_server(init, ["--rounds", "3", "--min-clients", "2",
                                      "--round-timeout", "2", "--chunk-bytes", str(1 << 20),
                                      "--max-frame-bytes", str(2 << 20)])
        procs = []
        for i, flag in ((1, ["--accepts-xxh3"]), (2, [])):
            cert, key = env.cert(i)
            procs.append((flag, subprocess.Popen(
                [hostile, "offersums", "--server", "127.0.0.1:%d" % env.port,
                 "--ca", os.path.join(env.certs, "ca.pem"), "--cert", cert, "--key", key,
                 "--timeout-ms", "30000"] + flag,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        for flag, p in procs:
            text = p.communicate(timeout=120)[0]
            print("\n".join("# " + l for l in text.strip().splitlines()))
            t.ok(p.returncode == 0 and "PASS" in text,
                 "offer checksums for a client %s Hello.accepts_xxh3: %s" % (
                     "with" if flag else "without", (text.strip().splitlines() or ["-"])[-1]))
        t.ok(wait(srv, 60, "cohortd") == 0, "cohortd finishes round 3 and exits 0")
    finally:
        env.cleanup()
    t.done()


if __name__ == "__main__":
    main()
