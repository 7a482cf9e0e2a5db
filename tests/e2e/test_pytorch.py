"""End to end with PyTorch: cohortd and two `cohort client --exec` processes that
run client/examples/pytorch/train.py on halves of a Fashion-MNIST slice, for two
FedAvg rounds. Then every checkpoint must equal the previous one plus the
example-weighted mean of the two updates, recomputed here by running train.py
again on the same inputs (single-threaded CPU SGD is deterministic); the final
model must beat the initial one on the test set; and `cohort export` must give a
file that PyTorch loads into the network.

Skipped (exit 77) when no Python with torch is installed (Debian: python3-torch)."""
import json
import os
import shlex
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from cohort_e2e import Check, Env, flat, rel_err, st_read, wait  # noqa

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "..", "..", "client", "examples", "pytorch", "train.py")
LIMIT = 2000
EXAMPLES = [1000, 1000]
TRAIN_ARGS = ["--limit", str(LIMIT), "--steps", "30", "--lr", "0.1"]
ROUNDS = 2


def torch_python():
    """The first interpreter that can import torch: this one, or Debian's."""
    seen = []
    for py in (os.environ.get("COHORT_TORCH_PYTHON"), sys.executable, "/usr/bin/python3"):
        if not py or py in seen or not os.path.exists(py):
            continue
        seen.append(py)
        r = subprocess.run([py, "-c", "import torch"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        if r.returncode == 0:
            return py
    return None


def train_cmd(py, part):
    return [py, os.path.abspath(TRAIN), "--partition", "%d/2" % part] + TRAIN_ARGS


def main():
    py = torch_python()
    if not py:
        print("SKIP: python3-torch not installed")
        sys.exit(77)
    t = Check("e2e-pytorch")
    env = Env(os.environ.get("COHORT_BUILD", "build"), nclients=2, name="pytorch")
    try:
        init = os.path.join(env.dir, "init.safetensors")
        r = subprocess.run([env.cohort, "init-model", "--arch", "mlp:32", "--seed", "3",
                            "--out", init], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        t.ok(r.returncode == 0, "init-model writes an MLP 784-32-10")
        srv = env.start_server(init, ["--rounds", str(ROUNDS), "--min-clients", "2",
                                      "--round-timeout", "240"])
        clients = []
        for i in (1, 2):
            cmd = " ".join(shlex.quote(a) for a in train_cmd(py, i))
            clients.append(env.start_client(i, ["--exec", cmd, "--examples",
                                                str(EXAMPLES[i - 1])]))
        t.ok(wait(srv, 280, "cohortd") == 0, "cohortd exits 0 after %d rounds" % ROUNDS)
        for i, c in enumerate(clients):
            t.ok(wait(c, 30, "client") == 0, "client %d exits 0" % (i + 1))

        db = env.db()
        rows = db.execute("SELECT round, status FROM participation ORDER BY round").fetchall()
        t.ok(rows == [(1, "accepted")] * 2 + [(2, "accepted")] * 2,
             "both PyTorch clients' updates accepted in both rounds (got %s)" % rows)
        for log in ("client-1.log", "client-2.log"):
            t.ok(env.log(log).count("train.py: round") == ROUNDS,
                 "%s shows train.py ran once per round" % log)

        # Recompute every round's updates with the same script and inputs, in one
        # Python process (importing torch is the slow part).
        tmp = tempfile.mkdtemp(dir=env.dir)
        jobs = []
        for rnd in range(1, ROUNDS + 1):
            for i in (1, 2):
                upd = os.path.join(tmp, "u%d-%d.safetensors" % (rnd, i))
                jobs.append([str(rnd)] + train_cmd(py, i)[2:] + [env.checkpoint(rnd - 1), upd])
        rerun = (
            "import json, os, sys\n"
            "sys.path.insert(0, os.path.dirname(sys.argv[1]))\n"
            "import train\n"
            "for job in json.loads(sys.argv[2]):\n"
            "    os.environ['COHORT_ROUND'] = job[0]\n"
            "    train.main(job[1:])\n")
        res = subprocess.run([py, "-c", rerun, os.path.abspath(TRAIN), json.dumps(jobs)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t.ok(res.returncode == 0 and res.stderr.count("train.py: round") == len(jobs),
             "train.py reruns every client's training of every round (%s)"
             % res.stderr.strip()[-300:])
        total = float(sum(EXAMPLES))
        for rnd in range(1, ROUNDS + 1):
            prev = flat(st_read(env.checkpoint(rnd - 1)))
            want = list(prev)
            for i in (1, 2):
                upd = os.path.join(tmp, "u%d-%d.safetensors" % (rnd, i))
                u = flat(st_read(upd)) if os.path.exists(upd) else [0.0] * len(prev)
                want = [w + EXAMPLES[i - 1] / total * d for w, d in zip(want, u)]
            got = flat(st_read(env.checkpoint(rnd)))
            err = rel_err(got, want)
            t.ok(err < 1e-5, "checkpoint %d = previous + weighted mean of the PyTorch updates "
                             "(rel err %.2e)" % (rnd, err))
            t.ok(rel_err(got, prev) > 1e-3, "round %d moved the model" % rnd)

        accs = []
        for rnd in (0, ROUNDS):
            r = subprocess.run([env.cohort, "eval", "--model", env.checkpoint(rnd)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            acc = float(r.stdout.split("accuracy=")[1].split()[0]) if "accuracy=" in r.stdout \
                else -1.0
            accs.append(acc)
        t.ok(accs[1] > accs[0] + 0.1, "test accuracy rises from %.3f to %.3f" % tuple(accs))

        out = os.path.join(env.dir, "final.safetensors")
        r = subprocess.run([env.cohort, "export", "--state-dir", env.state, "--round", "latest",
                            "--out", out], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
        t.ok(r.returncode == 0, "cohort export --round latest exits 0 (%s)" % r.stderr.strip())
        probe = (
            "import sys, torch\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "import train\n"
            "net = train.build(train.st_load(sys.argv[2]))\n"
            "x = torch.zeros(3, 784)\n"
            "print('shape', tuple(net(x).shape))\n"
            "try:\n"
            "    from safetensors.torch import load_file\n"
            "except ImportError:\n"
            "    print('no safetensors package')\n"
            "else:\n"
            "    sd = load_file(sys.argv[2])\n"
            "    assert all(torch.equal(sd[k], v) for k, v in net.state_dict().items())\n"
            "    print('safetensors.torch.load_file agrees')\n")
        r = subprocess.run([py, "-c", probe, os.path.dirname(os.path.abspath(TRAIN)), out],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t.ok(r.returncode == 0 and "shape (3, 10)" in r.stdout,
             "PyTorch loads the exported model and runs it (%s%s)" % (r.stdout.strip(),
                                                                     r.stderr.strip()[-300:]))
    finally:
        env.cleanup()
    t.done()


if __name__ == "__main__":
    main()
