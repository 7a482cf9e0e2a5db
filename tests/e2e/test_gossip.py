"""End to end: a gossip network of 20 cohortd --mode gossip nodes on loopback,
each with its own random MLP and its own `cohort client --trainer fmnist` on a
Dirichlet share of Fashion-MNIST. Each node is seeded with two peers only and
learns the rest by peer exchange.

  1. Every node trains, pushes and merges; its peers table grows past its seeds.
  2. Five nodes are killed with SIGKILL. The other 15 keep training and merging
     (their merges rows grow) and their mean test accuracy keeps rising; they
     drop the dead nodes from their views.
  3. One killed node is restarted on its state directory (its trainer never
     stopped: it reconnects by itself). It resumes from its model.safetensors
     and its peers table, merges again, and catches up with the others.
  4. A node presenting a peer certificate from another CA is refused (log line),
     and so is a client certificate of the right CA presented as a peer.
"""
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from cohort_e2e import Check, free_port, kill_all, run, wait_port  # noqa

N = 20
KILL = [2, 5, 9, 13, 17]      # 0-based node indices killed in phase 2
BACK = 5                      # the one restarted in phase 3
ARCH = "mlp:32"


class Net:
    def __init__(self, build):
        import tempfile
        self.build = os.path.abspath(build)
        self.cohort = os.path.join(self.build, "client", "cli", "cohort")
        self.cohortd = os.path.join(self.build, "server", "cohortd")
        self.dir = tempfile.mkdtemp(prefix="cohort-gossip-")
        self.certs = os.path.join(self.dir, "certs")
        self.other = os.path.join(self.dir, "other-ca")
        run([self.cohort, "certs", "--out", self.certs, "--clients", str(N), "--peers", str(N)],
            quiet=True)
        run([self.cohort, "certs", "--out", self.other, "--peers", "1"], quiet=True)
        self.ports = []
        while len(self.ports) < N + 2:
            p = free_port()
            if p not in self.ports:
                self.ports.append(p)
        self.nodes = [None] * N
        self.trainers = [None] * N
        self.procs = []
        rnd = random.Random(4)
        # Two seeds each: the ring successor and one random node.
        self.seeds = []
        for i in range(N):
            s = {(i + 1) % N}
            while len(s) < 2:
                j = rnd.randrange(N)
                if j != i:
                    s.add(j)
            self.seeds.append(sorted(s))

    def addr(self, i):
        return "127.0.0.1:%d" % self.ports[i]

    def state(self, i):
        return os.path.join(self.dir, "node-%d" % i)

    def log(self, i):
        return os.path.join(self.dir, "node-%d.log" % i)

    def start_node(self, i, cert=None, key=None, peers=None, port=None, state=None, log=None,
                   model=True):
        m = os.path.join(self.dir, "init-%d.safetensors" % i)
        if model and not os.path.exists(m):
            run([self.cohort, "init-model", "--arch", ARCH, "--seed", str(100 + i), "--out", m],
                quiet=True)
        args = [self.cohortd, "--mode", "gossip",
                "--listen", "127.0.0.1:%d" % (port or self.ports[i]),
                "--state-dir", state or self.state(i),
                "--ca", os.path.join(self.certs, "ca.pem"),
                "--cert", cert or os.path.join(self.certs, "peer-%d.pem" % (i + 1)),
                "--key", key or os.path.join(self.certs, "peer-%d.key" % (i + 1)),
                "--model", m,
                "--peers", peers or ",".join(self.addr(j) for j in self.seeds[i]),
                "--fanout", "3", "--gossip-interval", "1", "--round-interval", "0.4",
                "--merge-timeout", "3", "--peer-max-failures", "4",
                "--durability", "relaxed", "--log-level", "info"]
        f = open(log or self.log(i), "a")
        p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT)
        self.procs.append(p)
        wait_port(port or self.ports[i], p, timeout=20)
        return p

    def start_trainer(self, i):
        args = [self.cohort, "client", "--server", self.addr(i),
                "--ca", os.path.join(self.certs, "ca.pem"),
                "--cert", os.path.join(self.certs, "client-%d.pem" % (i + 1)),
                "--key", os.path.join(self.certs, "client-%d.key" % (i + 1)),
                "--trainer", "fmnist", "--partition", "%d/%d" % (i + 1, N),
                "--split", "dirichlet:0.5", "--seed", "3", "--local-steps", "4",
                "--batch", "32", "--lr", "0.05", "--retry-ms", "100:500"]
        f = open(os.path.join(self.dir, "trainer-%d.log" % i), "a")
        p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def query(self, i, sql):
        for _ in range(50):
            try:
                db = sqlite3.connect(os.path.join(self.state(i), "cohort.db"), timeout=5)
                rows = db.execute(sql).fetchall()
                db.close()
                return rows
            except sqlite3.OperationalError:
                time.sleep(0.1)
        raise AssertionError("cannot read node %d's store" % i)

    def accuracy(self, i):
        r = run([self.cohort, "eval", "--model",
                 os.path.join(self.state(i), "model.safetensors")], quiet=True)
        return float(r.stdout.split()[0].split("=")[1])

    def mean_accuracy(self, nodes):
        accs = [self.accuracy(i) for i in nodes]
        return sum(accs) / len(accs), min(accs), max(accs)

    def read_log(self, i=None, path=None):
        with open(path or self.log(i)) as f:
            return f.read()

    def cleanup(self):
        kill_all(self.procs)


def wait_for(cond, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(1)
    return False


def merges(net, nodes):
    return {i: net.query(i, "SELECT count(*) FROM merges")[0][0] for i in nodes}


def main():
    t = Check("e2e-gossip")
    net = Net(os.environ.get("COHORT_BUILD", "build"))
    t0 = time.time()
    try:
        for i in range(N):
            net.nodes[i] = net.start_node(i)
        for i in range(N):
            net.trainers[i] = net.start_trainer(i)
        alive = [i for i in range(N) if i not in KILL]

        # Phase 1: everybody trains and merges (the trainers first load their data).
        def rounds_of(nodes):
            return {i: net.query(i, "SELECT max(round) FROM rounds")[0][0] or 0 for i in nodes}

        def known():
            return [net.query(i, "SELECT count(*) FROM peers")[0][0] for i in range(N)]

        # (The peers table is written every 5 s, so it lags the views a little.)
        wait_for(lambda: all(r >= 5 for r in rounds_of(range(N)).values()) and
                 all(m > 0 for m in merges(net, range(N)).values()) and
                 all(k > 2 for k in known()), 120)
        m1 = merges(net, range(N))
        t.ok(all(m1[i] > 0 for i in range(N)),
             "phase 1: every node merged (merges per node: %s)" % sorted(m1.values()))
        k = known()
        t.ok(all(n > 2 for n in k),
             "peer exchange: every node knows more than its 2 seeds (peers rows: %s)" % k)
        rounds = sorted(rounds_of(range(N)).values())
        t.ok(all(r >= 5 for r in rounds), "every node committed local rounds: %s" % rounds)
        row = net.query(0, "SELECT method, models, variance FROM merges ORDER BY id LIMIT 1")[0]
        t.ok(row[0] == "variance-corrected" and row[1] >= 1 and '"fc1.weight":{"own":' in row[2],
             "merges rows record the method and per-layer variances: %s" % (row[:2],))

        # Phase 2: kill five nodes (their trainers keep retrying).
        before = net.mean_accuracy(alive)
        for i in KILL:
            net.nodes[i].send_signal(signal.SIGKILL)
            net.nodes[i].wait()
        m2 = merges(net, alive)
        r2 = rounds_of(alive)
        # Long enough for 4 failures in a row (back-off 1 + 2 + 4 s) and 10 more rounds each.
        time.sleep(12)
        wait_for(lambda: all(r >= r2[i] + 10 for i, r in rounds_of(alive).items()), 90)
        m3 = merges(net, alive)
        after = net.mean_accuracy(alive)
        t.ok(all(m3[i] > m2[i] for i in alive),
             "phase 2: the 15 survivors keep merging (merges added: %s)"
             % sorted(m3[i] - m2[i] for i in alive))
        t.ok(after[0] > before[0],
             "phase 2: survivors' mean accuracy keeps rising: %.4f -> %.4f (min %.4f, max %.4f)"
             % (before[0], after[0], after[1], after[2]))
        dead = ",".join("'%s'" % net.addr(i) for i in KILL)
        dropped = sum(net.query(i, "SELECT count(*) FROM peers WHERE address IN (%s) AND "
                                   "failures >= 4" % dead)[0][0] for i in alive)
        t.ok(dropped > 0, "dead peers are dropped after 4 failures in a row (%d drops recorded)"
             % dropped)
        logs = "".join(net.read_log(i) for i in alive)
        t.ok("dropped from the view" in logs, "drop logged")

        # Phase 3: restart one killed node on its state directory.
        r_before = net.query(BACK, "SELECT max(round) FROM rounds")[0][0]
        mg_before = net.query(BACK, "SELECT count(*) FROM merges")[0][0]
        acc_killed = net.accuracy(BACK)
        net.nodes[BACK] = net.start_node(BACK)
        time.sleep(5)
        wait_for(lambda: rounds_of([BACK])[BACK] >= r_before + 15 and
                 net.query(BACK, "SELECT count(*) FROM merges")[0][0] > mg_before + 5, 90)
        text = net.read_log(BACK)
        t.ok("resuming after %d local rounds" % r_before in text,
             "restarted node resumed from model.safetensors after round %d" % r_before)
        t.ok("peers known from the store" in text, "restarted node loaded its peers table")
        r_after = net.query(BACK, "SELECT max(round) FROM rounds")[0][0]
        mg_after = net.query(BACK, "SELECT count(*) FROM merges")[0][0]
        t.ok(r_after > r_before and mg_after > mg_before,
             "restarted node trains again (rounds %d -> %d) and merges (%d -> %d)"
             % (r_before, r_after, mg_before, mg_after))
        seen = sum(1 for i in alive
                   if net.query(i, "SELECT count(*) FROM peers WHERE address = '%s' AND "
                                "last_seen > strftime('%%Y-%%m-%%dT%%H:%%M:%%fZ', 'now', '-10 seconds')"
                                % net.addr(BACK))[0][0])
        t.ok(seen > 0, "restarted node rejoined: %d peers exchanged models with it since" % seen)
        acc_back = net.accuracy(BACK)
        others = net.mean_accuracy(alive)
        t.ok(acc_back > acc_killed - 0.02 and acc_back >= others[0] - 0.1,
             "restarted node caught up: %.4f at the kill, %.4f now, survivors' mean %.4f"
             % (acc_killed, acc_back, others[0]))

        # Phase 4: refused peers.
        bad = net.start_node(0, cert=os.path.join(net.other, "peer-1.pem"),
                             key=os.path.join(net.other, "peer-1.key"), peers=net.addr(0),
                             port=net.ports[N], state=os.path.join(net.dir, "bad"),
                             log=os.path.join(net.dir, "bad.log"))
        fake = net.start_node(1, cert=os.path.join(net.certs, "client-1.pem"),
                              key=os.path.join(net.certs, "client-1.key"), peers=net.addr(1),
                              port=net.ports[N + 1], state=os.path.join(net.dir, "fake"),
                              log=os.path.join(net.dir, "fake.log"))
        time.sleep(3.5)
        l0 = net.read_log(0)
        t.ok("TLS handshake failed: certificate verify failed" in l0,
             "node 0 refuses a peer certificate from another CA (log line)")
        l1 = net.read_log(1)
        t.ok("is not a peer certificate" in l1,
             "node 1 refuses a client certificate presented as a peer (log line)")
        for p in (bad, fake):
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=20)

        # Clean shutdown of the rest: exit 0, model written.
        for i in range(N):
            if net.nodes[i].poll() is None:
                net.nodes[i].send_signal(signal.SIGTERM)
        codes = [net.nodes[i].wait(timeout=30) for i in range(N) if i not in KILL or i == BACK]
        t.ok(all(c == 0 for c in codes), "SIGTERM: every node exits 0 (%s)" % codes)
        ok = all(net.query(i, "PRAGMA integrity_check")[0][0] == "ok" for i in range(N))
        t.ok(ok, "integrity_check ok on every store")
        print("# %.1f s" % (time.time() - t0))
    finally:
        net.cleanup()
    if not t.failed:
        shutil.rmtree(net.dir, ignore_errors=True)
    t.done()


if __name__ == "__main__":
    main()
