/*
 * runner.c: the transaction runner. It loads scopes, queues finished attempts, commits them
 * in batches with compare-and-set, and re-runs them on a conflict.
 *
 * Why it is fast (DESIGN.md, "Where speed comes from"):
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
 * retries split the commits evenly, p99 7 ms, none gave up.) Jittered backoff is kept where
 * waiting helps: after a storage error (1 ms doubling to 64 ms, so reconnecting processes do
 * not stampede), and while another process holds a fairness claim (1-2 ms).
 *
 * Even so, a process whose next batch is always ready (it ran speculatively while the last
 * commit was in flight) answers success with a new CAS at once, while a process refused by a
 * conflict must first re-run its handlers: it would arrive second every round. After
 * CLAIM_AFTER refusals in a row a commit therefore asks the storage for a fairness claim
 * (storage.h): the next commit of the scope is reserved for it, others are held off for a
 * millisecond at a time until it lands.
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

#define CLAIM_AFTER 6 /* consecutive refusals before a commit asks for a fairness claim */

/* ---- Queues ---- */

static void queue_push(mph_txn_queue_t *q, mph_txn_t *t)
{
    t->next = NULL;
    if (q->tail)
        q->tail->next = t;
    else
        q->head = t;
    q->tail = t;
}

/* Empties q and returns its former head. */
static mph_txn_t *queue_take(mph_txn_queue_t *q)
{
    mph_txn_t *head = q->head;
    q->head = q->tail = NULL;
    return head;
}

/* ---- Scopes ---- */

static mph_scope_t *scope_find(mph_lua_t *lua, const char *name)
{
    for (mph_scope_t *s = lua->scopes; s; s = s->next)
        if (strcmp(s->name, name) == 0)
            return s;
    return NULL;
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
    s->inflight_json_ref = LUA_NOREF;
    s->next = lua->scopes;
    lua->scopes = s;
    return s;
}

/* Writes the entries of a document into the table on top of the stack (base), in order.
 * Returns 0 or -1 with err filled (an entry that is not valid JSON); raises when out of
 * memory. Only inside mph__lua_protect. [-0, +0, e] */
static int apply_entries(lua_State *L, const mph_store_doc_t *doc, char *err, size_t errlen)
{
    for (size_t i = 0; i < doc->n; i++) {
        const mph_store_entry_t *e = &doc->entries[i];
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

/* I[fn](name, clear_base) -> base, then the doc's entries written into base. Under
 * lua_cpcall. [-0, +0, e] */
static int scope_load(lua_State *L, const char *fn)
{
    scope_op_t *op = lua_touserdata(L, 1);
    lua_pushstring(L, op->s->name);
    lua_pushboolean(L, op->clear_base);
    mph__lua_call_internal(op->s->lua, L, fn, 2, 1); /* Stack: ud, base */
    op->rc = apply_entries(L, op->doc, op->err, sizeof(op->err));
    return 0;
}

static int new_state(lua_State *L)
{
    return scope_load(L, "new_state");
}

static int reset_state(lua_State *L)
{
    return scope_load(L, "reset_state");
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

/* Forgets the scope's state: it is loaded again on the next access. Dropping the Lua side
 * can only fail when out of memory, and then new_state replaces it at the next load anyway. */
static void scope_forget(mph_scope_t *s)
{
    scope_op_t op = {s, NULL, 0, 0, ""};
    mph__lua_protect(s->lua, drop_state, &op, "dropping a scope");
    s->state = SCOPE_UNLOADED;
}

/* ---- Acquire and load ---- */

/* Runs every transaction waiting for s's load: a suspended attempt is resumed (and asks
 * C.acquire for the outcome, kept in the transaction); a void one starts again, or hears the
 * failure. code == 0: the scope is ready. */
static void wake_waiters(mph_scope_t *s, int code, const char *failure)
{
    mph_txn_t *t = queue_take(&s->waiting);
    while (t) {
        mph_txn_t *next = t->next;
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
        t = next;
    }
}

static void on_loaded(void *ud, const mph_store_result_t *res)
{
    mph_scope_t *s = ud;
    mph_lua_t *lua = s->lua;
    assert(s->state == SCOPE_LOADING);
    char failure[400];
    if (res->status != 0) {
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
    s->state = SCOPE_READY;
    mph_log(MPH_LOG_DEBUG, "scope %s loaded: %zu entries, version %llu", s->name, res->doc.n,
            (unsigned long long)s->version);
    wake_waiters(s, 0, NULL);
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

int mph__runner_acquire(mph_txn_t *t, const char *name, int can_wait, int *code, const char **why)
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
    mph_scope_t *s = scope_get(lua, name);
    if (s->state == SCOPE_READY)
        return 0;
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
    if (!can_wait) {
        t->reload = s;
        *why = "the scope is loading: the call runs again once it has loaded";
        return -1;
    }
    queue_push(&s->waiting, t);
    return 1;
}

void mph__runner_reload(mph_txn_t *t)
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
    t->state = TXN_RELOAD;
    assert(assert_txn_state(t));
    queue_push(&s->waiting, t);
}

void mph__runner_join(mph_txn_t *t, const char *name, int wrote)
{
    mph_scope_t *s = scope_find(t->lua, name);
    assert(s != NULL && s->state == SCOPE_READY);
    assert(t->scope == NULL || t->scope == s); /* one scope per transaction for now */
    t->scope = s;
    t->wrote |= wrote;
}

/* ---- Commits ---- */

#ifndef NDEBUG
/* The scope's invariants; used as assert(assert_scope_state(s)). */
static int assert_scope_state(const mph_scope_t *s)
{
    assert(s->committing == (s->inflight.head != NULL)); /* a commit is exactly its batch */
    assert(!s->committing || s->state == SCOPE_READY);
    assert(s->state == SCOPE_LOADING || s->waiting.head == NULL);
    assert(!s->backing_off || s->rerun.head != NULL);
    int n = 0;
    for (mph_txn_t *t = s->pending.head; t; t = t->next)
        n++;
    assert(s->pending_writes <= n);
    (void)n;
    (void)s;
    return 1;
}
#endif

static void kick(mph_scope_t *s);

static void answer_all(mph_txn_t *t)
{
    while (t) {
        mph_txn_t *next = t->next;
        mph__txn_reply_result(t);
        t = next;
    }
}

static void backoff(mph_scope_t *s, uint64_t delay_ms);

/* Queues transactions to run again when the scope's backoff ends (the caller starts it).
 * `refused`: their own commit was refused (it counts toward the limit). */
static void requeue_all(mph_scope_t *s, mph_txn_t *t, int refused)
{
    mph_lua_t *lua = s->lua;
    while (t) {
        mph_txn_t *next = t->next;
        t->refusals += refused;
        if (lua->closing) {
            mph__txn_reply(t, MPH_RPC_STORAGE_UNAVAILABLE, "storage unavailable: shutting down");
        } else if (t->refusals > lua->max_retries) {
            char msg[128];
            snprintf(msg, sizeof(msg), "Transaction conflict: gave up after %d attempt%s",
                     t->attempts, t->attempts == 1 ? "" : "s");
            mph__txn_reply(t, MPH_RPC_CONFLICT, msg);
        } else {
            t->state = TXN_RETRY;
            assert(assert_txn_state(t));
            queue_push(&s->rerun, t);
        }
        t = next;
    }
}

/* A random delay in [1, ceiling] milliseconds. */
static uint64_t jitter(mph_lua_t *lua, uint64_t ceiling)
{
    return 1 + mph__lua_random(lua) % ceiling;
}

static void fail_all(mph_txn_t *t, int code, const char *message)
{
    while (t) {
        mph_txn_t *next = t->next;
        mph__txn_reply(t, code, message);
        t = next;
    }
}

static void release_inflight(mph_scope_t *s)
{
    luaL_unref(s->lua->L, LUA_REGISTRYINDEX, s->inflight_json_ref);
    s->inflight_json_ref = LUA_NOREF;
    free(s->entries);
    s->entries = NULL;
    s->committing = 0;
}

static void on_committed(void *ud, const mph_store_result_t *res)
{
    mph_scope_t *s = ud;
    mph_lua_t *lua = s->lua;
    assert(s->committing);
    assert(assert_scope_state(s));
    release_inflight(s);
    mph_txn_t *batch = queue_take(&s->inflight);

    if (res->status == 0) {
        scope_op_t op = {s, NULL, 0, 0, ""};
        s->version = res->doc.version;
        s->conflict_streak = s->error_streak = 0;
        if (mph__lua_protect(lua, commit_ok, &op, "folding a commit into its scope") == 0) {
            answer_all(batch);
            kick(s);
            return;
        }
        /* Durable, so the batch is answered; but the state in memory missed it: forget it
         * (it is reloaded on the next access) and run again what ran on top of it. */
        scope_forget(s);
        answer_all(batch);
        mph_txn_t *later = queue_take(&s->pending);
        s->pending_writes = 0;
        requeue_all(s, later, 0);
        backoff(s, 0);
        return;
    }

    /* Every speculative write is void now: the batch and whatever ran on top of it. */
    mph_txn_t *later = queue_take(&s->pending);
    s->pending_writes = 0;
    int nomem = res->status == MPH_ENOMEM;
    if (res->status == MPH_ECONFLICT) {
        scope_op_t op = {s, &res->doc, !res->doc.is_delta, 0, ""};
        nomem = mph__lua_protect(lua, reset_state, &op, "applying a conflict's update") != 0;
        if (!nomem && op.rc == 0) {
            s->version = res->doc.version;
            mph_log(MPH_LOG_DEBUG, "scope %s: conflict, now at version %llu", s->name,
                    (unsigned long long)s->version);
            s->conflict_streak++;
            requeue_all(s, batch, !res->held); /* being held off is waiting, not refusal */
            requeue_all(s, later, 0);
            /* Held by another process's claim: it is owed the next commit, let it land. */
            backoff(s, res->held ? jitter(lua, 2) : 0);
            return;
        }
        if (!nomem)
            mph_log(MPH_LOG_ERROR, "scope %s: unreadable update from storage: %s", s->name, op.err);
    }
    /* An error: the outcome may be unknown, so forget the state; it is reloaded on the next
     * access. The batch hears -32002 (never "committed" unless it was), or -32603 when Lua
     * ran out of memory; the later ones only read speculative data and simply run again. */
    char message[400];
    if (nomem)
        snprintf(message, sizeof(message), "Internal error: not enough memory");
    else
        snprintf(message, sizeof(message), "storage unavailable: %s",
                 res->message ? res->message : mph_strerror(res->status));
    mph_log(MPH_LOG_WARN, "scope %s: commit failed: %s", s->name, message);
    scope_forget(s);
    fail_all(batch, nomem ? MPH_RPC_INTERNAL_ERROR : MPH_RPC_STORAGE_UNAVAILABLE, message);
    requeue_all(s, later, 0);
    s->error_streak++;
    backoff(s, jitter(lua, (uint64_t)1 << (s->error_streak < 6 ? s->error_streak : 6)));
}

/* What kick hands to take_pending. */
typedef struct {
    mph_scope_t *s;
    mph_store_entry_t *entries; /* owned by the caller, even when take_pending raises */
    size_t n;
} take_t;

/* I.take_pending(name) -> the write set (key -> JSON text or false), read into c->entries
 * and kept referenced in s->inflight_json_ref until the commit ends, so the entries can
 * point into its strings. Under lua_cpcall. [-0, +0, e] */
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
    s->inflight_json_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* pops json */
    return 0;
}

/* Starts the next batch's commit when none is in flight. */
static void kick(mph_scope_t *s)
{
    mph_lua_t *lua = s->lua;
    assert(assert_scope_state(s));
    if (s->committing || s->backing_off || s->pending.head == NULL)
        return;
    if (s->pending_writes == 0) {
        /* Only readers, and what they read is durable now. */
        answer_all(queue_take(&s->pending));
        return;
    }
    s->inflight = s->pending;
    s->pending.head = s->pending.tail = NULL;
    s->pending_writes = 0;
    for (mph_txn_t *t = s->inflight.head; t; t = t->next) {
        t->state = TXN_COMMITTING;
        assert(assert_txn_state(t));
    }
    take_t c = {s, NULL, 0};
    int status = mph__lua_protect(lua, take_pending, &c, "taking a scope's write set");
    s->entries = c.entries;
    s->committing = 1;
    int rc = MPH_ENOMEM;
    if (status == 0) {
        mph_store_write_t w = {s->name,   s->version,     c.n,
                               c.entries, lua->committer, s->conflict_streak >= CLAIM_AFTER};
        rc = lua->store->methods->commit(lua->store, &w, 1, on_committed, s);
    }
    if (rc != 0) {
        mph_store_result_t res = {rc, mph_strerror(rc), {0, 0, 0, NULL}, s->name, 0};
        on_committed(s, &res);
    }
}

void mph__runner_finished(mph_txn_t *t)
{
    mph_scope_t *s = t->scope;
    if (s == NULL || (!t->wrote && !s->committing && s->pending.head == NULL)) {
        mph__txn_reply_result(t); /* nothing to wait for */
        return;
    }
    t->state = TXN_QUEUED;
    assert(assert_txn_state(t));
    queue_push(&s->pending, t);
    if (t->wrote)
        s->pending_writes++;
    kick(s);
}

/* ---- Backoff ---- */

static void on_retry_timer(uv_timer_t *timer);

static void arm_retry_timer(mph_lua_t *lua)
{
    if (lua->backoffs == NULL) {
        uv_timer_stop(&lua->retry_timer);
        return;
    }
    uint64_t at = lua->backoffs->backoff_until;
    for (mph_scope_t *s = lua->backoffs->next_backoff; s; s = s->next_backoff)
        if (s->backoff_until < at)
            at = s->backoff_until;
    uint64_t now = uv_now(lua->loop);
    uv_timer_start(&lua->retry_timer, on_retry_timer, at > now ? at - now : 0, 0);
}

/* Runs the refused transactions again, in order (each joins s->pending, or waits for a load),
 * then starts the commit. */
static void rerun_now(mph_scope_t *s)
{
    s->backing_off = 0;
    mph_txn_t *t = queue_take(&s->rerun);
    while (t) {
        mph_txn_t *next = t->next;
        mph__txn_start_attempt(t);
        t = next;
    }
    kick(s);
}

/* Re-runs the scope's refused transactions after delay_ms; with no delay at once, from the
 * storage callback that reported the conflict, exactly as a successful commit starts the
 * next one: a retry that waited for the next loop iteration would reach the storage behind
 * the other process's next commit every time. */
static void backoff(mph_scope_t *s, uint64_t delay_ms)
{
    mph_lua_t *lua = s->lua;
    if (s->backing_off || s->rerun.head == NULL)
        return;
    if (delay_ms == 0) {
        rerun_now(s);
        return;
    }
    s->backing_off = 1;
    s->backoff_until = uv_now(lua->loop) + delay_ms;
    s->next_backoff = lua->backoffs;
    lua->backoffs = s;
    arm_retry_timer(lua);
}

static void on_retry_timer(uv_timer_t *timer)
{
    mph_lua_t *lua = mph_container_of(timer, mph_lua_t, retry_timer);
    uint64_t now = uv_now(lua->loop);
    /* Detach the scopes whose backoff is over first: re-running may start new backoffs. */
    mph_scope_t *due = NULL, **p = &lua->backoffs;
    while (*p) {
        mph_scope_t *s = *p;
        if (s->backoff_until <= now) {
            *p = s->next_backoff;
            s->next_backoff = due;
            due = s;
        } else {
            p = &s->next_backoff;
        }
    }
    arm_retry_timer(lua);
    while (due) {
        mph_scope_t *s = due;
        due = s->next_backoff;
        s->next_backoff = NULL;
        rerun_now(s);
    }
}

void mph__runner_close(mph_lua_t *lua)
{
    const char *msg = "storage unavailable: shutting down";
    lua->backoffs = NULL;
    uv_timer_stop(&lua->retry_timer);
    mph_scope_t *s = lua->scopes;
    while (s) {
        mph_scope_t *next = s->next;
        /* A commit still in flight would call back into freed memory: the host closes the
         * store (which completes every operation) before the bridge. */
        assert(!s->committing && s->state != SCOPE_LOADING);
        fail_all(queue_take(&s->waiting), MPH_RPC_STORAGE_UNAVAILABLE, msg);
        fail_all(queue_take(&s->pending), MPH_RPC_STORAGE_UNAVAILABLE, msg);
        fail_all(queue_take(&s->rerun), MPH_RPC_STORAGE_UNAVAILABLE, msg);
        free(s->name);
        free(s);
        s = next;
    }
    lua->scopes = NULL;
}
