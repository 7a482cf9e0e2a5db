"""libcohort against a server that misbehaves (a scripted TLS server written here
with Python's ssl module, speaking the framing by hand):
- a server that sends garbage, or announces a frame far beyond the limit, gets a
  clear client error and a clean non-zero exit, never a crash;
- a connection cut in the middle of a model download makes the client reconnect
  on its own and take part in the next offer (its update arrives intact)."""
import hashlib
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading

sys.path.insert(0, os.path.dirname(__file__))
from cohort_e2e import Check, Env, random_tensors, st_write  # noqa


def varint(v):
    out = b""
    while v >= 0x80:
        out += bytes([(v & 0x7F) | 0x80])
        v >>= 7
    return out + bytes([v])


def field(num, wt, payload):
    if wt == 0:
        return varint(num << 3) + varint(payload)
    return varint((num << 3) | 2) + varint(len(payload)) + payload


def frame(env_field, body):
    msg = field(env_field, 2, body)
    return struct.pack(">I", len(msg)) + msg


def welcome():
    return frame(2, field(1, 0, 1) + field(2, 2, b"client-1") + field(4, 2, b"fake")
                 + field(5, 0, 8 << 20) + field(6, 0, 15000))


def offer(rnd, data, nchunks):
    tinfo = field(1, 2, b"w") + field(2, 2, varint(len(data) // 4))
    body = (field(1, 0, rnd) + field(2, 2, tinfo) + field(3, 0, len(data)) + field(4, 0, nchunks)
            + field(5, 2, hashlib.sha256(data).digest()))
    return frame(3, body)


def chunk(rnd, idx, off, data):
    return frame(4, field(1, 0, rnd) + field(2, 0, idx) + field(3, 0, off) + field(15, 2, data))


def read_frame(s):
    hdr = b""
    while len(hdr) < 4:
        b = s.recv(4 - len(hdr))
        if not b:
            return None
        hdr += b
    (n,) = struct.unpack(">I", hdr)
    body = b""
    while len(body) < n:
        b = s.recv(n - len(body))
        if not b:
            return None
        body += b
    return body


class FakeServer:
    def __init__(self, env, script):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.ctx.load_cert_chain(os.path.join(env.certs, "server.pem"), os.path.join(env.certs, "server.key"))
        self.ctx.load_verify_locations(os.path.join(env.certs, "ca.pem"))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.script = script
        self.log = []
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        for step in self.script:
            try:
                raw, _ = self.sock.accept()
                raw.settimeout(20)
                s = self.ctx.wrap_socket(raw, server_side=True)
                hello = read_frame(s)
                self.log.append(("hello", hello is not None and hello[0] >> 3 == 1))
                step(self, s)
                try:
                    s.close()
                except OSError:
                    pass
            except Exception as e:  # the scripted misbehaviour may make the peer go away
                self.log.append(("error", repr(e)))
        self.sock.close()  # later attempts are refused at once


def run_client(env, port, update, extra):
    c, k = env.cert(1)
    args = [env.cohort, "client", "--server", "127.0.0.1:%d" % port, "--ca",
            os.path.join(env.certs, "ca.pem"), "--cert", c, "--key", k, "--update", update,
            "--examples", "3", "--retry-ms", "50:200"] + extra
    return subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)


def after_welcome(env, update, junk, *words):
    """A server that sends Welcome and then junk, on each of two connections;
    -> (the client's result with --max-attempts 2, its output lines that name
    any of words, case-insensitive)."""
    def step(srv, s):
        s.sendall(welcome())
        s.sendall(junk)

    srv = FakeServer(env, [step, step])
    r = run_client(env, srv.port, update, ["--max-attempts", "2"])
    said = [l for l in r.stdout.splitlines() if any(w in l.lower() for w in words)]
    return r, said


def main():
    t = Check("e2e-client-robustness")
    env = Env(os.environ.get("COHORT_BUILD", "build"), nclients=1, name="clrob")
    try:
        update = os.path.join(env.dir, "u.safetensors")
        st_write(update, random_tensors(3, [("w", [3000])], 0.1))
        data = struct.pack("<3000f", *[0.001 * i for i in range(3000)])

        r, said = after_welcome(env, update, b"\x00\x00\x00\x07garbage", "malformed", "decode")
        t.ok(r.returncode == 1, "garbage from the server: clean exit 1, no crash (got %d)" % r.returncode)
        t.ok(len(said) >= 1, "the client says the server's frame was malformed: %s" % said[:1])

        r, said = after_welcome(env, update, b"\x7f\xff\xff\xff", "exceed", "too big", "limit")
        t.ok(r.returncode == 1, "a 2 GiB frame announcement: clean exit 1 (got %d)" % r.returncode)
        t.ok(len(said) >= 1, "the client names the size limit: %s" % said[:1])

        got = {}

        def cut_mid_download(srv, s):
            s.sendall(welcome())
            s.sendall(offer(1, data, 3))
            s.sendall(chunk(1, 0, 0, data[:4000]))
            s.shutdown(socket.SHUT_RDWR)  # gone after the first of three chunks

        def full_round(srv, s):
            s.sendall(welcome())
            s.sendall(offer(2, data, 3))
            for i, off in enumerate((0, 4000, 8000)):
                s.sendall(chunk(2, i, off, data[off:off + 4000]))
            kinds, payload = [], b""
            while True:
                f = read_frame(s)
                if f is None:
                    break
                kinds.append(f[0] >> 3)
                if f[0] >> 3 == 6:
                    payload += f
                if f[0] >> 3 in (7, 9):
                    break
            got["kinds"] = kinds
            s.sendall(frame(8, field(1, 0, 2) + field(2, 0, 1)))
            s.sendall(frame(11, field(1, 2, b"done") + field(2, 0, 2) + field(3, 0, 1)))
            read_frame(s)

        srv = FakeServer(env, [cut_mid_download, full_round])
        r = run_client(env, srv.port, update, ["--max-attempts", "5"])
        t.ok(r.returncode == 0, "after a cut mid-download the client reconnects and ends cleanly (%d): %s"
             % (r.returncode, r.stdout.strip()[-200:]))
        t.ok(sum(1 for k, v in srv.log if k == "hello" and v) == 2,
             "it said Hello again on a new connection (%s)" % srv.log)
        kinds = got.get("kinds", [])
        t.ok(kinds[:1] == [5] and kinds[-1:] == [7] and all(k in (5, 6, 7, 13) for k in kinds),
             "it took part in the next offer: UpdateBegin, chunks, UpdateEnd (%s)" % kinds)
    finally:
        env.cleanup()
    t.done()


if __name__ == "__main__":
    main()
