/* Variance correction; see varcorr.h. */
#include "varcorr.h"

#include <math.h>

void coh_vc_moments(const float *x, const float *delta, size_t n, double *mean, double *var)
{
    if (n == 0) {
        *mean = 0;
        *var = 0;
        return;
    }
    /* Shifting by the first value keeps sum-of-squares free of cancellation
     * when the mean is large next to the spread. */
    double k = (double)x[0] + (delta ? (double)delta[0] : 0.0);
    double s = 0, ss = 0;
    if (delta) {
        for (size_t i = 0; i < n; i++) {
            double v = (double)x[i] + (double)delta[i] - k;
            s += v;
            ss += v * v;
        }
    } else {
        for (size_t i = 0; i < n; i++) {
            double v = (double)x[i] - k;
            s += v;
            ss += v * v;
        }
    }
    double m = s / (double)n;
    double v = ss / (double)n - m * m;
    *mean = m + k;
    *var = v > 0 ? v : 0;
}

void coh_vc_rescale(float *w, size_t n, double target, double eps)
{
    double mu, s2;
    coh_vc_moments(w, NULL, n, &mu, &s2);
    double f = sqrt((target + eps) / (s2 + eps));
    for (size_t i = 0; i < n; i++)
        w[i] = (float)(mu + ((double)w[i] - mu) * f);
}

int coh_vc_eligible(const struct coh_tensor *t, int include_1d)
{
    return t->ndim >= 2 || (include_1d && t->numel > 1);
}
