/*
 * http_fixture.h: host/http.c and host/rpc.c driven without a listener, for spec/unit/http.c,
 * spec/unit/rpc.c and spec/fuzz/http.c. The including file includes host/common.c,
 * lua/json.c, host/http.c, host/auth.c and host/rpc.c first (this reaches their statics).
 *
 * A fake bridge stands in for lua/: mph_lua_call_as answers "sync" at once, "echo" and "fail"
 * later (fx_answer, newest first, so that completions come out of order), anything else with
 * -32601. An echo result carries the call's sequence number and its id, which lets a checker
 * tell that responses come in request order and carry the right ids. "priv" stands for a
 * service behind mp.basicAuth; the authenticator has no users, so its calls are refused.
 *
 * The connection is a real uv_tcp_t on one end of a socketpair: what the server writes is
 * read from the other end, through libuv's real write path. Its input is handed to on_read
 * directly, in chunks the caller chooses, only while the connection is reading, as the
 * kernel would; that keeps every run deterministic. EOF goes through the same call.
 */
#ifndef MPH_SPEC_HTTP_FIXTURE_H
#define MPH_SPEC_HTTP_FIXTURE_H

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

/* ---- The fake bridge ---- */

typedef struct fake_call_s {
    mph_list_t node; /* in fake_pending (first: list.h) */
    mph_lua_reply_cb cb;
    void *ud;
    int code;      /* 0: result */
    char *json;    /* result or error data (owned) */
    char *message; /* error message (owned) */
} fake_call_t;

static mph_list_t fake_pending = MPH_LIST_INIT(fake_pending); /* deferred calls, newest first */
static unsigned fake_seq;                                     /* calls seen, in dispatch order */

static void fake_reply(fake_call_t *call)
{
    mph_lua_reply_t reply = {call->code, call->json, call->json ? strlen(call->json) : 0,
                             call->message, 0};
    call->cb(call->ud, &reply);
    free(reply.json); /* whatever the callback did not take */
    free(reply.message);
    free(call);
}

int mph_lua_needs_auth(mph_lua_t *lua, const char *method, size_t mlen)
{
    (void)lua;
    return mlen == 4 && memcmp(method, "priv", 4) == 0;
}

void mph_lua_call_as(mph_lua_t *lua, mph_lua_role_t role, const char *user, const char *method,
                     size_t mlen, const json_t *params, mph_lua_reply_cb cb, void *ud)
{
    (void)lua;
    (void)role; /* the fake answers every role alike */
    (void)user;
    const part_t *part = ud; /* rpc.c's: the id the answer must carry */
    fake_call_t *call = mph_xcalloc(1, sizeof(*call));
    call->cb = cb;
    call->ud = ud;
    int known = (mlen == 4 && memcmp(method, "echo", 4) == 0) ||
                (mlen == 4 && memcmp(method, "sync", 4) == 0);
    if (known) {
        mph_buf_t b = MPH_BUF_INIT;
        mph_buf_printf(&b, "{\"seq\":%u,\"id\":", ++fake_seq);
        if (part->id == NULL || mph_json_write_jansson(&b, part->id) != 0)
            mph_buf_puts(&b, "\"none\"");
        mph_buf_puts(&b, ",\"params\":");
        if (params == NULL || mph_json_write_jansson(&b, params) != 0)
            mph_buf_puts(&b, "null");
        mph_buf_puts(&b, "}");
        call->json = mph_buf_steal(&b, NULL);
    } else if (mlen == 4 && memcmp(method, "fail", 4) == 0) {
        call->code = MPH_RPC_HANDLER_ERROR;
        call->message = mph_xstrdup("boom");
    } else {
        call->code = MPH_RPC_METHOD_NOT_FOUND;
        call->message = mph_xstrdup("Method not found");
        known = -1; /* answered at once, as the bridge does */
    }
    if (known == -1 || (mlen == 4 && memcmp(method, "sync", 4) == 0)) {
        fake_reply(call);
        return;
    }
    mph_list_insert_head(&fake_pending, &call->node);
}

/* The fake has no keys: a keyed call is answered as any other (rpc.c's handling of the header
 * is what spec/test_idempotency.py tests, on the real bridge). */
void mph_lua_call_keyed(mph_lua_t *lua, mph_lua_role_t role, const char *user, const char *key,
                        size_t klen, const char *method, size_t mlen, const json_t *params,
                        mph_lua_reply_cb cb, void *ud)
{
    (void)key;
    (void)klen;
    mph_lua_call_as(lua, role, user, method, mlen, params, cb, ud);
}

int mph_lua_idem_key_valid(const char *key, size_t len)
{
    return key != NULL && len >= 1 && len <= MPH_LUA_IDEM_KEY_MAX;
}

/* Answers every deferred call, newest first (and those their answers start). */
static int fx_answer(void)
{
    int n = 0;
    mph_list_t *q;
    while ((q = mph_list_pop(&fake_pending)) != NULL) {
        fake_reply(mph_list_entry(q, fake_call_t, node));
        n++;
    }
    return n;
}

int mph_lua_role_parse(const char *name, mph_lua_role_t *out)
{
    *out = MPH_LUA_CALL;
    return name[0] == '\0' ? 0 : MPH_EINVAL;
}

/* ---- The connection ---- */

typedef struct {
    uv_loop_t loop;
    mph_http_server_t *srv;
    mph_rpc_t rpc;   /* what the server dispatches to: the fake bridge, an empty users table */
    int peer;        /* our end of the socketpair */
    mph_buf_t out;   /* every byte the server wrote */
    mph_buf_t input; /* bytes fed but not yet taken (the connection was not reading) */
    int drained;     /* the server's shutdown finished */
} fx_t;

static void fx_on_drained(void *ud)
{
    ((fx_t *)ud)->drained = 1;
}

static void fx_on_auth_closed(void *ud)
{
    (void)ud;
}

/* The connection, or NULL once it is closing (conn_close unlinks it). */
static conn_t *fx_conn(fx_t *f)
{
    mph_list_t *q = mph_list_first(&f->srv->conns);
    return q ? mph_list_entry(q, conn_t, node) : NULL;
}

static void fx_open(fx_t *f, const mph_http_config_t *cfg)
{
    memset(f, 0, sizeof(*f));
    fake_seq = 0;
    int sv[2];
    if (uv_loop_init(&f->loop) != 0 || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
        abort();
    char err[256];
    if (mph_auth_new(&f->rpc.auth, &f->loop, NULL, 0, err, sizeof(err)) != 0)
        abort();
    mph_http_server_new(&f->srv, &f->loop, cfg, mph_rpc_handle, &f->rpc);
    conn_t *c = conn_new(f->srv);
    if (uv_tcp_open(&c->tcp, sv[0]) != 0)
        abort();
    conn_start(c);
    f->peer = sv[1];
    fcntl(f->peer, F_SETFL, O_NONBLOCK);
}

/* Reads what the server wrote so far. */
static void fx_collect(fx_t *f)
{
    char buf[65536];
    ssize_t n;
    while ((n = read(f->peer, buf, sizeof(buf))) > 0)
        mph_buf_append(&f->out, buf, (size_t)n);
}

/* Hands queued input to the connection while it reads. */
static void fx_push(fx_t *f)
{
    conn_t *c;
    while (f->input.len && (c = fx_conn(f)) != NULL && c->state == CONN_OPEN && c->reading) {
        /* One read at most as large as the server's read buffer, as from the socket. */
        size_t n =
            f->input.len < sizeof(f->srv->read_buf) ? f->input.len : sizeof(f->srv->read_buf);
        uv_buf_t b = uv_buf_init(f->input.data, (unsigned)n);
        on_read((uv_stream_t *)&c->tcp, (ssize_t)n, &b);
        memmove(f->input.data, f->input.data + n, f->input.len - n);
        f->input.len -= n;
    }
    if ((c = fx_conn(f)) == NULL || c->state != CONN_OPEN)
        f->input.len = 0; /* nobody will read it */
}

/* Runs the loop until the writes queued so far have completed, collecting the output. */
static void fx_run(fx_t *f)
{
    for (int i = 0; i < 1000; i++) {
        uv_run(&f->loop, UV_RUN_NOWAIT);
        fx_collect(f);
        conn_t *c = fx_conn(f);
        if (c == NULL ||
            (c->writes == 0 && uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) == 0))
            break;
    }
    fx_collect(f);
}

/* Feeds bytes; `answer`: let the deferred calls answer after this chunk. */
static void fx_feed(fx_t *f, const void *data, size_t len, int answer)
{
    mph_buf_append(&f->input, data, len);
    fx_push(f);
    do {
        if (answer)
            fx_answer();
        fx_run(f);
        fx_push(f); /* reading may have resumed */
    } while (answer && !mph_list_empty(&fake_pending));
}

/* Ends the input (EOF, or only answers when `eof` is 0), answers everything, stops the server
 * and frees it all. Afterwards f->out holds the whole output. Aborts if a handle leaks. */
static void fx_finish(fx_t *f, int eof)
{
    for (int i = 0; i < 100 && (f->input.len || !mph_list_empty(&fake_pending)); i++) {
        fx_answer();
        fx_run(f);
        fx_push(f);
    }
    conn_t *c = fx_conn(f);
    if (eof && c && c->state == CONN_OPEN && c->reading) {
        uv_buf_t b = uv_buf_init(NULL, 0);
        on_read((uv_stream_t *)&c->tcp, UV_EOF, &b);
    }
    fx_answer();
    fx_run(f);
    if (!f->drained)
        mph_http_shutdown(f->srv, fx_on_drained, f);
    while (!f->drained) {
        fx_answer();
        uv_run(&f->loop, UV_RUN_ONCE);
        fx_collect(f);
    }
    mph_http_server_free(f->srv);
    mph_auth_close(f->rpc.auth, fx_on_auth_closed, NULL);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    fx_collect(f);
    close(f->peer);
    if (uv_loop_close(&f->loop) != 0)
        abort();
    mph_buf_free(&f->input);
}

/* ---- Reading the responses back ---- */

typedef struct {
    int status;
    int close;      /* Connection: close */
    mph_buf_t head; /* the status line and every header line, as sent, up to the empty line */
    mph_buf_t body;
} fx_response_t;

typedef struct {
    fx_response_t list[512];
    size_t n;
    int error;       /* the byte stream is not well-formed HTTP */
    size_t trailing; /* bytes after the last complete response */
    const char *out; /* the bytes being parsed, */
    size_t pos;      /* the one the parser is at, */
    size_t start;    /* and where the response being read began */
    char field[16];  /* the header being read, cut short */
    size_t field_len;
    char value[16];
    size_t value_len;
    int in_value;
} fx_responses_t;

static int fxr_begin(http_parser *p)
{
    fx_responses_t *r = p->data;
    if (r->n == sizeof(r->list) / sizeof(r->list[0]))
        return 1;
    r->start = r->pos;
    return 0;
}

/* The parser may hand a header over in pieces: gather them, look at it once it ends. */
static void fxr_end_header(fx_responses_t *r)
{
    if (r->in_value && r->field_len == 10 && strncasecmp(r->field, "connection", 10) == 0 &&
        r->value_len == 5 && strncasecmp(r->value, "close", 5) == 0)
        r->list[r->n].close = 1;
    r->field_len = r->value_len = 0;
    r->in_value = 0;
}

static void fxr_gather(char *dst, size_t *len, size_t cap, const char *at, size_t n)
{
    for (size_t i = 0; i < n && *len < cap; i++)
        dst[(*len)++] = at[i];
}

static int fxr_field(http_parser *p, const char *at, size_t len)
{
    fx_responses_t *r = p->data;
    if (r->in_value)
        fxr_end_header(r);
    fxr_gather(r->field, &r->field_len, sizeof(r->field), at, len);
    return 0;
}

static int fxr_value(http_parser *p, const char *at, size_t len)
{
    fx_responses_t *r = p->data;
    r->in_value = 1;
    fxr_gather(r->value, &r->value_len, sizeof(r->value), at, len);
    return 0;
}

static int fxr_headers(http_parser *p)
{
    fx_responses_t *r = p->data;
    fxr_end_header(r);
    r->list[r->n].status = (int)p->status_code;
    /* Called on the head's last byte. */
    mph_buf_append(&r->list[r->n].head, r->out + r->start, r->pos + 1 - r->start);
    return 0;
}

static int fxr_body(http_parser *p, const char *at, size_t len)
{
    fx_responses_t *r = p->data;
    mph_buf_append(&r->list[r->n].body, at, len);
    return 0;
}

static int fxr_complete(http_parser *p)
{
    fx_responses_t *r = p->data;
    r->n++;
    return 0;
}

/* Splits a server's output into responses. A response without a length would need EOF to
 * end: the server never sends one, so such bytes count as trailing. */
static void fx_parse(const mph_buf_t *out, fx_responses_t *r)
{
    memset(r, 0, sizeof(*r));
    http_parser p;
    http_parser_settings s = {0};
    s.on_message_begin = fxr_begin;
    s.on_header_field = fxr_field;
    s.on_header_value = fxr_value;
    s.on_headers_complete = fxr_headers;
    s.on_body = fxr_body;
    s.on_message_complete = fxr_complete;
    http_parser_init(&p, HTTP_RESPONSE);
    p.data = r;
    r->out = out->data;
    size_t pos = 0, last_end = 0;
    /* One byte at a time, so that the bytes after the last complete response are known. */
    while (pos < out->len) {
        size_t before = r->n;
        r->pos = pos;
        size_t used = http_parser_execute(&p, &s, out->data + pos, 1);
        if (HTTP_PARSER_ERRNO(&p) != HPE_OK || used != 1) {
            r->error = 1;
            break;
        }
        pos++;
        if (r->n != before)
            last_end = pos;
    }
    r->trailing = out->len - last_end;
}

static void fx_responses_free(fx_responses_t *r)
{
    for (size_t i = 0; i < sizeof(r->list) / sizeof(r->list[0]); i++) {
        mph_buf_free(&r->list[i].head);
        mph_buf_free(&r->list[i].body);
    }
}

#endif
