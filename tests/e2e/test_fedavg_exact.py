"""End to end: cohortd + 3 `cohort client --update` processes with fixed updates
and example counts 100/300/600, 2 rounds of FedAvg (client-3 with --single-buffer:
it sends trained weights and cohortd subtracts the global model); then the same run
against a cohortd that announces no accepts_weights (COHORTD_COMPAT_NO_WEIGHTS), where
client-3 must fall back to sending differences. Every checkpoint must equal
x + sum(n_i * d_i) / sum(n_i) (relative error < 1e-5) and the participation table
must hold 6 accepted rows with the applied weights."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from cohort_e2e import Check, Env, flat, rel_err, st_read, wait  # noqa

LAYOUT = [("fc1.weight", [16, 12]), ("fc1.bias", [16]), ("fc2.weight", [3, 16]), ("fc2.bias", [3])]
EXAMPLES = [100, 300, 600]


def run(t, compat):
    """One federation; compat: cohortd behaves like one from before accepts_weights, so
    the single-buffer client must keep two copies and send differences."""
    tag = " (server without accepts_weights)" if compat else ""
    env = Env(os.environ.get("COHORT_BUILD", "build"), nclients=3,
              name="fedavg-compat" if compat else "fedavg")
    if compat:
        os.environ["COHORTD_COMPAT_NO_WEIGHTS"] = "1"
    try:
        init, ups = env.model_files(LAYOUT, (1, 2, 3), 0.05)
        deltas = [flat(st_read(p)) for p in ups]
        srv = env.start_server(init, ["--rounds", "2", "--min-clients", "3",
                                      "--round-timeout", "30", "--chunk-bytes", "1024"])
        os.environ.pop("COHORTD_COMPAT_NO_WEIGHTS", None)
        # client-3 keeps one copy of the model: it adds its update to the received model
        # in place and sends the trained weights; cohortd subtracts the global model.
        clients = [env.start_client(i + 1, ["--update", ups[i], "--examples", str(EXAMPLES[i])]
                                    + (["--single-buffer"] if i == 2 else [])) for i in range(3)]
        t.ok(wait(srv, 60, "cohortd") == 0, "cohortd exits 0 after round 2" + tag)
        wl = [l for l in env.log().splitlines() if "comes as trained weights" in l]
        if compat:
            t.ok(wl == [], "client-3 sent differences to a server without accepts_weights "
                 "(got %s)" % wl)
        else:
            t.ok(len(wl) == 2 and all("client-3" in l for l in wl),
                 "client-3's two updates arrived as trained weights (%s)" % wl)
        for i, c in enumerate(clients):
            t.ok(wait(c, 30, "client") == 0, "client %d exits 0 when the run ends%s" % (i + 1, tag))

        x = flat(st_read(init))
        total = float(sum(EXAMPLES))
        step = [sum(EXAMPLES[i] * deltas[i][j] for i in range(3)) / total for j in range(len(x))]
        for r in (1, 2):
            x = [a + b for a, b in zip(x, step)]
            got = flat(st_read(env.checkpoint(r)))
            err = rel_err(got, x)
            t.ok(err < 1e-5, "checkpoint %d equals x + sum(n d)/sum(n) (rel err %.2e)%s"
                 % (r, err, tag))
        if compat:
            return
        db = env.db()
        rows = db.execute("SELECT p.round, c.name, p.status, p.num_examples, p.weight "
                          "FROM participation p JOIN clients c ON c.id = p.client "
                          "ORDER BY p.round, c.name").fetchall()
        t.ok(len(rows) == 6 and all(r[2] == "accepted" for r in rows),
             "6 accepted participation rows (got %s)" % [r[:3] for r in rows])
        want = {"client-%d" % (i + 1): (EXAMPLES[i], EXAMPLES[i] / total) for i in range(3)}
        t.ok(all(r[3] == want[r[1]][0] and abs(r[4] - want[r[1]][1]) < 1e-12 for r in rows),
             "each row holds its example count and the applied weight n_i/sum(n)")
        rounds = db.execute("SELECT round, participants, checkpoint, sha256 FROM rounds "
                            "ORDER BY round").fetchall()
        t.ok(all(r[2] == "checkpoints/round-%06d.safetensors" % r[0] for r in rounds),
             "checkpoint paths are stored relative to the state directory")
        t.ok([r[0] for r in rounds] == [0, 1, 2] and [r[1] for r in rounds] == [0, 3, 3],
             "rounds 0 (initial), 1 and 2 committed with 3 participants")
        import hashlib
        for r in rounds:
            with open(os.path.join(env.state, r[2]), "rb") as f:
                t.ok(hashlib.sha256(f.read()).hexdigest() == r[3],
                     "checkpoint of round %d matches its sha256 in the store" % r[0])
        t.ok(db.execute("PRAGMA integrity_check").fetchone()[0] == "ok", "integrity_check ok")
    finally:
        env.cleanup()


def main():
    t = Check("e2e-fedavg-exact")
    run(t, False)
    run(t, True)
    t.done()


if __name__ == "__main__":
    main()
