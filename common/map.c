/*
 * map.c: the intrusive string-keyed hash map of map.h: separate chaining, 64-bit FNV-1a
 * hashes kept in the nodes (so growing never rehashes a key, and most failed comparisons
 * cost no strcmp), buckets doubled when the count passes them.
 */
#include "map.h"

#include <stdlib.h>
#include <string.h>

#include "common.h"

static uint64_t hash_key(const char *key)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (const unsigned char *p = (const unsigned char *)key; *p; p++) {
        h ^= *p;
        h *= 0x100000001b3ULL;
    }
    return h;
}

mph_map_node_t *mph_map_find(const mph_map_t *map, const char *key)
{
    if (map->count == 0)
        return NULL;
    uint64_t h = hash_key(key);
    for (mph_map_node_t *n = map->buckets[h & (map->nbuckets - 1)]; n; n = n->next)
        if (n->hash == h && strcmp(n->key, key) == 0)
            return n;
    return NULL;
}

static void grow(mph_map_t *map)
{
    size_t size = map->nbuckets ? map->nbuckets * 2 : 64;
    mph_map_node_t **buckets = mph_xcalloc(size, sizeof(*buckets));
    for (size_t i = 0; i < map->nbuckets; i++) {
        mph_map_node_t *n = map->buckets[i];
        while (n) {
            mph_map_node_t *next = n->next;
            mph_map_node_t **b = &buckets[n->hash & (size - 1)];
            n->next = *b;
            *b = n;
            n = next;
        }
    }
    free(map->buckets);
    map->buckets = buckets;
    map->nbuckets = size;
}

void mph_map_insert(mph_map_t *map, mph_map_node_t *node, const char *key)
{
    if (map->count >= map->nbuckets)
        grow(map);
    node->key = key;
    node->hash = hash_key(key);
    mph_map_node_t **b = &map->buckets[node->hash & (map->nbuckets - 1)];
    node->next = *b;
    *b = node;
    map->count++;
}

void mph_map_remove(mph_map_t *map, mph_map_node_t *node)
{
    mph_map_node_t **p = &map->buckets[node->hash & (map->nbuckets - 1)];
    while (*p != node)
        p = &(*p)->next;
    *p = node->next;
    node->next = NULL;
    map->count--;
}

void mph_map_each(mph_map_t *map, void (*fn)(mph_map_node_t *node, void *ud), void *ud)
{
    for (size_t i = 0; i < map->nbuckets; i++) {
        mph_map_node_t *n = map->buckets[i];
        while (n) {
            mph_map_node_t *next = n->next; /* fn may remove n */
            fn(n, ud);
            n = next;
        }
    }
}

void mph_map_free(mph_map_t *map)
{
    free(map->buckets);
    *map = (mph_map_t)MPH_MAP_INIT;
}
