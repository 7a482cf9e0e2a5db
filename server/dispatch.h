/*
 * Frame dispatch: decodes a client's frame and routes it by message type and
 * connection state (redis processCommand). Loop thread only.
 */
#ifndef DISPATCH_H
#define DISPATCH_H

#include <stddef.h>
#include <stdint.h>

#include "cohort.pb-c.h"

struct conn;

void dispatch_frame(struct conn *c, const uint8_t *frame, size_t len);
/* Answers a Heartbeat (trainer and peer connections alike). */
void dispatch_heartbeat(struct conn *c, const Cohort__Heartbeat *hb);
/* Sends the Welcome that accepts a Hello; trainers and gossip peers get the same one. */
void dispatch_welcome(struct conn *c, uint64_t current_round);
/* Logs an Error the other side sent (who: "client", "peer"); a fatal one closes the
 * connection, since the sender will not go on. */
void dispatch_remote_error(struct conn *c, const char *module, const char *who,
                           const Cohort__Error *err);

#endif
