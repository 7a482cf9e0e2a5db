/*
 * `cohort sim`: runs a federated experiment through the real server (see sim.h).
 *
 * One cohortd process per compared strategy, each with a fresh state directory;
 * N client threads in this process, each a libcohort client with its own
 * certificate. Every client is offered every round (cohortd --min-clients N), so
 * each client's participation sampler and minibatch rng advance identically
 * whatever the strategy: the draws are a function of --seed and the client
 * index only. Test accuracy is measured on the checkpoints cohortd writes,
 * while the run goes on; per-round participants and losses come from its store.
 */
#include "sim.h"
#include "sim_gossip.h"

#include <arpa/inet.h>
#include <cblas.h>
#include <ctype.h>
#include <errno.h>
#include <ftw.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
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
#include "participation.h"
#include "rng.h"
#include "safetensors.h"

#define SIM_MAX_CLIENTS 10000
#define SIM_MAX_SPECS 32
/* nn_train keeps its workspace on the heap. glibc carves static TLS out of each
 * thread's stack, and OpenBLAS alone has 60 KiB of it; a whole client (TLS, training
 * an MLP) was tested to run in 112 KiB, so 256 KiB leaves ample margin. */
#define SIM_STACK_BYTES (256 * 1024)
/* Long enough that a slow round never closes by deadline: a client missing a round
 * would shift its participation draws against the other runs. */
#define SIM_ROUND_TIMEOUT "600"

/* Independent rng streams derived from --seed. */
enum { STREAM_SPLIT = 1, STREAM_PROB, STREAM_PARTICIPATION, STREAM_BATCH };

struct spec {
    char text[96];                  /* as given, also the label in outputs */
    char tag[96];                   /* file-name safe form of text */
    char strategy[16];              /* fedavg | fedau */
    char weighting[16];             /* fedavg: examples | uniform | all */
    uint64_t cutoff;                /* fedau K, 0 = unlimited */
    double server_lr;
    int lr_set;
    int vc;
};

struct result {
    int ok;
    double final_acc, last_acc, mean_participants, seconds;
    double setup_s, eval_s;
    char csv[4400];
};

/* Everything shared read-only by the runs and their client threads. */
struct sim {
    uint64_t nclients, rounds, seed, local_steps, batch, eval_every, avg_last;
    double alpha, pbar, pmin, alpha_p, lr;
    const char *arch, *out;
    struct participation_spec pspec;
    int progress;                   /* 0 off, 1 live line (tty), 2 one line per 10 s */
    int ordered;                    /* uploads in client-index order (deterministic) */
    char dir[4096], cdir[4200], init[4200], cohortd[4200];
    int relaxed;                    /* cohortd knows --durability */
    struct fmnist train, test;
    uint32_t **idx;
    size_t *nidx;
    double *p;                      /* per-client participation probability */
};

struct run;

struct simclient {
    int index;                      /* 0-based; the certificate is client-(index+1) */
    struct run *run;
    cohort_client *c;
    pthread_t th;
    struct participation pt;
    struct coh_rng rng;             /* minibatch draws */
    uint64_t last_round;
    struct coh_model view;          /* the round's layout over r->params; built once */
    int have_view;
    int rc;
    pthread_cond_t turn;            /* signalled when this client may upload (under mu) */
    int waiting;
};

struct run {
    const struct sim *sim;
    const struct spec *spec;
    struct simclient *cl;
    FILE *log;
    pthread_mutex_t mu;
    char why[700];                  /* first failure (under mu) */
    char refusal[300];              /* first refused update (under mu) */
    atomic_int failed;
    atomic_int ndone;
    atomic_uint_fast64_t committed; /* last round committed, as client 0 heard it */
    atomic_uint participants;
    atomic_uint_fast64_t diverged, refused;
    /* Upload order (under mu). cohortd folds updates in arrival order, and float sums
     * depend on order, so updates go out in client-index order: an active client
     * sends only when every lower-index client has declined or been acknowledged.
     * Training still runs in parallel; only the short uploads queue. */
    int ordered;
    pthread_cond_t cv;              /* start-up: a client connected; or the run failed */
    uint64_t *dec_round;            /* last round each client decided on */
    uint8_t *dec_active;            /* ... and whether it sends an update in it */
    uint64_t *ack_round;            /* last round each client's update was settled */
    uint64_t front_round;
    size_t front;                   /* clients below it are settled in front_round */
    size_t nconnected;              /* clients that got Welcome (start-up order) */
};

static volatile sig_atomic_t interrupted;

static void on_interrupt(int sig)
{
    interrupted = sig;
}

/* A seed per (stream, client): splitmix64 of the mixed triple, so neighbouring
 * seeds and indices give unrelated streams. */
static uint64_t derive_seed(uint64_t seed, uint64_t stream, uint64_t i)
{
    uint64_t x = seed;
    uint64_t h = coh_splitmix64(&x);
    x = h ^ (stream * 0xD1B54A32D192ED03ull);
    h = coh_splitmix64(&x);
    x = h ^ (i * 0x9E3779B97F4A7C15ull);
    return coh_splitmix64(&x);
}

/* ---- strategy specs ------------------------------------------------------------------- */

static int parse_spec(const char *s, struct spec *sp)
{
    memset(sp, 0, sizeof *sp);
    sp->server_lr = 1.0;
    if (strlen(s) >= sizeof sp->text || !*s) {
        fprintf(stderr, "cohort sim: strategy spec '%s' is empty or too long\n", s);
        return -1;
    }
    snprintf(sp->text, sizeof sp->text, "%s", s);
    char buf[96];
    snprintf(buf, sizeof buf, "%s", s);
    char *save = NULL;
    char *tok = strtok_r(buf, ":", &save);
    if (!tok || (strcmp(tok, "fedavg") != 0 && strcmp(tok, "fedau") != 0)) {
        fprintf(stderr, "cohort sim: strategy spec '%s' must start with fedavg or fedau\n", s);
        return -1;
    }
    snprintf(sp->strategy, sizeof sp->strategy, "%s", tok);
    int is_fedavg = strcmp(tok, "fedavg") == 0, have_k = 0;
    if (is_fedavg)
        snprintf(sp->weighting, sizeof sp->weighting, "examples");
    int have_w = 0;
    while ((tok = strtok_r(NULL, ":", &save)) != NULL) {
        if (is_fedavg && (strcmp(tok, "examples") == 0 || strcmp(tok, "uniform") == 0 ||
                          strcmp(tok, "all") == 0) && !have_w) {
            snprintf(sp->weighting, sizeof sp->weighting, "%s", tok);
            have_w = 1;
        } else if (!is_fedavg && strncmp(tok, "K=", 2) == 0 && !have_k) {
            char opt[128];
            snprintf(opt, sizeof opt, "K in strategy spec '%s'", s);
            if (cli_u64("sim", opt, tok + 2, 1, 1000000000, &sp->cutoff) < 0)
                return -1;
            have_k = 1;
        } else if (strncmp(tok, "lr=", 3) == 0 && !sp->lr_set) {
            char opt[128];
            snprintf(opt, sizeof opt, "lr in strategy spec '%s'", s);
            if (cli_double("sim", opt, tok + 3, 1e-9, 1e6, &sp->server_lr) < 0)
                return -1;
            sp->lr_set = 1;
        } else if (strcmp(tok, "vc") == 0 && !sp->vc) {
            sp->vc = 1;
        } else {
            fprintf(stderr, "cohort sim: strategy spec '%s': unexpected or repeated part '%s' "
                            "(%s)\n", s, tok,
                    is_fedavg ? "fedavg takes examples|uniform|all, lr=ETA and vc"
                              : "fedau takes K=N, lr=ETA and vc");
            return -1;
        }
    }
    /* "fedau:K=50" -> "fedau_K50": safe in file names and in gnuplot titles. */
    size_t j = 0;
    for (const char *p = s; *p && j + 1 < sizeof sp->tag; p++) {
        if (*p == '=')
            continue;
        sp->tag[j++] = (*p == ':' || !(isalnum((unsigned char)*p) || *p == '.' || *p == '-'))
                           ? '_' : *p;
    }
    sp->tag[j] = '\0';
    return 0;
}

/* ---- processes and files -------------------------------------------------------------- */

/* Forks and execs argv with stdout and stderr to logpath (or a pipe when pipefd >= 0). */
static pid_t spawn(char *const argv[], const char *logpath, int pipefd)
{
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    /* Forked from the main thread, which lives until the sim ends: the child dies with us. */
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    int fd = pipefd;
    if (fd < 0 && logpath) {
        FILE *f = fopen(logpath, "w");
        fd = f ? fileno(f) : -1;
    }
    if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
    }
    /* The sim's threads already take both cores; cohortd's folds are tiny. */
    setenv("OPENBLAS_NUM_THREADS", "1", 1);
    execv(argv[0], argv);
    fprintf(stderr, "cannot run %s: %s\n", argv[0], strerror(errno));
    _exit(127);
}

/* cohortd --help, to learn which options this build has (the server evolves
 * alongside the sim). Returns a malloc'ed string or NULL. */
static char *cohortd_help(const char *cohortd)
{
    int p[2];
    if (pipe(p) < 0)
        return NULL;
    char *av[] = {(char *)cohortd, "--help", NULL};
    pid_t pid = spawn(av, NULL, p[1]);
    close(p[1]);
    if (pid < 0) {
        close(p[0]);
        return NULL;
    }
    size_t cap = 65536, len = 0;
    char *buf = malloc(cap);
    ssize_t n;
    while (buf && len + 1 < cap && (n = read(p[0], buf + len, cap - 1 - len)) != 0) {
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            break;
        len += (size_t)n;
    }
    close(p[0]);
    int st;
    waitpid(pid, &st, 0);
    if (buf)
        buf[len] = '\0';
    return buf;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    return remove(path) < 0 && errno != ENOENT ? -1 : 0;
}

static int rm_rf(const char *path)
{
    struct stat st;
    if (lstat(path, &st) < 0)
        return errno == ENOENT ? 0 : -1;
    return nftw(path, rm_entry, 32, FTW_DEPTH | FTW_PHYS);
}

static void print_log_tail(const char *path, int lines)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    char *ring[64] = {0};
    if (lines > 64)
        lines = 64;
    char buf[1024];
    int n = 0;
    while (fgets(buf, sizeof buf, f)) {
        free(ring[n % lines]);
        ring[n % lines] = strdup(buf);
        n++;
    }
    fclose(f);
    int start = n > lines ? n - lines : 0;
    if (n > 0)
        fprintf(stderr, "--- last lines of %s ---\n", path);
    for (int i = start; i < n; i++) {
        const char *l = ring[i % lines];
        if (l)
            fprintf(stderr, "  %s%s", l, l[strlen(l) - 1] == '\n' ? "" : "\n");
    }
    for (int i = 0; i < lines; i++)
        free(ring[i]);
}

/* ---- the client threads --------------------------------------------------------------- */

__attribute__((format(printf, 2, 3)))
static void run_fail(struct run *run, const char *fmt, ...)
{
    pthread_mutex_lock(&run->mu);
    if (!atomic_load(&run->failed)) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(run->why, sizeof run->why, fmt, ap);
        va_end(ap);
        atomic_store(&run->failed, 1);
        pthread_cond_broadcast(&run->cv);   /* the start-up wait */
        for (size_t i = 0; run->cl && i < run->sim->nclients; i++)
            if (run->cl[i].waiting)
                pthread_cond_signal(&run->cl[i].turn);
    }
    pthread_mutex_unlock(&run->mu);
}

static int settled(const struct run *run, size_t j, uint64_t r)
{
    return run->dec_round[j] > r ||
           (run->dec_round[j] == r && (!run->dec_active[j] || run->ack_round[j] >= r));
}

/* Moves the frontier of round r past settled clients; call under mu. */
static void advance(struct run *run, uint64_t r)
{
    if (r < run->front_round)
        return;
    if (r > run->front_round) {
        run->front_round = r;
        run->front = 0;
    }
    while (run->front < run->sim->nclients && settled(run, run->front, r))
        run->front++;
    /* Only the client at the frontier may go on; waking just it saves the
     * scheduler from stampedes of 25 waiters per acknowledgement. */
    if (run->front < run->sim->nclients && run->cl[run->front].waiting)
        pthread_cond_signal(&run->cl[run->front].turn);
}

static void publish(struct simclient *sc, uint64_t r, int active)
{
    struct run *run = sc->run;
    pthread_mutex_lock(&run->mu);
    run->dec_round[sc->index] = r;
    run->dec_active[sc->index] = (uint8_t)active;
    advance(run, r);
    pthread_mutex_unlock(&run->mu);
}

/* Blocks until every lower-index client is settled in round r (or the run failed). */
static void wait_turn(struct simclient *sc, uint64_t r)
{
    struct run *run = sc->run;
    if (!run->ordered)
        return;
    pthread_mutex_lock(&run->mu);
    advance(run, r);
    sc->waiting = 1;
    while (!atomic_load(&run->failed) && run->front_round == r && run->front < (size_t)sc->index)
        pthread_cond_wait(&sc->turn, &run->mu);
    sc->waiting = 0;
    pthread_mutex_unlock(&run->mu);
}

static int build_view(struct simclient *sc, const struct cohort_round *r)
{
    coh_model_init(&sc->view);
    for (size_t i = 0; i < r->ntensors; i++) {
        int rc = coh_model_add(&sc->view, r->tensors[i].name, r->tensors[i].ndim,
                               r->tensors[i].shape);
        if (rc < 0) {
            coh_model_fini(&sc->view);
            return rc;
        }
    }
    sc->have_view = 1;
    return 0;
}

static void drop_view(struct simclient *sc)
{
    if (!sc->have_view)
        return;
    sc->view.data = NULL;           /* libcohort's buffer, not ours */
    coh_model_fini(&sc->view);
    sc->have_view = 0;
}

static int on_round(struct cohort_round *r, void *user)
{
    struct simclient *sc = user;
    struct run *run = sc->run;
    const struct sim *sim = run->sim;
    if (r->round != sc->last_round + 1) {
        /* A skipped or repeated offer would desynchronise this client's draws from
         * the other runs'; the comparison would no longer be on identical draws. */
        run_fail(run, "client-%d was offered round %" PRIu64 " after round %" PRIu64
                 " (every client must see every round)", sc->index + 1, r->round, sc->last_round);
        r->decline = 1;
        snprintf(r->decline_reason, sizeof r->decline_reason, "sim out of step");
        return 0;
    }
    sc->last_round = r->round;
    if (!participation_next(&sc->pt)) {
        publish(sc, r->round, 0);
        r->decline = 1;
        snprintf(r->decline_reason, sizeof r->decline_reason, "inactive");
        return 0;
    }
    size_t n = sim->nidx[sc->index];
    if (n == 0) {
        publish(sc, r->round, 0);
        r->decline = 1;
        snprintf(r->decline_reason, sizeof r->decline_reason, "no data");
        return 0;
    }
    publish(sc, r->round, 1);
    if (!sc->have_view && build_view(sc, r) < 0) {
        run_fail(run, "client-%d: out of memory describing the model", sc->index + 1);
        r->decline = 1;
        return 0;
    }
    if (sc->view.numel != r->numel) {
        run_fail(run, "client-%d: the model layout changed during the run", sc->index + 1);
        r->decline = 1;
        return 0;
    }
    sc->view.data = r->params;
    struct nn_train_cfg cfg = {.local_steps = (int)sim->local_steps, .batch = (int)sim->batch,
                               .lr = (float)sim->lr};
    double loss = NAN;
    char err[256];
    int rc = nn_train(&sc->view, &sim->train, sim->idx[sc->index], n, &cfg, &sc->rng, &loss, err,
                      sizeof err);
    sc->view.data = NULL;
    if (rc < 0) {
        run_fail(run, "client-%d: training failed in round %" PRIu64 ": %s", sc->index + 1,
                 r->round, err);
        publish(sc, r->round, 0);
        r->decline = 1;
        return 0;
    }
    if (!isfinite(loss) || !coh_model_all_finite(&(struct coh_model){
                               .ntensors = sc->view.ntensors, .tensors = sc->view.tensors,
                               .numel = sc->view.numel, .data = r->params})) {
        /* The server would refuse a non-finite update anyway; declining keeps the
         * round clean and the count tells the user the local rate is too high. */
        atomic_fetch_add(&run->diverged, 1);
        publish(sc, r->round, 0);
        r->decline = 1;
        snprintf(r->decline_reason, sizeof r->decline_reason, "local training diverged");
        return 0;
    }
    r->num_examples = n;
    r->train_loss = loss;
    wait_turn(sc, r->round);
    return 0;
}

static void on_event(const struct cohort_event *ev, void *user)
{
    struct simclient *sc = user;
    struct run *run = sc->run;
    switch (ev->kind) {
    case COHORT_EV_ROUND_RESULT:
        if (sc->index == 0) {
            atomic_store(&run->participants, ev->participants);
            atomic_store(&run->committed, ev->round);
        }
        break;
    case COHORT_EV_CONNECTED:
        pthread_mutex_lock(&run->mu);
        run->nconnected++;
        pthread_cond_broadcast(&run->cv);
        pthread_mutex_unlock(&run->mu);
        break;
    case COHORT_EV_UPDATE_ACK:
        /* A refusal settles the upload as an acknowledgement does. */
        pthread_mutex_lock(&run->mu);
        if (ev->round > run->ack_round[sc->index])
            run->ack_round[sc->index] = ev->round;
        advance(run, ev->round);
        pthread_mutex_unlock(&run->mu);
        if (ev->err) {
            atomic_fetch_add(&run->refused, 1);
            pthread_mutex_lock(&run->mu);
            if (!run->refusal[0])
                snprintf(run->refusal, sizeof run->refusal, "client-%d, round %" PRIu64 ": %s",
                         sc->index + 1, ev->round, ev->message ? ev->message : "");
            pthread_mutex_unlock(&run->mu);
        }
        break;
    case COHORT_EV_DISCONNECTED:
        if (ev->err)
            run_fail(run, "client-%d lost its connection to cohortd after round %" PRIu64 ": %s",
                     sc->index + 1, sc->last_round, ev->message ? ev->message : "");
        break;
    default:
        break;
    }
}

static void on_log(int level, const char *line, void *user)
{
    struct simclient *sc = user;
    static const char *names[] = {"ERR", "WARN", "NOTICE", "INFO", "DEBUG"};
    if (sc->run->log)
        fprintf(sc->run->log, "client-%d %s: %s\n", sc->index + 1,
                level >= 0 && level <= 4 ? names[level] : "?", line);
}

static void *client_thread(void *arg)
{
    struct simclient *sc = arg;
    struct run *run = sc->run;
    sc->rc = cohort_client_run(sc->c, on_round, sc);
    if (sc->rc != 0)
        run_fail(run, "client-%d stopped: %s", sc->index + 1, cohort_client_last_error(sc->c));
    else if (sc->last_round != run->sim->rounds)
        run_fail(run, "client-%d saw %" PRIu64 " of %" PRIu64 " rounds before the run ended",
                 sc->index + 1, sc->last_round, run->sim->rounds);
    atomic_fetch_add(&run->ndone, 1);
    return NULL;
}

/* ---- one run -------------------------------------------------------------------------- */

struct evals {
    uint64_t *rounds;               /* rounds to evaluate, ascending */
    size_t n, next;
    double *acc;                    /* by round, NAN when not evaluated */
    double seconds;
};

static int eval_round(const struct sim *sim, const char *sdir, struct evals *ev, uint64_t round)
{
    char path[4400], err[512];
    snprintf(path, sizeof path, "%s/checkpoints/round-%06" PRIu64 ".safetensors", sdir, round);
    double t0 = cli_now_s();
    struct coh_model g;
    double acc = NAN, loss = NAN;
    int rc = coh_st_load(path, NULL, &g, err, sizeof err);
    if (rc == 0) {
        rc = nn_eval(&g, &sim->test, &acc, &loss, err, sizeof err);
        coh_model_fini(&g);
    }
    ev->seconds += cli_now_s() - t0;
    if (rc < 0) {
        fprintf(stderr, "cohort sim: evaluating %s: %s\n", path, err);
        return -1;
    }
    ev->acc[round] = acc;
    return 0;
}

static void progress_line(const struct sim *sim, struct run *run, double t0, double *last,
                          int final)
{
    double t = cli_now_s();
    if (!sim->progress || (!final && t - *last < (sim->progress == 1 ? 0.5 : 10.0)))
        return;
    if (final && sim->progress != 1)
        return;
    *last = t;
    char line[200];
    snprintf(line, sizeof line,
             "[%s] round %" PRIu64 "/%" PRIu64 "  participants %u  elapsed %.0f s", run->spec->text,
             (uint64_t)atomic_load(&run->committed), sim->rounds, atomic_load(&run->participants),
             t - t0);
    if (sim->progress == 1)
        fprintf(stderr, "\r%s\033[K%s", line, final ? "\n" : "");
    else
        fprintf(stderr, "%s\n", line);
}

static int read_rounds(const char *sdir, uint64_t rounds, uint32_t *parts, double *loss,
                       char *err, size_t errlen)
{
    char path[4500];
    snprintf(path, sizeof path, "%.4400s/cohort.db", sdir);
    sqlite3 *db = NULL;
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
        snprintf(err, errlen, "cannot open the store %.300s: %.200s", path,
                 db ? sqlite3_errmsg(db) : "no memory");
        sqlite3_close(db);
        return -1;
    }
    sqlite3_busy_timeout(db, 5000);
    sqlite3_stmt *q = NULL;
    uint64_t seen = 0;
    int rc = sqlite3_prepare_v2(db, "SELECT round, participants, mean_train_loss FROM rounds "
                                    "WHERE round BETWEEN 1 AND ?1 ORDER BY round", -1, &q, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_int64(q, 1, (sqlite3_int64)rounds);
        while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
            uint64_t r = (uint64_t)sqlite3_column_int64(q, 0);
            parts[r] = (uint32_t)sqlite3_column_int(q, 1);
            loss[r] = sqlite3_column_type(q, 2) == SQLITE_NULL ? NAN : sqlite3_column_double(q, 2);
            seen++;
        }
    }
    if (rc != SQLITE_DONE)
        snprintf(err, errlen, "reading %.300s: %.200s", path, sqlite3_errmsg(db));
    else if (seen != rounds)
        snprintf(err, errlen, "%.300s holds %" PRIu64 " of %" PRIu64 " rounds", path, seen,
                 rounds);
    sqlite3_finalize(q);
    sqlite3_close(db);
    return rc == SQLITE_DONE && seen == rounds ? 0 : -1;
}

static int write_csv(const struct sim *sim, const struct spec *spec, const struct evals *ev,
                     const uint32_t *parts, const double *loss, struct result *res)
{
    snprintf(res->csv, sizeof res->csv, "%s-%s.csv", sim->out, spec->tag);
    FILE *f = fopen(res->csv, "w");
    if (!f) {
        fprintf(stderr, "cohort sim: cannot write %s: %s\n", res->csv, strerror(errno));
        return -1;
    }
    fprintf(f, "round,participants,test_accuracy,train_loss\n");
    for (uint64_t r = 1; r <= sim->rounds; r++) {
        fprintf(f, "%" PRIu64 ",%u,", r, parts[r]);
        if (isfinite(ev->acc[r]))
            fprintf(f, "%.4f", ev->acc[r]);
        fputc(',', f);
        if (isfinite(loss[r]))
            fprintf(f, "%.6f", loss[r]);
        fputc('\n', f);
    }
    if (fclose(f) != 0) {
        fprintf(stderr, "cohort sim: writing %s: %s\n", res->csv, strerror(errno));
        return -1;
    }
    return 0;
}

static void add_arg(char **av, int *n, const char *s)
{
    av[(*n)++] = strdup(s);
}

/* Runs one strategy end to end; fills res. Returns 0, or -1 after printing why. */
static int run_spec(const struct sim *sim, const struct spec *spec, struct result *res)
{
    memset(res, 0, sizeof *res);
    double t0 = cli_now_s();
    char rdir[4300], sdir[4400], path[4500], dlog[4500], clog[4500];
    snprintf(rdir, sizeof rdir, "%s/%s", sim->dir, spec->tag);
    snprintf(sdir, sizeof sdir, "%s/state", rdir);
    snprintf(dlog, sizeof dlog, "%s/cohortd.log", rdir);
    snprintf(clog, sizeof clog, "%s/clients.log", rdir);
    mkdir(rdir, 0755);
    /* A fresh store: cohortd would resume from committed rounds in an old one. */
    if (rm_rf(sdir) < 0) {
        fprintf(stderr, "cohort sim: cannot clear %s: %s\n", sdir, strerror(errno));
        return -1;
    }
    snprintf(path, sizeof path, "%s/checkpoints", sdir);
    if (mkdir(sdir, 0755) < 0 || mkdir(path, 0755) < 0) {
        fprintf(stderr, "cohort sim: cannot create %s: %s\n", path, strerror(errno));
        return -1;
    }
    int port = cli_free_port();
    if (port <= 0) {
        fprintf(stderr, "cohort sim: no free TCP port on 127.0.0.1\n");
        return -1;
    }
    char listen[64], rbuf[32], nbuf[32], ca[4300], scert[4300], skey[4300], num[64];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", port);
    snprintf(rbuf, sizeof rbuf, "%" PRIu64, sim->rounds);
    snprintf(nbuf, sizeof nbuf, "%" PRIu64, sim->nclients);
    snprintf(ca, sizeof ca, "%s/ca.pem", sim->cdir);
    snprintf(scert, sizeof scert, "%s/server.pem", sim->cdir);
    snprintf(skey, sizeof skey, "%s/server.key", sim->cdir);
    char *dav[48];
    int dn = 0;
    const char *fixed[] = {sim->cohortd, "--listen", listen, "--state-dir", sdir,
                           "--model", sim->init, "--ca", ca, "--cert", scert, "--key", skey,
                           "--rounds", rbuf, "--min-clients", nbuf,
                           "--round-timeout", SIM_ROUND_TIMEOUT, "--strategy", spec->strategy};
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++)
        add_arg(dav, &dn, fixed[i]);
    if (spec->weighting[0]) {
        add_arg(dav, &dn, "--weighting");
        add_arg(dav, &dn, spec->weighting);
    }
    if (spec->cutoff) {
        add_arg(dav, &dn, "--fedau-cutoff");
        snprintf(num, sizeof num, "%" PRIu64, spec->cutoff);
        add_arg(dav, &dn, num);
    }
    if (spec->lr_set) {
        add_arg(dav, &dn, "--server-lr");
        snprintf(num, sizeof num, "%.17g", spec->server_lr);
        add_arg(dav, &dn, num);
    }
    if (spec->vc)
        add_arg(dav, &dn, "--variance-correction");
    if (sim->relaxed) {
        add_arg(dav, &dn, "--durability");
        add_arg(dav, &dn, "relaxed");
    }
    dav[dn] = NULL;
    for (int i = 0; i < dn; i++) {
        if (!dav[i]) {
            fprintf(stderr, "cohort sim: out of memory\n");
            for (int k = 0; k < dn; k++)
                free(dav[k]);
            return -1;
        }
    }

    struct run run = {.sim = sim, .spec = spec, .ordered = sim->ordered};
    pthread_mutex_init(&run.mu, NULL);
    pthread_cond_init(&run.cv, NULL);
    run.log = fopen(clog, "w");
    size_t n = sim->nclients;
    run.cl = calloc(n, sizeof *run.cl);
    run.dec_round = calloc(n, sizeof *run.dec_round);
    run.dec_active = calloc(n, sizeof *run.dec_active);
    run.ack_round = calloc(n, sizeof *run.ack_round);
    struct evals ev = {0};
    uint32_t *parts = calloc(sim->rounds + 1, sizeof *parts);
    double *loss = calloc(sim->rounds + 1, sizeof *loss);
    ev.rounds = calloc(sim->rounds / sim->eval_every + 2, sizeof *ev.rounds);
    ev.acc = malloc((sim->rounds + 1) * sizeof *ev.acc);
    int rc = -1, cvs = 0;
    size_t started = 0;
    pid_t dpid = -1;
    int dstatus = 0, dexited = 0;
    if (!run.cl || !run.dec_round || !run.dec_active || !run.ack_round || !parts || !loss ||
        !ev.rounds || !ev.acc) {
        fprintf(stderr, "cohort sim: out of memory\n");
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        pthread_cond_init(&run.cl[i].turn, NULL);
    cvs = 1;
    for (uint64_t r = 0; r <= sim->rounds; r++)
        ev.acc[r] = NAN;
    for (uint64_t r = sim->eval_every; r <= sim->rounds; r += sim->eval_every)
        ev.rounds[ev.n++] = r;
    if (ev.n == 0 || ev.rounds[ev.n - 1] != sim->rounds)
        ev.rounds[ev.n++] = sim->rounds;  /* last_acc is always the final model's */

    dpid = spawn(dav, dlog, -1);
    if (dpid < 0) {
        fprintf(stderr, "cohort sim: fork: %s\n", strerror(errno));
        goto out;
    }
    /* Clients started before the listener would only spin in their back-off. */
    double tl = cli_now_s();
    while (!cli_port_accepts(port)) {
        int st;
        if (waitpid(dpid, &st, WNOHANG) == dpid) {
            dexited = 1;
            dstatus = st;
            fprintf(stderr, "cohort sim: [%s] cohortd exited during start-up\n", spec->text);
            print_log_tail(dlog, 15);
            goto out;
        }
        if (interrupted)
            goto out;
        if (cli_now_s() - tl > 20) {
            fprintf(stderr, "cohort sim: [%s] cohortd is not listening on %s after 20 s; see "
                            "%s\n", spec->text, listen, dlog);
            goto out;
        }
        cli_sleep_ms(20, &interrupted);
    }

    char server[80];
    snprintf(server, sizeof server, "127.0.0.1:%d", port);
    for (size_t i = 0; i < n; i++) {
        struct simclient *sc = &run.cl[i];
        sc->index = (int)i;
        sc->run = &run;
        participation_init(&sc->pt, &sim->pspec, sim->pspec.p_given ? -1.0 : sim->p[i],
                           derive_seed(sim->seed, STREAM_PARTICIPATION, i));
        coh_rng_seed(&sc->rng, derive_seed(sim->seed, STREAM_BATCH, i));
        char cert[4300], key[4300];
        snprintf(cert, sizeof cert, "%s/client-%zu.pem", sim->cdir, i + 1);
        snprintf(key, sizeof key, "%s/client-%zu.key", sim->cdir, i + 1);
        cohort_opts *o = NULL;
        int e = cohort_opts_new(&o);
        if (e == 0)
            e = cohort_opts_set_server(o, server);
        if (e == 0)
            e = cohort_opts_set_tls(o, ca, cert, key);
        if (e == 0)
            e = cohort_opts_set_num_examples(o, sim->nidx[i]);
        /* Retries cover only the start (the listener's backlog under 250 handshakes);
         * a client that loses an established connection fails the run instead. */
        if (e == 0)
            e = cohort_opts_set_reconnect(o, 50, 1000, 40);
        if (e == 0)
            e = cohort_opts_set_event_fn(o, on_event, sc);
        if (e == 0)
            e = cohort_opts_set_log(o, on_log, sc, COHORT_LOG_WARN);
        if (e == 0)
            e = cohort_client_new(&sc->c, o);
        cohort_opts_free(o);
        if (e < 0) {
            fprintf(stderr, "cohort sim: client-%zu: %s\n", i + 1, cohort_strerror(e));
            goto out;
        }
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, SIM_STACK_BYTES); /* on failure: the default size */
    /* One client at a time: cohortd offers rounds in the order clients connected,
     * which fixes the order of the per-round records (and of the mean loss's sum). */
    for (; started < n && !atomic_load(&run.failed) && !interrupted; started++) {
        int e = pthread_create(&run.cl[started].th, &attr, client_thread, &run.cl[started]);
        if (e != 0) {
            run_fail(&run, "cannot start client thread %zu: %s", started + 1, strerror(e));
            break;
        }
        struct timespec dl;
        clock_gettime(CLOCK_REALTIME, &dl);
        dl.tv_sec += 30;
        pthread_mutex_lock(&run.mu);
        while (run.nconnected <= started && !atomic_load(&run.failed) && !interrupted &&
               atomic_load(&run.ndone) == 0) {
            if (pthread_cond_timedwait(&run.cv, &run.mu, &dl) == ETIMEDOUT) {
                pthread_mutex_unlock(&run.mu);
                run_fail(&run, "client-%zu did not connect to cohortd within 30 s", started + 1);
                pthread_mutex_lock(&run.mu);
            }
        }
        pthread_mutex_unlock(&run.mu);
    }
    pthread_attr_destroy(&attr);
    res->setup_s = cli_now_s() - t0;

    /* Watch: failures, cohortd's exit, progress; evaluate checkpoints as they appear. */
    double last_progress = 0, dexit_at = 0;
    while (!atomic_load(&run.failed)) {
        if (interrupted) {
            run_fail(&run, "interrupted by signal %d", (int)interrupted);
            break;
        }
        if ((size_t)atomic_load(&run.ndone) == started && started == n)
            break;
        int st;
        if (!dexited && waitpid(dpid, &st, WNOHANG) == dpid) {
            dexited = 1;
            dstatus = st;
            dexit_at = cli_now_s();
            if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                run_fail(&run, "cohortd exited with %s %d after round %" PRIu64,
                         WIFEXITED(st) ? "status" : "signal",
                         WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st),
                         (uint64_t)atomic_load(&run.committed));
                break;
            }
        }
        if (dexited && cli_now_s() - dexit_at > 15) {
            run_fail(&run, "cohortd finished but %d of %zu clients are still running",
                     (int)(n - (size_t)atomic_load(&run.ndone)), n);
            break;
        }
        uint64_t committed = atomic_load(&run.committed);
        if (ev.next < ev.n && ev.rounds[ev.next] <= committed) {
            if (eval_round(sim, sdir, &ev, ev.rounds[ev.next]) < 0)
                run_fail(&run, "evaluation failed");
            ev.next++;
            progress_line(sim, &run, t0, &last_progress, 0);
            continue;               /* catch up before sleeping */
        }
        progress_line(sim, &run, t0, &last_progress, 0);
        cli_sleep_ms(20, &interrupted);
    }
    progress_line(sim, &run, t0, &last_progress, 1);

out:
    if (atomic_load(&run.failed) || started < n)
        for (size_t i = 0; i < n && run.cl; i++)
            if (run.cl[i].c)
                cohort_client_stop(run.cl[i].c);
    for (size_t i = 0; i < started; i++)
        pthread_join(run.cl[i].th, NULL);
    if (dpid > 0 && !dexited && waitpid(dpid, &dstatus, WNOHANG) == dpid)
        dexited = 1;                /* it went away by itself (a client noticed first) */
    int died = dexited && (!WIFEXITED(dstatus) || WEXITSTATUS(dstatus) != 0);
    if (dpid > 0 && !dexited) {
        /* After the last round cohortd exits by itself once its connections close. */
        int st = 0, waited = 0;
        int failed = atomic_load(&run.failed) || started < n;
        if (failed)
            kill(dpid, SIGTERM);
        while (waitpid(dpid, &st, WNOHANG) == 0 && waited < 200) {
            cli_sleep_ms(50, &interrupted);
            waited++;
        }
        if (waited >= 200) {
            kill(dpid, SIGKILL);
            waitpid(dpid, &st, 0);
            if (!failed)
                run_fail(&run, "cohortd did not exit after the last round");
        }
        dexited = 1;
        dstatus = st;
        if (!failed && (!WIFEXITED(st) || WEXITSTATUS(st) != 0))
            run_fail(&run, "cohortd exited with %s %d at the end of the run",
                     WIFEXITED(st) ? "status" : "signal",
                     WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
    }
    if (started == n && n > 0 && !atomic_load(&run.failed)) {
        char err[600];
        for (; ev.next < ev.n; ev.next++)
            if (eval_round(sim, sdir, &ev, ev.rounds[ev.next]) < 0)
                run_fail(&run, "evaluation failed");
        if (!atomic_load(&run.failed) &&
            read_rounds(sdir, sim->rounds, parts, loss, err, sizeof err) < 0)
            run_fail(&run, "%s", err);
        if (!atomic_load(&run.failed)) {
            res->seconds = cli_now_s() - t0;
            res->eval_s = ev.seconds;
            double sum = 0, psum = 0;
            int cnt = 0;
            uint64_t from = sim->rounds > sim->avg_last ? sim->rounds - sim->avg_last : 0;
            for (uint64_t r = 1; r <= sim->rounds; r++) {
                psum += parts[r];
                if (r > from && isfinite(ev.acc[r])) {
                    sum += ev.acc[r];
                    cnt++;
                }
            }
            res->final_acc = cnt ? sum / cnt : NAN;
            res->last_acc = ev.acc[sim->rounds];
            res->mean_participants = psum / (double)sim->rounds;
            if (write_csv(sim, spec, &ev, parts, loss, res) == 0) {
                res->ok = 1;
                rc = 0;
            }
        }
    }
    if (atomic_load(&run.failed) && interrupted) {
        fprintf(stderr, "cohort sim: [%s] interrupted\n", spec->text);
        rc = -1;
    } else if (atomic_load(&run.failed)) {
        fprintf(stderr, "cohort sim: [%s] failed: %s\n", spec->text, run.why);
        if (died)
            fprintf(stderr, "cohort sim: [%s] cohortd had exited with %s %d\n", spec->text,
                    WIFEXITED(dstatus) ? "status" : "signal",
                    WIFEXITED(dstatus) ? WEXITSTATUS(dstatus) : WTERMSIG(dstatus));
        if (dpid > 0)
            print_log_tail(dlog, 12);
        fprintf(stderr, "cohort sim: logs: %s, %s\n", dlog, clog);
        rc = -1;
    }
    uint64_t div = atomic_load(&run.diverged), ref = atomic_load(&run.refused);
    if (div)
        fprintf(stderr, "cohort sim: [%s] warning: local training diverged %" PRIu64 " times "
                        "(declined; lower --lr)\n", spec->text, div);
    if (ref)
        fprintf(stderr, "cohort sim: [%s] warning: the server refused %" PRIu64 " updates, e.g. "
                        "%s\n", spec->text, ref, run.refusal);
    for (size_t i = 0; i < n && run.cl; i++) {
        drop_view(&run.cl[i]);
        cohort_client_free(run.cl[i].c);
        if (cvs)
            pthread_cond_destroy(&run.cl[i].turn);
    }
    if (run.log)
        fclose(run.log);
    pthread_mutex_destroy(&run.mu);
    pthread_cond_destroy(&run.cv);
    free(run.cl);
    free(run.dec_round);
    free(run.dec_active);
    free(run.ack_round);
    free(parts);
    free(loss);
    free(ev.rounds);
    free(ev.acc);
    for (int i = 0; i < dn; i++)
        free(dav[i]);
    return rc;
}

/* ---- set-up --------------------------------------------------------------------------- */

static const char usage_text[] =
    "usage: cohort sim [options]\n"
    "\n"
    "Runs a federated experiment through a real cohortd on 127.0.0.1: N clients as threads of\n"
    "this process, each with its own certificate and TLS connection, training on a Dirichlet\n"
    "split of Fashion-MNIST and taking part in rounds by a participation pattern tied to their\n"
    "data (see algorithms.md). Compared strategies see identical data splits, participation\n"
    "draws and minibatch orders.\n"
    "\n"
    "  --clients N          clients (default 250)\n"
    "  --rounds R           rounds (default 2000)\n"
    "  --alpha A            Dirichlet alpha of the data split (default 0.1)\n"
    "  --pattern P          always | bernoulli | markov | cyclic (default bernoulli), each client\n"
    "                       with its own p from the data; bernoulli:P, markov:P[:A],\n"
    "                       cyclic:P[:L] give every client the same p\n"
    "  --pbar P --pmin P --alpha-p A   p_n = max(pmin, 10 * pbar * sum_c pi_nc d_c),\n"
    "                       d ~ Dirichlet(alpha-p) (defaults 0.1, 0.02, 0.1)\n"
    "  --strategy SPEC      fedavg | fedavg:uniform | fedavg:all | fedau | fedau:K=N, each\n"
    "                       optionally with :lr=ETA (server rate) and :vc (variance\n"
    "                       correction) (default fedau)\n"
    "  --compare S1,S2,...  run each spec in turn and print a side-by-side summary\n"
    "  --arch A             softmax | mlp[:H] (default softmax)\n"
    "  --local-steps K      local SGD steps per round (default 5)\n"
    "  --batch B            minibatch size (default 16)\n"
    "  --lr LR              local SGD rate (default 0.1)\n"
    "  --seed S             data split, participation and minibatch seed (default 1)\n"
    "  --eval-every K       test accuracy every K rounds, and of the last round (default 20)\n"
    "  --avg-last W         final accuracy = mean over the last W rounds (default 500)\n"
    "  --out PREFIX         writes PREFIX-<spec>.csv (':' as '_', '=' dropped, e.g.\n"
    "                       sim-fedau_K50.csv) and PREFIX-summary.csv (default sim)\n"
    "  --dir DIR            work directory (default a new /tmp/cohort-sim-XXXXXX, removed at\n"
    "                       the end unless --keep or a failure); a given DIR is kept, but its\n"
    "                       certs/ and <spec>/state/ are replaced\n"
    "  --keep               keep the work directory\n"
    "  --progress           progress on stderr (the default): on a terminal one line updated\n"
    "                       in place, otherwise a line every 10 s\n"
    "  --no-progress        no progress output\n"
    "  --unordered          let updates reach cohortd in any order: at most a little faster,\n"
    "                       but cohortd sums them in arrival order, so the models differ\n"
    "                       between runs in the last float bits (by default clients upload\n"
    "                       in index order and runs are bit-for-bit reproducible)\n"
    "  --help               this help\n";

static int split_p(struct sim *sim)
{
    /* p_n = max(pmin, C * pbar * sum_c pi_nc d_c): clients rich in the classes d
     * favours take part more often, which is what biases FedAvg. */
    struct coh_rng r;
    coh_rng_seed(&r, derive_seed(sim->seed, STREAM_PROB, 0));
    double d[FMNIST_CLASSES];
    coh_rng_dirichlet(&r, sim->alpha_p, d, FMNIST_CLASSES);
    for (uint64_t i = 0; i < sim->nclients; i++) {
        size_t counts[FMNIST_CLASSES];
        if (sim->nidx[i] == 0 ||
            fmnist_label_counts(&sim->train, sim->idx[i], sim->nidx[i], counts) < 0) {
            sim->p[i] = sim->pmin;
            continue;
        }
        double s = 0;
        for (int c = 0; c < FMNIST_CLASSES; c++)
            s += (double)counts[c] / (double)sim->nidx[i] * d[c];
        double p = FMNIST_CLASSES * sim->pbar * s;
        if (p < sim->pmin)
            p = sim->pmin;
        sim->p[i] = p > 1.0 ? 1.0 : p;
    }
    return 0;
}

static int make_certs(const struct sim *sim)
{
    char nbuf[32];
    snprintf(nbuf, sizeof nbuf, "%" PRIu64, sim->nclients);
    char *cargv[] = {"certs", "--out", (char *)sim->cdir, "--clients", nbuf, NULL};
    return certs_main_quiet(5, cargv) == 0 ? 0 : -1;
}

static int add_specs(const char *list, struct spec *specs, size_t *nspecs)
{
    char *dup = strdup(list);
    if (!dup)
        return -1;
    int rc = 0;
    char *save = NULL;
    for (char *t = strtok_r(dup, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        if (*nspecs == SIM_MAX_SPECS) {
            fprintf(stderr, "cohort sim: at most %d strategies per comparison\n", SIM_MAX_SPECS);
            rc = -1;
            break;
        }
        if (parse_spec(t, &specs[*nspecs]) < 0) {
            rc = -1;
            break;
        }
        for (size_t i = 0; i < *nspecs; i++) {
            if (strcmp(specs[i].tag, specs[*nspecs].tag) == 0) {
                fprintf(stderr, "cohort sim: --compare names '%s' twice (or two specs with the "
                                "same file name)\n", t);
                rc = -1;
                break;
            }
        }
        if (rc < 0)
            break;
        (*nspecs)++;
    }
    if (rc == 0 && *nspecs == 0) {
        fprintf(stderr, "cohort sim: --compare needs at least one strategy spec\n");
        rc = -1;
    }
    free(dup);
    return rc;
}

static void sim_free(struct sim *sim)
{
    if (sim->idx) {
        for (uint64_t i = 0; i < sim->nclients; i++)
            free(sim->idx[i]);
    }
    free(sim->idx);
    free(sim->nidx);
    free(sim->p);
    fmnist_free(&sim->train);
    fmnist_free(&sim->test);
}

int sim_main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) /* gossip learning: sim_gossip.c */
        if (strcmp(argv[i], "--gossip") == 0)
            return sim_gossip_main(argc, argv);
    enum { O_CLIENTS = 256, O_ROUNDS, O_ALPHA, O_PATTERN, O_PBAR, O_PMIN, O_ALPHA_P, O_STRATEGY,
           O_COMPARE, O_ARCH, O_STEPS, O_BATCH, O_LR, O_SEED, O_EVAL, O_AVG, O_OUT, O_DIR,
           O_KEEP, O_PROGRESS, O_NO_PROGRESS, O_UNORDERED, O_HELP };
    static const struct option opts[] = {
        {"clients", 1, 0, O_CLIENTS}, {"rounds", 1, 0, O_ROUNDS}, {"alpha", 1, 0, O_ALPHA},
        {"pattern", 1, 0, O_PATTERN}, {"pbar", 1, 0, O_PBAR}, {"pmin", 1, 0, O_PMIN},
        {"alpha-p", 1, 0, O_ALPHA_P}, {"strategy", 1, 0, O_STRATEGY},
        {"compare", 1, 0, O_COMPARE}, {"arch", 1, 0, O_ARCH}, {"local-steps", 1, 0, O_STEPS},
        {"batch", 1, 0, O_BATCH}, {"lr", 1, 0, O_LR}, {"seed", 1, 0, O_SEED},
        {"eval-every", 1, 0, O_EVAL}, {"avg-last", 1, 0, O_AVG}, {"out", 1, 0, O_OUT},
        {"dir", 1, 0, O_DIR}, {"keep", 0, 0, O_KEEP}, {"progress", 0, 0, O_PROGRESS},
        {"no-progress", 0, 0, O_NO_PROGRESS}, {"unordered", 0, 0, O_UNORDERED},
        {"help", 0, 0, O_HELP}, {0, 0, 0, 0}};
    static struct sim sim;          /* large; its arrays are freed by sim_free */
    memset(&sim, 0, sizeof sim);
    sim.nclients = 250;
    sim.rounds = 2000;
    sim.alpha = 0.1;
    sim.pbar = 0.1;
    sim.pmin = 0.02;
    sim.alpha_p = 0.1;
    sim.lr = 0.1;
    sim.local_steps = 5;
    sim.batch = 16;
    sim.seed = 1;
    sim.eval_every = 20;
    sim.avg_last = 500;
    sim.arch = "softmax";
    sim.out = "sim";
    sim.ordered = 1;
    const char *pattern = "bernoulli", *strategy = NULL, *compare = NULL, *dir = NULL;
    int keep = 0, progress = -1;
    int o;
    optind = 1;
    opterr = 0;                     /* our own messages, prefixed like every other error */
    while ((o = getopt_long(argc, argv, ":", opts, NULL)) != -1) {
        int bad = 0;
        switch (o) {
        case O_CLIENTS:
            bad = cli_u64("sim", "--clients", optarg, 1, SIM_MAX_CLIENTS, &sim.nclients);
            break;
        case O_ROUNDS:
            bad = cli_u64("sim", "--rounds", optarg, 1, 1000000, &sim.rounds);
            break;
        case O_ALPHA: bad = cli_double("sim", "--alpha", optarg, 1e-6, 1e6, &sim.alpha); break;
        case O_PATTERN: pattern = optarg; break;
        case O_PBAR: bad = cli_double("sim", "--pbar", optarg, 1e-9, 1, &sim.pbar); break;
        case O_PMIN: bad = cli_double("sim", "--pmin", optarg, 1e-9, 1, &sim.pmin); break;
        case O_ALPHA_P:
            bad = cli_double("sim", "--alpha-p", optarg, 1e-6, 1e6, &sim.alpha_p);
            break;
        case O_STRATEGY: strategy = optarg; break;
        case O_COMPARE: compare = optarg; break;
        case O_ARCH: sim.arch = optarg; break;
        case O_STEPS:
            bad = cli_u64("sim", "--local-steps", optarg, 1, 1000000, &sim.local_steps);
            break;
        case O_BATCH: bad = cli_u64("sim", "--batch", optarg, 1, 100000, &sim.batch); break;
        case O_LR: bad = cli_double("sim", "--lr", optarg, 0, 1000, &sim.lr); break;
        case O_SEED: bad = cli_u64("sim", "--seed", optarg, 0, UINT64_MAX, &sim.seed); break;
        case O_EVAL:
            bad = cli_u64("sim", "--eval-every", optarg, 1, 1000000, &sim.eval_every);
            break;
        case O_AVG: bad = cli_u64("sim", "--avg-last", optarg, 1, 1000000, &sim.avg_last); break;
        case O_OUT: sim.out = optarg; break;
        case O_DIR: dir = optarg; break;
        case O_KEEP: keep = 1; break;
        case O_PROGRESS: progress = 1; break;
        case O_NO_PROGRESS: progress = 0; break;
        case O_UNORDERED: sim.ordered = 0; break;
        case O_HELP: fputs(usage_text, stdout); return 0;
        case ':':
            fprintf(stderr, "cohort sim: %s needs a value\n", argv[optind - 1]);
            return 2;
        default:
            fprintf(stderr, "cohort sim: unknown option '%s' (cohort sim --help lists them)\n",
                    argv[optind - 1]);
            return 2;
        }
        if (bad)
            return 2;
    }
    if (optind < argc) {
        fprintf(stderr, "cohort sim: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    static struct spec specs[SIM_MAX_SPECS];
    size_t nspecs = 0;
    if (strategy && compare) {
        fprintf(stderr, "cohort sim: use --strategy for one run or --compare for several, not "
                        "both\n");
        return 2;
    }
    if (add_specs(compare ? compare : strategy ? strategy : "fedau", specs, &nspecs) < 0)
        return 2;
    if (!compare && nspecs != 1) {
        fprintf(stderr, "cohort sim: --strategy takes one spec; use --compare for a list\n");
        return 2;
    }
    char err[512];
    if (participation_parse(pattern, &sim.pspec, err, sizeof err) < 0) {
        fprintf(stderr, "cohort sim: --pattern: %s\n", err);
        return 2;
    }
    if (sim.pmin > sim.pbar * FMNIST_CLASSES)
        fprintf(stderr, "cohort sim: note: --pmin %g exceeds 10 * --pbar; every client gets "
                        "p = pmin\n", sim.pmin);
    struct coh_model init;
    if (nn_init_model(&init, sim.arch, sim.seed, err, sizeof err) < 0) {
        fprintf(stderr, "cohort sim: --arch: %s\n", err);
        return 2;
    }
    int stderr_tty = isatty(2);
    sim.progress = progress == 0 ? 0 : stderr_tty ? 1 : 2;
    /* With several threads per core, one BLAS thread per caller avoids oversubscription;
     * the trainers and the evaluation all run on threads of their own. */
    openblas_set_num_threads(1);

    int rc = 1, made_dir = 0, keep_dir = keep;
    char summary[4200];
    FILE *sumf = NULL;
    struct result res[SIM_MAX_SPECS];
    memset(res, 0, sizeof res);
    if (cli_find_cohortd(sim.cohortd, sizeof sim.cohortd) < 0) {
        fprintf(stderr, "cohort sim: cannot find the cohortd binary beside cohort; build the "
                        "whole project (meson compile -C build)\n");
        coh_model_fini(&init);
        return 1;
    }
    char *help = cohortd_help(sim.cohortd);
    if (!help) {
        fprintf(stderr, "cohort sim: cannot run %s --help\n", sim.cohortd);
        coh_model_fini(&init);
        return 1;
    }
    sim.relaxed = strstr(help, "--durability") != NULL;
    for (size_t i = 0; i < nspecs; i++) {
        const char *need = NULL;
        if (strcmp(specs[i].strategy, "fedau") == 0 && !strstr(help, "fedau"))
            need = "--strategy fedau";
        else if (specs[i].cutoff && !strstr(help, "--fedau-cutoff"))
            need = "--fedau-cutoff";
        else if (specs[i].vc && !strstr(help, "--variance-correction"))
            need = "--variance-correction";
        if (need) {
            fprintf(stderr, "cohort sim: strategy '%s' needs %s, which %s does not offer "
                            "(rebuild it)\n", specs[i].text, need, sim.cohortd);
            free(help);
            coh_model_fini(&init);
            return 1;
        }
    }
    free(help);
    snprintf(summary, sizeof summary, "%s-summary.csv", sim.out);
    sumf = fopen(summary, "w");
    if (!sumf) {
        fprintf(stderr, "cohort sim: cannot write %s: %s\n", summary, strerror(errno));
        coh_model_fini(&init);
        return 1;
    }
    fprintf(sumf, "spec,seed,final_acc,last_acc,mean_participants,seconds\n");
    fflush(sumf);

    struct sigaction sa = {.sa_handler = on_interrupt}, old_int, old_term;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    interrupted = 0;
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;  /* each client holds a socket and a wake-up pipe */
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    double t_setup = cli_now_s();
    if (dir) {
        snprintf(sim.dir, sizeof sim.dir, "%s", dir);
        if (mkdir(sim.dir, 0755) < 0 && errno != EEXIST) {
            fprintf(stderr, "cohort sim: cannot create %s: %s\n", sim.dir, strerror(errno));
            goto done;
        }
        keep_dir = 1;
    } else {
        const char *tmp = getenv("TMPDIR");
        snprintf(sim.dir, sizeof sim.dir, "%s/cohort-sim-XXXXXX", tmp && *tmp ? tmp : "/tmp");
        if (!mkdtemp(sim.dir)) {
            fprintf(stderr, "cohort sim: cannot create %s: %s\n", sim.dir, strerror(errno));
            goto done;
        }
        made_dir = 1;
    }
    snprintf(sim.cdir, sizeof sim.cdir, "%s/certs", sim.dir);
    snprintf(sim.init, sizeof sim.init, "%s/init.safetensors", sim.dir);
    if (coh_st_save(sim.init, &init, 0, NULL) < 0) {
        fprintf(stderr, "cohort sim: cannot write %s\n", sim.init);
        goto done;
    }
    if (rm_rf(sim.cdir) < 0 || make_certs(&sim) < 0) {
        fprintf(stderr, "cohort sim: making %" PRIu64 " client certificates in %s failed\n",
                sim.nclients, sim.cdir);
        goto done;
    }
    double t_certs = cli_now_s() - t_setup;
    if (fmnist_load(FMNIST_DEFAULT_DIR, 1, &sim.train, err, sizeof err) < 0 ||
        fmnist_load(FMNIST_DEFAULT_DIR, 0, &sim.test, err, sizeof err) < 0) {
        fprintf(stderr, "cohort sim: %s (install the Debian package dataset-fashion-mnist)\n", err);
        goto done;
    }
    sim.idx = calloc(sim.nclients, sizeof *sim.idx);
    sim.nidx = calloc(sim.nclients, sizeof *sim.nidx);
    sim.p = calloc(sim.nclients, sizeof *sim.p);
    if (!sim.idx || !sim.nidx || !sim.p) {
        fprintf(stderr, "cohort sim: out of memory\n");
        goto done;
    }
    char split[64];
    snprintf(split, sizeof split, "dirichlet:%.17g", sim.alpha);
    if (fmnist_partition_all(&sim.train, split, derive_seed(sim.seed, STREAM_SPLIT, 0),
                             (int)sim.nclients, sim.idx, sim.nidx, err, sizeof err) < 0) {
        fprintf(stderr, "cohort sim: splitting the data: %s\n", err);
        goto done;
    }
    split_p(&sim);

    double psum = 0, pmin = 1, pmax = 0;
    size_t empty = 0;
    for (uint64_t i = 0; i < sim.nclients; i++) {
        psum += sim.p[i];
        pmin = sim.p[i] < pmin ? sim.p[i] : pmin;
        pmax = sim.p[i] > pmax ? sim.p[i] : pmax;
        empty += sim.nidx[i] == 0;
    }
    char desc[64];
    struct nn_arch na;
    nn_detect(&init, &na, err, sizeof err);
    nn_arch_name(&na, desc, sizeof desc);
    printf("cohort sim: %" PRIu64 " clients, %" PRIu64 " rounds, %s, Dirichlet(%g) split, %s "
           "participation", sim.nclients, sim.rounds, desc, sim.alpha, pattern);
    if (sim.pspec.kind == PATTERN_ALWAYS)
        printf("\n");
    else if (sim.pspec.p_given)
        printf(" (p = %g for all)\n", sim.pspec.p);
    else
        printf(" (p from data: mean %.3f, min %.3f, max %.3f; expect %.1f participants)\n",
               psum / (double)sim.nclients, pmin, pmax, psum);
    printf("            local: %" PRIu64 " steps of batch %" PRIu64 ", lr %g; seed %" PRIu64
           "; work dir %s (certificates %.1f s)\n",
           sim.local_steps, sim.batch, sim.lr, sim.seed, sim.dir, t_certs);
    if (empty)
        printf("            note: %zu clients got no data; they decline when active\n", empty);
    fflush(stdout);

    int failures = 0;
    for (size_t i = 0; i < nspecs && !interrupted; i++) {
        if (run_spec(&sim, &specs[i], &res[i]) < 0) {
            failures++;
            if (interrupted)
                break;              /* the user knows why; no logs to keep */
            keep_dir = 1;           /* the logs explain the failure */
            continue;
        }
        printf("[%s] %" PRIu64 " rounds in %.1f s (start-up %.1f s, evaluation %.1f s): final "
               "accuracy %.4f, last %.4f -> %s\n",
               specs[i].text, sim.rounds, res[i].seconds, res[i].setup_s, res[i].eval_s,
               res[i].final_acc, res[i].last_acc, res[i].csv);
        fflush(stdout);
        fprintf(sumf, "%s,%" PRIu64 ",%.4f,%.4f,%.2f,%.1f\n", specs[i].text, sim.seed,
                res[i].final_acc, res[i].last_acc, res[i].mean_participants, res[i].seconds);
        fflush(sumf);
    }

    char hdr[64];
    snprintf(hdr, sizeof hdr, "final_acc(avg last %" PRIu64 ")", sim.avg_last);
    size_t w = 8;
    for (size_t i = 0; i < nspecs; i++)
        w = strlen(specs[i].text) > w ? strlen(specs[i].text) : w;
    printf("\n%-*s  %-*s  %-8s  %-17s  %s\n", (int)w, "strategy", (int)strlen(hdr), hdr,
           "last_acc", "mean_participants", "seconds");
    for (size_t i = 0; i < nspecs; i++) {
        if (res[i].ok)
            printf("%-*s  %-*.4f  %-8.4f  %-17.1f  %.0f\n", (int)w, specs[i].text,
                   (int)strlen(hdr), res[i].final_acc, res[i].last_acc,
                   res[i].mean_participants, res[i].seconds);
        else
            printf("%-*s  %s\n", (int)w, specs[i].text, "failed");
    }
    printf("\nper-round CSVs:");
    for (size_t i = 0; i < nspecs; i++)
        if (res[i].ok)
            printf(" %s", res[i].csv);
    printf("\nsummary: %s\n", summary);
    if (keep_dir)
        printf("work dir: %s\n", sim.dir);
    rc = failures ? 1 : 0;
    if (interrupted)
        rc = 130;

done:
    if (sumf && fclose(sumf) != 0) {
        fprintf(stderr, "cohort sim: writing %s: %s\n", summary, strerror(errno));
        rc = 1;
    }
    if (made_dir && !keep_dir && rm_rf(sim.dir) < 0)
        fprintf(stderr, "cohort sim: could not remove %s: %s\n", sim.dir, strerror(errno));
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    coh_model_fini(&init);
    sim_free(&sim);
    return rc;
}
