/*
 * `cohort sim --gossip`: gossip learning on Fashion-MNIST through the real
 * daemons (docs/gossip.md, algorithms.md "Variance-corrected averaging").
 *
 * For each compared method this spawns N `cohortd --mode gossip` processes on
 * 127.0.0.1, each seeded with its neighbours in one random K-regular graph, and
 * runs one trainer per node as a libcohort client thread of this process (the
 * trainer cannot tell its node from a federation server). The protocol is the
 * paper's: a node's local training steps start every --step-ms (+-20%, cohortd
 * --round-interval), each committed step is pushed to every neighbour (--fanout
 * 0), and a node merges once it holds a model from each of its K neighbours
 * (--merge-after K). Every node starts from its own random model. The methods:
 *   variance-corrected, plain   gossip with that --merge
 *   fl                          one cohortd (federation, FedAvg by examples) and
 *                               the same N trainers, one local step per round
 * All runs share the data split, the graph, the initial models and each
 * trainer's minibatch seed. The model a node hands its trainer before local
 * step s is kept every --eval-every steps and tested after the run, so the
 * figures are the nodes' test accuracy over local training steps.
 */
#include "sim_gossip.h"

#include <arpa/inet.h>
#include <cblas.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../trainer/fmnist.h"
#include "../trainer/nn.h"
#include "certs.h"
#include "cli.h"
#include "cohort.h"
#include "model.h"
#include "rng.h"
#include "safetensors.h"
#include "varcorr.h"

#define GS_MAX_NODES 1000
#define GS_STACK_BYTES (256 * 1024)
#define GS_TICKS_PER_STEP 10 /* the paper: a step every 8-12 ticks */

enum { M_VC = 0, M_PLAIN, M_FL, M_COUNT };
static const char *method_name[M_COUNT] = {"variance-corrected", "plain", "fl"};

struct gsim {
    int nodes, degree;
    double alpha, lr, beta, step_s;
    const char *arch, *out, *data_dir;
    uint64_t steps, local_steps, batch, eval_every, seed, test_examples;
    int methods[M_COUNT];
    int keep;
    char dir[4096], certs[4200], cohortd[4200];
    struct fmnist train, test;
    uint32_t **idx;
    size_t *nidx;
    int *adj;                       /* nodes * degree */
    size_t npoints;                 /* evaluation points */
};

struct run;

struct trainer {
    int index;
    struct run *run;
    cohort_client *c;
    pthread_t th;
    struct coh_rng rng;
    uint64_t trained;
    int finished;
    struct coh_model view;
    int have_view;
    float **snap;                   /* npoints snapshots (NULL: not taken) */
    int rc;
};

struct run {
    const struct gsim *g;
    int method;
    struct trainer *t;
    size_t numel;
    atomic_int ndone, failed;
    pthread_mutex_t mu;
    char why[512];
};

/* Accuracy figures of one method at each evaluation point. */
struct series {
    int ok;
    double *mean, *sd, *min, *max, *wstd;
    double seconds;
};

static volatile sig_atomic_t interrupted;

static void on_interrupt(int sig)
{
    interrupted = sig;
}

static uint64_t point_step(const struct gsim *g, size_t p)
{
    uint64_t s = (uint64_t)p * g->eval_every;
    return s > g->steps ? g->steps : s;
}

/* ---- processes ---- */

static pid_t spawn(char *const argv[], const char *logpath)
{
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    int fd = open(logpath, O_WRONLY | O_CREAT | O_TRUNC, 0640);
    if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
        close(fd);
    }
    setenv("OPENBLAS_NUM_THREADS", "1", 1);
    execv(argv[0], argv);
    fprintf(stderr, "cannot run %s: %s\n", argv[0], strerror(errno));
    _exit(127);
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void rm_rf(const char *path)
{
    nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static void stop_all(pid_t *pids, int n)
{
    for (int i = 0; i < n; i++)
        if (pids[i] > 0)
            kill(pids[i], SIGTERM);
    double end = cli_now_s() + 30;
    for (int i = 0; i < n; i++) {
        if (pids[i] <= 0)
            continue;
        int st;
        while (waitpid(pids[i], &st, WNOHANG) == 0) {
            if (cli_now_s() > end) {
                kill(pids[i], SIGKILL);
                waitpid(pids[i], &st, 0);
                break;
            }
            cli_sleep_ms(20, &interrupted);
        }
        pids[i] = 0;
    }
}

/* ---- set-up ---- */

/* Random K-regular graph (Steger-Wormald): pair random free stubs whenever they
 * join two distinct, not yet adjacent nodes; start over when no such pair is
 * left. Nearly uniform over K-regular graphs and quick for small K. */
static int adjacent(const struct gsim *g, const int *deg, int a, int b)
{
    for (int d = 0; d < deg[a]; d++)
        if (g->adj[a * g->degree + d] == b)
            return 1;
    return 0;
}

static int make_graph(struct gsim *g)
{
    int n = g->nodes, k = g->degree;
    g->adj = calloc((size_t)n * k, sizeof *g->adj);
    int *stubs = malloc((size_t)n * k * sizeof *stubs);
    int *deg = calloc((size_t)n, sizeof *deg);
    if (!g->adj || !stubs || !deg) {
        free(stubs);
        free(deg);
        return -1;
    }
    struct coh_rng rng;
    coh_rng_seed(&rng, g->seed * 0x9E3779B97F4A7C15ull + 11);
    for (int attempt = 0; attempt < 1000; attempt++) {
        int m = n * k;
        for (int i = 0; i < m; i++)
            stubs[i] = i / k;
        memset(deg, 0, (size_t)n * sizeof *deg);
        while (m > 0) {
            int found = 0;
            for (int tries = 0; tries < 100 && !found; tries++) {
                int i = (int)coh_rng_below(&rng, (uint64_t)m);
                int j = (int)coh_rng_below(&rng, (uint64_t)m);
                int a = stubs[i], b = stubs[j];
                if (i == j || a == b || adjacent(g, deg, a, b))
                    continue;
                g->adj[a * k + deg[a]++] = b;
                g->adj[b * k + deg[b]++] = a;
                /* Remove both stubs (the higher index first). */
                int hi = i > j ? i : j, lo = i > j ? j : i;
                stubs[hi] = stubs[--m];
                stubs[lo] = stubs[--m];
                found = 1;
            }
            if (!found) {
                /* Is any suitable pair left at all? */
                for (int i = 0; i < m && !found; i++)
                    for (int j = i + 1; j < m && !found; j++)
                        if (stubs[i] != stubs[j] && !adjacent(g, deg, stubs[i], stubs[j]))
                            found = 1;
                if (!found)
                    break;
            }
        }
        if (m == 0) {
            free(stubs);
            free(deg);
            return 0;
        }
    }
    free(stubs);
    free(deg);
    return -1;
}

static int make_certs(struct gsim *g)
{
    char nbuf[32];
    snprintf(nbuf, sizeof nbuf, "%d", g->nodes);
    char *cargv[] = {"certs", "--out", g->certs, "--clients", nbuf, "--peers", nbuf, NULL};
    return certs_main_quiet(7, cargv) == 0 ? 0 : -1;
}

static int make_models(struct gsim *g)
{
    char err[256], path[4400];
    for (int i = 0; i < g->nodes; i++) {
        struct coh_model m;
        if (nn_init_model(&m, g->arch, g->seed * 1000003u + 7919u * (uint64_t)i + 1, err,
                          sizeof err) < 0) {
            fprintf(stderr, "cohort sim: --arch: %s\n", err);
            return -1;
        }
        snprintf(path, sizeof path, "%s/init-%d.safetensors", g->dir, i);
        int rc = coh_st_save(path, &m, 0, NULL);
        coh_model_fini(&m);
        if (rc < 0) {
            fprintf(stderr, "cohort sim: cannot write %s\n", path);
            return -1;
        }
    }
    return 0;
}

/* ---- trainers ---- */

static void run_fail(struct run *run, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void run_fail(struct run *run, const char *fmt, ...)
{
    pthread_mutex_lock(&run->mu);
    if (!run->why[0]) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(run->why, sizeof run->why, fmt, ap);
        va_end(ap);
    }
    pthread_mutex_unlock(&run->mu);
    atomic_store(&run->failed, 1);
}

static void snapshot(struct trainer *t, const struct cohort_round *r)
{
    const struct gsim *g = t->run->g;
    uint64_t done = t->trained;
    size_t p;
    if (done % g->eval_every == 0)
        p = (size_t)(done / g->eval_every);
    else if (done == g->steps)
        p = g->npoints - 1;
    else
        return;
    if (p >= g->npoints || t->snap[p])
        return;
    float *s = malloc(r->numel * sizeof(float));
    if (!s) {
        run_fail(t->run, "out of memory for a snapshot");
        return;
    }
    memcpy(s, r->params, r->numel * sizeof(float));
    t->snap[p] = s;
}

static int on_round(struct cohort_round *r, void *user)
{
    struct trainer *t = user;
    struct run *run = t->run;
    const struct gsim *g = run->g;
    if (run->method != M_FL || t->index == 0)
        snapshot(t, r);
    if (t->trained >= g->steps) {
        if (!t->finished) {
            t->finished = 1;
            atomic_fetch_add(&run->ndone, 1);
        }
        /* A node whose neighbours stopped pushing would no longer merge and drift
         * towards its own labels, so a gossip trainer keeps training (without
         * snapshots) until every node has taken its last snapshot. A federation
         * ends the run itself after the last round. */
        if (run->method == M_FL || atomic_load(&run->ndone) >= g->nodes) {
            r->decline = 1;
            snprintf(r->decline_reason, sizeof r->decline_reason, "simulation: all steps done");
            if (run->method != M_FL)
                cohort_client_stop(t->c);
            return 0;
        }
    }
    if (!t->have_view) {
        coh_model_init(&t->view);
        for (size_t i = 0; i < r->ntensors; i++)
            if (coh_model_add(&t->view, r->tensors[i].name, r->tensors[i].ndim,
                              r->tensors[i].shape) < 0)
                return COHORT_ENOMEM;
        t->have_view = 1;
    }
    t->view.data = r->params;
    struct nn_train_cfg cfg = {.local_steps = (int)g->local_steps, .batch = (int)g->batch,
                               .lr = (float)g->lr};
    double loss = NAN;
    char err[256];
    if (nn_train(&t->view, &g->train, g->idx[t->index], g->nidx[t->index], &cfg, &t->rng, &loss,
                 err, sizeof err) < 0) {
        run_fail(run, "trainer %d: %s", t->index, err);
        t->view.data = NULL;
        return COHORT_EINVAL;
    }
    t->view.data = NULL;
    r->num_examples = g->nidx[t->index] ? g->nidx[t->index] : 1;
    r->train_loss = loss;
    t->trained++;
    return 0;
}

static void on_log(int level, const char *line, void *user)
{
    struct trainer *t = user;
    if (level <= COHORT_LOG_ERR)
        fprintf(stderr, "cohort sim: trainer %d: %s\n", t->index, line);
}

static void *trainer_thread(void *arg)
{
    struct trainer *t = arg;
    t->rc = cohort_client_run(t->c, on_round, t);
    if (t->rc < 0 && t->rc != COHORT_ECANCELED && !interrupted && !t->finished)
        run_fail(t->run, "trainer %d stopped: %s", t->index, cohort_client_last_error(t->c));
    return NULL;
}

/* ---- evaluation ---- */

struct eval_ctx {
    struct run *run;
    struct series *out;
    double *acc;                    /* npoints * nodes, NAN when no snapshot */
    double *wvar;
    atomic_size_t next;
    size_t njobs, nn;
    struct fmnist test;
    char err[256];
};

static void *eval_thread(void *arg)
{
    struct eval_ctx *e = arg;
    const struct gsim *g = e->run->g;
    struct coh_model view;
    coh_model_init(&view);
    struct trainer *t0 = &e->run->t[0];
    for (size_t i = 0; i < t0->view.ntensors; i++)
        coh_model_add(&view, t0->view.tensors[i].name, t0->view.tensors[i].ndim,
                      t0->view.tensors[i].shape);
    size_t j;
    while ((j = atomic_fetch_add(&e->next, 1)) < e->njobs) {
        size_t p = j / e->nn, n = j % e->nn;
        float *s = e->run->t[n].snap[p];
        if (!s)
            continue;
        view.data = s;
        double acc, loss;
        char err[256];
        if (nn_eval(&view, &e->test, &acc, &loss, err, sizeof err) == 0)
            e->acc[j] = acc;
        double mu, var;
        coh_vc_moments(s + view.tensors[0].offset, NULL, view.tensors[0].numel, &mu, &var);
        e->wvar[j] = var;
    }
    view.data = NULL;
    coh_model_fini(&view);
    (void)g;
    return NULL;
}

static int evaluate(struct run *run, struct series *out)
{
    const struct gsim *g = run->g;
    struct eval_ctx e;
    memset(&e, 0, sizeof e);
    e.run = run;
    e.nn = run->method == M_FL ? 1 : (size_t)g->nodes;
    e.njobs = g->npoints * e.nn;
    e.test = g->test;
    if (g->test_examples && g->test_examples < e.test.n)
        e.test.n = (size_t)g->test_examples;
    e.acc = malloc(e.njobs * sizeof *e.acc);
    e.wvar = malloc(e.njobs * sizeof *e.wvar);
    if (!e.acc || !e.wvar || !run->t[0].have_view) {
        free(e.acc);
        free(e.wvar);
        return -1;
    }
    for (size_t i = 0; i < e.njobs; i++)
        e.acc[i] = e.wvar[i] = NAN;
    pthread_t th[2];
    int nth = 0;
    for (int i = 0; i < 2; i++)
        if (pthread_create(&th[nth], NULL, eval_thread, &e) == 0)
            nth++;
    for (int i = 0; i < nth; i++)
        pthread_join(th[i], NULL);
    if (!nth)
        eval_thread(&e);
    out->mean = calloc(g->npoints, sizeof(double));
    out->sd = calloc(g->npoints, sizeof(double));
    out->min = calloc(g->npoints, sizeof(double));
    out->max = calloc(g->npoints, sizeof(double));
    out->wstd = calloc(g->npoints, sizeof(double));
    if (!out->mean || !out->sd || !out->min || !out->max || !out->wstd) {
        free(e.acc);
        free(e.wvar);
        return -1;
    }
    for (size_t p = 0; p < g->npoints; p++) {
        double s = 0, s2 = 0, mn = 1, mx = 0, wv = 0;
        size_t k = 0;
        for (size_t n = 0; n < e.nn; n++) {
            double a = e.acc[p * e.nn + n];
            if (isnan(a))
                continue;
            s += a;
            s2 += a * a;
            mn = a < mn ? a : mn;
            mx = a > mx ? a : mx;
            wv += e.wvar[p * e.nn + n];
            k++;
        }
        if (!k) {
            out->mean[p] = out->sd[p] = out->min[p] = out->max[p] = out->wstd[p] = NAN;
            continue;
        }
        double m = s / (double)k, v = s2 / (double)k - m * m;
        out->mean[p] = m;
        out->sd[p] = v > 0 ? sqrt(v) : 0;
        out->min[p] = mn;
        out->max[p] = mx;
        out->wstd[p] = sqrt(wv / (double)k);
    }
    free(e.acc);
    free(e.wvar);
    out->ok = 1;
    return 0;
}

/* ---- one method ---- */

static void add(char **av, int *n, const char *s)
{
    av[(*n)++] = strdup(s);
}

static int run_method(struct gsim *g, int method, struct series *out)
{
    char rdir[4400], path[4600], buf[64];
    snprintf(rdir, sizeof rdir, "%s/%s", g->dir, method_name[method]);
    rm_rf(rdir);
    if (mkdir(rdir, 0750) < 0) {
        fprintf(stderr, "cohort sim: cannot create %s: %s\n", rdir, strerror(errno));
        return -1;
    }
    int fl = method == M_FL;
    int nd = fl ? 1 : g->nodes;
    pid_t *pids = calloc((size_t)nd, sizeof *pids);
    int *ports = calloc((size_t)nd, sizeof *ports);
    struct run run;
    memset(&run, 0, sizeof run);
    run.g = g;
    run.method = method;
    pthread_mutex_init(&run.mu, NULL);
    run.t = calloc((size_t)g->nodes, sizeof *run.t);
    int rc = -1, started = 0;
    double t0 = cli_now_s();
    if (!pids || !ports || !run.t)
        goto out;
    for (int i = 0; i < nd; i++) {
        do
            ports[i] = cli_free_port();
        while (ports[i] <= 0);
        for (int j = 0; j < i; j++)
            if (ports[j] == ports[i])
                ports[i--] = 0; /* rare: draw again */
    }
    for (int i = 0; i < nd; i++) {
        if (!ports[i])
            continue;
        char *av[80];
        int n = 0;
        add(av, &n, g->cohortd);
        snprintf(buf, sizeof buf, "127.0.0.1:%d", ports[i]);
        add(av, &n, "--listen");
        add(av, &n, buf);
        snprintf(path, sizeof path, "%s/node-%d", rdir, i);
        add(av, &n, "--state-dir");
        add(av, &n, path);
        snprintf(path, sizeof path, "%s/init-%d.safetensors", g->dir, i);
        add(av, &n, "--model");
        add(av, &n, path);
        snprintf(path, sizeof path, "%s/ca.pem", g->certs);
        add(av, &n, "--ca");
        add(av, &n, path);
        snprintf(path, sizeof path, "%s/%s-%d.pem", g->certs, fl ? "server" : "peer", i + 1);
        if (fl)
            snprintf(path, sizeof path, "%s/server.pem", g->certs);
        add(av, &n, "--cert");
        add(av, &n, path);
        snprintf(path, sizeof path, "%s/%s-%d.key", g->certs, "peer", i + 1);
        if (fl)
            snprintf(path, sizeof path, "%s/server.key", g->certs);
        add(av, &n, "--key");
        add(av, &n, path);
        add(av, &n, "--durability");
        add(av, &n, "relaxed");
        add(av, &n, "--log-level");
        add(av, &n, "notice");
        add(av, &n, "--round-timeout");
        add(av, &n, "600");
        add(av, &n, "--idle-timeout-ms");
        add(av, &n, "3600000");
        if (fl) {
            snprintf(buf, sizeof buf, "%d", g->nodes);
            add(av, &n, "--min-clients");
            add(av, &n, buf);
            snprintf(buf, sizeof buf, "%" PRIu64, g->steps + 1);
            add(av, &n, "--rounds");
            add(av, &n, buf);
        } else {
            char peers[GS_MAX_NODES * 24 > 65536 ? 65536 : GS_MAX_NODES * 24];
            size_t pos = 0;
            peers[0] = '\0';
            for (int d = 0; d < g->degree; d++)
                pos += (size_t)snprintf(peers + pos, sizeof peers - pos, "%s127.0.0.1:%d",
                                        d ? "," : "", ports[g->adj[i * g->degree + d]]);
            add(av, &n, "--mode");
            add(av, &n, "gossip");
            add(av, &n, "--peers");
            add(av, &n, peers);
            add(av, &n, "--weighting");
            add(av, &n, "uniform");
            add(av, &n, "--merge");
            add(av, &n, method_name[method]);
            snprintf(buf, sizeof buf, "%g", g->beta);
            add(av, &n, "--merge-self-weight");
            add(av, &n, buf);
            snprintf(buf, sizeof buf, "%d", g->degree);
            add(av, &n, "--merge-after");
            add(av, &n, buf);
            add(av, &n, "--max-peers");
            add(av, &n, buf);
            add(av, &n, "--fanout");
            add(av, &n, "0");
            add(av, &n, "--peer-sample");
            add(av, &n, "0");
            add(av, &n, "--merge-timeout");
            add(av, &n, "0");
            add(av, &n, "--gossip-interval");
            add(av, &n, "86400");
            add(av, &n, "--peer-max-failures");
            add(av, &n, "1000000");
            snprintf(buf, sizeof buf, "%g", g->step_s);
            add(av, &n, "--round-interval");
            add(av, &n, buf);
        }
        av[n] = NULL;
        snprintf(path, sizeof path, "%s/node-%d.log", rdir, i);
        pids[i] = spawn(av, path);
        for (int k = 0; k < n; k++)
            free(av[k]);
        if (pids[i] < 0) {
            fprintf(stderr, "cohort sim: cannot start cohortd: %s\n", strerror(errno));
            goto out;
        }
    }
    for (int i = 0; i < nd; i++) {
        double end = cli_now_s() + 60;
        while (!cli_port_accepts(ports[i])) {
            int st;
            if (waitpid(pids[i], &st, WNOHANG) == pids[i] || cli_now_s() > end || interrupted) {
                pids[i] = 0;
                fprintf(stderr, "cohort sim: cohortd %d did not start; see %s/node-%d.log\n", i,
                        rdir, i);
                goto out;
            }
            cli_sleep_ms(20, &interrupted);
        }
    }
    /* Trainers: one libcohort client thread per node (fl: all on the one server). */
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, GS_STACK_BYTES);
    for (int i = 0; i < g->nodes; i++) {
        struct trainer *t = &run.t[i];
        t->index = i;
        t->run = &run;
        coh_rng_seed(&t->rng, g->seed * 6364136223846793005ull + 1442695040888963407ull * (i + 1));
        t->snap = calloc(g->npoints, sizeof *t->snap);
        cohort_opts *o = NULL;
        char ca[4400], cert[4400], key[4400], srv[64];
        snprintf(ca, sizeof ca, "%s/ca.pem", g->certs);
        snprintf(cert, sizeof cert, "%s/client-%d.pem", g->certs, i + 1);
        snprintf(key, sizeof key, "%s/client-%d.key", g->certs, i + 1);
        snprintf(srv, sizeof srv, "127.0.0.1:%d", ports[fl ? 0 : i]);
        if (!t->snap || cohort_opts_new(&o) < 0 || cohort_opts_set_server(o, srv) < 0 ||
            cohort_opts_set_tls(o, ca, cert, key) < 0 ||
            cohort_opts_set_num_examples(o, g->nidx[i]) < 0 ||
            cohort_opts_set_reconnect(o, 100, 2000, 0) < 0 ||
            cohort_opts_set_log(o, on_log, t, COHORT_LOG_ERR) < 0 ||
            cohort_client_new(&t->c, o) < 0) {
            cohort_opts_free(o);
            fprintf(stderr, "cohort sim: cannot set up trainer %d\n", i);
            goto stop;
        }
        cohort_opts_free(o);
        if (pthread_create(&t->th, &attr, trainer_thread, t) != 0) {
            fprintf(stderr, "cohort sim: cannot start trainer thread %d\n", i);
            goto stop;
        }
        started++;
    }
    pthread_attr_destroy(&attr);
    {
        double limit = (double)g->steps * (fl ? 2.0 : g->step_s * 4.0) + 300.0;
        double last = cli_now_s();
        while (atomic_load(&run.ndone) < g->nodes) {
            if (interrupted || atomic_load(&run.failed))
                break;
            if (cli_now_s() - t0 > limit) {
                run_fail(&run, "not done after %.0f s", limit);
                break;
            }
            int dead = -1;
            for (int i = 0; i < nd; i++) {
                int st;
                if (pids[i] > 0 && waitpid(pids[i], &st, WNOHANG) == pids[i]) {
                    pids[i] = 0;
                    if (!fl || atomic_load(&run.ndone) < g->nodes)
                        dead = i;
                }
            }
            if (dead >= 0 && !fl) {
                run_fail(&run, "cohortd of node %d exited; see %s/node-%d.log", dead, rdir, dead);
                break;
            }
            if (cli_now_s() - last >= 10) {
                last = cli_now_s();
                uint64_t mn = UINT64_MAX, mx = 0, sum = 0;
                for (int i = 0; i < g->nodes; i++) {
                    uint64_t k = run.t[i].trained;
                    mn = k < mn ? k : mn;
                    mx = k > mx ? k : mx;
                    sum += k;
                }
                fprintf(stderr, "cohort sim: %s: %.0f s, local steps per node min %" PRIu64
                        " mean %.1f max %" PRIu64 " of %" PRIu64 "\n",
                        method_name[method], cli_now_s() - t0, mn, (double)sum / g->nodes, mx,
                        g->steps);
            }
            cli_sleep_ms(100, &interrupted);
        }
    }
stop:
    for (int i = 0; i < started; i++)
        cohort_client_stop(run.t[i].c);
    for (int i = 0; i < started; i++)
        pthread_join(run.t[i].th, NULL);
    stop_all(pids, nd);
    out->seconds = cli_now_s() - t0;
    if (interrupted) {
        fprintf(stderr, "cohort sim: interrupted\n");
    } else if (atomic_load(&run.failed) || started < g->nodes) {
        fprintf(stderr, "cohort sim: %s failed: %s\n", method_name[method],
                run.why[0] ? run.why : "see the logs");
    } else {
        fprintf(stderr, "cohort sim: %s: %" PRIu64 " local steps per node in %.0f s; testing\n",
                method_name[method], g->steps, out->seconds);
        rc = evaluate(&run, out);
    }
out:
    for (int i = 0; run.t && i < g->nodes; i++) {
        struct trainer *t = &run.t[i];
        cohort_client_free(t->c);
        for (size_t p = 0; t->snap && p < g->npoints; p++)
            free(t->snap[p]);
        free(t->snap);
        if (t->have_view) {
            t->view.data = NULL;
            coh_model_fini(&t->view);
        }
    }
    if (pids)
        stop_all(pids, nd);
    free(run.t);
    free(pids);
    free(ports);
    pthread_mutex_destroy(&run.mu);
    if (!g->keep)
        rm_rf(rdir);
    return rc;
}

/* ---- output ---- */

static double first_reach(const struct gsim *g, const struct series *s, double level)
{
    for (size_t p = 0; p < g->npoints; p++)
        if (!isnan(s->mean[p]) && s->mean[p] >= level)
            return (double)point_step(g, p);
    return NAN;
}

static int write_outputs(const struct gsim *g, struct series *res)
{
    char path[4400];
    mkdir(g->out, 0755);
    for (int m = 0; m < M_COUNT; m++) {
        if (!res[m].ok)
            continue;
        snprintf(path, sizeof path, "%s/gossip-%s.csv", g->out, method_name[m]);
        FILE *f = fopen(path, "w");
        if (!f) {
            fprintf(stderr, "cohort sim: cannot write %s: %s\n", path, strerror(errno));
            return -1;
        }
        fprintf(f, "step,ticks,mean_accuracy,sd_accuracy,min_accuracy,max_accuracy,"
                   "weight_std\n");
        for (size_t p = 0; p < g->npoints; p++) {
            uint64_t s = point_step(g, p);
            if (isnan(res[m].mean[p]))
                continue;
            fprintf(f, "%" PRIu64 ",%" PRIu64 ",%.4f,%.4f,%.4f,%.4f,%.5f\n", s,
                    s * GS_TICKS_PER_STEP, res[m].mean[p], res[m].sd[p], res[m].min[p],
                    res[m].max[p], res[m].wstd[p]);
        }
        fclose(f);
    }
    snprintf(path, sizeof path, "%s/gossip-summary.csv", g->out);
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    fprintf(f, "method,steps_to_70,steps_to_80,final_mean_accuracy,final_sd_accuracy,seconds\n");
    printf("\n%-20s %12s %12s %14s %10s %8s\n", "method", "steps to 70%", "steps to 80%",
           "final accuracy", "spread", "seconds");
    for (int m = 0; m < M_COUNT; m++) {
        if (!res[m].ok)
            continue;
        double r70 = first_reach(g, &res[m], 0.70), r80 = first_reach(g, &res[m], 0.80);
        size_t last = g->npoints - 1;
        char c70[32] = "", c80[32] = ""; /* empty: not reached */
        if (!isnan(r70))
            snprintf(c70, sizeof c70, "%.0f", r70);
        if (!isnan(r80))
            snprintf(c80, sizeof c80, "%.0f", r80);
        fprintf(f, "%s,%s,%s,%.4f,%.4f,%.0f\n", method_name[m], c70, c80, res[m].mean[last],
                res[m].sd[last], res[m].seconds);
        char a[32], b[32];
        if (isnan(r70))
            snprintf(a, sizeof a, "> %" PRIu64, g->steps);
        else
            snprintf(a, sizeof a, "%.0f", r70);
        if (isnan(r80))
            snprintf(b, sizeof b, "> %" PRIu64, g->steps);
        else
            snprintf(b, sizeof b, "%.0f", r80);
        printf("%-20s %12s %12s %14.4f %10.4f %8.0f\n", method_name[m], a, b, res[m].mean[last],
               res[m].sd[last], res[m].seconds);
    }
    fclose(f);
    if (res[M_VC].ok && res[M_PLAIN].ok) {
        double a = first_reach(g, &res[M_VC], 0.70), b = first_reach(g, &res[M_PLAIN], 0.70);
        if (!isnan(a) && !isnan(b))
            printf("variance-corrected / plain local steps to 70%%: %.0f / %.0f = %.2f\n", a, b,
                   a / b);
        else if (!isnan(a))
            printf("variance-corrected reached 70%% after %.0f local steps; plain did not within "
                   "%" PRIu64 " (ratio < %.2f)\n", a, g->steps, a / (double)g->steps);
    }
    /* Plot: mean accuracy with a +-1 sd band per method, and the hidden layer's
     * weight spread (the vanishing-variance effect) on a second panel. */
    snprintf(path, sizeof path, "%s/gossip.gp", g->out);
    f = fopen(path, "w");
    if (!f)
        return -1;
    /* The terminal and output come from the command line (SVG, then PNG). */
    fprintf(f, "set datafile separator ','\n"
               "set multiplot layout 2,1\n"
               "set title 'Gossip learning, %d nodes, degree %d, Dirichlet %.2g, %s: mean test "
               "accuracy (band: +-1 sd over nodes)'\n"
               "set xlabel 'local training steps per node'\nset ylabel 'test accuracy'\n"
               "set key bottom right\nset grid\nset yrange [0:1]\n",
            g->nodes, g->degree, g->alpha, g->arch);
    const char *colors[M_COUNT] = {"#1f77b4", "#d62728", "#2ca02c"};
    int first = 1;
    fprintf(f, "plot ");
    for (int m = 0; m < M_COUNT; m++) {
        if (!res[m].ok)
            continue;
        fprintf(f, "%s'%s/gossip-%s.csv' skip 1 using 1:($3-$4):($3+$4) with filledcurves "
                   "fs transparent solid 0.2 lc rgb '%s' notitle, "
                   "'' skip 1 using 1:3 with lines lw 2 lc rgb '%s' title '%s'",
                first ? "" : ", ", g->out, method_name[m], colors[m], colors[m], method_name[m]);
        first = 0;
    }
    fprintf(f, "\nset title 'std of the first weight tensor (mean over nodes)'\n"
               "set ylabel 'weight std'\nset yrange [0:*]\nset key right center\nplot ");
    first = 1;
    for (int m = 0; m < M_COUNT; m++) {
        if (!res[m].ok)
            continue;
        fprintf(f, "%s'%s/gossip-%s.csv' skip 1 using 1:7 with lines lw 2 lc rgb '%s' "
                   "title '%s'", first ? "" : ", ", g->out, method_name[m], colors[m],
                method_name[m]);
        first = 0;
    }
    fprintf(f, "\nunset multiplot\n");
    fclose(f);
    char cmd[9000];
    snprintf(cmd, sizeof cmd,
             "gnuplot -e \"set terminal svg size 900,720 dynamic font 'sans,12'; "
             "set output '%s/gossip.svg'\" '%s/gossip.gp' 2>/dev/null",
             g->out, g->out);
    if (system("command -v gnuplot >/dev/null 2>&1") == 0 && system(cmd) == 0) {
        printf("plot: %s/gossip.svg", g->out);
        snprintf(cmd, sizeof cmd,
                 "gnuplot -e \"set terminal pngcairo size 900,720 font 'sans,10'; "
                 "set output '%s/gossip.png'\" '%s/gossip.gp' 2>/dev/null",
                 g->out, g->out);
        if (system(cmd) == 0)
            printf(", %s/gossip.png", g->out);
        printf("\n");
    } else {
        printf("gnuplot not available: plot script left in %s/gossip.gp\n", g->out);
    }
    printf("CSV: %s/gossip-<method>.csv, %s/gossip-summary.csv\n", g->out, g->out);
    return 0;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: cohort sim --gossip [options]\n"
            "\n"
            "Gossip learning on Fashion-MNIST through real cohortd --mode gossip daemons on\n"
            "127.0.0.1 (one per node, each with a trainer thread on its own Dirichlet share),\n"
            "compared with the same data run as a federation. Each node starts from its own\n"
            "random model. Output: mean and spread of the nodes' test accuracy over local steps.\n"
            "\n"
            "  --nodes N          gossip nodes (default 50)\n"
            "  --degree K         neighbours per node: random K-regular graph (default 8)\n"
            "  --alpha A          Dirichlet label split (default 0.5)\n"
            "  --arch A           softmax | mlp[:H] (default mlp:64)\n"
            "  --steps S          local training steps per node (default 500)\n"
            "  --local-steps K    SGD minibatches per local step (default 1)\n"
            "  --batch B          minibatch size (default 32)\n"
            "  --lr LR            learning rate (default 0.05)\n"
            "  --step-ms MS       a node's local steps start every MS ms +-20%% (default 1000)\n"
            "  --beta B           merge self-weight (default 0.5)\n"
            "  --methods LIST     of variance-corrected, plain, fl (default all three)\n"
            "  --eval-every E     test every E local steps (default 10)\n"
            "  --test-examples N  test on the first N test images (default 10000)\n"
            "  --seed S           data split, graph, models and minibatches (default 1)\n"
            "  --out DIR          CSV files and plot (default sim-gossip)\n"
            "  --data-dir DIR     Fashion-MNIST (default %s)\n"
            "  --keep             keep the state directories and logs of the nodes\n",
            FMNIST_DEFAULT_DIR);
}

static int parse_methods(const char *s, int *methods)
{
    memset(methods, 0, M_COUNT * sizeof *methods);
    char *copy = strdup(s), *save = NULL;
    if (!copy)
        return -1;
    int any = 0;
    for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        int found = 0;
        for (int m = 0; m < M_COUNT; m++)
            if (strcmp(t, method_name[m]) == 0)
                methods[m] = found = any = 1;
        if (!found) {
            fprintf(stderr, "cohort sim: unknown method '%s' (variance-corrected, plain, fl)\n",
                    t);
            free(copy);
            return -1;
        }
    }
    free(copy);
    return any ? 0 : -1;
}

int sim_gossip_main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"gossip", 0, 0, 'G'}, {"nodes", 1, 0, 'n'}, {"degree", 1, 0, 'k'},
        {"alpha", 1, 0, 'a'}, {"arch", 1, 0, 'A'}, {"steps", 1, 0, 's'},
        {"local-steps", 1, 0, 'l'}, {"batch", 1, 0, 'b'}, {"lr", 1, 0, 'L'},
        {"step-ms", 1, 0, 'T'}, {"beta", 1, 0, 'B'}, {"methods", 1, 0, 'M'},
        {"eval-every", 1, 0, 'e'}, {"test-examples", 1, 0, 'x'}, {"seed", 1, 0, 'r'},
        {"out", 1, 0, 'o'}, {"data-dir", 1, 0, 'd'}, {"keep", 0, 0, 'K'},
        {"help", 0, 0, 'h'}, {0, 0, 0, 0}};
    static struct gsim g;
    memset(&g, 0, sizeof g);
    g.nodes = 50;
    g.degree = 8;
    g.alpha = 0.5;
    g.arch = "mlp:64";
    g.steps = 500;
    g.local_steps = 1;
    g.batch = 32;
    g.lr = 0.05;
    g.step_s = 1.0;
    g.beta = 0.5;
    g.eval_every = 10;
    g.test_examples = 10000;
    g.seed = 1;
    g.out = "sim-gossip";
    g.data_dir = FMNIST_DEFAULT_DIR;
    for (int m = 0; m < M_COUNT; m++)
        g.methods[m] = 1;
    uint64_t u;
    double d;
    int o;
    optind = 1;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'G': break;
        case 'n':
            if (cli_u64("sim", "--nodes", optarg, 2, GS_MAX_NODES, &u) < 0)
                return 2;
            g.nodes = (int)u;
            break;
        case 'k':
            if (cli_u64("sim", "--degree", optarg, 1, 64, &u) < 0)
                return 2;
            g.degree = (int)u;
            break;
        case 'a':
            if (cli_double("sim", "--alpha", optarg, 1e-3, 1e6, &g.alpha) < 0)
                return 2;
            break;
        case 'A': g.arch = optarg; break;
        case 's':
            if (cli_u64("sim", "--steps", optarg, 1, 1000000, &g.steps) < 0)
                return 2;
            break;
        case 'l':
            if (cli_u64("sim", "--local-steps", optarg, 1, 100000, &g.local_steps) < 0)
                return 2;
            break;
        case 'b':
            if (cli_u64("sim", "--batch", optarg, 1, 100000, &g.batch) < 0)
                return 2;
            break;
        case 'L':
            if (cli_double("sim", "--lr", optarg, 0, 100, &g.lr) < 0)
                return 2;
            break;
        case 'T':
            if (cli_double("sim", "--step-ms", optarg, 1, 1e7, &d) < 0)
                return 2;
            g.step_s = d / 1000.0;
            break;
        case 'B':
            if (cli_double("sim", "--beta", optarg, 0, 1, &g.beta) < 0)
                return 2;
            break;
        case 'M':
            if (parse_methods(optarg, g.methods) < 0)
                return 2;
            break;
        case 'e':
            if (cli_u64("sim", "--eval-every", optarg, 1, 1000000, &g.eval_every) < 0)
                return 2;
            break;
        case 'x':
            if (cli_u64("sim", "--test-examples", optarg, 1, 10000, &g.test_examples) < 0)
                return 2;
            break;
        case 'r':
            if (cli_u64("sim", "--seed", optarg, 0, UINT64_MAX, &g.seed) < 0)
                return 2;
            break;
        case 'o': g.out = optarg; break;
        case 'd': g.data_dir = optarg; break;
        case 'K': g.keep = 1; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "cohort sim: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (g.degree >= g.nodes || (g.nodes * g.degree) % 2) {
        fprintf(stderr, "cohort sim: a %d-regular graph on %d nodes needs degree < nodes and an "
                        "even nodes * degree\n", g.degree, g.nodes);
        return 2;
    }
    g.npoints = (size_t)((g.steps + g.eval_every - 1) / g.eval_every) + 1;
    if (cli_find_cohortd(g.cohortd, sizeof g.cohortd) < 0) {
        fprintf(stderr, "cohort sim: cannot find cohortd (build it, or set COHORT_COHORTD)\n");
        return 1;
    }
    openblas_set_num_threads(1);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_interrupt);
    signal(SIGTERM, on_interrupt);
    char err[512];
    int rc = 1;
    struct series res[M_COUNT];
    memset(res, 0, sizeof res);
    snprintf(g.dir, sizeof g.dir, "/tmp/cohort-sim-gossip-XXXXXX");
    if (!mkdtemp(g.dir)) {
        fprintf(stderr, "cohort sim: cannot create a work directory: %s\n", strerror(errno));
        return 1;
    }
    snprintf(g.certs, sizeof g.certs, "%s/certs", g.dir);
    if (fmnist_load(g.data_dir, 1, &g.train, err, sizeof err) < 0 ||
        fmnist_load(g.data_dir, 0, &g.test, err, sizeof err) < 0) {
        fprintf(stderr, "cohort sim: %s\n", err);
        goto out;
    }
    g.idx = calloc((size_t)g.nodes, sizeof *g.idx);
    g.nidx = calloc((size_t)g.nodes, sizeof *g.nidx);
    char split[64];
    snprintf(split, sizeof split, "dirichlet:%.17g", g.alpha);
    if (!g.idx || !g.nidx ||
        fmnist_partition_all(&g.train, split, g.seed, g.nodes, g.idx, g.nidx, err,
                             sizeof err) < 0) {
        fprintf(stderr, "cohort sim: %s\n", err);
        goto out;
    }
    if (make_graph(&g) < 0) {
        fprintf(stderr, "cohort sim: cannot draw a %d-regular graph on %d nodes\n", g.degree,
                g.nodes);
        goto out;
    }
    if (make_certs(&g) < 0 || make_models(&g) < 0) {
        fprintf(stderr, "cohort sim: cannot prepare certificates and models in %s\n", g.dir);
        goto out;
    }
    fprintf(stderr, "cohort sim: %d nodes, degree %d, Dirichlet %g, %s, %" PRIu64 " local steps "
            "of %" PRIu64 "x%" PRIu64 " at lr %g every %.0f ms, beta %g; work dir %s\n",
            g.nodes, g.degree, g.alpha, g.arch, g.steps, g.local_steps, g.batch, g.lr,
            g.step_s * 1000, g.beta, g.dir);
    int ran = 0;
    for (int m = 0; m < M_COUNT && !interrupted; m++) {
        if (!g.methods[m])
            continue;
        if (run_method(&g, m, &res[m]) < 0)
            goto out;
        ran++;
    }
    if (interrupted || !ran)
        goto out;
    rc = write_outputs(&g, res) < 0 ? 1 : 0;
out:
    for (int m = 0; m < M_COUNT; m++) {
        free(res[m].mean);
        free(res[m].sd);
        free(res[m].min);
        free(res[m].max);
        free(res[m].wstd);
    }
    for (int i = 0; g.idx && i < g.nodes; i++)
        free(g.idx[i]);
    free(g.idx);
    free(g.nidx);
    free(g.adj);
    fmnist_free(&g.train);
    fmnist_free(&g.test);
    if (!g.keep)
        rm_rf(g.dir);
    else
        fprintf(stderr, "cohort sim: kept %s\n", g.dir);
    return interrupted ? 130 : rc;
}
