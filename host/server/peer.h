/*
 * peer.h: the channel between the workers of one generation (docs/topologies.md), over which
 * mp.shard and mp.scatter forward calls.
 *
 * Listener side: each worker also serves JSON-RPC over HTTP (the same http.c and rpc.c as the
 * public port) on a Unix socket named after its generation and its id, "g<generation>.w<id>",
 * in the deployment's socket directory (localsock.h: 0700, so no other user can take a name
 * or connect; the supervisor removes the files). Only processes of our own user are served. There,
 * and only there, a request carries the role of a forwarded call (MPH_RPC_FORWARD_HEADER): the
 * worker runs the topology's inner function itself and forwards nothing.
 *
 * Client side: mph_peer_forward, the bridge's forwarder (mph_lua_forward_fn). Asynchronous on
 * the loop, with a small keep-alive pool of connections per worker; each forward answers
 * exactly once: with the worker's JSON-RPC reply, or with -32005 "worker N unavailable: ..."
 * when the connection is refused for a while (the worker is gone and not yet replaced), the
 * worker closes the connection before answering, no answer comes within the timeout, or the
 * answer is not a JSON-RPC reply. A request is sent again only when it certainly was not
 * received (the connection could not be made), never once it was written: a call that may
 * have run is never run twice.
 */
#ifndef MPH_PEER_H
#define MPH_PEER_H

#include <uv.h>

#include "lua/bridge.h"
#include "http.h"
#include "rpc.h"

typedef struct mph_peer_s mph_peer_t;

/* (Its sockets' names: MPH_PEER_SOCKET_FORMAT, config.h.) */

typedef struct {
    int dir_fd;              /* the socket directory (localsock.h); borrowed */
    int generation;          /* this worker's generation (supervisor.h) */
    const uint64_t *serving; /* the generation that serves now (shared; may be NULL) */
    int id;                  /* this worker, 1..count */
    int count;               /* the workers of the generation */
    unsigned timeout_ms;     /* a forward unanswered this long fails with -32005 */
    unsigned idle_ms;        /* a pooled connection unused this long is closed (keep it below the
                                peer listener's idle timeout, which would close it first) */
} mph_peer_config_t;

/* Creates the client side; cfg is copied. Returns 0. */
int mph_peer_new(mph_peer_t **out, uv_loop_t *loop, const mph_peer_config_t *cfg);

/* Starts the listener side: this worker's name, served by a new HTTP server with `http` (copied;
 * its capture_header is set here) and calls dispatched by `rpc` (borrowed; it must outlive
 * the server's drain). Returns 0, or a negative code with a message in err (the socket
 * directory cannot be used). */
int mph_peer_listen(mph_peer_t *p, const mph_http_config_t *http, mph_rpc_t *rpc, char *err,
                    size_t errlen);

/* An mph_lua_forward_fn; fud is the mph_peer_t. Always calls cb later, from the loop. */
void mph_peer_forward(void *fud, int worker, mph_lua_role_t role, const char *body, size_t len,
                      mph_lua_reply_cb cb, void *ud);

/* Hands a call that another host sent to this one (hosts.h: its signed body, len bytes,
 * copied) on to `worker`, whose peer listener checks it and runs it (MPH_RPC_FORWARD_HOST):
 * answered as mph_peer_forward answers. */
void mph_peer_relay(mph_peer_t *p, int worker, const char *body, size_t len, mph_lua_reply_cb cb,
                    void *ud);

/* The workers of the generation (cfg.count). */
int mph_peer_count(const mph_peer_t *p);

/* Reads a JSON-RPC answer (one call's response object, len bytes) into reply (its fields
 * new). Returns 0, or -1 with why filled ("its answer is not JSON: ..."). */
int mph_peer_read_answer(const char *text, size_t len, mph_lua_reply_t *reply, char *why,
                         size_t whylen);

/* The generation whose workers this worker forwards to: its own. (A reload, which runs a new
 * generation next to the draining old one, decides here where calls go while both run.) */
int mph_peer_target_generation(const mph_peer_t *p);

/* Graceful stop, after the public port has drained: the listener stops accepting and lets
 * the forwarded calls it has started finish; then forwards still unanswered fail with -32005
 * and pooled connections close. `closed` runs once, when every handle is closed. */
void mph_peer_shutdown(mph_peer_t *p, void (*closed)(void *ud), void *ud);

/* After the stop's deadline: forwarded calls in flight here lose their connections, and
 * forwards still unanswered fail with -32005 now. Harmless before mph_peer_shutdown. */
void mph_peer_abort(mph_peer_t *p);

/* Frees it: only after `closed` has run, or if it never listened nor forwarded. */
void mph_peer_free(mph_peer_t *p);

#endif
