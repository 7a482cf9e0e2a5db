/*
 * A model: an ordered list of named float32 tensors laid out contiguously in one
 * buffer. The order is part of the protocol (the tensor table travels first), so
 * two models are compatible only when names, shapes and order all match.
 * Plain data, no threads of its own; any thread may use a model it owns.
 */
#ifndef COH_MODEL_H
#define COH_MODEL_H

#include <stddef.h>
#include <stdint.h>

#define COH_MAX_DIMS 8
#define COH_MAX_NAME 255

struct coh_tensor {
    char *name;                     /* owned, NUL-terminated */
    int ndim;                       /* 0..COH_MAX_DIMS */
    uint64_t shape[COH_MAX_DIMS];
    size_t offset;                  /* index of the first element in model->data */
    size_t numel;                   /* product of shape (1 for a scalar) */
};

struct coh_model {
    size_t ntensors;
    struct coh_tensor *tensors;
    size_t numel;                   /* total number of floats */
    float *data;                    /* numel floats, 64-byte aligned, or NULL before alloc */
    int borrowed;                   /* data belongs to another owner: fini leaves it */
};

/* Empty model with no tensors. */
void coh_model_init(struct coh_model *m);
/* Frees names, tensor table and data (unless borrowed); leaves m empty. Safe on an empty model. */
void coh_model_fini(struct coh_model *m);
/* Appends a tensor to the table (before coh_model_alloc). Checks name length,
 * ndim and overflow of the element count. Returns 0 or COHORT_EINVAL/ENOMEM/ETOOBIG. */
int coh_model_add(struct coh_model *m, const char *name, int ndim, const uint64_t *shape);
/* Allocates zeroed data for the table (64-byte aligned). */
int coh_model_alloc(struct coh_model *m);
/* dst gets src's table and no data (NULL, numel set): the caller provides it. */
int coh_model_clone_table(struct coh_model *dst, const struct coh_model *src);
/* dst gets src's table and zeroed data (copy_data=0) or a copy of its data. */
int coh_model_clone(struct coh_model *dst, const struct coh_model *src, int copy_data);
/* 1 when both tables have the same names, shapes and order. */
int coh_model_same_layout(const struct coh_model *a, const struct coh_model *b);
/* Tensor by name or NULL. */
const struct coh_tensor *coh_model_find(const struct coh_model *m, const char *name);
/* Index of the first element of p[0..n) that is NaN or Inf, n when none is. */
size_t coh_first_nonfinite(const float *p, size_t n);
/* A bound on every |p[i]|, as the bits of a float: at least the largest and
 * less than 1 % above it (0 when n is 0). COH_NONFINITE_BITS or more exactly
 * when some element is NaN or Inf. One pass, faster than coh_first_nonfinite. */
#define COH_NONFINITE_BITS 0x7f800000u
uint32_t coh_abs_bound_bits(const float *p, size_t n);
/* 1 when every element is finite. */
int coh_model_all_finite(const struct coh_model *m);
/* "fc1.weight[128x784] fc1.bias[128] ..." into buf (for logs). */
void coh_model_describe(const struct coh_model *m, char *buf, size_t len);

#endif
