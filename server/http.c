/*
 * Admin HTTP endpoint; see http.h. Owns its listener, its connections and a
 * 1 s sweep timer, all on the server's loop. Each connection feeds what it
 * reads to http-parser; a complete request is answered at once from the live
 * state (struct server), the metrics (metrics.c) and the store (SQLite reads
 * on the loop thread, bounded by the limits of each route), so pipelined
 * requests are answered in order. Responses are built in memory and written
 * whole; a client that does not read them is closed once 4 MiB are queued.
 * Loop thread only.
 */
#include "http.h"

#include <cJSON.h>
#include <http_parser.h>
#include <limits.h>
#include <math.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "dashboard_html.h"
#include "log.h"
#include "metrics.h"
#include "pstore.h"
#include "server.h"

#define MAX_CONNS 16
#define MAX_HEAD_BYTES 8192         /* request line + headers */
#define MAX_BODY_BYTES 0            /* GET and HEAD only: no body */
#define IDLE_TIMEOUT_S 10.0
#define MAX_QUEUED (4u << 20)
#define ROUNDS_DEFAULT 100
#define ROUNDS_MAX 10000
#define CLIENTS_DEFAULT 1000
#define CLIENTS_MAX 100000

struct hconn {
    uv_tcp_t tcp;
    struct server *s;
    http_parser p;
    char url[2048];
    size_t urllen;
    char field[32];             /* current header name (longer names are not ours) */
    size_t fieldlen;
    int last_was_value;
    char auth[512];
    size_t authlen;
    int auth_seen;
    size_t head_bytes;
    int refuse;                 /* 0, or the status to answer (400, 413, 414, 431) */
    double last_active;
    int writes;
    int closing;
    struct hconn *prev, *next;
};

struct hwrite {
    uv_write_t req;
    struct hconn *c;
    char data[];
};

static uv_tcp_t listener;
static uv_timer_t sweep;
static int running;
static struct hconn *conns;
static int nconns;
static char bound[80];
static double started_mono;
static char started_iso[32];
static http_parser_settings settings;

const char *http_address(void)
{
    return bound;
}

static void on_closed(uv_handle_t *h)
{
    struct hconn *c = h->data;
    if (c->prev)
        c->prev->next = c->next;
    else
        conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    nconns--;
    free(c);
}

static void hclose(struct hconn *c)
{
    if (uv_is_closing((uv_handle_t *)&c->tcp))
        return;
    c->closing = 1;
    uv_read_stop((uv_stream_t *)&c->tcp);
    uv_close((uv_handle_t *)&c->tcp, on_closed);
}

static void on_written(uv_write_t *req, int status)
{
    struct hwrite *w = (struct hwrite *)req;
    struct hconn *c = w->c;
    free(w);
    c->writes--;
    if (status < 0 || (c->closing && c->writes == 0))
        hclose(c);
}

static const char *reason_phrase(int status)
{
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 413: return "Payload Too Large";
    case 414: return "URI Too Long";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    default: return "Error";
    }
}

/* Queues one whole response; keep=0 closes the connection once it is written. */
static void respond(struct hconn *c, int status, const char *ctype, const char *extra,
                    const char *body, size_t blen, int head_only, int keep)
{
    char hdr[1024];
    int hn = snprintf(hdr, sizeof hdr,
                      "HTTP/1.1 %d %s\r\n"
                      "Content-Type: %s\r\n"
                      "Content-Length: %zu\r\n"
                      "Cache-Control: no-store\r\n"
                      "X-Content-Type-Options: nosniff\r\n"
                      "%s"
                      "Connection: %s\r\n\r\n",
                      status, reason_phrase(status), ctype, blen, extra ? extra : "",
                      keep ? "keep-alive" : "close");
    if (hn < 0 || (size_t)hn >= sizeof hdr) {
        hclose(c);
        return;
    }
    size_t n = (size_t)hn + (head_only ? 0 : blen);
    if (uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) + n > MAX_QUEUED) {
        coh_warn("http", "client does not read its responses; closing the connection");
        hclose(c);
        return;
    }
    struct hwrite *w = malloc(sizeof *w + n);
    if (!w) {
        hclose(c);
        return;
    }
    memcpy(w->data, hdr, (size_t)hn);
    if (!head_only && blen)
        memcpy(w->data + hn, body, blen);
    w->c = c;
    uv_buf_t b = uv_buf_init(w->data, (unsigned int)n);
    if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_written) < 0) {
        free(w);
        hclose(c);
        return;
    }
    c->writes++;
    if (!keep) {
        c->closing = 1;
        uv_read_stop((uv_stream_t *)&c->tcp);
    }
}

static void respond_text(struct hconn *c, int status, const char *extra, const char *text,
                         int head_only, int keep)
{
    respond(c, status, "text/plain; charset=utf-8", extra, text, strlen(text), head_only, keep);
}

/* ---- JSON from the live state and the store ---- */

static const char *phase_name(int p)
{
    static const char *n[] = {"waiting", "open", "closing", "committing", "done"};
    return p >= 0 && p <= PHASE_DONE ? n[p] : "unknown";
}

static const char *status_name(int st)
{
    switch (st) {
    case PART_OFFERED: return "offered";
    case PART_UPLOADING: return "uploading";
    case PART_FOLDING: return "folding";
    case PART_ACCEPTED: return "accepted";
    case PART_DECLINED: return "declined";
    case PART_REJECTED: return "rejected";
    default: return "dropped";
    }
}

static int round_busy(const struct server *s)
{
    int p = s->cur.phase;
    return p == PHASE_OPEN || p == PHASE_CLOSING || p == PHASE_COMMITTING;
}

static cJSON *status_json(struct server *s)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "version", "0.1.0");
    cJSON_AddStringToObject(o, "strategy", s->cfg.strategy);
    cJSON_AddStringToObject(o, "started_at", started_iso);
    cJSON_AddNumberToObject(o, "uptime_s", metrics_now() - started_mono);
    cJSON_AddNumberToObject(o, "last_committed", (double)s->last_committed);
    cJSON_AddNumberToObject(o, "rounds_target", (double)s->cfg.rounds);
    cJSON_AddNumberToObject(o, "min_clients", s->cfg.min_clients);
    cJSON_AddBoolToObject(o, "stopping", s->stopping);
    const struct round *r = &s->cur;
    cJSON *ro = cJSON_AddObjectToObject(o, "round");
    int busy = round_busy(s);
    cJSON_AddNumberToObject(ro, "id", (double)(busy ? r->id
                                               : r->phase == PHASE_DONE ? s->last_committed
                                                                        : s->last_committed + 1));
    cJSON_AddStringToObject(ro, "phase", phase_name(r->phase));
    int counts[PART_REJECTED + 1] = {0};
    size_t offered = busy ? r->nparts : 0;
    for (size_t i = 0; i < offered; i++)
        if (r->parts[i].status >= 0 && r->parts[i].status <= PART_REJECTED)
            counts[r->parts[i].status]++;
    cJSON_AddNumberToObject(ro, "offered", (double)offered);
    cJSON_AddNumberToObject(ro, "answered",
                            counts[PART_ACCEPTED] + counts[PART_DECLINED] +
                                counts[PART_REJECTED] + counts[PART_DROPPED]);
    /* Per state; "pending" = offered and not answered yet. */
    for (int st = PART_OFFERED; st <= PART_REJECTED; st++)
        cJSON_AddNumberToObject(ro, st == PART_OFFERED ? "pending" : status_name(st), counts[st]);
    double now = server_now(s);
    if (r->phase == PHASE_OPEN) {
        cJSON_AddNumberToObject(ro, "age_s", now - r->opened_at);
        cJSON_AddNumberToObject(ro, "deadline_in_s",
                                r->deadline_at > now ? r->deadline_at - now : 0);
    } else {
        cJSON_AddNullToObject(ro, "age_s");
        cJSON_AddNullToObject(ro, "deadline_in_s");
    }
    if (busy)
        cJSON_AddStringToObject(ro, "started_at", r->started_iso);
    else
        cJSON_AddNullToObject(ro, "started_at");
    cJSON *co = cJSON_AddObjectToObject(o, "clients");
    cJSON_AddNumberToObject(co, "connected", s->nready);
    cJSON_AddNumberToObject(co, "evaluators", s->nevaluators);
    cJSON_AddNumberToObject(co, "connections", s->nconns);
    uint64_t reg = 0;
    if (pstore_count_clients(s->store, &reg) == 0)
        cJSON_AddNumberToObject(co, "registered", (double)reg);
    else
        cJSON_AddNullToObject(co, "registered");
    cJSON_AddNumberToObject(o, "uploads_active", r->uploads_active);
    cJSON_AddNumberToObject(o, "uploads_waiting", (double)s->nwaiters);
    /* The latest evaluation in the store. */
    sqlite3 *db = pstore_db(s->store);
    sqlite3_stmt *st;
    cJSON *ev = NULL;
    if (sqlite3_prepare_v2(db,
                           "SELECT round, name, avg(value) FROM eval_metrics WHERE round = "
                           "(SELECT max(round) FROM eval_metrics) GROUP BY name ORDER BY name",
                           -1, &st, NULL) == SQLITE_OK) {
        while (sqlite3_step(st) == SQLITE_ROW) {
            if (!ev) {
                ev = cJSON_AddObjectToObject(o, "eval");
                cJSON_AddNumberToObject(ev, "round", (double)sqlite3_column_int64(st, 0));
                cJSON_AddObjectToObject(ev, "metrics");
            }
            cJSON *mo = cJSON_GetObjectItem(ev, "metrics");
            if (sqlite3_column_type(st, 2) == SQLITE_NULL)
                cJSON_AddNullToObject(mo, (const char *)sqlite3_column_text(st, 1));
            else
                cJSON_AddNumberToObject(mo, (const char *)sqlite3_column_text(st, 1),
                                        sqlite3_column_double(st, 2));
        }
        sqlite3_finalize(st);
    }
    if (!ev)
        cJSON_AddNullToObject(o, "eval");
    return o;
}

static void col_num(cJSON *o, const char *k, sqlite3_stmt *st, int i)
{
    if (sqlite3_column_type(st, i) == SQLITE_NULL)
        cJSON_AddNullToObject(o, k);
    else
        cJSON_AddNumberToObject(o, k, sqlite3_column_double(st, i));
}

static void col_str(cJSON *o, const char *k, sqlite3_stmt *st, int i)
{
    if (sqlite3_column_type(st, i) == SQLITE_NULL)
        cJSON_AddNullToObject(o, k);
    else
        cJSON_AddStringToObject(o, k, (const char *)sqlite3_column_text(st, i));
}

/* Finds the round object for round number rn in the array (rounds ascending from first). */
static cJSON *round_obj(cJSON *arr, int64_t first, int64_t rn, int64_t count)
{
    if (rn < first || rn >= first + count)
        return NULL;
    cJSON *o = cJSON_GetArrayItem(arr, (int)(rn - first));
    if (!o)
        return NULL;
    cJSON *num = cJSON_GetObjectItem(o, "round");
    return num && (int64_t)num->valuedouble == rn ? o : NULL;
}

/* Prepares a per-round query with ?1 bound to the first listed round; NULL leaves that part
 * of the answer out rather than failing it. */
static sqlite3_stmt *rows_since(sqlite3 *db, const char *sql, int64_t first)
{
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
        return NULL;
    sqlite3_bind_int64(st, 1, first);
    return st;
}

/* Steps st (rows whose first column is a round) to the next row of a listed round and returns
 * that round's object; NULL when the rows run out. Rows of unlisted rounds are skipped. */
static cJSON *next_round_row(sqlite3_stmt *st, cJSON *arr, int64_t first, int64_t count)
{
    while (sqlite3_step(st) == SQLITE_ROW) {
        cJSON *r = round_obj(arr, first, sqlite3_column_int64(st, 0), count);
        if (r)
            return r;
    }
    return NULL;
}

static cJSON *rounds_json(struct server *s, long limit)
{
    sqlite3 *db = pstore_db(s->store);
    sqlite3_stmt *st;
    cJSON *o = cJSON_CreateObject();
    cJSON *arr = cJSON_AddArrayToObject(o, "rounds");
    if (sqlite3_prepare_v2(db,
                           "SELECT round, strategy, started_at, closed_at, committed_at, offered, "
                           "participants, total_examples, mean_train_loss, duration_s, "
                           "close_reason FROM (SELECT * FROM rounds ORDER BY round DESC LIMIT ?1)"
                           " ORDER BY round",
                           -1, &st, NULL) != SQLITE_OK)
        goto fail;
    sqlite3_bind_int64(st, 1, limit);
    int64_t first = -1, count = 0, prev = -1;
    int contiguous = 1;
    while (sqlite3_step(st) == SQLITE_ROW) {
        cJSON *r = cJSON_CreateObject();
        int64_t rn = sqlite3_column_int64(st, 0);
        if (first < 0)
            first = rn;
        if (prev >= 0 && rn != prev + 1)
            contiguous = 0;
        prev = rn;
        count++;
        cJSON_AddNumberToObject(r, "round", (double)rn);
        col_str(r, "strategy", st, 1);
        col_str(r, "started_at", st, 2);
        col_str(r, "closed_at", st, 3);
        col_str(r, "committed_at", st, 4);
        col_num(r, "offered", st, 5);
        col_num(r, "participants", st, 6);
        col_num(r, "total_examples", st, 7);
        col_num(r, "mean_train_loss", st, 8);
        col_num(r, "duration_s", st, 9);
        col_str(r, "close_reason", st, 10);
        cJSON *oc = cJSON_AddObjectToObject(r, "outcomes");
        cJSON_AddNumberToObject(oc, "accepted", 0);
        cJSON_AddNumberToObject(oc, "declined", 0);
        cJSON_AddNumberToObject(oc, "dropped", 0);
        cJSON_AddNumberToObject(oc, "rejected", 0);
        cJSON_AddArrayToObject(r, "participation");
        cJSON_AddObjectToObject(r, "eval");
        cJSON_AddItemToArray(arr, r);
    }
    sqlite3_finalize(st);
    if (first < 0 || !contiguous)
        return o; /* rounds are contiguous in a healthy store; otherwise leave them bare */
    /* One row per client per round: [client id, status]. */
    if ((st = rows_since(db,
                         "SELECT round, client, status FROM participation WHERE round >= ?1 "
                         "ORDER BY round, client",
                         first))) {
        for (cJSON *r; (r = next_round_row(st, arr, first, count));) {
            const char *status = (const char *)sqlite3_column_text(st, 2);
            cJSON *pair = cJSON_CreateArray();
            cJSON_AddItemToArray(pair, cJSON_CreateNumber((double)sqlite3_column_int64(st, 1)));
            cJSON_AddItemToArray(pair, cJSON_CreateString(status));
            cJSON_AddItemToArray(cJSON_GetObjectItem(r, "participation"), pair);
            cJSON *n = cJSON_GetObjectItem(cJSON_GetObjectItem(r, "outcomes"), status);
            if (n)
                cJSON_SetNumberValue(n, n->valuedouble + 1);
        }
        sqlite3_finalize(st);
    }
    /* Evaluation reports: the mean over evaluators, per metric. */
    if ((st = rows_since(db,
                         "SELECT round, name, avg(value), count(*) FROM eval_metrics WHERE "
                         "round >= ?1 GROUP BY round, name ORDER BY round, name",
                         first))) {
        for (cJSON *r; (r = next_round_row(st, arr, first, count));) {
            col_num(cJSON_GetObjectItem(r, "eval"), (const char *)sqlite3_column_text(st, 1), st,
                    2);
        }
        sqlite3_finalize(st);
    }
    return o;
fail:
    cJSON_Delete(o);
    return NULL;
}

static cJSON *clients_json(struct server *s, long limit)
{
    sqlite3 *db = pstore_db(s->store);
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db,
                           "SELECT c.id, c.name, c.role, c.first_seen, c.last_seen, c.connects, "
                           "c.num_examples, "
                           "total(p.status = 'accepted'), total(p.status = 'declined'), "
                           "total(p.status = 'dropped'), total(p.status = 'rejected'), "
                           "max(p.round) "
                           "FROM clients c LEFT JOIN participation p ON p.client = c.id "
                           "GROUP BY c.id ORDER BY c.id LIMIT ?1",
                           -1, &st, NULL) != SQLITE_OK)
        return NULL;
    sqlite3_bind_int64(st, 1, limit);
    cJSON *o = cJSON_CreateObject();
    cJSON *arr = cJSON_AddArrayToObject(o, "clients");
    while (sqlite3_step(st) == SQLITE_ROW) {
        cJSON *c = cJSON_CreateObject();
        int64_t id = sqlite3_column_int64(st, 0);
        cJSON_AddNumberToObject(c, "id", (double)id);
        col_str(c, "name", st, 1);
        col_str(c, "role", st, 2);
        col_str(c, "first_seen", st, 3);
        col_str(c, "last_seen", st, 4);
        col_num(c, "connects", st, 5);
        col_num(c, "num_examples", st, 6);
        col_num(c, "accepted", st, 7);
        col_num(c, "declined", st, 8);
        col_num(c, "dropped", st, 9);
        col_num(c, "rejected", st, 10);
        col_num(c, "last_round", st, 11);
        struct conn *live = idmap_get(&s->conns_by_client, (uint64_t)id);
        cJSON_AddBoolToObject(c, "connected", live != NULL);
        const char *cur = NULL;
        if (round_busy(s))
            for (size_t i = 0; i < s->cur.nparts; i++)
                if (s->cur.parts[i].client_id == id)
                    cur = status_name(s->cur.parts[i].status);
        if (cur)
            cJSON_AddStringToObject(c, "current", cur);
        else
            cJSON_AddNullToObject(c, "current");
        cJSON_AddItemToArray(arr, c);
    }
    sqlite3_finalize(st);
    return o;
}

/* ---- requests ---- */

static long query_long(const char *url, const struct http_parser_url *u, const char *key, long def,
                       long lo, long hi, int *bad)
{
    if (!(u->field_set & (1 << UF_QUERY)))
        return def;
    const char *q = url + u->field_data[UF_QUERY].off;
    size_t qlen = u->field_data[UF_QUERY].len, klen = strlen(key);
    for (size_t i = 0; i < qlen;) {
        size_t j = i;
        while (j < qlen && q[j] != '&')
            j++;
        if (j - i > klen && strncmp(q + i, key, klen) == 0 && q[i + klen] == '=') {
            char num[24];
            size_t n = j - i - klen - 1;
            if (n == 0 || n >= sizeof num) {
                *bad = 1;
                return def;
            }
            memcpy(num, q + i + klen + 1, n);
            num[n] = '\0';
            char *end;
            long v = strtol(num, &end, 10);
            if (*end || v < lo || v > hi) {
                *bad = 1;
                return def;
            }
            return v;
        }
        i = j + 1;
    }
    return def;
}

static int path_is(const char *path, size_t len, const char *want)
{
    return len == strlen(want) && memcmp(path, want, len) == 0;
}

static int authorized(struct hconn *c)
{
    const char *tok = c->s->cfg.http_token;
    if (!tok || !tok[0])
        return 1;
    size_t tl = strlen(tok);
    if (!c->auth_seen || c->authlen != 7 + tl || strncasecmp(c->auth, "Bearer ", 7) != 0)
        return 0;
    return CRYPTO_memcmp(c->auth + 7, tok, tl) == 0;
}

static void send_json(struct hconn *c, cJSON *j, int head_only, int keep)
{
    if (!j) {
        respond_text(c, 500, NULL, "the store could not be read\n", head_only, keep);
        return;
    }
    char *txt = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (!txt) {
        respond_text(c, 500, NULL, "out of memory\n", head_only, keep);
        return;
    }
    respond(c, 200, "application/json", NULL, txt, strlen(txt), head_only, keep);
    free(txt);
}

/* The list endpoints page alike: ?limit=N from 1 to max, a 400 naming the range otherwise. */
static void send_list(struct hconn *c, const struct http_parser_url *u, long def, long max,
                      cJSON *(*build)(struct server *, long), int head_only, int keep)
{
    int bad = 0;
    long limit = query_long(c->url, u, "limit", def, 1, max, &bad);
    if (bad) {
        char msg[64];
        snprintf(msg, sizeof msg, "limit must be an integer from 1 to %ld\n", max);
        respond_text(c, 400, NULL, msg, head_only, keep);
        return;
    }
    send_json(c, build(c->s, limit), head_only, keep);
}

static void handle(struct hconn *c)
{
    struct server *s = c->s;
    int keep = http_should_keep_alive(&c->p) && !s->stopping;
    int method = c->p.method;
    int head_only = method == HTTP_HEAD;
    if (c->refuse == 503) {
        /* Over the connection limit: the request was read (closing with it unread
         * would reset the connection before the answer arrives), now refuse it. */
        respond_text(c, 503, "Retry-After: 1\r\n", "too many connections\n", head_only, 0);
        return;
    }
    if (c->refuse) {
        respond_text(c, c->refuse, NULL, "request refused\n", 0, 0);
        return;
    }
    struct http_parser_url u;
    http_parser_url_init(&u);
    if (http_parser_parse_url(c->url, c->urllen, 0, &u) != 0 || !(u.field_set & (1 << UF_PATH))) {
        respond_text(c, 400, NULL, "bad request target\n", head_only, 0);
        return;
    }
    const char *path = c->url + u.field_data[UF_PATH].off;
    size_t plen = u.field_data[UF_PATH].len;
    enum { R_NONE, R_DASH, R_HEALTH, R_METRICS, R_STATUS, R_ROUNDS, R_CLIENTS } route = R_NONE;
    if (path_is(path, plen, "/") || path_is(path, plen, "/index.html"))
        route = R_DASH;
    else if (path_is(path, plen, "/healthz"))
        route = R_HEALTH;
    else if (path_is(path, plen, "/metrics"))
        route = R_METRICS;
    else if (path_is(path, plen, "/api/status"))
        route = R_STATUS;
    else if (path_is(path, plen, "/api/rounds"))
        route = R_ROUNDS;
    else if (path_is(path, plen, "/api/clients"))
        route = R_CLIENTS;
    if (route == R_NONE) {
        respond_text(c, 404, NULL, "not found: the routes are /, /metrics, /api/status, "
                     "/api/rounds, /api/clients, /healthz\n", head_only, keep);
        return;
    }
    if (method != HTTP_GET && method != HTTP_HEAD) {
        respond_text(c, 405, "Allow: GET, HEAD\r\n", "only GET and HEAD are allowed\n", 0, keep);
        return;
    }
    if (route != R_DASH && route != R_HEALTH && !authorized(c)) {
        respond_text(c, 401, "WWW-Authenticate: Bearer realm=\"cohortd\"\r\n",
                     "a valid 'Authorization: Bearer TOKEN' header is required\n", head_only,
                     keep);
        return;
    }
    switch (route) {
    case R_DASH:
        /* Everything the page needs is inline; it may talk to this server only. */
        respond(c, 200, "text/html; charset=utf-8",
                "Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; img-src data:; connect-src 'self'; "
                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'\r\n",
                (const char *)dashboard_html, sizeof dashboard_html, head_only, keep);
        return;
    case R_HEALTH:
        respond_text(c, 200, NULL, "ok\n", head_only, keep);
        return;
    case R_METRICS: {
        char *buf = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&buf, &len);
        if (!f) {
            respond_text(c, 500, NULL, "out of memory\n", head_only, keep);
            return;
        }
        metrics_write(s, f);
        fclose(f);
        respond(c, 200, "text/plain; version=0.0.4; charset=utf-8", NULL, buf, len, head_only,
                keep);
        free(buf);
        return;
    }
    case R_STATUS:
        send_json(c, status_json(s), head_only, keep);
        return;
    case R_ROUNDS:
        send_list(c, &u, ROUNDS_DEFAULT, ROUNDS_MAX, rounds_json, head_only, keep);
        return;
    case R_CLIENTS:
        send_list(c, &u, CLIENTS_DEFAULT, CLIENTS_MAX, clients_json, head_only, keep);
        return;
    default:
        return;
    }
}

/* ---- http-parser callbacks ---- */

static int count_head(struct hconn *c, size_t n)
{
    c->head_bytes += n;
    if (c->head_bytes > MAX_HEAD_BYTES) {
        c->refuse = 431;
        return 1;
    }
    return 0;
}

static int on_begin(http_parser *p)
{
    struct hconn *c = p->data;
    c->urllen = c->fieldlen = c->authlen = c->head_bytes = 0;
    c->auth_seen = c->last_was_value = 0;
    if (c->refuse != 503)
        c->refuse = 0;
    return 0;
}

static int on_url(http_parser *p, const char *at, size_t n)
{
    struct hconn *c = p->data;
    if (c->urllen + n >= sizeof c->url) {
        c->refuse = 414;
        return 1;
    }
    memcpy(c->url + c->urllen, at, n);
    c->urllen += n;
    return count_head(c, n);
}

static int on_field(http_parser *p, const char *at, size_t n)
{
    struct hconn *c = p->data;
    if (c->last_was_value) {
        c->fieldlen = 0;
        c->last_was_value = 0;
    }
    for (size_t i = 0; i < n; i++) {
        if (c->fieldlen < sizeof c->field - 1)
            c->field[c->fieldlen] = at[i];
        c->fieldlen++;
    }
    return count_head(c, n);
}

static int on_value(http_parser *p, const char *at, size_t n)
{
    struct hconn *c = p->data;
    if (!c->last_was_value) {
        c->last_was_value = 1;
        c->field[c->fieldlen < sizeof c->field ? c->fieldlen : sizeof c->field - 1] = '\0';
        if (c->fieldlen == 13 && strcasecmp(c->field, "authorization") == 0) {
            c->auth_seen = 1;
            c->authlen = 0;
        } else {
            c->fieldlen = 0; /* marks "not Authorization" for the pieces that follow */
        }
    }
    if (c->fieldlen == 13 && c->auth_seen) {
        size_t room = sizeof c->auth - c->authlen;
        size_t k = n < room ? n : room;
        memcpy(c->auth + c->authlen, at, k);
        c->authlen += n; /* an overlong value can never match */
        if (c->authlen > sizeof c->auth)
            c->authlen = sizeof c->auth + 1;
    }
    return count_head(c, n);
}

static int on_headers(http_parser *p)
{
    struct hconn *c = p->data;
    if ((p->flags & F_CHUNKED) ||
        (p->content_length > MAX_BODY_BYTES && p->content_length != ULLONG_MAX)) {
        c->refuse = 413;
        return 1;
    }
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t n)
{
    struct hconn *c = p->data;
    c->refuse = 413;
    return 1;
}

static int on_complete(http_parser *p)
{
    struct hconn *c = p->data;
    handle(c);
    /* A connection that is closing takes no further (pipelined) request. */
    return c->closing ? 1 : 0;
}

/* ---- libuv plumbing ---- */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct hconn *c = h->data;
    buf->base = (char *)c->s->readbuf;
    buf->len = sizeof c->s->readbuf;
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    struct hconn *c = st->data;
    if (nread == 0 || c->closing)
        return;
    if (nread < 0) {
        hclose(c);
        return;
    }
    c->last_active = metrics_now();
    size_t used = http_parser_execute(&c->p, &settings, buf->base, (size_t)nread);
    if (c->closing)
        return;
    if (c->p.http_errno != HPE_OK || used != (size_t)nread) {
        if (c->refuse)
            respond_text(c, c->refuse, NULL, c->refuse == 431   ? "request header too large\n"
                                             : c->refuse == 414 ? "request target too long\n"
                                             : c->refuse == 503 ? "too many connections\n"
                                                                : "request bodies are not "
                                                                  "accepted\n",
                         0, 0);
        else if (c->p.http_errno != HPE_CB_message_complete)
            respond_text(c, 400, NULL, "malformed HTTP request\n", 0, 0);
        else
            hclose(c);
    }
}

static void on_connection(uv_stream_t *l, int status)
{
    struct server *s = l->data;
    if (status < 0)
        return;
    struct hconn *c = calloc(1, sizeof *c);
    if (!c)
        return;
    c->s = s;
    uv_tcp_init(s->loop, &c->tcp);
    c->tcp.data = c;
    c->next = conns;
    if (conns)
        conns->prev = c;
    conns = c;
    nconns++;
    if (uv_accept(l, (uv_stream_t *)&c->tcp) < 0) {
        hclose(c);
        return;
    }
    http_parser_init(&c->p, HTTP_REQUEST);
    c->p.data = c;
    c->last_active = metrics_now();
    if (nconns > MAX_CONNS || s->stopping)
        c->refuse = 503; /* answered once its request has arrived */
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

static void on_sweep(uv_timer_t *t)
{
    double now = metrics_now();
    for (struct hconn *c = conns, *next; c; c = next) {
        next = c->next;
        if (now - c->last_active > IDLE_TIMEOUT_S)
            hclose(c);
    }
}

/* "PORT" or "HOST:PORT" ("[v6]:PORT") into an address. */
static int parse_addr(const char *spec, struct sockaddr_storage *ss, char *shown, size_t len)
{
    char host[256] = "127.0.0.1";
    const char *port = spec;
    const char *colon = strrchr(spec, ':');
    if (colon) {
        size_t n = (size_t)(colon - spec);
        const char *h = spec;
        if (n >= 2 && h[0] == '[' && h[n - 1] == ']') {
            h++;
            n -= 2;
        }
        if (n == 0 || n >= sizeof host)
            return -1;
        memcpy(host, h, n);
        host[n] = '\0';
        port = colon + 1;
    }
    char *end;
    long p = strtol(port, &end, 10);
    if (!*port || *end || p < 0 || p > 65535)
        return -1;
    if (uv_ip4_addr(host, (int)p, (struct sockaddr_in *)ss) != 0 &&
        uv_ip6_addr(host, (int)p, (struct sockaddr_in6 *)ss) != 0)
        return -1;
    snprintf(shown, len, strchr(host, ':') ? "[%s]:%ld" : "%s:%ld", host, p);
    return 0;
}

int http_check_address(const char *spec)
{
    struct sockaddr_storage ss;
    char shown[300];
    return parse_addr(spec, &ss, shown, sizeof shown);
}

int http_start(struct server *s)
{
    if (!s->cfg.http || !s->cfg.http[0])
        return 0;
    struct sockaddr_storage ss;
    char shown[300];
    if (parse_addr(s->cfg.http, &ss, shown, sizeof shown) < 0) {
        coh_err("http", "--http %s: expected PORT or HOST:PORT with an IP address",
                s->cfg.http);
        return -1;
    }
    memset(&settings, 0, sizeof settings);
    settings.on_message_begin = on_begin;
    settings.on_url = on_url;
    settings.on_header_field = on_field;
    settings.on_header_value = on_value;
    settings.on_headers_complete = on_headers;
    settings.on_body = on_body;
    settings.on_message_complete = on_complete;
    started_mono = metrics_now();
    server_iso_now(started_iso, sizeof started_iso);
    uv_tcp_init(s->loop, &listener);
    listener.data = s;
    int e;
    if ((e = uv_tcp_bind(&listener, (struct sockaddr *)&ss, 0)) < 0 ||
        (e = uv_listen((uv_stream_t *)&listener, 64, on_connection)) < 0) {
        coh_err("http", "cannot listen on %s: %s", shown, uv_strerror(e));
        uv_close((uv_handle_t *)&listener, NULL);
        return -1;
    }
    /* With port 0 the kernel picks one: report what was bound. */
    struct sockaddr_storage got;
    int gl = sizeof got;
    if (uv_tcp_getsockname(&listener, (struct sockaddr *)&got, &gl) == 0) {
        char ip[64] = "?";
        int port = 0;
        if (got.ss_family == AF_INET) {
            uv_ip4_name((struct sockaddr_in *)&got, ip, sizeof ip);
            port = ntohs(((struct sockaddr_in *)&got)->sin_port);
            snprintf(bound, sizeof bound, "%s:%d", ip, port);
        } else {
            uv_ip6_name((struct sockaddr_in6 *)&got, ip, sizeof ip);
            port = ntohs(((struct sockaddr_in6 *)&got)->sin6_port);
            snprintf(bound, sizeof bound, "[%s]:%d", ip, port);
        }
    }
    uv_timer_init(s->loop, &sweep);
    uv_timer_start(&sweep, on_sweep, 1000, 1000);
    running = 1;
    int token = s->cfg.http_token && s->cfg.http_token[0];
    coh_notice("http", "admin endpoint on http://%s/ (dashboard, /metrics, /api/*)%s", bound,
               token ? ", bearer token required" : "");
    if (!token && strncmp(bound, "127.", 4) != 0 && strncmp(bound, "[::1]", 5) != 0)
        coh_warn("http", "the admin endpoint on %s has no --http-token and is not on loopback: "
                 "anyone who reaches it can read the federation's state", bound);
    return 0;
}

void http_stop(struct server *s)
{
    if (!running)
        return;
    running = 0;
    uv_timer_stop(&sweep);
    uv_close((uv_handle_t *)&sweep, NULL);
    uv_close((uv_handle_t *)&listener, NULL);
    for (struct hconn *c = conns, *next; c; c = next) {
        next = c->next;
        hclose(c);
    }
}
