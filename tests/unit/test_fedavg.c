/*
 * FedAvg arithmetic through the real strategy and fold code:
 * x' = x + eta * sum a_n delta_n with examples, uniform and all weighting.
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

#include "fold.h"
#include "pstore.h"
#include "server.h"
#include "strategy.h"

#define P 1000
#define K 3

/* Runs one round's aggregation as round.c does and returns the new model. */
static void aggregate(const char *weighting, double eta, const uint64_t *examples,
                      const int *accepted, float x[P], float delta[K][P], struct pstore *ps,
                      double *applied)
{
    struct config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.strategy = "fedavg";
    cfg.weighting = (char *)weighting;
    cfg.server_lr = eta;
    struct strategy st;
    char err[256];
    assert_int_equal(strategy_create(&st, &cfg, ps, err, sizeof err), 0);
    struct part parts[K];
    memset(parts, 0, sizeof parts);
    float *acc = calloc(P, sizeof(float));
    struct round_ctx ctx = {.round = 1, .parts = parts, .nparts = K, .store = ps, .cfg = &cfg};
    int any = 0;
    for (int i = 0; i < K; i++) {
        parts[i].client_id = i + 1;
        parts[i].status = accepted[i] ? PART_ACCEPTED : PART_DECLINED;
        parts[i].num_examples = examples[i];
        if (!accepted[i])
            continue;
        any = 1;
        parts[i].raw_weight = st.ops->weight(st.state, &ctx, i + 1, examples[i]);
        fold_accumulate(acc, delta[i], P, (float)parts[i].raw_weight);
    }
    double divisor = 1;
    if (any)
        assert_int_equal(st.ops->finalize(st.state, &ctx, &divisor), 0);
    for (int i = 0; i < K; i++)
        applied[i] = parts[i].status == PART_ACCEPTED ? parts[i].raw_weight / divisor : 0;
    if (any)
        fold_apply(x, acc, P, (float)(eta / divisor));
    free(acc);
    strategy_destroy(&st);
}

static void fill(float x[P], float delta[K][P])
{
    for (int j = 0; j < P; j++) {
        x[j] = sinf((float)j) * 0.3f;
        for (int i = 0; i < K; i++)
            delta[i][j] = cosf((float)(j * (i + 2))) * 0.01f * (float)(i + 1);
    }
}

static double rel_err(const float *a, const double *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    return sqrt(num / den);
}

static float x[P], delta[K][P];
static double expect[P];

static void test_examples_weighting(void **state)
{
    fill(x, delta);
    const uint64_t ex[K] = {100, 300, 600};
    const int acc[K] = {1, 1, 1};
    for (int j = 0; j < P; j++)
        expect[j] = x[j] + (100.0 * delta[0][j] + 300.0 * delta[1][j] + 600.0 * delta[2][j]) / 1000.0;
    double w[K];
    aggregate("examples", 1.0, ex, acc, x, delta, NULL, w);
    assert_true(rel_err(x, expect, P) < 1e-6);
    assert_true(fabs(w[0] - 0.1) < 1e-12 && fabs(w[1] - 0.3) < 1e-12 && fabs(w[2] - 0.6) < 1e-12);
}

static void test_uniform_with_decline_and_server_lr(void **state)
{
    fill(x, delta);
    const uint64_t ex[K] = {100, 300, 600};
    const int acc[K] = {1, 0, 1};
    for (int j = 0; j < P; j++)
        expect[j] = x[j] + 2.0 * (delta[0][j] + delta[2][j]) / 2.0;
    double w[K];
    aggregate("uniform", 2.0, ex, acc, x, delta, NULL, w);
    assert_true(rel_err(x, expect, P) < 1e-6);
    assert_true(fabs(w[0] - 0.5) < 1e-12 && w[1] == 0 && fabs(w[2] - 0.5) < 1e-12);
}

static void test_all_weighting_divides_by_registered(void **state)
{
    char path[] = "/tmp/cohort-fedavg-XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    unlink(path);
    struct pstore *ps;
    char err[256];
    assert_int_equal(pstore_open(&ps, path, err, sizeof err), 0);
    int64_t id;
    const char *names[] = {"a", "b", "c", "d", "e"}; /* 5 registered, 2 take part */
    for (int i = 0; i < 5; i++)
        assert_int_equal(pstore_client_seen(ps, names[i], 10, &id), 0);
    fill(x, delta);
    const uint64_t ex[K] = {1, 1, 1};
    const int acc[K] = {1, 1, 0};
    for (int j = 0; j < P; j++)
        expect[j] = x[j] + (delta[0][j] + delta[1][j]) / 5.0;
    double w[K];
    aggregate("all", 1.0, ex, acc, x, delta, ps, w);
    assert_true(rel_err(x, expect, P) < 1e-6);
    assert_true(fabs(w[0] - 0.2) < 1e-12);
    pstore_close(ps);
    unlink(path);
}

static void test_empty_round_keeps_model(void **state)
{
    fill(x, delta);
    float before[P];
    memcpy(before, x, sizeof x);
    const uint64_t ex[K] = {1, 2, 3};
    const int acc[K] = {0, 0, 0};
    double w[K];
    aggregate("examples", 1.0, ex, acc, x, delta, NULL, w);
    assert_memory_equal(before, x, sizeof x);
}

static void test_unknown_weighting_refused(void **state)
{
    struct config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.strategy = "fedavg";
    cfg.weighting = "median";
    struct strategy st;
    char err[256] = "";
    assert_true(strategy_create(&st, &cfg, NULL, err, sizeof err) < 0);
    assert_non_null(strstr(err, "weighting"));
    cfg.strategy = "nope";
    assert_true(strategy_create(&st, &cfg, NULL, err, sizeof err) < 0);
    assert_non_null(strstr(err, "unknown strategy"));
}

/* The round's first fold overwrites the accumulator (whatever it held, NaN
 * included), later folds add, and the next model is computed in its place. */
static void test_fold_set_and_apply_into(void **state)
{
    const size_t n = 40000; /* several of fold.c's blocks and a partial one */
    float *acc = malloc(n * sizeof(float)), *d1 = malloc(n * sizeof(float)),
          *d2 = malloc(n * sizeof(float)), *xt = malloc(n * sizeof(float));
    assert_non_null(acc && d1 && d2 && xt);
    for (size_t i = 0; i < n; i++) {
        acc[i] = NAN;
        d1[i] = (float)((double)(i % 97) - 48.0) * 0.01f;
        d2[i] = (float)((double)(i % 13) - 6.0) * 0.1f;
        xt[i] = (float)(i % 31) * 0.25f;
    }
    fold_set(acc, d1, n, 3.0f);
    for (size_t i = 0; i < n; i++)
        assert_true(acc[i] == 3.0f * d1[i]);
    fold_accumulate(acc, d2, n, 5.0f);
    fold_apply_into(acc, xt, n, 0.125f);
    for (size_t i = 0; i < n; i++) {
        double want = (double)xt[i] + 0.125 * (3.0 * (double)d1[i] + 5.0 * (double)d2[i]);
        assert_true(fabs((double)acc[i] - want) <= 1e-6 * (fabs(want) + 1.0));
    }
    free(acc);
    free(d1);
    free(d2);
    free(xt);
}

/* Finite values whose weighted sum overflows are found before anything is folded;
 * the round's first fold never reads the accumulator (it may hold anything). */
static void test_fold_first_overflow(void **state)
{
    enum { N = 300 };
    float acc[N], d[N];
    for (int i = 0; i < N; i++) {
        acc[i] = 1.0f;
        d[i] = 0.5f;
    }
    assert_int_equal(fold_first_overflow(acc, d, N, 10.0f, 0), N);
    assert_int_equal(fold_first_overflow(acc, d, 0, 10.0f, 0), 0);
    /* In the first block of 64, at a block's edges, in the tail. */
    const int at[] = {0, 63, 64, 255, 256, 299};
    for (size_t k = 0; k < sizeof at / sizeof at[0]; k++) {
        d[at[k]] = 3e38f; /* finite, times 10 is not */
        assert_int_equal(fold_first_overflow(acc, d, N, 10.0f, 0), at[k]);
        assert_int_equal(fold_first_overflow(acc, d, N, 10.0f, 1), at[k]);
        assert_int_equal(fold_first_overflow(acc, d, N, 1.0f, 0), N); /* 3e38 + 1 is finite */
        d[at[k]] = 0.5f;
    }
    /* The sum overflows although the weighted update alone does not. */
    acc[100] = 3e38f;
    d[100] = 2e38f;
    assert_int_equal(fold_first_overflow(acc, d, N, 1.0f, 0), 100);
    /* The first fold ignores whatever the accumulator holds, NaN included. */
    acc[7] = NAN;
    assert_int_equal(fold_first_overflow(acc, d, N, 1.0f, 1), N);
    assert_int_equal(fold_first_overflow(acc, d, N, 1.0f, 0), 7);
}

/* The bound lets ordinary folds skip the element-by-element check and sends
 * folds near overflow through it: the result is the same as checking each. */
static void test_fold_checked(void **state)
{
    (void)state;
    enum { N = 300 };
    float acc[N], d[N], ref[N];
    for (int i = 0; i < N; i++) {
        acc[i] = NAN; /* the first fold must not read it */
        d[i] = (i % 2 ? -0.5f : 0.5f) * (float)(i % 7);
    }
    double bound = NAN;
    uint32_t dmax = coh_abs_bound_bits(d, N);
    assert_int_equal(fold_checked(acc, d, N, 4.0f, 1, dmax, &bound), N);
    assert_true(isfinite(bound) && bound >= 12.0); /* max |4 d| = 12; no check was run */
    for (int i = 0; i < N; i++)
        ref[i] = 4.0f * d[i];
    assert_memory_equal(acc, ref, sizeof acc);
    assert_int_equal(fold_checked(acc, d, N, 2.0f, 0, dmax, &bound), N);
    assert_true(isfinite(bound) && bound >= 18.0);
    for (int i = 0; i < N; i++)
        ref[i] += 2.0f * d[i];
    for (int i = 0; i < N; i++)
        assert_true(fabsf(acc[i] - ref[i]) <= 1e-5f);

    /* Near the top: 1e38 per fold, three folds still finite, the fourth not. Once
     * the bound cannot show the sum finite every fold is checked, and the one
     * that would overflow is refused with nothing written. */
    for (int i = 0; i < N; i++)
        d[i] = 1.0f;
    d[123] = 1e38f;
    dmax = coh_abs_bound_bits(d, N);
    bound = NAN;
    assert_int_equal(fold_checked(acc, d, N, 1.0f, 1, dmax, &bound), N);
    assert_true(isfinite(bound)); /* 1e38 < FLT_MAX / 2 */
    assert_int_equal(fold_checked(acc, d, N, 1.0f, 0, dmax, &bound), N);
    assert_true(isinf(bound)); /* 2e38: checked */
    assert_int_equal(fold_checked(acc, d, N, 1.0f, 0, dmax, &bound), N);
    assert_true(acc[123] > 2.9e38f && isfinite(acc[123]));
    memcpy(ref, acc, sizeof acc);
    assert_int_equal(fold_checked(acc, d, N, 1.0f, 0, dmax, &bound), 123);
    assert_memory_equal(acc, ref, sizeof acc);
    /* A small update after that is still checked (the bound is gone for the round). */
    for (int i = 0; i < N; i++)
        d[i] = 0.5f;
    assert_int_equal(fold_checked(acc, d, N, 1.0f, 0, coh_abs_bound_bits(d, N), &bound), N);
    assert_true(isinf(bound));
    /* A weight that makes one update overflow on its own: refused as the first fold. */
    d[299] = 3e38f;
    assert_int_equal(fold_checked(acc, d, N, 10.0f, 1, coh_abs_bound_bits(d, N), &bound), 299);
    /* A delta whose maximum is not finite (trained weights minus the model) is checked. */
    d[299] = INFINITY;
    assert_int_equal(fold_checked(acc, d, N, 1.0f, 1, coh_abs_bound_bits(d, N), &bound), 299);
}

/* Trained weights become a difference, and a bound on its magnitudes comes back. */
static void test_weights_to_delta_max(void **state)
{
    (void)state;
    enum { N = 40000 }; /* more than one block */
    float *u = malloc(N * sizeof *u), *xm = malloc(N * sizeof *xm);
    assert_non_null(u);
    assert_non_null(xm);
    for (int i = 0; i < N; i++) {
        u[i] = 1.0f;
        xm[i] = 0.75f;
    }
    u[33000] = -6.0f;
    float m;
    uint32_t b = fold_weights_to_delta(u, xm, N);
    memcpy(&m, &b, sizeof m);
    assert_true(m >= 6.75f && m <= 6.75f * (1.0f + 1.0f / 128));
    assert_true(u[0] == 0.25f && u[33000] == -6.75f);
    free(u);
    free(xm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_examples_weighting),
        cmocka_unit_test(test_uniform_with_decline_and_server_lr),
        cmocka_unit_test(test_all_weighting_divides_by_registered),
        cmocka_unit_test(test_empty_round_keeps_model),
        cmocka_unit_test(test_unknown_weighting_refused),
        cmocka_unit_test(test_fold_set_and_apply_into),
        cmocka_unit_test(test_fold_first_overflow),
        cmocka_unit_test(test_fold_checked),
        cmocka_unit_test(test_weights_to_delta_max),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
