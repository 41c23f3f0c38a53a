/*
 * fuzz_json: JSON -> Lua -> JSON round trips through lua/json.c.
 *
 * Property, for every input:
 *  - jansson refuses it: mph_json_push_text refuses it too, with a message, pushing nothing;
 *  - it holds an integer no double holds exactly, or nests too deep: refused (-32602's
 *    MPH_JSON_ERANGE) with a message, pushing nothing;
 *  - else it encodes (a value read from JSON always has a JSON form), the text reads back to
 *    the same value (numbers as doubles, strings byte-exact, arrays in order, objects by key),
 *    and decoding and encoding that text again gives the same bytes (a fixed point);
 *  - the Lua stack is where it was after every step.
 * Any violation aborts.
 */
#include <jansson.h>
#include <lauxlib.h>
#include <lualib.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lua/json.h"

static lua_State *state(void)
{
    static lua_State *L;
    if (L == NULL) {
        L = luaL_newstate();
        luaL_openlibs(L);
        mph_json_init(L);
    }
    return L;
}

static void require(int ok)
{
    if (!ok)
        abort();
}

/* Same JSON value: numbers compared as the doubles Lua holds. */
static int same(const json_t *a, const json_t *b)
{
    if (json_is_number(a) && json_is_number(b))
        return json_number_value(a) == json_number_value(b);
    if (json_typeof(a) != json_typeof(b))
        return 0;
    if (json_is_array(a)) {
        if (json_array_size(a) != json_array_size(b))
            return 0;
        for (size_t i = 0; i < json_array_size(a); i++)
            if (!same(json_array_get(a, i), json_array_get(b, i)))
                return 0;
        return 1;
    }
    if (json_is_object(a)) {
        const char *key;
        size_t klen;
        json_t *v;
        if (json_object_size(a) != json_object_size(b))
            return 0;
        json_object_keylen_foreach((json_t *)a, key, klen, v)
        {
            json_t *w = json_object_getn(b, key, klen);
            if (w == NULL || !same(v, w))
                return 0;
        }
        return 1;
    }
    return json_equal((json_t *)a, (json_t *)b);
}

/* Decodes text and encodes it again into out; returns what mph_json_push_text returned. */
static int round_trip(lua_State *L, const char *text, size_t len, mph_buf_t *out)
{
    char err[256] = "";
    int rc = mph_json_push_text(L, text, len, err, sizeof(err));
    if (rc != 0) {
        require(lua_gettop(L) == 0 && err[0] != '\0');
        return rc;
    }
    require(lua_gettop(L) == 1);
    require(mph_json_encode(L, 1, NULL, out, err, sizeof(err)) == 0);
    require(lua_gettop(L) == 1);
    lua_settop(L, 0);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    lua_State *L = state();
    const char *text = (const char *)data;
    json_error_t jerr;
    json_t *v = mph_json_load(text, size, &jerr);
    mph_buf_t first = MPH_BUF_INIT, second = MPH_BUF_INIT;
    int rc = round_trip(L, text, size, &first);
    if (v == NULL) {
        require(rc != 0);
    } else if (rc == 0) {
        json_t *back = mph_json_load(first.data, first.len, &jerr);
        require(back != NULL && same(v, back));
        json_decref(back);
        require(round_trip(L, first.data, first.len, &second) == 0);
        require(first.len == second.len && memcmp(first.data, second.data, first.len) == 0);
    } else {
        require(rc == MPH_JSON_ERANGE);
    }
    json_decref(v);
    mph_buf_free(&first);
    mph_buf_free(&second);
    require(lua_gettop(L) == 0);
    lua_gc(L, LUA_GCSTEP, 0);
    return 0;
}
