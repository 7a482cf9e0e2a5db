/*
 * `cohort certs`: CA, server, client and peer certificates for cohort's mutual TLS, and
 * certificate revocation lists signed by an existing CA.
 *
 * Keys are EC P-256 in unencrypted PKCS#8 PEM, signatures SHA-256. Every file is
 * written under a temporary name in the output directory, fsynced and renamed into
 * place, so an interrupted run never leaves a truncated key or certificate under its
 * final name. Errors are reported once, by the function that detects them, as a
 * single "cohort certs: ..." line; callers only propagate the failure.
 */
#include "certs.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#define MAX_COUNT 100000UL
#define MAX_DAYS 36500UL
#define DEFAULT_DAYS 825UL
/* The CN is limited to 64 characters (RFC 5280 ub-common-name); leave room for the index. */
#define MAX_PREFIX 48
#define MAX_DNS_NAME 253
/* Certificates start slightly in the past so a verifier whose clock lags the issuing
 * host's by a few minutes does not reject a freshly generated certificate. */
#define BACKDATE_SECS 300L
#define DAY_SECS 86400L

/* parse_args result besides 0 (go on) and 2 (usage error). */
#define PARSE_HELP 1

static const char usage_text[] =
    "usage: cohort certs --out DIR [options]\n"
    "       cohort certs --out DIR --ca-cert CA.pem --ca-key CA.key --crl NAME.pem\n"
    "                    [--revoke CERT.pem]... [--days D]\n"
    "\n"
    "Generates a CA and TLS certificates (EC P-256 keys, SHA-256 signatures) for cohort,\n"
    "or a certificate revocation list (CRL) signed by an existing CA.\n"
    "\n"
    "  --out DIR          directory to write into (created if missing)\n"
    "  --clients N        client certificates client-1 .. client-N (0..100000, default 0)\n"
    "  --peers N          peer certificates peer-1 .. peer-N (0..100000, default 0)\n"
    "  --host NAME        extra DNS name or IP address for the server and peer\n"
    "                     certificates (repeatable; localhost and 127.0.0.1 are always in)\n"
    "  --days D           validity in days (1..36500, default 825)\n"
    "  --ca-cert CA.pem   sign with this existing CA instead of creating ca.pem/ca.key;\n"
    "  --ca-key CA.key    with --clients or --peers no server certificate is written\n"
    "  --name-prefix P    name client certificates P1 .. PN instead of client-1 .. client-N\n"
    "  --expired          make leaf certificates that have already expired (for tests)\n"
    "  --crl NAME.pem     write a CRL signed by the --ca-cert CA to DIR/NAME.pem (to the\n"
    "                     path as given if it contains a '/'), valid for --days days;\n"
    "                     without --clients or --peers only the CRL is written\n"
    "  --revoke CERT.pem  list this certificate, issued by that CA, as revoked in the CRL\n"
    "                     (repeatable; without any, the CRL is empty)\n"
    "  --help             show this help\n";

enum role { ROLE_CA, ROLE_SERVER, ROLE_CLIENT, ROLE_PEER };

struct opts {
    const char *out;
    unsigned long clients;
    unsigned long peers;
    unsigned long days;
    bool clients_set, peers_set, days_set;
    const char **hosts;             /* points into argv */
    size_t nhosts;
    const char *ca_cert;
    const char *ca_key;
    const char *prefix;
    bool expired;
    const char *crl;                /* --crl as given */
    const char **revoke;            /* points into argv */
    size_t nrevoke;
};

struct outdir {
    char *path;                     /* DIR without trailing slashes */
    unsigned long nwritten;
};

static void report(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void report(const char *fmt, ...)
{
    va_list ap;

    fputs("cohort certs: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

/* OpenSSL queues errors from every layer it passed through; the first one queued is the
 * root cause, the rest are context we already give in `what`. */
static void report_ssl(const char *what)
{
    unsigned long e = ERR_get_error();
    const char *reason = NULL;
    char buf[256];

    /* System errors (e.g. from BIO_new_file) carry errno as their reason code. */
    if (e != 0)
        reason = ERR_SYSTEM_ERROR(e) ? strerror(ERR_GET_REASON(e)) : ERR_reason_error_string(e);

    if (e == 0) {
        report("%s", what);
    } else if (reason != NULL) {
        report("%s: %s", what, reason);
    } else {
        ERR_error_string_n(e, buf, sizeof buf);
        report("%s: %s", what, buf);
    }
    ERR_clear_error();
}

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static int usage_error(const char *fmt, ...)
{
    va_list ap;

    fputs("cohort certs: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fputs(usage_text, stderr);
    return 2;
}

/* "DIR/NAME" in fresh memory, or NULL (reported) when out of memory. */
static char *join_path(const char *dir, const char *prefix, const char *name, const char *suffix)
{
    size_t dlen = strlen(dir);
    /* DIR is "/" (the only form that keeps a trailing slash) for a CRL such as /crl.pem. */
    const char *sep = dlen > 0 && dir[dlen - 1] == '/' ? "" : "/";
    size_t len = dlen + strlen(prefix) + strlen(name) + strlen(suffix) + 2;
    char *path = malloc(len);

    if (path == NULL) {
        report("out of memory");
        return NULL;
    }
    snprintf(path, len, "%s%s%s%s%s", dir, sep, prefix, name, suffix);
    return path;
}

/* Strict decimal: digits only, so "-1", " 5", "5x" and "0x10" are all rejected rather
 * than silently reinterpreted by strtoul. */
static int parse_ulong(const char *s, unsigned long min, unsigned long max, unsigned long *out)
{
    unsigned long v = 0;

    if (*s == '\0')
        return -1;
    for (const char *p = s; *p != '\0'; p++) {
        if (*p < '0' || *p > '9')
            return -1;
        v = v * 10 + (unsigned long)(*p - '0');
        if (v > max)
            return -1;
    }
    if (v < min)
        return -1;
    *out = v;
    return 0;
}

static bool is_ip_address(const char *s)
{
    unsigned char addr[16];

    return inet_pton(AF_INET, s, addr) == 1 || inet_pton(AF_INET6, s, addr) == 1;
}

/* A DNS name as TLS clients match it: dot-separated labels of letters, digits, '-' and
 * '_', optionally starting with a "*." wildcard label. Anything else (spaces, commas,
 * zone ids) would produce a SAN no client can ever match, so it is refused up front. */
static bool is_dns_name(const char *s)
{
    size_t len = strlen(s);
    size_t label = 0;

    if (len == 0 || len > MAX_DNS_NAME)
        return false;
    if (s[0] == '*' && s[1] == '.' && s[2] != '\0')
        s += 2;
    for (const char *p = s; *p != '\0'; p++) {
        char c = *p;
        if (c == '.') {
            if (label == 0)
                return false;
            label = 0;
            continue;
        }
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '-' || c == '_';
        if (!ok || ++label > 63)
            return false;
    }
    return label > 0;
}

/* The prefix becomes part of file names in DIR, so it must not be able to climb out of
 * DIR or produce hidden files. */
static bool is_name_prefix(const char *s)
{
    size_t len = strlen(s);

    if (len == 0 || len > MAX_PREFIX || s[0] == '.' || s[0] == '-')
        return false;
    for (const char *p = s; *p != '\0'; p++) {
        char c = *p;
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '-' || c == '_' || c == '.';
        if (!ok)
            return false;
    }
    return true;
}

static bool option_is(const char *arg, size_t len, const char *name)
{
    return strlen(name) == len && strncmp(arg, name, len) == 0;
}

/* Fills o from argv. Returns 0, PARSE_HELP (usage printed to stdout) or 2 (usage error
 * reported). o->hosts must have room for argc entries. */
static int parse_args(int argc, char **argv, struct opts *o)
{
    static const char *const with_value[] = {
        "--out", "--clients", "--peers", "--host", "--days", "--ca-cert", "--ca-key",
        "--name-prefix", "--crl", "--revoke",
    };

    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        const char *eq = strchr(arg, '=');
        size_t len = eq != NULL ? (size_t)(eq - arg) : strlen(arg);
        const char *name = NULL;
        const char *val;

        if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            fputs(usage_text, stdout);
            return PARSE_HELP;
        }
        if (option_is(arg, len, "--expired")) {
            if (eq != NULL)
                return usage_error("option --expired takes no value");
            o->expired = true;
            continue;
        }
        if (arg[0] != '-')
            return usage_error("unexpected argument '%s'", arg);
        for (size_t k = 0; k < sizeof with_value / sizeof with_value[0]; k++) {
            if (option_is(arg, len, with_value[k]))
                name = with_value[k];
        }
        if (name == NULL)
            return usage_error("unknown option '%.*s'", (int)len, arg);

        /* "--out --clients 3" is far more likely a forgotten value than a directory
         * named "--clients", so a following option is not taken as the value. */
        if (eq != NULL)
            val = eq + 1;
        else if (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0)
            val = argv[++i];
        else
            return usage_error("option %s needs a value", name);
        if (*val == '\0')
            return usage_error("option %s needs a non-empty value", name);

        if (strcmp(name, "--host") == 0) {
            if (!is_ip_address(val) && !is_dns_name(val))
                return usage_error("--host '%s' is neither a DNS name nor an IP address", val);
            o->hosts[o->nhosts++] = val;
        } else if (strcmp(name, "--out") == 0) {
            if (o->out != NULL)
                return usage_error("--out given more than once");
            o->out = val;
        } else if (strcmp(name, "--clients") == 0) {
            if (o->clients_set)
                return usage_error("--clients given more than once");
            if (parse_ulong(val, 0, MAX_COUNT, &o->clients) != 0)
                return usage_error("--clients must be an integer 0..%lu, not '%s'", MAX_COUNT,
                                   val);
            o->clients_set = true;
        } else if (strcmp(name, "--peers") == 0) {
            if (o->peers_set)
                return usage_error("--peers given more than once");
            if (parse_ulong(val, 0, MAX_COUNT, &o->peers) != 0)
                return usage_error("--peers must be an integer 0..%lu, not '%s'", MAX_COUNT, val);
            o->peers_set = true;
        } else if (strcmp(name, "--days") == 0) {
            if (o->days_set)
                return usage_error("--days given more than once");
            if (parse_ulong(val, 1, MAX_DAYS, &o->days) != 0)
                return usage_error("--days must be an integer 1..%lu, not '%s'", MAX_DAYS, val);
            o->days_set = true;
        } else if (strcmp(name, "--ca-cert") == 0) {
            if (o->ca_cert != NULL)
                return usage_error("--ca-cert given more than once");
            o->ca_cert = val;
        } else if (strcmp(name, "--ca-key") == 0) {
            if (o->ca_key != NULL)
                return usage_error("--ca-key given more than once");
            o->ca_key = val;
        } else if (strcmp(name, "--crl") == 0) {
            const char *slash = strrchr(val, '/');
            const char *base = slash != NULL ? slash + 1 : val;
            if (o->crl != NULL)
                return usage_error("--crl given more than once");
            if (*base == '\0' || strcmp(base, ".") == 0 || strcmp(base, "..") == 0)
                return usage_error("--crl '%s' must name a file", val);
            o->crl = val;
        } else if (strcmp(name, "--revoke") == 0) {
            o->revoke[o->nrevoke++] = val;
        } else {
            if (o->prefix != NULL)
                return usage_error("--name-prefix given more than once");
            if (!is_name_prefix(val))
                return usage_error("--name-prefix '%s' must be 1..%d characters of letters, "
                                   "digits, '-', '_' or '.', not starting with '.' or '-'",
                                   val, MAX_PREFIX);
            o->prefix = val;
        }
    }
    if (o->out == NULL)
        return usage_error("--out DIR is required");
    if ((o->ca_cert == NULL) != (o->ca_key == NULL))
        return usage_error("--ca-cert and --ca-key must be given together");
    if (o->nrevoke > 0 && o->crl == NULL)
        return usage_error("--revoke needs --crl");
    if (o->crl != NULL && o->ca_cert == NULL)
        return usage_error("--crl needs --ca-cert and --ca-key: a CRL must be signed by the "
                           "existing CA");
    /* With --crl alone no certificate is issued, so options that only shape certificates
     * would silently do nothing. */
    if (o->crl != NULL && !o->clients_set && !o->peers_set) {
        if (o->nhosts > 0)
            return usage_error("--host has no effect with --crl unless --peers is given");
        if (o->prefix != NULL)
            return usage_error("--name-prefix has no effect with --crl unless --clients is "
                               "given");
        if (o->expired)
            return usage_error("--expired has no effect with --crl unless --clients or "
                               "--peers is given");
    }
    return 0;
}

static int make_dir(const char *path)
{
    if (mkdir(path, 0755) == 0 || errno == EEXIST)
        return 0;
    report("cannot create directory %s: %s", path, strerror(errno));
    return -1;
}

/* mkdir -p, then remembers DIR (trailing slashes dropped, for tidy messages). */
static int prepare_outdir(struct outdir *od, const char *dir)
{
    struct stat st;
    char *p = strdup(dir);
    size_t len;

    if (p == NULL) {
        report("out of memory");
        return -1;
    }
    len = strlen(p);
    while (len > 1 && p[len - 1] == '/')
        p[--len] = '\0';
    od->path = p;
    for (char *s = p + 1; *s != '\0'; s++) {
        if (*s != '/' || s[-1] == '/')
            continue;
        *s = '\0';
        int rc = make_dir(p);
        *s = '/';
        if (rc != 0)
            return -1;
    }
    if (make_dir(p) != 0)
        return -1;
    /* EEXIST also covers a regular file in the way. */
    if (stat(p, &st) != 0) {
        report("cannot access %s: %s", p, strerror(errno));
        return -1;
    }
    if (!S_ISDIR(st.st_mode)) {
        report("%s exists and is not a directory", p);
        return -1;
    }
    return 0;
}

static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Writes the contents of the memory BIO to DIR/name via a temporary file and rename. */
static int write_file(struct outdir *od, const char *name, BIO *data, mode_t mode)
{
    char *buf = NULL;
    long len = BIO_get_mem_data(data, &buf);
    char *final = join_path(od->path, "", name, "");
    char *tmp = join_path(od->path, ".", name, ".XXXXXX");
    bool created = false;
    int fd = -1;
    int rc = -1;

    if (final == NULL || tmp == NULL)
        goto out;
    fd = mkstemp(tmp);
    if (fd < 0) {
        report("cannot create a temporary file in %s: %s", od->path, strerror(errno));
        goto out;
    }
    created = true;
    /* mkstemp creates 0600 whatever the umask; set the final mode before any data lands so
     * a key is never readable by others and a certificate is readable regardless of umask. */
    if (fchmod(fd, mode) != 0 || write_all(fd, buf, len > 0 ? (size_t)len : 0) != 0 ||
        fsync(fd) != 0) {
        report("cannot write %s: %s", tmp, strerror(errno));
        goto out;
    }
    int cfd = fd;
    fd = -1;                        /* close() releases the descriptor even when it fails */
    if (close(cfd) != 0) {
        report("cannot write %s: %s", tmp, strerror(errno));
        goto out;
    }
    if (rename(tmp, final) != 0) {
        report("cannot rename %s to %s: %s", tmp, final, strerror(errno));
        goto out;
    }
    created = false;
    printf("wrote %s\n", final);
    od->nwritten++;
    rc = 0;
out:
    if (fd >= 0)
        close(fd);
    if (created)
        unlink(tmp);
    free(tmp);
    free(final);
    return rc;
}

static int write_key(struct outdir *od, const char *base, EVP_PKEY *key)
{
    /* Secure-memory BIO: its buffer is cleansed when freed, so the private key does not
     * linger in freed heap memory. */
    BIO *bio = BIO_new(BIO_s_secmem());
    char *name = NULL;
    int rc = -1;

    if (bio == NULL || !PEM_write_bio_PrivateKey(bio, key, NULL, NULL, 0, NULL, NULL)) {
        report_ssl("cannot encode a private key");
        goto out;
    }
    name = malloc(strlen(base) + sizeof ".key");
    if (name == NULL) {
        report("out of memory");
        goto out;
    }
    strcpy(name, base);
    strcat(name, ".key");
    rc = write_file(od, name, bio, 0600);
out:
    free(name);
    BIO_free(bio);
    return rc;
}

static int write_cert(struct outdir *od, const char *base, X509 *cert)
{
    BIO *bio = BIO_new(BIO_s_mem());
    char *name = NULL;
    int rc = -1;

    if (bio == NULL || !PEM_write_bio_X509(bio, cert)) {
        report_ssl("cannot encode a certificate");
        goto out;
    }
    name = malloc(strlen(base) + sizeof ".pem");
    if (name == NULL) {
        report("out of memory");
        goto out;
    }
    strcpy(name, base);
    strcat(name, ".pem");
    rc = write_file(od, name, bio, 0644);
out:
    free(name);
    BIO_free(bio);
    return rc;
}

/* Without a durable directory entry the renamed files may vanish on a crash even though
 * their data was fsynced. */
static int sync_dir(const struct outdir *od)
{
    int fd = open(od->path, O_RDONLY | O_DIRECTORY);
    int rc = 0;

    if (fd < 0) {
        report("cannot open %s: %s", od->path, strerror(errno));
        return -1;
    }
    /* Some filesystems cannot fsync a directory (EINVAL); nothing more can be done there. */
    if (fsync(fd) != 0 && errno != EINVAL) {
        report("cannot sync %s: %s", od->path, strerror(errno));
        rc = -1;
    }
    close(fd);
    return rc;
}

static EVP_PKEY *make_key(void)
{
    EVP_PKEY *key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");

    if (key == NULL)
        report_ssl("cannot generate an EC P-256 key");
    return key;
}

/* Random, positive, nonzero 64-bit serial: unpredictable serials keep certificates from
 * one CA distinct without a serial database. */
static int set_random_serial(X509 *cert)
{
    BIGNUM *bn = BN_new();
    int rc = -1;

    if (bn == NULL)
        goto out;
    do {
        if (!BN_rand(bn, 64, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY))
            goto out;
    } while (BN_is_zero(bn));
    if (BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert)) == NULL)
        goto out;
    rc = 0;
out:
    if (rc != 0)
        report_ssl("cannot set a certificate serial number");
    BN_free(bn);
    return rc;
}

static int set_validity(X509 *cert, enum role role, const struct opts *o)
{
    bool ok;

    if (role != ROLE_CA && o->expired) {
        ok = X509_time_adj_ex(X509_getm_notBefore(cert), -2, 0, NULL) != NULL &&
             X509_time_adj_ex(X509_getm_notAfter(cert), -1, 0, NULL) != NULL;
    } else {
        ok = X509_gmtime_adj(X509_getm_notBefore(cert), -BACKDATE_SECS) != NULL &&
             X509_time_adj_ex(X509_getm_notAfter(cert), (int)o->days, 0, NULL) != NULL;
    }
    if (!ok)
        report_ssl("cannot set certificate validity");
    return ok ? 0 : -1;
}

static int add_ext(X509 *cert, X509V3_CTX *ctx, int nid, const char *value)
{
    X509_EXTENSION *ext = X509V3_EXT_nconf_nid(NULL, ctx, nid, value);
    int ok = ext != NULL && X509_add_ext(cert, ext, -1);

    X509_EXTENSION_free(ext);
    if (!ok) {
        char what[128];
        snprintf(what, sizeof what, "cannot add the %s extension", OBJ_nid2ln(nid));
        report_ssl(what);
    }
    return ok ? 0 : -1;
}

/* Appends host as an IP or DNS entry unless an identical entry is already there (--host
 * may repeat localhost, 127.0.0.1 or itself). The entry is built directly rather than via
 * an "DNS:..,IP:.." config string so no host can inject extra entries. */
static int append_san(GENERAL_NAMES *gens, const char *host)
{
    unsigned char addr[16];
    int addrlen = 0;
    GENERAL_NAME *gen = GENERAL_NAME_new();

    if (gen == NULL)
        return -1;
    if (inet_pton(AF_INET, host, addr) == 1)
        addrlen = 4;
    else if (inet_pton(AF_INET6, host, addr) == 1)
        addrlen = 16;
    if (addrlen > 0) {
        ASN1_OCTET_STRING *ip = ASN1_OCTET_STRING_new();
        if (ip == NULL || !ASN1_OCTET_STRING_set(ip, addr, addrlen)) {
            ASN1_OCTET_STRING_free(ip);
            goto fail;
        }
        GENERAL_NAME_set0_value(gen, GEN_IPADD, ip);
    } else {
        ASN1_IA5STRING *dns = ASN1_IA5STRING_new();
        if (dns == NULL || !ASN1_STRING_set(dns, host, -1)) {
            ASN1_IA5STRING_free(dns);
            goto fail;
        }
        GENERAL_NAME_set0_value(gen, GEN_DNS, dns);
    }
    for (int i = 0; i < sk_GENERAL_NAME_num(gens); i++) {
        if (GENERAL_NAME_cmp(sk_GENERAL_NAME_value(gens, i), gen) == 0) {
            GENERAL_NAME_free(gen);
            return 0;
        }
    }
    if (sk_GENERAL_NAME_push(gens, gen) <= 0)
        goto fail;
    return 0;
fail:
    GENERAL_NAME_free(gen);
    return -1;
}

static int add_san(X509 *cert, const struct opts *o)
{
    GENERAL_NAMES *gens = GENERAL_NAMES_new();
    int ok = gens != NULL && append_san(gens, "localhost") == 0 &&
             append_san(gens, "127.0.0.1") == 0;

    for (size_t i = 0; ok && i < o->nhosts; i++)
        ok = append_san(gens, o->hosts[i]) == 0;
    ok = ok && X509_add1_ext_i2d(cert, NID_subject_alt_name, gens, 0, X509V3_ADD_DEFAULT) == 1;
    GENERAL_NAMES_free(gens);
    if (!ok)
        report_ssl("cannot add the subjectAltName extension");
    return ok ? 0 : -1;
}

/* SHA-256, except for EdDSA keys (possible in a CA brought with --ca-cert), which sign
 * without a separate digest. */
static const EVP_MD *sign_digest(const EVP_PKEY *key)
{
    int id = EVP_PKEY_get_base_id(key);

    return id == EVP_PKEY_ED25519 || id == EVP_PKEY_ED448 ? NULL : EVP_sha256();
}

/* The authorityKeyIdentifier value for something issued by issuer: it comes from the
 * issuer's subjectKeyIdentifier; a CA brought with --ca-cert may lack one, and then issuer
 * name + serial identify it instead. */
static const char *akid_value(X509 *issuer)
{
    return issuer == NULL || X509_get_ext_by_NID(issuer, NID_subject_key_identifier, -1) >= 0
           ? "keyid:always" : "issuer:always";
}

static int add_extensions(X509 *cert, enum role role, X509 *issuer, const struct opts *o)
{
    static const char *const eku[] = {
        [ROLE_SERVER] = "serverAuth",
        [ROLE_CLIENT] = "clientAuth",
        [ROLE_PEER] = "serverAuth,clientAuth",
    };
    X509V3_CTX ctx;
    const char *akid = akid_value(issuer);

    /* A self-signed certificate is its own issuer; the subjectKeyIdentifier must be added
     * before the authorityKeyIdentifier, which is derived from it. */
    X509V3_set_ctx(&ctx, issuer != NULL ? issuer : cert, cert, NULL, NULL, 0);
    if (role == ROLE_CA) {
        if (add_ext(cert, &ctx, NID_basic_constraints, "critical,CA:TRUE") != 0 ||
            add_ext(cert, &ctx, NID_key_usage, "critical,keyCertSign,cRLSign") != 0)
            return -1;
    } else {
        /* TLS 1.3 with ECDHE only ever signs with the leaf key. */
        if (add_ext(cert, &ctx, NID_basic_constraints, "critical,CA:FALSE") != 0 ||
            add_ext(cert, &ctx, NID_key_usage, "critical,digitalSignature") != 0 ||
            add_ext(cert, &ctx, NID_ext_key_usage, eku[role]) != 0)
            return -1;
        if (role != ROLE_CLIENT && add_san(cert, o) != 0)
            return -1;
    }
    if (add_ext(cert, &ctx, NID_subject_key_identifier, "hash") != 0 ||
        add_ext(cert, &ctx, NID_authority_key_identifier, akid) != 0)
        return -1;
    return 0;
}

/* Builds and signs a certificate for key. issuer == NULL makes it self-signed (the CA). */
static X509 *build_cert(EVP_PKEY *key, const char *cn, enum role role, X509 *issuer,
                        EVP_PKEY *issuer_key, const struct opts *o)
{
    X509 *cert = X509_new();
    EVP_PKEY *sign_key = issuer != NULL ? issuer_key : key;
    const EVP_MD *md = sign_digest(sign_key);

    if (cert == NULL || !X509_set_version(cert, X509_VERSION_3)) {
        report_ssl("cannot create a certificate");
        goto fail;
    }
    if (set_random_serial(cert) != 0 || set_validity(cert, role, o) != 0)
        goto fail;
    if (!X509_NAME_add_entry_by_txt(X509_get_subject_name(cert), "CN", MBSTRING_UTF8,
                                    (const unsigned char *)cn, -1, -1, 0)) {
        report_ssl("cannot set the certificate subject");
        goto fail;
    }
    if (!X509_set_issuer_name(cert, X509_get_subject_name(issuer != NULL ? issuer : cert)) ||
        !X509_set_pubkey(cert, key)) {
        report_ssl("cannot set the certificate issuer or key");
        goto fail;
    }
    if (add_extensions(cert, role, issuer, o) != 0)
        goto fail;
    if (X509_sign(cert, sign_key, md) <= 0) {
        report_ssl("cannot sign the certificate");
        goto fail;
    }
    return cert;
fail:
    X509_free(cert);
    return NULL;
}

/* Generates a key and certificate and writes base.key then base.pem, so a certificate is
 * never on disk without its key. On success the caller may keep them via cert_out and
 * key_out (the CA does); otherwise they are freed here. */
static int issue(struct outdir *od, const struct opts *o, const char *base, const char *cn,
                 enum role role, X509 *issuer, EVP_PKEY *issuer_key, X509 **cert_out,
                 EVP_PKEY **key_out)
{
    EVP_PKEY *key = make_key();
    X509 *cert = NULL;
    int rc = -1;

    if (key == NULL)
        goto out;
    cert = build_cert(key, cn, role, issuer, issuer_key, o);
    if (cert == NULL || write_key(od, base, key) != 0 || write_cert(od, base, cert) != 0)
        goto out;
    if (cert_out != NULL) {
        *cert_out = cert;
        cert = NULL;
    }
    if (key_out != NULL) {
        *key_out = key;
        key = NULL;
    }
    rc = 0;
out:
    X509_free(cert);
    EVP_PKEY_free(key);
    return rc;
}

static int make_ca(struct outdir *od, const struct opts *o, X509 **cert, EVP_PKEY **key)
{
    unsigned char rnd[8];
    char cn[64];
    int n;

    /* The random part keeps CAs from separate runs apart in logs and trust stores. */
    if (RAND_bytes(rnd, sizeof rnd) != 1) {
        report_ssl("cannot get random bytes");
        return -1;
    }
    n = snprintf(cn, sizeof cn, "cohort CA ");
    for (size_t i = 0; i < sizeof rnd; i++)
        n += snprintf(cn + n, sizeof cn - (size_t)n, "%02x", rnd[i]);
    return issue(od, o, "ca", cn, ROLE_CA, NULL, NULL, cert, key);
}

/* Refuses to run a CA key through an interactive passphrase prompt: a CLI that may run in
 * scripts and tests must not block on a terminal. */
static int refuse_password(char *buf, int size, int rwflag, void *u)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)u;
    return -1;
}

static int load_ca(const struct opts *o, X509 **cert_out, EVP_PKEY **key_out)
{
    X509 *cert = NULL;
    EVP_PKEY *key = NULL;
    BIO *bio = NULL;
    char what[512];
    int rc = -1;
    time_t until;

    snprintf(what, sizeof what, "cannot read CA certificate %s", o->ca_cert);
    bio = BIO_new_file(o->ca_cert, "r");
    if (bio == NULL || (cert = PEM_read_bio_X509(bio, NULL, NULL, NULL)) == NULL) {
        report_ssl(what);
        goto out;
    }
    BIO_free(bio);
    snprintf(what, sizeof what, "cannot read CA key %s (it must be an unencrypted PEM key)",
             o->ca_key);
    bio = BIO_new_file(o->ca_key, "r");
    if (bio == NULL || (key = PEM_read_bio_PrivateKey(bio, NULL, refuse_password, NULL)) == NULL) {
        report_ssl(what);
        goto out;
    }
    if (X509_check_ca(cert) == 0) {
        report("%s is not a CA certificate (no CA:TRUE or no keyCertSign)", o->ca_cert);
        goto out;
    }
    if (X509_check_private_key(cert, key) != 1) {
        ERR_clear_error();
        report("CA key %s does not belong to CA certificate %s", o->ca_key, o->ca_cert);
        goto out;
    }
    if (X509_cmp_current_time(X509_get0_notAfter(cert)) <= 0) {
        report("CA certificate %s has expired", o->ca_cert);
        goto out;
    }
    /* A CRL is signed with the CA key, so a CA that may not sign CRLs makes one that every
     * verifier rejects. X509_get_key_usage() allows everything without a keyUsage. */
    if (o->crl != NULL && (X509_get_key_usage(cert) & KU_CRL_SIGN) == 0) {
        report("CA certificate %s may not sign CRLs (its keyUsage lacks cRLSign)", o->ca_cert);
        goto out;
    }
    /* Not fatal: the CA may be about to be rotated anyway, but the leaf certificates will
     * stop verifying when the CA expires, whatever their own dates say. (A CRL outliving
     * its CA does no harm, and with --crl no server certificate is issued.) */
    until = time(NULL) + (time_t)o->days * DAY_SECS;
    if (!o->expired && (o->crl == NULL || o->clients > 0 || o->peers > 0) &&
        X509_cmp_time(X509_get0_notAfter(cert), &until) < 0)
        fprintf(stderr, "cohort certs: warning: CA certificate %s expires before the new "
                "certificates do (--days %lu)\n", o->ca_cert, o->days);
    *cert_out = cert;
    *key_out = key;
    cert = NULL;
    key = NULL;
    rc = 0;
out:
    BIO_free(bio);
    X509_free(cert);
    EVP_PKEY_free(key);
    return rc;
}

/* Reads the --revoke certificates into *out. Each must have been issued by the CA: its
 * issuer name must be the CA's subject and its signature must verify with the CA key, so
 * a CRL never lists a serial of another CA's certificate (which could match an unrelated
 * certificate of this CA). The same serial given twice is listed once. */
static int load_revoked(const struct opts *o, X509 *ca, EVP_PKEY *ca_key, STACK_OF(X509) **out)
{
    STACK_OF(X509) *certs = sk_X509_new_null();
    X509 *cert = NULL;
    BIO *bio = NULL;
    int rc = -1;

    if (certs == NULL) {
        report("out of memory");
        goto out;
    }
    for (size_t i = 0; i < o->nrevoke; i++) {
        const char *path = o->revoke[i];
        bool dup = false;

        bio = BIO_new_file(path, "r");
        if (bio == NULL || (cert = PEM_read_bio_X509(bio, NULL, NULL, NULL)) == NULL) {
            char what[512];
            snprintf(what, sizeof what, "cannot read certificate %s to revoke", path);
            report_ssl(what);
            goto out;
        }
        BIO_free(bio);
        bio = NULL;
        if (X509_cmp(cert, ca) == 0) {
            report("cannot revoke %s: it is the CA certificate %s itself", path, o->ca_cert);
            goto out;
        }
        if (X509_NAME_cmp(X509_get_issuer_name(cert), X509_get_subject_name(ca)) != 0) {
            char issuer[256];
            X509_NAME_oneline(X509_get_issuer_name(cert), issuer, sizeof issuer);
            report("cannot revoke %s: it was issued by %s, not by CA %s", path, issuer,
                   o->ca_cert);
            goto out;
        }
        if (X509_verify(cert, ca_key) != 1) {
            ERR_clear_error();
            report("cannot revoke %s: its signature does not verify with CA key %s (it was "
                   "issued by another CA of the same name)", path, o->ca_key);
            goto out;
        }
        for (int j = 0; j < sk_X509_num(certs) && !dup; j++)
            dup = ASN1_INTEGER_cmp(X509_get0_serialNumber(sk_X509_value(certs, j)),
                                   X509_get0_serialNumber(cert)) == 0;
        if (dup) {
            X509_free(cert);
        } else if (sk_X509_push(certs, cert) <= 0) {
            report("out of memory");
            goto out;
        }
        cert = NULL;
    }
    *out = certs;
    certs = NULL;
    rc = 0;
out:
    BIO_free(bio);
    X509_free(cert);
    sk_X509_pop_free(certs, X509_free);
    return rc;
}

/* A v2 CRL from ca listing the serials of revoked, valid from a little before now (as
 * certificates are) until now + --days. */
static X509_CRL *build_crl(X509 *ca, EVP_PKEY *ca_key, STACK_OF(X509) *revoked,
                           const struct opts *o)
{
    X509_CRL *crl = X509_CRL_new();
    ASN1_TIME *last = X509_gmtime_adj(NULL, -BACKDATE_SECS);
    ASN1_TIME *next = X509_time_adj_ex(NULL, (int)o->days, 0, NULL);
    ASN1_TIME *now = X509_gmtime_adj(NULL, 0);
    ASN1_INTEGER *number = ASN1_INTEGER_new();
    X509_EXTENSION *akid = NULL;
    X509V3_CTX ctx;
    struct timespec ts;
    bool ok = false;

    if (crl == NULL || last == NULL || next == NULL || now == NULL || number == NULL ||
        !X509_CRL_set_version(crl, X509_CRL_VERSION_2) ||
        !X509_CRL_set_issuer_name(crl, X509_get_subject_name(ca)) ||
        !X509_CRL_set1_lastUpdate(crl, last) || !X509_CRL_set1_nextUpdate(crl, next)) {
        report_ssl("cannot create a CRL");
        goto out;
    }
    for (int i = 0; i < sk_X509_num(revoked); i++) {
        X509_REVOKED *rev = X509_REVOKED_new();
        if (rev == NULL ||
            !X509_REVOKED_set_serialNumber(rev, X509_get_serialNumber(sk_X509_value(revoked, i))) ||
            !X509_REVOKED_set_revocationDate(rev, now) || !X509_CRL_add0_revoked(crl, rev)) {
            X509_REVOKED_free(rev);
            report_ssl("cannot add a revoked certificate to the CRL");
            goto out;
        }
    }
    /* RFC 5280 wants CRL numbers to increase with each CRL a CA issues; without a database
     * the time in microseconds does that for CRLs made on one host with a sane clock. */
    clock_gettime(CLOCK_REALTIME, &ts);
    if (!ASN1_INTEGER_set_uint64(number, (uint64_t)ts.tv_sec * 1000000u +
                                         (uint64_t)ts.tv_nsec / 1000u) ||
        X509_CRL_add1_ext_i2d(crl, NID_crl_number, number, 0, 0) != 1) {
        report_ssl("cannot add the CRL number extension");
        goto out;
    }
    X509V3_set_ctx(&ctx, ca, NULL, NULL, crl, 0);
    akid = X509V3_EXT_nconf_nid(NULL, &ctx, NID_authority_key_identifier, akid_value(ca));
    if (akid == NULL || !X509_CRL_add_ext(crl, akid, -1)) {
        report_ssl("cannot add the authorityKeyIdentifier extension to the CRL");
        goto out;
    }
    if (!X509_CRL_sort(crl) || X509_CRL_sign(crl, ca_key, sign_digest(ca_key)) <= 0) {
        report_ssl("cannot sign the CRL");
        goto out;
    }
    ok = true;
out:
    X509_EXTENSION_free(akid);
    ASN1_INTEGER_free(number);
    ASN1_TIME_free(now);
    ASN1_TIME_free(next);
    ASN1_TIME_free(last);
    if (!ok) {
        X509_CRL_free(crl);
        crl = NULL;
    }
    return crl;
}

static int write_crl(struct outdir *od, const char *name, X509_CRL *crl)
{
    BIO *bio = BIO_new(BIO_s_mem());
    int rc = -1;

    if (bio == NULL || !PEM_write_bio_X509_CRL(bio, crl))
        report_ssl("cannot encode the CRL");
    else
        rc = write_file(od, name, bio, 0644);
    BIO_free(bio);
    return rc;
}

/* Whether s[0..len) is prefix followed by a number 1..count without leading zeros. */
static bool is_numbered(const char *s, size_t len, const char *prefix, unsigned long count)
{
    size_t plen = strlen(prefix);
    unsigned long v = 0;

    if (len <= plen || strncmp(s, prefix, plen) != 0 || s[plen] == '0')
        return false;
    for (size_t i = plen; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (unsigned long)(s[i] - '0');
        if (v > count)
            return false;
    }
    return v >= 1;
}

static bool same_file(const struct stat *a, const struct stat *b)
{
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino;
}

/* Works out where --crl goes: DIR (od) for a bare name, otherwise the directory part of
 * the path as given, which must exist. Refuses a target that would replace one of the
 * run's inputs (the CA, a certificate to revoke) or a key or certificate it issues. */
static int prepare_crl_target(const struct opts *o, struct outdir *od, struct outdir *crl_od,
                              struct outdir **dir_out, const char **name_out, char **path_out)
{
    const char *slash = strrchr(o->crl, '/');
    const char *name = slash != NULL ? slash + 1 : o->crl;
    struct outdir *dir = od;
    struct stat dst, st;
    size_t len = strlen(name);

    if (slash != NULL) {
        size_t dlen = slash == o->crl ? 1 : (size_t)(slash - o->crl);
        crl_od->path = strndup(o->crl, dlen);
        if (crl_od->path == NULL) {
            report("out of memory");
            return -1;
        }
        while (dlen > 1 && crl_od->path[dlen - 1] == '/')
            crl_od->path[--dlen] = '\0';
        dir = crl_od;
    }
    *path_out = join_path(dir->path, "", name, "");
    if (*path_out == NULL)
        return -1;
    if (stat(dir->path, &dst) != 0) {
        report("cannot write the CRL into %s: %s", dir->path, strerror(errno));
        return -1;
    }
    if (!S_ISDIR(dst.st_mode)) {
        report("cannot write the CRL into %s: not a directory", dir->path);
        return -1;
    }
    if (stat(*path_out, &st) == 0) {
        struct stat ist;
        if (S_ISDIR(st.st_mode)) {
            report("cannot write the CRL to %s: it is a directory", *path_out);
            return -1;
        }
        for (size_t i = 0; i < o->nrevoke + 2; i++) {
            const char *input = i == 0 ? o->ca_cert : i == 1 ? o->ca_key : o->revoke[i - 2];
            if (stat(input, &ist) == 0 && same_file(&st, &ist)) {
                report("refusing to write the CRL to %s: that is %s, an input of this run",
                       *path_out, input);
                return -1;
            }
        }
    }
    if (dir != od && stat(od->path, &st) == 0 && same_file(&st, &dst))
        dir = od;
    if (dir == od && len > 4 &&
        (strcmp(name + len - 4, ".pem") == 0 || strcmp(name + len - 4, ".key") == 0) &&
        (is_numbered(name, len - 4, o->prefix != NULL ? o->prefix : "client-", o->clients) ||
         is_numbered(name, len - 4, "peer-", o->peers))) {
        report("refusing to write the CRL to %s: this run writes a certificate or key there",
               *path_out);
        return -1;
    }
    *dir_out = slash != NULL ? crl_od : od;
    *name_out = name;
    return 0;
}

int certs_main(int argc, char **argv)
{
    struct opts o = { .days = DEFAULT_DAYS };
    struct outdir od = { 0 };
    struct outdir crl_od = { 0 };   /* used when --crl names a path with a '/' */
    struct outdir *crl_dir = &od;
    const char *crl_name = NULL;
    char *crl_path = NULL;
    STACK_OF(X509) *revoked = NULL;
    X509_CRL *crl = NULL;
    X509 *ca = NULL;
    EVP_PKEY *ca_key = NULL;
    char base[MAX_PREFIX + 32];
    bool server;
    int rc = 1;

    o.hosts = calloc(argc > 0 ? (size_t)argc : 1, sizeof *o.hosts);
    o.revoke = calloc(argc > 0 ? (size_t)argc : 1, sizeof *o.revoke);
    if (o.hosts == NULL || o.revoke == NULL) {
        report("out of memory");
        free(o.hosts);
        free(o.revoke);
        return 1;
    }
    int prc = parse_args(argc, argv, &o);
    if (prc != 0) {
        free(o.hosts);
        free(o.revoke);
        return prc == PARSE_HELP ? 0 : 2;
    }
    /* Errors queued earlier by the caller would otherwise be reported as ours. */
    ERR_clear_error();

    /* A CA that cannot be used should fail the run before DIR is created. */
    if (o.ca_cert != NULL && load_ca(&o, &ca, &ca_key) != 0)
        goto out;
    if (o.crl != NULL && load_revoked(&o, ca, ca_key, &revoked) != 0)
        goto out;
    if (prepare_outdir(&od, o.out) != 0)
        goto out;
    if (o.crl != NULL &&
        prepare_crl_target(&o, &od, &crl_od, &crl_dir, &crl_name, &crl_path) != 0)
        goto out;
    if (o.ca_cert == NULL && make_ca(&od, &o, &ca, &ca_key) != 0)
        goto out;
    /* Adding clients or peers to an existing CA, or making a CRL, must not replace the
     * server certificate that is already deployed. */
    server = !(o.ca_cert != NULL && (o.clients_set || o.peers_set || o.crl != NULL));
    if (server && issue(&od, &o, "server", "cohortd", ROLE_SERVER, ca, ca_key, NULL, NULL) != 0)
        goto out;
    for (unsigned long i = 1; i <= o.clients; i++) {
        if (o.prefix != NULL)
            snprintf(base, sizeof base, "%s%lu", o.prefix, i);
        else
            snprintf(base, sizeof base, "client-%lu", i);
        if (issue(&od, &o, base, base, ROLE_CLIENT, ca, ca_key, NULL, NULL) != 0)
            goto out;
    }
    for (unsigned long i = 1; i <= o.peers; i++) {
        snprintf(base, sizeof base, "peer-%lu", i);
        if (issue(&od, &o, base, base, ROLE_PEER, ca, ca_key, NULL, NULL) != 0)
            goto out;
    }
    if (o.crl != NULL) {
        crl = build_crl(ca, ca_key, revoked, &o);
        if (crl == NULL || write_crl(crl_dir, crl_name, crl) != 0)
            goto out;
    }
    if (sync_dir(&od) != 0 || (crl_dir != &od && sync_dir(crl_dir) != 0))
        goto out;
    printf("done: %lu files in %s (CA: %s, server: %s, clients: %lu, peers: %lu",
           od.nwritten + crl_od.nwritten, od.path, o.ca_cert != NULL ? o.ca_cert : "new",
           server ? "yes" : "no", o.clients, o.peers);
    if (o.crl != NULL)
        printf(", CRL: %s revoking %d", crl_path, sk_X509_num(revoked));
    printf("%s)\n", o.expired ? ", leaf certificates already expired" : "");
    if (fflush(stdout) != 0) {
        report("cannot write to standard output: %s", strerror(errno));
        goto out;
    }
    rc = 0;
out:
    X509_CRL_free(crl);
    sk_X509_pop_free(revoked, X509_free);
    X509_free(ca);
    EVP_PKEY_free(ca_key);
    free(crl_path);
    free(crl_od.path);
    free(od.path);
    free(o.revoke);
    free(o.hosts);
    return rc;
}

int certs_main_quiet(int argc, char **argv)
{
    /* Flushed first so that output the caller already buffered is not lost to /dev/null. */
    fflush(stdout);
    int saved = dup(1);
    FILE *null = fopen("/dev/null", "w");
    if (null)
        dup2(fileno(null), 1);
    int rc = certs_main(argc, argv);
    fflush(stdout);
    if (saved >= 0) {
        dup2(saved, 1);
        close(saved);
    }
    if (null)
        fclose(null);
    return rc;
}
