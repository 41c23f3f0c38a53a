/*
 * rpc.c: JSON-RPC 2.0 (https://www.jsonrpc.org/specification).
 *
 * A request body is one call or a batch: a request (call_t) of one or more parts (part_t),
 * one per call object. The bridge replies to each part once, possibly before mph_lua_call
 * returns, so the count of outstanding parts starts one higher than their number and drops
 * that extra one only after dispatching: the response cannot go out half-built. Batch
 * elements run concurrently and are answered in the order they came; notifications run but
 * are not answered.
 *
 * A call to an exposed service behind mp.basicAuth is held until the request's credentials
 * are checked (auth.h): once per request, however many such calls it carries, started after
 * every other call is dispatched. The check answers with the user, and the held calls run
 * as that user, or with nobody, and they are answered -32004. A request whose every call
 * was answered -32004 (by this or by its handler) gets HTTP 401 and the header that asks
 * for Basic credentials; one that mixes them gets 200 and each call its own answer. A
 * service that is not exposed is answered -32601 as any unknown name, credentials or not:
 * a 401 would tell a prober that it exists.
 *
 * A check the authenticator could not make (too many in progress, or one waited too long)
 * answers the held calls -32005 with HTTP 200: the server is busy, try again. A 401 would
 * say the credentials are wrong, and a client would drop or re-ask a good password. While
 * the check is pending, the request registers a cleanup with the HTTP layer
 * (mph_http_req_on_gone): should its client leave, the wait is cancelled (a check nobody
 * waits for is never hashed) and the held calls are answered -32005 into the void.
 */
#define _POSIX_C_SOURCE 200809L
#include "rpc.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/json.h"
#include "common/common.h"

/* A part of a request: one call object of it (a batch has several). */
typedef struct {
    json_t *id;          /* owned reference; NULL for a notification */
    int notification;    /* valid call without "id": run, do not answer */
    int code;            /* the reply's JSON-RPC error code once done; 0: a result */
    json_t *held;        /* owned reference to the call object while it waits for the
                            request's credentials to be checked; NULL otherwise */
    mph_buf_t out;       /* this part's response object */
    json_t *method;      /* owned reference to the method name while counted (rpc->metrics) */
    struct call_s *call; /* the request it is a part of */
} part_t;

/* A request: its body's calls, answered together once every part is done. */
typedef struct call_s {
    mph_http_req_t *req; /* answered once every part is done */
    mph_rpc_t *rpc;      /* borrowed */
    mph_lua_role_t role; /* of every call in it: MPH_LUA_CALL unless another worker forwarded */
    int is_batch;
    size_t nparts;
    size_t outstanding;         /* parts without a reply, plus one while dispatching or releasing
                                   the held ones */
    size_t held;                /* parts waiting for the credentials check */
    uint64_t start_ns;          /* uv_hrtime when the request was read (a call's duration) */
    part_t *parts;              /* nparts, owned; in the body's order */
    char *methods;              /* the calls' method names joined by ",", for the access log
                                   (owned) */
    mph_auth_wait_t *auth_wait; /* the credentials check the held parts wait for, or NULL */
    const char *idem_key;       /* the request's Idempotency-Key (idem_len bytes, borrowed from
                                   req), or NULL */
    size_t idem_len;
    int idem_bad; /* it sent an unusable one: its call is refused (-32600) */
    int replayed; /* a reply is an earlier call's (Idempotent-Replayed: true) */
} call_t;

#define WWW_AUTHENTICATE "WWW-Authenticate: Basic realm=\"mphost\"\r\n"
#define PARAMS_PROBLEM "Invalid params: params must be an array or an object"
#define AUTH_BUSY "Worker unavailable: too many credential checks in progress; try again"
#define AUTH_EXPIRED "Worker unavailable: the credential check waited too long; try again"
#define CLIENT_GONE "Worker unavailable: the client left before its credentials were checked"
#define BAD_KEY "Invalid Request: an Idempotency-Key must be 1 to 200 printable ASCII characters"
#define BATCH_KEY "Invalid Request: an Idempotency-Key applies to one call, not to a batch"
#define REPLAYED "Idempotent-Replayed: true\r\n"

/* Parses a JSON text (a request body, an in-process call's params). Returns a new reference,
 * or NULL with the JSON-RPC error in *code and msg: -32602 for a number out of range, else
 * -32700. */
static json_t *load_json(const char *text, size_t len, int *code, char *msg, size_t msglen)
{
    json_error_t err;
    json_t *doc = mph_json_load(text, len, &err);
    if (doc == NULL && json_error_code(&err) == json_error_numeric_overflow) {
        *code = MPH_RPC_INVALID_PARAMS;
        snprintf(msg, msglen, "Invalid params: %s", err.text);
    } else if (doc == NULL) {
        *code = MPH_RPC_PARSE_ERROR;
        snprintf(msg, msglen, "Parse error: %s", err.text);
    }
    return doc;
}

static void write_error(mph_buf_t *b, const json_t *id, int code, const char *message,
                        const char *data, size_t data_len)
{
    mph_buf_puts(b, "{\"jsonrpc\":\"2.0\",\"id\":");
    if (id == NULL || mph_json_write_jansson(b, id) != 0)
        mph_buf_puts(b, "null");
    mph_buf_printf(b, ",\"error\":{\"code\":%d,\"message\":", code);
    if (mph_json_write_string(b, message, strlen(message)) != 0)
        mph_buf_puts(b, "\"(message was not valid UTF-8)\"");
    if (data) {
        mph_buf_puts(b, ",\"data\":");
        mph_buf_append(b, data, data_len);
    }
    mph_buf_puts(b, "}}");
}

static void call_finish(call_t *call)
{
    mph_buf_t body = MPH_BUF_INIT;
    size_t answered = 0, refused = 0;
    int code = 0; /* the access log's: the first error of the request */
    for (size_t i = 0; i < call->nparts && code == 0; i++)
        code = call->parts[i].code;
    mph_http_req_set_call(call->req, call->methods ? call->methods : "-", code);
    free(call->methods);
    size_t total = 3; /* the brackets and the final newline */
    for (size_t i = 0; i < call->nparts; i++)
        total += call->parts[i].out.len + 1;
    mph_buf_reserve(&body, total); /* one allocation, however many parts */
    if (call->is_batch)
        mph_buf_puts(&body, "[");
    for (size_t i = 0; i < call->nparts; i++) {
        part_t *p = &call->parts[i];
        refused += p->code == MPH_RPC_UNAUTHORIZED;
        if (p->out.len) {
            if (answered++)
                mph_buf_puts(&body, ",");
            mph_buf_append(&body, p->out.data, p->out.len);
        }
        mph_buf_free(&p->out);
        json_decref(p->id);
    }
    if (call->is_batch)
        mph_buf_puts(&body, "]");
    free(call->parts);
    if (answered == 0 && refused < call->nparts) {
        mph_buf_free(&body);
        mph_http_respond(call->req, 204, NULL, 0);
    } else {
        size_t len = 0;
        char *data = NULL;
        if (answered > 0) {
            mph_buf_puts(&body, "\n");
            data = mph_buf_steal(&body, &len);
        }
        mph_buf_free(&body); /* the brackets of an unanswered batch */
        if (refused == call->nparts)
            mph_http_respond_json(call->req, 401, WWW_AUTHENTICATE, data, len);
        else if (call->replayed)
            mph_http_respond_json(call->req, 200, REPLAYED, data, len);
        else
            mph_http_respond(call->req, 200, data, len);
    }
    free(call);
}

/* Counts a call's reply in m (metrics.h; NULL: not counted). Its method (mlen bytes) gets a
 * label of its own only when known: the bridge answered with something else than -32601 (the
 * method is exposed), or its credentials were refused (it is a service); a client cannot make
 * up labels. */
static void count_call(mph_metrics_t *m, const char *method, size_t mlen, int known, int code,
                       uint64_t start_ns)
{
    if (m == NULL)
        return;
    int ix = method ? mph_metrics_method(m, method, mlen, known) : 0;
    mph_metrics_request(m, ix, code, uv_hrtime() - start_ns);
}

/* Counts the part's reply (a client's call: not forwarded ones). */
static void count(part_t *p, int known_method)
{
    json_t *method = p->method;
    p->method = NULL;
    if (p->call->role == MPH_LUA_CALL)
        count_call(p->call->rpc->metrics, json_string_value(method), json_string_length(method),
                   known_method, p->code, p->call->start_ns);
    json_decref(method); /* NULL: nothing */
}

static void part_done(part_t *p)
{
    call_t *call = p->call;
    if (--call->outstanding == 0)
        call_finish(call);
}

static void on_reply(void *ud, mph_lua_reply_t *reply)
{
    part_t *p = ud;
    p->code = reply->code;
    p->call->replayed |= reply->replayed;
    count(p, reply->code != MPH_RPC_METHOD_NOT_FOUND);
    if (!p->notification) {
        if (reply->code == 0) {
            mph_buf_reserve(&p->out, reply->json_len + 64); /* the envelope, a short id */
            mph_buf_puts(&p->out, "{\"jsonrpc\":\"2.0\",\"id\":");
            mph_json_write_jansson(&p->out, p->id);
            mph_buf_puts(&p->out, ",\"result\":");
            mph_buf_append(&p->out, reply->json, reply->json_len);
            mph_buf_puts(&p->out, "}");
        } else {
            write_error(&p->out, p->id, reply->code, reply->message, reply->json, reply->json_len);
        }
        if (reply->replayed && p->call->role != MPH_LUA_CALL) { /* for the router (forward.c) */
            p->out.len--;                                       /* the object's closing brace */
            mph_buf_puts(&p->out, ",\"" MPH_LUA_FORWARD_REPLAYED "\":true}");
        }
    }
    part_done(p);
}

static void part_error(part_t *p, int code, const char *message)
{
    p->code = code;
    /* Refused for its credentials, or not checked: the method is an exposed service. */
    count(p, code == MPH_RPC_UNAUTHORIZED || code == MPH_RPC_WORKER_UNAVAILABLE);
    if (!p->notification)
        write_error(&p->out, p->id, code, message, NULL, 0);
    part_done(p);
}

/* Runs a validated call object, in the role of its request, as user (NULL: nobody). */
static void run_call(mph_rpc_t *rpc, part_t *p, const json_t *r, const char *user)
{
    json_t *method = json_object_get(r, "method");
    mph_lua_call_keyed(rpc->lua, p->call->role, user, p->call->idem_key, p->call->idem_len,
                       json_string_value(method), json_string_length(method),
                       json_object_get(r, "params"), on_reply, p);
}

/* Answers or runs the held calls: as user (NULL: refused with code and message). */
static void release_held(call_t *call, const char *user, int code, const char *message)
{
    call->outstanding++; /* the call may not finish while the loop below walks it */
    for (size_t i = 0; i < call->nparts && call->held > 0; i++) {
        part_t *p = &call->parts[i];
        json_t *r = p->held;
        if (r == NULL)
            continue;
        p->held = NULL;
        call->held--;
        if (user)
            run_call(call->rpc, p, r, user);
        else
            part_error(p, code, message);
        json_decref(r);
    }
    if (--call->outstanding == 0)
        call_finish(call);
}

/* The request's credentials were checked (an mph_auth_cb): the held calls run as user, or
 * are refused. */
static void on_verified(void *ud, mph_auth_result_t result, const char *user)
{
    call_t *call = ud;
    call->auth_wait = NULL;
    mph_http_req_on_gone(call->req, NULL, NULL); /* nothing to cancel any more */
    switch (result) {
    case MPH_AUTH_VERIFIED:
        release_held(call, user, 0, NULL);
        break;
    case MPH_AUTH_REFUSED:
        release_held(call, NULL, MPH_RPC_UNAUTHORIZED, mph_rpc_message(MPH_RPC_UNAUTHORIZED));
        break;
    case MPH_AUTH_BUSY:
        release_held(call, NULL, MPH_RPC_WORKER_UNAVAILABLE, AUTH_BUSY);
        break;
    case MPH_AUTH_EXPIRED:
        release_held(call, NULL, MPH_RPC_WORKER_UNAVAILABLE, AUTH_EXPIRED);
        break;
    }
}

/* The client left while its credentials were being checked (an mph_http_gone_cb): the wait
 * is cancelled, and the held calls answered for form's sake (the answer is dropped). */
static void on_client_gone(void *ud, mph_http_req_t *req)
{
    call_t *call = ud;
    (void)req;
    mph_auth_cancel(call->auth_wait);
    call->auth_wait = NULL;
    release_held(call, NULL, MPH_RPC_WORKER_UNAVAILABLE, CLIENT_GONE);
}

/* Starts the check of the request's credentials for its held calls. */
static void check_credentials(call_t *call, mph_http_req_t *req)
{
    size_t alen = 0;
    const char *authorization = mph_http_req_authorization(req, &alen);
    struct sockaddr_storage peer;
    const struct sockaddr *source =
        mph_http_req_peer(req, &peer) == 0 ? (const struct sockaddr *)&peer : NULL;
    /* on_verified may run before this returns: then there is no wait to cancel. */
    call->auth_wait =
        mph_auth_check(call->rpc->auth, source, authorization, alen, on_verified, call);
    if (call->auth_wait)
        mph_http_req_on_gone(req, on_client_gone, call);
}

/* Validates one request object and dispatches it in the role of its HTTP request, or holds
 * it for the credentials check. A call another worker forwarded was checked there: it runs
 * as the user the forwarding worker named (MPH_LUA_FORWARD_USER, read only on the peer
 * listener, which only our own processes reach). */
static void dispatch(mph_rpc_t *rpc, part_t *p, const json_t *r)
{
    if (!json_is_object(r)) {
        part_error(p, MPH_RPC_INVALID_REQUEST, "Invalid Request");
        return;
    }
    json_t *id = json_object_get(r, "id");
    if (id && !json_is_string(id) && !json_is_number(id) && !json_is_null(id)) {
        part_error(p, MPH_RPC_INVALID_REQUEST,
                   "Invalid Request: id must be a string, number or null");
        return;
    }
    p->id = json_incref(id); /* NULL stays NULL */
    json_t *version = json_object_get(r, "jsonrpc");
    json_t *method = json_object_get(r, "method");
    json_t *params = json_object_get(r, "params");
    const char *problem = NULL;
    if (!json_is_string(version) || strcmp(json_string_value(version), "2.0") != 0)
        problem = "Invalid Request: jsonrpc must be \"2.0\"";
    else if (!json_is_string(method))
        problem = "Invalid Request: method must be a string";
    if (problem) {
        part_error(p, MPH_RPC_INVALID_REQUEST, problem);
        return;
    }
    p->notification = (id == NULL);
    if (p->call->idem_bad) {
        part_error(p, MPH_RPC_INVALID_REQUEST, BAD_KEY);
        return;
    }
    if (params && !json_is_array(params) && !json_is_object(params)) {
        if (p->notification) {
            part_done(p);
            return;
        }
        part_error(p, MPH_RPC_INVALID_PARAMS, PARAMS_PROBLEM);
        return;
    }
    if (rpc->metrics)
        p->method = json_incref(method);
    if (p->call->role != MPH_LUA_CALL) {
        json_t *user = json_object_get(r, MPH_LUA_FORWARD_USER);
        json_t *key = json_object_get(r, MPH_LUA_FORWARD_KEY); /* a keyed call to a shard */
        if (json_is_string(key)) {
            p->call->idem_key = json_string_value(key); /* r outlives the call's start */
            p->call->idem_len = json_string_length(key);
        }
        run_call(rpc, p, r, json_is_string(user) ? json_string_value(user) : NULL);
        return;
    }
    if (mph_lua_needs_auth(rpc->lua, json_string_value(method), json_string_length(method))) {
        p->held = json_incref((json_t *)r);
        p->call->held++;
        return;
    }
    run_call(rpc, p, r, NULL);
}

/* Answers a request that has no call to run; counted in m (NULL: not counted). */
static void answer_alone(mph_metrics_t *m, mph_http_req_t *req, int code, const char *message)
{
    mph_http_req_set_call(req, "-", code);
    if (m)
        mph_metrics_request(m, 0, code, 0);
    mph_buf_t b = MPH_BUF_INIT;
    write_error(&b, NULL, code, message, NULL, 0);
    mph_buf_puts(&b, "\n");
    size_t len;
    char *data = mph_buf_steal(&b, &len);
    mph_http_respond(req, 200, data, len);
}

/* The method names of a call or a batch joined by "," ("-" for a call without one), as much
 * as the access log keeps. New string. */
static char *method_names(const json_t *doc)
{
    mph_buf_t b = MPH_BUF_INIT;
    size_t n = json_is_array(doc) ? json_array_size(doc) : 1;
    for (size_t i = 0; i < n && b.len < 128; i++) {
        const json_t *m =
            json_object_get(json_is_array(doc) ? json_array_get(doc, i) : doc, "method");
        if (i)
            mph_buf_puts(&b, ",");
        mph_buf_puts(&b, json_is_string(m) ? json_string_value(m) : "-");
    }
    size_t len;
    return mph_buf_steal(&b, &len);
}

/* Answers one HTTP request's body: a call or a batch, each call in `role`. */
static void handle(mph_rpc_t *rpc, mph_http_req_t *req, const char *body, size_t len,
                   mph_lua_role_t role)
{
    mph_metrics_t *counted = role == MPH_LUA_CALL ? rpc->metrics : NULL;
    char msg[256];
    int code;
    json_t *doc = load_json(body, len, &code, msg, sizeof(msg));
    if (doc == NULL) {
        answer_alone(counted, req, code, msg);
        return;
    }
    if (json_is_array(doc) && json_array_size(doc) == 0) {
        json_decref(doc);
        answer_alone(counted, req, MPH_RPC_INVALID_REQUEST, "Invalid Request: empty batch");
        return;
    }
    const char *key = NULL;
    size_t klen = 0;
    int keyed = role == MPH_LUA_CALL ? mph_http_req_idempotency_key(req, &key, &klen) : 0;
    if (keyed != 0 && json_is_array(doc)) {
        json_decref(doc);
        answer_alone(counted, req, MPH_RPC_INVALID_REQUEST, BATCH_KEY);
        return;
    }
    call_t *call = mph_xcalloc(1, sizeof(*call));
    call->req = req;
    call->rpc = rpc;
    call->start_ns = uv_hrtime();
    call->role = role;
    call->is_batch = json_is_array(doc);
    call->nparts = call->is_batch ? json_array_size(doc) : 1;
    call->parts = mph_xcalloc(call->nparts, sizeof(part_t));
    call->outstanding = call->nparts + 1;
    call->methods = method_names(doc);
    call->idem_bad = keyed < 0 || (keyed > 0 && !mph_lua_idem_key_valid(key, klen));
    call->idem_key = keyed > 0 && !call->idem_bad ? key : NULL;
    call->idem_len = klen;
    for (size_t i = 0; i < call->nparts; i++) {
        call->parts[i].call = call;
        dispatch(rpc, &call->parts[i], call->is_batch ? json_array_get(doc, i) : doc);
    }
    if (call->held > 0)
        check_credentials(call, req);
    mph_http_req_wipe_authorization(req); /* read or not needed: no password stays around */
    json_decref(doc);
    if (--call->outstanding == 0)
        call_finish(call);
}

void mph_rpc_refuse_host(mph_http_req_t *req, const char *why)
{
    char msg[400];
    snprintf(msg, sizeof(msg), MPH_RPC_HOST_REFUSED "%s", why);
    mph_http_req_set_call(req, "-", MPH_RPC_UNAUTHORIZED);
    mph_buf_t b = MPH_BUF_INIT;
    write_error(&b, NULL, MPH_RPC_UNAUTHORIZED, msg, NULL, 0);
    mph_buf_puts(&b, "\n");
    size_t n;
    char *data = mph_buf_steal(&b, &n);
    mph_http_respond_json(req, 403, "", data, n);
}

void mph_rpc_handle_role(mph_rpc_t *rpc, mph_http_req_t *req, const char *body, size_t len,
                         mph_lua_role_t role)
{
    handle(rpc, req, body, len, role);
}

void mph_rpc_handle(void *ud, mph_http_req_t *req, const char *body, size_t len)
{
    mph_rpc_t *rpc = ud;
    if (mph_http_req_header(req)[0] != '\0') { /* another host's call (MPH_RPC_PEER_HEADER) */
        if (rpc->host)
            rpc->host(rpc->host_ud, req, body, len, 0);
        else
            mph_rpc_refuse_host(req, "this host takes no calls from other hosts (no --peers)");
        return;
    }
    handle(rpc, req, body, len, MPH_LUA_CALL);
}

void mph_rpc_handle_forwarded(void *ud, mph_http_req_t *req, const char *body, size_t len)
{
    mph_lua_role_t role;
    mph_rpc_t *rpc = ud;
    const char *name = mph_http_req_header(req);
    if (strcmp(name, MPH_RPC_FORWARD_HOST) == 0) { /* relayed by a worker of this host */
        if (rpc->host)
            rpc->host(rpc->host_ud, req, body, len, 1);
        else
            mph_rpc_refuse_host(req, "this host takes no calls from other hosts (no --peers)");
        return;
    }
    if (mph_lua_role_parse(name, &role) != 0) {
        char msg[128];
        snprintf(msg, sizeof(msg), "Invalid Request: unknown forward role \"%s\"", name);
        answer_alone(NULL, req, MPH_RPC_INVALID_REQUEST, msg);
        return;
    }
    handle(ud, req, body, len, role);
}

/* ---- In-process calls ---- */

typedef struct {
    mph_rpc_t *rpc;      /* borrowed */
    char *method;        /* owned copy, for the metrics */
    uint64_t start_ns;   /* uv_hrtime at the call */
    mph_lua_reply_cb cb; /* the caller's */
    void *ud;
} direct_t;

static void on_direct_reply(void *ud, mph_lua_reply_t *reply)
{
    direct_t *d = ud;
    count_call(d->rpc->metrics, d->method, strlen(d->method),
               reply->code != MPH_RPC_METHOD_NOT_FOUND, reply->code, d->start_ns);
    d->cb(d->ud, reply);
    free(d->method);
    free(d);
}

/* Answers a call the bridge never saw, as HTTP answers its call object (part_error). */
static void direct_error(direct_t *d, int code, const char *message)
{
    count_call(d->rpc->metrics, d->method, strlen(d->method), code == MPH_RPC_UNAUTHORIZED, code,
               d->start_ns);
    mph_lua_reply_t reply = {code, NULL, 0, mph_xstrdup(message), 0};
    d->cb(d->ud, &reply);
    free(reply.json);
    free(reply.message);
    free(d->method);
    free(d);
}

void mph_rpc_call(mph_rpc_t *rpc, const char *method, const char *params, size_t len,
                  const char *user, mph_lua_reply_cb cb, void *ud)
{
    direct_t *d = mph_xcalloc(1, sizeof(*d));
    *d = (direct_t){rpc, mph_xstrdup(method), uv_hrtime(), cb, ud};
    json_t *doc = NULL;
    if (params) {
        char msg[256];
        int code;
        if ((doc = load_json(params, len, &code, msg, sizeof(msg))) == NULL) {
            direct_error(d, code, msg);
            return;
        }
        if (!json_is_array(doc) && !json_is_object(doc)) {
            json_decref(doc);
            direct_error(d, MPH_RPC_INVALID_PARAMS, PARAMS_PROBLEM);
            return;
        }
    }
    if (user == NULL && mph_lua_needs_auth(rpc->lua, method, strlen(method))) {
        json_decref(doc);
        direct_error(d, MPH_RPC_UNAUTHORIZED, mph_rpc_message(MPH_RPC_UNAUTHORIZED));
        return;
    }
    mph_lua_call_as(rpc->lua, MPH_LUA_CALL, user, method, strlen(method), doc, on_direct_reply, d);
    json_decref(doc); /* the bridge keeps its own reference */
}
