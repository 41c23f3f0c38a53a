/*
 * fuzz_json_parse: mph_json_load (common/json.c) against jansson's own parser.
 *
 * Property, for every input: json_loadb(JSON_DECODE_ANY | JSON_ALLOW_NUL) and mph_json_load
 * (but for a NUL byte right after a number or a literal, which only jansson lets through) both
 * refuse it, with the same error code when either says numeric overflow (rpc.c answers that -32602,
 * anything else -32700), or both accept it and build equal values (json_equal: the same types,
 * integers and reals apart, the same bytes in strings, the same keys). Any violation aborts.
 */
#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>

#include "lua/json.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_error_t theirs_err, mine_err;
    json_t *theirs =
        json_loadb((const char *)data, size, JSON_DECODE_ANY | JSON_ALLOW_NUL, &theirs_err);
    json_t *mine = mph_json_load((const char *)data, size, &mine_err);
    size_t at = (size_t)mine_err.position;
    if (!mine && at > 0 && at < size && data[at] == 0 &&
        ((data[at - 1] >= '0' && data[at - 1] <= '9') ||
         (data[at - 1] >= 'a' && data[at - 1] <= 'z'))) {
        /* The one place we differ: jansson skips a NUL byte right after a number or a
         * literal ("5\0" loads as 5, and what follows decides); it is no JSON, and we refuse
         * it there. */
        json_decref(theirs);
        return 0;
    }
    if ((theirs == NULL) != (mine == NULL))
        abort();
    if (theirs == NULL) {
        int overflow_theirs = json_error_code(&theirs_err) == json_error_numeric_overflow;
        int overflow_mine = json_error_code(&mine_err) == json_error_numeric_overflow;
        if (overflow_theirs != overflow_mine)
            abort();
        return 0;
    }
    if (!json_equal(theirs, mine))
        abort();
    json_decref(theirs);
    json_decref(mine);
    return 0;
}
