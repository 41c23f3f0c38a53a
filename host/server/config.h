/*
 * config.h: a host's configuration as the library and the mphost program see it.
 *
 * Embedding programs see mph_host_config_t as an opaque type and set it through mphost.h
 * (options by name, as the command line spells them). This header is the interface between
 * libmphost and the mphost program, which also wires a worker's host into its supervisor
 * (worker identity, shared memory, heartbeats, the socket directory): those fields are no
 * embedder's business, and can change without touching libmphost's ABI.
 *
 * Options are data (as Redis declares its config options in one table): a row per option
 * says how its value is read and where it goes, and parsing, range messages and help all
 * read the rows. The same rows serve the command line (host/options.c adds its own).
 */
#ifndef MPH_CONFIG_H
#define MPH_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "mphost.h"

struct mph_metrics_slot_s;

/* A worker's peer socket in peer_dir_fd (peer.h): its generation, its id. The supervisor
 * removes those of a generation once it has ended. */
#define MPH_PEER_SOCKET_FORMAT "g%d.w%d"

struct mph_host_config_s {
    /* ---- Options (mph_host_config_set; the command line's --name=value) ---- */
    const char *listen;           /* address to bind; default "0.0.0.0" */
    int port;                     /* default 3000; 0 picks a free port (see mph_host_port) */
    const char *storage;          /* a storage URL (storage/storage.h); default "file" */
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
    unsigned handler_timeout_ms;  /* -32003 past this; default 10000; 0: none, JIT on */
    int idempotency_ttl;          /* seconds a call's Idempotency-Key record answers its
                                     duplicates; default 86400 */
    size_t scope_cache;           /* bytes of scope state kept (estimated); idle scopes past
                                     it are evicted, least recently used first; default
                                     128 MiB; 0: no bound */
    const char *users_file;       /* users for mp.basicAuth: read at mph_host_new and again
                                     on SIGHUP; NULL (default): none, and calls to
                                     mp.basicAuth services are refused */
    const char *access_log;       /* NULL (default): none; a file to append one line per HTTP
                                     request to, or "-" for stderr */
    const char *log_path;         /* NULL (default), or the file stderr (and stdout) write to:
                                     SIGUSR1 opens it again over them, after a rotation */
    const char *peers;            /* NULL (default), or every host's base URL, comma-separated,
                                     in host order: mp.shard and mp.scatter place their shards
                                     over all of them (hosts.h) */
    int host_id;                  /* which of peers this host is, 1..; 0 (default): from the
                                     host name (NAME-N is host N + 1) */
    const char *peer_secret_file; /* the secret the hosts of peers sign their calls with */
    unsigned send_expiry_ms;      /* mp.send: a message undelivered this long after it was
                                     due is dead (kept, listed, no longer sent); default a day */
    int debug_errors;             /* handler errors carry tracebacks (logging at debug) */
    struct uv_loop_s *loop;       /* NULL (default): the host's own; else the caller's */

    /* ---- Wiring of a supervised worker (the mphost program only) ---- */
    int supervised;      /* 0 (default): nothing outside the process watches it, so while a
                            time limit is set LuaJIT's compiler is off and a count hook checks
                            every handler (compiled code runs no hooks). 1: a supervisor ends
                            the process when its loop stops turning (see heartbeat), so the
                            compiler stays on and the hook is armed only once a handler passes
                            its deadline, by a thread that signals the host's thread with
                            SIGURG: the host installs a SIGURG handler */
    uint64_t *heartbeat; /* NULL (default), or where the host stores its loop's time (uv_now:
                            CLOCK_MONOTONIC milliseconds) at every turn of its loop, and every
                            250 ms or so while idle, for the supervisor to see that the loop
                            turns (a relaxed atomic store; the memory is the caller's) */
    int listen_fd;       /* -1 (default): bind listen:port; else a socket already listening
                            (a supervisor's, shared with its other workers) to accept on; the
                            host owns it once listening */
    int worker_id;       /* mp.worker.id, 1..worker_count; default 1 */
    int worker_count;    /* mp.worker.count; default 1 */
    int peer_dir_fd;     /* the directory its generation's peer sockets are in
                            (host/localsock.h; borrowed); -1 (default): not a worker, no
                            forwarding between workers */
    int generation;      /* the worker's generation (names its peer socket) */
    const uint64_t *serving_generation;             /* NULL, or where the supervisor publishes the
                                        generation that serves (shared memory, read with a relaxed atomic
                                        load): after a reload, the workers of the generation being
                                        replaced forward to the new ones */
    struct mph_metrics_slot_s *metrics_slot;        /* NULL: counts in a slot of its own; else
                                                       its slot in shared memory (metrics.h) */
    const struct mph_metrics_slot_s *metrics_slots; /* NULL: /metrics shows its own slot;
                                                       else every slot a scrape sums */
    size_t metrics_nslots;                          /* how many */

    /* ---- Ownership ---- */
    char **owned;  /* strings this config allocated (set by name, or copied), freed with it */
    size_t nowned; /* entries in owned */
};

/* ---- Options as data ---- */

typedef enum {
    MPH_OPT_STRING,  /* a const char *; the host's config keeps its own copy */
    MPH_OPT_INT,     /* a whole decimal number in [min, max], into an int, unsigned or size_t */
    MPH_OPT_SECONDS, /* seconds with an optional fraction, in [min, max] milliseconds, into an
                        unsigned (milliseconds) */
    MPH_OPT_BYTES,   /* a whole number with an optional k, M or G, into a size_t */
    MPH_OPT_CUSTOM   /* read by `custom` */
} mph_option_kind_t;

typedef struct {
    const char *name;       /* as the command line spells it, without "--" */
    mph_option_kind_t kind; /* how its value is read */
    unsigned long min, max; /* INT: the range; SECONDS: the range in milliseconds */
    size_t offset, size;    /* its field in the struct the rows describe (CUSTOM: unused) */
    int (*custom)(void *base, const char *value); /* CUSTOM: 0, or -1 to refuse */
    const char *expected; /* what a refused value should have been (CUSTOM, STRING) */
    const char *arg;      /* the value's name in the help ("N", "SEC") */
    const char *help;     /* its help; lines after the first are indented by mph_options_usage */
} mph_option_t;

/* The rows of the host's options (fields of struct mph_host_config_s); *n gets how many. */
const mph_option_t *mph_config_options(size_t *n);

/* The row named `name` among n rows, or NULL. */
const mph_option_t *mph_options_find(const mph_option_t *rows, size_t n, const char *name);

/* Reads value as row o says into the struct at base (a string is stored as given: borrowed).
 * Returns 0, or MPH_EINVAL with "invalid --NAME: VALUE (expected ...)" in err. */
int mph_option_apply(void *base, const mph_option_t *o, const char *value, char *err,
                     size_t errlen);

/* Prints the help of n rows ("  --name=ARG  help"). */
void mph_options_usage(FILE *out, const mph_option_t *rows, size_t n);

/* (These are not mph_host_*: libmphost.so exports only those, host/mphost.map.) */

/* Makes dst a copy of src whose strings dst owns (release it with mph_config_release). */
void mph_config_copy(struct mph_host_config_s *dst, const struct mph_host_config_s *src);

/* Frees the strings cfg owns (not cfg itself). */
void mph_config_release(struct mph_host_config_s *cfg);

/* Fills every field with its default (owning nothing). */
void mph_config_init(struct mph_host_config_s *cfg);

#endif
