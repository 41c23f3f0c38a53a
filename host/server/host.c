/*
 * host.c: one host = one libuv loop + the HTTP server + the Lua bridge + a storage backend,
 * and, in a worker of several, the peer channel to the other workers (peer.h).
 *
 * Stopping is a sequence, each step started by the previous one's callback:
 *   mph_host_stop -> (async) http shutdown: stop accepting, finish in-flight responses
 *                 -> drained (or the deadline aborts what is left)
 *                 -> the peer listener closes last: other workers' forwarded calls in flight
 *                    finish (they may be what this worker's public calls waited for, and
 *                    other workers stopping at the same time wait for them); then forwards
 *                    still unanswered fail with -32005 (the deadline aborts the same way)
 *                 -> close the fetcher (fetch.h): outbound exchanges still in flight (the
 *                    deadline cut the wait for their calls, or their clients left) end as
 *                    cancelled, and their handlers go on without them
 *                 -> close the sending side to other hosts (hosts.h), after the fetcher:
 *                    a handler that went on without its fetch may still route a call;
 *                    calls still waiting for another host fail with -32005
 *                 -> close the authenticator: credential checks still on the thread pool
 *                    end (refused), so none reaches the bridge once it is gone
 *                 -> close the store: operations in flight complete and their transactions
 *                    are answered
 *                 -> close the bridge (answers retries still waiting), then the host's own
 *                    handles; once the last of their close callbacks has run, the host is
 *                    closed (mph_host_close's callback); its own loop runs dry and
 *                    uv_loop_close() must return 0 (a caller's loop no longer holds any
 *                    handle of the host).
 * In-process calls (mph_host_call) in flight are waited for as HTTP requests are: the step
 * after the drain waits for them too (bounded by the same deadline).
 *
 * The loop is the host's own (cfg.loop NULL: created here, run by mph_host_run, closed by
 * mph_host_free) or the caller's, which the host never runs: every wait is a callback.
 */
#define _POSIX_C_SOURCE 200809L
#include "mphost.h"

#include <assert.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "lua/bridge.h"
#include "storage/storage.h"
#include "auth.h"
#include "accesslog.h"
#include "common/common.h"
#include "common/list.h"
#include "config.h"
#include "fetch.h"
#include "hosts.h"
#include "http.h"
#include "metrics.h"
#include "peer.h"
#include "rpc.h"

/* How long a worker that has just accepted a connection leaves the next ones to the other
 * workers (http.h, mph_http_listen_shared): longer than a client takes between two short
 * calls, short enough to be lost in any connection's setup when every worker is busy. */
#define SHARED_ACCEPT_PAUSE_MS 1

/* A host whose loop reports its heartbeat (cfg.heartbeat) stamps it at every turn of the loop,
 * which costs one store per turn; an idle loop does not turn, so a timer turns it this often.
 * "Alive at" plus a timer rather than "busy since": libuv has no hook between the poll's return
 * and the I/O callbacks (where handlers run), so the start of a busy stretch cannot be stamped;
 * the end of each turn (uv_prepare, just before the poll) can. The supervisor allows the
 * handler time limit plus MPH_HEARTBEAT_GRACE_MS between two stamps: with this tick and its
 * checks, a stuck worker is killed within the limit + 1 s of its call's start. */
#define HEARTBEAT_TICK_MS 250

/* A forward to another worker fails (-32005) after the handler time limit plus this: the
 * call's own limit, and time for its commit. */
#define FORWARD_SLACK_MS 2000
/* ... or after this when there is no handler time limit (as nginx's proxy_read_timeout). */
#define FORWARD_NO_LIMIT_MS 60000
/* Idle connections to other workers close after this (or half the idle timeout, if less,
 * so that the other side's idle timeout never closes one first). */
#define PEER_IDLE_MS 5000

typedef enum { HOST_NEW, HOST_RUNNING, HOST_STOPPING, HOST_CLOSED } host_state_t;

struct mph_host_s {
    uv_loop_t own_loop;    /* the loop, when the host owns it (cfg.loop NULL) */
    uv_loop_t *loop;       /* &own_loop, or the caller's (borrowed) */
    mph_host_config_t cfg; /* a copy of the caller's (its strings owned: config.h) */
    host_state_t state;
    mph_http_server_t *http;    /* owned */
    mph_http_config_t http_cfg; /* the public server's, which the peer listener's follows */
    mph_peer_t *peer;           /* owned; NULL unless a worker of several (cfg.peer_dir_fd) */
    mph_hosts_t *hosts;         /* owned; NULL unless --peers lists several hosts */
    mph_fetch_t *fetch;         /* owned: mp.fetch's exchanges; NULL once closed */
    mph_lua_t *lua;             /* owned */
    mph_store_t *store;         /* owned */
    mph_auth_t *auth;           /* owned; NULL once closed */
    mph_rpc_t rpc;              /* what the HTTP servers dispatch to */
    mph_accesslog_t *alog;      /* owned: the access log (cfg.access_log); NULL: none */
    mph_metrics_t metrics;      /* this process's counters (its slot) */
    uv_async_t stop_async;      /* mph_host_stop from any thread */
    uv_signal_t sigint, sigterm, sighup, sigusr1;
    int signals_on;      /* sigint/sigterm/sighup/sigusr1 initialised */
    uv_timer_t deadline; /* bounds the graceful stop */
    int deadline_passed; /* it fired: what is still running is cut */
    int listening;
    uv_prepare_t beat;          /* stamps cfg.heartbeat before the loop waits (if heartbeat) */
    uv_timer_t beat_tick;       /* turns an idle loop every HEARTBEAT_TICK_MS (idem) */
    size_t calls_in_flight;     /* in-process calls whose callback has not run (mph_host_call) */
    mph_list_t ready;           /* calls answered inside mph_host_call, oldest first ... */
    uv_idle_t deliver;          /* ... which this hands to their callbacks on the next turn */
    int http_drained;           /* the stop has drained HTTP; it waits for calls_in_flight ... */
    int drain_done;             /* ... and has gone on to close the rest (after_drain) */
    unsigned closing;           /* close callbacks to come (the bridge's, the host's handles')
                                   before the host is closed */
    mph_host_close_cb close_cb; /* mph_host_close's (NULL: none) */
    void *close_ud;
};

/* An in-process call in flight: the caller's callback, and the host that counts it. A reply
 * that comes before mph_host_call has returned is kept here until the next turn of the loop
 * (its callback never runs inside mph_host_call). */
typedef struct host_call_s {
    mph_list_t node; /* in h->ready, once answered early (first: list.h) */
    mph_host_t *h;
    mph_host_call_cb cb;
    void *ud;
    int returned;          /* mph_host_call has returned: a reply goes straight to cb */
    int early;             /* it was answered before: the reply waits in `kept` */
    mph_host_reply_t kept; /* that early reply (its json and message owned) */
} host_call_t;

const char *mph_host_strerror(int err)
{
    return mph_strerror(err);
}

static void on_stop_async(uv_async_t *a);

static void on_auth_failed_closed(void *ud)
{
    (void)ud; /* nothing ran on it: it closed at once */
}

/* ---- The heartbeat ---- */

/* Copies the bridge's counters and the gauges into the metrics slot: at every loop turn of
 * a worker (others may scrape them), and before this process answers a scrape. */
static void publish_metrics(mph_host_t *h)
{
    mph_metrics_slot_t *slot = h->metrics.slot;
    mph_lua_stats_t st;
    if (h->lua == NULL)
        return;
    mph_lua_stats(h->lua, &st);
    __atomic_store_n(&slot->attempts, st.attempts, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->commits, st.commits, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->conflicts, st.conflicts, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->storage_errors, st.storage_errors, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->idem_replays, st.idem_replays, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->lua_bytes, st.lua_bytes, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->scope_bytes, st.scope_bytes, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->scopes, st.scopes, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->connections, mph_http_connections(h->http), __ATOMIC_RELAXED);
    __atomic_store_n(&slot->outbox_pending, st.outbox.pending, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->outbox_ok, st.outbox.delivered_ok, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->outbox_error, st.outbox.delivered_error, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->outbox_dead, st.outbox.dead, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->outbox_retries, st.outbox.retries, __ATOMIC_RELAXED);
}

static void on_beat(uv_prepare_t *p)
{
    mph_host_t *h = mph_container_of(p, mph_host_t, beat);
    __atomic_store_n(h->cfg.heartbeat, uv_now(h->loop), __ATOMIC_RELAXED);
    publish_metrics(h);
}

static void on_beat_tick(uv_timer_t *t)
{
    (void)t; /* it turned the loop: on_beat stamps */
}

static void start_heartbeat(mph_host_t *h)
{
    uv_prepare_init(h->loop, &h->beat);
    uv_prepare_start(&h->beat, on_beat);
    uv_timer_init(h->loop, &h->beat_tick);
    uv_timer_start(&h->beat_tick, on_beat_tick, HEARTBEAT_TICK_MS, HEARTBEAT_TICK_MS);
    /* Neither keeps the loop running by itself: a host that is done still ends. */
    uv_unref((uv_handle_t *)&h->beat);
    uv_unref((uv_handle_t *)&h->beat_tick);
}

/* ---- GET: /metrics, /healthz, /readyz (answered without Lua) ---- */

#define READY_PROBE_SCOPE "mphost-readyz-probe" /* loaded (never written) to ask Redis */

static void respond_plain(mph_http_req_t *req, int status, const char *text)
{
    mph_http_respond_text(req, status, "text/plain; charset=utf-8", mph_xstrdup(text),
                          strlen(text));
}

static void on_ready_probe(void *ud, const mph_store_result_t *res)
{
    mph_http_req_t *req = ud; /* valid until answered, even if the client left */
    if (res->status == 0)
        respond_plain(req, 200, "ready\n");
    else
        respond_plain(req, 503, "storage unavailable\n");
}

/* Readiness: the data directory is a directory we may write to (files), or Redis answers a
 * read within its command time limit (redis_timeout_ms), so the request never hangs. */
static void readyz(mph_host_t *h, mph_http_req_t *req)
{
    if (h->store == NULL || h->state != HOST_RUNNING) {
        respond_plain(req, 503, "stopping\n");
        return;
    }
    if (strcmp(h->store->methods->name, "redis") == 0) {
        if (h->store->methods->load(h->store, READY_PROBE_SCOPE, on_ready_probe, req) != 0)
            respond_plain(req, 503, "storage unavailable\n");
        return;
    }
    struct stat st;
    int ok = stat(h->cfg.data_dir, &st) == 0 && S_ISDIR(st.st_mode) &&
             access(h->cfg.data_dir, W_OK | X_OK) == 0;
    respond_plain(req, ok ? 200 : 503, ok ? "ready\n" : "data directory unusable\n");
}

static void metrics(mph_host_t *h, mph_http_req_t *req)
{
    publish_metrics(h);
    const mph_metrics_slot_t *own = h->metrics.slot;
    const mph_metrics_slot_t *const *slots = &own;
    size_t n = 1;
    const mph_metrics_slot_t **all = NULL;
    if (h->cfg.metrics_slots) { /* the live slots and the retired one, not the free ones */
        all = mph_xcalloc(h->cfg.metrics_nslots, sizeof(*all));
        for (size_t i = 0; i < h->cfg.metrics_nslots; i++)
            if (__atomic_load_n(&h->cfg.metrics_slots[i].in_use, __ATOMIC_ACQUIRE))
                all[i] = &h->cfg.metrics_slots[i];
        slots = all;
        n = h->cfg.metrics_nslots;
    }
    mph_buf_t b = MPH_BUF_INIT;
    mph_metrics_render(&b, slots, n);
    free(all);
    size_t len;
    char *text = mph_buf_steal(&b, &len);
    mph_http_respond_text(req, 200, MPH_METRICS_CONTENT_TYPE, text, len);
}

/* An mph_http_get_handler_t (ud: the host's rpc). */
static int on_get(void *ud, mph_http_req_t *req, const char *path)
{
    mph_host_t *h = mph_container_of(ud, mph_host_t, rpc);
    if (strcmp(path, "/metrics") == 0)
        metrics(h, req);
    else if (strcmp(path, "/healthz") == 0)
        respond_plain(req, 200, "ok\n");
    else if (strcmp(path, "/readyz") == 0)
        readyz(h, req);
    else
        return 0;
    return 1;
}

/* The storage the config names (storage/storage.h: mph_store_open). */
static int open_store(mph_host_t *h, char *err, size_t errlen)
{
    mph_store_options_t so = {.data_dir = h->cfg.data_dir,
                              .redis_prefix = h->cfg.redis_prefix,
                              .redis_timeout_ms = h->cfg.redis_timeout_ms,
                              .redis_wait_replicas = h->cfg.redis_wait_replicas,
                              .redis_wait_ms = h->cfg.redis_wait_ms};
    return mph_store_open(&h->store, h->loop, h->cfg.storage, &so, err, errlen);
}

/* The Lua side (lua/bridge.h), on the store, forwarding through the peer channel if any. */
static int new_lua(mph_host_t *h)
{
    mph_lua_config_t lcfg = {.store = h->store,
                             .max_retries = h->cfg.max_retries,
                             .debug_errors = h->cfg.debug_errors,
                             .handler_timeout_ms = h->cfg.handler_timeout_ms,
                             .watched = h->cfg.supervised,
                             .worker_id = h->cfg.worker_id,
                             .worker_count = h->cfg.worker_count,
                             .scope_cache = h->cfg.scope_cache,
                             .forward = h->peer ? mph_peer_forward : NULL,
                             .forward_ud = h->peer,
                             .host_id = mph_hosts_id(h->hosts),
                             .host_count = mph_hosts_count(h->hosts),
                             .forward_host = h->hosts ? mph_hosts_forward : NULL,
                             .forward_host_ud = h->hosts,
                             .fetch = mph_fetch_start,
                             .fetch_ud = h->fetch,
                             .version = MPHOST_VERSION,
                             .idempotency_ttl = (unsigned)h->cfg.idempotency_ttl};
    return mph_lua_new(&h->lua, h->loop, &lcfg);
}

/* A forward's time limit: the handler's own, and time for its commit. */
static unsigned forward_timeout_ms(const mph_host_config_t *cfg)
{
    return cfg->handler_timeout_ms ? cfg->handler_timeout_ms + FORWARD_SLACK_MS
                                   : FORWARD_NO_LIMIT_MS;
}

/* The other hosts of the deployment (hosts.h), when --peers lists several. */
static int new_hosts(mph_host_t *h, char *err, size_t errlen)
{
    const mph_host_config_t *cfg = &h->cfg;
    unsigned idle = cfg->idle_timeout_ms / 2;
    mph_hosts_config_t hc = {.peers = cfg->peers,
                             .host_id = cfg->host_id,
                             .secret_file = cfg->peer_secret_file,
                             .storage_shared = strcmp(cfg->storage, "file") != 0,
                             .quiet = cfg->supervised,
                             .worker_id = cfg->worker_id,
                             .worker_count = cfg->worker_count,
                             .timeout_ms = forward_timeout_ms(cfg),
                             .idle_ms = idle < PEER_IDLE_MS ? (idle ? idle : 1) : PEER_IDLE_MS};
    return mph_hosts_new(&h->hosts, h->loop, &hc, err, errlen);
}

/* The channel to the other workers of a worker's generation (peer.h). */
static void new_peer(mph_host_t *h)
{
    const mph_host_config_t *cfg = &h->cfg;
    unsigned idle = cfg->idle_timeout_ms / 2;
    mph_peer_config_t pcfg = {cfg->peer_dir_fd,
                              cfg->generation,
                              cfg->serving_generation,
                              cfg->worker_id,
                              cfg->worker_count,
                              forward_timeout_ms(cfg),
                              idle < PEER_IDLE_MS ? (idle ? idle : 1) : PEER_IDLE_MS};
    mph_peer_new(&h->peer, h->loop, &pcfg);
}

/* Wires what serves calls once the host's parts exist: metrics, the JSON-RPC layer, the HTTP
 * server and the loop's handles; a host on a caller's loop serves from now on. */
static void start_serving(mph_host_t *h)
{
    mph_metrics_init(&h->metrics, h->cfg.metrics_slot);
    h->rpc =
        (mph_rpc_t){h->lua, h->auth, &h->metrics, h->hosts ? mph_hosts_receive : NULL, h->hosts};
    if (h->hosts)
        mph_hosts_attach(h->hosts, &h->rpc, h->peer);
    mph_http_config_t public_cfg = h->http_cfg; /* (the peer listener captures its own) */
    public_cfg.capture_header = MPH_RPC_PEER_HEADER;
    mph_http_server_new(&h->http, h->loop, &public_cfg, mph_rpc_handle, &h->rpc);
    mph_http_set_get_handler(h->http, on_get);
    uv_async_init(h->loop, &h->stop_async, on_stop_async);
    uv_timer_init(h->loop, &h->deadline);
    uv_idle_init(h->loop, &h->deliver);
    if (h->cfg.heartbeat)
        start_heartbeat(h);
    h->state = HOST_NEW;
    if (h->cfg.loop) {
        /* The caller runs its loop: the host serves from now on, and an idle host does not
         * keep that loop running (its listener, a Redis connection, work in flight do). */
        h->state = HOST_RUNNING;
        uv_unref((uv_handle_t *)&h->stop_async);
    }
}

int mph_host_new(mph_host_t **out, const mph_host_config_t *cfg, char *err, size_t errlen)
{
    mph_host_t *h = mph_xcalloc(1, sizeof(*h));
    mph_list_init(&h->ready);
    mph_config_copy(&h->cfg, cfg);
    h->loop = h->cfg.loop ? h->cfg.loop : &h->own_loop;
    int rc = h->cfg.loop ? 0 : uv_loop_init(h->loop);
    if (rc != 0) {
        snprintf(err, errlen, "cannot create the event loop: %s", uv_strerror(rc));
        mph_config_release(&h->cfg);
        free(h);
        return MPH_EIO;
    }
    rc = new_hosts(h, err, errlen); /* before the store: a bad --peers opens nothing */
    if (rc != 0)
        goto fail_loop;
    rc = open_store(h, err, errlen);
    if (rc != 0)
        goto fail_hosts;
    /* A worker keeps quiet about the users file's mode: its supervisor (or the reload check
     * before it) has said it once already. */
    rc = mph_auth_new(&h->auth, h->loop, h->cfg.users_file, h->cfg.supervised ? MPH_AUTH_QUIET : 0,
                      err, errlen);
    if (rc != 0)
        goto fail_store;
    if (h->cfg.access_log &&
        (rc = mph_accesslog_open(&h->alog, h->cfg.access_log, err, errlen)) != 0)
        goto fail_auth;
    h->http_cfg = (mph_http_config_t){.max_body = h->cfg.max_body,
                                      .max_header = h->cfg.max_header,
                                      .max_connections = h->cfg.max_connections,
                                      .idle_timeout_ms = h->cfg.idle_timeout_ms,
                                      .max_pipeline = 64,
                                      .alog = h->alog};
    if (h->cfg.peer_dir_fd >= 0 && h->cfg.worker_count > 1)
        new_peer(h);
    mph_fetch_new(&h->fetch, h->loop, &h->metrics); /* counts once metrics are set up below */
    rc = new_lua(h);
    if (rc != 0) {
        snprintf(err, errlen, "cannot create the Lua state: %s", mph_strerror(rc));
        goto fail_fetch;
    }
    start_serving(h);
    *out = h;
    return 0;

fail_fetch:
    mph_fetch_close(h->fetch, NULL, NULL); /* it has done nothing: its timer closes */
    mph_accesslog_close(h->alog);
fail_auth:
    mph_auth_close(h->auth, on_auth_failed_closed, NULL);
fail_store:
    if (h->peer)
        mph_peer_free(h->peer); /* it has done nothing yet */
    h->store->methods->close(h->store, NULL, NULL);
fail_hosts:
    mph_hosts_free(h->hosts); /* not attached yet: nothing on the loop */
fail_loop:
    if (h->loop == &h->own_loop) {       /* a caller's loop finishes these closes as it runs */
        uv_run(h->loop, UV_RUN_DEFAULT); /* let the store's close callbacks run */
        uv_loop_close(h->loop);
    }
    mph_config_release(&h->cfg);
    free(h);
    return rc;
}

/* A script is expected to end with mp.serve(); one that does not is served all the same,
 * but it may be a script written for something else, so say so. */
static void check_served(mph_host_t *h, const char *name)
{
    if (!mph_lua_serve_called(h->lua))
        mph_log(MPH_LOG_WARN, "%s did not call mp.serve(); serving its services anyway", name);
    if (mph_lua_uses_auth(h->lua) && h->cfg.users_file == NULL)
        mph_log(
            MPH_LOG_WARN,
            "%s has services behind mp.basicAuth but no --users=FILE was given: every HTTP call "
            "to them is refused (-32004)",
            name);
}

int mph_host_load_file(mph_host_t *h, const char *path, char *err, size_t errlen)
{
    int rc = mph_lua_load_file(h->lua, path, err, errlen);
    if (rc == 0)
        check_served(h, path);
    return rc;
}

int mph_host_load_string(mph_host_t *h, const char *name, const char *src, char *err, size_t errlen)
{
    char chunkname[256];
    snprintf(chunkname, sizeof(chunkname), "=%s", name);
    int rc = mph_lua_load(h->lua, chunkname, src, strlen(src), NULL, err, errlen);
    if (rc == 0)
        check_served(h, name);
    return rc;
}

/* A write to a vanished client raises SIGPIPE (libuv uses write(2)); say so at start when
 * nothing stops it from ending the process, rather than die on the first such client. */
static void warn_if_sigpipe_kills(void)
{
    struct sigaction sa;
    sigset_t blocked;
    if (sigaction(SIGPIPE, NULL, &sa) != 0 || sa.sa_handler != SIG_DFL)
        return;
    if (pthread_sigmask(SIG_BLOCK, NULL, &blocked) == 0 && sigismember(&blocked, SIGPIPE))
        return;
    mph_log(MPH_LOG_WARN, "SIGPIPE is neither ignored nor blocked: a client that goes away "
                          "mid-response will end this process (see mphost.h)");
}

int mph_host_listen(mph_host_t *h, char *err, size_t errlen)
{
    warn_if_sigpipe_kills();
    /* The peer listener first: other workers may forward as soon as this one takes calls. */
    if (h->peer) {
        int rc = mph_peer_listen(h->peer, &h->http_cfg, &h->rpc, err, errlen);
        if (rc != 0)
            return rc;
    }
    int rc = h->cfg.listen_fd >= 0
                 ? mph_http_listen_shared(h->http, h->cfg.listen_fd,
                                          h->cfg.worker_count > 1 ? SHARED_ACCEPT_PAUSE_MS : 0, err,
                                          errlen)
                 : mph_http_listen(h->http, h->cfg.listen, h->cfg.port, err, errlen);
    if (rc == 0) {
        h->listening = 1;
        /* Messages of mp.send go out while the host serves (lua/outbox.c). */
        mph_lua_outbox_start(h->lua, h->cfg.send_expiry_ms);
    }
    return rc;
}

int mph_host_topology_workers(const mph_host_t *h)
{
    return mph_lua_topology_workers(h->lua);
}

int mph_host_port(const mph_host_t *h)
{
    return mph_http_port(h->http);
}

/* ---- Stopping ---- */

/* One close callback fewer to wait for; after the last one the host is closed. Nothing of
 * the host is touched after close_cb, which may free it. */
static void closed_one(mph_host_t *h)
{
    assert(h->closing > 0);
    if (--h->closing > 0)
        return;
    h->state = HOST_CLOSED;
    if (h->close_cb)
        h->close_cb(h, h->close_ud);
}

static void on_handle_closed(uv_handle_t *handle)
{
    closed_one(handle->data); /* the host's handles are embedded in it */
}

static void close_handle(mph_host_t *h, uv_handle_t *handle)
{
    handle->data = h;
    h->closing++;
    uv_close(handle, on_handle_closed);
}

static void deliver_ready(mph_host_t *h);

static void close_host_handles(mph_host_t *h)
{
    deliver_ready(h); /* replies of the last turn (after a deadline cut the wait for them) */
    close_handle(h, (uv_handle_t *)&h->deliver);
    close_handle(h, (uv_handle_t *)&h->stop_async);
    close_handle(h, (uv_handle_t *)&h->deadline);
    if (h->cfg.heartbeat) {
        close_handle(h, (uv_handle_t *)&h->beat);
        close_handle(h, (uv_handle_t *)&h->beat_tick);
    }
    if (h->signals_on) {
        close_handle(h, (uv_handle_t *)&h->sigint);
        close_handle(h, (uv_handle_t *)&h->sigterm);
        close_handle(h, (uv_handle_t *)&h->sighup);
        close_handle(h, (uv_handle_t *)&h->sigusr1);
    }
}

static void on_lua_closed(void *ud)
{
    closed_one(ud);
}

static void on_store_closed(void *ud)
{
    mph_host_t *h = ud;
    h->store = NULL;
    h->closing++;
    mph_lua_close(h->lua, on_lua_closed, h); /* frees itself once its timers have closed */
    h->lua = NULL;
    close_host_handles(h);
}

static void close_store(mph_host_t *h)
{
    if (mph_lua_pending(h->lua) > 0)
        mph_log(MPH_LOG_INFO, "waiting for %zu call(s) to finish their commits",
                mph_lua_pending(h->lua));
    h->store->methods->close(h->store, on_store_closed, h);
}

static void on_auth_closed(void *ud)
{
    mph_host_t *h = ud;
    h->auth = NULL;
    close_store(h);
}

static void close_auth(mph_host_t *h)
{
    uv_timer_stop(&h->deadline);
    mph_auth_close(h->auth, on_auth_closed, h);
}

static void on_hosts_closed(void *ud)
{
    close_auth(ud);
}

static void on_fetch_closed(void *ud)
{
    mph_host_t *h = ud;
    h->fetch = NULL;
    if (h->hosts)
        mph_hosts_close(h->hosts, on_hosts_closed, h);
    else
        close_auth(h);
}

/* Outbound exchanges end (cancelled) before the bridge may close. */
static void close_fetch(mph_host_t *h)
{
    mph_fetch_close(h->fetch, on_fetch_closed, h);
}

static void on_peer_closed(void *ud)
{
    close_fetch(ud);
}

/* HTTP has drained and no in-process call is in flight (or the deadline passed): the
 * listener of other workers' calls, the fetcher, then the authenticator, the store, the
 * rest. */
static void after_drain(mph_host_t *h)
{
    h->drain_done = 1;
    if (h->peer == NULL) {
        close_fetch(h);
        return;
    }
    mph_peer_shutdown(h->peer, on_peer_closed, h);
    if (h->deadline_passed)
        mph_peer_abort(h->peer);
}

/* Whether the stop waits for in-process calls before it goes on. */
static int waiting_for_calls(const mph_host_t *h)
{
    return h->http_drained && !h->drain_done;
}

static void on_http_drained(void *ud)
{
    mph_host_t *h = ud;
    h->http_drained = 1;
    if (h->calls_in_flight == 0 || h->deadline_passed)
        after_drain(h);
    else
        mph_log(MPH_LOG_INFO, "waiting for %zu in-process call(s)", h->calls_in_flight);
}

static void on_deadline(uv_timer_t *t)
{
    mph_host_t *h = mph_container_of(t, mph_host_t, deadline);
    mph_log(MPH_LOG_WARN, "stop: requests still running after %u ms; closing their connections",
            h->cfg.shutdown_timeout_ms);
    h->deadline_passed = 1;
    mph_http_abort(h->http);
    if (waiting_for_calls(h)) /* they are answered when the store and the bridge close */
        after_drain(h);
    else if (h->peer)
        mph_peer_abort(h->peer);
}

static void begin_stop(mph_host_t *h)
{
    if (h->state == HOST_STOPPING || h->state == HOST_CLOSED)
        return;
    if (h->state == HOST_RUNNING)
        mph_log(MPH_LOG_INFO, "stopping: no new connections; finishing in-flight requests");
    h->state = HOST_STOPPING;
    mph_lua_outbox_stop(h->lua); /* no new deliveries; those under way end or lapse */
    uv_timer_start(&h->deadline, on_deadline, h->cfg.shutdown_timeout_ms, 0);
    mph_http_shutdown(h->http, on_http_drained, h);
}

/* mph_host_stop, or the last in-process call the stop waited for was answered (on_call_reply
 * wakes the stop here rather than closing the store from inside the store's own callback). */
static void on_stop_async(uv_async_t *a)
{
    mph_host_t *h = mph_container_of(a, mph_host_t, stop_async);
    if (waiting_for_calls(h) && h->calls_in_flight == 0)
        after_drain(h);
    else
        begin_stop(h);
}

static void on_signal(uv_signal_t *s, int signum)
{
    mph_host_t *h = s->data;
    mph_log(MPH_LOG_INFO, "received %s", signum == SIGINT ? "SIGINT" : "SIGTERM");
    begin_stop(h);
}

/* SIGHUP: the users file is read again (on the thread pool; a bad one is logged and the old
 * users stay). */
static void on_sighup(uv_signal_t *s, int signum)
{
    mph_host_t *h = s->data;
    (void)signum;
    if (h->auth == NULL || h->cfg.users_file == NULL) {
        mph_log(MPH_LOG_INFO, "received SIGHUP: no users file to read again");
        return;
    }
    mph_log(MPH_LOG_INFO, "received SIGHUP: reading the users file %s again", h->cfg.users_file);
    mph_auth_reload(h->auth);
}

/* SIGUSR1: logrotate renamed the log files; write to fresh ones under the old names. */
static void on_sigusr1(uv_signal_t *s, int signum)
{
    mph_host_t *h = s->data;
    (void)signum;
    mph_reopen_stderr(h->cfg.log_path);
    if (h->alog)
        mph_accesslog_reopen(h->alog);
    mph_log(MPH_LOG_INFO, "received SIGUSR1: log files reopened");
}

int mph_host_handle_signals(mph_host_t *h)
{
    uv_signal_init(h->loop, &h->sigint);
    uv_signal_init(h->loop, &h->sigterm);
    uv_signal_init(h->loop, &h->sighup);
    uv_signal_init(h->loop, &h->sigusr1);
    h->sigint.data = h->sigterm.data = h->sighup.data = h->sigusr1.data = h;
    uv_signal_start(&h->sigint, on_signal, SIGINT);
    uv_signal_start(&h->sigterm, on_signal, SIGTERM);
    uv_signal_start(&h->sighup, on_sighup, SIGHUP);
    uv_signal_start(&h->sigusr1, on_sigusr1, SIGUSR1);
    h->signals_on = 1;
    return 0;
}

void mph_host_stop(mph_host_t *h)
{
    uv_async_send(&h->stop_async);
}

int mph_host_stop_requested(mph_host_t *h)
{
    if (h->loop == &h->own_loop)        /* a caller's loop has delivered them already */
        uv_run(h->loop, UV_RUN_NOWAIT); /* runs on_signal or on_stop_async if one is pending */
    return h->state == HOST_STOPPING || h->state == HOST_CLOSED;
}

int mph_host_run(mph_host_t *h)
{
    if (h->loop != &h->own_loop)
        return MPH_EINVAL; /* the caller runs its loop */
    if (h->state == HOST_NEW)
        h->state = HOST_RUNNING;
    uv_run(h->loop, UV_RUN_DEFAULT);
    return 0;
}

int mph_host_close(mph_host_t *h, mph_host_close_cb cb, void *ud)
{
    if (cb == NULL)
        return MPH_EINVAL;
    if (h->close_cb || h->state == HOST_CLOSED)
        return MPH_ECLOSED;
    h->close_cb = cb;
    h->close_ud = ud;
    /* The stop begins on the loop's next turn, as mph_host_stop's does: the caller may be
     * inside one of the host's callbacks (a call's reply), where closing the store would be
     * closing it from inside its own callback. A stop already under way ends in cb too.
     * Referenced again, so that a caller's loop runs until the host has closed. */
    uv_ref((uv_handle_t *)&h->stop_async);
    uv_async_send(&h->stop_async);
    return 0;
}

void mph_host_free(mph_host_t *h)
{
    if (h->loop != &h->own_loop && h->state != HOST_CLOSED) {
        mph_log(MPH_LOG_ERROR, "bug: mph_host_free on the caller's loop before mph_host_close's "
                               "callback: the host is left allocated");
        return;
    }
    if (h->loop == &h->own_loop) {
        begin_stop(h); /* nothing if stopping or closed */
        /* Until every handle has closed: even a host that reached HOST_CLOSED inside
         * mph_host_stop_requested's one turn of the loop may have close callbacks still due. */
        uv_run(h->loop, UV_RUN_DEFAULT);
    }
    mph_http_server_free(h->http);
    mph_metrics_free(&h->metrics);
    if (h->peer)
        mph_peer_free(h->peer);
    mph_hosts_free(h->hosts);
    mph_accesslog_close(h->alog); /* after the server: it wrote to it up to the end */
    if (h->loop == &h->own_loop) {
        int rc = uv_loop_close(h->loop);
        if (rc != 0) {
            mph_log(MPH_LOG_ERROR, "bug: handles left open at exit (%s):", uv_strerror(rc));
            uv_print_all_handles(h->loop, stderr);
        }
    }
    mph_config_release(&h->cfg);
    free(h);
}

/* ---- Embedding: C functions, in-process calls ---- */

int mph_host_register_function(mph_host_t *h, const char *name, mph_host_function_t fn, void *ud)
{
    if (h->lua == NULL)
        return MPH_ECLOSED;
    return mph_lua_register(h->lua, name, fn, ud);
}

/* Hands a reply to the call's callback and forgets the call; the stop may have waited for
 * it. */
static void deliver(host_call_t *c, const mph_host_reply_t *reply)
{
    mph_host_t *h = c->h;
    c->cb(c->ud, reply);
    free(c);
    if (--h->calls_in_flight == 0 && waiting_for_calls(h))
        uv_async_send(&h->stop_async); /* on a clean stack, not inside the store's callback */
}

/* The calls answered early, in the order they were made (those that their callbacks make
 * meanwhile wait for the next turn). */
static void deliver_ready(mph_host_t *h)
{
    mph_list_t batch, *q;
    mph_list_init(&batch);
    mph_list_move(&batch, &h->ready);
    uv_idle_stop(&h->deliver);
    while ((q = mph_list_pop(&batch)) != NULL) {
        host_call_t *c = mph_list_entry(q, host_call_t, node);
        char *json = (char *)c->kept.json, *message = (char *)c->kept.message;
        deliver(c, &c->kept);
        free(json);
        free(message);
    }
}

static void on_deliver(uv_idle_t *idle)
{
    deliver_ready(mph_container_of(idle, mph_host_t, deliver));
}

static void on_call_reply(void *ud, mph_lua_reply_t *reply)
{
    host_call_t *c = ud;
    if (!c->returned) { /* inside mph_host_call: kept for the next turn (taking the texts) */
        c->kept = (mph_host_reply_t){reply->code, reply->json, reply->json_len, reply->message};
        reply->json = reply->message = NULL;
        c->early = 1;
        return;
    }
    deliver(c, &(mph_host_reply_t){reply->code, reply->json, reply->json_len, reply->message});
}

int mph_host_call(mph_host_t *h, const char *method, const char *params, size_t len,
                  const char *user, mph_host_call_cb cb, void *ud)
{
    if (method == NULL || cb == NULL)
        return MPH_EINVAL;
    if (h->state == HOST_STOPPING || h->state == HOST_CLOSED)
        return MPH_ECLOSED;
    host_call_t *c = mph_xcalloc(1, sizeof(*c));
    *c = (host_call_t){.h = h, .cb = cb, .ud = ud};
    h->calls_in_flight++;
    mph_rpc_call(&h->rpc, method, params, len, user, on_call_reply, c);
    c->returned = 1;
    if (c->early) {
        if (mph_list_empty(&h->ready))
            uv_idle_start(&h->deliver, on_deliver);
        mph_list_insert_tail(&h->ready, &c->node);
    }
    return 0;
}
