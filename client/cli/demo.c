/*
 * `cohort demo`: a whole federation on this machine. Makes certificates and an
 * initial MLP, starts cohortd and N clients (real processes, mutual TLS on
 * loopback), prints one line per committed round (read from the participation
 * store, with the new global model's test accuracy) and a final summary.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../trainer/fmnist.h"
#include "../trainer/nn.h"
#include "certs.h"
#include "cli.h"
#include "safetensors.h"

#define MAX_CLIENTS 256

static pid_t spawn(char *const argv[], const char *logpath)
{
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    FILE *f = fopen(logpath, "w");
    if (f) {
        dup2(fileno(f), 1);
        dup2(fileno(f), 2);
    }
    /* Ten trainers share two cores: one BLAS thread each avoids oversubscription. */
    setenv("OPENBLAS_NUM_THREADS", "1", 1);
    execv(argv[0], argv);
    fprintf(stderr, "cannot run %s: %s\n", argv[0], strerror(errno));
    _exit(127);
}

static void rm_state(const char *dir)
{
    char p[4400];
    const char *files[] = {"cohort.db", "cohort.db-wal", "cohort.db-shm"};
    for (size_t i = 0; i < 3; i++) {
        snprintf(p, sizeof p, "%.4000s/%s", dir, files[i]);
        unlink(p);
    }
    for (int r = 0; r < 100000; r++) {
        snprintf(p, sizeof p, "%.4000s/checkpoints/round-%06d.safetensors", dir, r);
        if (unlink(p) < 0 && r > 0 && errno == ENOENT)
            break;
    }
}

int demo_main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"dir", 1, 0, 'd'}, {"clients", 1, 0, 'c'}, {"rounds", 1, 0, 'r'}, {"arch", 1, 0, 'a'},
        {"local-steps", 1, 0, 'l'}, {"batch", 1, 0, 'b'}, {"lr", 1, 0, 'L'}, {"port", 1, 0, 'p'},
        {"split", 1, 0, 's'}, {"http-port", 1, 0, 'H'}, {"help", 0, 0, 'h'}, {0, 0, 0, 0}};
    const char *dir = "cohort-demo", *arch = "mlp", *split = "iid";
    uint64_t nclients = 10, rounds = 10, steps = 600, batch = 32, port = 0, http_port = 0;
    double lr = 0.1;
    int o;
    optind = 1;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'd': dir = optarg; break;
        case 'c':
            if (cli_u64("demo", "--clients", optarg, 1, MAX_CLIENTS, &nclients) < 0) return 2;
            break;
        case 'r':
            if (cli_u64("demo", "--rounds", optarg, 1, 100000, &rounds) < 0) return 2;
            break;
        case 'a': arch = optarg; break;
        case 'l':
            if (cli_u64("demo", "--local-steps", optarg, 1, 1000000, &steps) < 0) return 2;
            break;
        case 'b':
            if (cli_u64("demo", "--batch", optarg, 1, 100000, &batch) < 0) return 2;
            break;
        case 'L':
            if (cli_double("demo", "--lr", optarg, 0, 100, &lr) < 0) return 2;
            break;
        case 'p':
            if (cli_u64("demo", "--port", optarg, 1, 65535, &port) < 0) return 2;
            break;
        case 's': split = optarg; break;
        case 'H':
            if (cli_u64("demo", "--http-port", optarg, 1, 65535, &http_port) < 0) return 2;
            break;
        case 'h':
            printf("usage: cohort demo [--dir DIR] [--clients N] [--rounds R] [--arch mlp|softmax]\n"
                   "                   [--local-steps K] [--batch B] [--lr LR] [--split iid|dirichlet:A]\n"
                   "                   [--port P] [--http-port P]\n"
                   "Runs cohortd, N clients and one evaluator on 127.0.0.1 over mutual TLS\n"
                   "(defaults: 10 clients, 10 rounds, MLP 784-128-10, IID split, 600 local steps\n"
                   "of batch 32, lr 0.1). cohortd serves its dashboard on 127.0.0.1 (--http-port,\n"
                   "default: a free port) while the demo runs; the URL is printed at the start.\n"
                   "Files go to DIR (default ./cohort-demo): certs/, state/ (cohort.db,\n"
                   "checkpoints/), logs/.\n");
            return 0;
        default: return 2;
        }
    }
    char cohortd[4200], self[4200], sdir[4200], cdir[4200], ldir[4200], init[4200], path[4300];
    if (cli_find_cohortd(cohortd, sizeof cohortd) < 0) {
        fprintf(stderr, "cohort demo: cannot find the cohortd binary beside cohort; build the "
                        "whole project (meson compile -C build)\n");
        return 1;
    }
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0)
        return 1;
    self[n] = '\0';
    mkdir(dir, 0755);
    snprintf(sdir, sizeof sdir, "%s/state", dir);
    snprintf(cdir, sizeof cdir, "%s/certs", dir);
    snprintf(ldir, sizeof ldir, "%s/logs", dir);
    snprintf(init, sizeof init, "%s/init.safetensors", dir);
    mkdir(sdir, 0755);
    mkdir(ldir, 0755);
    snprintf(path, sizeof path, "%s/checkpoints", sdir);
    mkdir(path, 0755);
    rm_state(sdir);

    char nbuf[32];
    snprintf(nbuf, sizeof nbuf, "%llu", (unsigned long long)nclients);
    char *cargv[] = {"certs", "--out", cdir, "--clients", nbuf, NULL};
    int saved = dup(1);
    FILE *null = fopen("/dev/null", "w");
    if (null)
        dup2(fileno(null), 1); /* certs prints a line per file; the demo stays terse */
    int rc = certs_main(5, cargv);
    fflush(stdout);
    dup2(saved, 1);
    close(saved);
    if (null)
        fclose(null);
    if (rc == 0) {
        /* The evaluator's certificate, from the same CA. */
        char cacert[4300], cakey[4300];
        snprintf(cacert, sizeof cacert, "%s/ca.pem", cdir);
        snprintf(cakey, sizeof cakey, "%s/ca.key", cdir);
        char *eargv[] = {"certs", "--out", cdir, "--ca-cert", cacert, "--ca-key", cakey,
                         "--clients", "1", "--name-prefix", "evaluator-", NULL};
        saved = dup(1);
        int saved2 = dup(2);
        null = fopen("/dev/null", "w");
        if (null) {
            dup2(fileno(null), 1);
            dup2(fileno(null), 2); /* certs warns that the demo CA outlives nothing */
        }
        rc = certs_main(11, eargv);
        fflush(stdout);
        fflush(stderr);
        dup2(saved, 1);
        dup2(saved2, 2);
        close(saved);
        close(saved2);
        if (null)
            fclose(null);
    }
    if (rc != 0) {
        fprintf(stderr, "cohort demo: making certificates failed\n");
        return 1;
    }
    struct coh_model m;
    char err[512];
    if (nn_init_model(&m, arch, 1, err, sizeof err) < 0 || coh_st_save(init, &m, 1, NULL) < 0) {
        fprintf(stderr, "cohort demo: initial model: %s\n", err);
        return 1;
    }
    char desc[256];
    struct nn_arch na;
    nn_detect(&m, &na, err, sizeof err);
    nn_arch_name(&na, desc, sizeof desc);
    coh_model_fini(&m);
    struct fmnist test;
    if (fmnist_load(FMNIST_DEFAULT_DIR, 0, &test, err, sizeof err) < 0) {
        fprintf(stderr, "cohort demo: %s (install the Debian package dataset-fashion-mnist)\n",
                err);
        return 1;
    }

    if (!port)
        port = (uint64_t)cli_free_port();
    if (!http_port) {
        do
            http_port = (uint64_t)cli_free_port();
        while (http_port == port);
    }
    char listen[64], rbuf[32], ca[4300], scert[4300], skey[4300], logp[4300], http[64];
    snprintf(http, sizeof http, "127.0.0.1:%llu", (unsigned long long)http_port);
    snprintf(listen, sizeof listen, "127.0.0.1:%llu", (unsigned long long)port);
    snprintf(rbuf, sizeof rbuf, "%llu", (unsigned long long)rounds);
    snprintf(ca, sizeof ca, "%s/ca.pem", cdir);
    snprintf(scert, sizeof scert, "%s/server.pem", cdir);
    snprintf(skey, sizeof skey, "%s/server.key", cdir);
    snprintf(logp, sizeof logp, "%s/cohortd.log", ldir);
    char *dargv[] = {cohortd, "--listen", listen, "--state-dir", sdir, "--model", init,
                     "--ca", ca, "--cert", scert, "--key", skey, "--rounds", rbuf,
                     "--min-clients", nbuf, "--round-timeout", "120", "--strategy", "fedavg",
                     "--log-level", "info", "--http", http, NULL};
    printf("cohort demo: FedAvg, %llu clients, %llu rounds, %s, %s split of Fashion-MNIST, "
           "mutual TLS on %s\n",
           (unsigned long long)nclients, (unsigned long long)rounds, desc, split, listen);
    printf("cohort demo: dashboard at http://%s/ (open it in a browser while the demo runs)\n",
           http);
    fflush(stdout);
    double t0 = cli_now_s();
    pid_t dpid = spawn(dargv, logp);
    pid_t cpids[MAX_CLIENTS];
    char sbuf[32], bbuf[32], lrbuf[32];
    snprintf(sbuf, sizeof sbuf, "%llu", (unsigned long long)steps);
    snprintf(bbuf, sizeof bbuf, "%llu", (unsigned long long)batch);
    snprintf(lrbuf, sizeof lrbuf, "%g", lr);
    for (uint64_t i = 0; i < nclients; i++) {
        char cert[4300], key[4300], part[64], clog[4300];
        snprintf(cert, sizeof cert, "%s/client-%llu.pem", cdir, (unsigned long long)i + 1);
        snprintf(key, sizeof key, "%s/client-%llu.key", cdir, (unsigned long long)i + 1);
        snprintf(part, sizeof part, "%llu/%llu", (unsigned long long)i + 1,
                 (unsigned long long)nclients);
        snprintf(clog, sizeof clog, "%s/client-%llu.log", ldir, (unsigned long long)i + 1);
        char *av[] = {self, "client", "--server", listen, "--ca", ca, "--cert", cert, "--key",
                      key, "--trainer", "fmnist", "--partition", part, "--split", (char *)split,
                      "--seed", "1", "--local-steps", sbuf, "--batch", bbuf, "--lr", lrbuf,
                      "--retry-ms", "100:2000", "--max-attempts", "50", NULL};
        cpids[i] = spawn(av, clog);
    }
    pid_t epid;
    {
        char ecert[4300], ekey[4300], elog[4300];
        snprintf(ecert, sizeof ecert, "%s/evaluator-1.pem", cdir);
        snprintf(ekey, sizeof ekey, "%s/evaluator-1.key", cdir);
        snprintf(elog, sizeof elog, "%s/evaluator.log", ldir);
        char *av[] = {self, "client", "--server", listen, "--ca", ca, "--cert", ecert, "--key",
                      ekey, "--evaluate", "--retry-ms", "100:2000", "--max-attempts", "50", NULL};
        epid = spawn(av, elog);
    }
    printf("%5s %12s %11s %9s %8s %8s\n", "round", "participants", "train_loss", "test_acc",
           "round_s", "total_s");
    fflush(stdout);

    snprintf(path, sizeof path, "%s/cohort.db", sdir);
    uint64_t shown = 0;
    double last_acc = NAN, last_loss = NAN;
    int dstatus = -1;
    sqlite3 *db = NULL;
    while (shown < rounds) {
        usleep(200000);
        int st;
        if (dstatus < 0 && waitpid(dpid, &st, WNOHANG) == dpid)
            dstatus = st;
        if (!db && sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
            sqlite3_close(db);
            db = NULL;
        }
        int progressed = 0;
        if (db) {
            sqlite3_busy_timeout(db, 2000);
            sqlite3_stmt *q;
            if (sqlite3_prepare_v2(db,
                                   "SELECT round, participants, mean_train_loss, duration_s, "
                                   "checkpoint FROM rounds WHERE round > ?1 ORDER BY round",
                                   -1, &q, NULL) == SQLITE_OK) {
                sqlite3_bind_int64(q, 1, (sqlite3_int64)shown);
                while (sqlite3_step(q) == SQLITE_ROW) {
                    uint64_t r = (uint64_t)sqlite3_column_int64(q, 0);
                    int parts = sqlite3_column_int(q, 1);
                    double tl = sqlite3_column_type(q, 2) == SQLITE_NULL
                                    ? NAN : sqlite3_column_double(q, 2);
                    double dur = sqlite3_column_double(q, 3);
                    const char *ck = (const char *)sqlite3_column_text(q, 4);
                    struct coh_model g;
                    double acc = NAN, loss = NAN;
                    char ckpath[8400];
                    if (ck)
                        snprintf(ckpath, sizeof ckpath, "%s%s%s", ck[0] == '/' ? "" : sdir,
                                 ck[0] == '/' ? "" : "/", ck);
                    if (ck && coh_st_load(ckpath, NULL, &g, err, sizeof err) == 0) {
                        nn_eval(&g, &test, &acc, &loss, err, sizeof err);
                        coh_model_fini(&g);
                    }
                    printf("%5llu %12d %11.4f %9.4f %8.1f %8.1f\n", (unsigned long long)r, parts,
                           tl, acc, dur, cli_now_s() - t0);
                    fflush(stdout);
                    shown = r;
                    last_acc = acc;
                    last_loss = loss;
                    progressed = 1;
                }
                sqlite3_finalize(q);
            }
        }
        if (!progressed && dstatus >= 0)
            break; /* cohortd is gone and nothing new was committed */
    }
    if (db)
        sqlite3_close(db);
    if (dstatus < 0) {
        int st;
        for (int i = 0; i < 100 && waitpid(dpid, &st, WNOHANG) == 0; i++)
            usleep(100000);
        if (waitpid(dpid, &st, WNOHANG) == 0) {
            kill(dpid, SIGTERM);
            waitpid(dpid, &st, 0);
        }
        dstatus = st;
    }
    int clients_ok = 0;
    for (uint64_t i = 0; i < nclients; i++) {
        int st;
        int done = 0;
        for (int k = 0; k < 50 && !(done = waitpid(cpids[i], &st, WNOHANG) == cpids[i]); k++)
            usleep(100000);
        if (!done) {
            kill(cpids[i], SIGTERM);
            waitpid(cpids[i], &st, 0);
        } else if (WIFEXITED(st) && WEXITSTATUS(st) == 0) {
            clients_ok++;
        }
    }
    {
        /* The evaluator leaves on RunEnd like the trainers. */
        int st, done = 0;
        for (int k = 0; k < 50 && !(done = waitpid(epid, &st, WNOHANG) == epid); k++)
            usleep(100000);
        if (!done) {
            kill(epid, SIGTERM);
            waitpid(epid, &st, 0);
        }
    }
    fmnist_free(&test);
    int ok = shown == rounds && WIFEXITED(dstatus) && WEXITSTATUS(dstatus) == 0;
    printf("accuracy=%.4f loss=%.4f after %llu rounds in %.1f s; %d of %llu clients finished "
           "cleanly\n",
           last_acc, last_loss, (unsigned long long)shown, cli_now_s() - t0, clients_ok,
           (unsigned long long)nclients);
    printf("database: %s/cohort.db  checkpoints: %s/checkpoints/  logs: %s/\n", sdir, sdir, ldir);
    if (!ok)
        fprintf(stderr, "cohort demo: the federation did not finish all rounds; see %s\n", logp);
    return ok ? 0 : 1;
}
