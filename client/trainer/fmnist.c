/*
 * Fashion-MNIST loader (IDX format through zlib) and client partitions.
 */
#include "fmnist.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "../../common/cohort_err.h"
/* rng.h uses unsigned __int128, which -Wpedantic flags. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpedantic"
#include "../../common/rng.h"
#pragma GCC diagnostic pop

#define IDX3_MAGIC 0x00000803u      /* unsigned byte, 3 dimensions */
#define IDX1_MAGIC 0x00000801u      /* unsigned byte, 1 dimension */
#define READ_CHUNK (1u << 24)       /* bytes per gzread call */
#define FIRST_ALLOC ((size_t)1 << 20)

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

/* ---- loading ---------------------------------------------------------------------------- */

struct idx_file {
    gzFile gz;
    char path[4096];
};

static int idx_open(struct idx_file *f, const char *dir, const char *name, char *err,
                    size_t errlen)
{
    int len = snprintf(f->path, sizeof f->path, "%s/%s", dir, name);
    if (len < 0 || (size_t)len >= sizeof f->path) {
        set_err(err, errlen, "fmnist: dataset directory path too long");
        return -EINVAL;
    }
    errno = 0;
    f->gz = gzopen(f->path, "rb");
    if (!f->gz) {
        int e = errno;
        set_err(err, errlen, "fmnist: cannot open %s: %s", f->path,
                e ? strerror(e) : "out of memory");
        if (e == ENOENT)
            return -ENOENT;
        return e == 0 || e == ENOMEM ? -ENOMEM : -EIO;
    }
    gzbuffer(f->gz, 1u << 17);
    return 0;
}

static void idx_close(struct idx_file *f)
{
    if (f->gz)
        gzclose(f->gz);
    f->gz = NULL;
}

/* Error after a short or failed gzread: I/O error, corrupt stream or truncation. */
static int idx_read_error(struct idx_file *f, const char *what, size_t want, size_t got,
                          char *err, size_t errlen)
{
    int zerr = Z_OK;
    const char *msg = gzerror(f->gz, &zerr);
    if (zerr == Z_ERRNO) {
        set_err(err, errlen, "fmnist: %s: read error: %s", f->path, strerror(errno));
        return -EIO;
    }
    if (zerr == Z_MEM_ERROR) {
        set_err(err, errlen, "fmnist: %s: out of memory in zlib", f->path);
        return -ENOMEM;
    }
    if (zerr == Z_BUF_ERROR) {
        if (got == want)
            set_err(err, errlen, "fmnist: %s: file truncated (gzip stream ends before its "
                    "trailer)", f->path);
        else
            set_err(err, errlen, "fmnist: %s: file truncated (gzip stream ends after %zu of "
                    "%zu bytes of %s)", f->path, got, want, what);
        return COHORT_EFORMAT;
    }
    if (zerr != Z_OK) {
        size_t plen = strlen(f->path);      /* zlib prefixes its message with the path */
        if (msg && strncmp(msg, f->path, plen) == 0 && msg[plen] == ':' && msg[plen + 1] == ' ')
            msg += plen + 2;
        set_err(err, errlen, "fmnist: %s: corrupt gzip data (%s)", f->path,
                msg ? msg : "unknown error");
        return COHORT_EFORMAT;
    }
    set_err(err, errlen, "fmnist: %s: truncated %s: expected %zu bytes, file holds %zu",
            f->path, what, want, got);
    return COHORT_EFORMAT;
}

/* Reads up to len bytes; *got gets the count. Returns 0, or an error for a failed read. */
static int idx_read_some(struct idx_file *f, void *buf, size_t len, size_t *got, char *err,
                         size_t errlen)
{
    unsigned char *p = buf;
    *got = 0;
    while (*got < len) {
        size_t left = len - *got;
        unsigned chunk = left > READ_CHUNK ? READ_CHUNK : (unsigned)left;
        int r = gzread(f->gz, p + *got, chunk);
        if (r < 0)
            return idx_read_error(f, "data", len, *got, err, errlen);
        if (r == 0)
            break;
        *got += (size_t)r;
    }
    return 0;
}

static int idx_read_exact(struct idx_file *f, void *buf, size_t len, const char *what,
                          char *err, size_t errlen)
{
    size_t got;
    int rc = idx_read_some(f, buf, len, &got, err, errlen);
    if (rc < 0)
        return rc;
    if (got != len)
        return idx_read_error(f, what, len, got, err, errlen);
    return 0;
}

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

/*
 * Reads exactly `len` bytes of payload into a malloc'ed buffer that grows with the
 * data actually present, then checks the stream ends there (no trailing bytes, intact
 * gzip trailer).
 */
static int idx_read_body(struct idx_file *f, size_t len, const char *what, uint8_t **out,
                         char *err, size_t errlen)
{
    *out = NULL;
    size_t cap = len < FIRST_ALLOC ? len : FIRST_ALLOC;
    uint8_t *buf = malloc(cap ? cap : 1);
    if (!buf) {
        set_err(err, errlen, "fmnist: %s: out of memory for %zu bytes", f->path, cap);
        return -ENOMEM;
    }
    size_t have = 0;
    for (;;) {
        size_t got;
        int rc = idx_read_some(f, buf + have, cap - have, &got, err, errlen);
        if (rc < 0) {
            free(buf);
            return rc;
        }
        have += got;
        if (have < cap) {
            rc = idx_read_error(f, what, len, have, err, errlen);
            free(buf);
            return rc;
        }
        if (have == len)
            break;
        size_t ncap = cap > len / 2 ? len : cap * 2;
        uint8_t *nbuf = realloc(buf, ncap);
        if (!nbuf) {
            free(buf);
            set_err(err, errlen, "fmnist: %s: out of memory for %zu bytes", f->path, ncap);
            return -ENOMEM;
        }
        buf = nbuf;
        cap = ncap;
    }
    unsigned char extra;
    int r = gzread(f->gz, &extra, 1);
    int zerr = Z_OK;
    if (r != 0 || (gzerror(f->gz, &zerr), zerr != Z_OK)) {
        int rc;
        if (r > 0) {
            set_err(err, errlen, "fmnist: %s: trailing data after %zu bytes of %s", f->path,
                    len, what);
            rc = COHORT_EFORMAT;
        } else {
            rc = idx_read_error(f, what, len, len, err, errlen);
        }
        free(buf);
        return rc;
    }
    *out = buf;
    return 0;
}

static int read_images_header(struct idx_file *f, size_t *n, char *err, size_t errlen)
{
    unsigned char h[16];
    int rc = idx_read_exact(f, h, sizeof h, "IDX3 header", err, errlen);
    if (rc < 0)
        return rc;
    uint32_t magic = be32(h), count = be32(h + 4), rows = be32(h + 8), cols = be32(h + 12);
    if (magic != IDX3_MAGIC) {
        set_err(err, errlen,
                "fmnist: %s: bad magic 0x%08x (expected 0x%08x, an IDX3 ubyte image file)",
                f->path, (unsigned)magic, IDX3_MAGIC);
        return COHORT_EFORMAT;
    }
    if (rows != FMNIST_ROWS || cols != FMNIST_COLS) {
        set_err(err, errlen, "fmnist: %s: images are %ux%u, expected %dx%d", f->path,
                (unsigned)rows, (unsigned)cols, FMNIST_ROWS, FMNIST_COLS);
        return COHORT_EFORMAT;
    }
    if (count == 0) {
        set_err(err, errlen, "fmnist: %s: holds no images", f->path);
        return COHORT_EFORMAT;
    }
#if SIZE_MAX < UINT64_MAX
    if ((uint64_t)count * FMNIST_PIXELS > SIZE_MAX) {
        set_err(err, errlen, "fmnist: %s: %u images do not fit in memory", f->path,
                (unsigned)count);
        return -ENOMEM;
    }
#endif
    *n = count;
    return 0;
}

static int read_labels_header(struct idx_file *f, size_t *n, char *err, size_t errlen)
{
    unsigned char h[8];
    int rc = idx_read_exact(f, h, sizeof h, "IDX1 header", err, errlen);
    if (rc < 0)
        return rc;
    uint32_t magic = be32(h), count = be32(h + 4);
    if (magic != IDX1_MAGIC) {
        set_err(err, errlen,
                "fmnist: %s: bad magic 0x%08x (expected 0x%08x, an IDX1 ubyte label file)",
                f->path, (unsigned)magic, IDX1_MAGIC);
        return COHORT_EFORMAT;
    }
    *n = count;
    return 0;
}

int fmnist_load(const char *dir, int train, struct fmnist *out, char *err, size_t errlen)
{
    if (!out) {
        set_err(err, errlen, "fmnist_load: out is NULL");
        return -EINVAL;
    }
    memset(out, 0, sizeof *out);
    if (!dir)
        dir = FMNIST_DEFAULT_DIR;
    const char *prefix = train ? "train" : "t10k";
    char img_name[64], lbl_name[64];
    snprintf(img_name, sizeof img_name, "%s-images-idx3-ubyte.gz", prefix);
    snprintf(lbl_name, sizeof lbl_name, "%s-labels-idx1-ubyte.gz", prefix);

    struct idx_file fi = { 0 }, fl = { 0 };
    uint8_t *images = NULL, *labels = NULL;
    size_t ni = 0, nl = 0;
    int rc = idx_open(&fl, dir, lbl_name, err, errlen);
    if (rc < 0)
        goto out;
    rc = idx_open(&fi, dir, img_name, err, errlen);
    if (rc < 0)
        goto out;
    rc = read_labels_header(&fl, &nl, err, errlen);
    if (rc < 0)
        goto out;
    rc = read_images_header(&fi, &ni, err, errlen);
    if (rc < 0)
        goto out;
    if (ni != nl) {
        set_err(err, errlen, "fmnist: %s holds %zu images but %s holds %zu labels",
                fi.path, ni, fl.path, nl);
        rc = COHORT_EFORMAT;
        goto out;
    }
    rc = idx_read_body(&fl, nl, "labels", &labels, err, errlen);
    if (rc < 0)
        goto out;
    for (size_t i = 0; i < nl; i++) {
        if (labels[i] >= FMNIST_CLASSES) {
            set_err(err, errlen, "fmnist: %s: label %u at index %zu is not in 0..%d",
                    fl.path, (unsigned)labels[i], i, FMNIST_CLASSES - 1);
            rc = COHORT_EFORMAT;
            goto out;
        }
    }
    rc = idx_read_body(&fi, ni * FMNIST_PIXELS, "images", &images, err, errlen);
    if (rc < 0)
        goto out;
    out->n = ni;
    out->images = images;
    out->labels = labels;
    images = labels = NULL;
out:
    idx_close(&fi);
    idx_close(&fl);
    free(images);
    free(labels);
    return rc;
}

void fmnist_free(struct fmnist *d)
{
    if (!d)
        return;
    free(d->images);
    free(d->labels);
    memset(d, 0, sizeof *d);
}

int fmnist_label_counts(const struct fmnist *d, const uint32_t *idx, size_t n,
                        size_t counts[FMNIST_CLASSES])
{
    if (!d || !counts || (n && !idx))
        return -EINVAL;
    for (int c = 0; c < FMNIST_CLASSES; c++)
        counts[c] = 0;
    for (size_t i = 0; i < n; i++) {
        if (idx[i] >= d->n || d->labels[idx[i]] >= FMNIST_CLASSES)
            return -EINVAL;
        counts[d->labels[idx[i]]]++;
    }
    return 0;
}

/* ---- partitions ------------------------------------------------------------------------- */

/*
 * The full split as one permutation `perm` of 0..n-1 grouped by part: part p owns
 * perm[start[p] .. start[p+1]) (in split order; plan_take sorts a part's copy).
 */
struct split_plan {
    uint32_t *perm;
    size_t *start;                  /* nparts + 1 entries */
};

static void plan_free(struct split_plan *s)
{
    free(s->perm);
    free(s->start);
    s->perm = NULL;
    s->start = NULL;
}

static void shuffle(uint32_t *a, size_t n, struct coh_rng *rng)
{
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)coh_rng_below(rng, i);
        uint32_t t = a[i - 1];
        a[i - 1] = a[j];
        a[j] = t;
    }
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static int parse_split(const char *split, int *dirichlet, double *alpha, char *err,
                       size_t errlen)
{
    if (!split) {
        set_err(err, errlen, "fmnist: split is NULL (expected \"iid\" or \"dirichlet:ALPHA\")");
        return -EINVAL;
    }
    if (strcmp(split, "iid") == 0) {
        *dirichlet = 0;
        *alpha = 0.0;
        return 0;
    }
    static const char pfx[] = "dirichlet:";
    if (strncmp(split, pfx, sizeof pfx - 1) == 0) {
        const char *s = split + sizeof pfx - 1;
        char *end = NULL;
        errno = 0;
        double a = strtod(s, &end);
        if (end != s && *end == '\0' && errno == 0 && isfinite(a) && a > 0.0) {
            *dirichlet = 1;
            *alpha = a;
            return 0;
        }
        set_err(err, errlen, "fmnist: bad Dirichlet concentration \"%s\" in split \"%s\" "
                "(expected a finite number > 0)", s, split);
        return -EINVAL;
    }
    set_err(err, errlen, "fmnist: unknown split \"%s\" (expected \"iid\" or \"dirichlet:ALPHA\")",
            split);
    return -EINVAL;
}

static int plan_iid(const struct fmnist *d, uint64_t seed, int nparts, struct split_plan *s)
{
    size_t n = d->n;
    for (size_t i = 0; i < n; i++)
        s->perm[i] = (uint32_t)i;
    struct coh_rng rng;
    coh_rng_seed(&rng, seed);
    shuffle(s->perm, n, &rng);
    for (int p = 0; p <= nparts; p++)
        s->start[p] = (size_t)((uint64_t)n * (uint64_t)p / (uint64_t)nparts);
    return 0;
}

static int plan_dirichlet(const struct fmnist *d, double alpha, uint64_t seed, int nparts,
                          struct split_plan *s, char *err, size_t errlen)
{
    size_t n = d->n, np = (size_t)nparts;
    double *pi = NULL;
    uint32_t *bylabel = NULL;
    size_t *cnt = NULL;             /* cnt[p * C + c]: examples of class c for part p */
    int rc = 0;

    if (np > SIZE_MAX / (FMNIST_CLASSES * sizeof(double)))
        goto nomem;
    pi = malloc(np * FMNIST_CLASSES * sizeof *pi);
    cnt = malloc(np * FMNIST_CLASSES * sizeof *cnt);
    bylabel = malloc((n ? n : 1) * sizeof *bylabel);
    if (!pi || !cnt || !bylabel)
        goto nomem;

    struct coh_rng rng;
    coh_rng_seed(&rng, seed);
    for (size_t p = 0; p < np; p++)
        coh_rng_dirichlet(&rng, alpha, pi + p * FMNIST_CLASSES, FMNIST_CLASSES);

    /* Example lists per class, in dataset order, then shuffled class by class. */
    size_t m[FMNIST_CLASSES] = { 0 }, lstart[FMNIST_CLASSES + 1];
    for (size_t i = 0; i < n; i++)
        m[d->labels[i]]++;
    lstart[0] = 0;
    for (int c = 0; c < FMNIST_CLASSES; c++)
        lstart[c + 1] = lstart[c] + m[c];
    size_t fill[FMNIST_CLASSES];
    memcpy(fill, lstart, sizeof fill);
    for (size_t i = 0; i < n; i++)
        bylabel[fill[d->labels[i]]++] = (uint32_t)i;
    for (int c = 0; c < FMNIST_CLASSES; c++)
        shuffle(bylabel + lstart[c], m[c], &rng);

    /* Cumulative rounding of each class's shares: the cuts never overlap or leave gaps. */
    for (int c = 0; c < FMNIST_CLASSES; c++) {
        double total = 0.0;
        for (size_t p = 0; p < np; p++)
            total += pi[p * FMNIST_CLASSES + c];
        int even = !(total > 0.0) || !isfinite(total);
        double cum = 0.0;
        size_t prev = 0;
        for (size_t p = 0; p < np; p++) {
            size_t end;
            if (p + 1 == np) {
                end = m[c];
            } else if (even) {
                end = (size_t)((uint64_t)m[c] * (uint64_t)(p + 1) / (uint64_t)np);
            } else {
                cum += pi[p * FMNIST_CLASSES + c];
                double e = round((double)m[c] * (cum / total));
                end = e <= 0.0 ? 0 : e >= (double)m[c] ? m[c] : (size_t)e;
            }
            if (end < prev)
                end = prev;
            cnt[p * FMNIST_CLASSES + c] = end - prev;
            prev = end;
        }
    }

    /* Lay the parts out one after the other. */
    size_t pos = 0;
    size_t taken[FMNIST_CLASSES] = { 0 };
    for (size_t p = 0; p < np; p++) {
        s->start[p] = pos;
        for (int c = 0; c < FMNIST_CLASSES; c++) {
            size_t k = cnt[p * FMNIST_CLASSES + c];
            memcpy(s->perm + pos, bylabel + lstart[c] + taken[c], k * sizeof *s->perm);
            taken[c] += k;
            pos += k;
        }
    }
    s->start[np] = pos;
    goto out;
nomem:
    set_err(err, errlen, "fmnist: out of memory splitting %zu examples into %d parts", n,
            nparts);
    rc = -ENOMEM;
out:
    free(pi);
    free(cnt);
    free(bylabel);
    return rc;
}

static int make_plan(const struct fmnist *d, const char *split, uint64_t seed, int nparts,
                     struct split_plan *s, char *err, size_t errlen)
{
    s->perm = NULL;
    s->start = NULL;
    if (!d || (d->n && (!d->labels || !d->images))) {
        set_err(err, errlen, "fmnist: partition of a NULL or unloaded dataset");
        return -EINVAL;
    }
    if (nparts < 1) {
        set_err(err, errlen, "fmnist: nparts must be >= 1 (got %d)", nparts);
        return -EINVAL;
    }
    if (d->n > UINT32_MAX) {
        set_err(err, errlen, "fmnist: %zu examples exceed 32-bit indices", d->n);
        return -EINVAL;
    }
    int dirichlet;
    double alpha;
    int rc = parse_split(split, &dirichlet, &alpha, err, errlen);
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < d->n; i++) {
        if (d->labels[i] >= FMNIST_CLASSES) {
            set_err(err, errlen, "fmnist: label %u at index %zu is not in 0..%d",
                    (unsigned)d->labels[i], i, FMNIST_CLASSES - 1);
            return -EINVAL;
        }
    }
    s->perm = malloc((d->n ? d->n : 1) * sizeof *s->perm);
    s->start = calloc((size_t)nparts + 1, sizeof *s->start);
    if (!s->perm || !s->start) {
        plan_free(s);
        set_err(err, errlen, "fmnist: out of memory splitting %zu examples into %d parts",
                d->n, nparts);
        return -ENOMEM;
    }
    if (dirichlet)
        rc = plan_dirichlet(d, alpha, seed, nparts, s, err, errlen);
    else
        rc = plan_iid(d, seed, nparts, s);
    if (rc < 0) {
        plan_free(s);
        return rc;
    }
    return 0;
}

/* Copies part p of the plan into a fresh sorted array. */
static int plan_take(const struct split_plan *s, int p, uint32_t **idx, size_t *n)
{
    size_t k = s->start[p + 1] - s->start[p];
    *idx = NULL;
    *n = 0;
    if (k == 0)
        return 0;
    uint32_t *a = malloc(k * sizeof *a);
    if (!a)
        return -ENOMEM;
    memcpy(a, s->perm + s->start[p], k * sizeof *a);
    qsort(a, k, sizeof *a, cmp_u32);
    *idx = a;
    *n = k;
    return 0;
}

int fmnist_partition(const struct fmnist *d, const char *split, uint64_t seed, int part,
                     int nparts, uint32_t **idx, size_t *n, char *err, size_t errlen)
{
    if (!idx || !n) {
        set_err(err, errlen, "fmnist_partition: idx or n is NULL");
        return -EINVAL;
    }
    *idx = NULL;
    *n = 0;
    if (nparts >= 1 && (part < 0 || part >= nparts)) {
        set_err(err, errlen, "fmnist: part %d out of range 0..%d", part, nparts - 1);
        return -EINVAL;
    }
    struct split_plan s;
    int rc = make_plan(d, split, seed, nparts, &s, err, errlen);
    if (rc < 0)
        return rc;
    rc = plan_take(&s, part, idx, n);
    if (rc < 0)
        set_err(err, errlen, "fmnist: out of memory for the indices of part %d", part);
    plan_free(&s);
    return rc;
}

int fmnist_partition_all(const struct fmnist *d, const char *split, uint64_t seed, int nparts,
                         uint32_t **idx, size_t *n, char *err, size_t errlen)
{
    if (!idx || !n) {
        set_err(err, errlen, "fmnist_partition_all: idx or n is NULL");
        return -EINVAL;
    }
    for (int p = 0; p < nparts; p++) {
        idx[p] = NULL;
        n[p] = 0;
    }
    struct split_plan s;
    int rc = make_plan(d, split, seed, nparts, &s, err, errlen);
    if (rc < 0)
        return rc;
    for (int p = 0; p < nparts; p++) {
        rc = plan_take(&s, p, &idx[p], &n[p]);
        if (rc < 0) {
            set_err(err, errlen, "fmnist: out of memory for the indices of part %d", p);
            for (int q = 0; q < p; q++) {
                free(idx[q]);
                idx[q] = NULL;
                n[q] = 0;
            }
            break;
        }
    }
    plan_free(&s);
    return rc;
}
