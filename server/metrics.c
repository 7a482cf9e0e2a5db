/*
 * Metrics for /metrics; see metrics.h. Counters live here as plain integers
 * (the loop thread is the only writer and reader); durations measured on the
 * pool are handed back to the loop before they are observed. Gauges that
 * describe the live state (round, phase, connections) are read from struct
 * server when the page is written, so they can never drift from it.
 */
#include "metrics.h"

#include <math.h>
#include <string.h>
#include <time.h>

#include "cohort_err.h"
#include "conn.h"
#include "idmap.h"
#include "pstore.h"
#include "server.h"

struct histogram {
    const char *name, *help;
    const double *bounds;
    size_t nbounds;
    uint64_t counts[16];        /* per bucket (not cumulative), last = +Inf */
    double sum;
    uint64_t n;
};

static const double round_bounds[] = {0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800};
static const double fold_bounds[] = {0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5};
static const double commit_bounds[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                       0.25, 0.5, 1, 5};

#define NB(a) (sizeof a / sizeof a[0])

static struct histogram h_round = {"cohort_round_duration_seconds",
                                   "Time from a round's opening to its commit.", round_bounds,
                                   NB(round_bounds), {0}, 0, 0};
static struct histogram h_fold = {"cohort_fold_duration_seconds",
                                  "Time to fold one accepted update into the round's sum "
                                  "(thread pool).",
                                  fold_bounds, NB(fold_bounds), {0}, 0, 0};
static struct histogram h_commit = {"cohort_store_commit_seconds",
                                    "Time of the store transaction that commits a round.",
                                    commit_bounds, NB(commit_bounds), {0}, 0, 0};

/* Outcomes: fixed result x reason pairs, always all written (0 until seen). */
static const struct {
    const char *result, *reason;
} outcomes[] = {
    {"accepted", "none"},        {"declined", "client"},     {"dropped", "disconnected"},
    {"dropped", "deadline"},     {"dropped", "upload_timeout"},
    {"rejected", "shape"},       {"rejected", "invalid"},    {"rejected", "frame"},
    {"rejected", "nonfinite"},   {"rejected", "checksum"},   {"rejected", "round"},
    {"rejected", "nomem"},       {"rejected", "other"},
};
#define NOUTCOMES NB(outcomes)

static struct {
    uint64_t bytes_in, bytes_out;
    uint64_t rounds_committed;
    uint32_t last_participants, last_offered;
    int have_last;
    uint64_t outcome[NOUTCOMES];
    uint64_t eval_round;
    size_t neval;
    char eval_names[16][64];
    double eval_values[16];
    int have_eval;
    double started;
} m;

double metrics_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void observe(struct histogram *h, double v)
{
    if (!isfinite(v))
        return;
    size_t i = 0;
    while (i < h->nbounds && v > h->bounds[i])
        i++;
    h->counts[i]++;
    h->sum += v;
    h->n++;
}

void metrics_bytes_in(uint64_t n)
{
    m.bytes_in += n;
}

void metrics_bytes_out(uint64_t n)
{
    m.bytes_out += n;
}

void metrics_fold_seconds(double s)
{
    observe(&h_fold, s);
}

void metrics_store_commit_seconds(double s)
{
    observe(&h_commit, s);
}

const char *metrics_part_result(const struct part *p)
{
    switch (p->status) {
    case PART_ACCEPTED:
        return "accepted";
    case PART_DECLINED:
        return "declined";
    case PART_REJECTED:
        return "rejected";
    default:
        return "dropped";
    }
}

const char *metrics_part_reason(const struct part *p)
{
    switch (p->status) {
    case PART_ACCEPTED:
        return "none";
    case PART_DECLINED:
        return "client";
    case PART_REJECTED:
        switch (p->err) {
        case COHORT_ESHAPE:
            return "shape";
        case COHORT_EINVAL:
            return "invalid";
        case COHORT_EFRAME:
            return "frame";
        case COHORT_ENONFINITE:
            return "nonfinite";
        case COHORT_ECHECKSUM:
            return "checksum";
        case COHORT_EROUND:
            return "round";
        case COHORT_ENOMEM:
            return "nomem";
        default:
            return "other";
        }
    default:
        /* The drop reasons written by round.c. */
        if (strstr(p->reason, "deadline"))
            return "deadline";
        if (strncmp(p->reason, "upload not finished", 19) == 0)
            return "upload_timeout";
        return "disconnected";
    }
}

void metrics_round_committed(const struct part *parts, size_t nparts, uint32_t participants,
                             double duration_s)
{
    m.rounds_committed++;
    m.last_participants = participants;
    m.last_offered = (uint32_t)nparts;
    m.have_last = 1;
    for (size_t i = 0; i < nparts; i++) {
        const char *res = metrics_part_result(&parts[i]), *why = metrics_part_reason(&parts[i]);
        for (size_t k = 0; k < NOUTCOMES; k++)
            if (strcmp(outcomes[k].result, res) == 0 && strcmp(outcomes[k].reason, why) == 0)
                m.outcome[k]++;
    }
    observe(&h_round, duration_s);
}

void metrics_eval_report(uint64_t round, const char *const *names, const double *values, size_t n)
{
    if (n > 16)
        n = 16;
    m.eval_round = round;
    m.neval = n;
    for (size_t i = 0; i < n; i++) {
        snprintf(m.eval_names[i], sizeof m.eval_names[i], "%s", names[i]);
        m.eval_values[i] = values[i];
    }
    m.have_eval = 1;
}

static void header(FILE *f, const char *name, const char *type, const char *help)
{
    fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void write_double(FILE *f, double v)
{
    if (isnan(v))
        fputs("NaN", f);
    else if (isinf(v))
        fputs(v > 0 ? "+Inf" : "-Inf", f);
    else
        fprintf(f, "%.17g", v);
}

static void write_histogram(FILE *f, const struct histogram *h)
{
    header(f, h->name, "histogram", h->help);
    uint64_t cum = 0;
    for (size_t i = 0; i < h->nbounds; i++) {
        cum += h->counts[i];
        fprintf(f, "%s_bucket{le=\"%g\"} %llu\n", h->name, h->bounds[i], (unsigned long long)cum);
    }
    cum += h->counts[h->nbounds];
    fprintf(f, "%s_bucket{le=\"+Inf\"} %llu\n", h->name, (unsigned long long)cum);
    fprintf(f, "%s_sum ", h->name);
    write_double(f, h->sum);
    fprintf(f, "\n%s_count %llu\n", h->name, (unsigned long long)h->n);
}

static void gauge(FILE *f, const char *name, const char *help, double v)
{
    header(f, name, "gauge", help);
    fprintf(f, "%s ", name);
    write_double(f, v);
    fputc('\n', f);
}

static void counter(FILE *f, const char *name, const char *help, uint64_t v)
{
    header(f, name, "counter", help);
    fprintf(f, "%s %llu\n", name, (unsigned long long)v);
}

void metrics_write(struct server *s, FILE *f)
{
    static const char *phases[] = {"waiting", "open", "closing", "committing", "done"};
    const struct round *r = &s->cur;
    header(f, "cohort_build_info", "gauge", "cohortd version.");
    fprintf(f, "cohort_build_info{version=\"0.1.0\",strategy=\"%s\"} 1\n", s->cfg.strategy);
    counter(f, "cohort_rounds_committed_total", "Rounds committed by this process.",
            m.rounds_committed);
    gauge(f, "cohort_round_last_committed", "Number of the last committed round (0: initial "
          "model).", (double)s->last_committed);
    int busy = r->phase == PHASE_OPEN || r->phase == PHASE_CLOSING ||
               r->phase == PHASE_COMMITTING;
    gauge(f, "cohort_round_current",
          "The round that is open, closing or committing; while waiting, the next one.",
          (double)(busy ? r->id : r->phase == PHASE_DONE ? s->last_committed
                                                          : s->last_committed + 1));
    header(f, "cohort_round_phase", "gauge", "1 for the round manager's current phase.");
    for (int i = 0; i <= PHASE_DONE; i++)
        fprintf(f, "cohort_round_phase{phase=\"%s\"} %d\n", phases[i], r->phase == i);
    uint32_t offered = 0, answered = 0, accepted = 0;
    if (busy) {
        for (size_t i = 0; i < r->nparts; i++) {
            int st = r->parts[i].status;
            offered++;
            if (st != PART_OFFERED && st != PART_UPLOADING && st != PART_FOLDING)
                answered++;
            if (st == PART_ACCEPTED)
                accepted++;
        }
    }
    gauge(f, "cohort_round_offered", "Clients the current round was offered to.", offered);
    gauge(f, "cohort_round_answered", "Clients that answered the current round.", answered);
    gauge(f, "cohort_round_accepted", "Updates accepted in the current round so far.", accepted);
    gauge(f, "cohort_clients_connected", "Trainers connected (past Hello).", s->nready);
    gauge(f, "cohort_evaluators_connected", "Evaluators connected (past Hello).",
          s->nevaluators);
    gauge(f, "cohort_connections", "Open client connections, including handshakes.", s->nconns);
    uint64_t reg = 0;
    if (s->store && pstore_count_clients(s->store, &reg) == 0)
        gauge(f, "cohort_clients_registered", "Trainers registered in the store.", (double)reg);
    gauge(f, "cohort_round_participants", "Accepted updates of the last round committed by this "
          "process.", m.have_last ? m.last_participants : 0);
    gauge(f, "cohort_round_last_offered", "Clients the last committed round was offered to.",
          m.have_last ? m.last_offered : 0);
    gauge(f, "cohort_uploads_active", "Update uploads holding a staging slot.",
          r->uploads_active);
    gauge(f, "cohort_uploads_waiting", "Update uploads waiting for a staging slot.",
          (double)s->nwaiters);
    /* What slow readers cost in memory: each connection queues at most one model
     * burst block plus its send window (docs/architecture.md). */
    double queued = 0;
    for (const struct conn *c = s->conn_list; c; c = c->next)
        queued += (double)c->tx_pending + (c->out ? (double)c->out->len : 0);
    gauge(f, "cohort_send_queued_bytes", "Ciphertext written but not yet taken by the "
          "clients' sockets, all connections.", queued);
    header(f, "cohort_updates_total", "counter",
           "Answers to round offers in committed rounds, by result and reason.");
    for (size_t k = 0; k < NOUTCOMES; k++)
        fprintf(f, "cohort_updates_total{result=\"%s\",reason=\"%s\"} %llu\n",
                outcomes[k].result, outcomes[k].reason, (unsigned long long)m.outcome[k]);
    counter(f, "cohort_bytes_received_total", "Bytes received from clients (TLS records).",
            m.bytes_in);
    counter(f, "cohort_bytes_sent_total", "Bytes sent to clients (TLS records).", m.bytes_out);
    write_histogram(f, &h_round);
    write_histogram(f, &h_fold);
    write_histogram(f, &h_commit);
    gauge(f, "cohort_eval_round", "Round whose global model the latest evaluation report is "
          "about (-1: none yet).", m.have_eval ? (double)m.eval_round : -1);
    header(f, "cohort_eval_metric", "gauge",
           "Metrics of the latest evaluation report (test set of an evaluator client).");
    for (size_t i = 0; i < m.neval; i++) {
        fprintf(f, "cohort_eval_metric{metric=\"%s\"} ", m.eval_names[i]);
        write_double(f, m.eval_values[i]);
        fputc('\n', f);
    }
}
