/*
 * cohortd's shared state. One libuv loop owns everything declared here; only
 * the buffers handed to thread-pool jobs (fold.c, round.c) cross threads, and
 * they are owned by the job until its after-work callback runs on the loop.
 */
#ifndef SERVER_H
#define SERVER_H

#include <openssl/ssl.h>
#include <stdint.h>
#include <uv.h>

#include "frame.h"
#include "idmap.h"
#include "model.h"

struct pstore;
struct strategy;
struct conn;
struct server;

struct config {
    char *listen;               /* HOST:PORT */
    char *state_dir;
    char *model_path;
    char *ca, *cert, *key;
    int require_client_cert;
    uint64_t rounds;            /* 0 = until stopped */
    uint32_t min_clients;
    double round_timeout_s;
    char *strategy;
    char *weighting;            /* fedavg: examples | uniform | all */
    double server_lr;
    uint64_t fedau_cutoff;      /* K; 0 = unlimited */
    int variance_correction;
    int vc_include_1d;
    int durable;                /* 1: fsync checkpoints, SQLite synchronous=FULL */
    uint32_t max_frame_bytes;
    uint64_t max_model_bytes;
    uint32_t max_connections;
    uint32_t max_uploads;       /* staged uploads at once; more wait with reads paused */
    uint32_t handshake_timeout_ms;
    uint32_t upload_timeout_ms; /* UpdateBegin to UpdateEnd */
    uint32_t frame_timeout_ms;  /* a started frame (or TLS record) must complete within this */
    uint32_t max_tensors;
    char *crl;                  /* PEM CRL file(s); revoked client certificates are refused */
    char *allow_clients;        /* file with one allowed client name per line */
    uint32_t idle_timeout_ms;
    uint32_t heartbeat_ms;
    uint32_t chunk_bytes;
    int log_level;
    int log_json;
    /* Text forms of enum options; log_level, log_json and durable derive from them. */
    char *log_level_s, *log_format_s, *durability_s;
    char *config_file;
    char *http;                 /* admin HTTP endpoint HOST:PORT or PORT; NULL: off */
    char *http_token;           /* bearer token required by the HTTP endpoint; NULL: none */
    /* Gossip mode (server/gossip.c, docs/gossip.md). */
    char *mode_s;               /* fl | gossip */
    int gossip;                 /* derived: --mode gossip */
    char *peers;                /* seed list HOST:PORT,... */
    char *peers_file;           /* seed file, one HOST:PORT per line */
    char *advertise;            /* HOST:PORT peers dial; default --listen */
    uint32_t fanout;            /* peers per push; 0 = every peer in the view */
    double gossip_interval_s;   /* push at least this often */
    uint32_t merge_after;       /* buffered models that trigger a merge; 0 = auto */
    double merge_timeout_s;     /* merge a partial buffer this old; 0 = never */
    char *merge_s;              /* variance-corrected | plain */
    double merge_self_weight;   /* beta */
    double round_interval_s;    /* local rounds start at most this often (+-20%); 0 = at once */
    uint32_t peer_sample;       /* peers sent with each push (peer exchange); 0 = off */
    uint32_t max_peers;         /* bound of the peer view */
    uint32_t peer_max_failures; /* consecutive failures that drop a peer */
    char *peer_prefix;          /* required CN prefix of peer certificates */
};

void config_defaults(struct config *c);
/* 1 when name may join (always when no allow-list is configured). */
int server_client_allowed(const struct server *s, const char *name);
void config_fini(struct config *c);

/* The global model of the open round, shared read-only by every connection
 * that streams it: the blob owns the model's data (s->global borrows it), so
 * a model being downloaded outlives its replacement until the last stream
 * ends. Chunk frame headers are made as the stream goes (conn.c). */
struct model_blob {
    int refs;
    uint64_t round;
    size_t nchunks;
    uint32_t chunk_bytes;
    const float *data;          /* owned: freed with the last reference */
    uint64_t total_bytes;       /* model data bytes */
    uint8_t xxh3[16];           /* XXH3-128 of the model data (checksum.h) */
    int has_sha256;             /* sha256 is computed only for clients that need it */
    uint8_t sha256[32];         /* of the model data, when has_sha256 */
};

struct model_blob *blob_ref(struct model_blob *b);
/* The last reference hands the data to model_buf_put. Loop thread. */
void blob_unref(struct model_blob *b);
/* Takes m's data over for round (any thread): on success m borrows its data
 * from the blob. xxh3 (may be NULL: computed here) is the data's XXH3-128, and
 * sha256 (may be NULL: computed later, if ever, by blob_sha256) its sha256. */
int blob_build(struct coh_model *m, uint64_t round, uint32_t chunk_bytes, const uint8_t *xxh3,
               const uint8_t *sha256, struct model_blob **out);
/* sha256 of the model data, computed on first use (a pass over the model on
 * the calling thread; only clients and peers without XXH3 need it). NULL when
 * out of memory. Not while another thread may call it on the same blob. */
const uint8_t *blob_sha256(struct model_blob *b);

/* One spare model-sized buffer, so each round reuses the buffer of the model
 * it replaced (for its accumulator) instead of faulting in a new one.
 * Loop thread. model_buf_get returns uninitialized memory (64-byte aligned). */
float *model_buf_get(size_t numel);
void model_buf_put(float *buf, size_t numel);
void model_buf_drain(void);
/* Encodes chunk i's frame header into hdr (at least COH_BLOB_HDR_MAX bytes);
 * returns its length and sets where its payload starts in the model data. */
#define COH_BLOB_HDR_MAX 64
size_t blob_chunk_header(const struct model_blob *b, size_t i, uint8_t *hdr,
                         size_t *data_off, size_t *data_len);

enum part_status {
    PART_OFFERED = 0,
    PART_UPLOADING,
    PART_FOLDING,
    PART_ACCEPTED,
    PART_DECLINED,
    PART_DROPPED,
    PART_REJECTED,
};

/* One client's participation in the open round. */
struct part {
    int64_t client_id;
    uint64_t conn_id;
    int status;
    uint64_t num_examples;
    double raw_weight;          /* what was folded */
    double weight;              /* applied: raw / divisor, set at finalize */
    double train_loss;
    uint64_t bytes;
    double started, finished;   /* seconds (loop clock) */
    int err;                    /* REJECTED: the COHORT_E* code sent to the client */
    char reason[160];
};

enum round_phase { PHASE_WAITING = 0, PHASE_OPEN, PHASE_CLOSING, PHASE_COMMITTING, PHASE_DONE };

struct round {
    uint64_t id;
    int phase;
    double opened_at;           /* loop seconds */
    double deadline_at;
    char started_iso[32];
    char closed_iso[32];
    struct part *parts;
    size_t nparts, capparts;
    uint32_t uploads_active;
    uint32_t folds_inflight;
    float *acc;                 /* sum of raw_weight * delta; becomes the next model */
    size_t acc_numel;
    uint32_t acc_folds;         /* folds started this round (the first sets acc) */
    double acc_bound;           /* bound on max |acc| (fold_checked); fold jobs only */
    double *vc_var_sum;         /* per tensor: sum over accepted updates of Var(x + delta) */
    const char *close_reason;
};

struct server {
    struct config cfg;
    uv_loop_t *loop;
    uv_tcp_t listener;
    uv_signal_t sigint, sigterm;
    uv_timer_t round_timer;
    SSL_CTX *ssl_ctx;
    struct pstore *store;
    struct strategy *strat;

    struct coh_model global;    /* x_t */
    struct model_blob *blob;    /* x_t as chunk frames, for round `cur.id` */
    uint64_t last_committed;
    struct round cur;

    struct idmap conns_by_id;   /* conn_id -> conn */
    struct idmap conns_by_client; /* client_id -> conn */
    struct conn *conn_list;
    uint64_t next_conn_id;
    uint32_t nconns, nready;
    uint32_t nevaluators;       /* READY connections with Hello.role "evaluator" (not in nready) */

    float **staging;            /* free staging buffers (model-sized), reused across uploads */
    size_t nstaging;
    size_t staging_numel;
    /* Connections streaming a model, in the order the streams began (conn.c). */
    struct conn **streams;
    size_t nstreams, capstreams;
    uv_idle_t stream_idle;
    int stream_idle_init;
    struct conn **slot_waiters; /* connections waiting for an upload slot, oldest first */
    size_t nwaiters, capwaiters;

    char **allowed;             /* sorted allow-list, NULL: every CA-signed client */
    size_t nallowed;

    struct gossip *gossip;      /* gossip mode state, NULL in fl mode */
    int stopping;               /* shutting down: no new rounds */
    int exit_code;
    /* Shared by all reads, consumed inside read_cb. Uploads read into all of it:
     * 256 KiB took a quarter of the recv calls of 64 KiB, rounds at (50, 1e6)
     * 1-2 % faster (docs/performance.md). */
    uint8_t readbuf[262144];
};

double server_now(struct server *s);
void server_iso_now(char *buf, size_t len);
/* One line of a list file (--allow-clients, --peers-file) with its surrounding blanks cut
 * off in place; NULL for a blank or '#' comment line, which the files allow anywhere. */
char *server_list_entry(char *line);
/* Starts an orderly shutdown; done=1 tells clients the run is over. A client
 * still downloading a model gets the rest of it first (at most SHUTDOWN_DRAIN_MS). */
void server_shutdown(struct server *s, int done, const char *reason);
/* A model stream ended on a connection with offer_pending or run_end_pending:
 * handled from the next loop turn (not inside the stream's TLS calls). */
void server_stream_done(struct server *s);

#endif
