/*
 * Fashion-MNIST: loading the IDX files (gzip-compressed or plain) and splitting
 * the training set among clients.
 *
 * Images stay uint8 in memory (n * 784 bytes, row-major 28x28); the trainer
 * converts a minibatch to float (/255) when it uses it. Labels are uint8 in 0..9.
 *
 * Every function is reentrant: no global state, so any thread may load, split
 * or read its own (or a shared, read-only) dataset. On failure a function
 * returns a negative code (-EINVAL, -ENOMEM, -EIO, -ENOENT or COHORT_EFORMAT
 * for a malformed file) and writes a one-line message into err when err is not
 * NULL and errlen > 0.
 */
#ifndef COH_FMNIST_H
#define COH_FMNIST_H

#include <stddef.h>
#include <stdint.h>

#define FMNIST_DEFAULT_DIR "/usr/share/datasets/fashion-mnist"
#define FMNIST_ROWS 28
#define FMNIST_COLS 28
#define FMNIST_PIXELS (FMNIST_ROWS * FMNIST_COLS)
#define FMNIST_CLASSES 10

struct fmnist {
    size_t n;                       /* number of examples */
    uint8_t *images;                /* n * FMNIST_PIXELS bytes */
    uint8_t *labels;                /* n bytes, each < FMNIST_CLASSES */
};

/*
 * Loads the training set (train = 1: train-images-idx3-ubyte.gz and
 * train-labels-idx1-ubyte.gz) or the test set (train = 0: t10k-*) from dir
 * (NULL means FMNIST_DEFAULT_DIR). Checks magic numbers, 28x28 dimensions,
 * equal image and label counts, that every label is < 10, that the files hold
 * exactly the declared data (no truncation, no trailing bytes, gzip CRC
 * intact). Memory grows with the data actually read, so a header declaring a
 * huge count cannot force a huge allocation. Files that are not gzip-compressed
 * are read as they are.
 * On success *out owns the arrays (release with fmnist_free); on failure *out is
 * empty. Returns 0, -EINVAL, -ENOENT (file missing), -ENOMEM, -EIO or
 * COHORT_EFORMAT.
 */
int fmnist_load(const char *dir, int train, struct fmnist *out, char *err, size_t errlen);

/* Frees the arrays and leaves d empty. Safe on an empty or zeroed struct. */
void fmnist_free(struct fmnist *d);

/*
 * Indices (into d) of the examples of client `part` (0-based) out of `nparts`.
 * The whole split is a function of (d's labels, split, seed, nparts) only, so
 * every client process computing it from the same seed gets its own share of
 * the same partition. Every example belongs to exactly one part. Indices in a
 * part are sorted ascending.
 *
 * split:
 *   "iid"              shuffle 0..n-1 (Fisher-Yates, coh_rng seeded with seed)
 *                      and deal out contiguous blocks: part p gets positions
 *                      [p*n/nparts, (p+1)*n/nparts), so sizes differ by <= 1.
 *   "dirichlet:ALPHA"  ALPHA > 0. coh_rng seeded with seed draws, for parts
 *                      0..nparts-1 in order, label shares pi_p ~ Dirichlet(ALPHA)
 *                      over the 10 classes; then shuffles each class's example
 *                      list (classes 0..9 in order, Fisher-Yates); then splits
 *                      class c's m_c examples among the parts in proportion to
 *                      pi_{p,c}: part p gets list positions
 *                      [round(m_c*C_{p-1}/C), round(m_c*C_p/C)) with
 *                      C_p = sum_{q<=p} pi_{q,c}, C = C_{nparts-1} (the last
 *                      part always ends at m_c; a class no part drew is split
 *                      evenly). A part may be empty.
 *
 * On success *idx is a malloc'ed array of *n indices (NULL when *n == 0; free
 * it with free()). On failure *idx = NULL, *n = 0.
 * Returns 0, -EINVAL (bad split string, part or nparts, a label >= 10) or -ENOMEM.
 */
int fmnist_partition(const struct fmnist *d, const char *split, uint64_t seed, int part,
                     int nparts, uint32_t **idx, size_t *n, char *err, size_t errlen);

/*
 * All parts at once (for the simulator): idx[p], n[p] for p in 0..nparts-1 are
 * exactly what fmnist_partition(d, split, seed, p, nparts, ...) returns. The
 * caller provides the two arrays of nparts entries and frees each idx[p]. On
 * failure every idx[p] is NULL and n[p] is 0.
 */
int fmnist_partition_all(const struct fmnist *d, const char *split, uint64_t seed, int nparts,
                         uint32_t **idx, size_t *n, char *err, size_t errlen);

/*
 * Per-class example counts of a subset (counts[c] for c < FMNIST_CLASSES), e.g.
 * to derive a client's realised label shares. Returns 0, or -EINVAL when an
 * index is out of range or a label is >= 10 (counts then undefined).
 */
int fmnist_label_counts(const struct fmnist *d, const uint32_t *idx, size_t n,
                        size_t counts[FMNIST_CLASSES]);

#endif
