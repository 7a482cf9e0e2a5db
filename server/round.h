/*
 * Round manager: opens rounds, offers them, admits uploads, folds accepted
 * updates on the thread pool, closes at quorum or deadline, finalizes and
 * commits (checkpoint file first, then one store transaction). Loop thread only;
 * the fold and finalize jobs touch only the buffers handed to them.
 */
#ifndef ROUND_H
#define ROUND_H

#include "cohort.pb-c.h"
#include "wire.h"

struct server;
struct conn;

int round_init(struct server *s);
void round_fini(struct server *s);
/* Opens the next round when enough clients are ready. */
void round_maybe_start(struct server *s);
void round_client_ready(struct server *s, struct conn *c);
/* An evaluator completed Hello: it gets the current global model to test. */
void round_eval_ready(struct server *s, struct conn *c);
void round_on_eval_report(struct server *s, struct conn *c, const Cohort__EvalReport *m);
void round_conn_gone(struct server *s, struct conn *c, const char *why);
/* Returns 1 when it kept e (the upload waits for a slot), 0 when the caller frees it. */
int round_on_begin(struct server *s, struct conn *c, Cohort__Envelope *e);
/* Direct receive of an UpdateChunk's data (conn.c): where its v->len bytes
 * go in the staging buffer, or NULL when the chunk does not continue the
 * upload (then it is decoded whole and refused by round_on_chunk). */
uint8_t *round_direct_begin(struct server *s, struct conn *c, const struct coh_chunk_view *v);
/* len more of the bytes announced by round_direct_begin have arrived (all of
 * them when chunk_done). May refuse the update (then c->direct_dst is NULL). */
void round_direct_data(struct server *s, struct conn *c, size_t len, int chunk_done);
void round_on_chunk(struct server *s, struct conn *c, const struct coh_chunk_view *v);
void round_on_end(struct server *s, struct conn *c, const Cohort__UpdateEnd *m);
void round_on_decline(struct server *s, struct conn *c, const Cohort__Decline *m);
void round_slot_freed(struct server *s);
/* Model-sized staging buffers, pooled: a fresh malloc per upload costs page
 * faults on every byte (docs/performance.md). put(NULL) is a no-op. */
float *staging_get(struct server *s);
void staging_put(struct server *s, float *buf);
/* A newer connection of the same client takes over old's offer in the open round. */
void round_handover(struct server *s, struct conn *old, struct conn *c);
/* 1 while the current round, offered to c, is not committed yet (its silence is
 * then training or waiting for the result, not idling). */
int round_awaits(struct server *s, const struct conn *c);
/* c's earlier model stream ended: send the round offer that waited for it, if
 * the round is still open and the offer still c's. */
void round_offer_waiting(struct server *s, struct conn *c);
/* The upload of c passed --upload-timeout-ms: drop it and close c. */
void round_upload_expired(struct server *s, struct conn *c);
/* Jobs still running on the thread pool (shutdown waits for 0). */
int round_jobs_inflight(struct server *s);

#endif
