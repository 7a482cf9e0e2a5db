/*
 * Gossip mode; see gossip.h and docs/gossip.md. Loop thread only, except the
 * merge job and the model write job, which run on the libuv thread pool and
 * touch only the buffers handed to them (plus s->global, read-only: no local
 * round opens and no other merge starts while a merge job runs, so nothing
 * replaces the model under it).
 */
#include "gossip.h"

#include <errno.h>
#include <math.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cohort_err.h"
#include "conn.h"
#include "dispatch.h"
#include "log.h"
#include "pstore.h"
#include "round.h"
#include "safetensors.h"
#include "server.h"
#include "varcorr.h"
#include "wire.h"

#define AUTO_MERGE_CAP 16
#define PEERS_FLUSH_TICKS 5   /* the peers table is written every 5 s when changed */
#define MAX_SAMPLE_IN 64      /* peer entries read from one push */

static const char *tables =
    "CREATE TABLE IF NOT EXISTS peers("
    "  address TEXT PRIMARY KEY,"
    "  name TEXT NOT NULL DEFAULT '',"
    "  first_seen TEXT NOT NULL,"
    "  last_seen TEXT,"
    "  exchanges INTEGER NOT NULL DEFAULT 0,"
    "  failures INTEGER NOT NULL DEFAULT 0,"
    "  seed INTEGER NOT NULL DEFAULT 0);"
    "CREATE TABLE IF NOT EXISTS merges("
    "  id INTEGER PRIMARY KEY,"
    "  time TEXT NOT NULL,"
    "  round INTEGER NOT NULL,"
    "  peers TEXT NOT NULL,"
    "  models INTEGER NOT NULL,"
    "  method TEXT NOT NULL,"
    "  self_weight REAL NOT NULL,"
    "  variance TEXT NOT NULL);";

/* ---- the merge rule ---- */

int gossip_merge(const struct coh_model *own, const float *const *recv, size_t m, double beta,
                 int corrected, int include_1d, struct coh_model *out,
                 struct gossip_layer *layers, size_t *nlayers)
{
    if (nlayers)
        *nlayers = 0;
    if (m == 0 || !(beta >= 0 && beta <= 1))
        return COHORT_EINVAL;
    int rc = coh_model_clone(out, own, 0);
    if (rc < 0)
        return rc;
    size_t n = own->numel;
    /* In float like the folds; m is small, so the sum loses nothing that matters. */
    for (size_t i = 0; i < n; i++)
        out->data[i] = (float)(beta * own->data[i]);
    float scale = (float)((1.0 - beta) / (double)m);
    for (size_t j = 0; j < m; j++)
        for (size_t i = 0; i < n; i++)
            out->data[i] += scale * recv[j][i];
    size_t nl = 0;
    for (size_t t = 0; t < own->ntensors; t++) {
        const struct coh_tensor *ten = &own->tensors[t];
        if (!coh_vc_eligible(ten, include_1d))
            continue;
        double mean, v, target = 0;
        for (size_t j = 0; j < m; j++) {
            coh_vc_moments(recv[j] + ten->offset, NULL, ten->numel, &mean, &v);
            target += v;
        }
        target /= (double)m;
        double merged;
        coh_vc_moments(out->data + ten->offset, NULL, ten->numel, &mean, &merged);
        double after = merged;
        if (corrected) {
            coh_vc_rescale(out->data + ten->offset, ten->numel, target, COH_VC_EPS);
            coh_vc_moments(out->data + ten->offset, NULL, ten->numel, &mean, &after);
        }
        if (layers) {
            struct gossip_layer *L = &layers[nl];
            L->tensor = t;
            coh_vc_moments(own->data + ten->offset, NULL, ten->numel, &mean, &L->own);
            L->received = target;
            L->merged = merged;
            L->after = after;
        }
        nl++;
    }
    if (nlayers)
        *nlayers = nl;
    return 0;
}

/* ---- store ---- */

void gossip_store_peer(struct server *s, const struct peer *p)
{
    sqlite3 *db = pstore_db(s->store);
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db,
                           "INSERT INTO peers(address, name, first_seen, last_seen, exchanges, "
                           "failures, seed) VALUES(?1, ?2, ?3, NULLIF(?4, ''), ?5, ?6, ?7) "
                           "ON CONFLICT(address) DO UPDATE SET name=?2, "
                           "last_seen=coalesce(NULLIF(?4, ''), last_seen), exchanges=?5, "
                           "failures=?6, seed=max(seed, ?7)",
                           -1, &st, NULL) != SQLITE_OK) {
        coh_warn("gossip", "cannot record peer %s: %s", p->addr, sqlite3_errmsg(db));
        return;
    }
    sqlite3_bind_text(st, 1, p->addr, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, p->name, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, p->first_seen, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, p->last_seen, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 5, (sqlite3_int64)p->exchanges);
    sqlite3_bind_int64(st, 6, (sqlite3_int64)p->failures);
    sqlite3_bind_int(st, 7, p->seed);
    if (sqlite3_step(st) != SQLITE_DONE)
        coh_warn("gossip", "cannot record peer %s: %s", p->addr, sqlite3_errmsg(db));
    sqlite3_finalize(st);
}

static void flush_peers(struct server *s)
{
    struct gossip *g = s->gossip;
    size_t dirty = 0;
    for (size_t i = 0; i < g->view.n; i++)
        dirty += g->view.v[i].dirty != 0;
    if (!dirty)
        return;
    sqlite3 *db = pstore_db(s->store);
    /* One transaction: one fsync for the lot. */
    sqlite3_exec(db, "BEGIN", NULL, NULL, NULL);
    for (size_t i = 0; i < g->view.n; i++) {
        struct peer *p = &g->view.v[i];
        if (p->dirty) {
            gossip_store_peer(s, p);
            p->dirty = 0;
        }
    }
    if (sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
        coh_warn("gossip", "cannot write the peers table: %s", sqlite3_errmsg(db));
        sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    }
}

static void load_peers(struct server *s)
{
    struct gossip *g = s->gossip;
    sqlite3 *db = pstore_db(s->store);
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db,
                           "SELECT address, name, first_seen, coalesce(last_seen, ''), exchanges,"
                           " failures, seed FROM peers WHERE failures < ?1"
                           " ORDER BY coalesce(last_seen, first_seen) DESC LIMIT ?2",
                           -1, &st, NULL) != SQLITE_OK)
        return;
    sqlite3_bind_int64(st, 1, s->cfg.peer_max_failures);
    sqlite3_bind_int64(st, 2, s->cfg.max_peers);
    size_t n = 0;
    while (sqlite3_step(st) == SQLITE_ROW) {
        struct peer *p = NULL;
        const char *addr = (const char *)sqlite3_column_text(st, 0);
        if (peer_view_add(&g->view, addr ? addr : "", (const char *)sqlite3_column_text(st, 1),
                          sqlite3_column_int(st, 6), (const char *)sqlite3_column_text(st, 2),
                          &p) == 1) {
            snprintf(p->last_seen, sizeof p->last_seen, "%s",
                     (const char *)sqlite3_column_text(st, 3));
            p->exchanges = (uint64_t)sqlite3_column_int64(st, 4);
            p->failures = (uint32_t)sqlite3_column_int64(st, 5);
            p->dirty = 0;
            n++;
        }
    }
    sqlite3_finalize(st);
    if (n)
        coh_notice("gossip", "%zu peers known from the store", n);
}

/* ---- model file ---- */

static void model_path(const struct server *s, char *buf, size_t len)
{
    snprintf(buf, len, "%s/model.safetensors", s->cfg.state_dir);
}

int gossip_load_model(struct server *s)
{
    char path[1200], err[512];
    model_path(s, path, sizeof path);
    struct pstore_last last;
    if (pstore_last_round(s->store, &last) < 0) {
        coh_err("gossip", "cannot read the participation store");
        return -1;
    }
    struct stat sb;
    if (!last.found || stat(path, &sb) < 0)
        return 1;
    struct coh_st_limits lim = {.max_bytes = s->cfg.max_model_bytes,
                                .max_tensors = s->cfg.max_tensors};
    if (coh_st_load(path, &lim, &s->global, err, sizeof err) < 0) {
        coh_err("gossip", "cannot load %s: %s; the state directory is damaged", path, err);
        return -1;
    }
    char want[4096] = "", have[4096];
    pstore_meta_get(s->store, "model_layout", want, sizeof want);
    coh_model_describe(&s->global, have, sizeof have);
    if (want[0] && strcmp(want, have) != 0) {
        coh_err("gossip", "%s holds %s, but this node's model is %s; the state directory is "
                "damaged", path, have, want);
        coh_model_fini(&s->global);
        return -1;
    }
    if (!coh_model_all_finite(&s->global)) {
        coh_err("gossip", "%s holds NaN/Inf; the state directory is damaged", path);
        coh_model_fini(&s->global);
        return -1;
    }
    s->last_committed = last.round;
    if (s->cfg.model_path)
        coh_notice("gossip", "--model %s ignored: resuming from %s", s->cfg.model_path, path);
    coh_notice("gossip", "resuming after %llu local rounds from %s",
               (unsigned long long)last.round, path);
    return 0;
}

struct persist_job {
    uv_work_t req;
    struct server *s;
    struct coh_model snap;
    char path[1200];
    int durable;
    int rc;
};

static void persist_work(uv_work_t *req)
{
    struct persist_job *j = req->data;
    j->rc = coh_st_save(j->path, &j->snap, j->durable, NULL);
}

static void persist_done(uv_work_t *req, int status)
{
    struct persist_job *j = req->data;
    struct gossip *g = j->s->gossip;
    g->persist_running = 0;
    if (j->rc < 0) {
        coh_err("gossip", "cannot write %s: %s%s", j->path, cohort_strerror(j->rc),
                g->stopped ? "" : "; retrying");
        if (!g->stopped)
            g->dirty = 1;
    }
    coh_model_fini(&j->snap);
    free(j);
}

static void persist(struct server *s)
{
    struct gossip *g = s->gossip;
    if (g->persist_running || !g->dirty)
        return;
    struct persist_job *j = calloc(1, sizeof *j);
    if (!j || coh_model_clone(&j->snap, &s->global, 1) < 0) {
        free(j);
        coh_warn("gossip", "out of memory snapshotting the model; retrying");
        return;
    }
    j->s = s;
    j->durable = s->cfg.durable;
    model_path(s, j->path, sizeof j->path);
    j->req.data = j;
    g->dirty = 0;
    g->persist_running = 1;
    uv_queue_work(s->loop, &j->req, persist_work, persist_done);
}

void gossip_model_changed(struct server *s)
{
    if (s->gossip)
        s->gossip->dirty = 1;
}

/* ---- merging ---- */

size_t gossip_merge_after(const struct server *s)
{
    if (s->cfg.merge_after)
        return s->cfg.merge_after;
    const struct gossip *g = s->gossip;
    size_t n = g->view.n;
    if (s->cfg.fanout && s->cfg.fanout < n)
        n = s->cfg.fanout;
    if (n > AUTO_MERGE_CAP)
        n = AUTO_MERGE_CAP;
    return n ? n : 1;
}

struct merge_job {
    uv_work_t req;
    struct server *s;
    struct gossip_entry *in;
    size_t m;
    double beta;
    int corrected, vc_1d;
    uint32_t chunk_bytes;
    uint64_t round;
    struct coh_model out;
    struct gossip_layer *layers;
    size_t nlayers;
    struct model_blob *blob;
    int rc;
    char err[200];
};

static void merge_work(uv_work_t *req)
{
    struct merge_job *j = req->data;
    const struct coh_model *own = &j->s->global;
    const float **ptrs = malloc(j->m * sizeof *ptrs);
    if (!ptrs) {
        j->rc = COHORT_ENOMEM;
        return;
    }
    for (size_t i = 0; i < j->m; i++)
        ptrs[i] = j->in[i].data;
    j->rc = gossip_merge(own, ptrs, j->m, j->beta, j->corrected, j->vc_1d, &j->out, j->layers,
                         &j->nlayers);
    free(ptrs);
    if (j->rc < 0) {
        snprintf(j->err, sizeof j->err, "%s", cohort_strerror(j->rc));
        return;
    }
    if (!coh_model_all_finite(&j->out)) {
        j->rc = COHORT_ENONFINITE;
        snprintf(j->err, sizeof j->err, "the merged model is not finite");
        return;
    }
    j->rc = blob_build(&j->out, j->round, j->chunk_bytes, NULL, NULL, &j->blob);
    /* Peers check pushes by sha256: hash here, not on the loop thread. */
    if (j->rc == 0 && !blob_sha256(j->blob)) {
        /* The data goes back to j->out (freed by merge_done); blob_unref is the
         * loop thread's. */
        free(j->blob);
        j->blob = NULL;
        j->out.borrowed = 0;
        j->rc = COHORT_ENOMEM;
    }
    if (j->rc < 0)
        snprintf(j->err, sizeof j->err, "serializing: %s", cohort_strerror(j->rc));
}

static void record_merge(struct server *s, struct merge_job *j, const char *names)
{
    /* Per-layer variances as one JSON object, e.g.
     * {"fc1.weight":{"own":0.0025,"received":0.0024,"merged":0.0012,"after":0.0024}} */
    size_t cap = 64 + j->nlayers * (COH_MAX_NAME + 120);
    char *json = malloc(cap);
    if (!json)
        return;
    size_t pos = 0;
    pos += (size_t)snprintf(json + pos, cap - pos, "{");
    for (size_t i = 0; i < j->nlayers; i++) {
        const struct gossip_layer *L = &j->layers[i];
        const char *tn = j->out.tensors[L->tensor].name;
        pos += (size_t)snprintf(json + pos, cap - pos, "%s\"", i ? "," : "");
        /* Tensor names are JSON-escaped the simple way: quotes and backslashes. */
        for (const char *q = tn; *q && pos + 4 < cap; q++) {
            if (*q == '"' || *q == '\\')
                json[pos++] = '\\';
            json[pos++] = (unsigned char)*q < 0x20 ? '?' : *q;
        }
        pos += (size_t)snprintf(json + pos, cap - pos,
                                "\":{\"own\":%.6g,\"received\":%.6g,\"merged\":%.6g,"
                                "\"after\":%.6g}",
                                L->own, L->received, L->merged, L->after);
    }
    snprintf(json + pos, cap - pos, "}");
    char now[32];
    server_iso_now(now, sizeof now);
    sqlite3 *db = pstore_db(s->store);
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db,
                           "INSERT INTO merges(time, round, peers, models, method, self_weight, "
                           "variance) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                           -1, &st, NULL) == SQLITE_OK) {
        sqlite3_bind_text(st, 1, now, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, (sqlite3_int64)s->last_committed);
        sqlite3_bind_text(st, 3, names, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 4, (sqlite3_int64)j->m);
        sqlite3_bind_text(st, 5, j->corrected ? "variance-corrected" : "plain", -1,
                          SQLITE_STATIC);
        sqlite3_bind_double(st, 6, j->beta);
        sqlite3_bind_text(st, 7, json, -1, SQLITE_STATIC);
        if (sqlite3_step(st) != SQLITE_DONE)
            coh_warn("gossip", "cannot record the merge: %s", sqlite3_errmsg(db));
    } else {
        coh_warn("gossip", "cannot record the merge: %s", sqlite3_errmsg(db));
    }
    sqlite3_finalize(st);
    free(json);
}

static int start_merge(struct server *s);

static void merge_done(uv_work_t *req, int status)
{
    struct merge_job *j = req->data;
    struct server *s = j->s;
    struct gossip *g = s->gossip;
    g->merge_running = 0;
    size_t nlen = 1;
    for (size_t i = 0; i < j->m; i++)
        nlen += strlen(j->in[i].name) + 1;
    char *names = calloc(1, nlen);
    for (size_t i = 0; names && i < j->m; i++) {
        if (i)
            strcat(names, ",");
        strcat(names, j->in[i].name);
    }
    if (j->rc < 0) {
        coh_err("gossip", "merge of %zu models (%s) failed: %s; they are dropped, the model "
                "is kept", j->m, names ? names : "?", j->err);
        coh_model_fini(&j->out);
    } else {
        coh_model_fini(&s->global);
        s->global = j->out;
        blob_unref(s->blob);
        s->blob = j->blob;
        g->merges++;
        gossip_model_changed(s);
        record_merge(s, j, names ? names : "");
        if (j->nlayers) {
            const struct gossip_layer *L = &j->layers[0];
            coh_info("gossip", "merge %llu after round %llu: %zu models (%s), %s, beta %.2f; %s "
                     "variance own %.3g, received %.3g, averaged %.3g, now %.3g",
                     (unsigned long long)g->merges, (unsigned long long)s->last_committed, j->m,
                     names ? names : "?", j->corrected ? "variance-corrected" : "plain", j->beta,
                     s->global.tensors[L->tensor].name, L->own, L->received, L->merged,
                     L->after);
        } else {
            coh_info("gossip", "merge %llu after round %llu: %zu models (%s), beta %.2f",
                     (unsigned long long)g->merges, (unsigned long long)s->last_committed, j->m,
                     names ? names : "?", j->beta);
        }
    }
    free(names);
    for (size_t i = 0; i < j->m; i++)
        free(j->in[i].data);
    free(j->in);
    free(j->layers);
    free(j);
    if (!s->stopping) {
        start_merge(s);
        round_maybe_start(s);
    }
}

static int merge_due(struct server *s)
{
    struct gossip *g = s->gossip;
    if (g->nbuf == 0)
        return 0;
    if (g->nbuf >= gossip_merge_after(s))
        return 1;
    if (s->cfg.merge_timeout_s > 0) {
        double oldest = g->buf[0].arrived;
        for (size_t i = 1; i < g->nbuf; i++)
            if (g->buf[i].arrived < oldest)
                oldest = g->buf[i].arrived;
        if (server_now(s) - oldest >= s->cfg.merge_timeout_s)
            return 1;
    }
    return 0;
}

/* Starts the merge job when one is due and no local round is in the way.
 * Returns 1 when a merge is running afterwards. */
static int start_merge(struct server *s)
{
    struct gossip *g = s->gossip;
    if (g->merge_running)
        return 1;
    if (g->stopped || s->stopping || s->cur.phase != PHASE_WAITING || !merge_due(s))
        return 0;
    struct merge_job *j = calloc(1, sizeof *j);
    size_t nt = s->global.ntensors ? s->global.ntensors : 1;
    if (j)
        j->layers = calloc(nt, sizeof *j->layers);
    if (!j || !j->layers) {
        if (j)
            free(j->layers);
        free(j);
        coh_warn("gossip", "out of memory starting a merge; retrying later");
        return 0;
    }
    j->s = s;
    j->in = g->buf;
    j->m = g->nbuf;
    g->buf = NULL;
    g->nbuf = g->capbuf = 0;
    j->beta = s->cfg.merge_self_weight;
    j->corrected = g->corrected;
    j->vc_1d = s->cfg.vc_include_1d;
    j->chunk_bytes = s->cfg.chunk_bytes;
    j->round = s->last_committed + 1;
    j->req.data = j;
    g->merge_running = 1;
    uv_queue_work(s->loop, &j->req, merge_work, merge_done);
    return 1;
}

/* ---- local rounds ---- */

static void on_gate(uv_timer_t *t)
{
    struct server *s = t->data;
    round_maybe_start(s);
}

int gossip_hold_round(struct server *s)
{
    struct gossip *g = s->gossip;
    if (!g)
        return 0;
    if (start_merge(s))
        return 1;
    if (s->cfg.round_interval_s > 0) {
        double now = server_now(s);
        if (now < g->next_round_at) {
            uint64_t ms = (uint64_t)((g->next_round_at - now) * 1000.0) + 1;
            uv_timer_start(&g->gate_timer, on_gate, ms, 0);
            return 1;
        }
        g->next_round_at =
            now + s->cfg.round_interval_s * (0.8 + 0.4 * coh_rng_uniform(&g->rng));
    }
    return 0;
}

void gossip_on_commit(struct server *s)
{
    struct gossip *g = s->gossip;
    if (!g)
        return;
    gossip_model_changed(s);
    peer_push(s, "local round");
}

/* ---- incoming pushes ---- */

static void send_ack(struct conn *c, uint64_t round, int accepted, const char *reason)
{
    Cohort__GossipAck a = COHORT__GOSSIP_ACK__INIT;
    a.round = round;
    a.accepted = accepted;
    a.reason = (char *)(reason ? reason : "");
    Cohort__Envelope e = COHORT__ENVELOPE__INIT;
    e.body_case = COHORT__ENVELOPE__BODY_GOSSIP_ACK;
    e.gossip_ack = &a;
    conn_send(c, &e);
}

static void rx_release(struct gossip *g, struct gossip_link *l)
{
    if (!l->rx_active)
        return;
    free(l->rx_buf);
    EVP_MD_CTX_free(l->rx_sha);
    l->rx_buf = NULL;
    l->rx_sha = NULL;
    l->rx_active = 0;
    g->rx_active--;
}

static void refuse(struct conn *c, uint64_t round, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void refuse(struct conn *c, uint64_t round, const char *fmt, ...)
{
    struct gossip *g = c->srv->gossip;
    struct gossip_link *l = c->link;
    char why[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    rx_release(g, l);
    l->discarding = 1;
    l->discard_round = round;
    g->refused++;
    if (strcmp(why, "busy") != 0) {
        char label[400];
        coh_warn("gossip", "%s: push refused: %s", conn_label(c, label, sizeof label), why);
    }
    send_ack(c, round, 0, why);
}

static int layout_ok(const struct coh_model *g, const Cohort__GossipPush *p, char *why,
                     size_t len)
{
    if (p->n_tensors != g->ntensors) {
        snprintf(why, len, "%zu tensors, this node's model has %zu", p->n_tensors, g->ntensors);
        return 0;
    }
    for (size_t i = 0; i < g->ntensors; i++) {
        const struct coh_tensor *t = &g->tensors[i];
        const Cohort__TensorInfo *ti = p->tensors[i];
        if (!ti->name || strcmp(ti->name, t->name) != 0) {
            snprintf(why, len, "tensor %zu is '%.64s', expected '%s'", i, ti->name ? ti->name : "",
                     t->name);
            return 0;
        }
        int same = ti->n_shape == (size_t)t->ndim;
        for (int d = 0; same && d < t->ndim; d++)
            same = ti->shape[d] == t->shape[d];
        if (!same) {
            snprintf(why, len, "tensor '%s' has another shape", t->name);
            return 0;
        }
    }
    if (p->total_bytes != (uint64_t)g->numel * 4) {
        snprintf(why, len, "total_bytes %llu, this node's model has %llu",
                 (unsigned long long)p->total_bytes, (unsigned long long)g->numel * 4);
        return 0;
    }
    if (p->chunk_count == 0 || p->chunk_count > p->total_bytes / 4 + 1) {
        snprintf(why, len, "chunk_count %u does not fit %llu bytes", p->chunk_count,
                 (unsigned long long)p->total_bytes);
        return 0;
    }
    if (p->model_sha256.len != 32) {
        snprintf(why, len, "model_sha256 is not 32 bytes");
        return 0;
    }
    return 1;
}

static void learn_peers(struct conn *c, const Cohort__GossipPush *p)
{
    struct server *s = c->srv;
    struct gossip *g = s->gossip;
    struct gossip_link *l = c->link;
    char now[32];
    server_iso_now(now, sizeof now);
    if (p->address && peer_addr_valid(p->address)) {
        snprintf(l->rx_from, sizeof l->rx_from, "%s", p->address);
        struct peer *q = NULL;
        if (s->cfg.peer_sample || peer_view_find(&g->view, p->address)) {
            if (peer_view_add(&g->view, p->address, c->name, 0, now, &q) == 1)
                coh_info("gossip", "learned peer %s (%s) from its push", p->address, c->name);
        }
        /* It is alive: try it again now, whatever its back-off said. */
        if (q)
            q->next_try = 0;
    }
    if (!s->cfg.peer_sample)
        return;
    size_t n = p->n_peers < MAX_SAMPLE_IN ? p->n_peers : MAX_SAMPLE_IN;
    for (size_t i = 0; i < n; i++) {
        const Cohort__PeerInfo *pi = p->peers[i];
        if (pi->address && peer_view_add(&g->view, pi->address, pi->name, 0, now, NULL) == 1)
            coh_info("gossip", "learned peer %s (%s) from %s", pi->address,
                     pi->name && pi->name[0] ? pi->name : "name unknown", c->name);
    }
}

static void rx_begin(struct conn *c, const Cohort__GossipPush *p)
{
    struct server *s = c->srv;
    struct gossip *g = s->gossip;
    struct gossip_link *l = c->link;
    if (l->rx_active) {
        conn_send_error(c, COHORT_ESTATE, 0, 1, "GossipPush before the previous push ended");
        conn_close(c, "peer started a push inside another");
        return;
    }
    learn_peers(c, p);
    char why[200];
    if (!layout_ok(&s->global, p, why, sizeof why)) {
        refuse(c, p->round, "%s", why);
        return;
    }
    if (g->stopped || s->stopping) {
        refuse(c, p->round, "busy");
        return;
    }
    /* Bounded memory: buffered models plus pushes being received stay within the
     * merge threshold. Every arrival counts, as in the paper's protocol, so two
     * pushes of one sender are both merged. */
    size_t cap = gossip_merge_after(s);
    if (g->nbuf + g->rx_active >= cap) {
        refuse(c, p->round, "busy");
        return;
    }
    l->rx_buf = malloc(s->global.numel ? s->global.numel * 4 : 4);
    l->rx_sha = EVP_MD_CTX_new();
    if (!l->rx_buf || !l->rx_sha || !EVP_DigestInit_ex(l->rx_sha, EVP_sha256(), NULL)) {
        free(l->rx_buf);
        EVP_MD_CTX_free(l->rx_sha);
        l->rx_buf = NULL;
        l->rx_sha = NULL;
        refuse(c, p->round, "busy");
        return;
    }
    l->rx_active = 1;
    g->rx_active++;
    l->discarding = 0;
    l->rx_round = p->round;
    l->rx_total = p->total_bytes;
    l->rx_received = 0;
    l->rx_chunks = 0;
    l->rx_nchunks = p->chunk_count;
    l->rx_checked = 0;
    l->rx_started = server_now(s);
    memcpy(l->rx_want, p->model_sha256.data, 32);
}

static void rx_complete(struct conn *c)
{
    struct server *s = c->srv;
    struct gossip *g = s->gossip;
    struct gossip_link *l = c->link;
    uint64_t round = l->rx_round;
    if (l->rx_chunks != l->rx_nchunks) {
        refuse(c, round, "%u chunks announced, %u received", l->rx_nchunks, l->rx_chunks);
        return;
    }
    uint8_t digest[32];
    unsigned int dl = 0;
    EVP_DigestFinal_ex(l->rx_sha, digest, &dl);
    if (CRYPTO_memcmp(digest, l->rx_want, 32) != 0) {
        refuse(c, round, "sha256 of the model does not match the push");
        return;
    }
    float *data = l->rx_buf;
    l->rx_buf = NULL;
    rx_release(g, l);
    if (g->nbuf == g->capbuf) {
        size_t ncap = g->capbuf ? g->capbuf * 2 : 8;
        struct gossip_entry *nb = realloc(g->buf, ncap * sizeof *nb);
        if (!nb) {
            free(data);
            send_ack(c, round, 0, "busy");
            return;
        }
        g->buf = nb;
        g->capbuf = ncap;
    }
    struct gossip_entry *e = &g->buf[g->nbuf++];
    snprintf(e->name, sizeof e->name, "%s", c->name);
    e->data = data;
    e->arrived = server_now(s);
    g->received++;
    send_ack(c, round, 1, NULL);
    char now[32];
    server_iso_now(now, sizeof now);
    struct peer *p = l->rx_from[0] ? peer_view_find(&g->view, l->rx_from) : NULL;
    if (p) {
        p->exchanges++;
        snprintf(p->last_seen, sizeof p->last_seen, "%s", now);
        p->dirty = 1;
    }
    coh_debug("gossip", "model from %s buffered (%zu of %zu)", c->name, g->nbuf,
              gossip_merge_after(s));
    start_merge(s);
}

static void rx_chunk(struct conn *c, const struct coh_chunk_view *v)
{
    struct gossip_link *l = c->link;
    if (v->kind != COH_CHUNK_MODEL) {
        conn_send_error(c, COHORT_ESTATE, 0, 1, "UpdateChunk on a peer link");
        conn_close(c, "peer sent an UpdateChunk");
        return;
    }
    if (!l->rx_active) {
        if (l->discarding && v->round == l->discard_round)
            return;
        conn_send_error(c, COHORT_ESTATE, v->round, 1, "ModelChunk without GossipPush");
        conn_close(c, "peer sent a ModelChunk without GossipPush");
        return;
    }
    if (v->round != l->rx_round || v->offset != l->rx_received ||
        v->len > l->rx_total - l->rx_received || l->rx_chunks >= l->rx_nchunks) {
        conn_send_error(c, COHORT_EFRAME, v->round, 1,
                        "chunk %u (round %llu, offset %llu, %zu bytes) does not continue the push",
                        v->index, (unsigned long long)v->round, (unsigned long long)v->offset,
                        v->len);
        conn_close(c, "peer sent a chunk that does not continue its push");
        return;
    }
    memcpy((uint8_t *)l->rx_buf + l->rx_received, v->data, v->len);
    EVP_DigestUpdate(l->rx_sha, v->data, v->len);
    l->rx_received += v->len;
    l->rx_chunks++;
    size_t upto = (size_t)(l->rx_received / 4);
    for (size_t i = l->rx_checked; i < upto; i++) {
        if (!isfinite(l->rx_buf[i])) {
            refuse(c, l->rx_round, "the model contains NaN or Inf (element %zu)", i);
            return;
        }
    }
    l->rx_checked = upto;
    if (l->rx_received == l->rx_total)
        rx_complete(c);
}

void gossip_on_frame(struct conn *c, const uint8_t *frame, size_t len)
{
    struct coh_chunk_view v;
    int r = coh_wire_peek_chunk(frame, len, &v);
    if (r < 0) {
        conn_send_error(c, COHORT_EFRAME, 0, 1, "malformed chunk frame");
        conn_close(c, "malformed chunk frame of %zu bytes on a peer link", len);
        return;
    }
    if (r == 1) {
        if (c->link->outgoing) {
            conn_send_error(c, COHORT_ESTATE, 0, 1, "chunk frames are not expected here");
            conn_close(c, "peer sent chunk frames on our outgoing link");
            return;
        }
        rx_chunk(c, &v);
        return;
    }
    Cohort__Envelope *e = NULL;
    if (coh_wire_decode(frame, len, &e) < 0) {
        conn_send_error(c, COHORT_EFRAME, 0, 1, "frame of %zu bytes does not decode", len);
        conn_close(c, "frame of %zu bytes from a peer does not decode", len);
        return;
    }
    if (c->link->outgoing) {
        peer_link_frame(c, e);
        coh_wire_free(e);
        return;
    }
    switch (e->body_case) {
    case COHORT__ENVELOPE__BODY_GOSSIP_PUSH:
        rx_begin(c, e->gossip_push);
        break;
    case COHORT__ENVELOPE__BODY_HEARTBEAT:
        dispatch_heartbeat(c, e->heartbeat);
        break;
    case COHORT__ENVELOPE__BODY_ERROR:
        dispatch_remote_error(c, "gossip", "peer", e->error);
        break;
    default:
        conn_send_error(c, COHORT_ESTATE, 0, 1, "message type %d is not accepted from a peer",
                        (int)e->body_case);
        conn_close(c, "peer sent message type %d", (int)e->body_case);
        break;
    }
    coh_wire_free(e);
}

void gossip_on_peer_hello(struct conn *c, const Cohort__Hello *h)
{
    struct server *s = c->srv;
    char label[400];
    if (!s->gossip) {
        conn_send_error(c, COHORT_ESTATE, 0, 1,
                        "this cohortd is a federation server (--mode fl); it takes no gossip "
                        "peers");
        conn_close(c, "a gossip peer connected to a --mode fl server");
        return;
    }
    const char *prefix = s->cfg.peer_prefix;
    if (strncmp(c->name, "anon-", 5) == 0 ||
        (prefix && strncmp(c->name, prefix, strlen(prefix)) != 0)) {
        coh_warn("gossip", "%s: refusing peer: certificate CN '%s' is not a peer certificate "
                 "(CN must start with '%s')", conn_label(c, label, sizeof label), c->name,
                 prefix ? prefix : "");
        conn_send_error(c, COHORT_ECERT, 0, 1, "certificate CN '%s' is not a peer certificate",
                        c->name);
        conn_close(c, "not a peer certificate");
        return;
    }
    struct gossip_link *l = calloc(1, sizeof *l);
    if (!l) {
        conn_close(c, "out of memory accepting a peer");
        return;
    }
    l->conn_id = c->id;
    c->link = l;
    c->state = CONN_PEER;
    dispatch_welcome(c, s->last_committed);
    coh_info("gossip", "%s: peer connected", conn_label(c, label, sizeof label));
}

void gossip_link_connected(struct conn *c)
{
    peer_link_connected(c);
}

void gossip_link_gone(struct conn *c)
{
    struct gossip_link *l = c->link;
    struct gossip *g = c->srv->gossip;
    if (g) {
        if (l->outgoing)
            peer_link_gone(c);
        else
            rx_release(g, l);
    } else {
        free(l->rx_buf);
        EVP_MD_CTX_free(l->rx_sha);
    }
    c->link = NULL;
    free(l);
}

/* ---- timers, start-up, shutdown ---- */

static void on_push_timer(uv_timer_t *t)
{
    struct server *s = t->data;
    struct gossip *g = s->gossip;
    if (server_now(s) - g->last_push >= s->cfg.gossip_interval_s * 0.95)
        peer_push(s, "interval");
}

static void on_tick(uv_timer_t *t)
{
    struct server *s = t->data;
    struct gossip *g = s->gossip;
    persist(s);
    if (++g->ticks % PEERS_FLUSH_TICKS == 0)
        flush_peers(s);
    /* A partial buffer may have become old enough to merge. */
    if (s->cur.phase == PHASE_WAITING && start_merge(s) == 0)
        round_maybe_start(s);
}

static SSL_CTX *client_ctx(const struct config *cfg)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    char err[256];
    if (!ctx)
        goto fail;
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    if (SSL_CTX_use_certificate_chain_file(ctx, cfg->cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, cfg->key, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        ERR_error_string_n(ERR_get_error(), err, sizeof err);
        coh_err("gossip", "cannot use --cert %s / --key %s to dial peers: %s", cfg->cert,
                cfg->key, err);
        goto fail;
    }
    if (SSL_CTX_load_verify_locations(ctx, cfg->ca, NULL) != 1) {
        ERR_error_string_n(ERR_get_error(), err, sizeof err);
        coh_err("gossip", "cannot load --ca %s: %s", cfg->ca, err);
        goto fail;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    return ctx;
fail:
    ERR_clear_error();
    SSL_CTX_free(ctx);
    return NULL;
}

/* CN of our own certificate: peers know this node by it. */
static void own_name(const struct config *cfg, char *buf, size_t len)
{
    buf[0] = '\0';
    FILE *f = fopen(cfg->cert, "r");
    if (!f)
        return;
    X509 *x = PEM_read_X509(f, NULL, NULL, NULL);
    fclose(f);
    if (x) {
        X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, buf, (int)len);
        X509_free(x);
    }
    ERR_clear_error();
}

static int add_seed(struct server *s, const char *addr, const char *origin)
{
    struct gossip *g = s->gossip;
    if (!peer_addr_valid(addr)) {
        coh_err("gossip", "%s: '%s' is not HOST:PORT", origin, addr);
        return -1;
    }
    char now[32];
    server_iso_now(now, sizeof now);
    struct peer *p = NULL;
    int rc = peer_view_add(&g->view, addr, NULL, 1, now, &p);
    if (rc < 0)
        return -1;
    if (p) /* a seed gets a fresh chance even if the store remembers failures */
        p->failures = 0;
    else if (strcmp(addr, g->self_addr) != 0)
        coh_warn("gossip", "%s: seed %s ignored: the peer view is full (--max-peers %u)", origin,
                 addr, s->cfg.max_peers);
    return 0;
}

static int load_seeds(struct server *s)
{
    if (s->cfg.peers) {
        char *list = strdup(s->cfg.peers);
        if (!list)
            return -1;
        char *save = NULL;
        for (char *t = strtok_r(list, ", ", &save); t; t = strtok_r(NULL, ", ", &save)) {
            if (add_seed(s, t, "--peers") < 0) {
                free(list);
                return -1;
            }
        }
        free(list);
    }
    if (s->cfg.peers_file) {
        FILE *f = fopen(s->cfg.peers_file, "r");
        if (!f) {
            coh_err("gossip", "--peers-file %s: %s", s->cfg.peers_file, strerror(errno));
            return -1;
        }
        char line[512], origin[600];
        int lineno = 0;
        while (fgets(line, sizeof line, f)) {
            lineno++;
            char *p = server_list_entry(line);
            if (!p)
                continue;
            snprintf(origin, sizeof origin, "%s:%d", s->cfg.peers_file, lineno);
            if (add_seed(s, p, origin) < 0) {
                fclose(f);
                return -1;
            }
        }
        fclose(f);
    }
    return 0;
}

int gossip_init(struct server *s)
{
    struct gossip *g = calloc(1, sizeof *g);
    if (!g)
        return -1;
    s->gossip = g;
    g->srv = s;
    g->corrected = strcmp(s->cfg.merge_s, "plain") != 0;
    snprintf(g->self_addr, sizeof g->self_addr, "%s",
             s->cfg.advertise ? s->cfg.advertise : s->cfg.listen);
    if (!peer_addr_valid(g->self_addr)) {
        coh_err("gossip", "--advertise '%s' is not HOST:PORT", g->self_addr);
        return -1;
    }
    if (strncmp(g->self_addr, "0.0.0.0:", 8) == 0 || strncmp(g->self_addr, "[::]:", 5) == 0) {
        coh_err("gossip", "peers cannot dial %s; pass --advertise HOST:PORT with an address they "
                "can reach", g->self_addr);
        return -1;
    }
    char name[PEER_NAME_MAX];
    own_name(&s->cfg, name, sizeof name);
    peer_view_init(&g->view, s->cfg.max_peers, g->self_addr, name);
    uint64_t seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    for (const char *p = g->self_addr; *p; p++)
        seed = seed * 1099511628211ull + (unsigned char)*p;
    coh_rng_seed(&g->rng, seed);
    if (sqlite3_exec(pstore_db(s->store), tables, NULL, NULL, NULL) != SQLITE_OK) {
        coh_err("gossip", "cannot create the gossip tables: %s",
                sqlite3_errmsg(pstore_db(s->store)));
        return -1;
    }
    load_peers(s);
    if (load_seeds(s) < 0)
        return -1;
    g->client_ctx = client_ctx(&s->cfg);
    if (!g->client_ctx)
        return -1;
    /* The model file exists from the first moment on, for operators and cohort eval. */
    char path[1200];
    struct stat sb;
    model_path(s, path, sizeof path);
    if (stat(path, &sb) < 0 && coh_st_save(path, &s->global, s->cfg.durable, NULL) < 0) {
        coh_err("gossip", "cannot write %s", path);
        return -1;
    }
    uv_timer_init(s->loop, &g->push_timer);
    uv_timer_init(s->loop, &g->tick_timer);
    uv_timer_init(s->loop, &g->gate_timer);
    g->push_timer.data = g->tick_timer.data = g->gate_timer.data = s;
    g->timers_on = 1;
    uint64_t iv = (uint64_t)(s->cfg.gossip_interval_s * 1000.0);
    uv_timer_start(&g->push_timer, on_push_timer, iv ? iv : 1, iv ? iv : 1);
    uv_timer_start(&g->tick_timer, on_tick, 1000, 1000);
    g->last_push = server_now(s);
    flush_peers(s);
    coh_notice("gossip", "gossip node %s (%s): %zu peers known, fanout %u%s, merge %s after %zu "
               "models (beta %.2f), push every %.3g s%s", g->self_addr,
               name[0] ? name : "?", g->view.n, s->cfg.fanout, s->cfg.fanout ? "" : " (all)",
               g->corrected ? "variance-corrected" : "plain", gossip_merge_after(s),
               s->cfg.merge_self_weight, s->cfg.gossip_interval_s,
               s->cfg.peer_sample ? "" : ", no peer exchange");
    return 0;
}

void gossip_stop(struct server *s)
{
    struct gossip *g = s->gossip;
    if (!g || g->stopped)
        return;
    g->stopped = 1;
    coh_notice("gossip", "stopping: %llu pushes sent (%llu accepted, %llu refused, %llu peers "
               "skipped as busy or backing off), %llu models received, %llu refused, %llu merges",
               (unsigned long long)g->pushes_sent, (unsigned long long)g->pushes_acked,
               (unsigned long long)g->pushes_refused, (unsigned long long)g->pushes_skipped,
               (unsigned long long)g->received, (unsigned long long)g->refused,
               (unsigned long long)g->merges);
    if (g->timers_on) {
        uv_timer_stop(&g->push_timer);
        uv_timer_stop(&g->gate_timer);
    }
    peer_close_all(s);
    flush_peers(s);
    persist(s);
}

int gossip_busy(struct server *s)
{
    struct gossip *g = s->gossip;
    if (!g)
        return 0;
    if (g->dirty && !g->persist_running)
        persist(s);
    return g->merge_running || g->persist_running || g->dirty;
}

void gossip_fini(struct server *s)
{
    struct gossip *g = s->gossip;
    if (!g || !g->timers_on)
        return;
    flush_peers(s);
    uv_close((uv_handle_t *)&g->push_timer, NULL);
    uv_close((uv_handle_t *)&g->tick_timer, NULL);
    uv_close((uv_handle_t *)&g->gate_timer, NULL);
    g->timers_on = 0;
}

void gossip_free(struct server *s)
{
    struct gossip *g = s->gossip;
    if (!g)
        return;
    for (size_t i = 0; i < g->nbuf; i++)
        free(g->buf[i].data);
    free(g->buf);
    free(g->out);
    peer_view_fini(&g->view);
    SSL_CTX_free(g->client_ctx);
    free(g);
    s->gossip = NULL;
}
