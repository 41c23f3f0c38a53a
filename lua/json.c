/*
 * json.c: JSON <-> Lua. Text is read into jansson trees (common/json.c); the Lua -> JSON
 * direction writes text directly, for two reasons: jansson prints 0.1 as 0.10000000000000001
 * (it always uses 17 digits), and building a jansson tree only to print it would allocate
 * once per node on the hottest path of every response and every commit.
 *
 * Arrays keep their kind through the array metatable that decoding sets, so `[]` read from
 * JSON (a request, a scope) is written back as `[]`, not `{}`.
 */
#define _POSIX_C_SOURCE 200809L
#include "json.h"

#include <assert.h>
#include <lauxlib.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char array_mt_key;  /* registry[&array_mt_key] = the array metatable */
static char object_mt_key; /* registry[&object_mt_key] = the object metatable */
static char encode_fn_key; /* registry[&encode_fn_key] = encode_protected, made once */
static char push_fn_key;   /* registry[&push_fn_key] = push_protected, made once */

static int encode_protected(lua_State *L);
static int push_protected(lua_State *L);

#define MAX_SAFE_INTEGER 9007199254740992.0 /* 2^53 */
#define PATH_SEGMENTS 48                    /* path elements kept for error messages */

void mph_json_init(lua_State *L)
{
    lua_pushlightuserdata(L, &array_mt_key);
    lua_newtable(L);
    lua_pushliteral(L, "array");
    lua_setfield(L, -2, "__mp_kind");
    lua_rawset(L, LUA_REGISTRYINDEX);

    lua_pushlightuserdata(L, &object_mt_key);
    lua_newtable(L);
    lua_pushliteral(L, "object");
    lua_setfield(L, -2, "__mp_kind");
    lua_rawset(L, LUA_REGISTRYINDEX);

    /* Kept, so that encoding and decoding never allocate a closure per call. */
    lua_pushlightuserdata(L, &encode_fn_key);
    lua_pushcfunction(L, encode_protected);
    lua_rawset(L, LUA_REGISTRYINDEX);
    lua_pushlightuserdata(L, &push_fn_key);
    lua_pushcfunction(L, push_protected);
    lua_rawset(L, LUA_REGISTRYINDEX);
}

void mph_json_push_array_mt(lua_State *L)
{
    lua_pushlightuserdata(L, &array_mt_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
}

void mph_json_push_object_mt(lua_State *L)
{
    lua_pushlightuserdata(L, &object_mt_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
}

/* ---- JSON -> Lua ---- */

static int push_value(lua_State *L, const json_t *v, int depth, char *err, size_t errlen)
{
    if (depth > MPH_JSON_MAX_DEPTH || !lua_checkstack(L, 3)) {
        snprintf(err, errlen, "nesting deeper than %d", MPH_JSON_MAX_DEPTH);
        return MPH_JSON_ERANGE;
    }
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        const char *key;
        size_t klen;
        json_t *item;
        lua_createtable(L, 0, (int)json_object_size(v));
        json_object_keylen_foreach((json_t *)v, key, klen, item)
        {
            lua_pushlstring(L, key, klen);
            if (push_value(L, item, depth + 1, err, errlen) != 0) {
                lua_pop(L, 2);
                return MPH_JSON_ERANGE;
            }
            lua_rawset(L, -3);
        }
        return 0;
    }
    case JSON_ARRAY: {
        size_t n = json_array_size(v);
        lua_createtable(L, (int)n, 0);
        for (size_t i = 0; i < n; i++) {
            if (push_value(L, json_array_get(v, i), depth + 1, err, errlen) != 0) {
                lua_pop(L, 1);
                return MPH_JSON_ERANGE;
            }
            lua_rawseti(L, -2, (int)(i + 1));
        }
        mph_json_push_array_mt(L);
        lua_setmetatable(L, -2);
        return 0;
    }
    case JSON_STRING:
        lua_pushlstring(L, json_string_value(v), json_string_length(v));
        return 0;
    case JSON_INTEGER: {
        /* Beyond 2^53 only integers a double holds exactly pass (what mphost itself wrote
         * from a Lua number); anything else would be silently rounded. */
        json_int_t i = json_integer_value(v);
        double d = (double)i;
        int exact = (i <= (json_int_t)MAX_SAFE_INTEGER && i >= -(json_int_t)MAX_SAFE_INTEGER) ||
                    (d < 9223372036854775807.0 && (json_int_t)d == i);
        if (!exact) {
            snprintf(err, errlen, "integer %lld cannot be represented exactly (beyond 2^53)",
                     (long long)i);
            return MPH_JSON_ERANGE;
        }
        lua_pushnumber(L, (lua_Number)i);
        return 0;
    }
    case JSON_REAL:
        lua_pushnumber(L, json_real_value(v));
        return 0;
    case JSON_TRUE:
        lua_pushboolean(L, 1);
        return 0;
    case JSON_FALSE:
        lua_pushboolean(L, 0);
        return 0;
    case JSON_NULL:
        lua_pushlightuserdata(L, NULL);
        return 0;
    }
    snprintf(err, errlen, "unknown JSON type");
    return MPH_JSON_ERANGE;
}

int mph_json_push(lua_State *L, const json_t *v, char *err, size_t errlen)
{
    int base = lua_gettop(L);
    int rc = push_value(L, v, 0, err, errlen);
    if (rc != 0)
        lua_settop(L, base);
    return rc;
}

/* What mph_json_push_text hands to push_protected. */
typedef struct {
    const json_t *v;
    char *err;
    size_t errlen;
    int rc;
} push_call_t;

/* push_protected(call) -> value: the decoder run under lua_pcall, so that an error inside it
 * (out of memory) cannot skip freeing the jansson tree. [-1, +1, -] */
static int push_protected(lua_State *L)
{
    push_call_t *call = lua_touserdata(L, 1);
    call->rc = mph_json_push(L, call->v, call->err, call->errlen);
    return call->rc == 0 ? 1 : 0;
}

int mph_json_push_text(lua_State *L, const char *text, size_t len, char *err, size_t errlen)
{
    int base = lua_gettop(L);
    if (!lua_checkstack(L, 2)) { /* raising here is fine: nothing of ours is held yet */
        snprintf(err, errlen, "Lua stack exhausted");
        return MPH_JSON_ERANGE;
    }
    lua_pushlightuserdata(L, &push_fn_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    json_error_t jerr;
    json_t *v = mph_json_load(text, len, &jerr);
    if (v == NULL) {
        lua_settop(L, base);
        snprintf(err, errlen, "invalid JSON: %s", jerr.text);
        return MPH_JSON_ERANGE;
    }
    push_call_t call = {v, err, errlen, MPH_JSON_ERANGE};
    lua_pushlightuserdata(L, &call);
    int status = lua_pcall(L, 1, 1, 0);
    json_decref(v);
    if (status != 0 || call.rc != 0) {
        if (status != 0) {
            snprintf(err, errlen, "%s", status == LUA_ERRMEM ? "not enough memory" : "error");
            call.rc = status == LUA_ERRMEM ? MPH_JSON_ENOMEM : MPH_JSON_ERANGE;
        }
        lua_settop(L, base);
        return call.rc;
    }
    return 0;
}

/* ---- Lua -> JSON text ---- */

typedef struct {
    lua_State *L;
    mph_buf_t *out;
    const char *root; /* name of the top value in paths */
    char *err;
    size_t errlen;
    /* Tables on the current path (cycles). A scope root and the plain table it encodes as
     * both sit here, so it holds up to two entries per level. */
    const void *visiting[2 * (MPH_JSON_MAX_DEPTH + 2)];
    int nvisiting;
    struct {
        const char *key; /* borrowed from a string kept alive by its table; NULL: index */
        size_t klen;
        double index;
    } path[PATH_SEGMENTS];
} encoder_t;

static int encode_fail(encoder_t *e, int depth, const char *fmt, const char *what)
{
    mph_buf_t p = MPH_BUF_INIT;
    mph_buf_puts(&p, e->root);
    for (int i = 0; i < depth && i < PATH_SEGMENTS; i++) {
        if (e->path[i].key)
            mph_buf_printf(&p, ".%.*s", (int)e->path[i].klen, e->path[i].key);
        else
            mph_buf_printf(&p, "[%.0f]", e->path[i].index);
    }
    if (depth > PATH_SEGMENTS)
        mph_buf_puts(&p, "...");
    char msg[160];
    snprintf(msg, sizeof(msg), fmt, what);
    snprintf(e->err, e->errlen, "%s at %s", msg, p.data);
    mph_buf_free(&p);
    return MPH_JSON_EENCODE;
}

static void set_path_key(encoder_t *e, int depth, const char *key, size_t klen)
{
    if (depth < PATH_SEGMENTS) {
        e->path[depth].key = key;
        e->path[depth].klen = klen;
    }
}

static void set_path_index(encoder_t *e, int depth, double index)
{
    if (depth < PATH_SEGMENTS) {
        e->path[depth].key = NULL;
        e->path[depth].index = index;
    }
}

static int encode_value(encoder_t *e, int idx, int depth);

typedef struct {
    const char *s; /* borrowed: a key string of the table, or NULL until numtext is final */
    size_t len;
    size_t off;    /* a number key's text: offset in numtext */
    double number; /* the Lua key when it is a number (object-marked tables only) */
    int is_number;
    int value; /* the stack index of its value when the object's pairs are kept, or 0 */
} key_t_;

static int compare_keys(const void *a, const void *b)
{
    const key_t_ *x = a, *y = b;
    size_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->s, y->s, n);
    return c ? c : (x->len > y->len) - (x->len < y->len);
}

typedef struct {
    size_t n;       /* keys in all */
    size_t nstring; /* string keys */
    size_t nint;    /* integral number keys >= 1 */
    double maxint;  /* the largest of those */
} key_census_t;

/* Counts the keys of the table at `t` by kind. [-0, +0, -] */
static void count_keys(lua_State *L, int t, key_census_t *c)
{
    memset(c, 0, sizeof(*c));
    lua_pushnil(L);
    while (lua_next(L, t)) {
        c->n++;
        if (lua_type(L, -2) == LUA_TSTRING) {
            c->nstring++;
        } else if (lua_type(L, -2) == LUA_TNUMBER) {
            double d = lua_tonumber(L, -2);
            if (d >= 1 && d == floor(d)) {
                c->nint++;
                if (d > c->maxint)
                    c->maxint = d;
            }
        }
        lua_pop(L, 1);
    }
}

static int encode_array(encoder_t *e, int t, int depth, size_t n)
{
    lua_State *L = e->L;
    mph_buf_append(e->out, "[", 1);
    for (size_t i = 1; i <= n; i++) {
        if (i > 1)
            mph_buf_append(e->out, ",", 1);
        lua_rawgeti(L, t, (int)i);
        set_path_index(e, depth, (double)i);
        int rc = encode_value(e, lua_gettop(L), depth + 1);
        lua_pop(L, 1);
        if (rc)
            return rc;
    }
    mph_buf_append(e->out, "]", 1);
    return 0;
}

/* Objects with at most this many keys keep each key and value on the Lua stack while they are
 * sorted and written: fetching a value again by its key interns the key's text once more
 * (lua_pushlstring), which was a tenth of the CPU of a batch of small replies. */
#define KEPT_PAIRS 16

/* Collects the keys of the object at `t` into keys[] (room for n), number keys written into
 * numtext as the encoder writes numbers (1e300 becomes "1e+300"), sorts them and returns how
 * many there are. With `keep`, every key and its value stay on the stack, pushed in pairs
 * (keys[i].value says where; the caller has made room for 2n); else keys[i].value is 0.
 * [-0, +(keep ? 2n : 0), -] */
static size_t collect_keys(lua_State *L, int t, key_t_ *keys, size_t n, mph_buf_t *numtext,
                           int keep)
{
    size_t nk = 0;
    lua_pushnil(L);
    while (lua_next(L, t)) {
        if (nk == n) { /* cannot happen: no Lua ran since the keys were counted */
            lua_pop(L, 2);
            break;
        }
        key_t_ *k = &keys[nk++];
        k->value = 0;
        if (keep) { /* Stack: ..., key, value, key (the copy lua_next goes on from) */
            lua_pushvalue(L, -2);
            k->value = lua_gettop(L) - 1;
        }
        int key = keep ? -3 : -2;
        k->is_number = lua_type(L, key) != LUA_TSTRING;
        if (!k->is_number) {
            k->s = lua_tolstring(L, key, &k->len); /* kept alive by the table, or the stack */
        } else {
            k->number = lua_tonumber(L, key);
            k->off = numtext->len;
            mph_json_write_number(numtext, k->number);
            k->len = numtext->len - k->off;
        }
        if (!keep)
            lua_pop(L, 1);
    }
    for (size_t i = 0; i < nk; i++) /* numtext no longer moves */
        if (keys[i].is_number)
            keys[i].s = numtext->data + keys[i].off;
    qsort(keys, nk, sizeof(*keys), compare_keys);
    return nk;
}

/* Pushes the value of key k of the table at `t`, kept or looked up again. [-0, +1, -] */
static void push_field(lua_State *L, int t, const key_t_ *k)
{
    if (k->value != 0)
        lua_pushvalue(L, k->value);
    else if (k->is_number)
        lua_pushnumber(L, k->number);
    else
        lua_pushlstring(L, k->s, k->len);
    if (k->value == 0)
        lua_rawget(L, t);
}

/* Object: string keys (integers allowed only under the object mark), sorted. */
static int encode_object(encoder_t *e, int t, int depth, size_t n)
{
    lua_State *L = e->L;
    int base = lua_gettop(L);
    key_t_ small[KEPT_PAIRS];
    key_t_ *keys = n <= KEPT_PAIRS ? small : mph_xmalloc(n * sizeof(*keys));
    int keep = n <= KEPT_PAIRS && lua_checkstack(L, 2 * (int)n + 2);
    mph_buf_t numtext = MPH_BUF_INIT;
    n = collect_keys(L, t, keys, n, &numtext, keep);
    int rc = 0;
    mph_buf_append(e->out, "{", 1);
    for (size_t i = 0; i < n && rc == 0; i++) {
        if (i > 0)
            mph_buf_append(e->out, ",", 1);
        set_path_key(e, depth, keys[i].s, keys[i].len);
        if (i > 0 && compare_keys(&keys[i - 1], &keys[i]) == 0) {
            /* Under the object mark, 1 and "1" would both be written as "1". */
            rc = encode_fail(e, depth + 1, "%s", "duplicate key (a number and a string)");
            break;
        }
        if (mph_json_write_string(e->out, keys[i].s, keys[i].len) != 0) {
            rc = encode_fail(e, depth + 1, "%s", "key is not valid UTF-8");
            break;
        }
        mph_buf_append(e->out, ":", 1);
        push_field(L, t, &keys[i]);
        rc = encode_value(e, lua_gettop(L), depth + 1);
        lua_pop(L, 1);
    }
    lua_settop(L, base); /* the kept pairs */
    if (keys != small)
        free(keys);
    mph_buf_free(&numtext);
    if (rc == 0)
        mph_buf_append(e->out, "}", 1);
    return rc;
}

/* Encodes the plain form a scope root's __mp_plain function (at the top) returns for the
 * table at `t`. [-0, +0, m] */
static int encode_plain(encoder_t *e, int t, int depth)
{
    lua_State *L = e->L;
    int base = lua_gettop(L);
    lua_pushvalue(L, t);
    int rc;
    if (lua_pcall(L, 1, 1, 0) != 0) {
        if (lua_istable(L, -1)) /* an error object (mp.error's, or the storage's): its text */
            lua_getfield(L, -1, "message");
        const char *m = lua_tostring(L, -1);
        rc = encode_fail(e, depth, "cannot read scope: %s", m ? m : "error");
    } else {
        rc = encode_value(e, lua_gettop(L), depth);
    }
    lua_settop(L, base - 1); /* pops the function too */
    return rc;
}

/* Table at absolute index `t`: its kind is marked by the metatable, given by a scope root
 * that knows its plain form, or decided by its keys. Stack is balanced on every return. */
static int encode_table(encoder_t *e, int t, int depth)
{
    lua_State *L = e->L;
    const void *self = lua_topointer(L, t);
    for (int i = 0; i < e->nvisiting; i++)
        if (e->visiting[i] == self)
            return encode_fail(e, depth, "%s", "cycle: a table contains itself");
    /* A __mp_plain function may return another table with one, and so on: those do not
     * deepen the path, so the depth limit alone does not bound this array. */
    if (e->nvisiting == (int)(sizeof(e->visiting) / sizeof(e->visiting[0])))
        return encode_fail(e, depth, "%s", "nesting too deep (plain forms within plain forms)");
    e->visiting[e->nvisiting++] = self;
    int kind = 0; /* 0 decide by keys, 1 array, 2 object */
    int rc = 0;
    if (lua_getmetatable(L, t)) {
        lua_getfield(L, -1, "__mp_plain"); /* Stack: mt, plain */
        if (lua_isfunction(L, -1)) {
            rc = encode_plain(e, t, depth); /* Stack: mt */
            lua_pop(L, 1);
            goto done;
        }
        lua_pop(L, 1);
        lua_getfield(L, -1, "__mp_kind"); /* Stack: mt, kind */
        const char *k = lua_tostring(L, -1);
        if (k && strcmp(k, "array") == 0)
            kind = 1;
        else if (k && strcmp(k, "object") == 0)
            kind = 2;
        lua_pop(L, 2);
    }
    key_census_t c;
    count_keys(L, t, &c);
    int marked = kind; /* the metatable chose; integer keys may then become strings */
    if (kind == 0)
        kind = (c.n > 0 && c.nint == c.n && c.maxint == (double)c.n) ? 1 : 2;
    if (kind == 1) {
        if (c.nint != c.n || c.maxint != (double)c.n)
            rc = encode_fail(e, depth, "%s", "array with sparse or non-integer keys");
        else
            rc = encode_array(e, t, depth, c.n);
    } else if (c.nstring != c.n && !(marked && c.nstring + c.nint == c.n)) {
        rc = encode_fail(e, depth, "%s", "table with mixed or non-string keys");
    } else {
        rc = encode_object(e, t, depth, c.n);
    }
done:
    e->nvisiting--;
    return rc;
}

static int encode_value(encoder_t *e, int idx, int depth)
{
    lua_State *L = e->L;
    if (depth > MPH_JSON_MAX_DEPTH)
        return encode_fail(e, depth, "%s", "nesting deeper than the limit");
    if (!lua_checkstack(L, 6))
        return encode_fail(e, depth, "%s", "Lua stack exhausted");
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        mph_buf_append(e->out, "null", 4);
        return 0;
    case LUA_TBOOLEAN:
        if (lua_toboolean(L, idx))
            mph_buf_append(e->out, "true", 4);
        else
            mph_buf_append(e->out, "false", 5);
        return 0;
    case LUA_TNUMBER: {
        double d = lua_tonumber(L, idx);
        if (isnan(d))
            return encode_fail(e, depth, "%s", "cannot encode NaN");
        if (isinf(d))
            return encode_fail(e, depth, "%s", "cannot encode infinity");
        mph_json_write_number(e->out, d);
        return 0;
    }
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        if (mph_json_write_string(e->out, s, len) != 0)
            return encode_fail(e, depth, "%s", "string is not valid UTF-8");
        return 0;
    }
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL) {
            mph_buf_append(e->out, "null", 4);
            return 0;
        }
        return encode_fail(e, depth, "cannot encode a %s", "light userdata");
    case LUA_TTABLE:
        return encode_table(e, idx, depth);
    default:
        return encode_fail(e, depth, "cannot encode a %s", lua_typename(L, lua_type(L, idx)));
    }
}

/* An encoder is about 35 KB (the cycle check's array is sized for the deepest value), too big
 * for the C stack of a handler's call and big enough that a malloc and free of it on every
 * reply made glibc consolidate its small free chunks each time (a tenth of a batch's CPU). So
 * each thread keeps one spare; an encode that runs while another is in progress (a plain
 * form's function encoding) gets its own. */
static _Thread_local encoder_t *spare_encoder;

static encoder_t *encoder_take(void)
{
    encoder_t *e = spare_encoder;
    spare_encoder = NULL;
    return e ? e : mph_xmalloc(sizeof(encoder_t));
}

static void encoder_give_back(encoder_t *e)
{
    if (spare_encoder == NULL)
        spare_encoder = e;
    else
        free(e);
}

/* What mph_json_encode hands to encode_protected. */
typedef struct {
    encoder_t *e;
    int rc;
} encode_call_t;

/* encode_protected(value, call): the encoder run under lua_pcall, so that an error inside it
 * (out of memory growing the stack) cannot skip freeing the encoder's C memory. [-2, +0, -] */
static int encode_protected(lua_State *L)
{
    encode_call_t *call = lua_touserdata(L, 2);
    call->e->L = L;
    call->rc = encode_value(call->e, 1, 0);
    return 0;
}

int mph_json_encode(lua_State *L, int idx, const char *root, mph_buf_t *out, char *err,
                    size_t errlen)
{
    if (idx < 0 && idx > LUA_REGISTRYINDEX)
        idx = lua_gettop(L) + idx + 1;
    int base = lua_gettop(L);
    /* Raising here is fine: nothing of ours is held yet. */
    if (!lua_checkstack(L, 3)) {
        snprintf(err, errlen, "Lua stack exhausted");
        return MPH_JSON_EENCODE;
    }
    lua_pushlightuserdata(L, &encode_fn_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, idx);
    encode_call_t call = {encoder_take(), MPH_JSON_EENCODE};
    lua_pushlightuserdata(L, &call); /* Stack: encode_protected, value, call */
    call.e->out = out;
    call.e->root = root ? root : "$";
    call.e->err = err;
    call.e->errlen = errlen;
    call.e->nvisiting = 0;
    int status = lua_pcall(L, 2, 0, 0);
    if (status == LUA_ERRMEM) {
        snprintf(err, errlen, "not enough memory");
        call.rc = MPH_JSON_ENOMEM;
    } else if (status != 0) {
        const char *m = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "error";
        snprintf(err, errlen, "%s", m);
        call.rc = MPH_JSON_EENCODE;
    }
    lua_settop(L, base);
    encoder_give_back(call.e);
    return call.rc;
}
