/*
 * FedAU interval bookkeeping (Wang & Ji, ICLR 2024; algorithms.md), exposed for
 * the strategy and its tests. Pure functions.
 */
#ifndef FEDAU_H
#define FEDAU_H

#include <stdint.h>

struct fedau_client {
    int64_t m;          /* completed intervals */
    int64_t s;          /* length of the current interval so far */
    double omega;       /* mean of completed interval lengths */
};

/* Weight for the coming round, from past rounds only: omega once an interval
 * has closed, 1 before. */
static inline double fedau_weight(const struct fedau_client *c)
{
    return c->m > 0 ? c->omega : 1.0;
}

/* After a round: participated closes an interval of S+1; absent grows S and,
 * with a cutoff K > 0, closes an interval of K when S reaches K. */
static inline void fedau_step(struct fedau_client *c, int participated, int64_t cutoff)
{
    int64_t len = 0;
    if (participated) {
        len = c->s + 1;
    } else {
        c->s++;
        if (cutoff > 0 && c->s >= cutoff)
            len = cutoff;
    }
    if (len > 0) {
        c->omega = ((double)c->m * c->omega + (double)len) / (double)(c->m + 1);
        c->m++;
        c->s = 0;
    }
}

#endif
