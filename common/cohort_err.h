/*
 * cohort error codes: one X-macro generates the enum, cohort_strerror() and
 * cohort_err_name(). Installed beside cohort.h, so it carries no internal types.
 *
 * Every function that can fail returns 0 (or a documented count > 0) on success
 * and a negative code on failure. errno-backed codes are -errno, so libuv results
 * pass through unchanged on Linux; cohort's own codes live in -4000..-4099 which
 * cannot collide with errno values.
 */
#ifndef COHORT_ERR_H
#define COHORT_ERR_H

#include <errno.h>

#ifndef COHORT_API
#define COHORT_API __attribute__((visibility("default")))
#endif

#define COHORT_ERR_MAP(XX)                                                              \
    XX(ENOMEM, -ENOMEM, "out of memory")                                                \
    XX(EINVAL, -EINVAL, "invalid argument")                                             \
    XX(EIO, -EIO, "input/output error")                                                 \
    XX(ENOENT, -ENOENT, "no such file or directory")                                    \
    XX(ECONNREFUSED, -ECONNREFUSED, "connection refused")                               \
    XX(ECONNRESET, -ECONNRESET, "connection reset by peer")                             \
    XX(ETIMEDOUT, -ETIMEDOUT, "operation timed out")                                    \
    XX(EFRAME, -4001, "malformed frame or message")                                     \
    XX(EROUND, -4002, "update names a round that is not open")                          \
    XX(ENONFINITE, -4003, "update contains NaN or Inf")                                 \
    XX(ETOOBIG, -4004, "frame or model exceeds the configured limit")                   \
    XX(EVERSION, -4005, "incompatible protocol version")                                \
    XX(ETLS, -4006, "TLS failure")                                                      \
    XX(ECERT, -4007, "peer certificate refused")                                        \
    XX(ESHAPE, -4008, "tensor names, shapes or count do not match the model")           \
    XX(ECHECKSUM, -4009, "checksum mismatch")                                           \
    XX(EFORMAT, -4010, "malformed model file")                                          \
    XX(ESTORE, -4011, "participation store failure")                                    \
    XX(EDUP, -4012, "duplicate update for this round")                                  \
    XX(ESTATE, -4013, "message not allowed in this state")                              \
    XX(ECLOSED, -4014, "connection closed")                                             \
    XX(EREMOTE, -4015, "the peer reported an error")                                    \
    XX(ECANCELED, -4016, "operation canceled")                                          \
    XX(EDONE, -4017, "the federation run is over")                                      \
    XX(ECALLBACK, -4018, "the training callback failed")                                \
    XX(EOFFER, -4019, "this client was not offered the round")

enum cohort_err {
    COHORT_OK = 0,
#define COHORT_ERR_ENUM(name, val, msg) COHORT_##name = (val),
    COHORT_ERR_MAP(COHORT_ERR_ENUM)
#undef COHORT_ERR_ENUM
};

#ifdef __cplusplus
extern "C" {
#endif

/* Human-readable sentence for an error code. Never returns NULL. Any thread. */
COHORT_API const char *cohort_strerror(int err);
/* Symbolic name ("COHORT_EFRAME") for an error code. Never returns NULL. */
COHORT_API const char *cohort_err_name(int err);

#ifdef __cplusplus
}
#endif

#endif
