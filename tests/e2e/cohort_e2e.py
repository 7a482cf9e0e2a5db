"""Helpers for cohort's end-to-end tests: real cohortd and cohort client
processes on 127.0.0.1 with real TLS and a real SQLite store. Python standard
library only (Debian's python3), so the tests run on a fresh machine."""
import json
import os
import random
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time


def st_write(path, tensors):
    """tensors: list of (name, shape, flat list of floats) -> safetensors F32."""
    header, blobs, off = {}, [], 0
    for name, shape, vals in tensors:
        n = 1
        for d in shape:
            n *= d
        assert len(vals) == n, name
        b = struct.pack("<%df" % n, *vals)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def st_read(path):
    """-> dict name -> (shape, list of floats), in data order."""
    with open(path, "rb") as f:
        data = f.read()
    (hl,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hl])
    header.pop("__metadata__", None)
    out = {}
    base = 8 + hl
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        b, e = info["data_offsets"]
        n = (e - b) // 4
        out[name] = (info["shape"], list(struct.unpack("<%df" % n, data[base + b:base + e])))
    return out


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Env:
    """A scratch directory with certificates and the built binaries."""

    def __init__(self, build_dir, nclients=3, name="e2e"):
        self.build = os.path.abspath(build_dir)
        self.cohort = os.path.join(self.build, "client", "cli", "cohort")
        self.cohortd = os.path.join(self.build, "server", "cohortd")
        self.dir = tempfile.mkdtemp(prefix="cohort-%s-" % name)
        self.certs = os.path.join(self.dir, "certs")
        self.state = os.path.join(self.dir, "state")
        self.port = free_port()
        self.procs = []
        run([self.cohort, "certs", "--out", self.certs, "--clients", str(nclients)], quiet=True)

    def cert(self, i):
        return os.path.join(self.certs, "client-%d.pem" % i), os.path.join(self.certs, "client-%d.key" % i)

    def start_server(self, model=None, extra=(), log="cohortd.log"):
        wrap = os.environ.get("COHORT_SERVER_WRAP", "").split()
        args = wrap + [self.cohortd, "--listen", "127.0.0.1:%d" % self.port, "--state-dir", self.state,
                "--ca", os.path.join(self.certs, "ca.pem"),
                "--cert", os.path.join(self.certs, "server.pem"),
                "--key", os.path.join(self.certs, "server.key"), "--log-level", "info"]
        if model:
            args += ["--model", model]
        args += list(extra)
        logf = open(os.path.join(self.dir, log), "a")
        p = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT)
        self.procs.append(p)
        wait_port(self.port, p, timeout=60 if wrap else 15)
        return p

    def start_client(self, i, extra, ca=None, cert=None, key=None, log=None):
        c, k = self.cert(i)
        args = [self.cohort, "client", "--server", "127.0.0.1:%d" % self.port,
                "--ca", ca or os.path.join(self.certs, "ca.pem"), "--cert", cert or c,
                "--key", key or k, "--retry-ms", "50:500"] + list(extra)
        logf = open(os.path.join(self.dir, log or "client-%d.log" % i), "a")
        p = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def model_files(self, layout, seeds, scale):
        """Writes init.safetensors (random_tensors seed 0, scale 1.0) and, for the
        i-th of seeds, u<i>.safetensors (random_tensors(seed, layout, scale)), i from 1;
        -> (the init path, the update paths)."""
        init = os.path.join(self.dir, "init.safetensors")
        st_write(init, random_tensors(0, layout, 1.0))
        ups = []
        for i, seed in enumerate(seeds, 1):
            p = os.path.join(self.dir, "u%d.safetensors" % i)
            st_write(p, random_tensors(seed, layout, scale))
            ups.append(p)
        return init, ups

    def other_ca(self):
        """A second CA with one client certificate, in <dir>/other; -> that directory."""
        other = os.path.join(self.dir, "other")
        run([self.cohort, "certs", "--out", other, "--clients", "1"], quiet=True)
        return other

    def db(self):
        return sqlite3.connect(os.path.join(self.state, "cohort.db"))

    def checkpoint(self, r):
        return os.path.join(self.state, "checkpoints", "round-%06d.safetensors" % r)

    def log(self, name="cohortd.log"):
        with open(os.path.join(self.dir, name)) as f:
            return f.read()

    def cleanup(self):
        kill_all(self.procs)


def kill_all(procs):
    """Kills and reaps those of procs (Popen objects) still running."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def run(args, quiet=False, check=True, **kw):
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError("%s failed (%d): %s %s" % (args, r.returncode, r.stdout, r.stderr))
    if not quiet and r.stdout:
        sys.stdout.write(r.stdout)
    return r


def wait_port(port, proc, timeout=15):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError("cohortd exited with %s before listening" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("cohortd did not listen on %d" % port)


def wait(proc, timeout, what):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("%s did not finish within %d s" % (what, timeout))


def rel_err(a, b):
    num = sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5
    den = max(sum(y * y for y in b) ** 0.5, 1e-30)
    return num / den


def flat(model):
    out = []
    for _, (shape, vals) in model.items():
        out.extend(vals)
    return out


def random_tensors(seed, layout, scale=0.1):
    rnd = random.Random(seed)
    out = []
    for name, shape in layout:
        n = 1
        for d in shape:
            n *= d
        out.append((name, shape, [rnd.gauss(0, scale) for _ in range(n)]))
    return out


class Check:
    def __init__(self, name):
        self.name = name
        self.failed = 0
        self.passed = 0

    def ok(self, cond, msg):
        if cond:
            self.passed += 1
            print("ok - %s" % msg)
        else:
            self.failed += 1
            print("not ok - %s" % msg)
        return cond

    def done(self):
        print("%s: %d passed, %d failed" % (self.name, self.passed, self.failed))
        sys.exit(1 if self.failed or not self.passed else 0)
