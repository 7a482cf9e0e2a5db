/*
 * cohortd: arguments, start-up (store, resume or initial model, TLS, listener),
 * signals and the libuv loop; orderly shutdown. Loop thread only.
 */
#include <cblas.h>
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cohort_err.h"
#include "config_file.h"
#include "http.h"
#include "conn.h"
#include "gossip.h"
#include "log.h"
#include "options.h"
#include "pstore.h"
#include "round.h"
#include "safetensors.h"
#include "server.h"
#include "strategy.h"
#include "tls.h"
#include "wire.h"

static uv_timer_t sweep_timer;
static uv_timer_t exit_timer;
static uv_timer_t stream_done_timer; /* offers and RunEnds that waited for a stream */
static uv_timer_t drain_timer;       /* shutdown: how long streams may finish */
#define SHUTDOWN_DRAIN_MS 10000
static char end_reason[256];
static int end_done;

void config_defaults(struct config *c)
{
    memset(c, 0, sizeof *c);
    options_defaults(c);
}

void config_fini(struct config *c)
{
    for (size_t i = 0; i < noptions; i++)
        if (options[i].type == OPT_STR || options[i].type == OPT_ENUM)
            free(*(char **)((char *)c + options[i].offset));
    free(c->config_file);
    memset(c, 0, sizeof *c);
}

/* A crash between writing a checkpoint and renaming it leaves NAME.tmp behind;
 * such a round was never committed and is redone, so the file is garbage. */
static void remove_stale_tmp(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t n = strlen(e->d_name);
        if (n > 4 && strcmp(e->d_name + n - 4, ".tmp") == 0) {
            char p[2048];
            snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
            if (unlink(p) == 0)
                coh_info("main", "removed %s left by an interrupted checkpoint write", p);
        }
    }
    closedir(d);
}

static int make_dir(const char *path)
{
    if (mkdir(path, 0750) < 0 && errno != EEXIST) {
        coh_err("main", "cannot create %s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

/* Loads the state directory's last committed model, or starts from --model. */
static int load_state(struct server *s)
{
    if (s->cfg.gossip) {
        int g = gossip_load_model(s); /* STATE_DIR/model.safetensors, when resuming */
        if (g <= 0)
            return g;
    }
    char err[512];
    struct pstore_last last;
    if (pstore_last_round(s->store, &last) < 0) {
        coh_err("main", "cannot read the participation store");
        return -1;
    }
    struct coh_st_limits lim = {.max_bytes = s->cfg.max_model_bytes,
                                .max_tensors = s->cfg.max_tensors};
    if (last.found) {
        uint8_t sha[32];
        char hex[65];
        /* Stored relative to the state directory (older rows may be absolute), so
         * the directory can move and cohortd can start from any working directory. */
        if (last.checkpoint[0] != '/') {
            char full[sizeof last.checkpoint + 1100];
            int n = snprintf(full, sizeof full, "%s/%s", s->cfg.state_dir, last.checkpoint);
            if (n < 0 || (size_t)n >= sizeof last.checkpoint) {
                coh_err("main", "--state-dir path is too long");
                return -1;
            }
            memcpy(last.checkpoint, full, (size_t)n + 1);
        }
        if (coh_sha256_file(last.checkpoint, sha) < 0) {
            coh_err("main", "checkpoint of round %llu (%s) is missing; the state directory is "
                    "damaged", (unsigned long long)last.round, last.checkpoint);
            return -1;
        }
        coh_hex(sha, 32, hex);
        if (strcmp(hex, last.sha256) != 0) {
            coh_err("main", "checkpoint %s does not match the sha256 in the store; the state "
                    "directory is damaged", last.checkpoint);
            return -1;
        }
        if (coh_st_load(last.checkpoint, &lim, &s->global, err, sizeof err) < 0) {
            coh_err("main", "cannot load checkpoint: %s", err);
            return -1;
        }
        s->last_committed = last.round;
        if (s->cfg.model_path)
            coh_notice("main", "--model %s ignored: the state directory holds committed rounds "
                       "(last %llu) and wins", s->cfg.model_path, (unsigned long long)last.round);
        coh_notice("main", "resuming after round %llu from %s", (unsigned long long)last.round,
                   last.checkpoint);
        return 0;
    }
    if (!s->cfg.model_path) {
        coh_err("main", "%s holds no committed round and no --model was given; pass the initial "
                "model with --model FILE.safetensors", s->cfg.state_dir);
        return -1;
    }
    if (coh_st_load(s->cfg.model_path, &lim, &s->global, err, sizeof err) < 0) {
        coh_err("main", "--model: %s", err);
        return -1;
    }
    if (s->global.ntensors == 0 || !coh_model_all_finite(&s->global)) {
        coh_err("main", "--model %s: the model is empty or holds NaN/Inf", s->cfg.model_path);
        return -1;
    }
    char path[1100], hex[65], now[32];
    uint8_t sha[32];
    snprintf(path, sizeof path, "%s/checkpoints/round-%06d.safetensors", s->cfg.state_dir, 0);
    if (coh_st_save(path, &s->global, 1, sha) < 0) {
        coh_err("main", "cannot write %s", path);
        return -1;
    }
    coh_hex(sha, 32, hex);
    server_iso_now(now, sizeof now);
    struct pstore_round pr = {.round = 0, .strategy = s->cfg.strategy, .started_at = now,
                              .closed_at = now, .mean_train_loss = NAN,
                              .close_reason = "initial model",
                              .checkpoint = "checkpoints/round-000000.safetensors",
                              .sha256 = hex};
    if (pstore_commit_round(s->store, &pr, NULL, 0, NULL, NULL) < 0)
        return -1;
    char desc[512];
    coh_model_describe(&s->global, desc, sizeof desc);
    pstore_meta_set(s->store, "model_layout", desc);
    coh_notice("main", "initial model %s: %zu tensors, %zu parameters (%s)", s->cfg.model_path,
               s->global.ntensors, s->global.numel, desc);
    return 0;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int server_client_allowed(const struct server *s, const char *name)
{
    if (!s->allowed)
        return 1;
    return bsearch(&name, s->allowed, s->nallowed, sizeof *s->allowed, cmp_str) != NULL;
}

static void free_allow_list(struct server *s)
{
    for (size_t i = 0; i < s->nallowed; i++)
        free(s->allowed[i]);
    free(s->allowed);
    s->allowed = NULL;
    s->nallowed = 0;
}

/* One name per line; blank lines and # comments ignored. */
static int load_allow_list(struct server *s, const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        coh_err("main", "--allow-clients %s: %s", path, strerror(errno));
        return -1;
    }
    char line[512];
    size_t cap = 0;
    int lineno = 0;
    s->allowed = NULL;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        size_t n = strlen(line);
        if (n == sizeof line - 1 && line[n - 1] != '\n') {
            coh_err("main", "%s:%d: line too long", path, lineno);
            fclose(f);
            return -1;
        }
        char *p = server_list_entry(line);
        if (!p)
            continue;
        if (s->nallowed == cap) {
            cap = cap ? cap * 2 : 64;
            char **na = realloc(s->allowed, cap * sizeof *na);
            if (!na) {
                fclose(f);
                return -1;
            }
            s->allowed = na;
        }
        s->allowed[s->nallowed++] = strdup(p);
    }
    fclose(f);
    if (!s->allowed) {
        s->allowed = calloc(1, sizeof *s->allowed); /* an empty list allows no one */
    }
    qsort(s->allowed, s->nallowed, sizeof *s->allowed, cmp_str);
    coh_notice("main", "allow-list %s: %zu client names", path, s->nallowed);
    return 0;
}

static int split_host_port(const char *hp, char *host, size_t hlen, int *port)
{
    const char *colon = strrchr(hp, ':');
    if (!colon || colon == hp)
        return -1;
    size_t n = (size_t)(colon - hp);
    if (hp[0] == '[' && n >= 2 && hp[n - 1] == ']') {
        hp++;
        n -= 2;
    }
    if (n >= hlen)
        return -1;
    memcpy(host, hp, n);
    host[n] = '\0';
    char *end;
    long p = strtol(colon + 1, &end, 10);
    if (*end || p < 0 || p > 65535)
        return -1;
    *port = (int)p;
    return 0;
}

static void on_exit_check(uv_timer_t *t)
{
    struct server *s = t->data;
    if (s->nconns > 0 || round_jobs_inflight(s) > 0 || gossip_busy(s))
        return;
    uv_timer_stop(t);
    uv_close((uv_handle_t *)t, NULL);
    uv_close((uv_handle_t *)&sweep_timer, NULL);
    uv_close((uv_handle_t *)&stream_done_timer, NULL);
    uv_close((uv_handle_t *)&drain_timer, NULL);
    uv_close((uv_handle_t *)&s->sigint, NULL);
    uv_close((uv_handle_t *)&s->sigterm, NULL);
    round_fini(s);
    gossip_fini(s);
    conn_streams_fini(s);
}

/* RunEnd (to a READY connection) and the close. */
static void end_conn(struct server *s, struct conn *c)
{
    c->run_end_pending = 0;
    if (c->state == CONN_READY) {
        Cohort__RunEnd re = COHORT__RUN_END__INIT;
        re.reason = end_reason;
        re.last_round = s->last_committed;
        re.done = end_done;
        Cohort__Envelope e = COHORT__ENVELOPE__INIT;
        e.body_case = COHORT__ENVELOPE__BODY_RUN_END;
        e.run_end = &re;
        conn_send(c, &e);
    }
    conn_close(c, "%s", end_done ? "run complete" : "server shutting down");
}

static void on_stream_done(uv_timer_t *t)
{
    struct server *s = t->data;
    for (struct conn *c = s->conn_list; c; c = c->next) {
        if (c->state == CONN_CLOSING) {
            c->offer_pending = c->run_end_pending = 0;
            continue;
        }
        if (c->send_blob)
            continue;
        if (c->run_end_pending) {
            end_conn(s, c);
        } else if (c->offer_pending) {
            c->offer_pending = 0;
            round_offer_waiting(s, c);
        }
    }
}

void server_stream_done(struct server *s)
{
    uv_timer_start(&stream_done_timer, on_stream_done, 0, 0);
}

/* Shutdown: streams that have not finished by now are cut after their chunk. */
static void on_drain(uv_timer_t *t)
{
    struct server *s = t->data;
    for (struct conn *c = s->conn_list; c; c = c->next)
        if (c->run_end_pending && c->state != CONN_CLOSING)
            end_conn(s, c);
}

void server_shutdown(struct server *s, int done, const char *reason)
{
    if (s->stopping)
        return;
    s->stopping = 1;
    coh_notice("main", "shutting down: %s", reason);
    snprintf(end_reason, sizeof end_reason, "%s", reason);
    end_done = done;
    /* A client in the middle of a model gets the rest of it first (the round's
     * RoundResult already went out after its chunk), within SHUTDOWN_DRAIN_MS. */
    int waiting = 0;
    for (struct conn *c = s->conn_list; c; c = c->next) {
        c->offer_pending = 0;
        if (c->state == CONN_READY && c->send_blob && c->send_idx < c->send_blob->nchunks &&
            !c->write_err) {
            c->run_end_pending = 1;
            waiting++;
            continue;
        }
        end_conn(s, c);
    }
    if (waiting) {
        coh_info("main", "%d client(s) still downloading a model: up to %d s for them",
                 waiting, SHUTDOWN_DRAIN_MS / 1000);
        uv_timer_start(&drain_timer, on_drain, SHUTDOWN_DRAIN_MS, 0);
    }
    uv_timer_stop(&s->round_timer);
    gossip_stop(s);
    if (!uv_is_closing((uv_handle_t *)&s->listener))
        uv_close((uv_handle_t *)&s->listener, NULL);
    http_stop(s);
    uv_timer_init(s->loop, &exit_timer);
    exit_timer.data = s;
    uv_timer_start(&exit_timer, on_exit_check, 0, 50);
}

static void on_signal(uv_signal_t *h, int signum)
{
    struct server *s = h->data;
    if (s->stopping) {
        coh_warn("main", "second signal: exiting now without a clean shutdown");
        exit(1);
    }
    server_shutdown(s, 0, signum == SIGINT ? "SIGINT" : "SIGTERM");
}

static void on_sweep(uv_timer_t *t)
{
    conn_sweep(t->data);
}

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int main(int argc, char **argv)
{
    static struct server srv;
    struct server *s = &srv;
    config_defaults(&s->cfg);
    /* The file first, then the command line, so a flag wins over the file. */
    struct config_file_args cfa;
    argc = config_file_args(argc, argv, &cfa);
    int prc = argc < 0 ? 2 : 0;
    if (prc == 0 && cfa.print_example) {
        config_file_example(stdout);
        prc = 1;
    }
    if (prc == 0 && cfa.path) {
        s->cfg.config_file = strdup(cfa.path);
        if (config_file_load(&s->cfg, cfa.path, stderr) < 0)
            prc = 2;
    }
    if (prc == 0)
        prc = options_parse_argv(&s->cfg, argc, argv);
    if (prc == 0 && options_finish(&s->cfg) < 0)
        prc = 2;
    if (prc == 0 && s->cfg.http && http_check_address(s->cfg.http) < 0) {
        fprintf(stderr, "cohortd: --http must be PORT or HOST:PORT with an IP address (got '%s')\n",
                s->cfg.http);
        prc = 2;
    }
    if (prc == 0 && cfa.check) {
        printf("cohortd: %s: configuration OK\n", cfa.path ? cfa.path : "command line");
        prc = 1;
    }
    if (prc) {
        config_fini(&s->cfg);
        return prc == 1 ? 0 : 2;
    }
    coh_log_set_level(s->cfg.log_level);
    coh_log_set_json(s->cfg.log_json);
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    /* Folds are memory-bound; one BLAS thread each keeps the pool predictable. */
    openblas_set_num_threads(1);

    char host[256], path[1100], err[512];
    int port;
    if (split_host_port(s->cfg.listen, host, sizeof host, &port) < 0) {
        fprintf(stderr, "cohortd: --listen must be HOST:PORT (got '%s')\n", s->cfg.listen);
        return 2;
    }
    int rc = 1;
    if (make_dir(s->cfg.state_dir) < 0)
        goto out;
    snprintf(path, sizeof path, "%s/checkpoints", s->cfg.state_dir);
    if (make_dir(path) < 0)
        goto out;
    remove_stale_tmp(path);
    snprintf(path, sizeof path, "%s/cohort.db", s->cfg.state_dir);
    if (pstore_open(&s->store, path, err, sizeof err) < 0) {
        coh_err("main", "participation store: %s", err);
        goto out;
    }
    pstore_set_durable(s->store, s->cfg.durable);
    s->strat = calloc(1, sizeof *s->strat);
    if (!s->strat || strategy_create(s->strat, &s->cfg, s->store, err, sizeof err) < 0) {
        coh_err("main", "%s", err);
        goto out;
    }
    if (load_state(s) < 0)
        goto out;
    if (s->cfg.allow_clients && load_allow_list(s, s->cfg.allow_clients) < 0)
        goto out;
    if (s->cfg.rounds && s->last_committed >= s->cfg.rounds) {
        coh_notice("main", "all %llu rounds are already committed in %s; nothing to do",
                   (unsigned long long)s->cfg.rounds, s->cfg.state_dir);
        rc = 0;
        goto out;
    }
    if ((uint64_t)s->global.numel * 4 > s->cfg.max_model_bytes) {
        coh_err("main", "model of %zu bytes exceeds --max-model-bytes", s->global.numel * 4);
        goto out;
    }
    if (blob_build(&s->global, s->last_committed + 1, s->cfg.chunk_bytes, NULL, NULL, &s->blob) < 0)
        goto out;
    s->ssl_ctx = tls_server_ctx(s->cfg.ca, s->cfg.cert, s->cfg.key, s->cfg.crl,
                               s->cfg.require_client_cert);
    if (!s->ssl_ctx)
        goto out;

    s->loop = uv_default_loop();
    idmap_init(&s->conns_by_id);
    idmap_init(&s->conns_by_client);
    round_init(s);
    uv_tcp_init(s->loop, &s->listener);
    s->listener.data = s;
    struct sockaddr_storage addr;
    if (uv_ip4_addr(host, port, (struct sockaddr_in *)&addr) != 0 &&
        uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr) != 0) {
        coh_err("main", "--listen %s: not an IPv4/IPv6 address", s->cfg.listen);
        goto out;
    }
    int e;
    if ((e = uv_tcp_bind(&s->listener, (struct sockaddr *)&addr, 0)) < 0 ||
        (e = uv_listen((uv_stream_t *)&s->listener, 1024, conn_on_connection)) < 0) {
        coh_err("main", "cannot listen on %s: %s", s->cfg.listen, uv_strerror(e));
        goto out;
    }
    uv_signal_init(s->loop, &s->sigint);
    uv_signal_init(s->loop, &s->sigterm);
    s->sigint.data = s->sigterm.data = s;
    uv_signal_start(&s->sigint, on_signal, SIGINT);
    uv_signal_start(&s->sigterm, on_signal, SIGTERM);
    uv_timer_init(s->loop, &sweep_timer);
    sweep_timer.data = s;
    uv_timer_start(&sweep_timer, on_sweep, 1000, 1000);
    uv_timer_init(s->loop, &stream_done_timer);
    stream_done_timer.data = s;
    uv_timer_init(s->loop, &drain_timer);
    drain_timer.data = s;
    if (s->cfg.gossip && gossip_init(s) < 0)
        goto out;
    if (http_start(s) < 0) {
        s->exit_code = 1;
        server_shutdown(s, 0, "the HTTP endpoint could not start");
    }

    coh_notice("main", "cohortd 0.1.0 listening on %s (TLS 1.3, %s), strategy %s%s, state %s, "
               "next round %llu%s%s", s->cfg.listen,
               s->cfg.require_client_cert ? "client certificates required"
                                          : "client certificates optional",
               s->cfg.strategy, s->cfg.variance_correction ? " + variance correction" : "",
               s->cfg.state_dir, (unsigned long long)s->last_committed + 1,
               s->cfg.rounds ? "" : " (no round limit)",
               s->cfg.durable ? "" : ", durability relaxed");
    printf("cohortd: listening on %s\n", s->cfg.listen);
    if (http_address()[0])
        printf("cohortd: dashboard at http://%s/\n", http_address());
    fflush(stdout);
    uv_run(s->loop, UV_RUN_DEFAULT);
    rc = s->exit_code;
    if (uv_loop_close(s->loop) != 0)
        coh_warn("main", "event loop closed with handles still open");
out:
    gossip_free(s);
    blob_unref(s->blob);
    coh_model_fini(&s->global);
    model_buf_drain();
    if (s->strat)
        strategy_destroy(s->strat);
    free(s->strat);
    pstore_close(s->store);
    SSL_CTX_free(s->ssl_ctx);
    idmap_fini(&s->conns_by_id);
    idmap_fini(&s->conns_by_client);
    free_allow_list(s);
    config_fini(&s->cfg);
    return rc;
}
