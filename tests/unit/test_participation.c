/* Participation samplers: parsing, long-run frequencies, determinism. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "participation.h"

static double frequency(const char *spec_s, double p, int rounds, uint64_t seed)
{
    struct participation_spec spec;
    char err[200];
    assert_int_equal(participation_parse(spec_s, &spec, err, sizeof err), 0);
    struct participation pt;
    participation_init(&pt, &spec, p, seed);
    int n = 0;
    for (int i = 0; i < rounds; i++)
        n += participation_next(&pt);
    return (double)n / rounds;
}

static void test_parse(void **state)
{
    struct participation_spec s;
    char err[200];
    assert_int_equal(participation_parse("always", &s, err, sizeof err), 0);
    assert_int_equal(s.kind, PATTERN_ALWAYS);
    assert_int_equal(participation_parse("markov:0.2:0.1", &s, err, sizeof err), 0);
    assert_true(s.kind == PATTERN_MARKOV && s.p == 0.2 && s.a == 0.1 && s.p_given);
    assert_int_equal(participation_parse("cyclic:0.3:50", &s, err, sizeof err), 0);
    assert_true(s.period == 50);
    assert_int_equal(participation_parse("bernoulli", &s, err, sizeof err), 0);
    assert_false(s.p_given);
    const char *bad[] = {"sometimes", "bernoulli:0", "bernoulli:1.5", "bernoulli:x",
                         "bernoulli:0.5:3", "cyclic:0.5:1", "cyclic:0.5:2.5", "markov:0.5:0",
                         "always:1"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        if (participation_parse(bad[i], &s, err, sizeof err) == 0)
            fail_msg("'%s' was accepted", bad[i]);
}

static void test_long_run_frequencies(void **state)
{
    double f = frequency("bernoulli", 0.1, 200000, 1);
    assert_true(fabs(f - 0.1) < 0.005);
    f = frequency("markov", 0.1, 400000, 2);
    assert_true(fabs(f - 0.1) < 0.01);
    f = frequency("markov", 0.02, 400000, 3); /* b = 2.45 > 1: clamped, still p on average */
    assert_true(fabs(f - 0.02) < 0.005);
    f = frequency("cyclic", 0.1, 100000, 4);
    assert_true(fabs(f - 0.1) < 0.002);
    assert_true(frequency("always", -1, 1000, 5) == 1.0);
}

static void test_cyclic_shape(void **state)
{
    struct participation_spec spec;
    char err[200];
    assert_int_equal(participation_parse("cyclic:0.25:20", &spec, err, sizeof err), 0);
    struct participation pt;
    participation_init(&pt, &spec, -1, 9);
    int seq[200];
    for (int i = 0; i < 200; i++)
        seq[i] = participation_next(&pt);
    /* After the initial countdown the pattern repeats every 20 rounds, 5 active. */
    for (int i = 40; i < 180; i++)
        assert_int_equal(seq[i], seq[i + 20]);
    int on = 0;
    for (int i = 40; i < 60; i++)
        on += seq[i];
    assert_int_equal(on, 5);
}

static void test_same_seed_same_draws(void **state)
{
    struct participation_spec spec;
    char err[200];
    assert_int_equal(participation_parse("markov:0.3", &spec, err, sizeof err), 0);
    struct participation a, b, c;
    participation_init(&a, &spec, -1, 42);
    participation_init(&b, &spec, -1, 42);
    participation_init(&c, &spec, -1, 43);
    int differ = 0;
    for (int i = 0; i < 1000; i++) {
        int x = participation_next(&a), y = participation_next(&b), z = participation_next(&c);
        assert_int_equal(x, y);
        differ |= x != z;
    }
    assert_true(differ);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse),
        cmocka_unit_test(test_long_run_frequencies),
        cmocka_unit_test(test_cyclic_shape),
        cmocka_unit_test(test_same_seed_same_draws),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
