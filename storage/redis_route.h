/*
 * redis_route.h: private to storage/redis*.c. Where a Redis command must go: the server
 * Sentinel names as master, and the Cluster slot of a key. Nothing here touches the loop:
 * the blocking calls run at start or on libuv's thread pool.
 */
#ifndef MPH_REDIS_ROUTE_H
#define MPH_REDIS_ROUTE_H

#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <stddef.h>

#include "storage.h"

#define MPH_REDIS_SLOTS 16384

typedef struct {
    char host[INET6_ADDRSTRLEN]; /* a numeric IPv4 or IPv6 address */
    int port;
} mph__redis_addr_t;

/* Parses "host:port[,host:port...]" (IPv6 in brackets; a name is resolved now, blocking, to
 * its first address). Returns 0 and a new array (caller frees) in *out with its length in
 * *n, or MPH_EINVAL with a message in err. */
int mph__redis_parse_addrs(const char *list, mph__redis_addr_t **out, size_t *n, char *err,
                           size_t errlen);

/* Blocking (thread pool or start): asks the sentinels, from number `first` on, for master
 * `name` (SENTINEL get-master-addr-by-name), then checks with ROLE that the server they name
 * says it is a master (a sentinel may lag a failover). Each step waits at most timeout_ms.
 * Returns 0 and the master's address in *out, or MPH_ESTORAGE with why in err. */
int mph__sentinel_locate(const mph__redis_addr_t *sentinels, size_t n, size_t first,
                         const char *name, const char *password, unsigned timeout_ms,
                         mph__redis_addr_t *out, char *err, size_t errlen);

/* The Cluster hash slot of a key: CRC16 of its hash tag (the text between the first '{' and
 * the first '}' after it, when not empty) or of the whole key, modulo 16384. */
unsigned mph__redis_key_slot(const char *key, size_t len);

/* Where a scope's hash tag starts and how long it is, by the same rule applied to the name:
 * 0 and *at, *len when the name has a tag of its own ("account:{42}:savings" -> "42"),
 * -1 when it has none. */
int mph__redis_name_tag(const char *name, size_t *at, size_t *len);

/* ---- One server's connection (storage/redis.c), as the Cluster router uses it ---- */

/* A store on the one server cfg->host (a numeric address), port cfg->port, connecting now
 * without the blocking check of mph_store_redis_open. Never NULL. */
mph_store_t *mph__redis_node_new(uv_loop_t *loop, const mph_store_redis_config_t *cfg);

/* load and commit of the method table, with ASKING sent first when `asking` (after an ASK
 * redirection). Errors and callbacks as there. A Redis error reply is reported as status
 * MPH_ESTORAGE with the message "Redis: " + the error text (MOVED, ASK, TRYAGAIN ...). */
int mph__redis_node_load(mph_store_t *s, const char *scope, int asking, mph_store_cb cb, void *ud);
int mph__redis_node_commit(mph_store_t *s, const mph_store_write_t *writes, size_t nwrites,
                           int asking, mph_store_cb cb, void *ud);

/* Sends the command `a b` (static strings, e.g. "CLUSTER" "SLOTS") when the connection is up.
 * 0: cb runs once, later, with the reply (borrowed), or NULL if the connection was lost.
 * <0: not sent, cb never runs. */
int mph__redis_node_command(mph_store_t *s, const char *a, const char *b,
                            void (*cb)(void *ud, const redisReply *r), void *ud);

/* The Cluster slot of scope's keys under prefix (all its keys share it). */
unsigned mph__redis_scope_slot(const char *prefix, const char *scope);

/* ---- The Cluster router (storage/redis_cluster.c) ---- */

/* A store that routes each scope to the master serving its slot, one node store per master,
 * starting from `slots` (a CLUSTER SLOTS reply, borrowed). cfg as for mph_store_redis_open
 * (db 0). Returns 0 and *out, or MPH_ESTORAGE with why in err (no slot is served). */
int mph__redis_cluster_open(mph_store_t **out, uv_loop_t *loop, const mph_store_redis_config_t *cfg,
                            const redisReply *slots, char *err, size_t errlen);

#endif
