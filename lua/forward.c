/*
 * forward.c: the C half of mp.shard and mp.scatter (metaparticle.lua has the other half):
 * where a shard key sends a call, and forwarding a call to other workers from inside its
 * handler's coroutine.
 *
 * Forwarding. A router (the handler mp.shard or mp.scatter made) calls C.forward(role, first,
 * last), which records which workers are to run the call and yields: the transaction is
 * FORWARDING (internal.h). mph__txn_resume, seeing that, calls mph__forward_send, which sends
 * the call to each worker: to another one through the forwarder the host gave the bridge
 * (host/peer.c), to this one as a call of its own on this bridge (mph_lua_call_as). Either
 * way the worker runs it as a transaction of its own, in the role that says "run the inner
 * function here", and answers it once it is committed. The answers are kept in the
 * transaction, and when the last is in, the coroutine is resumed with nothing: the router
 * then asks C.forwarded() for them, which returns the results in worker order or raises the
 * error of the first worker (in worker order) that failed. Nothing is pushed onto the
 * suspended coroutine from outside, where running out of memory would have no handler (the
 * same reason as C.acquire's).
 *
 * Why this worker's own share is a call of its own, not a direct call of the leaf inside the
 * router: each share is then the same thing wherever it runs (a transaction in the role
 * "leaf", with its own retries and commit), and the router's attempt never holds the leaf's
 * scope writes, which a retry of the router would otherwise make it run twice. It costs no
 * socket: the call is made on this bridge directly.
 *
 * Time spent waiting for answers is a pause, like waiting for a scope: the handler's time
 * limit counts running stretches (mph__txn_resume sets a new deadline on each resume). A
 * forward that fails answers -32005 (host/peer.c says when); none is left unanswered, so the
 * router always resumes.
 *
 * Where a shard runs. A topology of n shards (mp.shard's workers, mp.scatter's leaves) puts
 * them on the workers of every host of the deployment (docs/hosts.md): shard s (1..n), s0 =
 * s - 1, runs on host s0 % H + 1, worker s0 / H + 1, where H is the number of hosts. Hosts
 * take the shards in turn, so a topology of n >= H shards uses every host, and each host's
 * shards fill its workers from 1 (a host runs as many workers as the largest n asks for, so
 * s0 / H + 1 <= n is always one of them). With one host, shard s is worker s, as before
 * hosts existed. Every host computes the same place from the same n and H, so the same key
 * reaches the same worker of the same host wherever the call arrives. A share on this host
 * goes through the forwarder (or is a call of its own here); one on another host through the
 * host forwarder (host/server/hosts.c), which answers -32005 "host K unavailable" when that
 * host cannot be reached.
 */
#define _POSIX_C_SOURCE 200809L
#include <lauxlib.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "json.h"

/* ---- Roles ---- */

const char *mph_lua_role_name(mph_lua_role_t role)
{
    switch (role) {
    case MPH_LUA_SHARD:
        return "shard";
    case MPH_LUA_LEAF:
        return "leaf";
    default:
        return NULL;
    }
}

int mph_lua_role_parse(const char *name, mph_lua_role_t *out)
{
    if (name[0] == '\0')
        *out = MPH_LUA_CALL;
    else if (strcmp(name, "shard") == 0)
        *out = MPH_LUA_SHARD;
    else if (strcmp(name, "leaf") == 0)
        *out = MPH_LUA_LEAF;
    else
        return MPH_EINVAL;
    return 0;
}

/* ---- Where a shard key goes ---- */

/* FNV-1a, 32 bits (the offset basis and prime of the FNV specification): simple, stable
 * across processes, machines and versions (unlike a seeded hash), and good enough at
 * spreading short keys for a modulus of at most 256. */
static uint32_t fnv1a32(const char *s, size_t len)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)s[i];
        h *= 16777619u;
    }
    return h;
}

/* Where shard s (1..n) of a topology runs: *host and *worker (see the top of the file). */
static void place(const mph_lua_t *lua, int s, int *host, int *worker)
{
    int s0 = s - 1;
    *host = s0 % lua->host_count + 1;
    *worker = s0 / lua->host_count + 1;
}

/* Pushes shard s and whether it runs here (this host, this worker). [-0, +2, -] */
static int push_shard(mph_lua_t *lua, lua_State *L, int s)
{
    int host, worker;
    place(lua, s, &host, &worker);
    lua_pushinteger(L, s);
    lua_pushboolean(L, host == lua->host_id && worker == lua->worker_id);
    return 2;
}

/* C.shard_target(key, n) -> the shard (1..n) that key belongs to, and whether it runs here:
 * an integer k goes to k % n + 1, % being the floored modulo (Lua's: -1 goes to shard n),
 * computed exactly for any integral double; a string to FNV-1a-32(string) % n + 1. Anything
 * else raises -32000 naming what keyfn returned. [-2, +2, e] */
static int l_shard_target(lua_State *L)
{
    mph_lua_t *lua = mph__lua_upvalue(L);
    int n = (int)lua_tointeger(L, 2); /* checked by mp.shard at load */
    char msg[160];
    if (lua_type(L, 1) == LUA_TSTRING) {
        size_t len;
        const char *key = lua_tolstring(L, 1, &len);
        return push_shard(lua, L, (int)(fnv1a32(key, len) % (uint32_t)n) + 1);
    }
    if (lua_type(L, 1) == LUA_TNUMBER) {
        double k = lua_tonumber(L, 1);
        if (isfinite(k) && k == floor(k)) {
            double r = fmod(k, n); /* exact; the sign of k */
            if (r < 0)
                r += n;
            return push_shard(lua, L, (int)r + 1);
        }
        snprintf(msg, sizeof(msg),
                 "mp.shard: keyfn returned %.17g, not an integer (a shard key is an integer or "
                 "a string)",
                 k);
    } else {
        snprintf(msg, sizeof(msg),
                 "mp.shard: keyfn returned %s%s (a shard key is an integer or a string)",
                 lua_isnil(L, 1) ? "" : "a ", luaL_typename(L, 1));
    }
    mph__lua_push_error(mph__lua_upvalue(L), L, MPH_RPC_HANDLER_ERROR, msg);
    return lua_error(L);
}

/* ---- Forwarding ---- */

void mph__forward_clear(mph_txn_t *t)
{
    for (int i = 0; i < t->fwd_n; i++) {
        free(t->fwd[i].json);
        free(t->fwd[i].message);
    }
    free(t->fwd);
    t->fwd = NULL;
    t->fwd_n = 0;
}

/* C.forward(role, first, last, yieldable): runs the current call on shards first..last in
 * `role` (each where place() puts it) and waits for every answer (C.forwarded reads them). Only the
 * handler's own coroutine can wait, and a call that was itself forwarded forwards nothing. [-4, +0,
 * e] */
static int l_forward(lua_State *L)
{
    mph_lua_t *lua = mph__lua_upvalue(L);
    mph_lua_role_t role;
    int first = (int)luaL_checkinteger(L, 2), last = (int)luaL_checkinteger(L, 3);
    int yieldable = lua_toboolean(L, 4);
    mph_txn_t *t = lua->current;
    const char *problem = NULL;
    if (mph_lua_role_parse(luaL_checkstring(L, 1), &role) != 0 || role == MPH_LUA_CALL ||
        first < 1 || last < first)
        problem = "C.forward: invalid arguments";
    else if (t == NULL)
        problem = "mp.shard and mp.scatter route calls only inside a service handler";
    else if (t->role != MPH_LUA_CALL)
        problem = "a call forwarded to this worker may not forward again (topologies do not "
                  "nest)";
    else if (!yieldable || L != t->co)
        problem = "mp.shard and mp.scatter route calls only from the service handler itself, "
                  "not inside a coroutine it made or a function C calls back";
    if (problem != NULL) {
        mph__lua_push_error(lua, L, MPH_RPC_INTERNAL_ERROR, problem);
        return lua_error(L);
    }
    if (t->reload != NULL) { /* the attempt is void (scopes.c): it runs again, forwarding then */
        mph__lua_push_error(lua, L, MPH_RPC_STORAGE_UNAVAILABLE, "the scope is loading");
        return lua_error(L);
    }
    mph__forward_clear(t);
    t->fwd_role = role;
    t->fwd_first = first;
    t->fwd_n = last - first + 1;
    t->fwd = mph_xcalloc((size_t)t->fwd_n, sizeof(*t->fwd));
    for (int i = 0; i < t->fwd_n; i++)
        t->fwd[i].t = t;
    mph__txn_become(t, TXN_FORWARDING);
    assert(assert_txn_state(t));
    return lua_yield(L, 0);
}

/* One answer is in (or a share failed without being sent): resume t after the last. */
static void answer_done(mph_txn_t *t)
{
    assert(t->state == TXN_FORWARDING && t->fwd_outstanding > 0);
    if (--t->fwd_outstanding == 0)
        mph__txn_resume(t, 0);
}

/* mph_lua_reply_cb of each share: keeps the answer (taking its strings). */
static void on_answer(void *ud, mph_lua_reply_t *reply)
{
    mph_fwd_answer_t *a = ud;
    assert(!a->done);
    a->done = 1;
    a->code = reply->code;
    a->json = reply->json;
    a->json_len = reply->json_len;
    a->message = reply->message;
    reply->json = reply->message = NULL;
    a->t->fwd_replayed |= reply->replayed;
    answer_done(a->t);
}

/* The JSON-RPC request that carries t's call to another worker: its method and params as
 * the caller sent them (never re-encoded from Lua, so exactly what the call got here). */
static void forward_body(const mph_txn_t *t, mph_buf_t *body)
{
    mph_buf_puts(body, "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":");
    mph_json_write_string(body, t->method, strlen(t->method)); /* UTF-8: checked on arrival */
    if (t->user != NULL) { /* verified here: the other worker runs the call as this user */
        mph_buf_puts(body, ",\"" MPH_LUA_FORWARD_USER "\":");
        mph_json_write_string(body, t->user, strlen(t->user));
    }
    if (t->idem_key != NULL) { /* a keyed call to a shard runs keyed there (idem.c) */
        mph_buf_puts(body, ",\"" MPH_LUA_FORWARD_KEY "\":");
        const char *key = t->idem_key + t->idem_key_at;
        mph_json_write_string(body, key, strlen(key)); /* printable ASCII: checked */
    }
    if (t->params != NULL) {
        mph_buf_puts(body, ",\"params\":");
        mph_json_write_jansson(body, t->params);
    }
    mph_buf_puts(body, "}");
}

void mph__forward_send(mph_txn_t *t)
{
    mph_lua_t *lua = t->lua;
    assert(assert_txn_state(t) && t->state == TXN_FORWARDING);
    mph_buf_t body = MPH_BUF_INIT;
    forward_body(t, &body);
    /* One more than the shares while sending: an answer that comes at once (this worker's
     * own share, a refusal) must not resume t before every share is sent. */
    t->fwd_outstanding = (size_t)t->fwd_n + 1;
    int n = t->fwd_n;
    for (int i = 0; i < n; i++) {
        mph_fwd_answer_t *a = &t->fwd[i];
        int host, worker;
        char msg[160];
        place(lua, t->fwd_first + i, &host, &worker);
        if (host != lua->host_id && lua->forward_host != NULL) {
            lua->forward_host(lua->forward_host_ud, host, worker, t->fwd_role, body.data, body.len,
                              on_answer, a);
            continue;
        }
        if (host == lua->host_id && worker == lua->worker_id) {
            const char *key = t->idem_key ? t->idem_key + t->idem_key_at : NULL;
            mph_lua_call_keyed(lua, t->fwd_role, t->user, key, key ? strlen(key) : 0, t->method,
                               strlen(t->method), t->params, on_answer, a);
            continue;
        }
        if (host == lua->host_id && lua->forward != NULL && worker <= lua->worker_count) {
            lua->forward(lua->forward_ud, worker, t->fwd_role, body.data, body.len, on_answer, a);
            continue;
        }
        if (host != lua->host_id)
            snprintf(msg, sizeof(msg), "host %d unavailable: this host reaches no other", host);
        else
            snprintf(msg, sizeof(msg), "worker %d unavailable: this host runs %d worker%s", worker,
                     lua->worker_count, lua->worker_count == 1 ? "" : "s");
        mph_lua_reply_t reply = {MPH_RPC_WORKER_UNAVAILABLE, NULL, 0, mph_xstrdup(msg), 0};
        on_answer(a, &reply);
    }
    mph_buf_free(&body);
    answer_done(t);
}

/* Raises the error a worker answered, with its code, message and data. [-0, +0, e] */
static int raise_answer(mph_lua_t *lua, lua_State *L, mph_fwd_answer_t *a, int worker)
{
    char err[256];
    mph__lua_push_error(lua, L, a->code, a->message ? a->message : mph_rpc_message(a->code));
    if (a->json != NULL && mph_json_push_text(L, a->json, a->json_len, err, sizeof(err)) == 0)
        lua_setfield(L, -2, "data"); /* Stack: error */
    else if (a->json != NULL)
        mph_log(MPH_LOG_WARN, "worker %d: the data of its error was dropped: %s", worker, err);
    mph__forward_clear(a->t);
    return lua_error(L);
}

/* C.forwarded() -> the results of the forward that just ended, an array in shard order;
 * or raises the error of the first shard that failed. [-0, +1, e] */
static int l_forwarded(lua_State *L)
{
    mph_lua_t *lua = mph__lua_upvalue(L);
    mph_txn_t *t = lua->current;
    assert(t != NULL && t->fwd != NULL && t->fwd_outstanding == 0);
    for (int i = 0; i < t->fwd_n; i++)
        if (t->fwd[i].code != 0)
            return raise_answer(lua, L, &t->fwd[i], t->fwd_first + i);
    lua_createtable(L, t->fwd_n, 0); /* Stack: results */
    for (int i = 0; i < t->fwd_n; i++) {
        char err[256], msg[400];
        mph_fwd_answer_t *a = &t->fwd[i];
        int rc = mph_json_push_text(L, a->json ? a->json : "null", a->json ? a->json_len : 4, err,
                                    sizeof(err));
        if (rc == MPH_JSON_ENOMEM) {
            lua_pushliteral(L, "not enough memory"); /* attempt_failed: -32603 */
            return lua_error(L);
        }
        if (rc != 0) {
            snprintf(msg, sizeof(msg), "worker %d unavailable: its result cannot be read: %s",
                     t->fwd_first + i, err);
            mph__lua_push_error(lua, L, MPH_RPC_WORKER_UNAVAILABLE, msg);
            return lua_error(L);
        }
        lua_rawseti(L, -2, i + 1);
    }
    mph_json_push_array_mt(L);
    lua_setmetatable(L, -2);
    mph__forward_clear(t);
    return 1;
}

const luaL_Reg mph__forward_helpers[] = {{"shard_target", l_shard_target},
                                         {"forward", l_forward},
                                         {"forwarded", l_forwarded},
                                         {NULL, NULL}};
