/*
 * The arithmetic of streaming aggregation, kept apart from the loop so it can
 * be tested and benchmarked alone. Any thread; the caller owns the buffers.
 */
#ifndef FOLD_H
#define FOLD_H

#include <stddef.h>

/* acc += w * delta */
void fold_accumulate(float *acc, const float *delta, size_t n, float w);
/* acc = w * delta: the round's first fold, so the accumulator needs no zeroing
 * (whatever acc held before, NaN included, is overwritten). */
void fold_set(float *acc, const float *delta, size_t n, float w);
/* x += scale * acc  (scale = server_lr / divisor) */
void fold_apply(float *x, const float *acc, size_t n, float scale);
/* Index of the first element where acc + w * delta (w * delta when first: acc
 * is then not read) is not finite, n when there is none. */
size_t fold_first_overflow(const float *acc, const float *delta, size_t n, float w, int first);
/* u -= x: an update sent as trained weights made a difference (in float32, as
 * the client would have computed it). */
void fold_weights_to_delta(float *u, const float *x, size_t n);
/* acc = x + scale * acc: the next model computed in the accumulator's place. */
void fold_apply_into(float *acc, const float *x, size_t n, float scale);

#endif
