/*
 * fetch.c: the C half of mp.fetch and mp.rpc (lua/fetch.lua has the other half): outbound
 * HTTP exchanges made from inside a handler, which waits for them without holding the loop.
 *
 * The exchange itself is the host's: the bridge is given an mph_lua_fetch_fn
 * (bridge.h; host/server/fetch.c implements it with libcurl on the loop), as it is given a
 * forwarder for mp.shard. F.start checks the arguments, hands the request to it and yields:
 * the transaction is FETCHING (internal.h). When the exchange ends, on_fetch_done keeps the
 * outcome in the transaction (C memory) and resumes the coroutine with nothing; F.result then
 * builds the Lua values inside the coroutine, where running out of memory is an ordinary
 * error of the attempt (nothing is pushed onto a suspended coroutine from outside: the reason
 * C.acquire and C.forwarded give). The wait is a pause like a scope's load: the handler's
 * time limit counts running stretches (mph__txn_resume sets a new deadline on each resume),
 * and the exchange's own timeout bounds the pause. Every exchange the fetcher accepted ends
 * exactly once, a stop included (the host closes the fetcher, which cancels what is left,
 * before it closes the bridge), so a FETCHING transaction always runs on.
 *
 * Where one cannot wait. Only the handler's own coroutine can yield to the host: not inside
 * a function C called back (a table.sort comparator, string.gsub's function, __tostring under
 * tostring), where the yield would cross a C call, nor in a coroutine the handler made, whose
 * yield would go to the handler. There mp.fetch raises a clear error instead
 * (coroutine.isyieldable() tells the first case, L != t->co the second).
 *
 * Reads across a wait. Transactions of one scope in one process run one after another only
 * because none pauses once it has read (scopes.c, "An attempt that already holds a scope must
 * not wait"). A fetch is such a pause: while it waits, other calls may change a scope the
 * handler read before it, and what it writes after would rest on stale reads. So fetch.lua
 * takes a stamp of the attempt's scopes before the exchange and compares it after
 * (metaparticle.lua, I.stamp: it moves whenever what a read sees changes); when it moved,
 * F.void makes the attempt void and it runs again from the start, fetch included, as after a
 * conflict (at most --max-retries times: then -32001). A handler that fetches before it
 * touches a scope never pays this, which is why the docs advise that order.
 */
#define _POSIX_C_SOURCE 200809L
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fetch_lua.h" /* generated from fetch.lua: mph_fetch_lua[] */
#include "internal.h"

#define MAX_HEADERS 100  /* request header fields an exchange may set */
#define MAX_HEADER 16384 /* bytes of one field, name and value */
#define MAX_METHOD 32    /* bytes of a method name */

/* An exchange's outcome, kept in its transaction (t->fetch) until F.result reads it. */
struct mph_fetch_out_s {
    mph_txn_t *t;       /* the waiting transaction */
    int done;           /* the exchange has ended: the fields below are set */
    int status;         /* the HTTP status, 0: no response */
    char *error;        /* owned: status 0: why */
    char *headers;      /* owned: "name\0value\0" pairs (bridge.h) */
    size_t headers_len; /* bytes in headers */
    char *body;         /* owned: the response body, or NULL when empty */
    size_t body_len;
};

void mph__fetch_clear(mph_txn_t *t)
{
    mph_fetch_out_t *out = t->fetch;
    if (out == NULL)
        return;
    assert(out->done); /* never one in flight: its callback still points here */
    free(out->error);
    free(out->headers);
    free(out->body);
    free(out);
    t->fetch = NULL;
}

/* Raises a plain error message (a -32000 of the call unless the handler catches it). */
static int fetch_raise(lua_State *L, const char *what, const char *message)
{
    lua_pushfstring(L, "%s %s", what, message);
    return lua_error(L);
}

/* F.current(what) -> the running attempt's record; raises outside a handler. [-1, +1, e] */
static int l_fetch_current(lua_State *L)
{
    mph_txn_t *t = mph__lua_upvalue(L)->current;
    if (t == NULL)
        return fetch_raise(L, luaL_checkstring(L, 1), "is only available inside a service handler");
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->rec_ref);
    return 1;
}

/* ---- Checking a request ---- */

/* RFC 9110's tchar: what a header name and a method are made of. */
static int fetch_is_tchar(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static int fetch_is_token(const char *s, size_t len)
{
    if (len == 0)
        return 0;
    for (size_t i = 0; i < len; i++)
        if (!fetch_is_tchar((unsigned char)s[i]))
            return 0;
    return 1;
}

/* A field value may not end the line early (no CR, LF or NUL: header injection). */
static int fetch_is_value(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0')
            return 0;
    return 1;
}

/* Checks the flat header list at idx (name, value, ...: strings, fetch.lua made it); raises
 * naming the first bad one. Returns the number of fields. Allocates nothing. [-0, +0, e] */
static int fetch_check_headers(lua_State *L, int idx, const char *what)
{
    int n = (int)lua_objlen(L, idx);
    if (n % 2 != 0 || n / 2 > MAX_HEADERS)
        return luaL_error(L, "%s: at most %d headers", what, MAX_HEADERS);
    for (int i = 1; i <= n; i += 2) {
        size_t nlen, vlen;
        lua_rawgeti(L, idx, i);
        lua_rawgeti(L, idx, i + 1); /* Stack: ..., name, value */
        if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
            return luaL_error(L, "%s: headers must be strings", what);
        const char *name = lua_tolstring(L, -2, &nlen); /* strings: no conversion */
        const char *value = lua_tolstring(L, -1, &vlen);
        if (!fetch_is_token(name, nlen))
            return luaL_error(L, "%s: invalid header name \"%s\"", what, name);
        if (!fetch_is_value(value, vlen))
            return luaL_error(L, "%s: header %s: a value may not hold CR, LF or NUL", what, name);
        if (nlen + vlen > MAX_HEADER)
            return luaL_error(L, "%s: header %s is longer than %d bytes", what, name, MAX_HEADER);
        lua_pop(L, 2);
    }
    return n / 2;
}

/* "Name: value" lines of the n fields of the list at idx (checked), malloc'd, in *lines. */
static char **fetch_header_lines(lua_State *L, int idx, int n)
{
    char **lines = mph_xcalloc((size_t)n + 1, sizeof(*lines));
    for (int i = 0; i < n; i++) {
        size_t nlen, vlen;
        lua_rawgeti(L, idx, 2 * i + 1);
        lua_rawgeti(L, idx, 2 * i + 2); /* Stack: ..., name, value (strings: no allocation) */
        const char *name = lua_tolstring(L, -2, &nlen);
        const char *value = lua_tolstring(L, -1, &vlen);
        lines[i] = mph_xmalloc(nlen + vlen + 3);
        memcpy(lines[i], name, nlen);
        memcpy(lines[i] + nlen, ": ", 2);
        memcpy(lines[i] + nlen + 2, value, vlen + 1);
        lua_pop(L, 2);
    }
    return lines;
}

static void fetch_free_lines(char **lines, int n)
{
    for (int i = 0; i < n; i++)
        free(lines[i]);
    free(lines);
}

/* ---- Starting and ending an exchange ---- */

/* mph_lua_fetch_cb: the exchange has ended; keeps its outcome (taking the texts) and resumes
 * the transaction, which may be gone when this returns. */
static void on_fetch_done(void *ud, mph_lua_fetch_res_t *res)
{
    mph_fetch_out_t *out = ud;
    mph_txn_t *t = out->t;
    assert(t->state == TXN_FETCHING && t->fetch == out && !out->done);
    out->done = 1;
    out->status = res->status;
    if (res->status == 0)
        out->error = mph_xstrdup(res->error ? res->error : "no response");
    out->headers = res->headers;
    out->headers_len = res->headers_len;
    out->body = res->body;
    out->body_len = res->body_len;
    res->headers = res->body = NULL;
    t->lua->fetching--;
    mph__txn_resume(t, 0);
}

/* F.start(what, yieldable, url, method, headers, body, timeout_ms, cafile, max_body): starts
 * the exchange and waits for it (F.result reads the outcome), returning nothing; or returns
 * why it could not start, without waiting. headers is fetch.lua's flat list of names and
 * values, body a string or nil. [-9, +0 or +1, e] */
static int l_fetch_start(lua_State *L)
{
    mph_lua_t *lua = mph__lua_upvalue(L);
    const char *what = luaL_checkstring(L, 1);
    int yieldable = lua_toboolean(L, 2);
    const char *url = luaL_checkstring(L, 3);
    size_t mlen, body_len = 0;
    const char *method = luaL_checklstring(L, 4, &mlen);
    luaL_checktype(L, 5, LUA_TTABLE);
    const char *body = lua_isnil(L, 6) ? NULL : luaL_checklstring(L, 6, &body_len);
    double timeout_ms = luaL_checknumber(L, 7);
    const char *cafile = luaL_optstring(L, 8, NULL);
    double max_body = luaL_checknumber(L, 9);
    mph_txn_t *t = lua->current;
    if (t == NULL)
        return fetch_raise(L, what, "is only available inside a service handler");
    if (!yieldable || L != t->co)
        return fetch_raise(
            L, what,
            "cannot wait here: it is called from a function that C calls back (a table.sort "
            "comparator, a string.gsub function, a __tostring) or from a coroutine the handler "
            "made; call it from the handler itself");
    if (t->reload != NULL) /* the attempt is void (scopes.c): it runs again, fetching then */
        return mph__lua_raise(lua, L, MPH_RPC_STORAGE_UNAVAILABLE, "the scope is loading");
    if (mlen > MAX_METHOD || !fetch_is_token(method, mlen))
        return luaL_error(L, "%s: invalid method \"%s\"", what, method);
    if (strlen(url) == 0 || strlen(url) != lua_objlen(L, 3))
        return luaL_error(L, "%s: the url is empty or holds a NUL byte", what);
    int nheaders = fetch_check_headers(L, 5, what);
    if (lua->fetch == NULL) {
        lua_pushstring(L, "outbound calls are not available in this host");
        return 1;
    }
    /* Nothing below raises until the C memory is freed again. */
    char **lines = fetch_header_lines(L, 5, nheaders);
    mph_lua_fetch_req_t req = {.url = url,
                               .method = method,
                               .headers = (const char *const *)lines,
                               .nheaders = (size_t)nheaders,
                               .body = body,
                               .body_len = body_len,
                               .timeout_ms = (uint64_t)timeout_ms,
                               .cafile = cafile,
                               .max_body = max_body < 1e15 ? (size_t)max_body : (size_t)1e15};
    mph_fetch_out_t *out = mph_xcalloc(1, sizeof(*out));
    out->t = t;
    char why[256] = "";
    int rc = lua->fetch(lua->fetch_ud, &req, on_fetch_done, out, why, sizeof(why));
    fetch_free_lines(lines, nheaders);
    if (rc != 0) {
        free(out);
        lua_pushstring(L, why[0] ? why : mph_strerror(rc));
        return 1;
    }
    mph__fetch_clear(t); /* an earlier outcome F.result could not read (out of memory) */
    t->fetch = out;
    lua->fetching++;
    mph__txn_become(t, TXN_FETCHING);
    assert(assert_txn_state(t));
    return lua_yield(L, 0);
}

/* Pushes the outcome's header fields as a table of lower-case name = value; a name that
 * came more than once gets its values joined by ", ". [-0, +1, m] */
static void fetch_push_headers(lua_State *L, const mph_fetch_out_t *out)
{
    lua_newtable(L); /* Stack: headers */
    const char *p = out->headers, *end = out->headers ? out->headers + out->headers_len : NULL;
    while (p != NULL && p < end) {
        const char *name = p;
        const char *value = name + strlen(name) + 1;
        p = value + strlen(value) + 1;
        lua_getfield(L, -1, name); /* Stack: headers, earlier value or nil */
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_pushstring(L, value);
        } else {
            lua_pushliteral(L, ", ");
            lua_pushstring(L, value);
            lua_concat(L, 3);
        }
        lua_setfield(L, -2, name); /* Stack: headers */
    }
}

/* F.result() -> the response {status, headers, body}, or nil and why none came. The
 * outcome is freed once read. [-0, +1 or +2, m] */
static int l_fetch_result(lua_State *L)
{
    mph_txn_t *t = mph__lua_upvalue(L)->current;
    assert(t != NULL && t->fetch != NULL && t->fetch->done);
    const mph_fetch_out_t *out = t->fetch;
    if (out->status == 0) {
        lua_pushnil(L);
        lua_pushstring(L, out->error);
        mph__fetch_clear(t);
        return 2;
    }
    lua_createtable(L, 0, 3); /* Stack: res */
    lua_pushinteger(L, out->status);
    lua_setfield(L, -2, "status");
    fetch_push_headers(L, out);
    lua_setfield(L, -2, "headers");
    lua_pushlstring(L, out->body ? out->body : "", out->body_len);
    lua_setfield(L, -2, "body");
    mph__fetch_clear(t);
    return 1;
}

/* F.void(what): a scope the attempt had read changed while it waited: the attempt is void
 * and runs again from the start (the raise ends it; C.checkpoint refuses it should the
 * handler catch this), or, past --max-retries such runs, the call fails with -32001.
 * [-1, +0, e] */
static int l_fetch_void(lua_State *L)
{
    mph_lua_t *lua = mph__lua_upvalue(L);
    const char *what = luaL_checkstring(L, 1);
    mph_txn_t *t = lua->current;
    assert(t != NULL && t->nscopes > 0); /* a stamp moves only for a scope it acquired */
    char msg[200];
    if (++t->fetch_voids > lua->max_retries) {
        snprintf(msg, sizeof(msg),
                 "Transaction conflict: a scope the handler had read changed while %s waited, "
                 "%d times",
                 what, t->fetch_voids);
        return mph__lua_raise(lua, L, MPH_RPC_CONFLICT, msg);
    }
    if (t->reload == NULL)
        t->reload = t->scopes[0]; /* loaded: the attempt runs again at once (scopes.c) */
    snprintf(msg, sizeof(msg), "a scope changed while %s waited: the call runs again", what);
    return mph__lua_raise(lua, L, MPH_RPC_STORAGE_UNAVAILABLE, msg);
}

static const luaL_Reg fetch_helpers[] = {{"current", l_fetch_current},
                                         {"start", l_fetch_start},
                                         {"result", l_fetch_result},
                                         {"void", l_fetch_void},
                                         {NULL, NULL}};

void mph__fetch_open(mph_lua_t *lua, lua_State *L)
{
    mph__lua_load_part(lua, L, mph_fetch_lua, mph_fetch_lua_len, "=fetch.lua", fetch_helpers);
    lua_pushinteger(L, MPH_RPC_OUTBOUND_FAILED); /* Stack: chunk, F */
    lua_setfield(L, -2, "OUTBOUND_FAILED");
    mph__lua_run_part(lua, L);
}
