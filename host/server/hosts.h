/*
 * hosts.h: the hosts of one deployment (docs/hosts.md), over which mp.shard and mp.scatter
 * place their shards: who they are (--peers, --host-id), the secret they share
 * (--peer-secret-file), and the calls sent between them.
 *
 * Sending side: mph_hosts_forward, the bridge's host forwarder (lua/bridge.h,
 * mph_lua_forward_host_fn). It signs the call (method, params, user, role, the worker it is
 * for, a timestamp and a nonce) with HMAC-SHA256 under the shared secret and POSTs it to the
 * other host's public port over HTTP keep-alive, with the outbound client (fetch.h) on the
 * loop. It answers exactly once: with the worker's reply, or -32005 "host K unavailable:
 * why" when the host cannot be reached in time or refuses the call.
 *
 * Receiving side: mph_hosts_receive, the rpc hook (rpc.h, mph_rpc_host_fn) for a request
 * that carries MPH_RPC_PEER_HEADER. It checks the signature, the addressee, the time, and
 * (on the worker the call is for) that the nonce was never seen: only then does the call run
 * in its role, as the user it names. Anything else is refused (HTTP 403, -32004) and runs
 * nothing. A call for another worker of this host is handed on to it over the peer channel
 * (peer.h, mph_peer_relay), and that worker checks it all again.
 */
#ifndef MPH_HOSTS_H
#define MPH_HOSTS_H

#include <uv.h>

#include "lua/bridge.h"
#include "http.h"
#include "peer.h"
#include "rpc.h"

typedef struct mph_hosts_s mph_hosts_t;

/* The most hosts a deployment lists in --peers. */
#define MPH_MAX_HOSTS 1000

typedef struct {
    const char *peers;       /* --peers: every host's base URL, comma-separated, in host order
                                (this one's included); NULL or one URL: a deployment of one */
    int host_id;             /* --host-id: 1..hosts; 0: from the host name (NAME-N: N + 1) */
    const char *secret_file; /* --peer-secret-file: needed with several hosts */
    int storage_shared;      /* the storage is one every host reaches (not file storage) */
    int quiet;               /* 1: no warning about the secret file's mode (a worker's: its
                                supervisor gave it already) */
    int worker_id;           /* this process's worker, 1..worker_count */
    int worker_count;        /* the workers of this host */
    unsigned timeout_ms;     /* a call to another host unanswered this long fails (-32005) */
    unsigned idle_ms;        /* a connection to another host idle this long is not reused (keep
                                it below the other host's idle timeout) */
} mph_hosts_config_t;

/* Reads and checks the configuration: the URLs, which one this host is, the secret file (its
 * owner and mode as docs/security.md says), shared storage with several hosts. *out gets a
 * new mph_hosts_t, or NULL for a deployment of one host (there is nothing to reach: with
 * --host-id, it must be 1). Returns 0, or MPH_EINVAL (MPH_EIO: the secret file cannot be
 * read) with a one-line message in err; nothing was made then. */
int mph_hosts_new(mph_hosts_t **out, uv_loop_t *loop, const mph_hosts_config_t *cfg, char *err,
                  size_t errlen);

/* This host's number (1..count) and the number of hosts; with hs NULL, 1 and 1. */
int mph_hosts_id(const mph_hosts_t *hs);
int mph_hosts_count(const mph_hosts_t *hs);

/* What received calls run with (rpc, borrowed) and are handed on through to other workers
 * (peer, borrowed; NULL: this host runs one worker). Call before serving. */
void mph_hosts_attach(mph_hosts_t *hs, mph_rpc_t *rpc, mph_peer_t *peer);

/* An mph_lua_forward_host_fn; fud is the mph_hosts_t. cb runs from the loop, never before this
 * returns, except after mph_hosts_close: then at once, with -32005 (forward.c takes answers
 * that come at once). */
void mph_hosts_forward(void *fud, int host, int worker, mph_lua_role_t role, const char *body,
                       size_t len, mph_lua_reply_cb cb, void *ud);

/* An mph_rpc_host_fn; ud is the mph_hosts_t. */
void mph_hosts_receive(void *ud, mph_http_req_t *req, const char *body, size_t len, int relayed);

/* Ends the sending side: calls still waiting for another host end now with -32005 (their
 * callbacks run before this returns), and its connections and handles close; closed(ud)
 * runs once they have (NULL: none). Received calls are not waited for: close after the
 * servers have drained. */
void mph_hosts_close(mph_hosts_t *hs, void (*closed)(void *ud), void *ud);

/* Frees hs: after closed has run. NULL is fine. */
void mph_hosts_free(mph_hosts_t *hs);

#endif
