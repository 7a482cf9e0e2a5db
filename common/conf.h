/*
 * Config file reader (library cohort_conf, never linked into libcohort): an
 * INI file written as a TOML-compatible subset, parsed with Debian's libinih
 * (STYLE.md §6.9). This module knows the syntax only; what a key means is the
 * caller's business, through one callback per section header and per key, so
 * cohortd's option table stays in server/options.c.
 *
 * Accepted syntax, one item per line:
 *   # comment            (also ; comment), on its own line only
 *   [section]            lower-case letters, digits and _
 *   key = 42             bare value: integer, number, true or false
 *   key = "text"         string in double quotes; escapes \" \\ \t \n
 *   key = ["a", "b"]     one-line array of strings
 * Blank lines are ignored. Indented lines are read like any other (no INI
 * continuation lines), `key: value` is refused, and so is a key that appears
 * twice in one section. Errors name the file and the line.
 *
 * Start-up code: not thread-safe (libinih keeps global settings).
 */
#ifndef COH_CONF_H
#define COH_CONF_H

#include <stddef.h>

enum coh_conf_kind {
    COH_CONF_SECTION = 0,   /* a [section] header: key and value are NULL */
    COH_CONF_BARE,          /* unquoted: 42, 0.5, true */
    COH_CONF_STRING,        /* "text", unescaped */
    COH_CONF_LIST,          /* ["a", "b"]: the elements joined by ',' (elements may not hold ',') */
};

/* One item; every pointer is valid only during the callback. */
struct coh_conf_item {
    const char *file;       /* name given to the parser, for messages */
    int line;               /* 1-based */
    const char *section;    /* "" before the first header */
    const char *key;
    const char *value;
    int kind;               /* enum coh_conf_kind */
};

/*
 * Called for every section header and every key. Returns 0 to accept the item,
 * or -1 after writing one sentence (no file, line or newline) into err, which
 * the parser reports as "FILE:LINE: sentence".
 */
typedef int (*coh_conf_fn)(void *user, const struct coh_conf_item *it, char *err, size_t errlen);

/*
 * Parses the file at path and calls fn for each item. Every problem found (a
 * syntax error, a duplicate key, a refusal by fn) appends one line
 * "FILE:LINE: message\n" to errs, which is always NUL-terminated (cut with
 * "...\n" when full; errs may be NULL with errslen 0).
 * Returns the number of problems (0: the file is good), or a negative error
 * (-errno) when the file cannot be read, with "FILE: reason\n" in errs.
 */
int coh_conf_parse_file(const char *path, coh_conf_fn fn, void *user, char *errs,
                        size_t errslen);

/* The same for text held in memory; name stands for the file in messages. */
int coh_conf_parse_string(const char *name, const char *text, coh_conf_fn fn, void *user,
                          char *errs, size_t errslen);

/* Longest line accepted, without its newline (inih's fixed line buffer). */
#define COH_CONF_MAX_LINE 196

#endif
