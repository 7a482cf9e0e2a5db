/*
 * Routes each decoded frame: Hello binds the identity and registers the client;
 * update messages go to the round manager; heartbeats are answered. Anything a
 * client may not send, or sends in the wrong state, closes that connection with
 * an Error naming the problem. Loop thread only.
 */
#include "dispatch.h"

#include <stdio.h>
#include <string.h>

#include "cohort_err.h"
#include "conn.h"
#include "gossip.h"
#include "log.h"
#include "pstore.h"
#include "round.h"
#include "server.h"
#include "wire.h"

#define SOFTWARE "cohortd 0.1.0"

void dispatch_welcome(struct conn *c, uint64_t current_round)
{
    const struct server *s = c->srv;
    Cohort__Welcome w = COHORT__WELCOME__INIT;
    w.protocol_version = COH_PROTOCOL_VERSION;
    w.client_name = c->name;
    w.current_round = current_round;
    w.server_software = SOFTWARE;
    w.max_frame_bytes = s->cfg.max_frame_bytes;
    w.heartbeat_interval_ms = s->cfg.heartbeat_ms;
    Cohort__Envelope e = COHORT__ENVELOPE__INIT;
    e.body_case = COHORT__ENVELOPE__BODY_WELCOME;
    e.welcome = &w;
    conn_send(c, &e);
}

void dispatch_remote_error(struct conn *c, const char *module, const char *who,
                           const Cohort__Error *err)
{
    char label[400];
    coh_warn(module, "%s: %s reported error %d: %.200s", conn_label(c, label, sizeof label), who,
             err->code, err->message ? err->message : "");
    if (err->fatal)
        conn_close(c, "%s reported a fatal error", who);
}

static void on_hello(struct conn *c, const Cohort__Hello *h)
{
    struct server *s = c->srv;
    if (h->protocol_version != COH_PROTOCOL_VERSION) {
        conn_send_error(c, COHORT_EVERSION, 0, 1,
                        "protocol version %u is not supported; this server speaks version %d "
                        "(upgrade the client or the server)",
                        h->protocol_version, COH_PROTOCOL_VERSION);
        conn_close(c, "incompatible protocol version %u", h->protocol_version);
        return;
    }
    if (h->role && strcmp(h->role, "peer") == 0) {
        gossip_on_peer_hello(c, h);
        return;
    }
    /* Evaluators get each new global model to test and never count as trainers. */
    int evaluator = h->role && strcmp(h->role, "evaluator") == 0;
    if (h->role && h->role[0] && !evaluator && strcmp(h->role, "trainer") != 0) {
        conn_send_error(c, COHORT_EINVAL, 0, 1, "unknown role '%.40s' (known: trainer, evaluator)",
                        h->role);
        conn_close(c, "unknown role in Hello");
        return;
    }
    int64_t id;
    if (pstore_client_seen_role(s->store, c->name, evaluator ? "evaluator" : "trainer",
                                h->num_examples, &id) < 0) {
        conn_send_error(c, COHORT_ESTORE, 0, 1, "server could not register the client; retry later");
        conn_close(c, "participation store failure while registering");
        return;
    }
    /* One live connection per identity: the newer one wins, since a client that
     * reconnects usually does so because its old link is dead. */
    struct conn *old = idmap_get(&s->conns_by_client, (uint64_t)id);
    if (old && old != c) {
        round_handover(s, old, c);
        conn_send_error(old, COHORT_ECLOSED, 0, 1,
                        "replaced by a newer connection with the same identity");
        conn_close(old, "replaced by conn %llu with the same identity", (unsigned long long)c->id);
    }
    c->client_id = id;
    c->hello_examples = h->num_examples;
    idmap_put(&s->conns_by_client, (uint64_t)id, c);
    c->state = CONN_READY;
    c->evaluator = evaluator;
    c->xxh3_ok = h->accepts_xxh3;
    if (evaluator)
        s->nevaluators++;
    else
        s->nready++;

    dispatch_welcome(c, s->cur.phase == PHASE_OPEN ? s->cur.id : s->last_committed);
    char label[400];
    coh_info("conn", "%s: joined as %s %lld (%llu examples)",
             conn_label(c, label, sizeof label), evaluator ? "evaluator" : "client", (long long)id,
             (unsigned long long)h->num_examples);
    if (evaluator)
        round_eval_ready(s, c);
    else
        round_client_ready(s, c);
}

void dispatch_heartbeat(struct conn *c, const Cohort__Heartbeat *hb)
{
    /* While a model streams the link is busy anyway; replying would interleave
     * with chunk frames for no benefit. */
    if (hb->reply || c->send_blob)
        return;
    Cohort__Heartbeat r = COHORT__HEARTBEAT__INIT;
    r.seq = hb->seq;
    r.time_ms = hb->time_ms;
    r.reply = 1;
    Cohort__Envelope e = COHORT__ENVELOPE__INIT;
    e.body_case = COHORT__ENVELOPE__BODY_HEARTBEAT;
    e.heartbeat = &r;
    conn_send(c, &e);
}

void dispatch_frame(struct conn *c, const uint8_t *frame, size_t len)
{
    if (c->link) {
        gossip_on_frame(c, frame, len);
        return;
    }
    if (c->state == CONN_READY) {
        struct coh_chunk_view v;
        int r = coh_wire_peek_chunk(frame, len, &v);
        if (r == 1 && v.kind == COH_CHUNK_UPDATE) {
            round_on_chunk(c->srv, c, &v);
            return;
        }
        if (r < 0) {
            conn_send_error(c, COHORT_EFRAME, 0, 1, "malformed UpdateChunk frame");
            conn_close(c, "malformed UpdateChunk frame of %zu bytes", len);
            return;
        }
    }
    Cohort__Envelope *e = NULL;
    if (coh_wire_decode(frame, len, &e) < 0) {
        conn_send_error(c, COHORT_EFRAME, 0, 1, "frame of %zu bytes does not decode", len);
        conn_close(c, "frame of %zu bytes does not decode as a cohort message", len);
        return;
    }
    if (c->state == CONN_HELLO) {
        if (e->body_case == COHORT__ENVELOPE__BODY_HELLO)
            on_hello(c, e->hello);
        else {
            conn_send_error(c, COHORT_ESTATE, 0, 1, "the first message must be Hello");
            conn_close(c, "sent message type %d before Hello", (int)e->body_case);
        }
        coh_wire_free(e);
        return;
    }
    switch (e->body_case) {
    case COHORT__ENVELOPE__BODY_HEARTBEAT:
        dispatch_heartbeat(c, e->heartbeat);
        break;
    case COHORT__ENVELOPE__BODY_UPDATE_BEGIN:
        /* The round manager may keep the message while the upload waits for a slot. */
        if (round_on_begin(c->srv, c, e))
            return;
        break;
    case COHORT__ENVELOPE__BODY_UPDATE_END:
        round_on_end(c->srv, c, e->update_end);
        break;
    case COHORT__ENVELOPE__BODY_DECLINE:
        round_on_decline(c->srv, c, e->decline);
        break;
    case COHORT__ENVELOPE__BODY_EVAL_REPORT:
        if (c->evaluator)
            round_on_eval_report(c->srv, c, e->eval_report);
        else
            conn_send_error(c, COHORT_ESTATE, e->eval_report->round, 0,
                            "EvalReport from a trainer; connect with role \"evaluator\"");
        break;
    case COHORT__ENVELOPE__BODY_UPDATE_CHUNK:
        /* Only reached when the fast path deferred (unknown fields). */
        {
            struct coh_chunk_view v = {.kind = COH_CHUNK_UPDATE,
                                       .round = e->update_chunk->round,
                                       .offset = e->update_chunk->offset,
                                       .data = e->update_chunk->data.data,
                                       .len = e->update_chunk->data.len};
            round_on_chunk(c->srv, c, &v);
        }
        break;
    case COHORT__ENVELOPE__BODY_ERROR:
        dispatch_remote_error(c, "conn", "client", e->error);
        break;
    case COHORT__ENVELOPE__BODY_HELLO:
        conn_send_error(c, COHORT_ESTATE, 0, 1, "Hello was already received");
        conn_close(c, "sent Hello twice");
        break;
    default:
        conn_send_error(c, COHORT_ESTATE, 0, 1, "message type %d is not accepted from a client",
                        (int)e->body_case);
        conn_close(c, "sent server-only message type %d", (int)e->body_case);
        break;
    }
    coh_wire_free(e);
}
