"""End to end: frames sent while a model download has stalled part-way through a chunk.

cohortd streams the model in 16 KiB slices and stops while a client's socket is full. A
RoundResult (or an Error, a RunEnd, a GossipAck) sent at that moment must go after the
chunk being streamed, never inside it. Here one client (tests/e2e/hostile.c, mode
slowread, with a 32 KiB receive buffer) takes the round offer of a 16 MB model sent in
1 MiB chunks, then reads nothing for 3 s. The round (1 s deadline) ends meanwhile and its
RoundResult goes out while the stream is stalled mid-chunk (15 times in 16 at least). The
client then reads on: every frame must decode, the chunks must be contiguous, the model
must match the offer's XXH3-128, and the RoundResult must have arrived. cohortd then runs
round 2 and exits 0. Meanwhile /metrics (cohort_send_queued_bytes) must show no more than
a chunk plus 128 KiB queued for the stalled client: round 2's offer waits for round 1's
stream instead of queueing the rest of that model, and at shutdown the client gets the
rest of its model before its RunEnd. A last run keeps the round open through the stall
and checks that the queue stays within 128 KiB (one burst block and the window)."""
import http.client
import os
import re
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from cohort_e2e import Check, Env, free_port, wait  # noqa

# A stalled reader holds at most one model burst block (64 KiB) of queued ciphertext
# besides its 16 KiB window and one 16.5 KiB record (docs/architecture.md).
QUEUED_MAX = 128 * 1024


def queued_bytes(port):
    """cohort_send_queued_bytes from cohortd's /metrics, None when unreadable."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/metrics")
        body = c.getresponse().read().decode()
        c.close()
    except OSError:
        return None
    m = re.search(r"^cohort_send_queued_bytes (\S+)$", body, re.M)
    return float(m.group(1)) if m else None


def watch_queue(p, http_port, seconds):
    """Scrapes cohort_send_queued_bytes every 0.1 s while p runs; -> the values."""
    seen = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and p.poll() is None:
        q = queued_bytes(http_port)
        if q is not None:
            seen.append(q)
        time.sleep(0.1)
    return seen


def stall_run(env, hostile, rounds, round_timeout):
    """cohortd (16 MB model in 1 MiB chunks, /metrics on) and one slowread client that
    stalls 3 s mid-model; the queue is scraped meanwhile. -> (cohortd, the client's exit
    code, its output, the queued-bytes values)."""
    init = os.path.join(env.dir, "init.safetensors")
    write_model(init)
    http_port = free_port()
    srv = env.start_server(init, ["--rounds", str(rounds), "--min-clients", "1",
                                  "--round-timeout", str(round_timeout),
                                  "--chunk-bytes", str(1 << 20),
                                  "--max-frame-bytes", str(2 << 20),
                                  "--http", "127.0.0.1:%d" % http_port])
    cert, key = env.cert(1)
    p = subprocess.Popen([hostile, "slowread", "--server", "127.0.0.1:%d" % env.port,
                          "--ca", os.path.join(env.certs, "ca.pem"), "--cert", cert,
                          "--key", key, "--count", "3000", "--timeout-ms", "30000"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = watch_queue(p, http_port, 2.5)
    out = p.communicate(timeout=120)[0]
    return srv, p.returncode, out, seen


def queue_bound(t, hostile):
    """While a client reads nothing in the middle of its model, cohortd queues a bounded
    amount for it (the stream stops at the socket), seen on /metrics. The round stays open
    through the stall (4 s deadline, 3 s stall), so nothing else is sent to the client."""
    env = Env(os.environ.get("COHORT_BUILD", "build"), nclients=1, name="midstream-queue")
    try:
        srv, rc, out, seen = stall_run(env, hostile, 1, 4)
        t.ok(rc == 0 and "PASS" in out,
             "queue bound: the stalled client gets its model whole afterwards (%s)"
             % (out.strip().splitlines() or ["no output"])[-1])
        t.ok(seen and 0 < max(seen) <= QUEUED_MAX,
             "queue bound: cohortd queued some ciphertext for the stalled client, at most "
             "%d KiB (max %s bytes over %d scrapes)" % (QUEUED_MAX // 1024,
                                                       max(seen) if seen else None, len(seen)))
        t.ok(wait(srv, 60, "cohortd") == 0, "queue bound: cohortd finishes the round, exits 0")
    finally:
        env.cleanup()

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
        # Round 2 opens during the stall: its offer waits for round 1's model, which is
        # not queued in memory meanwhile (it was: 12 MB of this 16 MB model).
        srv, rc, stdout, seen = stall_run(env, hostile, 2, 1)
        init = os.path.join(env.dir, "init.safetensors")
        print("\n".join("# " + l for l in stdout.strip().splitlines()))
        t.ok(rc == 0 and "PASS" in stdout,
             "the RoundResult and the rest of the model arrive as whole frames after a stall "
             "(%s)" % (stdout.strip().splitlines() or ["no output"])[-1])
        t.ok("result round=1" in stdout, "the client saw round 1's RoundResult")
        # A frame sent mid-chunk (the RoundResult) first finishes that chunk: 1 MiB here.
        bound = (1 << 20) + QUEUED_MAX
        t.ok(seen and max(seen) <= bound,
             "across the round change during the stall cohortd queued at most one chunk + "
             "%d KiB for the client (max %s bytes over %d scrapes)"
             % (QUEUED_MAX // 1024, max(seen) if seen else None, len(seen)))
        t.ok(wait(srv, 60, "cohortd") == 0, "cohortd finishes both rounds and exits 0")
        log = env.log()
        t.ok("round 1: deadline" in log, "round 1 ended at its deadline during the stall")
        t.ok("still downloading a model" in log,
             "at shutdown cohortd let the stalled client finish its model first")

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
    queue_bound(t, hostile)
    t.done()


if __name__ == "__main__":
    main()
