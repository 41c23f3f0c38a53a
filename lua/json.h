/*
 * json.h: the JSON <-> Lua mapping (docs/lua-api.md, "JSON <-> Lua").
 *
 *   object -> table (no metatable)        array -> table 1..n with the array metatable
 *   null   -> mp.null (a NULL light userdata)
 *   integer a double holds exactly (all within +-2^53) -> number; others -> MPH_JSON_ERANGE
 *   string -> byte-exact Lua string        true/false -> boolean
 *
 * Encoding walks a Lua value and builds a jansson tree. A table is an array when it carries
 * the array metatable or its keys are exactly 1..n; an object when it carries the object
 * metatable, has only string keys, or is empty. Anything else (mixed or sparse keys, a
 * function, a cycle, NaN, infinity, invalid UTF-8, nesting deeper than MPH_JSON_MAX_DEPTH) is
 * an error whose message names the path, e.g. "cannot encode a function at $.a[2]".
 * Object keys are written sorted, so equal values encode to equal bytes.
 */
#ifndef MPH_LUA_JSON_H
#define MPH_LUA_JSON_H

#include <jansson.h>
#include <lua.h>
#include <stddef.h>

#include "common/common.h"
#include "common/json.h"

#define MPH_JSON_MAX_DEPTH 2048 /* same limit as jansson's parser */
#define MPH_JSON_ERANGE (-1)    /* an integer outside +-2^53 */
#define MPH_JSON_EENCODE (-2)   /* a value that has no JSON form */
#define MPH_JSON_ENOMEM (-3)    /* Lua ran out of memory (the message says so) */

/* Creates the array and object metatables and stores them in the registry. Call once per
 * state before any other function here. [-0, +0, m] */
void mph_json_init(lua_State *L);

/* Pushes the array metatable / the object metatable. [-0, +1, -] */
void mph_json_push_array_mt(lua_State *L);
void mph_json_push_object_mt(lua_State *L);

/* Pushes the Lua form of `v` (borrowed). On error returns MPH_JSON_ERANGE, writes a message
 * to err, and leaves the stack as it was. Returns 0 after pushing exactly one value.
 * [-0, +1 on success, m] */
int mph_json_push(lua_State *L, const json_t *v, char *err, size_t errlen);

/* Parses a JSON text and pushes its Lua form; on error returns MPH_JSON_ERANGE (or
 * MPH_JSON_ENOMEM) with a message and pushes nothing. The decoding runs protected: an
 * out-of-memory error inside it is returned, not raised (only the stack check before it may
 * raise, holding nothing). [-0, +1 on success, m] */
int mph_json_push_text(lua_State *L, const char *text, size_t len, char *err, size_t errlen);

/* Appends the JSON text of the value at `idx` to `out`. On failure returns MPH_JSON_EENCODE
 * with a message naming the path in err (out may hold a partial text: discard it), or
 * MPH_JSON_ENOMEM when Lua ran out of memory; the stack is unchanged. The encoder runs
 * protected (its C memory is always freed); only the stack check before it may raise. A table whose
 * metatable has a "__mp_plain" function is encoded as what that function returns (how scope roots
 * encode); it is called protected. Numbers are written in the shortest form that reads back to the
 * same double; integral ones without a fraction. `root` names the value in paths ("$" when NULL).
 * [-0, +0, m] */
int mph_json_encode(lua_State *L, int idx, const char *root, mph_buf_t *out, char *err,
                    size_t errlen);

#endif
