/*
 * Participation store: SQLite in WAL mode at STATE_DIR/cohort.db. Clients,
 * rounds, one participation row per client per round, strategy state. A round
 * is committed in one transaction, after its checkpoint file is durable, so a
 * crash at any point leaves the last committed round intact.
 * Loop thread only (the connection is opened without a mutex).
 * Schema for operators: docs/store.md.
 */
#ifndef PSTORE_H
#define PSTORE_H

#include <sqlite3.h>
#include <stddef.h>
#include <stdint.h>

struct pstore;
struct part;

int pstore_open(struct pstore **out, const char *path, char *err, size_t errlen);
void pstore_close(struct pstore *p);
sqlite3 *pstore_db(struct pstore *p);
/* durable=1: synchronous=FULL (default); 0: NORMAL (a crash of the process
 * loses nothing; a power loss may lose the last rounds). */
void pstore_set_durable(struct pstore *p, int durable);

/* Registers a client by certificate name (or refreshes last_seen); *id gets
 * its row id. pstore_client_seen registers a trainer; _role records the role
 * of the latest Hello ("trainer" or "evaluator"). */
int pstore_client_seen(struct pstore *p, const char *name, uint64_t num_examples, int64_t *id);
int pstore_client_seen_role(struct pstore *p, const char *name, const char *role,
                            uint64_t num_examples, int64_t *id);
/* Trainers registered (evaluators do not count: they are not part of N). */
int pstore_count_clients(struct pstore *p, uint64_t *n);
/* Name of a client id into buf ("" if unknown). */
int pstore_client_name(struct pstore *p, int64_t id, char *buf, size_t len);

struct pstore_last {
    int found;
    uint64_t round;
    char checkpoint[1024];
    char sha256[65];
};
int pstore_last_round(struct pstore *p, struct pstore_last *out);

struct pstore_round {
    uint64_t round;
    const char *strategy;
    const char *started_at, *closed_at;
    uint32_t offered, participants;
    uint64_t total_examples;
    double mean_train_loss;     /* NAN when nobody reported one */
    double duration_s;
    const char *close_reason;
    const char *checkpoint;
    const char *sha256;
};

/* Commits one round: its row, the participation rows of every part that was
 * offered, and whatever extra() writes (strategy state), in one transaction.
 * extra may be NULL. On failure nothing is written. */
int pstore_commit_round(struct pstore *p, const struct pstore_round *r, const struct part *parts,
                        size_t nparts, int (*extra)(sqlite3 *db, void *arg), void *extra_arg);

/* Stores one evaluation report (metrics of the global model after round), in
 * one transaction; a metric reported again for the same round replaces it. */
int pstore_eval_record(struct pstore *p, uint64_t round, int64_t client_id,
                       const char *const *names, const double *values, size_t n);

/* Meta key/value (schema version, strategy, model layout). */
int pstore_meta_get(struct pstore *p, const char *key, char *buf, size_t len);
int pstore_meta_set(struct pstore *p, const char *key, const char *value);

#endif
