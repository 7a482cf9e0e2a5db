/*
 * Fashion-MNIST models on OpenBLAS: softmax regression (784 -> 10) and an MLP
 * 784 -> H (ReLU) -> 10, trained by plain minibatch SGD on cross-entropy.
 *
 * Parameters live in a struct coh_model laid out like PyTorch nn.Linear
 * state_dicts (weight [out, in] row-major, then bias [out]):
 *   softmax: fc.weight [10,784], fc.bias [10]
 *   MLP:     fc1.weight [H,784], fc1.bias [H], fc2.weight [10,H], fc2.bias [10]
 * The architecture is always read back from the tensors (nn_detect), so a model
 * received from the server trains without further configuration.
 *
 * Threads: no global mutable state. Each call allocates its own workspace (one
 * block, freed before returning), so trainers may run concurrently on different
 * models, sharing one read-only dataset. (Whether OpenBLAS itself spawns threads
 * is up to the process: OPENBLAS_NUM_THREADS or openblas_set_num_threads().)
 *
 * Errors: 0 on success, negative on failure (-EINVAL for bad arguments or a model
 * of unexpected layout, -ENOMEM), with a one-line message written into err when
 * err is not NULL and errlen > 0.
 */
#ifndef COH_NN_H
#define COH_NN_H

#include <stddef.h>
#include <stdint.h>

#include "../../common/model.h"
#include "fmnist.h"

struct coh_rng;

#define NN_INPUTS FMNIST_PIXELS
#define NN_CLASSES FMNIST_CLASSES
#define NN_DEFAULT_HIDDEN 128
#define NN_MAX_HIDDEN 65536

enum nn_kind {
    NN_SOFTMAX = 1,
    NN_MLP = 2,
};

struct nn_arch {
    enum nn_kind kind;
    int hidden;                     /* H for NN_MLP, 0 for NN_SOFTMAX */
};

/*
 * Builds a fresh model for arch "softmax", "mlp" (H = NN_DEFAULT_HIDDEN) or
 * "mlp:H" (1 <= H <= NN_MAX_HIDDEN). m may be uninitialised: it is overwritten
 * without being freed (on failure it is left empty, as after coh_model_init).
 * Softmax: all zeros. MLP: weights Kaiming-normal, std sqrt(2/fan_in), drawn with
 * coh_rng_normal from coh_rng seeded with seed, fc1.weight row-major first, then
 * fc2.weight; biases zero. Same seed, same model.
 */
int nn_init_model(struct coh_model *m, const char *arch, uint64_t seed, char *err,
                  size_t errlen);

/* Architecture of m from its tensors; -EINVAL naming what was expected otherwise. */
int nn_detect(const struct coh_model *m, struct nn_arch *arch, char *err, size_t errlen);

/* "softmax" or "mlp:H" into buf (the string nn_init_model accepts). */
void nn_arch_name(const struct nn_arch *arch, char *buf, size_t len);

struct nn_train_cfg {
    int local_steps;                /* >= 0 */
    int batch;                      /* >= 1 */
    float lr;                       /* finite */
};

/*
 * local_steps steps of SGD on m over the examples d[idx[0..nidx)]. Each step
 * draws `batch` positions with coh_rng_below(rng, nidx) (with replacement, in
 * order), so exactly local_steps * batch draws are taken from rng and the
 * minibatches are a function of rng's state. Loss: mean cross-entropy of the
 * minibatch (stable log-softmax); *mean_loss = mean of the per-step losses,
 * measured before each step's update. nidx == 0 or local_steps == 0: m and rng
 * untouched, *mean_loss = 0. On error m and rng are untouched. A diverging run
 * is not an error: *mean_loss may then be non-finite, and so may m (check with
 * coh_model_all_finite).
 */
int nn_train(struct coh_model *m, const struct fmnist *d, const uint32_t *idx, size_t nidx,
             const struct nn_train_cfg *cfg, struct coh_rng *rng, double *mean_loss, char *err,
             size_t errlen);

/*
 * Accuracy (fraction of argmax hits, ties to the lower class) and mean
 * cross-entropy of m over all of d, in blocks of up to 1000 rows.
 */
int nn_eval(const struct coh_model *m, const struct fmnist *d, double *accuracy, double *loss,
            char *err, size_t errlen);

/*
 * Mean cross-entropy over the rows d[batch[0..nbatch)] (repeats count each time)
 * into *loss and its gradient into grad, which must have m's layout (e.g. from
 * coh_model_clone(grad, m, 0)). For tests and for algorithms that need raw
 * gradients; m is not changed.
 */
int nn_loss_grad(const struct coh_model *m, const struct fmnist *d, const uint32_t *batch,
                 size_t nbatch, struct coh_model *grad, double *loss, char *err, size_t errlen);

#endif
