/* Strategy registry; see strategy.h. */
#include "strategy.h"

#include <stdio.h>
#include <string.h>

#include "cohort_err.h"
#include "server.h"

static const struct strategy_ops *const all[] = {&strategy_fedavg, &strategy_fedau};

const char *strategy_names(void)
{
    return "fedavg, fedau";
}

int strategy_create(struct strategy *out, const struct config *cfg, struct pstore *store,
                    char *err, size_t errlen)
{
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        if (strcmp(all[i]->name, cfg->strategy) == 0) {
            out->ops = all[i];
            out->state = NULL;
            return all[i]->create ? all[i]->create(&out->state, cfg, store, err, errlen) : 0;
        }
    }
    snprintf(err, errlen, "unknown strategy '%s' (known: %s)", cfg->strategy, strategy_names());
    return COHORT_EINVAL;
}

void strategy_destroy(struct strategy *s)
{
    if (s->ops && s->ops->destroy)
        s->ops->destroy(s->state);
    s->ops = NULL;
    s->state = NULL;
}
