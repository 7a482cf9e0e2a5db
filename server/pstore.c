/*
 * Participation store on SQLite; see pstore.h. Loop thread only. Statements
 * that run every round are prepared once.
 */
#include "pstore.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cohort_err.h"
#include "log.h"
#include "metrics.h"
#include "server.h"

#define SCHEMA_VERSION "1"

struct pstore {
    sqlite3 *db;
    sqlite3_stmt *client_upsert, *client_id, *round_ins, *part_ins, *eval_ins;
};

static const char *schema =
    "CREATE TABLE IF NOT EXISTS meta("
    "  key TEXT PRIMARY KEY, value TEXT NOT NULL);"
    "CREATE TABLE IF NOT EXISTS clients("
    "  id INTEGER PRIMARY KEY,"
    "  name TEXT NOT NULL UNIQUE,"
    "  first_seen TEXT NOT NULL,"
    "  last_seen TEXT NOT NULL,"
    "  num_examples INTEGER,"
    "  connects INTEGER NOT NULL DEFAULT 0);"
    "CREATE TABLE IF NOT EXISTS rounds("
    "  round INTEGER PRIMARY KEY,"
    "  strategy TEXT NOT NULL,"
    "  started_at TEXT, closed_at TEXT, committed_at TEXT NOT NULL,"
    "  offered INTEGER NOT NULL DEFAULT 0,"
    "  participants INTEGER NOT NULL DEFAULT 0,"
    "  total_examples INTEGER NOT NULL DEFAULT 0,"
    "  mean_train_loss REAL,"
    "  duration_s REAL,"
    "  close_reason TEXT,"
    "  checkpoint TEXT NOT NULL,"
    "  sha256 TEXT NOT NULL);"
    "CREATE TABLE IF NOT EXISTS participation("
    "  round INTEGER NOT NULL REFERENCES rounds(round),"
    "  client INTEGER NOT NULL REFERENCES clients(id),"
    "  status TEXT NOT NULL CHECK (status IN ('accepted','declined','dropped','rejected')),"
    "  num_examples INTEGER,"
    "  weight REAL,"
    "  train_loss REAL,"
    "  bytes INTEGER,"
    "  duration_s REAL,"
    "  reason TEXT,"
    "  PRIMARY KEY (round, client));"
    "CREATE INDEX IF NOT EXISTS participation_client ON participation(client, round);"
    /* Evaluation reports: metrics of the global model after `round`, per evaluator. */
    "CREATE TABLE IF NOT EXISTS eval_metrics("
    "  round INTEGER NOT NULL,"
    "  client INTEGER NOT NULL REFERENCES clients(id),"
    "  name TEXT NOT NULL,"
    "  value REAL,"
    "  reported_at TEXT NOT NULL,"
    "  PRIMARY KEY (round, client, name));";

static int fail(char *err, size_t errlen, sqlite3 *db, const char *what)
{
    snprintf(err, errlen, "%s: %s", what, db ? sqlite3_errmsg(db) : "cannot open");
    return COHORT_ESTORE;
}

int pstore_open(struct pstore **out, const char *path, char *err, size_t errlen)
{
    struct pstore *p = calloc(1, sizeof *p);
    if (!p)
        return COHORT_ENOMEM;
    int rc = sqlite3_open_v2(path, &p->db,
                             SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                             NULL);
    if (rc != SQLITE_OK) {
        fail(err, errlen, p->db, path);
        goto bad;
    }
    sqlite3_busy_timeout(p->db, 5000);
    /* WAL keeps readers (operators, the CLI) from blocking commits; synchronous
     * FULL makes every committed round survive power loss. */
    if (sqlite3_exec(p->db,
                     "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;",
                     NULL, NULL, NULL) != SQLITE_OK ||
        sqlite3_exec(p->db, schema, NULL, NULL, NULL) != SQLITE_OK) {
        fail(err, errlen, p->db, path);
        goto bad;
    }
    char ver[16] = "";
    pstore_meta_get(p, "schema_version", ver, sizeof ver);
    if (ver[0] && strcmp(ver, SCHEMA_VERSION) != 0) {
        snprintf(err, errlen, "%s: schema version %s, this cohortd knows %s", path, ver,
                 SCHEMA_VERSION);
        goto bad;
    }
    if (!ver[0])
        pstore_meta_set(p, "schema_version", SCHEMA_VERSION);
    /* clients.role came after schema 1 shipped; added in place, older rows are trainers. */
    sqlite3_stmt *probe = NULL;
    if (sqlite3_prepare_v2(p->db, "SELECT role FROM clients LIMIT 0", -1, &probe, NULL) !=
        SQLITE_OK) {
        if (sqlite3_exec(p->db, "ALTER TABLE clients ADD COLUMN role TEXT NOT NULL DEFAULT "
                         "'trainer'", NULL, NULL, NULL) != SQLITE_OK) {
            sqlite3_finalize(probe);
            fail(err, errlen, p->db, "adding clients.role");
            goto bad;
        }
    }
    sqlite3_finalize(probe);
    if (sqlite3_prepare_v2(p->db,
                           "INSERT INTO clients(name, first_seen, last_seen, num_examples, connects,"
                           " role) VALUES(?1, ?2, ?2, ?3, 1, ?4) ON CONFLICT(name) DO UPDATE SET"
                           " last_seen=?2, num_examples=?3, connects=connects+1, role=?4",
                           -1, &p->client_upsert, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(p->db, "SELECT id FROM clients WHERE name=?1", -1, &p->client_id,
                           NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(p->db,
                           "INSERT INTO rounds(round, strategy, started_at, closed_at, "
                           "committed_at, offered, participants, total_examples, mean_train_loss,"
                           " duration_s, close_reason, checkpoint, sha256)"
                           " VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13)",
                           -1, &p->round_ins, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(p->db,
                           "INSERT INTO participation(round, client, status, num_examples, weight,"
                           " train_loss, bytes, duration_s, reason)"
                           " VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9)",
                           -1, &p->part_ins, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(p->db,
                           "INSERT OR REPLACE INTO eval_metrics(round, client, name, value, "
                           "reported_at) VALUES(?1,?2,?3,?4,?5)",
                           -1, &p->eval_ins, NULL) != SQLITE_OK) {
        fail(err, errlen, p->db, "preparing statements");
        goto bad;
    }
    *out = p;
    return 0;
bad:
    pstore_close(p);
    return COHORT_ESTORE;
}

void pstore_close(struct pstore *p)
{
    if (!p)
        return;
    sqlite3_finalize(p->client_upsert);
    sqlite3_finalize(p->client_id);
    sqlite3_finalize(p->round_ins);
    sqlite3_finalize(p->part_ins);
    sqlite3_finalize(p->eval_ins);
    sqlite3_close(p->db);
    free(p);
}

sqlite3 *pstore_db(struct pstore *p)
{
    return p->db;
}

void pstore_set_durable(struct pstore *p, int durable)
{
    sqlite3_exec(p->db, durable ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL", NULL,
                 NULL, NULL);
}

int pstore_client_seen(struct pstore *p, const char *name, uint64_t num_examples, int64_t *id)
{
    return pstore_client_seen_role(p, name, "trainer", num_examples, id);
}

int pstore_client_seen_role(struct pstore *p, const char *name, const char *role,
                            uint64_t num_examples, int64_t *id)
{
    char now[32];
    server_iso_now(now, sizeof now);
    sqlite3_reset(p->client_upsert);
    sqlite3_bind_text(p->client_upsert, 1, name, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(p->client_upsert, 2, now, -1, SQLITE_TRANSIENT);
    sqlite3_bind_int64(p->client_upsert, 3, (sqlite3_int64)num_examples);
    sqlite3_bind_text(p->client_upsert, 4, role, -1, SQLITE_TRANSIENT);
    if (sqlite3_step(p->client_upsert) != SQLITE_DONE) {
        coh_err("pstore", "registering client %s: %s", name, sqlite3_errmsg(p->db));
        return COHORT_ESTORE;
    }
    sqlite3_reset(p->client_id);
    sqlite3_bind_text(p->client_id, 1, name, -1, SQLITE_TRANSIENT);
    if (sqlite3_step(p->client_id) != SQLITE_ROW)
        return COHORT_ESTORE;
    *id = sqlite3_column_int64(p->client_id, 0);
    sqlite3_reset(p->client_id);
    return 0;
}

int pstore_count_clients(struct pstore *p, uint64_t *n)
{
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(p->db, "SELECT count(*) FROM clients WHERE role='trainer'", -1,
                           &st, NULL) != SQLITE_OK)
        return COHORT_ESTORE;
    int rc = COHORT_ESTORE;
    if (sqlite3_step(st) == SQLITE_ROW) {
        *n = (uint64_t)sqlite3_column_int64(st, 0);
        rc = 0;
    }
    sqlite3_finalize(st);
    return rc;
}

int pstore_client_name(struct pstore *p, int64_t id, char *buf, size_t len)
{
    sqlite3_stmt *st;
    buf[0] = '\0';
    if (sqlite3_prepare_v2(p->db, "SELECT name FROM clients WHERE id=?1", -1, &st, NULL) !=
        SQLITE_OK)
        return COHORT_ESTORE;
    sqlite3_bind_int64(st, 1, id);
    if (sqlite3_step(st) == SQLITE_ROW)
        snprintf(buf, len, "%s", (const char *)sqlite3_column_text(st, 0));
    sqlite3_finalize(st);
    return 0;
}

int pstore_last_round(struct pstore *p, struct pstore_last *out)
{
    memset(out, 0, sizeof *out);
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(p->db,
                           "SELECT round, checkpoint, sha256 FROM rounds ORDER BY round DESC "
                           "LIMIT 1",
                           -1, &st, NULL) != SQLITE_OK)
        return COHORT_ESTORE;
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        out->found = 1;
        out->round = (uint64_t)sqlite3_column_int64(st, 0);
        snprintf(out->checkpoint, sizeof out->checkpoint, "%s",
                 (const char *)sqlite3_column_text(st, 1));
        snprintf(out->sha256, sizeof out->sha256, "%s", (const char *)sqlite3_column_text(st, 2));
        rc = SQLITE_DONE;
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : COHORT_ESTORE;
}

int pstore_commit_round(struct pstore *p, const struct pstore_round *r, const struct part *parts,
                        size_t nparts, int (*extra)(sqlite3 *db, void *arg), void *extra_arg)
{
    char now[32];
    server_iso_now(now, sizeof now);
    if (sqlite3_exec(p->db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
        coh_err("pstore", "begin round %llu: %s", (unsigned long long)r->round,
                sqlite3_errmsg(p->db));
        return COHORT_ESTORE;
    }
    sqlite3_stmt *st = p->round_ins;
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    sqlite3_bind_int64(st, 1, (sqlite3_int64)r->round);
    sqlite3_bind_text(st, 2, r->strategy, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 3, r->started_at, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 4, r->closed_at, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 5, now, -1, SQLITE_TRANSIENT);
    sqlite3_bind_int64(st, 6, r->offered);
    sqlite3_bind_int64(st, 7, r->participants);
    sqlite3_bind_int64(st, 8, (sqlite3_int64)r->total_examples);
    if (isfinite(r->mean_train_loss))
        sqlite3_bind_double(st, 9, r->mean_train_loss);
    sqlite3_bind_double(st, 10, r->duration_s);
    sqlite3_bind_text(st, 11, r->close_reason, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 12, r->checkpoint, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 13, r->sha256, -1, SQLITE_TRANSIENT);
    if (sqlite3_step(st) != SQLITE_DONE)
        goto bad;
    for (size_t i = 0; i < nparts; i++) {
        const struct part *pt = &parts[i];
        st = p->part_ins;
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
        sqlite3_bind_int64(st, 1, (sqlite3_int64)r->round);
        sqlite3_bind_int64(st, 2, pt->client_id);
        /* The store keeps the outcome labels the metrics use, so both count alike. */
        sqlite3_bind_text(st, 3, metrics_part_result(pt), -1, SQLITE_STATIC);
        if (pt->status == PART_ACCEPTED || pt->status == PART_REJECTED)
            sqlite3_bind_int64(st, 4, (sqlite3_int64)pt->num_examples);
        if (pt->status == PART_ACCEPTED)
            sqlite3_bind_double(st, 5, pt->weight);
        if (isfinite(pt->train_loss))
            sqlite3_bind_double(st, 6, pt->train_loss);
        sqlite3_bind_int64(st, 7, (sqlite3_int64)pt->bytes);
        if (pt->finished > 0)
            sqlite3_bind_double(st, 8, pt->finished - pt->started);
        if (pt->reason[0])
            sqlite3_bind_text(st, 9, pt->reason, -1, SQLITE_TRANSIENT);
        if (sqlite3_step(st) != SQLITE_DONE)
            goto bad;
    }
    if (extra && extra(p->db, extra_arg) < 0)
        goto bad;
    if (sqlite3_exec(p->db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK)
        goto bad;
    return 0;
bad:
    coh_err("pstore", "committing round %llu failed: %s; rolled back",
            (unsigned long long)r->round, sqlite3_errmsg(p->db));
    sqlite3_exec(p->db, "ROLLBACK", NULL, NULL, NULL);
    return COHORT_ESTORE;
}

int pstore_meta_get(struct pstore *p, const char *key, char *buf, size_t len)
{
    sqlite3_stmt *st;
    buf[0] = '\0';
    if (sqlite3_prepare_v2(p->db, "SELECT value FROM meta WHERE key=?1", -1, &st, NULL) !=
        SQLITE_OK)
        return COHORT_ESTORE;
    sqlite3_bind_text(st, 1, key, -1, SQLITE_TRANSIENT);
    int found = 0;
    if (sqlite3_step(st) == SQLITE_ROW) {
        snprintf(buf, len, "%s", (const char *)sqlite3_column_text(st, 0));
        found = 1;
    }
    sqlite3_finalize(st);
    return found;
}

int pstore_meta_set(struct pstore *p, const char *key, const char *value)
{
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(p->db, "INSERT OR REPLACE INTO meta(key, value) VALUES(?1, ?2)", -1,
                           &st, NULL) != SQLITE_OK)
        return COHORT_ESTORE;
    sqlite3_bind_text(st, 1, key, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 2, value, -1, SQLITE_TRANSIENT);
    int rc = sqlite3_step(st) == SQLITE_DONE ? 0 : COHORT_ESTORE;
    sqlite3_finalize(st);
    return rc;
}

int pstore_eval_record(struct pstore *p, uint64_t round, int64_t client_id,
                       const char *const *names, const double *values, size_t n)
{
    char now[32];
    server_iso_now(now, sizeof now);
    if (sqlite3_exec(p->db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK)
        goto bad;
    for (size_t i = 0; i < n; i++) {
        sqlite3_stmt *st = p->eval_ins;
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
        sqlite3_bind_int64(st, 1, (sqlite3_int64)round);
        sqlite3_bind_int64(st, 2, client_id);
        sqlite3_bind_text(st, 3, names[i], -1, SQLITE_TRANSIENT);
        if (isfinite(values[i]))
            sqlite3_bind_double(st, 4, values[i]);
        sqlite3_bind_text(st, 5, now, -1, SQLITE_TRANSIENT);
        if (sqlite3_step(st) != SQLITE_DONE)
            goto bad;
    }
    if (sqlite3_exec(p->db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK)
        goto bad;
    return 0;
bad:
    coh_err("pstore", "recording the evaluation of round %llu failed: %s",
            (unsigned long long)round, sqlite3_errmsg(p->db));
    sqlite3_exec(p->db, "ROLLBACK", NULL, NULL, NULL);
    return COHORT_ESTORE;
}
