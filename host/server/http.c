/*
 * http.c: connections and HTTP/1.x on libuv with Debian's http-parser.
 *
 * A connection owns two handles (its stream: TCP, or a Unix socket for a local listener;
 * and a timer) and frees itself after the second close callback; the server holds it until
 * then (srv->conns while open, srv->closing after). Its requests form a FIFO in arrival order
 * (conn->reqs, from the first byte of a request until its response is taken to be written); each is
 * answered by the handler at its own pace, and responses leave in request order (pipelining).
 * States of a connection:
 *
 *   OPEN     reading and parsing                    (on_connection)
 *   DRAINING no more reading: write what is queued,  (EOF, a fatal request error, shutdown,
 *            then close                               Connection: close)
 *   CLOSING  uv_close called on both handles;        (conn_close)
 *            its FIFO emptied; in srv->closing until freed
 *
 * A request that fails at the HTTP level (400, 413, 431) is answered in order like any other,
 * and the connection drains: after a framing error nothing later on it can be trusted.
 *
 * A handler whose request waits on something registers a cleanup (mph_http_req_on_gone). It
 * runs if the client goes first: when the connection closes (conn_close), or when the client
 * ends its side while the request waits (on_read, EOF), which cannot be told from a close.
 * Requests without one are answered after such an EOF as before.
 *
 * The idle timer closes a connection that has nothing in flight and completes no request for
 * idle_timeout_ms: it is re-armed only when a request completes or the last response leaves,
 * never by partial data, so a client that trickles bytes cannot hold a connection. While
 * responses are being written it also closes a connection whose client stopped reading: the
 * write queue must shrink in every period, or the responses (and their memory) are dropped.
 *
 * A server listens on a TCP port (mph_http_listen), on a TCP socket shared with other
 * processes (mph_http_listen_shared), or on a local Unix socket (mph_http_listen_unix: the
 * workers' peer channel, host/peer.c), where it serves only our own user. A server can keep
 * one header's value per request for its handler (cfg.capture_header): the peer channel's
 * role header, which the public server does not capture, and so never sees.
 *
 * A graceful shutdown (mph_http_shutdown) stops accepting and ends each connection after a
 * response, never under a request: a connection whose last request is not answered yet drains
 * (that answer says "Connection: close"); one whose answers all said keep-alive (idle, or its
 * last answer still being written) stays open for DRAIN_IDLE_MS (or the idle timeout, if
 * shorter), since its client may be sending its next request right now, and a request that
 * arrives meanwhile is answered with "Connection: close". Closing such a connection at once
 * would cut that request, which a client may not send again (a POST is not idempotent): a
 * reload would fail calls. Only a client silent for that long is closed on while idle, as the
 * idle timeout always does.
 *
 * Bytes leave in order. A response is first offered to uv_try_write, which writes only when
 * nothing is queued on the stream (libuv refuses otherwise); what it could not write is queued
 * with uv_write. Writing at once saves the write request's round trip through the loop and the
 * epoll_ctl that libuv 1.44 issues for it: one system call in three per keep-alive call. The
 * interim "100 Continue" always goes through uv_write, queued behind the responses owed before
 * it.
 */
#define _GNU_SOURCE /* accept4 */
#include "http.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <http_parser.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/common.h"
#include "common/list.h"
#include "localsock.h"

/* Shutting down: how long an idle connection may still send a request. */
#define DRAIN_IDLE_MS 1000
/* Connections the kernel may queue before we accept them. A burst of a thousand clients
 * connecting at once would overflow a short queue into SYN retransmits (a second's delay
 * each); Linux caps this at net.core.somaxconn anyway. */
#define LISTEN_BACKLOG 4096

typedef enum { CONN_OPEN, CONN_DRAINING, CONN_CLOSING } conn_state_t;

/* A request's Authorization header: none, being read, read, or unusable (sent twice, or
 * longer than MPH_HTTP_MAX_AUTHORIZATION). */
enum { AUTH_NONE, AUTH_PARTIAL, AUTH_SOME, AUTH_BAD };

typedef struct conn_s conn_t;

struct mph_http_req_s {
    mph_list_t node;   /* in conn->reqs until its response is taken to be written (first: list.h) */
    conn_t *conn;      /* NULL once the connection is gone (the response is dropped) */
    int responded;     /* the response is ready in head/body */
    int keep_alive;    /* the client allows another request after this one */
    int http_minor;    /* 0 for HTTP/1.0 */
    int want_continue; /* sent Expect: 100-continue; "100 Continue" not yet queued */
    int error_status;  /* set during parsing: 405, 413, 431, 400; 0 otherwise */
    mph_http_server_t *srv;  /* for the access log, which outlives a vanished client */
    uint64_t started_ns;     /* uv_hrtime() at the request's first byte */
    char methods[128];       /* for the access log (mph_http_req_set_call); "" for non-RPC */
    int rpc_code;            /* idem */
    char peer[48];           /* the client's address (the connection's), idem */
    int is_get;              /* a GET, for the get handler (mph_http_set_get_handler) */
    char path[64];           /* the URL up to '?' (cut to 63 bytes; longer ones match no
                                path the get handler knows) */
    size_t path_len;         /* its whole length */
    int path_ended;          /* the '?' was seen */
    char header[32];         /* the captured header's value (cfg.capture_header), cut to 31
                                bytes; "" when the request did not carry it */
    mph_buf_t body;          /* request body while parsing */
    mph_buf_t authorization; /* the Authorization header's value (it carries a password:
                                wiped before it is freed), while auth_state is AUTH_SOME */
    int auth_state;          /* AUTH_NONE, AUTH_PARTIAL (being read), AUTH_SOME, AUTH_BAD */
    mph_buf_t idem_key;      /* the Idempotency-Key header's value while idem_state is
                                AUTH_PARTIAL or AUTH_SOME (the same states) */
    int idem_state;          /* AUTH_NONE: no such header; AUTH_BAD: two, or one too long */
    char head[384];          /* response status line and headers */
    size_t head_len;
    char *resp_body; /* owned response body */
    size_t resp_len;
    uv_write_t write;      /* the response write */
    mph_http_gone_cb gone; /* the handler's cleanup if the client leaves first, or NULL */
    void *gone_ud;
};

struct conn_s {
    mph_list_t node; /* in srv->conns, then srv->closing (first: list.h) */
    union { /* the client's stream; every use goes through tcp's address as a uv_stream_t */
        uv_tcp_t tcp;   /* a TCP client (mph_http_listen, mph_http_listen_shared) */
        uv_pipe_t pipe; /* a Unix-socket client (mph_http_listen_unix) */
    };
    uv_timer_t timer;
    mph_http_server_t *srv;
    conn_state_t state;
    int open_handles; /* frees itself when this reaches 0 */
    http_parser parser;
    mph_http_req_t *cur;  /* the request being parsed, or NULL */
    size_t header_bytes;  /* of cur */
    char field[32];       /* current header name, lowercased, truncated */
    size_t field_len;     /* its whole length (more than the bytes kept when truncated) */
    int in_value;         /* the parser is inside a header value */
    int expect_continue;  /* cur sent Expect: 100-continue */
    char value[32];       /* start of the current header value */
    size_t value_len;     /* its whole length */
    mph_list_t reqs;      /* requests in order, not yet written (mph_http_req_t.node) */
    unsigned in_flight;   /* requests parsed, not yet written out */
    unsigned writes;      /* response writes issued, not yet completed */
    size_t stalled_queue; /* write queue bytes when the idle timer was armed with writes */
    int reading;          /* uv_read_start is active */
    char peer[48];        /* the client's address, for the access log */
};

struct mph_http_server_s {
    uv_loop_t *loop;
    union {
        uv_tcp_t listener;        /* mph_http_listen */
        uv_pipe_t local_listener; /* mph_http_listen_unix; closed through `listener` too */
    };
    int local;         /* listening on a Unix socket: connections are pipes */
    int listening;     /* listener initialised */
    int listener_open; /* listener (or the shared socket's handles) not closed yet */
    /* A socket shared with other processes (mph_http_listen_shared) is accepted on by hand: */
    int shared_fd;           /* the shared listening socket (owned), or -1 */
    int nodelay_inherited;   /* TCP_NODELAY is set on the listening socket, which Linux copies
                                into every connection it accepts: no setsockopt per connection */
    uv_poll_t accept_poll;   /* its readiness, stopped during a pause */
    uv_timer_t accept_pause; /* ends the pause that follows each accept */
    unsigned pause_ms;       /* how long that pause is; 0: none */
    int accept_handles;      /* accept_poll and accept_pause not closed yet */
    mph_http_config_t cfg;
    mph_http_handler_t handler;
    mph_http_get_handler_t get_handler; /* NULL: every GET is 405 */
    void *ud;
    mph_list_t conns;   /* open connections (conn_t.node), newest first */
    mph_list_t closing; /* connections closing: their handles' close callbacks are to come */
    unsigned nconns;
    unsigned nallocated; /* connections not yet freed (closing ones too): `drained` waits for
                            0, since their close callbacks still reach the server */
    int shutting_down;
    void (*drained)(void *ud);
    void *drained_ud;
    int port;
    char read_buf[65536]; /* shared: reads are consumed synchronously */
    http_parser_settings settings;
};

void mph_http_config_default(mph_http_config_t *cfg)
{
    cfg->max_body = 1 << 20;
    cfg->max_header = 16 << 10;
    cfg->max_connections = 10000;
    cfg->idle_timeout_ms = 30000;
    cfg->max_pipeline = 64;
    cfg->capture_header = NULL;
    cfg->alog = NULL;
}

static void conn_close(conn_t *c);
static void conn_flush(conn_t *c);
static void resume_reading(conn_t *c);
static void conn_drain(conn_t *c);
static void maybe_send_continue(conn_t *c);
static void maybe_drained(mph_http_server_t *srv);

static const char *status_text(int status)
{
    switch (status) {
    case 200:
        return "OK";
    case 204:
        return "No Content";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 405:
        return "Method Not Allowed";
    case 413:
        return "Payload Too Large";
    case 431:
        return "Request Header Fields Too Large";
    case 503:
        return "Service Unavailable";
    }
    return "Error";
}

#ifndef NDEBUG
/* The connection's invariants; used as assert(assert_conn_state(c)). */
static int assert_conn_state(const conn_t *c)
{
    /* The request being parsed is the last. */
    assert(c->cur == NULL || &c->cur->node == mph_list_last(&c->reqs));
    assert(c->in_flight >= (unsigned)(c->cur != NULL) + c->writes);
    assert(c->state == CONN_OPEN || !c->reading);
    assert(c->state != CONN_CLOSING || (mph_list_empty(&c->reqs) && c->cur == NULL));
    (void)c;
    return 1;
}
#endif

/* ---- Requests ---- */

void mph_http_req_wipe_authorization(mph_http_req_t *r)
{
    if (r->authorization.data)
        explicit_bzero(r->authorization.data, r->authorization.cap);
    mph_buf_free(&r->authorization);
    if (r->auth_state != AUTH_NONE)
        r->auth_state = AUTH_BAD;
}

const char *mph_http_req_authorization(const mph_http_req_t *r, size_t *len)
{
    if (r->auth_state != AUTH_SOME)
        return NULL;
    *len = r->authorization.len;
    return r->authorization.data;
}

/* Adds a piece of an Authorization value. Room for the longest is reserved at once, so the
 * buffer never moves and leaves no copy behind. */
static void authorization_append(mph_http_req_t *r, const char *at, size_t len)
{
    if (r->auth_state == AUTH_BAD)
        return;
    if (r->auth_state == AUTH_SOME || r->authorization.len + len > MPH_HTTP_MAX_AUTHORIZATION) {
        mph_http_req_wipe_authorization(r); /* a second header, or too long */
        r->auth_state = AUTH_BAD;
        return;
    }
    if (r->authorization.data == NULL)
        mph_buf_reserve(&r->authorization, MPH_HTTP_MAX_AUTHORIZATION + 1);
    mph_buf_append(&r->authorization, at, len);
    r->auth_state = AUTH_PARTIAL;
}

/* Adds a piece of an Idempotency-Key value: one header of at most
 * MPH_HTTP_MAX_IDEMPOTENCY_KEY bytes is kept; two, or a longer one, are unusable. */
static void idem_key_append(mph_http_req_t *r, const char *at, size_t len)
{
    if (r->idem_state == AUTH_BAD)
        return;
    if (r->idem_state == AUTH_SOME || r->idem_key.len + len > MPH_HTTP_MAX_IDEMPOTENCY_KEY) {
        mph_buf_free(&r->idem_key);
        r->idem_state = AUTH_BAD;
        return;
    }
    mph_buf_append(&r->idem_key, at, len);
    r->idem_state = AUTH_PARTIAL;
}

int mph_http_req_idempotency_key(const mph_http_req_t *r, const char **key, size_t *len)
{
    *key = NULL;
    *len = 0;
    if (r->idem_state == AUTH_NONE)
        return 0;
    if (r->idem_state != AUTH_SOME)
        return -1;
    *key = r->idem_key.data ? r->idem_key.data : "";
    *len = r->idem_key.len;
    while (*len > 0 && ((*key)[*len - 1] == ' ' || (*key)[*len - 1] == '\t'))
        (*len)--; /* optional whitespace after a field value is not part of it (RFC 9110) */
    return 1;
}

static void req_free(mph_http_req_t *r)
{
    if (mph_list_is_linked(&r->node)) /* (only in conn_close's list of cleanups) */
        mph_list_remove(&r->node);
    mph_http_req_wipe_authorization(r);
    mph_buf_free(&r->idem_key);
    mph_buf_free(&r->body);
    free(r->resp_body);
    free(r);
}

static mph_http_req_t *req_new(conn_t *c)
{
    mph_http_req_t *r = mph_xcalloc(1, sizeof(*r));
    r->conn = c;
    r->srv = c->srv;
    r->started_ns = uv_hrtime();
    memcpy(r->peer, c->peer, sizeof(r->peer));
    r->keep_alive = 1;
    mph_list_insert_tail(&c->reqs, &r->node);
    c->in_flight++;
    return r;
}

void mph_http_req_on_gone(mph_http_req_t *r, mph_http_gone_cb cb, void *ud)
{
    r->gone = cb;
    r->gone_ud = ud;
}

int mph_http_req_peer(const mph_http_req_t *r, struct sockaddr_storage *out)
{
    int len = sizeof(*out);
    if (r->conn == NULL || r->srv->local ||
        uv_tcp_getpeername(&r->conn->tcp, (struct sockaddr *)out, &len) != 0)
        return MPH_EINVAL;
    return 0;
}

/* Runs the cleanup of the first request handed to the handler, not answered, that has one;
 * returns 0 when none is left. One at a time, each looked for anew: a cleanup answers its
 * request, which may close the connection (conn_close runs the rest itself). */
static int run_one_gone(conn_t *c)
{
    mph_list_t *q;
    mph_list_foreach(q, &c->reqs) {
        mph_http_req_t *r = mph_list_entry(q, mph_http_req_t, node);
        if (r->gone && !r->responded && r != c->cur) {
            mph_http_gone_cb cb = r->gone;
            r->gone = NULL;
            cb(r->gone_ud, r);
            return 1;
        }
    }
    return 0;
}

void mph_http_req_set_call(mph_http_req_t *r, const char *methods, int code)
{
    /* Method names come from clients: anything but printable ASCII (spaces, newlines) is
     * written '?', so that a line stays one line of fields. */
    size_t i = 0;
    for (; methods[i] && i < sizeof(r->methods) - 1; i++)
        r->methods[i] = methods[i] > ' ' && methods[i] < 127 ? methods[i] : '?';
    r->methods[i] = '\0';
    r->rpc_code = code;
}

/* A response head being written into mph_http_req_t's head[]: every head respond builds
 * fits (its pieces are ours, `extra` a header or two); overflowing it is a bug. */
typedef struct {
    char *data;
    size_t len;
} head_t;

static void head_put(head_t *h, const char *s, size_t n)
{
    int fits = h->len + n < sizeof(((mph_http_req_t *)0)->head);
    assert(fits);
    if (!fits)
        return; /* a cut head, never a write past it, where asserts are compiled out */
    memcpy(h->data + h->len, s, n);
    h->len += n;
}

static void head_puts(head_t *h, const char *s)
{
    head_put(h, s, strlen(s));
}

/* The access log's line for r, answered with status and len bytes of body. */
static void log_access(const mph_http_req_t *r, int status, size_t len)
{
    char now[32], line[384];
    mph_format_time(now, sizeof(now));
    double ms = (double)(uv_hrtime() - r->started_ns) / 1e6;
    int n;
    if (r->methods[0])
        n = snprintf(line, sizeof(line), "%s %s %s %d %d %zu %.3f\n", now, r->peer, r->methods,
                     r->rpc_code, status, len, ms);
    else
        n = snprintf(line, sizeof(line), "%s %s - - %d %zu %.3f\n", now, r->peer, status, len, ms);
    mph_accesslog_append(r->srv->cfg.alog, line, (size_t)n < sizeof(line) ? (size_t)n : 0);
}

/* Writes the response's head, then queues it in order. ctype: its Content-Type; extra: more
 * header lines ("Name: value\r\n"), "" for none. */
static void respond(mph_http_req_t *r, int status, const char *ctype, const char *extra, char *body,
                    size_t len)
{
    assert(!r->responded);
    conn_t *c = r->conn;
    r->gone = NULL; /* answered: nothing to clean up */
    if (r->srv->cfg.alog)
        log_access(r, status, body ? len : 0);
    if (c == NULL) { /* the client is gone */
        free(body);
        req_free(r);
        return;
    }
    r->responded = 1;
    r->resp_body = body;
    r->resp_len = body ? len : 0;
    /* On a draining connection only the last response says "close": one said earlier would
     * tell the client to drop the responses still to come after it. */
    int close =
        !r->keep_alive || (c->state != CONN_OPEN && mph_list_next(&c->reqs, &r->node) == NULL);
    r->keep_alive = !close;
    /* Built from pieces, not with snprintf: on every response, it cost 2,500 instructions. */
    head_t h = {r->head, 0};
    const char *connection =
        close ? "Connection: close\r\n" : (r->http_minor == 0 ? "Connection: keep-alive\r\n" : "");
    if (status == 204) {
        head_puts(&h, "HTTP/1.1 204 No Content\r\n");
    } else {
        char digits[MPH_INT_CHARS];
        head_puts(&h, "HTTP/1.1 ");
        head_put(&h, digits, mph_format_int(digits, status));
        head_puts(&h, " ");
        head_puts(&h, status_text(status));
        head_puts(&h, "\r\nContent-Type: ");
        head_puts(&h, ctype);
        head_puts(&h, "\r\nContent-Length: ");
        head_put(&h, digits, mph_format_int(digits, (long long)r->resp_len));
        head_puts(&h, "\r\n");
        if (status == 405)
            head_puts(&h, "Allow: POST\r\n");
        head_puts(&h, extra);
    }
    head_puts(&h, connection);
    head_puts(&h, "\r\n");
    r->head_len = h.len;
    if (close && c->state == CONN_OPEN)
        conn_drain(c);
    conn_flush(c);
}

void mph_http_respond(mph_http_req_t *r, int status, char *body, size_t len)
{
    respond(r, status, status == 200 ? "application/json" : "text/plain; charset=utf-8", "", body,
            len);
}

void mph_http_respond_text(mph_http_req_t *r, int status, const char *ctype, char *body, size_t len)
{
    respond(r, status, ctype, "", body, len);
}

void mph_http_set_get_handler(mph_http_server_t *srv, mph_http_get_handler_t fn)
{
    srv->get_handler = fn;
}

unsigned mph_http_connections(const mph_http_server_t *srv)
{
    return srv->nconns;
}

void mph_http_respond_json(mph_http_req_t *r, int status, const char *headers, char *body,
                           size_t len)
{
    assert(strlen(headers) <= 128);
    respond(r, status, "application/json", headers, body, len);
}

/* Answers an HTTP-level error in order and stops reading the connection. */
static void respond_error(conn_t *c, mph_http_req_t *r, int status)
{
    char msg[96];
    int n = snprintf(msg, sizeof(msg), "%d %s\n", status, status_text(status));
    r->keep_alive = 0;
    conn_drain(c);
    mph_http_respond(r, status, mph_xstrndup(msg, (size_t)n), (size_t)n);
}

/* ---- Writing ---- */

static void arm_idle_timer(conn_t *c);
static void arm_write_timer(conn_t *c);

/* Requests handed to the handler whose response has not been written yet. */
static unsigned answers_owed(const conn_t *c)
{
    return c->in_flight - (c->cur ? 1 : 0);
}

/* A response has left (status 0) or could not (negative): the connection goes on with the
 * next one, or closes. */
static void response_written(conn_t *c, mph_http_req_t *r, int status)
{
    int keep_alive = r->keep_alive;
    req_free(r);
    c->in_flight--;
    if (c->state == CONN_CLOSING)
        return;
    if (status < 0 || !keep_alive) {
        conn_close(c);
        return;
    }
    if (c->state == CONN_DRAINING && mph_list_empty(&c->reqs) && c->writes == 0) {
        conn_close(c);
        return;
    }
    if (answers_owed(c) == 0)
        arm_idle_timer(c);
    else if (c->writes > 0)
        arm_write_timer(c); /* a response left: progress */
    /* Reading paused at the pipeline limit resumes once the backlog shrinks. */
    if (c->in_flight < c->srv->cfg.max_pipeline / 2)
        resume_reading(c);
}

static void on_write(uv_write_t *w, int status)
{
    mph_http_req_t *r = mph_container_of(w, mph_http_req_t, write);
    conn_t *c = r->conn;
    c->writes--;
    response_written(c, r, status);
}

/* Writes what it can of r now, and queues the rest. Returns 1 when r was written whole (the
 * caller finishes it), 0 when a write is queued (on_write finishes it), or a negative libuv
 * error. */
static int write_response(conn_t *c, mph_http_req_t *r)
{
    uv_buf_t bufs[2] = {uv_buf_init(r->head, (unsigned)r->head_len),
                        uv_buf_init(r->resp_body, (unsigned)r->resp_len)};
    unsigned nbufs = r->resp_len ? 2 : 1;
    int n = uv_try_write((uv_stream_t *)&c->tcp, bufs, nbufs);
    if (n == UV_EAGAIN || n == UV_ENOSYS)
        n = 0; /* something is queued, or the socket is full: queue it all */
    else if (n < 0)
        return n;
    size_t done = (size_t)n;
    unsigned first = 0;
    while (first < nbufs && done >= bufs[first].len) {
        done -= bufs[first].len;
        first++;
    }
    if (first == nbufs)
        return 1;
    bufs[first].base += done;
    bufs[first].len -= done;
    int rc = uv_write(&r->write, (uv_stream_t *)&c->tcp, bufs + first, nbufs - first, on_write);
    return rc < 0 ? rc : 0;
}

/* Writes every ready response at the head of the FIFO, in order. */
static void conn_flush(conn_t *c)
{
    assert(assert_conn_state(c));
    mph_list_t *q;
    while (c->state != CONN_CLOSING && (q = mph_list_first(&c->reqs)) != NULL) {
        mph_http_req_t *r = mph_list_entry(q, mph_http_req_t, node);
        if (!r->responded)
            break;
        mph_list_remove(q);
        int rc = write_response(c, r);
        if (rc < 0) {
            c->in_flight--;
            req_free(r);
            conn_close(c);
            return;
        }
        if (rc == 1) {
            response_written(c, r, 0); /* closes after a Connection: close response */
            continue;
        }
        c->writes++;
        if (!r->keep_alive)
            conn_drain(c); /* nothing after a Connection: close response */
    }
    if (c->state == CONN_CLOSING)
        return;
    if (c->state == CONN_DRAINING && mph_list_empty(&c->reqs) && c->writes == 0) {
        conn_close(c);
        return;
    }
    if (c->writes > 0)
        arm_write_timer(c);
    maybe_send_continue(c);
}

static void on_continue_written(uv_write_t *w, int status)
{
    conn_t *c = w->data; /* alive: write callbacks run before the handle's close callback */
    free(w);
    if (status < 0 && c->state != CONN_CLOSING)
        conn_close(c);
}

/* Expect: 100-continue: says "go on" to the request being parsed once every earlier request
 * has its response queued (the interim answer must not overtake them), so it is called when
 * the headers end and again whenever the FIFO advances. */
static void maybe_send_continue(conn_t *c)
{
    mph_http_req_t *r = c->cur;
    if (r == NULL || !r->want_continue || mph_list_first(&c->reqs) != &r->node ||
        c->state != CONN_OPEN)
        return;
    r->want_continue = 0;
    static char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
    uv_buf_t b = uv_buf_init(cont, sizeof(cont) - 1);
    uv_write_t *w = mph_xmalloc(sizeof(*w));
    w->data = c;
    if (uv_write(w, (uv_stream_t *)&c->tcp, &b, 1, on_continue_written) < 0)
        free(w); /* the stream is not writable: the response's write fails and closes it */
}

/* ---- Parser callbacks ---- */

static int over_header_limit(conn_t *c, size_t more)
{
    c->header_bytes += more;
    if (c->header_bytes > c->srv->cfg.max_header) {
        c->cur->error_status = 431;
        return 1;
    }
    return 0;
}

static int on_message_begin(http_parser *p)
{
    conn_t *c = p->data;
    if (c->state != CONN_OPEN)
        return 1; /* nothing is read after a Connection: close or a fatal error */
    c->cur = req_new(c);
    c->header_bytes = 0;
    c->field_len = c->value_len = 0;
    c->in_value = 0;
    c->expect_continue = 0;
    return 0;
}

static int on_url(http_parser *p, const char *at, size_t len)
{
    conn_t *c = p->data;
    mph_http_req_t *r = c->cur;
    for (size_t i = 0; i < len && !r->path_ended; i++) {
        if (at[i] == '?') {
            r->path_ended = 1; /* the query is not part of the path */
            break;
        }
        if (r->path_len < sizeof(r->path) - 1)
            r->path[r->path_len] = at[i];
        r->path_len++;
    }
    return over_header_limit(c, len);
}

/* Whether the header just read is `name` (lowercase). */
static int header_is(const conn_t *c, const char *name)
{
    size_t n = strlen(name);
    return c->field_len == n && n <= sizeof(c->field) && memcmp(c->field, name, n) == 0;
}

static void end_header_value(conn_t *c)
{
    if (header_is(c, "authorization") && c->cur->auth_state == AUTH_PARTIAL)
        c->cur->auth_state = AUTH_SOME;
    if (header_is(c, "idempotency-key")) {
        mph_http_req_t *r = c->cur;
        if (r->idem_state == AUTH_SOME) { /* a second one, empty (idem_key_append saw none) */
            mph_buf_free(&r->idem_key);
            r->idem_state = AUTH_BAD;
        } else if (r->idem_state != AUTH_BAD) {
            r->idem_state = AUTH_SOME; /* from PARTIAL, or NONE: an empty value (refused) */
        }
    }
    if (header_is(c, "expect") && c->value_len == 12 &&
        strncasecmp(c->value, "100-continue", 12) == 0)
        c->expect_continue = 1;
    const char *capture = c->srv->cfg.capture_header;
    if (capture && header_is(c, capture)) {
        mph_http_req_t *r = c->cur;
        size_t n = c->value_len < sizeof(r->header) ? c->value_len : sizeof(r->header) - 1;
        memcpy(r->header, c->value, n);
        r->header[n] = '\0';
    }
    c->field_len = c->value_len = 0;
    c->in_value = 0;
}

static int on_header_field(http_parser *p, const char *at, size_t len)
{
    conn_t *c = p->data;
    if (c->in_value)
        end_header_value(c);
    for (size_t i = 0; i < len; i++, c->field_len++) {
        char ch = at[i];
        if (c->field_len < sizeof(c->field))
            c->field[c->field_len] = (char)(ch >= 'A' && ch <= 'Z' ? ch + 32 : ch);
    }
    return over_header_limit(c, len);
}

static int on_header_value(http_parser *p, const char *at, size_t len)
{
    conn_t *c = p->data;
    c->in_value = 1;
    if (header_is(c, "authorization"))
        authorization_append(c->cur, at, len);
    if (header_is(c, "idempotency-key"))
        idem_key_append(c->cur, at, len);
    for (size_t i = 0; i < len; i++, c->value_len++)
        if (c->value_len < sizeof(c->value))
            c->value[c->value_len] = at[i];
    return over_header_limit(c, len);
}

static int on_headers_complete(http_parser *p)
{
    conn_t *c = p->data;
    mph_http_req_t *r = c->cur;
    if (c->in_value)
        end_header_value(c);
    r->http_minor = p->http_major == 1 ? p->http_minor : 0;
    if (p->method == HTTP_GET && c->srv->get_handler) {
        r->is_get = 1; /* a body (if any) is read and dropped */
        return 0;
    }
    if (p->method != HTTP_POST) {
        r->error_status = 405; /* the body (if any) is read and dropped */
        return 0;
    }
    if ((p->flags & F_CONTENTLENGTH) && p->content_length > c->srv->cfg.max_body) {
        r->error_status = 413;
        return 2; /* stop: do not read a body we refuse */
    }
    r->want_continue = c->expect_continue;
    maybe_send_continue(c);
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t len)
{
    conn_t *c = p->data;
    mph_http_req_t *r = c->cur;
    if (r->error_status || r->is_get)
        return 0;
    if (r->body.len + len > c->srv->cfg.max_body) {
        r->error_status = 413;
        return 1;
    }
    mph_buf_append(&r->body, at, len);
    return 0;
}

static int on_message_complete(http_parser *p)
{
    conn_t *c = p->data;
    mph_http_server_t *srv = c->srv;
    mph_http_req_t *r = c->cur;
    c->cur = NULL;
    r->keep_alive = http_should_keep_alive(p) && !srv->shutting_down;
    if (c->writes == 0)
        uv_timer_stop(&c->timer); /* (with writes queued, it watches the client read them) */
    if (r->error_status) {
        respond_error(c, r, r->error_status);
        return 0;
    }
    if (!r->keep_alive)
        conn_drain(c); /* read no further requests on this connection */
    if (r->is_get) {
        if (r->path_len >= sizeof(r->path))
            r->path[0] = '\0'; /* too long: no known path */
        if (!srv->get_handler(srv->ud, r, r->path))
            respond_error(c, r, 405);
        return 0;
    }
    mph_buf_t body = r->body;
    r->body = (mph_buf_t)MPH_BUF_INIT;
    srv->handler(srv->ud, r, body.data ? body.data : "", body.len);
    mph_buf_free(&body);
    return 0;
}

/* ---- Reading ---- */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    conn_t *c = h->data;
    (void)suggested;
    *buf = uv_buf_init(c->srv->read_buf, sizeof(c->srv->read_buf));
}

static void stop_reading(conn_t *c)
{
    if (c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = 0;
    }
}

static void drop_partial(conn_t *c);

/* Ends reading; what is queued is still written, then the connection closes. A request half
 * received is dropped: it can never complete, and the connection closes only once the FIFO
 * is empty. (Never called from a parser callback while c->cur is set.) */
static void conn_drain(conn_t *c)
{
    if (c->state != CONN_OPEN)
        return;
    c->state = CONN_DRAINING;
    if (c->cur)
        drop_partial(c);
    stop_reading(c);
    uv_timer_stop(&c->timer);
    if (c->writes > 0)
        arm_write_timer(c);
}

/* Forgets the half-received request, which is always the tail of the FIFO. */
static void drop_partial(conn_t *c)
{
    mph_http_req_t *partial = c->cur;
    mph_list_remove(&partial->node);
    c->cur = NULL;
    c->in_flight--;
    req_free(partial);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    conn_t *c = s->data;
    if (nread == 0 || c->state != CONN_OPEN)
        return;
    if (nread < 0) {
        /* EOF or a reset: a half-received request is dropped; answers still owed are
         * written if the socket allows (a client may shut down its side after sending). */
        if (c->cur)
            drop_partial(c);
        if (nread != UV_EOF || c->in_flight == 0) {
            conn_close(c);
            return;
        }
        conn_drain(c);
        while (c->state != CONN_CLOSING && run_one_gone(c))
            ; /* the client went: what its requests wait on is cancelled (mph_http_req_on_gone) */
        if (c->state != CONN_CLOSING)
            conn_flush(c);
        return;
    }
    assert(assert_conn_state(c));
    size_t parsed = http_parser_execute(&c->parser, &c->srv->settings, buf->base, (size_t)nread);
    if (c->state != CONN_OPEN)
        return; /* closing, or draining after Connection: close or an error: whatever
                   followed in this read is ignored (the parser stopped on our refusal) */
    enum http_errno err = HTTP_PARSER_ERRNO(&c->parser);
    if (err != HPE_OK) {
        mph_http_req_t *r = c->cur;
        c->cur = NULL;
        if (r == NULL) /* an error before any request line byte was accepted */
            r = req_new(c);
        int status = r->error_status ? r->error_status : 400;
        if (err == HPE_HEADER_OVERFLOW)
            status = 431;
        mph_log(MPH_LOG_DEBUG, "http: %d (%s)", status, http_errno_description(err));
        respond_error(c, r, status);
        return;
    }
    if (c->parser.upgrade || parsed != (size_t)nread) {
        conn_drain(c); /* protocol switches are not supported: answer what came, close */
        conn_flush(c);
        return;
    }
    if (c->state == CONN_OPEN && c->in_flight >= c->srv->cfg.max_pipeline)
        stop_reading(c);
}

static void resume_reading(conn_t *c)
{
    if (c->state == CONN_OPEN && !c->reading &&
        uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
        c->reading = 1;
}

/* ---- Connections ---- */

static size_t write_queue(conn_t *c)
{
    return uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp);
}

static void on_idle_timeout(uv_timer_t *t)
{
    conn_t *c = t->data;
    if (c->writes > 0) {
        size_t queued = write_queue(c);
        if (queued < c->stalled_queue) { /* the client reads, however slowly */
            arm_write_timer(c);
            return;
        }
        mph_log(MPH_LOG_DEBUG, "http: closing a connection whose client does not read");
        conn_close(c);
        return;
    }
    if (answers_owed(c) > 0)
        return; /* waiting on the handler, not on the client; re-armed when it answers */
    mph_log(MPH_LOG_DEBUG, "http: closing an idle connection");
    conn_close(c);
}

static void arm_idle_timer(conn_t *c)
{
    unsigned ms = c->srv->cfg.idle_timeout_ms;
    if (c->srv->shutting_down && ms > DRAIN_IDLE_MS)
        ms = DRAIN_IDLE_MS;
    if (c->state == CONN_OPEN)
        uv_timer_start(&c->timer, on_idle_timeout, ms, 0);
}

/* While responses are being written (in any state but CLOSING: a draining connection must
 * not wait forever on a client that does not read either). */
static void arm_write_timer(conn_t *c)
{
    if (c->state == CONN_CLOSING)
        return;
    c->stalled_queue = write_queue(c);
    uv_timer_start(&c->timer, on_idle_timeout, c->srv->cfg.idle_timeout_ms, 0);
}

static void on_conn_handle_closed(uv_handle_t *h)
{
    conn_t *c = h->data;
    if (--c->open_handles > 0)
        return;
    mph_http_server_t *srv = c->srv;
    mph_list_remove(&c->node); /* from srv->closing */
    free(c);
    srv->nallocated--;
    maybe_drained(srv);
}

static void conn_close(conn_t *c)
{
    if (c->state == CONN_CLOSING)
        return;
    c->state = CONN_CLOSING;
    mph_http_server_t *srv = c->srv;
    /* Cut the requests loose: handlers still running answer into the void. Requests not yet
     * handed to a handler (or already answered) are freed here; written ones are freed by
     * their write callbacks, which run with UV_ECANCELED. Those with a cleanup have it run
     * (mph_http_req_on_gone) once the connection is unlinked, each answering only itself,
     * the newest first. */
    mph_list_t gone, *q, *tmp;
    mph_list_init(&gone);
    mph_list_foreach_safe(q, tmp, &c->reqs) {
        mph_http_req_t *r = mph_list_entry(q, mph_http_req_t, node);
        mph_list_remove(q);
        r->conn = NULL;
        if (r->responded || r == c->cur)
            req_free(r);
        else if (r->gone)
            mph_list_insert_head(&gone, &r->node);
    }
    c->cur = NULL;
    mph_list_remove(&c->node);
    mph_list_insert_tail(&srv->closing, &c->node);
    srv->nconns--;
    uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
    uv_close((uv_handle_t *)&c->timer, on_conn_handle_closed);
    while ((q = mph_list_pop(&gone)) != NULL) {
        mph_http_req_t *r = mph_list_entry(q, mph_http_req_t, node);
        mph_http_gone_cb cb = r->gone;
        r->gone = NULL;
        cb(r->gone_ud, r);
    }
}

/* A connection with its handles initialised and counted, not yet reading. */
static conn_t *conn_new(mph_http_server_t *srv)
{
    conn_t *c = mph_xcalloc(1, sizeof(*c));
    c->srv = srv;
    if (srv->local)
        uv_pipe_init(srv->loop, &c->pipe, 0);
    else
        uv_tcp_init(srv->loop, &c->tcp);
    uv_timer_init(srv->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->open_handles = 2;
    c->state = CONN_OPEN;
    mph_list_init(&c->reqs);
    mph_list_insert_head(&srv->conns, &c->node);
    srv->nconns++;
    srv->nallocated++;
    return c;
}

/* Starts parsing and reading an accepted connection. */
static void conn_start(conn_t *c)
{
    snprintf(c->peer, sizeof(c->peer), "local");
    if (!c->srv->local) {
        if (!c->srv->nodelay_inherited)
            uv_tcp_nodelay(&c->tcp, 1);
        struct sockaddr_storage sa;
        int salen = sizeof(sa);
        if (c->srv->cfg.alog && uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&sa, &salen) == 0)
            uv_ip_name((struct sockaddr *)&sa, c->peer, sizeof(c->peer));
    }
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    arm_idle_timer(c);
    resume_reading(c);
}

/* A Unix-socket client must run as our effective user: the socket's directory keeps other
 * users out, but root (or a file descriptor handed over) could still reach it. */
static int same_user(conn_t *c)
{
    uv_os_fd_t fd;
    return uv_fileno((uv_handle_t *)&c->pipe, &fd) == 0 &&
           mph_localsock_peer_allowed(fd, 0, "http: a local connection");
}

static void on_connection(uv_stream_t *listener, int status)
{
    mph_http_server_t *srv = listener->data;
    if (status < 0) {
        mph_log(MPH_LOG_WARN, "http: accept: %s", uv_strerror(status));
        return;
    }
    conn_t *c = conn_new(srv);
    if (uv_accept(listener, (uv_stream_t *)&c->tcp) != 0) {
        conn_close(c);
        return;
    }
    if (srv->local && !same_user(c)) {
        conn_close(c);
        return;
    }
    if (srv->nconns > srv->cfg.max_connections || srv->shutting_down) {
        mph_log(MPH_LOG_WARN, "http: connection limit (%u) reached, closing a new one",
                srv->cfg.max_connections);
        conn_close(c);
        return;
    }
    conn_start(c);
}

/* ---- Server ---- */

int mph_http_server_new(mph_http_server_t **out, uv_loop_t *loop, const mph_http_config_t *cfg,
                        mph_http_handler_t handler, void *ud)
{
    mph_http_server_t *srv = mph_xcalloc(1, sizeof(*srv));
    srv->loop = loop;
    srv->cfg = *cfg;
    if (srv->cfg.max_pipeline < 2)
        srv->cfg.max_pipeline = 2;
    srv->handler = handler;
    srv->ud = ud;
    srv->shared_fd = -1;
    mph_list_init(&srv->conns);
    mph_list_init(&srv->closing);
    srv->settings.on_message_begin = on_message_begin;
    srv->settings.on_url = on_url;
    srv->settings.on_header_field = on_header_field;
    srv->settings.on_header_value = on_header_value;
    srv->settings.on_headers_complete = on_headers_complete;
    srv->settings.on_body = on_body;
    srv->settings.on_message_complete = on_message_complete;
    *out = srv;
    return 0;
}

/* Sets TCP_NODELAY on a listening socket for the connections it will accept to inherit (a
 * system call less for each: it counts when every request is a new connection). Returns 1
 * if they will, 0 if each must set it itself (not Linux, or the option was refused). */
static int set_listener_nodelay(int fd)
{
#ifdef __linux__
    int one = 1;
    return fd >= 0 && setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == 0;
#else
    (void)fd;
    return 0;
#endif
}

/* The descriptor of a libuv handle, or -1. */
static int uv_fileno_of(uv_tcp_t *tcp)
{
    uv_os_fd_t fd;
    return uv_fileno((uv_handle_t *)tcp, &fd) == 0 ? fd : -1;
}

int mph_http_listen(mph_http_server_t *srv, const char *addr, int port, char *err, size_t errlen)
{
    struct sockaddr_storage sa;
    if (uv_ip4_addr(addr, port, (struct sockaddr_in *)&sa) != 0 &&
        uv_ip6_addr(addr, port, (struct sockaddr_in6 *)&sa) != 0) {
        snprintf(err, errlen, "invalid listen address %s", addr);
        return MPH_EINVAL;
    }
    uv_tcp_init(srv->loop, &srv->listener);
    srv->listener.data = srv;
    srv->listening = srv->listener_open = 1;
    int rc = uv_tcp_bind(&srv->listener, (struct sockaddr *)&sa, 0);
    if (rc == 0)
        srv->nodelay_inherited = set_listener_nodelay(uv_fileno_of(&srv->listener));
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&srv->listener, LISTEN_BACKLOG, on_connection);
    if (rc != 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: %s%s", addr, port, uv_strerror(rc),
                 rc == UV_EADDRINUSE ? " (the port is in use)" : "");
        return rc == UV_EADDRINUSE ? MPH_EADDRINUSE : MPH_ELISTEN;
    }
    struct sockaddr_storage bound;
    int len = sizeof(bound);
    uv_tcp_getsockname(&srv->listener, (struct sockaddr *)&bound, &len);
    srv->port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
    return 0;
}

int mph_http_open_listener(const char *addr, int port, int *fd_out, int *port_out, char *err,
                           size_t errlen)
{
    struct sockaddr_storage sa;
    socklen_t salen = sizeof(struct sockaddr_in);
    if (uv_ip4_addr(addr, port, (struct sockaddr_in *)&sa) != 0) {
        salen = sizeof(struct sockaddr_in6);
        if (uv_ip6_addr(addr, port, (struct sockaddr_in6 *)&sa) != 0) {
            snprintf(err, errlen, "invalid listen address %s", addr);
            return MPH_EINVAL;
        }
    }
    /* As uv_tcp_bind does: SO_REUSEADDR, so a restart can bind while old connections of the
     * previous server linger in TIME_WAIT. Close-on-exec: a child gets it only on purpose. */
    int one = 1, fd = socket(sa.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int rc = fd < 0 ? -errno : 0;
    if (rc == 0 &&
        (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
         bind(fd, (struct sockaddr *)&sa, salen) != 0 || listen(fd, LISTEN_BACKLOG) != 0))
        rc = -errno;
    if (rc != 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: %s%s", addr, port, uv_strerror(rc),
                 rc == UV_EADDRINUSE ? " (the port is in use)" : "");
        if (fd >= 0)
            close(fd);
        return rc == UV_EADDRINUSE ? MPH_EADDRINUSE : MPH_ELISTEN;
    }
    struct sockaddr_storage bound;
    socklen_t len = sizeof(bound);
    getsockname(fd, (struct sockaddr *)&bound, &len);
    *port_out = ntohs(((struct sockaddr_in *)&bound)->sin_port); /* same offset in sin6 */
    *fd_out = fd;
    return 0;
}

int mph_http_listen_unix(mph_http_server_t *srv, int fd, char *err, size_t errlen)
{
    uv_pipe_init(srv->loop, &srv->local_listener, 0);
    srv->local_listener.data = srv;
    srv->local = 1;
    srv->listening = srv->listener_open = 1;
    int rc = uv_pipe_open(&srv->local_listener, fd);
    if (rc == 0)
        fd = -1; /* the handle owns it now */
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&srv->local_listener, LISTEN_BACKLOG, on_connection);
    if (rc != 0) {
        snprintf(err, errlen, "cannot listen on a local socket: %s", uv_strerror(rc));
        if (fd >= 0)
            close(fd);
        return MPH_ELISTEN;
    }
    return 0;
}

const char *mph_http_req_header(const mph_http_req_t *req)
{
    return req->header;
}

/* ---- A listening socket shared with other processes ----
 *
 * Every worker of a supervisor accepts on the same socket; the kernel wakes them all when a
 * connection comes and whoever calls accept() first has it. Left to that race, one worker
 * often wins nearly every time (it is the one already running), and sequential clients all
 * land on it. So a worker that has just accepted pauses for pause_ms before it accepts
 * again: an idle worker takes the next connection, and clients spread over the workers.
 * When every worker is busy or pausing, a new connection waits that long at most. libuv's
 * listening streams cannot pause, hence accept4 on a uv_poll_t of our own. */

#define SHARED_ACCEPT_BATCH 64        /* connections taken per wakeup before pausing */
#define SHARED_ACCEPT_ERROR_PAUSE 100 /* ms of pause after a failed accept (EMFILE...) */

static void on_accept_ready(uv_poll_t *p, int status, int events);

static void on_accept_resume(uv_timer_t *t)
{
    mph_http_server_t *srv = t->data;
    if (!srv->shutting_down)
        uv_poll_start(&srv->accept_poll, UV_READABLE, on_accept_ready);
}

static void on_accept_ready(uv_poll_t *p, int status, int events)
{
    mph_http_server_t *srv = p->data;
    (void)events;
    int accepted = 0, failed = status < 0;
    while (!failed && accepted < SHARED_ACCEPT_BATCH) {
        int fd = accept4(srv->shared_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                /* EMFILE and the like: pause rather than spin on a socket still readable. */
                mph_log(MPH_LOG_WARN, "http: accept: %s", strerror(errno));
                failed = 1;
            }
            break; /* taken by another worker, or none left */
        }
        accepted++;
        conn_t *c = conn_new(srv);
        if (uv_tcp_open(&c->tcp, fd) != 0) {
            close(fd);
            conn_close(c);
        } else if (srv->nconns > srv->cfg.max_connections) {
            mph_log(MPH_LOG_WARN, "http: connection limit (%u) reached, closing a new one",
                    srv->cfg.max_connections);
            conn_close(c);
        } else {
            conn_start(c);
        }
    }
    unsigned pause = failed ? SHARED_ACCEPT_ERROR_PAUSE : accepted ? srv->pause_ms : 0;
    if (pause > 0) {
        uv_poll_stop(&srv->accept_poll);
        uv_timer_start(&srv->accept_pause, on_accept_resume, pause, 0);
    }
}

int mph_http_listen_shared(mph_http_server_t *srv, int fd, unsigned pause_ms, char *err,
                           size_t errlen)
{
    struct sockaddr_storage bound;
    socklen_t len = sizeof(bound);
    int listening = 0;
    socklen_t optlen = sizeof(listening);
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &optlen) != 0 || !listening ||
        getsockname(fd, (struct sockaddr *)&bound, &len) != 0) {
        snprintf(err, errlen, "descriptor %d is not a listening socket", fd);
        return MPH_ELISTEN;
    }
    /* Non-blocking, or a worker that loses the race for a connection would wait in accept4. */
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) {
        snprintf(err, errlen, "descriptor %d: %s", fd, strerror(errno));
        return MPH_ELISTEN;
    }
    srv->port = ntohs(((struct sockaddr_in *)&bound)->sin_port); /* same offset in sin6 */
    srv->shared_fd = fd;
    srv->nodelay_inherited = set_listener_nodelay(fd);
    srv->pause_ms = pause_ms;
    uv_poll_init(srv->loop, &srv->accept_poll, fd);
    uv_timer_init(srv->loop, &srv->accept_pause);
    srv->accept_poll.data = srv->accept_pause.data = srv;
    srv->accept_handles = 2;
    srv->listening = srv->listener_open = 1;
    uv_poll_start(&srv->accept_poll, UV_READABLE, on_accept_ready);
    return 0;
}

int mph_http_port(const mph_http_server_t *srv)
{
    return srv->port;
}

static void maybe_drained(mph_http_server_t *srv)
{
    if (srv->shutting_down && srv->nallocated == 0 && !srv->listener_open && srv->drained) {
        void (*cb)(void *) = srv->drained;
        srv->drained = NULL;
        cb(srv->drained_ud);
    }
}

static void on_listener_closed(uv_handle_t *h)
{
    mph_http_server_t *srv = h->data;
    if (srv->shared_fd >= 0) { /* two handles, then our copy of the socket */
        if (--srv->accept_handles > 0)
            return;
        close(srv->shared_fd);
        srv->shared_fd = -1;
    }
    srv->listener_open = 0;
    maybe_drained(srv);
}

/* Whether c's client may send another request without being told not to: every request it
 * has completed was answered (or is being written) without "Connection: close". */
static int last_answer_keeps_alive(const conn_t *c)
{
    const mph_http_req_t *last = NULL;
    const mph_list_t *q;
    mph_list_foreach(q, &c->reqs) {
        const mph_http_req_t *r = mph_list_entry(q, mph_http_req_t, node);
        if (r != c->cur)
            last = r;
    }
    return last == NULL || (last->responded && last->keep_alive);
}

void mph_http_shutdown(mph_http_server_t *srv, void (*drained)(void *ud), void *ud)
{
    if (srv->shutting_down)
        return;
    srv->shutting_down = 1;
    srv->drained = drained;
    srv->drained_ud = ud;
    if (srv->listener_open && srv->shared_fd >= 0) {
        uv_close((uv_handle_t *)&srv->accept_poll, on_listener_closed);
        uv_close((uv_handle_t *)&srv->accept_pause, on_listener_closed);
    } else if (srv->listener_open) {
        uv_close((uv_handle_t *)&srv->listener, on_listener_closed);
    }
    /* Connections whose last request is unanswered finish with it; the others get a last
     * moment for a request (see the top of this file). */
    mph_list_t *q;
    mph_list_foreach(q, &srv->conns) {
        conn_t *c = mph_list_entry(q, conn_t, node);
        if (!last_answer_keeps_alive(c))
            conn_drain(c);
        else if (c->writes == 0) /* (else on_write arms the timer, shortened now) */
            arm_idle_timer(c);
    }
    maybe_drained(srv);
}

void mph_http_abort(mph_http_server_t *srv)
{
    mph_list_t *q;
    while ((q = mph_list_first(&srv->conns)) != NULL)
        conn_close(mph_list_entry(q, conn_t, node)); /* unlinks it */
    maybe_drained(srv);
}

void mph_http_server_free(mph_http_server_t *srv)
{
    assert(srv->nallocated == 0 && !srv->listener_open && mph_list_empty(&srv->closing));
    free(srv);
}
