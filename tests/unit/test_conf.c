/*
 * The config file: common/conf.c (syntax, line numbers, duplicates) and
 * server/config_file.c (keys and values through cohortd's option table, the
 * generated example file, command line over file).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "conf.h"
#include "config_file.h"
#include "options.h"
#include "server.h"

/* Fails naming the first of want[0..n) that is not in text. */
static void expect_all(const char *text, const char *const *want, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!strstr(text, want[i]))
            fail_msg("missing '%s' in:\n%s", want[i], text);
}

/* ---- common/conf.c with a recording callback ---- */

struct rec {
    char log[4096];
    int refuse_key_line;        /* refuse the key on this line */
};

static int record(void *user, const struct coh_conf_item *it, char *err, size_t errlen)
{
    struct rec *r = user;
    size_t n = strlen(r->log);
    if (it->kind == COH_CONF_SECTION)
        snprintf(r->log + n, sizeof r->log - n, "%d [%s]\n", it->line, it->section);
    else
        snprintf(r->log + n, sizeof r->log - n, "%d %s.%s=%d:%s\n", it->line, it->section,
                 it->key, it->kind, it->value);
    if (it->key && it->line == r->refuse_key_line) {
        snprintf(err, errlen, "no thanks");
        return -1;
    }
    return 0;
}

static void good_syntax(void **state)
{
    const char *text = "# a comment\n"
                       "; another\n"
                       "\n"
                       "[server]\n"
                       "listen = \"127.0.0.1:7443\"\n"
                       "  indented = 5\n"
                       "[round]\n"
                       "rounds=10\n"
                       "ratio = 0.25\n"
                       "on = true\n"
                       "esc = \"a \\\"b\\\" \\\\ c\"\r\n"
                       "peers = [\"h1:1\", \"h2:2\" , ]\n"
                       "empty = \"\"\n";
    struct rec r = {0};
    char errs[1024];
    int rc = coh_conf_parse_string("t.conf", text, record, &r, errs, sizeof errs);
    assert_int_equal(rc, 0);
    assert_string_equal(errs, "");
    assert_string_equal(r.log, "4 [server]\n"
                               "5 server.listen=2:127.0.0.1:7443\n"
                               "6 server.indented=1:5\n"
                               "7 [round]\n"
                               "8 round.rounds=1:10\n"
                               "9 round.ratio=1:0.25\n"
                               "10 round.on=1:true\n"
                               "11 round.esc=2:a \"b\" \\ c\n"
                               "12 round.peers=3:h1:1,h2:2\n"
                               "13 round.empty=2:\n");
}

static void syntax_errors_name_lines(void **state)
{
    const char *text = "[server]\n"                       /* 1 */
                       "a = 1\n"                          /* 2 */
                       "a = 2\n"                          /* 3: duplicate */
                       "b: 3\n"                           /* 4: colon */
                       "c = \"open\n"                     /* 5: unterminated */
                       "d = 4 # trailing\n"               /* 6: inline # */
                       "e = bare words\n"                 /* 7 */
                       "[bad section\n"                   /* 8 */
                       "f = \"x\" ; c\n"                  /* 9: inline ; */
                       "justtext\n"                       /* 10 */
                       "g =\n"                            /* 11: no value */
                       "[round] # c\n"                    /* 12 */
                       "h = [\"a\", 1]\n"                 /* 13 */
                       "i = 7\n";                         /* 14: refused by the callback */
    struct rec r = {0};
    r.refuse_key_line = 14;
    char errs[4096];
    int rc = coh_conf_parse_string("t.conf", text, record, &r, errs, sizeof errs);
    assert_int_equal(rc, 12);
    const char *want[] = {
        "t.conf:3: duplicate key server.a (first set on line 2)\n",
        "t.conf:4: expected 'key = value' (with '=', not ':')\n",
        "t.conf:5: c: string without a closing '\"'\n",
        "t.conf:6: d: '#' after a value: comments go on their own line\n",
        "t.conf:7: e: 'bare words' is not a number, true or false",
        "t.conf:8: section header without a closing ']'\n",
        "t.conf:9: ' ;' in a value",
        "t.conf:10: expected 'key = value' or '[section]'\n",
        "t.conf:11: g: no value",
        "t.conf:12: text after the section header",
        "t.conf:13: h: list elements are strings in double quotes\n",
        "t.conf:14: no thanks\n",
    };
    expect_all(errs, want, sizeof want / sizeof want[0]);
}

static void long_line_and_missing_file(void **state)
{
    char text[400];
    memset(text, 0, sizeof text);
    strcpy(text, "[server]\nk = \"");
    size_t n = strlen(text);
    memset(text + n, 'x', 250);
    strcpy(text + n + 250, "\"\nok = 1\n");
    struct rec r = {0};
    char errs[1024];
    int rc = coh_conf_parse_string("t.conf", text, record, &r, errs, sizeof errs);
    assert_int_equal(rc, 1);
    assert_non_null(strstr(errs, "t.conf:2: line is longer than 196 characters"));
    /* The next line is still read, with the right number. */
    assert_non_null(strstr(r.log, "3 server.ok=1:1\n"));

    rc = coh_conf_parse_file("/nonexistent/cohortd.conf", record, &r, errs, sizeof errs);
    assert_true(rc < 0);
    assert_non_null(strstr(errs, "/nonexistent/cohortd.conf: cannot read"));
}

static void error_buffer_is_bounded(void **state)
{
    char text[8192] = "[s]\n";
    for (int i = 0; i < 200; i++)
        strcat(text, "x\n");
    struct rec r = {0};
    char errs[300];
    int rc = coh_conf_parse_string("t.conf", text, record, &r, errs, sizeof errs);
    assert_int_equal(rc, 200);
    assert_true(strlen(errs) < sizeof errs);
}

/* ---- server/config_file.c with cohortd's real option table ---- */

static void cfg_init(struct config *c)
{
    memset(c, 0, sizeof *c);
    options_defaults(c);
}

static void cfg_fini(struct config *c)
{
    for (size_t i = 0; i < noptions; i++)
        if (options[i].type == OPT_STR || options[i].type == OPT_ENUM)
            free(*(char **)((char *)c + options[i].offset));
    free(c->config_file);
    memset(c, 0, sizeof *c);
}

/* Loads text; returns the rc and the messages in *msgs (caller frees). */
static int load(struct config *c, const char *text, char **msgs)
{
    size_t len;
    FILE *f = open_memstream(msgs, &len);
    assert_non_null(f);
    int rc = config_file_load_string(c, "cohortd.conf", text, f);
    fclose(f);
    return rc;
}

/* The fixture of the one-config tests: a config with the defaults, and the
 * messages of the last fix_load; the teardown frees both. */
struct cfg_fix {
    struct config c;
    char *msgs;
};

static int cfg_setup(void **state)
{
    struct cfg_fix *fx = calloc(1, sizeof *fx);
    assert_non_null(fx);
    cfg_init(&fx->c);
    *state = fx;
    return 0;
}

static int cfg_teardown(void **state)
{
    struct cfg_fix *fx = *state;
    free(fx->msgs);
    cfg_fini(&fx->c);
    free(fx);
    return 0;
}

/* load() into the fixture's config, keeping the messages in fx->msgs. */
static int fix_load(struct cfg_fix *fx, const char *text)
{
    free(fx->msgs);
    fx->msgs = NULL;
    return load(&fx->c, text, &fx->msgs);
}

static void good_file(void **state)
{
    struct cfg_fix *fx = *state;
    int rc = fix_load(fx,
                      "# cohortd\n"
                      "[server]\n"
                      "listen = \"0.0.0.0:9000\"\n"
                      "state_dir = \"/var/lib/cohortd\"\n"
                      "[tls]\n"
                      "require_client_cert = false\n"
                      "[round]\n"
                      "rounds = 20\n"
                      "min_clients = 3\n"
                      "round_deadline_s = 2.5\n"
                      "[strategy]\n"
                      "strategy = \"fedau\"\n"
                      "variance_correction = true\n"
                      "[http]\n"
                      "listen = \"127.0.0.1:9464\"\n"
                      "token = \"s3cret\"\n"
                      "[log]\n"
                      "format = \"json\"\n");
    assert_string_equal(fx->msgs, "");
    assert_int_equal(rc, 0);
    assert_string_equal(fx->c.listen, "0.0.0.0:9000");
    assert_string_equal(fx->c.state_dir, "/var/lib/cohortd");
    assert_int_equal(fx->c.require_client_cert, 0);
    assert_int_equal(fx->c.rounds, 20);
    assert_int_equal(fx->c.min_clients, 3);
    assert_true(fx->c.round_timeout_s == 2.5);
    assert_string_equal(fx->c.strategy, "fedau");
    assert_int_equal(fx->c.variance_correction, 1);
    assert_string_equal(fx->c.http, "127.0.0.1:9464");
    assert_string_equal(fx->c.http_token, "s3cret");
    assert_string_equal(fx->c.log_format_s, "json");
    /* Untouched options keep their defaults. */
    assert_int_equal(fx->c.max_frame_bytes, 8388608);
}

static void unknown_key_and_section(void **state)
{
    struct cfg_fix *fx = *state;
    int rc = fix_load(fx,
                      "[round]\n"
                      "rounds = 2\n"
                      "roudns = 3\n"
                      "state_dir = \"x\"\n"
                      "[nope]\n"
                      "a = 1\n"
                      "b = 2\n"
                      "[limits]\n"
                      "max_frame_bytes = 4096\n");
    assert_int_equal(rc, -1);
    assert_non_null(strstr(fx->msgs, "cohortd: cohortd.conf:3: unknown key roudns in [round]"));
    assert_non_null(
        strstr(fx->msgs, "cohortd: cohortd.conf:4: unknown key state_dir in [round]; it belongs "
                         "in [server]\n"));
    assert_non_null(strstr(fx->msgs, "cohortd: cohortd.conf:5: unknown section [nope] (known: "
                                     "[server] [tls]"));
    /* Keys of an unknown section are not reported one by one. */
    assert_null(strstr(fx->msgs, "cohortd.conf:6"));
    assert_null(strstr(fx->msgs, "cohortd.conf:7"));
    /* Good keys around the bad ones still apply (the caller refuses the file). */
    assert_int_equal(fx->c.rounds, 2);
    assert_int_equal(fx->c.max_frame_bytes, 4096);
}

static void bad_values(void **state)
{
    struct cfg_fix *fx = *state;
    int rc = fix_load(fx,
                      "[round]\n"
                      "rounds = -1\n"
                      "min_clients = 0\n"
                      "round_deadline_s = \"60\"\n"
                      "[strategy]\n"
                      "strategy = \"fedsgd\"\n"
                      "weighting = examples\n"
                      "variance_correction = yes\n"
                      "server_lr = 1e9\n"
                      "[limits]\n"
                      "max_frame_bytes = 99999999999\n");
    assert_int_equal(rc, -1);
    const char *want[] = {
        "cohortd: cohortd.conf:2: round.rounds must be an integer between 0 and 100000000 "
        "(got '-1')\n",
        "cohortd: cohortd.conf:3: round.min_clients must be an integer between 1 and 10000000 "
        "(got '0')\n",
        "cohortd: cohortd.conf:4: round.round_deadline_s is a number: write it without quotes\n",
        "cohortd: cohortd.conf:6: strategy.strategy must be one of fedavg|fedau (got "
        "'fedsgd')\n",
        "cohortd: cohortd.conf:7: strategy.weighting is a string: write it in double quotes, "
        "weighting = \"examples\"\n",
        "cohortd: cohortd.conf:8: strategy.variance_correction must be true or false (got "
        "'yes')\n",
        "cohortd: cohortd.conf:9: strategy.server_lr must be a number between 0 and 1e+06 "
        "(got '1e9')\n",
        "cohortd: cohortd.conf:11: limits.max_frame_bytes must be an integer between 4096 and "
        "1073741824 (got '99999999999')\n",
    };
    expect_all(fx->msgs, want, sizeof want / sizeof want[0]);
    /* Nothing refused was applied. */
    assert_int_equal(fx->c.rounds, 0);
    assert_int_equal(fx->c.min_clients, 1);
    assert_string_equal(fx->c.strategy, "fedavg");
}

static void duplicate_key(void **state)
{
    struct cfg_fix *fx = *state;
    int rc = fix_load(fx,
                      "[round]\n"
                      "rounds = 2\n"
                      "\n"
                      "[limits]\n"
                      "max_uploads = 2\n"
                      "[round]\n"
                      "rounds = 3\n");
    assert_int_equal(rc, -1);
    assert_string_equal(fx->msgs, "cohortd: cohortd.conf:7: duplicate key round.rounds (first "
                                  "set on line 2)\n");
}

/* Every option of the generated example, uncommented, loads and gives the
 * defaults; the commented example loads as an empty file. */
static void example_round_trip(void **state)
{
    char *ex;
    size_t len;
    FILE *f = open_memstream(&ex, &len);
    config_file_example(f);
    fclose(f);
    for (size_t i = 0; i < noptions; i++) {
        char line[200];
        snprintf(line, sizeof line, "\n#%s = ", options[i].key);
        if (!strstr(ex, line))
            fail_msg("the example lacks %s.%s", options[i].section, options[i].key);
    }
    struct config c, d;
    cfg_init(&c);
    cfg_init(&d);
    char *msgs;
    assert_int_equal(load(&c, ex, &msgs), 0);
    free(msgs);
    /* Uncomment every key line ("#key = value"). */
    char *un = malloc(len + 1);
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        if (ex[i] == '#' && (i == 0 || ex[i - 1] == '\n') && ex[i + 1] >= 'a' && ex[i + 1] <= 'z')
            continue;
        un[o++] = ex[i];
    }
    un[o] = '\0';
    int rc = load(&c, un, &msgs);
    if (rc != 0)
        fail_msg("uncommented example refused:\n%s", msgs);
    free(msgs);
    for (size_t i = 0; i < noptions; i++) {
        const struct opt_def *op = &options[i];
        const char *a = (const char *)&c + op->offset, *b = (const char *)&d + op->offset;
        if (op->type == OPT_STR || op->type == OPT_ENUM) {
            const char *sa = *(char *const *)a, *sb = *(char *const *)b;
            assert_true((!sa && !sb) || (sa && sb && strcmp(sa, sb) == 0));
        } else {
            size_t sz = op->type == OPT_U32 ? 4 : op->type == OPT_U64 || op->type == OPT_DOUBLE
                                                  ? 8
                                                  : sizeof(int);
            if (memcmp(a, b, sz) != 0)
                fail_msg("%s.%s differs from its default", op->section, op->key);
        }
    }
    free(un);
    free(ex);
    cfg_fini(&c);
    cfg_fini(&d);
}

static void command_line_wins(void **state)
{
    struct cfg_fix *fx = *state;
    assert_int_equal(fix_load(fx, "[round]\nrounds = 5\nmin_clients = 4\n"), 0);
    char *argv[] = {"cohortd", "--check-config", "--config", "x.conf", "--rounds", "9",
                    "--print-config-example", "--config=y", NULL};
    struct config_file_args a;
    /* Two --config flags are refused. */
    assert_int_equal(config_file_args(8, argv, &a), -1);
    char *argv2[] = {"cohortd", "--check-config", "--config", "x.conf", "--rounds", "9", NULL};
    int argc = config_file_args(6, argv2, &a);
    assert_int_equal(argc, 3);
    assert_string_equal(a.path, "x.conf");
    assert_int_equal(a.check, 1);
    assert_int_equal(a.print_example, 0);
    assert_string_equal(argv2[1], "--rounds");
    assert_string_equal(argv2[2], "9");
    assert_null(argv2[3]);
    assert_int_equal(options_parse_argv(&fx->c, argc, argv2), 0);
    assert_int_equal(fx->c.rounds, 9);      /* the flag wins */
    assert_int_equal(fx->c.min_clients, 4); /* the file still counts */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(good_syntax),
        cmocka_unit_test(syntax_errors_name_lines),
        cmocka_unit_test(long_line_and_missing_file),
        cmocka_unit_test(error_buffer_is_bounded),
        cmocka_unit_test_setup_teardown(good_file, cfg_setup, cfg_teardown),
        cmocka_unit_test_setup_teardown(unknown_key_and_section, cfg_setup, cfg_teardown),
        cmocka_unit_test_setup_teardown(bad_values, cfg_setup, cfg_teardown),
        cmocka_unit_test_setup_teardown(duplicate_key, cfg_setup, cfg_teardown),
        cmocka_unit_test(example_round_trip),
        cmocka_unit_test_setup_teardown(command_line_wins, cfg_setup, cfg_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
