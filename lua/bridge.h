/*
 * bridge.h: lua/'s interface, the Lua side of the host as the transport sees it. One LuaJIT
 * state per host (vm.c) runs the user's script once at load time, then answers calls: each
 * call attempt runs its handler in a fresh coroutine (txn.c), so a handler that waits for
 * storage suspends without blocking the loop, and scopes.c commits what it wrote.
 */
#ifndef MPH_LUA_BRIDGE_H
#define MPH_LUA_BRIDGE_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "storage/storage.h"

typedef struct mph_lua_s mph_lua_t;

typedef struct {
    int code;        /* 0 for a result, else the JSON-RPC error code */
    char *json;      /* result JSON text, or the error's data JSON text (NULL: no data) */
    size_t json_len; /* bytes in json */
    char *message;   /* error message (NULL for a result) */
    int replayed;    /* 1: the stored reply of an earlier call with the same idempotency key
                        (mph_lua_call_keyed); nothing ran */
} mph_lua_reply_t;

/* A reply is borrowed by the callback, which may take json or message by setting the field
 * to NULL; whatever is left is freed when the callback returns. */
typedef void (*mph_lua_reply_cb)(void *ud, mph_lua_reply_t *reply);

/* What a call is (docs/topologies.md): an ordinary call, or one that another
 * worker's mp.shard or mp.scatter forwarded here, which runs the topology's inner function
 * (the shard's handler, the scatter's leaf) and forwards nothing. */
typedef enum { MPH_LUA_CALL, MPH_LUA_SHARD, MPH_LUA_LEAF } mph_lua_role_t;

/* Sends a call to another worker (host/peer.c implements it): `body` is the JSON-RPC request
 * (len bytes, borrowed for the duration of the call), to be run on worker `worker` in role
 * `role` (the body names the call's verified user, if any: MPH_LUA_FORWARD_USER). cb runs
 * exactly once and never before this returns, with the worker's reply, or
 * with -32005 when it cannot be had (the worker is gone, it did not answer in time). */
typedef void (*mph_lua_forward_fn)(void *fud, int worker, mph_lua_role_t role, const char *body,
                                   size_t len, mph_lua_reply_cb cb, void *ud);

/* Sends a call to worker `worker` of another host of the deployment (host/server/hosts.c
 * implements it; docs/hosts.md): as mph_lua_forward_fn, with the host's number (1..host_count,
 * never this one's). cb runs exactly once and never before this returns, with that worker's
 * reply, or with -32005 "host K unavailable: ..." when it cannot be had. */
typedef void (*mph_lua_forward_host_fn)(void *fud, int host, int worker, mph_lua_role_t role,
                                        const char *body, size_t len, mph_lua_reply_cb cb,
                                        void *ud);

/* The member of a forwarded call's request object that names its verified user: the worker
 * that forwards checked the credentials; the one that runs it reads this on its peer listener
 * only (host/rpc.c), which no other user's process reaches. */
#define MPH_LUA_FORWARD_USER "mphost_user"

/* A keyed call to an mp.shard service runs keyed on the shard's worker: its request object
 * carries the client's Idempotency-Key in this member, and the answer of a call that found its
 * record has this member true (the router's response then says Idempotent-Replayed). */
#define MPH_LUA_FORWARD_KEY "mphost_idempotency_key"
#define MPH_LUA_FORWARD_REPLAYED "mphost_replayed"

/* An outbound HTTP exchange, what mp.fetch and mp.rpc ask for (lua/fetch.c). Every pointer is
 * borrowed for the duration of the mph_lua_fetch_fn call only: the fetcher copies what it
 * keeps. */
typedef struct {
    const char *url;            /* NUL-terminated; http:// or https:// */
    const char *method;         /* "GET", "POST", ...: letters only (fetch.c checked) */
    const char *const *headers; /* nheaders request header lines "Name: value" (checked: no CR,
                                   LF or NUL; a name of token characters) */
    size_t nheaders;
    const char *body;    /* the request body (body_len bytes), or NULL: none */
    size_t body_len;     /* bytes in body */
    uint64_t timeout_ms; /* bounds the whole exchange, from the call to the last byte */
    const char *cafile;  /* PEM file of the CAs an https server is verified against, instead of
                            the system's; NULL: the system's */
    size_t max_body;     /* a response body longer than this fails the exchange */
} mph_lua_fetch_req_t;

/* How an exchange ended. status 0: no HTTP response (error says why); else the final
 * response's status, its header fields and its body. The callback borrows it, and may take
 * `headers` or `body` by setting the field to NULL (then it frees them); the rest is freed
 * when it returns. */
typedef struct {
    int status;         /* the HTTP status (100..599), or 0: none */
    char *error;        /* status 0: why, one line ("connection refused: ..."); else NULL */
    char *headers;      /* the response's fields as "name\0value\0" pairs in the order they
                           came, names lower-case (a name may repeat); NULL: none */
    size_t headers_len; /* bytes in headers */
    char *body;         /* the body (body_len bytes; NULL when empty) */
    size_t body_len;
} mph_lua_fetch_res_t;

typedef void (*mph_lua_fetch_cb)(void *ud, mph_lua_fetch_res_t *res);

/* Starts an outbound exchange (host/server/fetch.c implements it). Returns 0 and calls cb
 * exactly once, never before it returns: with the response, or with why none came (refused,
 * DNS, TLS, timeout, too large, cancelled by a stop). Or returns a negative code and never
 * calls cb (MPH_ECLOSED: the host is stopping), with a one-line reason in why (whylen bytes). */
typedef int (*mph_lua_fetch_fn)(void *fud, const mph_lua_fetch_req_t *req, mph_lua_fetch_cb cb,
                                void *ud, char *why, size_t whylen);

/* The name a role has on the wire and in Lua ("shard", "leaf"; NULL for MPH_LUA_CALL). */
const char *mph_lua_role_name(mph_lua_role_t role);

/* Reads a role name ("" is MPH_LUA_CALL). Returns 0, or MPH_EINVAL for an unknown name. */
int mph_lua_role_parse(const char *name, mph_lua_role_t *out);

typedef struct {
    mph_store_t *store; /* borrowed; must outlive the bridge */
    int max_retries;    /* refused commits of a call's writes before -32001; 0: one attempt,
                           no retry; negative: the default (50) */
    int debug_errors;   /* 1: handler errors carry a traceback in error.data */
    unsigned handler_timeout_ms; /* a handler running longer without a pause fails with
                                    -32003; 0: no limit (and the JIT compiler is on) */
    int worker_id;               /* mp.worker.id: this process's worker number, 1..worker_count
                                    (0: 1) */
    int worker_count;            /* mp.worker.count: workers serving the script (0: 1) */
    int watched;                 /* 1: something outside ends this process when its loop
                                    stops turning, so the JIT compiler stays on and the time
                                    limit's hook is armed only past a deadline (watchdog.h);
                                    0: with a limit, the compiler is off, the hook armed */
    size_t scope_cache;          /* idle scopes are evicted past this many bytes (estimated);
                                    0: no bound */
    mph_lua_forward_fn forward;  /* reaches the other workers; NULL: there are none (calls
                                    routed to another worker fail with -32005) */
    void *forward_ud;            /* for forward */
    int host_id;                 /* mp.worker.host: this host's number among the deployment's
                                    hosts, 1..host_count (0: 1) */
    int host_count;              /* mp.worker.hosts: the hosts that share the topologies' shards
                                    (0: 1; forward.c, "Where a shard runs") */
    mph_lua_forward_host_fn forward_host; /* reaches the other hosts; NULL: there are none */
    void *forward_host_ud;                /* for forward_host */
    mph_lua_fetch_fn fetch;   /* mp.fetch's and mp.rpc's exchanges; NULL: none (they fail) */
    void *fetch_ud;           /* for fetch */
    const char *version;      /* the host's (rpc.discover's info.version); borrowed, static */
    unsigned idempotency_ttl; /* seconds a call's idempotency record answers its duplicates
                                 (--idempotency-ttl); 0: MPH_LUA_IDEM_TTL */
} mph_lua_config_t;

/* Creates a state with the metaparticle module loaded. Returns 0 or MPH_ENOMEM. */
int mph_lua_new(mph_lua_t **out, uv_loop_t *loop, const mph_lua_config_t *cfg);

/* Runs a script: `src` of `len` bytes named `chunkname` in messages; `dir` (may be NULL) is
 * put first on package.path so the script can require its sibling modules. Returns 0, or
 * MPH_ESCRIPT with the Lua error message in err. */
int mph_lua_load(mph_lua_t *lua, const char *chunkname, const char *src, size_t len,
                 const char *dir, char *err, size_t errlen);

/* Reads and runs the script at path (see mph_lua_load). */
int mph_lua_load_file(mph_lua_t *lua, const char *path, char *err, size_t errlen);

/* Calls method (not NUL-terminated, mlen bytes) with params (borrowed; NULL when absent; an
 * array is passed as positional arguments, an object as one table). cb runs exactly once,
 * possibly before this returns: with the result once every write the handler made is
 * durable, or with the error (-32601 for an unknown or unexposed method). */
void mph_lua_call(mph_lua_t *lua, const char *method, size_t mlen, const json_t *params,
                  mph_lua_reply_cb cb, void *ud);

/* mph_lua_call in a given role (MPH_LUA_SHARD and MPH_LUA_LEAF: a call another worker
 * forwarded, by the peer listener, host/peer.c) and as a verified user (copied; NULL: none),
 * whom the handler sees as mp.user: the caller checked the credentials (host/auth.h) of a
 * method for which mph_lua_needs_auth is true, or the worker that forwarded the call did. */
void mph_lua_call_as(mph_lua_t *lua, mph_lua_role_t role, const char *user, const char *method,
                     size_t mlen, const json_t *params, mph_lua_reply_cb cb, void *ud);

/* ---- Idempotency keys (docs/idempotency.md) ----
 *
 * A call made with a key has its final reply (a result, or an error its handler raised, but
 * no transient one: -32001, -32002, -32003, -32005, nor -32600 or -32603) committed as a record
 * in the same storage commit as its writes. A later call with the same key (and the same user)
 * and the same method and params, in any process sharing the storage, within the TTL, gets
 * that reply with `replayed` set and runs nothing; with another method or params it gets
 * -32006. Concurrent duplicates: one runs, the others get its reply (the record is in a
 * scope the call's transaction reads and writes, so the same compare-and-set orders them). */

#define MPH_LUA_IDEM_KEY_MAX 200 /* bytes of a key */
#define MPH_LUA_IDEM_TTL 86400   /* seconds, the default TTL */

/* Whether key (len bytes) is a usable idempotency key: 1 to MPH_LUA_IDEM_KEY_MAX printable
 * ASCII bytes (0x20 to 0x7e). */
int mph_lua_idem_key_valid(const char *key, size_t len);

/* mph_lua_call_as with an idempotency key (klen bytes, copied; NULL: none, exactly
 * mph_lua_call_as). An invalid key is answered -32600 and runs nothing; a key on a call of an
 * mp.shard or mp.scatter service too (its handler runs in other transactions). The entry for
 * in-process callers that must run a call at most once, such as the outbox delivering a
 * message to mp.self with the message's id as the key: the reply's `replayed` tells a
 * duplicate. cb runs exactly once, possibly before this returns. */
void mph_lua_call_keyed(mph_lua_t *lua, mph_lua_role_t role, const char *user, const char *key,
                        size_t klen, const char *method, size_t mlen, const json_t *params,
                        mph_lua_reply_cb cb, void *ud);

/* Whether method (mlen bytes) is an exposed service behind mp.basicAuth: its calls need a
 * verified user, without which they fail with -32004. (One that is not exposed answers
 * -32601, as an unknown method does, with or without a user.) Reads svc.expose in Lua. */
int mph_lua_needs_auth(mph_lua_t *lua, const char *method, size_t mlen);

/* Whether the loaded script has any service behind mp.basicAuth. */
int mph_lua_uses_auth(const mph_lua_t *lua);

/* ---- The outbox (lua/outbox.c; docs/outbox.md) ----
 *
 * mp.send's messages are keys of MPH_OUTBOX_BUCKETS scopes named MPH_OUTBOX_PENDING .. bucket
 * (the bucket in decimal); those that expired, of MPH_OUTBOX_DEAD .. bucket. A message's value
 * is a JSON object: t (target: a URL or "mp.self"), m (method), p (params, JSON text), at (first
 * due), due (next due; Unix milliseconds), n (failed attempts), err (the last failure), and
 * while a deliverer holds it, lease (until, Unix ms) and by; a dead one has died (Unix ms). */
#define MPH_OUTBOX_BUCKETS 16
#define MPH_OUTBOX_PENDING "o:"
#define MPH_OUTBOX_DEAD "x:"

typedef struct {
    uint64_t pending;         /* messages in the buckets at their last claim (every process
                                 sees them all) */
    uint64_t delivered_ok;    /* deliveries answered with a result */
    uint64_t delivered_error; /* ... with a JSON-RPC error (final) */
    uint64_t dead;            /* messages that expired undelivered */
    uint64_t retries;         /* failed attempts scheduled again */
} mph_lua_outbox_stats_t;

/* Starts delivering: every bucket is claimed now, then as messages fall due. expiry_ms is
 * --send-expiry (0: the default, a day). A host calls it once it serves. */
void mph_lua_outbox_start(mph_lua_t *lua, unsigned expiry_ms);

/* Stops claiming (a host that stops): deliveries under way end; a URL delivery whose answer
 * comes later is left to its lease, which runs out, and another process sends it again. */
void mph_lua_outbox_stop(mph_lua_t *lua);

/* What /metrics shows of the bridge (host/metrics.h). */
typedef struct {
    uint64_t calls, attempts, commits, conflicts; /* since the start */
    uint64_t storage_errors; /* loads and commits that failed on a storage error */
    uint64_t lua_bytes;      /* the Lua state's memory */
    uint64_t scope_bytes;    /* the scopes kept (estimated) */
    uint64_t scopes;         /* how many (the outbox's own left out) */
    uint64_t idem_replays;   /* calls answered with a stored reply (idempotency keys) */
    mph_lua_outbox_stats_t outbox;
} mph_lua_stats_t;

/* Fills *out (cheap: a few reads). */
void mph_lua_stats(const mph_lua_t *lua, mph_lua_stats_t *out);

/* Number of calls whose callback has not run yet. */
size_t mph_lua_pending(const mph_lua_t *lua);

/* The largest n of the loaded script's topologies (mp.spread, mp.shard, mp.scatter), 0 when
 * none: how many workers the script asks for. */
int mph_lua_topology_workers(const mph_lua_t *lua);

/* Whether the script called mp.serve(). */
int mph_lua_serve_called(const mph_lua_t *lua);

/* A C function callable from Lua as require("metaparticle").c.NAME (mphost.h,
 * mph_host_function_t, has the contract): args is the Lua arguments' JSON array; it returns 0
 * with *result a JSON text, or nonzero with *result an error message (either malloc'd, freed
 * by the bridge, or NULL). */
typedef int (*mph_lua_cfunction_t)(void *ud, const char *args, size_t args_len, char **result);

/* Sets c.NAME to fn (with ud, borrowed) in the state. name is copied. Returns 0, MPH_EINVAL
 * for an empty name or one registered already, or MPH_ENOMEM. */
int mph_lua_register(mph_lua_t *lua, const char *name, mph_lua_cfunction_t fn, void *ud);

/* Fails calls still waiting with -32002, closes the bridge's handles and frees it once their
 * close callbacks have run (so run the loop afterwards), then calls closed(ud) (NULL: none).
 * The store is not closed, and the forwarder and the fetcher must have answered every forward
 * and exchange they were given (close them first). */
void mph_lua_close(mph_lua_t *lua, void (*closed)(void *ud), void *ud);

#endif
