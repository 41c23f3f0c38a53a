/*
 * bridge.c: one LuaJIT state per host; the metaparticle module; a coroutine per call attempt.
 *
 * Each attempt gets a coroutine from lua_newthread, anchored in the registry by luaL_ref
 * until the attempt ends (a thread only reachable from C would be collected). The coroutine
 * runs I.run(rec, handler, args...) from metaparticle.lua: the handler, then the write sets.
 * A handler suspends only inside C.acquire (a scope is loading): that C function ends with
 * `return lua_yield(L, 0)` and the runner resumes it with the outcome. One function,
 * mph__txn_resume, owns lua_resume and tells host waits from a user's stray
 * coroutine.yield by the transaction's state.
 *
 * Errors raised in handlers become JSON-RPC errors: an error object from mp.error (or from
 * the host, e.g. -32002) keeps its code; any other value is -32000 with its message, the
 * "file:line:" prefix removed unless tracebacks are on (--logging=debug).
 */
#define _POSIX_C_SOURCE 200809L
#include "bridge.h"

#include <assert.h>
#include <ctype.h>
#include <lauxlib.h>
#include <luajit.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "json.h"
#include "metaparticle_lua.h" /* generated from metaparticle.lua: mph_metaparticle_lua[] */

#define DEFAULT_MAX_RETRIES 50

/* ---- Helpers ---- */

void mph__lua_get_internal(mph_lua_t *lua, lua_State *L, const char *name)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, lua->internal_ref); /* I */
    lua_getfield(L, -1, name);                            /* I, I[name] */
    lua_remove(L, -2);                                    /* I[name] */
}

static mph_lua_t *upvalue_lua(lua_State *L)
{
    return lua_touserdata(L, lua_upvalueindex(1));
}

/* Raises a JSON-RPC error object (the module's error_mt) with `code` and `message`. */
static int raise_error_object(mph_lua_t *lua, lua_State *L, int code, const char *message)
{
    lua_createtable(L, 0, 2);
    lua_pushinteger(L, code);
    lua_setfield(L, -2, "code");
    lua_pushstring(L, message);
    lua_setfield(L, -2, "message");
    mph__lua_get_internal(lua, L, "error_mt");
    lua_setmetatable(L, -2);
    return lua_error(L);
}

static int raise_rpc_error(lua_State *L, int code, const char *message)
{
    return raise_error_object(upvalue_lua(L), L, code, message);
}

/* ---- The handler time limit ----
 *
 * A count hook checks, every HOOK_INSTRUCTIONS instructions, whether the running attempt has
 * held the loop past its deadline, and raises -32003 in it if so (again and again, should the
 * handler catch it). LuaJIT runs no hooks inside JIT-compiled code, so with a limit set the
 * compiler is turned off: handlers run in LuaJIT's interpreter (for the examples and
 * benchmarks that costs nothing measurable; the time goes to I/O). Once an attempt passes its
 * checkpoint (C.checkpoint, just before its writes merge into the scope), it is not
 * interrupted: those writes will be committed and answered. */

#define HOOK_INSTRUCTIONS 10000

static char lua_owner_key; /* registry[&lua_owner_key] = the mph_lua_t */

static void timeout_hook(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    lua_pushlightuserdata(L, &lua_owner_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    mph_lua_t *lua = lua_touserdata(L, -1);
    lua_pop(L, 1);
    mph_txn_t *t = lua ? lua->current : NULL;
    if (t == NULL || t->deadline == 0 || t->past_checkpoint || uv_hrtime() < t->deadline)
        return;
    char msg[128];
    snprintf(msg, sizeof(msg), "Handler timed out: it ran for more than %llu ms",
             (unsigned long long)(lua->timeout_ns / 1000000));
    raise_error_object(lua, L, MPH_RPC_TIMEOUT, msg);
}

/* C.checkpoint(): raises -32003 if the deadline has passed, else marks the attempt as past
 * the point where it may be interrupted. [-0, +0, e] */
static int l_checkpoint(lua_State *L)
{
    mph_lua_t *lua = upvalue_lua(L);
    mph_txn_t *t = lua->current;
    assert(t != NULL);
    if (t->deadline != 0 && uv_hrtime() >= t->deadline) {
        char msg[128];
        snprintf(msg, sizeof(msg), "Handler timed out: it ran for more than %llu ms",
                 (unsigned long long)(lua->timeout_ns / 1000000));
        return raise_rpc_error(L, MPH_RPC_TIMEOUT, msg);
    }
    t->past_checkpoint = 1;
    return 0;
}

/* ---- The C helpers metaparticle.lua receives as `C` ---- */

/* C.log(level, message) [-0, +0, -] */
static int l_log(lua_State *L)
{
    int level = (int)luaL_checkinteger(L, 1);
    const char *msg = luaL_checkstring(L, 2);
    if (level < MPH_LOG_TRACE || level > MPH_LOG_ERROR)
        level = MPH_LOG_INFO;
    mph_log((mph_log_level_t)level, "lua: %s", msg);
    return 0;
}

/* C.serve() [-0, +0, -] */
static int l_serve(lua_State *L)
{
    upvalue_lua(L)->serve_called = 1;
    return 0;
}

/* C.current() -> the running attempt's record table, or nil [-0, +1, -] */
static int l_current(lua_State *L)
{
    mph_txn_t *t = upvalue_lua(L)->current;
    if (t == NULL)
        lua_pushnil(L);
    else
        lua_rawgeti(L, LUA_REGISTRYINDEX, t->rec_ref);
    return 1;
}

/* C.acquire(name) -> nil when the scope is ready, or a message why not. May yield until the
 * scope has loaded; the runner resumes with the same two outcomes. [-1, +1, e] */
static int l_acquire(lua_State *L)
{
    mph_lua_t *lua = upvalue_lua(L);
    const char *name = luaL_checkstring(L, 1);
    mph_txn_t *t = lua->current;
    if (t == NULL)
        return luaL_error(L, "mp.scope.%s is only available inside a service handler", name);
    const char *why = NULL;
    int rc = mph__runner_acquire(t, name, L == t->co, &why);
    if (rc == 0)
        return 0;
    if (rc < 0) {
        lua_pushstring(L, why);
        return 1;
    }
    t->state = TXN_WAITING;
    return lua_yield(L, 0);
}

/* C.join(name, wrote): the attempt touched scope `name` [-0, +0, -] */
static int l_join(lua_State *L)
{
    mph_lua_t *lua = upvalue_lua(L);
    const char *name = luaL_checkstring(L, 1);
    assert(lua->current != NULL);
    mph__runner_join(lua->current, name, lua_toboolean(L, 2));
    return 0;
}

/* C.encode(value, path) -> JSON text; raises -32000 naming the path [-0, +1, e] */
static int l_encode(lua_State *L)
{
    const char *root = luaL_optstring(L, 2, NULL);
    char err[512];
    mph_buf_t out = MPH_BUF_INIT;
    if (mph_json_encode(L, 1, root, &out, err, sizeof(err)) != 0) {
        mph_buf_free(&out);
        return raise_rpc_error(L, MPH_RPC_HANDLER_ERROR, err);
    }
    lua_pushlstring(L, out.data, out.len);
    mph_buf_free(&out);
    return 1;
}

/* C.decode(text) -> value [-0, +1, e] */
static int l_decode(lua_State *L)
{
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len);
    char err[256];
    if (mph_json_push_text(L, text, len, err, sizeof(err)) != 0)
        return luaL_error(L, "%s", err);
    return 1;
}

/* C.set_result(...) stores the first value's JSON as the attempt's result [-0, +0, e] */
static int l_set_result(lua_State *L)
{
    mph_lua_t *lua = upvalue_lua(L);
    mph_txn_t *t = lua->current;
    assert(t != NULL);
    lua_settop(L, 1); /* extra results are ignored; none is null */
    char err[512];
    t->result.len = 0;
    if (mph_json_encode(L, 1, "result", &t->result, err, sizeof(err)) != 0) {
        t->result.len = 0;
        char msg[600];
        snprintf(msg, sizeof(msg), "cannot encode the result: %s", err);
        return raise_rpc_error(L, MPH_RPC_INTERNAL_ERROR, msg);
    }
    return 0;
}

static const luaL_Reg helper_functions[] = {{"log", l_log},
                                            {"serve", l_serve},
                                            {"current", l_current},
                                            {"acquire", l_acquire},
                                            {"join", l_join},
                                            {"encode", l_encode},
                                            {"decode", l_decode},
                                            {"set_result", l_set_result},
                                            {"checkpoint", l_checkpoint},
                                            {NULL, NULL}};

/* Runs metaparticle.lua with the helper table; leaves package.loaded.metaparticle = M and
 * keeps I in the registry. [-0, +0, m] */
static int open_module(mph_lua_t *lua)
{
    lua_State *L = lua->L;
    int base = lua_gettop(L);
    if (luaL_loadbuffer(L, (const char *)mph_metaparticle_lua, mph_metaparticle_lua_len,
                        "=metaparticle.lua") != 0)
        goto fail;
    /* Stack: chunk */
    lua_createtable(L, 0, 16);
    for (const luaL_Reg *r = helper_functions; r->name; r++) {
        lua_pushlightuserdata(L, lua);
        lua_pushcclosure(L, r->func, 1);
        lua_setfield(L, -2, r->name);
    }
    lua_pushlightuserdata(L, NULL);
    lua_setfield(L, -2, "null");
    lua_newtable(L);
    lua_setfield(L, -2, "deleted");
    mph_json_push_array_mt(L);
    lua_setfield(L, -2, "array_mt");
    mph_json_push_object_mt(L);
    lua_setfield(L, -2, "object_mt");
    /* Stack: chunk, C */
    if (lua_pcall(L, 1, 2, 0) != 0)
        goto fail;
    /* Stack: M, I */
    lua->internal_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "loaded");
    lua_pushvalue(L, -3);
    lua_setfield(L, -2, "metaparticle");
    lua_settop(L, base);
    return 0;
fail:
    mph_log(MPH_LOG_ERROR, "cannot load the metaparticle module: %s", lua_tostring(L, -1));
    lua_settop(L, base);
    return MPH_ESCRIPT;
}

/* ---- Lifecycle ---- */

int mph_lua_new(mph_lua_t **out, uv_loop_t *loop, const mph_lua_config_t *cfg)
{
    mph_lua_t *lua = mph_xcalloc(1, sizeof(*lua));
    lua->loop = loop;
    lua->store = cfg->store;
    lua->max_retries = cfg->max_retries >= 0 ? cfg->max_retries : DEFAULT_MAX_RETRIES;
    lua->debug_errors = cfg->debug_errors;
    lua->timeout_ns = (uint64_t)cfg->handler_timeout_ms * 1000000;
    /* Distinct per process (and per host within one): seeds the retry jitter too. */
    lua->committer = (uv_hrtime() ^ ((uint64_t)getpid() << 40) ^ (uint64_t)(uintptr_t)lua) | 1;
    srand((unsigned)(lua->committer ^ (lua->committer >> 32)));
    lua->internal_ref = LUA_NOREF;
    lua->L = luaL_newstate();
    if (lua->L == NULL) {
        free(lua);
        return MPH_ENOMEM;
    }
    luaL_openlibs(lua->L);
    mph_json_init(lua->L);
    lua_pushlightuserdata(lua->L, &lua_owner_key);
    lua_pushlightuserdata(lua->L, lua);
    lua_rawset(lua->L, LUA_REGISTRYINDEX);
    if (lua->timeout_ns) {
        luaJIT_setmode(lua->L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
        lua_sethook(lua->L, timeout_hook, LUA_MASKCOUNT, HOOK_INSTRUCTIONS);
    }
    if (open_module(lua) != 0) {
        lua_close(lua->L);
        free(lua);
        return MPH_ESCRIPT;
    }
    uv_timer_init(loop, &lua->retry_timer);
    *out = lua;
    return 0;
}

/* Sets package.path = "<dir>/?.lua;<dir>/?/init.lua;" .. package.path [-0, +0, m] */
static void prepend_package_path(lua_State *L, const char *dir)
{
    lua_getglobal(L, "package");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;", dir, dir);
    lua_getfield(L, -2, "path");
    lua_concat(L, 2);
    lua_setfield(L, -2, "path");
    lua_pop(L, 1);
}

/* Message handler for script loading: adds a traceback. */
static int traceback_handler(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL)
        msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    luaL_traceback(L, L, msg, 1);
    return 1;
}

int mph_lua_load(mph_lua_t *lua, const char *chunkname, const char *src, size_t len,
                 const char *dir, char *err, size_t errlen)
{
    lua_State *L = lua->L;
    int base = lua_gettop(L);
    if (dir)
        prepend_package_path(L, dir);
    lua_pushcfunction(L, traceback_handler);
    if (luaL_loadbuffer(L, src, len, chunkname) != 0 || lua_pcall(L, 0, 0, base + 1) != 0) {
        /* One line for the user; the traceback (if any) for the debug log. */
        const char *msg = lua_tostring(L, -1) ? lua_tostring(L, -1) : "error";
        const char *tb = strstr(msg, "\nstack traceback:");
        snprintf(err, errlen, "%.*s", tb ? (int)(tb - msg) : (int)strlen(msg), msg);
        if (tb)
            mph_log(MPH_LOG_DEBUG, "%s", msg);
        lua_settop(L, base);
        return MPH_ESCRIPT;
    }
    lua_settop(L, base);
    return 0;
}

int mph_lua_load_file(mph_lua_t *lua, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        snprintf(err, errlen, "cannot open %s", path);
        return MPH_ESCRIPT;
    }
    mph_buf_t src = MPH_BUF_INIT;
    char chunk[16384];
    size_t n;
    while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0)
        mph_buf_append(&src, chunk, n);
    int read_error = ferror(f);
    fclose(f);
    if (read_error) {
        mph_buf_free(&src);
        snprintf(err, errlen, "cannot read %s", path);
        return MPH_ESCRIPT;
    }
    /* Skip a "#!" first line, as lua.c does, keeping line numbers. */
    const char *text = src.data ? src.data : "";
    size_t len = src.len;
    if (len > 1 && text[0] == '#' && text[1] == '!') {
        while (len > 0 && *text != '\n') {
            text++;
            len--;
        }
    }
    char *dir = mph_xstrdup(path);
    char *slash = strrchr(dir, '/');
    if (slash)
        *slash = '\0';
    else
        strcpy(dir, ".");
    const char *base = strrchr(path, '/');
    char *chunkname = mph_xmalloc(strlen(path) + 2);
    sprintf(chunkname, "@%s", base ? base + 1 : path);
    int rc = mph_lua_load(lua, chunkname, text, len, dir, err, errlen);
    free(chunkname);
    free(dir);
    mph_buf_free(&src);
    return rc;
}

size_t mph_lua_pending(const mph_lua_t *lua)
{
    return lua->pending_calls;
}

int mph_lua_serve_called(const mph_lua_t *lua)
{
    return lua->serve_called;
}

static void on_retry_timer_closed(uv_handle_t *h)
{
    mph_lua_t *lua = mph_container_of(h, mph_lua_t, retry_timer);
    lua_close(lua->L);
    free(lua);
}

void mph_lua_close(mph_lua_t *lua)
{
    lua->closing = 1;
    mph__runner_close(lua); /* answers whatever still waits, frees scopes */
    uv_close((uv_handle_t *)&lua->retry_timer, on_retry_timer_closed);
}

/* ---- Calls and attempts ---- */

static void txn_free(mph_txn_t *t)
{
    mph_lua_t *lua = t->lua;
    assert(t->co == NULL);
    json_decref(t->params);
    free(t->method);
    mph_buf_free(&t->result);
    free(t);
    lua->pending_calls--;
}

/* Ends the attempt's coroutine: its roots are closed and it is left to the collector. */
static void end_attempt(mph_txn_t *t, int close_roots)
{
    lua_State *L = t->lua->L;
    if (t->co == NULL)
        return;
    if (close_roots) {
        int base = lua_gettop(L);
        mph__lua_get_internal(t->lua, L, "close_record");
        lua_rawgeti(L, LUA_REGISTRYINDEX, t->rec_ref);
        if (lua_pcall(L, 1, 0, 0) != 0)
            mph_log(MPH_LOG_WARN, "closing a record: %s", lua_tostring(L, -1));
        lua_settop(L, base);
    }
    luaL_unref(L, LUA_REGISTRYINDEX, t->co_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, t->rec_ref);
    t->co_ref = t->rec_ref = LUA_NOREF;
    t->co = NULL;
}

static void deliver(mph_txn_t *t, int code, const char *message, mph_buf_t *data)
{
    mph_lua_reply_t reply = {code, NULL, 0, NULL};
    if (data && data->len)
        reply.json = mph_buf_steal(data, &reply.json_len);
    if (code != 0)
        reply.message = mph_xstrdup(message ? message : mph_rpc_message(code));
    end_attempt(t, 1);
    t->cb(t->ud, &reply);
    free(reply.json);
    free(reply.message);
    txn_free(t);
}

void mph__txn_reply(mph_txn_t *t, int code, const char *message)
{
    deliver(t, code, message, NULL);
}

void mph__txn_reply_result(mph_txn_t *t)
{
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

/* The attempt raised: the error value is on top of t->co. It is moved to the main state
 * and read there (a dead coroutine is only good for its traceback). */
static void attempt_failed(mph_txn_t *t)
{
    mph_lua_t *lua = t->lua;
    lua_State *L = lua->L;
    int base = lua_gettop(L);
    mph_buf_t data = MPH_BUF_INIT;
    char err[256];
    int code = MPH_RPC_HANDLER_ERROR;
    char *message = NULL;

    lua_xmove(t->co, L, 1); /* Stack: error */
    int err_idx = lua_gettop(L);
    int is_rpc_error = 0;
    if (lua_type(L, err_idx) == LUA_TTABLE && lua_getmetatable(L, err_idx)) {
        mph__lua_get_internal(lua, L, "error_mt"); /* Stack: error, mt, error_mt */
        is_rpc_error = lua_rawequal(L, -1, -2);
        lua_settop(L, err_idx);
    }
    if (is_rpc_error) {
        lua_getfield(L, err_idx, "code");
        code = (int)lua_tointeger(L, -1);
        lua_getfield(L, err_idx, "message");
        message = mph_xstrdup(lua_tostring(L, -1) ? lua_tostring(L, -1) : "Server error");
        lua_getfield(L, err_idx, "data"); /* Stack: error, code, message, data */
        if (!lua_isnil(L, -1) && mph_json_encode(L, -1, "data", &data, err, sizeof(err)) != 0) {
            data.len = 0;
            mph_log(MPH_LOG_WARN, "%s: error data dropped: %s", t->method, err);
        }
    } else {
        const char *raw = lua_tostring(L, err_idx);
        if (raw == NULL)
            raw = "(error object is not a string)";
        if (lua->debug_errors) {
            luaL_traceback(L, t->co, raw, 0); /* Stack: error, traceback */
            const char *tb = lua_tostring(L, -1);
            mph_json_write_string(&data, tb, strlen(tb));
            message = mph_xstrdup(raw);
        } else {
            message = mph_xstrdup(strip_position(raw));
        }
        mph_log(MPH_LOG_INFO, "%s raised: %s", t->method, raw);
    }
    lua_settop(L, base);
    deliver(t, code, message, &data);
    free(message);
    mph_buf_free(&data);
}

void mph__txn_resume(mph_txn_t *t, int nargs)
{
    mph_lua_t *lua = t->lua;
    mph_txn_t *outer = lua->current;
    lua->current = t;
    t->state = TXN_RUNNING;
    t->deadline = lua->timeout_ns ? uv_hrtime() + lua->timeout_ns : 0; /* per running stretch */
    int status = lua_resume(t->co, nargs);
    lua->current = outer;
    switch (status) {
    case LUA_YIELD:
        if (t->state == TXN_WAITING)
            return; /* the runner resumes it when the scope has loaded */
        mph__txn_reply(t, MPH_RPC_INTERNAL_ERROR,
                       "a handler may not yield: coroutine.yield outside a coroutine it made");
        return;
    case 0:
        end_attempt(t, 0);
        mph__runner_finished(t);
        return;
    default:
        attempt_failed(t);
        return;
    }
}

void mph__txn_start_attempt(mph_txn_t *t)
{
    mph_lua_t *lua = t->lua;
    lua_State *L = lua->L;
    int base = lua_gettop(L);
    t->attempts++;
    t->scope = NULL;
    t->wrote = 0;
    t->past_checkpoint = 0;
    t->result.len = 0;

    /* Stack: (nothing of ours) */
    mph__lua_get_internal(lua, L, "services");
    lua_getfield(L, -1, t->method);
    int exposed = 0;
    if (lua_istable(L, -1)) {
        lua_getfield(L, -1, "expose");
        exposed = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    if (!exposed) {
        lua_settop(L, base);
        mph__txn_reply(t, MPH_RPC_METHOD_NOT_FOUND, "Method not found");
        return;
    }
    /* Stack: services, svc */
    lua_State *co = lua_newthread(L);
    t->co_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    t->co = co;
    lua_newtable(L);
    lua_newtable(L);
    lua_setfield(L, -2, "roots");
    t->rec_ref = luaL_ref(L, LUA_REGISTRYINDEX);

    mph__lua_get_internal(lua, co, "run");
    lua_rawgeti(co, LUA_REGISTRYINDEX, t->rec_ref);
    lua_getfield(L, -1, "handler");
    lua_xmove(L, co, 1);
    lua_settop(L, base);
    /* co stack: run, rec, handler */
    int nargs = 2;
    char err[256];
    if (json_is_array(t->params)) {
        size_t n = json_array_size(t->params);
        if (n > 200 || !lua_checkstack(co, (int)n + 8)) {
            mph__txn_reply(t, MPH_RPC_INVALID_PARAMS, "Invalid params: more than 200 positional");
            return;
        }
        for (size_t i = 0; i < n; i++) {
            if (mph_json_push(co, json_array_get(t->params, i), err, sizeof(err)) != 0)
                goto bad_params;
            nargs++;
        }
    } else if (json_is_object(t->params)) {
        if (mph_json_push(co, t->params, err, sizeof(err)) != 0)
            goto bad_params;
        nargs++;
    }
    mph__txn_resume(t, nargs);
    return;
bad_params : {
    char msg[300];
    snprintf(msg, sizeof(msg), "Invalid params: %s", err);
    mph__txn_reply(t, MPH_RPC_INVALID_PARAMS, msg);
}
}

void mph_lua_call(mph_lua_t *lua, const char *method, size_t mlen, const json_t *params,
                  mph_lua_reply_cb cb, void *ud)
{
    mph_txn_t *t = mph_xcalloc(1, sizeof(*t));
    t->lua = lua;
    t->method = mph_xstrndup(method, mlen);
    t->params = params ? json_incref((json_t *)params) : NULL;
    t->cb = cb;
    t->ud = ud;
    t->co_ref = t->rec_ref = LUA_NOREF;
    lua->pending_calls++;
    if (lua->closing || memchr(method, '\0', mlen) != NULL) {
        mph__txn_reply(t, lua->closing ? MPH_RPC_STORAGE_UNAVAILABLE : MPH_RPC_METHOD_NOT_FOUND,
                       lua->closing ? "Shutting down" : "Method not found");
        return;
    }
    mph__txn_start_attempt(t);
}
