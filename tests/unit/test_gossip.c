/*
 * Gossip mode: the merge rule on hand-computed tensors (plain and
 * variance-corrected, beta 0.5 and 0), and the peer view (bounded, back-off,
 * dead peers dropped, peer exchange among many views).
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "gossip.h"
#include "model.h"
#include "peer.h"
#include "rng.h"
#include "varcorr.h"

#define TOL 1e-5

/* gossip.c reaches the round manager, which reaches main.c; none of it runs here. */
void server_shutdown(struct server *s, int done, const char *reason);
void server_stream_done(struct server *s);
int server_client_allowed(const struct server *s, const char *name);
void server_shutdown(struct server *s, int done, const char *reason)
{
    (void)s;
    (void)done;
    (void)reason;
}
void server_stream_done(struct server *s)
{
    (void)s;
}
int server_client_allowed(const struct server *s, const char *name)
{
    (void)s;
    (void)name;
    return 1;
}

/* The fixture of the merge tests. own: w[2x2] = 1 2 3 4, b[2] = 1 1;
 * received: r1 = w 3 2 1 0, b 3 3 and r2 = w 1 0 3 4, b 5 -1. out is what a
 * merge writes; the teardown frees it and own. */
struct merge_fix {
    struct coh_model own, out;
    float r1[6], r2[6];
    const float *recv[2];
};

static int merge_setup(void **state)
{
    struct merge_fix *fx = calloc(1, sizeof *fx);
    assert_non_null(fx);
    uint64_t sw[2] = {2, 2}, sb[1] = {2};
    coh_model_init(&fx->own);
    assert_int_equal(coh_model_add(&fx->own, "w", 2, sw), 0);
    assert_int_equal(coh_model_add(&fx->own, "b", 1, sb), 0);
    assert_int_equal(coh_model_alloc(&fx->own), 0);
    const float o[6] = {1, 2, 3, 4, 1, 1}, a[6] = {3, 2, 1, 0, 3, 3}, b[6] = {1, 0, 3, 4, 5, -1};
    memcpy(fx->own.data, o, sizeof o);
    memcpy(fx->r1, a, sizeof a);
    memcpy(fx->r2, b, sizeof b);
    fx->recv[0] = fx->r1;
    fx->recv[1] = fx->r2;
    *state = fx;
    return 0;
}

static int merge_teardown(void **state)
{
    struct merge_fix *fx = *state;
    coh_model_fini(&fx->out); /* zeroed when unused or already freed */
    coh_model_fini(&fx->own);
    free(fx);
    return 0;
}

static void expect(const struct coh_model *m, const double *want)
{
    for (size_t i = 0; i < m->numel; i++)
        assert_float_equal(m->data[i], want[i], TOL);
}

static void test_merge_plain_half(void **state)
{
    struct merge_fix *fx = *state;
    struct gossip_layer L[2];
    size_t nl = 99;
    assert_int_equal(gossip_merge(&fx->own, fx->recv, 2, 0.5, 0, 0, &fx->out, L, &nl), 0);
    /* 0.5 * own + 0.5 * (r1 + r2) / 2 */
    const double want[6] = {1.5, 1.5, 2.5, 3.0, 2.5, 1.0};
    expect(&fx->out, want);
    assert_int_equal(nl, 1); /* only the 2-D tensor is a weight tensor */
    assert_int_equal(L[0].tensor, 0);
    assert_float_equal(L[0].own, 1.25, TOL);        /* Var(1 2 3 4) */
    assert_float_equal(L[0].received, 1.875, TOL);  /* (1.25 + 2.5) / 2 */
    assert_float_equal(L[0].merged, 0.421875, TOL); /* Var(1.5 1.5 2.5 3) */
    assert_float_equal(L[0].after, 0.421875, TOL);  /* plain: no correction */
}

static void test_merge_corrected_half(void **state)
{
    struct merge_fix *fx = *state;
    struct gossip_layer L[2];
    size_t nl = 0;
    assert_int_equal(gossip_merge(&fx->own, fx->recv, 2, 0.5, 1, 0, &fx->out, L, &nl), 0);
    /* w: mean 2.125 kept, spread scaled by sqrt(1.875 / 0.421875) = 2 sqrt(10) / 3;
     * b (1-D) averaged only. */
    const double f = 2.0 * sqrt(10.0) / 3.0;
    const double want[6] = {2.125 - 0.625 * f, 2.125 - 0.625 * f, 2.125 + 0.375 * f,
                            2.125 + 0.875 * f, 2.5, 1.0};
    expect(&fx->out, want);
    assert_float_equal(want[0], 0.8073843, 1e-6);
    assert_float_equal(want[3], 3.9696620, 1e-6);
    double mu, var;
    coh_vc_moments(fx->out.data, NULL, 4, &mu, &var);
    assert_float_equal(mu, 2.125, TOL);
    assert_float_equal(var, 1.875, TOL);
    assert_float_equal(L[0].merged, 0.421875, TOL);
    assert_float_equal(L[0].after, 1.875, TOL);
}

static void test_merge_beta_zero(void **state)
{
    struct merge_fix *fx = *state;
    /* Plain, beta 0: the own model is dropped: the mean of the received ones. */
    assert_int_equal(gossip_merge(&fx->own, fx->recv, 2, 0.0, 0, 0, &fx->out, NULL, NULL), 0);
    const double plain[6] = {2, 1, 2, 2, 4, 1};
    expect(&fx->out, plain);
    coh_model_fini(&fx->out);
    /* Corrected, beta 0: w = (2 1 2 2), mean 1.75, Var 0.1875 -> 1.875: factor sqrt(10). */
    struct gossip_layer L[2];
    size_t nl = 0;
    assert_int_equal(gossip_merge(&fx->own, fx->recv, 2, 0.0, 1, 0, &fx->out, L, &nl), 0);
    const double f = sqrt(10.0);
    const double corr[6] = {1.75 + 0.25 * f, 1.75 - 0.75 * f, 1.75 + 0.25 * f, 1.75 + 0.25 * f,
                            4, 1};
    expect(&fx->out, corr);
    assert_float_equal(corr[1], -0.6217083, 1e-6);
    assert_float_equal(L[0].merged, 0.1875, TOL);
    assert_float_equal(L[0].after, 1.875, TOL);
    coh_model_fini(&fx->out);
    /* With 1-D tensors included, b (4 1) is rescaled to the mean variance of
     * (3 3) and (5 -1): (0 + 9) / 2 = 4.5 around its mean 2.5. */
    assert_int_equal(gossip_merge(&fx->own, fx->recv, 2, 0.0, 1, 1, &fx->out, L, &nl), 0);
    assert_int_equal(nl, 2);
    double mu, var;
    coh_vc_moments(fx->out.data + 4, NULL, 2, &mu, &var);
    assert_float_equal(mu, 2.5, TOL);
    assert_float_equal(var, 4.5, TOL);
    assert_float_equal(fx->out.data[4], 2.5 + 1.5 * sqrt(2.0), TOL);
}

static void test_merge_one_model_and_bad_args(void **state)
{
    struct merge_fix *fx = *state;
    /* m = 1 (r1 only), beta 0.5, corrected: w = (2 2 2 2) has no spread; eps keeps it finite. */
    assert_int_equal(gossip_merge(&fx->own, fx->recv, 1, 0.5, 1, 0, &fx->out, NULL, NULL), 0);
    assert_true(coh_model_all_finite(&fx->out));
    for (int i = 0; i < 4; i++)
        assert_float_equal(fx->out.data[i], 2.0, TOL);
    coh_model_fini(&fx->out);
    assert_int_not_equal(gossip_merge(&fx->own, fx->recv, 0, 0.5, 1, 0, &fx->out, NULL, NULL), 0);
    assert_int_not_equal(gossip_merge(&fx->own, fx->recv, 1, 1.5, 1, 0, &fx->out, NULL, NULL), 0);
}

static void test_view_bounded(void **state)
{
    (void)state;
    struct peer_view v;
    peer_view_init(&v, 4, "127.0.0.1:7000", "peer-0");
    const char *now = "2026-01-01T00:00:00.000Z";
    assert_int_equal(peer_view_add(&v, "127.0.0.1:7000", "x", 0, now, NULL), 0); /* self */
    assert_int_equal(peer_view_add(&v, "127.0.0.1:9", "peer-0", 0, now, NULL), 0); /* own name */
    assert_int_equal(peer_view_add(&v, "nonsense", "", 0, now, NULL), 0);
    assert_int_equal(peer_view_add(&v, "h:0", "", 0, now, NULL), 0);
    assert_int_equal(peer_view_add(&v, "h:1 2", "", 0, now, NULL), 0);
    char a[32];
    for (int i = 1; i <= 4; i++) {
        snprintf(a, sizeof a, "127.0.0.1:%d", 7000 + i);
        assert_int_equal(peer_view_add(&v, a, "", 0, now, NULL), 1);
    }
    /* Known: only the name is filled in. */
    struct peer *p = NULL;
    assert_int_equal(peer_view_add(&v, "127.0.0.1:7001", "peer-1", 0, now, &p), 0);
    assert_non_null(p);
    assert_string_equal(p->name, "peer-1");
    /* Full and healthy: a new peer is ignored. */
    assert_int_equal(peer_view_add(&v, "127.0.0.1:7005", "", 0, now, NULL), 0);
    assert_int_equal(v.n, 4);
    assert_null(peer_view_find(&v, "127.0.0.1:7005"));
    /* One failing peer makes room. */
    p = peer_view_find(&v, "127.0.0.1:7003");
    assert_int_equal(peer_view_failed(&v, p, 100.0, 5, NULL, NULL), 0);
    assert_int_equal(peer_view_add(&v, "127.0.0.1:7005", "", 0, now, NULL), 1);
    assert_int_equal(v.n, 4);
    assert_null(peer_view_find(&v, "127.0.0.1:7003"));
    assert_non_null(peer_view_find(&v, "127.0.0.1:7005"));
    peer_view_fini(&v);
}

static void test_view_backoff_and_drop(void **state)
{
    (void)state;
    struct peer_view v;
    peer_view_init(&v, 8, "127.0.0.1:7000", "peer-0");
    const char *now = "2026-01-01T00:00:00.000Z";
    assert_int_equal(peer_view_add(&v, "127.0.0.1:7001", "peer-1", 1, now, NULL), 1);
    assert_int_equal(peer_view_add(&v, "127.0.0.1:7002", "peer-2", 0, now, NULL), 1);
    struct peer *p = peer_view_find(&v, "127.0.0.1:7001");
    /* Back-off doubles: 1, 2, 4 s (no jitter without an rng). */
    assert_int_equal(peer_view_failed(&v, p, 10.0, 4, NULL, NULL), 0);
    assert_float_equal(p->next_try, 11.0, 1e-9);
    assert_int_equal(peer_view_failed(&v, p, 10.0, 4, NULL, NULL), 0);
    assert_float_equal(p->next_try, 12.0, 1e-9);
    /* A success resets it. */
    peer_view_ok(p, "2026-01-01T00:00:05.000Z");
    assert_int_equal(p->failures, 0);
    assert_float_equal(p->next_try, 0.0, 1e-9);
    assert_int_equal(p->exchanges, 1);
    assert_string_equal(p->last_seen, "2026-01-01T00:00:05.000Z");
    struct peer dropped;
    for (int i = 1; i <= 3; i++)
        assert_int_equal(peer_view_failed(&v, p, 20.0, 4, NULL, &dropped), 0);
    assert_float_equal(p->next_try, 24.0, 1e-9);
    /* The fourth failure in a row drops it (even a seed). */
    assert_int_equal(peer_view_failed(&v, p, 30.0, 4, NULL, &dropped), 1);
    assert_int_equal(v.n, 1);
    assert_null(peer_view_find(&v, "127.0.0.1:7001"));
    assert_string_equal(dropped.addr, "127.0.0.1:7001");
    assert_int_equal(dropped.failures, 4);
    assert_int_equal(dropped.exchanges, 1);
    /* The back-off is capped. */
    p = peer_view_find(&v, "127.0.0.1:7002");
    for (int i = 0; i < 20; i++)
        peer_view_failed(&v, p, 0.0, 0, NULL, NULL);
    assert_float_equal(p->next_try, PEER_BACKOFF_MAX_S, 1e-9);
    peer_view_fini(&v);
}

/* 40 nodes, each seeded with its ring successor only, exchange random samples
 * of 4 as pushes would: every view stays within its bound of 8 and nodes learn
 * peers they were not configured with. Then 5 nodes die: whoever picks them
 * records failures, and after 5 in a row they are gone from every view. */
#define NN 40
static void test_view_exchange(void **state)
{
    (void)state;
    static struct peer_view v[NN];
    char addr[NN][32], name[NN][32];
    const char *now = "2026-01-01T00:00:00.000Z";
    for (int i = 0; i < NN; i++) {
        snprintf(addr[i], sizeof addr[i], "127.0.0.1:%d", 8000 + i);
        snprintf(name[i], sizeof name[i], "peer-%d", i);
        peer_view_init(&v[i], 8, addr[i], name[i]);
    }
    for (int i = 0; i < NN; i++)
        assert_int_equal(peer_view_add(&v[i], addr[(i + 1) % NN], name[(i + 1) % NN], 1, now,
                                       NULL), 1);
    struct coh_rng rng;
    coh_rng_seed(&rng, 7);
    struct peer *sample[NN];
    for (int step = 0; step < 2000; step++) {
        int i = (int)coh_rng_below(&rng, NN);
        if (v[i].n == 0)
            continue;
        /* Push to one random peer of the view, with a sample of 4 others. */
        struct peer *to = &v[i].v[coh_rng_below(&rng, v[i].n)];
        int j = atoi(strrchr(to->addr, ':') + 1) - 8000;
        size_t k = peer_view_sample(&v[i], &rng, 4, to->addr, sample);
        assert_true(k <= 4);
        peer_view_add(&v[j], addr[i], name[i], 0, now, NULL);
        for (size_t q = 0; q < k; q++) {
            assert_string_not_equal(sample[q]->addr, to->addr);
            peer_view_add(&v[j], sample[q]->addr, sample[q]->name, 0, now, NULL);
        }
    }
    size_t learned = 0;
    for (int i = 0; i < NN; i++) {
        assert_true(v[i].n <= 8);
        assert_true(v[i].n >= 2);
        assert_null(peer_view_find(&v[i], addr[i]));
        learned += v[i].n;
    }
    assert_true(learned > 5 * NN); /* far beyond the one seed each */
    /* Nodes 0..4 die. */
    for (int round = 0; round < 50; round++) {
        for (int i = 5; i < NN; i++) {
            for (size_t q = 0; q < v[i].n;) {
                int j = atoi(strrchr(v[i].v[q].addr, ':') + 1) - 8000;
                if (j < 5) {
                    if (peer_view_failed(&v[i], &v[i].v[q], round, 5, &rng, NULL))
                        continue; /* removed: the same index holds the next peer */
                } else {
                    peer_view_ok(&v[i].v[q], now);
                }
                q++;
            }
        }
    }
    for (int i = 5; i < NN; i++) {
        for (int j = 0; j < 5; j++)
            assert_null(peer_view_find(&v[i], addr[j]));
        assert_true(v[i].n <= 8);
    }
    for (int i = 0; i < NN; i++)
        peer_view_fini(&v[i]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_merge_plain_half, merge_setup, merge_teardown),
        cmocka_unit_test_setup_teardown(test_merge_corrected_half, merge_setup, merge_teardown),
        cmocka_unit_test_setup_teardown(test_merge_beta_zero, merge_setup, merge_teardown),
        cmocka_unit_test_setup_teardown(test_merge_one_model_and_bad_args, merge_setup,
                                        merge_teardown),
        cmocka_unit_test(test_view_bounded),
        cmocka_unit_test(test_view_backoff_and_drop),
        cmocka_unit_test(test_view_exchange),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
