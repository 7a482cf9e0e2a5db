/*
 * `cohort client`: takes part in a federation through libcohort with exactly
 * one trainer: the built-in Fashion-MNIST trainer, a fixed update file, or an
 * external command (e.g. a PyTorch script) that reads the global model and
 * writes the update, both as safetensors.
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../trainer/fmnist.h"
#include "../trainer/nn.h"
#include "cli.h"
#include "cohort.h"
#include "model.h"
#include "participation.h"
#include "rng.h"
#include "safetensors.h"

enum trainer_kind { T_NONE, T_FMNIST, T_UPDATE, T_EXEC, T_EVAL };

struct client_ctx {
    int kind;
    /* fmnist */
    struct fmnist train;
    uint32_t *idx;
    size_t nidx;
    struct nn_train_cfg tcfg;
    struct coh_rng rng;
    /* update */
    struct coh_model update;
    int single_buffer;          /* --single-buffer: one model copy, weights sent */
    uint64_t examples;
    /* exec */
    const char *cmd;
    char tmpdir[256];
    int verbose;
    struct participation pattern;
    /* evaluate */
    struct fmnist test;
};

static cohort_client *the_client;

static void on_stop_signal(int sig)
{
    if (the_client)
        cohort_client_stop(the_client);
}

static void log_cb(int level, const char *line, void *user)
{
    static const char *names[] = {"ERR", "WARN", "NOTICE", "INFO", "DEBUG"};
    time_t t = time(NULL);
    struct tm tm;
    gmtime_r(&t, &tm);
    char ts[32];
    strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%SZ", &tm);
    fprintf(stderr, "%s %s client: %s\n", ts, level >= 0 && level <= 4 ? names[level] : "?", line);
}

static void event_cb(const struct cohort_event *ev, void *user)
{
    struct client_ctx *x = user;
    if (!x->verbose)
        return;
    switch (ev->kind) {
    case COHORT_EV_CONNECTED:
        fprintf(stderr, "client: connected as %s\n", ev->name ? ev->name : "?");
        break;
    case COHORT_EV_ROUND_RESULT:
        fprintf(stderr, "client: round %llu committed (%u participants)\n",
                (unsigned long long)ev->round, ev->participants);
        break;
    case COHORT_EV_RUN_END:
        fprintf(stderr, "client: the server ended the run: %s\n", ev->message ? ev->message : "");
        break;
    default:
        break;
    }
}

/* A coh_model view over the round's flat params (data not owned). */
static int round_model(const struct cohort_round *r, float *data, struct coh_model *m)
{
    coh_model_init(m);
    for (size_t i = 0; i < r->ntensors; i++) {
        int rc = coh_model_add(m, r->tensors[i].name, r->tensors[i].ndim, r->tensors[i].shape);
        if (rc < 0) {
            coh_model_fini(m);
            return rc;
        }
    }
    m->data = data;
    return 0;
}

static void round_model_release(struct coh_model *m)
{
    m->data = NULL;
    coh_model_fini(m);
}

static int train_fmnist(struct client_ctx *x, struct cohort_round *r)
{
    struct coh_model m;
    char err[512];
    int rc = round_model(r, r->params, &m);
    if (rc < 0)
        return rc;
    double loss = NAN;
    rc = nn_train(&m, &x->train, x->idx, x->nidx, &x->tcfg, &x->rng, &loss, err, sizeof err);
    round_model_release(&m);
    if (rc < 0) {
        snprintf(r->decline_reason, sizeof r->decline_reason, "%.120s", err);
        fprintf(stderr, "client: round %llu: training failed: %s\n", (unsigned long long)r->round,
                err);
        r->decline = 1;
        return 0;
    }
    r->num_examples = x->nidx;
    r->train_loss = loss;
    return 0;
}

static int check_layout(const struct cohort_round *r, const struct coh_model *u, char *why,
                        size_t len)
{
    struct coh_model g;
    if (round_model(r, NULL, &g) < 0)
        return 0;
    int same = coh_model_same_layout(&g, u);
    if (!same) {
        char a[256], b[256];
        coh_model_describe(&g, a, sizeof a);
        coh_model_describe(u, b, sizeof b);
        snprintf(why, len, "update layout %s does not match the global model %s", b, a);
    }
    round_model_release(&g);
    return same;
}

static int train_update(struct client_ctx *x, struct cohort_round *r)
{
    char why[600];
    if (!check_layout(r, &x->update, why, sizeof why)) {
        fprintf(stderr, "client: round %llu: %s; declining\n", (unsigned long long)r->round, why);
        snprintf(r->decline_reason, sizeof r->decline_reason, "update file does not match model");
        r->decline = 1;
        return 0;
    }
    if (x->single_buffer) {
        /* params hold the received model: add the update in place and send the
         * result as trained weights (the server takes the difference). */
        for (size_t i = 0; i < r->numel; i++)
            r->params[i] += x->update.data[i];
        r->out_is_update = 0;
    } else {
        r->params = x->update.data; /* sent from here: no copy (prefill is off) */
        r->out_is_update = 1;
    }
    r->num_examples = x->examples;
    return 0;
}

static int train_exec(struct client_ctx *x, struct cohort_round *r)
{
    char gpath[512], upath[512], rbuf[32];
    snprintf(gpath, sizeof gpath, "%s/global.safetensors", x->tmpdir);
    snprintf(upath, sizeof upath, "%s/update.safetensors", x->tmpdir);
    unlink(upath);
    struct coh_model g;
    int rc = round_model(r, (float *)r->global, &g);
    if (rc < 0)
        return rc;
    rc = coh_st_save(gpath, &g, 0, NULL);
    round_model_release(&g);
    if (rc < 0)
        return rc;
    snprintf(rbuf, sizeof rbuf, "%llu", (unsigned long long)r->round);
    pid_t pid = fork();
    if (pid < 0)
        return -errno;
    if (pid == 0) {
        setenv("COHORT_ROUND", rbuf, 1);
        setenv("COHORT_GLOBAL", gpath, 1);
        setenv("COHORT_UPDATE", upath, 1);
        /* The paths go in as positional parameters, so no quoting of them is needed. */
        char script[4200];
        snprintf(script, sizeof script, "%s \"$1\" \"$2\"", x->cmd);
        execl("/bin/sh", "sh", "-c", script, "sh", gpath, upath, (char *)NULL);
        _exit(127);
    }
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        fprintf(stderr, "client: round %llu: --exec command failed (status %d); declining\n",
                (unsigned long long)r->round, WIFEXITED(st) ? WEXITSTATUS(st) : -1);
        snprintf(r->decline_reason, sizeof r->decline_reason, "training command failed");
        r->decline = 1;
        return 0;
    }
    struct coh_model u;
    char err[512];
    if (coh_st_load(upath, NULL, &u, err, sizeof err) < 0) {
        fprintf(stderr, "client: round %llu: reading the update: %s; declining\n",
                (unsigned long long)r->round, err);
        snprintf(r->decline_reason, sizeof r->decline_reason, "unreadable update file");
        r->decline = 1;
        return 0;
    }
    char why[600];
    if (!check_layout(r, &u, why, sizeof why)) {
        fprintf(stderr, "client: round %llu: %s; declining\n", (unsigned long long)r->round, why);
        snprintf(r->decline_reason, sizeof r->decline_reason, "update does not match model");
        r->decline = 1;
        coh_model_fini(&u);
        return 0;
    }
    memcpy(r->params, u.data, r->numel * sizeof(float));
    coh_model_fini(&u);
    r->out_is_update = 1;
    r->num_examples = x->examples;
    return 0;
}

/* Evaluator: accuracy and loss of the global model on the Fashion-MNIST test set. */
static int eval_fmnist(struct client_ctx *x, struct cohort_round *r)
{
    struct coh_model m;
    char err[512];
    int rc = round_model(r, (float *)r->global, &m);
    if (rc < 0)
        return rc;
    double acc = NAN, loss = NAN;
    rc = nn_eval(&m, &x->test, &acc, &loss, err, sizeof err);
    round_model_release(&m);
    if (rc < 0) {
        fprintf(stderr, "client: round %llu: evaluation failed: %s\n",
                (unsigned long long)r->model_round, err);
        return rc;
    }
    cohort_round_add_metric(r, "accuracy", acc);
    cohort_round_add_metric(r, "loss", loss);
    if (x->verbose)
        fprintf(stderr, "client: round %llu: test accuracy %.4f, loss %.4f (%zu examples)\n",
                (unsigned long long)r->model_round, acc, loss, x->test.n);
    return 0;
}

static int train_cb(struct cohort_round *r, void *user)
{
    struct client_ctx *x = user;
    if (r->evaluate)
        return x->kind == T_EVAL ? eval_fmnist(x, r) : COHORT_EINVAL;
    if (!participation_next(&x->pattern)) {
        r->decline = 1;
        snprintf(r->decline_reason, sizeof r->decline_reason, "inactive (participation pattern)");
        return 0;
    }
    switch (x->kind) {
    case T_FMNIST:
        return train_fmnist(x, r);
    case T_UPDATE:
        return train_update(x, r);
    case T_EXEC:
        return train_exec(x, r);
    default:
        return COHORT_EINVAL;
    }
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: cohort client --server HOST:PORT --ca CA --cert CERT --key KEY TRAINER [options]\n"
            "\n"
            "TRAINER, exactly one of:\n"
            "  --trainer fmnist          built-in Fashion-MNIST trainer (softmax or MLP, read from\n"
            "                            the global model)\n"
            "  --update FILE --examples N   send this fixed update (safetensors) every round\n"
            "  --exec 'CMD'              run CMD GLOBAL.safetensors UPDATE.safetensors each round;\n"
            "                            CMD writes the update (trained minus global) to the second\n"
            "                            path; COHORT_ROUND is set; --examples N is its weight\n"
            "  --evaluate                train nothing: test each new global model on the\n"
            "                            Fashion-MNIST test set (from --data-dir) and report its\n"
            "                            accuracy and loss to the server (role \"evaluator\")\n"
            "\n"
            "fmnist trainer:\n"
            "  --partition I/N           this client's share of the training set (default 1/1)\n"
            "  --split iid|dirichlet:A   how the set is split among the N clients (default iid)\n"
            "  --seed S                  split and minibatch seed (default 1)\n"
            "  --local-steps K           SGD steps per round (default 100)\n"
            "  --batch B                 minibatch size (default 32)\n"
            "  --lr LR                   local learning rate (default 0.1)\n"
            "  --data-dir DIR            (default %s)\n"
            "\n"
            "participation:\n"
            "  --participation P         always (default) | bernoulli:P | markov:P[:A] |\n"
            "                            cyclic:P[:L]; on each round offer the client takes part\n"
            "                            or declines as the pattern says (seeded by --seed)\n"
            "\n"
            "connection:\n"
            "  --once                    leave after taking part in one round\n"
            "  --server-name NAME        name to verify in the server certificate\n"
            "  --max-attempts N          give up after N failed connects in a row (default 0: never)\n"
            "  --retry-ms MIN:MAX        reconnect back-off (default 200:10000)\n"
            "  --verbose                 log connection events\n"
            "  --single-buffer           keep one copy of the model: train in place and send the\n"
            "                            trained weights (the server subtracts the global model)\n",
            FMNIST_DEFAULT_DIR);
}

static int parse_partition(const char *v, int *part, int *nparts)
{
    int i, n;
    char extra;
    if (sscanf(v, "%d/%d%c", &i, &n, &extra) != 2 || n < 1 || n > 100000 || i < 1 || i > n)
        return -1;
    *part = i - 1;
    *nparts = n;
    return 0;
}

int client_main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"server", 1, 0, 'S'}, {"ca", 1, 0, 'A'}, {"cert", 1, 0, 'C'}, {"key", 1, 0, 'K'},
        {"trainer", 1, 0, 't'}, {"update", 1, 0, 'u'}, {"examples", 1, 0, 'e'},
        {"exec", 1, 0, 'x'}, {"partition", 1, 0, 'p'}, {"split", 1, 0, 's'},
        {"seed", 1, 0, 'r'}, {"local-steps", 1, 0, 'l'}, {"batch", 1, 0, 'b'},
        {"lr", 1, 0, 'L'}, {"data-dir", 1, 0, 'd'}, {"once", 0, 0, 'o'},
        {"server-name", 1, 0, 'N'}, {"max-attempts", 1, 0, 'm'}, {"retry-ms", 1, 0, 'R'},
        {"verbose", 0, 0, 'v'}, {"evaluate", 0, 0, 'E'}, {"participation", 1, 0, 'P'}, {"help", 0, 0, 'h'},
        {"single-buffer", 0, 0, '1'}, {0, 0, 0, 0}};
    const char *server = NULL, *ca = NULL, *cert = NULL, *key = NULL, *trainer = NULL;
    const char *update = NULL, *split = "iid", *data_dir = FMNIST_DEFAULT_DIR, *sname = NULL;
    const char *pattern = "always";
    struct client_ctx x;
    memset(&x, 0, sizeof x);
    x.tcfg.local_steps = 100;
    x.tcfg.batch = 32;
    x.tcfg.lr = 0.1f;
    uint64_t seed = 1, u, max_attempts = 0, examples = 0;
    int once = 0, part = 0, nparts = 1, have_examples = 0;
    unsigned rmin = 200, rmax = 10000;
    double d;
    int o;
    optind = 1;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'S': server = optarg; break;
        case 'A': ca = optarg; break;
        case 'C': cert = optarg; break;
        case 'K': key = optarg; break;
        case 't': trainer = optarg; break;
        case 'u': update = optarg; break;
        case 'e':
            if (cli_u64("client", "--examples", optarg, 0, 1ull << 40, &examples) < 0)
                return 2;
            have_examples = 1;
            break;
        case 'x': x.cmd = optarg; break;
        case 'p':
            if (parse_partition(optarg, &part, &nparts) < 0) {
                fprintf(stderr, "cohort client: --partition must be I/N with 1 <= I <= N\n");
                return 2;
            }
            break;
        case 's': split = optarg; break;
        case 'r':
            if (cli_u64("client", "--seed", optarg, 0, UINT64_MAX, &seed) < 0)
                return 2;
            break;
        case 'l':
            if (cli_u64("client", "--local-steps", optarg, 0, 10000000, &u) < 0)
                return 2;
            x.tcfg.local_steps = (int)u;
            break;
        case 'b':
            if (cli_u64("client", "--batch", optarg, 1, 1000000, &u) < 0)
                return 2;
            x.tcfg.batch = (int)u;
            break;
        case 'L':
            if (cli_double("client", "--lr", optarg, 0, 1000, &d) < 0)
                return 2;
            x.tcfg.lr = (float)d;
            break;
        case 'd': data_dir = optarg; break;
        case 'o': once = 1; break;
        case 'N': sname = optarg; break;
        case 'm':
            if (cli_u64("client", "--max-attempts", optarg, 0, 1000000000, &max_attempts) < 0)
                return 2;
            break;
        case 'R':
            if (sscanf(optarg, "%u:%u", &rmin, &rmax) != 2 || rmin < 1 || rmax < rmin) {
                fprintf(stderr, "cohort client: --retry-ms must be MIN:MAX milliseconds\n");
                return 2;
            }
            break;
        case 'v': x.verbose = 1; break;
        case '1': x.single_buffer = 1; break;
        case 'E': x.kind = T_EVAL; break;
        case 'P': pattern = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (!server || !ca) {
        fprintf(stderr, "cohort client: --server and --ca are required (cohort client --help)\n");
        return 2;
    }
    int ntrainers = (trainer != NULL) + (update != NULL) + (x.cmd != NULL) + (x.kind == T_EVAL);
    if (ntrainers != 1) {
        fprintf(stderr, "cohort client: give exactly one of --trainer fmnist, --update FILE, "
                        "--exec CMD, --evaluate\n");
        return 2;
    }
    char err[512];
    int rc = 1;
    struct participation_spec pspec;
    if (participation_parse(pattern, &pspec, err, sizeof err) < 0) {
        fprintf(stderr, "cohort client: --participation: %s\n", err);
        return 2;
    }
    participation_init(&x.pattern, &pspec, -1, seed * 7919u + 17u);
    if (x.kind == T_EVAL) {
        if (fmnist_load(data_dir, 0, &x.test, err, sizeof err) < 0) {
            fprintf(stderr, "cohort client: %s\n", err);
            return 1;
        }
    } else if (trainer) {
        if (strcmp(trainer, "fmnist") != 0) {
            fprintf(stderr, "cohort client: unknown trainer '%s' (known: fmnist)\n", trainer);
            return 2;
        }
        x.kind = T_FMNIST;
        if (fmnist_load(data_dir, 1, &x.train, err, sizeof err) < 0) {
            fprintf(stderr, "cohort client: %s\n", err);
            return 1;
        }
        if (fmnist_partition(&x.train, split, seed, part, nparts, &x.idx, &x.nidx, err,
                             sizeof err) < 0) {
            fprintf(stderr, "cohort client: %s\n", err);
            goto out;
        }
        coh_rng_seed(&x.rng, seed * 1000003u + (uint64_t)part);
        examples = x.nidx;
    } else if (update) {
        if (!have_examples) {
            fprintf(stderr, "cohort client: --update needs --examples N\n");
            return 2;
        }
        x.kind = T_UPDATE;
        if (coh_st_load(update, NULL, &x.update, err, sizeof err) < 0) {
            fprintf(stderr, "cohort client: --update: %s\n", err);
            return 1;
        }
        if (!coh_model_all_finite(&x.update))
            fprintf(stderr, "cohort client: warning: --update %s holds NaN/Inf; the server will "
                            "reject it\n", update);
    } else {
        x.kind = T_EXEC;
        if (!have_examples)
            examples = 1;
        snprintf(x.tmpdir, sizeof x.tmpdir, "/tmp/cohort-exec-XXXXXX");
        if (!mkdtemp(x.tmpdir)) {
            fprintf(stderr, "cohort client: cannot create a temporary directory: %s\n",
                    strerror(errno));
            return 1;
        }
    }
    x.examples = examples;

    cohort_opts *op = NULL;
    cohort_client *c = NULL;
    if ((rc = cohort_opts_new(&op)) < 0 || (rc = cohort_opts_set_server(op, server)) < 0 ||
        (rc = cohort_opts_set_tls(op, ca, cert, key)) < 0 ||
        (sname && (rc = cohort_opts_set_server_name(op, sname)) < 0) ||
        (rc = cohort_opts_set_num_examples(op, examples)) < 0 ||
        (rc = cohort_opts_set_once(op, once)) < 0 ||
        /* --update sends from the file's buffer, so params need no copy of the model;
         * with --single-buffer it adds to the model in params, which then must hold it
         * (it is the received model itself, or a copy of it with an older server). */
        (rc = cohort_opts_set_prefill(op, x.kind != T_UPDATE || x.single_buffer)) < 0 ||
        (rc = cohort_opts_set_single_buffer(op, x.single_buffer)) < 0 ||
        (rc = cohort_opts_set_role(op, x.kind == T_EVAL ? COHORT_ROLE_EVALUATOR
                                                        : COHORT_ROLE_TRAINER)) < 0 ||
        (rc = cohort_opts_set_reconnect(op, rmin, rmax, (uint32_t)max_attempts)) < 0 ||
        (rc = cohort_opts_set_log(op, log_cb, NULL, x.verbose ? COHORT_LOG_INFO : COHORT_LOG_WARN)) < 0 ||
        (rc = cohort_opts_set_event_fn(op, event_cb, &x)) < 0) {
        fprintf(stderr, "cohort client: bad option: %s\n", cohort_strerror(rc));
        cohort_opts_free(op);
        rc = 2;
        goto out;
    }
    rc = cohort_client_new(&c, op);
    cohort_opts_free(op);
    if (rc < 0) {
        fprintf(stderr, "cohort client: %s\n", cohort_strerror(rc));
        rc = 1;
        goto out;
    }
    the_client = c;
    signal(SIGTERM, on_stop_signal);
    signal(SIGINT, on_stop_signal);
    rc = cohort_client_run(c, train_cb, &x);
    the_client = NULL;
    if (rc < 0 && rc != COHORT_ECANCELED)
        fprintf(stderr, "cohort client: %s: %s\n", cohort_strerror(rc),
                cohort_client_last_error(c));
    struct cohort_stats st;
    cohort_client_stats(c, &st);
    if (x.verbose)
        fprintf(stderr, "client: %llu updates sent, %llu accepted, %llu declines, %llu connects\n",
                (unsigned long long)st.updates_sent, (unsigned long long)st.updates_accepted,
                (unsigned long long)st.declines_sent, (unsigned long long)st.connects);
    cohort_client_free(c);
    rc = rc == 0 ? 0 : rc == COHORT_ECANCELED ? 130 : 1;
out:
    if (x.kind == T_EXEC && x.tmpdir[0]) {
        char p[600];
        snprintf(p, sizeof p, "%s/global.safetensors", x.tmpdir);
        unlink(p);
        snprintf(p, sizeof p, "%s/update.safetensors", x.tmpdir);
        unlink(p);
        rmdir(x.tmpdir);
    }
    fmnist_free(&x.train);
    fmnist_free(&x.test);
    free(x.idx);
    coh_model_fini(&x.update);
    return rc;
}
