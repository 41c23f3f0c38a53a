/*
 * fuzz_http: a byte stream through one HTTP connection (host/http.c) with the JSON-RPC layer
 * (host/rpc.c) behind it and the fake bridge of spec/unit/http_fixture.h. The first byte
 * chooses the chunk size the stream is cut into (0: one piece), the second how it is driven
 * (bit 0: deferred calls answer after every chunk, newest first; bit 1: a pipeline limit of
 * 2; bit 2: the client never sends EOF). What the server writes must be, whatever the input:
 *   - well-formed HTTP/1.1 responses, nothing after the last complete one, none after a
 *     "Connection: close";
 *   - statuses among 100, 200, 204, 400, 401, 405, 413, 431; 100 and 204 without a body;
 *   - a 200 body is JSON and a newline: a JSON-RPC response object or a non-empty array of
 *     them, with "jsonrpc":"2.0", an id, and exactly one of result and error (an integer
 *     code, a string message); so is a 401 body, but for being empty when every call
 *     refused was a notification, and every element of it is an error -32004;
 *   - results (the fake echoes the call's id and its dispatch number) carry the id of their
 *     call, and dispatch numbers only grow along the stream: responses in request order.
 * And no crash, no leak, every handle closed (fx_finish aborts otherwise).
 */
#define _GNU_SOURCE
#include "common/common.c"
#include "host/server/auth.c"
#include "host/server/http.c"
#include "host/server/localsock.c"
#include "common/map.c"
#include "host/server/metrics.c"
#include "host/server/rpc.c"
#include "lua/json.c"

#include "spec/unit/http_fixture.h"

static void fail(const char *why, const fx_response_t *resp)
{
    fprintf(stderr, "fuzz_http: %s (status %d, body %.*s)\n", why, resp ? resp->status : 0,
            resp && resp->body.data ? (int)resp->body.len : 0,
            resp && resp->body.data ? resp->body.data : "");
    abort();
}

/* Checks one JSON-RPC response object; *seq is the last dispatch number seen. refused: it
 * must be error -32004. */
static void check_rpc_object(const json_t *o, json_int_t *seq, const fx_response_t *resp,
                             int refused)
{
    if (!json_is_object(o))
        fail("a response element is not an object", resp);
    const json_t *v = json_object_get(o, "jsonrpc"), *id = json_object_get(o, "id");
    const json_t *result = json_object_get(o, "result"), *error = json_object_get(o, "error");
    if (!json_is_string(v) || strcmp(json_string_value(v), "2.0") != 0)
        fail("no \"jsonrpc\":\"2.0\"", resp);
    if (id == NULL || !(json_is_string(id) || json_is_number(id) || json_is_null(id)))
        fail("no valid id", resp);
    if ((result == NULL) == (error == NULL))
        fail("not exactly one of result and error", resp);
    if (refused && error == NULL)
        fail("a result in a 401", resp);
    if (error) {
        if (!json_is_integer(json_object_get(error, "code")) ||
            !json_is_string(json_object_get(error, "message")))
            fail("an error without an integer code and a string message", resp);
        if (refused && json_integer_value(json_object_get(error, "code")) != -32004)
            fail("a 401 for a call that was not refused", resp);
        return;
    }
    const json_t *s = json_object_get(result, "seq");
    if (!json_is_integer(s))
        fail("a result that is not the fake's", resp);
    if (json_integer_value(s) <= *seq)
        fail("responses out of request order", resp);
    *seq = json_integer_value(s);
    if (!json_equal(json_object_get(result, "id"), (json_t *)id))
        fail("a result under another call's id", resp);
}

static void check(const fx_responses_t *r)
{
    if (r->error)
        fail("the output is not well-formed HTTP", NULL);
    if (r->trailing)
        fail("bytes after the last complete response", NULL);
    json_int_t seq = 0;
    for (size_t i = 0; i < r->n; i++) {
        const fx_response_t *resp = &r->list[i];
        switch (resp->status) {
        case 100:
        case 204:
            if (resp->body.len)
                fail("a body on a 100 or 204", resp);
            break;
        case 400:
        case 405:
        case 413:
        case 431:
            break;
        case 401:
            if (resp->body.len == 0)
                break;
            /* fall through */
        case 200: {
            int refused = resp->status == 401;
            if (resp->body.len == 0 || resp->body.data[resp->body.len - 1] != '\n')
                fail("a body without its newline", resp);
            json_error_t err;
            json_t *doc = json_loadb(resp->body.data, resp->body.len, 0, &err);
            if (doc == NULL)
                fail("a body that is not JSON", resp);
            if (json_is_array(doc)) {
                if (json_array_size(doc) == 0)
                    fail("an empty batch response", resp);
                for (size_t k = 0; k < json_array_size(doc); k++)
                    check_rpc_object(json_array_get(doc, k), &seq, resp, refused);
            } else {
                check_rpc_object(doc, &seq, resp, refused);
            }
            json_decref(doc);
            break;
        }
        default:
            fail("an unexpected status", resp);
        }
        if (resp->close && i + 1 < r->n)
            fail("a response after Connection: close", &r->list[i + 1]);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    size_t chunk = data[0];
    int answer = data[1] & 1;
    mph_http_config_t cfg;
    mph_http_config_default(&cfg);
    cfg.max_body = 2048; /* small limits, so that the fuzzer reaches them */
    cfg.max_header = 512;
    cfg.max_pipeline = (data[1] & 2) ? 2 : 8;
    cfg.idle_timeout_ms = 3600 * 1000; /* never fires during a run */
    data += 2;
    size -= 2;
    if (chunk == 0)
        chunk = size ? size : 1;
    fx_t f;
    fx_open(&f, &cfg);
    for (size_t pos = 0; pos < size; pos += chunk)
        fx_feed(&f, data + pos, size - pos < chunk ? size - pos : chunk, answer);
    fx_finish(&f, !(data[-1] & 4));
    fx_responses_t r;
    fx_parse(&f.out, &r);
    check(&r);
    fx_responses_free(&r);
    mph_buf_free(&f.out);
    return 0;
}
