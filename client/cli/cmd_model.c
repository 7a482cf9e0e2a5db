/* `cohort init-model` and `cohort eval`. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../trainer/fmnist.h"
#include "../trainer/nn.h"
#include "cli.h"
#include "cohort_err.h"
#include "safetensors.h"

int init_model_main(int argc, char **argv)
{
    static const struct option opts[] = {{"arch", 1, 0, 'a'}, {"seed", 1, 0, 's'},
                                         {"out", 1, 0, 'o'}, {"help", 0, 0, 'h'}, {0, 0, 0, 0}};
    const char *arch = "mlp", *out = NULL;
    uint64_t seed = 1;
    int o;
    optind = 1;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'a': arch = optarg; break;
        case 's':
            if (cli_u64("init-model", "--seed", optarg, 0, UINT64_MAX, &seed) < 0)
                return 2;
            break;
        case 'o': out = optarg; break;
        case 'h':
            printf("usage: cohort init-model --arch softmax|mlp[:HIDDEN] --seed S --out FILE\n"
                   "  softmax: fc.weight[10,784], fc.bias[10] (zeros)\n"
                   "  mlp: fc1.weight[H,784] fc1.bias[H] fc2.weight[10,H] fc2.bias[10],\n"
                   "       Kaiming-normal weights, zero biases, H = 128 by default\n");
            return 0;
        default: return 2;
        }
    }
    if (!out) {
        fprintf(stderr, "cohort init-model: --out FILE is required\n");
        return 2;
    }
    struct coh_model m;
    char err[512];
    if (nn_init_model(&m, arch, seed, err, sizeof err) < 0) {
        fprintf(stderr, "cohort init-model: %s\n", err);
        return 2;
    }
    int rc = coh_st_save(out, &m, 1, NULL);
    if (rc < 0) {
        fprintf(stderr, "cohort init-model: writing %s: %s\n", out, cohort_strerror(rc));
        coh_model_fini(&m);
        return 1;
    }
    char desc[512];
    coh_model_describe(&m, desc, sizeof desc);
    printf("wrote %s: %s, %zu parameters\n", out, desc, m.numel);
    coh_model_fini(&m);
    return 0;
}

int eval_main(int argc, char **argv)
{
    static const struct option opts[] = {{"model", 1, 0, 'm'}, {"data-dir", 1, 0, 'd'},
                                         {"help", 0, 0, 'h'}, {0, 0, 0, 0}};
    const char *path = NULL, *dir = FMNIST_DEFAULT_DIR;
    int o;
    optind = 1;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'm': path = optarg; break;
        case 'd': dir = optarg; break;
        case 'h':
            printf("usage: cohort eval --model FILE [--data-dir DIR]\n"
                   "prints accuracy=A loss=L on the Fashion-MNIST test set (A a fraction)\n");
            return 0;
        default: return 2;
        }
    }
    if (!path) {
        fprintf(stderr, "cohort eval: --model FILE is required\n");
        return 2;
    }
    char err[512];
    struct coh_model m;
    if (coh_st_load(path, NULL, &m, err, sizeof err) < 0) {
        fprintf(stderr, "cohort eval: %s\n", err);
        return 1;
    }
    struct fmnist test;
    if (fmnist_load(dir, 0, &test, err, sizeof err) < 0) {
        fprintf(stderr, "cohort eval: %s\n", err);
        coh_model_fini(&m);
        return 1;
    }
    double acc, loss;
    int rc = nn_eval(&m, &test, &acc, &loss, err, sizeof err);
    if (rc < 0)
        fprintf(stderr, "cohort eval: %s\n", err);
    else
        printf("accuracy=%.4f loss=%.4f\n", acc, loss);
    fmnist_free(&test);
    coh_model_fini(&m);
    return rc < 0 ? 1 : 0;
}
