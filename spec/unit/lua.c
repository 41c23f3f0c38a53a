/*
 * Unit tests of lua/: the bridge (JSON params -> Lua arguments, results, errors, the Lua stack
 * balanced after every call) and the transaction runner's state machine, driven against a
 * fake in-memory store whose operations complete when the test says so: commits, conflicts
 * (as if another process had written), storage errors, retries running out, a handler that
 * raises, a scope loaded from inside a table.sort comparator; and mp.shard and mp.scatter
 * against a fake forwarder whose forwards the test answers when and how it likes. The .c
 * files are included to reach their statics.
 */
#define _GNU_SOURCE
#include "common/common.c"
#include "common/map.c"
#include "lua/vm.c"
#include "lua/txn.c"
#include "lua/json.c"
#include "common/json.c"
#include "lua/scopes.c"
#include "lua/watchdog.c"
#include "lua/forward.c"
#include "lua/fetch.c"
#include "lua/idem.c"
#include "lua/outbox.c"

#include <signal.h>
#include <sys/wait.h>

#include "spec/unit/unit.h"

/* ---- A fake store: one scope's keys in memory, operations completed by fake_run ---- */

#define FAKE_KEYS 16
#define FAKE_OPS 64

typedef struct {
    int is_commit;
    mph_store_cb cb;
    void *ud;
    size_t n;
    char *keys[FAKE_KEYS], *json[FAKE_KEYS]; /* the commit's writes (json NULL: delete) */
    uint64_t expected;
} fake_op_t;

typedef struct {
    mph_store_t base;
    char *keys[FAKE_KEYS], *json[FAKE_KEYS]; /* the committed document */
    size_t n;
    uint64_t version;
    int conflicts;      /* commits to refuse, as if another process committed first */
    int fail_commits;   /* commits to fail with an I/O error */
    int fail_loads;     /* loads to fail */
    int loads, commits; /* operations started (commits: with writes) */
    int checks;         /* commits started with no writes: a read's version check */
    fake_op_t ops[FAKE_OPS];
    size_t nops;
} fake_t;

static void fake_set(fake_t *f, const char *key, const char *json)
{
    for (size_t i = 0; i < f->n; i++) {
        if (strcmp(f->keys[i], key) == 0) {
            free(f->json[i]);
            f->json[i] = json ? strdup(json) : NULL;
            return;
        }
    }
    f->keys[f->n] = strdup(key);
    f->json[f->n++] = json ? strdup(json) : NULL;
}

static const char *fake_get(fake_t *f, const char *key)
{
    for (size_t i = 0; i < f->n; i++)
        if (strcmp(f->keys[i], key) == 0)
            return f->json[i];
    return NULL;
}

static int fake_load(mph_store_t *s, const char *scope, mph_store_cb cb, void *ud)
{
    fake_t *f = (fake_t *)s;
    f->loads++;
    f->ops[f->nops++] = (fake_op_t){0, cb, ud, 0, {0}, {0}, 0};
    return 0;
}

static int fake_commit(mph_store_t *s, const mph_store_write_t *w, size_t nw, mph_store_cb cb,
                       void *ud)
{
    fake_t *f = (fake_t *)s;
    if (w->n > 0)
        f->commits++;
    else
        f->checks++;
    fake_op_t *op = &f->ops[f->nops++];
    *op = (fake_op_t){1, cb, ud, w->n, {0}, {0}, w->expected_version};
    for (size_t i = 0; i < w->n; i++) {
        op->keys[i] = strndup(w->entries[i].key, w->entries[i].klen);
        op->json[i] = w->entries[i].json ? strndup(w->entries[i].json, w->entries[i].jlen) : NULL;
    }
    (void)nw;
    return 0;
}

static void fake_close(mph_store_t *s, void (*done)(void *), void *ud)
{
    (void)s;
    done(ud);
}

static const mph_store_methods_t fake_methods = {
    MPH_STORE_METHODS_VERSION, "fake", fake_load, fake_commit, fake_close, NULL, NULL, NULL};

/* Completes every started operation (and those they start), in order. */
static void fake_run(fake_t *f)
{
    while (f->nops > 0) {
        fake_op_t op = f->ops[0];
        memmove(f->ops, f->ops + 1, --f->nops * sizeof(op));
        mph_store_entry_t entries[FAKE_KEYS];
        for (size_t i = 0; i < f->n; i++)
            entries[i] = (mph_store_entry_t){f->keys[i], strlen(f->keys[i]), f->json[i],
                                             f->json[i] ? strlen(f->json[i]) : 0};
        mph_store_result_t res = {0, NULL, {f->version, 0, f->n, entries}, "global", 0, 0, NULL};
        mph_store_conflict_t conflict;
        if (!op.is_commit && f->fail_loads > 0) {
            f->fail_loads--;
            res.status = MPH_EIO;
            res.message = "fake load error";
        } else if (op.is_commit && f->fail_commits > 0) {
            f->fail_commits--;
            res.status = MPH_EIO;
            res.message = "fake commit error";
        } else if (op.is_commit && f->conflicts > 0) {
            f->conflicts--;
            f->version++; /* another process wrote: its n is now 100 * version */
            char n[32];
            snprintf(n, sizeof(n), "%llu", 100 * (unsigned long long)f->version);
            fake_set(f, "n", n);
            for (size_t i = 0; i < f->n; i++)
                entries[i] = (mph_store_entry_t){f->keys[i], strlen(f->keys[i]), f->json[i],
                                                 f->json[i] ? strlen(f->json[i]) : 0};
            res.status = MPH_ECONFLICT;
            res.doc = (mph_store_doc_t){f->version, 0, f->n, entries};
            conflict = (mph_store_conflict_t){"global", res.doc, 0};
            res.nconflicts = 1;
            res.conflicts = &conflict;
        } else if (op.is_commit) {
            CHECK(op.expected == f->version);
            for (size_t i = 0; i < op.n; i++)
                fake_set(f, op.keys[i], op.json[i]);
            res.doc.version = op.n > 0 ? ++f->version : f->version; /* (a check keeps it) */
        }
        op.cb(op.ud, &res);
        for (size_t i = 0; i < op.n; i++) {
            free(op.keys[i]);
            free(op.json[i]);
        }
    }
}

static void fake_free(fake_t *f)
{
    for (size_t i = 0; i < f->n; i++) {
        free(f->keys[i]);
        free(f->json[i]);
    }
}

/* ---- A bridge on the fake store, and calls ---- */

typedef struct {
    int done;
    int code;
    char json[256];
    char message[256];
    int replayed; /* the reply's flag (idempotency keys) */
} reply_t;

static void on_reply(void *ud, mph_lua_reply_t *r)
{
    reply_t *out = ud;
    out->done++;
    out->code = r->code;
    snprintf(out->json, sizeof(out->json), "%.*s", (int)r->json_len, r->json ? r->json : "");
    snprintf(out->message, sizeof(out->message), "%s", r->message ? r->message : "");
    out->replayed = r->replayed;
}

static uv_loop_t loop;
static fake_t fake;

static const char script[] =
    "local mp = require('metaparticle')\n"
    "runs = 0\n"
    "local function expose(name, fn) mp.service(name, fn).expose = true end\n"
    "expose('add', function(a, b) return a + b end)\n"
    "expose('obj', function(o) return {got = o.x, n = select('#', o)} end)\n"
    "expose('none', function(...) return select('#', ...) end)\n"
    "expose('raise', function() error('boom') end)\n"
    "expose('raise_obj', function() mp.error(-32050, 'custom', {a = 1}) end)\n"
    "expose('zero', function() mp.error(0, 'zero') end)\n"
    "expose('incr', function() runs = runs + 1\n"
    "  local g = mp.scope.global g.n = (g.n or 0) + 1 return g.n end)\n"
    "expose('incr_raise', function() mp.scope.global.n = -1 error('after write') end)\n"
    "expose('get', function() return mp.scope.global.n end)\n"
    "local cached = mp.service('get_cached', function() return mp.scope.global.n end)\n"
    "cached.expose = true cached.reads = 'cached'\n"
    "expose('sorted', function() runs = runs + 1 local n\n"
    "  table.sort({2, 1}, function(a, b) n = mp.scope.global.n return a < b end)\n"
    "  return n end)\n"
    "mp.serve()\n";

static mph_lua_t *bridge(int max_retries)
{
    memset(&fake, 0, sizeof(fake));
    fake.base.methods = &fake_methods;
    uv_loop_init(&loop);
    mph_lua_config_t cfg = {
        .store = &fake.base, .max_retries = max_retries, .worker_id = 1, .worker_count = 1};
    mph_lua_t *lua = NULL;
    CHECK(mph_lua_new(&lua, &loop, &cfg) == 0);
    char err[256];
    CHECK(mph_lua_load(lua, "=test", script, strlen(script), NULL, err, sizeof(err)) == 0);
    CHECK(lua_gettop(lua->L) == 0);
    return lua;
}

static void bridge_free(mph_lua_t *lua)
{
    mph_lua_close(lua, NULL, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&loop) == 0);
    fake_free(&fake);
}

/* Calls method with params (JSON text or NULL) and runs storage and timers until answered. */
static reply_t call(mph_lua_t *lua, const char *method, const char *params)
{
    reply_t r = {0, 0, "", "", 0};
    json_error_t jerr;
    json_t *p = params ? json_loads(params, 0, &jerr) : NULL;
    mph_lua_call(lua, method, strlen(method), p, on_reply, &r);
    json_decref(p);
    for (int i = 0; i < 10000 && !r.done; i++) {
        if (fake.nops > 0)
            fake_run(&fake);
        else if (uv_loop_alive(&loop))
            uv_run(&loop, UV_RUN_ONCE); /* a backoff timer */
        else
            break;
    }
    CHECK(r.done == 1);
    CHECK(lua_gettop(lua->L) == 0); /* the main stack is balanced after every call */
    CHECK(mph_lua_pending(lua) == 0);
    return r;
}

/* call() with an idempotency key (klen bytes). */
static reply_t call_keyed(mph_lua_t *lua, const char *key, size_t klen, const char *method,
                          const char *params)
{
    reply_t r = {0, 0, "", "", 0};
    json_error_t jerr;
    json_t *p = params ? json_loads(params, 0, &jerr) : NULL;
    mph_lua_call_keyed(lua, MPH_LUA_CALL, NULL, key, klen, method, strlen(method), p, on_reply, &r);
    json_decref(p);
    for (int i = 0; i < 10000 && !r.done; i++) {
        if (fake.nops > 0)
            fake_run(&fake);
        else
            break;
    }
    CHECK(r.done == 1);
    CHECK(lua_gettop(lua->L) == 0);
    CHECK(mph_lua_pending(lua) == 0);
    return r;
}

static int lua_runs(mph_lua_t *lua)
{
    lua_getglobal(lua->L, "runs");
    int n = (int)lua_tointeger(lua->L, -1);
    lua_pop(lua->L, 1);
    return n;
}

/* ---- The bridge ---- */

static void test_params_and_results(void)
{
    mph_lua_t *lua = bridge(-1); /* the default retries */
    reply_t r = call(lua, "add", "[2, 3]");
    CHECK(r.code == 0 && strcmp(r.json, "5") == 0);
    r = call(lua, "obj", "{\"x\": [1, {}]}");
    CHECK(strcmp(r.json, "{\"got\":[1,{}],\"n\":1}") == 0);
    r = call(lua, "none", NULL);
    CHECK(strcmp(r.json, "0") == 0);
    r = call(lua, "add", "[9007199254740993, 1]");
    CHECK(r.code == MPH_RPC_INVALID_PARAMS);
    r = call(lua, "nope", "[]");
    CHECK(r.code == MPH_RPC_METHOD_NOT_FOUND);
    bridge_free(lua);
}

static void test_errors(void)
{
    mph_lua_t *lua = bridge(-1); /* the default retries */
    reply_t r = call(lua, "raise", NULL);
    CHECK(r.code == MPH_RPC_HANDLER_ERROR && strcmp(r.message, "boom") == 0);
    r = call(lua, "raise_obj", NULL);
    CHECK(r.code == -32050 && strcmp(r.message, "custom") == 0);
    CHECK(strcmp(r.json, "{\"a\":1}") == 0);
    r = call(lua, "zero", NULL);
    CHECK(r.code == MPH_RPC_HANDLER_ERROR && strstr(r.message, "nonzero integer") != NULL);
    bridge_free(lua);
}

/* The in-process entry of idempotency keys (bridge.h, mph_lua_call_keyed), on calls whose
 * only scope is the record's bucket (the fake store keeps one scope). */
static void test_idempotency_keys(void)
{
    mph_lua_t *lua = bridge(-1); /* the default retries */
    reply_t r = call_keyed(lua, "k1", 2, "add", "[2, 3]");
    CHECK(r.code == 0 && strcmp(r.json, "5") == 0 && !r.replayed);
    CHECK(fake.commits == 1); /* the record */
    r = call_keyed(lua, "k1", 2, "add", "[2, 3]");
    CHECK(r.code == 0 && strcmp(r.json, "5") == 0 && r.replayed);
    CHECK(fake.commits == 1); /* a replay writes nothing */
    r = call_keyed(lua, "k1", 2, "add", "[2, 4]");
    CHECK(r.code == MPH_RPC_KEY_REUSED && !r.replayed);
    CHECK(strcmp(r.message, "idempotency key reused with a different request") == 0);
    /* A raised error is stored, then replayed with its code, message and data. */
    r = call_keyed(lua, "k2", 2, "raise_obj", NULL);
    CHECK(r.code == -32050 && strcmp(r.json, "{\"a\":1}") == 0 && !r.replayed);
    CHECK(fake.commits == 2);
    r = call_keyed(lua, "k2", 2, "raise_obj", NULL);
    CHECK(r.code == -32050 && strcmp(r.message, "custom") == 0 && r.replayed);
    CHECK(strcmp(r.json, "{\"a\":1}") == 0);
    /* Bad keys run nothing. */
    r = call_keyed(lua, "", 0, "add", "[1, 1]");
    CHECK(r.code == MPH_RPC_INVALID_REQUEST);
    r = call_keyed(lua, "a\nb", 3, "add", "[1, 1]");
    CHECK(r.code == MPH_RPC_INVALID_REQUEST);
    CHECK(fake.commits == 2);
    CHECK(mph_lua_idem_key_valid("x", 1) && !mph_lua_idem_key_valid("\x80", 1));
    bridge_free(lua);
}

/* ---- The runner ---- */

static void test_commit_and_read(void)
{
    mph_lua_t *lua = bridge(-1); /* the default retries */
    CHECK(strcmp(call(lua, "incr", NULL).json, "1") == 0);
    CHECK(strcmp(call(lua, "incr", NULL).json, "2") == 0);
    CHECK(strcmp(fake_get(&fake, "n"), "2") == 0);
    CHECK(fake.loads == 1 && fake.commits == 2);
    CHECK(strcmp(call(lua, "get", NULL).json, "2") == 0);
    CHECK(fake.commits == 2 && fake.checks == 1); /* a read writes nothing, checks its version */
    bridge_free(lua);
}

/* A read whose version check finds another process's commit runs again on it: it sees every
 * write acknowledged before it began (the fake's conflict is such a commit: n = 100). */
static void test_a_read_sees_another_process_commit(void)
{
    mph_lua_t *lua = bridge(-1);
    CHECK(strcmp(call(lua, "incr", NULL).json, "1") == 0);
    fake.conflicts = 1;
    reply_t r = call(lua, "get", NULL);
    CHECK(r.code == 0 && strcmp(r.json, "200") == 0);
    CHECK(fake.checks == 2 && fake.commits == 1); /* refused once, then confirmed */
    bridge_free(lua);
}

/* svc.reads = "cached": a read of one scope confirmed current within the last second is
 * answered from the state without a check; the others still check. */
static void test_cached_reads_skip_the_check(void)
{
    mph_lua_t *lua = bridge(-1);
    CHECK(strcmp(call(lua, "incr", NULL).json, "1") == 0); /* the commit confirms version 1 */
    fake.conflicts = 1;                                    /* another process commits */
    CHECK(strcmp(call(lua, "get_cached", NULL).json, "1") == 0);
    CHECK(fake.checks == 0);
    CHECK(strcmp(call(lua, "get", NULL).json, "200") == 0); /* a strict read sees it */
    bridge_free(lua);
}

static void test_conflicts_rerun_on_fresh_data(void)
{
    mph_lua_t *lua = bridge(-1); /* the default retries */
    fake.conflicts = 2;
    reply_t r = call(lua, "incr", NULL);
    CHECK(r.code == 0 && strcmp(r.json, "201") == 0); /* ran on the other process's 200 */
    CHECK(lua_runs(lua) == 3);
    CHECK(strcmp(fake_get(&fake, "n"), "201") == 0);
    bridge_free(lua);
}

static void test_retries_exhausted_is_32001_and_writes_nothing(void)
{
    mph_lua_t *lua = bridge(3);
    fake.conflicts = 1000;
    reply_t r = call(lua, "incr", NULL);
    CHECK(r.code == MPH_RPC_CONFLICT);
    CHECK(lua_runs(lua) == 4);                       /* the first attempt and three retries */
    CHECK(strcmp(fake_get(&fake, "n"), "400") == 0); /* only the other process's writes */
    bridge_free(lua);
}

static void test_storage_errors(void)
{
    mph_lua_t *lua = bridge(-1); /* the default retries */
    CHECK(strcmp(call(lua, "incr", NULL).json, "1") == 0);
    fake.fail_commits = 1;
    reply_t r = call(lua, "incr", NULL);
    CHECK(r.code == MPH_RPC_STORAGE_UNAVAILABLE && strstr(r.message, "fake commit") != NULL);
    CHECK(strcmp(call(lua, "incr", NULL).json, "2") == 0); /* reloaded, nothing of the failure */
    CHECK(fake.loads == 2);
    bridge_free(lua);
    lua = bridge(0);
    fake.fail_loads = 1;
    r = call(lua, "get", NULL);
    CHECK(r.code == MPH_RPC_STORAGE_UNAVAILABLE && strstr(r.message, "fake load") != NULL);
    CHECK(strcmp(call(lua, "get", NULL).json, "null") == 0);
    bridge_free(lua);
}

static void test_handler_that_raises_commits_nothing(void)
{
    mph_lua_t *lua = bridge(-1); /* the default retries */
    call(lua, "incr", NULL);
    reply_t r = call(lua, "incr_raise", NULL);
    CHECK(r.code == MPH_RPC_HANDLER_ERROR);
    CHECK(fake.commits == 1);
    CHECK(strcmp(call(lua, "get", NULL).json, "1") == 0);
    bridge_free(lua);
}

static void test_scope_loaded_from_a_comparator(void)
{
    mph_lua_t *lua = bridge(-1); /* the default retries */
    fake_set(&fake, "n", "7");
    reply_t r = call(lua, "sorted", NULL); /* cold: the attempt is void, then runs again */
    CHECK(r.code == 0 && strcmp(r.json, "7") == 0);
    CHECK(lua_runs(lua) == 2);
    r = call(lua, "sorted", NULL); /* warm: once */
    CHECK(lua_runs(lua) == 3);
    bridge_free(lua);
    lua = bridge(0);
    fake.fail_loads = 1;
    r = call(lua, "sorted", NULL);
    CHECK(r.code == MPH_RPC_STORAGE_UNAVAILABLE);
    bridge_free(lua);
}

/* README, "Guarantees": a read runs on the newest state and is answered once what it read is
 * durable; with nothing in flight, at once. */
static void test_read_waits_for_the_commit_it_read(void)
{
    mph_lua_t *lua = bridge(-1); /* the default retries */
    call(lua, "incr", NULL);     /* loaded, n = 1 */
    reply_t w = {0, 0, "", "", 0}, r = {0, 0, "", "", 0};
    mph_lua_call(lua, "incr", 4, NULL, on_reply, &w); /* its commit stays in flight */
    CHECK(fake.nops == 1 && w.done == 0);
    mph_lua_call(lua, "get", 3, NULL, on_reply, &r);
    CHECK(r.done == 0); /* it read n = 2, not durable yet */
    fake_run(&fake);
    CHECK(w.done == 1 && r.done == 1 && strcmp(r.json, "2") == 0);
    r = call(lua, "get", NULL); /* nothing in flight: answered before any storage work */
    CHECK(r.done == 1 && fake.nops == 0);
    bridge_free(lua);
}

static void test_no_global_prng_state(void)
{
    srand(7);
    int expected = rand();
    srand(7);
    mph_lua_t *lua = bridge(-1); /* the default retries */
    for (int i = 0; i < 10; i++)
        jitter(lua, 64);
    CHECK(rand() == expected);
    CHECK(lua->committer != 0);
    bridge_free(lua);
}

/* The edges of internal.h's diagram, and that a change along any other one stops the process
 * (test builds keep assert(): CMakeLists.txt), in a child so that the abort is observed. */
static void test_txn_states_are_asserted(void)
{
    CHECK(mph__txn_may_become(TXN_RUNNING, TXN_QUEUED));
    CHECK(mph__txn_may_become(TXN_QUEUED, TXN_COMMITTING));
    CHECK(mph__txn_may_become(TXN_COMMITTING, TXN_RETRY));
    CHECK(mph__txn_may_become(TXN_RETRY, TXN_RUNNING));
    CHECK(mph__txn_may_become(TXN_WAITING, TXN_RUNNING));
    CHECK(!mph__txn_may_become(TXN_RUNNING, TXN_COMMITTING)); /* not before it is queued */
    CHECK(!mph__txn_may_become(TXN_COMMITTING, TXN_QUEUED));
    CHECK(!mph__txn_may_become(TXN_WAITING, TXN_QUEUED));
    CHECK(!mph__txn_may_become(TXN_RETRY, TXN_COMMITTING));
    CHECK(!mph__txn_may_become(TXN_RELOAD, TXN_WAITING));
    CHECK(mph__txn_may_become(TXN_RUNNING, TXN_FETCHING)); /* mp.fetch waits ... */
    CHECK(mph__txn_may_become(TXN_FETCHING, TXN_RUNNING)); /* ... and the exchange's end resumes */
    CHECK(!mph__txn_may_become(TXN_FETCHING, TXN_QUEUED));
    CHECK(!mph__txn_may_become(TXN_WAITING, TXN_FETCHING));
#ifdef NDEBUG
    CHECK(!"a test build without assert(): see CMakeLists.txt");
#else
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        signal(SIGABRT, SIG_DFL);
        mph_txn_t t = {0};
        t.state = TXN_RUNNING;
        mph__txn_become(&t, TXN_COMMITTING); /* skips QUEUED */
        _exit(0);
    }
    int status = 0;
    CHECK(pid > 0 && waitpid(pid, &status, 0) == pid);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT);
#endif
}

/* ---- mp.shard and mp.scatter against a fake forwarder (this bridge is worker 1 of 3) ---- */

typedef struct {
    int worker;
    mph_lua_role_t role;
    char body[256];
    mph_lua_reply_cb cb;
    void *ud;
} fake_fwd_t;

static fake_fwd_t fwds[8];
static int nfwds;

static void fake_forward(void *fud, int worker, mph_lua_role_t role, const char *body, size_t len,
                         mph_lua_reply_cb cb, void *ud)
{
    CHECK(fud == &fwds && nfwds < 8);
    fwds[nfwds++] = (fake_fwd_t){worker, role, "", cb, ud};
    snprintf(fwds[nfwds - 1].body, sizeof(fwds[0].body), "%.*s", (int)len, body);
}

/* Answers forward i: a result (json), or an error (code, message, json as its data). */
static void fake_answer(int i, int code, const char *json, const char *message)
{
    mph_lua_reply_t r = {code, json ? strdup(json) : NULL, json ? strlen(json) : 0,
                         message ? strdup(message) : NULL, 0};
    fwds[i].cb(fwds[i].ud, &r);
    free(r.json);
    free(r.message);
}

static const char topo_script[] =
    "local mp = require('metaparticle')\n"
    "local function here(k) return {k = k, w = mp.worker.id} end\n"
    "mp.service('sh', mp.shard(3, function(k) return k end, here)).expose = true\n"
    "mp.service('sc', mp.scatter(3, function(x) return {x = x, w = mp.worker.id} end,\n"
    "  function(r) return {n = #r, r = r} end)).expose = true\n"
    "mp.service('sc1', mp.scatter(1, function() return mp.worker.id end,\n"
    "  function(r) return r end)).expose = true\n"
    "mp.serve()\n";

static mph_lua_t *topo_bridge(int count, mph_lua_forward_fn forward)
{
    memset(&fake, 0, sizeof(fake));
    fake.base.methods = &fake_methods;
    nfwds = 0;
    uv_loop_init(&loop);
    mph_lua_config_t cfg = {.store = &fake.base,
                            .max_retries = -1,
                            .worker_id = 1,
                            .worker_count = count,
                            .forward = forward,
                            .forward_ud = &fwds};
    mph_lua_t *lua = NULL;
    CHECK(mph_lua_new(&lua, &loop, &cfg) == 0);
    char err[256];
    CHECK(mph_lua_load(lua, "=topo", topo_script, strlen(topo_script), NULL, err, sizeof(err)) ==
          0);
    CHECK(mph_lua_topology_workers(lua) == 3);
    return lua;
}

/* Starts a call (in a role) that is left waiting for forwards. */
static void start(mph_lua_t *lua, mph_lua_role_t role, const char *method, const char *params,
                  reply_t *r)
{
    json_error_t jerr;
    json_t *p = json_loads(params, 0, &jerr);
    mph_lua_call_as(lua, role, NULL, method, strlen(method), p, on_reply, r);
    json_decref(p);
}

static void test_shard_routes_by_key(void)
{
    mph_lua_t *lua = topo_bridge(3, fake_forward);
    reply_t r = call(lua, "sh", "[3]"); /* 3 % 3 + 1: this worker, no forward */
    CHECK(r.code == 0 && strcmp(r.json, "{\"k\":3,\"w\":1}") == 0 && nfwds == 0);
    struct {
        const char *params;
        int worker;
    } keys[] = {{"[1]", 2}, {"[-1]", 3}, {"[\"a\"]", 2}, {"[4503599627370497]", 3}};
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        r = (reply_t){0, 0, "", "", 0};
        nfwds = 0;
        start(lua, MPH_LUA_CALL, "sh", keys[i].params, &r);
        CHECK(r.done == 0 && nfwds == 1 && fwds[0].worker == keys[i].worker);
        CHECK(fwds[0].role == MPH_LUA_SHARD);
        char body[128];
        snprintf(body, sizeof(body),
                 "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"sh\",\"params\":%s}", keys[i].params);
        CHECK(strcmp(fwds[0].body, body) == 0); /* the call as it came */
        fake_answer(0, 0, "{\"w\":7,\"big\":[1,2]}", NULL);
        CHECK(r.done == 1 && r.code == 0 && strcmp(r.json, "{\"big\":[1,2],\"w\":7}") == 0);
    }
    /* A forwarded error keeps its code, message and data. */
    r = (reply_t){0, 0, "", "", 0};
    nfwds = 0;
    start(lua, MPH_LUA_CALL, "sh", "[2]", &r);
    fake_answer(0, -32042, "{\"d\":1}", "no");
    CHECK(r.code == -32042 && strcmp(r.message, "no") == 0 && strcmp(r.json, "{\"d\":1}") == 0);
    /* Forwarded here as a shard: fn runs here, whatever the key says. */
    r = (reply_t){0, 0, "", "", 0};
    nfwds = 0;
    start(lua, MPH_LUA_SHARD, "sh", "[2]", &r);
    CHECK(r.done == 1 && strcmp(r.json, "{\"k\":2,\"w\":1}") == 0 && nfwds == 0);
    CHECK(lua_gettop(lua->L) == 0 && mph_lua_pending(lua) == 0);
    bridge_free(lua);
}

static void test_scatter_gathers_in_worker_order(void)
{
    mph_lua_t *lua = topo_bridge(3, fake_forward);
    reply_t r = {0, 0, "", "", 0};
    start(lua, MPH_LUA_CALL, "sc", "[5]", &r);
    /* Workers 2 and 3 by the forwarder, this worker's leaf as a call of its own. */
    CHECK(r.done == 0 && nfwds == 2 && fwds[0].worker == 2 && fwds[1].worker == 3);
    CHECK(fwds[0].role == MPH_LUA_LEAF && fwds[1].role == MPH_LUA_LEAF);
    fake_answer(1, 0, "\"three\"", NULL); /* out of order */
    CHECK(r.done == 0);
    fake_answer(0, 0, "null", NULL);
    CHECK(r.done == 1 && r.code == 0);
    CHECK(strcmp(r.json, "{\"n\":3,\"r\":[{\"w\":1,\"x\":5},null,\"three\"]}") == 0);
    /* Two leaves fail: the first in worker order is the call's error, once all answered. */
    r = (reply_t){0, 0, "", "", 0};
    nfwds = 0;
    start(lua, MPH_LUA_CALL, "sc", "[5]", &r);
    fake_answer(1, -32003, NULL, "three timed out");
    fake_answer(0, -32005, NULL, "worker 2 unavailable: connection refused");
    CHECK(r.code == -32005 && strcmp(r.message, "worker 2 unavailable: connection refused") == 0);
    /* A leaf forwarded here runs the leaf. */
    r = (reply_t){0, 0, "", "", 0};
    nfwds = 0;
    start(lua, MPH_LUA_LEAF, "sc", "[6]", &r);
    CHECK(r.done == 1 && strcmp(r.json, "{\"w\":1,\"x\":6}") == 0 && nfwds == 0);
    /* A scatter over this worker alone forwards nothing: its leaf is a local call. */
    r = call(lua, "sc1", "[]");
    CHECK(r.code == 0 && strcmp(r.json, "[1]") == 0 && nfwds == 0);
    CHECK(lua_gettop(lua->L) == 0 && mph_lua_pending(lua) == 0);
    bridge_free(lua);
}

/* An embedded host has no other workers: what is routed elsewhere fails with -32005. */
static void test_no_forwarder_is_32005(void)
{
    mph_lua_t *lua = topo_bridge(1, NULL);
    reply_t r = call(lua, "sh", "[0]");
    CHECK(r.code == 0);
    r = call(lua, "sh", "[1]");
    CHECK(r.code == MPH_RPC_WORKER_UNAVAILABLE);
    CHECK(strcmp(r.message, "worker 2 unavailable: this host runs 1 worker") == 0);
    r = call(lua, "sc", "[1]");
    CHECK(r.code == MPH_RPC_WORKER_UNAVAILABLE);
    bridge_free(lua);
}

static const mph_unit_test_t tests[] = {
    {"params_and_results", test_params_and_results},
    {"errors", test_errors},
    {"idempotency_keys", test_idempotency_keys},
    {"commit_and_read", test_commit_and_read},
    {"conflicts_rerun_on_fresh_data", test_conflicts_rerun_on_fresh_data},
    {"retries_exhausted_is_32001_and_writes_nothing",
     test_retries_exhausted_is_32001_and_writes_nothing},
    {"storage_errors", test_storage_errors},
    {"handler_that_raises_commits_nothing", test_handler_that_raises_commits_nothing},
    {"scope_loaded_from_a_comparator", test_scope_loaded_from_a_comparator},
    {"read_waits_for_the_commit_it_read", test_read_waits_for_the_commit_it_read},
    {"no_global_prng_state", test_no_global_prng_state},
    {"txn_states_are_asserted", test_txn_states_are_asserted},
    {"a_read_sees_another_process_commit", test_a_read_sees_another_process_commit},
    {"cached_reads_skip_the_check", test_cached_reads_skip_the_check},
    {"shard_routes_by_key", test_shard_routes_by_key},
    {"scatter_gathers_in_worker_order", test_scatter_gathers_in_worker_order},
    {"no_forwarder_is_32005", test_no_forwarder_is_32005},
};

MPH_UNIT_MAIN(tests)
