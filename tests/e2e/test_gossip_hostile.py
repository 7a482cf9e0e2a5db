"""End to end: a hand-written peer (Python ssl + protobuf encoded by hand) talks to
one cohortd --mode gossip and sends bad pushes. Each is refused with a GossipAck
naming the problem and never reaches a merge; frames that break the stream close
the link with a fatal Error; a good push is accepted and merged (--merge-after 1)
and its peer sample lands in the peers table."""
import hashlib
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from cohort_e2e import Check, free_port, run, st_write, wait_port  # noqa

LAYOUT = [("w", [2, 3]), ("b", [3])]


# ---- protobuf, by hand ----
def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def fv(num, n):
    return varint(num << 3) + varint(n)


def fb(num, data):
    if isinstance(data, str):
        data = data.encode()
    return varint((num << 3) | 2) + varint(len(data)) + data


def env(num, body):
    e = fb(num, body)
    return struct.pack(">I", len(e)) + e


def read_varint(b, i):
    n = s = 0
    while True:
        c = b[i]
        i += 1
        n |= (c & 0x7F) << s
        s += 7
        if not c & 0x80:
            return n, i


def fields(b):
    i, out = 0, []
    while i < len(b):
        key, i = read_varint(b, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = read_varint(b, i)
        elif wt == 2:
            n, i = read_varint(b, i)
            v = b[i:i + n]
            i += n
        elif wt == 1:
            v = b[i:i + 8]
            i += 8
        elif wt == 5:
            v = b[i:i + 4]
            i += 4
        out.append((num, v))
    return out


def push_msg(rnd, layout, data, chunk_count=1, sha=None, total=None, peers=()):
    tensors = b"".join(fb(2, fb(1, name) + fb(2, b"".join(varint(d) for d in shape)))
                       for name, shape in layout)
    body = (fv(1, rnd) + tensors + fv(3, total if total is not None else len(data)) +
            fv(4, chunk_count) + fb(5, sha if sha is not None else hashlib.sha256(data).digest()) +
            b"".join(fb(7, fb(1, a) + fb(2, n)) for a, n in peers))
    return env(14, body)


def chunk(rnd, index, offset, data):
    return env(4, fv(1, rnd) + fv(2, index) + fv(3, offset) + fb(15, data))


class Peer:
    def __init__(self, port, certs, name="peer-2"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(os.path.join(certs, "ca.pem"))
        ctx.load_cert_chain(os.path.join(certs, name + ".pem"), os.path.join(certs, name + ".key"))
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.buf = b""
        self.send(env(1, fv(1, 1) + fb(4, "peer")))
        num, body = self.recv()
        assert num == 2, "expected Welcome, got body %d" % num

    def send(self, b):
        self.s.sendall(b)

    def recv(self):
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack(">I", self.buf[:4])
                if len(self.buf) >= 4 + n:
                    e, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    num, body = fields(e)[0]
                    return num, body
            d = self.s.recv(65536)
            if not d:
                return None, None
            self.buf += d

    def ack(self):
        num, body = self.recv()
        assert num == 15, "expected GossipAck, got body %s" % num
        f = dict(fields(body))
        return bool(f.get(2, 0)), f.get(3, b"").decode()

    def error(self):
        try:
            num, body = self.recv()
        except (OSError, ssl.SSLError) as e:
            return "connection error %s" % e
        if num != 12:
            return "body %s instead of an Error" % num
        f = dict(fields(body))
        code = f.get(1, 0)
        if code >= 1 << 63:  # int32 travels as a 64-bit two's complement varint
            code -= 1 << 64
        return code, f.get(2, b"").decode(), f.get(4, 0)


def floats(vals):
    return struct.pack("<%df" % len(vals), *vals)


def main():
    t = Check("e2e-gossip-hostile")
    build = os.path.abspath(os.environ.get("COHORT_BUILD", "build"))
    cohort = os.path.join(build, "client", "cli", "cohort")
    cohortd = os.path.join(build, "server", "cohortd")
    d = tempfile.mkdtemp(prefix="cohort-gossip-hostile-")
    certs = os.path.join(d, "certs")
    run([cohort, "certs", "--out", certs, "--peers", "2"], quiet=True)
    model = os.path.join(d, "m.safetensors")
    st_write(model, [("w", [2, 3], [0.1, -0.2, 0.3, -0.4, 0.5, -0.6]), ("b", [3], [0, 0, 0])])
    port = free_port()
    log = os.path.join(d, "node.log")
    p = subprocess.Popen([cohortd, "--mode", "gossip", "--listen", "127.0.0.1:%d" % port,
                          "--state-dir", os.path.join(d, "state"),
                          "--ca", os.path.join(certs, "ca.pem"),
                          "--cert", os.path.join(certs, "peer-1.pem"),
                          "--key", os.path.join(certs, "peer-1.key"), "--model", model,
                          "--merge-after", "1", "--durability", "relaxed", "--log-level", "info"],
                         stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        wait_port(port, p)
        good = floats([1, 2, 3, 4, 5, 6, 0.5, 0.5, 0.5])
        c = Peer(port, certs)
        c.send(push_msg(7, [("w", [3, 2]), ("b", [3])], good) + chunk(7, 0, 0, good))
        ok, why = c.ack()
        t.ok(not ok and "shape" in why, "wrong shape refused: %s" % why)
        c.send(push_msg(8, [("x", [2, 3]), ("b", [3])], good) + chunk(8, 0, 0, good))
        ok, why = c.ack()
        t.ok(not ok and "'x'" in why, "wrong tensor name refused: %s" % why)
        c.send(push_msg(9, LAYOUT, good, total=32) + chunk(9, 0, 0, good))
        ok, why = c.ack()
        t.ok(not ok and "total_bytes" in why, "wrong size refused: %s" % why)
        bad = floats([1, 2, float("nan"), 4, 5, 6, 0, 0, 0])
        c.send(push_msg(10, LAYOUT, bad) + chunk(10, 0, 0, bad))
        ok, why = c.ack()
        t.ok(not ok and "NaN" in why, "NaN refused: %s" % why)
        c.send(push_msg(11, LAYOUT, good, sha=b"\0" * 32) + chunk(11, 0, 0, good))
        ok, why = c.ack()
        t.ok(not ok and "sha256" in why, "wrong sha256 refused: %s" % why)
        c.send(push_msg(12, LAYOUT, good, chunk_count=2) + chunk(12, 0, 0, good[:16]) +
               chunk(12, 1, 16, good[16:]))
        ok, why = c.ack()
        t.ok(ok, "a good push in two chunks is accepted")
        c.send(push_msg(13, LAYOUT, good, peers=[("127.0.0.1:9", "peer-9")]) +
               chunk(13, 0, 0, good))
        ok, why = c.ack()
        t.ok(ok, "a second good push is accepted")
        # The push must be taken (not refused as busy while the last merge runs) for the
        # bad chunk to meet a reception in progress: a busy refusal comes back at once.
        for rnd in range(14, 40):
            c.send(push_msg(rnd, LAYOUT, good, chunk_count=1))
            c.s.settimeout(0.5)
            try:
                c.ack()
                time.sleep(0.2)
                continue
            except (socket.timeout, ssl.SSLError, TimeoutError):
                pass
            finally:
                c.s.settimeout(10)
            break
        c.send(chunk(rnd, 0, 8, good))
        e = c.error()
        t.ok(isinstance(e, tuple) and e[0] == -4001 and e[2] == 1,
             "a chunk at the wrong offset closes the link with a fatal EFRAME: %s" % (e,))
        c2 = Peer(port, certs)
        c2.send(chunk(15, 0, 0, good))
        e = c2.error()
        t.ok(isinstance(e, tuple) and e[0] == -4013 and e[2] == 1,
             "a ModelChunk without a push gets a fatal ESTATE: %s" % (e,))
        time.sleep(1.5)
        p.send_signal(signal.SIGTERM)
        t.ok(p.wait(timeout=20) == 0, "node exits 0 on SIGTERM")
        import sqlite3
        db = sqlite3.connect(os.path.join(d, "state", "cohort.db"))
        merges = db.execute("SELECT peers, models FROM merges ORDER BY id").fetchall()
        peers = [a for (a,) in db.execute("SELECT address FROM peers")]
        db.close()
        t.ok(merges == [("peer-2", 1), ("peer-2", 1)],
             "only the two good pushes were merged: %s" % merges)
        t.ok("127.0.0.1:9" in peers, "the pushed peer sample entered the peers table: %s" % peers)
        text = open(log).read()
        t.ok(text.count("push refused") == 5, "each refusal is logged once")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if not t.failed:
        shutil.rmtree(d, ignore_errors=True)
    t.done()


if __name__ == "__main__":
    main()
