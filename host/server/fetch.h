/*
 * fetch.h: outbound HTTP exchanges for mp.fetch and mp.rpc (lua/bridge.h,
 * mph_lua_fetch_fn), made with libcurl's multi interface on the host's loop.
 *
 * One fetcher per host. It never blocks the loop: sockets are watched by uv_poll_t handles,
 * curl's timeouts by one uv_timer_t, names resolved by curl's threaded resolver. Connections
 * are kept and reused per host and port (HTTP/1.1 keep-alive; HTTP/2 where an https server
 * offers it). https is verified against the system's CAs, or a request's cafile. Every
 * exchange is counted in /metrics (mphost_fetch_total, mphost_fetch_duration_seconds).
 */
#ifndef MPH_FETCH_H
#define MPH_FETCH_H

#include <uv.h>

#include "lua/bridge.h"
#include "metrics.h"

typedef struct mph_fetch_s mph_fetch_t;

/* Creates a fetcher on loop, counting into metrics (borrowed; it must outlive the fetcher;
 * NULL: nothing counted).
 * libcurl itself is set up at the first exchange, so a host that never fetches pays nothing
 * for it. Returns 0. */
int mph_fetch_new(mph_fetch_t **out, uv_loop_t *loop, mph_metrics_t *metrics);

/* What a fetcher sets on every exchange besides the request's own options (0: curl's
 * default): the calls between hosts (hosts.c) want a dead host found in bounded time and a
 * restarted one found at its new address soon. */
typedef struct {
    unsigned connect_timeout_ms; /* a connection not made by then fails the exchange */
    unsigned dns_cache_s;        /* a name's addresses are looked up again after this (0: 60) */
    unsigned max_conn_age_s;     /* an idle connection older than this is not reused */
} mph_fetch_tuning_t;

/* Sets the tuning of every exchange started from now on (copied). */
void mph_fetch_tune(mph_fetch_t *f, const mph_fetch_tuning_t *tuning);

/* An mph_lua_fetch_fn; fud is the mph_fetch_t. cb runs from the loop, never before this
 * returns. After mph_fetch_close it returns MPH_ECLOSED ("the host is stopping"); when libcurl
 * cannot be set up, MPH_EIO. */
int mph_fetch_start(void *fud, const mph_lua_fetch_req_t *req, mph_lua_fetch_cb cb, void *ud,
                    char *why, size_t whylen);

/* Ends the fetcher: exchanges still in flight end now, with "cancelled: the host is
 * stopping" (their callbacks run before this returns, and may start nothing new), its
 * connections and handles close, and once the last close callback has run it frees itself
 * and calls closed(ud) (NULL: none). Run the loop afterwards. */
void mph_fetch_close(mph_fetch_t *f, void (*closed)(void *ud), void *ud);

#endif
