/*
 * txn.c: transactions: one JSON-RPC call each, run as attempts of its handler.
 *
 * Each attempt gets a coroutine, new from lua_newthread or one a finished attempt left
 * (take_thread), anchored in the registry by luaL_ref until the attempt ends (a thread only
 * reachable from C would be collected). The coroutine runs I.run(rec, args...) from
 * metaparticle.lua: the handler on the call's arguments, then the write sets. A handler suspends
 * only inside C.acquire (a scope is loading), C.forward (mp.shard and mp.scatter wait for other
 * workers, forward.c) or F.start (mp.fetch and mp.rpc wait for an outbound exchange, fetch.c): each
 * ends with `return lua_yield(L, 0)`, and the scopes (scopes.c), the last answer or the exchange's
 * end resume it. One function, mph__txn_resume, owns lua_resume and tells host waits from a user's
 * stray coroutine.yield by the transaction's state.
 *
 * This file is also the one place a transaction changes state (internal.h draws the states
 * and their edges): every change goes through mph__txn_become, which checks the edge against
 * the table below and the new state's invariants (assert_txn_state); code elsewhere says which
 * state comes next, never writes t->state itself.
 *
 * Errors raised in handlers become JSON-RPC errors: an error object from mp.error (or from
 * the host, e.g. -32002) keeps its code; any other value is -32000 with its message, the
 * "file:line:" prefix removed unless tracebacks are on (--logging=debug). Lua running out of
 * memory is -32603. A call with an idempotency key whose handler raised an error that is
 * stored (idem.c, "Storing an error") is not answered yet: one more attempt commits the error
 * as the call's record, and the call is answered once that commit is durable.
 */
#define _POSIX_C_SOURCE 200809L
#include "internal.h"

#include <assert.h>
#include <ctype.h>
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "watchdog.h"

/* ---- States ---- */

/* The states each state may become: bit s of edges[from] is set when `from -> s` is drawn in
 * internal.h. RUNNING -> RUNNING is a new attempt of a running call (its last one was void)
 * or the first resume of a fresh attempt. */
#define BIT(s) (1u << (s))
static const unsigned edges[] = {
    [TXN_RUNNING] = BIT(TXN_RUNNING) | BIT(TXN_WAITING) | BIT(TXN_FORWARDING) | BIT(TXN_FETCHING) |
                    BIT(TXN_RELOAD) | BIT(TXN_QUEUED),
    [TXN_WAITING] = BIT(TXN_RUNNING),
    [TXN_FORWARDING] = BIT(TXN_RUNNING),
    [TXN_FETCHING] = BIT(TXN_RUNNING),
    [TXN_RELOAD] = BIT(TXN_RUNNING),
    [TXN_QUEUED] = BIT(TXN_COMMITTING) | BIT(TXN_RETRY) | BIT(TXN_RUNNING),
    [TXN_COMMITTING] = BIT(TXN_RETRY) | BIT(TXN_RUNNING),
    [TXN_RETRY] = BIT(TXN_RUNNING),
};

int mph__txn_may_become(mph_txn_state_t from, mph_txn_state_t to)
{
    if ((unsigned)from >= sizeof(edges) / sizeof(edges[0]) || (unsigned)to >= 32)
        return 0;
    return (edges[from] & BIT(to)) != 0;
}

void mph__txn_become(mph_txn_t *t, mph_txn_state_t to)
{
    assert(mph__txn_may_become(t->state, to));
    t->state = to;
}

/* ---- The handler time limit ----
 *
 * A count hook checks, every MPH_HOOK_INSTRUCTIONS instructions, whether the running attempt has
 * held the loop past its deadline, and raises -32003 in it if so (again and again, should the
 * handler catch it). LuaJIT runs no hooks inside JIT-compiled code, so there are two ways to
 * run it:
 *   - watched (a supervisor replaces the process when its loop stops turning): the compiler
 *     stays on, and the hook is armed only when a stretch passes its deadline (watchdog.h);
 *     a compiled loop that the hook cannot stop is the supervisor's to end;
 *   - not watched (one process, or an embedder's host): with a limit set, the compiler is off
 *     and the hook is always armed, so that every handler can be stopped.
 * Once an attempt passes its checkpoint (C.checkpoint, just before its writes merge into the
 * scope), it is not interrupted: those writes will be committed and answered. */

void mph__txn_timeout_hook(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    mph_lua_t *lua = mph__lua_owner(L);
    mph_txn_t *t = lua ? lua->current : NULL;
    if (t == NULL || t->deadline == 0 || t->past_checkpoint || uv_hrtime() < t->deadline)
        return;
    char msg[128];
    snprintf(msg, sizeof(msg), "Handler timed out: it ran for more than %llu ms",
             (unsigned long long)(lua->timeout_ns / 1000000));
    mph__lua_raise(lua, L, MPH_RPC_TIMEOUT, msg);
}

/* C.checkpoint([stale]): raises -32003 if the deadline has passed; voids the attempt (it runs
 * again) when `stale` names a scope whose state was dropped under it; else marks the attempt
 * as past the point where it may be interrupted. [-0, +0, e] */
static int l_checkpoint(lua_State *L)
{
    mph_lua_t *lua = mph__lua_upvalue(L);
    mph_txn_t *t = lua->current;
    assert(t != NULL);
    if (t->deadline != 0 && uv_hrtime() >= t->deadline) {
        char msg[128];
        snprintf(msg, sizeof(msg), "Handler timed out: it ran for more than %llu ms",
                 (unsigned long long)(lua->timeout_ns / 1000000));
        return mph__lua_raise(mph__lua_upvalue(L), L, MPH_RPC_TIMEOUT, msg);
    }
    const char *stale = lua_tostring(L, 1);
    if (t->reload == NULL && stale != NULL)
        t->reload = mph__scopes_acquired(t, stale); /* dropped by a failed commit */
    if (t->reload != NULL) /* the attempt is void: it runs again once the scope loads */
        return mph__lua_raise(mph__lua_upvalue(L), L, MPH_RPC_STORAGE_UNAVAILABLE,
                              "the scope is loading");
    t->past_checkpoint = 1;
    return 0;
}

/* C.current() -> the running attempt's record table, or nil [-0, +1, -] */
static int l_current(lua_State *L)
{
    mph_txn_t *t = mph__lua_upvalue(L)->current;
    if (t == NULL)
        lua_pushnil(L);
    else
        lua_rawgeti(L, LUA_REGISTRYINDEX, t->rec_ref);
    return 1;
}

/* C.acquire(name, yieldable) -> true when the scope is ready, or false, code, message. May
 * yield until the scope has loaded; the runner then resumes it with nothing, and the caller
 * asks again (the outcome is kept in the transaction, so the runner pushes nothing onto a
 * suspended coroutine, where an out-of-memory error would have no handler). `yieldable` is
 * coroutine.isyieldable() at the caller: false inside a callback that C called (a
 * table.sort comparator, a string.gsub function, __tostring under tostring) or in a
 * coroutine the handler made. There a load cannot be waited for: the attempt is void and
 * runs again once the scope has loaded (scopes.c, "Loading where one cannot wait").
 * [-2, +1 or +3, e] */
static int l_acquire(lua_State *L)
{
    mph_lua_t *lua = mph__lua_upvalue(L);
    const char *name = luaL_checkstring(L, 1);
    int yieldable = lua_toboolean(L, 2);
    mph_txn_t *t = lua->current;
    if (t == NULL)
        return luaL_error(L, "mp.scope.%s is only available inside a service handler", name);
    int code = 0;
    const char *why = NULL;
    int rc = mph__scopes_acquire(t, name, yieldable && L == t->co, &code, &why);
    if (rc == 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    if (rc < 0) {
        lua_pushboolean(L, 0);
        lua_pushinteger(L, code);
        lua_pushstring(L, why);
        mph__txn_clear_wake(t);
        return 3;
    }
    mph__txn_become(t, TXN_WAITING);
    assert(assert_txn_state(t));
    return lua_yield(L, 0);
}

/* C.join(name, wrote): the attempt touched scope `name` [-0, +0, -] */
static int l_join(lua_State *L)
{
    mph_lua_t *lua = mph__lua_upvalue(L);
    const char *name = luaL_checkstring(L, 1);
    assert(lua->current != NULL);
    mph__scopes_join(lua->current, name, lua_toboolean(L, 2));
    return 0;
}

/* C.set_result(...) stores the first value's JSON as the attempt's result [-0, +0, e] */
static int l_set_result(lua_State *L)
{
    mph_lua_t *lua = mph__lua_upvalue(L);
    mph_txn_t *t = lua->current;
    assert(t != NULL);
    lua_settop(L, 1); /* extra results are ignored; none is null */
    char err[512];
    t->result.len = 0;
    int rc = mph_json_encode(L, 1, "result", &t->result, err, sizeof(err));
    if (rc == MPH_JSON_ENOMEM) {
        t->result.len = 0;
        return mph__lua_raise_nomem(L);
    }
    if (rc != 0) {
        t->result.len = 0;
        char msg[600];
        snprintf(msg, sizeof(msg), "cannot encode the result: %s", err);
        return mph__lua_raise(mph__lua_upvalue(L), L, MPH_RPC_INTERNAL_ERROR, msg);
    }
    return 0;
}

const luaL_Reg mph__txn_helpers[] = {
    {"current", l_current},       {"acquire", l_acquire},       {"join", l_join},
    {"set_result", l_set_result}, {"checkpoint", l_checkpoint}, {NULL, NULL}};

/* ---- Calls and attempts ---- */

static void txn_free(mph_txn_t *t)
{
    mph_lua_t *lua = t->lua;
    assert(t->co == NULL && !mph_list_is_linked(&t->node)); /* in no queue any more */
    mph__forward_clear(t);
    mph__fetch_clear(t);
    json_decref(t->params);
    free(t->method);
    free(t->user);
    free(t->wake_message);
    mph_buf_free(&t->result);
    mph__idem_free(t);
    mph__scopes_unpin(t);
    if (t->scopes != t->scopes_inline)
        free(t->scopes);
    free(t);
    lua->pending_calls--;
}

void mph__txn_clear_wake(mph_txn_t *t)
{
    free(t->wake_message);
    t->wake_message = NULL;
    t->wake_code = 0;
}

/* I.close_record(rec), under lua_cpcall. [-0, +0, e] */
static int close_record(lua_State *L)
{
    mph_txn_t *t = lua_touserdata(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->rec_ref);
    mph__lua_call_internal(t->lua, L, "close_record", 1, 0);
    return 0;
}

/* A coroutine for an attempt, its registry ref in *ref: a spare one (lua->spare_threads) when
 * there is one, else a new one. A spare gets the globals a new one would have: a handler may
 * have changed its own (setfenv(0, ...)). [-0, +0, m] */
static lua_State *take_thread(mph_lua_t *lua, lua_State *L, int *ref)
{
    if (lua->nspare_threads == 0) {
        lua_State *co = lua_newthread(L);
        *ref = luaL_ref(L, LUA_REGISTRYINDEX);
        return co;
    }
    *ref = lua->spare_threads[--lua->nspare_threads];
    lua_rawgeti(L, LUA_REGISTRYINDEX, *ref);
    lua_State *co = lua_tothread(L, -1);
    lua_pop(L, 1);
    lua_pushvalue(L, LUA_GLOBALSINDEX);
    lua_xmove(L, co, 1);
    lua_replace(co, LUA_GLOBALSINDEX);
    return co;
}

/* Keeps the coroutine of an attempt that returned (its stack is empty, it can run another
 * function) as a spare, when there is room. */
static void keep_thread(mph_txn_t *t)
{
    mph_lua_t *lua = t->lua;
    size_t room = sizeof(lua->spare_threads) / sizeof(lua->spare_threads[0]);
    if (t->co == NULL || lua_status(t->co) != 0 || (size_t)lua->nspare_threads == room)
        return;
    lua_settop(t->co, 0);
    lua->spare_threads[lua->nspare_threads++] = t->co_ref;
    t->co_ref = LUA_NOREF; /* end_attempt leaves it in the registry */
}

/* Ends the attempt's coroutine: its roots are closed and it is left to the collector. Safe on
 * a half-made attempt (refs taken, no coroutine yet). */
static void end_attempt(mph_txn_t *t, int close_roots)
{
    lua_State *L = t->lua->L;
    /* A root exists only for a scope acquired (metaparticle.lua's open_scope): none to close
     * for the calls that touched no scope, which spares them a protected call. */
    if (close_roots && t->rec_ref != LUA_NOREF && t->nscopes > 0)
        mph__lua_protect(t->lua, close_record, t, "closing a record");
    /* luaL_unref writes into slots that exist: it allocates nothing. */
    luaL_unref(L, LUA_REGISTRYINDEX, t->co_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, t->rec_ref);
    t->co_ref = t->rec_ref = LUA_NOREF;
    t->co = NULL;
}

static void deliver(mph_txn_t *t, int code, const char *message, mph_buf_t *data)
{
    /* A shard's replay is counted where it happened, and said here. */
    mph_lua_reply_t reply = {code, NULL, 0, NULL, t->replayed || t->fwd_replayed};
    t->lua->stats.idem_replays += (uint64_t)t->replayed;
    if (data && data->len)
        reply.json = mph_buf_steal(data, &reply.json_len);
    if (code != 0)
        reply.message = mph_xstrdup(message ? message : mph_rpc_message(code));
    assert(code != 0 || reply.json != NULL); /* a result always has a text */
    end_attempt(t, 1);
    t->cb(t->ud, &reply);
    free(reply.json);
    free(reply.message);
    txn_free(t);
}

void mph__txn_reply(mph_txn_t *t, int code, const char *message)
{
    assert(code != 0);
    t->replayed = 0; /* a failure of this attempt, not the stored reply it may have read */
    deliver(t, code, message, NULL);
}

void mph__txn_reply_result(mph_txn_t *t)
{
    if (mph__idem_probed(t))
        return;            /* a keyed call found no record: its handler runs now (idem.c) */
    if (t->outcome != 0) { /* a stored reply, or the refusal of a key's reuse (idem.c) */
        deliver(t, t->outcome, t->outcome_message, &t->result);
        return;
    }
    if (t->result.len == 0)
        mph_buf_puts(&t->result, "null");
    deliver(t, 0, NULL, &t->result);
}

/* Removes a leading "chunk:line: " that error() adds to string messages. */
static const char *strip_position(const char *msg)
{
    const char *colon = strchr(msg, ':');
    if (colon == NULL || colon == msg)
        return msg;
    const char *p = colon + 1;
    if (!isdigit((unsigned char)*p))
        return msg;
    while (isdigit((unsigned char)*p))
        p++;
    if (p[0] == ':' && p[1] == ' ')
        return p + 2;
    return msg;
}

/* What attempt_failed reads out of the error value, under lua_cpcall. */
typedef struct {
    mph_txn_t *t;
    int code;
    char *message; /* owned */
    mph_buf_t data;
} failure_t;

/* Reads an error object of the module's error_mt at err_idx into f. A forged one (a table
 * given error_mt by hand) with a code that is not a nonzero int32 is -32603. [-0, +0, e] */
static void read_error_object(lua_State *L, int err_idx, failure_t *f)
{
    char err[256];
    lua_getfield(L, err_idx, "code");
    double code = lua_tonumber(L, -1);
    if (lua_type(L, -1) != LUA_TNUMBER || code != (double)(int32_t)code || code == 0) {
        f->code = MPH_RPC_INTERNAL_ERROR;
        f->message = mph_xstrdup("invalid error object: its code must be a nonzero integer "
                                 "in the int32 range");
        return;
    }
    f->code = (int)code;
    lua_getfield(L, err_idx, "message");
    f->message = mph_xstrdup(lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1)
                                                            : mph_rpc_message(f->code));
    lua_getfield(L, err_idx, "data"); /* Stack: error, code, message, data */
    if (lua_isnil(L, -1))
        return;
    if (mph_json_encode(L, -1, "data", &f->data, err, sizeof(err)) != 0) {
        f->data.len = 0;
        mph_log(MPH_LOG_WARN, "%s: error data dropped: %s", f->t->method, err);
    }
}

/* The error value on top of the dead coroutine becomes f's code, message and data.
 * [-0, +0, e] */
static int read_failure(lua_State *L)
{
    failure_t *f = lua_touserdata(L, 1);
    mph_txn_t *t = f->t;
    mph_lua_t *lua = t->lua;
    lua_xmove(t->co, L, 1); /* Stack: ud, error */
    int err_idx = lua_gettop(L);
    int is_rpc_error = 0;
    if (lua_type(L, err_idx) == LUA_TTABLE && lua_getmetatable(L, err_idx)) {
        mph__lua_get_internal(lua, L, "error_mt"); /* Stack: ud, error, mt, error_mt */
        is_rpc_error = lua_rawequal(L, -1, -2);
        lua_settop(L, err_idx);
    }
    if (is_rpc_error) {
        read_error_object(L, err_idx, f);
        return 0;
    }
    const char *raw = lua_type(L, err_idx) == LUA_TSTRING || lua_type(L, err_idx) == LUA_TNUMBER
                          ? lua_tostring(L, err_idx)
                          : NULL;
    if (raw == NULL)
        raw = "(error object is not a string)";
    if (strcmp(raw, NOMEM_MESSAGE) == 0) { /* raised again by a handler that caught it */
        f->code = MPH_RPC_INTERNAL_ERROR;
        f->message = mph_xstrdup("Internal error: " NOMEM_MESSAGE);
        return 0;
    }
    if (lua->debug_errors) {
        luaL_traceback(L, t->co, raw, 0); /* Stack: ud, error, traceback */
        const char *tb = lua_tostring(L, -1);
        mph_json_write_string(&f->data, tb, strlen(tb));
        f->message = mph_xstrdup(raw);
    } else {
        f->message = mph_xstrdup(strip_position(raw));
    }
    mph_log(MPH_LOG_INFO, "%s raised: %s", t->method, raw);
    return 0;
}

static void start_attempt(mph_txn_t *t, int keep_failure);

/* The attempt raised (status from lua_resume): the error value is on top of t->co. It is
 * moved to the main state and read there (a dead coroutine is only good for its traceback). */
static void attempt_failed(mph_txn_t *t, int status)
{
    failure_t f = {t, MPH_RPC_HANDLER_ERROR, NULL, MPH_BUF_INIT};
    if (status == LUA_ERRMEM ||
        mph__lua_protect(t->lua, read_failure, &f, "reading a handler's error") != 0) {
        mph_log(MPH_LOG_WARN, "%s: Lua ran out of memory", t->method);
        f.code = MPH_RPC_INTERNAL_ERROR;
        free(f.message);
        f.message = mph_xstrdup("Internal error: " NOMEM_MESSAGE);
        f.data.len = 0;
    }
    if (mph__idem_keep_failure(t, f.code, &f.message, &f.data)) {
        /* The call has an idempotency key: its error is committed as its record first (the
         * next attempt stores it, idem.c) and answered once that commit is durable. */
        end_attempt(t, 1);
        start_attempt(t, 1);
        return;
    }
    deliver(t, f.code, f.message, &f.data);
    free(f.message);
    mph_buf_free(&f.data);
}

void mph__txn_resume(mph_txn_t *t, int nargs)
{
    mph_lua_t *lua = t->lua;
    mph_txn_t *outer = lua->current;
    lua->current = t;
    mph__txn_become(t, TXN_RUNNING);
    assert(assert_txn_state(t));
    t->deadline = lua->timeout_ns ? uv_hrtime() + lua->timeout_ns : 0; /* per running stretch */
    uint64_t outer_deadline = lua->watchdog ? mph_watchdog_enter(lua->watchdog, t->deadline) : 0;
    int status = lua_resume(t->co, nargs);
    if (lua->watchdog)
        mph_watchdog_leave(lua->watchdog, outer_deadline);
    lua->current = outer;
    if (status == LUA_YIELD && t->state == TXN_WAITING)
        return; /* the runner resumes it when the scope has loaded */
    if (status == LUA_YIELD && t->state == TXN_FORWARDING) {
        mph__forward_send(t); /* the answers resume it, perhaps before this returns */
        return;
    }
    if (status == LUA_YIELD && t->state == TXN_FETCHING)
        return; /* the exchange's end resumes it (never before this returns) */
    if (t->reload != NULL) {
        /* The attempt touched a scope that was not loaded where it could not wait: whatever
         * it did next is void. It runs again once the scope has loaded. */
        end_attempt(t, 1);
        mph__scopes_reload(t);
        return;
    }
    switch (status) {
    case LUA_YIELD:
        mph__txn_reply(t, MPH_RPC_INTERNAL_ERROR,
                       "a handler may not yield: coroutine.yield outside a coroutine it made");
        return;
    case 0:
        keep_thread(t);
        end_attempt(t, 0);
        mph__scopes_finished(t);
        return;
    default:
        attempt_failed(t, status);
        return;
    }
}

/* What mph__txn_start_attempt hands to setup_attempt. */
typedef struct {
    mph_txn_t *t;
    int code;      /* 0, or the error to answer */
    char msg[320]; /* its message */
    int nargs;     /* what I.run gets: rec, and the arguments unless they are in rec.args */
} setup_t;

/* Arguments passed to I.run on the coroutine's stack, which has LUA_MINSTACK (20) free slots
 * when it starts: with I.run and rec, at most 18. More go in a table (rec.args). */
#define ARGS_ON_STACK 16

/* Pushes the call's arguments (params) for I.run: up to ARGS_ON_STACK on the stack, above the
 * record at the top, or more in rec.args and rec.nargs. Returns how many it left on the stack,
 * or -1 with the error in c. [-0, +(result), m] */
static int push_args(lua_State *L, mph_txn_t *t, setup_t *c)
{
    size_t n = json_is_array(t->params) ? json_array_size(t->params) : t->params ? 1 : 0;
    if (n > 200) {
        c->code = MPH_RPC_INVALID_PARAMS;
        snprintf(c->msg, sizeof(c->msg), "Invalid params: more than 200 positional");
        return -1;
    }
    int on_stack = n <= ARGS_ON_STACK;
    if (!on_stack)
        lua_createtable(L, (int)n, 0); /* Stack: ..., rec, args */
    lua_checkstack(L, ARGS_ON_STACK + 4);
    char err[256];
    for (size_t i = 0; i < n; i++) {
        const json_t *v = json_is_array(t->params) ? json_array_get(t->params, i) : t->params;
        if (mph_json_push(L, v, err, sizeof(err)) != 0) {
            c->code = MPH_RPC_INVALID_PARAMS;
            snprintf(c->msg, sizeof(c->msg), "Invalid params: %s", err);
            return -1;
        }
        if (!on_stack)
            lua_rawseti(L, -2, (int)(i + 1));
    }
    if (on_stack)
        return (int)n;
    lua_setfield(L, -2, "args");
    lua_pushinteger(L, (lua_Integer)n);
    lua_setfield(L, -2, "nargs");
    return 0;
}

/* Makes the attempt's record (roots, handler, arguments) and coroutine, the coroutine's stack
 * holding I.run, the record and the arguments (c->nargs with the record); under lua_cpcall.
 * [-0, +0, e] */
static int setup_attempt(lua_State *L)
{
    setup_t *c = lua_touserdata(L, 1);
    mph_txn_t *t = c->t;
    mph_lua_t *lua = t->lua;
    /* The outbox's own calls find their operation in I.outbox_services (outbox.lua). */
    mph__lua_get_internal(lua, L, t->internal ? "outbox_services" : "services");
    lua_getfield(L, -1, t->method); /* Stack: ud, services, svc */
    int exposed = 0;
    if (lua_istable(L, -1)) {
        lua_getfield(L, -1, "expose");
        exposed = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    if (!exposed) {
        c->code = MPH_RPC_METHOD_NOT_FOUND;
        snprintf(c->msg, sizeof(c->msg), "Method not found");
        return 0;
    }
    lua_getfield(L, -1, "reads"); /* Stack: ud, services, svc, reads */
    const char *reads = lua_tostring(L, -1);
    t->cached_reads = reads != NULL && strcmp(reads, "cached") == 0;
    lua_pop(L, 1);
    lua_createtable(L, 0, 4); /* Stack: ud, services, svc, rec */
    lua_newtable(L);
    lua_setfield(L, -2, "roots");
    lua_getfield(L, -2, "handler");
    lua_setfield(L, -2, "handler");
    if (t->user) { /* mp.user (metaparticle.lua reads it there) */
        lua_pushstring(L, t->user);
        lua_setfield(L, -2, "user");
    }
    const char *role = mph_lua_role_name(t->role);
    if (role != NULL) { /* rec.role: what the topology's handler runs (metaparticle.lua) */
        lua_pushstring(L, role);
        lua_setfield(L, -2, "role");
    }
    if (t->idem_key) /* rec.idem: the call's key (idem.c) */
        mph__idem_push(t, L);
    int n = push_args(L, t, c); /* Stack: ..., rec[, args...] */
    if (n < 0)
        return 0;
    int rec = lua_gettop(L) - n;
    lua_pushvalue(L, rec);
    t->rec_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_State *co = take_thread(lua, L, &t->co_ref);
    t->co = co;
    mph__lua_get_internal(lua, L, "run");
    lua_insert(L, rec); /* Stack: ..., run, rec[, args...] */
    c->nargs = 1 + n;
    /* A coroutine has LUA_MINSTACK free slots when new or spare: no allocation. */
    lua_xmove(L, co, 1 + c->nargs);
    return 0;
}

/* Starts an attempt; keep_failure: it only stores the error the last one raised (idem.c). */
static void start_attempt(mph_txn_t *t, int keep_failure)
{
    t->attempts++;
    t->lua->stats.attempts += !t->quiet;
    mph__scopes_unpin(t);
    t->reload = NULL;
    t->past_checkpoint = 0;
    t->result.len = 0;
    mph__txn_clear_wake(t);
    mph__forward_clear(t);
    mph__fetch_clear(t);
    mph__idem_reset(t, keep_failure);
    mph__txn_become(t, TXN_RUNNING);
    setup_t c = {t, 0, "", 0};
    if (mph__lua_protect(t->lua, setup_attempt, &c, "starting a call") != 0) {
        mph__txn_reply(t, MPH_RPC_INTERNAL_ERROR, "Internal error: " NOMEM_MESSAGE);
        return;
    }
    if (c.code != 0) {
        mph__txn_reply(t, c.code, c.msg);
        return;
    }
    mph__txn_resume(t, c.nargs); /* co stack: run, rec[, args...] -> I.run(rec[, ...]) */
}

void mph__txn_start_attempt(mph_txn_t *t)
{
    start_attempt(t, 0);
}

void mph_lua_call(mph_lua_t *lua, const char *method, size_t mlen, const json_t *params,
                  mph_lua_reply_cb cb, void *ud)
{
    mph_lua_call_as(lua, MPH_LUA_CALL, NULL, method, mlen, params, cb, ud);
}

/* A new transaction of a call (not started); quiet: see mph_txn_t. */
static mph_txn_t *txn_new(mph_lua_t *lua, mph_lua_role_t role, const char *user, const char *method,
                          size_t mlen, const json_t *params, mph_lua_reply_cb cb, void *ud,
                          int quiet)
{
    mph_txn_t *t = mph_xcalloc(1, sizeof(*t));
    t->quiet = quiet;
    t->lua = lua;
    t->role = role;
    t->method = mph_xstrndup(method, mlen);
    t->user = user ? mph_xstrdup(user) : NULL;
    t->params = params ? json_incref((json_t *)params) : NULL;
    t->cb = cb;
    t->ud = ud;
    t->co_ref = t->rec_ref = LUA_NOREF;
    t->scopes = t->scopes_inline;
    t->scopes_cap = 2;
    lua->stats.calls += !quiet;
    lua->pending_calls++;
    return t;
}

void mph_lua_call_as(mph_lua_t *lua, mph_lua_role_t role, const char *user, const char *method,
                     size_t mlen, const json_t *params, mph_lua_reply_cb cb, void *ud)
{
    mph_lua_call_keyed(lua, role, user, NULL, 0, method, mlen, params, cb, ud);
}

void mph_lua_call_keyed(mph_lua_t *lua, mph_lua_role_t role, const char *user, const char *key,
                        size_t klen, const char *method, size_t mlen, const json_t *params,
                        mph_lua_reply_cb cb, void *ud)
{
    mph_txn_t *t = txn_new(lua, role, user, method, mlen, params, cb, ud, 0);
    if (lua->closing || memchr(method, '\0', mlen) != NULL) {
        mph__txn_reply(t, lua->closing ? MPH_RPC_STORAGE_UNAVAILABLE : MPH_RPC_METHOD_NOT_FOUND,
                       lua->closing ? "Shutting down" : "Method not found");
        return;
    }
    const char *why = key ? mph__idem_init(t, key, klen) : NULL;
    if (why != NULL) {
        mph__txn_reply(t, MPH_RPC_INVALID_REQUEST, why);
        return;
    }
    mph__txn_start_attempt(t);
}

void mph__txn_call_internal(mph_lua_t *lua, const char *op, const json_t *params, const char *user,
                            int quiet, mph_lua_reply_cb cb, void *ud)
{
    mph_txn_t *t = txn_new(lua, MPH_LUA_CALL, user, op, strlen(op), params, cb, ud, quiet);
    t->internal = 1;
    if (lua->closing) {
        mph__txn_reply(t, MPH_RPC_STORAGE_UNAVAILABLE, "Shutting down");
        return;
    }
    mph__txn_start_attempt(t);
}
