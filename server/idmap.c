/* uint64 -> pointer map; see idmap.h. */
#include "idmap.h"

#include <stdlib.h>

#include "cohort_err.h"

static size_t slot_of(uint64_t key, size_t cap)
{
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdull;
    key ^= key >> 33;
    return (size_t)key & (cap - 1);
}

void idmap_init(struct idmap *m)
{
    m->slots = NULL;
    m->cap = m->count = 0;
}

void idmap_fini(struct idmap *m)
{
    free(m->slots);
    idmap_init(m);
}

static int grow(struct idmap *m)
{
    size_t ncap = m->cap ? m->cap * 2 : 64;
    struct idmap_slot *ns = calloc(ncap, sizeof *ns);
    if (!ns)
        return COHORT_ENOMEM;
    for (size_t i = 0; i < m->cap; i++) {
        if (!m->slots[i].key)
            continue;
        size_t j = slot_of(m->slots[i].key, ncap);
        while (ns[j].key)
            j = (j + 1) & (ncap - 1);
        ns[j] = m->slots[i];
    }
    free(m->slots);
    m->slots = ns;
    m->cap = ncap;
    return 0;
}

int idmap_put(struct idmap *m, uint64_t key, void *val)
{
    if (key == 0)
        return COHORT_EINVAL;
    if ((m->count + 1) * 4 > m->cap * 3) {
        int rc = grow(m);
        if (rc < 0)
            return rc;
    }
    size_t j = slot_of(key, m->cap);
    while (m->slots[j].key && m->slots[j].key != key)
        j = (j + 1) & (m->cap - 1);
    if (!m->slots[j].key)
        m->count++;
    m->slots[j].key = key;
    m->slots[j].val = val;
    return 0;
}

void *idmap_get(const struct idmap *m, uint64_t key)
{
    if (!m->cap || key == 0)
        return NULL;
    size_t j = slot_of(key, m->cap);
    while (m->slots[j].key) {
        if (m->slots[j].key == key)
            return m->slots[j].val;
        j = (j + 1) & (m->cap - 1);
    }
    return NULL;
}

void *idmap_del(struct idmap *m, uint64_t key)
{
    if (!m->cap || key == 0)
        return NULL;
    size_t j = slot_of(key, m->cap);
    while (m->slots[j].key && m->slots[j].key != key)
        j = (j + 1) & (m->cap - 1);
    if (!m->slots[j].key)
        return NULL;
    void *val = m->slots[j].val;
    m->slots[j].key = 0;
    m->count--;
    /* Backward-shift so probe chains stay unbroken without tombstones. */
    size_t i = j;
    for (;;) {
        i = (i + 1) & (m->cap - 1);
        if (!m->slots[i].key)
            break;
        size_t home = slot_of(m->slots[i].key, m->cap);
        if ((i > j && (home <= j || home > i)) || (i < j && (home <= j && home > i))) {
            m->slots[j] = m->slots[i];
            m->slots[i].key = 0;
            j = i;
        }
    }
    return val;
}
