/*
 * idem.c: idempotency keys (docs/idempotency.md). A call made with a key commits its final
 * reply as a record, in the same storage commit as its writes; a duplicate finds the record
 * and answers it without running anything.
 *
 * Where the record lives. In a bucket: an internal scope "i:N" (N = FNV-1a-64 of the record's
 * key modulo IDEM_BUCKETS), under the record's key: "-" + the client's key, or "u" + the
 * user's name length + ":" + the name + ":" + the key for a call to an mp.basicAuth service,
 * so that keys are per user. User Lua cannot reach a bucket: mp.scope names every scope it
 * opens "global", "u:" + user or "n:" + name (metaparticle.lua), never "i:".
 *
 * Why a scope. The attempt opens the bucket before the handler runs (metaparticle.lua,
 * I.run), as a scope of its own transaction: it reads the record (none, or one that has
 * expired: the handler runs, then the record is written into the bucket beside the handler's
 * writes; one that matches: its reply is the outcome and the handler never runs; one that does
 * not: -32006). The scope runner (scopes.c) then does everything else: the record and the
 * writes go out in one atomic commit of several scopes (storage.h) with compare-and-set on each
 * version, so two duplicates running at once in two processes conflict on the bucket, and the
 * one refused runs again, finds the record and answers it. In one process, duplicates run one
 * after another on the bucket's speculative state: the second reads the first's pending record
 * and is answered only once that record is durable, as any read of speculative data is. A
 * replay is a read-only transaction: like every read, it is checked against the storage (or
 * known current) before it is answered, so a record another process committed is never missed
 * for long and never replayed before it is durable.
 *
 * Runs nothing. A duplicate must find the record before its handler runs, but the bucket's
 * state in this process may be older than another process's commit of the record. So the
 * first attempt of a keyed call that finds no record runs the handler only if that state is
 * known current (it was loaded for the attempt, or the storage says so at once: files, with
 * no I/O); else it ends as a read of the bucket (a probe), checked like any read, and once
 * the check confirms it (or the conflict's fresh data was read again and still holds no
 * record) the call runs its handler in a new attempt. On Redis that is one more round trip
 * for a keyed call, batched with the other commits. Two duplicates racing past their probes
 * at once still both run their handlers, and the commit of the second conflicts on the
 * bucket: its handler's effects are discarded and it answers the first one's reply.
 *
 * Storing an error. A handler that raises commits nothing, but a call with a key must commit
 * its error as its record. So when the attempt raised an error that is stored (not a transient
 * one: -32001, -32002, -32003, -32005; nor -32600 or -32603), the error is kept in the
 * transaction and one more attempt runs (mph__idem_keep_failure): it does not run the handler,
 * only reads the record again and writes the error into it (rec.fail). A conflict runs the
 * whole call again, handler included, as it does for any call.
 *
 * Expiry. A record carries its expiry (Unix seconds, the writer's clock plus its
 * --idempotency-ttl); a record past it is treated as absent, and the next call with the key
 * runs and replaces it. Expired records are deleted lazily, when a call writes a record into
 * their bucket and the bucket's "~prune" time has come (then it is set ttl/4 later): that call
 * deletes the bucket's expired records, found without decoding the others into Lua
 * (C.idem_expired reads the JSON text of the values never read since the load), at most
 * PRUNE_MAX of them (metaparticle.lua): with more, the bucket stays due and the next call that
 * writes into it goes on. So each bucket is scanned about once per ttl/4 while written, never
 * on the calls in between, no call deletes more than PRUNE_MAX records, and a record is gone
 * about ttl * 1.25 after its call.
 *
 * Buckets and conflicts. Versions are per scope, so two calls writing records into one
 * bucket from two processes at once conflict though their keys differ: one runs again. With
 * B buckets, two such commits of one record each meet in one with probability 1/B; group
 * commit puts several records in one commit, which makes it more likely. A bucket also ties
 * the calls that use it into one commit unit (scopes.c, "Units") while they are in flight. On
 * Redis a commit's scopes cost little, so there are BUCKETS_REDIS of them; on files every
 * scope of a commit is a log synced (storage/file.c, commits of several scopes), and a group
 * commit of calls on one hot scope would carry as many buckets as calls, so there are only
 * BUCKETS_FILE (docs/idempotency.md has the measurements).
 *
 * Redis Cluster. The record must be in the slot of the call's scopes. When the storage can keep
 * scopes apart (storage.h `together`: a Cluster), a key that carries a hash tag ("{42}:order-7")
 * puts its record in buckets of that tag ("i:{42}:N"), in the slot of every scope named with the
 * same tag ("account:{42}"); a call whose scopes are in another slot than its record fails with
 * -32000 saying so, and that error is not stored.
 */
#define _POSIX_C_SOURCE 200809L
#include "internal.h"

#include <assert.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Internal scopes the records are spread over (see "Buckets and conflicts" above). */
#define BUCKETS_FILE 16    /* file storage: a bucket more in a group commit is a log more synced */
#define BUCKETS_REDIS 1024 /* Redis: a commit's scopes cost little; conflicts and units do */
#define BUCKETS_TAGGED 16  /* per hash tag, on a Redis Cluster */
#define FINGERPRINT_BYTES 16

int mph_lua_idem_key_valid(const char *key, size_t len)
{
    if (key == NULL || len < 1 || len > MPH_LUA_IDEM_KEY_MAX)
        return 0;
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)key[i] < 0x20 || (unsigned char)key[i] > 0x7e)
            return 0;
    return 1;
}

/* FNV-1a, 64 bits (the FNV specification's offset basis and prime): stable across processes
 * and versions, which the bucket of a key must be. */
static uint64_t fnv1a64(const char *s, size_t len)
{
    uint64_t h = 14695981039346656037ull;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

void mph__idem_apart(mph_txn_t *t, const char *first, const char *name, char *msg, size_t len)
{
    if (t->idem_scope == NULL || strcmp(first, t->idem_scope) != 0)
        return;
    t->idem_apart = 1;
    snprintf(msg, len,
             "Idempotency-Key on a Redis Cluster: the call's record (scope \"%s\") and scope "
             "\"%s\" live in different slots; put the hash tag of the call's scopes in the key "
             "(e.g. \"{42}:order-7\" for scopes named \"account:{42}\")",
             t->idem_scope, name);
}

/* The request's fingerprint: the first FINGERPRINT_BYTES of SHA-256 over the method and the
 * params in a canonical form (compact, object keys sorted), in hex. Equal for the same method
 * and params whatever their spacing or key order. Returns 0, or -1 (no digest). */
static int fingerprint(const char *method, const json_t *params, char out[33])
{
    char *text =
        params ? json_dumps(params, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY) : NULL;
    mph_buf_t b = MPH_BUF_INIT;
    mph_buf_puts(&b, method);
    mph_buf_append(&b, "\n", 1);
    mph_buf_puts(&b, params ? (text ? text : "?") : "-"); /* "-": no params at all */
    free(text);
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    int ok = EVP_Digest(b.data, b.len, md, &mdlen, EVP_sha256(), NULL) == 1 &&
             mdlen >= FINGERPRINT_BYTES;
    mph_buf_free(&b);
    if (!ok)
        return -1;
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < FINGERPRINT_BYTES; i++) {
        out[2 * i] = hex[md[i] >> 4];
        out[2 * i + 1] = hex[md[i] & 15];
    }
    out[2 * FINGERPRINT_BYTES] = '\0';
    return 0;
}

const char *mph__idem_init(mph_txn_t *t, const char *key, size_t klen)
{
    if (!mph_lua_idem_key_valid(key, klen))
        return "Invalid Request: an Idempotency-Key must be 1 to 200 printable ASCII "
               "characters";
    if (t->role == MPH_LUA_LEAF) /* a shard's is the client's key, passed on (forward.c) */
        return "Invalid Request: an Idempotency-Key is for a client's call or a shard's only";
    if (fingerprint(t->method, t->params, t->idem_req) != 0)
        return "Invalid Request: cannot fingerprint the call (SHA-256 unavailable)";
    mph_buf_t b = MPH_BUF_INIT;
    if (t->user)
        mph_buf_printf(&b, "u%zu:%s:", strlen(t->user), t->user);
    else
        mph_buf_puts(&b, "-");
    t->idem_key_at = b.len;
    mph_buf_append(&b, key, klen);
    size_t len;
    t->idem_key = mph_buf_steal(&b, &len); /* NUL-terminated, as a buffer always is */
    uint64_t h = fnv1a64(t->idem_key, len);
    const mph_store_t *store = t->lua->store;
    int files = store == NULL || strcmp(store->methods->name, "file") == 0;
    size_t at, tlen;
    if (store && store->methods->together && mph_hash_tag(key, klen, &at, &tlen))
        mph_buf_printf(&b, "i:{%.*s}:%u", (int)tlen, key + at, (unsigned)(h % BUCKETS_TAGGED));
    else
        mph_buf_printf(&b, "i:%u", (unsigned)(h % (files ? BUCKETS_FILE : BUCKETS_REDIS)));
    t->idem_scope = mph_buf_steal(&b, &len);
    t->idem_probe = 1;
    return NULL;
}

/* The wall clock in Unix seconds: records are compared across processes and hosts. */
static double wall_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void mph__idem_push(mph_txn_t *t, lua_State *L)
{
    unsigned ttl = t->lua->idem_ttl;
    double now = wall_now();
    lua_createtable(L, 0, 6); /* Stack: ..., rec, idem */
    lua_pushstring(L, t->idem_scope);
    lua_setfield(L, -2, "scope");
    lua_pushstring(L, t->idem_key);
    lua_setfield(L, -2, "key");
    lua_pushstring(L, t->idem_req);
    lua_setfield(L, -2, "req");
    lua_pushnumber(L, now);
    lua_setfield(L, -2, "now");
    lua_pushnumber(L, now + ttl);
    lua_setfield(L, -2, "exp");
    lua_pushnumber(L, ttl / 4 > 0 ? ttl / 4 : 1); /* seconds between a bucket's prunings */
    lua_setfield(L, -2, "every");
    lua_pushboolean(L, t->idem_probe);
    lua_setfield(L, -2, "probe");
    lua_setfield(L, -2, "idem"); /* Stack: ..., rec */
    if (t->fail_code == 0)
        return;
    lua_createtable(L, 0, 3); /* Stack: ..., rec, fail */
    lua_pushinteger(L, t->fail_code);
    lua_setfield(L, -2, "code");
    lua_pushstring(L, t->fail_message);
    lua_setfield(L, -2, "message");
    if (t->fail_data.len) {
        lua_pushlstring(L, t->fail_data.data, t->fail_data.len);
        lua_setfield(L, -2, "data");
    }
    lua_setfield(L, -2, "fail"); /* Stack: ..., rec */
}

/* Whether an error code is an outcome a key keeps: not a transient one (a retry may well
 * succeed), nor one the host gives a call it could not run (-32600: the key was refused;
 * -32603: out of memory). */
static int storable(int code)
{
    switch (code) {
    case MPH_RPC_CONFLICT:
    case MPH_RPC_STORAGE_UNAVAILABLE:
    case MPH_RPC_TIMEOUT:
    case MPH_RPC_WORKER_UNAVAILABLE:
    case MPH_RPC_INVALID_REQUEST:
    case MPH_RPC_INTERNAL_ERROR:
        return 0;
    default:
        return 1;
    }
}

int mph__idem_keep_failure(mph_txn_t *t, int code, char **message, mph_buf_t *data)
{
    if (t->idem_key == NULL || !t->idem_armed || t->idem_apart || !storable(code))
        return 0;
    t->fail_code = code;
    free(t->fail_message);
    t->fail_message = *message;
    *message = NULL;
    mph_buf_free(&t->fail_data);
    t->fail_data = *data;
    *data = (mph_buf_t)MPH_BUF_INIT;
    return 1;
}

void mph__idem_reset(mph_txn_t *t, int keep_failure)
{
    free(t->outcome_message);
    t->outcome_message = NULL;
    t->outcome = 0;
    t->replayed = 0;
    t->fwd_replayed = 0;
    t->idem_armed = 0;
    t->idem_apart = 0;
    t->idem_absent = 0;
    t->idem_fresh = 0;
    if (!keep_failure) {
        t->fail_code = 0;
        free(t->fail_message);
        t->fail_message = NULL;
        t->fail_data.len = 0;
        return;
    }
    /* The attempt stores the error: it is the outcome unless a record is found meanwhile. */
    t->outcome = t->fail_code;
    t->outcome_message = mph_xstrdup(t->fail_message ? t->fail_message : "");
    t->result.len = 0;
    mph_buf_append(&t->result, t->fail_data.data, t->fail_data.len);
}

void mph__idem_free(mph_txn_t *t)
{
    free(t->idem_key);
    free(t->idem_scope);
    free(t->outcome_message);
    free(t->fail_message);
    mph_buf_free(&t->fail_data);
}

int mph__idem_probed(mph_txn_t *t)
{
    if (!t->idem_absent)
        return 0;
    t->idem_probe = 0; /* the record was absent from a current state: the handler runs now */
    mph__txn_start_attempt(t);
    return 1;
}

void mph__idem_loading(mph_txn_t *t, const char *name)
{
    if (t->idem_scope && strcmp(name, t->idem_scope) == 0)
        t->idem_fresh = 1;
}

/* ---- The C helpers (metaparticle.lua, I.run) ---- */

/* C.idem_current() -> whether the bucket's state, as the attempt read it, is certainly the
 * newest acknowledged: it was loaded for this attempt, or the storage knows at once (files:
 * storage.h `current`). [-0, +1, -] */
static int l_idem_current(lua_State *L)
{
    mph_txn_t *t = mph__lua_upvalue(L)->current;
    assert(t != NULL && t->idem_key != NULL);
    const mph_store_t *store = t->lua->store;
    mph_scope_t *s = mph__scopes_acquired(t, t->idem_scope);
    lua_pushboolean(L, t->idem_fresh ||
                           (s != NULL && store->methods->current &&
                            store->methods->current((mph_store_t *)store, s->name, s->version)));
    return 1;
}

/* C.idem_absent(): the attempt found no record in a state not known current; it ends as a
 * read of the bucket, and once that read is checked the handler runs (mph__idem_probed).
 * [-0, +0, -] */
static int l_idem_absent(lua_State *L)
{
    mph_txn_t *t = mph__lua_upvalue(L)->current;
    assert(t != NULL && t->idem_key != NULL && t->idem_probe);
    t->idem_absent = 1;
    return 0;
}

/* C.idem_arm(): the handler starts now; an error it raises is the call's outcome, stored.
 * [-0, +0, -] */
static int l_idem_arm(lua_State *L)
{
    mph_txn_t *t = mph__lua_upvalue(L)->current;
    assert(t != NULL && t->idem_key != NULL);
    t->idem_armed = 1;
    t->idem_probe = 0; /* from now on every attempt reads a bucket state a commit checks */
    return 0;
}

/* C.idem_outcome(code, text, message, replayed): the call answers this instead of running
 * its handler: code 0 and the result's JSON text, or an error's code, data (JSON text or nil)
 * and message. [-0, +0, m] */
static int l_idem_outcome(lua_State *L)
{
    mph_txn_t *t = mph__lua_upvalue(L)->current;
    assert(t != NULL && t->idem_key != NULL);
    int code = (int)luaL_checkinteger(L, 1);
    size_t len = 0;
    const char *text = lua_tolstring(L, 2, &len);
    const char *message = lua_tostring(L, 3);
    if (code == 0 && text == NULL) { /* a result record always has its text */
        text = "null";
        len = 4;
    }
    t->result.len = 0;
    if (text)
        mph_buf_append(&t->result, text, len);
    free(t->outcome_message);
    t->outcome_message = code ? mph_xstrdup(message ? message : mph_rpc_message(code)) : NULL;
    t->outcome = code;
    t->replayed = lua_toboolean(L, 4);
    return 0;
}

/* C.result_text() -> the JSON text of the attempt's result (C.set_result made it).
 * [-0, +1, m] */
static int l_result_text(lua_State *L)
{
    mph_txn_t *t = mph__lua_upvalue(L)->current;
    assert(t != NULL);
    if (t->result.len == 0)
        lua_pushliteral(L, "null");
    else
        lua_pushlstring(L, t->result.data, t->result.len);
    return 1;
}

/* What l_idem_expired hands to each value. */
typedef struct {
    lua_State *L;
    double now;
    int n;     /* keys pushed into the table on top */
    int limit; /* ... at most */
} expired_t;

static void check_expired(const char *key, const char *json, size_t jlen, void *ud)
{
    expired_t *x = ud;
    if (x->n >= x->limit)
        return; /* enough for this call: the next write into the bucket goes on */
    json_t *rec = json_loadb(json, jlen, JSON_DECODE_ANY, NULL);
    json_t *e = json_is_object(rec) ? json_object_get(rec, "e") : NULL;
    int expired = json_is_number(e) && json_number_value(e) <= x->now;
    json_decref(rec); /* before any Lua call, which may raise */
    if (!expired)
        return;
    lua_pushstring(x->L, key);
    lua_rawseti(x->L, -2, ++x->n);
}

/* C.idem_expired(cold, now, limit) -> an array of at most `limit` keys of scope `cold` (the
 * scope's handle in metaparticle.lua) whose value, still JSON text, is a record that expired
 * by `now`. [-0, +1, m] */
static int l_idem_expired(lua_State *L)
{
    mph_scope_t *s = lua_touserdata(L, 1);
    expired_t x = {L, luaL_checknumber(L, 2), 0, (int)luaL_checkinteger(L, 3)};
    lua_newtable(L);
    if (s != NULL)
        mph__scopes_cold_each(s, check_expired, &x);
    return 1;
}

const luaL_Reg mph__idem_helpers[] = {{"idem_arm", l_idem_arm},
                                      {"idem_outcome", l_idem_outcome},
                                      {"result_text", l_result_text},
                                      {"idem_expired", l_idem_expired},
                                      {"idem_current", l_idem_current},
                                      {"idem_absent", l_idem_absent},
                                      {NULL, NULL}};
