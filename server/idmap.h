/*
 * uint64 -> pointer hash map (open addressing, linear probing, backward-shift
 * deletion). Connections and clients are looked up by id, never kept as raw
 * pointers across async boundaries (STYLE.md 6.3). Loop thread only.
 */
#ifndef IDMAP_H
#define IDMAP_H

#include <stddef.h>
#include <stdint.h>

struct idmap_slot {
    uint64_t key;               /* 0 = empty; keys must be nonzero */
    void *val;
};

struct idmap {
    struct idmap_slot *slots;
    size_t cap, count;
};

void idmap_init(struct idmap *m);
void idmap_fini(struct idmap *m);
int idmap_put(struct idmap *m, uint64_t key, void *val);
void *idmap_get(const struct idmap *m, uint64_t key);
void *idmap_del(struct idmap *m, uint64_t key);

#endif
