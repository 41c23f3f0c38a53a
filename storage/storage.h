/*
 * storage.h: the one interface every storage backend implements, called on the libuv loop.
 *
 * A scope is a JSON object of top-level keys; a backend stores, per scope, each key's JSON
 * text and one version number that grows by one with every commit. Two operations:
 *
 *   load(scope)                 -> the whole document and its version (0 for a new scope)
 *   commit([(scope, expected version, writes)])
 *                               -> ok (the new versions), conflict (what changed), or error
 *
 * A commit applies all its writes or none, and only if every scope is still at its expected
 * version (compare-and-set). A scope with writes moves to the expected version + 1; a scope
 * named with no writes is only checked (a transaction read it) and keeps its version. On a conflict
 * the backend returns what the caller needs to catch up without a second read: either the changes
 * since the expected version, in order (is_delta = 1), or the whole current document (is_delta =
 * 0), for every scope that refused it. The callback of a commit runs only once its writes are
 * durable.
 *
 * Fairness claims. A process whose speculative batches are always ready sends its next CAS the
 * moment the last one lands; another process that must first re-run its handlers on the
 * conflict's data then arrives second every time and could starve. So a committer refused
 * several times in a row sets `claim`: if its CAS conflicts, the backend reserves the scope's
 * next commit for it. While a claim by another committer stands, a CAS is refused even at the
 * right version, with `held` set in the result to the milliseconds the claim has left (wait
 * that long, do not spin). The file backend's claim lasts MPH_STORE_CLAIM_MS at most and the
 * claimant's next commit releases it. Redis's is a turn of MPH_STORE_TURN_MS: every commit of
 * the claimant lands in it, others wait it out (redis_cas.lua says why).
 *
 * Backends are method tables, like sqlite3_io_methods: `storage/file.c` and `storage/redis.c`
 * each export an open function that returns an mph_store_t whose first member points at its
 * methods. Calls that return 0 call their callback exactly once, later, on the loop (never
 * before returning); calls that return an error never call it. After close(), new calls return
 * MPH_ECLOSED; operations already started still complete and call back (a Redis command that
 * gets no answer fails after the command timeout), then the backend frees itself.
 */
#ifndef MPH_STORAGE_H
#define MPH_STORAGE_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "common/common.h"

#define MPH_STORE_METHODS_VERSION 1
#define MPH_STORE_CLAIM_MS 20 /* how long a fairness claim can hold a scope (files) */
#define MPH_STORE_TURN_MS 15  /* how long a claim on Redis holds others off */

typedef struct {
    const char *key; /* UTF-8, not NUL-terminated */
    size_t klen;
    const char *json; /* the value's JSON text; NULL: the key is deleted */
    size_t jlen;
} mph_store_entry_t;

typedef struct {
    uint64_t version;           /* the version the document describes */
    int is_delta;               /* 1: entries are changes after the expected version, in order */
    size_t n;                   /* number of entries */
    mph_store_entry_t *entries; /* owned by the backend; valid only during the callback */
} mph_store_doc_t;

typedef struct {
    const char *scope;                /* borrowed until the callback */
    uint64_t expected_version;        /* the version the writes were computed on */
    size_t n;                         /* number of entries */
    const mph_store_entry_t *entries; /* borrowed until the callback */
    uint64_t committer;               /* this process's random nonzero id (fairness claims) */
    int claim;                        /* 1: on a conflict, reserve the next commit for us */
} mph_store_write_t;

/* One scope of a refused commit whose version moved, or that another committer's claim
 * holds. */
typedef struct {
    const char *scope;   /* its name */
    mph_store_doc_t doc; /* what changed since the expected version, or the whole document */
    int held;            /* >0: refused because another committer holds a claim on it, for
                            about this many more milliseconds */
} mph_store_conflict_t;

typedef struct {
    int status;          /* 0, MPH_ECONFLICT, or another negative MPH_E* code */
    const char *message; /* why, when status < 0 (static or valid during the callback) */
    mph_store_doc_t doc; /* load: the document; commit ok: doc.version is the new version of
                            the first scope; conflict: what changed (of the scope named in
                            `scope`) */
    const char *scope;   /* conflict: the scope whose version moved */
    int held;            /* conflict: >0 when another committer's claim refused it (ms left) */
    size_t nconflicts;   /* conflict: every scope that refused it (at least one); the */
    const mph_store_conflict_t *conflicts; /* first is also scope, doc and held above */
} mph_store_result_t;

/* The result and everything it points to are borrowed: copy what you keep. */
typedef void (*mph_store_cb)(void *ud, const mph_store_result_t *res);

typedef struct mph_store_s mph_store_t;

typedef struct {
    int version;      /* MPH_STORE_METHODS_VERSION */
    const char *name; /* "file", "redis" */
    /* Starts loading `scope`. 0: cb will run once; <0: error, cb never runs. */
    int (*load)(mph_store_t *s, const char *scope, mph_store_cb cb, void *ud);
    /* Starts an atomic compare-and-set of nwrites scopes (each named once). */
    int (*commit)(mph_store_t *s, const mph_store_write_t *writes, size_t nwrites, mph_store_cb cb,
                  void *ud);
    /* Refuses new calls (MPH_ECLOSED), lets started ones call back, closes its handles, frees
     * itself, then calls `done` (file: at once when idle; Redis: on a later loop iteration). */
    void (*close)(mph_store_t *s, void (*done)(void *ud), void *ud);
    /* The caller evicted `scope` from its cache and has no operation of it in flight: drop
     * what is kept for it (open files); its next operation starts afresh. May be NULL. */
    void (*forget)(mph_store_t *s, const char *scope);
    /* Whether scopes a and b can ever change in one commit: 0, or MPH_EINVAL with a message
     * naming both in why (a Redis Cluster keeps them in different slots). Being the same slot
     * is an equivalence, so a transaction checks each new scope against its first one only.
     * May be NULL: always. */
    int (*together)(mph_store_t *s, const char *a, const char *b, char *why, size_t len);
    /* Whether `version` of `scope`, as this process last read or committed it, is certainly
     * still the scope's newest acknowledged version, known at once on the loop with no I/O
     * (file.c: the commit counters every process of a data directory shares): 1, or 0 when
     * only a commit with no writes (a check) can tell. May be NULL: never known. */
    int (*current)(mph_store_t *s, const char *scope, uint64_t version);
} mph_store_methods_t;

struct mph_store_s {
    const mph_store_methods_t *methods; /* first member of every backend's struct */
};

/* ---- Opening a backend by its URL ----
 *
 * Each backend owns its URL schemes (a small registry, as SQLite's VFSes are found by name):
 * file.c "file", redis_url.c "redis://" and "redis-sentinel://". */

/* What a backend may be given besides its URL; each takes what concerns it. */
typedef struct {
    const char *data_dir;         /* file: the directory */
    const char *redis_prefix;     /* Redis: the key prefix; NULL: "mp:" */
    unsigned redis_timeout_ms;    /* Redis: a command unanswered this long fails; 0: 1000 */
    unsigned redis_wait_replicas; /* Redis: see mph_store_redis_config_t.wait_replicas */
    unsigned redis_wait_ms;       /* Redis: WAIT's time limit; 0: 1000 */
} mph_store_options_t;

typedef struct {
    const char *scheme; /* what its URLs start with: "file", "redis://" */
    /* Opens the backend for url (with its scheme), as mph_store_open does. */
    int (*open)(mph_store_t **out, uv_loop_t *loop, const char *url,
                const mph_store_options_t *opts, char *err, size_t errlen);
} mph_store_backend_t;

/* Opens the backend whose scheme starts url: "file" (in opts->data_dir), "redis://...",
 * "redis-sentinel://...". Returns 0 and a new store in *out, or a negative code with a
 * one-line message in err (which never shows the URL's password). */
int mph_store_open(mph_store_t **out, uv_loop_t *loop, const char *url,
                   const mph_store_options_t *opts, char *err, size_t errlen);

/* Whether some backend takes url (its scheme is known). */
int mph_store_url_known(const char *url);

/* Opens the file backend on directory `dir` (created if missing). Returns 0 and a new store
 * in *out, or a negative code with a message in err. */
int mph_store_file_open(mph_store_t **out, uv_loop_t *loop, const char *dir, char *err,
                        size_t errlen);

typedef struct {
    const char *host;       /* borrowed; e.g. "127.0.0.1" */
    int port;               /* e.g. 6379 */
    const char *password;   /* NULL: no AUTH */
    int db;                 /* SELECTed when not 0 */
    const char *prefix;     /* key prefix; NULL: "mp:" */
    unsigned timeout_ms;    /* a command unanswered this long fails; 0: 1000 */
    size_t log_bytes;       /* each scope's change log keeps at most this many bytes; 0: 1 MiB */
    unsigned wait_replicas; /* 0, or answer a commit only once WAIT says this many replicas
                               have it (else -32002, "outcome unknown") */
    unsigned wait_ms;       /* WAIT's time limit; 0: 1000 */
    const char *sentinels;  /* NULL, or "host:port[,host:port...]": Sentinel names the master
                               (host and port are then unused) */
    const char *master;     /* with sentinels: the master's name */
} mph_store_redis_config_t;

/* Opens the Redis backend: resolves the host and checks (blocking, at most a few seconds) that
 * the server answers, then connects asynchronously on the loop (where the host, when it is a
 * name, is resolved again on the thread pool before every connection attempt). The host is a
 * name or a numeric IPv4 or IPv6 address (without brackets). Returns 0 and a new store in *out, or
 * a negative code with a one-line message in err. */
int mph_store_redis_open(mph_store_t **out, uv_loop_t *loop, const mph_store_redis_config_t *cfg,
                         char *err, size_t errlen);

#endif
