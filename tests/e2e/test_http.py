"""cohortd's admin HTTP endpoint against a real federation, started from a config
file (--config, with flags that override it):

- every route: status codes, content types, the bearer token, HEAD, 404/405,
  bounded requests (431, 413, 414, 400), pipelining, the connection limit (503)
  and the idle timeout;
- /metrics parsed by Debian's prometheus_client text parser, every value
  checked against the store (rounds, outcomes by reason, histograms, eval);
- /api/status, /api/rounds, /api/clients checked against the store;
- evaluators: never counted as trainers, their reports stored per round;
- --check-config (0 for a good file, 2 and FILE:LINE for a bad one).

The federation: four Fashion-MNIST trainers (one declines half of its rounds),
one client whose update holds NaN (rejected every round) and one evaluator.
After a few rounds the trainers are stopped, so the state is still while it is
checked. Federation is reused by test_dashboard.py."""
import http.client
import json
import math
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from cohort_e2e import Check, Env, free_port, run, st_write  # noqa

TOKEN = "t0ken-for-tests"


class Federation:
    """cohortd with --http and a token, trainers, a NaN client and an evaluator."""

    def __init__(self, name, ntrainers=4, rounds_wanted=4, local_steps=20):
        build = os.environ.get("COHORT_BUILD", "build")
        self.env = env = Env(build, nclients=ntrainers + 1, name=name)
        self.ntrainers = ntrainers
        certs = env.certs
        run([env.cohort, "certs", "--out", certs, "--ca-cert", os.path.join(certs, "ca.pem"),
             "--ca-key", os.path.join(certs, "ca.key"), "--clients", "1", "--name-prefix",
             "evaluator-"], quiet=True)
        self.model = os.path.join(env.dir, "init.safetensors")
        run([env.cohort, "init-model", "--arch", "softmax", "--seed", "1", "--out", self.model],
            quiet=True)
        self.nan = os.path.join(env.dir, "nan.safetensors")
        st_write(self.nan, [("fc.weight", [10, 784], [float("nan")] * 7840),
                            ("fc.bias", [10], [0.0] * 10)])
        self.http_port = free_port()
        self.conf = os.path.join(env.dir, "cohortd.conf")
        with open(self.conf, "w") as f:
            f.write('# written by %s\n'
                    '[tls]\nca = "%s"\ncert = "%s"\nkey = "%s"\n\n'
                    '[round]\nmin_clients = 1\nround_deadline_s = 30\n\n'
                    '[http]\nlisten = "127.0.0.1:%d"\ntoken = "%s"\n\n'
                    '[log]\nlevel = "info"\n'
                    % (name, os.path.join(certs, "ca.pem"), os.path.join(certs, "server.pem"),
                       os.path.join(certs, "server.key"), self.http_port, TOKEN))
        self.rounds_wanted = rounds_wanted
        self.local_steps = local_steps
        self.trainers = []

    def cohortd_args(self):
        # --min-clients on the command line wins over min_clients = 1 in the file.
        return [self.env.cohortd, "--config", self.conf, "--listen",
                "127.0.0.1:%d" % self.env.port, "--state-dir", self.env.state, "--model",
                self.model, "--min-clients", str(self.ntrainers + 1)]

    def start(self):
        env = self.env
        logf = open(os.path.join(env.dir, "cohortd.log"), "a")
        self.server = subprocess.Popen(self.cohortd_args(), stdout=logf, stderr=subprocess.STDOUT)
        env.procs.append(self.server)
        from cohort_e2e import wait_port
        wait_port(env.port, self.server)
        wait_port(self.http_port, self.server)
        ecert = os.path.join(env.certs, "evaluator-1.pem")
        ekey = os.path.join(env.certs, "evaluator-1.key")
        self.evaluator = env.start_client(0, ["--evaluate"], cert=ecert, key=ekey,
                                          log="evaluator.log")
        n = self.ntrainers
        for i in range(1, n + 1):
            extra = ["--trainer", "fmnist", "--partition", "%d/%d" % (i, n), "--local-steps",
                     str(self.local_steps), "--seed", str(i)]
            if i == n:
                extra += ["--participation", "bernoulli:0.5"]
            self.trainers.append(env.start_client(i, extra))
        self.trainers.append(env.start_client(n + 1, ["--update", self.nan, "--examples", "10"]))

    def last_round(self):
        try:
            db = self.env.db()
            r = db.execute("SELECT max(round) FROM rounds").fetchone()[0]
            db.close()
            return r or 0
        except Exception:
            return 0

    def run_until_still(self, timeout=150):
        """Waits for rounds_wanted rounds, stops the trainers and waits until the
        server is idle and the evaluator has reported the last committed round."""
        end = time.time() + timeout
        while self.last_round() < self.rounds_wanted:
            if time.time() > end or self.server.poll() is not None:
                raise AssertionError("only %d rounds committed" % self.last_round())
            time.sleep(0.2)
        for p in self.trainers:
            p.terminate()
        for p in self.trainers:
            p.wait(timeout=20)
        while True:
            st = self.get_json("/api/status")
            db = self.env.db()
            ev = db.execute("SELECT max(round) FROM eval_metrics").fetchone()[0]
            db.close()
            if st["round"]["phase"] == "waiting" and st["clients"]["connected"] == 0 \
                    and ev == st["last_committed"]:
                return st
            if time.time() > end:
                raise AssertionError("the federation did not come to rest: %s, eval %s" % (st, ev))
            time.sleep(0.2)

    def request(self, method, path, token=TOKEN, headers=None, body=None):
        c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = "Bearer " + token
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
        c.close()
        return r, data

    def get_json(self, path):
        r, data = self.request("GET", path)
        if r.status != 200:
            raise AssertionError("%s: HTTP %d %s" % (path, r.status, data[:200]))
        return json.loads(data)

    def shutdown(self):
        """SIGTERM cohortd; returns its exit code (a sanitizer report makes it non-zero)."""
        self.server.terminate()
        try:
            return self.server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            return None

    def stop(self):
        self.env.cleanup()


def raw(port, data, timeout=5):
    """Sends bytes, returns everything the server answers before closing (or timeout)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(data)
    out = b""
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
    except socket.timeout:
        pass
    s.close()
    return out


def prom_parser():
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        # Debian's python3-prometheus-client, when python3 is not Debian's.
        sys.path.append("/usr/lib/python3/dist-packages")
        from prometheus_client.parser import text_string_to_metric_families
    return text_string_to_metric_families


def close(a, b, tol=1e-9):
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def check_config(t, fed):
    env = fed.env
    r = subprocess.run(fed.cohortd_args() + ["--check-config"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    t.ok(r.returncode == 0 and "configuration OK" in r.stdout,
         "--check-config accepts the test's config file (%d %s)" % (r.returncode, r.stderr))
    bad = os.path.join(env.dir, "bad.conf")
    with open(bad, "w") as f:
        f.write('[round]\nrounds = 3\nrounds = 4\n[http]\nlistne = "x"\n[limits]\n'
                'max_uploads = 0\n')
    r = subprocess.run([env.cohortd, "--config", bad, "--check-config"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    t.ok(r.returncode == 2, "--check-config exits 2 on a bad file (%d)" % r.returncode)
    for want in ("%s:3: duplicate key round.rounds (first set on line 2)" % bad,
                 "%s:5: unknown key listne in [http]" % bad,
                 "%s:7: limits.max_uploads must be an integer between 1 and" % bad):
        t.ok(want in r.stderr, "message names file and line: %s" % want.split(":", 1)[1])
    r = subprocess.run([env.cohortd, "--config", os.path.join(env.dir, "missing.conf"),
                        "--check-config"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    t.ok(r.returncode == 2 and "missing.conf: cannot read" in r.stderr,
         "a missing config file is an error")


def check_routes(t, fed):
    p = fed.http_port
    r, body = fed.request("GET", "/", token=None)
    t.ok(r.status == 200 and r.getheader("Content-Type") == "text/html; charset=utf-8",
         "GET / without a token: 200 text/html (%d %s)" % (r.status, r.getheader("Content-Type")))
    csp = r.getheader("Content-Security-Policy") or ""
    t.ok("default-src 'none'" in csp and "connect-src 'self'" in csp,
         "the dashboard may load nothing from other hosts (CSP: %s)" % csp)
    t.ok(b"<title>cohortd dashboard</title>" in body and b"http://" not in body.replace(
        b"http://www.w3.org/2000/svg", b"").replace(b"http://HOST:PORT", b""),
         "the dashboard is the embedded page and names no other host")
    r, body = fed.request("GET", "/healthz", token=None)
    t.ok(r.status == 200 and body == b"ok\n", "GET /healthz without a token: 200 ok")
    for path in ("/metrics", "/api/status", "/api/rounds", "/api/clients"):
        r, body = fed.request("GET", path, token=None)
        t.ok(r.status == 401 and (r.getheader("WWW-Authenticate") or "").startswith("Bearer"),
             "GET %s without a token: 401 with WWW-Authenticate (%d)" % (path, r.status))
        r, body = fed.request("GET", path, token="wrong")
        t.ok(r.status == 401, "GET %s with a wrong token: 401 (%d)" % (path, r.status))
        r, body = fed.request("GET", path, token=TOKEN + "x")
        t.ok(r.status == 401, "GET %s with a longer token: 401 (%d)" % (path, r.status))
    r, body = fed.request("GET", "/metrics", token=None,
                          headers={"Authorization": "bearer " + TOKEN})
    t.ok(r.status == 200, "the Bearer scheme is case-insensitive (%d)" % r.status)
    for path, ctype in (("/metrics", "text/plain; version=0.0.4; charset=utf-8"),
                        ("/api/status", "application/json"), ("/api/rounds", "application/json"),
                        ("/api/rounds?limit=2", "application/json"),
                        ("/api/clients", "application/json"),
                        ("/api/clients?limit=1", "application/json")):
        r, body = fed.request("GET", path)
        t.ok(r.status == 200 and r.getheader("Content-Type") == ctype and
             int(r.getheader("Content-Length")) == len(body),
             "GET %s: 200 %s with the right Content-Length" % (path, ctype))
        if ctype == "application/json":
            try:
                json.loads(body)
                t.ok(True, "%s is valid JSON" % path)
            except ValueError as e:
                t.ok(False, "%s is valid JSON (%s)" % (path, e))
    r, body = fed.request("HEAD", "/api/status")
    t.ok(r.status == 200 and body == b"" and int(r.getheader("Content-Length")) > 0,
         "HEAD /api/status: 200, Content-Length, no body")
    r, body = fed.request("POST", "/api/status", body=b"")
    t.ok(r.status == 405 and r.getheader("Allow") == "GET, HEAD",
         "POST /api/status: 405 with Allow: GET, HEAD (%d)" % r.status)
    r, body = fed.request("DELETE", "/metrics")
    t.ok(r.status == 405, "DELETE /metrics: 405 (%d)" % r.status)
    r, body = fed.request("GET", "/nope")
    t.ok(r.status == 404 and r.getheader("Content-Type").startswith("text/plain"),
         "GET /nope: 404 text/plain (%d)" % r.status)
    for q in ("limit=0", "limit=abc", "limit=10001", "limit="):
        r, body = fed.request("GET", "/api/rounds?" + q)
        t.ok(r.status == 400, "GET /api/rounds?%s: 400 (%d)" % (q, r.status))
    r, body = fed.request("GET", "/api/clients?limit=-1")
    t.ok(r.status == 400, "GET /api/clients?limit=-1: 400 (%d)" % r.status)

    # Bounded requests.
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
    t.ok(raw(p, big).startswith(b"HTTP/1.1 431 "), "request headers over 8 KiB: 431")
    long_url = b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    t.ok(raw(p, long_url).startswith(b"HTTP/1.1 414 "), "request target over 2 KiB: 414")
    t.ok(raw(p, b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
         .startswith(b"HTTP/1.1 413 "), "a request body: 413")
    t.ok(raw(p, b"HELLO THERE\r\n\r\n").startswith(b"HTTP/1.1 400 "), "garbage: 400")
    two = raw(p, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    t.ok(two.count(b"HTTP/1.1 200 OK") == 2 and two.endswith(b"ok\n"),
         "two pipelined requests get two responses in order")
    # Keep-alive: several requests on one connection.
    c = http.client.HTTPConnection("127.0.0.1", p, timeout=10)
    okays = 0
    for _ in range(3):
        c.request("GET", "/api/status", headers={"Authorization": "Bearer " + TOKEN})
        rr = c.getresponse()
        rr.read()
        okays += rr.status == 200
    c.close()
    t.ok(okays == 3, "three requests on one keep-alive connection")
    # At most 16 connections at once; the 17th is told to come back.
    held = []
    for _ in range(16):
        h = http.client.HTTPConnection("127.0.0.1", p, timeout=10)
        h.request("GET", "/healthz")  # keep-alive: the server now holds this connection
        h.getresponse().read()
        held.append(h)
    extra = raw(p, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    t.ok(extra.startswith(b"HTTP/1.1 503 "), "a 17th concurrent connection: 503 (%r)" % extra[:40])
    for s in held:
        s.close()
    time.sleep(0.3)
    t.ok(raw(p, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
         .startswith(b"HTTP/1.1 200 "), "connections are accepted again once they closed")
    # An idle connection is closed by the server.
    s = socket.create_connection(("127.0.0.1", p), timeout=20)
    t0 = time.time()
    s.settimeout(20)
    try:
        closed = s.recv(1) == b""
    except OSError:
        closed = True
    s.close()
    took = time.time() - t0
    t.ok(closed and 8 <= took <= 14, "an idle connection is closed after about 10 s (%.1f s)" % took)


def check_metrics(t, fed, st):
    r, body = fed.request("GET", "/metrics")
    parse = prom_parser()
    samples = {}
    types = {}
    try:
        for fam in parse(body.decode()):
            types[fam.name] = fam.type
            for s in fam.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        t.ok(True, "/metrics parses as Prometheus text format (%d samples)" % len(samples))
    except Exception as e:  # noqa
        t.ok(False, "/metrics parses as Prometheus text format: %s" % e)
        return

    def v(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))))

    db = fed.env.db()
    q = lambda sql, *a: db.execute(sql, a).fetchone()[0]  # noqa
    last = q("SELECT max(round) FROM rounds")
    nrounds = q("SELECT count(*) FROM rounds WHERE round > 0")
    t.ok(types.get("cohort_rounds_committed") == "counter" and
         v("cohort_rounds_committed_total") == nrounds,
         "cohort_rounds_committed_total = %s rounds in the store" % nrounds)
    t.ok(v("cohort_round_last_committed") == last, "cohort_round_last_committed = %d" % last)
    t.ok(v("cohort_round_current") == last + 1, "cohort_round_current = the next round")
    t.ok(v("cohort_round_phase", phase="waiting") == 1 and
         sum(v("cohort_round_phase", phase=p) for p in
             ("waiting", "open", "closing", "committing", "done")) == 1,
         "cohort_round_phase: waiting, and only waiting")
    t.ok(v("cohort_clients_connected") == 0 and v("cohort_evaluators_connected") == 1,
         "trainers connected 0, evaluators 1")
    trainers = q("SELECT count(*) FROM clients WHERE role = 'trainer'")
    t.ok(trainers == fed.ntrainers + 1 and v("cohort_clients_registered") == trainers,
         "cohort_clients_registered counts trainers only (%s of %d rows)"
         % (v("cohort_clients_registered"), q("SELECT count(*) FROM clients")))
    t.ok(q("SELECT role FROM clients WHERE name = 'evaluator-1'") == "evaluator",
         "the evaluator is registered with role 'evaluator'")
    t.ok(v("cohort_round_participants") == q("SELECT participants FROM rounds WHERE round = ?",
                                             last),
         "cohort_round_participants = participants of round %d" % last)
    t.ok(v("cohort_round_last_offered") == q("SELECT offered FROM rounds WHERE round = ?", last),
         "cohort_round_last_offered = offered of round %d" % last)
    for status in ("accepted", "declined", "dropped", "rejected"):
        got = sum(val for (n, labels), val in samples.items()
                  if n == "cohort_updates_total" and dict(labels)["result"] == status)
        want = q("SELECT count(*) FROM participation WHERE status = ?", status)
        t.ok(got == want, "cohort_updates_total{result=%s} = %d rows in the store (%s)"
             % (status, want, got))
    t.ok(v("cohort_updates_total", result="rejected", reason="nonfinite") ==
         q("SELECT count(*) FROM participation WHERE status = 'rejected' AND reason LIKE "
           "'%NaN%'") and v("cohort_updates_total", result="rejected", reason="nonfinite") > 0,
         "rejections of the NaN client are counted with reason nonfinite")
    t.ok(v("cohort_updates_total", result="declined", reason="client") ==
         q("SELECT count(*) FROM participation WHERE status = 'declined'"),
         "declines are counted with reason client")
    t.ok(v("cohort_updates_total", result="dropped", reason="disconnected") ==
         q("SELECT count(*) FROM participation WHERE status = 'dropped' AND reason LIKE "
           "'disconnected%'"), "drops by disconnection are counted with reason disconnected")
    reasons = {dict(l)["reason"] for (n, l) in samples if n == "cohort_updates_total"}
    t.ok(len(reasons) <= 13, "the reason label takes a bounded set of values (%d)" % len(reasons))
    t.ok(v("cohort_bytes_received_total") > 0 and v("cohort_bytes_sent_total") >
         q("SELECT count(*) FROM rounds WHERE round > 0") * 7850 * 4,
         "bytes received and sent are counted (the model went out at least once per round)")
    for h, want_count in (("cohort_round_duration_seconds", nrounds),
                          ("cohort_fold_duration_seconds",
                           q("SELECT count(*) FROM participation WHERE status = 'accepted'")),
                          ("cohort_store_commit_seconds", nrounds)):
        buckets = sorted(((float(dict(l)["le"]), val) for (n, l), val in samples.items()
                          if n == h + "_bucket"))
        mono = all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
        t.ok(types.get(h) == "histogram" and v(h + "_count") == want_count and
             buckets[-1] == (math.inf, want_count) and mono,
             "%s: histogram with %d observations, monotonic buckets" % (h, want_count))
    dsum = q("SELECT total(duration_s) FROM rounds WHERE round > 0")
    t.ok(close(v("cohort_round_duration_seconds_sum"), dsum, 1e-6),
         "round duration sum = total(rounds.duration_s) (%s vs %s)"
         % (v("cohort_round_duration_seconds_sum"), dsum))
    er = q("SELECT max(round) FROM eval_metrics")
    t.ok(v("cohort_eval_round") == er, "cohort_eval_round = %s" % er)
    for name in ("accuracy", "loss"):
        want = q("SELECT value FROM eval_metrics WHERE round = ? AND name = ?", er, name)
        t.ok(close(v("cohort_eval_metric", metric=name), want),
             "cohort_eval_metric{metric=%s} = %s" % (name, want))
    db.close()


def check_json(t, fed, st):
    db = fed.env.db()
    q = lambda sql, *a: db.execute(sql, a).fetchone()[0]  # noqa
    last = q("SELECT max(round) FROM rounds")
    t.ok(st["last_committed"] == last and st["round"]["id"] == last + 1 and
         st["round"]["phase"] == "waiting", "/api/status: last committed, next round, phase")
    t.ok(st["clients"] == {"connected": 0, "evaluators": 1, "connections": 1,
                           "registered": fed.ntrainers + 1},
         "/api/status: clients %s" % st["clients"])
    t.ok(st["min_clients"] == fed.ntrainers + 1, "the --min-clients flag won over the file")
    er = q("SELECT max(round) FROM eval_metrics")
    t.ok(st["eval"]["round"] == er and close(
        st["eval"]["metrics"]["accuracy"],
        q("SELECT value FROM eval_metrics WHERE round = ? AND name = 'accuracy'", er)),
        "/api/status: latest evaluation")

    rd = fed.get_json("/api/rounds")["rounds"]
    rows = db.execute("SELECT round, offered, participants, total_examples, mean_train_loss, "
                      "duration_s, close_reason, committed_at FROM rounds ORDER BY round").fetchall()
    t.ok([r["round"] for r in rd] == [r[0] for r in rows],
         "/api/rounds lists every round of the store in order (%d)" % len(rows))
    same = all(a["offered"] == b[1] and a["participants"] == b[2] and
               a["total_examples"] == b[3] and close(a["mean_train_loss"], b[4]) and
               close(a["duration_s"], b[5]) and a["close_reason"] == b[6] and
               a["committed_at"] == b[7] for a, b in zip(rd, rows))
    t.ok(same, "/api/rounds: every field equals the store's row")
    parts = {}
    for rn, cl, status in db.execute("SELECT round, client, status FROM participation"):
        parts.setdefault(rn, []).append([cl, status])
    t.ok(all(sorted(r["participation"]) == sorted(parts.get(r["round"], [])) for r in rd),
         "/api/rounds: participation pairs equal the store's rows")
    t.ok(all(r["outcomes"][s] == sum(1 for _, x in parts.get(r["round"], []) if x == s)
             for r in rd for s in ("accepted", "declined", "dropped", "rejected")),
         "/api/rounds: outcome counts")
    evs = {}
    for rn, name, val in db.execute("SELECT round, name, avg(value) FROM eval_metrics "
                                    "GROUP BY round, name"):
        evs.setdefault(rn, {})[name] = val
    t.ok(all(set(r["eval"]) == set(evs.get(r["round"], {})) and
             all(close(r["eval"][k], evs[r["round"]][k]) for k in r["eval"]) for r in rd),
         "/api/rounds: evaluation metrics per round equal the store's")
    t.ok(0 in evs and last in evs, "the evaluator reported the initial and the last model")
    rd2 = fed.get_json("/api/rounds?limit=2")["rounds"]
    t.ok([r["round"] for r in rd2] == [last - 1, last], "/api/rounds?limit=2: the last two rounds")

    cl = fed.get_json("/api/clients")["clients"]
    rows = db.execute(
        "SELECT c.id, c.name, c.role, total(p.status='accepted'), total(p.status='declined'),"
        " total(p.status='dropped'), total(p.status='rejected') FROM clients c LEFT JOIN "
        "participation p ON p.client = c.id GROUP BY c.id ORDER BY c.id").fetchall()
    t.ok([(c["id"], c["name"], c["role"], c["accepted"], c["declined"], c["dropped"],
           c["rejected"]) for c in cl] == [tuple(r) for r in rows],
         "/api/clients: ids, names, roles and outcome counts equal the store's")
    t.ok([c["name"] for c in cl if c["connected"]] == ["evaluator-1"],
         "/api/clients: only the evaluator is connected")
    t.ok(len(fed.get_json("/api/clients?limit=1")["clients"]) == 1, "/api/clients?limit=1")
    db.close()


def main():
    t = Check("e2e-http")
    fed = Federation("http")
    try:
        check_config(t, fed)
        fed.start()
        st = fed.run_until_still()
        check_metrics(t, fed, st)
        check_json(t, fed, st)
        check_routes(t, fed)
        rc = fed.shutdown()
        log = fed.env.log()
        t.ok("admin endpoint on http://127.0.0.1:%d/" % fed.http_port in log and
             "bearer token required" in log, "cohortd logs the endpoint's address")
        t.ok(rc == 0 and "Sanitizer" not in log,
             "cohortd stops cleanly on SIGTERM with the endpoint open (exit %s)" % rc)
    finally:
        fed.stop()
    t.done()


if __name__ == "__main__":
    main()
