/*
 * redis.c: the Redis backend, for scopes shared by mphost processes on many machines.
 *
 * Layout, per scope S under prefix P (hash tag {S}, so one scope's keys share a Redis
 * Cluster slot and a commit's keys are always in one slot): P{S}:v (the version), P{S}:d (a
 * hash: top-level key -> JSON text), P{S}:log (the change log, newest first), P{S}:logsize
 * (the log's size in bytes) and P{S}:claim (a fairness claim, storage.h). storage/redis_cas.lua
 * describes each key and the record format.
 * A commit writes only the keys that changed (HSET/HDEL), so its cost grows with the change,
 * not with the scope. The log lets a conflict answer with just what changed since the
 * caller's version; it keeps at most log_bytes of records (1 MiB by default, and at most
 * LOG_RECORDS of them), so a scope of big values does not keep a thousand copies of them.
 * A caller further behind than the log reaches gets the whole hash instead.
 *
 * The compare-and-set is one Lua script run by the server (atomic), storage/redis_cas.lua,
 * embedded at build time; its reply shapes are documented there and read here by
 * read_reply() only, which turns every other shape into a clean error. Sent as EVALSHA; a
 * NOSCRIPT reply (the script cache was flushed, a failover) is answered by sending the same
 * call as EVAL.
 *
 * A reply lost in flight (the connection breaks after the command left) has an unknown
 * outcome. The caller is told -32002 (never "committed") and the runner drops its cached
 * state, so the next access re-reads what Redis really has: a commit that did apply is seen
 * once, never applied twice, because nothing is re-sent blindly and a re-sent CAS with a
 * stale version would be refused anyway.
 *
 * Beyond one server: with --redis-wait a commit is answered once WAIT confirms replicas have
 * it (see "Replication"); with Sentinel the server's address is asked for before every
 * connection (see "Sentinel"); on a Redis Cluster, storage/redis_cluster.c keeps one of these
 * stores per master and sends each scope to its slot's master through mph__redis_node_*
 * (redis_route.h), which add ASKING after an ASK redirection. A scope's keys always share one
 * hash tag: its name's own tag when it has one (scope_key).
 *
 * Connection states (rs->state; assert_store_state checks them):
 *
 *        connect_now (host is a name)              on_resolved
 *   DOWN ----------------------------> RESOLVING -------------> CONNECTED
 *    ^ |   connect_now (numeric host): connect_addr ------------^    |
 *    | +-------------------------------------------------------------+ went_down: connect
 *    +------------------------------------------------------------------ failed, connection
 *                                                                       lost or dropped
 * DOWN: ac == NULL; on_tick calls connect_now at reconnect_at. RESOLVING: a uv_getaddrinfo
 * (or, with Sentinel, the sentinels' lookup: locate_work) is in flight on the thread pool: hiredis
 * 0.14's connect resolves names synchronously, which would block the loop on every reconnect, so
 * names are resolved here and hiredis is only ever given a numeric address (which it parses without
 * any lookup). CONNECTED: ac != NULL (hiredis queues commands until the TCP connect ends). While
 * not CONNECTED every call fails at once with MPH_ESTORAGE. A command without a reply for
 * timeout_ms drops the connection (so a hung server fails calls fast, too). Reconnects back off
 * from 50 ms to 2 s. hiredis 0.14.1 has no command timeouts of its own, hence one uv_timer ticking
 * every 50 ms.
 */
#define _GNU_SOURCE
#include <assert.h>
#include <errno.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <limits.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#include "common/list.h"
#include "redis_route.h"
#include "storage.h"

#include "redis_cas_lua.h"  /* generated from redis_cas.lua: mph_redis_cas_lua[] */
#include "redis_load_lua.h" /* generated from redis_load.lua: mph_redis_load_lua[] */

#define CAS_SCRIPT ((const char *)mph_redis_cas_lua)
#define LOAD_SCRIPT ((const char *)mph_redis_load_lua)
#define LOG_BYTES_DEFAULT (1u << 20) /* the change log's byte budget per scope */
#define LOG_RECORDS "1000"           /* and its most records, whatever their size */
#define MPH_STR_(x) #x
#define MPH_STR(x) MPH_STR_(x)
#define NKEYS 5 /* v, d, log, claim, logsize: the scripts' KEYS */
#define TICK_MS 50
#define BACKOFF_MIN_MS 50
#define BACKOFF_MAX_MS 2000

typedef enum { OP_LOAD, OP_COMMIT, OP_SETUP, OP_WAIT, OP_RAW } op_kind_t;

typedef enum { STATE_DOWN, STATE_RESOLVING, STATE_CONNECTED } conn_state_t;

typedef struct redis_store_s redis_store_t;

/* What a commit's reply must match: its scopes, in the order of the script's KEYS. */
typedef struct {
    size_t n;           /* scopes (1 for a load) */
    char **names;       /* n owned copies */
    uint64_t *expected; /* n expected versions (commit) */
    size_t *counts;     /* n numbers of writes (commit): 0 checks the version only */
} shape_t;

typedef struct rop_s {
    mph_list_t node; /* in rs->inflight while sent; then, a COMMIT applied that waits for
                        replicas: in rs->waiting, then in its WAIT's group (first:
                        common/list.h) */
    redis_store_t *rs;
    op_kind_t kind;
    mph_store_cb cb; /* runs exactly once (LOAD, COMMIT) */
    void *ud;
    shape_t shape;          /* owned arrays */
    char **keys;            /* owned: NKEYS per scope: P{S}:v, :d, :log, :claim, :logsize */
    char (*numbers)[24];    /* owned: per scope, the expected version and the count, as text */
    int argc;               /* argv[0..1] are the command and script or sha */
    const char **argv;      /* owned array; strings borrowed or owned as below */
    size_t *argvlen;        /* owned */
    char committer_str[24]; /* argv string for the committer id */
    char numkeys[24];       /* argv string for the number of keys */
    int sent_as_eval;       /* already fell back from EVALSHA */
    int asking;             /* Cluster: send ASKING first (an ASK redirection) */
    void (*raw_cb)(void *ud, const redisReply *r); /* OP_RAW: gets the reply (NULL: lost) */
    uint64_t deadline;                             /* uv_now() limit for the reply */
    /* --redis-wait: a COMMIT that succeeded waits in a WAIT's group (see "Replication"). */
    uint64_t version; /* COMMIT: the new version, reported once WAIT confirms */
    unsigned conn;    /* COMMIT: rs->conns when it was applied */
    mph_list_t group; /* WAIT: the commits it confirms (their node), in the order applied */
} rop_t;

struct redis_store_s {
    mph_store_t base; /* must be first */
    uv_loop_t *loop;
    char *host; /* owned; a name or a numeric address */
    int port;
    int numeric;    /* host is a numeric address: no resolution needed */
    char where[80]; /* "host:port" or "[v6]:port", for messages */
    char *password; /* owned, may be NULL */
    int db;
    char *prefix;                /* owned */
    char log_bytes_str[24];      /* the change log's byte budget, as the script's argument */
    unsigned timeout_ms;         /* a command unanswered this long drops the connection */
    conn_state_t state;          /* see the diagram at the top */
    redisAsyncContext *ac;       /* CONNECTED only */
    uv_getaddrinfo_t resolve;    /* RESOLVING only: in flight */
    unsigned addr_turn;          /* which of the host's addresses to try next */
    unsigned resolutions;        /* how many times the host was resolved (logs, tests) */
    char addr[INET6_ADDRSTRLEN]; /* the numeric address of the last connection attempt */
    uint64_t reconnect_at;       /* DOWN: when to try again */
    unsigned backoff_ms;
    int ready;           /* on_connect reported the current connection up */
    int was_up;          /* Redis answered last we knew: logging, and calls queue while
                            a connection is still being made (else they fail at once) */
    char commit_sha[41]; /* "" until SCRIPT LOAD answered on this connection */
    char load_sha[41];
    mph_list_t inflight;    /* commands in flight (rop_t.node), oldest first */
    unsigned wait_replicas; /* --redis-wait N: 0 = answer commits without WAIT */
    char wait_args[2][24];  /* N and the WAIT's milliseconds, as text */
    unsigned wait_ms;       /* how long a WAIT may block the connection */
    int wait_sent;          /* a WAIT is in flight (rs->waiting then holds the next group) */
    unsigned conns;         /* connections made so far: which one applied a commit */
    mph_list_t waiting;     /* commits applied, queued for the next WAIT (rop_t.node), FIFO */
    /* Sentinel (see "Sentinel"): the master is asked for, not configured. */
    mph__redis_addr_t *sentinels; /* owned; NULL: host and port are the server */
    size_t nsentinels;
    char *master;              /* owned: the master's name at the sentinels */
    uv_work_t locate;          /* RESOLVING with sentinels: the lookup on the thread pool */
    mph__redis_addr_t located; /* its answer (written by the pool thread, read after) */
    int locate_rc;
    char locate_err[256];
    unsigned sentinel_turn;   /* which sentinel is asked first next time */
    unsigned locate_first;    /* sentinel_turn as the lookup in flight read it */
    redisAsyncContext *watch; /* subscribed to +switch-master on a sentinel, or NULL */
    uint64_t watch_at;        /* when to try subscribing again */
    uv_timer_t tick;          /* timeouts, reconnects, and the end of a close */
    int closing;              /* close() was called */
    int tick_closing;         /* uv_close(tick) was called: rs is freed in its callback */
    void (*closed_cb)(void *ud);
    void *closed_ud;
};

static void connect_now(redis_store_t *rs);
static void drop_connection(redis_store_t *rs, const char *why);
static void format_where(char *buf, size_t len, const char *host, int port);

#ifndef NDEBUG
/* The store's invariants; used as assert(assert_store_state(rs)). */
static int assert_store_state(const redis_store_t *rs)
{
    assert((rs->state == STATE_CONNECTED) == (rs->ac != NULL));
    assert(rs->state != STATE_RESOLVING || !rs->numeric);
    assert(!rs->tick_closing || (rs->state == STATE_DOWN && mph_list_empty(&rs->inflight)));
    /* a WAIT in flight sends the next one */
    assert(mph_list_empty(&rs->waiting) || rs->wait_sent);
    return 1;
}
#endif

static void op_free(rop_t *op)
{
    assert(!mph_list_is_linked(&op->node)); /* in no list any more */
    for (size_t i = 0; i < op->shape.n; i++)
        free(op->shape.names[i]);
    for (size_t i = 0; op->keys && i < NKEYS * op->shape.n; i++)
        free(op->keys[i]);
    free(op->shape.names);
    free(op->shape.expected);
    free(op->shape.counts);
    free(op->keys);
    free(op->numbers);
    free(op->argv);
    free(op->argvlen);
    free(op);
}

/* ---- Reading replies ----
 * The scripts' replies, whose shapes storage/redis_cas.lua and storage/redis_load.lua
 * document, are read here and only here. Every part is checked: a reply of any other shape
 * (a bug, a script of another version, keys written by hand) is a clean MPH_ESTORAGE naming
 * what was wrong, never a read outside the reply and never a success. */

typedef struct {
    mph_store_result_t res;     /* what the callback gets (reply_free frees what it owns) */
    mph_store_entry_t *entries; /* owned: every entry of the reply; the documents point in */
    size_t nentries, cap;
    mph_store_conflict_t one;   /* res.conflicts of a one-scope commit */
    mph_store_conflict_t *many; /* owned: res.conflicts of a commit of several scopes */
    char msg[320];              /* res.message points here on errors */
} reply_t;

static void reply_free(reply_t *out)
{
    free(out->entries);
    free(out->many);
}

static int parse_u64(const char *s, size_t len, uint64_t *out)
{
    if (len == 0 || len > 20 || (s[0] == '0' && len > 1))
        return -1; /* the canonical form only: what Lua's tostring writes */
    uint64_t v = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        unsigned d = (unsigned)(s[i] - '0');
        if (v > (UINT64_MAX - d) / 10)
            return -1; /* 20 digits can overflow */
        v = v * 10 + d;
    }
    *out = v;
    return 0;
}

/* Element i of array r, or NULL when r is not an array that long (borrowed). */
static const redisReply *element(const redisReply *r, size_t i)
{
    if (r == NULL || r->type != REDIS_REPLY_ARRAY || i >= r->elements)
        return NULL;
    return r->element[i];
}

static int is_string(const redisReply *r)
{
    return r != NULL && r->type == REDIS_REPLY_STRING && (r->str != NULL || r->len == 0);
}

/* A version: the scripts return it as a decimal string. */
static int reply_u64(const redisReply *r, uint64_t *out)
{
    return is_string(r) ? parse_u64(r->str, r->len, out) : -1;
}

/* A flag: the integer 0 or 1. */
static int reply_flag(const redisReply *r, int *out)
{
    if (r == NULL || r->type != REDIS_REPLY_INTEGER || (r->integer != 0 && r->integer != 1))
        return -1;
    *out = (int)r->integer;
    return 0;
}

/* A non-negative integer reply that fits an int (milliseconds). */
static int reply_ms(const redisReply *r, int *out)
{
    if (r == NULL || r->type != REDIS_REPLY_INTEGER || r->integer < 0 || r->integer > INT_MAX)
        return -1;
    *out = (int)r->integer;
    return 0;
}

static int malformed(reply_t *out, const char *what)
{
    reply_free(out);
    out->entries = NULL;
    out->many = NULL;
    out->nentries = 0;
    out->res.doc = (mph_store_doc_t){0, 0, 0, NULL};
    out->res.held = 0;
    out->res.nconflicts = 0;
    out->res.conflicts = NULL;
    snprintf(out->msg, sizeof(out->msg), "unexpected reply from Redis: %s", what);
    out->res.message = out->msg;
    return out->res.status = MPH_ESTORAGE;
}

/* Appends an entry to the reply's array; documents are pointed into it once all is read
 * (it moves while it grows). */
static void add_entry(reply_t *out, mph_store_entry_t e)
{
    if (out->nentries == out->cap) {
        out->cap = out->cap ? out->cap * 2 : 64;
        out->entries = mph_xrealloc(out->entries, out->cap * sizeof(*out->entries));
    }
    out->entries[out->nentries++] = e;
}

/* Appends the entries of a flat HGETALL array: strings, values never empty (JSON text). */
static int add_hash(reply_t *out, const redisReply *arr)
{
    if (arr == NULL || arr->type != REDIS_REPLY_ARRAY || arr->elements % 2)
        return -1;
    for (size_t i = 0; i < arr->elements; i += 2) {
        const redisReply *k = arr->element[i], *v = arr->element[i + 1];
        if (!is_string(k) || !is_string(v) || v->len == 0)
            return -1;
        add_entry(out, (mph_store_entry_t){k->str, k->len, v->str, v->len});
    }
    return 0;
}

/* Appends one change-log record ("VERSION\n" then KLEN:KEY VLEN:VALUE ...) of version want. */
static int add_record(reply_t *out, const redisReply *r, uint64_t want)
{
    if (!is_string(r) || r->len == 0)
        return -1;
    const char *s = r->str, *end = r->str + r->len;
    const char *nl = memchr(s, '\n', r->len);
    uint64_t version;
    if (nl == NULL || parse_u64(s, (size_t)(nl - s), &version) != 0 || version != want)
        return -1;
    const char *p = nl + 1;
    while (p < end) {
        const char *fields[2];
        size_t lens[2];
        for (int f = 0; f < 2; f++) {
            const char *colon = p < end ? memchr(p, ':', (size_t)(end - p)) : NULL;
            uint64_t n;
            if (colon == NULL || parse_u64(p, (size_t)(colon - p), &n) != 0 ||
                n > (uint64_t)(end - colon - 1))
                return -1;
            fields[f] = colon + 1;
            lens[f] = (size_t)n;
            p = colon + 1 + n;
        }
        add_entry(out,
                  (mph_store_entry_t){fields[0], lens[0], lens[1] ? fields[1] : NULL, lens[1]});
    }
    return 0;
}

/* {VERSION, HGETALL} */
static int read_load_reply(const redisReply *r, reply_t *out)
{
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2)
        return malformed(out, "a load is not answered by an array of 2");
    if (reply_u64(element(r, 0), &out->res.doc.version) != 0)
        return malformed(out, "the version of a load is not a decimal string");
    if (add_hash(out, element(r, 1)) != 0)
        return malformed(out, "the document is not flat pairs of strings (values never empty)");
    out->res.doc.n = out->nentries;
    out->res.doc.entries = out->entries;
    return 0;
}

/* Scope i's part of a conflict reply, {CUR, IS_DELTA, RECORDS or HGETALL, HELD} at
 * elements 1 + 4i .. 4 + 4i, into *c (doc.entries is left NULL: the caller points it into
 * the array, where this scope's entries start at *first). Returns 1 when the scope refused
 * the commit, 0 when its version held (only in a commit of several scopes), or an error. */
static int read_conflict(const redisReply *r, const shape_t *shape, size_t i, reply_t *out,
                         mph_store_conflict_t *c, size_t *first)
{
    uint64_t expected = shape->expected[i];
    size_t at = 1 + 4 * i;
    *c = (mph_store_conflict_t){shape->names[i], {0, 0, 0, NULL}, 0};
    *first = out->nentries;
    if (reply_u64(element(r, at), &c->doc.version) != 0)
        return malformed(out, "the version of a commit is not a decimal string");
    if (reply_flag(element(r, at + 1), &c->doc.is_delta) != 0)
        return malformed(out, "a conflict's is_delta is not 0 or 1");
    if (reply_ms(element(r, at + 3), &c->held) != 0)
        return malformed(out, "a conflict's held is not milliseconds");
    const redisReply *list = element(r, at + 2);
    if (!c->doc.is_delta) {
        if (add_hash(out, list) != 0)
            return malformed(out, "the document is not flat pairs of strings (values never empty)");
        c->doc.n = out->nentries - *first;
        return 1;
    }
    /* A delta: the records of versions expected+1 .. CUR, newest first. */
    int moved = c->doc.version != expected || c->held;
    if (c->doc.version < expected || (!moved && shape->n == 1))
        return malformed(out, "a conflict's delta does not start at the expected version");
    if (list == NULL || list->type != REDIS_REPLY_ARRAY ||
        (uint64_t)list->elements != c->doc.version - expected)
        return malformed(out, "a conflict's change log does not hold one record per version");
    for (size_t k = list->elements; k-- > 0;) /* apply oldest first */
        if (add_record(out, list->element[k], expected + (list->elements - k)) != 0)
            return malformed(out, "a change-log record is malformed");
    c->doc.n = out->nentries - *first;
    return moved;
}

/* {1, NEW...} or {0, per scope CUR, IS_DELTA, RECORDS or HGETALL, HELD}; see redis_cas.lua. */
static int read_commit_reply(const redisReply *r, const shape_t *shape, reply_t *out)
{
    mph_store_result_t *res = &out->res;
    int ok;
    if (r->type != REDIS_REPLY_ARRAY || reply_flag(element(r, 0), &ok) != 0)
        return malformed(out, "a commit is not answered by an array starting with 0 or 1");
    if (r->elements != 1 + (ok ? 1 : 4) * shape->n)
        return malformed(out, ok ? "a commit's success does not hold one version per scope"
                                 : "a commit's conflict does not hold four parts per scope");
    if (ok) {
        for (size_t i = 0; i < shape->n; i++) {
            uint64_t version, expected = shape->expected[i];
            if (reply_u64(element(r, 1 + i), &version) != 0)
                return malformed(out, "the version of a commit is not a decimal string");
            if (expected == UINT64_MAX || version != expected + (shape->counts[i] > 0))
                return malformed(out, "a commit's new version is not the expected version + 1");
            if (i == 0)
                res->doc.version = version;
        }
        return 0;
    }
    mph_store_conflict_t *cs =
        shape->n == 1 ? &out->one : (out->many = mph_xcalloc(shape->n, sizeof(*cs)));
    size_t *firsts = mph_xcalloc(shape->n, sizeof(*firsts));
    size_t n = 0;
    for (size_t i = 0; i < shape->n; i++) {
        int rc = read_conflict(r, shape, i, out, &cs[n], &firsts[n]);
        if (rc < 0) {
            free(firsts);
            return rc;
        }
        n += (size_t)rc;
    }
    for (size_t i = 0; i < n; i++)
        cs[i].doc.entries = cs[i].doc.n ? out->entries + firsts[i] : NULL;
    free(firsts);
    if (n == 0)
        return malformed(out, "a conflict names no scope that refused the commit");
    res->status = MPH_ECONFLICT;
    res->nconflicts = n;
    res->conflicts = cs;
    res->scope = cs[0].scope;
    res->doc = cs[0].doc;
    res->held = cs[0].held;
    return MPH_ECONFLICT;
}

/* Turns the reply to a LOAD or COMMIT of the scopes in `shape` into out->res (status 0,
 * MPH_ECONFLICT or MPH_ESTORAGE with a message). r may be NULL (the connection died). The
 * caller frees out with reply_free after the callback; entries borrow from r. Returns
 * out->res.status. */
static int read_shaped_reply(op_kind_t kind, const shape_t *shape, const redisReply *r,
                             reply_t *out)
{
    memset(out, 0, sizeof(*out));
    out->res.scope = shape->names[0];
    if (r == NULL) {
        out->res.message = "connection to Redis lost (the outcome is unknown)";
        return out->res.status = MPH_ESTORAGE;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        snprintf(out->msg, sizeof(out->msg), "Redis: %.*s", (int)r->len, r->str ? r->str : "");
        out->res.message = out->msg;
        return out->res.status = MPH_ESTORAGE;
    }
    return kind == OP_LOAD ? read_load_reply(r, out) : read_commit_reply(r, shape, out);
}

#ifdef MPH_REDIS_TESTS /* the unit and fuzz tests include this file */
/* read_shaped_reply for one scope and a commit of one write: all `out` owns then is
 * out->res.doc.entries. */
static int read_reply(op_kind_t kind, uint64_t expected, const char *scope, const redisReply *r,
                      reply_t *out)
{
    char *names[1] = {(char *)scope};
    size_t one = 1;
    shape_t shape = {1, names, &expected, &one};
    return read_shaped_reply(kind, &shape, r, out);
}
#endif

/* A NOSCRIPT error to a call sent as EVALSHA: the server forgot the script (SCRIPT FLUSH, a
 * failover, a restart); the same call sent as EVAL, with the script's text, will do. */
static int wants_eval(const rop_t *op, const redisReply *r)
{
    return r != NULL && r->type == REDIS_REPLY_ERROR && !op->sent_as_eval && r->len >= 8 &&
           strncmp(r->str, "NOSCRIPT", 8) == 0;
}

/* ---- Replies ---- */

static void finish(rop_t *op, const mph_store_result_t *res)
{
    if (op->cb)
        op->cb(op->ud, res);
    op_free(op);
}

static void fail_op(rop_t *op, int status, const char *message)
{
    mph_store_result_t res = {status, message, {0, 0, 0, NULL}, op->shape.names[0], 0, 0, NULL};
    finish(op, &res);
}

/* The connection is gone (or never came): calls fail fast until the next attempt. */
static void went_down(redis_store_t *rs)
{
    rs->ac = NULL;
    rs->state = STATE_DOWN;
    rs->reconnect_at = uv_now(rs->loop) + rs->backoff_ms;
}

/* An attempt to connect failed: log it once per outage, and back off. */
static void attempt_failed(redis_store_t *rs, const char *why)
{
    went_down(rs);
    if (rs->was_up)
        mph_log(MPH_LOG_WARN, "redis: cannot connect to %s: %s", rs->where, why);
    rs->was_up = 0;
    rs->addr_turn++; /* a name with several addresses: try the next one */
    rs->backoff_ms = rs->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : rs->backoff_ms * 2;
}

static int send_op(rop_t *op);

/* AUTH, SELECT, SCRIPT LOAD: keep the SHAs, and drop the connection on errors. */
static void on_setup_reply(redis_store_t *rs, rop_t *op, const redisReply *r)
{
    if (r && r->type == REDIS_REPLY_STRING && r->len == 40 && op->argc == 3) {
        char *dst = op->argv[2] == CAS_SCRIPT ? rs->commit_sha : rs->load_sha;
        memcpy(dst, r->str, 40);
        dst[40] = '\0';
    } else if (r && r->type == REDIS_REPLY_ERROR) {
        char why[300];
        snprintf(why, sizeof(why), "%s: %s", op->argv[0], r->str);
        mph_log(MPH_LOG_ERROR, "redis: %s", why);
        op_free(op);
        drop_connection(rs, why);
        return;
    }
    op_free(op);
}

/* ---- Replication (--redis-wait) ----
 * A commit the script applied is answered only after `WAIT N MS` on the same connection
 * confirms that N replicas have it (WAIT counts the writes this client made so far). At most
 * one WAIT is in flight: commits applied meanwhile queue in rs->waiting and share the next
 * one, so a burst of commits costs one WAIT, not one each. WAIT blocks the connection while
 * it waits, so commands queued behind it get their time limit counted from its reply.
 * A WAIT that falls short, fails, or whose connection is lost leaves the outcome unknown:
 * the write is applied on the master and may or may not survive a failover. */

static void send_wait(redis_store_t *rs);
static rop_t *command_op(redis_store_t *rs, op_kind_t kind, int argc, const char *const *argv,
                         const size_t *lens);

/* Answers every commit of a WAIT's group (which this empties): ok (status 0) or the error
 * `why`. */
static void answer_group(mph_list_t *group, const char *why)
{
    mph_list_t *n;
    while ((n = mph_list_pop(group)) != NULL) {
        rop_t *op = mph_list_entry(n, rop_t, node);
        if (why) {
            fail_op(op, MPH_ESTORAGE, why);
        } else {
            mph_store_result_t res = {0, NULL, {op->version, 0, 0, NULL}, op->shape.names[0], 0,
                                      0, NULL};
            finish(op, &res);
        }
    }
}

/* Whether a commit changed a scope. One that only checked versions (a read-only transaction,
 * the outbox's idle claims) has nothing of its own to confirm: it waits only while a WAIT is
 * out, since the commits of this connection before it, which it may have read, are not
 * confirmed yet. */
static int writes_data(const rop_t *op)
{
    for (size_t i = 0; i < op->shape.n; i++)
        if (op->shape.counts[i] > 0)
            return 1;
    return 0;
}

static void wait_enqueue(redis_store_t *rs, rop_t *op)
{
    mph_list_insert_tail(&rs->waiting, &op->node); /* out of rs->inflight since its reply */
    if (!rs->wait_sent)
        send_wait(rs);
}

/* Sends one WAIT for every commit queued in rs->waiting. */
static void send_wait(redis_store_t *rs)
{
    mph_list_t group, lost, *n, *next;
    mph_list_init(&group);
    mph_list_move(&group, &rs->waiting);
    rs->wait_sent = 0;
    if (mph_list_empty(&group))
        return;
    /* Commits applied on a connection that is gone cannot be confirmed from another one. */
    mph_list_init(&lost);
    mph_list_foreach_safe(n, next, &group) {
        rop_t *op = mph_list_entry(n, rop_t, node);
        if (op->conn != rs->conns || rs->ac == NULL) {
            mph_list_remove(n);
            mph_list_insert_head(&lost, n);
        }
    }
    answer_group(&lost, "outcome unknown: the connection to Redis was lost before replicas "
                        "confirmed the commit (it is applied on the master, and may be lost "
                        "by a failover)");
    if (mph_list_empty(&group))
        return;
    const char *argv[3] = {"WAIT", rs->wait_args[0], rs->wait_args[1]};
    rop_t *op = command_op(rs, OP_WAIT, 3, argv, NULL);
    if (send_op(op) != 0) {
        op_free(op);
        answer_group(&group, "outcome unknown: cannot send WAIT to Redis (the commit is applied "
                             "on the master, and may be lost by a failover)");
        return;
    }
    mph_list_move(&op->group, &group);
    op->deadline += rs->wait_ms; /* WAIT may block this long by design */
    rs->wait_sent = 1;
}

static void on_wait_reply(redis_store_t *rs, rop_t *op, const redisReply *r)
{
    char why[300];
    mph_list_t group; /* op is freed before its group is answered */
    mph_list_init(&group);
    mph_list_move(&group, &op->group);
    if (r == NULL) {
        snprintf(why, sizeof(why),
                 "outcome unknown: the connection to Redis was lost while "
                 "waiting for replicas (the commit is applied on the master, "
                 "and may be lost by a failover)");
    } else if (r->type == REDIS_REPLY_ERROR) {
        snprintf(why, sizeof(why),
                 "outcome unknown: WAIT failed: %.*s (the commit is applied "
                 "on the master)",
                 (int)r->len, r->str ? r->str : "");
    } else if (r->type != REDIS_REPLY_INTEGER) {
        snprintf(why, sizeof(why), "outcome unknown: WAIT is not answered by an integer");
    } else if (r->integer < (long long)rs->wait_replicas) {
        snprintf(why, sizeof(why),
                 "outcome unknown: %lld of %u Redis replicas confirmed the "
                 "commit within %u ms (it is applied on the master, and may be lost by a "
                 "failover)",
                 r->integer, rs->wait_replicas, rs->wait_ms);
    } else {
        why[0] = '\0';
    }
    /* Commands queued behind the WAIT waited for it: their time starts now. */
    uint64_t now = uv_now(rs->loop);
    mph_list_t *n;
    mph_list_foreach(n, &rs->inflight) {
        rop_t *o = mph_list_entry(n, rop_t, node);
        if (o->deadline < now + rs->timeout_ms)
            o->deadline = now + rs->timeout_ms;
    }
    op_free(op);
    answer_group(&group, why[0] ? why : NULL);
    send_wait(rs); /* the commits that queued meanwhile */
}

static void on_reply(redisAsyncContext *ac, void *reply_ptr, void *privdata)
{
    rop_t *op = privdata;
    redis_store_t *rs = op->rs;
    const redisReply *r = reply_ptr;
    mph_list_remove(&op->node); /* from rs->inflight */
    if (r == NULL && rs->ac == ac)
        went_down(rs); /* only a dying context answers NULL: mark it before anyone calls us */
    assert(assert_store_state(rs));
    if (op->kind == OP_SETUP) {
        on_setup_reply(rs, op, r);
        return;
    }
    if (op->kind == OP_WAIT) {
        on_wait_reply(rs, op, r);
        return;
    }
    if (op->kind == OP_RAW) {
        op->raw_cb(op->ud, r);
        op_free(op);
        return;
    }
    if (wants_eval(op, r) && rs->ac == ac) {
        op->sent_as_eval = 1;
        op->argv[0] = "EVAL";
        op->argv[1] = op->kind == OP_COMMIT ? CAS_SCRIPT : LOAD_SCRIPT;
        op->argvlen[0] = 4;
        op->argvlen[1] = op->kind == OP_COMMIT ? mph_redis_cas_lua_len : mph_redis_load_lua_len;
        if (send_op(op) != 0)
            fail_op(op, MPH_ESTORAGE, "cannot send to Redis");
        return;
    }
    /* A master demoted under us (a failover) refuses writes: the script wrote nothing. Drop
     * the connection, so the next one asks Sentinel again. */
    int demoted = r && r->type == REDIS_REPLY_ERROR && r->len >= 8 &&
                  strncmp(r->str, "READONLY", 8) == 0 && rs->ac == ac;
    reply_t out;
    read_shaped_reply(op->kind, &op->shape, r, &out);
    if (demoted) {
        finish(op, &out.res);
        reply_free(&out);
        drop_connection(rs, "the server is not a master any more (READONLY)");
        return;
    }
    if (op->kind == OP_COMMIT && out.res.status == 0 && rs->wait_replicas &&
        (writes_data(op) || rs->wait_sent)) {
        op->version = out.res.doc.version;
        op->conn = rs->conns;
        reply_free(&out);
        wait_enqueue(rs, op); /* answered once replicas confirm it */
        return;
    }
    finish(op, &out.res);
    reply_free(&out);
}

/* ---- Connection ---- */

/* Queues op on the connection. Returns 0 (on_reply will run), or MPH_ESTORAGE (hiredis
 * refused it: the context is closing; op is untouched and still the caller's). */
static int send_op(rop_t *op)
{
    redis_store_t *rs = op->rs;
    op->deadline = uv_now(rs->loop) + rs->timeout_ms;
    mph_list_insert_tail(&rs->inflight, &op->node);
    /* ASKING holds for the next command only: the two go out back to back. */
    if ((op->asking && redisAsyncCommand(rs->ac, NULL, NULL, "ASKING") != REDIS_OK) ||
        redisAsyncCommandArgv(rs->ac, on_reply, op, op->argc, op->argv, op->argvlen) != REDIS_OK) {
        mph_list_remove(&op->node);
        return MPH_ESTORAGE;
    }
    return 0;
}

/* A new command of argc arguments (strings borrowed; lens NULL: NUL-terminated) that is
 * not a script: SETUP, WAIT or RAW. */
static rop_t *command_op(redis_store_t *rs, op_kind_t kind, int argc, const char *const *argv,
                         const size_t *lens)
{
    rop_t *op = mph_xcalloc(1, sizeof(*op));
    op->rs = rs;
    op->kind = kind;
    mph_list_init(&op->group); /* a WAIT's */
    op->argc = argc;
    op->argv = mph_xmalloc((size_t)argc * sizeof(*op->argv));
    op->argvlen = mph_xmalloc((size_t)argc * sizeof(*op->argvlen));
    for (int i = 0; i < argc; i++) {
        op->argv[i] = argv[i];
        op->argvlen[i] = lens ? lens[i] : strlen(argv[i]);
    }
    return op;
}

static void setup_command(redis_store_t *rs, int argc, const char **argv, const size_t *lens)
{
    rop_t *op = command_op(rs, OP_SETUP, argc, argv, lens);
    if (send_op(op) != 0)
        op_free(op);
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    redis_store_t *rs = ac->data;
    if (status != REDIS_OK) {
        /* hiredis frees the context after this callback; pending commands get NULL. */
        if (rs->ac == ac)
            attempt_failed(rs, ac->errstr);
        return;
    }
    if (!rs->was_up)
        mph_log(MPH_LOG_INFO, "redis: connected to %s (%s)", rs->where, rs->addr);
    rs->was_up = 1;
    rs->ready = 1;
    rs->backoff_ms = BACKOFF_MIN_MS;
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    redis_store_t *rs = ac->data;
    if (rs->ac == ac)
        went_down(rs);
    if (status != REDIS_OK && !rs->closing)
        mph_log(MPH_LOG_WARN, "redis: connection lost: %s", ac->errstr);
    rs->was_up = 0;
}

/* The commands that open every connection, sync or async: AUTH and SELECT, when configured.
 * Fills out[] (argv strings borrowed from password and db_buf) and returns how many. */
typedef struct {
    const char *argv[2];
} login_t;

static int login_commands(const char *password, int db, char db_buf[16], login_t out[2])
{
    int n = 0;
    if (password)
        out[n++] = (login_t){{"AUTH", password}};
    if (db) {
        snprintf(db_buf, 16, "%d", db);
        out[n++] = (login_t){{"SELECT", db_buf}};
    }
    return n;
}

/* ---- Event hooks ----
 * hiredis drives its socket through the ev hooks of its context. We install our own instead
 * of hiredis 0.14.1's adapters/libuv.h, whose poll callback returns on any error status: libuv
 * reports POLLERR (a refused connect, a reset) as UV_EBADF and stops watching, so with that
 * adapter a refused connect is never noticed and calls wait for the command timeout. Here an
 * error wakes hiredis for the events it waits on; its read or connect check finds the
 * socket's error and ends the connection at once.
 *
 * hiredis asks to watch for writability each time a command is queued and stops once it is
 * written, and libuv turns every change of a poll's events into epoll_ctl calls (a DEL and an
 * ADD): six per commit, for a socket that is nearly always writable. So the hooks only note
 * what hiredis wants, and a prepare handle, run once per loop iteration just before the loop
 * polls, first writes what is queued (on a connected socket: hiredis then stops asking) and
 * only then hands libuv the events still wanted, if they changed. A commit's command leaves
 * within the iteration that queued it, and the poll stays on READABLE.
 *
 * Both handles are closed before ev is freed, in their close callbacks; `ac` is cut when
 * hiredis cleans up, so a late event finds NULL. */

typedef struct {
    uv_poll_t poll;        /* on the context's socket */
    uv_prepare_t flush;    /* active while a write or a change of `polled` is due */
    redisAsyncContext *ac; /* NULL once hiredis cleaned up */
    int events;            /* UV_READABLE | UV_WRITABLE hiredis asked for */
    int polled;            /* the events the poll handle watches */
    int open_handles;      /* 2, then 0 once both close callbacks ran */
} ev_t;

static void on_poll(uv_poll_t *handle, int status, int events)
{
    ev_t *ev = mph_container_of(handle, ev_t, poll);
    if (status < 0)
        events = ev->events; /* let hiredis find the error itself */
    if (ev->ac && (events & UV_READABLE))
        redisAsyncHandleRead(ev->ac);
    if (ev->ac && (events & UV_WRITABLE))
        redisAsyncHandleWrite(ev->ac);
}

static void on_flush(uv_prepare_t *handle)
{
    ev_t *ev = mph_container_of(handle, ev_t, flush);
    uv_prepare_stop(handle);
    if (ev->ac && (ev->events & UV_WRITABLE) && (ev->ac->c.flags & REDIS_CONNECTED))
        redisAsyncHandleWrite(ev->ac); /* may clean ac up, or ask for other events */
    if (ev->ac == NULL || ev->events == ev->polled)
        return;
    ev->polled = ev->events;
    if (ev->polled)
        uv_poll_start(&ev->poll, ev->polled, on_poll);
    else
        uv_poll_stop(&ev->poll);
}

static void ev_update(ev_t *ev, int add, int del)
{
    ev->events = (ev->events | add) & ~del;
    if (ev->events != ev->polled || (ev->events & UV_WRITABLE))
        uv_prepare_start(&ev->flush, on_flush);
}

static void ev_add_read(void *p)
{
    ev_update(p, UV_READABLE, 0);
}

static void ev_del_read(void *p)
{
    ev_update(p, 0, UV_READABLE);
}

static void ev_add_write(void *p)
{
    ev_update(p, UV_WRITABLE, 0);
}

static void ev_del_write(void *p)
{
    ev_update(p, 0, UV_WRITABLE);
}

static void on_ev_closed(uv_handle_t *h)
{
    ev_t *ev = h->data;
    if (--ev->open_handles == 0)
        free(ev);
}

static void ev_cleanup(void *p)
{
    ev_t *ev = p;
    ev->ac = NULL;
    uv_close((uv_handle_t *)&ev->poll, on_ev_closed);
    uv_close((uv_handle_t *)&ev->flush, on_ev_closed);
}

/* Attaches ac to the loop. Returns 0 or -1 (ac untouched). */
static int ev_attach(redisAsyncContext *ac, uv_loop_t *loop)
{
    ev_t *ev = mph_xcalloc(1, sizeof(*ev));
    if (uv_poll_init_socket(loop, &ev->poll, ac->c.fd) != 0) {
        free(ev);
        return -1;
    }
    uv_prepare_init(loop, &ev->flush); /* cannot fail */
    ev->poll.data = ev->flush.data = ev;
    ev->open_handles = 2;
    ev->ac = ac;
    ac->ev.data = ev;
    ac->ev.addRead = ev_add_read;
    ac->ev.delRead = ev_del_read;
    ac->ev.addWrite = ev_add_write;
    ac->ev.delWrite = ev_del_write;
    ac->ev.cleanup = ev_cleanup;
    return 0;
}

/* Starts connecting to a numeric address: DOWN or RESOLVING -> CONNECTED (or DOWN). */
static void connect_addr(redis_store_t *rs, const char *addr)
{
    snprintf(rs->addr, sizeof(rs->addr), "%s", addr);
    redisAsyncContext *ac = redisAsyncConnect(addr, rs->port);
    if (ac == NULL || ac->err) {
        char why[160];
        snprintf(why, sizeof(why), "%s", ac ? ac->errstr : "out of memory");
        if (ac)
            redisAsyncFree(ac);
        attempt_failed(rs, why);
        return;
    }
    ac->data = rs;
    if (ev_attach(ac, rs->loop) != 0) {
        redisAsyncFree(ac);
        attempt_failed(rs, "cannot attach to the event loop");
        return;
    }
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    rs->ac = ac;
    rs->conns++;
    rs->state = STATE_CONNECTED;
    rs->ready = 0;
    rs->commit_sha[0] = rs->load_sha[0] = '\0';
    char db[16];
    login_t login[2];
    for (int i = 0, n = login_commands(rs->password, rs->db, db, login); i < n; i++)
        setup_command(rs, 2, login[i].argv, NULL);
    const char *load_cas[] = {"SCRIPT", "LOAD", CAS_SCRIPT};
    const char *load_load[] = {"SCRIPT", "LOAD", LOAD_SCRIPT};
    const size_t cas_lens[] = {6, 4, mph_redis_cas_lua_len};
    const size_t load_lens[] = {6, 4, mph_redis_load_lua_len};
    setup_command(rs, 3, load_cas, cas_lens);
    setup_command(rs, 3, load_load, load_lens);
}

/* Writes ai's address as text into buf. Returns 0, or -1 if it is not IPv4 or IPv6. */
static int address_name(const struct addrinfo *ai, char *buf, size_t len)
{
    if (ai->ai_family == AF_INET)
        return uv_ip4_name((const struct sockaddr_in *)ai->ai_addr, buf, len) == 0 ? 0 : -1;
    if (ai->ai_family == AF_INET6)
        return uv_ip6_name((const struct sockaddr_in6 *)ai->ai_addr, buf, len) == 0 ? 0 : -1;
    return -1;
}

/* Writes address number `turn` (modulo how many there are) of res into buf as text. Returns
 * 0, or -1 when res holds no IPv4 or IPv6 address. */
static int pick_address(const struct addrinfo *res, unsigned turn, char *buf, size_t len)
{
    unsigned n = 0;
    for (const struct addrinfo *ai = res; ai; ai = ai->ai_next)
        n += ai->ai_family == AF_INET || ai->ai_family == AF_INET6;
    if (n == 0)
        return -1;
    turn %= n;
    for (const struct addrinfo *ai = res; ai; ai = ai->ai_next)
        if ((ai->ai_family == AF_INET || ai->ai_family == AF_INET6) && turn-- == 0)
            return address_name(ai, buf, len);
    return -1;
}

/* The thread pool resolved rs->host (RESOLVING -> CONNECTED or DOWN). */
static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    redis_store_t *rs = mph_container_of(req, redis_store_t, resolve);
    assert(rs->state == STATE_RESOLVING);
    rs->resolutions++;
    char addr[INET6_ADDRSTRLEN] = "";
    if (status == 0 && pick_address(res, rs->addr_turn, addr, sizeof(addr)) != 0)
        status = UV_EAI_NODATA;
    uv_freeaddrinfo(res);
    rs->state = STATE_DOWN;
    if (rs->closing) {
        return; /* the next tick frees the store */
    } else if (status != 0) {
        char why[160];
        snprintf(why, sizeof(why), "cannot resolve %s: %s", rs->host, uv_strerror(status));
        attempt_failed(rs, why);
        return;
    }
    mph_log(MPH_LOG_DEBUG, "redis: %s resolved to %s (resolution %u)", rs->host, addr,
            rs->resolutions);
    connect_addr(rs, addr);
}

/* ---- Sentinel ----
 * With sentinels, RESOLVING is a lookup on the thread pool (mph__sentinel_locate: ask each
 * sentinel for the master, then check with ROLE that it is one), made before every connection
 * attempt: a lost connection is the first sign of a failover. A subscription to
 * +switch-master on one sentinel tells of a failover at once; the data connection is then
 * dropped (calls in flight on it get -32002, their outcome unknown) and the next attempt asks
 * again. A write refused with READONLY (the master was demoted) drops it too (on_reply).
 * Commands are sent only on a connection to a server that said ROLE master just before. */

static void locate_work(uv_work_t *w)
{
    redis_store_t *rs = mph_container_of(w, redis_store_t, locate);
    unsigned timeout = rs->timeout_ms < 1000 ? rs->timeout_ms : 1000;
    rs->locate_rc = mph__sentinel_locate(rs->sentinels, rs->nsentinels, rs->locate_first,
                                         rs->master, rs->password, timeout, &rs->located,
                                         rs->locate_err, sizeof(rs->locate_err));
}

/* RESOLVING -> CONNECTED or DOWN, with sentinels. */
static void locate_done(uv_work_t *w, int status)
{
    redis_store_t *rs = mph_container_of(w, redis_store_t, locate);
    assert(rs->state == STATE_RESOLVING);
    rs->resolutions++;
    rs->state = STATE_DOWN;
    if (rs->closing)
        return; /* the next tick frees the store */
    if (status != 0 || rs->locate_rc != 0) {
        rs->sentinel_turn++;
        attempt_failed(rs, status != 0 ? uv_strerror(status) : rs->locate_err);
        return;
    }
    rs->port = rs->located.port;
    format_where(rs->where, sizeof(rs->where), rs->located.host, rs->located.port);
    connect_addr(rs, rs->located.host);
}

static void on_switch(redisAsyncContext *ac, void *reply_ptr, void *privdata)
{
    redis_store_t *rs = privdata;
    const redisReply *r = reply_ptr;
    (void)ac;
    /* A message is {"message", "+switch-master", "NAME OLDIP OLDPORT NEWIP NEWPORT"}. */
    if (r == NULL || r->type != REDIS_REPLY_ARRAY || r->elements != 3 ||
        !is_string(r->element[0]) || strcmp(r->element[0]->str, "message") != 0 ||
        !is_string(r->element[2]))
        return;
    char name[256], ip[INET6_ADDRSTRLEN];
    int port;
    if (sscanf(r->element[2]->str, "%255s %*s %*d %45s %d", name, ip, &port) != 3 ||
        strcmp(name, rs->master) != 0)
        return;
    mph_log(MPH_LOG_WARN, "redis: Sentinel switched master %s to %s:%d", name, ip, port);
    if (rs->ac && (strcmp(rs->addr, ip) != 0 || rs->port != port))
        drop_connection(rs, "Sentinel switched the master");
    rs->backoff_ms = BACKOFF_MIN_MS;
    rs->reconnect_at = uv_now(rs->loop); /* ask again at the next tick */
}

static void watch_lost(redis_store_t *rs)
{
    rs->watch = NULL;
    rs->watch_at = uv_now(rs->loop) + BACKOFF_MAX_MS;
    rs->sentinel_turn++;
}

static void on_watch_connect(const redisAsyncContext *ac, int status)
{
    redis_store_t *rs = ac->data;
    if (status != REDIS_OK && rs->watch == ac)
        watch_lost(rs); /* hiredis frees ac after this callback */
}

static void on_watch_disconnect(const redisAsyncContext *ac, int status)
{
    redis_store_t *rs = ac->data;
    (void)status;
    if (rs->watch == ac)
        watch_lost(rs);
}

/* Subscribes to +switch-master on the next sentinel in turn. */
static void watch_start(redis_store_t *rs)
{
    const mph__redis_addr_t *s = &rs->sentinels[rs->sentinel_turn % rs->nsentinels];
    redisAsyncContext *ac = redisAsyncConnect(s->host, s->port);
    if (ac == NULL || ac->err || ev_attach(ac, rs->loop) != 0) {
        if (ac)
            redisAsyncFree(ac);
        watch_lost(rs);
        return;
    }
    ac->data = rs;
    redisAsyncSetConnectCallback(ac, on_watch_connect);
    redisAsyncSetDisconnectCallback(ac, on_watch_disconnect);
    rs->watch = ac;
    if (redisAsyncCommand(ac, on_switch, rs, "SUBSCRIBE +switch-master") != REDIS_OK) {
        rs->watch = NULL;
        redisAsyncFree(ac);
        watch_lost(rs);
    }
}

/* DOWN -> RESOLVING (a name: resolved off the loop, every attempt, so a changed DNS record is
 * followed; Sentinel: asked off the loop, every attempt) or straight on to CONNECTED (a
 * numeric address). */
static void connect_now(redis_store_t *rs)
{
    assert(rs->state == STATE_DOWN && !rs->closing);
    if (rs->sentinels) {
        /* The pool thread reads only what the loop leaves alone until locate_done. */
        rs->locate_first = rs->sentinel_turn;
        int rc = uv_queue_work(rs->loop, &rs->locate, locate_work, locate_done);
        if (rc != 0) {
            attempt_failed(rs, uv_strerror(rc));
            return;
        }
        rs->state = STATE_RESOLVING;
        return;
    }
    if (rs->numeric) {
        connect_addr(rs, rs->host);
        return;
    }
    struct addrinfo hints = {0};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int rc = uv_getaddrinfo(rs->loop, &rs->resolve, on_resolved, rs->host, NULL, &hints);
    if (rc != 0) {
        attempt_failed(rs, uv_strerror(rc));
        return;
    }
    rs->state = STATE_RESOLVING;
}

/* Ends the connection now: every command in flight fails (NULL reply), then hiredis calls
 * on_disconnect. From inside a hiredis callback, hiredis defers the free until the callback
 * returns (REDIS_IN_CALLBACK). */
static void drop_connection(redis_store_t *rs, const char *why)
{
    redisAsyncContext *ac = rs->ac;
    if (ac == NULL)
        return;
    mph_log(MPH_LOG_WARN, "redis: dropping the connection: %s", why);
    went_down(rs); /* calls made from the failing callbacks fail fast */
    redisAsyncFree(ac);
}

static void on_tick_closed(uv_handle_t *h)
{
    redis_store_t *rs = mph_container_of((uv_timer_t *)h, redis_store_t, tick);
    void (*cb)(void *) = rs->closed_cb;
    void *ud = rs->closed_ud;
    free(rs->host);
    free(rs->sentinels);
    free(rs->master);
    free(rs->password);
    free(rs->prefix);
    free(rs);
    if (cb)
        cb(ud);
}

static void on_tick(uv_timer_t *t)
{
    redis_store_t *rs = mph_container_of(t, redis_store_t, tick);
    uint64_t now = uv_now(rs->loop);
    assert(assert_store_state(rs));
    if (rs->closing && rs->state == STATE_DOWN && mph_list_empty(&rs->inflight) &&
        rs->watch == NULL && !rs->tick_closing) {
        /* The connection is gone, no resolution runs and nothing waits: free from a libuv
         * callback, never from inside hiredis, which may still hold a pointer to us there. */
        rs->tick_closing = 1;
        uv_close((uv_handle_t *)&rs->tick, on_tick_closed);
        return;
    }
    mph_list_t *oldest = mph_list_first(&rs->inflight);
    if (rs->state == STATE_CONNECTED && oldest &&
        mph_list_entry(oldest, rop_t, node)->deadline <= now) {
        char why[96];
        snprintf(why, sizeof(why), "no reply within %u ms", rs->timeout_ms);
        drop_connection(rs, why);
    }
    if (rs->state == STATE_DOWN && !rs->closing && now >= rs->reconnect_at)
        connect_now(rs);
    if (rs->sentinels && rs->watch == NULL && !rs->closing && now >= rs->watch_at)
        watch_start(rs);
}

/* ---- Methods ---- */

/* Whether a call can be sent now: connected, or connecting while Redis was last seen up (the
 * first connection, a reconnect after a drop). During a known outage a connection attempt
 * may hang until the command timeout (a host that drops packets): calls fail at once. */
static int can_send(const redis_store_t *rs)
{
    return rs->state == STATE_CONNECTED && (rs->ready || rs->was_up);
}

/* Key `suffix` of scope S under prefix P (new, caller frees). A name with a hash tag of its
 * own ("account:{42}:savings") keeps it as THE tag of its keys: P + S + "/" + suffix, so
 * scopes that share a tag share a Cluster slot and can change in one transaction. Any other
 * name gets the tag {S}: P + "{" + S + "}:" + suffix (the layout of mphost before tags). The
 * two forms never collide: the character before the suffix is '/' in one and ':' in the
 * other, and no suffix contains either. */
static char *scope_key(const char *prefix, const char *scope, const char *suffix)
{
    size_t at, len, n = strlen(prefix) + strlen(scope) + strlen(suffix) + 4; /* {}:\0 */
    char *key = mph_xmalloc(n);
    if (mph__redis_name_tag(scope, &at, &len) == 0)
        snprintf(key, n, "%s%s/%s", prefix, scope, suffix);
    else
        snprintf(key, n, "%s{%s}:%s", prefix, scope, suffix);
    return key;
}

unsigned mph__redis_scope_slot(const char *prefix, const char *scope)
{
    char *key = scope_key(prefix, scope, "v");
    unsigned slot = mph__redis_key_slot(key, strlen(key));
    free(key);
    return slot;
}

/* A new LOAD (one scope) or COMMIT of nscopes scopes: the script, its keys, and room for
 * argc arguments in all (the caller fills those after the keys). */
static rop_t *new_op(redis_store_t *rs, op_kind_t kind, const char *const *scopes, size_t nscopes,
                     mph_store_cb cb, void *ud, size_t argc)
{
    rop_t *op = mph_xcalloc(1, sizeof(*op));
    op->rs = rs;
    op->kind = kind;
    op->cb = cb;
    op->ud = ud;
    op->shape.n = nscopes;
    op->shape.names = mph_xcalloc(nscopes, sizeof(*op->shape.names));
    op->shape.expected = mph_xcalloc(nscopes, sizeof(*op->shape.expected));
    op->shape.counts = mph_xcalloc(nscopes, sizeof(*op->shape.counts));
    op->keys = mph_xcalloc(NKEYS * nscopes, sizeof(*op->keys));
    op->numbers = mph_xcalloc(2 * nscopes, sizeof(*op->numbers));
    op->argc = (int)argc;
    op->argv = mph_xcalloc(argc, sizeof(*op->argv));
    op->argvlen = mph_xcalloc(argc, sizeof(*op->argvlen));
    const char *sha = kind == OP_COMMIT ? rs->commit_sha : rs->load_sha;
    op->sent_as_eval = sha[0] == '\0';
    op->argv[0] = op->sent_as_eval ? "EVAL" : "EVALSHA";
    op->argv[1] = !op->sent_as_eval ? sha : kind == OP_COMMIT ? CAS_SCRIPT : LOAD_SCRIPT;
    snprintf(op->numkeys, sizeof(op->numkeys), "%zu", NKEYS * nscopes);
    op->argv[2] = op->numkeys;
    op->argvlen[2] = strlen(op->argv[2]);
    static const char *const suffix[NKEYS] = {"v", "d", "log", "claim", "logsize"};
    for (size_t i = 0; i < nscopes; i++) {
        op->shape.names[i] = mph_xstrdup(scopes[i]);
        for (int k = 0; k < NKEYS; k++) {
            char *key = op->keys[NKEYS * i + k] = scope_key(rs->prefix, scopes[i], suffix[k]);
            op->argv[3 + NKEYS * i + k] = key;
            op->argvlen[3 + NKEYS * i + k] = strlen(key);
        }
    }
    op->argvlen[0] = strlen(op->argv[0]);
    op->argvlen[1] = strlen(op->argv[1]);
    return op;
}

int mph__redis_node_load(mph_store_t *s, const char *scope, int asking, mph_store_cb cb, void *ud)
{
    redis_store_t *rs = (redis_store_t *)s;
    if (rs->closing)
        return MPH_ECLOSED;
    if (!can_send(rs))
        return MPH_ESTORAGE;
    rop_t *op = new_op(rs, OP_LOAD, &scope, 1, cb, ud, 3 + NKEYS);
    op->asking = asking;
    if (send_op(op) != 0) {
        op_free(op); /* never call back before returning */
        return MPH_ESTORAGE;
    }
    return 0;
}

/* Sets argument `at` of op. */
static void set_arg(rop_t *op, size_t at, const char *text, size_t len)
{
    op->argv[at] = text;
    op->argvlen[at] = len;
}

static int redis_load(mph_store_t *s, const char *scope, mph_store_cb cb, void *ud)
{
    return mph__redis_node_load(s, scope, 0, cb, ud);
}

int mph__redis_node_commit(mph_store_t *s, const mph_store_write_t *writes, size_t nwrites,
                           int asking, mph_store_cb cb, void *ud)
{
    redis_store_t *rs = (redis_store_t *)s;
    if (rs->closing)
        return MPH_ECLOSED;
    if (!can_send(rs))
        return MPH_ESTORAGE;
    if (nwrites == 0)
        return MPH_EINVAL;
    enum { NARGS = 4 }; /* the script's ARGV before the scopes' parts (redis_cas.lua) */
    size_t argc = 3 + NKEYS * nwrites + NARGS;
    const char **names = mph_xmalloc(nwrites * sizeof(*names));
    for (size_t i = 0; i < nwrites; i++) {
        names[i] = writes[i].scope;
        argc += 2 + 2 * writes[i].n;
    }
    rop_t *op = new_op(rs, OP_COMMIT, names, nwrites, cb, ud, argc);
    op->asking = asking;
    free(names);
    snprintf(op->committer_str, sizeof(op->committer_str), "%llu",
             (unsigned long long)writes[0].committer);
    int claim = 0;
    for (size_t i = 0; i < nwrites; i++)
        claim |= writes[i].claim;
    size_t at = 3 + NKEYS * nwrites;
    const char *args[NARGS] = {rs->log_bytes_str, LOG_RECORDS, op->committer_str,
                               claim ? MPH_STR(MPH_STORE_TURN_MS) : "0"};
    for (int i = 0; i < NARGS; i++, at++)
        set_arg(op, at, args[i], strlen(args[i]));
    for (size_t i = 0; i < nwrites; i++) {
        const mph_store_write_t *w = &writes[i];
        op->shape.expected[i] = w->expected_version;
        op->shape.counts[i] = w->n;
        char *expected = op->numbers[2 * i], *count = op->numbers[2 * i + 1];
        snprintf(expected, sizeof(op->numbers[0]), "%llu", (unsigned long long)w->expected_version);
        snprintf(count, sizeof(op->numbers[0]), "%zu", w->n);
        set_arg(op, at++, expected, strlen(expected));
        set_arg(op, at++, count, strlen(count));
        for (size_t k = 0; k < w->n; k++) {
            set_arg(op, at++, w->entries[k].key, w->entries[k].klen);
            set_arg(op, at++, w->entries[k].json ? w->entries[k].json : "",
                    w->entries[k].json ? w->entries[k].jlen : 0);
        }
    }
    assert(at == argc);
    if (send_op(op) != 0) {
        op_free(op); /* never call back before returning */
        return MPH_ESTORAGE;
    }
    return 0;
}

static int redis_commit(mph_store_t *s, const mph_store_write_t *writes, size_t nwrites,
                        mph_store_cb cb, void *ud)
{
    return mph__redis_node_commit(s, writes, nwrites, 0, cb, ud);
}

int mph__redis_node_command(mph_store_t *s, const char *a, const char *b,
                            void (*cb)(void *ud, const redisReply *r), void *ud)
{
    redis_store_t *rs = (redis_store_t *)s;
    if (rs->closing)
        return MPH_ECLOSED;
    if (!can_send(rs) || !rs->ready)
        return MPH_ESTORAGE;
    const char *argv[2] = {a, b};
    rop_t *op = command_op(rs, OP_RAW, 2, argv, NULL);
    op->raw_cb = cb;
    op->ud = ud;
    if (send_op(op) != 0) {
        op_free(op);
        return MPH_ESTORAGE;
    }
    return 0;
}

static void redis_close(mph_store_t *s, void (*done)(void *ud), void *ud)
{
    redis_store_t *rs = (redis_store_t *)s;
    rs->closing = 1;
    rs->closed_cb = done;
    rs->closed_ud = ud;
    /* Pending replies still arrive (or time out); then the connection closes, on_disconnect
     * runs, and the next tick frees the store. A resolution in flight is cancelled if it has
     * not started yet, else awaited (on_resolved). */
    if (rs->state == STATE_RESOLVING)
        uv_cancel(rs->sentinels ? (uv_req_t *)&rs->locate : (uv_req_t *)&rs->resolve);
    if (rs->watch) {
        redisAsyncContext *watch = rs->watch;
        rs->watch = NULL;
        redisAsyncFree(watch); /* never called from the watch's own callbacks */
    }
    if (rs->ac)
        redisAsyncDisconnect(rs->ac);
}

static const mph_store_methods_t redis_methods = {
    MPH_STORE_METHODS_VERSION, "redis", redis_load, redis_commit, redis_close, NULL, NULL, NULL,
};

/* ---- Opening ---- */

static int is_numeric_address(const char *host)
{
    unsigned char buf[16];
    return uv_inet_pton(AF_INET, host, buf) == 0 || uv_inet_pton(AF_INET6, host, buf) == 0;
}

static void format_where(char *buf, size_t len, const char *host, int port)
{
    snprintf(buf, len, strchr(host, ':') ? "[%s]:%d" : "%s:%d", host, port);
}

/* Logs in on a blocking connection and PINGs. Returns 0, 1 (cannot connect: another address
 * may do) or MPH_ESTORAGE (the server refused a command), with a message in err. */
static int check_address(const mph_store_redis_config_t *cfg, const char *addr, const char *where,
                         char *err, size_t errlen)
{
    struct timeval tv = {2, 0};
    redisContext *c = redisConnectWithTimeout(addr, cfg->port, tv);
    if (c == NULL || c->err) {
        snprintf(err, errlen, "cannot reach Redis at %s: %s", where,
                 c ? c->errstr : "out of memory");
        if (c)
            redisFree(c);
        return 1;
    }
    redisSetTimeout(c, tv);
    char db[16];
    login_t steps[3];
    int n = login_commands(cfg->password, cfg->db, db, steps);
    steps[n++] = (login_t){{"PING", NULL}};
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        int argc = steps[i].argv[1] ? 2 : 1;
        redisReply *r = redisCommandArgv(c, argc, steps[i].argv, NULL);
        if (r == NULL || r->type == REDIS_REPLY_ERROR) {
            snprintf(err, errlen, "Redis at %s refused %s: %s", where, steps[i].argv[0],
                     r ? r->str : c->errstr);
            rc = MPH_ESTORAGE;
        }
        if (r)
            freeReplyObject(r);
    }
    redisFree(c);
    return rc;
}

/* A blocking check at start (before the loop runs), so that an unresolvable host or an
 * unreachable Redis is one clear error and a non-zero exit, not a server that fails every
 * call. Tries each of the host's addresses; sets *turn to the one that answered. */
static int check_reachable(const mph_store_redis_config_t *cfg, const char *where, unsigned *turn,
                           char *err, size_t errlen)
{
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int gai = getaddrinfo(cfg->host, NULL, &hints, &res);
    if (gai != 0) {
        snprintf(err, errlen, "cannot resolve the Redis host %s: %s", cfg->host,
                 gai == EAI_SYSTEM ? strerror(errno) : gai_strerror(gai));
        return MPH_ESTORAGE;
    }
    int rc = 1;
    snprintf(err, errlen, "cannot reach Redis at %s: no IPv4 or IPv6 address", where);
    *turn = 0;
    for (const struct addrinfo *ai = res; ai && rc == 1; ai = ai->ai_next) {
        char addr[INET6_ADDRSTRLEN];
        if (address_name(ai, addr, sizeof(addr)) != 0)
            continue;
        rc = check_address(cfg, addr, where, err, errlen);
        *turn += rc == 1; /* numbered as pick_address counts */
    }
    freeaddrinfo(res);
    return rc == 1 ? MPH_ESTORAGE : rc;
}

/* A new store that starts connecting (the unit tests call this without the check). With
 * Sentinel, it steals `sentinels` (nsentinels addresses) and cfg->host is the master's last
 * known address; else sentinels is NULL. */
static redis_store_t *store_new(uv_loop_t *loop, const mph_store_redis_config_t *cfg, unsigned turn,
                                mph__redis_addr_t *sentinels, size_t nsentinels)
{
    redis_store_t *rs = mph_xcalloc(1, sizeof(*rs));
    rs->base.methods = &redis_methods;
    rs->loop = loop;
    mph_list_init(&rs->inflight);
    mph_list_init(&rs->waiting);
    rs->host = mph_xstrdup(cfg->host);
    rs->port = cfg->port;
    rs->numeric = is_numeric_address(cfg->host) && sentinels == NULL;
    format_where(rs->where, sizeof(rs->where), cfg->host, cfg->port);
    rs->sentinels = sentinels;
    rs->nsentinels = nsentinels;
    rs->master = cfg->master ? mph_xstrdup(cfg->master) : NULL;
    rs->addr_turn = turn;
    rs->password = cfg->password ? mph_xstrdup(cfg->password) : NULL;
    rs->db = cfg->db;
    rs->prefix = mph_xstrdup(cfg->prefix ? cfg->prefix : "mp:");
    snprintf(rs->log_bytes_str, sizeof(rs->log_bytes_str), "%zu",
             cfg->log_bytes ? cfg->log_bytes : LOG_BYTES_DEFAULT);
    rs->timeout_ms = cfg->timeout_ms ? cfg->timeout_ms : 1000;
    rs->wait_replicas = cfg->wait_replicas;
    rs->wait_ms = cfg->wait_ms ? cfg->wait_ms : 1000;
    snprintf(rs->wait_args[0], sizeof(rs->wait_args[0]), "%u", rs->wait_replicas);
    snprintf(rs->wait_args[1], sizeof(rs->wait_args[1]), "%u", rs->wait_ms);
    rs->backoff_ms = BACKOFF_MIN_MS;
    rs->was_up = 1;
    rs->state = STATE_DOWN;
    uv_timer_init(loop, &rs->tick);
    uv_timer_start(&rs->tick, on_tick, TICK_MS, TICK_MS);
    connect_now(rs);
    return rs;
}

mph_store_t *mph__redis_node_new(uv_loop_t *loop, const mph_store_redis_config_t *cfg)
{
    return &store_new(loop, cfg, 0, NULL, 0)->base;
}

/* Whether the server at cfg->host:port is a Cluster member (INFO cluster); if so *slots is its
 * CLUSTER SLOTS reply (new: the caller frees it). Returns 0, or MPH_ESTORAGE with err. */
static int probe_cluster(const mph_store_redis_config_t *cfg, redisReply **slots, char *err,
                         size_t errlen)
{
    struct timeval tv = {2, 0};
    *slots = NULL;
    redisContext *c = redisConnectWithTimeout(cfg->host, cfg->port, tv);
    if (c == NULL || c->err) {
        snprintf(err, errlen, "cannot reach Redis at %s:%d: %s", cfg->host, cfg->port,
                 c ? c->errstr : "out of memory");
        if (c)
            redisFree(c);
        return MPH_ESTORAGE;
    }
    redisSetTimeout(c, tv);
    redisReply *r = cfg->password ? redisCommand(c, "AUTH %s", cfg->password) : NULL;
    if (r)
        freeReplyObject(r);
    r = redisCommand(c, "INFO cluster");
    int cluster = r && r->type == REDIS_REPLY_STRING && strstr(r->str, "cluster_enabled:1");
    if (r)
        freeReplyObject(r);
    int rc = 0;
    if (cluster) {
        *slots = redisCommand(c, "CLUSTER SLOTS");
        if (*slots == NULL || (*slots)->type != REDIS_REPLY_ARRAY) {
            snprintf(err, errlen, "Redis Cluster at %s:%d: CLUSTER SLOTS failed: %s", cfg->host,
                     cfg->port,
                     *slots && (*slots)->type == REDIS_REPLY_ERROR ? (*slots)->str : c->errstr);
            if (*slots)
                freeReplyObject(*slots);
            *slots = NULL;
            rc = MPH_ESTORAGE;
        } else if (cfg->db != 0) {
            snprintf(err, errlen, "Redis Cluster has only database 0 (the URL asks for %d)",
                     cfg->db);
            freeReplyObject(*slots);
            *slots = NULL;
            rc = MPH_ESTORAGE;
        }
    }
    redisFree(c);
    return rc;
}

int mph_store_redis_open(mph_store_t **out, uv_loop_t *loop, const mph_store_redis_config_t *cfg,
                         char *err, size_t errlen)
{
    char where[80];
    unsigned turn = 0;
    mph_store_redis_config_t c = *cfg;
    mph__redis_addr_t *sentinels = NULL, master;
    size_t nsentinels = 0;
    if (cfg->sentinels) {
        /* Ask now, so that no sentinel answering, or no master, is an error at start. */
        int rc = mph__redis_parse_addrs(cfg->sentinels, &sentinels, &nsentinels, err, errlen);
        if (rc == 0)
            rc = mph__sentinel_locate(sentinels, nsentinels, 0, cfg->master, cfg->password, 2000,
                                      &master, err, errlen);
        if (rc != 0) {
            free(sentinels);
            return rc;
        }
        c.host = master.host;
        c.port = master.port;
    }
    format_where(where, sizeof(where), c.host, c.port);
    int rc = check_reachable(&c, where, &turn, err, errlen);
    if (rc != 0) {
        free(sentinels);
        return rc;
    }
    redisReply *slots = NULL;
    if (sentinels == NULL && (rc = probe_cluster(&c, &slots, err, errlen)) != 0)
        return rc;
    if (slots) {
        rc = mph__redis_cluster_open(out, loop, &c, slots, err, errlen);
        freeReplyObject(slots);
        return rc;
    }
    *out = &store_new(loop, &c, turn, sentinels, nsentinels)->base;
    return 0;
}
