/*
 * map.h: a hash map from NUL-terminated strings to the structs that embed an mph_map_node_t
 * (intrusive: the map allocates only its bucket array, and a struct is found, inserted and
 * removed without any allocation of its own). The runner's scopes and the file backend's
 * scope files are kept in one each, so that a million scopes cost no linear search.
 *
 *   typedef struct { mph_map_node_t node; char *name; ... } thing_t;
 *   mph_map_node_t *n = mph_map_find(&map, "x");
 *   thing_t *t = n ? mph_container_of(n, thing_t, node) : NULL;
 */
#ifndef MPH_MAP_H
#define MPH_MAP_H

#include <stddef.h>
#include <stdint.h>

typedef struct mph_map_node_s {
    struct mph_map_node_s *next; /* in its bucket */
    uint64_t hash;
    const char *key; /* borrowed from the embedding struct, which outlives its membership */
} mph_map_node_t;

typedef struct {
    mph_map_node_t **buckets; /* owned; NULL until the first insert */
    size_t nbuckets;          /* a power of two */
    size_t count;
} mph_map_t;

#define MPH_MAP_INIT                                                                               \
    {                                                                                              \
        NULL, 0, 0                                                                                 \
    }

/* The node whose key is `key`, or NULL. */
mph_map_node_t *mph_map_find(const mph_map_t *map, const char *key);

/* Adds `node` under `key` (borrowed: it must stay valid while the node is in the map). The
 * key must not be in the map already. Grows the buckets as needed. */
void mph_map_insert(mph_map_t *map, mph_map_node_t *node, const char *key);

/* Takes `node`, which is in the map, out of it. */
void mph_map_remove(mph_map_t *map, mph_map_node_t *node);

/* Calls fn on every node, in no particular order; fn may remove the node it is given. */
void mph_map_each(mph_map_t *map, void (*fn)(mph_map_node_t *node, void *ud), void *ud);

/* Frees the buckets (not the nodes: they belong to their structs). */
void mph_map_free(mph_map_t *map);

#endif
