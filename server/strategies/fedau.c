/*
 * FedAU: adaptive weighting for unknown participation (algorithms.md).
 *     x_{t+1} = x_t + (eta / N) * sum_{n in S_t} omega_n * delta_n
 * N is the number of clients registered in the store when the round is
 * finalized (every client that ever completed Hello), not |S_t|. omega_n comes
 * from rounds before t only: the per-client state (M, S, Omega) is loaded at
 * begin_round and written back in the round's own transaction, so a restarted
 * server continues with identical weights. Every registered client is stepped
 * after every round: accepted = participated; declined, dropped, rejected or
 * not connected = absent. Loop thread.
 */
#include "fedau.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cohort_err.h"
#include "idmap.h"
#include "log.h"
#include "pstore.h"
#include "server.h"
#include "strategy.h"

struct fedau {
    int64_t cutoff;             /* 0 = unlimited */
    struct idmap state;         /* client id -> struct fedau_client* (as of the last commit) */
    int64_t *registered;        /* client ids counted in N, fixed at finalize */
    size_t nregistered;
};

static const char *schema =
    "CREATE TABLE IF NOT EXISTS fedau_state("
    "  client INTEGER PRIMARY KEY REFERENCES clients(id),"
    "  intervals INTEGER NOT NULL,"
    "  current INTEGER NOT NULL,"
    "  omega REAL NOT NULL,"
    "  round INTEGER NOT NULL)";

static void clear_state(struct fedau *f)
{
    for (size_t i = 0; i < f->state.cap; i++)
        if (f->state.slots[i].key)
            free(f->state.slots[i].val);
    idmap_fini(&f->state);
    idmap_init(&f->state);
}

static int load(struct fedau *f, sqlite3 *db)
{
    clear_state(f);
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db, "SELECT client, intervals, current, omega FROM fedau_state", -1,
                           &st, NULL) != SQLITE_OK)
        return COHORT_ESTORE;
    int rc = 0;
    while (sqlite3_step(st) == SQLITE_ROW) {
        struct fedau_client *c = malloc(sizeof *c);
        if (!c) {
            rc = COHORT_ENOMEM;
            break;
        }
        c->m = sqlite3_column_int64(st, 1);
        c->s = sqlite3_column_int64(st, 2);
        c->omega = sqlite3_column_double(st, 3);
        if (idmap_put(&f->state, (uint64_t)sqlite3_column_int64(st, 0), c) < 0) {
            free(c);
            rc = COHORT_ENOMEM;
            break;
        }
    }
    sqlite3_finalize(st);
    return rc;
}

static int create(void **state, const struct config *cfg, struct pstore *store, char *err,
                  size_t errlen)
{
    struct fedau *f = calloc(1, sizeof *f);
    if (!f)
        return COHORT_ENOMEM;
    f->cutoff = (int64_t)cfg->fedau_cutoff;
    idmap_init(&f->state);
    if (store) {
        char *msg = NULL;
        if (sqlite3_exec(pstore_db(store), schema, NULL, NULL, &msg) != SQLITE_OK) {
            snprintf(err, errlen, "fedau: creating its table: %s", msg ? msg : "?");
            sqlite3_free(msg);
            free(f);
            return COHORT_ESTORE;
        }
    }
    *state = f;
    return 0;
}

static void destroy(void *state)
{
    struct fedau *f = state;
    if (!f)
        return;
    clear_state(f);
    idmap_fini(&f->state);
    free(f->registered);
    free(f);
}

static int begin_round(void *state, struct round_ctx *ctx)
{
    return load(state, pstore_db(ctx->store));
}

static double weight(void *state, struct round_ctx *ctx, int64_t client_id, uint64_t num_examples)
{
    struct fedau *f = state;
    const struct fedau_client *c = idmap_get(&f->state, (uint64_t)client_id);
    if (!c)
        return 1.0;
    return fedau_weight(c);
}

/* Fixes the registered set N of this round. */
static int snapshot_registered(struct fedau *f, struct pstore *store)
{
    free(f->registered);
    f->registered = NULL;
    f->nregistered = 0;
    uint64_t n = 0;
    if (pstore_count_clients(store, &n) < 0)
        return COHORT_ESTORE;
    f->registered = malloc((n ? n : 1) * sizeof *f->registered);
    if (!f->registered)
        return COHORT_ENOMEM;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(pstore_db(store), "SELECT id FROM clients WHERE role='trainer' ORDER BY id",
                           -1, &st, NULL) != SQLITE_OK)
        return COHORT_ESTORE;
    while (sqlite3_step(st) == SQLITE_ROW && f->nregistered < n)
        f->registered[f->nregistered++] = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return 0;
}

static int finalize(void *state, struct round_ctx *ctx, double *divisor)
{
    struct fedau *f = state;
    int rc = snapshot_registered(f, ctx->store);
    if (rc < 0)
        return rc;
    *divisor = f->nregistered ? (double)f->nregistered : 1.0;
    return 0;
}

static int accepted_in(const struct round_ctx *ctx, int64_t id)
{
    for (size_t i = 0; i < ctx->nparts; i++)
        if (ctx->parts[i].client_id == id)
            return ctx->parts[i].status == PART_ACCEPTED;
    return 0;
}

static int commit(void *state, struct round_ctx *ctx, sqlite3 *db)
{
    struct fedau *f = state;
    /* An empty round skips finalize; its registered set is taken here. */
    if (!f->registered) {
        int rc = snapshot_registered(f, ctx->store);
        if (rc < 0)
            return rc;
    }
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db,
                           "INSERT OR REPLACE INTO fedau_state(client, intervals, current, omega,"
                           " round) VALUES(?1, ?2, ?3, ?4, ?5)",
                           -1, &st, NULL) != SQLITE_OK)
        return COHORT_ESTORE;
    int rc = 0;
    for (size_t i = 0; i < f->nregistered; i++) {
        int64_t id = f->registered[i];
        struct fedau_client c = {0, 0, 0.0};
        const struct fedau_client *old = idmap_get(&f->state, (uint64_t)id);
        if (old)
            c = *old;
        fedau_step(&c, accepted_in(ctx, id), f->cutoff);
        sqlite3_reset(st);
        sqlite3_bind_int64(st, 1, id);
        sqlite3_bind_int64(st, 2, c.m);
        sqlite3_bind_int64(st, 3, c.s);
        sqlite3_bind_double(st, 4, c.omega);
        sqlite3_bind_int64(st, 5, (sqlite3_int64)ctx->round);
        if (sqlite3_step(st) != SQLITE_DONE) {
            rc = COHORT_ESTORE;
            break;
        }
    }
    sqlite3_finalize(st);
    free(f->registered);
    f->registered = NULL;
    f->nregistered = 0;
    return rc;
}

const struct strategy_ops strategy_fedau = {
    .name = "fedau",
    .create = create,
    .destroy = destroy,
    .begin_round = begin_round,
    .weight = weight,
    .finalize = finalize,
    .commit = commit,
    .weight_is_raw = 1,
};
