/*
 * Logging: one line per event, "UTC-time LEVEL module: message". The macro
 * checks the level before formatting anything. By default lines go to stderr;
 * coh_log_set_fn() redirects them (libcohort routes them to the user's callback
 * and is silent by default). Any thread; the sink is called with one whole line.
 */
#ifndef COH_LOG_H
#define COH_LOG_H

#include <stdarg.h>

enum coh_log_level { COH_LOG_ERR = 0, COH_LOG_WARN, COH_LOG_NOTICE, COH_LOG_INFO, COH_LOG_DEBUG };

typedef void (*coh_log_fn)(int level, const char *module, const char *line, void *user);

extern int coh_log_level_max;

void coh_log_set_level(int level);
/* fn == NULL restores stderr output. */
void coh_log_set_fn(coh_log_fn fn, void *user);
/* Silences all output (library default). */
void coh_log_disable(void);
/* json: one JSON object per line instead of text. */
void coh_log_set_json(int json);
int coh_log_parse_level(const char *s);
const char *coh_log_level_name(int level);

void coh_log_write(int level, const char *module, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define coh_log(level, module, ...)                  \
    do {                                             \
        if ((level) <= coh_log_level_max)            \
            coh_log_write(level, module, __VA_ARGS__); \
    } while (0)

#define coh_err(module, ...) coh_log(COH_LOG_ERR, module, __VA_ARGS__)
#define coh_warn(module, ...) coh_log(COH_LOG_WARN, module, __VA_ARGS__)
#define coh_notice(module, ...) coh_log(COH_LOG_NOTICE, module, __VA_ARGS__)
#define coh_info(module, ...) coh_log(COH_LOG_INFO, module, __VA_ARGS__)
#define coh_debug(module, ...) coh_log(COH_LOG_DEBUG, module, __VA_ARGS__)

#endif
