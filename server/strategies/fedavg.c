/*
 * FedAvg (McMahan et al. 2017) in update form:
 *     x_{t+1} = x_t + eta * sum_{n in S_t} a_n * delta_n
 * weighting "examples": a_n = n_n / sum n_j;  "uniform": a_n = 1/|S_t|;
 * "all": a_n = 1/N with N the clients registered in the store.
 * Keeps no per-client state. Loop thread.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cohort_err.h"
#include "pstore.h"
#include "server.h"
#include "strategy.h"

enum weighting { W_EXAMPLES, W_UNIFORM, W_ALL };

struct fedavg {
    int weighting;
};

static int create(void **state, const struct config *cfg, struct pstore *store, char *err,
                  size_t errlen)
{
    struct fedavg *f = calloc(1, sizeof *f);
    if (!f)
        return COHORT_ENOMEM;
    const char *w = cfg->weighting ? cfg->weighting : "examples";
    if (strcmp(w, "examples") == 0)
        f->weighting = W_EXAMPLES;
    else if (strcmp(w, "uniform") == 0)
        f->weighting = W_UNIFORM;
    else if (strcmp(w, "all") == 0)
        f->weighting = W_ALL;
    else {
        snprintf(err, errlen, "--weighting must be examples, uniform or all (got '%s')", w);
        free(f);
        return COHORT_EINVAL;
    }
    *state = f;
    return 0;
}

static void destroy(void *state)
{
    free(state);
}

static double weight(void *state, struct round_ctx *ctx, int64_t client_id, uint64_t num_examples)
{
    struct fedavg *f = state;
    return f->weighting == W_EXAMPLES ? (double)num_examples : 1.0;
}

static int finalize(void *state, struct round_ctx *ctx, double *divisor)
{
    struct fedavg *f = state;
    if (f->weighting == W_ALL) {
        uint64_t n = 0;
        int rc = pstore_count_clients(ctx->store, &n);
        if (rc < 0)
            return rc;
        *divisor = n ? (double)n : 1.0;
        return 0;
    }
    double sum = 0;
    for (size_t i = 0; i < ctx->nparts; i++)
        if (ctx->parts[i].status == PART_ACCEPTED)
            sum += ctx->parts[i].raw_weight;
    *divisor = sum > 0 ? sum : 1.0;
    return 0;
}

const struct strategy_ops strategy_fedavg = {
    .name = "fedavg",
    .create = create,
    .destroy = destroy,
    .begin_round = NULL,
    .weight = weight,
    .finalize = finalize,
    .commit = NULL,
};
