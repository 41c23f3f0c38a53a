/*
 * redis.c: the Redis backend, for scopes shared by mphost processes on many machines.
 *
 * Layout, per scope S under prefix P (hash tag {S}, so one scope's keys share a Redis
 * Cluster slot and a commit's keys are always in one slot):
 *   P{S}:v    the version (a decimal string; absent = 0)
 *   P{S}:d    a hash: top-level key -> JSON text
 *   P{S}:log  the last LOG_LIMIT commits, newest first: "VERSION\n" then per key
 *             "KLEN:KEY" "VLEN:VALUE" (VLEN 0 = deleted; JSON text is never empty)
 *   P{S}:claim  a fairness claim (storage.h): the id of the committer owed the next commit,
 *             expiring after MPH_STORE_CLAIM_MS
 * A commit writes only the keys that changed (HSET/HDEL), so its cost grows with the change,
 * not with the scope. The log lets a conflict answer with just what changed since the
 * caller's version; when it is too far behind, the whole hash is returned instead.
 *
 * The compare-and-set is one Lua script run by the server (atomic): check the version; if it
 * moved, return what changed; else apply, bump, log. Sent as EVALSHA; a NOSCRIPT reply (the
 * script cache was flushed, a failover) is answered by sending the same call as EVAL.
 *
 * A reply lost in flight (the connection breaks after the command left) has an unknown
 * outcome. The caller is told -32002 (never "committed") and the runner drops its cached
 * state, so the next access re-reads what Redis really has: a commit that did apply is seen
 * once, never applied twice, because nothing is re-sent blindly and a re-sent CAS with a
 * stale version would be refused anyway.
 *
 * Connection states: CONNECTED (ac != NULL; hiredis queues commands until the TCP connect
 * ends) and DOWN (ac == NULL, reconnect_at set). While DOWN every call fails at once with
 * MPH_ESTORAGE. A command without a reply for timeout_ms drops the connection (so a hung
 * server fails calls fast, too). Reconnects back off from 50 ms to 2 s. hiredis 0.14.1 has no
 * command timeouts of its own, hence one uv_timer ticking every 50 ms.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <hiredis/adapters/libuv.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "storage.h"

#define LOG_LIMIT "1000" /* commits kept in the change log */
#define MPH_STR_(x) #x
#define MPH_STR(x) MPH_STR_(x)
#define TICK_MS 50
#define BACKOFF_MIN_MS 50
#define BACKOFF_MAX_MS 2000

/* KEYS: version, data hash, change log, claim. ARGV: expected version, log limit, committer
 * id, "1" to claim on a conflict, then key/value pairs ("" = delete). Returns {1, new} or
 * {0, current, is_delta, changes, held}. */
static const char COMMIT_SCRIPT[] =
    "local cur = tonumber(redis.call('GET', KEYS[1]) or '0')\n"
    "local expected = tonumber(ARGV[1])\n"
    "local holder = redis.call('GET', KEYS[4])\n"
    "local held = 0\n"
    "if holder and holder ~= ARGV[3] then held = 1 end\n"
    "if cur ~= expected or held == 1 then\n"
    "  if held == 0 and ARGV[4] == '1' then\n"
    "    redis.call('SET', KEYS[4], ARGV[3], 'PX', " MPH_STR(
        MPH_STORE_CLAIM_MS) ")\n"
                            "  end\n"
                            "  local behind = cur - expected\n"
                            "  if behind == 0 then return {0, tostring(cur), 1, {}, held} end\n"
                            "  if behind > 0 and redis.call('LLEN', KEYS[3]) >= behind then\n"
                            "    return {0, tostring(cur), 1, redis.call('LRANGE', KEYS[3], 0, "
                            "behind - 1), held}\n"
                            "  end\n"
                            "  return {0, tostring(cur), 0, redis.call('HGETALL', KEYS[2]), held}\n"
                            "end\n"
                            "local new = cur + 1\n"
                            "local rec, sets, dels = {tostring(new), '\\n'}, {}, {}\n"
                            "for i = 5, #ARGV, 2 do\n"
                            "  local k, v = ARGV[i], ARGV[i + 1]\n"
                            "  if v == '' then dels[#dels + 1] = k else sets[#sets + 1] = k; "
                            "sets[#sets + 1] = v end\n"
                            "  rec[#rec + 1] = #k .. ':' .. k .. #v .. ':' .. v\n"
                            "  if #sets >= 1000 then redis.call('HSET', KEYS[2], unpack(sets)); "
                            "sets = {} end\n"
                            "  if #dels >= 1000 then redis.call('HDEL', KEYS[2], unpack(dels)); "
                            "dels = {} end\n"
                            "end\n"
                            "if #sets > 0 then redis.call('HSET', KEYS[2], unpack(sets)) end\n"
                            "if #dels > 0 then redis.call('HDEL', KEYS[2], unpack(dels)) end\n"
                            "redis.call('SET', KEYS[1], tostring(new))\n"
                            "redis.call('LPUSH', KEYS[3], table.concat(rec))\n"
                            "redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[2]) - 1)\n"
                            "if holder then redis.call('DEL', KEYS[4]) end\n"
                            "return {1, tostring(new)}\n";

static const char LOAD_SCRIPT[] = "return {redis.call('GET', KEYS[1]) or '0', "
                                  "redis.call('HGETALL', KEYS[2])}\n";

typedef enum { OP_LOAD, OP_COMMIT, OP_SETUP } op_kind_t;

typedef struct redis_store_s redis_store_t;

typedef struct rop_s {
    redis_store_t *rs;
    op_kind_t kind;
    mph_store_cb cb; /* runs exactly once (LOAD, COMMIT) */
    void *ud;
    char *scope;            /* owned copy */
    char *keys[4];          /* owned: P{S}:v, P{S}:d, P{S}:log, P{S}:claim */
    int argc;               /* argv[0..1] are the command and script or sha */
    const char **argv;      /* owned array; strings borrowed or owned as below */
    size_t *argvlen;        /* owned */
    char expected_str[24];  /* argv string for the expected version */
    char committer_str[24]; /* argv string for the committer id */
    uint64_t expected;
    int sent_as_eval;          /* already fell back from EVALSHA */
    uint64_t deadline;         /* uv_now() limit for the reply */
    struct rop_s *prev, *next; /* in rs->inflight, oldest first */
} rop_t;

struct redis_store_s {
    mph_store_t base; /* must be first */
    uv_loop_t *loop;
    char *host; /* owned */
    int port;
    char *password; /* owned, may be NULL */
    int db;
    char *prefix;          /* owned */
    unsigned timeout_ms;   /* a command unanswered this long drops the connection */
    redisAsyncContext *ac; /* NULL while DOWN */
    uint64_t reconnect_at; /* DOWN: when to try again */
    unsigned backoff_ms;
    int was_up;          /* for logging transitions */
    char commit_sha[41]; /* "" until SCRIPT LOAD answered on this connection */
    char load_sha[41];
    rop_t *oldest, *newest; /* commands in flight */
    uv_timer_t tick;        /* timeouts, reconnects, and the end of a close */
    int closing;            /* close() was called */
    int tick_closing;       /* uv_close(tick) was called: rs is freed in its callback */
    void (*closed_cb)(void *ud);
    void *closed_ud;
};

static void connect_now(redis_store_t *rs);
static void drop_connection(redis_store_t *rs, const char *why);

/* ---- In-flight list ---- */

static void inflight_add(redis_store_t *rs, rop_t *op)
{
    op->prev = rs->newest;
    op->next = NULL;
    if (rs->newest)
        rs->newest->next = op;
    else
        rs->oldest = op;
    rs->newest = op;
}

static void inflight_remove(redis_store_t *rs, rop_t *op)
{
    if (op->prev)
        op->prev->next = op->next;
    else
        rs->oldest = op->next;
    if (op->next)
        op->next->prev = op->prev;
    else
        rs->newest = op->prev;
    op->prev = op->next = NULL;
}

static void op_free(rop_t *op)
{
    free(op->scope);
    for (int i = 0; i < 4; i++)
        free(op->keys[i]);
    free(op->argv);
    free(op->argvlen);
    free(op);
}

/* ---- Replies ---- */

static void finish(rop_t *op, const mph_store_result_t *res)
{
    if (op->cb)
        op->cb(op->ud, res);
    op_free(op);
}

static void fail_op(rop_t *op, int status, const char *message)
{
    mph_store_result_t res = {status, message, {0, 0, 0, NULL}, op->scope, 0};
    finish(op, &res);
}

static int parse_u64(const char *s, size_t len, uint64_t *out)
{
    if (len == 0 || len > 20)
        return -1;
    uint64_t v = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    *out = v;
    return 0;
}

static const char *reply_string(const redisReply *r, size_t *len)
{
    if (r && (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS)) {
        *len = r->len;
        return r->str;
    }
    *len = 0;
    return NULL; /* the scripts return versions as strings; nothing else is expected */
}

/* Appends the entries of a flat HGETALL array to a document. */
static int add_hash(mph_store_doc_t *doc, size_t *cap, const redisReply *arr)
{
    if (arr->type != REDIS_REPLY_ARRAY || arr->elements % 2)
        return -1;
    for (size_t i = 0; i < arr->elements; i += 2) {
        size_t klen = 0, vlen = 0;
        const char *k = reply_string(arr->element[i], &klen);
        const char *v = reply_string(arr->element[i + 1], &vlen);
        if (!k || !v)
            return -1;
        if (doc->n == *cap) {
            *cap = *cap ? *cap * 2 : 64;
            doc->entries = mph_xrealloc(doc->entries, *cap * sizeof(*doc->entries));
        }
        doc->entries[doc->n++] = (mph_store_entry_t){k, klen, v, vlen};
    }
    return 0;
}

/* Appends one change-log record ("VERSION\n" then KLEN:KEY VLEN:VALUE ...). */
static int add_record(mph_store_doc_t *doc, size_t *cap, const char *s, size_t len, uint64_t want)
{
    const char *nl = memchr(s, '\n', len);
    uint64_t version;
    if (nl == NULL || parse_u64(s, (size_t)(nl - s), &version) != 0 || version != want)
        return -1;
    const char *p = nl + 1, *end = s + len;
    while (p < end) {
        const char *fields[2];
        size_t lens[2];
        for (int f = 0; f < 2; f++) {
            const char *colon = memchr(p, ':', (size_t)(end - p));
            uint64_t n;
            if (colon == NULL || parse_u64(p, (size_t)(colon - p), &n) != 0 ||
                n > (uint64_t)(end - colon - 1))
                return -1;
            fields[f] = colon + 1;
            lens[f] = (size_t)n;
            p = colon + 1 + n;
        }
        if (doc->n == *cap) {
            *cap = *cap ? *cap * 2 : 64;
            doc->entries = mph_xrealloc(doc->entries, *cap * sizeof(*doc->entries));
        }
        doc->entries[doc->n++] =
            (mph_store_entry_t){fields[0], lens[0], lens[1] ? fields[1] : NULL, lens[1]};
    }
    return 0;
}

static void send_op(rop_t *op);

static void on_reply(redisAsyncContext *ac, void *reply_ptr, void *privdata)
{
    rop_t *op = privdata;
    redis_store_t *rs = op->rs;
    redisReply *r = reply_ptr;
    inflight_remove(rs, op);
    if (op->kind == OP_SETUP) {
        /* AUTH, SELECT, SCRIPT LOAD: keep SHAs, and drop the connection on errors. */
        if (r && r->type == REDIS_REPLY_STRING && r->len == 40 && op->argc == 3) {
            char *dst = op->argv[2] == COMMIT_SCRIPT ? rs->commit_sha : rs->load_sha;
            memcpy(dst, r->str, 40);
            dst[40] = '\0';
        } else if (r && r->type == REDIS_REPLY_ERROR) {
            char why[300];
            snprintf(why, sizeof(why), "%s: %s", op->argv[0], r->str);
            mph_log(MPH_LOG_ERROR, "redis: %s", why);
            op_free(op);
            drop_connection(rs, why);
            return;
        }
        op_free(op);
        return;
    }
    if (r == NULL) {
        /* Only a dying context answers NULL: mark it down before anyone calls us again. */
        if (rs->ac == ac) {
            rs->ac = NULL;
            rs->reconnect_at = uv_now(rs->loop) + rs->backoff_ms;
        }
        fail_op(op, MPH_ESTORAGE, "connection to Redis lost (the outcome is unknown)");
        return;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        if (strncmp(r->str, "NOSCRIPT", 8) == 0 && !op->sent_as_eval && rs->ac) {
            /* The server forgot the script: send the same call with its text. */
            op->sent_as_eval = 1;
            op->argv[0] = "EVAL";
            op->argv[1] = op->kind == OP_COMMIT ? COMMIT_SCRIPT : LOAD_SCRIPT;
            op->argvlen[0] = 4;
            op->argvlen[1] = strlen(op->argv[1]);
            send_op(op);
            return;
        }
        char msg[300];
        snprintf(msg, sizeof(msg), "Redis: %s", r->str);
        fail_op(op, MPH_ESTORAGE, msg);
        return;
    }
    mph_store_result_t res = {0, NULL, {0, 0, 0, NULL}, op->scope, 0};
    size_t cap = 0, len;
    const char *s;
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 2)
        goto malformed;
    if (op->kind == OP_LOAD) {
        if ((s = reply_string(r->element[0], &len)) == NULL ||
            parse_u64(s, len, &res.doc.version) != 0 || add_hash(&res.doc, &cap, r->element[1]))
            goto malformed;
        finish(op, &res);
        free(res.doc.entries);
        return;
    }
    /* Commit: {1, new} or {0, current, is_delta, list} */
    if ((s = reply_string(r->element[1], &len)) == NULL || parse_u64(s, len, &res.doc.version) != 0)
        goto malformed;
    if (r->element[0]->type == REDIS_REPLY_INTEGER && r->element[0]->integer == 1) {
        finish(op, &res);
        return;
    }
    if (r->elements != 5)
        goto malformed;
    res.status = MPH_ECONFLICT;
    res.held = r->element[4]->type == REDIS_REPLY_INTEGER && r->element[4]->integer == 1;
    res.doc.is_delta = r->element[2]->type == REDIS_REPLY_INTEGER && r->element[2]->integer;
    if (res.doc.is_delta) {
        const redisReply *list = r->element[3];
        if (list->type != REDIS_REPLY_ARRAY)
            goto malformed;
        /* Newest first in the list: apply oldest first. */
        for (size_t i = list->elements; i-- > 0;) {
            uint64_t want = op->expected + (list->elements - i);
            if (list->element[i]->type != REDIS_REPLY_STRING ||
                add_record(&res.doc, &cap, list->element[i]->str, list->element[i]->len, want) != 0)
                goto malformed;
        }
    } else if (add_hash(&res.doc, &cap, r->element[3]) != 0) {
        goto malformed;
    }
    finish(op, &res);
    free(res.doc.entries);
    return;
malformed:
    free(res.doc.entries);
    fail_op(op, MPH_ESTORAGE, "unexpected reply from Redis");
}

/* ---- Connection ---- */

static void send_op(rop_t *op)
{
    redis_store_t *rs = op->rs;
    op->deadline = uv_now(rs->loop) + rs->timeout_ms;
    inflight_add(rs, op);
    if (redisAsyncCommandArgv(rs->ac, on_reply, op, op->argc, op->argv, op->argvlen) != REDIS_OK) {
        inflight_remove(rs, op);
        fail_op(op, MPH_ESTORAGE, "cannot send to Redis");
    }
}

static void setup_command(redis_store_t *rs, int argc, const char **argv)
{
    rop_t *op = mph_xcalloc(1, sizeof(*op));
    op->rs = rs;
    op->kind = OP_SETUP;
    op->argc = argc;
    op->argv = mph_xmalloc((size_t)argc * sizeof(*op->argv));
    op->argvlen = mph_xmalloc((size_t)argc * sizeof(*op->argvlen));
    for (int i = 0; i < argc; i++) {
        op->argv[i] = argv[i];
        op->argvlen[i] = strlen(argv[i]);
    }
    send_op(op);
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    redis_store_t *rs = ac->data;
    if (status != REDIS_OK) {
        /* hiredis frees the context after this callback; pending commands got NULL. */
        if (rs->ac == ac) {
            rs->ac = NULL;
            rs->reconnect_at = uv_now(rs->loop) + rs->backoff_ms;
        }
        if (rs->was_up)
            mph_log(MPH_LOG_WARN, "redis: cannot connect to %s:%d: %s", rs->host, rs->port,
                    ac->errstr);
        rs->was_up = 0;
        rs->backoff_ms = rs->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : rs->backoff_ms * 2;
        return;
    }
    if (!rs->was_up)
        mph_log(MPH_LOG_INFO, "redis: connected to %s:%d", rs->host, rs->port);
    rs->was_up = 1;
    rs->backoff_ms = BACKOFF_MIN_MS;
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    redis_store_t *rs = ac->data;
    if (rs->ac == ac) {
        rs->ac = NULL;
        rs->reconnect_at = uv_now(rs->loop) + rs->backoff_ms;
    }
    if (status != REDIS_OK && !rs->closing)
        mph_log(MPH_LOG_WARN, "redis: connection lost: %s", ac->errstr);
    rs->was_up = 0;
}

/* The commands that open every connection, sync or async: AUTH and SELECT, when configured.
 * Fills out[] (argv strings borrowed from password and db_buf) and returns how many. */
typedef struct {
    const char *argv[2];
} login_t;

static int login_commands(const char *password, int db, char db_buf[16], login_t out[2])
{
    int n = 0;
    if (password)
        out[n++] = (login_t){{"AUTH", password}};
    if (db) {
        snprintf(db_buf, 16, "%d", db);
        out[n++] = (login_t){{"SELECT", db_buf}};
    }
    return n;
}

static void connect_now(redis_store_t *rs)
{
    redisAsyncContext *ac = redisAsyncConnect(rs->host, rs->port);
    if (ac == NULL || ac->err) {
        if (ac)
            redisAsyncFree(ac);
        rs->reconnect_at = uv_now(rs->loop) + rs->backoff_ms;
        return;
    }
    ac->data = rs;
    if (redisLibuvAttach(ac, rs->loop) != REDIS_OK) {
        redisAsyncFree(ac);
        rs->reconnect_at = uv_now(rs->loop) + rs->backoff_ms;
        return;
    }
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    rs->ac = ac;
    rs->commit_sha[0] = rs->load_sha[0] = '\0';
    char db[16];
    login_t login[2];
    for (int i = 0, n = login_commands(rs->password, rs->db, db, login); i < n; i++)
        setup_command(rs, 2, login[i].argv);
    const char *load_commit[] = {"SCRIPT", "LOAD", COMMIT_SCRIPT};
    const char *load_load[] = {"SCRIPT", "LOAD", LOAD_SCRIPT};
    setup_command(rs, 3, load_commit);
    setup_command(rs, 3, load_load);
}

/* Ends the connection now: every command in flight fails (NULL reply), then hiredis calls
 * on_disconnect. From inside a hiredis callback, hiredis defers the free until the callback
 * returns (REDIS_IN_CALLBACK). */
static void drop_connection(redis_store_t *rs, const char *why)
{
    redisAsyncContext *ac = rs->ac;
    if (ac == NULL)
        return;
    mph_log(MPH_LOG_WARN, "redis: dropping the connection: %s", why);
    rs->ac = NULL; /* calls made from the failing callbacks fail fast */
    rs->reconnect_at = uv_now(rs->loop) + rs->backoff_ms;
    redisAsyncFree(ac);
}

static void on_tick_closed(uv_handle_t *h)
{
    redis_store_t *rs = mph_container_of((uv_timer_t *)h, redis_store_t, tick);
    void (*cb)(void *) = rs->closed_cb;
    void *ud = rs->closed_ud;
    free(rs->host);
    free(rs->password);
    free(rs->prefix);
    free(rs);
    if (cb)
        cb(ud);
}

static void on_tick(uv_timer_t *t)
{
    redis_store_t *rs = mph_container_of(t, redis_store_t, tick);
    uint64_t now = uv_now(rs->loop);
    if (rs->closing && rs->ac == NULL && rs->oldest == NULL && !rs->tick_closing) {
        /* The connection is gone and nothing waits: free from a libuv callback, never
         * from inside hiredis, which may still hold a pointer to us there. */
        rs->tick_closing = 1;
        uv_close((uv_handle_t *)&rs->tick, on_tick_closed);
        return;
    }
    if (rs->ac && rs->oldest && rs->oldest->deadline <= now) {
        char why[96];
        snprintf(why, sizeof(why), "no reply within %u ms", rs->timeout_ms);
        drop_connection(rs, why);
    }
    if (rs->ac == NULL && !rs->closing && now >= rs->reconnect_at)
        connect_now(rs);
}

/* ---- Methods ---- */

static rop_t *new_op(redis_store_t *rs, op_kind_t kind, const char *scope, mph_store_cb cb,
                     void *ud, int argc)
{
    rop_t *op = mph_xcalloc(1, sizeof(*op));
    op->rs = rs;
    op->kind = kind;
    op->cb = cb;
    op->ud = ud;
    op->scope = mph_xstrdup(scope);
    static const char *const suffix[4] = {"v", "d", "log", "claim"};
    for (int i = 0; i < 4; i++) {
        size_t n = strlen(rs->prefix) + strlen(scope) + strlen(suffix[i]) + 4; /* {}:\0 */
        op->keys[i] = mph_xmalloc(n);
        snprintf(op->keys[i], n, "%s{%s}:%s", rs->prefix, scope, suffix[i]);
    }
    op->argc = argc;
    op->argv = mph_xcalloc((size_t)argc, sizeof(*op->argv));
    op->argvlen = mph_xcalloc((size_t)argc, sizeof(*op->argvlen));
    int sha = kind == OP_COMMIT ? rs->commit_sha[0] != '\0' : rs->load_sha[0] != '\0';
    op->argv[0] = sha ? "EVALSHA" : "EVAL";
    op->argv[1] = kind == OP_COMMIT ? (sha ? rs->commit_sha : COMMIT_SCRIPT)
                                    : (sha ? rs->load_sha : LOAD_SCRIPT);
    op->sent_as_eval = !sha;
    op->argv[2] = "4";
    for (int i = 0; i < 4; i++)
        op->argv[3 + i] = op->keys[i];
    for (int i = 0; i < 7; i++)
        op->argvlen[i] = strlen(op->argv[i]);
    return op;
}

static int redis_load(mph_store_t *s, const char *scope, mph_store_cb cb, void *ud)
{
    redis_store_t *rs = (redis_store_t *)s;
    if (rs->closing)
        return MPH_ECLOSED;
    if (rs->ac == NULL)
        return MPH_ESTORAGE;
    rop_t *op = new_op(rs, OP_LOAD, scope, cb, ud, 7);
    send_op(op);
    return 0;
}

static int redis_commit(mph_store_t *s, const mph_store_write_t *writes, size_t nwrites,
                        mph_store_cb cb, void *ud)
{
    redis_store_t *rs = (redis_store_t *)s;
    if (rs->closing)
        return MPH_ECLOSED;
    if (rs->ac == NULL)
        return MPH_ESTORAGE;
    if (nwrites != 1)
        return MPH_EINVAL; /* one scope per commit, as the runner sends them */
    const mph_store_write_t *w = &writes[0];
    rop_t *op = new_op(rs, OP_COMMIT, w->scope, cb, ud, 11 + 2 * (int)w->n);
    op->expected = w->expected_version;
    snprintf(op->expected_str, sizeof(op->expected_str), "%llu",
             (unsigned long long)w->expected_version);
    snprintf(op->committer_str, sizeof(op->committer_str), "%llu",
             (unsigned long long)w->committer);
    const char *fixed[4] = {op->expected_str, LOG_LIMIT, op->committer_str, w->claim ? "1" : "0"};
    for (int i = 0; i < 4; i++) {
        op->argv[7 + i] = fixed[i];
        op->argvlen[7 + i] = strlen(fixed[i]);
    }
    for (size_t i = 0; i < w->n; i++) {
        op->argv[11 + 2 * i] = w->entries[i].key;
        op->argvlen[11 + 2 * i] = w->entries[i].klen;
        op->argv[12 + 2 * i] = w->entries[i].json ? w->entries[i].json : "";
        op->argvlen[12 + 2 * i] = w->entries[i].json ? w->entries[i].jlen : 0;
    }
    send_op(op);
    return 0;
}

static void redis_close(mph_store_t *s, void (*done)(void *ud), void *ud)
{
    redis_store_t *rs = (redis_store_t *)s;
    rs->closing = 1;
    rs->closed_cb = done;
    rs->closed_ud = ud;
    /* Pending replies still arrive (or time out); then the connection closes, on_disconnect
     * runs, and the next tick frees the store. */
    if (rs->ac)
        redisAsyncDisconnect(rs->ac);
}

static const mph_store_methods_t redis_methods = {
    MPH_STORE_METHODS_VERSION, "redis", redis_load, redis_commit, redis_close,
};

/* ---- Opening ---- */

/* A blocking check at start (before the loop runs), so that an unreachable Redis is one
 * clear error and a non-zero exit, not a server that fails every call. */
static int check_reachable(const mph_store_redis_config_t *cfg, char *err, size_t errlen)
{
    struct timeval tv = {2, 0};
    redisContext *c = redisConnectWithTimeout(cfg->host, cfg->port, tv);
    if (c == NULL || c->err) {
        snprintf(err, errlen, "cannot reach Redis at %s:%d: %s", cfg->host, cfg->port,
                 c ? c->errstr : "out of memory");
        if (c)
            redisFree(c);
        return MPH_ESTORAGE;
    }
    redisSetTimeout(c, tv);
    char db[16];
    login_t steps[3];
    int n = login_commands(cfg->password, cfg->db, db, steps);
    steps[n++] = (login_t){{"PING", NULL}};
    for (int i = 0; i < n; i++) {
        int argc = steps[i].argv[1] ? 2 : 1;
        redisReply *r = redisCommandArgv(c, argc, steps[i].argv, NULL);
        if (r == NULL || r->type == REDIS_REPLY_ERROR) {
            snprintf(err, errlen, "Redis at %s:%d refused %s: %s", cfg->host, cfg->port,
                     steps[i].argv[0], r ? r->str : c->errstr);
            if (r)
                freeReplyObject(r);
            redisFree(c);
            return MPH_ESTORAGE;
        }
        freeReplyObject(r);
    }
    redisFree(c);
    return 0;
}

int mph_store_redis_open(mph_store_t **out, uv_loop_t *loop, const mph_store_redis_config_t *cfg,
                         char *err, size_t errlen)
{
    int rc = check_reachable(cfg, err, errlen);
    if (rc != 0)
        return rc;
    redis_store_t *rs = mph_xcalloc(1, sizeof(*rs));
    rs->base.methods = &redis_methods;
    rs->loop = loop;
    rs->host = mph_xstrdup(cfg->host);
    rs->port = cfg->port;
    rs->password = cfg->password ? mph_xstrdup(cfg->password) : NULL;
    rs->db = cfg->db;
    rs->prefix = mph_xstrdup(cfg->prefix ? cfg->prefix : "mp:");
    rs->timeout_ms = cfg->timeout_ms ? cfg->timeout_ms : 1000;
    rs->backoff_ms = BACKOFF_MIN_MS;
    rs->was_up = 1;
    uv_timer_init(loop, &rs->tick);
    uv_timer_start(&rs->tick, on_tick, TICK_MS, TICK_MS);
    connect_now(rs);
    *out = &rs->base;
    return 0;
}
