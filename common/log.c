/* Log sink and formatting; see log.h. The sink pointer is set at start-up. */
#include "log.h"

#include <stdio.h>
#include <string.h>
#include <time.h>
#include <sys/time.h>

int coh_log_level_max = COH_LOG_INFO;
static coh_log_fn log_fn;
static void *log_user;
static int log_disabled;
static int log_json;

static const char *level_names[] = {"ERR", "WARN", "NOTICE", "INFO", "DEBUG"};

void coh_log_set_level(int level)
{
    coh_log_level_max = level;
}

void coh_log_set_fn(coh_log_fn fn, void *user)
{
    log_fn = fn;
    log_user = user;
    log_disabled = 0;
}

void coh_log_disable(void)
{
    log_disabled = 1;
    log_fn = NULL;
}

void coh_log_set_json(int json)
{
    log_json = json;
}

const char *coh_log_level_name(int level)
{
    if (level < 0 || level > COH_LOG_DEBUG)
        return "?";
    return level_names[level];
}

int coh_log_parse_level(const char *s)
{
    for (int i = 0; i <= COH_LOG_DEBUG; i++)
        if (strcasecmp(s, level_names[i]) == 0)
            return i;
    if (strcasecmp(s, "error") == 0)
        return COH_LOG_ERR;
    if (strcasecmp(s, "warning") == 0)
        return COH_LOG_WARN;
    return -1;
}

static void json_escape(char *out, size_t cap, const char *in)
{
    size_t o = 0;
    for (; *in && o + 7 < cap; in++) {
        unsigned char ch = (unsigned char)*in;
        if (ch == '"' || ch == '\\') {
            out[o++] = '\\';
            out[o++] = (char)ch;
        } else if (ch < 0x20) {
            o += (size_t)snprintf(out + o, cap - o, "\\u%04x", ch);
        } else {
            out[o++] = (char)ch;
        }
    }
    out[o] = '\0';
}

void coh_log_write(int level, const char *module, const char *fmt, ...)
{
    if (log_disabled)
        return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);

    if (log_fn) {
        log_fn(level, module, msg, log_user);
        return;
    }
    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    char ts[40];
    strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
    char line[2400];
    if (log_json) {
        char esc[2200];
        json_escape(esc, sizeof esc, msg);
        snprintf(line, sizeof line,
                 "{\"time\":\"%s.%03dZ\",\"level\":\"%s\",\"module\":\"%s\",\"msg\":\"%s\"}\n", ts,
                 (int)(tv.tv_usec / 1000), coh_log_level_name(level), module, esc);
    } else {
        snprintf(line, sizeof line, "%s.%03dZ %s %s: %s\n", ts, (int)(tv.tv_usec / 1000),
                 coh_log_level_name(level), module, msg);
    }
    /* One fputs per line so concurrent writers never interleave within a line. */
    fputs(line, stderr);
}
