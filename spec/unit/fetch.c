/*
 * Tests of mp.fetch in in-process calls of the embedding API (mphost.h alone, linked with
 * libmphost as an embedding program is), on the caller's loop, which also runs a tiny HTTP
 * server of the test's own: a call that fetches is answered with what the server said; a
 * call that waits on an exchange the server never answers is answered when the host closes
 * (the exchange is cancelled), and the loop then closes with 0.
 */
#define _GNU_SOURCE
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "mphost.h"

#include "spec/unit/scratch.h"
#include "spec/unit/unit.h"

/* ---- A tiny HTTP server on the test's loop ----
 * It reads one request per connection; "GET /ok" gets "ok" and the connection closes, any
 * other path gets nothing until the server closes. */

typedef struct {
    uv_tcp_t listener;
    int port;
    int requests;       /* requests read */
    uv_tcp_t *conns[8]; /* open connections */
    int nconns;
} server_t;

typedef struct {
    uv_tcp_t tcp;
    server_t *srv;
    char buf[4096];
    size_t len;
} conn_t;

static void on_conn_closed(uv_handle_t *h)
{
    free(h->data);
}

static void conn_close(conn_t *c)
{
    server_t *srv = c->srv;
    for (int i = 0; i < srv->nconns; i++)
        if (srv->conns[i] == &c->tcp)
            srv->conns[i] = srv->conns[--srv->nconns];
    c->tcp.data = c;
    uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    conn_t *c = h->data;
    (void)hint;
    *buf = uv_buf_init(c->buf + c->len, (unsigned)(sizeof(c->buf) - 1 - c->len));
}

static void on_written(uv_write_t *w, int status)
{
    (void)status;
    conn_close(w->data);
    free(w);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    conn_t *c = s->data;
    (void)buf;
    if (n < 0) {
        conn_close(c);
        return;
    }
    c->len += (size_t)n;
    c->buf[c->len] = '\0';
    if (strstr(c->buf, "\r\n\r\n") == NULL)
        return;
    c->srv->requests++;
    uv_read_stop(s);
    if (strncmp(c->buf, "GET /ok ", 8) != 0)
        return; /* never answered */
    static const char answer[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-From: test\r\n"
                                 "Connection: close\r\n\r\nok";
    uv_write_t *w = malloc(sizeof(*w));
    w->data = c;
    uv_buf_t b = uv_buf_init((char *)answer, sizeof(answer) - 1);
    uv_write(w, s, &b, 1, on_written);
}

static void on_connection(uv_stream_t *l, int status)
{
    server_t *srv = l->data;
    if (status != 0 || srv->nconns == 8)
        return;
    conn_t *c = calloc(1, sizeof(*c));
    c->srv = srv;
    uv_tcp_init(l->loop, &c->tcp);
    c->tcp.data = c;
    if (uv_accept(l, (uv_stream_t *)&c->tcp) != 0) {
        conn_close(c);
        return;
    }
    srv->conns[srv->nconns++] = &c->tcp;
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

static int server_start(server_t *srv, uv_loop_t *loop)
{
    struct sockaddr_in addr;
    struct sockaddr_storage bound;
    int len = sizeof(bound);
    memset(srv, 0, sizeof(*srv));
    uv_ip4_addr("127.0.0.1", 0, &addr);
    uv_tcp_init(loop, &srv->listener);
    srv->listener.data = srv;
    if (uv_tcp_bind(&srv->listener, (const struct sockaddr *)&addr, 0) != 0 ||
        uv_listen((uv_stream_t *)&srv->listener, 16, on_connection) != 0 ||
        uv_tcp_getsockname(&srv->listener, (struct sockaddr *)&bound, &len) != 0)
        return -1;
    srv->port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
    return 0;
}

static void server_stop(server_t *srv)
{
    while (srv->nconns > 0)
        conn_close(srv->conns[0]->data);
    uv_close((uv_handle_t *)&srv->listener, NULL);
}

/* ---- A host on the same loop ---- */

static const char script[] =
    "local mp = require('metaparticle')\n"
    "mp.service('f', function(url)\n"
    "  local res, err = mp.fetch(url, { timeout = 60 })\n"
    "  if not res then return { err = err } end\n"
    "  return { status = res.status, body = res.body, from = res.headers['x-from'] }\n"
    "end).expose = true\n"
    "mp.serve()\n";

typedef struct {
    int done;
    int code;
    char json[512];
} reply_t;

static void on_reply(void *ud, const mph_host_reply_t *r)
{
    reply_t *out = ud;
    out->done++;
    out->code = r->code;
    snprintf(out->json, sizeof(out->json), "%.*s", r->json ? (int)r->json_len : 0,
             r->json ? r->json : "");
}

static int closed;

static void on_closed(mph_host_t *h, void *ud)
{
    (void)ud;
    closed = 1;
    mph_host_free(h);
}

static mph_host_t *host_open(uv_loop_t *loop, char *data)
{
    mph_host_config_t *cfg;
    char err[512];
    mph_host_t *h = NULL;
    mph_host_config_new(&cfg);
    mph_host_config_set_loop(cfg, loop);
    int rc = mph_host_config_set(cfg, "data", data, err, sizeof(err));
    if (rc == 0)
        rc = mph_host_config_set(cfg, "shutdown-timeout", "0.3", err, sizeof(err));
    if (rc == 0)
        rc = mph_host_new(&h, cfg, err, sizeof(err));
    mph_host_config_free(cfg);
    if (rc == 0 && mph_host_load_string(h, "fetch-test.lua", script, err, sizeof(err)) != 0)
        rc = -1;
    if (rc != 0)
        fprintf(stderr, "  host: %s\n", err);
    return rc == 0 ? h : NULL;
}

static void test_in_process_call_fetches_and_close_cancels(void)
{
    uv_loop_t loop;
    server_t srv;
    char url[64], params[96];
    char *data = scratch_dir("mph-fetch");
    uv_loop_init(&loop);
    CHECK(server_start(&srv, &loop) == 0);
    mph_host_t *h = host_open(&loop, data);
    CHECK(h != NULL);
    if (h == NULL)
        return;

    /* A call that fetches, answered with what the server said. */
    reply_t r = {0};
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/ok", srv.port);
    snprintf(params, sizeof(params), "[\"%s\"]", url);
    CHECK(mph_host_call(h, "f", params, strlen(params), NULL, on_reply, &r) == 0);
    CHECK(r.done == 0);
    while (!r.done && uv_run(&loop, UV_RUN_ONCE))
        ;
    CHECK(r.done == 1 && r.code == 0);
    CHECK(strcmp(r.json, "{\"body\":\"ok\",\"from\":\"test\",\"status\":200}") == 0);
    if (strcmp(r.json, "{\"body\":\"ok\",\"from\":\"test\",\"status\":200}") != 0)
        fprintf(stderr, "  got %s\n", r.json);

    /* A call whose exchange is never answered: the close cancels it, the handler goes on. */
    reply_t w = {0};
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/hang", srv.port);
    snprintf(params, sizeof(params), "[\"%s\"]", url);
    int before = srv.requests;
    CHECK(mph_host_call(h, "f", params, strlen(params), NULL, on_reply, &w) == 0);
    while (srv.requests == before && uv_run(&loop, UV_RUN_ONCE))
        ;
    CHECK(w.done == 0); /* it waits */
    CHECK(mph_host_close(h, on_closed, NULL) == 0);
    while (!closed && uv_run(&loop, UV_RUN_ONCE))
        ;
    CHECK(closed);
    CHECK(w.done == 1 && w.code == 0);
    CHECK(strcmp(w.json, "{\"err\":\"cancelled: the host is stopping\"}") == 0);
    if (strcmp(w.json, "{\"err\":\"cancelled: the host is stopping\"}") != 0)
        fprintf(stderr, "  got %s\n", w.json);

    server_stop(&srv);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&loop) == 0); /* nothing of the host, nor of curl, is left on it */
    scratch_remove(data);
}

static const mph_unit_test_t tests[] = {
    {"in_process_call_fetches_and_close_cancels", test_in_process_call_fetches_and_close_cancels},
};

MPH_UNIT_MAIN(tests)
