/*
 * Small helpers shared by the benchmark programs: a monotonic clock, medians,
 * aligned buffers, deterministic fill and the JSON line every measurement is
 * printed as (docs/performance.md, STYLE.md §6.10):
 *
 *   {"name": ..., "params": {...}, "value": V, "unit": U,
 *    "ref": {"name": ..., "value": R}, "ratio": V/R, ...extra}
 *
 * Header-only; single-threaded use (the JSON writer is not locked).
 */
#ifndef COH_BENCH_UTIL_H
#define COH_BENCH_UTIL_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static inline double bench_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* CPU time the whole host has spent so far, all cores, in seconds (user, nice,
 * system, irq and softirq of /proc/stat; not idle, iowait or steal). Differences
 * over a window say how many cores were busy: on a machine running only the
 * benchmark, whether a run was bound by CPU and how much CPU its work took. */
static inline double bench_host_busy_s(void)
{
    unsigned long long v[8] = {0};
    FILE *f = fopen("/proc/stat", "r");
    if (!f)
        return 0;
    int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
                   &v[4], &v[5], &v[6], &v[7]);
    fclose(f);
    if (n < 7)
        return 0;
    long hz = sysconf(_SC_CLK_TCK);
    return (double)(v[0] + v[1] + v[2] + v[5] + v[6]) / (double)(hz > 0 ? hz : 100);
}

static int bench_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Median of v[0..n) (sorts v). */
static inline double bench_median(double *v, size_t n)
{
    if (n == 0)
        return 0;
    qsort(v, n, sizeof *v, bench_cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* p-th percentile (0..100) of v[0..n), nearest rank (sorts v). */
static inline double bench_percentile(double *v, size_t n, double p)
{
    if (n == 0)
        return 0;
    qsort(v, n, sizeof *v, bench_cmp_double);
    size_t k = (size_t)(p / 100.0 * (double)n + 0.999999);
    if (k < 1)
        k = 1;
    if (k > n)
        k = n;
    return v[k - 1];
}

static inline void *bench_alloc(size_t bytes)
{
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) {
        fprintf(stderr, "bench: out of memory for %zu bytes\n", bytes);
        exit(1);
    }
    memset(p, 0, bytes);
    return p;
}

/* Deterministic small floats in [-0.01, 0.01) (an update's magnitude). */
static inline void bench_fill(float *x, size_t n, uint64_t seed)
{
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        x[i] = ((float)(s >> 40) / (float)(1u << 24) - 0.5f) * 0.02f;
    }
}

/* One JSON line on stdout, and appended to $COHORT_BENCH_OUT when set (the results
 * file docs/performance.md is made from). params and extra are JSON object bodies
 * without braces ("\"P\": 1000000"), either may be NULL; ref_name NULL: no reference. */
static inline void bench_json(const char *name, const char *params, double value,
                              const char *unit, const char *ref_name, double ref_value,
                              const char *extra_fmt, ...)
{
    char line[4096];
    size_t n = 0;
#define BJ_PUT(...)                                                                  \
    do {                                                                             \
        int k_ = snprintf(line + n, sizeof line - n, __VA_ARGS__);                   \
        if (k_ > 0)                                                                  \
            n = n + (size_t)k_ < sizeof line ? n + (size_t)k_ : sizeof line - 1;     \
    } while (0)
    BJ_PUT("{\"name\": \"%s\", \"params\": {%s}, \"value\": %.6g, \"unit\": \"%s\"", name,
           params ? params : "", value, unit);
    if (ref_name)
        BJ_PUT(", \"ref\": {\"name\": \"%s\", \"value\": %.6g}, \"ratio\": %.4f", ref_name,
               ref_value, ref_value > 0 ? value / ref_value : 0.0);
    if (extra_fmt && *extra_fmt) {
        char buf[2048];
        va_list ap;
        va_start(ap, extra_fmt);
        vsnprintf(buf, sizeof buf, extra_fmt, ap);
        va_end(ap);
        BJ_PUT(", %s", buf);
    }
    double la[1] = {0};
    FILE *lf = fopen("/proc/loadavg", "r");
    if (lf) {
        if (fscanf(lf, "%lf", &la[0]) != 1)
            la[0] = 0;
        fclose(lf);
    }
    BJ_PUT(", \"loadavg\": %.2f, \"nice\": %d}\n", la[0], getpriority(PRIO_PROCESS, 0));
#undef BJ_PUT
    fputs(line, stdout);
    fflush(stdout);
    const char *out = getenv("COHORT_BENCH_OUT");
    if (out && *out) {
        FILE *f = fopen(out, "a");
        if (f) {
            fputs(line, f);
            fclose(f);
        }
    }
}

#endif
