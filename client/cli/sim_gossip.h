/*
 * `cohort sim --gossip`: gossip learning through real cohortd --mode gossip
 * daemons on loopback, compared with the same data run as a federation.
 * See sim_gossip.c and docs/gossip.md.
 */
#ifndef COH_CLI_SIM_GOSSIP_H
#define COH_CLI_SIM_GOSSIP_H

/* Entry point; argv[0] is "sim" and argv holds --gossip. Returns 0 ok, 1 failure,
 * 2 usage error. */
int sim_gossip_main(int argc, char **argv);

#endif
