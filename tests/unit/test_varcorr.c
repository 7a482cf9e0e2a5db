/* Variance correction keeps each tensor's mean and sets its variance to the target. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "model.h"
#include "rng.h"
#include "varcorr.h"

#define N 4096
#define M 5

static void test_mean_kept_variance_set(void **state)
{
    static float models[M][N], avg[N];
    struct coh_rng r;
    coh_rng_seed(&r, 3);
    double target = 0;
    for (int j = 0; j < M; j++) {
        double sd = 0.05 * (j + 1);
        for (int i = 0; i < N; i++)
            models[j][i] = (float)(0.01 * j + sd * coh_rng_normal(&r));
        double mu, var;
        coh_vc_moments(models[j], NULL, N, &mu, &var);
        target += var / M;
    }
    for (int i = 0; i < N; i++) {
        double s = 0;
        for (int j = 0; j < M; j++)
            s += models[j][i];
        avg[i] = (float)(s / M);
    }
    double mu0, var0;
    coh_vc_moments(avg, NULL, N, &mu0, &var0);
    assert_true(var0 < target / 2); /* plain averaging shrinks the variance */
    coh_vc_rescale(avg, N, target, COH_VC_EPS);
    double mu1, var1;
    coh_vc_moments(avg, NULL, N, &mu1, &var1);
    if (fabs(mu1 - mu0) > 1e-6 || fabs(var1 - target) / target > 1e-5)
        fail_msg("mean %.9g -> %.9g, variance %.9g vs target %.9g", mu0, mu1, var1, target);
}

static void test_moments_of_sum_and_shift(void **state)
{
    static float x[N], d[N], y[N];
    struct coh_rng r;
    coh_rng_seed(&r, 5);
    for (int i = 0; i < N; i++) {
        x[i] = (float)(1000.0 + coh_rng_normal(&r)); /* large mean, unit spread */
        d[i] = (float)(0.5 * coh_rng_normal(&r));
        y[i] = x[i] + d[i];
    }
    double m1, v1, m2, v2;
    coh_vc_moments(x, d, N, &m1, &v1);
    coh_vc_moments(y, NULL, N, &m2, &v2);
    assert_true(fabs(m1 - m2) < 1e-4);
    assert_true(fabs(v1 - v2) / v2 < 1e-5);
    assert_true(fabs(v1 - 1.25) < 0.1);
}

static void test_zero_variance_guard(void **state)
{
    float w[8] = {2, 2, 2, 2, 2, 2, 2, 2};
    coh_vc_rescale(w, 8, 0.0, COH_VC_EPS);
    for (int i = 0; i < 8; i++)
        assert_true(w[i] == 2.0f); /* eps keeps 0/0 finite */
}

static void test_eligibility(void **state)
{
    struct coh_tensor w = {.ndim = 2, .numel = 6}, b = {.ndim = 1, .numel = 3},
                      s = {.ndim = 0, .numel = 1};
    assert_true(coh_vc_eligible(&w, 0));
    assert_false(coh_vc_eligible(&b, 0));
    assert_true(coh_vc_eligible(&b, 1));
    assert_false(coh_vc_eligible(&s, 1));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mean_kept_variance_set),
        cmocka_unit_test(test_moments_of_sum_and_shift),
        cmocka_unit_test(test_zero_variance_guard),
        cmocka_unit_test(test_eligibility),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
