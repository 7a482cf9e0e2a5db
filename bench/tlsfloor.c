/*
 * bench-tlsfloor: the same-run floor for the round benchmark. It moves the
 * bytes of a round and nothing else: a server sends B bytes to each of N
 * clients over TLS 1.3 (mutual, TLS_AES_128_GCM_SHA256, as cohortd prefers)
 * on 127.0.0.1, each client sends B bytes back, and the server answers one
 * byte when it has all of them. No framing, checksums, folding, checkpoint or
 * store: what is left is encryption, decryption and loopback TCP, which any
 * server and client doing this round over TLS on this machine must pay.
 *
 *   bench-tlsfloor --certs DIR --clients N --bytes B [--rounds R] [--upload-only]
 *                  [--server-loops K]
 *
 * --upload-only: the clients send and the server only receives (the ingest
 * benchmark's floor: its clients' uploads and nothing else).
 * --server-loops K: instead of a thread per connection, K threads each run an
 * epoll loop over non-blocking connections (connection i on loop i mod K), the
 * shape of cohortd's server (K = 1) and of a server with K loops. This measures
 * what cohortd's one loop costs without any of its work, and what more loops
 * would gain on this machine, without building them into cohortd.
 * DIR is what `cohort certs --clients N` writes. The server is a process of its
 * own (in its own session, as cohortd in bench_server.py), by default with a
 * thread per connection (so its encryption may use both cores: a lower floor than
 * cohortd's single loop thread); the clients are threads of this process, as in
 * bench-lcclients. Buffers are model-sized and reused, as
 * in cohort. Prints one JSON line: per-round wall times and their median over
 * rounds 2..R, and the host's CPU time per round over rounds 2..R (all processes,
 * /proc/stat) with the average number of cores it kept busy.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"

#define MAX_ROUNDS 64
#define PIECE 16384

static const char *certs;
static int nclients, rounds = 5, upload_only, server_loops;
static size_t nbytes;
static uint8_t *payload;        /* what both sides send, shared read-only */

static void die(const char *what)
{
    fprintf(stderr, "bench-tlsfloor: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(1);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static SSL_CTX *make_ctx(int server, const char *cert, const char *key)
{
    char ca[1024];
    snprintf(ca, sizeof ca, "%s/ca.pem", certs);
    SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (!ctx || !SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) ||
        !SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256") ||
        SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1)
        die("TLS context");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | (server ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0), NULL);
    SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    return ctx;
}

/* The socket I/O cohort itself does (libcohort and cohortd): ciphertext read
 * ahead, up to 64 KiB per recv() (without it OpenSSL reads each record's header
 * and body with two calls), and written GATHER bytes at a time through a
 * buffering BIO that is flushed when a message is complete (one send() per
 * 16 KiB record otherwise). A floor that paid a system call per record would
 * not be a floor: cohort's clients gather, its server writes a burst at once. */
#define GATHER 65536

static void set_io(SSL *ssl, int fd)
{
    BIO *rb = BIO_new_socket(fd, BIO_NOCLOSE), *ws = BIO_new_socket(fd, BIO_NOCLOSE);
    BIO *wb = BIO_new(BIO_f_buffer());
    if (!rb || !ws || !wb || BIO_set_write_buffer_size(wb, GATHER) != 1)
        die("TLS BIOs");
    BIO_push(wb, ws);
    SSL_set_bio(ssl, rb, wb);
    SSL_set_read_ahead(ssl, 1);
    SSL_set_default_read_buffer_len(ssl, GATHER);
}

static int write_n(SSL *ssl, const uint8_t *p, size_t n)
{
    for (size_t off = 0; off < n;) {
        size_t k = n - off < PIECE ? n - off : PIECE, w = 0;
        if (!SSL_write_ex(ssl, p + off, k, &w))
            return -1;
        off += w;
    }
    return BIO_flush(SSL_get_wbio(ssl)) == 1 ? 0 : -1;
}

static int read_n(SSL *ssl, uint8_t *p, size_t n)
{
    for (size_t off = 0; off < n;) {
        size_t r = 0;
        if (!SSL_read_ex(ssl, p + off, n - off, &r))
            return -1;
        off += r;
    }
    return 0;
}

static int accept_one(int lfd)
{
    int fd = accept(lfd, NULL, NULL);
    if (fd < 0)
        die("accept");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

/* ---- server process: a thread per connection ---- */

struct sconn {
    SSL *ssl;
};

static void *serve(void *arg)
{
    struct sconn *sc = arg;
    uint8_t *sink = malloc(nbytes ? nbytes : 1);
    if (!sink)
        die("out of memory");
    if (SSL_accept(sc->ssl) != 1)
        die("server handshake");
    for (int r = 0; r < rounds; r++) {
        uint8_t go;
        if (read_n(sc->ssl, &go, 1) < 0 ||
            (!upload_only && write_n(sc->ssl, payload, nbytes) < 0) ||
            read_n(sc->ssl, sink, nbytes) < 0 || write_n(sc->ssl, &go, 1) < 0)
            die("server transfer");
    }
    free(sink);
    return NULL;
}

/* ---- server process, --server-loops K: K epoll loops ---- */

enum { L_HANDSHAKE, L_GO, L_SEND, L_SEND_FLUSH, L_RECV, L_ACK, L_ACK_FLUSH, L_DONE };

struct lconn {
    SSL *ssl;
    int state, round;
    size_t off;
    uint8_t *sink;
};

struct sloop {
    int ep, n;                  /* epoll fd; connections still running */
};

/* Drives one connection as far as its socket allows: 1 when it has finished
 * every round, 0 when it would block (edge-triggered: every path to 0 has seen
 * EAGAIN on the side it waits for). */
static int lconn_step(struct lconn *c)
{
    for (;;) {
        int rc = 1;
        size_t n = 0;
        uint8_t go = 1;
        switch (c->state) {
        case L_HANDSHAKE:
            rc = SSL_accept(c->ssl);
            if (rc == 1)
                c->state = L_GO;
            break;
        case L_GO:
            rc = SSL_read_ex(c->ssl, &go, 1, &n);
            if (rc == 1) {
                c->state = upload_only ? L_RECV : L_SEND;
                c->off = 0;
            }
            break;
        case L_SEND: {
            size_t k = nbytes - c->off < PIECE ? nbytes - c->off : PIECE;
            if (k == 0) {
                c->state = L_SEND_FLUSH;
                continue;
            }
            rc = SSL_write_ex(c->ssl, payload + c->off, k, &n);
            if (rc == 1)
                c->off += n;
            break;
        }
        case L_SEND_FLUSH:
        case L_ACK_FLUSH: {
            BIO *wb = SSL_get_wbio(c->ssl);
            if (BIO_flush(wb) != 1) {
                if (BIO_should_retry(wb))
                    return 0; /* the socket said EAGAIN: wait for EPOLLOUT */
                die("server flush (loop)");
            }
            if (c->state == L_SEND_FLUSH) {
                c->state = L_RECV;
                c->off = 0;
            } else {
                c->state = ++c->round == rounds ? L_DONE : L_GO;
            }
            continue;
        }
        case L_RECV:
            if (c->off == nbytes) {
                c->state = L_ACK;
                continue;
            }
            rc = SSL_read_ex(c->ssl, c->sink + c->off, nbytes - c->off, &n);
            if (rc == 1)
                c->off += n;
            break;
        case L_ACK:
            rc = SSL_write_ex(c->ssl, &go, 1, &n);
            if (rc == 1)
                c->state = L_ACK_FLUSH;
            break;
        default:
            return 1;
        }
        if (rc != 1) {
            int e = SSL_get_error(c->ssl, rc);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
                return 0;
            die("server transfer (loop)");
        }
    }
}

static void *serve_loop(void *arg)
{
    struct sloop *l = arg;
    struct epoll_event ev[64];
    while (l->n > 0) {
        int k = epoll_wait(l->ep, ev, 64, -1);
        if (k < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < k; i++) {
            struct lconn *c = ev[i].data.ptr;
            if (c->state != L_DONE && lconn_step(c))
                l->n--;
        }
    }
    return NULL;
}

static void run_server_loops(int lfd, SSL_CTX *ctx)
{
    struct sloop *lp = calloc((size_t)server_loops, sizeof *lp);
    struct lconn *cs = calloc((size_t)nclients, sizeof *cs);
    pthread_t *th = calloc((size_t)server_loops, sizeof *th);
    if (!lp || !cs || !th)
        die("out of memory");
    for (int t = 0; t < server_loops; t++)
        if ((lp[t].ep = epoll_create1(0)) < 0)
            die("epoll_create1");
    for (int i = 0; i < nclients; i++) {
        int fd = accept_one(lfd);
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
            die("fcntl O_NONBLOCK");
        struct lconn *c = &cs[i];
        c->ssl = SSL_new(ctx);
        c->sink = malloc(nbytes ? nbytes : 1);
        if (!c->ssl || !c->sink)
            die("out of memory");
        set_io(c->ssl, fd);
        struct sloop *l = &lp[i % server_loops];
        l->n++;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = c};
        if (epoll_ctl(l->ep, EPOLL_CTL_ADD, fd, &ev) < 0)
            die("epoll_ctl");
    }
    /* Loops start once every connection is registered: no epoll_ctl races a wait. */
    for (int t = 0; t < server_loops; t++)
        if (pthread_create(&th[t], NULL, serve_loop, &lp[t]) != 0)
            die("pthread_create");
    for (int t = 0; t < server_loops; t++)
        pthread_join(th[t], NULL);
    _exit(0);
}

static void run_server(int lfd)
{
    char cert[1024], key[1024];
    snprintf(cert, sizeof cert, "%s/server.pem", certs);
    snprintf(key, sizeof key, "%s/server.key", certs);
    SSL_CTX *ctx = make_ctx(1, cert, key);
    if (server_loops > 0)
        run_server_loops(lfd, ctx);
    pthread_t *th = calloc((size_t)nclients, sizeof *th);
    struct sconn *sc = calloc((size_t)nclients, sizeof *sc);
    for (int i = 0; i < nclients; i++) {
        int fd = accept_one(lfd);
        sc[i].ssl = SSL_new(ctx);
        set_io(sc[i].ssl, fd);
        if (pthread_create(&th[i], NULL, serve, &sc[i]) != 0)
            die("pthread_create");
    }
    for (int i = 0; i < nclients; i++)
        pthread_join(th[i], NULL);
    _exit(0);
}

/* ---- clients: threads of this process ---- */

struct client {
    int idx;
    uint16_t port;
    SSL *ssl;
    uint8_t *buf;
};

static pthread_barrier_t bar;
static pthread_mutex_t tmu = PTHREAD_MUTEX_INITIALIZER;
static int arrived[MAX_ROUNDS], finished[MAX_ROUNDS];
static double t_start[MAX_ROUNDS], t_end[MAX_ROUNDS];
static double busy_start[MAX_ROUNDS], busy_end[MAX_ROUNDS];
static double srv_start[MAX_ROUNDS], srv_end[MAX_ROUNDS];
static pid_t server_pid;

/* CPU seconds of the server process so far, all its threads (its CPU-time clock:
 * nanoseconds, where /proc's figures are 10 ms ticks). */
static double server_cpu_s(void)
{
    clockid_t cid;
    struct timespec ts;
    if (clock_getcpuclockid(server_pid, &cid) != 0 || clock_gettime(cid, &ts) != 0)
        return 0;
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void *client(void *arg)
{
    struct client *c = arg;
    char cert[1024], key[1024];
    snprintf(cert, sizeof cert, "%s/client-%d.pem", certs, c->idx + 1);
    snprintf(key, sizeof key, "%s/client-%d.key", certs, c->idx + 1);
    SSL_CTX *ctx = make_ctx(0, cert, key);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(c->port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0)
        die("connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->ssl = SSL_new(ctx);
    set_io(c->ssl, fd);
    if (SSL_connect(c->ssl) != 1)
        die("client handshake");
    for (int r = 0; r < rounds; r++) {
        /* The round starts when the last client is ready and ends when the last one is
         * done, and that client reads the clocks: a thread that reads them after the
         * barrier may run only after the others have been sending for a while. */
        pthread_mutex_lock(&tmu);
        if (++arrived[r] == nclients) {
            t_start[r] = now_s();
            busy_start[r] = bench_host_busy_s();
            srv_start[r] = server_cpu_s();
        }
        pthread_mutex_unlock(&tmu);
        pthread_barrier_wait(&bar);
        uint8_t go = 1;
        if (write_n(c->ssl, &go, 1) < 0 ||
            (!upload_only && read_n(c->ssl, c->buf, nbytes) < 0) ||
            write_n(c->ssl, payload, nbytes) < 0 || read_n(c->ssl, &go, 1) < 0)
            die("client transfer");
        pthread_mutex_lock(&tmu);
        if (++finished[r] == nclients) {
            t_end[r] = now_s();
            busy_end[r] = bench_host_busy_s();
            srv_end[r] = server_cpu_s();
        }
        pthread_mutex_unlock(&tmu);
        pthread_barrier_wait(&bar);
    }
    SSL_free(c->ssl);
    SSL_CTX_free(ctx);
    close(fd);
    return NULL;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i += 2) {
        if (!strcmp(argv[i], "--upload-only")) {
            upload_only = 1;
            i--;
            continue;
        }
        if (i + 1 >= argc)
            break;
        if (!strcmp(argv[i], "--certs"))
            certs = argv[i + 1];
        else if (!strcmp(argv[i], "--clients"))
            nclients = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--bytes"))
            nbytes = strtoull(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--rounds"))
            rounds = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--server-loops"))
            server_loops = atoi(argv[i + 1]);
    }
    if (!certs || nclients < 1 || rounds < 2 || rounds > MAX_ROUNDS || server_loops < 0) {
        fprintf(stderr, "usage: bench-tlsfloor --certs DIR --clients N --bytes B [--rounds R] "
                        "[--upload-only] [--server-loops K]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    payload = malloc(nbytes ? nbytes : 1);
    if (!payload)
        die("out of memory");
    for (size_t i = 0; i < nbytes; i++)
        payload[i] = (uint8_t)(i * 2654435761u >> 24);
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t al = sizeof a;
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 1024) < 0 ||
        getsockname(lfd, (struct sockaddr *)&a, &al) < 0)
        die("listen");
    /* The server in a session (scheduling autogroup) of its own with this one's
     * autogroup nice value, as bench_server.py starts cohortd. */
    char ag[128] = "";
    FILE *agf = fopen("/proc/self/autogroup", "r");
    int ag_nice = 0, have_ag = 0;
    if (agf) {
        have_ag = fgets(ag, sizeof ag, agf) && sscanf(ag, "/autogroup-%*d nice %d", &ag_nice) == 1;
        fclose(agf);
    }
    pid_t parent = getpid();
    pid_t pid = server_pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        /* Its own session escapes the terminal's signals: die with this process. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(1);
        if (setsid() >= 0 && have_ag && (agf = fopen("/proc/self/autogroup", "w"))) {
            fprintf(agf, "%d", ag_nice);
            fclose(agf);
        }
        run_server(lfd);
    }
    close(lfd);
    pthread_barrier_init(&bar, NULL, (unsigned)nclients);
    pthread_t *th = calloc((size_t)nclients, sizeof *th);
    struct client *cl = calloc((size_t)nclients, sizeof *cl);
    for (int i = 0; i < nclients; i++) {
        cl[i].idx = i;
        cl[i].port = ntohs(a.sin_port);
        cl[i].buf = malloc(nbytes ? nbytes : 1);
        if (!cl[i].buf || pthread_create(&th[i], NULL, client, &cl[i]) != 0)
            die("client thread");
    }
    for (int i = 0; i < nclients; i++)
        pthread_join(th[i], NULL);
    int st = 0;
    waitpid(pid, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        die("server process failed");
    double d[MAX_ROUNDS];
    printf("{\"name\": \"tls_floor\", \"params\": {\"N\": %d, \"bytes\": %zu, \"rounds\": %d, "
           "\"upload_only\": %s, \"server_loops\": %d}, \"rounds_s\": [", nclients, nbytes,
           rounds, upload_only ? "true" : "false", server_loops);
    for (int r = 0; r < rounds; r++) {
        d[r] = t_end[r] - t_start[r];
        printf("%s%.4f", r ? ", " : "", d[r]);
    }
    qsort(d + 1, (size_t)rounds - 1, sizeof d[0], cmp_d);
    int m = rounds - 1;
    double med = m % 2 ? d[1 + m / 2] : (d[m / 2] + d[m / 2 + 1]) / 2;
    /* The host's CPU over rounds 2..R: what moving these bytes costs, whoever does it. */
    /* One window over rounds 2..R (the host's figure is in 10 ms ticks: one
     * difference instead of R - 1 keeps its error to a tick or two). */
    double busy = busy_end[rounds - 1] - busy_start[1];
    double srv = srv_end[rounds - 1] - srv_start[1];
    double wall = t_end[rounds - 1] - t_start[1];
    /* window_mono and server_pid let a host-wide profile count rounds 2..R and
     * tell the server's samples from the clients' (bench/cpu_kinds.py). */
    printf("], \"value\": %.4f, \"unit\": \"s\", \"host_cpu_s_per_round\": %.3f, "
           "\"host_cores_busy\": %.2f, \"server_cpu_s_per_round\": %.3f, "
           "\"window_mono\": [%.6f, %.6f], \"server_pid\": %d, \"pid\": %d}\n",
           med, busy / m, wall > 0 ? busy / wall : 0.0, srv / m, t_start[1], t_end[rounds - 1],
           (int)pid, (int)getpid());
    for (int i = 0; i < nclients; i++)
        free(cl[i].buf);
    free(cl);
    free(th);
    free(payload);
    return 0;
}
