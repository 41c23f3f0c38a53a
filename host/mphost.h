/*
 * mphost.h: the embeddable host, the whole public surface of libmphost.
 *
 *   mph_host_config_t cfg;
 *   mph_host_config_default(&cfg);
 *   cfg.port = 8080;
 *   mph_host_t *h;
 *   char err[512];
 *   if (mph_host_new(&h, &cfg, err, sizeof err) ||
 *       mph_host_load_file(h, "service.lua", err, sizeof err) ||
 *       mph_host_listen(h, err, sizeof err)) { fprintf(stderr, "%s\n", err); exit(1); }
 *   mph_host_handle_signals(h);        // SIGINT/SIGTERM stop it gracefully
 *   mph_host_run(h);                   // until stopped
 *   mph_host_free(h);
 *
 * A host owns its libuv loop, its Lua state and its storage connection. All functions but
 * mph_host_stop must be called from the thread that runs the host.
 *
 * SIGPIPE: the library changes no signal disposition of the process (but SIGURG's, when a host
 * is created with `supervised` set: see below). libuv writes to sockets
 * with write(2), which raises SIGPIPE when a client has gone away, and SIGPIPE's default
 * action ends the process; so, as libuv asks of its users, the embedding program must ignore
 * SIGPIPE (signal(SIGPIPE, SIG_IGN), as examples/embed.c and mphost do) or block it in the
 * thread that runs the host. mph_host_listen logs a warning when it is neither.
 */
#ifndef MPHOST_H
#define MPHOST_H

#include <stddef.h>
#include <stdint.h>

#define MPHOST_VERSION "0.1.0"

typedef struct mph_host_s mph_host_t;

typedef struct {
    const char *listen;           /* address to bind; default "0.0.0.0" */
    int port;                     /* default 3000; 0 picks a free port (see mph_host_port) */
    const char *storage;          /* "file" (default) or "redis://[:password@]host[:port][/db]" */
    const char *data_dir;         /* file storage directory; default "./mp-data" */
    const char *redis_prefix;     /* key prefix for Redis; default "mp:" */
    unsigned redis_timeout_ms;    /* a Redis command unanswered this long fails; default 1000 */
    unsigned redis_wait_replicas; /* 0, or a commit is answered once this many Redis replicas
                                     confirm it (WAIT); default 0 */
    unsigned redis_wait_ms;       /* WAIT's time limit; default 1000 */
    int max_retries;              /* refused commits of a call's writes before -32001;
                                     default 50; 0: one attempt, no retry */
    size_t max_body;              /* bytes; default 1 MiB */
    size_t max_header;            /* bytes; default 16 KiB */
    unsigned max_connections;     /* default 10000 */
    unsigned idle_timeout_ms;     /* default 30000 */
    unsigned shutdown_timeout_ms; /* graceful stop waits this long for in-flight calls */
    int debug_errors;             /* handler errors carry tracebacks */
    unsigned handler_timeout_ms;  /* -32003 past this; default 10000; 0: none, JIT on */
    int supervised;               /* 0 (default): nothing outside the process watches it, so
                                     while a time limit is set LuaJIT's compiler is off and a
                                     count hook checks every handler (compiled code runs no
                                     hooks). 1: a supervisor ends the process when its loop
                                     stops turning (see heartbeat), so the compiler stays on
                                     and the hook is armed only once a handler passes its
                                     deadline, by a thread that signals the host's thread
                                     with SIGURG: the host installs a SIGURG handler */
    uint64_t *heartbeat;          /* NULL (default), or where the host stores its loop's time
                                     (uv_now: CLOCK_MONOTONIC milliseconds) at every turn of
                                     its loop, and every 250 ms or so while idle, for the
                                     supervisor to see that the loop turns (a relaxed atomic
                                     store; the memory is the caller's, e.g. shared) */
    int listen_fd;                /* -1 (default): bind listen:port; else a socket already
                                     listening (a supervisor's, shared with its other
                                     workers) to accept on; the host owns it once listening */
    int worker_id;                /* mp.worker.id, 1..worker_count; default 1 */
    int worker_count;             /* mp.worker.count; default 1 */
    size_t scope_cache;           /* bytes of scope state kept (estimated); idle scopes past
                                     it are evicted, least recently used first; default
                                     128 MiB; 0: no bound */
    const char *users_file;       /* users for mp.basicAuth (--users): read at mph_host_new
                                     and again on SIGHUP; NULL (default): none, and calls
                                     to mp.basicAuth services are refused */
    int supervisor_pid;           /* a worker's supervisor, after whose pid the workers'
                                     peer sockets are named; 0 (default): not a worker, no
                                     forwarding between workers */
    int generation;               /* the worker's generation (with supervisor_pid) */
    const uint64_t *serving_generation; /* NULL, or where the supervisor publishes the
                                     generation that serves (shared memory, read with a
                                     relaxed atomic load): after a reload, the workers of the
                                     generation being replaced forward to the new ones */
    const char *access_log;             /* NULL (default): none; a file to append one line per HTTP
                                           request to, or "-" for stderr (README, "Operations") */
    const char *log_path;               /* NULL (default), or the file stderr (and stdout) write to:
                                           SIGUSR1 opens it again over them, after a rotation */
    struct mph_metrics_slot_s *metrics_slot;        /* NULL: counts in a slot of its own; else
                                            its slot in shared memory (host/metrics.h) */
    const struct mph_metrics_slot_s *metrics_slots; /* NULL: /metrics shows its own slot;
                                     else every slot a scrape sums (the supervisor's) */
    size_t metrics_nslots;                          /* how many */
} mph_host_config_t;

/* Fills every field with its default. */
void mph_host_config_default(mph_host_config_t *cfg);

/* Creates a host: loop, storage (opened; Redis is checked to answer), Lua state.
 * cfg is copied. Returns 0, or a negative code with a one-line message in err. */
int mph_host_new(mph_host_t **out, const mph_host_config_t *cfg, char *err, size_t errlen);

/* Runs a service script (a file, or source text named `name`). Returns 0 or a negative code
 * with the Lua error in err. */
int mph_host_load_file(mph_host_t *h, const char *path, char *err, size_t errlen);
int mph_host_load_string(mph_host_t *h, const char *name, const char *src, char *err,
                         size_t errlen);

/* Starts listening: binds listen:port, or accepts on cfg.listen_fd when it was given.
 * Returns 0 or a negative code with a message (port in use). Warns when SIGPIPE would end the
 * process. */
int mph_host_listen(mph_host_t *h, char *err, size_t errlen);

/* The number of workers the loaded script's topologies ask for: the largest n of its
 * mp.spread, mp.shard and mp.scatter calls, 0 when it has none. */
int mph_host_topology_workers(const mph_host_t *h);

/* The port listened on. */
int mph_host_port(const mph_host_t *h);

/* SIGINT and SIGTERM stop the host gracefully, SIGHUP reads the users file again, SIGUSR1
 * opens the access log and cfg.log_path again (a log rotation renamed them) (through
 * libuv signal handles; other signals, SIGPIPE included, are left alone: see above).
 * Returns 0. */
int mph_host_handle_signals(mph_host_t *h);

/* Whether a stop was asked for (mph_host_stop, or a signal once mph_host_handle_signals was
 * called) before the host runs: delivers what is pending without blocking. A program that
 * loads a script and then decides not to run the host asks this before it frees the host, so
 * that a SIGTERM that came during the load is not lost. */
int mph_host_stop_requested(mph_host_t *h);

/* Serves until stopped, then closes everything. Returns 0. */
int mph_host_run(mph_host_t *h);

/* Asks the host to stop gracefully: stop accepting, finish in-flight requests (up to the
 * shutdown timeout), close. Safe from any thread and from a signal handler. */
void mph_host_stop(mph_host_t *h);

/* Frees a host that has returned from mph_host_run, or that never ran. */
void mph_host_free(mph_host_t *h);

/* Message for a negative code returned here. */
const char *mph_host_strerror(int err);

#endif
