/*
 * cohortd.conf: reads the config file into struct config through the option
 * table (options.c) and the INI reader (common/conf.c), and writes the
 * self-documenting example file from the same table. Start-up only.
 */
#ifndef CONFIG_FILE_H
#define CONFIG_FILE_H

#include <stdio.h>

struct config;

/* Command-line flags handled before the option table sees argv. */
struct config_file_args {
    const char *path;           /* --config FILE, NULL if none */
    int check;                  /* --check-config */
    int print_example;          /* --print-config-example */
};

/*
 * Takes --config FILE (or --config=FILE), --check-config and
 * --print-config-example out of argv (keeping argv[0] and the order of the
 * rest) and returns the new argc, or -1 after a message on stderr (--config
 * without a file, or given twice).
 */
int config_file_args(int argc, char **argv, struct config_file_args *out);

/*
 * Sets the options found in the file at path; every problem (unknown section
 * or key, duplicate, bad value, syntax) is printed to errf as
 * "cohortd: FILE:LINE: sentence". Returns 0, or -1 when the file cannot be read
 * or holds at least one error.
 */
int config_file_load(struct config *c, const char *path, FILE *errf);

/* The same for text in memory (tests); name stands for the file in messages. */
int config_file_load_string(struct config *c, const char *name, const char *text, FILE *errf);

/* Writes deploy/cohortd.conf.example: every option commented out with its
 * default and help, section by section. */
void config_file_example(FILE *f);

#endif
