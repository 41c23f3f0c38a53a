/*
 * json.h: JSON text <-> jansson values, for every layer: the request reader (host/server/rpc.c),
 * the command-line client, the Lua mapping (lua/json.c) and the storage. No Lua here.
 *
 * Reading is mph_json_load, a one-pass parser that builds what json_loadb would (json.c says
 * why not json_loadb itself). Writing is ours too: jansson prints 0.1 as 0.10000000000000001
 * (always 17 digits), where we write the shortest text that reads back to the same double.
 */
#ifndef MPH_COMMON_JSON_H
#define MPH_COMMON_JSON_H

#include <jansson.h>
#include <stddef.h>

#include "common.h"

/* Loads a JSON text of any type: what json_loadb accepts with JSON_DECODE_ANY |
 * JSON_ALLOW_NUL, as the same tree, in a fraction of the time. Returns a new reference or
 * NULL with `error` filled (json_error_code(error) is jansson's for the same input). */
json_t *mph_json_load(const char *text, size_t len, json_error_t *error);

/* Returns 1 when s[0..len) is well-formed UTF-8 (no overlongs, no surrogates). */
int mph_utf8_valid(const char *s, size_t len);

/* Appends s as a JSON string literal. Returns 0, or MPH_EINVAL when s is not UTF-8. */
int mph_json_write_string(mph_buf_t *out, const char *s, size_t len);

/* Appends the shortest text that reads back to d (finite): integral values below 2^63
 * without a fraction ("2", not "2.0"), others with 15 to 17 significant digits. */
void mph_json_write_number(mph_buf_t *out, double d);

/* Appends the compact text of a jansson value (ids, the call client's output), numbers
 * written as mph_json_write_number writes them. Returns 0 or MPH_EIO. */
int mph_json_write_jansson(mph_buf_t *out, const json_t *v);

#endif
