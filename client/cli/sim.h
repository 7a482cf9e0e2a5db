/*
 * `cohort sim`: a whole federated experiment through the real server. Spawns a
 * cohortd on 127.0.0.1 with a fresh state directory and runs N libcohort
 * clients as threads of this process (one TLS connection and one certificate
 * identity each), with Fashion-MNIST shares from a Dirichlet split and
 * participation patterns tied to the data (docs: /work/shared/algorithms.md).
 * Several strategies can be compared on identical data splits, participation
 * draws and minibatch orders.
 */
#ifndef COH_CLI_SIM_H
#define COH_CLI_SIM_H

/* Entry point for `cohort sim ...`; argv[0] is "sim". Returns 0 ok, 1 failure, 2 usage error. */
int sim_main(int argc, char **argv);

#endif
