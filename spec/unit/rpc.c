/*
 * Unit tests of host/rpc.c: request validation (every -32600 case), ids of each type,
 * notifications, batches, parse errors and numeric overflow, answered in order whatever the
 * order in which the calls complete. Requests go through host/http.c to a fake bridge
 * (spec/unit/http_fixture.h); each case is one request body and the exact response.
 */
#define _GNU_SOURCE
#include "common/common.c"
#include "host/server/accesslog.c"
#include "host/server/auth.c"
#include "host/server/http.c"
#include "host/server/localsock.c"
#include "common/map.c"
#include "host/server/metrics.c"
#include "host/server/rpc.c"
#include "lua/json.c"
#include "common/json.c"

#include "spec/unit/unit.h"

#include "spec/unit/http_fixture.h"

typedef struct {
    const char *request; /* the body */
    int status;          /* 200, 204 or 401 */
    const char *answer;  /* the exact response body, without its newline; or a prefix if it
                            ends with '*' */
} rpc_case_t;

#define R "{\"jsonrpc\":\"2.0\","
#define UNAUTHORIZED(id)                                                                           \
    "{\"jsonrpc\":\"2.0\",\"id\":" id ",\"error\":{\"code\":-32004,\"message\":\"unauthorized\"}}"
#define INVALID(id, why)                                                                           \
    "{\"jsonrpc\":\"2.0\",\"id\":" id ",\"error\":{\"code\":-32600,\"message\":" why "}}"

static const rpc_case_t cases[] = {
    /* ids of each type come back as they were; a result carries the fake's echo */
    {R "\"method\":\"sync\",\"id\":1}", 200,
     R "\"id\":1,\"result\":{\"seq\":1,\"id\":1,\"params\":null}}"},
    {R "\"method\":\"sync\",\"id\":\"a\"}", 200,
     R "\"id\":\"a\",\"result\":{\"seq\":1,\"id\":\"a\",\"params\":null}}"},
    {R "\"method\":\"sync\",\"id\":null}", 200,
     R "\"id\":null,\"result\":{\"seq\":1,\"id\":null,\"params\":null}}"},
    {R "\"method\":\"sync\",\"id\":-2.5}", 200, R "\"id\":-2.5,*"},
    {R "\"method\":\"sync\",\"id\":9007199254740993}", 200, R "\"id\":9007199254740993,*"},
    {R "\"method\":\"echo\",\"params\":{\"a\":[1]},\"id\":3}", 200,
     R "\"id\":3,\"result\":{\"seq\":1,\"id\":3,\"params\":{\"a\":[1]}}}"},
    /* invalid requests: answered with the id when it is usable, else null */
    {R "\"method\":\"sync\",\"id\":true}", 200,
     INVALID("null", "\"Invalid Request: id must be a string, number or null\"")},
    {R "\"method\":\"sync\",\"id\":[1]}", 200,
     INVALID("null", "\"Invalid Request: id must be a string, number or null\"")},
    {R "\"method\":\"sync\",\"id\":{}}", 200,
     INVALID("null", "\"Invalid Request: id must be a string, number or null\"")},
    {"{\"method\":\"sync\",\"id\":4}", 200,
     INVALID("4", "\"Invalid Request: jsonrpc must be \\\"2.0\\\"\"")},
    {"{\"jsonrpc\":\"1.0\",\"method\":\"sync\",\"id\":4}", 200,
     INVALID("4", "\"Invalid Request: jsonrpc must be \\\"2.0\\\"\"")},
    {"{\"jsonrpc\":2.0,\"method\":\"sync\",\"id\":4}", 200,
     INVALID("4", "\"Invalid Request: jsonrpc must be \\\"2.0\\\"\"")},
    {R "\"id\":5}", 200, INVALID("5", "\"Invalid Request: method must be a string\"")},
    {R "\"method\":1,\"id\":5}", 200, INVALID("5", "\"Invalid Request: method must be a string\"")},
    {R "\"method\":1}", 200, INVALID("null", "\"Invalid Request: method must be a string\"")},
    {"1", 200, INVALID("null", "\"Invalid Request\"")},
    {"\"x\"", 200, INVALID("null", "\"Invalid Request\"")},
    {"null", 200, INVALID("null", "\"Invalid Request\"")},
    {"[]", 200, INVALID("null", "\"Invalid Request: empty batch\"")},
    /* params */
    {R "\"method\":\"sync\",\"params\":3,\"id\":6}", 200,
     R "\"id\":6,\"error\":{\"code\":-32602,\"message\":\"Invalid params: params must be an array "
       "or an object\"}}"},
    {R "\"method\":\"sync\",\"params\":\"x\"}", 204, ""}, /* a notification is never answered */
    /* notifications, methods, handler errors */
    {R "\"method\":\"echo\"}", 204, ""},
    {R "\"method\":\"nope\"}", 204, ""},
    {R "\"method\":\"nope\",\"id\":7}", 200,
     R "\"id\":7,\"error\":{\"code\":-32601,\"message\":\"Method not found\"}}"},
    {R "\"method\":\"fail\",\"id\":7}", 200,
     R "\"id\":7,\"error\":{\"code\":-32000,\"message\":\"boom\"}}"},
    /* batches: answered in order although "echo" completes after "sync"; notifications
     * leave no element; an all-notification batch is 204 */
    {"[" R "\"method\":\"echo\",\"id\":1}," R "\"method\":\"sync\",\"id\":2}]", 200,
     "[" R "\"id\":1,\"result\":{\"seq\":1,\"id\":1,\"params\":null}}," R
     "\"id\":2,\"result\":{\"seq\":2,\"id\":2,\"params\":null}}]"},
    {"[1," R "\"method\":\"echo\"}," R "\"method\":\"nope\",\"id\":\"n\"}]", 200,
     "[" INVALID("null", "\"Invalid Request\"") "," R "\"id\":\"n\",\"error\":{\"code\":-32601,"
                                                "\"message\":\"Method not found\"}}]"},
    {"[" R "\"method\":\"echo\"}," R "\"method\":\"sync\"}]", 204, ""},
    {"[[]]", 200, "[" INVALID("null", "\"Invalid Request\"") "]"},
    /* parse errors and numbers out of range */
    {"{\"jsonrpc\"", 200, R "\"id\":null,\"error\":{\"code\":-32700,\"message\":\"Parse error: *"},
    {"", 200, R "\"id\":null,\"error\":{\"code\":-32700,*"},
    {"{} {}", 200, R "\"id\":null,\"error\":{\"code\":-32700,*"},
    {"\"\xff\"", 200, R "\"id\":null,\"error\":{\"code\":-32700,*"},
    {R "\"method\":\"sync\",\"params\":[1e999],\"id\":1}", 200,
     R "\"id\":null,\"error\":{\"code\":-32602,*"},
    /* a service behind mp.basicAuth, without credentials: 401 when every call is refused,
     * 200 with each answer when a batch mixes it with other calls */
    {R "\"method\":\"priv\",\"id\":1}", 401, UNAUTHORIZED("1")},
    {"[" R "\"method\":\"priv\",\"id\":1}," R "\"method\":\"priv\",\"id\":2}]", 401,
     "[" UNAUTHORIZED("1") "," UNAUTHORIZED("2") "]"},
    {"[" R "\"method\":\"priv\",\"id\":1}," R "\"method\":\"sync\",\"id\":2}]", 200,
     "[" UNAUTHORIZED("1") "," R "\"id\":2,\"result\":{\"seq\":1,\"id\":2,\"params\":null}}]"},
    {"[" R "\"method\":\"priv\",\"id\":1}," R "\"method\":\"nope\",\"id\":2}]", 200,
     "[" UNAUTHORIZED("1") "," R "\"id\":2,\"error\":{\"code\":-32601,*"},
    {R "\"method\":\"priv\"}", 401, ""}, /* a notification: refused, not answered */
    {"[" R "\"method\":\"priv\"}," R "\"method\":\"sync\"}]", 204, ""},
};

static void test_cases(void)
{
    mph_http_config_t cfg;
    mph_http_config_default(&cfg);
    cfg.idle_timeout_ms = 3600 * 1000;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const rpc_case_t *c = &cases[i];
        mph_buf_t in = MPH_BUF_INIT;
        mph_buf_printf(&in, "POST / HTTP/1.1\r\nContent-Length: %zu\r\n\r\n%s", strlen(c->request),
                       c->request);
        fx_t f;
        fx_open(&f, &cfg);
        fx_feed(&f, in.data, in.len, 1);
        fx_finish(&f, 1);
        fx_responses_t r;
        fx_parse(&f.out, &r);
        size_t want = strlen(c->answer);
        int prefix = want > 0 && c->answer[want - 1] == '*';
        const mph_buf_t *got = r.n == 1 ? &r.list[0].body : NULL;
        int ok = got && r.list[0].status == c->status && !r.error && r.trailing == 0;
        if (ok && want == 0)
            ok = got->len == 0;
        else if (ok && prefix)
            ok = got->len >= want - 1 && memcmp(got->data, c->answer, want - 1) == 0;
        else if (ok)
            ok = got->len == want + 1 && memcmp(got->data, c->answer, want) == 0 &&
                 got->data[want] == '\n';
        if (!ok) {
            fprintf(stderr, "  case %zu: %s\n    expected %d %s\n    got %d %.*s\n", i, c->request,
                    c->status, c->answer, got ? r.list[0].status : 0, got ? (int)got->len : 0,
                    got && got->data ? got->data : "");
            failures_in_test++;
        }
        fx_responses_free(&r);
        mph_buf_free(&f.out);
        mph_buf_free(&in);
    }
}

static const mph_unit_test_t tests[] = {
    {"cases", test_cases},
};

MPH_UNIT_MAIN(tests)
