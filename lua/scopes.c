/*
 * scopes.c: the scope cache and the commits. It loads scopes, queues finished attempts,
 * commits them in batches with compare-and-set, and re-runs them on a conflict.
 *
 * Why it is fast (docs/design.md, "How it is fast"):
 *  1. Each scope's committed state stays in memory (metaparticle.lua's base); handlers run on
 *     it and the CAS validates. A conflict returns what changed, so a retry reads nothing.
 *  2. Handlers run to completion on the loop thread, so the transactions of one scope in
 *     this process run one after another, never against each other: in-process conflicts
 *     cannot happen; only other processes sharing the storage cause retries.
 *  3. Group commit. While a scope's commit is in flight, attempts that finish are merged
 *     into the pending state and wait; when the commit lands, all of them go out in one CAS
 *     (one fsync, one Redis round trip). No one is answered before the commit that holds
 *     their writes, or the writes they read, is durable.
 *
 * Retries are per scope, not per transaction: after a conflict the scope re-runs every
 * refused transaction, first, and commits them together with whatever ran meanwhile. A
 * transaction thus takes part in every commit its process attempts until one succeeds; only
 * the refusal of a commit carrying its own writes counts toward --max-retries.
 *
 * A conflict's retry runs at once, with no delay: the conflict reply carried the fresh data,
 * and another process committing back to back makes that data stale within a round trip, so
 * a delayed retry is a retry that must fail. (Measured with two processes on one hot key:
 * delayed retries starved one of them, p99 850 ms and calls giving up with -32001; immediate
 * retries split the commits evenly, p99 7 ms, none gave up.) Backoff is kept where waiting
 * helps: jittered after a storage error (1 ms doubling to 64 ms, so reconnecting processes do
 * not stampede), and while another process holds a fairness claim (as long as the storage says
 * the claim has left).
 *
 * Even so, a process whose next batch is always ready (it ran speculatively while the last
 * commit was in flight) answers success with a new CAS at once, while a process refused by a
 * conflict must first re-run its handlers: it would arrive second every round. So the retry of
 * a refused commit asks the storage for a fairness claim (storage.h): the next commit of the
 * scope is reserved for it, others are held off until it lands (on Redis, until its turn
 * ends: redis_cas.lua). The file backend does better for a commit of one scope: it keeps the
 * scope's lock from the conflict to the retry (storage/file.c). Either way the refused
 * transactions run again together and go out in one commit (rerun_now). (Two processes on
 * one hot key, 64 clients, before: files 11.8k calls/s, p99 29 ms, calls giving up with
 * -32001; Redis 38k/s. After: files 38-42k/s, p99 2 ms, two attempts per call at most; Redis
 * 50-54k/s; with Redis turns, about 0.8x one process.)
 *
 * Invariants, per scope: at most one commit in flight; `inflight` holds exactly the
 * transactions of that commit; `pending` holds transactions that ran on a state including
 * the in-flight writes, so when that commit fails they are re-run too. A read-only attempt
 * that ran while anything was in flight or pending joins `pending`: it may have read
 * speculative data and is answered only when that data is durable.
 */
#define _POSIX_C_SOURCE 200809L
#include <assert.h>
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "json.h"

#define CLAIM_AFTER 1 /* consecutive refusals before a commit asks for a fairness claim */

/* ---- Queues ----
 *
 * A transaction waits in at most one queue at a time (mph_txn_t.node, common/list.h): a
 * scope's `waiting`, its unit's `pending`, `rerun` or `held`, a commit's `batch`; each is a
 * FIFO. A walk that runs every transaction of a queue first takes the queue whole into a list
 * of its own (queue_take), then pops them one by one from that: running one may put it (or a
 * newcomer) into the same queue again, which then waits for the next walk. */

static void queue_push(mph_list_t *q, mph_txn_t *t)
{
    mph_list_insert_tail(q, &t->node);
}

/* Moves every transaction of q, in order, into `out` (made an empty list first); q is left
 * empty. */
static void queue_take(mph_list_t *q, mph_list_t *out)
{
    mph_list_init(out);
    mph_list_move(out, q);
}

/* Unlinks and returns the first transaction of q, or NULL when it is empty. */
static mph_txn_t *queue_pop(mph_list_t *q)
{
    mph_list_t *n = mph_list_pop(q);
    return n ? mph_list_entry(n, mph_txn_t, node) : NULL;
}

/* ---- Scopes ---- */

static mph_scope_t *scope_find(mph_lua_t *lua, const char *name)
{
    mph_map_node_t *n = mph_map_find(&lua->scope_map, name);
    return n ? mph_container_of(n, mph_scope_t, node) : NULL;
}

/* Makes u a unit of one member, `only` (whose member_node is unlinked). */
static void unit_init(mph_unit_t *u, mph_scope_t *only)
{
    memset(u, 0, sizeof(*u));
    u->lua = only->lua;
    mph_list_init(&u->members);
    mph_list_init(&u->pending);
    mph_list_init(&u->commits);
    mph_list_init(&u->rerun);
    mph_list_init(&u->held);
    mph_list_insert_tail(&u->members, &only->member_node);
    only->unit = u;
}

/* The unit's first member, or NULL: an empty home (its scope is in another unit). */
static mph_scope_t *unit_first(const mph_unit_t *u)
{
    mph_list_t *n = mph_list_first(&u->members);
    return n ? mph_list_entry(n, mph_scope_t, member_node) : NULL;
}

/* ---- The scope cache ----
 *
 * Every scope used stays in memory (its committed state in metaparticle.lua, its struct
 * here, its files open in the file backend), which is what makes a hot scope fast; a million
 * scopes touched once would keep a million. So each scope's memory is estimated (its JSON
 * text, plus a fixed cost per key and per scope: Lua tables cost more than their text), and
 * while the total passes --scope-cache the least recently acquired idle scopes are evicted:
 * their state is dropped, the storage is told to forget them, and their next use loads them
 * again. Idle: no attempt has it pinned (acquired and not ended), nothing waits for its load,
 * no commit carries it, and its unit is itself alone with nothing pending. lua->lru keeps
 * every scope, least recently acquired first: eviction looks from that end. */

#define SCOPE_COST 1536 /* bytes per scope beyond its name and data: structs, tables, files */
#define KEY_COST 192    /* per key: its table slot, the value's Lua object */
#define EVICT_SCAN 64   /* idle candidates looked at per check, from the cold end */

/* s is the most recently acquired scope now (or a new one). */
static void lru_touch(mph_scope_t *s)
{
    if (mph_list_is_linked(&s->lru_node))
        mph_list_remove(&s->lru_node);
    mph_list_insert_tail(&s->lua->lru, &s->lru_node);
}

/* Sets the scope's estimated memory (the total follows). */
static void scope_set_bytes(mph_scope_t *s, size_t bytes)
{
    s->lua->scope_bytes += bytes - s->bytes;
    s->bytes = bytes;
}

/* The estimated memory of a document's entries. */
static size_t doc_bytes(const mph_store_entry_t *e, size_t n)
{
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++)
        bytes += e[i].klen + e[i].jlen + KEY_COST;
    return bytes;
}

static mph_scope_t *scope_get(mph_lua_t *lua, const char *name)
{
    mph_scope_t *s = scope_find(lua, name);
    if (s)
        return s;
    s = mph_xcalloc(1, sizeof(*s));
    s->lua = lua;
    s->name = mph_xstrdup(name);
    s->state = SCOPE_UNLOADED;
    mph_list_init(&s->waiting);
    unit_init(&s->home, s);
    mph_map_insert(&lua->scope_map, &s->node, s->name);
    lua->outbox_scopes += mph__outbox_is_scope(name);
    lru_touch(s);
    scope_set_bytes(s, SCOPE_COST + strlen(name));
    return s;
}

static int scope_idle(const mph_scope_t *s)
{
    const mph_unit_t *u = s->unit;
    return s->pins == 0 && s->state != SCOPE_LOADING && mph_list_empty(&s->waiting) &&
           s->commit == NULL && u == &s->home &&
           mph_list_next(&u->members, &s->member_node) == NULL && mph_list_empty(&u->commits) &&
           mph_list_empty(&u->pending) && mph_list_empty(&u->rerun) && mph_list_empty(&u->held) &&
           !u->backing_off;
}

static void scope_forget(mph_scope_t *s);

static void cold_clear(mph_scope_t *s);

static void scope_free(mph_scope_t *s)
{
    s->lua->outbox_scopes -= mph__outbox_is_scope(s->name);
    cold_clear(s);
    scope_set_bytes(s, 0);
    free(s->name);
    free(s);
}

static void on_evict_timer(uv_timer_t *timer);

/* The estimate passed the bound: evict on the next loop iteration. Not now: the runner's
 * callers up the stack may hold any scope that has just become idle. */
static void schedule_eviction(mph_lua_t *lua)
{
    if (lua->scope_cache && lua->scope_bytes > lua->scope_cache && !lua->closing &&
        !uv_is_active((uv_handle_t *)&lua->evict_timer))
        uv_timer_start(&lua->evict_timer, on_evict_timer, 0, 0);
}

/* Evicts idle scopes, coldest first, while the estimate passes the bound; looks at
 * EVICT_SCAN of them per loop iteration. */
static void on_evict_timer(uv_timer_t *timer)
{
    mph_lua_t *lua = mph_container_of(timer, mph_lua_t, evict_timer);
    int evicted = 0, looked = 0;
    mph_list_t *n, *next;
    mph_list_foreach_safe(n, next, &lua->lru) {
        if (!lua->scope_cache || lua->scope_bytes <= lua->scope_cache || looked++ == EVICT_SCAN)
            break;
        mph_scope_t *s = mph_list_entry(n, mph_scope_t, lru_node);
        if (scope_idle(s)) {
            if (s->state == SCOPE_READY)
                scope_forget(s);
            mph_list_remove(&s->lru_node);
            mph_map_remove(&lua->scope_map, &s->node);
            if (lua->store && lua->store->methods->forget)
                lua->store->methods->forget(lua->store, s->name);
            scope_free(s);
            evicted++;
        }
    }
    if (evicted)
        schedule_eviction(lua); /* more, if still over: the next iteration goes on */
}

/* ---- Cold values ----
 *
 * A loaded scope's values stay the JSON text the storage returned, in a C map per scope,
 * until a transaction first reads them: C.cold_take decodes one into base, where it stays.
 * Why: LuaJIT's collector visits every live object in every cycle, and a cycle comes around
 * whenever the heap has grown by its live size again. A scope of 100,000 keys held as Lua
 * strings and tables made each cycle walk some 300,000 objects for a counter that reads one
 * key (13% of the process in the string sweep alone: 0.74-0.76x the 1-key scope's calls/s).
 * As text outside the Lua heap they cost the collector nothing, and loading does not decode.
 * Invariant: a key's committed value is in base or in the cold map, never both (pending and
 * inflight shadow either). A key holding a NUL byte (the map's keys are C strings) goes to
 * base at once. A value that is not valid JSON is found when it is read, not at the load. */

typedef struct {
    mph_map_node_t node;
    const char *json; /* jlen bytes after the key, in the same allocation */
    size_t jlen;
    char key[]; /* NUL-terminated */
} cold_t;

/* key: klen bytes followed by a NUL (a Lua string's). */
static cold_t *cold_find(const mph_scope_t *s, const char *key, size_t klen)
{
    if (s->cold.count == 0 || memchr(key, 0, klen) != NULL)
        return NULL;
    mph_map_node_t *n = mph_map_find(&s->cold, key);
    return n ? mph_container_of(n, cold_t, node) : NULL;
}

/* The same for an entry's key, which is not NUL-terminated. */
static cold_t *cold_find_entry(const mph_scope_t *s, const mph_store_entry_t *e)
{
    if (s->cold.count == 0)
        return NULL;
    char small[128];
    char *key = e->klen < sizeof(small) ? small : mph_xmalloc(e->klen + 1);
    memcpy(key, e->key, e->klen);
    key[e->klen] = '\0';
    cold_t *c = cold_find(s, key, e->klen);
    if (key != small)
        free(key);
    return c;
}

static void cold_remove(mph_scope_t *s, cold_t *c)
{
    mph_map_remove(&s->cold, &c->node);
    free(c);
}

static void cold_free(mph_map_node_t *n, void *ud)
{
    cold_remove(ud, mph_container_of(n, cold_t, node));
}

static void cold_clear(mph_scope_t *s)
{
    mph_map_each(&s->cold, cold_free, s);
    mph_map_free(&s->cold);
    s->cold = (mph_map_t)MPH_MAP_INIT;
}

/* Sets (e->json) or deletes (NULL) e's key in the cold map; the key holds no NUL byte. */
static void cold_set(mph_scope_t *s, const mph_store_entry_t *e)
{
    if (e->json == NULL) {
        cold_t *old = cold_find_entry(s, e);
        if (old)
            cold_remove(s, old);
        return;
    }
    cold_t *c = mph_xmalloc(sizeof(*c) + e->klen + 1 + e->jlen);
    memcpy(c->key, e->key, e->klen);
    c->key[e->klen] = '\0';
    c->json = c->key + e->klen + 1;
    memcpy(c->key + e->klen + 1, e->json, e->jlen);
    c->jlen = e->jlen;
    cold_t *old = cold_find(s, c->key, e->klen); /* the new entry's key is NUL-terminated */
    if (old)
        cold_remove(s, old);
    mph_map_insert(&s->cold, &c->node, c->key);
}

/* C.cold_take(scope, base, key) -> the value of a cold key, decoded and moved into base; nil
 * when the key is not cold; or nil, message when its text is not valid JSON (it stays cold).
 * Raises when out of memory (the key then stays cold too). [-0, +1|2, e] */
static int l_cold_take(lua_State *L)
{
    mph_scope_t *s = lua_touserdata(L, 1);
    size_t klen;
    const char *key = luaL_checklstring(L, 3, &klen);
    cold_t *c = cold_find(s, key, klen);
    if (c == NULL)
        return 0;
    char err[300];
    int rc = mph_json_push_text(L, c->json, c->jlen, err, sizeof(err));
    if (rc == MPH_JSON_ENOMEM)
        return luaL_error(L, "not enough memory");
    if (rc != 0) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    /* Stack: scope, base, key, value */
    lua_pushvalue(L, 3);
    lua_pushvalue(L, 4);
    lua_rawset(L, 2); /* before the removal: a raise here leaves the key cold */
    cold_remove(s, c);
    return 1;
}

/* C.cold_drop(scope, key): the key's committed value is in base now. [-0, +0, -] */
static int l_cold_drop(lua_State *L)
{
    mph_scope_t *s = lua_touserdata(L, 1);
    size_t klen;
    const char *key = lua_tolstring(L, 2, &klen);
    cold_t *c = key ? cold_find(s, key, klen) : NULL;
    if (c)
        cold_remove(s, c);
    return 0;
}

static void push_cold_key(mph_map_node_t *n, void *ud)
{
    lua_State *L = ud;
    lua_pushstring(L, mph_container_of(n, cold_t, node)->key);
    lua_rawseti(L, -2, (int)lua_objlen(L, -2) + 1);
}

/* C.cold_keys(scope) -> an array of the cold keys, in no particular order. [-0, +1, e] */
static int l_cold_keys(lua_State *L)
{
    mph_scope_t *s = lua_touserdata(L, 1);
    lua_createtable(L, (int)s->cold.count, 0);
    mph_map_each(&s->cold, push_cold_key, L);
    return 1;
}

/* What mph__scopes_cold_each hands to each_cold. */
typedef struct {
    void (*fn)(const char *key, const char *json, size_t jlen, void *ud);
    void *ud;
} cold_each_t;

static void each_cold(mph_map_node_t *n, void *ud)
{
    const cold_each_t *e = ud;
    const cold_t *c = mph_container_of(n, cold_t, node);
    e->fn(c->key, c->json, c->jlen, e->ud);
}

void mph__scopes_cold_each(mph_scope_t *s,
                           void (*fn)(const char *key, const char *json, size_t jlen, void *ud),
                           void *ud)
{
    cold_each_t e = {fn, ud};
    mph_map_each(&s->cold, each_cold, &e);
}

const luaL_Reg mph__scopes_helpers[] = {{"cold_take", l_cold_take},
                                        {"cold_drop", l_cold_drop},
                                        {"cold_keys", l_cold_keys},
                                        {NULL, NULL}};

/* Writes the entries of a document into scope s, in order: decoded into base (the table on
 * top of the stack) when `decode` (a conflict's changes), else as text into the cold map (a
 * load, a conflict's whole document). Returns 0 or -1 with err filled (an entry that is not
 * valid JSON); raises when out of memory. Only inside mph__lua_protect. [-0, +0, e] */
static int apply_entries(lua_State *L, mph_scope_t *s, const mph_store_doc_t *doc, int decode,
                         char *err, size_t errlen)
{
    for (size_t i = 0; i < doc->n; i++) {
        const mph_store_entry_t *e = &doc->entries[i];
        int plain = memchr(e->key, 0, e->klen) == NULL;
        if (plain && !decode) {
            cold_set(s, e);
            continue;
        }
        if (plain) {
            cold_t *c = cold_find_entry(s, e);
            if (c)
                cold_remove(s, c); /* the value in base replaces it */
        }
        lua_pushlstring(L, e->key, e->klen);
        if (e->json == NULL) {
            lua_pushnil(L);
        } else {
            int rc = mph_json_push_text(L, e->json, e->jlen, err, errlen);
            if (rc == MPH_JSON_ENOMEM) {
                lua_pushliteral(L, "not enough memory");
                lua_error(L);
            }
            if (rc != 0) {
                lua_pop(L, 1);
                return -1;
            }
        }
        lua_rawset(L, -3);
    }
    return 0;
}

/* What the protected scope operations below get. */
typedef struct {
    mph_scope_t *s;
    const mph_store_doc_t *doc; /* entries to apply, or NULL */
    int clear_base;             /* reset_state: the doc is the whole scope */
    int rc;                     /* apply_entries' result */
    char err[300];              /* its message */
} scope_op_t;

/* I[fn](name, clear_base, scope) -> base, then the doc's entries written into the scope.
 * A load and a whole document replace the cold map too. Under lua_cpcall. [-0, +0, e] */
static int scope_load(lua_State *L, const char *fn, int whole)
{
    scope_op_t *op = lua_touserdata(L, 1);
    lua_pushstring(L, op->s->name);
    lua_pushboolean(L, op->clear_base);
    lua_pushlightuserdata(L, op->s);
    mph__lua_call_internal(op->s->lua, L, fn, 3, 1); /* Stack: ud, base */
    if (whole)
        cold_clear(op->s);
    op->rc = apply_entries(L, op->s, op->doc, !whole, op->err, sizeof(op->err));
    return 0;
}

static int new_state(lua_State *L)
{
    return scope_load(L, "new_state", 1);
}

static int reset_state(lua_State *L)
{
    scope_op_t *op = lua_touserdata(L, 1);
    return scope_load(L, "reset_state", op->clear_base);
}

/* I[fn](name), result dropped. Under lua_cpcall. [-0, +0, e] */
static int scope_call(lua_State *L, const char *fn)
{
    scope_op_t *op = lua_touserdata(L, 1);
    lua_pushstring(L, op->s->name);
    mph__lua_call_internal(op->s->lua, L, fn, 1, 0);
    return 0;
}

static int commit_ok(lua_State *L)
{
    return scope_call(L, "commit_ok");
}

static int drop_state(lua_State *L)
{
    return scope_call(L, "drop_state");
}

static int drop_pending(lua_State *L)
{
    return scope_call(L, "drop_pending");
}

/* Forgets the scope's state: it is loaded again on the next access. Dropping the Lua side
 * can only fail when out of memory, and then new_state replaces it at the next load anyway. */
static void scope_forget(mph_scope_t *s)
{
    scope_op_t op = {s, NULL, 0, 0, ""};
    mph__lua_protect(s->lua, drop_state, &op, "dropping a scope");
    cold_clear(s);
    s->state = SCOPE_UNLOADED;
    scope_set_bytes(s, SCOPE_COST + strlen(s->name));
}

/* ---- Acquire and load ---- */

/* Runs every transaction waiting for s's load: a suspended attempt is resumed (and asks
 * C.acquire for the outcome, kept in the transaction); a void one starts again, or hears the
 * failure. code == 0: the scope is ready. */
static void wake_waiters(mph_scope_t *s, int code, const char *failure)
{
    mph_list_t waiting;
    queue_take(&s->waiting, &waiting);
    mph_txn_t *t;
    while ((t = queue_pop(&waiting)) != NULL) {
        assert(assert_txn_state(t));
        if (t->state == TXN_RELOAD) {
            if (code != 0)
                mph__txn_reply(t, code, failure);
            else
                mph__txn_start_attempt(t);
        } else {
            if (code != 0) {
                t->wake_code = code;
                t->wake_message = mph_xstrdup(failure);
            }
            mph__txn_resume(t, 0);
        }
    }
}

static void on_loaded(void *ud, const mph_store_result_t *res)
{
    mph_scope_t *s = ud;
    mph_lua_t *lua = s->lua;
    assert(s->state == SCOPE_LOADING);
    char failure[400];
    if (res->status != 0) {
        lua->stats.storage_errors++;
        snprintf(failure, sizeof(failure), "storage unavailable: %s",
                 res->message ? res->message : mph_strerror(res->status));
        mph_log(MPH_LOG_WARN, "loading scope %s: %s", s->name, failure);
        s->state = SCOPE_UNLOADED;
        wake_waiters(s, MPH_RPC_STORAGE_UNAVAILABLE, failure);
        return;
    }
    scope_op_t op = {s, &res->doc, 0, 0, ""};
    if (mph__lua_protect(lua, new_state, &op, "loading a scope") != 0) {
        snprintf(failure, sizeof(failure), "Internal error: not enough memory loading scope %s",
                 s->name);
        scope_forget(s);
        wake_waiters(s, MPH_RPC_INTERNAL_ERROR, failure);
        return;
    }
    if (op.rc != 0) {
        snprintf(failure, sizeof(failure), "storage unavailable: scope %s is corrupt: %s", s->name,
                 op.err);
        mph_log(MPH_LOG_ERROR, "%s", failure);
        scope_forget(s);
        wake_waiters(s, MPH_RPC_STORAGE_UNAVAILABLE, failure);
        return;
    }
    s->version = res->doc.version;
    s->fresh_ms = uv_now(lua->loop);
    s->state = SCOPE_READY;
    scope_set_bytes(s, SCOPE_COST + strlen(s->name) + doc_bytes(res->doc.entries, res->doc.n));
    mph_log(MPH_LOG_DEBUG, "scope %s loaded: %zu entries, version %llu", s->name, res->doc.n,
            (unsigned long long)s->version);
    wake_waiters(s, 0, NULL);
    schedule_eviction(lua);
}

/* ---- Holding new attempts ----
 *
 * A transaction that starts on a scope while the scope's commit is in flight runs on the
 * speculative state and is committed in the next batch: alone, that overlaps handlers with
 * the storage's round trip. But when another process commits the same scope too, a commit
 * that follows a refusal is itself often refused or held off (another process's turn, see
 * redis_cas.lua), and then everything that ran on top of it runs again. So while the unit's
 * last commit was refused and its retry is in flight or waiting, a new attempt waits in
 * C.acquire (it has read nothing yet) and runs once, on the outcome: kick lets the held
 * attempts go on before it starts the next commit. (Two processes on one hot Redis scope, 64
 * clients: 0.73x one process's calls/s without holding, 0.83x with it.) Attempts that already
 * hold a scope never wait (see below), and a process that sees no conflict holds nothing. */

/* Whether attempt t, touching its first scope s (ready), waits until s's unit commits. */
static int hold(const mph_txn_t *t, const mph_scope_t *s, int can_wait)
{
    const mph_unit_t *u = s->unit;
    return can_wait && t->nscopes == 0 && !u->rerunning && u->conflict_streak > 0 &&
           (!mph_list_empty(&u->commits) || u->backing_off);
}

/* Resumes the attempts of q, suspended in C.acquire; each calls it again. */
static void wake_all(mph_list_t *q)
{
    mph_list_t all;
    queue_take(q, &all);
    mph_txn_t *t;
    while ((t = queue_pop(&all)) != NULL)
        mph__txn_resume(t, 0);
}

/* ---- Loading where one cannot wait ----
 *
 * A handler may touch a scope for the first time inside a callback that C called (a
 * table.sort comparator, a string.gsub function, __tostring under tostring) or inside a
 * coroutine it made. A yield cannot cross that C call (or would go to the wrong resumer), so
 * on a warm process these idioms work and on a cold one (after start, after a storage error
 * dropped the scope) they could not. Instead the load starts, the attempt is marked void
 * (t->reload; C.checkpoint refuses it whatever the handler does with the error), and once the
 * load ends the transaction runs again from the start, as after a conflict. Nothing about
 * this is specific to the global scope: named scopes (mp.scope.named, to come) take the same
 * path, which is why it is not done by preloading "global" before every first call. */

/* Adds ready scope s to t's: pinned until the attempt ends, so not evicted under it. */
static void pin(mph_txn_t *t, mph_scope_t *s)
{
    if (t->nscopes == t->scopes_cap) {
        int cap = t->scopes_cap * 2;
        if (t->scopes == t->scopes_inline) {
            t->scopes = mph_xmalloc((size_t)cap * sizeof(*t->scopes));
            memcpy(t->scopes, t->scopes_inline, sizeof(t->scopes_inline));
        } else {
            t->scopes = mph_xrealloc(t->scopes, (size_t)cap * sizeof(*t->scopes));
        }
        t->scopes_cap = cap;
    }
    t->scopes[t->nscopes++] = s;
    s->pins++;
    lru_touch(s);
}

int mph__scopes_acquire(mph_txn_t *t, const char *name, int can_wait, int *code, const char **why)
{
    mph_lua_t *lua = t->lua;
    *code = MPH_RPC_STORAGE_UNAVAILABLE;
    if (t->wake_code != 0) { /* woken by a failed load */
        *code = t->wake_code;
        *why = t->wake_message;
        return -1;
    }
    if (lua->store == NULL) {
        *why = "storage unavailable: no storage is configured";
        return -1;
    }
    /* Scopes the storage can never commit together (Redis Cluster slots): the handler's
     * error, found where it touches the second one, never a commit that cannot succeed. */
    static char apart[512]; /* the loop thread's; *why is copied at once (C.acquire) */
    const mph_store_methods_t *m = lua->store->methods;
    if (t->nscopes > 0 && m->together &&
        m->together(lua->store, t->scopes[0]->name, name, apart, sizeof(apart)) != 0) {
        *code = MPH_RPC_HANDLER_ERROR;
        *why = apart;
        mph__idem_apart(t, t->scopes[0]->name, name, apart, sizeof(apart));
        return -1;
    }
    mph_scope_t *s = scope_get(lua, name);
    if (s->state == SCOPE_READY && hold(t, s, can_wait)) {
        queue_push(&s->unit->held, t); /* C.acquire makes it WAITING */
        return 1;
    }
    if (s->state == SCOPE_READY) {
        pin(t, s);
        return 0;
    }
    if (lua->closing) {
        *why = "storage unavailable: shutting down";
        return -1;
    }
    if (s->state == SCOPE_UNLOADED) {
        int rc = lua->store->methods->load(lua->store, s->name, on_loaded, s);
        if (rc != 0) {
            *why = "storage unavailable";
            return -1;
        }
        s->state = SCOPE_LOADING;
    }
    /* An attempt that already holds a scope must not wait either: while it waited, other
     * calls would run on that scope, and what it read before would be stale when it writes
     * (transactions of one process run one after another only because none pauses once it
     * has read). It runs again, from the start, once this scope has loaded. */
    if (!can_wait || t->nscopes > 0) {
        t->reload = s;
        *why = "the scope is loading: the call runs again once it has loaded";
        return -1;
    }
    mph__idem_loading(t, name);
    queue_push(&s->waiting, t);
    return 1;
}

void mph__scopes_reload(mph_txn_t *t)
{
    mph_scope_t *s = t->reload;
    assert(t->co == NULL && s != NULL);
    if (t->lua->closing) {
        mph__txn_reply(t, MPH_RPC_STORAGE_UNAVAILABLE, "storage unavailable: shutting down");
        return;
    }
    if (s->state != SCOPE_LOADING) { /* it ended while the attempt went on: run again now */
        mph__txn_start_attempt(t);
        return;
    }
    mph__txn_become(t, TXN_RELOAD);
    assert(assert_txn_state(t));
    queue_push(&s->waiting, t);
}

void mph__scopes_join(mph_txn_t *t, const char *name, int wrote)
{
#ifndef NDEBUG
    mph_scope_t *s = scope_find(t->lua, name);
    int acquired = 0;
    for (int i = 0; i < t->nscopes; i++)
        acquired |= t->scopes[i] == s;
    assert(s != NULL && s->state == SCOPE_READY && acquired);
#endif
    (void)name;
    t->wrote |= wrote;
}

void mph__scopes_unpin(mph_txn_t *t)
{
    for (int i = 0; i < t->nscopes; i++)
        t->scopes[i]->pins--;
    t->nscopes = 0;
    t->wrote = 0;
}

mph_scope_t *mph__scopes_acquired(mph_txn_t *t, const char *name)
{
    for (int i = 0; i < t->nscopes; i++)
        if (strcmp(t->scopes[i]->name, name) == 0)
            return t->scopes[i];
    return NULL;
}

/* ---- Units ----
 *
 * A transaction that spans scopes A and B ran on the speculative state of both (A's pending
 * and in-flight writes, B's), and its own writes joined both pending states. So whatever
 * happens to A's next commit happens to B's: if A's is refused, what ran on B after that
 * transaction is void too; and its writes to A and B must land in one atomic commit. The
 * runner therefore keeps scopes in units: a unit has one pending queue and commits the
 * pending writes of all its scopes in one CAS (storage.h commits several scopes at once).
 * A scope starts alone in its own unit; a transaction that spans units merges them; a unit
 * with nothing pending, in flight or to re-run splits into single scopes again, so that a
 * transfer between two accounts does not tie them together forever.
 *
 * Merging two units that each have a commit in flight gives a unit with two: their scopes
 * are disjoint and neither commit depends on the other, so each ends on its own; the next
 * batch waits for both. When one of a unit's commits fails, every pending transaction of
 * the unit runs again (some may have read what failed), and the pending writes of every
 * member are dropped with them.
 *
 * A transaction needs a commit when it wrote, and also when it only read (see "Fresh
 * reads"): the commit then carries the scopes it read with no writes, and the storage checks
 * their versions, so a call that reads two accounts another process changed in between is
 * run again rather than answered from two snapshots of different moments, and a call that
 * reads one sees what another process committed before it began. */

struct mph_commit_s {
    mph_list_t node;             /* in unit->commits (first: list.h) */
    mph_unit_t *unit;            /* the unit it belongs to now (a merge moves it) */
    mph_list_t batch;            /* the transactions whose writes or reads it carries */
    size_t n;                    /* scopes */
    mph_scope_t **scopes;        /* n, in this allocation */
    mph_store_write_t *writes;   /* n, in this allocation */
    int *json_refs;              /* n registry refs keeping each write set's strings alive */
    mph_store_entry_t **entries; /* n owned arrays (pointers into those strings) */
};

static void arm_retry_timer(mph_lua_t *lua);

/* Moves everything of unit `from` into `into` (which keeps its members' order first). */
static mph_unit_t *unit_merge(mph_unit_t *into, mph_unit_t *from)
{
    if (into == from)
        return into;
    mph_list_t *n;
    mph_list_foreach(n, &from->members)
        mph_list_entry(n, mph_scope_t, member_node)->unit = into;
    mph_list_move(&into->members, &from->members); /* from is an empty home now, until its
                                                      scope is alone again (unit_split) */
    mph_list_move(&into->pending, &from->pending);
    into->pending_commits += from->pending_commits;
    mph_list_foreach(n, &from->commits)
        mph_list_entry(n, mph_commit_t, node)->unit = into;
    mph_list_move(&into->commits, &from->commits);
    mph_list_move(&into->rerun, &from->rerun);
    mph_list_move(&into->held, &from->held);
    if (from->backing_off) {
        mph_list_remove(&from->backoff_node); /* from lua->backoffs, or on_retry_timer's due */
        if (!into->backing_off) {
            into->backing_off = 1;
            into->backoff_until = from->backoff_until;
            mph_list_insert_head(&into->lua->backoffs, &into->backoff_node);
        } else if (from->backoff_until > into->backoff_until) {
            into->backoff_until = from->backoff_until;
        }
        arm_retry_timer(into->lua);
    }
    if (from->conflict_streak > into->conflict_streak)
        into->conflict_streak = from->conflict_streak;
    if (from->error_streak > into->error_streak)
        into->error_streak = from->error_streak;
    from->pending_commits = 0;
    from->backing_off = 0;
    return into;
}

/* A unit with nothing pending, in flight or to re-run: every member is alone again. */
static void unit_split(mph_unit_t *u)
{
    if (mph_list_first(&u->members) == mph_list_last(&u->members) /* none or one */ ||
        !mph_list_empty(&u->commits) || u->backing_off || !mph_list_empty(&u->pending) ||
        !mph_list_empty(&u->rerun) || !mph_list_empty(&u->held))
        return;
    int conflicts = u->conflict_streak, errors = u->error_streak; /* u is reset below */
    mph_list_t members, *n;
    mph_list_init(&members);
    mph_list_move(&members, &u->members);
    while ((n = mph_list_pop(&members)) != NULL) {
        mph_scope_t *m = mph_list_entry(n, mph_scope_t, member_node);
        unit_init(&m->home, m);
        m->home.conflict_streak = conflicts;
        m->home.error_streak = errors;
    }
}

/* ---- Commits ---- */

#ifndef NDEBUG
/* The unit's invariants; used as assert(assert_unit_state(u)). */
static int assert_unit_state(const mph_unit_t *u)
{
    assert(!mph_list_empty(&u->members));
    const mph_list_t *n;
    mph_list_foreach(n, &u->members) {
        const mph_scope_t *m = mph_list_entry(n, mph_scope_t, member_node);
        assert(m->unit == u);
        assert(m->state == SCOPE_LOADING || mph_list_empty(&m->waiting));
        assert(m->commit == NULL || m->state == SCOPE_READY);
    }
    mph_list_foreach(n, &u->commits) {
        const mph_commit_t *c = mph_list_entry(n, mph_commit_t, node);
        assert(c->unit == u && !mph_list_empty(&c->batch));
    }
    assert(!u->backing_off || !mph_list_empty(&u->rerun));
    assert(u->backing_off == mph_list_is_linked(&u->backoff_node));
    int count = 0;
    mph_list_foreach(n, &u->pending)
        count++;
    assert(u->pending_commits <= count);
    (void)count;
    return 1;
}
#endif

static void kick(mph_unit_t *u);

static void answer_all(mph_list_t *q)
{
    mph_list_t all;
    queue_take(q, &all);
    mph_txn_t *t;
    while ((t = queue_pop(&all)) != NULL)
        mph__txn_reply_result(t);
}

static void backoff(mph_unit_t *u, uint64_t delay_ms);

/* Queues the transactions of q to run again when the unit's backoff ends (the caller starts
 * it). `refused`: their own commit was refused (it counts toward the limit). */
static void requeue_all(mph_unit_t *u, mph_list_t *q, int refused)
{
    mph_lua_t *lua = u->lua;
    mph_list_t all;
    queue_take(q, &all);
    mph_txn_t *t;
    while ((t = queue_pop(&all)) != NULL) {
        t->refusals += refused;
        if (lua->closing) {
            mph__txn_reply(t, MPH_RPC_STORAGE_UNAVAILABLE, "storage unavailable: shutting down");
        } else if (t->refusals > lua->max_retries) {
            char msg[128];
            snprintf(msg, sizeof(msg), "Transaction conflict: gave up after %d attempt%s",
                     t->attempts, t->attempts == 1 ? "" : "s");
            mph__txn_reply(t, MPH_RPC_CONFLICT, msg);
        } else {
            mph__txn_become(t, TXN_RETRY);
            assert(assert_txn_state(t));
            queue_push(&u->rerun, t);
        }
    }
}

/* A random delay in [1, ceiling] milliseconds. */
static uint64_t jitter(mph_lua_t *lua, uint64_t ceiling)
{
    return 1 + mph__lua_random(lua) % ceiling;
}

static void fail_all(mph_list_t *q, int code, const char *message)
{
    mph_list_t all;
    queue_take(q, &all);
    mph_txn_t *t;
    while ((t = queue_pop(&all)) != NULL)
        mph__txn_reply(t, code, message);
}

/* Frees a commit that has ended; its scopes are free to join the next one. */
static void commit_free(mph_commit_t *c)
{
    for (size_t i = 0; i < c->n; i++) {
        luaL_unref(c->unit->lua->L, LUA_REGISTRYINDEX, c->json_refs[i]);
        free(c->entries[i]);
        c->scopes[i]->commit = NULL;
    }
    free(c);
}

/* Takes c out of its unit's list of commits in flight. */
static void commit_detach(mph_commit_t *c)
{
    assert(mph_list_is_linked(&c->node)); /* in c->unit->commits */
    mph_list_remove(&c->node);
}

/* A commit of u failed: whatever ran on speculative state in u runs again (the members'
 * pending writes go with it): u's pending transactions are moved into `later` (the caller's,
 * made a list here). Members of the failed commit are handled by the caller. */
static void unit_void_pending(mph_unit_t *u, mph_list_t *later)
{
    queue_take(&u->pending, later);
    u->pending_commits = 0;
    mph_list_t *n;
    mph_list_foreach(n, &u->members) {
        mph_scope_t *m = mph_list_entry(n, mph_scope_t, member_node);
        if (m->state == SCOPE_READY) {
            scope_op_t op = {m, NULL, 0, 0, ""};
            if (mph__lua_protect(u->lua, drop_pending, &op, "dropping pending writes") != 0)
                scope_forget(m); /* out of memory: it is reloaded on the next access */
        }
    }
}

/* The conflict the storage reported for scope `name`, or NULL when its version held. */
static const mph_store_conflict_t *conflict_of(const mph_store_result_t *res, const char *name)
{
    for (size_t i = 0; i < res->nconflicts; i++)
        if (strcmp(res->conflicts[i].scope, name) == 0)
            return &res->conflicts[i];
    return NULL;
}

/* Whether a batch counts in the statistics (/metrics): not when it holds only the outbox's
 * bookkeeping (its claims, which every process makes every second, and its records), so a
 * deployment's counts are its calls', whether mp.send is used or not. */
static int counted(mph_list_t *batch)
{
    mph_list_t *n;
    mph_list_foreach(n, batch) {
        if (!mph_list_entry(n, mph_txn_t, node)->quiet)
            return 1;
    }
    return 0;
}

/* The commit is durable: its writes fold into their scopes' states and the batch is
 * answered. */
static void committed(mph_commit_t *c, mph_list_t *batch)
{
    mph_unit_t *u = c->unit;
    mph_lua_t *lua = u->lua;
    int missed = 0;
    for (size_t i = 0; i < c->n; i++) {
        mph_scope_t *s = c->scopes[i];
        scope_op_t op = {s, NULL, 0, 0, ""};
        s->version = c->writes[i].expected_version + (c->writes[i].n > 0);
        s->fresh_ms = uv_now(lua->loop);
        scope_set_bytes(s, s->bytes + doc_bytes(c->writes[i].entries, c->writes[i].n));
        if (mph__lua_protect(lua, commit_ok, &op, "folding a commit into its scope") != 0) {
            /* Durable, so the batch is answered; but the state in memory missed it:
             * forget it (it is reloaded on the next access). */
            scope_forget(s);
            missed = 1;
        }
    }
    commit_free(c);
    lua->stats.commits += counted(batch);
    u->conflict_streak = u->error_streak = 0;
    answer_all(batch);
    schedule_eviction(lua);
    if (missed) { /* what ran on top of the missed state runs again */
        mph_list_t later;
        unit_void_pending(u, &later);
        requeue_all(u, &later, 0);
        backoff(u, 0);
        return;
    }
    kick(u);
}

/* The commit was refused: each scope takes the conflict's update (what another process
 * committed), and the batch and what ran on top of it run again. Returns 0, or -1 when an
 * update could not be applied (out of memory: *nomem; an unreadable one: logged), which
 * the caller treats as a failed commit. */
static int conflicted(mph_commit_t *c, mph_list_t *batch, const mph_store_result_t *res, int *nomem)
{
    mph_unit_t *u = c->unit;
    mph_lua_t *lua = u->lua;
    int held = 0; /* the longest claim of another process that refused it, in ms */
    for (size_t i = 0; i < c->n; i++) {
        mph_scope_t *s = c->scopes[i];
        const mph_store_conflict_t *cf = conflict_of(res, s->name);
        static const mph_store_doc_t nothing = {0, 1, 0, NULL};
        scope_op_t op = {s, cf ? &cf->doc : &nothing, cf && !cf->doc.is_delta, 0, ""};
        if (mph__lua_protect(lua, reset_state, &op, "applying a conflict's update") != 0) {
            *nomem = 1;
            return -1;
        }
        if (op.rc != 0) {
            mph_log(MPH_LOG_ERROR, "scope %s: unreadable update from storage: %s", s->name, op.err);
            return -1;
        }
        if (cf) {
            s->version = cf->doc.version;
            s->fresh_ms = uv_now(lua->loop);
            if (cf->held > held)
                held = cf->held;
            mph_log(MPH_LOG_DEBUG, "scope %s: conflict, now at version %llu", s->name,
                    (unsigned long long)s->version);
        }
    }
    commit_free(c);
    u->conflict_streak++;
    lua->stats.conflicts += counted(batch);
    mph_list_t later;
    unit_void_pending(u, &later);
    requeue_all(u, batch, !held); /* being held off is waiting, not refusal */
    requeue_all(u, &later, 0);
    /* Held by another process's claim: wait until it ends, as it says. */
    backoff(u, (uint64_t)held);
    return 0;
}

/* The commit failed: the outcome may be unknown, so the commit's scopes are forgotten (they
 * are reloaded on the next access). The batch hears -32002 (never "committed" unless it
 * was), or -32603 when Lua ran out of memory; the later ones only read speculative data and
 * simply run again. */
static void commit_failed(mph_commit_t *c, mph_list_t *batch, const mph_store_result_t *res,
                          int nomem)
{
    mph_unit_t *u = c->unit;
    mph_lua_t *lua = u->lua;
    char message[400];
    if (nomem)
        snprintf(message, sizeof(message), "Internal error: not enough memory");
    else
        snprintf(message, sizeof(message), "storage unavailable: %s",
                 res->message ? res->message : mph_strerror(res->status));
    for (size_t i = 0; i < c->n; i++) {
        mph_log(MPH_LOG_WARN, "scope %s: commit failed: %s", c->scopes[i]->name, message);
        scope_forget(c->scopes[i]);
    }
    commit_free(c);
    lua->stats.storage_errors += !nomem;
    mph_list_t later;
    unit_void_pending(u, &later);
    fail_all(batch, nomem ? MPH_RPC_INTERNAL_ERROR : MPH_RPC_STORAGE_UNAVAILABLE, message);
    requeue_all(u, &later, 0);
    u->error_streak++;
    backoff(u, jitter(lua, (uint64_t)1 << (u->error_streak < 6 ? u->error_streak : 6)));
}

static void on_committed(void *ud, const mph_store_result_t *res)
{
    mph_commit_t *c = ud;
    assert(assert_unit_state(c->unit));
    commit_detach(c);
    mph_list_t batch; /* c is freed before its batch is answered */
    queue_take(&c->batch, &batch);
    if (res->status == 0) {
        committed(c, &batch);
        return;
    }
    /* Every speculative write is void now: the batch and whatever ran on top of it. */
    int nomem = res->status == MPH_ENOMEM;
    if (res->status == MPH_ECONFLICT && conflicted(c, &batch, res, &nomem) == 0)
        return;
    commit_failed(c, &batch, res, nomem);
}

/* What kick hands to take_pending. */
typedef struct {
    mph_scope_t *s;
    mph_store_entry_t *entries; /* owned by the caller, even when take_pending raises */
    size_t n;
    int json_ref; /* the write set, kept referenced until the commit ends */
} take_t;

/* I.take_pending(name) -> the write set (key -> JSON text or false), read into c->entries
 * and kept referenced in c->json_ref until the commit ends, so the entries can point into
 * its strings. Under lua_cpcall. [-0, +0, e] */
static int take_pending(lua_State *L)
{
    take_t *c = lua_touserdata(L, 1);
    mph_scope_t *s = c->s;
    lua_pushstring(L, s->name);
    mph__lua_call_internal(s->lua, L, "take_pending", 1, 1); /* Stack: ud, json */
    size_t cap = 16;
    c->entries = mph_xmalloc(cap * sizeof(*c->entries));
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        /* Stack: ud, json, key, value */
        if (c->n == cap) {
            cap *= 2;
            c->entries = mph_xrealloc(c->entries, cap * sizeof(*c->entries));
        }
        mph_store_entry_t *e = &c->entries[c->n++];
        e->key = lua_tolstring(L, -2, &e->klen); /* keys are strings: no conversion */
        e->json = NULL;
        e->jlen = 0;
        if (lua_type(L, -1) == LUA_TSTRING)
            e->json = lua_tolstring(L, -1, &e->jlen);
        lua_pop(L, 1);
    }
    c->json_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* pops json */
    return 0;
}

/* A new commit of the scopes the batch's transactions touched, each once; its own batch is
 * empty. */
static mph_commit_t *commit_new(mph_unit_t *u, const mph_list_t *batch)
{
    size_t n = 0;
    const mph_list_t *q;
    mph_list_foreach(q, batch) {
        const mph_txn_t *t = mph_list_entry(q, mph_txn_t, node);
        for (int i = 0; i < t->nscopes; i++)
            if (!t->scopes[i]->mark) {
                t->scopes[i]->mark = 1;
                n++;
            }
    }
    size_t size = sizeof(mph_commit_t) + n * (sizeof(mph_scope_t *) + sizeof(mph_store_write_t) +
                                              sizeof(int) + sizeof(mph_store_entry_t *));
    mph_commit_t *c = mph_xcalloc(1, size);
    c->unit = u;
    mph_list_init(&c->batch);
    c->writes = (mph_store_write_t *)(c + 1); /* the widest members first: aligned */
    c->entries = (mph_store_entry_t **)(c->writes + n);
    c->scopes = (mph_scope_t **)(c->entries + n);
    c->json_refs = (int *)(c->scopes + n);
    mph_list_foreach(q, batch) {
        const mph_txn_t *t = mph_list_entry(q, mph_txn_t, node);
        for (int i = 0; i < t->nscopes; i++)
            if (t->scopes[i]->mark) {
                t->scopes[i]->mark = 0;
                c->json_refs[c->n] = LUA_NOREF;
                c->scopes[c->n++] = t->scopes[i];
            }
    }
    assert(c->n == n);
    return c;
}

/* Starts the next batch's commit when none is in flight. */
static void kick(mph_unit_t *u)
{
    mph_lua_t *lua = u->lua;
    if (u->rerunning)
        return; /* rerun_now kicks once they have all run */
    if (!mph_list_empty(&u->held) && mph_list_empty(&u->commits) && !u->backing_off) {
        /* The held attempts go on now, on the state the commit left, and join the next
         * batch together (as rerun_now's do). One may merge u into another unit. */
        mph_scope_t *member = unit_first(u);
        u->rerunning = 1;
        wake_all(&u->held);
        u->rerunning = 0;
        u = member->unit;
        if (u->rerunning)
            return;
    }
    assert(assert_unit_state(u));
    if (!mph_list_empty(&u->commits) || u->backing_off || mph_list_empty(&u->pending)) {
        unit_split(u);
        return;
    }
    if (u->pending_commits == 0) {
        /* Only readers of one scope each, and what they read is durable now. */
        answer_all(&u->pending);
        unit_split(u);
        return;
    }
    mph_commit_t *c = commit_new(u, &u->pending);
    mph_list_move(&c->batch, &u->pending);
    u->pending_commits = 0;
    mph_list_t *n;
    mph_list_foreach(n, &c->batch) {
        mph_txn_t *t = mph_list_entry(n, mph_txn_t, node);
        mph__txn_become(t, TXN_COMMITTING);
        assert(assert_txn_state(t));
    }
    mph_list_insert_head(&u->commits, &c->node);
    int status = 0;
    for (size_t i = 0; i < c->n && status == 0; i++) {
        mph_scope_t *s = c->scopes[i];
        assert(s->state == SCOPE_READY && s->commit == NULL);
        take_t tk = {s, NULL, 0, LUA_NOREF};
        status = mph__lua_protect(lua, take_pending, &tk, "taking a scope's write set");
        c->entries[i] = tk.entries;
        c->json_refs[i] = tk.json_ref;
        c->writes[i] =
            (mph_store_write_t){s->name,    s->version,     tk.n,
                                tk.entries, lua->committer, u->conflict_streak >= CLAIM_AFTER};
        s->commit = c;
    }
    int rc = MPH_ENOMEM;
    if (status == 0)
        rc = lua->store->methods->commit(lua->store, c->writes, c->n, on_committed, c);
    if (rc != 0) {
        mph_store_result_t res = {rc, mph_strerror(rc), {0, 0, 0, NULL}, NULL, 0, 0, NULL};
        on_committed(c, &res);
    }
}

/* Whether t must go through a commit before it is answered. */
/* ---- Fresh reads ----
 *
 * A call sees every write acknowledged before it began, by this process or any other sharing
 * the storage (strictly serializable: docs/guarantees.md). A scope's state here may miss
 * another process's commit, so a transaction that only read still goes through a commit,
 * one that carries its scopes with no writes: the storage checks their versions (files: the
 * log has not grown nor been replaced; Redis: one round trip), and a refusal brings what
 * changed and runs the call again, as a conflict of writes does. The check starts after the
 * call's handler ran, so after the call began; and as any commit, it serves the whole batch
 * queued behind the one in flight: under load, one check answers many reads. No check at all
 * when the storage knows at once that what this process holds is current (files: the commit
 * counters every process of the data directory shares, storage/file.c): the read is then
 * answered as soon as nothing it read waits for a commit of this process.
 *
 * A service may trade that for speed (svc.reads = "cached"): its calls that only read one
 * scope are answered from the state here, unchecked, when the storage confirmed that state
 * current (a load, a commit or a check of this process) within the last CACHED_READ_MS, and
 * checked as above otherwise. Such a read sees this process's own commits at once and other
 * processes' within about CACHED_READ_MS. */

#define CACHED_READ_MS 1000

/* Whether the storage knows, with no I/O, that every scope t read is current (storage.h:
 * current): then no check is needed. For several scopes, each one known current in turn means
 * all were at the moment of the first answer (none changes back), so the call read one moment. */
static int known_current(const mph_txn_t *t)
{
    const mph_store_methods_t *m = t->lua->store->methods;
    if (m->current == NULL)
        return 0;
    for (int i = 0; i < t->nscopes; i++)
        if (!m->current(t->lua->store, t->scopes[i]->name, t->scopes[i]->version))
            return 0;
    return 1;
}

static int needs_commit(const mph_txn_t *t)
{
    if (t->wrote)
        return 1;
    if (t->cached_reads && t->nscopes == 1 &&
        uv_now(t->lua->loop) - t->scopes[0]->fresh_ms <= CACHED_READ_MS)
        return 0;
    return !known_current(t);
}

void mph__scopes_finished(mph_txn_t *t)
{
    if (t->nscopes == 0) {
        mph__txn_reply_result(t); /* nothing to wait for */
        return;
    }
    mph_unit_t *u = t->scopes[0]->unit;
    for (int i = 1; i < t->nscopes; i++)
        u = unit_merge(u, t->scopes[i]->unit);
    if (!needs_commit(t) && mph_list_empty(&u->commits) && mph_list_empty(&u->pending)) {
        mph__txn_reply_result(t); /* it read durable data only */
        return;
    }
    mph__txn_become(t, TXN_QUEUED);
    assert(assert_txn_state(t));
    queue_push(&u->pending, t);
    if (needs_commit(t))
        u->pending_commits++;
    kick(u);
}

/* ---- Backoff ---- */

static void on_retry_timer(uv_timer_t *timer);

static void arm_retry_timer(mph_lua_t *lua)
{
    mph_list_t *n = mph_list_first(&lua->backoffs);
    if (n == NULL) {
        uv_timer_stop(&lua->retry_timer);
        return;
    }
    uint64_t at = mph_list_entry(n, mph_unit_t, backoff_node)->backoff_until;
    mph_list_foreach(n, &lua->backoffs) {
        const mph_unit_t *u = mph_list_entry(n, mph_unit_t, backoff_node);
        if (u->backoff_until < at)
            at = u->backoff_until;
    }
    uint64_t now = uv_now(lua->loop);
    uv_timer_start(&lua->retry_timer, on_retry_timer, at > now ? at - now : 0, 0);
}

/* Runs the refused transactions again, in order (each joins a unit's pending queue, or waits
 * for a load), then starts one commit for all of them. Committing the first alone as soon as it
 * has run would leave the others behind it, where another process's commit can refuse them
 * again: under contention they would never land (the file backend keeps the lock for the
 * commit that follows a conflict, not for the one after). A re-run may merge u into another
 * unit: kick the one its first member belongs to afterwards. */
static void rerun_now(mph_unit_t *u)
{
    u->backing_off = 0;
    u->rerunning = 1;
    mph_scope_t *member = unit_first(u);
    mph_list_t rerun;
    queue_take(&u->rerun, &rerun);
    mph_txn_t *t;
    while ((t = queue_pop(&rerun)) != NULL)
        mph__txn_start_attempt(t);
    u->rerunning = 0;
    if (member)
        kick(member->unit);
}

/* Re-runs the unit's refused transactions after delay_ms; with no delay at once, from the
 * storage callback that reported the conflict, exactly as a successful commit starts the
 * next one: a retry that waited for the next loop iteration would reach the storage behind
 * the other process's next commit every time. */
static void backoff(mph_unit_t *u, uint64_t delay_ms)
{
    mph_lua_t *lua = u->lua;
    if (u->backing_off || mph_list_empty(&u->rerun)) {
        kick(u);
        return;
    }
    if (delay_ms == 0) {
        rerun_now(u);
        return;
    }
    u->backing_off = 1;
    u->backoff_until = uv_now(lua->loop) + delay_ms;
    mph_list_insert_head(&lua->backoffs, &u->backoff_node);
    arm_retry_timer(lua);
}

static void on_retry_timer(uv_timer_t *timer)
{
    mph_lua_t *lua = mph_container_of(timer, mph_lua_t, retry_timer);
    uint64_t now = uv_now(lua->loop);
    /* Detach the units whose backoff is over first: re-running may start new backoffs. A
     * re-run may also merge a unit still in `due` into another, which takes it out. */
    mph_list_t due, *n, *next;
    mph_list_init(&due);
    mph_list_foreach_safe(n, next, &lua->backoffs) {
        if (mph_list_entry(n, mph_unit_t, backoff_node)->backoff_until <= now) {
            mph_list_remove(n);
            mph_list_insert_head(&due, n);
        }
    }
    arm_retry_timer(lua);
    while ((n = mph_list_pop(&due)) != NULL)
        rerun_now(mph_list_entry(n, mph_unit_t, backoff_node));
}

static void close_scope(mph_map_node_t *n, void *ud)
{
    mph_scope_t *s = mph_container_of(n, mph_scope_t, node);
    const char *msg = ud;
    /* A commit still in flight would call back into freed memory: the host closes the store
     * (which completes every operation) before the bridge. */
    assert(s->commit == NULL && s->state != SCOPE_LOADING);
    fail_all(&s->waiting, MPH_RPC_STORAGE_UNAVAILABLE, msg);
    fail_all(&s->home.pending, MPH_RPC_STORAGE_UNAVAILABLE, msg);
    fail_all(&s->home.rerun, MPH_RPC_STORAGE_UNAVAILABLE, msg);
    fail_all(&s->home.held, MPH_RPC_STORAGE_UNAVAILABLE, msg);
}

static void free_scope(mph_map_node_t *n, void *ud)
{
    mph_scope_t *s = mph_container_of(n, mph_scope_t, node);
    (void)ud;
    mph_map_remove(&s->lua->scope_map, n);
    scope_free(s);
}

void mph__scopes_close(mph_lua_t *lua)
{
    mph_list_t *n;
    while ((n = mph_list_pop(&lua->backoffs)) != NULL) /* their queues are failed below */
        mph_list_entry(n, mph_unit_t, backoff_node)->backing_off = 0;
    uv_timer_stop(&lua->retry_timer);
    uv_timer_stop(&lua->evict_timer);
    /* First every queue (failing a transaction unpins its scopes), then the scopes. */
    mph_map_each(&lua->scope_map, close_scope, "storage unavailable: shutting down");
    mph_map_each(&lua->scope_map, free_scope, NULL);
    mph_map_free(&lua->scope_map);
    mph_list_init(&lua->lru); /* every scope in it is freed */
}
