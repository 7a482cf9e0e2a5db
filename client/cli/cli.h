/*
 * The cohort command-line tool: one binary, subcommands. Each *_main takes argv
 * with argv[0] = the subcommand name and returns a process exit code
 * (0 ok, 1 failure, 2 usage error).
 */
#ifndef COH_CLI_H
#define COH_CLI_H

#include <signal.h>
#include <stdint.h>

int client_main(int argc, char **argv);
int init_model_main(int argc, char **argv);
int eval_main(int argc, char **argv);
int demo_main(int argc, char **argv);
int sim_main(int argc, char **argv);
/* cmd_admin.c: read a state directory (see cmd_admin.h) */
int status_main(int argc, char **argv);
int rounds_main(int argc, char **argv);
int clients_main(int argc, char **argv);
int export_main(int argc, char **argv);

/* Strict number parsing for options; print "cohort CMD: OPT must be ..." on error. */
int cli_u64(const char *cmd, const char *opt, const char *v, uint64_t lo, uint64_t hi,
            uint64_t *out);
int cli_double(const char *cmd, const char *opt, const char *v, double lo, double hi, double *out);
/* Path of the running executable's directory (for finding cohortd beside it). */
int cli_self_dir(char *buf, size_t len);
/* Helpers of the commands that start cohortd (demo, sim, sim --gossip). */
int cli_free_port(void);
int cli_port_accepts(int port);
int cli_find_cohortd(char *out, size_t len);
/* Monotonic seconds. */
double cli_now_s(void);
/* Sleeps ms milliseconds, resuming after signals unless *stop became nonzero. */
void cli_sleep_ms(long ms, volatile sig_atomic_t *stop);

#endif
