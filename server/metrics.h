/*
 * Counters, gauges and histograms for /metrics (Prometheus text format 0.0.4).
 * The round manager and the connections report events here; http.c renders
 * them together with gauges read from the live server state. Every label set
 * is bounded: update results and reasons come from fixed lists.
 * Loop thread only, except metrics_now(), which any thread may call.
 */
#ifndef METRICS_H
#define METRICS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

struct server;
struct part;

/* Monotonic seconds (for durations measured on the pool). Any thread. */
double metrics_now(void);

void metrics_bytes_in(uint64_t n);
void metrics_bytes_out(uint64_t n);
void metrics_fold_seconds(double s);
void metrics_store_commit_seconds(double s);
/* A round was committed: counts each part's outcome and observes the duration. */
void metrics_round_committed(const struct part *parts, size_t nparts, uint32_t participants,
                             double duration_s);
/* The latest evaluation report (names and values are copied; at most 16 kept). */
void metrics_eval_report(uint64_t round, const char *const *names, const double *values,
                         size_t n);

/* Outcome label of a part ("accepted", "declined", "rejected", "dropped") and its bounded
 * reason ("none", "client", "deadline", "disconnected", "upload_timeout", "shape", ...). */
const char *metrics_part_result(const struct part *p);
const char *metrics_part_reason(const struct part *p);

/* Writes every metric in Prometheus text format. */
void metrics_write(struct server *s, FILE *f);

#endif
