/*
 * The round state machine (DESIGN.md §3):
 *   WAITING --(min_clients ready)--> OPEN --(all answered | deadline)--> CLOSING
 *   CLOSING --(folds drained)--> COMMITTING --(checkpoint + transaction)--> WAITING | DONE
 * Loop thread only. Two kinds of thread-pool jobs: a fold (acc += w * delta,
 * one at a time so the accumulator needs no lock) and the finalize job (new
 * model, durable checkpoint, next round's chunk frames). Jobs carry ids, not
 * connection pointers; a connection may be gone when its fold completes.
 */
#include "round.h"

#include <math.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <stdarg.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checksum.h"
#include "cohort_err.h"
#include "conn.h"
#include "varcorr.h"
#include "fold.h"
#include "gossip.h"
#include "log.h"
#include "metrics.h"
#include "pstore.h"
#include "safetensors.h"
#include "server.h"
#include "strategy.h"

struct fold_job {
    uv_work_t req;
    struct server *s;
    struct fold_job *next;
    uint64_t round;
    int64_t client_id;
    uint64_t conn_id;
    float *delta;
    size_t n;
    float weight;
    float *acc;
    int first;                  /* the round's first fold: sets acc instead of adding */
    uint32_t dmax_bits;         /* max |delta| as bits, from upload_absorb */
    double *acc_bound;          /* the round's, read and written by one fold at a time */
    int weights;                /* delta holds trained weights: subtract global first */
    double fold_s;              /* time the fold took (pool thread) */
    /* Variance correction: Var(x + delta) per eligible tensor, computed while the
     * update is hot, so the round needs no second pass over the updates. */
    const struct coh_model *global;
    double *vars;
    int vc_1d;
    /* Finiteness and XXH3 are checked as the data arrives (upload_absorb); an
     * update that names only a sha256 (an older client) is hashed on the pool. */
    uint8_t expect[32];
    int verdict;                /* 0, COHORT_ECHECKSUM or COHORT_ENONFINITE (overflow) */
    size_t bad_index;           /* the first element that would overflow */
};

struct finalize_job {
    uv_work_t req;
    struct server *s;
    uint64_t round;
    const struct coh_model *cur; /* s->global: read-only until finalize_done */
    struct coh_model next;      /* data: the accumulator, turned into x_{t+1} in place */
    int apply;                  /* 0: nothing accepted, the model stays as it is */
    int want_sha;               /* a connected client needs the model's sha256 */
    float scale;
    double *vc_target;          /* per tensor target variance, NULL: no correction */
    int vc_1d;
    int durable;
    uint32_t chunk_bytes;
    char path[1100];
    char relpath[64];           /* as stored: relative to the state directory */
    uint8_t sha[32];            /* of the checkpoint file (of the data in gossip mode) */
    uint8_t data_sha[32];       /* of the data, when want_sha */
    uint8_t xxh3[COH_XXH_LEN];
    struct coh_xxh *xxh;
    EVP_MD_CTX *md;
    size_t bad_index;
    struct model_blob *blob;
    int rc;
    char err[1400];
};

/* Fold queue: a FIFO of jobs, one on the pool at a time. */
static struct fold_job *fq_head, *fq_tail;
static int fold_running;
static int verify_running;      /* sha256 checks on the pool (updates without XXH3) */
/* COHORTD_COMPAT_NO_WEIGHTS set: offers leave accepts_weights out, as a cohortd from
 * before it did, so the tests can check that clients fall back (e2e-fedavg_exact). */
static int compat_no_weights;
static int finalize_running;
static uv_timer_t grant_timer;
/* How many later uploads may go before a waiting one, so a slow sender is not
 * passed over for good by a stream of fast ones. */
#define GRANT_MAX_PASSES 32
#define STR_(x) #x
#define STR(x) STR_(x)
/* After the last round: how long evaluators get to report on the final model. */
#define FINAL_EVAL_WAIT_MS 30000
static uv_timer_t final_eval_timer;
static double final_eval_deadline;      /* loop seconds */

static void check_close(struct server *s);
static void start_fold(struct server *s);
static void verify_work(uv_work_t *req);
static void verify_done(uv_work_t *req, int status);

int round_jobs_inflight(struct server *s)
{
    return fold_running + finalize_running + verify_running;
}

static struct part *find_part(struct server *s, int64_t client_id)
{
    for (size_t i = 0; i < s->cur.nparts; i++)
        if (s->cur.parts[i].client_id == client_id)
            return &s->cur.parts[i];
    return NULL;
}

static const char *phase_name(int p)
{
    static const char *n[] = {"waiting", "open", "closing", "committing", "done"};
    return p >= 0 && p <= PHASE_DONE ? n[p] : "?";
}

/* Which waiter gets a free upload slot: the oldest, whatever it has sent, once
 * GRANT_MAX_PASSES later ones went before it. Otherwise the longest
 * waiting whose upload has arrived: all of it here (in its socket's receive buffer,
 * or read and not yet used), or a quarter of that buffer (its sender is then held
 * back by TCP flow control, i.e. waits for us). Such an upload goes through at the
 * loop's speed and frees the slot soon; a slot given to a client still sending
 * holds a staging buffer for as long as that client takes, while uploads that
 * arrived whole wait behind it. -1 when none qualifies; *most is then the waiter
 * furthest along. *why says which rule chose. */
#define GRANT_SCAN 64
static long pick_waiter(struct server *s, size_t *most, const char **why)
{
    size_t n = s->nwaiters < GRANT_SCAN ? s->nwaiters : GRANT_SCAN, best_have = 0;
    *most = 0;
    *why = "it waited longest, passed over " STR(GRANT_MAX_PASSES) " times";
    if (s->slot_waiters[0]->passed_over >= GRANT_MAX_PASSES)
        return 0;
    *why = "its upload has arrived";
    for (size_t i = 0; i < n; i++) {
        struct conn *c = s->slot_waiters[i];
        if (c->state == CONN_CLOSING || !c->pending_begin)
            return (long)i;
        size_t have = connio_in_pending(c) + coh_frame_rx_pending(&c->rx);
        uv_os_fd_t fd;
        int queued = 0;
        if (uv_fileno((uv_handle_t *)&c->tcp, &fd) == 0 && ioctl(fd, FIONREAD, &queued) == 0 &&
            queued > 0)
            have += (size_t)queued;
        const Cohort__UpdateBegin *b = c->pending_begin->update_begin;
        if (have >= b->total_bytes || (c->wait_rcvbuf > 0 && have >= (size_t)c->wait_rcvbuf / 4))
            return (long)i;
        if (have > best_have) {
            *most = i;
            best_have = have;
        }
    }
    *why = "none had arrived; it was furthest along";
    return -1;
}

static void on_grant(uv_timer_t *t)
{
    struct server *s = t->data;
    while (s->nwaiters > 0 && s->cur.uploads_active < s->cfg.max_uploads) {
        size_t most;
        const char *why;
        long pick = pick_waiter(s, &most, &why);
        if (pick < 0)
            pick = (long)most; /* none has arrived: the one furthest along */
        for (long i = 0; i < pick; i++)
            s->slot_waiters[i]->passed_over++;
        struct conn *c = s->slot_waiters[pick];
        memmove(s->slot_waiters + pick, s->slot_waiters + pick + 1,
                (s->nwaiters - (size_t)pick - 1) * sizeof *s->slot_waiters);
        s->nwaiters--;
        Cohort__Envelope *e = c->pending_begin;
        c->pending_begin = NULL;
        if (c->state == CONN_CLOSING) {
            coh_wire_free(e);
            continue;
        }
        if (COH_LOG_DEBUG <= coh_log_level_max) {
            char label[400];
            coh_debug("round", "%s: upload slot after %.0f ms: %s",
                      conn_label(c, label, sizeof label),
                      (server_now(s) - c->waiting_since) * 1e3, why);
        }
        if (!round_on_begin(s, c, e))
            coh_wire_free(e);
        if (!c->pending_begin)
            conn_resume(c);
    }
}

int round_init(struct server *s)
{
    memset(&s->cur, 0, sizeof s->cur);
    s->cur.phase = PHASE_WAITING;
    compat_no_weights = getenv("COHORTD_COMPAT_NO_WEIGHTS") != NULL;
    uv_timer_init(s->loop, &grant_timer);
    uv_timer_init(s->loop, &final_eval_timer);
    final_eval_timer.data = s;
    grant_timer.data = s;
    uv_timer_init(s->loop, &s->round_timer);
    s->round_timer.data = s;
    return 0;
}

void round_fini(struct server *s)
{
    free(s->cur.parts);
    free(s->cur.acc);
    free(s->cur.vc_var_sum);
    s->cur.nparts = 0;
    s->cur.parts = NULL;
    s->cur.acc = NULL;
    s->cur.vc_var_sum = NULL;
    free(s->slot_waiters);
    s->slot_waiters = NULL;
    for (size_t i = 0; i < s->nstaging; i++)
        free(s->staging[i]);
    free(s->staging);
    s->staging = NULL;
    s->nstaging = 0;
    uv_close((uv_handle_t *)&grant_timer, NULL);
    uv_close((uv_handle_t *)&final_eval_timer, NULL);
    uv_close((uv_handle_t *)&s->round_timer, NULL);
}

/* eval = 1: the evaluation offer of the current global model to an evaluator. */
static void send_offer(struct server *s, struct conn *c, int eval)
{
    struct coh_model *g = &s->global;
    Cohort__TensorInfo *infos = calloc(g->ntensors ? g->ntensors : 1, sizeof *infos);
    Cohort__TensorInfo **ptrs = calloc(g->ntensors ? g->ntensors : 1, sizeof *ptrs);
    if (!infos || !ptrs) {
        free(infos);
        free(ptrs);
        conn_close(c, "out of memory building the round offer");
        return;
    }
    for (size_t i = 0; i < g->ntensors; i++) {
        cohort__tensor_info__init(&infos[i]);
        infos[i].name = g->tensors[i].name;
        infos[i].n_shape = (size_t)g->tensors[i].ndim;
        infos[i].shape = g->tensors[i].shape;
        ptrs[i] = &infos[i];
    }
    Cohort__RoundOffer o = COHORT__ROUND_OFFER__INIT;
    o.round = eval ? s->blob->round : s->cur.id;
    o.n_tensors = g->ntensors;
    o.tensors = ptrs;
    o.total_bytes = s->blob->total_bytes;
    o.chunk_count = (uint32_t)s->blob->nchunks;
    o.accepts_weights = !compat_no_weights;
    o.model_xxh3.data = s->blob->xxh3;
    o.model_xxh3.len = sizeof s->blob->xxh3;
    if (!c->xxh3_ok) {
        const uint8_t *sha = blob_sha256(s->blob);
        if (!sha) {
            free(infos);
            free(ptrs);
            conn_close(c, "out of memory hashing the model for the round offer");
            return;
        }
        o.model_sha256.data = (uint8_t *)sha;
        o.model_sha256.len = 32;
    }
    double left = s->cur.deadline_at - server_now(s);
    o.deadline_s = left > 0 && !eval ? left : 0;
    Cohort__Envelope e = COHORT__ENVELOPE__INIT;
    e.body_case = COHORT__ENVELOPE__BODY_ROUND_OFFER;
    e.round_offer = &o;
    if (eval) {
        /* The blob holds x_t, offered for round t + 1: it is the model after round t. */
        o.evaluate_only = 1;
        o.model_round = s->blob->round - 1;
        c->eval_busy = 1;
        c->eval_round = o.model_round;
    } else {
        /* Whatever the client sent up to now cannot be an answer to this offer. */
        c->offer_rx_mark = c->bytes_in;
        c->offered_round = s->cur.id;
    }
    /* A client still downloading an earlier round's model must get it whole
     * before the new offer starts, or its stream would be cut mid-model. A
     * trainer's offer waits for that stream (round_offer_waiting): writing the
     * rest of the model here queued it in memory at once, up to a whole model
     * per slow client (12 MB of 16 in e2e-midstream). Evaluators, few and idle
     * between reports, still get it finished here. */
    if (!eval && c->send_blob && c->send_idx < c->send_blob->nchunks) {
        free(infos);
        free(ptrs);
        c->offer_pending = 1;
        return;
    }
    conn_finish_blob(c);
    int rc = conn_send(c, &e);
    free(infos);
    free(ptrs);
    if (rc == 0)
        conn_send_blob(c, s->blob);
}

void round_offer_waiting(struct server *s, struct conn *c)
{
    struct part *p = s->cur.phase == PHASE_OPEN && c->state == CONN_READY && !s->stopping
                         ? find_part(s, c->client_id) : NULL;
    if (p && p->status == PART_OFFERED && p->conn_id == c->id)
        send_offer(s, c, 0);
}

static struct part *add_part(struct server *s, struct conn *c)
{
    struct round *r = &s->cur;
    if (r->nparts == r->capparts) {
        size_t ncap = r->capparts ? r->capparts * 2 : 16;
        struct part *np = realloc(r->parts, ncap * sizeof *np);
        if (!np)
            return NULL;
        r->parts = np;
        r->capparts = ncap;
    }
    struct part *p = &r->parts[r->nparts++];
    memset(p, 0, sizeof *p);
    p->client_id = c->client_id;
    p->conn_id = c->id;
    p->status = PART_OFFERED;
    p->train_loss = NAN;
    p->started = server_now(s);
    return p;
}

static void offer(struct server *s, struct conn *c)
{
    struct part *p = find_part(s, c->client_id);
    if (p) {
        /* A client that dropped and came back may still answer the round; one
         * whose offer was handed over from a replaced connection gets it here. */
        int handed_over = p->status == PART_OFFERED && p->conn_id == c->id &&
                          c->offered_round != s->cur.id;
        if (p->status != PART_DROPPED && !handed_over)
            return;
        p->status = PART_OFFERED;
        p->conn_id = c->id;
        p->reason[0] = '\0';
    } else if (!add_part(s, c)) {
        conn_close(c, "out of memory recording the offer");
        return;
    }
    send_offer(s, c, 0);
}

static void on_deadline(uv_timer_t *t)
{
    struct server *s = t->data;
    if (s->cur.phase != PHASE_OPEN)
        return;
    for (size_t i = 0; i < s->cur.nparts; i++) {
        struct part *p = &s->cur.parts[i];
        if (p->status == PART_OFFERED || p->status == PART_UPLOADING) {
            snprintf(p->reason, sizeof p->reason, "%s",
                     p->status == PART_OFFERED ? "no answer by the round deadline"
                                               : "upload incomplete at the round deadline");
            p->status = PART_DROPPED;
            struct conn *c = idmap_get(&s->conns_by_id, p->conn_id);
            if (c && c->up.active && c->up.round == s->cur.id) {
                c->discard_round = s->cur.id;
                upload_release(c);
                conn_send_error(c, COHORT_EROUND, s->cur.id, 0,
                                "round %llu closed at its deadline before your upload finished",
                                (unsigned long long)s->cur.id);
            }
        }
    }
    s->cur.close_reason = "deadline";
    s->cur.phase = PHASE_CLOSING;
    server_iso_now(s->cur.closed_iso, sizeof s->cur.closed_iso);
    coh_notice("round", "round %llu: deadline of %.0f s reached",
               (unsigned long long)s->cur.id, s->cfg.round_timeout_s);
    check_close(s);
}

void round_maybe_start(struct server *s)
{
    struct round *r = &s->cur;
    if (r->phase != PHASE_WAITING || s->stopping)
        return;
    if (s->cfg.rounds && s->last_committed >= s->cfg.rounds)
        return;
    if (s->nready < s->cfg.min_clients)
        return;
    if (s->gossip && gossip_hold_round(s))
        return; /* a merge comes first, or --round-interval has not passed */
    r->id = s->last_committed + 1;
    r->nparts = 0;
    r->uploads_active = 0;
    r->close_reason = NULL;
    r->opened_at = server_now(s);
    r->deadline_at = r->opened_at + s->cfg.round_timeout_s;
    server_iso_now(r->started_iso, sizeof r->started_iso);
    if (r->acc && r->acc_numel != s->global.numel) {
        free(r->acc);
        r->acc = NULL;
    }
    r->acc_folds = 0;
    free(r->vc_var_sum);
    r->vc_var_sum = NULL;
    if (s->cfg.variance_correction)
        r->vc_var_sum = calloc(s->global.ntensors ? s->global.ntensors : 1, sizeof(double));
    r->phase = PHASE_OPEN;
    struct round_ctx ctx = {.round = r->id, .store = s->store, .cfg = &s->cfg};
    if (s->strat->ops->begin_round && s->strat->ops->begin_round(s->strat->state, &ctx) < 0) {
        coh_err("round", "round %llu: strategy set-up failed (participation store unreadable?); "
                "stopping rather than aggregating with stale state", (unsigned long long)r->id);
        r->phase = PHASE_WAITING;
        s->exit_code = 1;
        server_shutdown(s, 0, "strategy failure");
        return;
    }
    uv_timer_start(&s->round_timer, on_deadline, (uint64_t)(s->cfg.round_timeout_s * 1000.0), 0);
    coh_notice("round", "round %llu: open, offered to %u clients (deadline %.0f s)",
               (unsigned long long)r->id, s->nready, s->cfg.round_timeout_s);
    for (struct conn *c = s->conn_list; c; c = c->next)
        if (c->state == CONN_READY && !c->evaluator)
            offer(s, c);
    /* Uploads queued for a slot during the last round now get their refusal. */
    if (s->nwaiters)
        uv_timer_start(&grant_timer, on_grant, 0, 0);
}

void round_client_ready(struct server *s, struct conn *c)
{
    if (s->cur.phase == PHASE_OPEN)
        offer(s, c);
    else
        round_maybe_start(s);
}

/* After the final round: shut down once no evaluator is still testing it, or
 * at the deadline. */
static void final_eval_check(struct server *s)
{
    if (s->cur.phase != PHASE_DONE || s->stopping)
        return;
    if (server_now(s) < final_eval_deadline) {
        for (struct conn *c = s->conn_list; c; c = c->next)
            if (c->state == CONN_READY && c->evaluator && c->eval_busy)
                return;
    }
    uv_timer_stop(&final_eval_timer);
    server_shutdown(s, 1, "all rounds are done");
}

static void on_final_eval_wait(uv_timer_t *t)
{
    final_eval_check(t->data);
}

void round_eval_ready(struct server *s, struct conn *c)
{
    if (s->blob && !s->stopping)
        send_offer(s, c, 1);
}

/* Metric names become store rows and Prometheus label values: keep them tame. */
static int metric_name_ok(const char *n)
{
    size_t len = n ? strlen(n) : 0;
    if (len == 0 || len > 63)
        return 0;
    for (size_t i = 0; i < len; i++) {
        char ch = n[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '_' || ch == '.' || ch == '-'))
            return 0;
    }
    return 1;
}

void round_on_eval_report(struct server *s, struct conn *c, const Cohort__EvalReport *m)
{
    char label[400];
    if (!c->eval_busy || m->round != c->eval_round) {
        coh_warn("round", "%s: evaluation report for round %llu was not asked for",
                 conn_label(c, label, sizeof label), (unsigned long long)m->round);
        conn_send_error(c, COHORT_EROUND, m->round, 0,
                        "no evaluation of round %llu was requested from this connection",
                        (unsigned long long)m->round);
        return;
    }
    c->eval_busy = 0;
    const char *names[16];
    double values[16];
    size_t n = 0;
    char text[600];
    size_t used = 0;
    text[0] = '\0';
    for (size_t i = 0; i < m->n_metrics && n < 16; i++) {
        const Cohort__EvalReport__MetricsEntry *me = m->metrics[i];
        if (!metric_name_ok(me->key))
            continue;
        names[n] = me->key;
        values[n] = me->value;
        int k = snprintf(text + used, sizeof text - used, "%s%s=%.4g", n ? " " : "", me->key,
                         me->value);
        if (k > 0 && (size_t)k < sizeof text - used)
            used += (size_t)k;
        n++;
    }
    if (n < m->n_metrics)
        coh_warn("round", "%s: %zu metric(s) of the evaluation report ignored (bad name or more "
                 "than 16)", conn_label(c, label, sizeof label), m->n_metrics - n);
    if (n > 0 && pstore_eval_record(s->store, m->round, c->client_id, names, values, n) == 0)
        metrics_eval_report(m->round, names, values, n);
    coh_notice("round", "round %llu: evaluated by %s: %s", (unsigned long long)m->round, c->name,
               n ? text : "(no metrics)");
    /* Rounds committed meanwhile: evaluate the newest model next. */
    if (c->eval_round + 1 < s->blob->round && !s->stopping)
        send_offer(s, c, 1);
    final_eval_check(s);
}

void round_handover(struct server *s, struct conn *old, struct conn *c)
{
    if (s->cur.phase != PHASE_OPEN || !old->client_id)
        return;
    struct part *p = find_part(s, old->client_id);
    if (!p || p->conn_id != old->id || (p->status != PART_OFFERED && p->status != PART_UPLOADING))
        return;
    /* The new connection inherits the offer; an upload on the old one is lost. */
    old->discard_round = s->cur.id;
    upload_release(old);
    p->status = PART_OFFERED;
    p->conn_id = c->id;
}

int round_awaits(struct server *s, const struct conn *c)
{
    /* Until the round is committed the client may be waiting for its result. */
    int p = s->cur.phase;
    return (p == PHASE_OPEN || p == PHASE_CLOSING || p == PHASE_COMMITTING) &&
           c->offered_round == s->cur.id;
}

void round_conn_gone(struct server *s, struct conn *c, const char *why)
{
    if (c->evaluator) {
        /* The final evaluation may have been all that kept the server up. */
        if (s->cur.phase == PHASE_DONE && !s->stopping)
            uv_timer_start(&final_eval_timer, on_final_eval_wait, 0, 0);
        return;
    }
    for (size_t i = 0; i < s->nwaiters; i++) {
        if (s->slot_waiters[i] == c) {
            memmove(&s->slot_waiters[i], &s->slot_waiters[i + 1],
                    (s->nwaiters - i - 1) * sizeof *s->slot_waiters);
            s->nwaiters--;
            break;
        }
    }
    if (!c->client_id || s->cur.phase != PHASE_OPEN)
        return;
    struct part *p = find_part(s, c->client_id);
    if (p && p->conn_id == c->id && (p->status == PART_OFFERED || p->status == PART_UPLOADING)) {
        /* The close reason (frame too big, slow sender, peer gone...) says why. */
        snprintf(p->reason, sizeof p->reason, "%s: %.120s",
                 p->status == PART_UPLOADING ? "disconnected during the upload" : "disconnected",
                 why);
        p->status = PART_DROPPED;
        p->finished = server_now(s);
        check_close(s);
    }
}

static void reject(struct server *s, struct conn *c, struct part *p, int code, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static void reject(struct server *s, struct conn *c, struct part *p, int code, const char *fmt, ...)
{
    char msg[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    char label[400];
    coh_warn("round", "round %llu: %s: update rejected: %s", (unsigned long long)s->cur.id,
             conn_label(c, label, sizeof label), msg);
    if (p) {
        p->status = PART_REJECTED;
        p->err = code;
        p->finished = server_now(s);
        snprintf(p->reason, sizeof p->reason, "%s", msg);
    }
    c->discard_round = s->cur.id;
    upload_release(c);
    conn_send_error(c, code, s->cur.id, 0, "update rejected: %s", msg);
    check_close(s);
}

static int layout_matches(const struct coh_model *g, const Cohort__UpdateBegin *b, char *why,
                          size_t len)
{
    if (b->n_tensors != g->ntensors) {
        snprintf(why, len, "%zu tensors, the model has %zu", b->n_tensors, g->ntensors);
        return 0;
    }
    for (size_t i = 0; i < g->ntensors; i++) {
        const struct coh_tensor *t = &g->tensors[i];
        const Cohort__TensorInfo *ti = b->tensors[i];
        if (!ti->name || strcmp(ti->name, t->name) != 0) {
            snprintf(why, len, "tensor %zu is '%.64s', expected '%s'", i,
                     ti->name ? ti->name : "", t->name);
            return 0;
        }
        int same = ti->n_shape == (size_t)t->ndim;
        for (int d = 0; same && d < t->ndim; d++)
            same = ti->shape[d] == t->shape[d];
        if (!same) {
            snprintf(why, len, "tensor '%s' has the wrong shape", t->name);
            return 0;
        }
    }
    if (b->total_bytes != (uint64_t)g->numel * 4) {
        snprintf(why, len, "total_bytes %llu, the model has %llu",
                 (unsigned long long)b->total_bytes, (unsigned long long)g->numel * 4);
        return 0;
    }
    return 1;
}

int round_on_begin(struct server *s, struct conn *c, Cohort__Envelope *e)
{
    const Cohort__UpdateBegin *b = e->update_begin;
    struct round *r = &s->cur;
    c->discard_round = 0;
    if (r->phase != PHASE_OPEN || b->round != r->id) {
        c->discard_round = b->round;
        conn_send_error(c, COHORT_EROUND, b->round, 0,
                        "round %llu is not open for updates (current round %llu is %s)",
                        (unsigned long long)b->round, (unsigned long long)r->id,
                        phase_name(r->phase));
        char label[400];
        coh_info("round", "%s: update for round %llu refused: round %llu is %s",
                 conn_label(c, label, sizeof label), (unsigned long long)b->round,
                 (unsigned long long)r->id, phase_name(r->phase));
        return 0;
    }
    struct part *p = find_part(s, c->client_id);
    char label[400];
    if (!p || p->conn_id != c->id) {
        c->discard_round = b->round;
        coh_warn("round", "%s: update for round %llu refused: the round was not offered to this "
                 "connection", conn_label(c, label, sizeof label), (unsigned long long)b->round);
        conn_send_error(c, COHORT_EOFFER, b->round, 0,
                        "round %llu was not offered to this connection",
                        (unsigned long long)b->round);
        return 0;
    }
    if (p->status != PART_OFFERED) {
        c->discard_round = b->round;
        coh_warn("round", "%s: update for round %llu refused: this client already answered it",
                 conn_label(c, label, sizeof label), (unsigned long long)b->round);
        conn_send_error(c, COHORT_EDUP, b->round, 0,
                        "this client already answered round %llu", (unsigned long long)b->round);
        return 0;
    }
    if (c->bytes_in == c->offer_rx_mark) {
        /* Every byte of this UpdateBegin had arrived before the offer was sent (e.g. Hello
         * and an update pipelined in one write), so it was made without the round's model.
         * The offer stands: the client may still answer it properly. */
        c->discard_round = b->round;
        coh_warn("round", "%s: update for round %llu refused: it was sent before the round "
                 "offer could reach the client", conn_label(c, label, sizeof label),
                 (unsigned long long)b->round);
        conn_send_error(c, COHORT_EOFFER, b->round, 0,
                        "update for round %llu was sent before the round was offered to this "
                        "connection; wait for the RoundOffer and the model",
                        (unsigned long long)b->round);
        return 0;
    }
    char why[160];
    if (!layout_matches(&s->global, b, why, sizeof why)) {
        reject(s, c, p, COHORT_ESHAPE, "%s", why);
        return 0;
    }
    if (b->num_examples == 0 && strcmp(s->cfg.weighting, "examples") == 0 &&
        strcmp(s->cfg.strategy, "fedavg") == 0) {
        reject(s, c, p, COHORT_EINVAL, "reports 0 training examples under examples weighting");
        return 0;
    }
    if (b->num_examples > (1ull << 40)) {
        reject(s, c, p, COHORT_EINVAL, "reports an implausible %llu training examples",
               (unsigned long long)b->num_examples);
        return 0;
    }
    if (r->uploads_active >= s->cfg.max_uploads) {
        /* Back-pressure: stop reading this socket until a staging slot frees. */
        if (s->nwaiters == s->capwaiters) {
            size_t ncap = s->capwaiters ? s->capwaiters * 2 : 16;
            struct conn **nw = realloc(s->slot_waiters, ncap * sizeof *nw);
            if (!nw) {
                conn_close(c, "out of memory queueing an upload");
                return 0;
            }
            s->slot_waiters = nw;
            s->capwaiters = ncap;
        }
        s->slot_waiters[s->nwaiters++] = c;
        c->waiting_since = server_now(s);
        c->passed_over = 0;
        /* Taken once: a paused socket's receive buffer does not grow. */
        uv_os_fd_t fd;
        socklen_t len = sizeof c->wait_rcvbuf;
        if (uv_fileno((uv_handle_t *)&c->tcp, &fd) != 0 ||
            getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &c->wait_rcvbuf, &len) < 0)
            c->wait_rcvbuf = 0;
        c->pending_begin = e;
        conn_pause(c);
        return 1;
    }
    struct upload *u = &c->up;
    memset(u, 0, sizeof *u);
    if (!c->up_xxh && !(c->up_xxh = coh_xxh_new())) {
        conn_send_error(c, COHORT_ENOMEM, b->round, 0, "server is out of memory; retry later");
        return 0;
    }
    coh_xxh_reset(c->up_xxh);
    u->buf = staging_get(s);
    if (!u->buf) {
        memset(u, 0, sizeof *u);
        conn_send_error(c, COHORT_ENOMEM, b->round, 0, "server is out of memory; retry later");
        return 0;
    }
    u->active = 1;
    u->started = server_now(s);
    u->round = b->round;
    u->weights = b->weights;
    if (b->weights)
        coh_info("round", "%s: the update for round %llu comes as trained weights; the global "
                 "model is subtracted here", conn_label(c, label, sizeof label),
                 (unsigned long long)b->round);
    u->num_examples = b->num_examples;
    u->total = b->total_bytes;
    r->uploads_active++;
    p->status = PART_UPLOADING;
    p->num_examples = b->num_examples;
    p->started = server_now(s);
    return 0;
}

uint8_t *round_direct_begin(struct server *s, struct conn *c, const struct coh_chunk_view *v)
{
    struct upload *u = &c->up;
    (void)s;
    if (!u->active || !u->buf || v->round != u->round || v->offset != u->received ||
        v->len > u->total - u->received)
        return NULL;
    return (uint8_t *)u->buf + u->received;
}

/* Checks and hashes what arrived since the last call while it is in cache:
 * whole floats are tested for NaN and Inf, so a bad update is refused at the
 * piece that holds the first bad value, and every byte goes into the XXH3 that
 * UpdateEnd's checksum is compared with. 0, or -1 when the update was refused. */
static int upload_absorb(struct server *s, struct conn *c)
{
    struct upload *u = &c->up;
    uint64_t to = u->received & ~(uint64_t)3;
    if (to <= u->checked)
        return 0;
    const float *f = u->buf + u->checked / 4;
    size_t n = (size_t)(to - u->checked) / 4;
    /* The largest magnitude finds NaN and Inf, and lets the fold skip its
     * overflow check when the sum stays far from overflowing (fold_checked). */
    uint32_t mx = coh_abs_bound_bits(f, n);
    if (mx >= COH_NONFINITE_BITS) {
        reject(s, c, find_part(s, c->client_id), COHORT_ENONFINITE,
               "update contains NaN or Inf (element %llu)",
               (unsigned long long)(u->checked / 4 + coh_first_nonfinite(f, n)));
        return -1;
    }
    if (mx > u->maxabs)
        u->maxabs = mx;
    coh_xxh_update(c->up_xxh, f, n * 4);
    u->checked = to;
    return 0;
}

void round_direct_data(struct server *s, struct conn *c, size_t len, int chunk_done)
{
    struct upload *u = &c->up;
    u->received += len;
    if (upload_absorb(s, c) < 0 || !chunk_done)
        return;
    struct part *p = find_part(s, c->client_id);
    if (p)
        p->bytes = u->received;
}

void round_on_chunk(struct server *s, struct conn *c, const struct coh_chunk_view *v)
{
    struct upload *u = &c->up;
    if (!u->active) {
        if (v->round && v->round == c->discard_round)
            return; /* the rest of an upload we already refused */
        char label[400];
        coh_warn("round", "%s: UpdateChunk for round %llu without UpdateBegin",
                 conn_label(c, label, sizeof label), (unsigned long long)v->round);
        conn_send_error(c, COHORT_ESTATE, v->round, 0, "UpdateChunk without UpdateBegin");
        c->discard_round = v->round;
        return;
    }
    struct part *p = find_part(s, c->client_id);
    if (v->round != u->round) {
        reject(s, c, p, COHORT_EROUND, "chunk names round %llu inside an upload for round %llu",
               (unsigned long long)v->round, (unsigned long long)u->round);
        return;
    }
    if (v->offset != u->received || v->len > u->total - u->received) {
        reject(s, c, p, COHORT_EFRAME, "chunk at offset %llu (+%zu), expected offset %llu of %llu",
               (unsigned long long)v->offset, v->len, (unsigned long long)u->received,
               (unsigned long long)u->total);
        return;
    }
    memcpy((uint8_t *)u->buf + u->received, v->data, v->len);
    u->received += v->len;
    if (upload_absorb(s, c) < 0)
        return;
    if (p)
        p->bytes = u->received;
}

static void fold_work(uv_work_t *req)
{
    struct fold_job *j = req->data;
    double t0 = metrics_now();
    if (j->weights)
        j->dmax_bits = fold_weights_to_delta(j->delta, j->global->data, j->n);
    /* Finite values can still overflow once weighted and summed (a delta of 1e30
     * from a client claiming 1e10 examples): such an update is refused before it
     * touches the sum, so one client cannot break the round or stop the server. */
    j->bad_index = fold_checked(j->acc, j->delta, j->n, j->weight, j->first, j->dmax_bits,
                                j->acc_bound);
    if (j->bad_index < j->n) {
        j->verdict = COHORT_ENONFINITE;
        return;
    }
    if (j->vars) {
        const struct coh_model *g = j->global;
        for (size_t t = 0; t < g->ntensors; t++) {
            const struct coh_tensor *ten = &g->tensors[t];
            if (!coh_vc_eligible(ten, j->vc_1d))
                continue;
            double mean;
            coh_vc_moments(g->data + ten->offset, j->delta + ten->offset, ten->numel, &mean,
                           &j->vars[t]);
        }
    }
    j->fold_s = metrics_now() - t0;
}

/* An update refused on the pool (its sha256, an overflow): the bookkeeping of
 * a finished job without the ack. Frees j. */
static void job_reject(struct server *s, struct fold_job *j, const char *msg)
{
    struct part *p = j->round == s->cur.id ? find_part(s, j->client_id) : NULL;
    if (p && p->status == PART_FOLDING) {
        p->status = PART_REJECTED;
        p->err = j->verdict;
        p->finished = server_now(s);
        snprintf(p->reason, sizeof p->reason, "%s", msg);
    }
    struct conn *c = idmap_get(&s->conns_by_id, j->conn_id);
    char label[400] = "a closed connection";
    if (c) {
        conn_label(c, label, sizeof label);
        conn_send_error(c, j->verdict, j->round, 0, "update rejected: %s", msg);
    }
    coh_warn("round", "round %llu: %s: update rejected: %s", (unsigned long long)j->round, label,
             msg);
    s->cur.folds_inflight--;
    staging_put(s, j->delta);
    free(j->vars);
    free(j);
    s->cur.uploads_active--;
    uv_timer_start(&grant_timer, on_grant, 0, 0);
    check_close(s);
}

static void fold_done(uv_work_t *req, int status)
{
    struct fold_job *j = req->data;
    struct server *s = j->s;
    fold_running = 0;
    if (j->verdict) {
        if (j->first)
            s->cur.acc_folds--; /* nothing was folded: the next fold sets acc */
        char msg[160];
        snprintf(msg, sizeof msg, "the update times its weight %g overflows float32 "
                 "(element %zu)", (double)j->weight, j->bad_index);
        start_fold(s);
        job_reject(s, j, msg);
        return;
    }
    metrics_fold_seconds(j->fold_s);
    s->cur.folds_inflight--;
    staging_put(s, j->delta);
    j->delta = NULL;
    if (j->vars && j->round == s->cur.id && s->cur.vc_var_sum)
        for (size_t t = 0; t < s->global.ntensors; t++)
            s->cur.vc_var_sum[t] += j->vars[t];
    free(j->vars);
    s->cur.uploads_active--;
    uv_timer_start(&grant_timer, on_grant, 0, 0);
    struct part *p = j->round == s->cur.id ? find_part(s, j->client_id) : NULL;
    if (p && p->status == PART_FOLDING) {
        p->status = PART_ACCEPTED;
        p->finished = server_now(s);
    }
    struct conn *c = idmap_get(&s->conns_by_id, j->conn_id);
    if (c) {
        Cohort__UpdateAck a = COHORT__UPDATE_ACK__INIT;
        a.round = j->round;
        a.accepted = 1;
        Cohort__Envelope e = COHORT__ENVELOPE__INIT;
        e.body_case = COHORT__ENVELOPE__BODY_UPDATE_ACK;
        e.update_ack = &a;
        conn_send(c, &e);
    }
    free(j);
    start_fold(s);
    check_close(s);
}

static void start_fold(struct server *s)
{
    if (fold_running || !fq_head)
        return;
    struct fold_job *j = fq_head;
    fq_head = j->next;
    if (!fq_head)
        fq_tail = NULL;
    fold_running = 1;
    /* Folds run one at a time, so this one knows whether any came before it. */
    j->first = s->cur.acc_folds++ == 0;
    j->req.data = j;
    uv_queue_work(s->loop, &j->req, fold_work, fold_done);
}

static void verify_work(uv_work_t *req)
{
    struct fold_job *j = req->data;
    uint8_t digest[32];
    unsigned int dl = 0;
    if (!EVP_Digest(j->delta, j->n * sizeof(float), digest, &dl, EVP_sha256(), NULL) ||
        CRYPTO_memcmp(digest, j->expect, 32) != 0)
        j->verdict = COHORT_ECHECKSUM;
}

static void queue_fold(struct server *s, struct fold_job *j)
{
    if (fq_tail)
        fq_tail->next = j;
    else
        fq_head = j;
    fq_tail = j;
    start_fold(s);
}

static void verify_done(uv_work_t *req, int status)
{
    struct fold_job *j = req->data;
    struct server *s = j->s;
    verify_running--;
    if (j->verdict == 0) {
        queue_fold(s, j);
        return;
    }
    job_reject(s, j, "sha256 of the update does not match UpdateEnd");
}

void round_on_end(struct server *s, struct conn *c, const Cohort__UpdateEnd *m)
{
    struct upload *u = &c->up;
    if (!u->active) {
        if (m->round && m->round == c->discard_round)
            return;
        char label[400];
        coh_warn("round", "%s: UpdateEnd for round %llu without UpdateBegin",
                 conn_label(c, label, sizeof label), (unsigned long long)m->round);
        conn_send_error(c, COHORT_ESTATE, m->round, 0, "UpdateEnd without UpdateBegin");
        return;
    }
    struct part *p = find_part(s, c->client_id);
    if (m->round != u->round) {
        reject(s, c, p, COHORT_EROUND, "UpdateEnd names round %llu inside an upload for %llu",
               (unsigned long long)m->round, (unsigned long long)u->round);
        return;
    }
    if (u->received != u->total) {
        reject(s, c, p, COHORT_EFRAME, "upload ended after %llu of %llu bytes",
               (unsigned long long)u->received, (unsigned long long)u->total);
        return;
    }
    if (m->xxh3.len != COH_XXH_LEN && m->sha256.len != 32) {
        reject(s, c, p, COHORT_ECHECKSUM, "UpdateEnd carries no checksum of the update "
               "(xxh3: %zu bytes, sha256: %zu bytes)", m->xxh3.len, m->sha256.len);
        return;
    }
    if (!p || s->cur.phase != PHASE_OPEN) {
        reject(s, c, p, COHORT_EROUND, "round closed during the upload");
        return;
    }
    double loss = m->train_loss;
    p->train_loss = isfinite(loss) ? loss : NAN;
    double w = s->strat->ops->weight(s->strat->state, NULL, c->client_id, u->num_examples);
    if (!isfinite(w) || w < 0) {
        reject(s, c, p, COHORT_EINVAL, "strategy gave weight %g", w);
        return;
    }
    if (m->xxh3.len == COH_XXH_LEN) {
        /* Every byte went through the XXH3 state as it arrived (upload_absorb). */
        uint8_t digest[COH_XXH_LEN];
        coh_xxh_final(c->up_xxh, digest);
        if (memcmp(digest, m->xxh3.data, COH_XXH_LEN) != 0) {
            reject(s, c, p, COHORT_ECHECKSUM, "XXH3-128 of the update does not match UpdateEnd");
            return;
        }
    }
    if (!s->cur.acc) {
        /* No zeroing: the round's first fold overwrites it (fold_set). Usually the
         * buffer of the model the last round replaced. */
        s->cur.acc = model_buf_get(s->global.numel);
        s->cur.acc_numel = s->global.numel;
        if (!s->cur.acc) {
            reject(s, c, p, COHORT_ENOMEM, "server out of memory for the accumulator");
            return;
        }
    }
    struct fold_job *j = calloc(1, sizeof *j);
    if (!j) {
        reject(s, c, p, COHORT_ENOMEM, "server out of memory");
        return;
    }
    j->s = s;
    j->round = u->round;
    j->client_id = c->client_id;
    j->conn_id = c->id;
    j->delta = u->buf;
    j->n = s->global.numel;
    j->weight = (float)w;
    j->acc = s->cur.acc;
    j->acc_bound = &s->cur.acc_bound;
    j->dmax_bits = u->maxabs;
    j->weights = u->weights;
    j->global = &s->global; /* read-only until the round's finalize */
    if (s->cfg.variance_correction) {
        j->vc_1d = s->cfg.vc_include_1d;
        j->vars = calloc(s->global.ntensors ? s->global.ntensors : 1, sizeof(double));
        if (!j->vars) {
            free(j);
            reject(s, c, p, COHORT_ENOMEM, "server out of memory");
            return;
        }
    }
    p->raw_weight = w;
    p->status = PART_FOLDING;
    /* The staging buffer (and its slot) now belongs to the job: folded on the
     * pool, one fold at a time, after a sha256 check there if that is the
     * checksum the client sent. */
    u->buf = NULL;
    u->active = 0;
    s->cur.folds_inflight++;
    if (m->xxh3.len == COH_XXH_LEN) {
        queue_fold(s, j);
        return;
    }
    memcpy(j->expect, m->sha256.data, 32);
    j->req.data = j;
    verify_running++;
    uv_queue_work(s->loop, &j->req, verify_work, verify_done);
}

void round_on_decline(struct server *s, struct conn *c, const Cohort__Decline *m)
{
    struct round *r = &s->cur;
    if (r->phase != PHASE_OPEN || m->round != r->id) {
        conn_send_error(c, COHORT_EROUND, m->round, 0, "round %llu is not open",
                        (unsigned long long)m->round);
        return;
    }
    struct part *p = find_part(s, c->client_id);
    if (!p || p->conn_id != c->id) {
        conn_send_error(c, COHORT_EOFFER, m->round, 0, "round %llu was not offered to you",
                        (unsigned long long)m->round);
        return;
    }
    if (p->status != PART_OFFERED) {
        conn_send_error(c, COHORT_EDUP, m->round, 0, "this client already answered round %llu",
                        (unsigned long long)m->round);
        return;
    }
    p->status = PART_DECLINED;
    p->finished = server_now(s);
    snprintf(p->reason, sizeof p->reason, "%.150s", m->reason ? m->reason : "");
    check_close(s);
}

void round_upload_expired(struct server *s, struct conn *c)
{
    struct part *p = find_part(s, c->client_id);
    if (p && p->conn_id == c->id && p->status == PART_UPLOADING) {
        p->status = PART_DROPPED;
        p->finished = server_now(s);
        snprintf(p->reason, sizeof p->reason, "upload not finished within %u ms",
                 s->cfg.upload_timeout_ms);
    }
    c->discard_round = c->up.round;
    upload_release(c);
    conn_send_error(c, COHORT_ETIMEDOUT, s->cur.id, 1, "upload not finished within %u ms",
                    s->cfg.upload_timeout_ms);
    conn_close(c, "upload not finished within %u ms", s->cfg.upload_timeout_ms);
    check_close(s);
}

float *staging_get(struct server *s)
{
    if (s->staging_numel != s->global.numel) {
        for (size_t i = 0; i < s->nstaging; i++)
            free(s->staging[i]);
        s->nstaging = 0;
        s->staging_numel = s->global.numel;
    }
    if (s->nstaging > 0)
        return s->staging[--s->nstaging];
    return malloc(s->global.numel ? s->global.numel * 4 : 4);
}

void staging_put(struct server *s, float *buf)
{
    if (!buf)
        return;
    size_t keep = s->cfg.max_uploads < 64 ? s->cfg.max_uploads : 64;
    if (s->staging_numel == s->global.numel && s->nstaging < keep) {
        if (!s->staging) {
            s->staging = calloc(keep, sizeof *s->staging);
            if (!s->staging) {
                free(buf);
                return;
            }
        }
        s->staging[s->nstaging++] = buf;
        return;
    }
    free(buf);
}

void round_slot_freed(struct server *s)
{
    if (s->cur.uploads_active > 0)
        s->cur.uploads_active--;
    uv_timer_start(&grant_timer, on_grant, 0, 0);
}

/* ---- finalize and commit ---- */

/* The next model's per-block work while the block is in cache (called as each
 * block is about to be written): its values (unless variance correction
 * needed them all first), the finiteness check and the checksums. */
static int finalize_block(void *arg, float *blk, size_t first, size_t n)
{
    struct finalize_job *j = arg;
    if (j->apply && !j->vc_target)
        fold_apply_into(blk, j->cur->data + first, n, j->scale);
    size_t bad = coh_first_nonfinite(blk, n);
    if (bad < n) {
        j->bad_index = first + bad;
        return COHORT_ENONFINITE;
    }
    coh_xxh_update(j->xxh, blk, n * sizeof(float));
    if (j->md && !EVP_DigestUpdate(j->md, blk, n * sizeof(float)))
        return COHORT_ENOMEM;
    return 0;
}

/* x_{t+1} is computed in the accumulator's buffer, block by block as the
 * checkpoint is written, so a round's end costs one pass over the model and
 * no new model-sized buffer. */
static void finalize_work(uv_work_t *req)
{
    struct finalize_job *j = req->data;
    size_t n = j->next.numel;
    if (!j->apply)
        memcpy(j->next.data, j->cur->data, n * sizeof(float));
    if (j->apply && j->vc_target) {
        /* The rescale needs each tensor's variance over all of its new values. */
        fold_apply_into(j->next.data, j->cur->data, n, j->scale);
        for (size_t t = 0; t < j->next.ntensors; t++) {
            const struct coh_tensor *ten = &j->next.tensors[t];
            if (coh_vc_eligible(ten, j->vc_1d))
                coh_vc_rescale(j->next.data + ten->offset, ten->numel, j->vc_target[t],
                               COH_VC_EPS);
        }
    }
    j->xxh = coh_xxh_new();
    j->md = j->want_sha ? EVP_MD_CTX_new() : NULL;
    if (!j->xxh || (j->want_sha && (!j->md || !EVP_DigestInit_ex(j->md, EVP_sha256(), NULL)))) {
        j->rc = COHORT_ENOMEM;
        snprintf(j->err, sizeof j->err, "out of memory for the model's checksums");
        return;
    }
    if (j->path[0]) {
        j->rc = coh_st_save_blocks(j->path, &j->next, j->durable, finalize_block, j, j->sha);
    } else {
        /* Gossip mode keeps no per-round checkpoint (gossip.c writes model.safetensors). */
        for (size_t first = 0; first < n && j->rc == 0; first += COH_ST_BLOCK_FLOATS) {
            size_t len = n - first < COH_ST_BLOCK_FLOATS ? n - first : COH_ST_BLOCK_FLOATS;
            j->rc = finalize_block(j, j->next.data + first, first, len);
        }
    }
    if (j->rc == COHORT_ENONFINITE) {
        snprintf(j->err, sizeof j->err, "the new model is not finite at element %zu "
                 "(server_lr too large?)", j->bad_index);
        return;
    }
    if (j->rc < 0) {
        snprintf(j->err, sizeof j->err, "writing %s: %s", j->path[0] ? j->path : "the model",
                 cohort_strerror(j->rc));
        return;
    }
    unsigned int dl = 0;
    if (j->md && !EVP_DigestFinal_ex(j->md, j->data_sha, &dl)) {
        j->rc = COHORT_ENOMEM;
        snprintf(j->err, sizeof j->err, "out of memory hashing the model");
        return;
    }
    coh_xxh_final(j->xxh, j->xxh3);
    if (!j->path[0])
        memcpy(j->sha, j->data_sha, 32); /* rounds.sha256: the data's (docs/gossip.md) */
    j->rc = blob_build(&j->next, j->round + 1, j->chunk_bytes, j->xxh3,
                       j->md ? j->data_sha : NULL, &j->blob);
    if (j->rc < 0)
        snprintf(j->err, sizeof j->err, "serializing the model: %s", cohort_strerror(j->rc));
}

static void finalize_job_free(struct finalize_job *j)
{
    coh_model_fini(&j->next);
    coh_xxh_free(j->xxh);
    EVP_MD_CTX_free(j->md);
    free(j->vc_target);
    free(j);
}

struct commit_arg {
    struct server *s;
    struct round_ctx *ctx;
};

static int commit_extra(sqlite3 *db, void *arg)
{
    struct commit_arg *a = arg;
    struct strategy *st = a->s->strat;
    return st->ops->commit ? st->ops->commit(st->state, a->ctx, db) : 0;
}

static void broadcast_result(struct server *s, uint32_t participants, double loss, int final)
{
    Cohort__RoundResult rr = COHORT__ROUND_RESULT__INIT;
    rr.round = s->last_committed;
    rr.participants = participants;
    rr.mean_train_loss = loss;
    rr.final = final;
    Cohort__Envelope e = COHORT__ENVELOPE__INIT;
    e.body_case = COHORT__ENVELOPE__BODY_ROUND_RESULT;
    e.round_result = &rr;
    for (struct conn *c = s->conn_list; c; c = c->next)
        if (c->state == CONN_READY)
            conn_send(c, &e);
}

static void finalize_done(uv_work_t *req, int status)
{
    struct finalize_job *j = req->data;
    struct server *s = j->s;
    struct round *r = &s->cur;
    finalize_running = 0;
    if (j->rc < 0) {
        coh_err("round", "round %llu: %s; cannot commit, stopping", (unsigned long long)j->round,
                j->err);
        finalize_job_free(j);
        s->exit_code = 1;
        server_shutdown(s, 0, "server error while committing a round");
        return;
    }
    uint32_t participants = 0, offered = (uint32_t)r->nparts;
    uint64_t examples = 0;
    double loss_sum = 0;
    int nloss = 0;
    for (size_t i = 0; i < r->nparts; i++) {
        struct part *p = &r->parts[i];
        if (p->status != PART_ACCEPTED)
            continue;
        participants++;
        examples += p->num_examples;
        if (isfinite(p->train_loss)) {
            loss_sum += p->train_loss;
            nloss++;
        }
    }
    double mean_loss = nloss ? loss_sum / nloss : NAN;
    char hex[65];
    coh_hex(j->sha, 32, hex);
    struct pstore_round pr = {
        .round = j->round,
        .strategy = s->cfg.strategy,
        .started_at = r->started_iso,
        .closed_at = r->closed_iso,
        .offered = offered,
        .participants = participants,
        .total_examples = examples,
        .mean_train_loss = mean_loss,
        .duration_s = server_now(s) - r->opened_at,
        .close_reason = r->close_reason ? r->close_reason : "all answered",
        .checkpoint = j->relpath,
        .sha256 = hex,
    };
    struct round_ctx ctx = {.round = j->round, .parts = r->parts, .nparts = r->nparts,
                            .store = s->store, .cfg = &s->cfg};
    struct commit_arg ca = {s, &ctx};
    double commit_t0 = metrics_now();
    int commit_rc = pstore_commit_round(s->store, &pr, r->parts, r->nparts, commit_extra, &ca);
    metrics_store_commit_seconds(metrics_now() - commit_t0);
    if (commit_rc < 0) {
        coh_err("round", "round %llu: the store refused the commit; stopping so no round is "
                "lost (check disk space and %s/cohort.db)",
                (unsigned long long)j->round, s->cfg.state_dir);
        blob_unref(j->blob); /* the data goes with it; next only borrowed it */
        finalize_job_free(j);
        s->exit_code = 1;
        server_shutdown(s, 0, "server error while committing a round");
        return;
    }
    coh_model_fini(&s->global);
    s->global = j->next;
    coh_model_init(&j->next);
    blob_unref(s->blob);
    s->blob = j->blob;
    s->last_committed = j->round;
    gossip_on_commit(s);
    coh_notice("round",
               "round %llu: committed: %u of %u offered accepted, %llu examples, mean train loss "
               "%.4f, %.2f s (%s)",
               (unsigned long long)j->round, participants, offered, (unsigned long long)examples,
               mean_loss, pr.duration_s, pr.close_reason);
    finalize_job_free(j);
    metrics_round_committed(r->parts, r->nparts, participants, pr.duration_s);
    int final = s->cfg.rounds && s->last_committed >= s->cfg.rounds;
    broadcast_result(s, participants, mean_loss, final);
    for (struct conn *c = s->conn_list; c; c = c->next)
        if (c->state == CONN_READY && c->evaluator && !c->eval_busy)
            send_offer(s, c, 1);
    if (final) {
        r->phase = PHASE_DONE;
        /* Evaluators still testing the final model get a moment to report it. */
        if (s->nevaluators > 0) {
            coh_info("round", "all rounds are done; waiting up to %d s for the evaluation of "
                     "round %llu", FINAL_EVAL_WAIT_MS / 1000, (unsigned long long)s->last_committed);
            final_eval_deadline = server_now(s) + FINAL_EVAL_WAIT_MS / 1000.0;
            uv_timer_start(&final_eval_timer, on_final_eval_wait, FINAL_EVAL_WAIT_MS + 10, 0);
            return;
        }
        server_shutdown(s, 1, "all rounds are done");
        return;
    }
    r->phase = PHASE_WAITING;
    r->nparts = 0;
    round_maybe_start(s);
}

static void finalize(struct server *s)
{
    struct round *r = &s->cur;
    r->phase = PHASE_COMMITTING;
    uv_timer_stop(&s->round_timer);
    struct round_ctx ctx = {.round = r->id, .parts = r->parts, .nparts = r->nparts,
                            .store = s->store, .cfg = &s->cfg};
    size_t accepted = 0;
    for (size_t i = 0; i < r->nparts; i++)
        if (r->parts[i].status == PART_ACCEPTED)
            accepted++;
    double divisor = 1.0;
    if (accepted && s->strat->ops->finalize(s->strat->state, &ctx, &divisor) < 0) {
        coh_err("round", "round %llu: strategy finalize failed", (unsigned long long)r->id);
        s->exit_code = 1;
        server_shutdown(s, 0, "strategy failure");
        return;
    }
    int raw = s->strat->ops->weight_is_raw;
    for (size_t i = 0; i < r->nparts; i++)
        r->parts[i].weight = r->parts[i].status != PART_ACCEPTED ? 0.0
                             : raw ? r->parts[i].raw_weight
                                   : r->parts[i].raw_weight / divisor;
    struct finalize_job *j = calloc(1, sizeof *j);
    if (!j) {
        coh_err("round", "round %llu: out of memory finalizing", (unsigned long long)r->id);
        s->exit_code = 1;
        server_shutdown(s, 0, "out of memory");
        return;
    }
    j->s = s;
    j->round = r->id;
    j->cur = &s->global;
    j->apply = accepted > 0;
    /* The accumulator becomes the next model (a fresh buffer when nothing was
     * folded: the model is then copied unchanged). */
    float *data = r->acc && r->acc_numel == s->global.numel ? r->acc : NULL;
    if (!data) {
        free(r->acc);
        data = model_buf_get(s->global.numel);
    }
    r->acc = NULL;
    if (!data || coh_model_clone_table(&j->next, &s->global) < 0) {
        free(data);
        free(j);
        coh_err("round", "round %llu: out of memory finalizing", (unsigned long long)r->id);
        s->exit_code = 1;
        server_shutdown(s, 0, "out of memory");
        return;
    }
    j->next.data = data;
    for (struct conn *c = s->conn_list; c && !j->want_sha; c = c->next)
        j->want_sha = c->state == CONN_READY && !c->xxh3_ok;
    if (s->gossip)
        j->want_sha = 1; /* peers check pushes by sha256 */
    j->scale = (float)(s->cfg.server_lr / divisor);
    j->durable = s->cfg.durable;
    j->vc_1d = s->cfg.vc_include_1d;
    if (accepted && s->cfg.variance_correction && r->vc_var_sum) {
        /* Target: the mean of the participants' variances, per tensor. */
        j->vc_target = r->vc_var_sum;
        r->vc_var_sum = NULL;
        for (size_t t = 0; t < s->global.ntensors; t++)
            j->vc_target[t] /= (double)accepted;
    }
    j->chunk_bytes = s->cfg.chunk_bytes;
    snprintf(j->relpath, sizeof j->relpath, "checkpoints/round-%06llu.safetensors",
             (unsigned long long)r->id);
    snprintf(j->path, sizeof j->path, "%s/checkpoints/round-%06llu.safetensors", s->cfg.state_dir,
             (unsigned long long)r->id);
    if (s->gossip) {
        /* rounds.sha256 then holds the sha256 of the model data (docs/gossip.md). */
        snprintf(j->relpath, sizeof j->relpath, "model.safetensors");
        j->path[0] = '\0';
    }
    j->req.data = j;
    finalize_running = 1;
    uv_queue_work(s->loop, &j->req, finalize_work, finalize_done);
}

static void check_close(struct server *s)
{
    struct round *r = &s->cur;
    /* Shutting down: clients leave because we close them, not because they
     * answered; the open round is abandoned (redone after a restart). */
    if (s->stopping && (r->phase == PHASE_OPEN || r->phase == PHASE_CLOSING))
        return;
    if (r->phase == PHASE_OPEN) {
        if (r->nparts == 0)
            return;
        for (size_t i = 0; i < r->nparts; i++) {
            int st = r->parts[i].status;
            if (st == PART_OFFERED || st == PART_UPLOADING || st == PART_FOLDING)
                return;
        }
        r->phase = PHASE_CLOSING;
        server_iso_now(r->closed_iso, sizeof r->closed_iso);
    }
    if (r->phase == PHASE_CLOSING && r->folds_inflight == 0)
        finalize(s);
}
