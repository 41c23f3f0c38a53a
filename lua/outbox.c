/*
 * outbox.c: the C half of mp.send, mp.cancel and mp.self (lua/outbox.lua has the Lua half),
 * and the delivery loop that sends what they committed.
 *
 * Where messages live. A message is a key of an outbox scope, "o:" .. bucket, written by the
 * handler like any other key, so the storage's one atomic commit carries it with the
 * handler's writes: an attempt that raised or conflicted sent nothing, one that committed
 * will be delivered. Scripts cannot name these scopes (their names are "global", "u:...",
 * "n:..."). Expired messages move to "x:" .. bucket, the dead list.
 *
 * Buckets. A scope has one version, so two transactions that write the same scope from two
 * processes conflict, and one runs again. One outbox scope for everything would make every
 * sender of every process conflict with every other, and with every deliverer. So there are
 * MPH_OUTBOX_BUCKETS of them: each process sends into its own "home" bucket (by worker and
 * host number), and delivers first from it. In one process the transactions of one scope run
 * one after another and group-commit together (scopes.c), so sends and deliveries of a home
 * bucket do not conflict. Every process also watches the others' buckets, and takes their
 * messages GRACE_MS after they are ready: that is how messages of a process that is gone for
 * good (a host that left) are delivered; while their owner is up it is quicker, and nobody
 * conflicts with it.
 *
 * The loop. Every bucket is claimed each POLL_MS, sooner when a message is due sooner or a
 * send just happened here. A claim is a transaction (outbox.lua's ops.claim) that reads the
 * bucket (a fresh read: it sees every commit acknowledged before it) and leases the messages
 * that are due: it writes `lease` (now + LEASE_MS) and `by` (this process's token) into each,
 * so the commit that decides the claim is the same CAS that orders everything else, and of
 * two processes claiming at once one wins and the other re-reads. A lease whose holder was
 * killed runs out, and the message is claimed again (within LEASE_MS + POLL_MS, + GRACE_MS
 * from another process). A message this process is delivering still is claimed again like any
 * other once its lease runs out (its own bucket's first, before another process may): that
 * renews the lease, under the same token, and starts no second delivery (ob->delivering), so a
 * handler that waits longer than a lease (in mp.fetch) keeps its message. Then each leased
 * message is delivered:
 *   - to a URL: a JSON-RPC POST with `Idempotency-Key: <id>` through the host's outbound
 *     client (bridge.h, mph_lua_fetch_fn), FETCH_TIMEOUT_MS at most (less than the lease).
 *     A JSON-RPC response, result or error, is final: ops.done removes the message. No
 *     answer, HTTP 5xx or 429, or a transient code (-32001, -32002, -32003, -32005): ops.retry
 *     counts the attempt and makes it due again after a backoff (1 s doubling to 5 min), or
 *     moves it to the dead list once --send-expiry has passed since it was first due. A crash
 *     between the answer and ops.done sends it again, with the same key: at least once, and
 *     an mphost target runs it once.
 *   - to mp.self: no HTTP. ops.deliver runs the target's handler and removes the message in
 *     one transaction, whose commit is the delivery: a crash before it leaves the message
 *     pending (and the handler's writes unmade); after it, the message is gone. A delivery
 *     whose lease ran out meanwhile finds the message taken (`by` is another token) or gone,
 *     and commits nothing (O.SKIP). So the handler's effects happen exactly once. A handler
 *     that raised commits nothing: a final error is then removed by ops.done, a transient one
 *     retried as above. (Were the in-process call entry to take an idempotency key, the
 *     message id would be the one to pass; the transaction already makes it exact.)
 * Nothing of this holds the loop: claims, deliveries and their bookkeeping are calls and
 * exchanges like any other, answered by callbacks. Each step starts from the timer, never
 * from inside another transaction's reply (defer says why). The `by` token makes a
 * deliverer whose lease ran out give way to the one holding it now; exactly once does not
 * rest on it (the CAS on the bucket lets one removal commit, the other finds the message
 * gone), "one at a time per message" does.
 *
 * Out of sight. Every process claims every bucket every second, whether the script sends or
 * not. Those claims and the delivery records are "quiet" transactions (mph_txn_t.quiet):
 * /metrics' calls, attempts, commits and conflicts leave them out (a delivery to mp.self, a
 * handler's run, counts), mphost_scopes leaves out the outbox's scopes, and the file
 * backend's test hook for loads does not count theirs, so what a deployment shows and what a
 * test counts are its calls'.
 *
 * Timers. A message's `due` is wall-clock time (Unix milliseconds: hosts share the storage,
 * not a monotonic clock). ops.claim reports when the next message not taken becomes ready,
 * and the bucket is claimed again then (or at the next poll, whichever is first), so a
 * delayed message goes out within about POLL_MS of its time. A job that re-sends itself with
 * a delay at the end of its handler writes the next message in the same commit that removes
 * the current one: one tick per period, across restarts.
 */
#define _POSIX_C_SOURCE 200809L
#include <assert.h>
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/json.h"
#include "internal.h"
#include "outbox_lua.h" /* generated from outbox.lua: mph_outbox_lua[] */

#define POLL_MS 1000          /* every bucket is claimed at least this often */
#define LEASE_MS 6000         /* a claim holds a message this long */
#define GRACE_MS 2000         /* another process's bucket: its messages only this much later */
#define FETCH_TIMEOUT_MS 5000 /* a delivery to a URL (below LEASE_MS) */
#define BACKOFF_MAX_MS 300000 /* retries: 1 s doubling up to this */
#define KICK_MS 5             /* after mp.send: time for its call to commit before a claim */
#define CLAIM_LIMIT 64        /* messages one claim takes */
#define MAX_INFLIGHT 256      /* deliveries of this process at once */
#define SKIP_CODE (-32099)    /* ops.deliver: the message was taken by another deliverer */
#define SKIP_MESSAGE "mphost outbox: message taken"

typedef struct {
    uint64_t next_ms; /* uv_now() when it is claimed next; while claiming, the earliest a send
                         or a due time asked for since the claim started (UINT64_MAX: none) */
    int claiming;     /* a claim of it is in flight */
    uint64_t pending; /* its messages at the last claim */
} bucket_t;

struct mph_outbox_s {
    mph_lua_t *lua;       /* owner */
    uv_timer_t timer;     /* fires at the earliest next_ms of the buckets not claiming */
    int running;          /* between mph_lua_outbox_start and _stop: claims are made */
    int home;             /* the bucket this process sends into */
    unsigned expiry_ms;   /* --send-expiry */
    uint64_t seq;         /* numbers ids */
    char token[24];       /* `by` of the messages this process leases: its committer id, in hex */
    mph_map_t delivering; /* deliveries started and not finished, by message id (delivery_t) */
    size_t inflight;      /* deliveries started, bookkeeping included, not finished */
    mph_list_t queue;     /* deliveries whose next step waits for the timer (delivery_t.node) */
    bucket_t buckets[MPH_OUTBOX_BUCKETS];
    mph_lua_outbox_stats_t stats;
};

/* What a delivery does next, on a clean stack (see defer). */
typedef enum { NEXT_START, NEXT_DONE, NEXT_RETRY } next_step_t;

/* One message being delivered, from its claim to its last bookkeeping call. */
typedef struct {
    mph_list_t node;      /* in ob->queue while its next step waits (first: list.h) */
    mph_map_node_t by_id; /* in ob->delivering, under id */
    next_step_t next;
    char *why; /* owned: NEXT_RETRY's reason */
    mph_outbox_t *ob;
    int bucket;
    char *id, *target, *method; /* owned */
    char *shown;                /* owned: target without credentials, for the log */
    char *params;               /* owned JSON text, or NULL: none */
    char *user;                 /* owned: the sender's verified user, or NULL */
} delivery_t;

/* A claim in flight. */
typedef struct {
    mph_outbox_t *ob;
    int bucket;
    int limit;
} claim_t;

static uint64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static int is_transient(int code)
{
    return code == MPH_RPC_CONFLICT || code == MPH_RPC_STORAGE_UNAVAILABLE ||
           code == MPH_RPC_TIMEOUT || code == MPH_RPC_WORKER_UNAVAILABLE;
}

/* ---- The timer ---- */

static void on_timer(uv_timer_t *timer);

/* Sets the timer: at once for steps queued, else to the earliest claim due (nothing while
 * stopped). */
static void arm(mph_outbox_t *ob)
{
    if (!mph_list_empty(&ob->queue) && !ob->lua->closing) {
        uv_timer_start(&ob->timer, on_timer, 0, 0);
        return;
    }
    if (!ob->running)
        return;
    uint64_t now = uv_now(ob->lua->loop), first = UINT64_MAX;
    for (int b = 0; b < MPH_OUTBOX_BUCKETS; b++)
        if (!ob->buckets[b].claiming && ob->buckets[b].next_ms < first)
            first = ob->buckets[b].next_ms;
    if (first != UINT64_MAX)
        uv_timer_start(&ob->timer, on_timer, first > now ? first - now : 0, 0);
}

/* Bucket b is claimed again no later than `delay_ms` from now. */
static void soon(mph_outbox_t *ob, int b, uint64_t delay_ms)
{
    uint64_t at = uv_now(ob->lua->loop) + delay_ms;
    if (at < ob->buckets[b].next_ms)
        ob->buckets[b].next_ms = at;
}

/* ---- Bookkeeping calls ---- */

/* Queues d's next step for the timer. A step starts a transaction, and the callbacks that
 * decide it are replies of other transactions, which run inside the bridge's own commit
 * handling (scopes.c): a call started from there would re-enter it. (The host's in-process
 * calls wait for the next turn of the loop for the same reason, host.c's deliver_ready.) */
static void defer(delivery_t *d, next_step_t next, const char *why)
{
    assert(!mph_list_is_linked(&d->node)); /* one step waits at a time */
    d->next = next;
    free(d->why);
    d->why = why ? mph_xstrdup(why) : NULL;
    mph_list_insert_tail(&d->ob->queue, &d->node);
    arm(d->ob);
}

static void delivery_free(delivery_t *d)
{
    mph_outbox_t *ob = d->ob;
    mph_map_remove(&ob->delivering, &d->by_id);
    free(d->why);
    free(d->id);
    free(d->target);
    free(d->shown);
    free(d->method);
    free(d->params);
    free(d->user);
    free(d);
    if (ob->inflight-- == MAX_INFLIGHT) /* claims were held back for room: claim now */
        for (int b = 0; b < MPH_OUTBOX_BUCKETS; b++)
            soon(ob, b, 0);
    arm(ob);
}

/* ops.done's answer: the message is gone (or was). */
static void on_done(void *ud, mph_lua_reply_t *reply)
{
    delivery_t *d = ud;
    if (reply->code != 0) /* it stays leased; the lease runs out and it is sent again */
        mph_log(MPH_LOG_WARN, "outbox: message %s: cannot remove it after its delivery: %s", d->id,
                reply->message);
    delivery_free(d);
}

/* A final answer came (error: a JSON-RPC error's text, or NULL for a result): the message
 * goes. */
static void finish(delivery_t *d, const char *error)
{
    if (error) {
        d->ob->stats.delivered_error++;
        mph_log(MPH_LOG_INFO, "outbox: message %s (%s to %s) answered %s; that is final", d->id,
                d->method, d->shown, error);
    } else {
        d->ob->stats.delivered_ok++;
    }
    defer(d, NEXT_DONE, NULL);
}

static void run_done(delivery_t *d)
{
    json_t *params = json_pack("[is]", d->bucket, d->id);
    mph__txn_call_internal(d->ob->lua, "done", params, NULL, 1, on_done, d);
    json_decref(params);
}

/* ops.retry's answer: "retry", "dead" or "gone". */
static void on_retried(void *ud, mph_lua_reply_t *reply)
{
    delivery_t *d = ud;
    mph_outbox_t *ob = d->ob;
    const char *outcome = reply->code == 0 && reply->json ? reply->json : "";
    if (reply->code != 0) {
        mph_log(MPH_LOG_WARN, "outbox: message %s: cannot record the failed attempt: %s", d->id,
                reply->message);
    } else if (strcmp(outcome, "\"dead\"") == 0) {
        ob->stats.dead++;
        mph_log(MPH_LOG_WARN,
                "outbox: message %s (%s to %s) is dead: undelivered after --send-expiry; "
                "mphost SCRIPT outbox --dead lists it",
                d->id, d->method, d->shown);
    } else if (strcmp(outcome, "\"retry\"") == 0) {
        ob->stats.retries++;
        soon(ob, d->bucket, 1000); /* its backoff starts at a second */
    }
    delivery_free(d);
}

/* The attempt failed without a final answer: count it and try again later (or give up). */
static void retry(delivery_t *d, const char *why)
{
    mph_log(MPH_LOG_INFO, "outbox: message %s (%s to %s) not delivered: %s; retrying", d->id,
            d->method, d->shown, why);
    defer(d, NEXT_RETRY, why);
}

static void run_retry(delivery_t *d)
{
    mph_outbox_t *ob = d->ob;
    json_t *params =
        json_pack("[isssIII]", d->bucket, d->id, d->ob->token, d->why, (json_int_t)wall_ms(),
                  (json_int_t)ob->expiry_ms, (json_int_t)BACKOFF_MAX_MS);
    mph__txn_call_internal(ob->lua, "retry", params, NULL, 1, on_retried, d);
    json_decref(params);
}

/* ---- Delivering to mp.self ---- */

/* ops.deliver's answer: the handler's result (committed with the removal), or why not. */
static void on_self_delivered(void *ud, mph_lua_reply_t *reply)
{
    delivery_t *d = ud;
    if (reply->code == 0) {
        d->ob->stats.delivered_ok++;
        delivery_free(d);
    } else if (reply->code == SKIP_CODE && reply->message &&
               strcmp(reply->message, SKIP_MESSAGE) == 0) {
        delivery_free(d); /* another deliverer has it, or it was delivered or cancelled */
    } else {
        char why[512];
        snprintf(why, sizeof(why), "error %d: %s", reply->code,
                 reply->message ? reply->message : "");
        if (is_transient(reply->code))
            retry(d, why);
        else
            finish(d, why); /* the handler raised: a final answer; nothing it wrote commits */
    }
}

static void deliver_self(delivery_t *d)
{
    json_t *params = json_pack("[issss?]", d->bucket, d->id, d->ob->token, d->method, d->params);
    mph__txn_call_internal(d->ob->lua, "deliver", params, d->user, 0, on_self_delivered, d);
    json_decref(params);
}

/* ---- Delivering to a URL ---- */

/* The final-or-not verdict on an HTTP response: 1 final result, 2 final error, 0 retry (why
 * says why). */
static int read_response(const mph_lua_fetch_res_t *res, char *why, size_t len)
{
    if (res->status == 0) {
        snprintf(why, len, "no answer: %s", res->error ? res->error : "none");
        return 0;
    }
    if (res->status >= 500 || res->status == 429) {
        snprintf(why, len, "HTTP %d", res->status);
        return 0;
    }
    json_t *doc = res->body ? json_loadb(res->body, res->body_len, 0, NULL) : NULL;
    json_t *error = json_object_get(doc, "error");
    int verdict = 0;
    if (json_is_object(doc) && json_object_get(doc, "result") != NULL) {
        verdict = 1;
    } else if (json_is_object(error) && json_is_integer(json_object_get(error, "code"))) {
        int code = (int)json_integer_value(json_object_get(error, "code"));
        const char *message = json_string_value(json_object_get(error, "message"));
        snprintf(why, len, "error %d: %s", code, message ? message : "");
        verdict = is_transient(code) ? 0 : 2;
    } else {
        snprintf(why, len, "HTTP %d: not a JSON-RPC response", res->status);
    }
    json_decref(doc);
    return verdict;
}

static void on_url_answered(void *ud, mph_lua_fetch_res_t *res)
{
    delivery_t *d = ud;
    char why[512];
    if (!d->ob->running) { /* the host is stopping: the lease runs out, another sends it */
        delivery_free(d);
        return;
    }
    int verdict = read_response(res, why, sizeof(why));
    if (verdict == 0)
        retry(d, why);
    else
        finish(d, verdict == 2 ? why : NULL);
}

static void deliver_url(delivery_t *d)
{
    mph_lua_t *lua = d->ob->lua;
    mph_buf_t body = MPH_BUF_INIT;
    mph_buf_puts(&body, "{\"jsonrpc\":\"2.0\",\"method\":");
    mph_json_write_string(&body, d->method, strlen(d->method));
    if (d->params) {
        mph_buf_puts(&body, ",\"params\":");
        mph_buf_puts(&body, d->params);
    }
    mph_buf_puts(&body, ",\"id\":");
    mph_json_write_string(&body, d->id, strlen(d->id));
    mph_buf_puts(&body, "}");
    char key[256];
    snprintf(key, sizeof(key), "Idempotency-Key: %s", d->id);
    const char *headers[] = {"Content-Type: application/json", key};
    mph_lua_fetch_req_t req = {.url = d->target,
                               .method = "POST",
                               .headers = headers,
                               .nheaders = 2,
                               .body = body.data,
                               .body_len = body.len,
                               .timeout_ms = FETCH_TIMEOUT_MS,
                               .max_body = (size_t)1 << 20};
    char why[256] = "no outbound client";
    int rc = lua->fetch ? lua->fetch(lua->fetch_ud, &req, on_url_answered, d, why, sizeof(why))
                        : MPH_ECLOSED;
    mph_buf_free(&body);
    if (rc != 0) {
        char msg[300];
        snprintf(msg, sizeof(msg), "not sent: %s", why);
        retry(d, msg);
    }
}

/* ---- Claims ---- */

/* Starts the delivery of one claimed message (an element of ops.claim's msgs). */
static void start_delivery(mph_outbox_t *ob, int b, json_t *m)
{
    const char *id = json_string_value(json_object_get(m, "id"));
    const char *target = json_string_value(json_object_get(m, "t"));
    const char *method = json_string_value(json_object_get(m, "m"));
    const char *params = json_string_value(json_object_get(m, "p"));
    const char *user = json_string_value(json_object_get(m, "u"));
    if (id == NULL || target == NULL || method == NULL) {
        mph_log(MPH_LOG_WARN, "outbox: bucket %d holds a malformed message; left as it is", b);
        return;
    }
    if (mph_map_find(&ob->delivering, id) != NULL)
        return; /* its delivery goes on: this claim renewed its lease */
    delivery_t *d = mph_xcalloc(1, sizeof(*d));
    d->ob = ob;
    d->bucket = b;
    d->id = mph_xstrdup(id);
    mph_map_insert(&ob->delivering, &d->by_id, d->id);
    d->target = mph_xstrdup(target);
    char shown[512];
    mph_url_shown(target, shown, sizeof(shown));
    d->shown = mph_xstrdup(shown);
    d->method = mph_xstrdup(method);
    d->params = params ? mph_xstrdup(params) : NULL;
    d->user = user ? mph_xstrdup(user) : NULL;
    ob->inflight++;
    defer(d, NEXT_START, NULL);
}

/* Runs the steps queued (on the timer: a clean stack). */
static void run_queue(mph_outbox_t *ob)
{
    mph_list_t batch, *n;
    mph_list_init(&batch);
    mph_list_move(&batch, &ob->queue);
    while ((n = mph_list_pop(&batch)) != NULL) {
        delivery_t *d = mph_list_entry(n, delivery_t, node);
        if (d->next == NEXT_DONE)
            run_done(d);
        else if (d->next == NEXT_RETRY)
            run_retry(d);
        else if (strcmp(d->target, "mp.self") == 0)
            deliver_self(d);
        else
            deliver_url(d);
    }
}

/* Reads ops.claim's result ({msgs, pending, next}) and starts the deliveries. */
static void read_claim(claim_t *c, const char *text, size_t len)
{
    mph_outbox_t *ob = c->ob;
    bucket_t *bk = &ob->buckets[c->bucket];
    json_t *doc = json_loadb(text, len, 0, NULL);
    json_t *msgs = json_object_get(doc, "msgs");
    json_t *next = json_object_get(doc, "next");
    bk->pending = (uint64_t)json_integer_value(json_object_get(doc, "pending"));
    if (json_is_number(next)) {
        double wait = json_number_value(next) - (double)wall_ms();
        soon(ob, c->bucket, wait > 0 ? (uint64_t)wait + 1 : 0);
    }
    size_t n = json_array_size(msgs);
    if (n > 0 && (int)n >= c->limit)
        soon(ob, c->bucket, 0); /* there may be more */
    for (size_t i = 0; i < n; i++)
        start_delivery(ob, c->bucket, json_array_get(msgs, i));
    json_decref(doc);
}

static void on_claimed(void *ud, mph_lua_reply_t *reply)
{
    claim_t *c = ud;
    mph_outbox_t *ob = c->ob;
    bucket_t *bk = &ob->buckets[c->bucket];
    bk->claiming = 0;
    soon(ob, c->bucket, POLL_MS); /* or sooner, if a send asked meanwhile */
    if (reply->code != 0)
        mph_log(MPH_LOG_DEBUG, "outbox: claiming bucket %d failed: %s", c->bucket, reply->message);
    else if (ob->running)
        read_claim(c, reply->json, reply->json_len);
    free(c);
    arm(ob);
}

static void claim(mph_outbox_t *ob, int b)
{
    claim_t *c = mph_xmalloc(sizeof(*c));
    *c = (claim_t){ob, b, CLAIM_LIMIT};
    if (MAX_INFLIGHT - ob->inflight < CLAIM_LIMIT)
        c->limit = (int)(MAX_INFLIGHT - ob->inflight);
    ob->buckets[b].claiming = 1;
    ob->buckets[b].next_ms = UINT64_MAX; /* what asks for a claim from now on is kept */
    json_t *params = json_pack("[iIsibII]", b, (json_int_t)wall_ms(), ob->token, c->limit,
                               b == ob->home, (json_int_t)GRACE_MS, (json_int_t)LEASE_MS);
    mph__txn_call_internal(ob->lua, "claim", params, NULL, 1, on_claimed, c);
    json_decref(params);
}

static void on_timer(uv_timer_t *timer)
{
    mph_outbox_t *ob = mph_container_of(timer, mph_outbox_t, timer);
    run_queue(ob);
    uint64_t now = uv_now(ob->lua->loop);
    for (int i = 0; i < MPH_OUTBOX_BUCKETS && ob->running; i++) {
        int b = (ob->home + i) % MPH_OUTBOX_BUCKETS; /* its own first */
        bucket_t *bk = &ob->buckets[b];
        if (bk->claiming || bk->next_ms > now)
            continue;
        if (ob->inflight >= MAX_INFLIGHT) { /* delivery_free claims again when room is made */
            bk->next_ms = now + POLL_MS;
            continue;
        }
        claim(ob, b);
    }
    arm(ob);
}

/* ---- The C helpers outbox.lua receives as `O` ---- */

/* O.now() -> Unix time in milliseconds [-0, +1, -] */
static int l_now(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)wall_ms());
    return 1;
}

/* O.new_id(bucket) -> a new message id: "BB." and 24 hex digits (random, then a counter).
 * [-1, +1, m] */
static int l_new_id(lua_State *L)
{
    mph_lua_t *lua = mph__lua_upvalue(L);
    int b = (int)luaL_checkinteger(L, 1);
    char id[48];
    snprintf(id, sizeof(id), "%02x.%016llx%08llx", b, (unsigned long long)mph__lua_random(lua),
             (unsigned long long)(++lua->outbox->seq & 0xffffffffu));
    lua_pushstring(L, id);
    return 1;
}

/* O.kick(bucket, due): a message was just sent into bucket, due at `due` (Unix ms): claim
 * the bucket once it is due and its call has had time to commit. [-2, +0, -] */
static int l_kick(lua_State *L)
{
    mph_outbox_t *ob = mph__lua_upvalue(L)->outbox;
    int b = (int)luaL_checkinteger(L, 1);
    double wait = luaL_checknumber(L, 2) - (double)wall_ms();
    if (b >= 0 && b < MPH_OUTBOX_BUCKETS) {
        soon(ob, b, KICK_MS + (wait > 0 ? (uint64_t)wait : 0));
        arm(ob);
    }
    return 0;
}

static const luaL_Reg outbox_helpers[] = {
    {"now", l_now}, {"new_id", l_new_id}, {"kick", l_kick}, {NULL, NULL}};

/* ---- The bridge's side ---- */

void mph__outbox_open(mph_lua_t *lua, lua_State *L)
{
    mph__lua_load_part(lua, L, mph_outbox_lua, mph_outbox_lua_len, "=outbox.lua", outbox_helpers);
    lua_pushinteger(L, MPH_OUTBOX_BUCKETS); /* Stack: chunk, O */
    lua_setfield(L, -2, "BUCKETS");
    lua_pushinteger(L, lua->outbox->home);
    lua_setfield(L, -2, "HOME");
    lua_pushinteger(L, SKIP_CODE);
    lua_setfield(L, -2, "SKIP");
    lua_pushliteral(L, SKIP_MESSAGE);
    lua_setfield(L, -2, "SKIP_MESSAGE");
    mph__lua_run_part(lua, L);
}

void mph__outbox_new(mph_lua_t *lua)
{
    mph_outbox_t *ob = mph_xcalloc(1, sizeof(*ob));
    ob->lua = lua;
    /* The home bucket: one per worker of each host, as far as the buckets go round. */
    ob->home = ((lua->host_id - 1) * lua->worker_count + lua->worker_id - 1) % MPH_OUTBOX_BUCKETS;
    ob->expiry_ms = 86400 * 1000;
    snprintf(ob->token, sizeof(ob->token), "%016llx", (unsigned long long)lua->committer);
    mph_list_init(&ob->queue);
    ob->delivering = (mph_map_t)MPH_MAP_INIT;
    lua->outbox = ob; /* its timer is initialised with the bridge's (vm.c) */
}

void mph__outbox_stop(mph_outbox_t *ob)
{
    ob->running = 0;
    uv_timer_stop(&ob->timer);
}

void mph__outbox_free(mph_outbox_t *ob)
{
    mph_list_t *n;
    if (ob == NULL)
        return;
    /* Steps queued while the bridge closed never ran: those messages stay leased in the
     * storage, and their leases run out. */
    while ((n = mph_list_pop(&ob->queue)) != NULL)
        delivery_free(mph_list_entry(n, delivery_t, node));
    mph_map_free(&ob->delivering);
    free(ob);
}

uv_handle_t *mph__outbox_handle(mph_outbox_t *ob)
{
    return (uv_handle_t *)&ob->timer;
}

void mph_lua_outbox_start(mph_lua_t *lua, unsigned expiry_ms)
{
    mph_outbox_t *ob = lua->outbox;
    if (lua->closing || ob->running)
        return;
    ob->running = 1;
    if (expiry_ms)
        ob->expiry_ms = expiry_ms;
    uint64_t now = uv_now(lua->loop);
    for (int b = 0; b < MPH_OUTBOX_BUCKETS; b++) /* what survived a restart goes out now */
        ob->buckets[b].next_ms = now;
    arm(ob);
}

void mph_lua_outbox_stop(mph_lua_t *lua)
{
    mph__outbox_stop(lua->outbox);
}

void mph__outbox_stats(const mph_outbox_t *ob, mph_lua_outbox_stats_t *out)
{
    *out = ob->stats;
    out->pending = 0;
    for (int b = 0; b < MPH_OUTBOX_BUCKETS; b++)
        out->pending += ob->buckets[b].pending;
}

int mph__outbox_is_scope(const char *name)
{
    return strncmp(name, MPH_OUTBOX_PENDING, strlen(MPH_OUTBOX_PENDING)) == 0 ||
           strncmp(name, MPH_OUTBOX_DEAD, strlen(MPH_OUTBOX_DEAD)) == 0;
}
