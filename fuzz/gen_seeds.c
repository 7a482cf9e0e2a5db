/*
 * Writes the seed corpora for the fuzz targets into OUTDIR/<target>/ at build
 * time (test data is generated, not committed): valid frames, one envelope of
 * every message type, and valid safetensors files of a few shapes.
 * usage: gen_seeds OUTDIR
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "frame.h"
#include "safetensors.h"
#include "wire.h"

static const char *outdir;

static void put(const char *target, const char *name, const uint8_t *data, size_t len)
{
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", outdir, target);
    mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/%s/%s", outdir, target, name);
    FILE *f = fopen(p, "wb");
    if (!f || fwrite(data, 1, len, f) != len) {
        perror(p);
        exit(1);
    }
    fclose(f);
}

static void put_env(const char *name, Cohort__Envelope *e)
{
    uint8_t *f;
    size_t n;
    if (coh_wire_encode(e, &f, &n) < 0)
        exit(1);
    put("envelope", name, f + COH_FRAME_HDR, n - COH_FRAME_HDR);
    /* The frame target gets the same message framed, split 7 bytes at a time. */
    uint8_t *g = malloc(n + 1);
    g[0] = 6;
    memcpy(g + 1, f, n);
    put("frame", name, g, n + 1);
    free(g);
    free(f);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: gen_seeds OUTDIR\n");
        return 2;
    }
    outdir = argv[1];
    mkdir(outdir, 0755);

    Cohort__Envelope e = COHORT__ENVELOPE__INIT;
    Cohort__Hello h = COHORT__HELLO__INIT;
    h.protocol_version = 1;
    h.software = "seed";
    h.num_examples = 600;
    e.body_case = COHORT__ENVELOPE__BODY_HELLO;
    e.hello = &h;
    put_env("hello", &e);

    uint64_t s1[2] = {4, 3}, s2[1] = {4};
    Cohort__TensorInfo t1 = COHORT__TENSOR_INFO__INIT, t2 = COHORT__TENSOR_INFO__INIT;
    t1.name = "fc.weight";
    t1.n_shape = 2;
    t1.shape = s1;
    t2.name = "fc.bias";
    t2.n_shape = 1;
    t2.shape = s2;
    Cohort__TensorInfo *ts[2] = {&t1, &t2};
    Cohort__UpdateBegin b = COHORT__UPDATE_BEGIN__INIT;
    b.round = 3;
    b.num_examples = 100;
    b.n_tensors = 2;
    b.tensors = ts;
    b.total_bytes = 64;
    e.body_case = COHORT__ENVELOPE__BODY_UPDATE_BEGIN;
    e.update_begin = &b;
    put_env("update_begin", &e);

    Cohort__RoundOffer o = COHORT__ROUND_OFFER__INIT;
    uint8_t sha[32] = {1, 2, 3};
    o.round = 3;
    o.n_tensors = 2;
    o.tensors = ts;
    o.total_bytes = 64;
    o.chunk_count = 1;
    o.model_sha256.data = sha;
    o.model_sha256.len = 32;
    o.deadline_s = 60;
    e.body_case = COHORT__ENVELOPE__BODY_ROUND_OFFER;
    e.round_offer = &o;
    put_env("round_offer", &e);

    Cohort__UpdateEnd ue = COHORT__UPDATE_END__INIT;
    ue.round = 3;
    ue.sha256.data = sha;
    ue.sha256.len = 32;
    ue.train_loss = 0.5;
    e.body_case = COHORT__ENVELOPE__BODY_UPDATE_END;
    e.update_end = &ue;
    put_env("update_end", &e);

    Cohort__Decline d = COHORT__DECLINE__INIT;
    d.round = 3;
    d.reason = "inactive";
    e.body_case = COHORT__ENVELOPE__BODY_DECLINE;
    e.decline = &d;
    put_env("decline", &e);

    Cohort__Error er = COHORT__ERROR__INIT;
    er.code = -4001;
    er.message = "bad";
    er.fatal = 1;
    e.body_case = COHORT__ENVELOPE__BODY_ERROR;
    e.error = &er;
    put_env("error", &e);

    Cohort__Heartbeat hb = COHORT__HEARTBEAT__INIT;
    hb.seq = 7;
    e.body_case = COHORT__ENVELOPE__BODY_HEARTBEAT;
    e.heartbeat = &hb;
    put_env("heartbeat", &e);

    Cohort__RunEnd re = COHORT__RUN_END__INIT;
    re.reason = "done";
    re.done = 1;
    e.body_case = COHORT__ENVELOPE__BODY_RUN_END;
    e.run_end = &re;
    put_env("run_end", &e);

    float vals[16];
    for (int i = 0; i < 16; i++)
        vals[i] = (float)i * 0.25f - 1.0f;
    uint8_t chunk[256];
    size_t n = coh_wire_write_chunk(chunk, COH_CHUNK_UPDATE, 3, 0, 0, vals, sizeof vals, NULL);
    put("envelope", "update_chunk", chunk + 4, n - 4);
    n = coh_wire_write_chunk(chunk, COH_CHUNK_MODEL, 3, 1, 32, vals, 32, NULL);
    put("envelope", "model_chunk", chunk + 4, n - 4);
    uint8_t framed[300];
    framed[0] = 0;
    memcpy(framed + 1, chunk, n);
    put("frame", "model_chunk", framed, n + 1);

    struct coh_model m;
    coh_model_init(&m);
    coh_model_add(&m, "fc.weight", 2, s1);
    coh_model_add(&m, "fc.bias", 1, s2);
    coh_model_alloc(&m);
    memcpy(m.data, vals, sizeof vals);
    uint8_t *buf;
    size_t len;
    coh_st_serialize(&m, &buf, &len);
    put("safetensors", "softmax_small", buf, len);
    free(buf);
    coh_model_fini(&m);
    coh_model_init(&m);
    uint64_t s3[3] = {2, 2, 2}, s0[1] = {0};
    coh_model_add(&m, "conv.weight", 3, s3);
    coh_model_add(&m, "scalar", 0, NULL);
    coh_model_add(&m, "empty", 1, s0);
    coh_model_alloc(&m);
    coh_st_serialize(&m, &buf, &len);
    put("safetensors", "three_shapes", buf, len);
    free(buf);
    coh_model_fini(&m);
    const char *meta = "{\"__metadata__\":{\"format\":\"pt\"},"
                       "\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
    uint8_t img[256];
    size_t hl = strlen(meta);
    memset(img, 0, sizeof img);
    img[0] = (uint8_t)hl;
    memcpy(img + 8, meta, hl);
    put("safetensors", "with_metadata", img, 8 + hl + 8);
    return 0;
}
