/* cohort_strerror() and cohort_err_name(), generated from COHORT_ERR_MAP. Any thread. */
#include "cohort_err.h"

#include <string.h>

const char *cohort_strerror(int err)
{
    if (err == 0)
        return "success";
    switch (err) {
#define XX(name, val, msg) \
    case (val):            \
        return msg;
        COHORT_ERR_MAP(XX)
#undef XX
    default:
        break;
    }
    if (err < 0 && err > -4000)
        return strerror(-err); /* any other errno value, e.g. from libuv */
    return "unknown error";
}

const char *cohort_err_name(int err)
{
    if (err == 0)
        return "COHORT_OK";
    switch (err) {
#define XX(name, val, msg) \
    case (val):            \
        return "COHORT_" #name;
        COHORT_ERR_MAP(XX)
#undef XX
    default:
        return "COHORT_EUNKNOWN";
    }
}
