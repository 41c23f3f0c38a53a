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

/* Calls I[fn](name, arg?) and leaves its one result on the stack. [-0, +1, e] */
static void call_internal(mph_lua_t *lua, const char *fn, const char *name, int with_bool, int flag)
{
    lua_State *L = lua->L;
    mph__lua_get_internal(lua, L, fn);
    lua_pushstring(L, name);
    if (with_bool)
        lua_pushboolean(L, flag);
    lua_call(L, 1 + with_bool, 1);
}

/* Writes the entries of a document into the table on top of the stack (base), in order.
 * Returns 0 or -1 with err filled (an entry that is not valid JSON). [-0, +0, m] */
static int apply_entries(lua_State *L, const mph_store_doc_t *doc, char *err, size_t errlen)
{
    for (size_t i = 0; i < doc->n; i++) {
        const mph_store_entry_t *e = &doc->entries[i];
        lua_pushlstring(L, e->key, e->klen);
        if (e->json == NULL) {
            lua_pushnil(L);
        } else if (mph_json_push_text(L, e->json, e->jlen, err, errlen) != 0) {
            lua_pop(L, 1);
            return -1;
        }
        lua_rawset(L, -3);
    }
    return 0;
}

/* ---- Acquire and load ---- */

/* Resumes every transaction waiting for s's load; failure==NULL means it is ready. */
static void wake_waiters(mph_scope_t *s, const char *failure)
{
    mph_txn_t *t = queue_take(&s->waiting);
    while (t) {
        mph_txn_t *next = t->next;
        if (failure)
            lua_pushstring(t->co, failure);
        else
            lua_pushnil(t->co);
        mph__txn_resume(t, 1);
        t = next;
    }
}

static void on_loaded(void *ud, const mph_store_result_t *res)
{
    mph_scope_t *s = ud;
    mph_lua_t *lua = s->lua;
    lua_State *L = lua->L;
    assert(s->state == SCOPE_LOADING);
    char err[300];
    char failure[400];
    if (res->status != 0) {
        snprintf(failure, sizeof(failure), "storage unavailable: %s",
                 res->message ? res->message : mph_strerror(res->status));
        mph_log(MPH_LOG_WARN, "loading scope %s: %s", s->name, failure);
        s->state = SCOPE_UNLOADED;
        wake_waiters(s, failure);
        return;
    }
    int base = lua_gettop(L);
    call_internal(lua, "new_state", s->name, 0, 0); /* Stack: base table */
    int rc = apply_entries(L, &res->doc, err, sizeof(err));
    lua_settop(L, base);
    if (rc != 0) {
        snprintf(failure, sizeof(failure), "storage unavailable: scope %s is corrupt: %s", s->name,
                 err);
        mph_log(MPH_LOG_ERROR, "%s", failure);
        call_internal(lua, "drop_state", s->name, 0, 0);
        lua_settop(L, base);
        s->state = SCOPE_UNLOADED;
        wake_waiters(s, failure);
        return;
    }
    s->version = res->doc.version;
    s->state = SCOPE_READY;
    mph_log(MPH_LOG_DEBUG, "scope %s loaded: %zu entries, version %llu", s->name, res->doc.n,
            (unsigned long long)s->version);
    wake_waiters(s, NULL);
}

int mph__runner_acquire(mph_txn_t *t, const char *name, int can_wait, const char **why)
{
    mph_lua_t *lua = t->lua;
    if (lua->store == NULL) {
        *why = "storage unavailable: no storage is configured";
        return -1;
    }
    mph_scope_t *s = scope_get(lua, name);
    if (s->state == SCOPE_READY)
        return 0;
    if (!can_wait) {
        *why = "a scope must first be opened by the handler itself, not in a coroutine it made";
        return -1;
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
    queue_push(&s->waiting, t);
    return 1;
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
            snprintf(msg, sizeof(msg), "Transaction conflict: gave up after %d attempts",
                     t->attempts);
            mph__txn_reply(t, MPH_RPC_CONFLICT, msg);
        } else {
            t->state = TXN_RETRY;
            queue_push(&s->rerun, t);
        }
        t = next;
    }
}

/* A random delay in [1, ceiling] milliseconds. */
static uint64_t jitter(uint64_t ceiling)
{
    return 1 + (uint64_t)rand() % ceiling;
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
    lua_State *L = lua->L;
    int base = lua_gettop(L);
    assert(s->committing);
    assert(assert_scope_state(s));
    release_inflight(s);
    mph_txn_t *batch = queue_take(&s->inflight);

    if (res->status == 0) {
        call_internal(lua, "commit_ok", s->name, 0, 0);
        lua_settop(L, base);
        s->version = res->doc.version;
        s->conflict_streak = s->error_streak = 0;
        answer_all(batch);
        kick(s);
        return;
    }

    /* Every speculative write is void now: the batch and whatever ran on top of it. */
    mph_txn_t *later = queue_take(&s->pending);
    s->pending_writes = 0;
    if (res->status == MPH_ECONFLICT) {
        char err[300];
        call_internal(lua, "reset_state", s->name, 1, !res->doc.is_delta); /* Stack: base */
        int rc = apply_entries(L, &res->doc, err, sizeof(err));
        lua_settop(L, base);
        if (rc == 0) {
            s->version = res->doc.version;
            mph_log(MPH_LOG_DEBUG, "scope %s: conflict, now at version %llu", s->name,
                    (unsigned long long)s->version);
            s->conflict_streak++;
            requeue_all(s, batch, !res->held); /* being held off is waiting, not refusal */
            requeue_all(s, later, 0);
            /* Held by another process's claim: it is owed the next commit, let it land. */
            backoff(s, res->held ? jitter(2) : 0);
            return;
        }
        mph_log(MPH_LOG_ERROR, "scope %s: unreadable update from storage: %s", s->name, err);
    }
    /* An error: the outcome may be unknown, so forget the state; it is reloaded on the next
     * access. The batch hears -32002 (never "committed" unless it was); the later ones only
     * read speculative data and simply run again. */
    char message[400];
    snprintf(message, sizeof(message), "storage unavailable: %s",
             res->message ? res->message : mph_strerror(res->status));
    mph_log(MPH_LOG_WARN, "scope %s: commit failed: %s", s->name, message);
    call_internal(lua, "drop_state", s->name, 0, 0);
    lua_settop(L, base);
    s->state = SCOPE_UNLOADED;
    fail_all(batch, MPH_RPC_STORAGE_UNAVAILABLE, message);
    requeue_all(s, later, 0);
    s->error_streak++;
    backoff(s, jitter((uint64_t)1 << (s->error_streak < 6 ? s->error_streak : 6)));
}

/* Starts the next batch's commit when none is in flight. */
static void kick(mph_scope_t *s)
{
    mph_lua_t *lua = s->lua;
    lua_State *L = lua->L;
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
    for (mph_txn_t *t = s->inflight.head; t; t = t->next)
        t->state = TXN_COMMITTING;

    /* The write set: key -> JSON text or false. The table stays referenced until the commit
     * ends, so the entries can point into its strings. */
    int base = lua_gettop(L);
    call_internal(lua, "take_pending", s->name, 0, 0); /* Stack: json */
    size_t n = 0, cap = 16;
    mph_store_entry_t *entries = mph_xmalloc(cap * sizeof(*entries));
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        /* Stack: json, key, value */
        if (n == cap) {
            cap *= 2;
            entries = mph_xrealloc(entries, cap * sizeof(*entries));
        }
        entries[n].key = lua_tolstring(L, -2, &entries[n].klen);
        if (lua_type(L, -1) == LUA_TSTRING) {
            entries[n].json = lua_tolstring(L, -1, &entries[n].jlen);
        } else {
            entries[n].json = NULL;
            entries[n].jlen = 0;
        }
        n++;
        lua_pop(L, 1);
    }
    s->inflight_json_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* pops json */
    lua_settop(L, base);
    s->entries = entries;
    s->committing = 1;

    mph_store_write_t w = {s->name, s->version,     n,
                           entries, lua->committer, s->conflict_streak >= CLAIM_AFTER};
    int rc = lua->store->methods->commit(lua->store, &w, 1, on_committed, s);
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
