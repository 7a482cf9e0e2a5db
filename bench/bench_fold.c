/*
 * bench_fold: the strategy fold at memory speed (issue 5).
 *
 * For P = 1e5, 1e6, 1e7 float32 values it times, single-threaded and warm:
 *   fold_fedavg / fold_fedau  server/fold.c's fold_accumulate (OpenBLAS saxpy, one BLAS
 *                             thread as cohortd configures it) with the weight each
 *                             strategy passes (FedAvg: num_examples; FedAU: omega)
 *   ref axpy_c, triad_c       plain C loops over the same sizes (bench/ref_loops.c, -O3)
 * and, to show what else touches every update byte on the server:
 *   vc_moments                common/varcorr.c coh_vc_moments(x, delta) (variance correction)
 *   finite_chunk              the finite check of server/round.c round_on_chunk (replicated:
 *                             same loop, per 256 KiB chunk)
 *   finite_model              common/model.c coh_model_all_finite (finalize's check)
 *   memcpy                    the staging copy of round_on_chunk
 *   sha256                    the update checksum before XXH3 (OpenSSL EVP)
 *   xxh3                      the update checksum libcohort sends (common/checksum.c)
 *   aes128gcm / aes256gcm     TLS record decryption, 16 KiB records (EVP)
 * Every figure is GB/s (1e9 bytes/s) of update bytes (4 * P per pass), the median of
 * 11 samples, each sample at least ~64 MB of work; the folds' samples alternate with
 * axpy_c samples and their ratio uses the axpy median of that alternation. One JSON
 * line per measurement.
 *
 * usage: bench_fold [--sizes 100000,1000000,10000000] [--samples 11]
 */
#include <cblas.h>
#include "checksum.h"
#include <math.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "bench_aes.h"
#include "bench_util.h"
#include "fold.h"
#include "model.h"
#include "ref_loops.h"
#include "strategies/fedau.h"
#include "varcorr.h"

enum kern {
    K_FEDAVG, K_FEDAU, K_AXPY, K_TRIAD, K_MOMENTS, K_FINITE_CHUNK, K_FINITE_MODEL, K_MEMCPY,
    K_SHA256,
    K_XXH3
};

struct arrays {
    size_t n;
    float *acc, *delta, *x, *out;
    float w_fedavg, w_fedau;
    struct coh_model model;  /* wraps delta for coh_model_all_finite */
    EVP_MD_CTX *md;
    double sink;
};

/* The finite check exactly as server/round.c round_on_chunk runs it, chunk by chunk. */
static int finite_like_round(const float *buf, size_t n, size_t chunk_floats)
{
    size_t checked = 0;
    while (checked < n) {
        size_t upto = checked + chunk_floats < n ? checked + chunk_floats : n;
        for (size_t i = checked; i < upto; i++) {
            if (!isfinite(buf[i]))
                return 0;
        }
        checked = upto;
    }
    return 1;
}

static void run(struct arrays *a, enum kern k)
{
    size_t n = a->n;
    switch (k) {
    case K_FEDAVG: fold_accumulate(a->acc, a->delta, n, a->w_fedavg); break;
    case K_FEDAU: fold_accumulate(a->acc, a->delta, n, a->w_fedau); break;
    case K_AXPY: ref_axpy(a->acc, a->delta, n, a->w_fedavg); break;
    case K_TRIAD: ref_triad(a->out, a->x, a->delta, n, 0.5f); break;
    case K_MOMENTS: {
        double m, v;
        coh_vc_moments(a->x, a->delta, n, &m, &v);
        a->sink += m + v;
        break;
    }
    case K_FINITE_CHUNK: a->sink += finite_like_round(a->delta, n, (256u << 10) / 4); break;
    case K_FINITE_MODEL: a->sink += coh_model_all_finite(&a->model); break;
    case K_MEMCPY: memcpy(a->out, a->delta, n * 4); break;
    case K_XXH3: {
        uint8_t d[COH_XXH_LEN];
        coh_xxh128(a->delta, n * 4, d);
        a->sink += d[0];
        break;
    }
    case K_SHA256: {
        uint8_t d[32];
        unsigned dl;
        EVP_DigestInit_ex(a->md, EVP_sha256(), NULL);
        EVP_DigestUpdate(a->md, a->delta, n * 4);
        EVP_DigestFinal_ex(a->md, d, &dl);
        a->sink += d[0];
        break;
    }
    }
}

/* Median GB/s of update bytes over `samples` samples of `calls` passes each. */
static double measure(struct arrays *a, enum kern k, int samples)
{
    size_t bytes = a->n * 4;
    size_t calls = (64u << 20) / bytes;
    if (calls < 1)
        calls = 1;
    run(a, k); /* warm: page faults, caches, BLAS dispatch */
    double *gbps = calloc((size_t)samples, sizeof *gbps);
    for (int s = 0; s < samples; s++) {
        double t0 = bench_now();
        for (size_t c = 0; c < calls; c++)
            run(a, k);
        double dt = bench_now() - t0;
        gbps[s] = (double)bytes * (double)calls / dt / 1e9;
    }
    double med = bench_median(gbps, (size_t)samples);
    free(gbps);
    return med;
}

/* Median GB/s of k and of the reference r, sampled alternately (k, r, k, r, ...) so
 * that both see the same machine: on a shared host the memory bandwidth left to
 * one core drifts from second to second. */
static void measure_pair(struct arrays *a, enum kern k, enum kern r, int samples, double *vk,
                         double *vr)
{
    size_t bytes = a->n * 4;
    size_t calls = (64u << 20) / bytes;
    if (calls < 1)
        calls = 1;
    run(a, k);
    run(a, r);
    double *gk = calloc((size_t)samples, sizeof *gk);
    double *gr = calloc((size_t)samples, sizeof *gr);
    for (int s = 0; s < samples; s++) {
        for (int w = 0; w < 2; w++) {
            enum kern which = w == 0 ? k : r;
            double t0 = bench_now();
            for (size_t c = 0; c < calls; c++)
                run(a, which);
            double g = (double)bytes * (double)calls / (bench_now() - t0) / 1e9;
            (w == 0 ? gk : gr)[s] = g;
        }
    }
    *vk = bench_median(gk, (size_t)samples);
    *vr = bench_median(gr, (size_t)samples);
    free(gk);
    free(gr);
}

static void parse_sizes(const char *s, size_t *sizes, int *nsizes)
{
    *nsizes = 0;
    while (*s && *nsizes < 8) {
        char *end;
        double v = strtod(s, &end);
        if (end == s)
            break;
        sizes[(*nsizes)++] = (size_t)v;
        s = *end == ',' ? end + 1 : end;
    }
}

int main(int argc, char **argv)
{
    size_t sizes[8] = {100000, 1000000, 10000000};
    int nsizes = 3, samples = 11;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--sizes") == 0 && i + 1 < argc)
            parse_sizes(argv[++i], sizes, &nsizes);
        else if (strcmp(argv[i], "--samples") == 0 && i + 1 < argc)
            samples = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: bench_fold [--sizes P1,P2,...] [--samples N]\n");
            return 2;
        }
    }
    if (samples < 1)
        samples = 1;
    /* On a shared machine COHORT_BENCH_NICE=-10 puts this process ahead of other work. */
    const char *nv = getenv("COHORT_BENCH_NICE");
    if (nv && *nv && atoi(nv) != 0) {
        /* With autogroups, nice ranks processes only inside one session: become one
         * and set its autogroup's nice as well (bench_server.py does the same). */
        (void)setsid();
        FILE *ag = fopen("/proc/self/autogroup", "w");
        if (ag) {
            fprintf(ag, "%d", atoi(nv));
            fclose(ag);
        }
        if (setpriority(PRIO_PROCESS, 0, atoi(nv)) < 0)
            perror("bench_fold: setpriority");
    }
    /* cohortd folds on one pool thread with one BLAS thread (server/main.c). */
    openblas_set_num_threads(1);
    struct fedau_client fc = {.m = 3, .s = 0, .omega = 2.5};

    for (int si = 0; si < nsizes; si++) {
        size_t n = sizes[si];
        struct arrays a = {.n = n};
        a.acc = bench_alloc(n * 4);
        a.delta = bench_alloc(n * 4);
        a.x = bench_alloc(n * 4);
        a.out = bench_alloc(n * 4);
        bench_fill(a.delta, n, 1);
        bench_fill(a.x, n, 2);
        a.w_fedavg = 600.0f; /* num_examples of a typical client */
        a.w_fedau = (float)fedau_weight(&fc);
        a.md = EVP_MD_CTX_new();
        coh_model_init(&a.model);
        a.model.numel = n;
        a.model.data = a.delta;

        char params[128];
        snprintf(params, sizeof params, "\"P\": %zu, \"MB\": %.1f", n, n * 4 / 1e6);
        double axpy = measure(&a, K_AXPY, samples);
        double triad = measure(&a, K_TRIAD, samples);
        bench_json("ref_axpy_c", params, axpy, "GB/s", NULL, 0, NULL);
        bench_json("ref_triad_c", params, triad, "GB/s", NULL, 0, NULL);
        static const struct {
            enum kern k;
            const char *name;
        } ks[] = {{K_FEDAVG, "fold_fedavg"}, {K_FEDAU, "fold_fedau"}};
        for (size_t i = 0; i < sizeof ks / sizeof ks[0]; i++) {
            memset(a.acc, 0, n * 4);
            double v, ref;
            measure_pair(&a, ks[i].k, K_AXPY, samples, &v, &ref);
            bench_json(ks[i].name, params, v, "GB/s", "axpy_c", ref,
                       "\"ratio_triad\": %.4f, \"target_ratio\": 0.8, \"met\": %s, "
                       "\"sampling\": \"alternating with the reference\"",
                       triad > 0 ? v / triad : 0, v / ref >= 0.8 ? "true" : "false");
        }
        static const struct {
            enum kern k;
            const char *name;
        } side[] = {{K_MOMENTS, "vc_moments"},     {K_FINITE_CHUNK, "finite_chunk"},
                    {K_FINITE_MODEL, "finite_model"}, {K_MEMCPY, "memcpy"},
                    {K_SHA256, "sha256"}, {K_XXH3, "xxh3"}};
        for (size_t i = 0; i < sizeof side / sizeof side[0]; i++) {
            double v = measure(&a, side[i].k, samples);
            bench_json(side[i].name, params, v, "GB/s", "axpy_c", axpy, NULL);
        }
        if (a.sink == 12345.678)
            puts("");
        EVP_MD_CTX_free(a.md);
        free(a.acc);
        free(a.delta);
        free(a.x);
        free(a.out);
    }
    /* TLS decryption per byte, for the ingest budget (docs/performance.md). */
    static const struct {
        const char *name;
        size_t rec;
    } aes[] = {{"aes128gcm_decrypt", 16384}, {"aes128gcm_decrypt", 1u << 20},
               {"aes256gcm_decrypt", 16384}};
    for (size_t i = 0; i < sizeof aes / sizeof aes[0]; i++) {
        const EVP_CIPHER *c = strncmp(aes[i].name, "aes128", 6) == 0 ? EVP_aes_128_gcm()
                                                                      : EVP_aes_256_gcm();
        double g = bench_gcm_decrypt_gbps(c, aes[i].rec, 1ull << 30);
        char params[64];
        snprintf(params, sizeof params, "\"record_bytes\": %zu", aes[i].rec);
        bench_json(aes[i].name, params, g, "GB/s", NULL, 0, NULL);
    }
    return 0;
}
