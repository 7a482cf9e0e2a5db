/* The option table and its parsers; see options.h. Start-up only. */
#include "options.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "server.h"
#include "strategy.h"

#define OFF(f) offsetof(struct config, f)

const struct opt_def options[] = {
    /* [server] */
    {"listen", "server", "listen", OPT_STR, OFF(listen), 0, 0, "127.0.0.1:7443", NULL,
     "HOST:PORT", "address to listen on"},
    {"state-dir", "server", "state_dir", OPT_STR, OFF(state_dir), 0, 0, "", NULL, "DIR",
     "participation store and checkpoints (required)"},
    {"model", "server", "model", OPT_STR, OFF(model_path), 0, 0, "", NULL, "FILE",
     "initial model (safetensors, F32); ignored once DIR holds committed rounds"},
    /* [tls] */
    {"ca", "tls", "ca", OPT_STR, OFF(ca), 0, 0, "", NULL, "FILE",
     "federation CA (PEM); client certificates must be signed by it (required)"},
    {"cert", "tls", "cert", OPT_STR, OFF(cert), 0, 0, "", NULL, "FILE",
     "server certificate chain (PEM, required)"},
    {"key", "tls", "key", OPT_STR, OFF(key), 0, 0, "", NULL, "FILE",
     "server private key (PEM, required)"},
    {"no-client-cert", "tls", "require_client_cert", OPT_NBOOL, OFF(require_client_cert), 0, 1,
     "true", NULL, NULL, "accept clients without a certificate (not for production)"},
    {"crl", "tls", "crl", OPT_STR, OFF(crl), 0, 0, "", NULL, "FILE",
     "PEM certificate revocation list; revoked client certificates are refused"},
    {"allow-clients", "tls", "allow_clients", OPT_STR, OFF(allow_clients), 0, 0, "", NULL, "FILE",
     "only these client names (one per line, # comments) may join"},
    /* [round] */
    {"rounds", "round", "rounds", OPT_U64, OFF(rounds), 0, 1e8, "0", NULL, "R",
     "exit 0 after committing round R (0: run until stopped)"},
    {"min-clients", "round", "min_clients", OPT_U32, OFF(min_clients), 1, 1e7, "1", NULL, "M",
     "clients connected before a round opens"},
    {"round-timeout", "round", "round_deadline_s", OPT_DOUBLE, OFF(round_timeout_s), 0.01, 1e7,
     "60", NULL, "SECONDS", "round deadline: unanswered offers are dropped"},
    /* [strategy] */
    {"strategy", "strategy", "strategy", OPT_ENUM, OFF(strategy), 0, 0, "fedavg", "fedavg|fedau",
     "NAME", "aggregation strategy"},
    {"weighting", "strategy", "weighting", OPT_ENUM, OFF(weighting), 0, 0, "examples",
     "examples|uniform|all", "W", "fedavg: weight by examples, uniformly, or 1/N over all"},
    {"server-lr", "strategy", "server_lr", OPT_DOUBLE, OFF(server_lr), 0, 1e6, "1", NULL, "ETA",
     "server learning rate"},
    {"fedau-cutoff", "strategy", "fedau_cutoff", OPT_U64, OFF(fedau_cutoff), 0, 1e9, "0", NULL,
     "K", "fedau: an absence interval closes after K rounds (0: unlimited)"},
    {"variance-correction", "strategy", "variance_correction", OPT_BOOL,
     OFF(variance_correction), 0, 1, "false", NULL, NULL,
     "rescale each weight tensor of the new model to the participants' mean variance"},
    {"variance-correction-bias", "strategy", "variance_correction_bias", OPT_BOOL,
     OFF(vc_include_1d), 0, 1, "false", NULL, NULL, "also correct 1-D tensors (biases)"},
    /* [store] */
    {"durability", "store", "durability", OPT_ENUM, OFF(durability_s), 0, 0, "full",
     "full|relaxed", "D",
     "full: fsync every checkpoint and commit; relaxed: no fsync (survives a crash of cohortd, "
     "not a power loss)"},
    /* [limits] */
    {"max-frame-bytes", "limits", "max_frame_bytes", OPT_U32, OFF(max_frame_bytes), 4096,
     1073741824, "8388608", NULL, "N", "largest frame accepted"},
    {"max-model-bytes", "limits", "max_model_bytes", OPT_U64, OFF(max_model_bytes), 4, 1099511627776.0,
     "1073741824", NULL, "N", "largest model accepted"},
    {"max-tensors", "limits", "max_tensors", OPT_U32, OFF(max_tensors), 1, 1e7, "65536", NULL, "N",
     "largest tensor count of a model"},
    {"max-connections", "limits", "max_connections", OPT_U32, OFF(max_connections), 1, 1e7,
     "10000", NULL, "N", "connections held at once"},
    {"max-uploads", "limits", "max_uploads", OPT_U32, OFF(max_uploads), 1, 100000, "2", NULL, "N",
     "uploads staged at once; more wait with reads paused"},
    {"handshake-timeout-ms", "limits", "handshake_timeout_ms", OPT_U32,
     OFF(handshake_timeout_ms), 10, 3600000, "10000", NULL, "N", "TLS handshake + Hello deadline"},
    {"idle-timeout-ms", "limits", "idle_timeout_ms", OPT_U32, OFF(idle_timeout_ms), 100, 86400000,
     "120000", NULL, "N", "close connections silent this long (not while a round awaits them)"},
    {"frame-timeout-ms", "limits", "frame_timeout_ms", OPT_U32, OFF(frame_timeout_ms), 10,
     86400000, "30000", NULL, "N", "close a connection whose frame stays incomplete this long"},
    {"upload-timeout-ms", "limits", "upload_timeout_ms", OPT_U32, OFF(upload_timeout_ms), 10,
     86400000, "300000", NULL, "N", "an update upload must finish within this"},
    {"heartbeat-ms", "limits", "heartbeat_ms", OPT_U32, OFF(heartbeat_ms), 10, 3600000, "15000",
     NULL, "N", "heartbeat interval announced to clients"},
    {"chunk-bytes", "limits", "chunk_bytes", OPT_U32, OFF(chunk_bytes), 1024, 67108864, "262144",
     NULL, "N", "payload bytes per model chunk frame"},
    /* [http] */
    {"http", "http", "listen", OPT_STR, OFF(http), 0, 0, "", NULL, "HOST:PORT",
     "admin HTTP endpoint with /metrics, /api/* and the dashboard (empty: off; a bare PORT "
     "means 127.0.0.1:PORT)"},
    {"http-token", "http", "token", OPT_STR, OFF(http_token), 0, 0, "", NULL, "TOKEN",
     "HTTP requests must carry 'Authorization: Bearer TOKEN' (empty: no token)"},
    /* [gossip] (docs/gossip.md) */
    {"mode", "gossip", "mode", OPT_ENUM, OFF(mode_s), 0, 0, "fl", "fl|gossip", "M",
     "fl: central aggregation server; gossip: a decentralized peer for its local trainers"},
    {"peers", "gossip", "peers", OPT_STR, OFF(peers), 0, 0, "", NULL, "HOST:PORT,...",
     "gossip: seed peers"},
    {"peers-file", "gossip", "peers_file", OPT_STR, OFF(peers_file), 0, 0, "", NULL, "FILE",
     "gossip: seed peers, one HOST:PORT per line (# comments)"},
    {"advertise", "gossip", "advertise", OPT_STR, OFF(advertise), 0, 0, "", NULL, "HOST:PORT",
     "gossip: address peers dial to reach this node (default --listen)"},
    {"fanout", "gossip", "fanout", OPT_U32, OFF(fanout), 0, 100000, "3", NULL, "N",
     "gossip: peers each push goes to (0: every peer in the view)"},
    {"gossip-interval", "gossip", "gossip_interval_s", OPT_DOUBLE, OFF(gossip_interval_s), 0.01,
     1e7, "10", NULL, "SECONDS", "gossip: push at least this often, besides after each round"},
    {"merge-after", "gossip", "merge_after", OPT_U32, OFF(merge_after), 0, 1024, "0", NULL, "N",
     "gossip: merge when N received models are buffered (0: min(peers, fanout, 16))"},
    {"merge-timeout", "gossip", "merge_timeout_s", OPT_DOUBLE, OFF(merge_timeout_s), 0, 1e7, "60",
     NULL, "SECONDS", "gossip: merge a partial buffer once its oldest model is this old (0: never)"},
    {"merge", "gossip", "merge", OPT_ENUM, OFF(merge_s), 0, 0, "variance-corrected",
     "variance-corrected|plain", "METHOD", "gossip: how received models are merged"},
    {"merge-self-weight", "gossip", "merge_self_weight", OPT_DOUBLE, OFF(merge_self_weight), 0, 1,
     "0.5", NULL, "BETA", "gossip: weight of the own model in a merge (0: drop it)"},
    {"round-interval", "gossip", "round_interval_s", OPT_DOUBLE, OFF(round_interval_s), 0, 1e7,
     "0", NULL, "SECONDS", "gossip: local rounds start at most this often, +-20% (0: at once)"},
    {"peer-sample", "gossip", "peer_sample", OPT_U32, OFF(peer_sample), 0, 64, "4", NULL, "N",
     "gossip: known peers sent along with each push (0: no peer exchange)"},
    {"max-peers", "gossip", "max_peers", OPT_U32, OFF(max_peers), 1, 100000, "32", NULL, "N",
     "gossip: bound of the peer view"},
    {"peer-max-failures", "gossip", "peer_max_failures", OPT_U32, OFF(peer_max_failures), 1,
     1000000, "5", NULL, "N", "gossip: consecutive failures that drop a peer from the view"},
    {"peer-prefix", "gossip", "peer_prefix", OPT_STR, OFF(peer_prefix), 0, 0, "peer-", NULL,
     "TEXT", "gossip: peer certificates need a CN starting with TEXT (\"\": any CA-signed)"},
    /* [log] */
    {"log-level", "log", "level", OPT_ENUM, OFF(log_level_s), 0, 0, "notice",
     "err|warn|notice|info|debug", "L", "log verbosity"},
    {"log-format", "log", "format", OPT_ENUM, OFF(log_format_s), 0, 0, "text", "text|json", "F",
     "one text line or one JSON object per event"},
};
const size_t noptions = sizeof options / sizeof options[0];

static void *field(struct config *c, const struct opt_def *o)
{
    return (char *)c + o->offset;
}

static int choice_ok(const char *choices, const char *v)
{
    size_t n = strlen(v);
    for (const char *p = choices; *p;) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == n && strncmp(p, v, n) == 0)
            return 1;
        if (!bar)
            break;
        p = bar + 1;
    }
    return 0;
}

static int parse_bool(const char *v, int *out)
{
    if (!strcmp(v, "true") || !strcmp(v, "1") || !strcmp(v, "yes") || !strcmp(v, "on"))
        *out = 1;
    else if (!strcmp(v, "false") || !strcmp(v, "0") || !strcmp(v, "no") || !strcmp(v, "off"))
        *out = 0;
    else
        return -1;
    return 0;
}

int options_set_msg(struct config *c, const struct opt_def *o, const char *v,
                    const char *origin, char *msg, size_t msglen)
{
    char *end;
    switch (o->type) {
    case OPT_STR:
    case OPT_ENUM: {
        if (o->type == OPT_ENUM && !choice_ok(o->choices, v)) {
            snprintf(msg, msglen, "%s must be one of %s (got '%s')", origin, o->choices, v);
            return -1;
        }
        char **dst = field(c, o);
        free(*dst);
        *dst = v[0] ? strdup(v) : NULL;
        return 0;
    }
    case OPT_U32:
    case OPT_U64: {
        errno = 0;
        unsigned long long x = strtoull(v, &end, 10);
        if (errno || end == v || *end || v[0] == '-' || (double)x < o->lo || (double)x > o->hi) {
            snprintf(msg, msglen, "%s must be an integer between %.0f and %.0f (got '%s')",
                    origin, o->lo, o->hi, v);
            return -1;
        }
        if (o->type == OPT_U32)
            *(uint32_t *)field(c, o) = (uint32_t)x;
        else
            *(uint64_t *)field(c, o) = x;
        return 0;
    }
    case OPT_DOUBLE: {
        errno = 0;
        double x = strtod(v, &end);
        if (errno || end == v || *end || !isfinite(x) || x < o->lo || x > o->hi) {
            snprintf(msg, msglen, "%s must be a number between %g and %g (got '%s')", origin,
                    o->lo, o->hi, v);
            return -1;
        }
        *(double *)field(c, o) = x;
        return 0;
    }
    case OPT_BOOL:
    case OPT_NBOOL: {
        int b;
        if (parse_bool(v, &b) < 0) {
            snprintf(msg, msglen, "%s must be true or false (got '%s')", origin, v);
            return -1;
        }
        *(int *)field(c, o) = b;
        return 0;
    }
    }
    return -1;
}

int options_set(struct config *c, const struct opt_def *o, const char *v, const char *origin)
{
    char msg[512];
    if (options_set_msg(c, o, v, origin, msg, sizeof msg) < 0) {
        fprintf(stderr, "cohortd: %s\n", msg);
        return -1;
    }
    return 0;
}

void options_defaults(struct config *c)
{
    for (size_t i = 0; i < noptions; i++)
        if (options[i].def[0] || options[i].type == OPT_STR)
            options_set(c, &options[i], options[i].def, options[i].flag);
}

const struct opt_def *options_find_flag(const char *flag)
{
    for (size_t i = 0; i < noptions; i++)
        if (strcmp(options[i].flag, flag) == 0)
            return &options[i];
    return NULL;
}

const struct opt_def *options_find_key(const char *section, const char *key)
{
    for (size_t i = 0; i < noptions; i++)
        if (strcmp(options[i].section, section) == 0 && strcmp(options[i].key, key) == 0)
            return &options[i];
    return NULL;
}

void options_section_header(FILE *f, const char **section, const struct opt_def *o)
{
    if (strcmp(*section, o->section) != 0) {
        *section = o->section;
        fprintf(f, "\n[%s]\n", *section);
    }
}

void options_usage(FILE *f)
{
    fprintf(f, "usage: cohortd --state-dir DIR --ca CA.pem --cert SERVER.pem --key SERVER.key\n"
               "               [--model INIT.safetensors] [options]\n\n"
               "Federated-learning aggregation server. Every option is also a config file key\n"
               "(section.key, shown in brackets); the command line wins.\n");
    const char *section = "";
    for (size_t i = 0; i < noptions; i++) {
        const struct opt_def *o = &options[i];
        options_section_header(f, &section, o);
        char left[64];
        if (o->arg)
            snprintf(left, sizeof left, "--%s %s", o->flag, o->arg);
        else
            snprintf(left, sizeof left, "--%s", o->flag);
        fprintf(f, "  %-26s %s\n  %-26s ", left, o->help, "");
        if (o->type == OPT_ENUM)
            fprintf(f, "%s; default %s; ", o->choices, o->def);
        else if (o->type != OPT_BOOL && o->type != OPT_NBOOL && o->def[0])
            fprintf(f, "default %s; ", o->def);
        fprintf(f, "config %s.%s\n", o->section, o->key);
    }
    fprintf(f, "\n  --config FILE              read options from FILE (INI; the command line wins)\n"
               "  --check-config             check the file and the options, then exit (0 or 2)\n"
               "  --print-config-example     write the commented example config file\n"
               "  --version, --help\n");
}

int options_parse_argv(struct config *c, int argc, char **argv)
{
    struct option *lo = calloc(noptions + 3, sizeof *lo);
    if (!lo)
        return 2;
    for (size_t i = 0; i < noptions; i++) {
        lo[i].name = options[i].flag;
        lo[i].has_arg = options[i].type == OPT_BOOL || options[i].type == OPT_NBOOL ? 0 : 1;
        lo[i].val = 256 + (int)i;
    }
    lo[noptions].name = "help";
    lo[noptions].val = 'h';
    lo[noptions + 1].name = "version";
    lo[noptions + 1].val = 'V';
    int o, rc = 0;
    optind = 1;
    while (rc == 0 && (o = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        if (o == 'h') {
            options_usage(stdout);
            rc = 1;
        } else if (o == 'V') {
            printf("cohortd 0.1.0\n");
            rc = 1;
        } else if (o >= 256 && (size_t)(o - 256) < noptions) {
            const struct opt_def *d = &options[o - 256];
            char origin[80];
            snprintf(origin, sizeof origin, "--%s", d->flag);
            if (d->type == OPT_BOOL)
                rc = options_set(c, d, "true", origin) < 0 ? 2 : 0;
            else if (d->type == OPT_NBOOL)
                rc = options_set(c, d, "false", origin) < 0 ? 2 : 0;
            else
                rc = options_set(c, d, optarg, origin) < 0 ? 2 : 0;
        } else {
            fprintf(stderr, "cohortd: see cohortd --help\n");
            rc = 2;
        }
    }
    free(lo);
    if (rc == 0 && optind < argc) {
        fprintf(stderr, "cohortd: unexpected argument '%s'\n", argv[optind]);
        rc = 2;
    }
    return rc;
}

int options_finish(struct config *c)
{
    if (!c->state_dir || !c->ca || !c->cert || !c->key) {
        fprintf(stderr, "cohortd: --state-dir, --ca, --cert and --key are required "
                        "(cohortd --help)\n");
        return -1;
    }
    if ((uint64_t)c->chunk_bytes + 64 > c->max_frame_bytes) {
        fprintf(stderr, "cohortd: --chunk-bytes must be smaller than --max-frame-bytes\n");
        return -1;
    }
    if (c->vc_include_1d)
        c->variance_correction = 1;
    /* Clients heartbeat at the announced interval; it must fit the idle timeout
     * three times over or idle clients between rounds would be cut. */
    if (c->heartbeat_ms > c->idle_timeout_ms / 3)
        c->heartbeat_ms = c->idle_timeout_ms / 3 > 10 ? c->idle_timeout_ms / 3 : 10;
    c->durable = strcmp(c->durability_s, "full") == 0;
    c->log_level = coh_log_parse_level(c->log_level_s);
    c->log_json = strcmp(c->log_format_s, "json") == 0;
    c->gossip = strcmp(c->mode_s, "gossip") == 0;
    return 0;
}
