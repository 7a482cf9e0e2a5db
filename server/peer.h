/*
 * Gossip peers: the bounded peer view (a simple peer-sampling service) and the
 * outgoing peer links this node dials to push its model.
 *
 * The view is plain data (no libuv, no store), so it is unit-tested alone: peers
 * are keyed by address (HOST:PORT); a full view takes a new peer only in place
 * of one that is failing; a peer is dropped after max_failures consecutive
 * failed exchanges and retried meanwhile with exponential back-off.
 *
 * Links (peer_push, peer_link_*) run on the loop thread. A link is a struct conn
 * dialed with conn_dial() (TLS client mode, this node's certificate) that says
 * Hello{role="peer"}, waits for Welcome, then carries GossipPush + ModelChunk
 * frames out and GossipAck frames back; at most one push is in flight per link.
 */
#ifndef PEER_H
#define PEER_H

#include <stddef.h>
#include <stdint.h>

#include "cohort.pb-c.h"

struct coh_rng;
struct conn;
struct server;

#define PEER_ADDR_MAX 128
#define PEER_NAME_MAX 256
#define PEER_BACKOFF_BASE_S 1.0
#define PEER_BACKOFF_MAX_S 60.0

struct peer {
    char addr[PEER_ADDR_MAX];   /* HOST:PORT, the key */
    char name[PEER_NAME_MAX];   /* certificate CN, "" until known */
    int seed;                   /* from --peers / --peers-file */
    uint32_t failures;          /* consecutive failed exchanges */
    uint64_t exchanges;         /* models delivered to or accepted from this peer */
    double next_try;            /* loop seconds before which it is not dialed (back-off) */
    char first_seen[32], last_seen[32]; /* ISO-8601 UTC; last_seen "" = never reached */
    int dirty;                  /* differs from its row in the store */
};

struct peer_view {
    struct peer *v;
    size_t n, cap;
    size_t max;                 /* bound (--max-peers) */
    char self_addr[PEER_ADDR_MAX];
    char self_name[PEER_NAME_MAX];
};

void peer_view_init(struct peer_view *v, size_t max, const char *self_addr,
                    const char *self_name);
void peer_view_fini(struct peer_view *v);
/* The peer with this address, or NULL. Pointers are valid until the next add or
 * remove. */
struct peer *peer_view_find(struct peer_view *v, const char *addr);
/* 1 when addr is a usable HOST:PORT (1..127 bytes, a port 1..65535, no spaces or
 * control characters). */
int peer_addr_valid(const char *addr);
/*
 * Adds a peer (or fills in the name of a known one). Returns 1 when added, 0
 * when it was known, is this node, is invalid, or the view is full and no peer
 * in it is failing (then the new one is ignored); a full view evicts the peer
 * with the most consecutive failures instead. *out (may be NULL) gets the entry
 * or NULL. now_iso stamps first_seen.
 */
int peer_view_add(struct peer_view *v, const char *addr, const char *name, int seed,
                  const char *now_iso, struct peer **out);
/* Removes the peer at p (a pointer into the view). */
void peer_view_remove(struct peer_view *v, struct peer *p);
/*
 * A failed exchange with p at loop time now: failures++, next_try = now +
 * min(BASE * 2^(failures-1), MAX) * U(0.75, 1.25) (rng may be NULL: no jitter).
 * When failures reaches max_failures the peer is removed and copied to *dropped
 * (may be NULL); returns 1 then, else 0.
 */
int peer_view_failed(struct peer_view *v, struct peer *p, double now, uint32_t max_failures,
                     struct coh_rng *rng, struct peer *dropped);
/* A successful exchange: failures = 0, no back-off, exchanges++, last_seen. */
void peer_view_ok(struct peer *p, const char *now_iso);
/* Up to k distinct random peers (not the one whose address is exclude, may be
 * NULL) into out; returns the count. */
size_t peer_view_sample(struct peer_view *v, struct coh_rng *rng, size_t k, const char *exclude,
                        struct peer **out);

/* ---- links (loop thread) ---- */

/* Pushes the current model to --fanout peers chosen at random among those not
 * backing off and not still busy with an earlier push. why is for the log. */
void peer_push(struct server *s, const char *why);
/* The TLS handshake of an outgoing link finished (conn.c). */
void peer_link_connected(struct conn *c);
/* A frame arrived on an outgoing link. */
void peer_link_frame(struct conn *c, const Cohort__Envelope *e);
/* The conn of an outgoing link is being freed. */
void peer_link_gone(struct conn *c);
/* Closes every outgoing link (shutdown). */
void peer_close_all(struct server *s);

#endif
