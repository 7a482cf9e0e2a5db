/* `cohort`: dispatches to the subcommands. */
#include <errno.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <inttypes.h>
#include <libgen.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "certs.h"
#include "cli.h"

int cli_u64(const char *cmd, const char *opt, const char *v, uint64_t lo, uint64_t hi,
            uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 10);
    if (errno || end == v || *end || v[0] == '-' || x < lo || x > hi) {
        fprintf(stderr, "cohort %s: %s must be an integer between %" PRIu64 " and %" PRIu64
                        " (got '%s')\n", cmd, opt, lo, hi, v);
        return -1;
    }
    *out = x;
    return 0;
}

int cli_double(const char *cmd, const char *opt, const char *v, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || end == v || *end || !isfinite(x) || x < lo || x > hi) {
        fprintf(stderr, "cohort %s: %s must be a number between %g and %g (got '%s')\n", cmd, opt,
                lo, hi, v);
        return -1;
    }
    *out = x;
    return 0;
}

int cli_self_dir(char *buf, size_t len)
{
    char tmp[4096];
    ssize_t n = readlink("/proc/self/exe", tmp, sizeof tmp - 1);
    if (n <= 0)
        return -1;
    tmp[n] = '\0';
    snprintf(buf, len, "%s", dirname(tmp));
    return 0;
}

/* A free TCP port on 127.0.0.1 (the kernel picks it; a race with another process is
 * possible but harmless for demos and simulations, which then fail to listen). */
int cli_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof a;
    int port = -1;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &l) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

/* 1 when something accepts TCP connections on 127.0.0.1:port. */
int cli_port_accepts(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return 0;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int ok = connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
    close(fd);
    return ok;
}

/* cohortd beside this binary (build tree or install prefix), else the system one. */
int cli_find_cohortd(char *out, size_t len)
{
    char dir[4096];
    if (cli_self_dir(dir, sizeof dir) == 0) {
        const char *cands[] = {"/../../server/cohortd", "/cohortd", "/../sbin/cohortd"};
        for (size_t i = 0; i < 3; i++) {
            snprintf(out, len, "%.3900s%s", dir, cands[i]);
            if (access(out, X_OK) == 0)
                return 0;
        }
    }
    const char *sys[] = {"/usr/local/bin/cohortd", "/usr/bin/cohortd"};
    for (size_t i = 0; i < 2; i++) {
        if (access(sys[i], X_OK) == 0) {
            snprintf(out, len, "%s", sys[i]);
            return 0;
        }
    }
    return -1;
}

double cli_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void cli_sleep_ms(long ms, volatile sig_atomic_t *stop)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR && !(stop && *stop)) {
    }
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: cohort COMMAND [options]   (cohort COMMAND --help for its options)\n"
            "\n"
            "  demo         run a 10-client federation on Fashion-MNIST on this machine\n"
            "  client       take part in a federation (built-in trainer, fixed update, or a\n"
            "               command such as a PyTorch script)\n"
            "  sim          run a whole experiment (FedAvg/FedAU on Fashion-MNIST, participation\n"
            "               patterns) through a real cohortd with N TLS clients\n"
            "  certs        make a CA, server, client and peer certificates\n"
            "  init-model   write an initial model (softmax or MLP) as safetensors\n"
            "  eval         test accuracy and loss of a model on Fashion-MNIST\n"
            "  status       a federation at a glance, from its state directory\n"
            "  rounds       one row per committed round\n"
            "  clients      one row per registered client, with its participation\n"
            "  export       copy a verified checkpoint (safetensors) for PyTorch\n"
            "  version      print the version\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    argc--;
    argv++;
    if (strcmp(cmd, "client") == 0)
        return client_main(argc, argv);
    if (strcmp(cmd, "certs") == 0)
        return certs_main(argc, argv);
    if (strcmp(cmd, "init-model") == 0)
        return init_model_main(argc, argv);
    if (strcmp(cmd, "eval") == 0)
        return eval_main(argc, argv);
    if (strcmp(cmd, "demo") == 0)
        return demo_main(argc, argv);
    if (strcmp(cmd, "sim") == 0)
        return sim_main(argc, argv);
    if (strcmp(cmd, "status") == 0)
        return status_main(argc, argv);
    if (strcmp(cmd, "rounds") == 0)
        return rounds_main(argc, argv);
    if (strcmp(cmd, "clients") == 0)
        return clients_main(argc, argv);
    if (strcmp(cmd, "export") == 0)
        return export_main(argc, argv);
    if (strcmp(cmd, "version") == 0 || strcmp(cmd, "--version") == 0) {
        printf("cohort 0.1.0\n");
        return 0;
    }
    if (strcmp(cmd, "help") == 0 || strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "cohort: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
