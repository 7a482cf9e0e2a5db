/*
 * cohortd.conf through the option table; see config_file.h. The INI syntax is
 * common/conf.c's business; here a key is looked up in options[] and its value
 * checked against the option's type and bounds by options_set_msg(), the same
 * code the command line uses. Start-up only.
 */
#include "config_file.h"

#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "options.h"

struct load_ctx {
    struct config *c;
    int bad_section;            /* the current section is unknown: its keys are not reported */
};

static int section_known(const char *section)
{
    for (size_t i = 0; i < noptions; i++)
        if (strcmp(options[i].section, section) == 0)
            return 1;
    return 0;
}

static void known_sections(char *buf, size_t len)
{
    size_t used = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < noptions; i++) {
        int dup = 0;
        for (size_t j = 0; j < i && !dup; j++)
            dup = strcmp(options[j].section, options[i].section) == 0;
        if (dup)
            continue;
        int n = snprintf(buf + used, len - used, "%s[%s]", used ? " " : "", options[i].section);
        if (n < 0 || (size_t)n >= len - used)
            break;
        used += (size_t)n;
    }
}

static int on_item(void *user, const struct coh_conf_item *it, char *err, size_t errlen)
{
    struct load_ctx *x = user;
    if (it->kind == COH_CONF_SECTION) {
        x->bad_section = !section_known(it->section);
        if (x->bad_section) {
            char known[256];
            known_sections(known, sizeof known);
            snprintf(err, errlen, "unknown section [%s] (known: %s)", it->section, known);
            return -1;
        }
        return 0;
    }
    if (!it->section[0]) {
        snprintf(err, errlen, "%s is outside a section; put it under its [section] header",
                 it->key);
        return -1;
    }
    if (x->bad_section)
        return 0; /* already reported at the header; the file is refused anyway */
    const struct opt_def *o = options_find_key(it->section, it->key);
    if (!o) {
        for (size_t i = 0; i < noptions; i++) {
            if (strcmp(options[i].key, it->key) == 0) {
                snprintf(err, errlen, "unknown key %s in [%s]; it belongs in [%s]", it->key,
                         it->section, options[i].section);
                return -1;
            }
        }
        snprintf(err, errlen, "unknown key %s in [%s] (cohortd --help lists every key)",
                 it->key, it->section);
        return -1;
    }
    int want_string = o->type == OPT_STR || o->type == OPT_ENUM;
    if (want_string && it->kind != COH_CONF_STRING &&
        !(o->type == OPT_STR && it->kind == COH_CONF_LIST)) {
        snprintf(err, errlen, "%s.%s is a string: write it in double quotes, %s = \"%s\"",
                 it->section, it->key, it->key, it->value);
        return -1;
    }
    if (!want_string && it->kind != COH_CONF_BARE) {
        snprintf(err, errlen, "%s.%s is a %s: write it without quotes", it->section, it->key,
                 o->type == OPT_BOOL || o->type == OPT_NBOOL ? "boolean (true or false)"
                                                             : "number");
        return -1;
    }
    if ((o->type == OPT_BOOL || o->type == OPT_NBOOL) && strcmp(it->value, "true") != 0 &&
        strcmp(it->value, "false") != 0) {
        snprintf(err, errlen, "%s.%s must be true or false (got '%s')", it->section, it->key,
                 it->value);
        return -1;
    }
    char origin[160];
    snprintf(origin, sizeof origin, "%s.%s", it->section, it->key);
    return options_set_msg(x->c, o, it->value, origin, err, errlen) < 0 ? -1 : 0;
}

static int report(int rc, const char *errs, FILE *errf)
{
    for (const char *p = errs; *p;) {
        const char *nl = strchr(p, '\n');
        int n = nl ? (int)(nl - p) : (int)strlen(p);
        fprintf(errf, "cohortd: %.*s\n", n, p);
        p += n + (nl ? 1 : 0);
    }
    return rc == 0 ? 0 : -1;
}

int config_file_load(struct config *c, const char *path, FILE *errf)
{
    struct load_ctx x = {c, 0};
    char errs[8192];
    int rc = coh_conf_parse_file(path, on_item, &x, errs, sizeof errs);
    return report(rc, errs, errf);
}

int config_file_load_string(struct config *c, const char *name, const char *text, FILE *errf)
{
    struct load_ctx x = {c, 0};
    char errs[8192];
    int rc = coh_conf_parse_string(name, text, on_item, &x, errs, sizeof errs);
    return report(rc, errs, errf);
}

int config_file_args(int argc, char **argv, struct config_file_args *out)
{
    memset(out, 0, sizeof *out);
    int n = argc > 0 ? 1 : 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *path = NULL;
        if (strcmp(a, "--") == 0) {
            while (i < argc)
                argv[n++] = argv[i++];
            break;
        }
        if (strcmp(a, "--check-config") == 0) {
            out->check = 1;
            continue;
        }
        if (strcmp(a, "--print-config-example") == 0) {
            out->print_example = 1;
            continue;
        }
        if (strcmp(a, "--config") == 0) {
            if (i + 1 >= argc || !argv[i + 1][0]) {
                fprintf(stderr, "cohortd: --config needs a file name\n");
                return -1;
            }
            path = argv[++i];
        } else if (strncmp(a, "--config=", 9) == 0) {
            path = a + 9;
            if (!*path) {
                fprintf(stderr, "cohortd: --config needs a file name\n");
                return -1;
            }
        } else {
            argv[n++] = argv[i];
            continue;
        }
        if (out->path) {
            fprintf(stderr, "cohortd: --config given twice ('%s' and '%s')\n", out->path, path);
            return -1;
        }
        out->path = path;
    }
    if (n < argc)
        argv[n] = NULL;
    return n;
}

/* Writes text as "# " comment lines of at most ~78 columns. */
static void comment_wrapped(FILE *f, const char *text)
{
    const char *p = text;
    while (*p) {
        size_t len = strlen(p);
        size_t cut = len;
        if (len > 76) {
            cut = 76;
            while (cut > 0 && p[cut] != ' ')
                cut--;
            if (cut == 0)
                cut = len;
        }
        fprintf(f, "# %.*s\n", (int)cut, p);
        p += cut;
        while (*p == ' ')
            p++;
    }
}

static void toml_string(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            fputc('\\', f);
        fputc(*s, f);
    }
    fputc('"', f);
}

void config_file_example(FILE *f)
{
    fprintf(f,
            "# cohortd.conf: configuration of the cohort aggregation server.\n"
            "#\n"
            "# Generated by `cohortd --print-config-example` from cohortd's option table;\n"
            "# regenerate it rather than editing it by hand.\n"
            "#\n"
            "# Use it with `cohortd --config /etc/cohortd/cohortd.conf`. Every option is\n"
            "# listed, commented out, with its default; uncomment a line to change it.\n"
            "# Each key is also a command-line flag (shown as --flag), and a flag given\n"
            "# on the command line wins over the file. `cohortd --config FILE\n"
            "# --check-config` checks a file and exits (0: good, 2: errors, each one\n"
            "# naming the file and the line).\n"
            "#\n"
            "# Syntax (a subset of TOML): [section] headers, key = value, strings in\n"
            "# double quotes, integers and numbers bare, true/false, # comments on their\n"
            "# own lines only. An unknown key, a key given twice or a value out of range\n"
            "# is an error.\n");
    const char *section = "";
    for (size_t i = 0; i < noptions; i++) {
        const struct opt_def *o = &options[i];
        options_section_header(f, &section, o);
        fputc('\n', f);
        char help[600];
        if (o->type == OPT_NBOOL)
            snprintf(help, sizeof help, "--%s sets this to false: %s.", o->flag, o->help);
        else
            snprintf(help, sizeof help, "--%s%s%s: %s.", o->flag, o->arg ? " " : "",
                     o->arg ? o->arg : "", o->help);
        comment_wrapped(f, help);
        switch (o->type) {
        case OPT_ENUM: {
            char choices[400] = "One of: ";
            size_t n = strlen(choices);
            for (const char *p = o->choices; *p && n + 3 < sizeof choices; p++) {
                if (*p == '|') {
                    choices[n++] = ',';
                    choices[n++] = ' ';
                } else {
                    choices[n++] = *p;
                }
            }
            choices[n++] = '.';
            choices[n] = '\0';
            comment_wrapped(f, choices);
            break;
        }
        case OPT_U32:
        case OPT_U64:
            fprintf(f, "# Integer, %.0f to %.0f.\n", o->lo, o->hi);
            break;
        case OPT_DOUBLE:
            fprintf(f, "# Number, %g to %g.\n", o->lo, o->hi);
            break;
        default:
            break;
        }
        fprintf(f, "#%s = ", o->key);
        switch (o->type) {
        case OPT_STR:
        case OPT_ENUM:
            toml_string(f, o->def);
            break;
        case OPT_BOOL:
        case OPT_NBOOL:
            fputs(strcmp(o->def, "true") == 0 || strcmp(o->def, "1") == 0 ? "true" : "false", f);
            break;
        default:
            fputs(o->def[0] ? o->def : "0", f);
            break;
        }
        fputc('\n', f);
    }
}
