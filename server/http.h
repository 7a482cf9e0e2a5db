/*
 * The admin HTTP endpoint (--http HOST:PORT, off by default): plain HTTP/1.1
 * on the server's libuv loop, parsed with Debian's http-parser. Routes:
 *   /             the dashboard (static page; it reads the routes below)
 *   /metrics      Prometheus text format (metrics.c)
 *   /api/status   live state of the round manager, JSON
 *   /api/rounds   committed rounds from the store (?limit=N, default 100), JSON
 *   /api/clients  registered clients with their participation (?limit=N), JSON
 *   /healthz      "ok" while the loop runs
 * With --http-token every route but / and /healthz needs
 * "Authorization: Bearer TOKEN" (401 otherwise). Requests are bounded (8 KiB
 * of request line and headers, no bodies), connections too (16 at once,
 * 10 s idle). GET and HEAD only. Loop thread only.
 */
#ifndef HTTP_H
#define HTTP_H

struct server;

/* 0 when spec is "PORT" or "HOST:PORT" with an IP address (start-up checks). */
int http_check_address(const char *spec);
/* Starts listening when s->cfg.http is set. 0 (also when off) or -1 after a log line. */
int http_start(struct server *s);
/* Closes the listener and every HTTP connection (shutdown). */
void http_stop(struct server *s);
/* The address actually bound ("127.0.0.1:PORT"), "" when off. */
const char *http_address(void);

#endif
