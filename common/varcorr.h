/*
 * Variance-corrected averaging (Tian et al. 2024, algorithms.md): after
 * averaging, each weight tensor is rescaled around its own mean so that its
 * population variance equals a target (the mean of the averaged models'
 * variances). Used by cohortd after any averaging strategy and by gossip merges.
 * Pure functions, any thread; plain loops so common/ needs no BLAS.
 */
#ifndef COH_VARCORR_H
#define COH_VARCORR_H

#include <stddef.h>

#include "model.h"

#define COH_VC_EPS 1e-12

/* Mean and population variance of x + delta (delta may be NULL), in double. */
void coh_vc_moments(const float *x, const float *delta, size_t n, double *mean, double *var);
/* Rescales w around its mean so its variance becomes target:
 * w = mu + (w - mu) * sqrt((target + eps) / (s2 + eps)). */
void coh_vc_rescale(float *w, size_t n, double target, double eps);
/* Tensors that get corrected: 2 or more dimensions, or any when include_1d. */
int coh_vc_eligible(const struct coh_tensor *t, int include_1d);

#endif
