/*
 * Unit tests of host/http.c with host/rpc.c behind it and a fake bridge (http_fixture.h):
 * pipelining and order, framing errors and limits, chunked bodies, Expect: 100-continue,
 * HTTP/1.0 keep-alive, the pipeline limit, and input cut into every possible chunk size.
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

static mph_http_config_t config(void)
{
    mph_http_config_t cfg;
    mph_http_config_default(&cfg);
    cfg.max_body = 1000;
    cfg.max_header = 512;
    cfg.idle_timeout_ms = 3600 * 1000; /* never fires during a test */
    return cfg;
}

/* Runs `input` through a fresh connection in chunks of `chunk` bytes (0: at once), letting
 * deferred calls answer after each chunk when `answer`, then EOF. Fills r. */
static void exchange_chunked(const mph_http_config_t *cfg, const char *input, size_t chunk,
                             int answer, fx_responses_t *r)
{
    fx_t f;
    fx_open(&f, cfg);
    size_t len = strlen(input);
    if (chunk == 0)
        chunk = len ? len : 1;
    for (size_t pos = 0; pos < len; pos += chunk)
        fx_feed(&f, input + pos, len - pos < chunk ? len - pos : chunk, answer);
    fx_finish(&f, 1);
    fx_parse(&f.out, r);
    mph_buf_free(&f.out);
}

static void exchange(const char *input, fx_responses_t *r)
{
    mph_http_config_t cfg = config();
    exchange_chunked(&cfg, input, 0, 0, r);
}

static int body_has(const fx_response_t *resp, const char *text)
{
    return resp->body.data && strstr(resp->body.data, text) != NULL;
}

#define POST(body) "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " #body "\r\n\r\n"

static const char echo1[] = "{\"jsonrpc\":\"2.0\",\"method\":\"echo\",\"params\":[1],\"id\":1}";

static char *post(const char *body, const char *extra)
{
    mph_buf_t b = MPH_BUF_INIT;
    mph_buf_printf(&b, "POST / HTTP/1.1\r\nHost: x\r\n%sContent-Length: %zu\r\n\r\n%s", extra,
                   strlen(body), body);
    return mph_buf_steal(&b, NULL);
}

static void test_pipelined_answers_come_in_request_order(void)
{
    /* Deferred calls answer newest first; the responses must still leave in order. */
    mph_buf_t in = MPH_BUF_INIT;
    for (int i = 0; i < 5; i++) {
        char body[128], *req;
        snprintf(body, sizeof(body), "{\"jsonrpc\":\"2.0\",\"method\":\"%s\",\"id\":%d}",
                 i % 2 ? "sync" : "echo", i);
        req = post(body, "");
        mph_buf_puts(&in, req);
        free(req);
    }
    fx_responses_t r;
    exchange(in.data, &r);
    CHECK(!r.error && r.trailing == 0);
    CHECK(r.n == 5);
    for (size_t i = 0; i < r.n; i++) {
        char want[64];
        snprintf(want, sizeof(want), "\"id\":%zu,\"result\"", i);
        CHECK(r.list[i].status == 200 && body_has(&r.list[i], want));
    }
    fx_responses_free(&r);
    mph_buf_free(&in);
}

/* The final responses of r (interim 100s left out): at most `cap`; returns how many. */
static size_t final_responses(const fx_responses_t *r, const fx_response_t **out, size_t cap)
{
    size_t n = 0;
    for (size_t i = 0; i < r->n; i++)
        if (r->list[i].status != 100 && n < cap)
            out[n++] = &r->list[i];
    return n;
}

static int buf_is(const mph_buf_t *b, const char *text)
{
    return b->len == strlen(text) && (b->len == 0 || memcmp(b->data, text, b->len) == 0);
}

static int same_buf(const mph_buf_t *a, const mph_buf_t *b)
{
    return a->len == b->len && (a->len == 0 || memcmp(a->data, b->data, a->len) == 0);
}

/* Feeds `in` cut into pieces of `chunk` bytes (answering as it goes when `answer`) and says
 * whether the final responses are the na of fa, in number, heads and bodies, with at most
 * one interim 100 before the last (it may or may not be owed, depending on when the earlier
 * responses left). The first few differences are shown (*mismatches counts them). */
static int same_when_cut(const mph_buf_t *in, const mph_http_config_t *cfg, size_t chunk,
                         int answer, const fx_response_t **fa, size_t na, int *mismatches)
{
    fx_t g;
    fx_open(&g, cfg);
    for (size_t pos = 0; pos < in->len; pos += chunk)
        fx_feed(&g, in->data + pos, in->len - pos < chunk ? in->len - pos : chunk, answer);
    fx_finish(&g, 1);
    fx_responses_t b;
    const fx_response_t *fb[8];
    fx_parse(&g.out, &b);
    size_t nb = final_responses(&b, fb, 8);
    int same = !b.error && b.trailing == 0 && nb == na && b.n <= na + 1;
    for (size_t i = 0; same && i < na; i++)
        same = fb[i]->status == fa[i]->status && same_buf(&fb[i]->head, &fa[i]->head) &&
               same_buf(&fb[i]->body, &fa[i]->body);
    for (size_t i = 0; same && i + 1 < b.n; i++)
        same = b.list[i].status != 100 || i + 1 == b.n - 1;
    if (!same && (*mismatches)++ < 3)
        fprintf(stderr, "  chunks of %zu (answer %d): %zu responses (%zu final), got:\n%.*s\n",
                chunk, answer, b.n, nb, (int)g.out.len, g.out.data);
    fx_responses_free(&b);
    mph_buf_free(&g.out);
    return same;
}

static void test_every_chunk_size_gives_the_same_bytes(void)
{
    /* A call, a chunked one, an HTTP/1.0 keep-alive one, a batch behind Expect: 100-continue,
     * fed at once and then cut into every chunk size from 1 to 39 bytes. */
    char *one = post(echo1, ""), *two = post("[{\"jsonrpc\":\"2.0\",\"method\":\"echo\",\"id\":"
                                             "\"a\"},{\"jsonrpc\":\"2.0\",\"method\":\"x\"}]",
                                             "Expect: 100-continue\r\n");
    mph_buf_t in = MPH_BUF_INIT;
    mph_buf_puts(&in, one);
    mph_buf_puts(&in, "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"jso\r\n"
                      "2c\r\nnrpc\":\"2.0\",\"method\":\"sync\",\"id\":null,\"p\":1}\r\n0\r\n\r\n");
    mph_buf_puts(&in, "POST / HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 40\r\n\r\n"
                      "{\"jsonrpc\":\"2.0\",\"method\":\"sync\",\"id\":3}");
    mph_buf_puts(&in, two);
    mph_http_config_t cfg = config();
    fx_t f;
    fx_open(&f, &cfg);
    fx_feed(&f, in.data, in.len, 1);
    fx_finish(&f, 1);
    /* What the whole input at once must give, byte for byte ("seq" is each call's dispatch
     * order; a body ends with a newline). */
    static const struct {
        const char *head, *body;
    } want[] = {
        {"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n",
         "{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"seq\":1,\"id\":1,\"params\":[1]}}\n"},
        {"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 71\r\n\r\n",
         "{\"jsonrpc\":\"2.0\",\"id\":null,\"result\":{\"seq\":2,\"id\":null,\"params\":null}}\n"},
        {"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 65\r\n"
         "Connection: keep-alive\r\n\r\n",
         "{\"jsonrpc\":\"2.0\",\"id\":3,\"result\":{\"seq\":3,\"id\":3,\"params\":null}}\n"},
        {"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 71\r\n\r\n",
         "[{\"jsonrpc\":\"2.0\",\"id\":\"a\",\"result\":{\"seq\":4,\"id\":\"a\",\"params\":null}}]"
         "\n"},
    };
    size_t nwant = sizeof(want) / sizeof(want[0]);
    fx_responses_t a;
    const fx_response_t *fa[8];
    fx_parse(&f.out, &a);
    size_t na = final_responses(&a, fa, 8);
    CHECK(!a.error && a.trailing == 0);
    CHECK(na == nwant);
    for (size_t i = 0; i < na && i < nwant; i++) {
        if (!buf_is(&fa[i]->head, want[i].head) || !buf_is(&fa[i]->body, want[i].body))
            fprintf(stderr, "  response %zu at once: %.*s%.*s\n", i, (int)fa[i]->head.len,
                    fa[i]->head.data, (int)fa[i]->body.len, fa[i]->body.data);
        CHECK(buf_is(&fa[i]->head, want[i].head));
        CHECK(buf_is(&fa[i]->body, want[i].body));
    }
    int mismatches = 0; /* reported for the first few chunk sizes only */
    for (size_t chunk = 1; chunk < 40; chunk++)
        for (int answer = 0; answer < 2; answer++)
            CHECK(same_when_cut(&in, &cfg, chunk, answer, fa, na, &mismatches));
    fx_responses_free(&a);
    mph_buf_free(&f.out);
    mph_buf_free(&in);
    free(one);
    free(two);
}

static void test_content_length_with_transfer_encoding_is_400(void)
{
    fx_responses_t r;
    exchange("POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
             "0\r\n\r\n" POST(2) "{}",
             &r);
    CHECK(r.n == 1 && r.list[0].status == 400 && r.list[0].close);
    CHECK(!r.error && r.trailing == 0); /* nothing after it: the request after is not read */
    fx_responses_free(&r);
}

static void test_limits(void)
{
    fx_responses_t r;
    exchange(POST(1001), &r); /* the declared length is enough to refuse */
    CHECK(r.n == 1 && r.list[0].status == 413 && r.list[0].close);
    fx_responses_free(&r);

    mph_buf_t in = MPH_BUF_INIT;
    mph_buf_puts(&in, "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
    for (int i = 0; i < 11; i++)
        mph_buf_puts(&in, "64\r\n" /* 100 bytes */
                          "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                          "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n");
    mph_buf_puts(&in, "0\r\n\r\n");
    exchange(in.data, &r);
    CHECK(r.n == 1 && r.list[0].status == 413);
    fx_responses_free(&r);
    mph_buf_free(&in);

    mph_buf_puts(&in, "POST / HTTP/1.1\r\nX-Big: ");
    for (int i = 0; i < 600; i++)
        mph_buf_puts(&in, "a");
    mph_buf_puts(&in, "\r\nContent-Length: 0\r\n\r\n");
    exchange(in.data, &r);
    CHECK(r.n == 1 && r.list[0].status == 431 && r.list[0].close);
    fx_responses_free(&r);
    mph_buf_free(&in);
}

static void test_methods_and_garbage(void)
{
    fx_responses_t r;
    exchange("GET / HTTP/1.1\r\nHost: x\r\n\r\n", &r);
    CHECK(r.n == 1 && r.list[0].status == 405 && r.list[0].close);
    fx_responses_free(&r);
    exchange("HELLO THERE\r\n\r\n", &r);
    CHECK(r.n == 1 && r.list[0].status == 400);
    fx_responses_free(&r);
    exchange("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n{\"j", &r); /* EOF mid-body */
    CHECK(r.n == 0 && !r.error && r.trailing == 0);
    fx_responses_free(&r);
}

static void test_http_1_0_keep_alive(void)
{
    fx_responses_t r;
    const char *b7 = "{\"jsonrpc\":\"2.0\",\"method\":\"sync\",\"id\":7}";
    const char *b8 = "{\"jsonrpc\":\"2.0\",\"method\":\"sync\",\"id\":8}";
    mph_buf_t in = MPH_BUF_INIT;
    mph_buf_printf(&in,
                   "POST / HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: %zu\r\n\r\n%s",
                   strlen(b7), b7);
    mph_buf_printf(&in, "POST / HTTP/1.0\r\nContent-Length: %zu\r\n\r\n%s", strlen(b8), b8);
    mph_buf_printf(&in, "POST / HTTP/1.0\r\nContent-Length: %zu\r\n\r\n%s", strlen(b7),
                   b7); /* after a close: never read */
    exchange(in.data, &r);
    CHECK(r.n == 2 && !r.list[0].close && r.list[1].close);
    CHECK(body_has(&r.list[0], "\"id\":7") && body_has(&r.list[1], "\"id\":8"));
    CHECK(r.trailing == 0);
    fx_responses_free(&r);
    mph_buf_free(&in);
}

static void test_expect_100_continue_waits_for_earlier_responses(void)
{
    char *first = post(echo1, "");
    const char *second = "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
    mph_http_config_t cfg = config();
    fx_t f;
    fx_open(&f, &cfg);
    fx_feed(&f, first, strlen(first), 0);
    fx_feed(&f, second, strlen(second), 0);
    CHECK(f.out.len == 0); /* the first is not answered yet: no interim answer either */
    fx_answer();
    fx_run(&f);
    fx_responses_t r;
    fx_parse(&f.out, &r);
    CHECK(r.n == 2 && r.list[0].status == 200 && r.list[1].status == 100 && r.trailing == 0);
    fx_responses_free(&r);
    fx_feed(&f, "[]", 2, 1);
    fx_finish(&f, 1);
    fx_parse(&f.out, &r);
    CHECK(r.n == 3 && r.list[2].status == 200 && body_has(&r.list[2], "-32600"));
    fx_responses_free(&r);
    mph_buf_free(&f.out);
    free(first);
}

static void test_pipeline_limit_pauses_and_resumes(void)
{
    mph_http_config_t cfg = config();
    cfg.max_pipeline = 4;
    mph_buf_t in = MPH_BUF_INIT, more = MPH_BUF_INIT;
    for (int i = 0; i < 25; i++) {
        char body[96];
        snprintf(body, sizeof(body), "{\"jsonrpc\":\"2.0\",\"method\":\"echo\",\"id\":%d}", i);
        char *req = post(body, "");
        mph_buf_puts(i < 20 ? &in : &more, req);
        free(req);
    }
    fx_t f;
    fx_open(&f, &cfg);
    fx_feed(&f, in.data, in.len, 0);
    /* One read is parsed to its end (at most the 64 KiB read buffer), then reading pauses
     * until the answers owed fall under half the limit. */
    conn_t *c = fx_conn(&f);
    CHECK(c && !c->reading && c->in_flight == 20);
    /* Paused: what arrives now stays unread (in the socket, here in f.input). */
    fx_feed(&f, more.data, more.len, 0);
    c = fx_conn(&f);
    CHECK(c && !c->reading && c->in_flight == 20 && f.input.len == more.len);
    /* The answers leave, the backlog falls under the limit: reading resumes and takes the
     * rest, whose 5 requests are again over the limit of 4. */
    CHECK(fx_answer() == 20);
    fx_run(&f);
    fx_push(&f);
    c = fx_conn(&f);
    CHECK(c && f.input.len == 0 && c->in_flight == 5 && !c->reading);
    fx_finish(&f, 1);
    fx_responses_t r;
    fx_parse(&f.out, &r);
    CHECK(r.n == 25 && r.trailing == 0);
    for (size_t i = 0; i < r.n; i++) {
        char want[32];
        snprintf(want, sizeof(want), "\"id\":%zu,", i);
        CHECK(body_has(&r.list[i], want));
    }
    fx_responses_free(&r);
    mph_buf_free(&f.out);
    mph_buf_free(&in);
    mph_buf_free(&more);
}

static void test_response_after_the_client_left_is_dropped(void)
{
    char *req = post(echo1, "");
    mph_http_config_t cfg = config();
    fx_t f;
    fx_open(&f, &cfg);
    fx_feed(&f, req, strlen(req), 0);
    conn_t *c = fx_conn(&f);
    uv_buf_t b = uv_buf_init(NULL, 0);
    on_read((uv_stream_t *)&c->tcp, UV_ECONNRESET, &b); /* a reset: close now */
    CHECK(fx_conn(&f) == NULL);
    fx_finish(&f, 0); /* the handler answers into the void; nothing leaks */
    CHECK(f.out.len == 0);
    mph_buf_free(&f.out);
    free(req);
}

static void test_only_the_last_response_says_close(void)
{
    /* The first call answers after the framing error drained the connection: its response
     * must not say "close", or the client would drop the 400 that follows it. */
    char *first = post(echo1, "");
    mph_buf_t in = MPH_BUF_INIT;
    mph_buf_puts(&in, first);
    mph_buf_puts(&in, "HELLO THERE\r\n\r\n");
    fx_responses_t r;
    exchange(in.data, &r);
    CHECK(r.n == 2 && r.list[0].status == 200 && !r.list[0].close);
    CHECK(r.list[1].status == 400 && r.list[1].close && r.trailing == 0);
    fx_responses_free(&r);
    mph_buf_free(&in);
    free(first);
}

static void test_shutdown_drops_a_half_received_request(void)
{
    /* A stop finishes the answered request and closes: the half-received one behind it
     * will never complete and must not hold the connection open until the deadline. */
    char *first = post(echo1, "");
    mph_buf_t in = MPH_BUF_INIT;
    mph_buf_puts(&in, first);
    mph_buf_puts(&in, "POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"a");
    mph_http_config_t cfg = config();
    fx_t f;
    fx_open(&f, &cfg);
    fx_feed(&f, in.data, in.len, 0);
    mph_http_shutdown(f.srv, fx_on_drained, &f);
    CHECK(fx_conn(&f) != NULL && fx_conn(&f)->state == CONN_DRAINING && fx_conn(&f)->cur == NULL);
    fx_answer();
    for (int i = 0; i < 100 && !f.drained; i++)
        uv_run(&f.loop, UV_RUN_ONCE);
    CHECK(f.drained);
    fx_finish(&f, 0);
    fx_responses_t r;
    fx_parse(&f.out, &r);
    CHECK(r.n == 1 && r.list[0].status == 200 && r.list[0].close && r.trailing == 0);
    fx_responses_free(&r);
    mph_buf_free(&f.out);
    mph_buf_free(&in);
    free(first);
}

/* ---- A listening socket shared by two servers (two workers, here in one loop) ---- */

static void on_shared_drained(void *ud)
{
    (*(int *)ud)++;
}

static int connect_to(int port)
{
    struct sockaddr_in sa;
    uv_ip4_addr("127.0.0.1", port, &sa);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0);
    return fd; /* complete once queued on the listening socket: nobody needs to accept it */
}

/* Runs the loop until the servers hold `n` connections between them. */
static void accept_until(uv_loop_t *loop, mph_http_server_t *a, mph_http_server_t *b, unsigned n)
{
    for (int i = 0; i < 1000 && a->nconns + (b ? b->nconns : 0) < n; i++)
        uv_run(loop, UV_RUN_ONCE);
}

static void test_shared_listener_pauses_after_an_accept(void)
{
    /* Both servers are woken by each connection; the one that accepts pauses (an hour
     * here: nothing in the test depends on time), so the next goes to the other. Without a
     * pause one server takes them all. Shutdown closes each copy of the socket and drains. */
    uv_loop_t loop;
    uv_loop_init(&loop);
    mph_http_config_t cfg = config();
    char err[256];
    int fd, port, drained = 0, c[4];
    CHECK(mph_http_open_listener("127.0.0.1", 0, &fd, &port, err, sizeof(err)) == 0);
    mph_http_server_t *a, *b;
    mph_http_server_new(&a, &loop, &cfg, mph_rpc_handle, NULL);
    mph_http_server_new(&b, &loop, &cfg, mph_rpc_handle, NULL);
    CHECK(mph_http_listen_shared(a, fd, 3600 * 1000, err, sizeof(err)) == 0);
    CHECK(mph_http_listen_shared(b, dup(fd), 3600 * 1000, err, sizeof(err)) == 0);
    CHECK(mph_http_port(a) == port && mph_http_port(b) == port);
    c[0] = connect_to(port);
    accept_until(&loop, a, b, 1);
    c[1] = connect_to(port);
    accept_until(&loop, a, b, 2);
    CHECK(a->nconns == 1 && b->nconns == 1);
    mph_http_shutdown(a, on_shared_drained, &drained);
    mph_http_shutdown(b, on_shared_drained, &drained);
    for (int i = 0; i < 1000 && drained < 2; i++)
        uv_run(&loop, UV_RUN_ONCE);
    CHECK(drained == 2 && a->shared_fd == -1 && b->shared_fd == -1);
    mph_http_server_free(a);
    mph_http_server_free(b);

    /* No pause (a lone worker): one server accepts every connection as it comes. */
    CHECK(mph_http_open_listener("127.0.0.1", 0, &fd, &port, err, sizeof(err)) == 0);
    mph_http_server_new(&a, &loop, &cfg, mph_rpc_handle, NULL);
    CHECK(mph_http_listen_shared(a, fd, 0, err, sizeof(err)) == 0);
    for (int i = 0; i < 2; i++) {
        c[2 + i] = connect_to(port);
        accept_until(&loop, a, NULL, (unsigned)i + 1);
    }
    CHECK(a->nconns == 2);
    mph_http_shutdown(a, on_shared_drained, &drained);
    for (int i = 0; i < 1000 && drained < 3; i++)
        uv_run(&loop, UV_RUN_ONCE);
    CHECK(drained == 3);
    mph_http_server_free(a);
    for (int i = 0; i < 4; i++)
        close(c[i]);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&loop) == 0);

    /* A descriptor that is not a listening socket is refused, and stays the caller's. */
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    uv_loop_init(&loop);
    mph_http_server_new(&a, &loop, &cfg, mph_rpc_handle, NULL);
    CHECK(mph_http_listen_shared(a, sv[0], 0, err, sizeof(err)) == MPH_ELISTEN);
    CHECK(strstr(err, "not a listening socket") != NULL && fcntl(sv[0], F_GETFD) >= 0);
    mph_http_server_free(a);
    close(sv[0]);
    close(sv[1]);
    CHECK(uv_loop_close(&loop) == 0);
}

static const mph_unit_test_t tests[] = {
    {"shared_listener_pauses_after_an_accept", test_shared_listener_pauses_after_an_accept},
    {"only_the_last_response_says_close", test_only_the_last_response_says_close},
    {"shutdown_drops_a_half_received_request", test_shutdown_drops_a_half_received_request},
    {"pipelined_answers_come_in_request_order", test_pipelined_answers_come_in_request_order},
    {"every_chunk_size_gives_the_same_bytes", test_every_chunk_size_gives_the_same_bytes},
    {"content_length_with_transfer_encoding_is_400",
     test_content_length_with_transfer_encoding_is_400},
    {"limits", test_limits},
    {"methods_and_garbage", test_methods_and_garbage},
    {"http_1_0_keep_alive", test_http_1_0_keep_alive},
    {"expect_100_continue_waits_for_earlier_responses",
     test_expect_100_continue_waits_for_earlier_responses},
    {"pipeline_limit_pauses_and_resumes", test_pipeline_limit_pauses_and_resumes},
    {"response_after_the_client_left_is_dropped", test_response_after_the_client_left_is_dropped},
};

MPH_UNIT_MAIN(tests)
