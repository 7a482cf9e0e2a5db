"""End to end: `cohort status | rounds | clients | export` against a real state
directory. Three clients run 3 FedAvg rounds: client-1 trains on Fashion-MNIST
(reports a train loss), client-2 sends a fixed update, client-3 declines every
round (its --exec command fails). Then:

- status/rounds/clients --json are compared number by number with the store,
  also while a cohortd holds the database open (WAL);
- the human tables hold one row per round and per client with the right numbers;
- export round-trips the checkpoint bytes (--round N and --round latest), also
  when the stored paths are relative (to cohortd's directory or to the state
  directory) or point to where the directory used to be;
- export refuses a tampered checkpoint and a round that does not exist, with a
  clear message, a non-zero exit and no output file;
- bad options exit 2."""
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from cohort_e2e import Check, Env, random_tensors, st_read, st_write, wait  # noqa

ROUNDS = 3
UPDATE_EXAMPLES = 100


def cli(env, *args, cwd=None):
    return subprocess.run([env.cohort] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=cwd, timeout=60)


def cli_json(t, env, *args):
    r = cli(env, *args)
    t.ok(r.returncode == 0, "cohort %s exits 0 (%s)" % (" ".join(args[:1]), r.stderr.strip()))
    try:
        return json.loads(r.stdout)
    except ValueError:
        t.ok(False, "cohort %s prints JSON (got %r)" % (" ".join(args), r.stdout[:200]))
        return None


def close(a, b):
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def store_rounds(db):
    cols = ["round", "strategy", "started_at", "closed_at", "committed_at", "offered",
            "participants", "total_examples", "mean_train_loss", "duration_s", "close_reason",
            "checkpoint", "sha256"]
    rows = db.execute("SELECT %s FROM rounds ORDER BY round" % ", ".join(cols)).fetchall()
    return [dict(zip(cols, r)) for r in rows]


def store_clients(db):
    """Per-client numbers computed here from the raw tables, independently of the CLI's SQL."""
    rounds = db.execute("SELECT round, committed_at FROM rounds WHERE round > 0").fetchall()
    out = {}
    for cid, name, first, last, connects, nex in db.execute(
            "SELECT id, name, first_seen, last_seen, connects, num_examples FROM clients"):
        st = db.execute("SELECT round, status FROM participation WHERE client = ?",
                        (cid,)).fetchall()
        counts = {s: sum(1 for _, x in st if x == s)
                  for s in ("accepted", "declined", "dropped", "rejected")}
        eligible = max(sum(1 for _, c in rounds if c >= first), len(st))
        acc_rounds = [r for r, x in st if x == "accepted"]
        out[name] = dict(first_seen=first, last_seen=last, connects=connects, num_examples=nex,
                         eligible_rounds=eligible,
                         participation_rate=counts["accepted"] / eligible if eligible else 0.0,
                         last_round=max(acc_rounds) if acc_rounds else None, **counts)
    return out


def check_status(t, env, db, what):
    st = cli_json(t, env, "status", "--state-dir", env.state, "--json")
    if st is None:
        return
    rounds = store_rounds(db)
    last = rounds[-1]
    nclients = db.execute("SELECT count(*) FROM clients").fetchone()[0]
    t.ok(st["last_round"] == last["round"] == ROUNDS,
         "%s: status last_round %s = store %s" % (what, st["last_round"], last["round"]))
    t.ok(st["rounds_committed"] == len(rounds), "%s: status rounds_committed = %d"
         % (what, len(rounds)))
    t.ok(st["clients_registered"] == nclients == 3,
         "%s: status clients_registered %s = store %s" % (what, st["clients_registered"],
                                                          nclients))
    t.ok(st["strategy"] == last["strategy"] == "fedavg", "%s: status strategy" % what)
    t.ok(st["participants"] == last["participants"] == 2 and st["offered"] == last["offered"] == 3,
         "%s: status participants %s of %s offered = store" % (what, st["participants"],
                                                              st["offered"]))
    t.ok(st["total_examples"] == last["total_examples"], "%s: status total_examples" % what)
    t.ok(last["mean_train_loss"] is not None and close(st["mean_train_loss"],
                                                       last["mean_train_loss"]),
         "%s: status mean_train_loss %s = store %s" % (what, st["mean_train_loss"],
                                                       last["mean_train_loss"]))
    t.ok(st["checkpoint"] == last["checkpoint"] and st["sha256"] == last["sha256"],
         "%s: status checkpoint and sha256 = store" % what)
    t.ok(st["checkpoint_file"] is not None and sha(st["checkpoint_file"]) == last["sha256"],
         "%s: status checkpoint_file is the verified file" % what)


def run_federation(t, env):
    init = os.path.join(env.dir, "init.safetensors")
    r = cli(env, "init-model", "--arch", "softmax", "--out", init)
    t.ok(r.returncode == 0, "init-model writes a softmax model")
    upd = os.path.join(env.dir, "update.safetensors")
    st_write(upd, random_tensors(7, [("fc.weight", [10, 784]), ("fc.bias", [10])], scale=0.01))
    srv = env.start_server(init, ["--rounds", str(ROUNDS), "--min-clients", "3",
                                  "--round-timeout", "60"])
    clients = [
        env.start_client(1, ["--trainer", "fmnist", "--partition", "1/3", "--local-steps", "5"]),
        env.start_client(2, ["--update", upd, "--examples", str(UPDATE_EXAMPLES)]),
        env.start_client(3, ["--exec", "false"]),
    ]
    t.ok(wait(srv, 120, "cohortd") == 0, "cohortd exits 0 after round %d" % ROUNDS)
    for i, c in enumerate(clients):
        t.ok(wait(c, 30, "client") == 0, "client %d exits 0" % (i + 1))


def check_json(t, env, db):
    rounds = store_rounds(db)
    j = cli_json(t, env, "rounds", "--state-dir", env.state, "--json", "--limit", "0")
    if j is not None:
        t.ok(j["total_rounds"] == len(rounds) == ROUNDS + 1 and len(j["rounds"]) == len(rounds),
             "rounds --json --limit 0: all %d rounds" % len(rounds))
        same = all(a[k] == b[k] if not isinstance(b[k], float) else close(a[k], b[k])
                   for a, b in zip(j["rounds"], rounds) for k in b)
        t.ok(same, "rounds --json: every column of every round equals the store")
        t.ok([r["participants"] for r in j["rounds"]] == [0] + [2] * ROUNDS and
             [r["offered"] for r in j["rounds"]] == [0] + [3] * ROUNDS,
             "rounds: 2 participants of 3 offered in every round after the initial model")
        t.ok(j["rounds"][0]["close_reason"] == "initial model" and
             j["rounds"][0]["mean_train_loss"] is None,
             "round 0 is the initial model with no train loss (JSON null)")
    j = cli_json(t, env, "rounds", "--state-dir", env.state, "--json", "--limit", "2")
    if j is not None:
        t.ok([r["round"] for r in j["rounds"]] == [ROUNDS - 1, ROUNDS] and j["limit"] == 2,
             "rounds --limit 2: the last two rounds, oldest first (got %s)"
             % [r["round"] for r in j["rounds"]])

    want = store_clients(db)
    j = cli_json(t, env, "clients", "--state-dir", env.state, "--json")
    if j is not None:
        got = {c["name"]: c for c in j["clients"]}
        t.ok(sorted(got) == sorted(want) == ["client-1", "client-2", "client-3"],
             "clients --json: one entry per registered client")
        for name, w in sorted(want.items()):
            g = got.get(name, {})
            same = all(close(g.get(k), v) if isinstance(v, float) else g.get(k) == v
                       for k, v in w.items())
            t.ok(same, "clients --json: %s equals the store (%s)" % (
                name, {k: (g.get(k), v) for k, v in w.items() if g.get(k) != v}))
        t.ok(want["client-3"]["declined"] == ROUNDS and want["client-3"]["accepted"] == 0
             and got.get("client-3", {}).get("last_round", 0) is None,
             "client-3 declined every round and never took part")
        t.ok(want["client-1"]["accepted"] == ROUNDS and
             close(got.get("client-1", {}).get("participation_rate"), 1.0) and
             got.get("client-1", {}).get("last_round") == ROUNDS,
             "client-1 took part in every round (rate 1, last round %d)" % ROUNDS)


def check_tables(t, env, db):
    r = cli(env, "status", "--state-dir", env.state)
    lines = dict((ln[:18].strip(), ln[18:]) for ln in r.stdout.splitlines())
    t.ok(r.returncode == 0 and lines.get("last round", "").startswith("%d (" % ROUNDS),
         "status table: last round %d (%r)" % (ROUNDS, lines.get("last round")))
    t.ok(lines.get("participants", "").startswith("2 of 3 offered") and
         lines.get("clients") == "3 registered" and lines.get("strategy") == "fedavg",
         "status table: participants, clients, strategy")
    last = store_rounds(db)[-1]
    t.ok(lines.get("mean train loss") == "%.4f" % last["mean_train_loss"],
         "status table: mean train loss %r" % lines.get("mean train loss"))

    r = cli(env, "rounds", "--state-dir", env.state)
    rows = [ln.split() for ln in r.stdout.splitlines()]
    t.ok(r.returncode == 0 and rows and rows[0][:2] == ["ROUND", "PARTICIPANTS"],
         "rounds table has a header")
    body = rows[1:]
    store = store_rounds(db)
    t.ok(len(body) == len(store), "rounds table: %d rows for %d rounds" % (len(body), len(store)))
    ok = True
    for row, s in zip(body, store):
        loss = "-" if s["mean_train_loss"] is None else "%.4f" % s["mean_train_loss"]
        ok &= (row[0] == str(s["round"]) and row[1] == "%d/%d" % (s["participants"], s["offered"])
               and row[2] == str(s["total_examples"]) and row[3] == loss
               and " ".join(row[5:]) == s["close_reason"])
    t.ok(ok, "rounds table: round, participants/offered, examples, loss and close reason "
             "match the store")

    r = cli(env, "clients", "--state-dir", env.state)
    rows = [ln.split() for ln in r.stdout.splitlines()]
    want = store_clients(db)
    t.ok(r.returncode == 0 and rows and rows[0][0] == "NAME" and len(rows) == 1 + len(want),
         "clients table: header and one row per client")
    ok = True
    for row in rows[1:]:
        w = want.get(row[0])
        ok &= w is not None and row[3:7] == [str(w[k]) for k in
                                             ("accepted", "declined", "dropped", "rejected")]
        ok &= w is not None and row[7] == "%.3f" % w["participation_rate"]
        ok &= w is not None and row[8] == ("-" if w["last_round"] is None else str(w["last_round"]))
    t.ok(ok, "clients table: counts, rate and last round match the store")


def check_export(t, env, db):
    out = os.path.join(env.dir, "export", "model.safetensors")
    os.makedirs(os.path.dirname(out))
    rounds = store_rounds(db)
    r = cli(env, "export", "--state-dir", env.state, "--round", "2", "--out", out)
    t.ok(r.returncode == 0, "export --round 2 exits 0 (%s)" % r.stderr.strip())
    with open(env.checkpoint(2), "rb") as f:
        want = f.read()
    with open(out, "rb") as f:
        got = f.read()
    t.ok(got == want, "export --round 2 writes the checkpoint's exact bytes")
    t.ok(sorted(st_read(out)) == ["fc.bias", "fc.weight"], "the export is readable safetensors")
    t.ok(not [f for f in os.listdir(os.path.dirname(out)) if f != "model.safetensors"],
         "export leaves no temporary file")

    r = cli(env, "export", "--state-dir", env.state, "--round", "latest", "--out", out)
    t.ok(r.returncode == 0 and sha(out) == rounds[-1]["sha256"] == sha(env.checkpoint(ROUNDS)),
         "export --round latest writes the last round's checkpoint over the old file")

    missing = os.path.join(env.dir, "export", "none.safetensors")
    r = cli(env, "export", "--state-dir", env.state, "--round", "99", "--out", missing)
    t.ok(r.returncode == 1 and "round 99 is not in the store" in r.stderr and
         not os.path.exists(missing),
         "export of a round that does not exist fails clearly (%r)" % r.stderr.strip())

    # Tamper with round 1's checkpoint: one flipped byte in the data.
    ck = env.checkpoint(1)
    with open(ck, "rb") as f:
        orig = f.read()
    bad = bytearray(orig)
    bad[-3] ^= 0x40
    with open(ck, "wb") as f:
        f.write(bad)
    r = cli(env, "export", "--state-dir", env.state, "--round", "1", "--out", missing)
    t.ok(r.returncode == 1 and "sha256" in r.stderr and "altered or damaged" in r.stderr and
         not os.path.exists(missing) and len(os.listdir(os.path.dirname(missing))) == 1,
         "export refuses a tampered checkpoint and writes nothing (%r)" % r.stderr.strip())
    os.remove(ck)
    r = cli(env, "export", "--state-dir", env.state, "--round", "1", "--out", missing)
    t.ok(r.returncode == 1 and "missing" in r.stderr and not os.path.exists(missing),
         "export of a deleted checkpoint fails clearly (%r)" % r.stderr.strip())
    with open(ck, "wb") as f:
        f.write(orig)
    r = cli(env, "export", "--state-dir", env.state, "--round", "1", "--out", missing)
    t.ok(r.returncode == 0 and sha(missing) == rounds[1]["sha256"],
         "export works again once the checkpoint is restored")


def check_relative_paths(t, env):
    """A copy of the state directory whose stored paths are relative or stale."""
    moved = os.path.join(env.dir, "elsewhere", "state-copy")
    os.makedirs(os.path.join(moved, "checkpoints"))
    src = sqlite3.connect(os.path.join(env.state, "cohort.db"))
    dst = sqlite3.connect(os.path.join(moved, "cohort.db"))
    src.backup(dst)
    src.close()
    for f in os.listdir(os.path.join(env.state, "checkpoints")):
        shutil.copy(os.path.join(env.state, "checkpoints", f), os.path.join(moved, "checkpoints"))
    # round 1: relative to cohortd's directory (cohortd run as --state-dir state);
    # round 2: relative to the state directory; round 3: the old absolute path.
    dst.execute("UPDATE rounds SET checkpoint = 'state/checkpoints/round-000001.safetensors' "
                "WHERE round = 1")
    dst.execute("UPDATE rounds SET checkpoint = 'checkpoints/round-000002.safetensors' "
                "WHERE round = 2")
    dst.execute("UPDATE rounds SET checkpoint = '/nonexistent/state/checkpoints/"
                "round-000003.safetensors' WHERE round = 3")
    dst.commit()
    dst.close()
    out = os.path.join(env.dir, "rel.safetensors")
    for rnd in (1, 2, 3):
        if os.path.exists(out):
            os.remove(out)
        r = cli(env, "export", "--state-dir", "state-copy", "--round", str(rnd), "--out", out,
                cwd=os.path.join(env.dir, "elsewhere"))
        t.ok(r.returncode == 0 and os.path.exists(out) and sha(out) == sha(env.checkpoint(rnd)),
             "export finds round %d's checkpoint from a relative/moved state directory (%s)"
             % (rnd, r.stderr.strip()))


def check_usage(t, env):
    cases = [
        (["status"], 2, "--state-dir DIR is required"),
        (["status", "--state-dir", env.state, "--bogus"], 2, "unknown option '--bogus'"),
        (["status", "--state-dir", env.state, "extra"], 2, "unexpected argument 'extra'"),
        (["rounds", "--state-dir", env.state, "--limit", "-1"], 2, "--limit must be"),
        (["rounds", "--state-dir", env.state, "--limit", "x"], 2, "--limit must be"),
        (["clients", "--state-dir", env.state, "--limit", "3"], 2, "unknown option '--limit'"),
        (["status", "--state-dir", env.state, "--state-dir", env.state], 2, "given twice"),
        (["export", "--state-dir", env.state, "--round", "abc", "--out", "x"], 2,
         "--round must be"),
        (["export", "--state-dir", env.state, "--round", "1"], 2, "--out FILE are required"),
        (["export", "--state-dir", env.state, "--out", "x", "--round"], 2, "needs a value"),
        (["export", "--state-dir", env.state, "--round", "1", "--out", env.dir], 2,
         "is a directory"),
        (["status", "--state-dir", os.path.join(env.dir, "nope")], 1, "No such file"),
        (["status", "--state-dir", env.certs], 1, "holds no cohort.db"),
    ]
    for args, code, msg in cases:
        r = cli(env, *args)
        t.ok(r.returncode == code and msg in r.stderr,
             "cohort %s -> exit %d, %r (got %d, %r)" % (" ".join(a.replace(env.dir, "D")
                                                                for a in args),
                                                       code, msg, r.returncode,
                                                       r.stderr.strip()[:120]))
    r = cli(env, "rounds", "--help")
    t.ok(r.returncode == 0 and "--limit N" in r.stdout, "rounds --help exits 0 with usage")


def check_live(t, env):
    """cohortd holds the database open (WAL, waiting for clients); the CLI reads it."""
    srv = env.start_server(None, ["--rounds", str(ROUNDS + 5), "--min-clients", "3"],
                           log="cohortd-live.log")
    try:
        time.sleep(0.3)
        t.ok(os.path.exists(os.path.join(env.state, "cohort.db-wal")),
             "the live database has a WAL file")
        db = sqlite3.connect("file:%s?mode=ro" % os.path.join(env.state, "cohort.db"), uri=True)
        check_status(t, env, db, "live")
        db.close()
        r = cli(env, "rounds", "--state-dir", env.state, "--json")
        t.ok(r.returncode == 0, "rounds reads the live database")
    finally:
        srv.send_signal(signal.SIGTERM)
        t.ok(wait(srv, 30, "cohortd") == 0, "cohortd stops cleanly after the CLI read its store")


def main():
    t = Check("e2e-admin-cli")
    env = Env(os.environ.get("COHORT_BUILD", "build"), nclients=3, name="admin")
    try:
        run_federation(t, env)
        db = sqlite3.connect(os.path.join(env.state, "cohort.db"))
        check_status(t, env, db, "stopped")
        check_json(t, env, db)
        check_tables(t, env, db)
        db.close()
        check_live(t, env)
        db = sqlite3.connect(os.path.join(env.state, "cohort.db"))
        check_export(t, env, db)
        db.close()
        check_relative_paths(t, env)
        check_usage(t, env)
    finally:
        env.cleanup()
    t.done()


if __name__ == "__main__":
    main()
