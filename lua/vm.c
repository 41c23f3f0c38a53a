/*
 * vm.c: one LuaJIT state per host and the metaparticle module: creating, loading and closing
 * the state, the C helpers the module is given that do not belong to a transaction (logging,
 * services, JSON), the embedding program's C functions (c.NAME), and how C enters Lua
 * (protected calls). The transactions themselves, their coroutines and their errors, are
 * txn.c's; scopes and commits, scopes.c's; mp.shard and mp.scatter, forward.c's; mp.fetch and
 * mp.rpc, fetch.c's.
 *
 * Lua running out of memory is -32603 for the call that met it; the process stays up (see
 * "Entering Lua from C").
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
#include <sys/random.h>
#include <unistd.h>

#include "internal.h"
#include "json.h"
#include "metaparticle_lua.h" /* generated from metaparticle.lua: mph_metaparticle_lua[] */
#include "stdio_lua.h"        /* generated from stdio.lua: mph_stdio_lua[] */
#include "watchdog.h"

#define DEFAULT_MAX_RETRIES 50

/* ---- Helpers ---- */

void mph__lua_get_internal(mph_lua_t *lua, lua_State *L, const char *name)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, lua->internal_ref); /* I */
    lua_getfield(L, -1, name);                            /* I, I[name] */
    lua_remove(L, -2);                                    /* I[name] */
}

mph_lua_t *mph__lua_upvalue(lua_State *L)
{
    return lua_touserdata(L, lua_upvalueindex(1));
}

void mph__lua_push_error(mph_lua_t *lua, lua_State *L, int code, const char *message)
{
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, code);
    lua_setfield(L, -2, "code");
    lua_pushstring(L, message);
    lua_setfield(L, -2, "message");
    mph__lua_get_internal(lua, L, "error_mt");
    lua_setmetatable(L, -2);
}

int mph__lua_raise(mph_lua_t *lua, lua_State *L, int code, const char *message)
{
    mph__lua_push_error(lua, L, code, message);
    return lua_error(L);
}

int mph__lua_raise_nomem(lua_State *L)
{
    lua_pushliteral(L, NOMEM_MESSAGE); /* interned at start, so this allocates nothing */
    return lua_error(L);
}

static char lua_owner_key; /* registry[&lua_owner_key] = the mph_lua_t */

mph_lua_t *mph__lua_owner(lua_State *L)
{
    lua_pushlightuserdata(L, &lua_owner_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    mph_lua_t *lua = lua_touserdata(L, -1);
    lua_pop(L, 1);
    return lua;
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

/* print(...), replacing the base library's: Lua's own writes to stdout, which is the
 * deployment's log, raw, so a handler printing what a client sent could forge log lines. This
 * one logs at info through mph_log, which escapes; arguments are joined by tabs as Lua's are.
 * [-0, +0, e] */
static int l_print(lua_State *L)
{
    int n = lua_gettop(L);
    luaL_Buffer b;
    lua_getglobal(L, "tostring"); /* Stack: args..., tostring (below the buffer's pieces) */
    luaL_buffinit(L, &b);
    for (int i = 1; i <= n; i++) {
        lua_pushvalue(L, n + 1);
        lua_pushvalue(L, i);
        lua_call(L, 1, 1);
        if (!lua_isstring(L, -1))
            return luaL_error(L, "'tostring' must return a string to 'print'");
        if (i > 1)
            luaL_addchar(&b, '\t');
        luaL_addvalue(&b);
    }
    luaL_pushresult(&b); /* Stack: args..., tostring, line */
    size_t len;
    const char *line = lua_tolstring(L, -1, &len);
    mph_log(MPH_LOG_INFO, "lua: %.*s", (int)len, line);
    return 0;
}

/* C.serve() [-0, +0, -] */
static int l_serve(lua_State *L)
{
    mph__lua_upvalue(L)->serve_called = 1;
    return 0;
}

/* C.topology(n): the script declared a topology over n workers (metaparticle.lua checked
 * n); the host starts as many workers as the largest n asks for. [-0, +0, -] */
static int l_topology(lua_State *L)
{
    mph_lua_t *lua = mph__lua_upvalue(L);
    int n = (int)lua_tointeger(L, 1);
    if (n > lua->topology_workers)
        lua->topology_workers = n;
    return 0;
}

/* C.service(name, needs_user): the script made a service; needs_user: its handler is behind
 * mp.basicAuth, so the host checks credentials before its calls run (mph_lua_needs_auth).
 * A name made again takes the new handler's need. [-2, +0, -] */
static int l_service(lua_State *L)
{
    mph_lua_t *lua = mph__lua_upvalue(L);
    size_t len;
    const char *name = luaL_checklstring(L, 1, &len);
    int needs_user = lua_toboolean(L, 2);
    size_t i = 0;
    while (i < lua->nauth_services && strcmp(lua->auth_services[i], name) != 0)
        i++;
    if (needs_user && i == lua->nauth_services) {
        lua->auth_services = mph_xrealloc(lua->auth_services, (i + 1) * sizeof(char *));
        lua->auth_services[lua->nauth_services++] = mph_xstrndup(name, len);
    } else if (!needs_user && i < lua->nauth_services) {
        free(lua->auth_services[i]);
        lua->auth_services[i] = lua->auth_services[--lua->nauth_services];
    }
    return 0;
}

/* C.encode(value, path) -> JSON text; raises -32000 naming the path [-0, +1, e] */
static int l_encode(lua_State *L)
{
    mph_lua_t *lua = mph__lua_upvalue(L);
    const char *root = luaL_optstring(L, 2, NULL);
    char err[512];
    /* The bridge's scratch buffer, not a local one: lua_pushlstring may raise (out of memory)
     * and a local buffer would then leak. */
    mph_buf_t *out = &lua->scratch;
    out->len = 0;
    int rc = mph_json_encode(L, 1, root, out, err, sizeof(err));
    if (rc == MPH_JSON_ENOMEM)
        return mph__lua_raise_nomem(L);
    if (rc != 0)
        return mph__lua_raise(mph__lua_upvalue(L), L, MPH_RPC_HANDLER_ERROR, err);
    lua_pushlstring(L, out->data ? out->data : "", out->len);
    if (out->cap > (1 << 20)) /* do not keep a huge value's buffer for good */
        mph_buf_free(out);
    return 1;
}

/* C.decode(text) -> value [-0, +1, e] */
static int l_decode(lua_State *L)
{
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len);
    char err[256];
    int rc = mph_json_push_text(L, text, len, err, sizeof(err));
    if (rc == MPH_JSON_ENOMEM)
        return mph__lua_raise_nomem(L);
    if (rc != 0)
        return luaL_error(L, "%s", err);
    return 1;
}

#ifdef MPH_TEST_HOOKS
/* C.fail_allocations(skip, count): test builds (MPH_TEST_HOOKS) whose state runs with
 * MPH_TEST_LUA_ALLOC_FAIL=1 only: the next `skip` allocations succeed, then `count` fail.
 * [-2, +0, -] */
static int l_fail_allocations(lua_State *L)
{
    mph_lua_t *lua = mph__lua_upvalue(L);
    lua->alloc_skip = (long)luaL_checknumber(L, 1);
    lua->alloc_fail = (long)luaL_checknumber(L, 2);
    return 0;
}
#endif

/* ---- C functions of the embedding program (c.NAME) ---- */

/* c.NAME(...) -> the function's result. Upvalues: the bridge, the mph_lua_cfunc_t. The
 * arguments go to C as one JSON array (nil -> null, so that positions hold); what C returns
 * is decoded as params are. Every error (an argument with no JSON form, the function's
 * failure, a result that is not JSON) is raised as a string. C memory is released before
 * anything that may raise: the arguments' text is freed before the function's result is
 * looked at, and that result is copied into the bridge's scratch buffer (which nothing leaks
 * from) and freed before it is decoded. [-0, +1, e] */
static int l_cfunc(lua_State *L)
{
    mph_lua_t *lua = mph__lua_upvalue(L);
    const mph_lua_cfunc_t *f = lua_touserdata(L, lua_upvalueindex(2));
    int n = lua_gettop(L);
    lua_createtable(L, n, 0); /* Stack: args..., array */
    for (int i = 1; i <= n; i++) {
        if (lua_isnil(L, i))
            lua_pushlightuserdata(L, NULL); /* mp.null */
        else
            lua_pushvalue(L, i);
        lua_rawseti(L, -2, i);
    }
    mph_json_push_array_mt(L);
    lua_setmetatable(L, -2);
    char err[512], root[160];
    snprintf(root, sizeof(root), "c.%s(...)", f->name);
    mph_buf_t args = MPH_BUF_INIT;
    int rc = mph_json_encode(L, n + 1, root, &args, err, sizeof(err));
    if (rc != 0) {
        mph_buf_free(&args);
        if (rc == MPH_JSON_ENOMEM)
            return mph__lua_raise_nomem(L);
        return luaL_error(L, "%s", err);
    }
    char *result = NULL;
    int failed = f->fn(f->ud, args.data, args.len, &result);
    mph_buf_free(&args);
    if (failed) {
        snprintf(err, sizeof(err), "%s", result ? result : "");
        free(result);
        if (err[0] == '\0')
            snprintf(err, sizeof(err), "%s failed", f->name);
        lua_pushstring(L, err);
        return lua_error(L);
    }
    mph_buf_t *out = &lua->scratch;
    out->len = 0;
    mph_buf_puts(out, result ? result : "null");
    free(result);
    rc = mph_json_push_text(L, out->data, out->len, err, sizeof(err));
    if (out->cap > (1 << 20)) /* do not keep a huge value's buffer for good */
        mph_buf_free(out);
    if (rc == MPH_JSON_ENOMEM)
        return mph__lua_raise_nomem(L);
    if (rc != 0)
        return luaL_error(L, "c.%s returned invalid JSON: %s", f->name, err);
    return 1;
}

typedef struct {
    mph_lua_t *lua;
    mph_lua_cfunc_t *f;
} register_ctx_t;

/* I.c[name] = the closure, under lua_cpcall. [-0, +0, m] */
static int register_cfunc(lua_State *L)
{
    register_ctx_t *c = lua_touserdata(L, 1);
    mph__lua_get_internal(c->lua, L, "c"); /* Stack: c */
    lua_pushlightuserdata(L, c->lua);
    lua_pushlightuserdata(L, c->f);
    lua_pushcclosure(L, l_cfunc, 2);
    lua_setfield(L, -2, c->f->name);
    lua_pop(L, 1);
    return 0;
}

int mph_lua_register(mph_lua_t *lua, const char *name, mph_lua_cfunction_t fn, void *ud)
{
    if (name == NULL || name[0] == '\0' || fn == NULL)
        return MPH_EINVAL;
    const mph_list_t *n;
    mph_list_foreach(n, &lua->cfuncs)
        if (strcmp(mph_list_entry(n, mph_lua_cfunc_t, node)->name, name) == 0)
            return MPH_EINVAL;
    mph_lua_cfunc_t *f = mph_xcalloc(1, sizeof(*f));
    f->fn = fn;
    f->ud = ud;
    f->name = mph_xstrdup(name);
    register_ctx_t c = {lua, f};
    if (mph__lua_protect(lua, register_cfunc, &c, "registering a C function") != 0) {
        free(f->name);
        free(f);
        return MPH_ENOMEM;
    }
    mph_list_insert_head(&lua->cfuncs, &f->node);
    return 0;
}

static const luaL_Reg helper_functions[] = {{"log", l_log},
                                            {"serve", l_serve},
                                            {"topology", l_topology},
                                            {"service", l_service},
                                            {"encode", l_encode},
                                            {"decode", l_decode},
#ifdef MPH_TEST_HOOKS
                                            {"fail_allocations", l_fail_allocations},
#endif
                                            {NULL, NULL}};

/* ---- Entering Lua from C ----
 *
 * Any lua_* call that allocates may raise (out of memory), and a raise outside a protected
 * call ends the process through the panic function. So every entry into Lua from C is either
 * lua_resume (itself protected) or goes through mph__lua_protect, which runs a C function
 * under lua_cpcall; Lua functions called inside it run under lua_pcall with traceback_handler
 * (mph__lua_call_internal), so a bug logs its traceback. */

/* Message handler: adds a traceback. Under memory pressure it may fail itself; the error is
 * then still caught (LUA_ERRERR). */
static int traceback_handler(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL)
        msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    luaL_traceback(L, L, msg, 1);
    return 1;
}

int mph__lua_protect(mph_lua_t *lua, lua_CFunction f, void *ud, const char *what)
{
    lua_State *L = lua->L;
    int base = lua_gettop(L);
    int status = lua_cpcall(L, f, ud);
    if (status != 0) /* no lua_tostring on a non-string: it would allocate */
        mph_log(MPH_LOG_ERROR, "%s: %s", what,
                lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "error");
    lua_settop(L, base);
    return status;
}

void mph__lua_call_internal(mph_lua_t *lua, lua_State *L, const char *fn, int nargs, int nresults)
{
    int fidx = lua_gettop(L) - nargs + 1; /* where the first argument is */
    lua_pushcfunction(L, traceback_handler);
    mph__lua_get_internal(lua, L, fn);
    lua_insert(L, fidx); /* Stack: ..., I[fn], args..., handler */
    lua_insert(L, fidx); /* Stack: ..., handler, I[fn], args... */
    if (lua_pcall(L, nargs, nresults, fidx) != 0)
        lua_error(L);    /* on to the enclosing protected call, traceback included */
    lua_remove(L, fidx); /* Stack: ..., results */
}

/* ---- Lifecycle ---- */

#ifdef MPH_TEST_HOOKS
/* The allocator of test runs (MPH_TEST_LUA_ALLOC_FAIL=1): C.fail_allocations arms it. Only
 * new blocks and growth fail; shrinking and freeing never do (LuaJIT relies on that). LuaJIT
 * accepts it: our build (openresty luajit2 v2.1-20230119, x86-64) is GC64, where lua_newstate
 * takes any allocator (non-GC64 x86-64 builds refuse one, needing memory below 2 GiB). Other
 * runs keep luaL_newstate and LuaJIT's own allocator. */
static void *test_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    mph_lua_t *lua = ud;
    if (nsize == 0) {
        free(ptr);
        return NULL;
    }
    if (ptr == NULL || nsize > osize) {
        if (lua->alloc_skip > 0)
            lua->alloc_skip--;
        else if (lua->alloc_fail > 0) {
            lua->alloc_fail--;
            return NULL;
        }
    }
    return realloc(ptr, nsize);
}
#endif

void mph__lua_set_helpers(mph_lua_t *lua, lua_State *L, const luaL_Reg *helpers)
{
    for (const luaL_Reg *r = helpers; r->name; r++) {
#ifdef MPH_TEST_HOOKS
        if (r->func == l_fail_allocations && !lua->alloc_test)
            continue;
#endif
        lua_pushlightuserdata(L, lua);
        lua_pushcclosure(L, r->func, 1);
        lua_setfield(L, -2, r->name);
    }
}

void mph__lua_load_part(mph_lua_t *lua, lua_State *L, const unsigned char *text, size_t len,
                        const char *name, const luaL_Reg *helpers)
{
    if (luaL_loadbuffer(L, (const char *)text, len, name) != 0)
        lua_error(L);
    lua_createtable(L, 0, 8); /* Stack: chunk, T */
    mph__lua_set_helpers(lua, L, helpers);
}

void mph__lua_run_part(mph_lua_t *lua, lua_State *L)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "loaded");
    lua_getfield(L, -1, "metaparticle"); /* Stack: chunk, T, package, loaded, M */
    lua_replace(L, -3);
    lua_pop(L, 1);                                        /* Stack: chunk, T, M */
    lua_rawgeti(L, LUA_REGISTRYINDEX, lua->internal_ref); /* Stack: chunk, T, M, I */
    lua_call(L, 3, 0);
}

/* Runs metaparticle.lua with the helper table; leaves package.loaded.metaparticle = M and
 * keeps I in the registry. Run by init_state. [-0, +0, e] */
static void open_module(mph_lua_t *lua, lua_State *L)
{
    if (luaL_loadbuffer(L, (const char *)mph_metaparticle_lua, mph_metaparticle_lua_len,
                        "=metaparticle.lua") != 0)
        lua_error(L);
    /* Stack: chunk */
    lua_createtable(L, 0, 24);
    const luaL_Reg *lists[] = {helper_functions, mph__txn_helpers, mph__forward_helpers,
                               mph__scopes_helpers, mph__idem_helpers};
    for (size_t i = 0; i < sizeof(lists) / sizeof(lists[0]); i++)
        mph__lua_set_helpers(lua, L, lists[i]);
    lua_pushlightuserdata(L, NULL);
    lua_setfield(L, -2, "null");
    lua_newtable(L);
    lua_setfield(L, -2, "deleted");
    mph_json_push_array_mt(L);
    lua_setfield(L, -2, "array_mt");
    mph_json_push_object_mt(L);
    lua_setfield(L, -2, "object_mt");
    lua_pushinteger(L, MPH_RPC_UNAUTHORIZED);
    lua_setfield(L, -2, "UNAUTHORIZED");
    lua_pushinteger(L, MPH_RPC_STORAGE_UNAVAILABLE);
    lua_setfield(L, -2, "STORAGE_UNAVAILABLE");
    lua_pushstring(L, lua->version); /* rpc.discover's info.version */
    lua_setfield(L, -2, "VERSION");
    /* mp.worker: which worker this state serves in (a plain table the module hands out). */
    lua_createtable(L, 0, 5);
    lua_pushinteger(L, lua->worker_id);
    lua_setfield(L, -2, "id");
    lua_pushinteger(L, lua->worker_count);
    lua_setfield(L, -2, "count");
    lua_pushinteger(L, lua->host_id); /* which host of the deployment (docs/hosts.md) */
    lua_setfield(L, -2, "host");
    lua_pushinteger(L, lua->host_count);
    lua_setfield(L, -2, "hosts");
    lua_pushinteger(L, (lua_Integer)getpid());
    lua_setfield(L, -2, "pid");
    lua_setfield(L, -2, "worker");
    /* Stack: chunk, C */
    lua_call(L, 1, 2); /* inside init_state's lua_cpcall */
    /* Stack: M, I */
    lua->internal_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "loaded");
    lua_pushvalue(L, -3);
    lua_setfield(L, -2, "metaparticle"); /* Stack: M, package, loaded */
    lua_pop(L, 3);
}

/* Runs stdio.lua: io.write, io.stdout and io.stderr log through the escaping logger, as print
 * does. Run by init_state. [-0, +0, e] */
static void open_stdio(lua_State *L)
{
    if (luaL_loadbuffer(L, (const char *)mph_stdio_lua, mph_stdio_lua_len, "=stdio.lua") != 0)
        lua_error(L);
    lua_pushcfunction(L, l_log);
    lua_pushinteger(L, MPH_LOG_INFO);
    lua_pushinteger(L, MPH_LOG_WARN);
    lua_call(L, 3, 0); /* inside init_state's lua_cpcall */
}

/* The state's setup, under lua_cpcall. [-0, +0, e] */
static int init_state(lua_State *L)
{
    mph_lua_t *lua = lua_touserdata(L, 1);
    luaL_openlibs(L);
    lua_pushcfunction(L, l_print);
    lua_setglobal(L, "print");
    open_stdio(L);
    mph_json_init(L);
    lua_pushlightuserdata(L, &lua_owner_key);
    lua_pushlightuserdata(L, lua);
    lua_rawset(L, LUA_REGISTRYINDEX);
    open_module(lua, L);
    mph__fetch_open(lua, L);  /* mp.fetch and mp.rpc */
    mph__outbox_open(lua, L); /* mp.send, mp.cancel, mp.self */
    return 0;
}

/* A seed from the kernel; never the C library's rand() (that state is the embedder's). */
static uint64_t random_seed(const void *salt)
{
    uint64_t seed = 0;
    if (getrandom(&seed, sizeof(seed), GRND_NONBLOCK) != (ssize_t)sizeof(seed))
        seed = uv_hrtime() ^ ((uint64_t)getpid() << 40) ^ (uint64_t)(uintptr_t)salt;
    return seed;
}

uint64_t mph__lua_random(mph_lua_t *lua)
{
    /* xorshift64*: plenty for ids and jitter, and it is ours alone. */
    uint64_t x = lua->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    lua->rng = x;
    return x * 0x2545F4914F6CDD1DULL;
}

int mph_lua_new(mph_lua_t **out, uv_loop_t *loop, const mph_lua_config_t *cfg)
{
    mph_lua_t *lua = mph_xcalloc(1, sizeof(*lua));
    lua->loop = loop;
    mph_list_init(&lua->lru);
    mph_list_init(&lua->backoffs);
    mph_list_init(&lua->cfuncs);
    lua->store = cfg->store;
    lua->max_retries = cfg->max_retries >= 0 ? cfg->max_retries : DEFAULT_MAX_RETRIES;
    lua->debug_errors = cfg->debug_errors;
    lua->timeout_ns = (uint64_t)cfg->handler_timeout_ms * 1000000;
    lua->worker_id = cfg->worker_id > 0 ? cfg->worker_id : 1;
    lua->worker_count = cfg->worker_count > 0 ? cfg->worker_count : 1;
    lua->scope_cache = cfg->scope_cache;
    lua->forward = cfg->forward;
    lua->forward_ud = cfg->forward_ud;
    lua->host_count = cfg->host_count > 0 ? cfg->host_count : 1;
    lua->host_id = cfg->host_id > 0 && cfg->host_id <= lua->host_count ? cfg->host_id : 1;
    lua->forward_host = cfg->forward_host;
    lua->forward_host_ud = cfg->forward_host_ud;
    lua->fetch = cfg->fetch;
    lua->fetch_ud = cfg->fetch_ud;
    lua->version = cfg->version ? cfg->version : "";
    lua->idem_ttl = cfg->idempotency_ttl ? cfg->idempotency_ttl : MPH_LUA_IDEM_TTL;
    lua->rng = random_seed(lua) | 1;           /* xorshift needs a nonzero state */
    lua->committer = mph__lua_random(lua) | 1; /* distinct per process and per host */
    lua->internal_ref = LUA_NOREF;
    mph__outbox_new(lua); /* before the module: mp.send's home bucket; freed with the bridge */
#ifdef MPH_TEST_HOOKS
    const char *test = getenv("MPH_TEST_LUA_ALLOC_FAIL");
    lua->alloc_test = test != NULL && strcmp(test, "1") == 0;
    lua->L = lua->alloc_test ? lua_newstate(test_alloc, lua) : luaL_newstate();
#else
    lua->L = luaL_newstate();
#endif
    if (lua->L == NULL) {
        free(lua->outbox);
        free(lua);
        return MPH_ENOMEM;
    }
#ifdef MPH_TEST_HOOKS
    if (lua->alloc_test)
        mph_log(MPH_LOG_WARN, "MPH_TEST_LUA_ALLOC_FAIL=1: Lua allocations can be made to fail");
#endif
    if (mph__lua_protect(lua, init_state, lua, "cannot load the metaparticle module") != 0) {
        lua_close(lua->L);
        free(lua->outbox);
        free(lua);
        return MPH_ESCRIPT;
    }
    if (lua->timeout_ns && cfg->watched) {
        if (mph_watchdog_start(&lua->watchdog, lua->L, mph__txn_timeout_hook,
                               MPH_HOOK_INSTRUCTIONS) != 0) {
            lua_close(lua->L);
            free(lua->outbox);
            free(lua);
            return MPH_EIO;
        }
    } else if (lua->timeout_ns) { /* after luaopen_jit, which turns the compiler on */
        luaJIT_setmode(lua->L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
        lua_sethook(lua->L, mph__txn_timeout_hook, LUA_MASKCOUNT, MPH_HOOK_INSTRUCTIONS);
    }
    uv_timer_init(loop, &lua->retry_timer);
    uv_timer_init(loop, &lua->evict_timer);
    uv_timer_init(loop, (uv_timer_t *)mph__outbox_handle(lua->outbox));
    *out = lua;
    return 0;
}

/* What mph_lua_load hands to load_script. */
typedef struct {
    mph_lua_t *lua;
    const char *chunkname, *src, *dir;
    size_t len;
    char *err; /* the caller's buffer */
    size_t errlen;
    int rc;
} load_ctx_t;

/* Runs the script under lua_cpcall: package.path first, then the chunk under lua_pcall with a
 * traceback. [-0, +0, e] */
static int load_script(lua_State *L)
{
    load_ctx_t *c = lua_touserdata(L, 1);
    /* internal.script_name: the chunk's name without its '@' (rpc.discover's info.title) */
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->lua->internal_ref);
    lua_pushstring(L, c->chunkname + (c->chunkname[0] == '@'));
    lua_setfield(L, -2, "script_name");
    lua_pop(L, 1);
    if (c->dir) { /* package.path = "<dir>/?.lua;<dir>/?/init.lua;" .. package.path */
        lua_getglobal(L, "package");
        lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;", c->dir, c->dir);
        lua_getfield(L, -2, "path");
        lua_concat(L, 2);
        lua_setfield(L, -2, "path");
        lua_pop(L, 1);
    }
    lua_pushcfunction(L, traceback_handler);
    int handler = lua_gettop(L);
    if (luaL_loadbuffer(L, c->src, c->len, c->chunkname) != 0 || lua_pcall(L, 0, 0, handler) != 0) {
        /* One line for the user; the traceback (if any) for the debug log. */
        const char *msg = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "error";
        const char *tb = strstr(msg, "\nstack traceback:");
        snprintf(c->err, c->errlen, "%.*s", tb ? (int)(tb - msg) : (int)strlen(msg), msg);
        if (tb)
            mph_log(MPH_LOG_DEBUG, "%s", msg);
        c->rc = MPH_ESCRIPT;
    }
    return 0;
}

int mph_lua_load(mph_lua_t *lua, const char *chunkname, const char *src, size_t len,
                 const char *dir, char *err, size_t errlen)
{
    load_ctx_t c = {lua, chunkname, src, dir, len, err, errlen, 0};
    if (mph__lua_protect(lua, load_script, &c, "loading the script") != 0) {
        snprintf(err, errlen, "%s: %s", chunkname, NOMEM_MESSAGE);
        return MPH_ESCRIPT;
    }
    return c.rc;
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

void mph_lua_stats(const mph_lua_t *lua, mph_lua_stats_t *out)
{
    lua_State *L = lua->L; /* [-0, +0, -]: reading the collector's count changes nothing */
    out->calls = lua->stats.calls;
    out->attempts = lua->stats.attempts;
    out->commits = lua->stats.commits;
    out->conflicts = lua->stats.conflicts;
    out->storage_errors = lua->stats.storage_errors;
    out->idem_replays = lua->stats.idem_replays;
    out->lua_bytes =
        ((uint64_t)lua_gc(L, LUA_GCCOUNT, 0) << 10) + (uint64_t)lua_gc(L, LUA_GCCOUNTB, 0);
    out->scope_bytes = lua->scope_bytes;
    out->scopes = lua->scope_map.count - lua->outbox_scopes; /* the script's data only */
    mph__outbox_stats(lua->outbox, &out->outbox);
}

size_t mph_lua_pending(const mph_lua_t *lua)
{
    return lua->pending_calls;
}

int mph_lua_topology_workers(const mph_lua_t *lua)
{
    return lua->topology_workers;
}

int mph_lua_serve_called(const mph_lua_t *lua)
{
    return lua->serve_called;
}

/* What needs_auth asks of the services table under lua_cpcall. */
typedef struct {
    mph_lua_t *lua;
    const char *method; /* NUL-terminated: an auth service's name has no NUL */
    int exposed;        /* out */
} exposed_t;

/* e->exposed = I.services[method].expose, read as setup_attempt reads it. [-0, +0, m] */
static int read_exposed(lua_State *L)
{
    exposed_t *e = lua_touserdata(L, 1);
    mph__lua_get_internal(e->lua, L, "services");
    lua_getfield(L, -1, e->method); /* Stack: ud, services, svc */
    if (lua_istable(L, -1)) {
        lua_getfield(L, -1, "expose");
        e->exposed = lua_toboolean(L, -1);
    }
    return 0;
}

int mph_lua_needs_auth(mph_lua_t *lua, const char *method, size_t mlen)
{
    for (size_t i = 0; i < lua->nauth_services; i++) {
        if (strlen(lua->auth_services[i]) != mlen ||
            memcmp(lua->auth_services[i], method, mlen) != 0)
            continue;
        /* Only an exposed one: a call to one that is not must get the -32601 of any unknown
         * name (setup_attempt answers it), not the 401 that would tell it exists. svc.expose
         * may change at any time, so it is read at each call, as setup_attempt reads it. */
        exposed_t e = {lua, lua->auth_services[i], 0};
        return mph__lua_protect(lua, read_exposed, &e, "reading svc.expose") == 0 && e.exposed;
    }
    return 0;
}

int mph_lua_uses_auth(const mph_lua_t *lua)
{
    return lua->nauth_services > 0;
}

/* The three timers close in one pass of the loop (a host that stops before it serves runs the
 * loop only once more); the last callback frees what embeds them. */
static void on_timer_closed(uv_handle_t *h)
{
    mph_lua_t *lua = h->data;
    if (--lua->closing_timers > 0)
        return;
    void (*closed)(void *) = lua->closed;
    void *closed_ud = lua->closed_ud;
    lua_close(lua->L);
    mph_list_t *n;
    while ((n = mph_list_pop(&lua->cfuncs)) != NULL) {
        mph_lua_cfunc_t *f = mph_list_entry(n, mph_lua_cfunc_t, node);
        free(f->name);
        free(f);
    }
    mph_buf_free(&lua->scratch);
    mph__outbox_free(lua->outbox);
    for (size_t i = 0; i < lua->nauth_services; i++)
        free(lua->auth_services[i]);
    free(lua->auth_services);
    free(lua);
    if (closed)
        closed(closed_ud);
}

void mph_lua_close(mph_lua_t *lua, void (*closed)(void *ud), void *ud)
{
    assert(lua->fetching == 0); /* the fetcher was closed first: every exchange has ended */
    lua->closing = 1;
    lua->closed = closed;
    lua->closed_ud = ud;
    mph_log(lua->stats.calls ? MPH_LOG_INFO : MPH_LOG_DEBUG,
            "transactions: %llu calls, %llu attempts, %llu commits, %llu conflicts",
            (unsigned long long)lua->stats.calls, (unsigned long long)lua->stats.attempts,
            (unsigned long long)lua->stats.commits, (unsigned long long)lua->stats.conflicts);
    if (lua->watchdog) {
        mph_watchdog_stop(lua->watchdog);
        lua->watchdog = NULL;
    }
    mph__outbox_stop(lua->outbox); /* no claim starts from the answers below */
    mph__scopes_close(lua);        /* answers whatever still waits, frees scopes */
    lua->closing_timers = 3;
    uv_handle_t *outbox_timer = mph__outbox_handle(lua->outbox);
    lua->retry_timer.data = lua->evict_timer.data = outbox_timer->data = lua;
    uv_close((uv_handle_t *)&lua->retry_timer, on_timer_closed);
    uv_close((uv_handle_t *)&lua->evict_timer, on_timer_closed);
    uv_close(outbox_timer, on_timer_closed);
}
