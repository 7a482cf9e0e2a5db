/*
 * FedAU (algorithms.md): interval bookkeeping converges to 1/p, the cutoff
 * example gives intervals [1, 3], and a run stopped and restarted on its store
 * applies exactly the weights of an uninterrupted run.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "pstore.h"
#include "rng.h"
#include "server.h"
#include "strategies/fedau.h"
#include "strategy.h"

static double run_bernoulli(double p, int64_t cutoff, int rounds, uint64_t seed)
{
    struct coh_rng r;
    coh_rng_seed(&r, seed);
    struct fedau_client c = {0, 0, 0};
    for (int t = 0; t < rounds; t++)
        fedau_step(&c, coh_rng_uniform(&r) < p, cutoff);
    return c.omega;
}

static void test_bernoulli_unlimited(void **state)
{
    double om = run_bernoulli(0.1, 0, 100000, 7);
    if (fabs(om - 10.0) / 10.0 > 0.02)
        fail_msg("Omega %.4f is not within 2%% of 10", om);
}

static void test_bernoulli_cutoff_50(void **state)
{
    double want = (1.0 - pow(0.9, 50)) / 0.1; /* 9.948 */
    assert_true(fabs(want - 9.948) < 1e-3);
    double om = run_bernoulli(0.1, 50, 100000, 11);
    if (fabs(om - want) / want > 0.02)
        fail_msg("Omega %.4f is not within 2%% of %.4f", om, want);
}

static void test_cutoff_3_example(void **state)
{
    struct fedau_client c = {0, 0, 0};
    assert_true(fedau_weight(&c) == 1.0); /* no interval closed yet */
    fedau_step(&c, 1, 3);                 /* round 0: participates */
    assert_int_equal(c.m, 1);
    assert_true(c.omega == 1.0);          /* interval [1] */
    fedau_step(&c, 0, 3);
    fedau_step(&c, 0, 3);
    assert_int_equal(c.m, 1);
    assert_int_equal(c.s, 2);
    fedau_step(&c, 0, 3);                 /* third absence reaches K: interval of 3 closes */
    assert_int_equal(c.m, 2);
    assert_int_equal(c.s, 0);
    assert_true(c.omega == 2.0);          /* intervals [1, 3] */
    assert_true(fedau_weight(&c) == 2.0);
}

/* ---- restart: weights from the store ---- */

#define NCL 6
#define ROUNDS 40

static const char *names[NCL] = {"a", "b", "c", "d", "e", "f"};

static void open_all(const char *path, struct pstore **ps, struct strategy *st, int64_t ids[NCL])
{
    char err[256];
    assert_int_equal(pstore_open(ps, path, err, sizeof err), 0);
    static struct config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.strategy = "fedau";
    cfg.fedau_cutoff = 5;
    assert_int_equal(strategy_create(st, &cfg, *ps, err, sizeof err), 0);
    for (int i = 0; i < NCL; i++)
        assert_int_equal(pstore_client_seen(*ps, names[i], 1, &ids[i]), 0);
}

struct extra {
    struct strategy *st;
    struct round_ctx *ctx;
};

static int extra_commit(sqlite3 *db, void *arg)
{
    struct extra *e = arg;
    return e->st->ops->commit(e->st->state, e->ctx, db);
}

/* Runs rounds [from, to) and records each accepted client's weight. */
static void run_rounds(struct pstore *ps, struct strategy *st, const int64_t ids[NCL], int from,
                       int to, double w[ROUNDS][NCL], double div[ROUNDS])
{
    struct coh_rng r;
    for (int t = from; t < to; t++) {
        coh_rng_seed(&r, 1000 + (uint64_t)t); /* same draws whatever the restart point */
        struct part parts[NCL];
        memset(parts, 0, sizeof parts);
        struct round_ctx ctx = {.round = (uint64_t)t + 1, .parts = parts, .nparts = NCL,
                                .store = ps};
        assert_int_equal(st->ops->begin_round(st->state, &ctx), 0);
        int any = 0;
        for (int i = 0; i < NCL; i++) {
            parts[i].client_id = ids[i];
            double p = 0.1 + 0.15 * i;
            parts[i].status = coh_rng_uniform(&r) < p ? PART_ACCEPTED : PART_DECLINED;
            parts[i].train_loss = NAN;
            w[t][i] = 0;
            if (parts[i].status == PART_ACCEPTED) {
                any = 1;
                w[t][i] = st->ops->weight(st->state, &ctx, ids[i], 1);
            }
        }
        div[t] = 0;
        if (any)
            assert_int_equal(st->ops->finalize(st->state, &ctx, &div[t]), 0);
        char ck[32];
        snprintf(ck, sizeof ck, "ck-%d", t + 1);
        struct pstore_round pr = {.round = (uint64_t)t + 1, .strategy = "fedau",
                                  .mean_train_loss = NAN, .checkpoint = ck, .sha256 = "0"};
        struct extra e = {st, &ctx};
        assert_int_equal(pstore_commit_round(ps, &pr, parts, NCL, extra_commit, &e), 0);
    }
}

static void rm_db(const char *path)
{
    char p[128];
    unlink(path);
    snprintf(p, sizeof p, "%s-wal", path);
    unlink(p);
    snprintf(p, sizeof p, "%s-shm", path);
    unlink(p);
}

static void test_restart_gives_identical_weights(void **state)
{
    static double wa[ROUNDS][NCL], wb[ROUNDS][NCL], da[ROUNDS], db[ROUNDS];
    char pa[] = "/tmp/cohort-fedau-a-XXXXXX", pb[] = "/tmp/cohort-fedau-b-XXXXXX";
    close(mkstemp(pa));
    close(mkstemp(pb));
    rm_db(pa);
    rm_db(pb);
    struct pstore *ps;
    struct strategy st;
    int64_t ids[NCL];

    open_all(pa, &ps, &st, ids);
    run_rounds(ps, &st, ids, 0, ROUNDS, wa, da);
    strategy_destroy(&st);
    pstore_close(ps);

    open_all(pb, &ps, &st, ids);
    run_rounds(ps, &st, ids, 0, 17, wb, db);
    strategy_destroy(&st); /* the server stops ... */
    pstore_close(ps);
    open_all(pb, &ps, &st, ids); /* ... and starts again on the same store */
    run_rounds(ps, &st, ids, 17, ROUNDS, wb, db);
    strategy_destroy(&st);
    pstore_close(ps);

    int nontrivial = 0;
    for (int t = 0; t < ROUNDS; t++) {
        assert_true(da[t] == db[t]);
        for (int i = 0; i < NCL; i++) {
            if (wa[t][i] != wb[t][i])
                fail_msg("round %d client %d: weight %.17g vs %.17g after restart", t + 1, i,
                         wa[t][i], wb[t][i]);
            nontrivial |= wa[t][i] > 1.0;
        }
    }
    assert_true(nontrivial); /* the weights did move away from 1 */
    assert_true(da[ROUNDS - 1] == NCL || da[ROUNDS - 1] == 0); /* divisor N, not |S_t| */
    rm_db(pa);
    rm_db(pb);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bernoulli_unlimited),
        cmocka_unit_test(test_bernoulli_cutoff_50),
        cmocka_unit_test(test_cutoff_3_example),
        cmocka_unit_test(test_restart_gives_identical_weights),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
