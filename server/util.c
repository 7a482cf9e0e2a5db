/* Clocks for the loop and for the store's timestamps; list-file lines. Any thread. */
#include <stdio.h>
#include <string.h>
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

char *server_list_entry(char *line)
{
    char *p = line;
    while (*p == ' ' || *p == '\t')
        p++;
    char *e = p + strlen(p);
    while (e > p && (e[-1] == '\n' || e[-1] == '\r' || e[-1] == ' ' || e[-1] == '\t'))
        *--e = '\0';
    return *p && *p != '#' ? p : NULL;
}
