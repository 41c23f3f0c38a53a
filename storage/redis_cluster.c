/*
 * redis_cluster.c: the Redis backend on a Redis Cluster. A router in front of one node store
 * (storage/redis.c: a connection on the loop, its scripts, WAIT) per master: each scope's
 * load and commit go to the master serving the slot of its keys (all of a scope's keys share
 * one hash tag, so one slot: mph__redis_scope_slot).
 *
 * The slot map comes from CLUSTER SLOTS: at start (blocking, before the loop), then again
 * (asynchronously, through any node that is up) after a redirection or a lost connection, at
 * most one refresh at a time. Redirections are followed, never reported:
 *   MOVED slot addr   the slot lives there now: remember it, send there (and refresh);
 *   ASK slot addr     it is moving there: send this one command there after ASKING;
 *   TRYAGAIN          a commit's keys are split by a slot migration in progress (the claim
 *                     key is usually absent, so a multi-key script meets this during the
 *                     whole migration of its slot); CLUSTERDOWN: no master for the slot yet.
 *                     Both are retried from the slot's owner every RETRY_MS.
 * Redirections cannot have applied anything, so following them is safe; an operation gives up
 * (-32002) after GIVE_UP_MS of them. A lost reply is passed up as it is (outcome unknown).
 *
 * Scopes in different slots cannot commit in one atomic script: `together` tells the runner,
 * which refuses such a transaction where it touches the second scope. A node store is kept
 * for every master ever seen (a master that left the cluster just idles, reconnecting with
 * backoff); nodes are few.
 */
#define _GNU_SOURCE
#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/list.h"
#include "redis_route.h"
#include "storage.h"

#define NO_NODE 0xffff
#define CLUSTER_TICK_MS 10
#define RETRY_MS 10
#define GIVE_UP_MS 10000
#define MAX_NODES 1024

typedef struct cluster_s cluster_t;

typedef struct {
    mph__redis_addr_t addr;
    mph_store_t *store; /* owned; freed by its close */
} cnode_t;

/* One load or commit on its way to the right master. */
typedef struct cop_s {
    mph_list_t node; /* in cl->retries while waiting there (first: common/list.h) */
    cluster_t *cl;
    int commit;                /* 0: a load of `scope` */
    const char *scope;         /* load: borrowed until the callback */
    mph_store_write_t *writes; /* commit: owned copy of the array (entries borrowed) */
    size_t nwrites;
    unsigned slot;
    unsigned asking;   /* NO_NODE, or the node an ASK named */
    uint64_t give_up;  /* uv_now() after which a redirection fails the operation */
    uint64_t retry_at; /* in cl->retries: when to send again */
    mph_store_cb cb;   /* runs exactly once */
    void *ud;
} cop_t;

struct cluster_s {
    mph_store_t base; /* must be first */
    uv_loop_t *loop;
    mph_store_redis_config_t cfg; /* for new nodes; strings below */
    char *password, *prefix;      /* owned */
    cnode_t *nodes;               /* owned; grows, never shrinks */
    size_t nnodes, cap;
    uint16_t slots[MPH_REDIS_SLOTS]; /* slot -> index in nodes, or NO_NODE */
    int refreshing;                  /* a CLUSTER SLOTS is in flight */
    int refresh_wanted;              /* ask again when it lands, or at the next tick */
    mph_list_t retries;              /* waiting for retry_at (cop_t.node), newest first */
    uv_timer_t tick;                 /* retries, refreshes, the end of a close */
    int closing;
    size_t open_nodes; /* node stores not yet closed (closing) */
    void (*closed_cb)(void *ud);
    void *closed_ud;
};

static int cop_send(cop_t *op);

/* ---- Nodes and the slot map ---- */

/* The node at host:port, added (and connecting) if new. Returns its index, or NO_NODE. */
static unsigned node_at(cluster_t *cl, const char *host, int port)
{
    for (size_t i = 0; i < cl->nnodes; i++)
        if (cl->nodes[i].addr.port == port && strcmp(cl->nodes[i].addr.host, host) == 0)
            return (unsigned)i;
    if (cl->nnodes == MAX_NODES || strlen(host) >= sizeof(cl->nodes[0].addr.host) || cl->closing)
        return NO_NODE;
    if (cl->nnodes == cl->cap) {
        cl->cap = cl->cap ? cl->cap * 2 : 4;
        cl->nodes = mph_xrealloc(cl->nodes, cl->cap * sizeof(*cl->nodes));
    }
    cnode_t *n = &cl->nodes[cl->nnodes];
    snprintf(n->addr.host, sizeof(n->addr.host), "%s", host);
    n->addr.port = port;
    mph_store_redis_config_t c = cl->cfg;
    c.host = n->addr.host;
    c.port = port;
    n->store = mph__redis_node_new(cl->loop, &c);
    mph_log(MPH_LOG_INFO, "redis: cluster master %s:%d", host, port);
    return (unsigned)cl->nnodes++;
}

/* Reads a CLUSTER SLOTS reply into the map: {{start, end, {ip, port, ...}, replicas...}...}.
 * Returns how many slots it assigned. */
static size_t read_slots(cluster_t *cl, const redisReply *r)
{
    size_t assigned = 0;
    if (r == NULL || r->type != REDIS_REPLY_ARRAY)
        return 0;
    for (size_t i = 0; i < r->elements; i++) {
        const redisReply *range = r->element[i];
        if (range->type != REDIS_REPLY_ARRAY || range->elements < 3 ||
            range->element[0]->type != REDIS_REPLY_INTEGER ||
            range->element[1]->type != REDIS_REPLY_INTEGER)
            continue;
        const redisReply *master = range->element[2];
        if (master->type != REDIS_REPLY_ARRAY || master->elements < 2 ||
            master->element[0]->type != REDIS_REPLY_STRING || master->element[0]->len == 0 ||
            master->element[1]->type != REDIS_REPLY_INTEGER)
            continue;
        long long from = range->element[0]->integer, to = range->element[1]->integer;
        if (from < 0 || to >= MPH_REDIS_SLOTS || from > to)
            continue;
        unsigned node = node_at(cl, master->element[0]->str, (int)master->element[1]->integer);
        if (node == NO_NODE)
            continue;
        for (long long s = from; s <= to; s++)
            cl->slots[s] = (uint16_t)node;
        assigned += (size_t)(to - from + 1);
    }
    return assigned;
}

static void on_slots(void *ud, const redisReply *r)
{
    cluster_t *cl = ud;
    cl->refreshing = 0;
    if (!cl->closing && read_slots(cl, r) > 0)
        mph_log(MPH_LOG_DEBUG, "redis: cluster slot map refreshed");
    else
        cl->refresh_wanted = 1; /* try another node at the next tick */
}

/* Asks some node that is up for CLUSTER SLOTS, unless a request is in flight. */
static void map_refresh(cluster_t *cl)
{
    cl->refresh_wanted = 1;
    if (cl->refreshing || cl->closing)
        return;
    for (size_t i = 0; i < cl->nnodes; i++) {
        if (mph__redis_node_command(cl->nodes[i].store, "CLUSTER", "SLOTS", on_slots, cl) == 0) {
            cl->refreshing = 1;
            cl->refresh_wanted = 0;
            return;
        }
    }
}

/* ---- Operations ---- */

static void cop_free(cop_t *op)
{
    assert(!mph_list_is_linked(&op->node)); /* out of cl->retries */
    free(op->writes);
    free(op);
}

static void cop_fail(cop_t *op, const char *why)
{
    mph_store_result_t res = {
        MPH_ESTORAGE, why, {0, 0, 0, NULL}, op->commit ? op->writes[0].scope : op->scope, 0, 0,
        NULL};
    op->cb(op->ud, &res);
    cop_free(op);
}

static void retry_later(cop_t *op)
{
    cluster_t *cl = op->cl;
    op->asking = NO_NODE; /* start again from the slot's owner */
    op->retry_at = uv_now(cl->loop) + RETRY_MS;
    mph_list_insert_head(&cl->retries, &op->node);
}

/* A redirection "MOVED slot host:port" or "ASK slot host:port" (after "Redis: "): the node it
 * names, or NO_NODE. */
static unsigned redirect_node(cluster_t *cl, const char *text)
{
    char host[64];
    unsigned slot;
    int port;
    const char *sp = strchr(text, ' ');
    if (sp == NULL || sscanf(sp + 1, "%u %63s", &slot, host) != 2 || slot >= MPH_REDIS_SLOTS)
        return NO_NODE;
    char *colon = strrchr(host, ':');
    if (colon == NULL || (port = atoi(colon + 1)) <= 0 || port > 65535)
        return NO_NODE;
    *colon = '\0';
    return node_at(cl, host, port);
}

/* The node store answered: follow a redirection, or pass the result up. */
static void on_node_result(void *ud, const mph_store_result_t *res)
{
    cop_t *op = ud;
    cluster_t *cl = op->cl;
    const char *m = res->status == MPH_ESTORAGE && res->message ? res->message : "";
    const char *e = strncmp(m, "Redis: ", 7) == 0 ? m + 7 : NULL;
    int moved = e && strncmp(e, "MOVED ", 6) == 0, ask = e && strncmp(e, "ASK ", 4) == 0;
    int again = e && (strncmp(e, "TRYAGAIN", 8) == 0 || strncmp(e, "CLUSTERDOWN", 11) == 0);
    if (res->status == MPH_ESTORAGE && !moved && !ask && !again)
        map_refresh(cl); /* a lost connection: perhaps a failover moved the slot */
    if (!(moved || ask || again) || cl->closing || uv_now(cl->loop) > op->give_up) {
        op->cb(op->ud, res);
        cop_free(op);
        return;
    }
    if (again) {
        retry_later(op);
        return;
    }
    unsigned node = redirect_node(cl, e);
    if (node == NO_NODE) {
        cop_fail(op, "Redis Cluster: a redirection names no usable node");
        return;
    }
    if (moved) {
        cl->slots[op->slot] = (uint16_t)node;
        map_refresh(cl); /* other slots probably moved too */
        op->asking = NO_NODE;
    } else {
        op->asking = node;
    }
    if (cop_send(op) != 0)
        cop_fail(op, "the Redis Cluster node a redirection named is down");
}

/* Sends op to the node for its slot (or the one an ASK named). Returns 0 (on_node_result will
 * run), or MPH_ESTORAGE (not sent; op still the caller's). */
static int cop_send(cop_t *op)
{
    cluster_t *cl = op->cl;
    unsigned node = op->asking != NO_NODE ? op->asking : cl->slots[op->slot];
    if (node == NO_NODE) {
        map_refresh(cl);
        return MPH_ESTORAGE;
    }
    mph_store_t *s = cl->nodes[node].store;
    int asking = op->asking != NO_NODE;
    int rc = op->commit
                 ? mph__redis_node_commit(s, op->writes, op->nwrites, asking, on_node_result, op)
                 : mph__redis_node_load(s, op->scope, asking, on_node_result, op);
    if (rc != 0)
        map_refresh(cl); /* the node is down: a failover may have moved its slots */
    return rc;
}

static cop_t *cop_new(cluster_t *cl, unsigned slot, mph_store_cb cb, void *ud)
{
    cop_t *op = mph_xcalloc(1, sizeof(*op));
    op->cl = cl;
    op->slot = slot;
    op->asking = NO_NODE;
    op->give_up = uv_now(cl->loop) + GIVE_UP_MS;
    op->cb = cb;
    op->ud = ud;
    return op;
}

/* ---- Methods ---- */

static int cluster_load(mph_store_t *s, const char *scope, mph_store_cb cb, void *ud)
{
    cluster_t *cl = (cluster_t *)s;
    if (cl->closing)
        return MPH_ECLOSED;
    cop_t *op = cop_new(cl, mph__redis_scope_slot(cl->prefix, scope), cb, ud);
    op->scope = scope;
    int rc = cop_send(op);
    if (rc != 0)
        cop_free(op); /* never call back before returning */
    return rc;
}

static int cluster_together(mph_store_t *s, const char *a, const char *b, char *why, size_t len)
{
    cluster_t *cl = (cluster_t *)s;
    unsigned sa = mph__redis_scope_slot(cl->prefix, a), sb = mph__redis_scope_slot(cl->prefix, b);
    if (sa == sb)
        return 0;
    snprintf(why, len,
             "scopes \"%s\" and \"%s\" cannot change in one transaction: they live in different "
             "Redis Cluster slots (%u and %u); give their names one hash tag to keep them "
             "together, e.g. \"account:{42}:savings\" and \"account:{42}:checking\"",
             a, b, sa, sb);
    return MPH_EINVAL;
}

static int cluster_commit(mph_store_t *s, const mph_store_write_t *writes, size_t nwrites,
                          mph_store_cb cb, void *ud)
{
    cluster_t *cl = (cluster_t *)s;
    if (cl->closing)
        return MPH_ECLOSED;
    if (nwrites == 0)
        return MPH_EINVAL;
    char why[512];
    for (size_t i = 1; i < nwrites; i++)
        if (cluster_together(s, writes[0].scope, writes[i].scope, why, sizeof(why)) != 0)
            return MPH_EINVAL; /* the runner refused this transaction already */
    cop_t *op = cop_new(cl, mph__redis_scope_slot(cl->prefix, writes[0].scope), cb, ud);
    op->commit = 1;
    op->nwrites = nwrites;
    op->writes = mph_xmalloc(nwrites * sizeof(*writes));
    memcpy(op->writes, writes, nwrites * sizeof(*writes));
    int rc = cop_send(op);
    if (rc != 0)
        cop_free(op);
    return rc;
}

static void cluster_closed(uv_handle_t *h)
{
    cluster_t *cl = mph_container_of((uv_timer_t *)h, cluster_t, tick);
    void (*cb)(void *) = cl->closed_cb;
    void *ud = cl->closed_ud;
    free(cl->nodes);
    free(cl->password);
    free(cl->prefix);
    free(cl);
    if (cb)
        cb(ud);
}

static void on_node_closed(void *ud)
{
    cluster_t *cl = ud;
    assert(cl->open_nodes > 0);
    if (--cl->open_nodes == 0)
        uv_close((uv_handle_t *)&cl->tick, cluster_closed);
}

static void cluster_tick(uv_timer_t *t)
{
    cluster_t *cl = mph_container_of(t, cluster_t, tick);
    uint64_t now = uv_now(cl->loop);
    if (cl->refresh_wanted)
        map_refresh(cl);
    /* Take the due retries off the list first (oldest first): sending may queue new ones. */
    mph_list_t due, *n, *next;
    mph_list_init(&due);
    mph_list_foreach_safe(n, next, &cl->retries) {
        if (mph_list_entry(n, cop_t, node)->retry_at <= now) {
            mph_list_remove(n);
            mph_list_insert_head(&due, n);
        }
    }
    while ((n = mph_list_pop(&due)) != NULL) {
        cop_t *op = mph_list_entry(n, cop_t, node);
        if (cop_send(op) != 0)
            cop_fail(op, "the Redis Cluster node for this scope is down");
    }
}

static void cluster_close(mph_store_t *s, void (*done)(void *ud), void *ud)
{
    cluster_t *cl = (cluster_t *)s;
    cl->closing = 1;
    cl->closed_cb = done;
    cl->closed_ud = ud;
    mph_list_t *n;
    while ((n = mph_list_pop(&cl->retries)) != NULL)
        cop_fail(mph_list_entry(n, cop_t, node), "shutting down");
    uv_timer_stop(&cl->tick);
    /* Each node completes what it started (our callbacks pass results up: no new sends
     * while closing), then reports closed; the last one closes the timer, which frees us. */
    cl->open_nodes = cl->nnodes;
    for (size_t i = 0; i < cl->nnodes; i++)
        cl->nodes[i].store->methods->close(cl->nodes[i].store, on_node_closed, cl);
}

static const mph_store_methods_t cluster_methods = {
    MPH_STORE_METHODS_VERSION, "redis", cluster_load, cluster_commit, cluster_close, NULL,
    cluster_together,          NULL,
};

int mph__redis_cluster_open(mph_store_t **out, uv_loop_t *loop, const mph_store_redis_config_t *cfg,
                            const redisReply *slots, char *err, size_t errlen)
{
    cluster_t *cl = mph_xcalloc(1, sizeof(*cl));
    cl->base.methods = &cluster_methods;
    cl->loop = loop;
    mph_list_init(&cl->retries);
    cl->cfg = *cfg;
    cl->password = cfg->password ? mph_xstrdup(cfg->password) : NULL;
    cl->prefix = mph_xstrdup(cfg->prefix ? cfg->prefix : "mp:");
    cl->cfg.password = cl->password;
    cl->cfg.prefix = cl->prefix;
    cl->cfg.sentinels = cl->cfg.master = NULL;
    for (size_t i = 0; i < MPH_REDIS_SLOTS; i++)
        cl->slots[i] = NO_NODE;
    size_t assigned = read_slots(cl, slots);
    if (assigned == 0) { /* then no node was made either */
        snprintf(err, errlen, "Redis Cluster at %s:%d serves no slot yet", cfg->host, cfg->port);
        free(cl->password);
        free(cl->prefix);
        free(cl);
        return MPH_ESTORAGE;
    }
    uv_timer_init(loop, &cl->tick);
    uv_timer_start(&cl->tick, cluster_tick, CLUSTER_TICK_MS, CLUSTER_TICK_MS);
    mph_log(MPH_LOG_INFO, "redis: cluster of %zu masters, %zu of %d slots served", cl->nnodes,
            assigned, MPH_REDIS_SLOTS);
    *out = &cl->base;
    return 0;
}
