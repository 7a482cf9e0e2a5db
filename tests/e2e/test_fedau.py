"""End to end FedAU: 5 clients with fixed updates and seeded Bernoulli
participation run 30 fedau rounds (cutoff K=4). Every checkpoint must equal
x_t + (eta/N) sum omega_n delta_n, with omega recomputed here from the
participation table alone (relative error < 1e-4), and the weight column must
hold the omega applied.

Then a fedavg run with --variance-correction: clients start from the same
global model, so the correction changes the average only a little (< 1%), and
every weight tensor's mean is kept and its variance equals the mean variance of
the participants' models (biases untouched)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from cohort_e2e import Check, Env, flat, rel_err, random_tensors, st_read, st_write, wait  # noqa

LAYOUT = [("fc1.weight", [12, 10]), ("fc1.bias", [12]), ("fc2.weight", [4, 12]), ("fc2.bias", [4])]
ROUNDS = 30
K = 4
ETA = 1.5


def fedau_omegas(statuses):
    """statuses: list over rounds of dict client -> accepted? Returns per-round weights."""
    state = {}
    weights = []
    for st in statuses:
        w = {}
        for c, acc in st.items():
            m, s, om = state.get(c, (0, 0, 0.0))
            if acc:
                w[c] = om if m > 0 else 1.0
        weights.append(w)
        for c, acc in st.items():
            m, s, om = state.get(c, (0, 0, 0.0))
            length = 0
            if acc:
                length = s + 1
            else:
                s += 1
                if s >= K:
                    length = K
            if length:
                om = (m * om + length) / (m + 1)
                m += 1
                s = 0
            state[c] = (m, s, om)
    return weights


def moments(v):
    n = len(v)
    mu = sum(v) / n
    return mu, sum((a - mu) ** 2 for a in v) / n


def fedau_run(t, build):
    env = Env(build, nclients=5, name="fedau")
    try:
        init, ups = env.model_files(LAYOUT, range(1, 6), 0.05)
        deltas = {"client-%d" % i: flat(st_read(p)) for i, p in enumerate(ups, 1)}
        srv = env.start_server(init, ["--rounds", str(ROUNDS), "--min-clients", "5",
                                      "--strategy", "fedau", "--fedau-cutoff", str(K),
                                      "--server-lr", str(ETA), "--round-timeout", "30"])
        cl = [env.start_client(i, ["--update", ups[i - 1], "--examples", str(10 * i),
                                   "--participation", "bernoulli:%.2f" % (0.2 + 0.15 * i),
                                   "--seed", str(100 + i)]) for i in range(1, 6)]
        t.ok(wait(srv, 120, "cohortd") == 0, "fedau: cohortd finishes %d rounds" % ROUNDS)
        for c in cl:
            wait(c, 30, "client")
        db = env.db()
        names = {i: n for i, n in db.execute("SELECT id, name FROM clients")}
        t.ok(len(names) == 5, "5 clients registered")
        statuses, recorded = [], []
        for r in range(1, ROUNDS + 1):
            rows = db.execute("SELECT client, status, weight FROM participation WHERE round=?",
                              (r,)).fetchall()
            st = {names[c]: False for c in names}
            rec = {}
            for c, s, w in rows:
                st[names[c]] = s == "accepted"
                if s == "accepted":
                    rec[names[c]] = w
            statuses.append(st)
            recorded.append(rec)
        omegas = fedau_omegas(statuses)
        t.ok(all(abs(recorded[r][c] - omegas[r][c]) < 1e-9 for r in range(ROUNDS) for c in omegas[r]),
             "the weight column holds the omega recomputed from the participation table")
        t.ok(any(w != 1.0 for o in omegas for w in o.values()), "omegas move away from 1")
        declined = sum(1 for st in statuses for a in st.values() if not a)
        t.ok(0 < declined < 5 * ROUNDS, "Bernoulli participation: %d of %d offers declined"
             % (declined, 5 * ROUNDS))
        worst = 0.0
        for r in range(1, ROUNDS + 1):
            x = flat(st_read(env.checkpoint(r - 1)))
            want = list(x)
            for c, w in omegas[r - 1].items():
                d = deltas[c]
                for j in range(len(want)):
                    want[j] += ETA / 5.0 * w * d[j]
            worst = max(worst, rel_err(flat(st_read(env.checkpoint(r))), want))
        t.ok(worst < 1e-4, "every checkpoint = x + (eta/N) sum omega delta (worst rel err %.2e)" % worst)
    finally:
        env.cleanup()


def vc_run(t, build):
    env = Env(build, nclients=3, name="vc")
    try:
        init = os.path.join(env.dir, "init.safetensors")
        st_write(init, random_tensors(0, LAYOUT, 1.0))
        ups = []
        for i in range(1, 4):
            p = os.path.join(env.dir, "u%d.safetensors" % i)
            st_write(p, random_tensors(20 + i, LAYOUT, 0.05 * i))
            ups.append(p)
        srv = env.start_server(init, ["--rounds", "1", "--min-clients", "3", "--weighting", "uniform",
                                      "--variance-correction"])
        cl = [env.start_client(i, ["--update", ups[i - 1], "--examples", "1"]) for i in range(1, 4)]
        t.ok(wait(srv, 60, "cohortd") == 0, "vc: cohortd finishes the round")
        for c in cl:
            wait(c, 30, "client")
        x = st_read(init)
        ds = [st_read(p) for p in ups]
        got = st_read(env.checkpoint(1))
        plain_all, got_all = [], []
        for name, (shape, xv) in x.items():
            ys = [[a + b for a, b in zip(xv, d[name][1])] for d in ds]
            plain = [sum(col) / 3 for col in zip(*ys)]
            g = got[name][1]
            plain_all += plain
            got_all += g
            if len(shape) >= 2:
                target = sum(moments(y)[1] for y in ys) / 3
                mu_p, _ = moments(plain)
                mu_g, var_g = moments(g)
                t.ok(abs(mu_g - mu_p) < 1e-5 and abs(var_g - target) / target < 1e-4,
                     "%s: mean kept, variance = mean participant variance (%.6g vs %.6g)"
                     % (name, var_g, target))
            else:
                t.ok(rel_err(g, plain) < 1e-6, "%s (1-D) is averaged but not rescaled" % name)
        diff = rel_err(got_all, plain_all)
        t.ok(0 < diff < 1e-2, "in federated mode the correction changes the model little "
             "(relative change %.2e)" % diff)
    finally:
        env.cleanup()


def main():
    t = Check("e2e-fedau")
    build = os.environ.get("COHORT_BUILD", "build")
    fedau_run(t, build)
    vc_run(t, build)
    t.done()


if __name__ == "__main__":
    main()
