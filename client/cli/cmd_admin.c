/*
 * `cohort status | rounds | clients | export`: read a federation's participation
 * store and checkpoints, print tables or JSON, and export a verified checkpoint.
 *
 * Layout: the commands (bottom of the file) parse options, open a data source
 * and render what it returns. The only source today is the state directory
 * (`--state-dir DIR`): STATE_DIR/cohort.db opened read-only, every command's
 * queries inside one read transaction, so they see one consistent snapshot and
 * never block cohortd's commits (WAL). A new source (cohortd's HTTP endpoint)
 * implements struct admin_source_ops (cmd_admin.h) and is chosen in open_source().
 *
 * Single-threaded, like the rest of the CLI.
 */
#include "cmd_admin.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <math.h>
#include <openssl/evp.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "cohort_err.h"
#include "safetensors.h"

#define STORE_SCHEMA_VERSION "1"
#define DEFAULT_ROUNDS_LIMIT 20

/* ---------------------------------------------------------------- rows */

void admin_round_fini(struct admin_round *r)
{
    if (!r)
        return;
    free(r->strategy);
    free(r->started_at);
    free(r->closed_at);
    free(r->committed_at);
    free(r->close_reason);
    free(r->checkpoint);
    free(r->sha256);
    memset(r, 0, sizeof *r);
}

void admin_rounds_free(struct admin_round *rows, size_t n)
{
    for (size_t i = 0; rows && i < n; i++)
        admin_round_fini(&rows[i]);
    free(rows);
}

void admin_clients_free(struct admin_client *rows, size_t n)
{
    for (size_t i = 0; rows && i < n; i++) {
        free(rows[i].name);
        free(rows[i].first_seen);
        free(rows[i].last_seen);
    }
    free(rows);
}

/* ------------------------------------------------- source: the state directory */

struct store_src {
    sqlite3 *db;
    char *dir;          /* --state-dir as given */
    char *dbpath;       /* DIR/cohort.db */
};

static int db_fail(char *err, size_t errlen, struct store_src *s, const char *what)
{
    snprintf(err, errlen, "%s: reading %s: %s", what, s->dbpath,
             s->db ? sqlite3_errmsg(s->db) : "cannot open");
    return COHORT_ESTORE;
}

/* A copy of a text column, NULL for SQL NULL. *oom is set when a copy fails. */
static char *col_text(sqlite3_stmt *q, int i, int *oom)
{
    const unsigned char *t = sqlite3_column_text(q, i);
    if (!t)
        return NULL;
    char *c = strdup((const char *)t);
    if (!c)
        *oom = 1;
    return c;
}

static double col_real(sqlite3_stmt *q, int i)
{
    return sqlite3_column_type(q, i) == SQLITE_NULL ? NAN : sqlite3_column_double(q, i);
}

#define ROUND_COLUMNS                                                                   \
    "round, strategy, started_at, closed_at, committed_at, offered, participants, "   \
    "total_examples, mean_train_loss, duration_s, close_reason, checkpoint, sha256"

static int read_round_row(sqlite3_stmt *q, struct admin_round *r)
{
    int oom = 0;
    memset(r, 0, sizeof *r);
    r->round = sqlite3_column_int64(q, 0);
    r->strategy = col_text(q, 1, &oom);
    r->started_at = col_text(q, 2, &oom);
    r->closed_at = col_text(q, 3, &oom);
    r->committed_at = col_text(q, 4, &oom);
    r->offered = sqlite3_column_int64(q, 5);
    r->participants = sqlite3_column_int64(q, 6);
    r->total_examples = sqlite3_column_int64(q, 7);
    r->mean_train_loss = col_real(q, 8);
    r->duration_s = col_real(q, 9);
    r->close_reason = col_text(q, 10, &oom);
    r->checkpoint = col_text(q, 11, &oom);
    r->sha256 = col_text(q, 12, &oom);
    if (oom) {
        admin_round_fini(r);
        return COHORT_ENOMEM;
    }
    return 0;
}

/* "file:" URI for path with the characters that URIs give a meaning escaped. */
static char *file_uri(const char *path, const char *params)
{
    size_t n = strlen(path), cap = 3 * n + strlen(params) + 16;
    char *u = malloc(cap), *o = u;
    if (!u)
        return NULL;
    /* "file:///abs" keeps a path that starts with "//" from being read as a host. */
    o += sprintf(o, path[0] == '/' ? "file://" : "file:");
    for (const char *p = path; *p; p++) {
        unsigned char ch = (unsigned char)*p;
        if (ch == '%' || ch == '?' || ch == '#' || ch < 0x20 || ch >= 0x7f)
            o += sprintf(o, "%%%02X", ch);
        else
            *o++ = (char)ch;
    }
    sprintf(o, "?%s", params);
    return u;
}

/*
 * Opens the database read-only and starts the read transaction that every later
 * query of this command runs in. immutable=1 is only for a database nobody has
 * open (see store_open).
 */
static int store_connect(struct store_src *s, int immutable, char *err, size_t errlen)
{
    char *uri = file_uri(s->dbpath, immutable ? "mode=ro&immutable=1" : "mode=ro");
    if (!uri)
        return COHORT_ENOMEM;
    int rc = sqlite3_open_v2(uri, &s->db, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI, NULL);
    free(uri);
    if (rc != SQLITE_OK)
        return db_fail(err, errlen, s, "cannot open the store");
    sqlite3_busy_timeout(s->db, 5000);
    if (sqlite3_exec(s->db, "BEGIN", NULL, NULL, NULL) != SQLITE_OK)
        return db_fail(err, errlen, s, "cannot start a read transaction");
    return 0;
}

static void store_disconnect(struct store_src *s)
{
    if (s->db) {
        sqlite3_exec(s->db, "COMMIT", NULL, NULL, NULL);
        sqlite3_close(s->db);
        s->db = NULL;
    }
}

static void store_close(void *src)
{
    struct store_src *s = src;
    if (!s)
        return;
    store_disconnect(s);
    free(s->dir);
    free(s->dbpath);
    free(s);
}

/* Reads meta.schema_version; the first read of the transaction. */
static int store_check_schema(struct store_src *s, int *sqlite_rc, char *err, size_t errlen)
{
    sqlite3_stmt *q = NULL;
    int rc = sqlite3_prepare_v2(s->db, "SELECT value FROM meta WHERE key = 'schema_version'", -1,
                                &q, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_step(q);
    *sqlite_rc = rc;
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
        int missing = strstr(sqlite3_errmsg(s->db), "no such table") != NULL;
        sqlite3_finalize(q);
        if (missing) {
            snprintf(err, errlen, "%s is not a cohort participation store (it has no meta "
                     "table); point --state-dir at the directory cohortd runs with", s->dbpath);
            return COHORT_ESTORE;
        }
        return db_fail(err, errlen, s, "cannot read the store");
    }
    const char *v = rc == SQLITE_ROW ? (const char *)sqlite3_column_text(q, 0) : NULL;
    if (!v || strcmp(v, STORE_SCHEMA_VERSION) != 0) {
        snprintf(err, errlen, "%s has store schema version %s, this cohort reads version "
                 STORE_SCHEMA_VERSION "; use the cohort CLI of the same release as cohortd",
                 s->dbpath, v ? v : "(none)");
        sqlite3_finalize(q);
        return COHORT_ESTORE;
    }
    sqlite3_finalize(q);
    return 0;
}

static int store_open(const char *dir, void **out, char *err, size_t errlen)
{
    struct stat st;
    if (stat(dir, &st) < 0) {
        snprintf(err, errlen, "state directory %s: %s", dir, strerror(errno));
        return -errno;
    }
    if (!S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "%s is not a directory; --state-dir takes the directory cohortd "
                 "runs with", dir);
        return COHORT_EINVAL;
    }
    struct store_src *s = calloc(1, sizeof *s);
    if (!s)
        return COHORT_ENOMEM;
    size_t n = strlen(dir) + sizeof "/cohort.db-wal";
    s->dir = strdup(dir);
    s->dbpath = malloc(n);
    if (!s->dir || !s->dbpath) {
        store_close(s);
        return COHORT_ENOMEM;
    }
    snprintf(s->dbpath, n, "%s/cohort.db", dir);
    if (stat(s->dbpath, &st) < 0) {
        int e = errno;
        if (e == ENOENT)
            snprintf(err, errlen, "%s holds no cohort.db; is it the --state-dir of a cohortd "
                     "that has started at least once?", dir);
        else
            snprintf(err, errlen, "%s: %s", s->dbpath, strerror(e));
        store_close(s);
        return -e;
    }
    int rc = store_connect(s, 0, err, errlen), src = SQLITE_OK;
    if (rc == 0)
        rc = store_check_schema(s, &src, err, errlen);
    /*
     * A WAL database is read through its -shm file, which a read-only
     * connection still creates when it is missing. It is missing only when no
     * connection is open (cohortd stopped cleanly); if this user cannot create
     * it, the database file alone is complete and is read as immutable.
     */
    char walpath[PATH_MAX];
    snprintf(walpath, sizeof walpath, "%s-wal", s->dbpath);
    if (rc < 0 && ((src & 0xff) == SQLITE_READONLY || (src & 0xff) == SQLITE_CANTOPEN) &&
        access(walpath, F_OK) < 0 && errno == ENOENT) {
        store_disconnect(s);
        rc = store_connect(s, 1, err, errlen);
        if (rc == 0)
            rc = store_check_schema(s, &src, err, errlen);
    }
    if (rc < 0) {
        store_close(s);
        return rc;
    }
    *out = s;
    return 0;
}

static int store_count(struct store_src *s, const char *sql, int64_t *out, char *err,
                       size_t errlen)
{
    sqlite3_stmt *q = NULL;
    if (sqlite3_prepare_v2(s->db, sql, -1, &q, NULL) != SQLITE_OK ||
        sqlite3_step(q) != SQLITE_ROW) {
        sqlite3_finalize(q);
        return db_fail(err, errlen, s, "cannot count rows");
    }
    *out = sqlite3_column_int64(q, 0);
    sqlite3_finalize(q);
    return 0;
}

static int store_round(void *src, int64_t round, struct admin_round *out, char *err,
                       size_t errlen)
{
    struct store_src *s = src;
    sqlite3_stmt *q = NULL;
    const char *sql = round < 0
                          ? "SELECT " ROUND_COLUMNS " FROM rounds ORDER BY round DESC LIMIT 1"
                          : "SELECT " ROUND_COLUMNS " FROM rounds WHERE round = ?1";
    if (sqlite3_prepare_v2(s->db, sql, -1, &q, NULL) != SQLITE_OK)
        return db_fail(err, errlen, s, "cannot query rounds");
    if (round >= 0)
        sqlite3_bind_int64(q, 1, round);
    int rc = sqlite3_step(q);
    if (rc == SQLITE_ROW) {
        rc = read_round_row(q, out);
        sqlite3_finalize(q);
        return rc;
    }
    sqlite3_finalize(q);
    if (rc != SQLITE_DONE)
        return db_fail(err, errlen, s, "cannot query rounds");
    int64_t last = -1;
    store_count(s, "SELECT coalesce(max(round), -1) FROM rounds", &last, err, errlen);
    if (last < 0)
        snprintf(err, errlen, "no round is committed in %s yet", s->dir);
    else
        snprintf(err, errlen, "round %" PRId64 " is not in the store of %s (committed rounds: "
                 "0..%" PRId64 ")", round, s->dir, last);
    return COHORT_ENOENT;
}

static int store_status(void *src, struct admin_status *out, char *err, size_t errlen)
{
    struct store_src *s = src;
    memset(out, 0, sizeof *out);
    int rc = store_count(s, "SELECT count(*) FROM clients", &out->clients, err, errlen);
    if (rc == 0)
        rc = store_count(s, "SELECT count(*) FROM rounds", &out->rounds, err, errlen);
    if (rc < 0 || out->rounds == 0)
        return rc;
    rc = store_round(s, -1, &out->last, err, errlen);
    if (rc == 0)
        out->have_last = 1;
    return rc;
}

static int store_rounds(void *src, int64_t limit, struct admin_round **rows, size_t *n,
                        int64_t *total, char *err, size_t errlen)
{
    struct store_src *s = src;
    *rows = NULL;
    *n = 0;
    int rc = store_count(s, "SELECT count(*) FROM rounds", total, err, errlen);
    if (rc < 0)
        return rc;
    int64_t want = limit > 0 && limit < *total ? limit : *total;
    if (want == 0)
        return 0;
    struct admin_round *r = calloc((size_t)want, sizeof *r);
    if (!r)
        return COHORT_ENOMEM;
    sqlite3_stmt *q = NULL;
    if (sqlite3_prepare_v2(s->db,
                           "SELECT * FROM (SELECT " ROUND_COLUMNS " FROM rounds ORDER BY round "
                           "DESC LIMIT ?1) ORDER BY round",
                           -1, &q, NULL) != SQLITE_OK) {
        free(r);
        return db_fail(err, errlen, s, "cannot query rounds");
    }
    sqlite3_bind_int64(q, 1, want);
    size_t k = 0;
    int oom = 0;
    while (k < (size_t)want && (rc = sqlite3_step(q)) == SQLITE_ROW) {
        if (read_round_row(q, &r[k]) < 0) {
            oom = 1;
            break;
        }
        k++;
    }
    if (oom || (rc != SQLITE_DONE && rc != SQLITE_ROW)) {
        rc = oom ? COHORT_ENOMEM : db_fail(err, errlen, s, "cannot query rounds");
        sqlite3_finalize(q);
        admin_rounds_free(r, k);
        return rc;
    }
    sqlite3_finalize(q);
    *rows = r;
    *n = k;
    return 0;
}

/* Commit times of the rounds after round 0, ascending (ISO-8601 sorts as text). */
struct times {
    char **t;
    size_t n;
};

static void times_free(struct times *ts)
{
    for (size_t i = 0; i < ts->n; i++)
        free(ts->t[i]);
    free(ts->t);
    ts->t = NULL;
    ts->n = 0;
}

static int load_commit_times(struct store_src *s, struct times *ts, char *err, size_t errlen)
{
    int64_t count;
    int rc = store_count(s, "SELECT count(*) FROM rounds WHERE round > 0", &count, err, errlen);
    if (rc < 0 || count == 0)
        return rc;
    if (!(ts->t = calloc((size_t)count, sizeof *ts->t)))
        return COHORT_ENOMEM;
    sqlite3_stmt *q = NULL;
    if (sqlite3_prepare_v2(s->db, "SELECT committed_at FROM rounds WHERE round > 0 "
                           "ORDER BY committed_at", -1, &q, NULL) != SQLITE_OK) {
        times_free(ts);
        return db_fail(err, errlen, s, "cannot query rounds");
    }
    int oom = 0;
    while (ts->n < (size_t)count && (rc = sqlite3_step(q)) == SQLITE_ROW) {
        char *t = col_text(q, 0, &oom);
        if (oom)
            break;
        ts->t[ts->n++] = t ? t : strdup("");
    }
    sqlite3_finalize(q);
    if (oom || (rc != SQLITE_ROW && rc != SQLITE_DONE)) {
        times_free(ts);
        return oom ? COHORT_ENOMEM : db_fail(err, errlen, s, "cannot query rounds");
    }
    return 0;
}

/* Number of commit times >= since. */
static int64_t times_since(const struct times *ts, const char *since)
{
    size_t lo = 0, hi = ts->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (strcmp(ts->t[mid] ? ts->t[mid] : "", since) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return (int64_t)(ts->n - lo);
}

static int store_clients(void *src, struct admin_client **rows, size_t *n, char *err,
                         size_t errlen)
{
    struct store_src *s = src;
    *rows = NULL;
    *n = 0;
    int64_t count;
    int rc = store_count(s, "SELECT count(*) FROM clients", &count, err, errlen);
    if (rc < 0 || count == 0)
        return rc;
    /* Eligible rounds of a client: those committed since its first Hello, the
     * definition docs/store.md uses for the participation rate. The commit times
     * are loaded once, sorted, and counted per client by binary search, so this
     * stays fast with many clients and many rounds. */
    struct times ct = {0};
    if ((rc = load_commit_times(s, &ct, err, errlen)) < 0)
        return rc;
    struct admin_client *c = calloc((size_t)count, sizeof *c);
    if (!c) {
        times_free(&ct);
        return COHORT_ENOMEM;
    }
    static const char *sql =
        "SELECT c.name, c.first_seen, c.last_seen, c.connects, c.num_examples,"
        "  total(p.status = 'accepted'), total(p.status = 'declined'),"
        "  total(p.status = 'dropped'), total(p.status = 'rejected'),"
        "  max(CASE WHEN p.status = 'accepted' THEN p.round END)"
        " FROM clients c LEFT JOIN participation p ON p.client = c.id"
        " GROUP BY c.id ORDER BY c.name";
    sqlite3_stmt *q = NULL;
    if (sqlite3_prepare_v2(s->db, sql, -1, &q, NULL) != SQLITE_OK) {
        free(c);
        times_free(&ct);
        return db_fail(err, errlen, s, "cannot query clients");
    }
    size_t k = 0;
    while (k < (size_t)count && (rc = sqlite3_step(q)) == SQLITE_ROW) {
        struct admin_client *x = &c[k++];
        int oom = 0;
        x->name = col_text(q, 0, &oom);
        x->first_seen = col_text(q, 1, &oom);
        x->last_seen = col_text(q, 2, &oom);
        x->connects = sqlite3_column_int64(q, 3);
        x->num_examples = sqlite3_column_type(q, 4) == SQLITE_NULL ? -1
                                                                   : sqlite3_column_int64(q, 4);
        x->accepted = (int64_t)sqlite3_column_double(q, 5);
        x->declined = (int64_t)sqlite3_column_double(q, 6);
        x->dropped = (int64_t)sqlite3_column_double(q, 7);
        x->rejected = (int64_t)sqlite3_column_double(q, 8);
        x->eligible = x->first_seen ? times_since(&ct, x->first_seen) : 0;
        x->last_round = sqlite3_column_type(q, 9) == SQLITE_NULL ? -1
                                                                 : sqlite3_column_int64(q, 9);
        /* A wall-clock step back could leave rounds the client answered looking
         * older than its first Hello; every answered round counts as eligible. */
        int64_t answered = x->accepted + x->declined + x->dropped + x->rejected;
        if (x->eligible < answered)
            x->eligible = answered;
        x->rate = x->eligible > 0 ? (double)x->accepted / (double)x->eligible : 0.0;
        if (oom) {
            rc = COHORT_ENOMEM;
            break;
        }
    }
    times_free(&ct);
    if (rc != SQLITE_DONE && rc != SQLITE_ROW) {
        rc = rc < 0 ? rc : db_fail(err, errlen, s, "cannot query clients");
        sqlite3_finalize(q);
        admin_clients_free(c, k);
        return rc;
    }
    sqlite3_finalize(q);
    *rows = c;
    *n = k;
    return 0;
}

/*
 * cohortd stores a checkpoint's path relative to the state directory
 * ("checkpoints/round-000007.safetensors"). Older stores hold it as cohortd built
 * it from --state-dir: absolute, or relative to cohortd's working directory.
 * Tried in order: the stored path if absolute; the stored path under the state
 * directory; STATE_DIR/checkpoints/<file name> (where cohortd writes them, so a
 * relative or moved directory is still found); the stored path from the
 * current directory. The first file that exists is used: the caller checks its
 * sha256, so a wrong candidate is refused, never silently replaced by another.
 */
static int store_open_checkpoint(void *src, const struct admin_round *r, char *path,
                                 size_t pathlen, char *err, size_t errlen)
{
    struct store_src *s = src;
    const char *stored = r->checkpoint ? r->checkpoint : "";
    char base_buf[PATH_MAX];
    snprintf(base_buf, sizeof base_buf, "%s", stored);
    const char *base = basename(base_buf);
    char cand[4][PATH_MAX];
    int nc = 0;
    if (stored[0] == '/') {
        snprintf(cand[nc++], PATH_MAX, "%s", stored);
    } else if (stored[0]) {
        snprintf(cand[nc++], PATH_MAX, "%s/%s", s->dir, stored);
    }
    if (base[0] && strcmp(base, "/") != 0 && strcmp(base, ".") != 0)
        snprintf(cand[nc++], PATH_MAX, "%s/checkpoints/%s", s->dir, base);
    if (stored[0] && stored[0] != '/')
        snprintf(cand[nc++], PATH_MAX, "%s", stored);
    for (int i = 0; i < nc; i++) {
        int fd = open(cand[i], O_RDONLY | O_CLOEXEC);
        if (fd < 0 && errno == ENOENT)
            continue;
        if (fd < 0) {
            int e = errno;
            snprintf(err, errlen, "checkpoint of round %" PRId64 ": %s: %s", r->round, cand[i],
                     strerror(e));
            return -e;
        }
        struct stat st;
        if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
            close(fd);
            snprintf(err, errlen, "checkpoint of round %" PRId64 ": %s is not a regular file",
                     r->round, cand[i]);
            return COHORT_EINVAL;
        }
        snprintf(path, pathlen, "%s", cand[i]);
        return fd;
    }
    snprintf(err, errlen, "the checkpoint of round %" PRId64 " (%s in the store) is missing "
             "from %s/checkpoints/; restore it from a backup", r->round, stored, s->dir);
    return COHORT_ENOENT;
}

static const struct admin_source_ops store_ops = {
    .name = "state directory",
    .status = store_status,
    .rounds = store_rounds,
    .clients = store_clients,
    .round = store_round,
    .open_checkpoint = store_open_checkpoint,
    .close = store_close,
};

/* ------------------------------------------------------------- options */

struct admin_opts {
    const char *cmd;
    const char *state_dir;
    int json;
    int64_t limit;          /* rounds */
    const char *round;      /* export: "latest" or a number */
    const char *out;        /* export */
};

struct source {
    const struct admin_source_ops *ops;
    void *src;
};

/* The one place that picks a data source from the options. */
static int open_source(const struct admin_opts *o, struct source *s)
{
    char err[1024];
    s->ops = &store_ops;
    int rc = store_open(o->state_dir, &s->src, err, sizeof err);
    if (rc < 0)
        fprintf(stderr, "cohort %s: %s\n", o->cmd, err);
    return rc;
}

static void close_source(struct source *s)
{
    if (s->ops && s->src)
        s->ops->close(s->src);
    s->src = NULL;
}

enum { OPT_STATE_DIR = 1000, OPT_JSON, OPT_LIMIT, OPT_ROUND, OPT_OUT, OPT_HELP };

/* 0: run, 1: help printed (exit 0), -1: usage error printed (exit 2). */
static int parse_opts(int argc, char **argv, struct admin_opts *o, const char *usage)
{
    int is_rounds = strcmp(o->cmd, "rounds") == 0, is_export = strcmp(o->cmd, "export") == 0;
    static const struct option all[] = {
        {"state-dir", 1, 0, OPT_STATE_DIR}, {"json", 0, 0, OPT_JSON},
        {"limit", 1, 0, OPT_LIMIT},         {"round", 1, 0, OPT_ROUND},
        {"out", 1, 0, OPT_OUT},             {"help", 0, 0, OPT_HELP},
        {0, 0, 0, 0}};
    int seen_state = 0, seen_limit = 0, seen_round = 0, seen_out = 0;
    int opt, li = -1;
    optind = 1;
    opterr = 0;
    while ((opt = getopt_long(argc, argv, ":", all, &li)) != -1) {
        const char *name = NULL;
        char bad[64];
        int *seen = NULL;
        switch (opt) {
        case OPT_STATE_DIR:
            name = "--state-dir";
            seen = &seen_state;
            o->state_dir = optarg;
            break;
        case OPT_JSON:
            if (is_export)
                goto unknown;
            o->json = 1;
            break;
        case OPT_LIMIT: {
            if (!is_rounds)
                goto unknown;
            name = "--limit";
            seen = &seen_limit;
            uint64_t v;
            if (cli_u64(o->cmd, "--limit", optarg, 0, INT64_MAX, &v) < 0)
                return -1;
            o->limit = (int64_t)v;
            break;
        }
        case OPT_ROUND:
            if (!is_export)
                goto unknown;
            name = "--round";
            seen = &seen_round;
            o->round = optarg;
            break;
        case OPT_OUT:
            if (!is_export)
                goto unknown;
            name = "--out";
            seen = &seen_out;
            o->out = optarg;
            break;
        case OPT_HELP:
            printf("%s", usage);
            return 1;
        case ':':
            fprintf(stderr, "cohort %s: %s needs a value\n", o->cmd, argv[optind - 1]);
            fprintf(stderr, "%s", usage);
            return -1;
        default:
            if (optopt)
                snprintf(bad, sizeof bad, "-%c", optopt);
            else
                snprintf(bad, sizeof bad, "%.60s", argv[optind - 1]);
            goto unknown_opt;
        unknown:
            /* A known option that this subcommand does not take. */
            snprintf(bad, sizeof bad, "--%s", li >= 0 ? all[li].name : "?");
        unknown_opt:
            fprintf(stderr, "cohort %s: unknown option '%s'\n", o->cmd, bad);
            fprintf(stderr, "%s", usage);
            return -1;
        }
        if (seen && (*seen)++) {
            fprintf(stderr, "cohort %s: %s given twice\n", o->cmd, name);
            return -1;
        }
        li = -1;
    }
    if (optind < argc) {
        fprintf(stderr, "cohort %s: unexpected argument '%s'\n", o->cmd, argv[optind]);
        fprintf(stderr, "%s", usage);
        return -1;
    }
    if (!o->state_dir || !o->state_dir[0]) {
        fprintf(stderr, "cohort %s: --state-dir DIR is required (the directory cohortd runs "
                "with)\n", o->cmd);
        return -1;
    }
    return 0;
}

/* --------------------------------------------------------------- output */

static int print_json(cJSON *root)
{
    char *s = root ? cJSON_Print(root) : NULL;
    cJSON_Delete(root);
    if (!s) {
        fprintf(stderr, "cohort: out of memory while writing JSON\n");
        return 1;
    }
    puts(s);
    cJSON_free(s);
    return fflush(stdout) == 0 ? 0 : 1;
}

static cJSON *j_str(const char *s)
{
    return s ? cJSON_CreateString(s) : cJSON_CreateNull();
}

static cJSON *j_real(double v)
{
    return isfinite(v) ? cJSON_CreateNumber(v) : cJSON_CreateNull();
}

static cJSON *j_int(int64_t v)
{
    return cJSON_CreateNumber((double)v);
}

static cJSON *round_json(const struct admin_round *r)
{
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return NULL;
    cJSON_AddItemToObject(o, "round", j_int(r->round));
    cJSON_AddItemToObject(o, "strategy", j_str(r->strategy));
    cJSON_AddItemToObject(o, "started_at", j_str(r->started_at));
    cJSON_AddItemToObject(o, "closed_at", j_str(r->closed_at));
    cJSON_AddItemToObject(o, "committed_at", j_str(r->committed_at));
    cJSON_AddItemToObject(o, "offered", j_int(r->offered));
    cJSON_AddItemToObject(o, "participants", j_int(r->participants));
    cJSON_AddItemToObject(o, "total_examples", j_int(r->total_examples));
    cJSON_AddItemToObject(o, "mean_train_loss", j_real(r->mean_train_loss));
    cJSON_AddItemToObject(o, "duration_s", j_real(r->duration_s));
    cJSON_AddItemToObject(o, "close_reason", j_str(r->close_reason));
    cJSON_AddItemToObject(o, "checkpoint", j_str(r->checkpoint));
    cJSON_AddItemToObject(o, "sha256", j_str(r->sha256));
    return o;
}

/* Text from the store shown on a terminal: control characters become '?'. */
static void put_clean(const char *s, int width)
{
    int n = 0;
    for (; s && *s; s++, n++)
        putchar((unsigned char)*s < 0x20 || *s == 0x7f ? '?' : *s);
    for (; n < width; n++)
        putchar(' ');
}

/* "2026-01-31T12:00:00.123Z" -> "2026-01-31T12:00:00Z" for tables. */
static const char *short_time(const char *t, char *buf, size_t len)
{
    if (!t)
        return "-";
    if (strlen(t) >= 20 && t[19] == '.')
        snprintf(buf, len, "%.19sZ", t);
    else
        snprintf(buf, len, "%s", t);
    return buf;
}

static const char *fmt_real(double v, int decimals, char *buf, size_t len)
{
    if (!isfinite(v))
        return "-";
    snprintf(buf, len, "%.*f", decimals, v);
    return buf;
}

/* ------------------------------------------------------------- commands */

static const char status_usage[] =
    "usage: cohort status --state-dir DIR [--json]\n"
    "\n"
    "The federation at a glance: last committed round, strategy, registered clients,\n"
    "participants and mean train loss of the last round, and its checkpoint.\n"
    "Reads DIR/cohort.db read-only; safe while cohortd runs.\n"
    "\n"
    "  --state-dir DIR   the --state-dir of cohortd\n"
    "  --json            one JSON object instead of text (for scripts)\n";

static const char rounds_usage[] =
    "usage: cohort rounds --state-dir DIR [--limit N] [--json]\n"
    "\n"
    "One row per committed round, oldest first: participants/offered, examples,\n"
    "mean train loss, duration and why the round closed. Round 0 is the initial model.\n"
    "\n"
    "  --state-dir DIR   the --state-dir of cohortd\n"
    "  --limit N         only the last N rounds (default 20; 0: all)\n"
    "  --json            {\"total_rounds\", \"limit\", \"rounds\": [...]} instead of a table\n";

static const char clients_usage[] =
    "usage: cohort clients --state-dir DIR [--json]\n"
    "\n"
    "One row per registered client: first and last Hello, rounds accepted, declined,\n"
    "dropped and rejected, participation rate (accepted / rounds committed since its\n"
    "first Hello) and the last round it took part in.\n"
    "\n"
    "  --state-dir DIR   the --state-dir of cohortd\n"
    "  --json            {\"clients\": [...]} instead of a table\n";

static const char export_usage[] =
    "usage: cohort export --state-dir DIR --round R|latest --out FILE\n"
    "\n"
    "Copies the global model of round R (safetensors, F32) to FILE after checking it\n"
    "against the sha256 recorded in the store; refuses a missing or altered checkpoint.\n"
    "FILE is written durably (temporary file, fsync, rename) and replaced if it exists.\n"
    "PyTorch: safetensors.torch.load_file(FILE) gives the state_dict.\n"
    "\n"
    "  --state-dir DIR   the --state-dir of cohortd\n"
    "  --round R         round number, or latest for the last committed round\n"
    "  --out FILE        where to write the checkpoint\n";

int status_main(int argc, char **argv)
{
    struct admin_opts o = {.cmd = "status"};
    int rc = parse_opts(argc, argv, &o, status_usage);
    if (rc)
        return rc > 0 ? 0 : 2;
    struct source s;
    if (open_source(&o, &s) < 0)
        return 1;
    struct admin_status st;
    char err[1024], ckpath[PATH_MAX] = "";
    rc = s.ops->status(s.src, &st, err, sizeof err);
    if (rc < 0) {
        fprintf(stderr, "cohort status: %s\n", err);
        close_source(&s);
        return 1;
    }
    if (st.have_last) {
        char cerr[1024];
        int fd = s.ops->open_checkpoint(s.src, &st.last, ckpath, sizeof ckpath, cerr,
                                        sizeof cerr);
        if (fd >= 0)
            close(fd);
        else
            ckpath[0] = '\0';
    }
    close_source(&s);

    const struct admin_round *l = &st.last;
    if (o.json) {
        cJSON *j = cJSON_CreateObject();
        if (j) {
            cJSON_AddItemToObject(j, "state_dir", j_str(o.state_dir));
            cJSON_AddItemToObject(j, "clients_registered", j_int(st.clients));
            cJSON_AddItemToObject(j, "rounds_committed", j_int(st.rounds));
            if (st.have_last) {
                cJSON_AddItemToObject(j, "last_round", j_int(l->round));
                cJSON_AddItemToObject(j, "strategy", j_str(l->strategy));
                cJSON_AddItemToObject(j, "committed_at", j_str(l->committed_at));
                cJSON_AddItemToObject(j, "offered", j_int(l->offered));
                cJSON_AddItemToObject(j, "participants", j_int(l->participants));
                cJSON_AddItemToObject(j, "total_examples", j_int(l->total_examples));
                cJSON_AddItemToObject(j, "mean_train_loss", j_real(l->mean_train_loss));
                cJSON_AddItemToObject(j, "close_reason", j_str(l->close_reason));
                cJSON_AddItemToObject(j, "checkpoint", j_str(l->checkpoint));
                cJSON_AddItemToObject(j, "checkpoint_file", j_str(ckpath[0] ? ckpath : NULL));
                cJSON_AddItemToObject(j, "sha256", j_str(l->sha256));
            } else {
                const char *keys[] = {"last_round", "strategy", "committed_at", "offered",
                                      "participants", "total_examples", "mean_train_loss",
                                      "close_reason", "checkpoint", "checkpoint_file",
                                      "sha256"};
                for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
                    cJSON_AddItemToObject(j, keys[i], cJSON_CreateNull());
            }
        }
        admin_round_fini(&st.last);
        return print_json(j);
    }

    char tb[64], lb[64];
    printf("state directory   %s\n", o.state_dir);
    printf("clients           %" PRId64 " registered\n", st.clients);
    if (!st.have_last) {
        printf("last round        none committed yet (cohortd commits round 0, the initial "
               "model, when it first starts)\n");
        return 0;
    }
    printf("last round        %" PRId64 " (committed %s, %s)\n", l->round,
           short_time(l->committed_at, tb, sizeof tb), l->close_reason ? l->close_reason : "-");
    printf("strategy          %s\n", l->strategy ? l->strategy : "-");
    printf("participants      %" PRId64 " of %" PRId64 " offered, %" PRId64 " examples\n",
           l->participants, l->offered, l->total_examples);
    printf("mean train loss   %s\n", isfinite(l->mean_train_loss)
                                         ? fmt_real(l->mean_train_loss, 4, lb, sizeof lb)
                                         : "not reported");
    if (ckpath[0])
        printf("checkpoint        %s\n", ckpath);
    else
        printf("checkpoint        %s (MISSING)\n", l->checkpoint ? l->checkpoint : "-");
    printf("sha256            %s\n", l->sha256 ? l->sha256 : "-");
    admin_round_fini(&st.last);
    return fflush(stdout) == 0 ? 0 : 1;
}

int rounds_main(int argc, char **argv)
{
    struct admin_opts o = {.cmd = "rounds", .limit = DEFAULT_ROUNDS_LIMIT};
    int rc = parse_opts(argc, argv, &o, rounds_usage);
    if (rc)
        return rc > 0 ? 0 : 2;
    struct source s;
    if (open_source(&o, &s) < 0)
        return 1;
    struct admin_round *rows;
    size_t n;
    int64_t total;
    char err[1024];
    rc = s.ops->rounds(s.src, o.limit, &rows, &n, &total, err, sizeof err);
    close_source(&s);
    if (rc < 0) {
        fprintf(stderr, "cohort rounds: %s\n", err);
        return 1;
    }
    if (o.json) {
        cJSON *j = cJSON_CreateObject(), *a = cJSON_CreateArray();
        if (j && a) {
            cJSON_AddItemToObject(j, "total_rounds", j_int(total));
            cJSON_AddItemToObject(j, "limit", j_int(o.limit));
            for (size_t i = 0; i < n; i++)
                cJSON_AddItemToArray(a, round_json(&rows[i]));
            cJSON_AddItemToObject(j, "rounds", a);
            a = NULL;
        }
        cJSON_Delete(a);
        admin_rounds_free(rows, n);
        return print_json(j);
    }
    printf("%6s %12s %10s %10s %10s  %s\n", "ROUND", "PARTICIPANTS", "EXAMPLES", "TRAIN_LOSS",
           "DURATION_S", "CLOSE_REASON");
    for (size_t i = 0; i < n; i++) {
        const struct admin_round *r = &rows[i];
        char part[48], lb[32], db[32];
        snprintf(part, sizeof part, "%" PRId64 "/%" PRId64, r->participants, r->offered);
        printf("%6" PRId64 " %12s %10" PRId64 " %10s %10s  ", r->round, part, r->total_examples,
               fmt_real(r->mean_train_loss, 4, lb, sizeof lb),
               fmt_real(r->duration_s, 2, db, sizeof db));
        put_clean(r->close_reason ? r->close_reason : "-", 0);
        putchar('\n');
    }
    if ((int64_t)n < total)
        printf("(last %zu of %" PRId64 " rounds; --limit 0 shows all)\n", n, total);
    admin_rounds_free(rows, n);
    return fflush(stdout) == 0 ? 0 : 1;
}

int clients_main(int argc, char **argv)
{
    struct admin_opts o = {.cmd = "clients"};
    int rc = parse_opts(argc, argv, &o, clients_usage);
    if (rc)
        return rc > 0 ? 0 : 2;
    struct source s;
    if (open_source(&o, &s) < 0)
        return 1;
    struct admin_client *rows;
    size_t n;
    char err[1024];
    rc = s.ops->clients(s.src, &rows, &n, err, sizeof err);
    close_source(&s);
    if (rc < 0) {
        fprintf(stderr, "cohort clients: %s\n", err);
        return 1;
    }
    if (o.json) {
        cJSON *j = cJSON_CreateObject(), *a = cJSON_CreateArray();
        for (size_t i = 0; j && a && i < n; i++) {
            const struct admin_client *c = &rows[i];
            cJSON *x = cJSON_CreateObject();
            if (!x)
                break;
            cJSON_AddItemToObject(x, "name", j_str(c->name));
            cJSON_AddItemToObject(x, "first_seen", j_str(c->first_seen));
            cJSON_AddItemToObject(x, "last_seen", j_str(c->last_seen));
            cJSON_AddItemToObject(x, "connects", j_int(c->connects));
            cJSON_AddItemToObject(x, "num_examples", c->num_examples < 0
                                                         ? cJSON_CreateNull()
                                                         : j_int(c->num_examples));
            cJSON_AddItemToObject(x, "accepted", j_int(c->accepted));
            cJSON_AddItemToObject(x, "declined", j_int(c->declined));
            cJSON_AddItemToObject(x, "dropped", j_int(c->dropped));
            cJSON_AddItemToObject(x, "rejected", j_int(c->rejected));
            cJSON_AddItemToObject(x, "eligible_rounds", j_int(c->eligible));
            cJSON_AddItemToObject(x, "participation_rate", cJSON_CreateNumber(c->rate));
            cJSON_AddItemToObject(x, "last_round",
                                  c->last_round < 0 ? cJSON_CreateNull() : j_int(c->last_round));
            cJSON_AddItemToArray(a, x);
        }
        if (j && a) {
            cJSON_AddItemToObject(j, "clients", a);
            a = NULL;
        }
        cJSON_Delete(a);
        admin_clients_free(rows, n);
        return print_json(j);
    }
    int w = 4;
    for (size_t i = 0; i < n; i++) {
        int len = rows[i].name ? (int)strlen(rows[i].name) : 1;
        if (len > w)
            w = len > 64 ? 64 : len;
    }
    printf("%-*s %-20s %-20s %8s %8s %7s %8s %6s %10s\n", w, "NAME", "FIRST_SEEN", "LAST_SEEN",
           "ACCEPTED", "DECLINED", "DROPPED", "REJECTED", "RATE", "LAST_ROUND");
    for (size_t i = 0; i < n; i++) {
        const struct admin_client *c = &rows[i];
        char t1[64], t2[64], lr[32];
        put_clean(c->name ? c->name : "-", w);
        snprintf(lr, sizeof lr, "%" PRId64, c->last_round);
        printf(" %-20s %-20s %8" PRId64 " %8" PRId64 " %7" PRId64 " %8" PRId64 " %6.3f %10s\n",
               short_time(c->first_seen, t1, sizeof t1), short_time(c->last_seen, t2, sizeof t2),
               c->accepted, c->declined, c->dropped, c->rejected, c->rate,
               c->last_round < 0 ? "-" : lr);
    }
    admin_clients_free(rows, n);
    return fflush(stdout) == 0 ? 0 : 1;
}

/* ------------------------------------------------------------------ export */

static int write_all(int fd, const uint8_t *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -errno;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int fsync_dir_of(const char *path)
{
    char buf[PATH_MAX];
    snprintf(buf, sizeof buf, "%s", path);
    int fd = open(dirname(buf), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int rc = fsync(fd) < 0 ? -errno : 0;
    close(fd);
    return rc;
}

/*
 * Copies src_fd to out through out.XXXXXX in the same directory, hashing the
 * bytes as they are written; the rename happens only if their sha256 equals
 * want_hex, so a damaged checkpoint never reaches out. Returns 0, COHORT_ECHECKSUM
 * (got_hex then holds the file's digest) or another negative code with err set.
 */
static int copy_verified(int src_fd, const char *src_path, const char *out, const char *want_hex,
                         char got_hex[65], uint64_t *bytes, char *err, size_t errlen)
{
    size_t tl = strlen(out) + sizeof ".XXXXXX";
    char *tmp = malloc(tl);
    uint8_t *buf = malloc(1 << 20);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    int fd = -1, rc = 0;
    if (!tmp || !buf || !md) {
        rc = COHORT_ENOMEM;
        goto done;
    }
    snprintf(tmp, tl, "%s.XXXXXX", out);
    fd = mkostemp(tmp, O_CLOEXEC);
    if (fd < 0) {
        rc = -errno;
        snprintf(err, errlen, "cannot create a file beside %s: %s", out, strerror(errno));
        tmp[0] = '\0';
        goto done;
    }
    EVP_DigestInit_ex(md, EVP_sha256(), NULL);
    *bytes = 0;
    for (;;) {
        ssize_t r = read(src_fd, buf, 1 << 20);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            rc = -errno;
            snprintf(err, errlen, "reading %s: %s", src_path, strerror(errno));
            goto done;
        }
        if (r == 0)
            break;
        EVP_DigestUpdate(md, buf, (size_t)r);
        if ((rc = write_all(fd, buf, (size_t)r)) < 0) {
            snprintf(err, errlen, "writing %s: %s", tmp, strerror(-rc));
            goto done;
        }
        *bytes += (uint64_t)r;
    }
    uint8_t dig[32];
    EVP_DigestFinal_ex(md, dig, NULL);
    coh_hex(dig, sizeof dig, got_hex);
    if (!want_hex || strcasecmp(got_hex, want_hex) != 0) {
        rc = COHORT_ECHECKSUM;
        goto done;
    }
    /* Plain-file permissions as cp would give them (mkostemp makes 0600). */
    mode_t um = umask(0);
    umask(um);
    if (fchmod(fd, 0666 & ~um) < 0 || fsync(fd) < 0) {
        rc = -errno;
        snprintf(err, errlen, "writing %s: %s", tmp, strerror(errno));
        goto done;
    }
    if (close(fd) < 0) {
        fd = -1;
        rc = -errno;
        snprintf(err, errlen, "writing %s: %s", tmp, strerror(errno));
        goto done;
    }
    fd = -1;
    if (rename(tmp, out) < 0) {
        rc = -errno;
        snprintf(err, errlen, "cannot rename %s to %s: %s", tmp, out, strerror(errno));
        goto done;
    }
    tmp[0] = '\0';
    if ((rc = fsync_dir_of(out)) < 0)
        snprintf(err, errlen, "syncing the directory of %s: %s", out, strerror(-rc));
done:
    if (fd >= 0)
        close(fd);
    if (tmp && tmp[0])
        unlink(tmp);
    free(tmp);
    free(buf);
    EVP_MD_CTX_free(md);
    return rc;
}

int export_main(int argc, char **argv)
{
    struct admin_opts o = {.cmd = "export"};
    int rc = parse_opts(argc, argv, &o, export_usage);
    if (rc)
        return rc > 0 ? 0 : 2;
    if (!o.round || !o.out || !o.out[0]) {
        fprintf(stderr, "cohort export: --round R|latest and --out FILE are required\n");
        return 2;
    }
    struct stat st;
    if (stat(o.out, &st) == 0 && S_ISDIR(st.st_mode)) {
        fprintf(stderr, "cohort export: --out %s is a directory; give the file to write\n",
                o.out);
        return 2;
    }
    int64_t round = -1;
    if (strcmp(o.round, "latest") != 0) {
        uint64_t v;
        if (cli_u64("export", "--round", o.round, 0, INT64_MAX, &v) < 0) {
            fprintf(stderr, "cohort export: (or --round latest)\n");
            return 2;
        }
        round = (int64_t)v;
    }
    struct source s;
    if (open_source(&o, &s) < 0)
        return 1;
    struct admin_round r;
    char err[2 * PATH_MAX + 256], path[PATH_MAX];
    rc = s.ops->round(s.src, round, &r, err, sizeof err);
    if (rc < 0) {
        fprintf(stderr, "cohort export: %s\n", err);
        close_source(&s);
        return 1;
    }
    int fd = s.ops->open_checkpoint(s.src, &r, path, sizeof path, err, sizeof err);
    close_source(&s);
    if (fd < 0) {
        fprintf(stderr, "cohort export: %s\n", err);
        admin_round_fini(&r);
        return 1;
    }
    char got[65] = "";
    uint64_t bytes = 0;
    rc = copy_verified(fd, path, o.out, r.sha256, got, &bytes, err, sizeof err);
    close(fd);
    if (rc == COHORT_ECHECKSUM) {
        fprintf(stderr, "cohort export: %s has sha256 %s, but the store recorded %s for round "
                "%" PRId64 "; the checkpoint was altered or damaged, nothing was written. "
                "Restore it from a backup.\n", path, got, r.sha256 ? r.sha256 : "(none)",
                r.round);
    } else if (rc < 0) {
        fprintf(stderr, "cohort export: %s\n", err);
    } else {
        printf("exported round %" PRId64 " to %s (%" PRIu64 " bytes, sha256 %s, from %s)\n",
               r.round, o.out, bytes, got, path);
    }
    admin_round_fini(&r);
    return rc < 0 ? 1 : 0;
}
