/* Participation samplers; see participation.h and algorithms.md. */
#include "participation.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int parse_num(const char *s, double *out)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s || (*end && *end != ':') || !isfinite(v))
        return -1;
    *out = v;
    return 0;
}

int participation_parse(const char *s, struct participation_spec *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    out->a = 0.05;
    out->period = 100;
    out->p = 1.0;
    const char *colon = strchr(s, ':');
    size_t klen = colon ? (size_t)(colon - s) : strlen(s);
    if (klen == 6 && strncmp(s, "always", 6) == 0 && !colon) {
        out->kind = PATTERN_ALWAYS;
        return 0;
    }
    if (klen == 9 && strncmp(s, "bernoulli", 9) == 0)
        out->kind = PATTERN_BERNOULLI;
    else if (klen == 6 && strncmp(s, "markov", 6) == 0)
        out->kind = PATTERN_MARKOV;
    else if (klen == 6 && strncmp(s, "cyclic", 6) == 0)
        out->kind = PATTERN_CYCLIC;
    else {
        snprintf(err, errlen, "participation pattern '%s' is not always, bernoulli:P, "
                              "markov:P[:A] or cyclic:P[:L]", s);
        return -1;
    }
    if (!colon) {
        out->p = 0.1; /* the simulator sets per-client p; a lone client needs one */
        return 0;
    }
    const char *p1 = colon + 1;
    if (parse_num(p1, &out->p) < 0 || !(out->p > 0 && out->p <= 1)) {
        snprintf(err, errlen, "participation probability in '%s' must be in (0, 1]", s);
        return -1;
    }
    out->p_given = 1;
    const char *c2 = strchr(p1, ':');
    if (c2) {
        double v;
        if (parse_num(c2 + 1, &v) < 0 || strchr(c2 + 1, ':')) {
            snprintf(err, errlen, "bad second parameter in '%s'", s);
            return -1;
        }
        if (out->kind == PATTERN_MARKOV) {
            if (!(v > 0 && v <= 1)) {
                snprintf(err, errlen, "markov A in '%s' must be in (0, 1]", s);
                return -1;
            }
            out->a = v;
        } else if (out->kind == PATTERN_CYCLIC) {
            if (v < 2 || v > 1e6 || floor(v) != v) {
                snprintf(err, errlen, "cyclic period L in '%s' must be an integer >= 2", s);
                return -1;
            }
            out->period = (int)v;
        } else {
            snprintf(err, errlen, "bernoulli takes one parameter ('%s')", s);
            return -1;
        }
    }
    return 0;
}

void participation_init(struct participation *pt, const struct participation_spec *spec, double p,
                        uint64_t seed)
{
    memset(pt, 0, sizeof *pt);
    pt->spec = *spec;
    if (p >= 0)
        pt->spec.p = p;
    coh_rng_seed(&pt->rng, seed);
    double pn = pt->spec.p;
    switch (pt->spec.kind) {
    case PATTERN_MARKOV:
        pt->a = pt->spec.a;
        pt->b = pt->a * (1.0 / pn - 1.0);
        if (pt->b > 1.0) {
            pt->a /= pt->b;
            pt->b = 1.0;
        }
        pt->active = coh_rng_uniform(&pt->rng) < pn;
        break;
    case PATTERN_CYCLIC: {
        int L = pt->spec.period;
        pt->on = (int)lround(L * pn);
        if (pt->on < 1)
            pt->on = 1;
        pt->off = L - pt->on;
        if (pt->off < 1)
            pt->off = 1;
        pt->active = 0;
        pt->countdown = (int)coh_rng_below(&pt->rng, (uint64_t)pt->off);
        break;
    }
    default:
        break;
    }
}

int participation_next(struct participation *pt)
{
    switch (pt->spec.kind) {
    case PATTERN_ALWAYS:
        return 1;
    case PATTERN_BERNOULLI:
        return coh_rng_uniform(&pt->rng) < pt->spec.p;
    case PATTERN_MARKOV: {
        double u = coh_rng_uniform(&pt->rng);
        if (pt->active)
            pt->active = !(u < pt->b);
        else
            pt->active = u < pt->a;
        return pt->active;
    }
    case PATTERN_CYCLIC:
        /* The countdown holds the rounds left in the current phase; at zero the
         * phase flips and the new phase's length starts counting. */
        if (pt->countdown <= 0) {
            pt->active = !pt->active;
            pt->countdown = pt->active ? pt->on : pt->off;
        }
        pt->countdown--;
        return pt->active;
    default:
        return 1;
    }
}
