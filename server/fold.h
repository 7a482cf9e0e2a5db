/*
 * The arithmetic of streaming aggregation, kept apart from the loop so it can
 * be tested and benchmarked alone. Any thread; the caller owns the buffers.
 */
#ifndef FOLD_H
#define FOLD_H

#include <stddef.h>
#include <stdint.h>

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
 * the client would have computed it). Returns coh_abs_bound_bits of the result. */
uint32_t fold_weights_to_delta(float *u, const float *x, size_t n);
/* acc = w * delta (first) or acc += w * delta, unless an element of the result
 * would not be finite: then nothing is written and the index of the first such
 * element is returned (n when the fold was done).
 *
 * dmax_bits bounds max |delta| (coh_abs_bound_bits); *bound is a bound on max |acc| (not
 * read when first) and is updated after a fold. When the bound shows the
 * result finite, the element-by-element check (a pass over acc and delta,
 * longer than the fold itself) is skipped; the bound is then (A + |w| D)
 * widened by more than two roundings. After a check was needed it becomes
 * infinite, and the rest of the round's folds are checked element by element. */
size_t fold_checked(float *acc, const float *delta, size_t n, float w, int first,
                    uint32_t dmax_bits, double *bound);
/* acc = x + scale * acc: the next model computed in the accumulator's place. */
void fold_apply_into(float *acc, const float *x, size_t n, float scale);

#endif
