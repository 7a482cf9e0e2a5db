/*
 * Config file reader (common/conf.c over libinih): arbitrary text must never
 * crash, every item handed to the callback must be well formed, and the error
 * buffer must stay NUL-terminated within its size.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"

static int on_item(void *user, const struct coh_conf_item *it, char *err, size_t errlen)
{
    if (!it->file || it->line < 1 || !it->section)
        abort();
    if (it->kind != COH_CONF_SECTION && (!it->key || !it->value || !it->key[0]))
        abort();
    /* Refuse some keys, as a real option table would. */
    if (it->key && it->key[0] == 'x') {
        strncpy(err, "refused", errlen);
        return -1;
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    char errs[512];
    memset(errs, 'Z', sizeof errs);
    int rc = coh_conf_parse_string("fuzz.conf", text, on_item, NULL, errs, sizeof errs);
    if (rc < 0 && rc != -12)
        abort();
    if (!memchr(errs, '\0', sizeof errs))
        abort();
    free(text);
    return 0;
}
