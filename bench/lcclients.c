/*
 * bench-lcclients: N real libcohort clients in one process, one thread each, each
 * with its own connection and certificate (DIR/client-i.pem, from `cohort certs`),
 * for the round and client benchmarks (bench/bench_server.py).
 *
 *   bench-lcclients --server H:P --ca CA.pem --certs DIR --clients N
 *                   [--first I] [--examples E] [--mode update|inplace]
 *
 * mode update (default): like `cohort client --update FILE`: every round the callback
 *   points params at one fixed random update (shared by all threads, made once) and
 *   sets out_is_update = 1; prefill is off, so no model is copied on the client side.
 * mode inplace: the callback "trains" in place (params[i] += small step) and the library
 *   computes trained minus global itself (two model buffers).
 * mode single: the same with cohort_opts_set_single_buffer(o, 1): one model buffer, the
 *   trained weights are sent and the server takes the difference: the smallest footprint
 *   an application can have, used for the client RSS figure.
 * mode baseline: makes one client (OpenSSL initialized, certificates loaded), prints
 *   the process's peak RSS and exits without connecting.
 * --upload-barrier: every round, no callback returns (so no upload starts) before all N
 *   clients have the model; the round's line then has t_release, when the last one
 *   got it. The ingest benchmark's window (t_release .. t_last_ack) then holds uploads
 *   only, sent by N client threads, as bench-tlsfloor --upload-only's are.
 *   Every client must take part in every round (cohortd --min-clients N).
 * The clients run until the server's RunEnd. Then one JSON line per round (the
 * clients' view: first callback, last ack, first RoundResult) and a summary with this
 * process's peak RSS (VmHWM).
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"
#include "cohort.h"

#define MAX_ROUNDS 64

struct rt {
    double first_train, last_train, first_ack, last_ack, first_result;
    double release;        /* --upload-barrier: when the last client had the model */
    double busy_at_result; /* the host's CPU seconds (bench_host_busy_s) at first_result */
    /* --server-pid: cohortd's loop thread on a CPU / waiting for one (schedstat, s)
     * and its VmHWM (KiB), read at first_result */
    double loop_cpu_at_result, loop_wait_at_result;
    long server_hwm_kib;
    int acks, refused;
    /* Every client's model-received and UpdateAck times, for round timelines
     * (bench/round_timeline.py); allocated for nclients in main. */
    double *t_models, *t_acks;
    int nmodels, nacks;
};

static struct rt rts[MAX_ROUNDS + 1];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static float *shared_update;
static size_t shared_numel;
static int inplace;
static int single;                 /* --mode single: inplace with one model buffer */
static double t0;
static int upload_barrier, nclients;
/* --server-pid: read at each round's result here, so the benchmark's script does not
 * poll /proc while rounds run (its polling cost about 1.5 % of the host's CPU). */
static int server_pid;

static void server_loop_times(double *on, double *wait)
{
    char path[64];
    unsigned long long a = 0, b = 0;
    snprintf(path, sizeof path, "/proc/%d/task/%d/schedstat", server_pid, server_pid);
    FILE *f = fopen(path, "r");
    if (f && fscanf(f, "%llu %llu", &a, &b) == 2) {
        *on = (double)a * 1e-9;
        *wait = (double)b * 1e-9;
    }
    if (f)
        fclose(f);
}

static long proc_kib(int pid, const char *field)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    long v = 0;
    size_t fl = strlen(field);
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, field, fl) == 0 && line[fl] == ':') {
            v = atol(line + fl + 1);
            break;
        }
    if (f)
        fclose(f);
    return v;
}

/* --upload-barrier: a barrier that gives up after two minutes (a client that failed or
 * reconnected mid-round would otherwise hold the others forever); once broken it stays
 * broken, and the summary says so. */
static pthread_mutex_t bmu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t bcv; /* on CLOCK_MONOTONIC: made in main */
static int b_count, b_broken;
static unsigned b_gen;

static void upload_barrier_wait(void)
{
    pthread_mutex_lock(&bmu);
    unsigned gen = b_gen;
    if (!b_broken && ++b_count == nclients) {
        b_count = 0;
        b_gen++;
        pthread_cond_broadcast(&bcv);
    }
    struct timespec dl;
    clock_gettime(CLOCK_MONOTONIC, &dl);
    dl.tv_sec += 120;
    while (gen == b_gen && !b_broken)
        if (pthread_cond_timedwait(&bcv, &bmu, &dl) == ETIMEDOUT && gen == b_gen) {
            b_broken = 1;
            pthread_cond_broadcast(&bcv);
        }
    pthread_mutex_unlock(&bmu);
}

struct th {
    pthread_t tid;
    int idx;
    cohort_client *c;
    int rc;
    char err[256];
};

static void on_event(const struct cohort_event *ev, void *user)
{
    double now = bench_now() - t0;
    if (ev->round > MAX_ROUNDS)
        return;
    pthread_mutex_lock(&mu);
    struct rt *r = &rts[ev->round];
    if (ev->kind == COHORT_EV_ROUND_RESULT) {
        if (r->first_result == 0 || now < r->first_result) {
            r->first_result = now;
            r->busy_at_result = bench_host_busy_s();
            if (server_pid) {
                server_loop_times(&r->loop_cpu_at_result, &r->loop_wait_at_result);
                r->server_hwm_kib = proc_kib(server_pid, "VmHWM");
            }
        }
    } else if (ev->kind == COHORT_EV_UPDATE_ACK) {
        if (ev->err == 0) {
            r->acks++;
            if (r->first_ack == 0 || now < r->first_ack)
                r->first_ack = now;
            if (r->t_acks && r->nacks < nclients)
                r->t_acks[r->nacks++] = now;
            if (now > r->last_ack)
                r->last_ack = now;
        } else {
            r->refused++;
        }
    }
    pthread_mutex_unlock(&mu);
}

static void print_times(const char *key, const double *t, int n)
{
    printf(", \"%s\": [", key);
    for (int i = 0; i < n; i++)
        printf("%s%.6f", i ? ", " : "", t[i]);
    printf("]");
}

static int train_body(struct cohort_round *r)
{
    double now = bench_now() - t0;
    if (r->round <= MAX_ROUNDS) {
        pthread_mutex_lock(&mu);
        struct rt *t = &rts[r->round];
        if (t->first_train == 0 || now < t->first_train)
            t->first_train = now;
        if (now > t->last_train)
            t->last_train = now;
        if (t->t_models && t->nmodels < nclients)
            t->t_models[t->nmodels++] = now;
        pthread_mutex_unlock(&mu);
    }
    if (inplace) {
        shared_numel = r->numel;
        for (size_t i = 0; i < r->numel; i++)
            r->params[i] += 1e-3f * (float)((int)(i % 7) - 3);
        return 0;
    }
    pthread_mutex_lock(&mu);
    if (!shared_update || shared_numel != r->numel) {
        free(shared_update);
        shared_numel = r->numel;
        shared_update = bench_alloc(r->numel * 4);
        bench_fill(shared_update, r->numel, 7);
    }
    pthread_mutex_unlock(&mu);
    r->params = shared_update; /* as `cohort client --update`: sent from here, no copy */
    r->out_is_update = 1;
    return 0;
}

static int train(struct cohort_round *r, void *user)
{
    (void)user;
    int rc = train_body(r);
    if (upload_barrier) {
        /* The release is when the last client arrives, taken before waiting: the thread
         * that wakes first is already encrypting by the time another reads a clock. */
        double now = bench_now() - t0;
        if (r->round <= MAX_ROUNDS) {
            pthread_mutex_lock(&mu);
            if (now > rts[r->round].release)
                rts[r->round].release = now;
            pthread_mutex_unlock(&mu);
        }
        upload_barrier_wait();
    }
    return rc;
}

static void *run(void *arg)
{
    struct th *t = arg;
    t->rc = cohort_client_run(t->c, train, NULL);
    if (t->rc < 0)
        snprintf(t->err, sizeof t->err, "%s", cohort_client_last_error(t->c));
    return NULL;
}

static long self_kib(const char *field)
{
    return proc_kib((int)getpid(), field);
}

int main(int argc, char **argv)
{
    const char *server = NULL, *ca = NULL, *certs = NULL, *mode = "update";
    int n = 1, first = 1;
    uint64_t examples = 100;
    for (int i = 1; i < argc; i += 2) {
        if (strcmp(argv[i], "--upload-barrier") == 0) {
            upload_barrier = 1;
            i--;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "bench-lcclients: %s needs a value\n", argv[i]);
            return 2;
        }
        if (strcmp(argv[i], "--server") == 0) server = argv[i + 1];
        else if (strcmp(argv[i], "--ca") == 0) ca = argv[i + 1];
        else if (strcmp(argv[i], "--certs") == 0) certs = argv[i + 1];
        else if (strcmp(argv[i], "--clients") == 0) n = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--first") == 0) first = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--examples") == 0) examples = strtoull(argv[i + 1], NULL, 10);
        else if (strcmp(argv[i], "--mode") == 0) mode = argv[i + 1];
        else if (strcmp(argv[i], "--server-pid") == 0) server_pid = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "bench-lcclients: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (!server || !ca || !certs || n < 1) {
        fprintf(stderr, "usage: bench-lcclients --server H:P --ca CA --certs DIR --clients N "
                        "[--first I] [--examples E] [--mode update|inplace|single] "
                        "[--upload-barrier] [--server-pid PID]\n");
        return 2;
    }
    single = strcmp(mode, "single") == 0;
    inplace = single || strcmp(mode, "inplace") == 0;
    if (strcmp(mode, "baseline") == 0) {
        /* The process with libcohort and OpenSSL initialized and one client made
         * (CA and certificate loaded), but no connection: the floor under the
         * client RSS figure. */
        char cert[1024], key[1024];
        snprintf(cert, sizeof cert, "%s/client-%d.pem", certs, first);
        snprintf(key, sizeof key, "%s/client-%d.key", certs, first);
        cohort_opts *o;
        cohort_client *c = NULL;
        int rc = cohort_opts_new(&o);
        if (rc == 0) rc = cohort_opts_set_server(o, server);
        if (rc == 0) rc = cohort_opts_set_tls(o, ca, cert, key);
        if (rc == 0) rc = cohort_client_new(&c, o);
        cohort_opts_free(o);
        printf("{\"name\": \"lc_baseline\", \"params\": {}, \"rc\": %d, \"maxrss_kib\": %ld}\n", rc,
               self_kib("VmHWM"));
        cohort_client_free(c);
        return rc < 0;
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    nclients = n;
    for (int r = 0; r <= MAX_ROUNDS; r++) {
        rts[r].t_models = calloc((size_t)n, sizeof(double));
        rts[r].t_acks = calloc((size_t)n, sizeof(double));
    }
    pthread_condattr_t cattr;
    pthread_condattr_init(&cattr);
    pthread_condattr_setclock(&cattr, CLOCK_MONOTONIC);
    pthread_cond_init(&bcv, &cattr);
    pthread_condattr_destroy(&cattr);
    t0 = bench_now();
    struct th *ths = calloc((size_t)n, sizeof *ths);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256u << 10);
    for (int i = 0; i < n; i++) {
        char cert[1024], key[1024];
        snprintf(cert, sizeof cert, "%s/client-%d.pem", certs, first + i);
        snprintf(key, sizeof key, "%s/client-%d.key", certs, first + i);
        cohort_opts *o;
        int rc = cohort_opts_new(&o);
        if (rc == 0) rc = cohort_opts_set_server(o, server);
        if (rc == 0) rc = cohort_opts_set_tls(o, ca, cert, key);
        if (rc == 0) rc = cohort_opts_set_num_examples(o, examples);
        if (rc == 0) rc = cohort_opts_set_reconnect(o, 50, 500, 50);
        if (rc == 0) rc = cohort_opts_set_event_fn(o, on_event, NULL);
        if (rc == 0 && !inplace) rc = cohort_opts_set_prefill(o, 0);
        if (rc == 0 && inplace && single) rc = cohort_opts_set_single_buffer(o, 1);
        if (rc == 0) rc = cohort_client_new(&ths[i].c, o);
        cohort_opts_free(o);
        if (rc < 0) {
            fprintf(stderr, "bench-lcclients: client %d: %s\n", first + i, cohort_strerror(rc));
            return 1;
        }
        ths[i].idx = first + i;
        pthread_create(&ths[i].tid, &attr, run, &ths[i]);
    }
    int failed = 0;
    const char *first_err = "";
    for (int i = 0; i < n; i++) {
        pthread_join(ths[i].tid, NULL);
        if (ths[i].rc < 0) {
            if (!failed)
                first_err = ths[i].err;
            failed++;
        }
    }
    double t1 = bench_now() - t0;
    long server_hwm = 0;
    for (int r = 1; r <= MAX_ROUNDS; r++) {
        struct rt *x = &rts[r];
        if (x->first_train == 0 && x->first_result == 0)
            continue;
        printf("{\"name\": \"lc_round\", \"params\": {\"N\": %d, \"P\": %zu, \"round\": %d}, "
               "\"acks\": %d, \"refused\": %d, \"t_first_train\": %.6f, \"t_last_train\": %.6f, "
               "\"t_first_ack\": %.6f, \"t_last_ack\": %.6f, \"t_result\": %.6f, "
               "\"host_busy_s\": %.3f",
               n, shared_numel, r, x->acks, x->refused, x->first_train, x->last_train,
               x->first_ack, x->last_ack, x->first_result, x->busy_at_result);
        if (upload_barrier)
            printf(", \"t_release\": %.6f", x->release);
        if (server_pid) {
            printf(", \"server_loop_cpu_s\": %.6f, \"server_loop_wait_s\": %.6f, "
                   "\"server_hwm_kib\": %ld", x->loop_cpu_at_result, x->loop_wait_at_result,
                   x->server_hwm_kib);
            if (x->server_hwm_kib > server_hwm)
                server_hwm = x->server_hwm_kib;
        }
        print_times("t_models", x->t_models, x->nmodels);
        print_times("t_acks", x->t_acks, x->nacks);
        printf("}\n");
    }
    printf("{\"name\": \"lc_summary\", \"params\": {\"N\": %d, \"mode\": \"%s\"}, \"failed\": %d, "
           "\"wall_s\": %.3f, \"t0_monotonic\": %.6f, \"maxrss_kib\": %ld, "
           "\"pid\": %d, \"server_hwm_kib\": %ld, \"barrier_broken\": %s, "
           "\"first_error\": \"",
           n, mode, failed, t1, t0, self_kib("VmHWM"), (int)getpid(), server_hwm,
           b_broken ? "true" : "false");
    for (const char *p = first_err; *p; p++)
        if (*p != '"' && *p != '\\' && (unsigned char)*p >= 0x20)
            putchar(*p);
    printf("\"}\n");
    for (int i = 0; i < n; i++)
        cohort_client_free(ths[i].c);
    free(ths);
    free(shared_update);
    return failed || b_broken ? 1 : 0;
}
