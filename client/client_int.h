/*
 * libcohort internals: the option and client structs behind the opaque handles
 * of cohort.h. Only client/client.c (and its unit test, which includes the .c)
 * looks inside them. A client is used by one thread at a time, except
 * cohort_client_stop(), which touches only `stop` and the wake pipe.
 */
#ifndef COH_CLIENT_INT_H
#define COH_CLIENT_INT_H

#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>
#include <openssl/ssl.h>

#include "checksum.h"

#include "cohort.h"
#include "frame.h"
/* rng.h uses unsigned __int128 without __extension__, which -Wpedantic flags. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpedantic"
#include "rng.h"
#pragma GCC diagnostic pop

#define COH_CLIENT_SOFTWARE "libcohort 0.1.0"
#define COH_CLIENT_MAX_TENSORS 65536u
#define COH_CLIENT_MAX_NDIM 8
#define COH_CLIENT_MAX_NAME 255u
#define COH_CLIENT_ERRLEN 512

struct cohort_opts {
    char *host;                 /* without brackets for IPv6 literals */
    char *port;
    char *server_name;          /* NULL: verify against host */
    char *ca, *cert, *key;
    uint64_t num_examples;
    uint32_t backoff_initial_ms, backoff_max_ms, max_attempts;
    int once;
    int prefill;                /* params start as a copy of global (default 1) */
    int single_buffer;          /* one model buffer: global and params alias */
    int role;                   /* enum cohort_role */
    uint32_t max_frame_bytes;
    uint64_t max_model_bytes;
    uint32_t chunk_bytes;
    uint32_t connect_ms, io_timeout_ms;
    cohort_log_fn log_fn;
    void *log_user;
    int log_level;
    cohort_event_fn event_fn;
    void *event_user;
};

/* The tensor table of the current model. Kept across rounds so an unchanged
 * layout costs no allocation. */
struct coh_client_layout {
    size_t ntensors;
    size_t numel;
    struct cohort_tensor_info *info;    /* names point into `names`, shapes into `shapes` */
    uint64_t *shapes;                   /* COH_CLIENT_MAX_NDIM per tensor */
    char *names;                        /* NUL-separated */
};

struct cohort_client {
    struct cohort_opts o;               /* deep copy of the caller's options */
    SSL_CTX *ctx;
    BIO_METHOD *bio_meth;               /* socket BIO that sends with MSG_NOSIGNAL */
    EVP_MD_CTX *md;             /* sha256: models from servers that send only that */
    struct coh_xxh *xxh;        /* XXH3-128: updates, and models that carry it */
    struct coh_rng rng;                 /* back-off jitter */

    atomic_int stop;                    /* set by cohort_client_stop() */
    atomic_flag running;                /* one cohort_client_run at a time */
    int wake[2];                        /* self-pipe: stop() makes poll() return at once */

    /* Connection; fd < 0 when there is none. */
    int fd;
    SSL *ssl;
    int tls_broken;                     /* a fatal TLS error: no close_notify */
    char peer[300];                     /* "host:port" for messages */
    struct coh_frame_rx rx;
    uint8_t *tx;                        /* the one reusable outgoing frame buffer */
    size_t tx_cap;
    /* An update's TLS records, gathered to be sent a few at a time (gather_*). */
    uint8_t *gbuf;
    size_t glen, goff;
    int gather;
    int64_t gather_sent_ms;             /* monotonic: the last send() that took bytes */
    int64_t last_rx_ms, last_tx_ms;     /* monotonic */
    uint64_t hb_seq;
    uint32_t srv_max_frame;             /* from Welcome; 0 = unknown */
    int srv_xxh3;                       /* the last offer carried model_xxh3: the server
                                           checks UpdateEnd.xxh3 (else send sha256) */
    uint32_t srv_hb_ms;
    int connected;                      /* Welcome received on this connection */
    uint64_t ack_round;                 /* round whose UpdateAck we wait for, 0 = none */
    int awaiting_ack;

    /* Model of the current round. */
    struct coh_client_layout lay;
    float *global, *params;             /* lay.numel floats each */
    size_t buf_numel;                   /* size the two buffers were allocated for */

    struct cohort_stats stats;
    char client_name[256];
    char last_error[COH_CLIENT_ERRLEN];
};

#endif
