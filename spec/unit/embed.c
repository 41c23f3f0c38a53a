/*
 * Tests of the embedding API (host/mphost.h), through the public header only, linked with
 * libmphost as an embedding program is: a host on the caller's loop and its asynchronous
 * close (the loop then closes with 0), C functions called from Lua (argument and result
 * mapping, raised errors), in-process calls (results and every error an HTTP caller gets,
 * exact counts under conflicting concurrent increments from two hosts on one data directory,
 * the handler time limit), and no socket opened when nothing listens.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <ftw.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "mphost.h"

#include "spec/unit/scratch.h"
#include "spec/unit/unit.h"

/* ---- Helpers ---- */

/* One host on the caller's loop, with `script` loaded. */
typedef struct {
    uv_loop_t *loop;
    mph_host_t *host;
    char *data;  /* owned, unless shared with another host */
    int closed;  /* mph_host_close's callback ran (and freed the host) */
    int freeing; /* free the host in that callback */
} fixture_t;

static int host_open(fixture_t *f, uv_loop_t *loop, const char *data, const char *script,
                     unsigned timeout_ms,
                     int (*setup)(mph_host_t *h)) /* registers functions; may be NULL */
{
    mph_host_config_t *cfg;
    char err[512], timeout[32];
    snprintf(timeout, sizeof(timeout), "%u.%03u", timeout_ms / 1000, timeout_ms % 1000);
    mph_host_config_new(&cfg);
    mph_host_config_set_loop(cfg, loop);
    int rc = mph_host_config_set(cfg, "data", data, err, sizeof(err));
    if (rc == 0)
        rc = mph_host_config_set(cfg, "handler-timeout", timeout, err, sizeof(err));
    if (rc == 0)
        rc = mph_host_config_set(cfg, "shutdown-timeout", "5", err, sizeof(err));
    memset(f, 0, sizeof(*f));
    f->loop = loop;
    if (rc == 0)
        rc = mph_host_new(&f->host, cfg, err, sizeof(err));
    mph_host_config_free(cfg);
    if (rc != 0) {
        fprintf(stderr, "  mph_host_new: %s\n", err);
        return -1;
    }
    if ((setup && setup(f->host) != 0) ||
        mph_host_load_string(f->host, "embed-test.lua", script, err, sizeof(err)) != 0) {
        fprintf(stderr, "  load: %s\n", err);
        return -1;
    }
    return 0;
}

static void on_closed(mph_host_t *h, void *ud)
{
    fixture_t *f = ud;
    f->closed = 1;
    mph_host_free(h); /* allowed in the callback */
    f->host = NULL;
}

/* Closes the host, runs the loop until it has, and checks it left nothing on the loop. */
static void host_close(fixture_t *f)
{
    CHECK(mph_host_close(f->host, on_closed, f) == 0);
    CHECK(!f->closed); /* never before mph_host_close returns */
    uv_run(f->loop, UV_RUN_DEFAULT);
    CHECK(f->closed);
}

/* An in-process call's reply, kept. */
typedef struct {
    int done;
    int code;
    char *json;    /* owned; NULL: none */
    char *message; /* owned; NULL: none */
} reply_t;

static void on_reply(void *ud, const mph_host_reply_t *r)
{
    reply_t *out = ud;
    out->done++;
    out->code = r->code;
    out->json = r->json ? strndup(r->json, r->json_len) : NULL;
    out->message = r->message ? strdup(r->message) : NULL;
}

static void reply_free(reply_t *r)
{
    free(r->json);
    free(r->message);
    memset(r, 0, sizeof(*r));
}

/* Calls method with params on f's host, runs the loop until answered. */
static reply_t call(fixture_t *f, const char *method, const char *params, const char *user)
{
    reply_t r = {0};
    int rc =
        mph_host_call(f->host, method, params, params ? strlen(params) : 0, user, on_reply, &r);
    CHECK(rc == 0);
    CHECK(r.done == 0); /* never before mph_host_call returns */
    while (rc == 0 && !r.done && uv_run(f->loop, UV_RUN_ONCE))
        ;
    CHECK(r.done == 1);
    return r;
}

/* Whether the reply is the result `json` (compared as JSON values). */
static int is_result(const reply_t *r, const char *json)
{
    if (r->code != 0 || r->json == NULL) {
        fprintf(stderr, "  expected result %s, got code %d (%s)\n", json, r->code,
                r->message ? r->message : "");
        return 0;
    }
    json_t *a = json_loads(r->json, JSON_DECODE_ANY, NULL),
           *b = json_loads(json, JSON_DECODE_ANY, NULL);
    int same = a && b && json_equal(a, b);
    if (!same)
        fprintf(stderr, "  expected result %s, got %s\n", json, r->json);
    json_decref(a);
    json_decref(b);
    return same;
}

/* Whether the reply is error `code` whose message contains `part`. */
static int is_error(const reply_t *r, int code, const char *part)
{
    int ok = r->code == code && r->message && strstr(r->message, part);
    if (!ok)
        fprintf(stderr, "  expected error %d ~ \"%s\", got %d \"%s\" %s\n", code, part, r->code,
                r->message ? r->message : "(no message)", r->json ? r->json : "");
    return ok;
}

/* ---- The caller's loop ---- */

static const char counter_lua[] = "local mp = require('metaparticle')\n"
                                  "mp.service('incr', function(n)\n"
                                  "  local g = mp.scope.global\n"
                                  "  if mp.c.ran then mp.c.ran() end\n"
                                  "  g.count = (g.count or 0) + (n or 1)\n"
                                  "  return g.count\n"
                                  "end).expose = true\n"
                                  "mp.serve()\n";

typedef struct {
    uv_timer_t timer;
    int fired;
    fixture_t *f;
    reply_t reply;
} timer_ctx_t;

static void on_own_timer(uv_timer_t *t)
{
    timer_ctx_t *c = t->data;
    c->fired++;
    /* A call made from the caller's own callback. */
    CHECK(mph_host_call(c->f->host, "incr", "[5]", 3, NULL, on_reply, &c->reply) == 0);
    uv_close((uv_handle_t *)t, NULL);
}

/* The host lives on a loop that the test runs next to a timer of its own; it closes
 * asynchronously, after which the loop runs dry and closes with 0. */
static void test_callers_loop_and_close(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    char *data = scratch_dir("mph-embed");
    fixture_t f;
    CHECK(host_open(&f, &loop, data, counter_lua, 0, NULL) == 0);
    CHECK(mph_host_run(f.host) != 0); /* the caller runs its loop, never the host */
    timer_ctx_t c = {.f = &f};
    uv_timer_init(&loop, &c.timer);
    c.timer.data = &c;
    uv_timer_start(&c.timer, on_own_timer, 10, 0);
    /* The host alone does not keep the loop running: it returns once the timer's call is
     * answered. */
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(c.fired == 1);
    CHECK(c.reply.done == 1 && is_result(&c.reply, "5"));
    reply_free(&c.reply);
    reply_t r = call(&f, "incr", NULL, NULL);
    CHECK(is_result(&r, "6"));
    reply_free(&r);
    host_close(&f);
    CHECK(uv_loop_close(&loop) == 0);
    scratch_remove(data);
}

/* Closing while calls are in flight: each is answered before the close callback runs;
 * calls after the close began are refused without a callback; a second close is refused. */
static void test_close_answers_calls_in_flight(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    char *data = scratch_dir("mph-embed");
    fixture_t f;
    CHECK(host_open(&f, &loop, data, counter_lua, 0, NULL) == 0);
    reply_t r[20] = {{0}}, early = {0};
    for (int i = 0; i < 20; i++)
        CHECK(mph_host_call(f.host, "incr", NULL, 0, NULL, on_reply, &r[i]) == 0);
    /* answered at once, delivered on the next turn, still before the close callback */
    CHECK(mph_host_call(f.host, "nope", NULL, 0, NULL, on_reply, &early) == 0);
    CHECK(mph_host_close(f.host, on_closed, &f) == 0);
    CHECK(mph_host_close(f.host, on_closed, &f) != 0);
    reply_t late = {0};
    uv_run(&loop, UV_RUN_ONCE); /* the stop has begun */
    if (!f.closed)
        CHECK(mph_host_call(f.host, "incr", NULL, 0, NULL, on_reply, &late) != 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(f.closed && late.done == 0);
    CHECK(early.done == 1 && early.code == -32601);
    reply_free(&early);
    for (int i = 0; i < 20; i++) {
        CHECK(r[i].done == 1 && r[i].code == 0);
        reply_free(&r[i]);
    }
    CHECK(uv_loop_close(&loop) == 0);
    scratch_remove(data);
}

/* ---- C functions ---- */

static int calls_of_ran; /* c.ran(): attempts counted (a test of re-runs, not idempotent) */

/* c.echo(...) -> its arguments' JSON array as it came */
static int fn_echo(void *ud, const char *args, size_t len, char **result)
{
    (void)ud;
    CHECK(args[len] == '\0');
    *result = strndup(args, len);
    return 0;
}

/* c.fail(msg) -> raises msg (or the default message when called without one) */
static int fn_fail(void *ud, const char *args, size_t len, char **result)
{
    json_t *a = json_loadb(args, len, 0, NULL);
    const char *msg = json_string_value(json_array_get(a, 0));
    *result = msg ? strdup(msg) : NULL;
    json_decref(a);
    return 1;
}

/* c.bad() -> a result that is not JSON */
static int fn_bad(void *ud, const char *args, size_t len, char **result)
{
    *result = strdup("{not json");
    return 0;
}

/* c.data() -> a fixed value, of every JSON type */
static int fn_data(void *ud, const char *args, size_t len, char **result)
{
    *result = strdup("{\"n\":2.5,\"list\":[1,2,3],\"none\":null,\"yes\":true,\"s\":\"\\u00e9\"}");
    return 0;
}

static int fn_ran(void *ud, const char *args, size_t len, char **result)
{
    (*(int *)ud)++;
    *result = NULL; /* null */
    return 0;
}

static int register_all(mph_host_t *h)
{
    return mph_host_register_function(h, "echo", fn_echo, NULL) ||
           mph_host_register_function(h, "fail", fn_fail, NULL) ||
           mph_host_register_function(h, "bad", fn_bad, NULL) ||
           mph_host_register_function(h, "data", fn_data, NULL) ||
           mph_host_register_function(h, "ran", fn_ran, &calls_of_ran);
}

static const char functions_lua[] =
    "local mp = require('metaparticle')\n"
    "local c = mp.c\n"
    "local function svc(name, fn) mp.service(name, fn).expose = true end\n"
    "svc('echo', function() return c.echo(1, 'a', nil, {x = true}, mp.array(), {1, 2}, 2^53) end)\n"
    "svc('types', function()\n"
    "  local d = c.data()\n"
    "  return {n = d.n, len = #d.list, none = d.none == mp.null, yes = d.yes, s = d.s,\n"
    "          nothing = c.ran() == mp.null}\n"
    "end)\n"
    "svc('fail', function(msg) return c.fail(msg) end)\n"
    "svc('caught', function() local ok, e = pcall(c.fail, 'oops'); return {ok, e} end)\n"
    "svc('bad', function() return c.bad() end)\n"
    "svc('unencodable', function() return c.echo(function() end) end)\n"
    "svc('missing', function() return c.nope() end)\n"
    "mp.serve()\n";

static void test_c_functions(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    char *data = scratch_dir("mph-embed");
    fixture_t f;
    CHECK(host_open(&f, &loop, data, functions_lua, 0, register_all) == 0);
    /* names: taken, empty */
    CHECK(mph_host_register_function(f.host, "echo", fn_echo, NULL) != 0);
    CHECK(mph_host_register_function(f.host, "", fn_echo, NULL) != 0);

    reply_t r = call(&f, "echo", NULL, NULL);
    CHECK(is_result(&r, "[1,\"a\",null,{\"x\":true},[],[1,2],9007199254740992]"));
    reply_free(&r);
    r = call(&f, "types", NULL, NULL);
    CHECK(is_result(&r, "{\"n\":2.5,\"len\":3,\"none\":true,\"yes\":true,\"s\":\"\\u00e9\","
                        "\"nothing\":true}"));
    reply_free(&r);
    r = call(&f, "fail", "[\"disk on fire\"]", NULL);
    CHECK(is_error(&r, -32000, "disk on fire"));
    reply_free(&r);
    r = call(&f, "fail", NULL, NULL);
    CHECK(is_error(&r, -32000, "fail failed"));
    reply_free(&r);
    r = call(&f, "caught", NULL, NULL);
    CHECK(is_result(&r, "[false,\"oops\"]"));
    reply_free(&r);
    r = call(&f, "bad", NULL, NULL);
    CHECK(is_error(&r, -32000, "c.bad returned invalid JSON"));
    reply_free(&r);
    r = call(&f, "unencodable", NULL, NULL);
    CHECK(is_error(&r, -32000, "cannot encode a function at c.echo(...)[1]"));
    reply_free(&r);
    r = call(&f, "missing", NULL, NULL);
    CHECK(is_error(&r, -32000, "nope"));
    reply_free(&r);
    /* the host is still up */
    r = call(&f, "echo", NULL, NULL);
    CHECK(r.code == 0);
    reply_free(&r);
    host_close(&f);
    CHECK(uv_loop_close(&loop) == 0);
    scratch_remove(data);
}

/* ---- In-process calls ---- */

static const char calls_lua[] =
    "local mp = require('metaparticle')\n"
    "local function svc(name, fn) mp.service(name, fn).expose = true end\n"
    "svc('add', function(a, b) return a + b end)\n"
    "svc('obj', function(p) return p.k end)\n"
    "svc('raise', function() error('went wrong') end)\n"
    "svc('coded', function() mp.error(-32099, 'custom', {why = 'because'}) end)\n"
    "svc('spin', function() while true do end end)\n"
    "svc('whoami', mp.basicAuth(function() return mp.user end))\n"
    "mp.service('hidden', function() return 1 end)\n"
    "mp.serve()\n";

static void test_call_results_and_errors(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    char *data = scratch_dir("mph-embed");
    fixture_t f;
    CHECK(host_open(&f, &loop, data, calls_lua, 300, NULL) == 0);
    struct {
        const char *method, *params, *user;
        int code;
        const char *expect; /* the result, or a part of the error's message */
    } cases[] = {
        {"add", "[2, 3]", NULL, 0, "5"},
        {"obj", "{\"k\": \"v\"}", NULL, 0, "\"v\""},
        {"nope", NULL, NULL, -32601, "Method not found"},
        {"hidden", NULL, NULL, -32601, "Method not found"},
        {"add", "[2,", NULL, -32700, "Parse error"},
        {"add", "3", NULL, -32602, "params must be an array or an object"},
        {"add", "[99999999999999999999999]", NULL, -32602, "Invalid params"},
        {"raise", NULL, NULL, -32000, "went wrong"},
        {"coded", NULL, NULL, -32099, "custom"},
        {"whoami", NULL, NULL, -32004, "unauthorized"},
        {"whoami", NULL, "alice", 0, "\"alice\""},
        {"spin", NULL, NULL, -32003, "timed out"},
        {"add", "[20, 22]", NULL, 0, "42"}, /* still up after the time limit */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        reply_t r = call(&f, cases[i].method, cases[i].params, cases[i].user);
        if (cases[i].code == 0)
            CHECK(is_result(&r, cases[i].expect));
        else
            CHECK(is_error(&r, cases[i].code, cases[i].expect));
        if (cases[i].code == -32099)
            CHECK(r.json && strcmp(r.json, "{\"why\":\"because\"}") == 0);
        reply_free(&r);
    }
    reply_t none = {0};
    CHECK(mph_host_call(f.host, NULL, NULL, 0, NULL, on_reply, &none) != 0);
    CHECK(mph_host_call(f.host, "add", NULL, 0, NULL, NULL, NULL) != 0);
    host_close(&f);
    CHECK(none.done == 0);
    CHECK(uv_loop_close(&loop) == 0);
    scratch_remove(data);
}

/* Chains of increments on two hosts sharing one data directory: their commits conflict, the
 * losers run again, and the count is exact. */
typedef struct {
    fixture_t *f;
    int left;      /* calls still to make on this chain */
    int *seen;     /* results, counted by value */
    int total;     /* size of seen */
    int *answered; /* calls answered, all chains */
    int *bad;      /* calls that failed */
} chain_t;

static void chain_next(chain_t *c);

static void on_chain_reply(void *ud, const mph_host_reply_t *r)
{
    chain_t *c = ud;
    (*c->answered)++;
    long v = r->code == 0 && r->json ? strtol(r->json, NULL, 10) : 0;
    if (v >= 1 && v <= c->total)
        c->seen[v - 1]++;
    else
        (*c->bad)++;
    chain_next(c);
}

static void chain_next(chain_t *c)
{
    if (c->left-- > 0)
        CHECK(mph_host_call(c->f->host, "incr", NULL, 0, NULL, on_chain_reply, c) == 0);
}

static void test_concurrent_increments_are_exact(void)
{
    enum { CHAINS = 4, PER_CHAIN = 25, TOTAL = 2 * CHAINS * PER_CHAIN };
    uv_loop_t loop;
    uv_loop_init(&loop);
    char *data = scratch_dir("mph-embed");
    fixture_t a, b;
    calls_of_ran = 0;
    CHECK(host_open(&a, &loop, data, counter_lua, 0, register_all) == 0);
    CHECK(host_open(&b, &loop, data, counter_lua, 0, register_all) == 0);
    int seen[TOTAL] = {0}, answered = 0, bad = 0;
    chain_t chains[2 * CHAINS];
    for (int i = 0; i < 2 * CHAINS; i++) {
        chains[i] = (chain_t){i % 2 ? &b : &a, PER_CHAIN, seen, TOTAL, &answered, &bad};
        chain_next(&chains[i]);
    }
    uv_run(&loop, UV_RUN_DEFAULT); /* until every chain is done */
    CHECK(answered == TOTAL && bad == 0);
    int distinct = 1;
    for (int i = 0; i < TOTAL; i++)
        distinct &= seen[i] == 1;
    CHECK(distinct); /* every count from 1 to TOTAL, once */
    /* The handlers ran more often than there were calls: conflicting commits re-ran them. */
    fprintf(stderr, "  %d calls, %d handler runs\n", TOTAL, calls_of_ran);
    CHECK(calls_of_ran > TOTAL);
    /* One more write on each host sees every commit of the other (a read alone might not:
     * README, "Guarantees"). */
    reply_t r = call(&a, "incr", NULL, NULL);
    CHECK(r.code == 0 && r.json && atoi(r.json) == TOTAL + 1);
    reply_free(&r);
    r = call(&b, "incr", NULL, NULL);
    CHECK(r.code == 0 && r.json && atoi(r.json) == TOTAL + 2);
    reply_free(&r);
    host_close(&a);
    host_close(&b);
    CHECK(uv_loop_close(&loop) == 0);
    scratch_remove(data);
}

/* Whether this process has any TCP socket: its descriptors' socket inodes, looked up in
 * /proc/net/tcp and tcp6. */
static int has_tcp_socket(void)
{
    char inodes[4096] = " ";
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    while (d && (e = readdir(d))) {
        char path[300], target[64];
        snprintf(path, sizeof(path), "/proc/self/fd/%s", e->d_name);
        ssize_t n = readlink(path, target, sizeof(target) - 1);
        unsigned long ino;
        if (n > 0 && (target[n] = '\0', sscanf(target, "socket:[%lu]", &ino) == 1))
            snprintf(inodes + strlen(inodes), sizeof(inodes) - strlen(inodes), "%lu ", ino);
    }
    if (d)
        closedir(d);
    int found = 0;
    const char *tables[] = {"/proc/net/tcp", "/proc/net/tcp6"};
    for (int t = 0; t < 2 && !found; t++) {
        FILE *fp = fopen(tables[t], "r");
        char line[512];
        while (fp && !found && fgets(line, sizeof(line), fp)) {
            unsigned long ino;
            char key[32];
            /* sl local rem st tx:rx tr:when retrnsmt uid timeout inode */
            if (sscanf(line, "%*s %*s %*s %*s %*s %*s %*s %*s %*s %lu", &ino) == 1) {
                snprintf(key, sizeof(key), " %lu ", ino);
                found = strstr(inodes, key) != NULL;
            }
        }
        if (fp)
            fclose(fp);
    }
    return found;
}

static void test_no_listener_no_socket(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    char *data = scratch_dir("mph-embed");
    fixture_t f;
    CHECK(!has_tcp_socket());
    CHECK(host_open(&f, &loop, data, counter_lua, 0, NULL) == 0);
    reply_t r = call(&f, "incr", NULL, NULL);
    CHECK(is_result(&r, "1"));
    reply_free(&r);
    CHECK(!has_tcp_socket()); /* served without HTTP: nothing bound, nothing connected */
    host_close(&f);
    CHECK(uv_loop_close(&loop) == 0);
    scratch_remove(data);
}

/* The host's own loop: mph_host_close works there too, its callback running inside
 * mph_host_run. */
static void on_own_closed(mph_host_t *h, void *ud)
{
    (*(int *)ud)++;
}

static void on_own_reply(void *ud, const mph_host_reply_t *r)
{
    void **p = ud;
    ((reply_t *)p[1])->done++;
    ((reply_t *)p[1])->code = r->code;
    CHECK(mph_host_close(p[0], on_own_closed, p[2]) == 0); /* from inside a reply */
}

static void test_own_loop_close_from_a_reply(void)
{
    char *data = scratch_dir("mph-embed");
    mph_host_config_t *cfg;
    mph_host_t *h;
    char err[256];
    mph_host_config_new(&cfg);
    CHECK(mph_host_config_set(cfg, "data", data, err, sizeof(err)) == 0);
    CHECK(mph_host_new(&h, cfg, err, sizeof(err)) == 0);
    mph_host_config_free(cfg);
    CHECK(mph_host_load_string(h, "t.lua", counter_lua, err, sizeof(err)) == 0);
    int closed = 0;
    reply_t r = {0};
    void *ctx[3] = {h, &r, &closed};
    CHECK(mph_host_call(h, "incr", NULL, 0, NULL, on_own_reply, ctx) == 0);
    CHECK(mph_host_run(h) == 0); /* returns once closed */
    CHECK(r.done == 1 && r.code == 0 && closed == 1);
    mph_host_free(h);
    scratch_remove(data);
}

/* A host that fails to start on the caller's loop leaves only closing handles there: the
 * loop runs dry and closes. */
static void test_failed_new_on_callers_loop(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    char *data = scratch_dir("mph-embed");
    mph_host_config_t *cfg;
    mph_host_t *h = NULL;
    char err[256] = "";
    mph_host_config_new(&cfg);
    mph_host_config_set_loop(cfg, &loop);
    CHECK(mph_host_config_set(cfg, "data", data, err, sizeof(err)) == 0);
    /* fails after the store has opened: */
    CHECK(mph_host_config_set(cfg, "users", "/nonexistent/users", err, sizeof(err)) == 0);
    CHECK(mph_host_new(&h, cfg, err, sizeof(err)) != 0);
    mph_host_config_free(cfg);
    CHECK(strstr(err, "/nonexistent/users") != NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&loop) == 0);
    scratch_remove(data);
}

/* The opaque configuration: options by the command line's names and value forms, refused
 * with a message when unknown or out of range; the host keeps its own copy of the strings,
 * so the caller's buffer and config may go at once. */
static void test_config_by_name(void)
{
    mph_host_config_t *cfg;
    char err[256] = "";
    CHECK(mph_host_config_new(&cfg) == 0);
    CHECK(mph_host_config_set(cfg, "no-such-option", "1", err, sizeof(err)) != 0);
    CHECK(strstr(err, "unknown option --no-such-option") != NULL);
    CHECK(mph_host_config_set(cfg, "port", "65536", err, sizeof(err)) != 0);
    CHECK(strstr(err, "invalid --port: 65536 (expected 0 to 65535)") != NULL);
    CHECK(mph_host_config_set(cfg, "idle-timeout", "1e3", err, sizeof(err)) != 0);
    CHECK(mph_host_config_set(cfg, "scope-cache", "64M", err, sizeof(err)) == 0);
    char *data = scratch_dir("mph-embed");
    char buf[4096];
    snprintf(buf, sizeof(buf), "%s", data);
    CHECK(mph_host_config_set(cfg, "data", buf, err, sizeof(err)) == 0);
    memset(buf, 'x', sizeof(buf) - 1); /* the config copied it */
    CHECK(mph_host_config_set(cfg, "port", "0", err, sizeof(err)) == 0);
    CHECK(mph_host_config_set(cfg, "listen", "127.0.0.1", err, sizeof(err)) == 0);
    mph_host_t *h = NULL;
    CHECK(mph_host_new(&h, cfg, err, sizeof(err)) == 0);
    mph_host_config_free(cfg); /* the host copied it */
    CHECK(h && mph_host_load_string(h, "t.lua", counter_lua, err, sizeof(err)) == 0);
    CHECK(h && mph_host_listen(h, err, sizeof(err)) == 0);
    CHECK(h && mph_host_port(h) > 0); /* port 0 picked a free one on 127.0.0.1 */
    if (h)
        mph_host_free(h);
    scratch_remove(data);
}

static const mph_unit_test_t tests[] = {
    {"config_by_name", test_config_by_name},
    {"failed_new_on_callers_loop", test_failed_new_on_callers_loop},
    {"callers_loop_and_close", test_callers_loop_and_close},
    {"close_answers_calls_in_flight", test_close_answers_calls_in_flight},
    {"c_functions", test_c_functions},
    {"call_results_and_errors", test_call_results_and_errors},
    {"concurrent_increments_are_exact", test_concurrent_increments_are_exact},
    {"no_listener_no_socket", test_no_listener_no_socket},
    {"own_loop_close_from_a_reply", test_own_loop_close_from_a_reply},
};

MPH_UNIT_MAIN(tests)
