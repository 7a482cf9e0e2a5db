/*
 * libcohort without a server: option validation, client creation failures,
 * run() argument checks, connection-refused back-off with max_attempts and
 * cohort_client_stop() during a back-off sleep. The protocol path (handshake,
 * rounds, updates) needs a TLS peer and is covered by the e2e tests.
 * Links libcohort's static library; peeks at the option struct through
 * client_int.h to check that a refused setter changed nothing.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "client_int.h"
#include "cohort.h"

/* A self-signed CA certificate. Loading it does not check its validity
 * period, so it never needs regenerating for these tests. */
static const char test_ca_pem[] =
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBcDCCARWgAwIBAgIUSVRACEeYaUJaWkBvj7Q5Ji3kdhIwCgYIKoZIzj0EAwIw\n"
    "DTELMAkGA1UEAwwCY2EwHhcNMjYxMTI3MTE1NTU1WhcNMjYxMjI3MTE1NTU1WjAN\n"
    "MQswCQYDVQQDDAJjYTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABEAbwwDcLY+v\n"
    "GkShqoNNKFSmEDdqlNcxVaSsd4aZl57zoCG5smTW5iv2CFPsLFRPkD0sXG+VUNLY\n"
    "KoaHOvLLK/ijUzBRMB0GA1UdDgQWBBSJ1QzmDFByzH7dcpe6PtdhuW1EqDAfBgNV\n"
    "HSMEGDAWgBSJ1QzmDFByzH7dcpe6PtdhuW1EqDAPBgNVHRMBAf8EBTADAQH/MAoG\n"
    "CCqGSM49BAMCA0kAMEYCIQCt67SSN8N9HW7Hipa3Y8l6uvJBRYoMhByOKZOCO3J5\n"
    "2gIhAKRPA8WqmLEgqiksTBeoy9iNb//8yBIqLTuPYeqKiA9X\n"
    "-----END CERTIFICATE-----\n";

struct fixture {
    char ca_path[64];
    int hold_fd;            /* bound, never listening: connects to it are refused */
    char server[32];
    int log_lines, connect_errors;
    char last_log[600];
};

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof *f);
    assert_non_null(f);
    snprintf(f->ca_path, sizeof f->ca_path, "/tmp/test_client_lib_XXXXXX");
    int fd = mkstemp(f->ca_path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, test_ca_pem, sizeof test_ca_pem - 1),
                     (ssize_t)(sizeof test_ca_pem - 1));
    close(fd);

    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof sa;
    f->hold_fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(f->hold_fd >= 0);
    assert_int_equal(bind(f->hold_fd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(getsockname(f->hold_fd, (struct sockaddr *)&sa, &sl), 0);
    snprintf(f->server, sizeof f->server, "127.0.0.1:%u", ntohs(sa.sin_port));
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    unlink(f->ca_path);
    close(f->hold_fd);
    free(f);
    return 0;
}

static void on_log(int level, const char *line, void *user)
{
    struct fixture *f = user;
    f->log_lines++;
    if (strncmp(line, "cannot connect to", 17) == 0)
        f->connect_errors++;
    snprintf(f->last_log, sizeof f->last_log, "%s", line);
}

static int train_never(struct cohort_round *r, void *user)
{
    fail_msg("the training callback must not run without a server");
    return 0;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static cohort_opts *base_opts(struct fixture *f)
{
    cohort_opts *o;
    assert_int_equal(cohort_opts_new(&o), 0);
    assert_int_equal(cohort_opts_set_server(o, f->server), 0);
    assert_int_equal(cohort_opts_set_tls(o, f->ca_path, NULL, NULL), 0);
    assert_int_equal(cohort_opts_set_log(o, on_log, f, COHORT_LOG_DEBUG), 0);
    return o;
}

static void test_version(void **state)
{
    char want[32];
    snprintf(want, sizeof want, "%d.%d.%d", COHORT_VERSION_MAJOR, COHORT_VERSION_MINOR,
             COHORT_VERSION_PATCH);
    assert_string_equal(cohort_version(), want);
    assert_string_equal(cohort_version(), "0.1.0");
}

static void test_server_address(void **state)
{
    cohort_opts *o;
    assert_int_equal(cohort_opts_new(&o), 0);
    assert_int_equal(cohort_opts_set_server(o, "[::1]:7000"), 0);
    assert_string_equal(o->host, "::1");
    assert_string_equal(o->port, "7000");
    assert_int_equal(cohort_opts_set_server(o, "fl.example.org:65535"), 0);
    assert_string_equal(o->host, "fl.example.org");
    assert_string_equal(o->port, "65535");

    static const char *const bad[] = {
        "", "host", "host:", "host:0", "host:65536", "host:7x", ":7000", "::1:7000",
        "[::1]7000", "[::1]", "[]:7000", "host:123456",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(cohort_opts_set_server(o, bad[i]), COHORT_EINVAL);
        /* A refused value leaves the previous one in place. */
        assert_string_equal(o->host, "fl.example.org");
        assert_string_equal(o->port, "65535");
    }
    assert_int_equal(cohort_opts_set_server(o, NULL), COHORT_EINVAL);
    assert_int_equal(cohort_opts_set_server(NULL, "a:1"), COHORT_EINVAL);
    cohort_opts_free(o);
    cohort_opts_free(NULL);
}

static void test_setters_validate(void **state)
{
    cohort_opts *o;
    assert_int_equal(cohort_opts_new(NULL), COHORT_EINVAL);
    assert_int_equal(cohort_opts_new(&o), 0);

    assert_int_equal(cohort_opts_set_tls(o, NULL, NULL, NULL), COHORT_EINVAL);
    assert_int_equal(cohort_opts_set_tls(o, "ca.pem", "c.pem", NULL), COHORT_EINVAL);
    assert_int_equal(cohort_opts_set_tls(o, "ca.pem", NULL, "k.pem"), COHORT_EINVAL);
    assert_int_equal(cohort_opts_set_tls(o, "", NULL, NULL), COHORT_EINVAL);
    assert_null(o->ca);
    assert_int_equal(cohort_opts_set_tls(o, "ca.pem", "c.pem", "k.pem"), 0);
    assert_string_equal(o->cert, "c.pem");

    assert_int_equal(cohort_opts_set_server_name(o, ""), COHORT_EINVAL);
    assert_int_equal(cohort_opts_set_server_name(o, "fl.example.org"), 0);
    assert_int_equal(cohort_opts_set_server_name(o, NULL), 0);
    assert_null(o->server_name);

    assert_int_equal(cohort_opts_set_reconnect(o, 0, 100, 1), COHORT_EINVAL);
    assert_int_equal(cohort_opts_set_reconnect(o, 200, 100, 1), COHORT_EINVAL);
    assert_int_equal(o->backoff_initial_ms, 200);
    assert_int_equal(o->backoff_max_ms, 10000);
    assert_int_equal(cohort_opts_set_reconnect(o, 50, 100, 3), 0);
    assert_int_equal(o->max_attempts, 3);

    assert_int_equal(cohort_opts_set_once(o, 2), COHORT_EINVAL);
    assert_int_equal(cohort_opts_set_once(o, 1), 0);

    assert_int_equal(cohort_opts_set_limits(o, 10, 1u << 20), COHORT_EINVAL);
    assert_int_equal(cohort_opts_set_limits(o, 1u << 20, 0), COHORT_EINVAL);
    assert_int_equal(o->max_frame_bytes, 8u << 20);
    assert_int_equal(cohort_opts_set_limits(o, 1u << 20, 1u << 24), 0);

    assert_int_equal(cohort_opts_set_chunk_bytes(o, 0), COHORT_EINVAL);
    assert_int_equal(cohort_opts_set_chunk_bytes(o, 1u << 30), COHORT_EINVAL);
    assert_int_equal(o->chunk_bytes, 256u << 10);
    assert_int_equal(cohort_opts_set_chunk_bytes(o, 65536), 0);

    assert_int_equal(cohort_opts_set_timeouts(o, 0, 1000), COHORT_EINVAL);
    assert_int_equal(cohort_opts_set_timeouts(o, 1000, 0), COHORT_EINVAL);
    assert_int_equal(o->connect_ms, 10000);
    assert_int_equal(o->io_timeout_ms, 60000);
    assert_int_equal(cohort_opts_set_timeouts(o, 500, 2000), 0);

    assert_int_equal(cohort_opts_set_log(o, NULL, NULL, 99), COHORT_EINVAL);
    assert_int_equal(cohort_opts_set_log(o, NULL, NULL, -1), COHORT_EINVAL);
    assert_int_equal(cohort_opts_set_log(o, NULL, NULL, COHORT_LOG_ERR), 0);
    assert_int_equal(cohort_opts_set_event_fn(NULL, NULL, NULL), COHORT_EINVAL);
    assert_int_equal(cohort_opts_set_num_examples(NULL, 1), COHORT_EINVAL);
    cohort_opts_free(o);
}

static void test_new_failures(void **state)
{
    struct fixture *f = *state;
    cohort_opts *o;
    cohort_client *c = NULL;
    assert_int_equal(cohort_opts_new(&o), 0);
    assert_int_equal(cohort_opts_set_log(o, on_log, f, COHORT_LOG_DEBUG), 0);
    assert_int_equal(cohort_client_new(&c, o), COHORT_EINVAL); /* no server */
    assert_int_equal(cohort_opts_set_server(o, f->server), 0);
    assert_int_equal(cohort_client_new(&c, o), COHORT_EINVAL); /* no CA */
    assert_int_equal(cohort_opts_set_tls(o, "/nonexistent/ca.pem", NULL, NULL), 0);
    f->log_lines = 0;
    assert_int_equal(cohort_client_new(&c, o), COHORT_ETLS);
    assert_null(c);
    /* Without a handle the reason goes to the log callback. */
    assert_int_equal(f->log_lines, 1);
    assert_non_null(strstr(f->last_log, "/nonexistent/ca.pem"));
    assert_int_equal(cohort_client_new(NULL, o), COHORT_EINVAL);
    assert_int_equal(cohort_client_new(&c, NULL), COHORT_EINVAL);
    cohort_opts_free(o);

    cohort_client_free(NULL);
    assert_string_equal(cohort_client_last_error(NULL), "");
}

static void test_run_args_and_stop_first(void **state)
{
    struct fixture *f = *state;
    cohort_opts *o = base_opts(f);
    assert_int_equal(cohort_opts_set_reconnect(o, 50, 100, 1), 0);
    cohort_client *c;
    assert_int_equal(cohort_client_new(&c, o), 0);
    cohort_opts_free(o); /* the client keeps its own copy */
    assert_string_equal(cohort_client_last_error(c), "");

    assert_int_equal(cohort_client_run(c, NULL, NULL), COHORT_EINVAL);
    assert_int_equal(cohort_client_run(NULL, train_never, NULL), COHORT_EINVAL);

    /* A stop before run ends that run at once, and only that one. */
    cohort_client_stop(c);
    double t0 = now_s();
    assert_int_equal(cohort_client_run(c, train_never, NULL), COHORT_ECANCELED);
    assert_true(now_s() - t0 < 0.1);

    f->connect_errors = 0;
    assert_int_equal(cohort_client_run(c, train_never, NULL), COHORT_ECONNREFUSED);
    assert_int_equal(f->connect_errors, 1);
    assert_non_null(strstr(cohort_client_last_error(c), "cannot connect to"));
    assert_non_null(strstr(cohort_client_last_error(c), f->server));

    struct cohort_stats st;
    cohort_client_stats(c, &st);
    assert_int_equal(st.connects, 0);
    assert_int_equal(st.rounds_offered, 0);
    cohort_client_free(c);
}

static void test_backoff_max_attempts(void **state)
{
    struct fixture *f = *state;
    cohort_opts *o = base_opts(f);
    assert_int_equal(cohort_opts_set_reconnect(o, 50, 100, 3), 0);
    cohort_client *c;
    assert_int_equal(cohort_client_new(&c, o), 0);
    cohort_opts_free(o);
    f->connect_errors = 0;
    double t0 = now_s();
    assert_int_equal(cohort_client_run(c, train_never, NULL), COHORT_ECONNREFUSED);
    double dt = now_s() - t0;
    assert_int_equal(f->connect_errors, 3);
    /* Two sleeps: 50 ms and 100 ms, each within +-25%. */
    assert_true(dt >= 0.75 * 0.150);
    assert_true(dt < 1.0);
    cohort_client_free(c);
}

static void *stop_later(void *arg)
{
    usleep(150 * 1000);
    cohort_client_stop(arg);
    return NULL;
}

static void test_stop_during_backoff(void **state)
{
    struct fixture *f = *state;
    cohort_opts *o = base_opts(f);
    assert_int_equal(cohort_opts_set_reconnect(o, 10000, 20000, 0), 0);
    cohort_client *c;
    assert_int_equal(cohort_client_new(&c, o), 0);
    cohort_opts_free(o);
    pthread_t th;
    double t0 = now_s();
    assert_int_equal(pthread_create(&th, NULL, stop_later, c), 0);
    assert_int_equal(cohort_client_run(c, train_never, NULL), COHORT_ECANCELED);
    double dt = now_s() - t0;
    pthread_join(th, NULL);
    assert_true(dt < 0.5);
    assert_string_equal(cohort_client_last_error(c), "stopped by cohort_client_stop()");
    cohort_client_free(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_version),
        cmocka_unit_test(test_server_address),
        cmocka_unit_test(test_setters_validate),
        cmocka_unit_test(test_new_failures),
        cmocka_unit_test(test_run_args_and_stop_first),
        cmocka_unit_test(test_backoff_max_attempts),
        cmocka_unit_test(test_stop_during_backoff),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
