/*
 * cohortd's options: one table (redis static_configs[] style) with name, INI
 * section and key, type, bounds, default and help. The command line, --help and
 * the config file are all driven by it, so an option is added in one place.
 * Start-up only (loop not running yet).
 */
#ifndef OPTIONS_H
#define OPTIONS_H

#include <stddef.h>
#include <stdio.h>

struct config;

enum opt_type {
    OPT_STR = 0,    /* char *, strdup'ed */
    OPT_U32,        /* uint32_t in [lo, hi] */
    OPT_U64,        /* uint64_t in [lo, hi] */
    OPT_DOUBLE,     /* double in [lo, hi] */
    OPT_BOOL,       /* int 0/1; a command-line flag without value sets it to 1 */
    OPT_NBOOL,      /* int 0/1; the flag (e.g. --no-client-cert) sets it to 0 */
    OPT_ENUM,       /* char *, one of the '|'-separated choices */
};

struct opt_def {
    const char *flag;       /* command line, without the leading dashes */
    const char *section;    /* config file section */
    const char *key;        /* config file key (snake_case with unit) */
    int type;
    size_t offset;          /* in struct config */
    double lo, hi;
    const char *def;        /* default as text ("" = none) */
    const char *choices;    /* OPT_ENUM: "a|b|c" */
    const char *arg;        /* metavariable for help: "N", "FILE" */
    const char *help;
};

extern const struct opt_def options[];
extern const size_t noptions;

/* Sets every option to its default. */
void options_defaults(struct config *c);
/* Sets one option from text; origin names the source for messages ("--rounds",
 * "cohortd.conf:12"). Returns 0 or -1 after printing a sentence to stderr. */
int options_set(struct config *c, const struct opt_def *o, const char *value, const char *origin);
/* The same, but on error writes the sentence into msg instead of printing it. */
int options_set_msg(struct config *c, const struct opt_def *o, const char *value,
                    const char *origin, char *msg, size_t msglen);
const struct opt_def *options_find_flag(const char *flag);
const struct opt_def *options_find_key(const char *section, const char *key);
/* Parses argv; returns 0 (go on), 1 (--help/--version printed: exit 0), 2 (usage error). */
int options_parse_argv(struct config *c, int argc, char **argv);
void options_usage(FILE *f);
/* Writes "[section]" when o opens a new one; *section tracks the last written. The table
 * keeps each section's options together, so --help and the example file group alike. */
void options_section_header(FILE *f, const char **section, const struct opt_def *o);
/* Checks combinations and derives fields (durable, log level). 0 or -1 with a message. */
int options_finish(struct config *c);

#endif
