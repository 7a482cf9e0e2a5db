/*
 * edge_client: the smallest useful device program built on libcohort.
 *
 * It joins a federation over mutual TLS and, in every round it is offered,
 * either trains a softmax-regression model on a local CSV file (plain C loops,
 * no BLAS) or sends a fixed update read from a raw float32 file (what the edge
 * test uses to check the server's checkpoints exactly). Everything it needs is
 * libcohort, libc and libm; everything it keeps lives in main()'s `struct app`
 * (no global state beyond OpenSSL's), and SIGINT/SIGTERM are taken by a thread
 * that calls cohort_client_stop(), the library's any-thread stop.
 *
 * Data file (--data): one example per line, "label,x1,x2,...,xD"; the label is
 * an integer class 0..C-1, the features are numbers. Blank lines and lines that
 * start with '#' are skipped; every example must have the same D.
 *
 * Model: exactly two tensors, a weight [C, D] and a bias [C] (any names, either
 * order), as a PyTorch nn.Linear(D, C) state dict saved as safetensors gives.
 *
 * Update file (--update): numel little-endian float32 values, the update
 * (trained minus global) in the order of the model's tensors; its size must
 * match the model exactly or the round is declined.
 *
 * Training keeps one copy of the model (cohort_opts_set_single_buffer): the
 * model is trained where it was received and the trained weights are sent; the
 * server takes the difference. A fixed update is sent from its own buffer.
 *
 * At exit it prints its counters and its peak resident set size (VmHWM; under
 * qemu-user that figure is the emulator's, guest memory included).
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "cohort.h"

/* Training set: n examples of d features, row-major. */
struct dataset {
    size_t n, d;
    float *x;
    uint32_t *y;
    uint32_t max_label;
};

struct app {
    /* --data: softmax regression trained with per-example SGD. */
    struct dataset data;
    uint32_t epochs;
    float lr;
    uint64_t rng;               /* xorshift64* state for the shuffle */
    size_t *order;              /* data.n indices */
    float *probs;               /* C scratch values */
    size_t probs_cap;

    /* --update: the same update every round. */
    float *update;
    size_t update_numel;
    uint64_t examples;

    int verbose;
};

static void usage(FILE *f)
{
    fprintf(f,
            "usage: edge_client --server HOST:PORT --ca CA.pem --cert CLIENT.pem --key CLIENT.key\n"
            "                   (--data FILE.csv [--epochs N] [--lr X] [--seed N]\n"
            "                    | --update FILE.f32 --examples N)\n"
            "                   [--server-name NAME] [--once] [--max-attempts N]\n"
            "                   [--chunk-bytes N] [--verbose]\n"
            "\n"
            "  --data FILE       train a softmax regression (model: weight [C,D], bias [C]) on\n"
            "                    lines \"label,x1,...,xD\" (label 0..C-1); default 1 epoch, lr 0.05\n"
            "  --update FILE     send this fixed update every round: raw little-endian float32,\n"
            "                    one value per model parameter in tensor order\n"
            "  --examples N      the FedAvg weight sent with --update\n"
            "  --once            take part in one round, then exit\n"
            "  --max-attempts N  give up after N failed connection attempts in a row (default 0:\n"
            "                    never)\n"
            "  --chunk-bytes N   payload bytes per update chunk frame (default 262144)\n"
            "  --verbose         print the library's log lines\n");
}

/* ---- small parsers ------------------------------------------------------ */

static int parse_u64(const char *opt, const char *s, uint64_t lo, uint64_t hi, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-' || v < lo || v > hi) {
        fprintf(stderr, "edge_client: %s must be an integer in %" PRIu64 "..%" PRIu64 "\n", opt,
                lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_float(const char *opt, const char *s, float lo, float hi, float *out)
{
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "edge_client: %s must be a number in %g..%g\n", opt, (double)lo,
                (double)hi);
        return -1;
    }
    *out = v;
    return 0;
}

/* Makes room for `need` elements of `size` bytes in the array p with capacity
 * *cap, doubling it. Returns the array (maybe moved), or NULL with p untouched. */
static void *grow(void *p, size_t *cap, size_t need, size_t size)
{
    if (need <= *cap)
        return p;
    size_t n = *cap ? *cap : 256;
    while (n < need) {
        if (n > SIZE_MAX / 2 / size)
            return NULL;
        n *= 2;
    }
    void *q = realloc(p, n * size);
    if (q)
        *cap = n;
    return q;
}

/* Reads the CSV training set. Strict: a bad line is an error naming it. */
static int load_csv(const char *path, struct dataset *ds)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "edge_client: cannot open the data file '%s': %s\n", path,
                strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t linecap = 0, xcap = 0, ycap = 0, lineno = 0;
    ssize_t len;
    int rc = -1;
    memset(ds, 0, sizeof *ds);
    while ((len = getline(&line, &linecap, f)) >= 0) {
        lineno++;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        const char *p = line + strspn(line, " \t");
        if (*p == '\0' || *p == '#')
            continue;
        char *end;
        errno = 0;
        unsigned long label = strtoul(p, &end, 10);
        if (errno || end == p || *p == '-' || label > 65535 || *end != ',') {
            fprintf(stderr, "edge_client: %s:%zu: expected \"label,x1,...\" with an integer "
                            "label 0..65535\n", path, lineno);
            goto out;
        }
        size_t d = 0;
        p = end;
        while (*p == ',') {
            p++;
            errno = 0;
            float v = strtof(p, &end);
            if (errno || end == p || !isfinite(v)) {
                fprintf(stderr, "edge_client: %s:%zu: feature %zu is not a finite number\n", path,
                        lineno, d + 1);
                goto out;
            }
            float *nx = grow(ds->x, &xcap, ds->n * ds->d + d + 1, sizeof *ds->x);
            if (!nx) {
                fprintf(stderr, "edge_client: %s: out of memory\n", path);
                goto out;
            }
            ds->x = nx;
            ds->x[(ds->n ? ds->n * ds->d : 0) + d] = v;
            d++;
            p = end + strspn(end, " \t");
        }
        if (*p != '\0') {
            fprintf(stderr, "edge_client: %s:%zu: unexpected text after feature %zu\n", path,
                    lineno, d);
            goto out;
        }
        if (ds->n == 0) {
            ds->d = d;
        } else if (d != ds->d) {
            fprintf(stderr, "edge_client: %s:%zu: %zu features, but the first example has %zu\n",
                    path, lineno, d, ds->d);
            goto out;
        }
        uint32_t *ny = grow(ds->y, &ycap, ds->n + 1, sizeof *ds->y);
        if (!ny) {
            fprintf(stderr, "edge_client: %s: out of memory\n", path);
            goto out;
        }
        ds->y = ny;
        ds->y[ds->n++] = (uint32_t)label;
        if (label > ds->max_label)
            ds->max_label = (uint32_t)label;
    }
    if (ferror(f)) {
        fprintf(stderr, "edge_client: cannot read '%s': %s\n", path, strerror(errno));
        goto out;
    }
    if (ds->n == 0) {
        fprintf(stderr, "edge_client: %s holds no examples\n", path);
        goto out;
    }
    rc = 0;
out:
    free(line);
    fclose(f);
    if (rc < 0) {
        free(ds->x);
        free(ds->y);
        memset(ds, 0, sizeof *ds);
    }
    return rc;
}

/* Reads a raw little-endian float32 file; every value must be finite. */
static int load_f32(const char *path, float **out, size_t *numel)
{
    FILE *f = fopen(path, "rb");
    struct stat st;
    if (!f || fstat(fileno(f), &st) < 0) {
        fprintf(stderr, "edge_client: cannot open the update file '%s': %s\n", path,
                strerror(errno));
        if (f)
            fclose(f);
        return -1;
    }
    if (st.st_size <= 0 || st.st_size % 4 != 0 || (uint64_t)st.st_size > SIZE_MAX / 2) {
        fprintf(stderr, "edge_client: %s has %lld bytes; a float32 update needs a positive "
                        "multiple of 4\n", path, (long long)st.st_size);
        fclose(f);
        return -1;
    }
    size_t n = (size_t)st.st_size / 4;
    uint8_t *raw = malloc(n * 4);
    float *v = malloc(n * sizeof *v);
    if (!raw || !v || fread(raw, 4, n, f) != n) {
        fprintf(stderr, "edge_client: cannot read '%s': %s\n", path,
                raw && v ? "short read" : "out of memory");
        free(raw);
        free(v);
        fclose(f);
        return -1;
    }
    fclose(f);
    for (size_t i = 0; i < n; i++) {
        /* Assemble from bytes, so the file reads the same on any host byte order. */
        uint32_t u = (uint32_t)raw[4 * i] | (uint32_t)raw[4 * i + 1] << 8 |
                     (uint32_t)raw[4 * i + 2] << 16 | (uint32_t)raw[4 * i + 3] << 24;
        memcpy(&v[i], &u, 4);
        if (!isfinite(v[i])) {
            fprintf(stderr, "edge_client: %s: value %zu is not finite\n", path, i);
            free(raw);
            free(v);
            return -1;
        }
    }
    free(raw);
    *out = v;
    *numel = n;
    return 0;
}

/* ---- training ----------------------------------------------------------- */

static uint64_t next_rand(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

static void decline(struct cohort_round *r, const char *why)
{
    fprintf(stderr, "edge_client: round %" PRIu64 ": %s; declining\n", r->round, why);
    snprintf(r->decline_reason, sizeof r->decline_reason, "%s", why);
    r->decline = 1;
}

/* One round of softmax regression: `epochs` passes of per-example SGD over the
 * shuffled data, on r->params in place; the loss reported is the last pass's
 * mean, each example's taken before its step. Memory beyond the model: C floats. */
static int train_softmax(struct app *a, struct cohort_round *r)
{
    if (r->ntensors != 2) {
        decline(r, "the model is not a softmax regression (weight [C,D], bias [C])");
        return 0;
    }
    /* The weight and the bias, in whichever order the model file has them. */
    int wi = r->tensors[0].ndim == 2 ? 0 : 1;
    const struct cohort_tensor_info *tw = &r->tensors[wi], *tb = &r->tensors[1 - wi];
    if (tw->ndim != 2 || tb->ndim != 1 || tb->shape[0] != tw->shape[0] ||
        tw->shape[0] < 2 || tw->shape[1] == 0) {
        decline(r, "the model is not a softmax regression (weight [C,D], bias [C])");
        return 0;
    }
    /* numel fits in size_t (the library checked), so each dimension does too. */
    size_t C = (size_t)tw->shape[0], D = (size_t)tw->shape[1];
    char why[128];
    if (D != a->data.d || a->data.max_label >= C) {
        snprintf(why, sizeof why, "the data (%zu features, labels up to %" PRIu32 ") does not "
                 "fit the model (%zu features, %zu classes)", a->data.d, a->data.max_label, D, C);
        decline(r, why);
        return 0;
    }
    float *np = grow(a->probs, &a->probs_cap, C, sizeof *a->probs);
    if (!np)
        return COHORT_ENOMEM;
    a->probs = np;
    float *W = r->params + tw->offset, *b = r->params + tb->offset, *p = a->probs;
    size_t n = a->data.n;
    double loss = 0;
    for (uint32_t e = 0; e < a->epochs; e++) {
        /* Fisher-Yates; a fresh order every epoch. */
        for (size_t i = n - 1; i > 0; i--) {
            size_t j = (size_t)(next_rand(&a->rng) % (i + 1));
            size_t t = a->order[i];
            a->order[i] = a->order[j];
            a->order[j] = t;
        }
        loss = 0;
        for (size_t k = 0; k < n; k++) {
            size_t i = a->order[k];
            const float *x = a->data.x + i * D;
            uint32_t y = a->data.y[i];
            float mx = -INFINITY;
            for (size_t c = 0; c < C; c++) {
                const float *w = W + c * D;
                float z = b[c];
                for (size_t j = 0; j < D; j++)
                    z += w[j] * x[j];
                p[c] = z;
                if (z > mx)
                    mx = z;
            }
            float sum = 0;
            for (size_t c = 0; c < C; c++) {
                p[c] = expf(p[c] - mx);
                sum += p[c];
            }
            loss -= log((double)(p[y] / sum) + 1e-30);
            /* Cross-entropy gradient w.r.t. the logits is p - onehot(y). */
            for (size_t c = 0; c < C; c++) {
                float g = (p[c] / sum - (c == y ? 1.0f : 0.0f)) * a->lr;
                float *w = W + c * D;
                for (size_t j = 0; j < D; j++)
                    w[j] -= g * x[j];
                b[c] -= g;
            }
        }
    }
    /* A learning rate too large for the data diverges; the server would reject
     * the NaNs anyway, a decline says why. */
    for (size_t i = 0; i < C * D + C; i++) {
        if (!isfinite(i < C * D ? W[i] : b[i - C * D])) {
            decline(r, "training diverged (non-finite weights); lower --lr");
            return 0;
        }
    }
    r->num_examples = n;
    r->train_loss = loss / (double)n;
    printf("round %" PRIu64 ": trained on %zu examples, %" PRIu32 " epoch(s), loss %.6f\n",
           r->round, n, a->epochs, r->train_loss);
    fflush(stdout);
    return 0;
}

static int train_cb(struct cohort_round *r, void *user)
{
    struct app *a = user;
    if (!a->update)
        return train_softmax(a, r);
    if (r->numel != a->update_numel) {
        char why[128];
        snprintf(why, sizeof why, "the update file holds %zu values, the model %zu",
                 a->update_numel, r->numel);
        decline(r, why);
        return 0;
    }
    r->params = a->update; /* sent from here, no copy */
    r->out_is_update = 1;
    r->num_examples = a->examples;
    printf("round %" PRIu64 ": sending the fixed update (%zu values, %" PRIu64 " examples)\n",
           r->round, r->numel, a->examples);
    fflush(stdout);
    return 0;
}

/* ---- library callbacks and signals --------------------------------------- */

static void log_cb(int level, const char *line, void *user)
{
    static const char *const names[] = {"ERR", "WARN", "NOTICE", "INFO", "DEBUG"};
    fprintf(stderr, "libcohort %s: %s\n", names[level >= 0 && level <= 4 ? level : 4], line);
}

static void event_cb(const struct cohort_event *ev, void *user)
{
    switch (ev->kind) {
    case COHORT_EV_CONNECTED:
        printf("connected as '%s'\n", ev->name);
        break;
    case COHORT_EV_ROUND_RESULT:
        printf("round %" PRIu64 " committed: %" PRIu32 " participant(s), mean loss %g\n",
               ev->round, ev->participants, ev->train_loss);
        break;
    case COHORT_EV_UPDATE_ACK:
        if (ev->err)
            printf("round %" PRIu64 ": update refused: %s\n", ev->round,
                   ev->message && *ev->message ? ev->message : cohort_strerror(ev->err));
        break;
    case COHORT_EV_RUN_END:
        printf("the run is over after round %" PRIu64 "\n", ev->round);
        break;
    default:
        break;
    }
    fflush(stdout);
}

/* Waits for SIGINT/SIGTERM (blocked in every thread) and stops the client. */
static void *signal_thread(void *arg)
{
    cohort_client *c = arg;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    int sig;
    if (sigwait(&set, &sig) == 0)
        cohort_client_stop(c);
    return NULL;
}

/* Peak resident set size of this program image. Linux keeps getrusage's
 * ru_maxrss across execve (it would report the parent's peak if that was
 * larger), so VmHWM of /proc/self/status comes first. */
static long peak_rss_kib(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kib = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %ld kB", &kib) == 1)
            break;
    if (f)
        fclose(f);
    if (kib < 0) {
        struct rusage ru;
        kib = getrusage(RUSAGE_SELF, &ru) == 0 ? ru.ru_maxrss : -1;
    }
    return kib;
}

/* ---- main ----------------------------------------------------------------- */

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"server", 1, 0, 'S'}, {"ca", 1, 0, 'A'}, {"cert", 1, 0, 'C'}, {"key", 1, 0, 'K'},
        {"server-name", 1, 0, 'N'}, {"data", 1, 0, 'd'}, {"epochs", 1, 0, 'E'},
        {"lr", 1, 0, 'l'}, {"seed", 1, 0, 's'}, {"update", 1, 0, 'u'}, {"examples", 1, 0, 'e'},
        {"once", 0, 0, 'o'}, {"max-attempts", 1, 0, 'm'}, {"chunk-bytes", 1, 0, 'c'},
        {"verbose", 0, 0, 'v'}, {"help", 0, 0, 'h'}, {0, 0, 0, 0}};
    const char *server = NULL, *ca = NULL, *cert = NULL, *key = NULL, *sname = NULL;
    const char *data = NULL, *update = NULL;
    uint64_t epochs = 1, seed = 1, max_attempts = 0, chunk = 0;
    int once = 0, have_examples = 0, o;
    struct app a;
    memset(&a, 0, sizeof a);
    a.lr = 0.05f;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'S': server = optarg; break;
        case 'A': ca = optarg; break;
        case 'C': cert = optarg; break;
        case 'K': key = optarg; break;
        case 'N': sname = optarg; break;
        case 'd': data = optarg; break;
        case 'u': update = optarg; break;
        case 'E':
            if (parse_u64("--epochs", optarg, 1, 100000, &epochs) < 0)
                return 2;
            break;
        case 'l':
            if (parse_float("--lr", optarg, 0.0f, 100.0f, &a.lr) < 0)
                return 2;
            break;
        case 's':
            if (parse_u64("--seed", optarg, 0, UINT64_MAX, &seed) < 0)
                return 2;
            break;
        case 'e':
            if (parse_u64("--examples", optarg, 0, UINT64_MAX, &a.examples) < 0)
                return 2;
            have_examples = 1;
            break;
        case 'o': once = 1; break;
        case 'm':
            if (parse_u64("--max-attempts", optarg, 0, UINT32_MAX, &max_attempts) < 0)
                return 2;
            break;
        case 'c':
            if (parse_u64("--chunk-bytes", optarg, 1024, 64u << 20, &chunk) < 0)
                return 2;
            break;
        case 'v': a.verbose = 1; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc || !server || !ca || !cert || !key || (!data) == (!update) ||
        (update && !have_examples)) {
        fprintf(stderr, "edge_client: need --server, --ca, --cert, --key and either --data or "
                        "--update with --examples\n");
        usage(stderr);
        return 2;
    }
    a.epochs = (uint32_t)epochs;
    a.rng = seed * 0x9E3779B97F4A7C15ull + 1;
    if (update) {
        if (load_f32(update, &a.update, &a.update_numel) < 0)
            return 1;
    } else {
        if (load_csv(data, &a.data) < 0)
            return 1;
        a.order = malloc(a.data.n * sizeof *a.order);
        if (!a.order) {
            fprintf(stderr, "edge_client: out of memory\n");
            free(a.data.x);
            free(a.data.y);
            return 1;
        }
        for (size_t i = 0; i < a.data.n; i++)
            a.order[i] = i;
        a.examples = a.data.n;
    }

    cohort_opts *op = NULL;
    cohort_client *c = NULL;
    int rc;
    if ((rc = cohort_opts_new(&op)) < 0 || (rc = cohort_opts_set_server(op, server)) < 0 ||
        (rc = cohort_opts_set_tls(op, ca, cert, key)) < 0 ||
        (sname && (rc = cohort_opts_set_server_name(op, sname)) < 0) ||
        (rc = cohort_opts_set_num_examples(op, a.examples)) < 0 ||
        (rc = cohort_opts_set_once(op, once)) < 0 ||
        /* One model copy: training works in place and sends the trained weights;
         * a fixed update needs no copy of the global model at all. */
        (rc = cohort_opts_set_single_buffer(op, a.update == NULL)) < 0 ||
        (rc = cohort_opts_set_prefill(op, a.update == NULL)) < 0 ||
        (rc = cohort_opts_set_reconnect(op, 100, 5000, (uint32_t)max_attempts)) < 0 ||
        (chunk && (rc = cohort_opts_set_chunk_bytes(op, (uint32_t)chunk)) < 0) ||
        (rc = cohort_opts_set_log(op, log_cb, NULL,
                                  a.verbose ? COHORT_LOG_INFO : COHORT_LOG_WARN)) < 0 ||
        (rc = cohort_opts_set_event_fn(op, event_cb, NULL)) < 0 ||
        (rc = cohort_client_new(&c, op)) < 0) {
        fprintf(stderr, "edge_client: cannot set up the client: %s\n", cohort_strerror(rc));
        cohort_opts_free(op);
        rc = 1;
        goto out;
    }
    cohort_opts_free(op);

    /* Block the stop signals here so every thread inherits the mask and only
     * the signal thread (sigwait) receives them. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    pthread_t th;
    int have_thread = pthread_create(&th, NULL, signal_thread, c) == 0;

    rc = cohort_client_run(c, train_cb, &a);
    if (rc < 0 && rc != COHORT_ECANCELED)
        fprintf(stderr, "edge_client: %s: %s\n", cohort_strerror(rc),
                cohort_client_last_error(c));
    if (have_thread) {
        /* The signal thread is parked in sigwait(); wake it with its own signal. */
        pthread_kill(th, SIGTERM);
        pthread_join(th, NULL);
    }
    struct cohort_stats st;
    cohort_client_stats(c, &st);
    cohort_client_free(c);
    printf("edge_client: %" PRIu64 " round(s) offered, %" PRIu64 " update(s) sent, %" PRIu64
           " accepted, %" PRIu64 " decline(s), %" PRIu64 " connect(s); peak RSS %ld KiB\n",
           st.rounds_offered, st.updates_sent, st.updates_accepted, st.declines_sent,
           st.connects, peak_rss_kib());
    rc = rc == 0 ? 0 : rc == COHORT_ECANCELED ? 130 : 1;
out:
    free(a.update);
    free(a.data.x);
    free(a.data.y);
    free(a.order);
    free(a.probs);
    return rc;
}
