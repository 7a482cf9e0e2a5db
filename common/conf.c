/*
 * Config file reader; see conf.h. libinih splits lines into sections, keys and
 * values. It is fed through a line reader of our own that counts lines (inih
 * does not pass line numbers to its handler), strips indentation (so inih's
 * continuation lines never happen) and refuses what inih would silently
 * accept or mangle: over-long lines (inih would split them), `key: value`,
 * and " ;" in a value (inih's inline comment). A refused line is handed to
 * inih as an empty line, so every problem is reported exactly once.
 * Start-up only, one thread.
 */
#include "conf.h"

#include <errno.h>
#include <ini.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ERRORS 50

struct seen {
    char *name;                 /* "section.key" */
    int line;
};

struct ctx {
    const char *file;
    FILE *f;                    /* file input, or */
    const char *text;           /* in-memory input */
    size_t pos;
    char *line;                 /* the current raw line (getline buffer) */
    size_t linecap;
    int lineno;
    int bad_line;               /* the current line was refused by the reader */
    coh_conf_fn fn;
    void *user;
    char *errs;
    size_t errslen, errsused;
    int nerrors;
    struct seen *seen;
    size_t nseen, capseen;
    char section[64];
    char *val;                  /* scratch for unquoted values */
    size_t valcap;
    int oom;
};

static void add_err(struct ctx *x, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void add_err(struct ctx *x, int line, const char *fmt, ...)
{
    x->nerrors++;
    if (!x->errs || x->errslen == 0)
        return;
    if (x->nerrors > MAX_ERRORS || x->errsused + 1 >= x->errslen)
        return;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    size_t room = x->errslen - x->errsused;
    int n = line > 0 ? snprintf(x->errs + x->errsused, room, "%s:%d: %s\n", x->file, line, msg)
                     : snprintf(x->errs + x->errsused, room, "%s: %s\n", x->file, msg);
    if (n < 0 || (size_t)n >= room) {
        /* Full: end with a marker that more was cut. */
        size_t at = x->errslen >= 5 ? x->errslen - 5 : 0;
        snprintf(x->errs + at, x->errslen - at, "...\n");
        x->errsused = x->errslen - 1;
        return;
    }
    x->errsused += (size_t)n;
}

/* Reads the next raw line without its newline into x->line. 0 at the end. */
static int raw_line(struct ctx *x)
{
    if (x->f) {
        ssize_t n = getline(&x->line, &x->linecap, x->f);
        if (n < 0)
            return 0;
        while (n > 0 && (x->line[n - 1] == '\n' || x->line[n - 1] == '\r'))
            x->line[--n] = '\0';
        return 1;
    }
    if (!x->text[x->pos])
        return 0;
    const char *s = x->text + x->pos;
    const char *nl = strchr(s, '\n');
    size_t n = nl ? (size_t)(nl - s) : strlen(s);
    if (n + 1 > x->linecap) {
        char *nb = realloc(x->line, n + 1);
        if (!nb) {
            x->oom = 1;
            return 0;
        }
        x->line = nb;
        x->linecap = n + 1;
    }
    memcpy(x->line, s, n);
    x->line[n] = '\0';
    x->pos += n + (nl ? 1 : 0);
    while (n > 0 && x->line[n - 1] == '\r')
        x->line[--n] = '\0';
    return 1;
}

static int is_name_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '_' || c == '-';
}

/* Checks one stripped line; returns 0 to pass it on to inih, -1 when refused. */
static int check_line(struct ctx *x, const char *p)
{
    size_t n = strlen(p);
    if (n > COH_CONF_MAX_LINE) {
        add_err(x, x->lineno, "line is longer than %d characters", COH_CONF_MAX_LINE);
        return -1;
    }
    if (!*p || *p == '#' || *p == ';')
        return 0;
    if (*p == '[') {
        const char *e = strchr(p, ']');
        if (!e) {
            add_err(x, x->lineno, "section header without a closing ']'");
            return -1;
        }
        const char *t = e + 1;
        while (*t == ' ' || *t == '\t')
            t++;
        if (*t) {
            add_err(x, x->lineno, "text after the section header (comments go on their own "
                    "line)");
            return -1;
        }
        size_t len = (size_t)(e - p - 1);
        int ok = len > 0 && len < sizeof x->section;
        for (size_t i = 1; ok && i <= len; i++)
            ok = is_name_char(p[i]);
        if (!ok) {
            add_err(x, x->lineno, "bad section name '%.*s' (letters, digits and _ only)",
                    (int)(len > 60 ? 60 : len), p + 1);
            return -1;
        }
        memcpy(x->section, p + 1, len);
        x->section[len] = '\0';
        struct coh_conf_item it = {x->file, x->lineno, x->section, NULL, NULL, COH_CONF_SECTION};
        char err[400] = "";
        if (x->fn(x->user, &it, err, sizeof err) < 0)
            add_err(x, x->lineno, "%s", err[0] ? err : "section refused");
        return 0;
    }
    const char *eq = strchr(p, '=');
    if (!eq) {
        add_err(x, x->lineno, strchr(p, ':') ? "expected 'key = value' (with '=', not ':')"
                                             : "expected 'key = value' or '[section]'");
        return -1;
    }
    const char *k = p;
    while (k < eq && is_name_char(*k))
        k++;
    const char *ke = k;
    while (k < eq && (*k == ' ' || *k == '\t'))
        k++;
    if (ke == p || k != eq) {
        add_err(x, x->lineno, "bad key '%.*s' (letters, digits and _ only, then '=')",
                (int)(eq - p > 60 ? 60 : eq - p), p);
        return -1;
    }
    for (const char *v = eq + 1; *v; v++) {
        if (*v == ';' && (v[-1] == ' ' || v[-1] == '\t')) {
            add_err(x, x->lineno, "' ;' in a value would start an INI comment; remove it");
            return -1;
        }
    }
    return 0;
}

/* inih's fgets-style reader: one checked line per call. */
static char *reader(char *str, int num, void *stream)
{
    struct ctx *x = stream;
    if (x->oom || !raw_line(x))
        return NULL;
    x->lineno++;
    char *p = x->line;
    if (x->lineno == 1 && (unsigned char)p[0] == 0xEF && (unsigned char)p[1] == 0xBB &&
        (unsigned char)p[2] == 0xBF)
        p += 3;
    while (*p == ' ' || *p == '\t')
        p++;
    x->bad_line = check_line(x, p) < 0;
    size_t n = strlen(p);
    if (x->bad_line || num < 3 || n + 2 > (size_t)num) {
        /* Refused, or (only with a smaller buffer than COH_CONF_MAX_LINE) too long. */
        if (!x->bad_line) {
            add_err(x, x->lineno, "line is too long");
            x->bad_line = 1;
        }
        str[0] = '\n';
        str[1] = '\0';
        return str;
    }
    memcpy(str, p, n);
    str[n] = '\n';
    str[n + 1] = '\0';
    return str;
}

static int scratch(struct ctx *x, size_t n)
{
    if (n <= x->valcap)
        return 0;
    char *nb = realloc(x->val, n);
    if (!nb) {
        x->oom = 1;
        return -1;
    }
    x->val = nb;
    x->valcap = n;
    return 0;
}

/* Reads a "..." string at *pp into out (unescaped); advances *pp past the quote. */
static int read_string(const char **pp, char *out, char *why, size_t whylen)
{
    const char *s = *pp + 1;
    size_t o = 0;
    while (*s && *s != '"') {
        char ch = *s++;
        if (ch == '\\') {
            switch (*s) {
            case '"': ch = '"'; break;
            case '\\': ch = '\\'; break;
            case 't': ch = '\t'; break;
            case 'n': ch = '\n'; break;
            default:
                snprintf(why, whylen, "unknown escape '\\%c' in a string (known: \\\" \\\\ \\t \\n)",
                         *s ? *s : ' ');
                return -1;
            }
            s++;
        } else if ((unsigned char)ch < 0x20) {
            snprintf(why, whylen, "control character in a string");
            return -1;
        }
        out[o++] = ch;
    }
    if (*s != '"') {
        snprintf(why, whylen, "string without a closing '\"'");
        return -1;
    }
    out[o] = '\0';
    *pp = s + 1;
    return 0;
}

static int parse_value(struct ctx *x, const char *v, int *kind, char *why, size_t whylen)
{
    if (scratch(x, strlen(v) + 1) < 0) {
        snprintf(why, whylen, "out of memory");
        return -1;
    }
    if (*v == '"') {
        const char *p = v;
        if (read_string(&p, x->val, why, whylen) < 0)
            return -1;
        if (*p) {
            snprintf(why, whylen, "text after the closing '\"' (comments go on their own line)");
            return -1;
        }
        *kind = COH_CONF_STRING;
        return 0;
    }
    if (*v == '[') {
        const char *p = v + 1;
        size_t o = 0;
        x->val[0] = '\0';
        for (int first = 1;; first = 0) {
            while (*p == ' ' || *p == '\t')
                p++;
            if (*p == ']')
                break;
            if (!first) {
                if (*p != ',') {
                    snprintf(why, whylen, "expected ',' or ']' in the list");
                    return -1;
                }
                p++;
                while (*p == ' ' || *p == '\t')
                    p++;
                if (*p == ']')
                    break; /* TOML allows a trailing comma */
            }
            if (*p != '"') {
                snprintf(why, whylen, "list elements are strings in double quotes");
                return -1;
            }
            char *dst = x->val + o + (o ? 1 : 0);
            if (read_string(&p, dst, why, whylen) < 0)
                return -1;
            if (strchr(dst, ',')) {
                snprintf(why, whylen, "list elements may not contain ','");
                return -1;
            }
            if (o)
                x->val[o] = ',';
            o += strlen(dst) + (o ? 1 : 0);
        }
        p++;
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p) {
            snprintf(why, whylen, "text after the closing ']' (comments go on their own line)");
            return -1;
        }
        *kind = COH_CONF_LIST;
        return 0;
    }
    if (!*v) {
        snprintf(why, whylen, "no value (write \"\" for an empty string)");
        return -1;
    }
    if (strchr(v, '#')) {
        snprintf(why, whylen, "'#' after a value: comments go on their own line");
        return -1;
    }
    for (const char *p = v; *p; p++) {
        if (!is_name_char(*p) && *p != '.' && *p != '+') {
            snprintf(why, whylen, "'%.60s' is not a number, true or false; strings are written "
                     "in double quotes", v);
            return -1;
        }
    }
    strcpy(x->val, v);
    *kind = COH_CONF_BARE;
    return 0;
}

static int handler(void *user, const char *section, const char *name, const char *value)
{
    struct ctx *x = user;
    if (x->bad_line || x->oom)
        return 1;
    if (!value)
        value = "";
    /* Duplicates: inih reports a key each time it appears. */
    size_t need = strlen(section) + strlen(name) + 2;
    char *full = malloc(need);
    if (!full) {
        x->oom = 1;
        return 1;
    }
    snprintf(full, need, "%s.%s", section, name);
    for (size_t i = 0; i < x->nseen; i++) {
        if (strcmp(x->seen[i].name, full) == 0) {
            add_err(x, x->lineno, "duplicate key %s (first set on line %d)", full,
                    x->seen[i].line);
            free(full);
            return 1;
        }
    }
    if (x->nseen == x->capseen) {
        size_t ncap = x->capseen ? x->capseen * 2 : 32;
        struct seen *ns = realloc(x->seen, ncap * sizeof *ns);
        if (!ns) {
            free(full);
            x->oom = 1;
            return 1;
        }
        x->seen = ns;
        x->capseen = ncap;
    }
    x->seen[x->nseen].name = full;
    x->seen[x->nseen].line = x->lineno;
    x->nseen++;

    char why[400] = "";
    int kind;
    if (parse_value(x, value, &kind, why, sizeof why) < 0) {
        add_err(x, x->lineno, "%s: %s", name, why);
        return 1;
    }
    struct coh_conf_item it = {x->file, x->lineno, section, name, x->val, kind};
    if (x->fn(x->user, &it, why, sizeof why) < 0)
        add_err(x, x->lineno, "%s", why[0] ? why : "key refused");
    return 1;
}

static int run(struct ctx *x)
{
    if (x->errs && x->errslen)
        x->errs[0] = '\0';
    int rc = ini_parse_stream(reader, x, handler, x);
    if (x->oom || rc == -2) {
        add_err(x, 0, "out of memory while reading the configuration");
        rc = -ENOMEM;
    } else if (rc > 0 && x->nerrors == 0) {
        /* Something inih refused that the reader let through. */
        add_err(x, rc, "syntax error");
    }
    for (size_t i = 0; i < x->nseen; i++)
        free(x->seen[i].name);
    free(x->seen);
    free(x->line);
    free(x->val);
    if (rc < 0)
        return rc;
    return x->nerrors;
}

int coh_conf_parse_file(const char *path, coh_conf_fn fn, void *user, char *errs, size_t errslen)
{
    struct ctx x;
    memset(&x, 0, sizeof x);
    x.file = path;
    x.fn = fn;
    x.user = user;
    x.errs = errs;
    x.errslen = errslen;
    if (errs && errslen)
        errs[0] = '\0';
    x.f = fopen(path, "r");
    if (!x.f) {
        int e = errno;
        add_err(&x, 0, "cannot read: %s", strerror(e));
        return -e;
    }
    int rc = run(&x);
    if (ferror(x.f) && rc >= 0) {
        add_err(&x, 0, "read error");
        rc = -EIO;
    }
    fclose(x.f);
    return rc;
}

int coh_conf_parse_string(const char *name, const char *text, coh_conf_fn fn, void *user,
                          char *errs, size_t errslen)
{
    struct ctx x;
    memset(&x, 0, sizeof x);
    x.file = name;
    x.text = text;
    x.fn = fn;
    x.user = user;
    x.errs = errs;
    x.errslen = errslen;
    return run(&x);
}
