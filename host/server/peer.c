/*
 * peer.c: the channel between the workers of one generation (peer.h says what it promises).
 *
 * The listener side is an http.c server on a Unix socket in the generation's socket directory
 * (localsock.h), with rpc.c's forwarded handler: only it reads the role header, so the public
 * port cannot be asked for a role.
 *
 * The client side. A forward is one call sent to one worker; its states:
 *
 *   WAITING --a connection (pooled, or new)--> SENT    (fwd_try; the request is written once)
 *   WAITING --connection refused--> WAITING            (fwd_try: again after 10, 20, 40 ... ms,
 *                                                       until RETRY_WINDOW_MS have passed)
 *   WAITING --refused for too long, or stopping--> DONE (the timer fires the failure)
 *   SENT --a whole answer--> DONE                      (fwd_answered)
 *   SENT --EOF, error, malformed answer, timeout--> DONE (fwd_fail; the connection closes)
 *
 * Until DONE a forward is in peer->fwds (which a stop fails at once: fail_all); in DONE its
 * callback has run and only its timer's close is awaited (then it is freed).
 * Every failure answers -32005 "worker N unavailable: why". A failure found while
 * mph_peer_forward runs is answered from the timer, so the callback never runs before
 * mph_peer_forward returns (the bridge relies on that, as on storage.h's callbacks).
 *
 * A connection is IDLE (in its worker's pool, peer->idle[worker], newest first, unless it was
 * just opened; read for end of file only), BUSY (carrying one forward: one request, one
 * answer; no pipelining, so a slow call holds no other behind it) or CLOSING; in peer->conns
 * until freed. One whose forward failed or timed out is never reused: its answer could
 * still come and be read as the next forward's. The pool keeps at most POOL_MAX idle
 * connections per worker, each for cfg.idle_ms, below the listener's idle timeout so that the
 * listener never closes one under a request we are writing.
 *
 * Why a refused connection is retried for a while: a worker that was killed is replaced in
 * well under a second, and until its replacement listens, its name refuses connections; a
 * request that was refused was certainly not received, so sending it again is safe. Past
 * RETRY_WINDOW_MS the worker is taken to be gone (its replacement may be backing off).
 */
#define _GNU_SOURCE
#include "peer.h"

#include <assert.h>
#include <errno.h>
#include <http_parser.h>
#include <jansson.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/json.h"
#include "common/common.h"
#include "common/list.h"
#include "config.h"
#include "localsock.h"
#include "rpc.h"

#define RETRY_FIRST_MS 10    /* the first wait after a refused connection, doubling */
#define RETRY_WINDOW_MS 1000 /* refused this long after the forward began: the worker is gone */
#define POOL_MAX 16          /* idle connections kept per worker */

typedef enum { FWD_WAITING, FWD_SENT, FWD_DONE } fwd_state_t;
typedef enum { PCONN_IDLE, PCONN_BUSY, PCONN_CLOSING } pconn_state_t;

typedef struct fwd_s fwd_t;
typedef struct pconn_s pconn_t;

struct fwd_s {
    mph_list_t node; /* in peer->fwds (for a stop) until answered (first: list.h) */
    mph_peer_t *peer;
    int worker;          /* 1..count */
    fwd_state_t state;   /* see the diagram above */
    mph_buf_t request;   /* the whole HTTP request, until a connection sends it */
    mph_lua_reply_cb cb; /* runs once, then the forward only waits for its timer's close */
    void *ud;            /* for cb */
    uint64_t started;    /* uv_now() when it was asked for */
    uint64_t retry_ms;   /* the next wait after a refused connection */
    char why[200];       /* WAITING: the failure the timer answers ("" while retrying) */
    uv_timer_t timer;    /* WAITING: the retry or the failure; SENT: the deadline */
    pconn_t *conn;       /* SENT: the connection carrying it */
};

struct pconn_s {
    mph_list_t node; /* in peer->conns until freed (first: list.h) */
    uv_pipe_t pipe;
    uv_timer_t idle; /* IDLE: closes it after cfg.idle_ms */
    mph_peer_t *peer;
    int worker;           /* whose listener it reaches */
    pconn_state_t state;  /* IDLE, BUSY, CLOSING */
    int open_handles;     /* frees itself when this reaches 0 */
    fwd_t *fwd;           /* BUSY: the forward it carries */
    http_parser parser;   /* the answer, in response mode */
    mph_buf_t body;       /* the answer's body so far */
    int complete;         /* the answer has ended */
    int reusable;         /* ... and the connection may carry another request */
    mph_list_t idle_node; /* in peer->idle[worker] while IDLE and pooled */
};

/* A write in flight, on its own: it outlives the forward and the connection's reuse, and its
 * callback (which runs before the connection's close callbacks) frees it. */
typedef struct {
    uv_write_t req; /* its callback frees the whole */
    pconn_t *conn;  /* the connection written on */
    size_t len;     /* bytes in data */
    char data[];    /* the request */
} pwrite_t;

struct mph_peer_s {
    uv_loop_t *loop;
    mph_peer_config_t cfg;
    mph_http_server_t *server; /* the listener side (owned), or NULL */
    int server_open;           /* server exists and has not drained */
    mph_list_t conns;          /* connections not freed yet, closing ones too (pconn_t.node) */
    mph_list_t *idle;          /* [1..count]: each worker's idle connections (pconn_t.idle_node),
                                  newest first */
    int *nidle;                /* [1..count]: how many */
    mph_list_t fwds;           /* unanswered forwards (fwd_t.node) */
    unsigned handles;          /* open handles of connections and forwards */
    int stopping;              /* mph_peer_shutdown was called: forwards fail at once */
    void (*closed)(void *ud);  /* until it has run */
    void *closed_ud;
    http_parser_settings settings; /* the answers' parser callbacks */
    char read_buf[65536];          /* shared: reads are consumed synchronously */
};

static void pconn_close(pconn_t *c);
static void fwd_try(fwd_t *f);
static void maybe_closed(mph_peer_t *p);

#ifndef NDEBUG
/* A forward's invariants in its state (the diagram above); used as
 * assert(assert_fwd_state(f)) at each transition. */
static int assert_fwd_state(const fwd_t *f)
{
    switch (f->state) {
    case FWD_WAITING: /* its request is still its own */
        assert(f->conn == NULL && f->request.len > 0);
        break;
    case FWD_SENT: /* its request went out on the connection that carries it */
        assert(f->conn != NULL && f->conn->fwd == f && f->request.len == 0);
        break;
    case FWD_DONE: /* answered: nothing refers to it but its closing timer */
        assert(f->conn == NULL && !mph_list_is_linked(&f->node));
        break;
    default:
        assert(!"unknown forward state");
    }
    return 1;
}

/* A connection's invariants in its state; used as assert(assert_pconn_state(c)). */
static int assert_pconn_state(const pconn_t *c)
{
    switch (c->state) {
    case PCONN_IDLE:
    case PCONN_CLOSING:
        assert(c->fwd == NULL);
        break;
    case PCONN_BUSY:
        assert(c->fwd != NULL && c->fwd->conn == c);
        break;
    default:
        assert(!"unknown connection state");
    }
    return 1;
}
#endif

/* The socket name of `worker` of `generation` in the socket directory. */
static void peer_name(int generation, int worker, char *out, size_t size)
{
    snprintf(out, size, MPH_PEER_SOCKET_FORMAT, generation, worker);
}

int mph_peer_target_generation(const mph_peer_t *p)
{
    /* Its own, or the one that serves now if it is newer: once a reload has switched to a
     * new generation, the old one is stopping (its peers may be gone already), and the new
     * workers all listen (the switch waits for every one to be ready). A generation not yet
     * switched to forwards nothing: its workers do not take calls before then. */
    uint64_t serving = p->cfg.serving ? __atomic_load_n(p->cfg.serving, __ATOMIC_RELAXED) : 0;
    return serving > (uint64_t)p->cfg.generation ? (int)serving : p->cfg.generation;
}

/* ---- Forwards ---- */

static void on_fwd_closed(uv_handle_t *h)
{
    fwd_t *f = h->data;
    mph_peer_t *p = f->peer;
    mph_buf_free(&f->request);
    free(f);
    p->handles--;
    maybe_closed(p);
}

/* Answers f (the reply is borrowed by the callback) and lets it go. */
static void fwd_finish(fwd_t *f, mph_lua_reply_t *reply)
{
    assert(f->state != FWD_DONE && f->conn == NULL);
    if (mph_list_is_linked(&f->node)) /* (fail_all has taken it out already) */
        mph_list_remove(&f->node);
    f->state = FWD_DONE;
    assert(assert_fwd_state(f));
    uv_timer_stop(&f->timer);
    f->cb(f->ud, reply);
    free(reply->json);
    free(reply->message);
    uv_close((uv_handle_t *)&f->timer, on_fwd_closed);
}

/* Answers f with -32005; its connection, if it has one, is closed (an answer could still come
 * on it, and must not be taken for the next forward's). */
static void fwd_fail(fwd_t *f, const char *why)
{
    char msg[300];
    snprintf(msg, sizeof(msg), "worker %d unavailable: %s", f->worker, why);
    mph_log(f->peer->stopping ? MPH_LOG_DEBUG : MPH_LOG_WARN, "forward: %s", msg);
    pconn_t *c = f->conn;
    if (c != NULL) {
        c->fwd = NULL;
        f->conn = NULL;
        pconn_close(c);
    }
    mph_lua_reply_t reply = {MPH_RPC_WORKER_UNAVAILABLE, NULL, 0, mph_xstrdup(msg), 0};
    fwd_finish(f, &reply);
}

static void on_fwd_timer(uv_timer_t *t);

/* Fails f from its timer, at once: from mph_peer_forward, a failure must wait for the loop. */
static void fwd_fail_later(fwd_t *f, const char *why)
{
    snprintf(f->why, sizeof(f->why), "%s", why);
    uv_timer_start(&f->timer, on_fwd_timer, 0, 0);
}

static void on_fwd_timer(uv_timer_t *t)
{
    fwd_t *f = t->data;
    if (f->why[0] != '\0') {
        fwd_fail(f, f->why);
    } else if (f->state == FWD_SENT) {
        char why[96];
        snprintf(why, sizeof(why), "no answer within %u ms", f->peer->cfg.timeout_ms);
        fwd_fail(f, why);
    } else {
        fwd_try(f);
    }
}

/* ---- Connections ---- */

static void on_pconn_closed(uv_handle_t *h)
{
    pconn_t *c = h->data;
    if (--c->open_handles > 0)
        return;
    mph_peer_t *p = c->peer;
    mph_list_remove(&c->node);
    mph_buf_free(&c->body);
    free(c);
    p->handles -= 2;
    maybe_closed(p);
}

static void pool_remove(pconn_t *c)
{
    if (!mph_list_is_linked(&c->idle_node))
        return;
    mph_list_remove(&c->idle_node);
    c->peer->nidle[c->worker]--;
}

static void pconn_close(pconn_t *c)
{
    if (c->state == PCONN_CLOSING)
        return;
    assert(c->fwd == NULL); /* a forward on it has been answered or failed first */
    if (c->state == PCONN_IDLE)
        pool_remove(c);
    c->state = PCONN_CLOSING;
    uv_close((uv_handle_t *)&c->pipe, on_pconn_closed);
    uv_close((uv_handle_t *)&c->idle, on_pconn_closed);
}

static void on_idle_timeout(uv_timer_t *t)
{
    pconn_close(t->data);
}

/* An answered connection goes back to its worker's pool, or closes. */
static void pconn_release(pconn_t *c)
{
    mph_peer_t *p = c->peer;
    if (!c->reusable || p->stopping || p->nidle[c->worker] >= POOL_MAX) {
        pconn_close(c);
        return;
    }
    c->state = PCONN_IDLE;
    assert(assert_pconn_state(c));
    mph_list_insert_head(&p->idle[c->worker], &c->idle_node);
    p->nidle[c->worker]++;
    uv_timer_start(&c->idle, on_idle_timeout, p->cfg.idle_ms, 0);
}

int mph_peer_read_answer(const char *text, size_t len, mph_lua_reply_t *reply, char *why,
                         size_t whylen)
{
    json_error_t jerr;
    json_t *doc = mph_json_load(text, len, &jerr);
    json_t *result = json_object_get(doc, "result"), *error = json_object_get(doc, "error");
    json_t *code = json_object_get(error, "code"), *message = json_object_get(error, "message");
    json_t *data = json_object_get(error, "data");
    mph_buf_t b = MPH_BUF_INIT;
    int rc = -1;
    if (doc == NULL) {
        snprintf(why, whylen, "its answer is not JSON: %s", jerr.text);
    } else if (result != NULL && error == NULL) {
        rc = mph_json_write_jansson(&b, result) == 0 ? 0 : -1;
    } else if (json_is_integer(code) && json_integer_value(code) != 0 &&
               json_integer_value(code) == (int32_t)json_integer_value(code) &&
               json_is_string(message)) {
        reply->code = (int)json_integer_value(code);
        reply->message = mph_xstrdup(json_string_value(message));
        rc = data == NULL || mph_json_write_jansson(&b, data) == 0 ? 0 : -1;
    }
    if (rc != 0 && doc != NULL)
        snprintf(why, whylen, "its answer is not a JSON-RPC reply");
    if (rc == 0 && b.len > 0)
        reply->json = mph_buf_steal(&b, &reply->json_len);
    reply->replayed = rc == 0 && json_is_true(json_object_get(doc, MPH_LUA_FORWARD_REPLAYED));
    mph_buf_free(&b);
    json_decref(doc);
    return rc;
}

/* c's answer to f is complete: f hears it, c goes back to the pool. */
static void fwd_answered(fwd_t *f, pconn_t *c)
{
    char why[300] = "";
    mph_lua_reply_t reply = {0, NULL, 0, NULL, 0};
    int status = c->parser.status_code;
    /* 401: every call of the request was answered -32004 (a handler's mp.error); 403: a call
     * another host sent was refused (rpc.h, mph_rpc_refuse_host). Both carry the answer. */
    if (status != 200 && status != 401 && status != 403)
        snprintf(why, sizeof(why), "it answered HTTP %d", status);
    else
        mph_peer_read_answer(c->body.data ? c->body.data : "", c->body.len, &reply, why,
                             sizeof(why));
    if (why[0] != '\0') {
        free(reply.message);
        fwd_fail(f, why);
        return;
    }
    c->fwd = NULL;
    f->conn = NULL;
    pconn_release(c);
    fwd_finish(f, &reply);
}

static int on_answer_body(http_parser *parser, const char *at, size_t len)
{
    pconn_t *c = parser->data;
    mph_buf_append(&c->body, at, len);
    return 0;
}

static int on_answer_complete(http_parser *parser)
{
    pconn_t *c = parser->data;
    c->complete = 1;
    c->reusable = http_should_keep_alive(parser);
    http_parser_pause(parser, 1); /* whatever follows is not ours to read */
    return 0;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    pconn_t *c = h->data;
    (void)suggested;
    *buf = uv_buf_init(c->peer->read_buf, sizeof(c->peer->read_buf));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    pconn_t *c = s->data;
    assert(assert_pconn_state(c));
    if (nread == 0 || c->state == PCONN_CLOSING)
        return;
    if (c->state == PCONN_IDLE || nread < 0) {
        /* Closed by the worker (its idle timeout, its stop, its death) or bytes nobody asked
         * for: either way the connection is done. */
        if (c->state == PCONN_BUSY)
            fwd_fail(c->fwd, nread == UV_EOF ? "it closed the connection before answering"
                                             : uv_strerror((int)nread));
        else
            pconn_close(c);
        return;
    }
    size_t parsed = http_parser_execute(&c->parser, &c->peer->settings, buf->base, (size_t)nread);
    if (c->complete) {
        if (parsed != (size_t)nread)
            c->reusable = 0;
        fwd_answered(c->fwd, c);
        return;
    }
    enum http_errno err = HTTP_PARSER_ERRNO(&c->parser);
    if (err != HPE_OK) {
        char why[160];
        snprintf(why, sizeof(why), "malformed answer (%s)", http_errno_description(err));
        fwd_fail(c->fwd, why);
    }
}

/* Connects to `worker`'s listener. Returns the connection (IDLE, not in the pool), or NULL
 * with why filled: nothing was sent, so the forward may try again. */
static pconn_t *pconn_open(mph_peer_t *p, int worker, char *why, size_t whylen)
{
    char name[32];
    peer_name(mph_peer_target_generation(p), worker, name, sizeof(name));
    int fd = mph_localsock_connect(p->cfg.dir_fd, name, 1);
    if (fd < 0) {
        snprintf(why, whylen, "%s", fd == -EAGAIN ? "its queue is full" : uv_strerror(fd));
        return NULL;
    }
    char who[64];
    snprintf(who, sizeof(who), "forward: worker %d", worker);
    if (!mph_localsock_peer_allowed(fd, 0, who)) { /* root's process, in our directory */
        snprintf(why, whylen, "its socket is not ours");
        close(fd);
        return NULL;
    }
    pconn_t *c = mph_xcalloc(1, sizeof(*c));
    c->peer = p;
    c->worker = worker;
    c->state = PCONN_IDLE;
    uv_pipe_init(p->loop, &c->pipe, 0);
    uv_timer_init(p->loop, &c->idle);
    c->pipe.data = c->idle.data = c;
    c->open_handles = 2;
    p->handles += 2;
    mph_list_insert_head(&p->conns, &c->node);
    int rc = uv_pipe_open(&c->pipe, fd);
    if (rc != 0)
        close(fd); /* not the handle's: it refused it */
    else
        rc = uv_read_start((uv_stream_t *)&c->pipe, on_alloc, on_read);
    if (rc != 0) {
        snprintf(why, whylen, "%s", uv_strerror(rc));
        pconn_close(c);
        return NULL;
    }
    return c;
}

static void on_written(uv_write_t *w, int status)
{
    pwrite_t *pw = mph_container_of(w, pwrite_t, req);
    pconn_t *c = pw->conn; /* alive: write callbacks run before close callbacks */
    free(pw);
    if (status < 0 && c->state == PCONN_BUSY)
        fwd_fail(c->fwd, uv_strerror(status));
}

/* Sends f on c: from now on f is never sent again. */
static void fwd_send(fwd_t *f, pconn_t *c)
{
    mph_peer_t *p = f->peer;
    assert(c->state == PCONN_IDLE && c->fwd == NULL);
    uv_timer_stop(&c->idle);
    c->state = PCONN_BUSY;
    c->fwd = f;
    c->complete = c->reusable = 0;
    c->body.len = 0;
    http_parser_init(&c->parser, HTTP_RESPONSE);
    c->parser.data = c;
    f->conn = c;
    f->state = FWD_SENT;
    pwrite_t *pw = mph_xmalloc(sizeof(*pw) + f->request.len);
    pw->conn = c;
    pw->len = f->request.len;
    memcpy(pw->data, f->request.data, f->request.len);
    mph_buf_free(&f->request);
    assert(assert_fwd_state(f) && assert_pconn_state(c));
    uv_buf_t b = uv_buf_init(pw->data, (unsigned)pw->len);
    uint64_t elapsed = uv_now(p->loop) - f->started;
    uv_timer_start(&f->timer, on_fwd_timer,
                   elapsed < p->cfg.timeout_ms ? p->cfg.timeout_ms - elapsed : 0, 0);
    int rc = uv_write(&pw->req, (uv_stream_t *)&c->pipe, &b, 1, on_written);
    if (rc < 0) {
        free(pw);
        fwd_fail_later(f, uv_strerror(rc)); /* from the timer: this may run in mph_peer_forward */
    }
}

/* Sends f on a pooled connection or a new one; when none can be had, waits and tries again,
 * or (past the retry window) fails. Never answers f before returning. */
static void fwd_try(fwd_t *f)
{
    mph_peer_t *p = f->peer;
    char why[160];
    if (p->stopping) {
        fwd_fail_later(f, "this worker is stopping");
        return;
    }
    mph_list_t *pooled = mph_list_first(&p->idle[f->worker]);
    pconn_t *c = pooled ? mph_list_entry(pooled, pconn_t, idle_node) : NULL;
    if (c != NULL) {
        pool_remove(c);
    } else if ((c = pconn_open(p, f->worker, why, sizeof(why))) == NULL) {
        uint64_t elapsed = uv_now(p->loop) - f->started;
        uint64_t window = RETRY_WINDOW_MS < p->cfg.timeout_ms ? RETRY_WINDOW_MS : p->cfg.timeout_ms;
        if (elapsed >= window) {
            fwd_fail_later(f, why);
            return;
        }
        uv_timer_start(&f->timer, on_fwd_timer,
                       f->retry_ms < window - elapsed ? f->retry_ms : window - elapsed, 0);
        f->retry_ms *= 2;
        return;
    }
    fwd_send(f, c);
}

/* Sends body to `worker` with the role header's value `role_value`. */
static void forward_as(mph_peer_t *p, int worker, const char *role_value, const char *body,
                       size_t len, mph_lua_reply_cb cb, void *ud)
{
    assert(worker >= 1 && worker <= p->cfg.count && worker != p->cfg.id);
    fwd_t *f = mph_xcalloc(1, sizeof(*f));
    f->peer = p;
    f->worker = worker;
    f->cb = cb;
    f->ud = ud;
    f->started = uv_now(p->loop);
    f->retry_ms = RETRY_FIRST_MS;
    mph_buf_printf(&f->request,
                   "POST / HTTP/1.1\r\nHost: mphost\r\nContent-Type: application/json\r\n"
                   "%s: %s\r\nContent-Length: %zu\r\n\r\n",
                   MPH_RPC_FORWARD_HEADER, role_value, len);
    mph_buf_append(&f->request, body, len);
    uv_timer_init(p->loop, &f->timer);
    f->timer.data = f;
    p->handles++;
    mph_list_insert_head(&p->fwds, &f->node);
    assert(assert_fwd_state(f));
    fwd_try(f);
}

void mph_peer_forward(void *fud, int worker, mph_lua_role_t role, const char *body, size_t len,
                      mph_lua_reply_cb cb, void *ud)
{
    forward_as(fud, worker, mph_lua_role_name(role), body, len, cb, ud);
}

void mph_peer_relay(mph_peer_t *p, int worker, const char *body, size_t len, mph_lua_reply_cb cb,
                    void *ud)
{
    forward_as(p, worker, MPH_RPC_FORWARD_HOST, body, len, cb, ud);
}

int mph_peer_count(const mph_peer_t *p)
{
    return p->cfg.count;
}

/* ---- Lifecycle ---- */

int mph_peer_new(mph_peer_t **out, uv_loop_t *loop, const mph_peer_config_t *cfg)
{
    mph_peer_t *p = mph_xcalloc(1, sizeof(*p));
    p->loop = loop;
    p->cfg = *cfg;
    mph_list_init(&p->conns);
    mph_list_init(&p->fwds);
    p->idle = mph_xcalloc((size_t)cfg->count + 1, sizeof(*p->idle));
    for (int w = 0; w <= cfg->count; w++)
        mph_list_init(&p->idle[w]);
    p->nidle = mph_xcalloc((size_t)cfg->count + 1, sizeof(*p->nidle));
    p->settings.on_body = on_answer_body;
    p->settings.on_message_complete = on_answer_complete;
    *out = p;
    return 0;
}

int mph_peer_listen(mph_peer_t *p, const mph_http_config_t *http, mph_rpc_t *rpc, char *err,
                    size_t errlen)
{
    mph_http_config_t cfg = *http;
    cfg.capture_header = MPH_RPC_FORWARD_HEADER;
    cfg.alog = NULL; /* the public port logged the call that was forwarded */
    /* A forwarded call is the public one re-encoded (numbers and escapes may be written
     * longer): leave room, or a call the public port took could be refused here. */
    cfg.max_body = http->max_body * 2 + 4096;
    mph_http_server_new(&p->server, p->loop, &cfg, mph_rpc_handle_forwarded, rpc);
    p->server_open = 1;
    char name[32];
    peer_name(p->cfg.generation, p->cfg.id, name, sizeof(name));
    int fd = mph_localsock_listen(p->cfg.dir_fd, name, 511);
    if (fd < 0) {
        snprintf(err, errlen, "cannot listen on the peer socket %s: %s", name, uv_strerror(fd));
        return MPH_ELISTEN;
    }
    return mph_http_listen_unix(p->server, fd, err, errlen);
}

static void maybe_closed(mph_peer_t *p)
{
    if (p->stopping && !p->server_open && p->handles == 0 && p->closed != NULL) {
        void (*cb)(void *) = p->closed;
        p->closed = NULL;
        cb(p->closed_ud);
    }
}

/* Fails every unanswered forward now, newest first. Those that the callbacks start meanwhile
 * are not in the list taken here: they fail from their timers (the peer is stopping). */
static void fail_all(mph_peer_t *p)
{
    mph_list_t all, *q;
    mph_list_init(&all);
    mph_list_move(&all, &p->fwds);
    while ((q = mph_list_pop(&all)) != NULL)
        fwd_fail(mph_list_entry(q, fwd_t, node), "this worker is stopping");
}

static void close_pools(mph_peer_t *p)
{
    mph_list_t *q;
    for (int w = 1; w <= p->cfg.count; w++)
        while ((q = mph_list_first(&p->idle[w])) != NULL)
            pconn_close(mph_list_entry(q, pconn_t, idle_node)); /* takes it out */
}

static void on_server_drained(void *ud)
{
    mph_peer_t *p = ud;
    p->server_open = 0;
    fail_all(p);
    close_pools(p);
    maybe_closed(p);
}

void mph_peer_shutdown(mph_peer_t *p, void (*closed)(void *ud), void *ud)
{
    if (p->stopping)
        return;
    p->stopping = 1;
    p->closed = closed;
    p->closed_ud = ud;
    close_pools(p); /* no new request on them: the listeners close theirs now too */
    if (p->server != NULL)
        mph_http_shutdown(p->server, on_server_drained, p);
    else
        on_server_drained(p);
}

void mph_peer_abort(mph_peer_t *p)
{
    if (p->server != NULL)
        mph_http_abort(p->server);
    fail_all(p);
}

void mph_peer_free(mph_peer_t *p)
{
    assert(p->handles == 0 && mph_list_empty(&p->conns) && mph_list_empty(&p->fwds));
    if (p->server != NULL)
        mph_http_server_free(p->server);
    free(p->idle);
    free(p->nidle);
    free(p);
}
