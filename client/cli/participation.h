/*
 * Participation patterns (algorithms.md): whether a client takes part in the
 * round it was just offered. Each client owns one sampler seeded by itself, so
 * identical seeds give identical participation draws whatever the strategy.
 * Pure code, any thread (one sampler per thread).
 */
#ifndef COH_PARTICIPATION_H
#define COH_PARTICIPATION_H

#include <stddef.h>
#include <stdint.h>

#include "rng.h"

enum participation_kind { PATTERN_ALWAYS = 0, PATTERN_BERNOULLI, PATTERN_MARKOV, PATTERN_CYCLIC };

struct participation_spec {
    int kind;
    double p;           /* target participation probability (bernoulli/markov/cyclic) */
    double a;           /* markov: P(inactive -> active), default 0.05 */
    int period;         /* cyclic: L, default 100 */
    int p_given;        /* 1 when the spec string fixed p; the simulator may override p otherwise */
};

struct participation {
    struct participation_spec spec;
    struct coh_rng rng;
    int active;
    int countdown;      /* cyclic: rounds left in the current phase */
    int on, off;        /* cyclic: A and B */
    double a, b;        /* markov transition probabilities after clamping */
    int started;
};

/* "always", "bernoulli:P", "markov:P[:A]", "cyclic:P[:L]"; P in (0, 1].
 * Returns 0 or -1 with a sentence in err. */
int participation_parse(const char *s, struct participation_spec *out, char *err, size_t errlen);
/* Sets up a sampler; p overrides spec->p when >= 0 (per-client probabilities). */
void participation_init(struct participation *pt, const struct participation_spec *spec, double p,
                        uint64_t seed);
/* Advances one round; returns 1 when the client takes part. */
int participation_next(struct participation *pt);

#endif
