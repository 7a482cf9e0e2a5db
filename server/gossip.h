/*
 * Gossip mode (cohortd --mode gossip, docs/gossip.md): the daemon is one peer
 * of a decentralized network. Its local trainers connect exactly as clients of
 * a federation do, and every committed local round moves the node's model
 * (x <- x + delta). This module adds, on the loop thread:
 *   - pushes of the current model to random peers after each committed round
 *     and at least every --gossip-interval (peer.c dials and streams them);
 *   - reception of peers' pushes: checked (layout, sizes, sha256, finite) and
 *     buffered, at most --merge-after models (the next merge takes them all);
 *   - merging (thread pool): w = beta*own + (1-beta)*mean(received), then, with
 *     --merge variance-corrected, each weight tensor rescaled to the received
 *     models' mean variance (algorithms.md). A merge never runs while a local
 *     round is open; one that becomes due then waits for the commit;
 *   - the node's model written durably to STATE_DIR/model.safetensors after
 *     each change, at most once a second (thread pool);
 *   - the store tables `peers` and `merges`.
 */
#ifndef GOSSIP_H
#define GOSSIP_H

#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "cohort.pb-c.h"
#include "model.h"
#include "peer.h"
#include "rng.h"

struct conn;
struct server;

/* A peer link's gossip state (conn->link). */
struct gossip_link {
    uint64_t conn_id;
    int outgoing;
    char addr[PEER_ADDR_MAX];   /* outgoing: the address dialed */
    /* outgoing */
    int up;                     /* Welcome received */
    int push_pending;           /* push once up */
    int push_inflight;          /* GossipPush sent, GossipAck not yet received */
    uint64_t push_round;
    double push_started;
    /* incoming: the push being received */
    int rx_active;
    uint64_t rx_round;
    int discarding;             /* chunks tagged discard_round belong to a refused push */
    uint64_t discard_round;
    uint64_t rx_total, rx_received;
    uint32_t rx_chunks, rx_nchunks;
    size_t rx_checked;          /* floats already checked for NaN/Inf */
    float *rx_buf;
    EVP_MD_CTX *rx_sha;
    uint8_t rx_want[32];
    char rx_from[PEER_ADDR_MAX]; /* the sender's advertised address */
    double rx_started;
};

/* A received model waiting for the next merge. */
struct gossip_entry {
    char name[PEER_NAME_MAX];   /* sender's certificate CN */
    float *data;
    double arrived;             /* loop seconds */
};

/* Per weight tensor figures of one merge (population variances). */
struct gossip_layer {
    size_t tensor;              /* index in the model */
    double own;                 /* Var of the own model's tensor */
    double received;            /* mean over received models: the correction's target */
    double merged;              /* after averaging */
    double after;               /* after the correction (= merged for plain) */
};

struct gossip {
    struct server *srv;
    SSL_CTX *client_ctx;        /* for dialing peers */
    struct peer_view view;
    struct coh_rng rng;
    char self_addr[PEER_ADDR_MAX];
    int corrected;              /* --merge variance-corrected */

    struct gossip_link **out;   /* outgoing links */
    size_t nout, capout;

    struct gossip_entry *buf;   /* received models */
    size_t nbuf, capbuf;
    uint32_t rx_active;         /* incoming pushes being received */

    int merge_running;
    int persist_running;
    int dirty;                  /* model.safetensors is older than the model */
    int stopped;
    double last_push;
    double next_round_at;       /* --round-interval gate */
    unsigned ticks;
    uv_timer_t push_timer, tick_timer, gate_timer;
    int timers_on;

    /* counters (logs, tests) */
    uint64_t merges, pushes_sent, pushes_acked, pushes_refused, pushes_skipped;
    uint64_t received, refused;
};

/* Gossip-mode part of start-up, before the model is loaded: when
 * STATE_DIR/model.safetensors exists and the store holds rounds, loads it into
 * s->global and sets s->last_committed. Returns 0 (loaded), 1 (nothing to
 * resume from: continue with the normal start-up), or -1 after logging. */
int gossip_load_model(struct server *s);
/* Creates the gossip state (tables, seeds, TLS client context, timers). Loop
 * created, model loaded, listener bound. 0 or -1 after logging. */
int gossip_init(struct server *s);
/* Shutdown began: no more pushes or merges; writes the model a last time. */
void gossip_stop(struct server *s);
/* 1 while gossip work remains (jobs, the last model write). */
int gossip_busy(struct server *s);
/* Closes the timers (the loop must run once more). */
void gossip_fini(struct server *s);
/* Frees everything (after the loop ended). */
void gossip_free(struct server *s);

/* round.c: 1 when no local round may open now (a merge runs or is due, or
 * --round-interval has not passed); round_maybe_start is called again later. */
int gossip_hold_round(struct server *s);
/* round.c: a local round was committed and s->global replaced. */
void gossip_on_commit(struct server *s);
/* The node's model changed (commit or merge): write it soon. */
void gossip_model_changed(struct server *s);

/* dispatch.c: Hello{role="peer"} on an accepted connection. */
void gossip_on_peer_hello(struct conn *c, const Cohort__Hello *h);
/* dispatch.c: any frame on a peer link (c->link set). */
void gossip_on_frame(struct conn *c, const uint8_t *frame, size_t len);
/* conn.c: the TLS handshake of a dialed link finished. */
void gossip_link_connected(struct conn *c);
/* conn.c: a conn with c->link is being freed. */
void gossip_link_gone(struct conn *c);

/* Buffered models the next merge waits for (--merge-after, or the automatic
 * min(peers, fanout, 16), at least 1). */
size_t gossip_merge_after(const struct server *s);
/* Records a peer row now (dropped peers, shutdown). */
void gossip_store_peer(struct server *s, const struct peer *p);

/*
 * The merge rule (pure, any thread). out gets own's layout and
 *   out = beta * own + (1 - beta) / m * sum_j recv[j]
 * then, when corrected, every eligible tensor (coh_vc_eligible(t, include_1d))
 * is rescaled around its mean to the mean of the received models' variances.
 * layers (may be NULL) gets one entry per eligible tensor, in model order, and
 * *nlayers their count. m >= 1. Returns 0 or COHORT_ENOMEM / COHORT_EINVAL.
 */
int gossip_merge(const struct coh_model *own, const float *const *recv, size_t m, double beta,
                 int corrected, int include_1d, struct coh_model *out,
                 struct gossip_layer *layers, size_t *nlayers);

#endif
