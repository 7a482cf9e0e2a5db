/*
 * `cohort certs`: generates the PKI a cohort deployment or test needs (a CA, the
 * server certificate, client and peer certificates) with the OpenSSL 3 library,
 * so hosts need neither the openssl binary nor an openssl.cnf.
 */
#ifndef COH_CLI_CERTS_H
#define COH_CLI_CERTS_H

/* Entry point for `cohort certs ...`; argv[0] is "certs". Returns a process exit code (0 ok,
 * 2 usage error, 1 failure), printing a clear one-line error to stderr on failure. */
int certs_main(int argc, char **argv);

/* certs_main with its standard output (a line per file written) discarded, for commands that
 * make certificates on the way to something else; errors still reach stderr. */
int certs_main_quiet(int argc, char **argv);

#endif
