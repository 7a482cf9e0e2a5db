/*
 * One client connection: a libuv TCP handle with TLS through OpenSSL memory
 * BIOs (the nng engine shape: the loop owns the socket, OpenSSL only turns
 * ciphertext into plaintext and back), framing, write accounting and
 * back-pressure. Loop thread only. A conn is freed in its close callback once
 * no write request refers to it; async work names it by conn id.
 */
#ifndef CONN_H
#define CONN_H

#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <stdint.h>
#include <uv.h>

#include "cohort.pb-c.h"
#include "frame.h"

struct server;
struct model_blob;

/* A block of ciphertext on its way to the socket (connio.c pools them). Sized
 * for one full TLS record (16 KiB of plaintext plus record overhead). */
#define CONN_WBUF (16384 + 512)
struct wreq {
    uv_write_t req;
    struct conn *c;
    size_t len, off;            /* bytes gathered; bytes already written by uv_try_write */
    uint8_t data[CONN_WBUF];
};

/* CONN_PEER: a gossip peer link past Hello/Welcome (either direction); it is
 * never offered rounds and does not count as a ready client. */
enum conn_state { CONN_HANDSHAKE = 0, CONN_HELLO, CONN_READY, CONN_CLOSING, CONN_PEER };

/* A staged update upload (one per connection at most). */
struct upload {
    int active;
    uint64_t round;
    uint64_t num_examples;
    uint64_t total;             /* bytes expected */
    double started;             /* loop seconds, for the upload deadline */
    uint64_t received;
    uint64_t checked;           /* bytes tested finite and hashed (upload_absorb) */
    uint32_t maxabs;            /* bound on |x| of the floats checked so far (coh_abs_bound_bits) */
    int weights;                /* UpdateBegin.weights: trained model, not a difference */
    float *buf;
};

struct conn {
    struct server *srv;
    uint64_t id;
    uv_tcp_t tcp;
    SSL *ssl;
    /* Ciphertext I/O (connio.c): input borrowed from the loop's read buffer
     * while on_read runs, what is left unread when it returns, and the write
     * buffer OpenSSL is filling. */
    const uint8_t *in;
    size_t in_len;
    uint8_t *spill;
    size_t spill_off, spill_len, spill_cap;
    struct wreq *out;
    int state;
    int refs;                   /* 1 for the handle + 1 per write in flight */
    int handle_closed;
    char name[256];             /* certificate CN */
    char peer[64];              /* ip:port */
    int64_t client_id;          /* store id, 0 before Hello */
    uint64_t hello_examples;
    double accepted_at, last_rx, closing_at;
    double partial_since;       /* an incomplete frame or TLS record has waited since; 0: none */

    struct coh_frame_rx rx;
    size_t tx_pending;          /* ciphertext bytes handed to libuv, not yet written */
    uint64_t bytes_in, bytes_out;
    uint64_t offer_rx_mark;     /* bytes_in when the open round was offered to this conn */
    uint64_t offered_round;     /* last round offered on this connection */
    /* Waiting for the model still streaming (server_stream_done): a round offer,
     * or at shutdown the RunEnd and the close. */
    int offer_pending, run_end_pending;

    struct model_blob *send_blob; /* model being streamed, NULL when none */
    size_t send_idx;            /* chunk of send_blob being sent */
    size_t send_off;            /* its payload bytes sent; 0: header not sent yet */
    size_t stream_pos;          /* 1 + its place in the server's stream list, 0: not listed */

    struct upload up;
    struct coh_xxh *up_xxh;     /* XXH3 of the upload so far (reset per upload) */
    /* An UpdateChunk's data being decrypted straight into the staging buffer:
     * bytes still to come, where they go (NULL: the upload was released, drop
     * them) and the chunk's data length. */
    size_t direct_left, direct_len;
    uint8_t *direct_dst;
    uint64_t discard_round;     /* chunks of a refused upload for this round are dropped */
    Cohort__Envelope *pending_begin; /* UpdateBegin waiting for an upload slot */
    double waiting_since;       /* when it began waiting (server_now) */
    int wait_rcvbuf;            /* its socket's SO_RCVBUF then, 0: unknown */
    int passed_over;            /* later uploads given a slot before it */
    int paused;
    int write_err;              /* libuv error of a failed write, 0: none */
    int evaluator;              /* Hello.role "evaluator": gets models to test, no rounds */
    int xxh3_ok;                /* Hello.accepts_xxh3: offers need no model_sha256 */
    int eval_busy;              /* an evaluation offer awaits its EvalReport */
    uint64_t eval_round;        /* model round of the last evaluation offer */

    int outgoing;               /* dialed by this node (a gossip peer link) */
    struct gossip_link *link;   /* gossip state of a peer link (gossip.c), NULL otherwise */

    struct conn *prev, *next;
};

void conn_on_connection(uv_stream_t *listener, int status);
/* Dials addr with TLS client mode from ctx (a gossip peer link), verifying the
 * peer certificate for host (DNS name or IP literal). label names the peer in
 * logs (HOST:PORT). Returns the conn (state CONN_HANDSHAKE, in the connection
 * list) or NULL. Whatever happens later, the conn ends in the close callback,
 * where gossip_link_gone() is told if c->link is set. */
struct conn *conn_dial(struct server *s, SSL_CTX *ctx, const struct sockaddr *addr,
                       const char *label, const char *host);
/* Sends one message (whole frame through TLS). Returns 0 or a negative error. */
int conn_send(struct conn *c, const Cohort__Envelope *e);
void conn_send_error(struct conn *c, int code, uint64_t round, int fatal, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
/* Starts streaming the chunk frames of b after whatever was sent before. */
void conn_send_blob(struct conn *c, struct model_blob *b);
/* Writes whatever is left of the model being streamed (rare: a new offer while
 * an old model is still downloading). */
void conn_finish_blob(struct conn *c);
/* Closes the stream scheduler's handle (server shutdown). */
void conn_streams_fini(struct server *s);
/* Closes after flushing what is queued (bounded by a grace period). */
void conn_close(struct conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Stops/starts reading (upload back-pressure). */
void conn_pause(struct conn *c);
void conn_resume(struct conn *c);
void upload_release(struct conn *c);
/* Called every second: handshake/idle timeouts, stuck closes. */
void conn_sweep(struct server *s);
/* Hands whatever ciphertext OpenSSL produced to the socket: written at once
 * when the socket takes it, queued otherwise. */
void conn_flush(struct conn *c);
/* Writes p to the socket now if nothing is gathered or queued before it and
 * the socket takes it; returns the bytes written (0 when it must be queued;
 * a write error closes the connection). Lets a TLS record go out from
 * OpenSSL's own buffer without a copy. */
size_t conn_write_now(struct conn *c, const uint8_t *p, size_t n);
/* Output was lost (err: a libuv error code): the connection is closed without
 * another TLS call, safe inside one. */
void conn_write_failed(struct conn *c, int err);

/* connio.c */
int connio_init(void);
/* Between these, c's TLS output is gathered and written at the end in one call. */
void connio_burst_begin(struct conn *c);
void connio_burst_end(struct conn *c);
void connio_burst_free(void);
int connio_attach(struct conn *c);          /* custom BIOs on c->ssl; 0 or -1 */
void connio_release(struct conn *c);        /* frees unread input and unsent output */
int connio_keep_input(struct conn *c, const uint8_t *p, size_t n);
size_t connio_in_pending(const struct conn *c);
struct wreq *connio_wreq_get(void);
void connio_wreq_put(struct wreq *w);

/* Label for logs: "conn 42 (CN=client-3, 127.0.0.1:5000)". */
const char *conn_label(const struct conn *c, char *buf, size_t len);

#endif
