/*
 * `cohort status`, `cohort rounds`, `cohort clients` and `cohort export`: an
 * operator's view of a federation, read from a data source.
 *
 * The commands never talk to SQLite themselves. They ask a struct admin_source
 * for plain rows (the structs below) and print them as a table or as JSON. The
 * one source today reads STATE_DIR/cohort.db directly (read-only, WAL-safe, so
 * it works while cohortd runs); a second one, such as cohortd's HTTP endpoint
 * (`--http URL`), is another admin_source_ops table that fills the same rows.
 *
 * Everything here runs on the CLI's only thread.
 */
#ifndef COH_CMD_ADMIN_H
#define COH_CMD_ADMIN_H

#include <stddef.h>
#include <stdint.h>

/* A committed round: one row of the store's `rounds` table. Strings are owned
 * (free with admin_round_fini); a NULL string or a NAN double is SQL NULL. */
struct admin_round {
    int64_t round;
    char *strategy;
    char *started_at, *closed_at, *committed_at;  /* UTC ISO-8601 with milliseconds */
    int64_t offered, participants, total_examples;
    double mean_train_loss;                       /* NAN: no participant reported one */
    double duration_s;                            /* NAN: not recorded */
    char *close_reason;
    char *checkpoint;                             /* as stored by cohortd */
    char *sha256;                                 /* hex sha256 of the checkpoint file */
};

/* The federation at a glance. */
struct admin_status {
    int64_t clients;            /* registered clients (every name that ever sent Hello) */
    int64_t rounds;             /* committed rounds, round 0 (the initial model) included */
    int have_last;              /* 0: nothing committed yet, last is empty */
    struct admin_round last;    /* the last committed round */
};

/* One registered client with its participation history. */
struct admin_client {
    char *name;
    char *first_seen, *last_seen;   /* first and latest Hello */
    int64_t connects;
    int64_t num_examples;           /* from the latest Hello; -1 if unknown */
    int64_t accepted, declined, dropped, rejected;
    int64_t eligible;               /* rounds committed since first_seen (round 0 excluded) */
    double rate;                    /* accepted / eligible (0 when eligible is 0) */
    int64_t last_round;             /* latest round with an accepted update; -1: none */
};

/*
 * A data source. Every function returns 0 or a negative COHORT_E* code with a
 * sentence in err (naming what was wrong and what to do). Rows come back in
 * arrays the caller frees with admin_rounds_free / admin_clients_free.
 */
struct admin_source_ops {
    const char *name;
    int (*status)(void *src, struct admin_status *out, char *err, size_t errlen);
    /* The last `limit` rounds (0: all) in ascending order; *total = rounds committed. */
    int (*rounds)(void *src, int64_t limit, struct admin_round **rows, size_t *n,
                  int64_t *total, char *err, size_t errlen);
    /* Clients ordered by name. */
    int (*clients)(void *src, struct admin_client **rows, size_t *n, char *err, size_t errlen);
    /* One round (round < 0: the last committed one). COHORT_ENOENT if the store has none. */
    int (*round)(void *src, int64_t round, struct admin_round *out, char *err, size_t errlen);
    /* Opens the checkpoint file of a round for reading: a readable fd (>= 0) and the
     * path it was found at, or a negative code. The bytes are not checked here. */
    int (*open_checkpoint)(void *src, const struct admin_round *r, char *path, size_t pathlen,
                           char *err, size_t errlen);
    void (*close)(void *src);
};

void admin_round_fini(struct admin_round *r);
void admin_rounds_free(struct admin_round *rows, size_t n);
void admin_clients_free(struct admin_client *rows, size_t n);

/* The subcommands themselves (status_main, rounds_main, clients_main, export_main)
 * are declared in cli.h with the others. */

#endif
