/*
 * fetch.c: outbound HTTP exchanges (fetch.h) with libcurl's multi interface, driven by the
 * host's libuv loop through curl's socket and timer callbacks (curl's "multi_socket" API, as
 * its multi-uv.c example does):
 *   - curl says which sockets to watch for what (on_socket): each gets a uv_poll_t (sock_t),
 *     started, changed, or stopped and closed at once when curl is done with it (before curl
 *     closes the descriptor, so libuv never watches a closed one);
 *   - curl says when it wants to be called for its own timeouts (on_curl_timer): one
 *     uv_timer_t;
 *   - either event calls curl_multi_socket_action, after which finished exchanges are read
 *     (check_done) and answered, outside every curl callback, so an answer that starts a new
 *     exchange (the handler fetches again) re-enters curl only where that is allowed.
 * Names are resolved on curl's resolver threads (Debian's libcurl is built with the threaded
 * resolver), and with CURLOPT_QUICK_EXIT an exchange that times out or is cancelled while a
 * lookup hangs leaves that thread to finish on its own instead of joining it on the loop.
 *
 * An exchange (xfer_t) is one easy handle in the multi handle, from mph_fetch_start to its
 * answer: RUNNING in f->xfers, then answered exactly once (finish: with the response, or
 * with why none came) and released; easy handles are kept for the next exchange
 * (curl_easy_reset keeps nothing of the request). Connections, the DNS cache and TLS
 * sessions live in the multi handle, so keep-alive connections are reused across exchanges
 * to the same host and port.
 *
 * What an exchange gets: http and https only; no redirects followed (the handler sees the
 * 3xx and its location); certificates and names verified (against the system's CAs, or only
 * the request's cafile); no "Expect: 100-continue" wait; no body type chosen for the caller
 * (curl's form type for a body is removed unless the caller gave one); a response body over
 * max_body, or a header over MAX_HEAD_BYTES, fails it ("response too large").
 *
 * Closing cancels what is in flight (each answered "cancelled: the host is stopping"),
 * closes the watched sockets' handles before curl closes the sockets, cleans up curl, closes
 * the timer, and frees the fetcher after the last close callback.
 */
#define _GNU_SOURCE
#include "fetch.h"

#include <assert.h>
#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/common.h"
#include "mphost.h" /* MPHOST_VERSION, for the User-Agent */

#define IDLE_EASY_MAX 64         /* easy handles kept for the next exchanges */
#define MAX_CONNECTS 256         /* connections curl keeps open for reuse */
#define MAX_HEAD_BYTES (1 << 20) /* a response's header fields, in all */

typedef struct xfer_s xfer_t;
typedef struct sock_s sock_t;

/* One exchange in flight. */
struct xfer_s {
    mph_fetch_t *f;               /* owner */
    CURL *easy;                   /* owned until released */
    struct curl_slist *headers;   /* owned: the request's fields */
    char *body;                   /* owned: the request body (curl reads it in place) */
    mph_lua_fetch_cb cb;          /* runs once, when it ends */
    void *ud;                     /* for cb */
    char method[40];              /* for the debug line */
    mph_buf_t head;               /* the final response's fields so far: "name\0value\0" */
    mph_buf_t data;               /* its body so far */
    size_t max_body;              /* bytes of body allowed */
    int too_large;                /* 1: the body passed max_body; 2: the header MAX_HEAD_BYTES */
    uint64_t timeout_ms;          /* its whole-exchange timeout */
    uint64_t started;             /* uv_hrtime() at its start */
    char errbuf[CURL_ERROR_SIZE]; /* curl's message about a failure */
    xfer_t *prev, *next;          /* in f->xfers */
};

/* A socket curl asked us to watch. */
struct sock_s {
    uv_poll_t poll;      /* freed in its close callback */
    mph_fetch_t *f;      /* owner */
    curl_socket_t fd;    /* curl's */
    sock_t *prev, *next; /* in f->socks, while watched */
};

struct mph_fetch_s {
    uv_loop_t *loop;           /* borrowed */
    mph_metrics_t *metrics;    /* borrowed */
    CURLM *multi;              /* NULL until the first exchange, and after the close */
    uv_timer_t timer;          /* curl's timeouts */
    xfer_t *xfers;             /* exchanges in flight */
    sock_t *socks;             /* sockets watched */
    CURL *idle[IDLE_EASY_MAX]; /* easy handles for reuse */
    int nidle;
    mph_fetch_tuning_t tuning; /* set on every exchange (mph_fetch_tune); zeros: defaults */
    unsigned handles;          /* uv handles not yet closed: the timer and every sock_t's */
    int closing;               /* mph_fetch_close was called */
    void (*closed)(void *ud);  /* its callback */
    void *closed_ud;
};

/* ---- libcurl, once per process ---- */

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc;

/* curl_global_init is not safe to run twice at once (and never undone: an embedding program
 * may use libcurl too, and curl_global_cleanup would pull it from under it). */
static void curl_init(void)
{
    curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

static void check_done(mph_fetch_t *f);

/* ---- The loop's side: sockets and the timer ---- */

/* Keeps the loop running while an exchange is in flight, and only then: an idle fetcher
 * must not keep an embedding program's loop from ending (its sockets are watched only while
 * an exchange uses them; the timer may stay armed). */
static void update_ref(mph_fetch_t *f)
{
    if (f->xfers)
        uv_ref((uv_handle_t *)&f->timer);
    else
        uv_unref((uv_handle_t *)&f->timer);
}

static void maybe_closed(mph_fetch_t *f)
{
    if (!f->closing || f->handles > 0)
        return;
    void (*closed)(void *) = f->closed;
    void *ud = f->closed_ud;
    free(f);
    if (closed)
        closed(ud);
}

static void on_handle_closed(uv_handle_t *h)
{
    mph_fetch_t *f = h->data;
    if (h != (uv_handle_t *)&f->timer)
        free(mph_container_of((uv_poll_t *)h, sock_t, poll));
    f->handles--;
    maybe_closed(f);
}

static void sock_close(sock_t *s)
{
    mph_fetch_t *f = s->f;
    if (s->prev)
        s->prev->next = s->next;
    else
        f->socks = s->next;
    if (s->next)
        s->next->prev = s->prev;
    s->poll.data = f;
    uv_close((uv_handle_t *)&s->poll, on_handle_closed); /* stops watching fd now */
}

static void on_poll(uv_poll_t *p, int status, int events)
{
    sock_t *s = mph_container_of(p, sock_t, poll);
    mph_fetch_t *f = s->f;
    int flags = 0, running = 0;
    if (status < 0)
        flags = CURL_CSELECT_ERR;
    else
        flags = (events & UV_READABLE ? CURL_CSELECT_IN : 0) |
                (events & UV_WRITABLE ? CURL_CSELECT_OUT : 0);
    /* s may be closed inside (curl is done with the socket); it is freed later. */
    curl_multi_socket_action(f->multi, s->fd, flags, &running);
    check_done(f);
}

/* CURLMOPT_SOCKETFUNCTION: watch fd for `what`, or stop. Returns 0. */
static int on_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    mph_fetch_t *f = userp;
    sock_t *s = socketp;
    (void)easy;
    if (what == CURL_POLL_REMOVE) {
        if (s != NULL) {
            curl_multi_assign(f->multi, fd, NULL);
            sock_close(s);
        }
        return 0;
    }
    if (s == NULL) {
        s = mph_xcalloc(1, sizeof(*s));
        s->f = f;
        s->fd = fd;
        int rc = uv_poll_init_socket(f->loop, &s->poll, fd);
        if (rc != 0) { /* the exchange then ends by its timeout */
            mph_log(MPH_LOG_ERROR, "fetch: cannot watch a socket: %s", uv_strerror(rc));
            free(s);
            return 0;
        }
        f->handles++;
        s->next = f->socks;
        if (f->socks)
            f->socks->prev = s;
        f->socks = s;
        curl_multi_assign(f->multi, fd, s);
    }
    int events = (what & CURL_POLL_IN ? UV_READABLE : 0) | (what & CURL_POLL_OUT ? UV_WRITABLE : 0);
    uv_poll_start(&s->poll, events, on_poll);
    return 0;
}

static void on_timeout(uv_timer_t *t)
{
    mph_fetch_t *f = mph_container_of(t, mph_fetch_t, timer);
    int running = 0;
    if (f->multi == NULL)
        return;
    curl_multi_socket_action(f->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_done(f);
}

/* CURLMOPT_TIMERFUNCTION: call curl back after timeout_ms (0: as soon as possible, from the
 * loop, never from here), or never (-1). */
static int on_curl_timer(CURLM *multi, long timeout_ms, void *userp)
{
    mph_fetch_t *f = userp;
    (void)multi;
    if (timeout_ms < 0)
        uv_timer_stop(&f->timer);
    else
        uv_timer_start(&f->timer, on_timeout, (uint64_t)timeout_ms, 0);
    return 0;
}

/* ---- Responses ---- */

/* CURLOPT_WRITEFUNCTION: the body, up to max_body (beyond: 0, which fails the exchange). */
static size_t on_body(char *ptr, size_t size, size_t n, void *ud)
{
    xfer_t *x = ud;
    size_t len = size * n;
    if (len > x->max_body - x->data.len) {
        x->too_large = 1;
        return 0;
    }
    mph_buf_append(&x->data, ptr, len);
    return len;
}

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* CURLOPT_HEADERFUNCTION: one header line at a time. A status line starts a response (an
 * interim 1xx came before the final one): the fields gathered so far are dropped. Fields
 * keep their order; names go lower-case; lines with a NUL, without a colon or with a name
 * that is not a token are dropped, and a folded line continues the previous value. */
static size_t on_header(char *ptr, size_t size, size_t n, void *ud)
{
    xfer_t *x = ud;
    size_t len = size * n;
    if (len >= 5 && memcmp(ptr, "HTTP/", 5) == 0) {
        x->head.len = 0;
        return len;
    }
    if (x->head.len + len > MAX_HEAD_BYTES) {
        x->too_large = 2;
        return 0;
    }
    size_t end = len;
    while (end > 0 && is_space(ptr[end - 1]))
        end--;
    if (end == 0 || memchr(ptr, '\0', end) != NULL)
        return len;
    if (ptr[0] == ' ' || ptr[0] == '\t') { /* obs-fold: more of the last value */
        if (x->head.len == 0)
            return len;
        size_t start = 0;
        while (start < end && is_space(ptr[start]))
            start++;
        x->head.len--; /* over the value's NUL */
        mph_buf_append(&x->head, " ", 1);
        mph_buf_append(&x->head, ptr + start, end - start);
        mph_buf_append(&x->head, "", 1);
        return len;
    }
    const char *colon = memchr(ptr, ':', end);
    if (colon == NULL || colon == ptr)
        return len;
    size_t nlen = (size_t)(colon - ptr);
    for (size_t i = 0; i < nlen; i++)
        if (ptr[i] <= ' ' || ptr[i] == 0x7f || strchr("\"(),/:;<=>?@[\\]{}", ptr[i]) != NULL)
            return len;
    size_t at = x->head.len;
    mph_buf_append(&x->head, ptr, nlen);
    for (size_t i = at; i < x->head.len; i++)
        if (x->head.data[i] >= 'A' && x->head.data[i] <= 'Z')
            x->head.data[i] = (char)(x->head.data[i] - 'A' + 'a');
    mph_buf_append(&x->head, "", 1);
    size_t v = nlen + 1;
    while (v < end && is_space(ptr[v]))
        v++;
    mph_buf_append(&x->head, ptr + v, end - v);
    mph_buf_append(&x->head, "", 1);
    return len;
}

static int is_tls_error(CURLcode code)
{
    switch (code) {
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_SSL_CRL_BADFILE:
    case CURLE_SSL_SHUTDOWN_FAILED:
    case CURLE_SSL_ENGINE_NOTFOUND:
    case CURLE_SSL_ENGINE_SETFAILED:
    case CURLE_SSL_ENGINE_INITFAILED:
    case CURLE_USE_SSL_FAILED:
        return 1;
    default:
        return 0;
    }
}

/* "HOST port N" out of curl's "Failed to connect to HOST port N after T ms: ...", or the
 * whole message when it does not read so. */
static const char *connect_target(char *detail)
{
    static const char prefix[] = "Failed to connect to ";
    char *after = strstr(detail, " after ");
    if (strncmp(detail, prefix, sizeof(prefix) - 1) != 0 || after == NULL)
        return detail;
    *after = '\0';
    return detail + sizeof(prefix) - 1;
}

/* Why an exchange that ended with `code` (or with no HTTP status) has no response: one line
 * that starts with what kind of failure it was. */
static void describe(const xfer_t *x, CURLcode code, char *why, size_t len)
{
    char detail[CURL_ERROR_SIZE];
    snprintf(detail, sizeof(detail), "%s", x->errbuf[0] ? x->errbuf : curl_easy_strerror(code));
    size_t d = strlen(detail);
    while (d > 0 && is_space(detail[d - 1]))
        detail[--d] = '\0';
    long oserr = 0;
    curl_easy_getinfo(x->easy, CURLINFO_OS_ERRNO, &oserr);
    if (x->too_large == 1 || code == CURLE_FILESIZE_EXCEEDED)
        snprintf(why, len, "response too large: its body is longer than max_body (%zu bytes)",
                 x->max_body);
    else if (x->too_large == 2)
        snprintf(why, len, "response too large: its header is longer than %d bytes",
                 MAX_HEAD_BYTES);
    else if (code == CURLE_OK)
        snprintf(why, len, "not an HTTP response");
    else if (code == CURLE_COULDNT_RESOLVE_HOST)
        snprintf(why, len, "DNS: %s", detail);
    else if (code == CURLE_COULDNT_CONNECT)
        snprintf(why, len, "%s: %s",
                 oserr == ECONNREFUSED ? "connection refused" : "cannot connect",
                 connect_target(detail));
    else if (code == CURLE_OPERATION_TIMEDOUT)
        snprintf(why, len, "timed out after %.3g s", (double)x->timeout_ms / 1000);
    else if (is_tls_error(code))
        snprintf(why, len, "TLS: %s", detail);
    else if (code == CURLE_UNSUPPORTED_PROTOCOL)
        snprintf(why, len, "unsupported URL (http and https only): %s", detail);
    else if (code == CURLE_URL_MALFORMAT)
        snprintf(why, len, "invalid URL: %s", detail);
    else if (code == CURLE_GOT_NOTHING)
        snprintf(why, len, "the server closed the connection without a response");
    else if (code == CURLE_RECV_ERROR || code == CURLE_SEND_ERROR || code == CURLE_PARTIAL_FILE)
        snprintf(why, len, "connection lost: %s", detail);
    else
        snprintf(why, len, "%s", detail);
}

/* ---- Exchanges ---- */

/* Frees x, keeping its easy handle for the next exchange (or cleaning it up). */
static void xfer_release(xfer_t *x)
{
    mph_fetch_t *f = x->f;
    if (x->easy) {
        if (!f->closing && f->nidle < IDLE_EASY_MAX) {
            curl_easy_reset(x->easy);
            f->idle[f->nidle++] = x->easy;
        } else {
            curl_easy_cleanup(x->easy);
        }
    }
    curl_slist_free_all(x->headers);
    free(x->body);
    mph_buf_free(&x->head);
    mph_buf_free(&x->data);
    free(x);
}

static void xfer_unlink(xfer_t *x)
{
    mph_fetch_t *f = x->f;
    if (x->prev)
        x->prev->next = x->next;
    else
        f->xfers = x->next;
    if (x->next)
        x->next->prev = x->prev;
    x->prev = x->next = NULL;
}

/* x has ended (it is out of the multi handle): count it, release it, then answer it, with
 * the response or why there is none (`cancelled`: the close ended it). */
static void finish(xfer_t *x, CURLcode code, const char *cancelled)
{
    mph_fetch_t *f = x->f;
    long status = 0;
    char why[CURL_ERROR_SIZE + 200];
    mph_lua_fetch_res_t res = {0};
    if (cancelled == NULL && code == CURLE_OK)
        curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
    if (cancelled != NULL) {
        snprintf(why, sizeof(why), "%s", cancelled);
        status = 0;
    } else if (code != CURLE_OK || status < 100 || status > 599) {
        describe(x, code, why, sizeof(why));
        status = 0;
    }
    uint64_t ns = uv_hrtime() - x->started;
    if (f->metrics)
        mph_metrics_fetch(f->metrics, (int)status, ns);
    if (status != 0) {
        res.status = (int)status;
        res.headers = mph_buf_steal(&x->head, &res.headers_len);
        res.body = mph_buf_steal(&x->data, &res.body_len);
        mph_log(MPH_LOG_DEBUG, "fetch: %s answered %ld in %.1f ms", x->method, status,
                (double)ns / 1e6);
    } else {
        res.error = why;
        mph_log(MPH_LOG_DEBUG, "fetch: %s failed in %.1f ms: %s", x->method, (double)ns / 1e6, why);
    }
    mph_lua_fetch_cb cb = x->cb;
    void *ud = x->ud;
    xfer_unlink(x);
    xfer_release(x);
    update_ref(f);
    cb(ud, &res); /* may start another exchange */
    free(res.headers);
    free(res.body);
}

/* Answers the exchanges curl has finished. */
static void check_done(mph_fetch_t *f)
{
    CURLMsg *msg;
    int left;
    while (f->multi && (msg = curl_multi_info_read(f->multi, &left)) != NULL) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        CURL *easy = msg->easy_handle;
        CURLcode code = msg->data.result; /* msg is gone once the handle is removed */
        xfer_t *x = NULL;
        curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&x);
        curl_multi_remove_handle(f->multi, easy);
        finish(x, code, NULL);
    }
}

/* curl_slist_append that dies on failure, as mph_xmalloc does. */
static struct curl_slist *xappend(struct curl_slist *list, const char *line)
{
    struct curl_slist *l = curl_slist_append(list, line);
    if (l == NULL) {
        fprintf(stderr, "mphost: out of memory (curl_slist_append)\n");
        abort();
    }
    return l;
}

/* The request's method, body and fields on x's easy handle. */
static void set_request(xfer_t *x, const mph_lua_fetch_req_t *req)
{
    CURL *e = x->easy;
    int typed = 0;
    for (size_t i = 0; i < req->nheaders; i++) {
        x->headers = xappend(x->headers, req->headers[i]);
        typed |= strncasecmp(req->headers[i], "content-type:", 13) == 0;
    }
    x->headers = xappend(x->headers, "Expect:"); /* no wait for a 100 Continue */
    if (req->body != NULL) {
        if (!typed) /* curl would say application/x-www-form-urlencoded */
            x->headers = xappend(x->headers, "Content-Type:");
        x->body = mph_xmalloc(req->body_len + 1);
        memcpy(x->body, req->body, req->body_len);
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, x->body);
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)req->body_len);
        if (strcmp(req->method, "POST") != 0)
            curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, req->method);
    } else if (strcmp(req->method, "GET") == 0) {
        curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    } else if (strcmp(req->method, "HEAD") == 0) {
        curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    } else if (strcmp(req->method, "POST") == 0) {
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, "");
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)0);
    } else {
        curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, req->method);
    }
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, x->headers);
}

/* Everything else about x's easy handle. */
static void set_options(xfer_t *x, const mph_lua_fetch_req_t *req)
{
    CURL *e = x->easy;
    curl_easy_setopt(e, CURLOPT_URL, req->url);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L); /* resolver threads: no SIGALRM */
    curl_easy_setopt(e, CURLOPT_QUICK_EXIT, 1L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)req->timeout_ms);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, x->errbuf);
    curl_easy_setopt(e, CURLOPT_PRIVATE, (char *)x);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, x);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, x);
    curl_easy_setopt(e, CURLOPT_USERAGENT, "mphost/" MPHOST_VERSION);
    if (req->cafile != NULL) { /* only these CAs */
        curl_easy_setopt(e, CURLOPT_CAINFO, req->cafile);
        curl_easy_setopt(e, CURLOPT_CAPATH, NULL);
    }
    const mph_fetch_tuning_t *t = &x->f->tuning;
    if (t->connect_timeout_ms)
        curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)t->connect_timeout_ms);
    if (t->dns_cache_s)
        curl_easy_setopt(e, CURLOPT_DNS_CACHE_TIMEOUT, (long)t->dns_cache_s);
    if (t->max_conn_age_s)
        curl_easy_setopt(e, CURLOPT_MAXAGE_CONN, (long)t->max_conn_age_s);
    if (req->max_body > 0) /* refused at once when Content-Length says more; 0 is "no limit" */
        curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)req->max_body);
    set_request(x, req);
}

/* The multi handle, made at the first exchange. Returns 0 or MPH_EIO. */
static int multi_open(mph_fetch_t *f)
{
    pthread_once(&curl_once, curl_init);
    if (curl_init_rc != CURLE_OK)
        return MPH_EIO;
    f->multi = curl_multi_init();
    if (f->multi == NULL)
        return MPH_EIO;
    curl_multi_setopt(f->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
    curl_multi_setopt(f->multi, CURLMOPT_SOCKETDATA, f);
    curl_multi_setopt(f->multi, CURLMOPT_TIMERFUNCTION, on_curl_timer);
    curl_multi_setopt(f->multi, CURLMOPT_TIMERDATA, f);
    curl_multi_setopt(f->multi, CURLMOPT_MAXCONNECTS, (long)MAX_CONNECTS);
    return 0;
}

int mph_fetch_new(mph_fetch_t **out, uv_loop_t *loop, mph_metrics_t *metrics)
{
    mph_fetch_t *f = mph_xcalloc(1, sizeof(*f));
    f->loop = loop;
    f->metrics = metrics;
    uv_timer_init(loop, &f->timer);
    uv_unref((uv_handle_t *)&f->timer);
    f->timer.data = f;
    f->handles = 1;
    *out = f;
    return 0;
}

void mph_fetch_tune(mph_fetch_t *f, const mph_fetch_tuning_t *tuning)
{
    f->tuning = *tuning;
}

int mph_fetch_start(void *fud, const mph_lua_fetch_req_t *req, mph_lua_fetch_cb cb, void *ud,
                    char *why, size_t whylen)
{
    mph_fetch_t *f = fud;
    if (f->closing) {
        snprintf(why, whylen, "the host is stopping");
        return MPH_ECLOSED;
    }
    if (f->multi == NULL && multi_open(f) != 0) {
        snprintf(why, whylen, "libcurl cannot be set up");
        return MPH_EIO;
    }
    CURL *easy = f->nidle > 0 ? f->idle[--f->nidle] : curl_easy_init();
    if (easy == NULL) {
        snprintf(why, whylen, "libcurl cannot make a transfer (out of memory?)");
        return MPH_EIO;
    }
    xfer_t *x = mph_xcalloc(1, sizeof(*x));
    *x = (xfer_t){.f = f,
                  .easy = easy,
                  .cb = cb,
                  .ud = ud,
                  .max_body = req->max_body,
                  .timeout_ms = req->timeout_ms,
                  .started = uv_hrtime()};
    snprintf(x->method, sizeof(x->method), "%s", req->method);
    set_options(x, req);
    CURLMcode mc = curl_multi_add_handle(f->multi, easy);
    if (mc != CURLM_OK) {
        snprintf(why, whylen, "libcurl refused the transfer: %s", curl_multi_strerror(mc));
        xfer_release(x);
        return MPH_EIO;
    }
    x->next = f->xfers;
    if (f->xfers)
        f->xfers->prev = x;
    f->xfers = x;
    update_ref(f);
    return 0;
}

void mph_fetch_close(mph_fetch_t *f, void (*closed)(void *ud), void *ud)
{
    assert(!f->closing);
    f->closing = 1;
    f->closed = closed;
    f->closed_ud = ud;
    /* What is in flight ends now; answers start nothing new (mph_fetch_start refuses). */
    while (f->xfers) {
        xfer_t *x = f->xfers;
        curl_multi_remove_handle(f->multi, x->easy);
        finish(x, CURLE_OK, "cancelled: the host is stopping");
    }
    if (f->multi) {
        /* curl closes its kept connections in the cleanup: stop watching them first, and
         * hear nothing more from it. */
        curl_multi_setopt(f->multi, CURLMOPT_SOCKETFUNCTION, NULL);
        curl_multi_setopt(f->multi, CURLMOPT_TIMERFUNCTION, NULL);
        while (f->socks)
            sock_close(f->socks);
        curl_multi_cleanup(f->multi);
        f->multi = NULL;
    }
    while (f->nidle > 0)
        curl_easy_cleanup(f->idle[--f->nidle]);
    uv_close((uv_handle_t *)&f->timer, on_handle_closed);
}
