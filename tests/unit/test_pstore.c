/* Participation store: rounds survive close and reopen, commits are atomic. */
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
#include "server.h"

static char path[64];

static int setup(void **state)
{
    snprintf(path, sizeof path, "/tmp/cohort-pstore-XXXXXX");
    int fd = mkstemp(path);
    close(fd);
    unlink(path);
    return 0;
}

static int teardown(void **state)
{
    char p[80];
    unlink(path);
    snprintf(p, sizeof p, "%s-wal", path);
    unlink(p);
    snprintf(p, sizeof p, "%s-shm", path);
    unlink(p);
    return 0;
}

static void commit(struct pstore *ps, uint64_t round, int64_t a, int64_t b, int expect_rc)
{
    struct part parts[2];
    memset(parts, 0, sizeof parts);
    parts[0].client_id = a;
    parts[0].status = PART_ACCEPTED;
    parts[0].num_examples = 100;
    parts[0].weight = 0.25;
    parts[0].train_loss = 0.5;
    parts[1].client_id = b;
    parts[1].status = PART_DECLINED;
    parts[1].train_loss = NAN;
    snprintf(parts[1].reason, sizeof parts[1].reason, "battery low");
    char ck[64];
    snprintf(ck, sizeof ck, "ck-%llu", (unsigned long long)round);
    struct pstore_round r = {.round = round, .strategy = "fedavg", .offered = 2,
                             .participants = 1, .mean_train_loss = 0.5, .checkpoint = ck,
                             .sha256 = "00"};
    int rc = pstore_commit_round(ps, &r, parts, 2, NULL, NULL);
    if (expect_rc == 0)
        assert_int_equal(rc, 0);
    else
        assert_true(rc < 0);
}

static int64_t count(struct pstore *ps, const char *sql)
{
    sqlite3_stmt *st;
    assert_int_equal(sqlite3_prepare_v2(pstore_db(ps), sql, -1, &st, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    int64_t n = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return n;
}

static void test_resume_after_reopen(void **state)
{
    struct pstore *ps;
    char err[256];
    assert_int_equal(pstore_open(&ps, path, err, sizeof err), 0);
    struct pstore_last last;
    assert_int_equal(pstore_last_round(ps, &last), 0);
    assert_false(last.found);
    int64_t a, b, a2;
    assert_int_equal(pstore_client_seen(ps, "client-1", 100, &a), 0);
    assert_int_equal(pstore_client_seen(ps, "client-2", 50, &b), 0);
    assert_int_equal(pstore_client_seen(ps, "client-1", 120, &a2), 0);
    assert_int_equal(a, a2); /* the same name is the same client */
    commit(ps, 1, a, b, 0);
    commit(ps, 2, a, b, 0);
    pstore_close(ps);

    assert_int_equal(pstore_open(&ps, path, err, sizeof err), 0);
    assert_int_equal(pstore_last_round(ps, &last), 0);
    assert_true(last.found);
    assert_int_equal(last.round, 2);
    assert_string_equal(last.checkpoint, "ck-2");
    uint64_t n;
    assert_int_equal(pstore_count_clients(ps, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(count(ps, "SELECT count(*) FROM participation WHERE status='accepted'"), 2);
    assert_int_equal(count(ps, "SELECT count(*) FROM participation WHERE status='declined' AND "
                               "reason='battery low'"), 2);
    assert_int_equal(count(ps, "SELECT connects FROM clients WHERE name='client-1'"), 2);
    pstore_close(ps);
}

static void test_failed_commit_writes_nothing(void **state)
{
    struct pstore *ps;
    char err[256];
    assert_int_equal(pstore_open(&ps, path, err, sizeof err), 0);
    int64_t a, b;
    assert_int_equal(pstore_client_seen(ps, "x", 1, &a), 0);
    assert_int_equal(pstore_client_seen(ps, "y", 1, &b), 0);
    commit(ps, 1, a, b, 0);
    /* A participation row naming an unknown client violates the foreign key: the
     * whole round must roll back, including its rounds row. */
    commit(ps, 2, a, 999, -1);
    struct pstore_last last;
    assert_int_equal(pstore_last_round(ps, &last), 0);
    assert_int_equal(last.round, 1);
    assert_int_equal(count(ps, "SELECT count(*) FROM participation WHERE round=2"), 0);
    /* Committing the same round twice is refused too. */
    commit(ps, 1, a, b, -1);
    assert_int_equal(count(ps, "SELECT count(*) FROM rounds"), 1);
    assert_int_equal(count(ps, "SELECT count(*) FROM pragma_integrity_check WHERE "
                               "integrity_check='ok'"), 1);
    pstore_close(ps);
}

static void test_meta(void **state)
{
    struct pstore *ps;
    char err[256], buf[64];
    assert_int_equal(pstore_open(&ps, path, err, sizeof err), 0);
    assert_int_equal(pstore_meta_get(ps, "schema_version", buf, sizeof buf), 1);
    assert_string_equal(buf, "1");
    assert_int_equal(pstore_meta_set(ps, "k", "v"), 0);
    assert_int_equal(pstore_meta_get(ps, "k", buf, sizeof buf), 1);
    assert_string_equal(buf, "v");
    pstore_close(ps);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_resume_after_reopen, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failed_commit_writes_nothing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_meta, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
