/*
 * mphost.h: the embeddable host, the whole public surface of libmphost.
 *
 *   mph_host_config_t *cfg;
 *   mph_host_t *h;
 *   char err[512];
 *   mph_host_config_new(&cfg);
 *   if (mph_host_config_set(cfg, "port", "8080", err, sizeof err) ||
 *       mph_host_new(&h, cfg, err, sizeof err) ||
 *       mph_host_load_file(h, "service.lua", err, sizeof err) ||
 *       mph_host_listen(h, err, sizeof err)) { fprintf(stderr, "%s\n", err); exit(1); }
 *   mph_host_config_free(cfg);         // the host keeps a copy
 *   mph_host_handle_signals(h);        // SIGINT/SIGTERM stop it gracefully
 *   mph_host_run(h);                   // until stopped
 *   mph_host_free(h);
 *
 * A host owns its Lua state and its storage connection, and its libuv loop unless the caller
 * gives it one (mph_host_config_set_loop: see "The caller's loop" below). All functions but
 * mph_host_stop must be called from the thread that runs the host's loop.
 *
 * The configuration is opaque, set option by option with the names and value forms of the
 * mphost command line (`mphost --help`), so that options can be added without changing the
 * library's ABI (libmphost.so.1).
 *
 * SIGPIPE: the library changes no signal disposition of the process. libuv writes to sockets
 * with write(2), which raises SIGPIPE when a client has gone away, and SIGPIPE's default
 * action ends the process; so, as libuv asks of its users, the embedding program must ignore
 * SIGPIPE (signal(SIGPIPE, SIG_IGN), as examples/embed.c and mphost do) or block it in the
 * thread that runs the host. mph_host_listen logs a warning when it is neither.
 */
#ifndef MPHOST_H
#define MPHOST_H

#include <stddef.h>
#include <stdint.h>

#define MPHOST_VERSION "1.0.0"

typedef struct mph_host_s mph_host_t;
struct uv_loop_s; /* libuv's uv_loop_t: this header needs no libuv header */

/* A host's configuration: every option at its default until set. */
typedef struct mph_host_config_s mph_host_config_t;

/* A new configuration with every option at its default. Returns 0. */
int mph_host_config_new(mph_host_config_t **out);

/* Frees cfg (a host made from it keeps its own copy). NULL is fine. */
void mph_host_config_free(mph_host_config_t *cfg);

/* Sets option `name` as the command line's --name=value would: "listen", "port", "storage"
 * (file, redis://..., redis-sentinel://...), "data", "redis-prefix", "redis-timeout",
 * "redis-wait", "logging" (the process's log level), "max-retries", "max-body", "max-header",
 * "scope-cache", "max-connections", "idle-timeout", "shutdown-timeout", "handler-timeout",
 * "users", "access-log", "peers", "host-id", "peer-secret-file", "log-path" (`mphost --help`
 * says what each takes). value is copied.
 * Returns 0, or a negative code with a one-line message in err (an unknown name, a value
 * out of range). */
int mph_host_config_set(mph_host_config_t *cfg, const char *name, const char *value, char *err,
                        size_t errlen);

/* Serves on the caller's loop (initialised, not closed before the host is), which the caller
 * runs, instead of a loop of the host's own: see "The caller's loop" below. NULL: its own. */
void mph_host_config_set_loop(mph_host_config_t *cfg, struct uv_loop_s *loop);

/* Creates a host: loop (unless the caller's), storage (opened; Redis is checked to answer),
 * Lua state. cfg is copied: it may be freed or changed afterwards. Returns 0, or a
 * negative code with a one-line message in err. On a caller's loop, a failure may leave
 * handles closing on it: run the loop before closing it. */
int mph_host_new(mph_host_t **out, const mph_host_config_t *cfg, char *err, size_t errlen);

/* Runs a service script (a file, or source text named `name`). Returns 0 or a negative code
 * with the Lua error in err. */
int mph_host_load_file(mph_host_t *h, const char *path, char *err, size_t errlen);
int mph_host_load_string(mph_host_t *h, const char *name, const char *src, char *err,
                         size_t errlen);

/* Starts listening: binds listen:port (or, in a worker of mphost's, its supervisor's socket).
 * Returns 0 or a negative code with a message (port in use). Warns when SIGPIPE would end the
 * process. */
int mph_host_listen(mph_host_t *h, char *err, size_t errlen);

/* The number of workers the loaded script's topologies ask for: the largest n of its
 * mp.spread, mp.shard and mp.scatter calls, 0 when it has none. */
int mph_host_topology_workers(const mph_host_t *h);

/* The port listened on. */
int mph_host_port(const mph_host_t *h);

/* SIGINT and SIGTERM stop the host gracefully, SIGHUP reads the users file again, SIGUSR1
 * opens the access log and "log-path" again (a log rotation renamed them) (through
 * libuv signal handles; other signals, SIGPIPE included, are left alone: see above).
 * Returns 0. */
int mph_host_handle_signals(mph_host_t *h);

/* Whether a stop was asked for (mph_host_stop, or a signal once mph_host_handle_signals was
 * called) before the host runs: delivers what is pending without blocking. A program that
 * loads a script and then decides not to run the host asks this before it frees the host, so
 * that a SIGTERM that came during the load is not lost. */
int mph_host_stop_requested(mph_host_t *h);

/* Serves until stopped, then closes everything. Returns 0; MPH_EINVAL's code (and does
 * nothing) for a host on the caller's loop, which the caller runs. */
int mph_host_run(mph_host_t *h);

/* Asks the host to stop gracefully: stop accepting, finish in-flight requests (up to the
 * shutdown timeout), close. Safe from any thread and from a signal handler. */
void mph_host_stop(mph_host_t *h);

/* Frees a host that has returned from mph_host_run, or that never ran (its own loop is then
 * run until the host has closed). A host on the caller's loop is freed only once
 * mph_host_close's callback has run (in that callback or later); freeing it earlier is a bug
 * that is logged, and the host is left allocated. */
void mph_host_free(mph_host_t *h);

/* Message for a negative code returned here. */
const char *mph_host_strerror(int err);

/* ---- The caller's loop ----
 *
 * With the caller's loop (mph_host_config_set_loop), the host opens its handles on that loop (and
 * its storage's, its HTTP server's, its timers') and never runs it: the caller runs it, with its
 * own handles beside the host's. An idle host does not keep the loop running by itself (its
 * listener, a Redis connection and work in flight do). mph_host_handle_signals stays the caller's
 * choice. To end the host, the caller calls mph_host_close and keeps running the loop: the host
 * stops as on mph_host_stop (in-flight HTTP requests and in-process calls finish, up to
 * "shutdown-timeout"), closes every handle it opened, and then calls cb, after which
 * nothing of the host is left on the loop: the caller frees the host (mph_host_free, in cb or
 * later), and its loop can run dry and uv_loop_close() it. */

typedef void (*mph_host_close_cb)(mph_host_t *h, void *ud);

/* Starts closing the host; cb (not NULL) runs exactly once, on the loop's thread, never
 * before this returns, once the host is closed. Works with the host's own loop too: cb then
 * runs inside mph_host_run (or mph_host_free), and the host is freed after that returns,
 * not in cb. Returns 0, or a negative code (cb will not run) when the host is already closed
 * or closing by mph_host_close. */
int mph_host_close(mph_host_t *h, mph_host_close_cb cb, void *ud);

/* ---- C functions callable from Lua ----
 *
 * A function registered as NAME is require("metaparticle").c.NAME in Lua. Lua calls it with
 * any arguments: they reach C as one JSON array text (args, args_len bytes, NUL-terminated),
 * mapped as a handler's result is (docs/lua-api.md, "JSON <-> Lua": nil -> null, tables -> arrays
 * or objects; a value with no JSON form raises in the caller). The function returns 0 and sets
 * *result to a JSON text, which Lua receives as params are mapped (NULL: null); or nonzero
 * and sets *result to an error message (NULL: "NAME failed"), which is raised as a Lua error
 * in the handler that called it (uncaught, the call fails with -32000 and that message); a
 * *result that is not JSON raises too. *result is malloc'd by the function and freed by the
 * host. The process stays up either way.
 *
 * Rules: it runs on the loop's thread, synchronously, inside the handler (keep it short: the
 * loop waits, and the handler time limit counts it). A handler may run more than once for one
 * call (a conflicting transaction runs again on fresh data) and a run may be dropped, so the
 * function must not have effects that must happen once: make it a pure function, a read, or
 * idempotent (e.g. keyed by an id the caller passes, so a second run finds the work done).
 * Writes that must happen exactly once belong in a scope (mp.scope), which commits with the
 * call. */

typedef int (*mph_host_function_t)(void *ud, const char *args, size_t args_len, char **result);

/* Makes fn (with ud, borrowed) callable as c.NAME; register before loading the script that
 * uses it (a script may look it up at load time). name (copied) is a non-empty string not
 * registered yet. Returns 0, or a negative code (a bad or taken name, no memory). */
int mph_host_register_function(mph_host_t *h, const char *name, mph_host_function_t fn, void *ud);

/* ---- In-process calls ----
 *
 * A call without HTTP (no mph_host_listen needed): the same checks, transactions, retries and
 * time limit as a call over HTTP, and the same answer as the call object of a JSON-RPC
 * response would carry. It is counted in /metrics (there is no access-log line). */

typedef struct {
    int code;            /* 0: a result; else the JSON-RPC error code */
    const char *json;    /* the result's JSON text; for an error, its data's (NULL: none) */
    size_t json_len;     /* bytes in json */
    const char *message; /* the error's message; NULL for a result */
} mph_host_reply_t;

/* Receives an in-process call's reply (borrowed: valid during the callback only). */
typedef void (*mph_host_call_cb)(void *ud, const mph_host_reply_t *reply);

/* Calls `method` (NUL-terminated) with params, a JSON text of len bytes (an array: positional
 * arguments; an object: one table; NULL: none), as `user` (NULL: nobody; else a user the
 * caller vouches for, whom the handler sees as mp.user: a service behind mp.basicAuth refuses
 * a call without one, -32004, as HTTP does a call without credentials). Params that do not
 * parse are -32700, that are neither array nor object -32602; an unknown or unexposed method
 * -32601. cb runs exactly once, on the loop's thread, never before this returns (a reply
 * that is ready at once, such as an error, comes on the loop's next turn). Returns 0, or a
 * negative code (cb will not run): no method or cb, or the host is stopping. */
int mph_host_call(mph_host_t *h, const char *method, const char *params, size_t len,
                  const char *user, mph_host_call_cb cb, void *ud);

#endif
