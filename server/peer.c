/*
 * Gossip peers: the bounded view (pure data) and the outgoing links that carry
 * this node's pushes; see peer.h. Loop thread only (the view functions are
 * reentrant and also used by unit tests without a loop).
 */
#include "peer.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cohort_err.h"
#include "conn.h"
#include "gossip.h"
#include "log.h"
#include "rng.h"
#include "server.h"
#include "wire.h"

#define SOFTWARE "cohortd 0.1.0"

/* ---- the view ---- */

void peer_view_init(struct peer_view *v, size_t max, const char *self_addr,
                    const char *self_name)
{
    memset(v, 0, sizeof *v);
    v->max = max ? max : 1;
    snprintf(v->self_addr, sizeof v->self_addr, "%s", self_addr ? self_addr : "");
    snprintf(v->self_name, sizeof v->self_name, "%s", self_name ? self_name : "");
}

void peer_view_fini(struct peer_view *v)
{
    free(v->v);
    memset(v, 0, sizeof *v);
}

struct peer *peer_view_find(struct peer_view *v, const char *addr)
{
    for (size_t i = 0; i < v->n; i++)
        if (strcmp(v->v[i].addr, addr) == 0)
            return &v->v[i];
    return NULL;
}

int peer_addr_valid(const char *addr)
{
    size_t n = addr ? strlen(addr) : 0;
    if (n < 3 || n >= PEER_ADDR_MAX)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)addr[i];
        if (ch <= 0x20 || ch == 0x7f || ch == ',')
            return 0;
    }
    const char *colon = strrchr(addr, ':');
    if (!colon || colon == addr || !colon[1])
        return 0;
    char *end;
    long port = strtol(colon + 1, &end, 10);
    return *end == '\0' && port >= 1 && port <= 65535;
}

static void set_name(struct peer *p, const char *name)
{
    if (name && name[0] && strcmp(p->name, name) != 0 && strlen(name) < sizeof p->name) {
        snprintf(p->name, sizeof p->name, "%s", name);
        p->dirty = 1;
    }
}

int peer_view_add(struct peer_view *v, const char *addr, const char *name, int seed,
                  const char *now_iso, struct peer **out)
{
    if (out)
        *out = NULL;
    if (!peer_addr_valid(addr) || strcmp(addr, v->self_addr) == 0 ||
        (name && name[0] && v->self_name[0] && strcmp(name, v->self_name) == 0))
        return 0;
    struct peer *p = peer_view_find(v, addr);
    if (p) {
        set_name(p, name);
        if (seed && !p->seed) {
            p->seed = 1;
            p->dirty = 1;
        }
        if (out)
            *out = p;
        return 0;
    }
    if (v->n >= v->max) {
        /* Full: only a failing peer makes room, so a healthy view is stable and a
         * stream of gossiped addresses cannot flush it. */
        struct peer *worst = NULL;
        for (size_t i = 0; i < v->n; i++)
            if (v->v[i].failures > 0 && (!worst || v->v[i].failures > worst->failures))
                worst = &v->v[i];
        if (!worst)
            return 0;
        peer_view_remove(v, worst);
    }
    if (v->n == v->cap) {
        size_t ncap = v->cap ? v->cap * 2 : 16;
        struct peer *nv = realloc(v->v, ncap * sizeof *nv);
        if (!nv)
            return COHORT_ENOMEM;
        v->v = nv;
        v->cap = ncap;
    }
    p = &v->v[v->n++];
    memset(p, 0, sizeof *p);
    snprintf(p->addr, sizeof p->addr, "%s", addr);
    set_name(p, name);
    p->seed = seed;
    snprintf(p->first_seen, sizeof p->first_seen, "%s", now_iso ? now_iso : "");
    p->dirty = 1;
    if (out)
        *out = p;
    return 1;
}

void peer_view_remove(struct peer_view *v, struct peer *p)
{
    size_t i = (size_t)(p - v->v);
    if (i >= v->n)
        return;
    memmove(&v->v[i], &v->v[i + 1], (v->n - i - 1) * sizeof *v->v);
    v->n--;
}

int peer_view_failed(struct peer_view *v, struct peer *p, double now, uint32_t max_failures,
                     struct coh_rng *rng, struct peer *dropped)
{
    p->failures++;
    p->dirty = 1;
    if (max_failures && p->failures >= max_failures) {
        if (dropped)
            *dropped = *p;
        peer_view_remove(v, p);
        return 1;
    }
    double d = PEER_BACKOFF_BASE_S;
    for (uint32_t i = 1; i < p->failures && d < PEER_BACKOFF_MAX_S; i++)
        d *= 2;
    if (d > PEER_BACKOFF_MAX_S)
        d = PEER_BACKOFF_MAX_S;
    if (rng)
        d *= 0.75 + 0.5 * coh_rng_uniform(rng);
    p->next_try = now + d;
    return 0;
}

void peer_view_ok(struct peer *p, const char *now_iso)
{
    p->failures = 0;
    p->next_try = 0;
    p->exchanges++;
    snprintf(p->last_seen, sizeof p->last_seen, "%s", now_iso ? now_iso : "");
    p->dirty = 1;
}

size_t peer_view_sample(struct peer_view *v, struct coh_rng *rng, size_t k, const char *exclude,
                        struct peer **out)
{
    size_t m = 0;
    for (size_t i = 0; i < v->n; i++)
        if (!exclude || strcmp(v->v[i].addr, exclude) != 0)
            out[m++] = &v->v[i];
    /* Partial Fisher-Yates: the first k of a random permutation. */
    if (k > m)
        k = m;
    for (size_t i = 0; i < k; i++) {
        size_t j = i + (size_t)coh_rng_below(rng, m - i);
        struct peer *t = out[i];
        out[i] = out[j];
        out[j] = t;
    }
    return k;
}

/* ---- links ---- */

static struct gossip_link *find_link(struct gossip *g, const char *addr)
{
    for (size_t i = 0; i < g->nout; i++)
        if (strcmp(g->out[i]->addr, addr) == 0)
            return g->out[i];
    return NULL;
}

static int resolve(const char *addr, struct sockaddr_storage *ss, char *host, size_t hlen)
{
    const char *colon = strrchr(addr, ':');
    size_t n = (size_t)(colon - addr);
    const char *h = addr;
    if (h[0] == '[' && n >= 2 && h[n - 1] == ']') {
        h++;
        n -= 2;
    }
    if (n >= hlen)
        return -1;
    memcpy(host, h, n);
    host[n] = '\0';
    int port = atoi(colon + 1);
    if (uv_ip4_addr(host, port, (struct sockaddr_in *)ss) == 0 ||
        uv_ip6_addr(host, port, (struct sockaddr_in6 *)ss) == 0)
        return 0;
    /* A DNS name: resolved synchronously. Peers are usually configured by IP
     * address; see docs/gossip.md. */
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    if (getaddrinfo(host, ps, &hints, &res) != 0 || !res)
        return -1;
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    freeaddrinfo(res);
    return 0;
}

static void note_failure(struct server *s, const char *addr, const char *why)
{
    struct gossip *g = s->gossip;
    struct peer *p = peer_view_find(&g->view, addr);
    if (!p)
        return;
    struct peer dropped;
    uint32_t f = p->failures + 1;
    if (peer_view_failed(&g->view, p, server_now(s), s->cfg.peer_max_failures, &g->rng,
                         &dropped)) {
        coh_warn("gossip", "peer %s (%s): %s; dropped from the view after %u failures in a row",
                 addr, dropped.name[0] ? dropped.name : "name unknown", why, f);
        gossip_store_peer(s, &dropped);
    } else {
        coh_info("gossip", "peer %s: %s (failure %u of %u; retried in %.1f s)", addr, why, f,
                 s->cfg.peer_max_failures, p->next_try - server_now(s));
    }
}

static struct gossip_link *dial(struct server *s, const char *addr)
{
    struct gossip *g = s->gossip;
    struct sockaddr_storage ss;
    char host[PEER_ADDR_MAX];
    if (resolve(addr, &ss, host, sizeof host) < 0) {
        note_failure(s, addr, "cannot resolve the address");
        return NULL;
    }
    struct gossip_link *l = calloc(1, sizeof *l);
    if (!l)
        return NULL;
    if (g->nout == g->capout) {
        size_t ncap = g->capout ? g->capout * 2 : 16;
        struct gossip_link **no = realloc(g->out, ncap * sizeof *no);
        if (!no) {
            free(l);
            return NULL;
        }
        g->out = no;
        g->capout = ncap;
    }
    l->outgoing = 1;
    snprintf(l->addr, sizeof l->addr, "%s", addr);
    struct conn *c = conn_dial(s, g->client_ctx, (struct sockaddr *)&ss, addr, host);
    if (!c) {
        free(l);
        note_failure(s, addr, "cannot set up a connection (out of memory?)");
        return NULL;
    }
    g->out[g->nout++] = l;
    l->conn_id = c->id;
    c->link = l;
    return l;
}

static void send_push(struct server *s, struct conn *c, struct gossip_link *l)
{
    struct gossip *g = s->gossip;
    struct coh_model *m = &s->global;
    size_t nt = m->ntensors ? m->ntensors : 1;
    Cohort__TensorInfo *infos = calloc(nt, sizeof *infos);
    Cohort__TensorInfo **ptrs = calloc(nt, sizeof *ptrs);
    size_t k = s->cfg.peer_sample;
    struct peer **sample = calloc(g->view.n ? g->view.n : 1, sizeof *sample);
    Cohort__PeerInfo *pis = calloc(k ? k : 1, sizeof *pis);
    Cohort__PeerInfo **pptrs = calloc(k ? k : 1, sizeof *pptrs);
    if (!infos || !ptrs || !sample || !pis || !pptrs) {
        free(infos);
        free(ptrs);
        free(sample);
        free(pis);
        free(pptrs);
        return;
    }
    for (size_t i = 0; i < m->ntensors; i++) {
        cohort__tensor_info__init(&infos[i]);
        infos[i].name = m->tensors[i].name;
        infos[i].n_shape = (size_t)m->tensors[i].ndim;
        infos[i].shape = m->tensors[i].shape;
        ptrs[i] = &infos[i];
    }
    size_t ns = k ? peer_view_sample(&g->view, &g->rng, k, l->addr, sample) : 0;
    for (size_t i = 0; i < ns; i++) {
        cohort__peer_info__init(&pis[i]);
        pis[i].address = sample[i]->addr;
        pis[i].name = sample[i]->name;
        pptrs[i] = &pis[i];
    }
    Cohort__GossipPush p = COHORT__GOSSIP_PUSH__INIT;
    p.round = s->blob->round;
    p.n_tensors = m->ntensors;
    p.tensors = ptrs;
    p.total_bytes = s->blob->total_bytes;
    p.chunk_count = (uint32_t)s->blob->nchunks;
    p.model_sha256.data = (uint8_t *)blob_sha256(s->blob);
    p.model_sha256.len = p.model_sha256.data ? 32 : 0;
    p.address = g->self_addr;
    p.n_peers = ns;
    p.peers = pptrs;
    p.local_rounds = s->last_committed;
    p.merges = g->merges;
    Cohort__Envelope e = COHORT__ENVELOPE__INIT;
    e.body_case = COHORT__ENVELOPE__BODY_GOSSIP_PUSH;
    e.gossip_push = &p;
    int rc = conn_send(c, &e);
    free(infos);
    free(ptrs);
    free(sample);
    free(pis);
    free(pptrs);
    if (rc < 0) {
        conn_close(c, "cannot send a push: %s", cohort_strerror(rc));
        return;
    }
    conn_send_blob(c, s->blob);
    l->push_pending = 0;
    l->push_inflight = 1;
    l->push_round = s->blob->round;
    l->push_started = server_now(s);
    g->pushes_sent++;
}

void peer_push(struct server *s, const char *why)
{
    struct gossip *g = s->gossip;
    if (!g || g->stopped || s->stopping || !s->blob || g->view.n == 0)
        return;
    double now = server_now(s);
    struct peer **cand = calloc(g->view.n, sizeof *cand);
    if (!cand)
        return;
    size_t m = 0;
    for (size_t i = 0; i < g->view.n; i++) {
        struct peer *p = &g->view.v[i];
        struct gossip_link *l = find_link(g, p->addr);
        if (p->next_try > now || (l && (l->push_inflight || l->push_pending))) {
            g->pushes_skipped++;
            continue;
        }
        cand[m++] = p;
    }
    size_t k = s->cfg.fanout ? s->cfg.fanout : m;
    if (k > m)
        k = m;
    for (size_t i = 0; i < k; i++) {
        size_t j = i + (size_t)coh_rng_below(&g->rng, m - i);
        struct peer *t = cand[i];
        cand[i] = cand[j];
        cand[j] = t;
    }
    /* Copy the addresses first: a failing dial may remove peers from the view. */
    char(*addrs)[PEER_ADDR_MAX] = calloc(k ? k : 1, PEER_ADDR_MAX);
    if (!addrs) {
        free(cand);
        return;
    }
    for (size_t i = 0; i < k; i++)
        memcpy(addrs[i], cand[i]->addr, PEER_ADDR_MAX);
    free(cand);
    coh_debug("gossip", "push (%s) to %zu of %zu eligible peers", why, k, m);
    for (size_t i = 0; i < k; i++) {
        struct gossip_link *l = find_link(g, addrs[i]);
        if (!l) {
            l = dial(s, addrs[i]);
            if (!l)
                continue;
        }
        struct conn *c = idmap_get(&s->conns_by_id, l->conn_id);
        if (l->up && c && c->state == CONN_PEER)
            send_push(s, c, l);
        else
            l->push_pending = 1;
    }
    free(addrs);
    g->last_push = now;
}

void peer_link_connected(struct conn *c)
{
    struct server *s = c->srv;
    struct gossip_link *l = c->link;
    const char *prefix = s->cfg.peer_prefix;
    if (prefix && strncmp(c->name, prefix, strlen(prefix)) != 0) {
        coh_warn("gossip", "peer %s presented certificate CN '%s', which does not start with "
                 "'%s' (not a peer certificate); closing", l->addr, c->name, prefix);
        conn_close(c, "not a peer certificate");
        return;
    }
    Cohort__Hello h = COHORT__HELLO__INIT;
    h.protocol_version = COH_PROTOCOL_VERSION;
    h.software = (char *)SOFTWARE;
    h.role = (char *)"peer";
    Cohort__Envelope e = COHORT__ENVELOPE__INIT;
    e.body_case = COHORT__ENVELOPE__BODY_HELLO;
    e.hello = &h;
    conn_send(c, &e);
}

void peer_link_frame(struct conn *c, const Cohort__Envelope *e)
{
    struct server *s = c->srv;
    struct gossip *g = s->gossip;
    struct gossip_link *l = c->link;
    char now[32];
    switch (e->body_case) {
    case COHORT__ENVELOPE__BODY_WELCOME: {
        if (l->up || c->state != CONN_HELLO) {
            conn_close(c, "peer sent Welcome twice");
            return;
        }
        l->up = 1;
        c->state = CONN_PEER;
        server_iso_now(now, sizeof now);
        struct peer *p = NULL;
        peer_view_add(&g->view, l->addr, c->name, 0, now, &p);
        coh_info("gossip", "link to peer %s (%s) is up", l->addr, c->name);
        if (l->push_pending && s->blob && !g->stopped)
            send_push(s, c, l);
        return;
    }
    case COHORT__ENVELOPE__BODY_GOSSIP_ACK: {
        const Cohort__GossipAck *a = e->gossip_ack;
        if (!l->push_inflight || a->round != l->push_round) {
            coh_info("gossip", "peer %s acknowledged push %llu, which is not in flight; ignored",
                     l->addr, (unsigned long long)a->round);
            return;
        }
        l->push_inflight = 0;
        struct peer *p = peer_view_find(&g->view, l->addr);
        if (a->accepted) {
            g->pushes_acked++;
            server_iso_now(now, sizeof now);
            if (p)
                peer_view_ok(p, now);
        } else {
            g->pushes_refused++;
            /* A busy peer is alive; a refusal for any other reason is logged once per push. */
            if (p)
                p->next_try = 0;
            if (a->reason && strcmp(a->reason, "busy") != 0)
                coh_warn("gossip", "peer %s refused our model: %.200s", l->addr, a->reason);
            else
                coh_debug("gossip", "peer %s is busy; push dropped", l->addr);
        }
        return;
    }
    case COHORT__ENVELOPE__BODY_HEARTBEAT:
        return;
    case COHORT__ENVELOPE__BODY_ERROR:
        coh_warn("gossip", "peer %s reported error %s: %.200s", l->addr,
                 cohort_err_name(e->error->code), e->error->message ? e->error->message : "");
        if (e->error->fatal)
            conn_close(c, "peer reported a fatal error");
        return;
    case COHORT__ENVELOPE__BODY_RUN_END:
        conn_close(c, "peer is shutting down");
        return;
    default:
        conn_send_error(c, COHORT_ESTATE, 0, 1, "message type %d is not expected on a peer link",
                        (int)e->body_case);
        conn_close(c, "peer sent message type %d", (int)e->body_case);
        return;
    }
}

void peer_link_gone(struct conn *c)
{
    struct server *s = c->srv;
    struct gossip *g = s->gossip;
    struct gossip_link *l = c->link;
    for (size_t i = 0; i < g->nout; i++) {
        if (g->out[i] == l) {
            g->out[i] = g->out[--g->nout];
            break;
        }
    }
    /* An idle link closed by either side is no failure; a link that never came up
     * or lost a push in flight is. */
    if (!g->stopped && !s->stopping && (!l->up || l->push_inflight))
        note_failure(s, l->addr, !l->up ? "cannot reach it" : "link lost during a push");
}

void peer_close_all(struct server *s)
{
    struct gossip *g = s->gossip;
    for (size_t i = 0; i < g->nout; i++) {
        struct conn *c = idmap_get(&s->conns_by_id, g->out[i]->conn_id);
        if (c)
            conn_close(c, "gossip stopping");
    }
}
