/*
 * The arithmetic of streaming aggregation, kept apart from the loop so it can
 * be tested and benchmarked alone. Any thread; the caller owns the buffers.
 */
#ifndef FOLD_H
#define FOLD_H

#include <stddef.h>

/* acc += w * delta */
void fold_accumulate(float *acc, const float *delta, size_t n, float w);
/* x += scale * acc  (scale = server_lr / divisor) */
void fold_apply(float *x, const float *acc, size_t n, float scale);

#endif
