/* Clocks for the loop and for the store's timestamps. Any thread. */
#include <stdio.h>
#include <time.h>
#include <uv.h>

#include "server.h"

double server_now(struct server *s)
{
    return (double)uv_hrtime() / 1e9;
}

void server_iso_now(char *buf, size_t len)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char b[32];
    strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf, len, "%s.%03ldZ", b, ts.tv_nsec / 1000000);
}
