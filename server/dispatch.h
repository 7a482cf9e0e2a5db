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

#endif
