/*
 * rpc.h: JSON-RPC 2.0 over the HTTP server: single calls, batches, notifications, and every
 * error of the specification. It validates, dispatches each call to the Lua bridge, and
 * answers once every call of the request has its reply.
 */
#ifndef MPH_RPC_H
#define MPH_RPC_H

#include <stddef.h>

#include "lua/bridge.h"
#include "auth.h"
#include "http.h"
#include "metrics.h"

/* What requests are dispatched to. */
typedef struct {
    mph_lua_t *lua;         /* borrowed */
    mph_auth_t *auth;       /* borrowed: checks the credentials of calls to mp.basicAuth services */
    mph_metrics_t *metrics; /* borrowed: counts each call of a client (not forwarded ones);
                               NULL: none */
} mph_rpc_t;

/* An mph_http_handler_t: ud is an mph_rpc_t. Answers 200 with the response (a trailing
 * newline after the JSON), or 204 when every call was a notification; 401 with
 * WWW-Authenticate when every call was refused for its credentials (-32004). */
void mph_rpc_handle(void *ud, mph_http_req_t *req, const char *body, size_t len);

/* An in-process call (mph_host_call): `method` (NUL-terminated) with params, a JSON text of len
 * bytes (NULL: none), as `user` (borrowed; NULL: nobody, and a service behind mp.basicAuth
 * refuses the call, -32004). Checked, run and counted as a client's call object over HTTP
 * is; cb gets the reply that object would get (mph_lua_reply_cb's rules), exactly once,
 * possibly before this returns. */
void mph_rpc_call(mph_rpc_t *rpc, const char *method, const char *params, size_t len,
                  const char *user, mph_lua_reply_cb cb, void *ud);

/* The header that carries the role of a forwarded call (mph_lua_role_name), lowercase: the
 * peer listener's HTTP server captures it (mph_http_config_t.capture_header); the public one
 * does not, so a client cannot choose a role. */
#define MPH_RPC_FORWARD_HEADER "x-mphost-forward"

/* mph_rpc_handle for the peer listener (host/peer.c; ud is an mph_rpc_t too): every call of
 * the request runs in the role its MPH_RPC_FORWARD_HEADER names (none: an ordinary call), as
 * the user MPH_LUA_FORWARD_USER names; an unknown role is -32600. */
void mph_rpc_handle_forwarded(void *ud, mph_http_req_t *req, const char *body, size_t len);

#endif
