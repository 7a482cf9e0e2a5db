/*
 * Softmax regression and a one-hidden-layer MLP for Fashion-MNIST on cblas_sgemm.
 *
 * Row-major throughout. With X [B,784] the minibatch and W [out,in] a weight:
 *   forward   Z = X·Wᵀ + b
 *   backward  G = (softmax(Z) - onehot(y)) / B,  dW = Gᵀ·X,  db = Σ_rows G,
 *             MLP: dH = (G·W2) ⊙ [H > 0] before W2 changes.
 * In SGD the weight update is folded into the gradient GEMM (alpha = -lr, beta = 1,
 * C = W), so no gradient buffers are needed.
 */
#include "nn.h"

#include <cblas.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../common/cohort_err.h"
/* rng.h uses unsigned __int128, which -Wpedantic flags. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpedantic"
#include "../../common/rng.h"
#pragma GCC diagnostic pop

#define EVAL_ROWS 1000
#define EVAL_MAX_FLOATS ((size_t)1 << 22) /* cap of an eval block's workspace */
#define MAX_BATCH (1 << 20)

__attribute__((format(printf, 3, 4)))
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* A model's tensors resolved to pointers. Softmax uses w1/b1 only. */
struct net {
    struct nn_arch arch;
    float *w1, *b1, *w2, *b2;
};

/* ---- architecture ----------------------------------------------------------------------- */

static const char expected_msg[] =
    "expected softmax (fc.weight[10x784] fc.bias[10]) or MLP (fc1.weight[Hx784] fc1.bias[H] "
    "fc2.weight[10xH] fc2.bias[10])";

/* Finds `name` with shape [d0] (d1 < 0) or [d0 x d1]; d0 < 0 accepts any first dimension. */
static const struct coh_tensor *want_tensor(const struct coh_model *m, const char *name,
                                            long d0, long d1, char *err, size_t errlen)
{
    const struct coh_tensor *t = coh_model_find(m, name);
    if (!t) {
        set_err(err, errlen, "nn: model has no tensor %s; %s", name, expected_msg);
        return NULL;
    }
    int ndim = d1 < 0 ? 1 : 2;
    int ok = t->ndim == ndim && (d0 < 0 || t->shape[0] == (uint64_t)d0) &&
             (ndim == 1 || t->shape[1] == (uint64_t)d1);
    if (!ok) {
        char got[96] = "", want[64];
        size_t len = 0;
        for (int i = 0; i < t->ndim && i < COH_MAX_DIMS && len < sizeof got; i++) {
            int w = snprintf(got + len, sizeof got - len, "%s%llu", i ? "x" : "",
                             (unsigned long long)t->shape[i]);
            if (w < 0)
                break;
            len += (size_t)w;
        }
        if (ndim == 1)
            snprintf(want, sizeof want, "%ld", d0);
        else if (d0 < 0)
            snprintf(want, sizeof want, "Hx%ld", d1);
        else
            snprintf(want, sizeof want, "%ldx%ld", d0, d1);
        set_err(err, errlen, "nn: tensor %s has shape [%s], expected [%s]; %s", name, got,
                want, expected_msg);
        return NULL;
    }
    return t;
}

static int resolve(const struct coh_model *m, struct net *n, char *err, size_t errlen)
{
    memset(n, 0, sizeof *n);
    if (!m) {
        set_err(err, errlen, "nn: model is NULL");
        return -EINVAL;
    }
    if (!m->data) {
        set_err(err, errlen, "nn: model has no data allocated");
        return -EINVAL;
    }
    const struct coh_tensor *t[4];
    if (m->ntensors == 2 && coh_model_find(m, "fc.weight")) {
        if (!(t[0] = want_tensor(m, "fc.weight", NN_CLASSES, NN_INPUTS, err, errlen)) ||
            !(t[1] = want_tensor(m, "fc.bias", NN_CLASSES, -1, err, errlen)))
            return -EINVAL;
        n->arch.kind = NN_SOFTMAX;
        n->arch.hidden = 0;
        n->w1 = m->data + t[0]->offset;
        n->b1 = m->data + t[1]->offset;
        return 0;
    }
    if (m->ntensors == 4 && coh_model_find(m, "fc1.weight")) {
        if (!(t[0] = want_tensor(m, "fc1.weight", -1, NN_INPUTS, err, errlen)))
            return -EINVAL;
        uint64_t h = t[0]->shape[0];
        if (h < 1 || h > NN_MAX_HIDDEN) {
            set_err(err, errlen, "nn: fc1.weight has %llu rows, expected 1..%d hidden units",
                    (unsigned long long)h, NN_MAX_HIDDEN);
            return -EINVAL;
        }
        if (!(t[1] = want_tensor(m, "fc1.bias", (long)h, -1, err, errlen)) ||
            !(t[2] = want_tensor(m, "fc2.weight", NN_CLASSES, (long)h, err, errlen)) ||
            !(t[3] = want_tensor(m, "fc2.bias", NN_CLASSES, -1, err, errlen)))
            return -EINVAL;
        n->arch.kind = NN_MLP;
        n->arch.hidden = (int)h;
        n->w1 = m->data + t[0]->offset;
        n->b1 = m->data + t[1]->offset;
        n->w2 = m->data + t[2]->offset;
        n->b2 = m->data + t[3]->offset;
        return 0;
    }
    char names[160] = "";
    size_t len = 0;
    for (size_t i = 0; i < m->ntensors && len < sizeof names; i++) {
        int w = snprintf(names + len, sizeof names - len, "%s%s", i ? " " : "",
                         m->tensors[i].name ? m->tensors[i].name : "?");
        if (w < 0)
            break;
        len += (size_t)w;
    }
    set_err(err, errlen, "nn: unrecognised model (%zu tensors: %s); %s", m->ntensors,
            m->ntensors ? names : "none", expected_msg);
    return -EINVAL;
}

int nn_detect(const struct coh_model *m, struct nn_arch *arch, char *err, size_t errlen)
{
    struct net n;
    int rc = resolve(m, &n, err, errlen);
    if (rc == 0 && arch)
        *arch = n.arch;
    return rc;
}

void nn_arch_name(const struct nn_arch *arch, char *buf, size_t len)
{
    if (!buf || len == 0)
        return;
    if (arch && arch->kind == NN_SOFTMAX)
        snprintf(buf, len, "softmax");
    else if (arch && arch->kind == NN_MLP)
        snprintf(buf, len, "mlp:%d", arch->hidden);
    else
        snprintf(buf, len, "unknown");
}

static int parse_arch(const char *arch, struct nn_arch *a, char *err, size_t errlen)
{
    if (arch && strcmp(arch, "softmax") == 0) {
        a->kind = NN_SOFTMAX;
        a->hidden = 0;
        return 0;
    }
    if (arch && strcmp(arch, "mlp") == 0) {
        a->kind = NN_MLP;
        a->hidden = NN_DEFAULT_HIDDEN;
        return 0;
    }
    if (arch && strncmp(arch, "mlp:", 4) == 0) {
        const char *s = arch + 4;
        char *end = NULL;
        errno = 0;
        long h = strtol(s, &end, 10);
        if (end != s && *end == '\0' && errno == 0 && h >= 1 && h <= NN_MAX_HIDDEN) {
            a->kind = NN_MLP;
            a->hidden = (int)h;
            return 0;
        }
        set_err(err, errlen, "nn: bad hidden size \"%s\" in arch \"%s\" (expected 1..%d)", s,
                arch, NN_MAX_HIDDEN);
        return -EINVAL;
    }
    set_err(err, errlen, "nn: unknown arch \"%s\" (expected \"softmax\", \"mlp\" or \"mlp:H\")",
            arch ? arch : "(null)");
    return -EINVAL;
}

static void kaiming_normal(float *w, size_t count, size_t fan_in, struct coh_rng *rng)
{
    double std = sqrt(2.0 / (double)fan_in);
    for (size_t i = 0; i < count; i++)
        w[i] = (float)(std * coh_rng_normal(rng));
}

int nn_init_model(struct coh_model *m, const char *arch, uint64_t seed, char *err,
                  size_t errlen)
{
    if (!m) {
        set_err(err, errlen, "nn_init_model: model is NULL");
        return -EINVAL;
    }
    coh_model_init(m);
    struct nn_arch a;
    int rc = parse_arch(arch, &a, err, errlen);
    if (rc < 0)
        return rc;
    uint64_t h = (uint64_t)a.hidden;
    if (a.kind == NN_SOFTMAX) {
        const uint64_t ws[2] = { NN_CLASSES, NN_INPUTS }, bs[1] = { NN_CLASSES };
        if ((rc = coh_model_add(m, "fc.weight", 2, ws)) < 0 ||
            (rc = coh_model_add(m, "fc.bias", 1, bs)) < 0)
            goto fail;
    } else {
        const uint64_t w1s[2] = { h, NN_INPUTS }, b1s[1] = { h };
        const uint64_t w2s[2] = { NN_CLASSES, h }, b2s[1] = { NN_CLASSES };
        if ((rc = coh_model_add(m, "fc1.weight", 2, w1s)) < 0 ||
            (rc = coh_model_add(m, "fc1.bias", 1, b1s)) < 0 ||
            (rc = coh_model_add(m, "fc2.weight", 2, w2s)) < 0 ||
            (rc = coh_model_add(m, "fc2.bias", 1, b2s)) < 0)
            goto fail;
    }
    if ((rc = coh_model_alloc(m)) < 0)
        goto fail;
    memset(m->data, 0, m->numel * sizeof *m->data);
    if (a.kind == NN_MLP) {
        struct net n;
        if ((rc = resolve(m, &n, err, errlen)) < 0) {
            coh_model_fini(m);
            return rc;
        }
        struct coh_rng rng;
        coh_rng_seed(&rng, seed);
        kaiming_normal(n.w1, (size_t)h * NN_INPUTS, NN_INPUTS, &rng);
        kaiming_normal(n.w2, (size_t)NN_CLASSES * h, (size_t)h, &rng);
    }
    return 0;
fail:
    set_err(err, errlen, "nn: cannot build %s model (error %d)", arch, rc);
    coh_model_fini(m);
    return rc;
}

/* ---- kernels ---------------------------------------------------------------------------- */

/*
 * Draws a minibatch's rows (with replacement, `count` draws in order) and asks the cache
 * for their pixels, which lie scattered over the dataset. (Prefetching lives here and
 * not in a function of its own: gcc deems such a function pure and drops its calls.)
 */
static void draw_rows(const struct fmnist *d, const uint32_t *idx, size_t nidx,
                      struct coh_rng *rng, uint32_t *rows, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        rows[i] = idx[coh_rng_below(rng, nidx)];
        const uint8_t *src = d->images + (size_t)rows[i] * NN_INPUTS;
        for (size_t off = 0; off < NN_INPUTS; off += 64)
            __builtin_prefetch(src + off, 0, 3);
        __builtin_prefetch(src + NN_INPUTS - 1, 0, 3);
    }
}

/*
 * One row of uint8 pixels -> float in [0,1]. restrict and the fixed trip count let
 * gcc -O2 vectorise the loop; without them it stays scalar and costs more than the
 * GEMMs of a small softmax step.
 */
static void convert_row(float *restrict dst, const uint8_t *restrict src)
{
    for (size_t j = 0; j < NN_INPUTS; j++)
        dst[j] = (float)src[j] * (1.0f / 255.0f);
}

/* Minibatch rows (rows[i], or first + i when rows is NULL) -> x [count,784], y [count]. */
static void load_rows(const struct fmnist *d, const uint32_t *rows, size_t first, size_t count,
                      float *x, uint8_t *y)
{
    for (size_t i = 0; i < count; i++) {
        size_t r = rows ? rows[i] : first + i;
        convert_row(x + i * NN_INPUTS, d->images + r * NN_INPUTS);
        y[i] = d->labels[r];
    }
}

/* Each of `rows` rows of out[., cols] set to bias. */
static void fill_bias(float *out, const float *bias, size_t rows, size_t cols)
{
    for (size_t i = 0; i < rows; i++)
        memcpy(out + i * cols, bias, cols * sizeof *out);
}

/* z [rows,10] = logits; h [rows,H] = hidden activations (MLP). */
static void forward(const struct net *n, const float *x, size_t rows, float *h, float *z)
{
    int b = (int)rows;
    if (n->arch.kind == NN_SOFTMAX) {
        fill_bias(z, n->b1, rows, NN_CLASSES);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, b, NN_CLASSES, NN_INPUTS, 1.0f,
                    x, NN_INPUTS, n->w1, NN_INPUTS, 1.0f, z, NN_CLASSES);
        return;
    }
    int hd = n->arch.hidden;
    fill_bias(h, n->b1, rows, (size_t)hd);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, b, hd, NN_INPUTS, 1.0f, x, NN_INPUTS,
                n->w1, NN_INPUTS, 1.0f, h, hd);
    size_t hn = rows * (size_t)hd;
    for (size_t i = 0; i < hn; i++)
        h[i] = h[i] > 0.0f ? h[i] : 0.0f;
    fill_bias(z, n->b2, rows, NN_CLASSES);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, b, NN_CLASSES, hd, 1.0f, h, hd, n->w2,
                hd, 1.0f, z, NN_CLASSES);
}

/* Log-sum-exp of one row of logits. */
static float row_lse(const float *z)
{
    float mx = z[0];
    for (int k = 1; k < NN_CLASSES; k++)
        mx = z[k] > mx ? z[k] : mx;
    float s = 0.0f;
    for (int k = 0; k < NN_CLASSES; k++)
        s += expf(z[k] - mx);
    return mx + logf(s);
}

/* Sum of cross-entropies; z becomes G = (softmax(z) - onehot(y)) * scale. */
static double xent_grad(float *z, const uint8_t *y, size_t rows, float scale)
{
    double loss = 0.0;
    for (size_t i = 0; i < rows; i++) {
        float *zi = z + i * NN_CLASSES;
        float mx = zi[0];
        for (int k = 1; k < NN_CLASSES; k++)
            mx = zi[k] > mx ? zi[k] : mx;
        float e[NN_CLASSES], s = 0.0f;
        for (int k = 0; k < NN_CLASSES; k++) {
            e[k] = expf(zi[k] - mx);
            s += e[k];
        }
        loss += (double)(mx + logf(s) - zi[y[i]]);
        float c = scale / s;
        for (int k = 0; k < NN_CLASSES; k++)
            zi[k] = e[k] * c;
        zi[y[i]] -= scale;
    }
    return loss;
}

/* out = beta*out + alpha*(column sums of g [rows,cols]). beta is 0 or 1. */
static void bias_grad(float *out, const float *g, size_t rows, size_t cols, float alpha,
                      float beta)
{
    if (beta == 0.0f)
        memset(out, 0, cols * sizeof *out);
    for (size_t i = 0; i < rows; i++) {
        const float *gi = g + i * cols;
        for (size_t k = 0; k < cols; k++)
            out[k] += alpha * gi[k];
    }
}

/*
 * Backward pass from G (in z) into the parameter-shaped outputs `o`:
 * o = beta*o + alpha*grad. With o = n and (alpha, beta) = (-lr, 1) this is the SGD
 * step; with separate buffers and (1, 0) it is the plain gradient. dh: [rows,H].
 */
static void backward(const struct net *n, const struct net *o, const float *x, const float *h,
                     const float *g, float *dh, size_t rows, float alpha, float beta)
{
    int b = (int)rows;
    if (n->arch.kind == NN_SOFTMAX) {
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, NN_CLASSES, NN_INPUTS, b, alpha, g,
                    NN_CLASSES, x, NN_INPUTS, beta, o->w1, NN_INPUTS);
        bias_grad(o->b1, g, rows, NN_CLASSES, alpha, beta);
        return;
    }
    int hd = n->arch.hidden;
    /* dH = G·W2 first: o->w2 may be n->w2. */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, b, hd, NN_CLASSES, 1.0f, g,
                NN_CLASSES, n->w2, hd, 0.0f, dh, hd);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, NN_CLASSES, hd, b, alpha, g,
                NN_CLASSES, h, hd, beta, o->w2, hd);
    bias_grad(o->b2, g, rows, NN_CLASSES, alpha, beta);
    size_t hn = rows * (size_t)hd;
    for (size_t i = 0; i < hn; i++)
        dh[i] = h[i] > 0.0f ? dh[i] : 0.0f;
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, hd, NN_INPUTS, b, alpha, dh, hd, x,
                NN_INPUTS, beta, o->w1, NN_INPUTS);
    bias_grad(o->b1, dh, rows, (size_t)hd, alpha, beta);
}

/* ---- workspace -------------------------------------------------------------------------- */

struct work {
    void *block;
    float *x, *h, *dh, *z;
    uint8_t *y;
    uint32_t *rows;                 /* nn_train: two minibatches of row indices */
};

static size_t round64(size_t bytes)
{
    return (bytes + 63) / 64 * 64;
}

/* One 64-byte aligned block for `rows` rows; hd = 0 for softmax. */
static int work_alloc(struct work *w, size_t rows, size_t hd, int with_rows, char *err,
                      size_t errlen)
{
    memset(w, 0, sizeof *w);
    size_t sx = round64(rows * NN_INPUTS * sizeof(float));
    size_t sh = round64(rows * hd * sizeof(float));
    size_t sz = round64(rows * NN_CLASSES * sizeof(float));
    size_t sy = round64(rows);
    size_t sr = with_rows ? round64(2 * rows * sizeof(uint32_t)) : 0;
    size_t total = sx + 2 * sh + sz + sy + sr;
    char *p = aligned_alloc(64, total ? total : 64);
    if (!p) {
        set_err(err, errlen, "nn: out of memory for a %zu-byte workspace", total);
        return -ENOMEM;
    }
    w->block = p;
    w->x = (float *)p;
    p += sx;
    w->h = (float *)p;
    p += sh;
    w->dh = (float *)p;
    p += sh;
    w->z = (float *)p;
    p += sz;
    w->y = (uint8_t *)p;
    p += sy;
    w->rows = with_rows ? (uint32_t *)p : NULL;
    return 0;
}

static void work_free(struct work *w)
{
    free(w->block);
    w->block = NULL;
}

static int check_data(const struct fmnist *d, char *err, size_t errlen)
{
    if (!d || !d->images || !d->labels || d->n == 0) {
        set_err(err, errlen, "nn: dataset is NULL or empty");
        return -EINVAL;
    }
    return 0;
}

/* ---- public ----------------------------------------------------------------------------- */

int nn_train(struct coh_model *m, const struct fmnist *d, const uint32_t *idx, size_t nidx,
             const struct nn_train_cfg *cfg, struct coh_rng *rng, double *mean_loss, char *err,
             size_t errlen)
{
    struct net n;
    int rc = resolve(m, &n, err, errlen);
    if (rc < 0)
        return rc;
    if (!cfg || !rng || !mean_loss) {
        set_err(err, errlen, "nn_train: cfg, rng or mean_loss is NULL");
        return -EINVAL;
    }
    if (cfg->local_steps < 0 || cfg->batch < 1 || cfg->batch > MAX_BATCH ||
        !isfinite(cfg->lr)) {
        set_err(err, errlen, "nn_train: bad config (local_steps %d >= 0, batch %d in 1..%d, "
                "lr %g finite)", cfg->local_steps, cfg->batch, MAX_BATCH, (double)cfg->lr);
        return -EINVAL;
    }
    *mean_loss = 0.0;
    if (nidx == 0 || cfg->local_steps == 0)
        return 0;
    if ((rc = check_data(d, err, errlen)) < 0)
        return rc;
    if (!idx) {
        set_err(err, errlen, "nn_train: idx is NULL with nidx %zu", nidx);
        return -EINVAL;
    }
    uint32_t top = 0;
    for (size_t i = 0; i < nidx; i++)
        top = idx[i] > top ? idx[i] : top;
    if (top >= d->n) {
        set_err(err, errlen, "nn_train: index %u out of range (dataset has %zu examples)",
                (unsigned)top, d->n);
        return -EINVAL;
    }

    size_t b = (size_t)cfg->batch;
    struct work w;
    if ((rc = work_alloc(&w, b, (size_t)n.arch.hidden, 1, err, errlen)) < 0)
        return rc;
    double total = 0.0;
    float scale = 1.0f / (float)b;
    /* Step s uses rows[(s % 2) * b ...]; step s+1's rows are drawn (same rng order) and
     * prefetched before step s computes, hiding the memory latency of scattered rows. */
    draw_rows(d, idx, nidx, rng, w.rows, b);
    for (int step = 0; step < cfg->local_steps; step++) {
        uint32_t *cur = w.rows + (size_t)(step & 1) * b, *next = w.rows + (size_t)(~step & 1) * b;
        if (step + 1 < cfg->local_steps)
            draw_rows(d, idx, nidx, rng, next, b);
        load_rows(d, cur, 0, b, w.x, w.y);
        forward(&n, w.x, b, w.h, w.z);
        total += xent_grad(w.z, w.y, b, scale) / (double)b;
        backward(&n, &n, w.x, w.h, w.z, w.dh, b, -cfg->lr, 1.0f);
    }
    work_free(&w);
    *mean_loss = total / cfg->local_steps;
    return 0;
}

int nn_eval(const struct coh_model *m, const struct fmnist *d, double *accuracy, double *loss,
            char *err, size_t errlen)
{
    struct net n;
    int rc = resolve(m, &n, err, errlen);
    if (rc < 0)
        return rc;
    if ((rc = check_data(d, err, errlen)) < 0)
        return rc;
    size_t per_row = NN_INPUTS + 2 * (size_t)n.arch.hidden + NN_CLASSES;
    size_t block = EVAL_ROWS;
    if (block * per_row > EVAL_MAX_FLOATS)
        block = EVAL_MAX_FLOATS / per_row ? EVAL_MAX_FLOATS / per_row : 1;
    if (block > d->n)
        block = d->n;
    struct work w;
    if ((rc = work_alloc(&w, block, (size_t)n.arch.hidden, 0, err, errlen)) < 0)
        return rc;
    size_t correct = 0;
    double total = 0.0;
    for (size_t first = 0; first < d->n; first += block) {
        size_t rows = d->n - first < block ? d->n - first : block;
        load_rows(d, NULL, first, rows, w.x, w.y);
        forward(&n, w.x, rows, w.h, w.z);
        for (size_t i = 0; i < rows; i++) {
            const float *zi = w.z + i * NN_CLASSES;
            int best = 0;
            for (int k = 1; k < NN_CLASSES; k++)
                best = zi[k] > zi[best] ? k : best;
            correct += best == w.y[i];
            total += (double)(row_lse(zi) - zi[w.y[i]]);
        }
    }
    work_free(&w);
    if (accuracy)
        *accuracy = (double)correct / (double)d->n;
    if (loss)
        *loss = total / (double)d->n;
    return 0;
}

int nn_loss_grad(const struct coh_model *m, const struct fmnist *d, const uint32_t *batch,
                 size_t nbatch, struct coh_model *grad, double *loss, char *err, size_t errlen)
{
    struct net n, g;
    int rc = resolve(m, &n, err, errlen);
    if (rc < 0)
        return rc;
    if ((rc = resolve(grad, &g, err, errlen)) < 0)
        return rc;
    if (g.arch.kind != n.arch.kind || g.arch.hidden != n.arch.hidden) {
        set_err(err, errlen, "nn_loss_grad: gradient model's layout differs from the model's");
        return -EINVAL;
    }
    if ((rc = check_data(d, err, errlen)) < 0)
        return rc;
    if (!batch || nbatch == 0 || nbatch > MAX_BATCH || !loss) {
        set_err(err, errlen, "nn_loss_grad: need 1..%d batch rows and a loss pointer",
                MAX_BATCH);
        return -EINVAL;
    }
    for (size_t i = 0; i < nbatch; i++) {
        if (batch[i] >= d->n) {
            set_err(err, errlen, "nn_loss_grad: index %u out of range (dataset has %zu)",
                    (unsigned)batch[i], d->n);
            return -EINVAL;
        }
    }
    struct work w;
    if ((rc = work_alloc(&w, nbatch, (size_t)n.arch.hidden, 0, err, errlen)) < 0)
        return rc;
    load_rows(d, batch, 0, nbatch, w.x, w.y);
    forward(&n, w.x, nbatch, w.h, w.z);
    *loss = xent_grad(w.z, w.y, nbatch, 1.0f / (float)nbatch) / (double)nbatch;
    backward(&n, &g, w.x, w.h, w.z, w.dh, nbatch, 1.0f, 0.0f);
    work_free(&w);
    return 0;
}
