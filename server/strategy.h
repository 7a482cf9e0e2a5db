/*
 * Aggregation strategies (DESIGN.md §6): a small vtable, one file each under
 * server/strategies/. Every strategy here is written in update form and folds
 * streaming: the round manager folds each accepted update as
 *     acc += weight(client) * delta
 * on the thread pool, and at the end the new model is
 *     x_{t+1} = x_t + server_lr * acc / divisor
 * where finalize() chooses the divisor (and so the applied weight
 * weight/divisor recorded per participant). All callbacks run on the loop thread.
 */
#ifndef STRATEGY_H
#define STRATEGY_H

#include <sqlite3.h>
#include <stddef.h>
#include <stdint.h>

struct config;
struct pstore;
struct part;

struct round_ctx {
    uint64_t round;
    struct part *parts;         /* every client offered the round, final statuses */
    size_t nparts;
    struct pstore *store;
    const struct config *cfg;
};

struct strategy_ops {
    const char *name;
    int (*create)(void **state, const struct config *cfg, struct pstore *store, char *err,
                  size_t errlen);
    void (*destroy)(void *state);
    /* Per-round set-up; may read persisted state. */
    int (*begin_round)(void *state, struct round_ctx *ctx);
    /* Raw fold weight of one update (client id from the store). */
    double (*weight)(void *state, struct round_ctx *ctx, int64_t client_id, uint64_t num_examples);
    /* Divisor for the accumulated sum; only called with at least one accepted update. */
    int (*finalize)(void *state, struct round_ctx *ctx, double *divisor);
    /* Persists per-client state inside the round's transaction (may be NULL). */
    int (*commit)(void *state, struct round_ctx *ctx, sqlite3 *db);
    /* 1: the participation row's weight column records the raw weight (FedAU's
     * omega); 0: the applied fraction weight/divisor (FedAvg's a_n). */
    int weight_is_raw;
};

struct strategy {
    const struct strategy_ops *ops;
    void *state;
};

/* Looks the strategy up by cfg->strategy and creates it. */
int strategy_create(struct strategy *out, const struct config *cfg, struct pstore *store,
                    char *err, size_t errlen);
void strategy_destroy(struct strategy *s);
/* "fedavg, fedau" for help texts. */
const char *strategy_names(void);

extern const struct strategy_ops strategy_fedavg;
extern const struct strategy_ops strategy_fedau;

#endif
