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

/* Takes a call that another host sent (hosts.h, mph_hosts_receive): `relayed` is 1 when a
 * worker of this host handed it on over the peer listener, 0 when it came to the public
 * port. It answers req exactly once, as a handler does. */
typedef void (*mph_rpc_host_fn)(void *ud, mph_http_req_t *req, const char *body, size_t len,
                                int relayed);

/* What requests are dispatched to. */
typedef struct {
    mph_lua_t *lua;         /* borrowed */
    mph_auth_t *auth;       /* borrowed: checks the credentials of calls to mp.basicAuth services */
    mph_metrics_t *metrics; /* borrowed: counts each call of a client (not forwarded ones);
                               NULL: none */
    mph_rpc_host_fn host;   /* takes calls from other hosts (MPH_RPC_PEER_HEADER); NULL: this
                               host has none, and such a request is refused (-32004) */
    void *host_ud;          /* for host */
} mph_rpc_t;

/* An mph_http_handler_t: ud is an mph_rpc_t. Answers 200 with the response (a trailing
 * newline after the JSON), or 204 when every call was a notification; 401 with
 * WWW-Authenticate when every call was refused for its credentials (-32004). A request that
 * carries MPH_RPC_PEER_HEADER goes to the host hook instead. */
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

/* The header that marks a call another host sent (hosts.h): the public server captures it,
 * and a request that carries it is the host hook's (mph_rpc_t.host), which runs it only once
 * its signature is checked, or refused. Its value is the protocol's version. */
#define MPH_RPC_PEER_HEADER "x-mphost-peer"

/* The value of MPH_RPC_FORWARD_HEADER on a call that another host sent and a worker of this
 * one hands on to the worker it is meant for (mph_peer_relay): that worker checks its
 * signature again and runs it (the host hook, relayed). */
#define MPH_RPC_FORWARD_HOST "host"

/* Answers a request's body as mph_rpc_handle does, every call of it in `role` (as the user
 * MPH_LUA_FORWARD_USER names, for a role other than MPH_LUA_CALL): for a call another host
 * sent once its signature is checked (hosts.c). */
void mph_rpc_handle_role(mph_rpc_t *rpc, mph_http_req_t *req, const char *body, size_t len,
                         mph_lua_role_t role);

/* Refuses req, a call from another host that cannot run here: HTTP 403 with error -32004
 * MPH_RPC_HOST_REFUSED + why, so that the host that sent it reads it (hosts.c). */
#define MPH_RPC_HOST_REFUSED "unauthorized: "
void mph_rpc_refuse_host(mph_http_req_t *req, const char *why);

/* mph_rpc_handle for the peer listener (host/peer.c; ud is an mph_rpc_t too): every call of
 * the request runs in the role its MPH_RPC_FORWARD_HEADER names (none: an ordinary call), as
 * the user MPH_LUA_FORWARD_USER names; an unknown role is -32600. */
void mph_rpc_handle_forwarded(void *ud, mph_http_req_t *req, const char *body, size_t len);

#endif
