"""Edge devices in a real federation: cross-built edge_client programs run under
qemu-user against a native cohortd on 127.0.0.1 (driven by test_edge.sh, which
builds them and passes the commands in the environment).

For each target (EDGE_TARGETS="x86_64 arm64 armhf", command in EDGE_CMD_<target>,
e.g. "qemu-aarch64 /tmp/.../edge_client"; the build machine's own build runs too,
as the reference):
  1. exact: two emulated clients send fixed updates (raw float32, n = 100 and 300)
     for 3 rounds of FedAvg; every checkpoint must equal x + sum(n_i d_i)/sum(n_i)
     (relative error < 1e-5) and cohortd must exit 0. The model is 8224 floats in
     4 KiB chunks both ways, so offsets and chunking are exercised.
  2. train: one emulated client trains a softmax regression on a CSV for 3 rounds;
     its loss must fall and the final global model must classify the data.
  3. footprint: one round with a 100,100-parameter model (weight [100,1000]) and
     200 examples; prints the client's peak RSS (VmHWM, reported by edge_client)
     and its peak private memory (RssAnon, sampled here). Under qemu both figures
     are the emulator process's, guest memory included.
Figures are printed as '# ' lines for docs/edge.md."""
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
from cohort_e2e import Check, Env, flat, random_tensors, rel_err, st_read, st_write, wait  # noqa: E402

EXACT_LAYOUT = [("fc.weight", [32, 256]), ("fc.bias", [32])]
EXAMPLES = [100, 300]
ROUNDS = 3
# qemu-user is slow at TLS handshakes and float loops; give rounds room.
ROUND_TIMEOUT = "120"


def f32(vals):
    """Rounds Python floats to float32, as the files hold them."""
    return list(struct.unpack("<%df" % len(vals), struct.pack("<%df" % len(vals), *vals)))


def write_f32(path, vals):
    with open(path, "wb") as f:
        f.write(struct.pack("<%df" % len(vals), *vals))


def gauss_tensors(seed, layout, scale):
    """random_tensors rounded to float32, so they compare with what files hold."""
    return [(name, shape, f32(vals)) for name, shape, vals in random_tensors(seed, layout, scale)]


def blobs_csv(path, seed, n, d, classes, spread=0.6):
    """Gaussian blobs around random class centres: separable, like sensor classes."""
    rnd = random.Random(seed)
    centres = [[rnd.gauss(0, 1.5) for _ in range(d)] for _ in range(classes)]
    rows = []
    with open(path, "w") as f:
        f.write("# label,x1..x%d\n" % d)
        for i in range(n):
            y = i % classes
            x = [c + rnd.gauss(0, spread) for c in centres[y]]
            rows.append((y, x))
            f.write("%d,%s\n" % (y, ",".join("%.5f" % v for v in x)))
    return rows


def start_edge(env, cmd, i, extra, log):
    cert, key = env.cert(i)
    args = list(cmd) + ["--server", "127.0.0.1:%d" % env.port,
                        "--ca", os.path.join(env.certs, "ca.pem"), "--cert", cert, "--key", key,
                        "--max-attempts", "50"] + list(extra)
    logf = open(os.path.join(env.dir, log), "w")
    p = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT)
    env.procs.append(p)
    return p


def done(t, env):
    """Stops what is left; keeps the directory (logs, state) when a check failed
    or an exception is on its way out."""
    env.cleanup()
    if t.failed or sys.exc_info()[0] is not None:
        print("# kept %s for inspection" % env.dir)
    else:
        shutil.rmtree(env.dir, ignore_errors=True)


def read(env, log):
    with open(os.path.join(env.dir, log)) as f:
        return f.read()


def wait_sampled(proc, timeout):
    """Waits for proc like wait(), sampling its RssAnon (private memory; the rest
    of the RSS is mostly shared library pages) every 5 ms. -> (rc, peak RssAnon KiB)."""
    end = time.time() + timeout
    anon = 0
    while proc.poll() is None:
        if time.time() > end:
            proc.kill()
            raise AssertionError("edge_client did not finish within %d s" % timeout)
        try:
            with open("/proc/%d/status" % proc.pid) as f:
                m = re.search(r"RssAnon:\s+(\d+) kB", f.read())
            if m:
                anon = max(anon, int(m.group(1)))
        except OSError:
            pass
        time.sleep(0.005)
    return proc.returncode, anon


def peak_rss(text):
    m = re.search(r"peak RSS (\d+) KiB", text)
    return int(m.group(1)) if m else None


def exact(t, build, target, cmd):
    env = Env(build, nclients=2, name="edge-exact-" + target)
    try:
        init = os.path.join(env.dir, "init.safetensors")
        st_write(init, gauss_tensors(0, EXACT_LAYOUT, 1.0))
        deltas = []
        for i in range(2):
            d = [v for _, _, vals in gauss_tensors(i + 1, EXACT_LAYOUT, 0.05) for v in vals]
            write_f32(os.path.join(env.dir, "u%d.f32" % (i + 1)), d)
            deltas.append(d)
        srv = env.start_server(init, ["--rounds", str(ROUNDS), "--min-clients", "2",
                                      "--round-timeout", ROUND_TIMEOUT, "--chunk-bytes", "4096"])
        clients = [start_edge(env, cmd, i + 1,
                              ["--update", os.path.join(env.dir, "u%d.f32" % (i + 1)),
                               "--examples", str(EXAMPLES[i]), "--chunk-bytes", "4096"],
                              "client-%d.log" % (i + 1)) for i in range(2)]
        rc = wait(srv, 300, "cohortd")
        t.ok(rc == 0, "%s: cohortd exits 0 after round %d with two edge_client members (rc %s)"
             % (target, ROUNDS, rc))
        for i, c in enumerate(clients):
            crc = wait(c, 60, "edge_client")
            out = read(env, "client-%d.log" % (i + 1))
            ok = crc == 0 and ("%d update(s) sent, %d accepted" % (ROUNDS, ROUNDS)) in out
            if not t.ok(ok, "%s: edge_client %d exits 0 with %d updates accepted"
                        % (target, i + 1, ROUNDS, )):
                sys.stdout.write("# client log:\n" + "".join("#   " + ln + "\n"
                                                             for ln in out.splitlines()[-15:]))
        x = flat(st_read(init))
        total = float(sum(EXAMPLES))
        step = [sum(EXAMPLES[i] * deltas[i][j] for i in range(2)) / total for j in range(len(x))]
        for r in range(1, ROUNDS + 1):
            x = [a + b for a, b in zip(x, step)]
            path = env.checkpoint(r)
            if not os.path.exists(path):
                t.ok(False, "%s: checkpoint %d exists" % (target, r))
                continue
            err = rel_err(flat(st_read(path)), x)
            t.ok(err < 1e-5, "%s: checkpoint %d equals x + sum(n d)/sum(n) (rel err %.2e)"
                 % (target, r, err))
        rows = env.db().execute("SELECT status FROM participation WHERE round > 0").fetchall()
        t.ok(len(rows) == 2 * ROUNDS and all(r[0] == "accepted" for r in rows),
             "%s: %d accepted participation rows" % (target, 2 * ROUNDS))
        if t.failed:
            sys.stdout.write("# cohortd log tail:\n" + "".join(
                "#   " + ln + "\n" for ln in env.log().splitlines()[-20:]))
    finally:
        done(t, env)


def train(t, build, target, cmd):
    env = Env(build, nclients=1, name="edge-train-" + target)
    try:
        classes, d = 3, 16
        data = os.path.join(env.dir, "data.csv")
        rows = blobs_csv(data, 7, 300, d, classes)
        init = os.path.join(env.dir, "init.safetensors")
        st_write(init, gauss_tensors(5, [("fc.weight", [classes, d]), ("fc.bias", [classes])], 0.01))
        srv = env.start_server(init, ["--rounds", str(ROUNDS), "--min-clients", "1",
                                      "--round-timeout", ROUND_TIMEOUT])
        c = start_edge(env, cmd, 1, ["--data", data, "--epochs", "1", "--lr", "0.02", "--seed", "3"],
                       "train.log")
        crc, anon = wait_sampled(c, 300)
        t.ok(wait(srv, 60, "cohortd") == 0, "%s: training run: cohortd exits 0" % target)
        t.ok(crc == 0, "%s: training client exits 0" % target)
        out = read(env, "train.log")
        losses = [float(v) for v in re.findall(r"epoch\(s\), loss ([0-9.eE+-]+)\n", out)]
        t.ok(len(losses) == ROUNDS and losses[-1] < losses[0],
             "%s: training loss falls over %d rounds (%s)"
             % (target, ROUNDS, ", ".join("%.4f" % v for v in losses)))
        path = env.checkpoint(ROUNDS)
        if os.path.exists(path):
            m = st_read(path)
            w, b = m["fc.weight"][1], m["fc.bias"][1]
            right = 0
            for y, x in rows:
                z = [b[c] + sum(w[c * d + j] * x[j] for j in range(d)) for c in range(classes)]
                right += z.index(max(z)) == y
            acc = right / float(len(rows))
            t.ok(acc > 0.9, "%s: the global model after round %d classifies %.1f%% of the "
                 "device's data" % (target, ROUNDS, 100 * acc))
        else:
            t.ok(False, "%s: checkpoint %d exists" % (target, ROUNDS))
        return peak_rss(out), anon
    finally:
        done(t, env)


def footprint(t, build, target, cmd, data, init):
    env = Env(build, nclients=1, name="edge-rss-" + target)
    try:
        srv = env.start_server(init, ["--rounds", "1", "--min-clients", "1",
                                      "--round-timeout", ROUND_TIMEOUT])
        c = start_edge(env, cmd, 1, ["--data", data, "--epochs", "1", "--lr", "0.01"], "rss.log")
        crc, anon = wait_sampled(c, 300)
        ok = wait(srv, 60, "cohortd") == 0 and crc == 0
        out = read(env, "rss.log")
        rss = peak_rss(out)
        t.ok(ok and rss is not None and "1 accepted" in out,
             "%s: one round with a 100,100-parameter model (peak RSS %s KiB)" % (target, rss))
        return rss, anon
    finally:
        done(t, env)


def main():
    build = os.environ.get("COHORT_BUILD", "build")
    targets = os.environ.get("EDGE_TARGETS", "").split()
    t = Check("edge-federation")
    scratch = Env(build, nclients=1, name="edge-data")
    try:
        # The 100k-parameter workload, shared by every target.
        big_data = os.path.join(scratch.dir, "big.csv")
        blobs_csv(big_data, 11, 200, 1000, 100, spread=1.0)
        big_init = os.path.join(scratch.dir, "big.safetensors")
        st_write(big_init, gauss_tensors(13, [("fc.weight", [100, 1000]), ("fc.bias", [100])],
                                         0.01))
        figures = []
        for target in targets:
            cmd = os.environ["EDGE_CMD_" + target].split()
            exact(t, build, target, cmd)
            small = train(t, build, target, cmd)
            big = footprint(t, build, target, cmd, big_data, big_init)
            how = "qemu-user" if os.path.basename(cmd[0]).startswith("qemu") else "native"
            figures.append(("%s (%s)" % (target, how), small, big))
        for name, small, big in figures:
            print("# rss %s: 51-parameter model: peak %s KiB (private %s KiB); "
                  "100,100-parameter model: peak %s KiB (private %s KiB)"
                  % (name, small[0], small[1], big[0], big[1]))
    finally:
        done(t, scratch)
    t.done()


if __name__ == "__main__":
    main()
