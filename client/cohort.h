/*
 * libcohort: the cohort client library for edge devices.
 *
 * A blocking API: cohort_client_run() connects to a cohortd over mutual TLS,
 * receives each round's global model, calls the user's training callback, sends
 * the update (trained minus received model) and repeats, reconnecting with
 * exponential back-off and jitter when the link or the server goes away. It
 * never exits the process and keeps no global state beyond what OpenSSL needs,
 * so several clients may live in one process (one thread each).
 *
 * Errors: every function that can fail returns 0 (or a documented count) on
 * success and a negative COHORT_E* code (cohort_err.h) on failure;
 * cohort_strerror() turns one into a sentence, cohort_client_last_error() gives
 * the detailed message of the last failure on that handle.
 */
#ifndef COHORT_H
#define COHORT_H

#include <stddef.h>
#include <stdint.h>

#include "cohort_err.h"

#define COHORT_VERSION_MAJOR 0
#define COHORT_VERSION_MINOR 1
#define COHORT_VERSION_PATCH 0

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cohort_client cohort_client;
typedef struct cohort_opts cohort_opts;

/* One tensor of the model, in the order the server sent the table. */
struct cohort_tensor_info {
    const char *name;
    int ndim;
    const uint64_t *shape;
    size_t offset;              /* index of the first element in the flat arrays */
    size_t numel;
};

/* What the training callback gets for one round. Valid only during the callback. */
struct cohort_round {
    uint64_t round;
    size_t ntensors;
    const struct cohort_tensor_info *tensors;
    size_t numel;               /* total float32 values in the model */
    const float *global;        /* the global model (read-only) */

    /* In: a copy of global (unless cohort_opts_set_prefill(o, 0)). Out: the
     * trained model (default), or the update itself when the callback sets
     * out_is_update = 1. The callback may point params at a buffer of its own
     * (numel floats); it is read before the callback is called again, not kept,
     * and an update there is sent from it without a copy. */
    float *params;
    int out_is_update;
    uint64_t num_examples;      /* out: examples trained on (the FedAvg weight) */
    double train_loss;          /* out: mean training loss, NAN if unknown */
    int decline;                /* out: 1 = do not take part in this round */
    char decline_reason[128];   /* out, optional */

    /* Evaluators (cohort_opts_set_role(o, COHORT_ROLE_EVALUATOR)): */
    int evaluate;               /* in: 1 = test `global` and report metrics; do not train */
    uint64_t model_round;       /* in: the committed round that produced `global` */
    size_t nmetrics;            /* out: filled by cohort_round_add_metric() */
    struct cohort_metric {
        char name[64];
        double value;
    } metrics[16];
};

/* Training callback. Return 0 to send the update (or the decline the callback
 * asked for); a negative value declines the round with a reason naming it. */
typedef int (*cohort_train_fn)(struct cohort_round *r, void *user);

/* Log callback; line is one whole message without a newline. Without one the
 * library logs nothing. */
typedef void (*cohort_log_fn)(int level, const char *line, void *user);
enum cohort_log_level {
    COHORT_LOG_ERR = 0,
    COHORT_LOG_WARN,
    COHORT_LOG_NOTICE,
    COHORT_LOG_INFO,
    COHORT_LOG_DEBUG
};

/* Events the library reports while it runs (optional). */
enum cohort_event_kind {
    COHORT_EV_CONNECTED = 1,    /* handshake and Welcome done; name = our identity */
    COHORT_EV_DISCONNECTED,     /* err = why */
    COHORT_EV_ROUND_RESULT,     /* a round was committed: round, participants, loss */
    COHORT_EV_UPDATE_ACK,       /* our update was accepted (err 0) or refused (err, message) */
    COHORT_EV_RUN_END           /* the server ended the run */
};
struct cohort_event {
    int kind;
    uint64_t round;
    uint32_t participants;
    double train_loss;
    int err;
    const char *name;
    const char *message;
};
typedef void (*cohort_event_fn)(const struct cohort_event *ev, void *user);

struct cohort_stats {
    uint64_t rounds_offered, updates_sent, updates_accepted, declines_sent;
    uint64_t connects, bytes_in, bytes_out, last_round;
};

COHORT_API const char *cohort_version(void);

/* Options: build once, pass to cohort_client_new (which copies them). */
COHORT_API int cohort_opts_new(cohort_opts **out);
COHORT_API void cohort_opts_free(cohort_opts *o);
/* "host:port", "[v6]:port". Required. */
COHORT_API int cohort_opts_set_server(cohort_opts *o, const char *host_port);
/* PEM files: the federation CA, this client's certificate and key. Required
 * for mutual TLS (cert/key may be NULL to connect without a client identity,
 * which a default server refuses). */
COHORT_API int cohort_opts_set_tls(cohort_opts *o, const char *ca, const char *cert,
                                   const char *key);
/* Name to verify in the server certificate; default: the host of set_server. */
COHORT_API int cohort_opts_set_server_name(cohort_opts *o, const char *name);
/* Size of the local data set, sent in Hello (informational). */
COHORT_API int cohort_opts_set_num_examples(cohort_opts *o, uint64_t n);
/* Back-off between reconnects: starts at initial_ms, doubles up to max_ms,
 * with +-25% jitter; max_attempts consecutive failures end the run with the
 * last error (0 = never give up). Defaults 200 ms, 10 s, 0. */
COHORT_API int cohort_opts_set_reconnect(cohort_opts *o, uint32_t initial_ms, uint32_t max_ms,
                                         uint32_t max_attempts);
/* 1: return after taking part in one round (update acknowledged or decline sent). */
COHORT_API int cohort_opts_set_once(cohort_opts *o, int once);
/* 1 (default): params start each round as a copy of global, for training in
 * place. 0: params are not filled (their contents are unspecified), for
 * callbacks that write a whole update into params or point params at their own
 * buffer: that saves copying the model once per round. */
COHORT_API int cohort_opts_set_prefill(cohort_opts *o, int prefill);
/* 1: keep one copy of the model instead of two. The model is received into
 * params (r->global then points at the same buffer: read it before training
 * changes it), the callback trains in place, and the trained weights are sent
 * as they are; the server subtracts the global model. Updates the callback
 * gives (out_is_update) are sent as usual. Halves the client's model memory.
 * With a server that does not announce RoundOffer.accepts_weights (an older
 * cohortd) the library keeps two copies, as without the option. Default 0. */
COHORT_API int cohort_opts_set_single_buffer(cohort_opts *o, int single);
/* Largest frame accepted from the server (default 8 MiB) and largest model
 * (default 1 GiB); both are checked before allocating. */
COHORT_API int cohort_opts_set_limits(cohort_opts *o, uint32_t max_frame_bytes,
                                      uint64_t max_model_bytes);
/* Payload bytes per update chunk frame (default 256 KiB). */
COHORT_API int cohort_opts_set_chunk_bytes(cohort_opts *o, uint32_t bytes);
/* Connect timeout and the silence after which the link is considered dead
 * (defaults 10 s and 60 s). Heartbeats go out every io_timeout/4. */
COHORT_API int cohort_opts_set_timeouts(cohort_opts *o, uint32_t connect_ms, uint32_t io_timeout_ms);
COHORT_API int cohort_opts_set_log(cohort_opts *o, cohort_log_fn fn, void *user, int max_level);
COHORT_API int cohort_opts_set_event_fn(cohort_opts *o, cohort_event_fn fn, void *user);

/* What the client does in the federation. */
enum cohort_role {
    COHORT_ROLE_TRAINER = 0,    /* default: trains on offered rounds and sends updates */
    COHORT_ROLE_EVALUATOR,      /* tests each new global model and reports metrics; never
                                 * counted as a participant */
};
/* As an evaluator the callback is called once per committed round with
 * r->evaluate = 1 and r->model_round; it reports what it measured with
 * cohort_round_add_metric() and its return value only decides whether the
 * report is logged as a failure (a report, possibly empty, is always sent). */
COHORT_API int cohort_opts_set_role(cohort_opts *o, int role);

/* Adds one metric to the evaluation report of r (name: 1-63 characters of
 * [A-Za-z0-9_.-]; at most 16 metrics). COHORT_EINVAL for a bad name or when
 * full. */
COHORT_API int cohort_round_add_metric(struct cohort_round *r, const char *name, double value);

/* Creates a client; copies o. */
COHORT_API int cohort_client_new(cohort_client **out, const cohort_opts *o);
/* Runs until the server ends the run (returns 0), the once-round is done
 * (returns 0), cohort_client_stop() (returns COHORT_ECANCELED) or
 * reconnection gives up (returns the last error). Blocking; the callback runs
 * on the calling thread. */
COHORT_API int cohort_client_run(cohort_client *c, cohort_train_fn fn, void *user);
/* Asks a running cohort_client_run to return soon. Async-signal-safe, any thread. */
COHORT_API void cohort_client_stop(cohort_client *c);
/* Detailed message of the last failure on c ("" if none). */
COHORT_API const char *cohort_client_last_error(const cohort_client *c);
COHORT_API void cohort_client_stats(const cohort_client *c, struct cohort_stats *out);
/* cohort_client_free(NULL) is a no-op. */
COHORT_API void cohort_client_free(cohort_client *c);

#ifdef __cplusplus
}
#endif

#endif
