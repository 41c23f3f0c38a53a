/*
 * common.h: what every mphost module shares: error codes, the aborting allocator and the
 * logger. It is the one header that lua/ and storage/ include from host/; it has no state
 * of its own beyond the log level.
 *
 * Errors follow libuv's habit: functions return 0 or a negative MPH_E* code, and
 * mph_strerror() names it. The JSON-RPC error codes live in a second list so that the wire
 * numbers and their standard messages are written down once.
 */
#ifndef MPH_COMMON_H
#define MPH_COMMON_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* Host error codes (negative on return).  X(name, value, message). */
#define MPH_ERRNO_MAP(X)                                                                           \
    X(EINVAL, -1, "invalid argument")                                                              \
    X(ENOMEM, -2, "out of memory")                                                                 \
    X(EIO, -3, "input/output error")                                                               \
    X(ESCRIPT, -4, "script error")                                                                 \
    X(EADDRINUSE, -5, "address already in use")                                                    \
    X(ELISTEN, -6, "cannot listen")                                                                \
    X(ECONFLICT, -7, "version conflict")                                                           \
    X(ESTORAGE, -8, "storage unavailable")                                                         \
    X(ECORRUPT, -9, "corrupt storage file")                                                        \
    X(ENOTFOUND, -10, "not found")                                                                 \
    X(ECLOSED, -11, "closed")

enum {
#define MPH_ERR_ENUM(name, value, msg) MPH_##name = value,
    MPH_ERRNO_MAP(MPH_ERR_ENUM)
#undef MPH_ERR_ENUM
};

/* Returns a static, human-readable message for a negative MPH_E* code. */
const char *mph_strerror(int err);

/* JSON-RPC 2.0 error codes and their standard messages.  X(name, code, message). */
#define MPH_RPC_ERROR_MAP(X)                                                                       \
    X(PARSE_ERROR, -32700, "Parse error")                                                          \
    X(INVALID_REQUEST, -32600, "Invalid Request")                                                  \
    X(METHOD_NOT_FOUND, -32601, "Method not found")                                                \
    X(INVALID_PARAMS, -32602, "Invalid params")                                                    \
    X(INTERNAL_ERROR, -32603, "Internal error")                                                    \
    X(HANDLER_ERROR, -32000, "Server error")                                                       \
    X(CONFLICT, -32001, "Transaction conflict")                                                    \
    X(STORAGE_UNAVAILABLE, -32002, "Storage unavailable")                                          \
    X(TIMEOUT, -32003, "Handler timed out")                                                        \
    X(UNAUTHORIZED, -32004, "unauthorized")                                                        \
    X(WORKER_UNAVAILABLE, -32005, "Worker unavailable")                                            \
    X(KEY_REUSED, -32006, "idempotency key reused with a different request")                       \
    X(OUTBOUND_FAILED, -32008, "Outbound call failed")

enum {
#define MPH_RPC_ENUM(name, code, msg) MPH_RPC_##name = code,
    MPH_RPC_ERROR_MAP(MPH_RPC_ENUM)
#undef MPH_RPC_ENUM
};

/* Standard message of a JSON-RPC error code ("Server error" for unknown codes). */
const char *mph_rpc_message(int code);

/* Allocation that never returns NULL: on failure it prints and aborts, as h2o_mem_alloc does.
 * Library allocations (jansson, hiredis, Lua) are still checked where they are made. */
void *mph_xmalloc(size_t size);
void *mph_xcalloc(size_t n, size_t size);
void *mph_xrealloc(void *p, size_t size);
char *mph_xstrdup(const char *s);
char *mph_xstrndup(const char *s, size_t n);

/* -- Growable byte buffer -- */
typedef struct {
    char *data; /* owned; NUL-terminated after every append */
    size_t len; /* bytes used, without the NUL */
    size_t cap; /* bytes allocated */
} mph_buf_t;

#define MPH_BUF_INIT                                                                               \
    {                                                                                              \
        NULL, 0, 0                                                                                 \
    }
void mph_buf_reserve(mph_buf_t *b, size_t extra);
void mph_buf_append(mph_buf_t *b, const void *data, size_t len);
void mph_buf_puts(mph_buf_t *b, const char *s);
void mph_buf_printf(mph_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends v in decimal: what mph_buf_printf("%lld") writes, without printf's cost (it runs
 * for every id and integral number of every response). */
void mph_buf_put_int(mph_buf_t *b, long long v);
/* Writes v in decimal at out (at least MPH_INT_CHARS bytes; no NUL); returns the length. */
#define MPH_INT_CHARS 20
size_t mph_format_int(char *out, long long v);

/* Redis Cluster's hash tag of a key or name (len bytes): the text between its first '{' and
 * the first '}' after it, when not empty. Returns 1 with its offset in *at and length in
 * *taglen, or 0 when there is none. (storage/ routes by it; lua/ keeps a call's records beside
 * the scopes that share a key's tag.) */
int mph_hash_tag(const char *s, size_t len, size_t *at, size_t *taglen);
/* Hands the bytes over: returns the data (caller frees, may be NULL when empty) and resets b. */
char *mph_buf_steal(mph_buf_t *b, size_t *len);
void mph_buf_free(mph_buf_t *b);

/* Reads from fd until a newline, the end of the stream or size - 1 bytes, waiting up to
 * timeout_ms in all (negative: no limit). Blocking: for the command line and for processes
 * with nothing else to do, never on a loop. line gets what came, NUL-terminated, without the
 * newline. Returns 1 when a whole line came, 0 when the stream ended (or failed) before, -1
 * when the time ran out first. */
int mph_read_line(int fd, char *line, size_t size, int timeout_ms);

/* Checks that the directory at path is one no other user can have planted or can write into:
 * not a symbolic link, owned by our effective uid (or by root, when root_ok: a directory such
 * as /var/log), and not writable by group or others. `what` names it in the message ("the
 * state directory"). Returns 0, or MPH_EINVAL (MPH_EIO when it cannot be looked at) with a
 * message in err. */
int mph_check_dir(const char *path, const char *what, int root_ok, char *err, size_t errlen);

/* -- Logging -- */
typedef enum {
    MPH_LOG_TRACE,
    MPH_LOG_DEBUG,
    MPH_LOG_INFO,
    MPH_LOG_WARN,
    MPH_LOG_ERROR,
    MPH_LOG_SILENT
} mph_log_level_t;

/* Process-wide level; messages below it are dropped. Default MPH_LOG_INFO. */
extern mph_log_level_t mph_log_level;

/* Parses "trace".."silent"; returns 0 and sets *out, or MPH_EINVAL. */
int mph_log_parse_level(const char *name, mph_log_level_t *out);

/* Names the process in every line it logs from now on ("worker 2"; "" for none). */
void mph_log_set_tag(const char *tag);

/* Opens path again (append, created 0600 if missing) over stdout and stderr, after a log
 * rotation renamed it (SIGUSR1); NULL: nothing to do. A failure is logged to the old one. */
void mph_reopen_stderr(const char *path);

/* Now as ISO 8601 UTC with milliseconds ("2026-01-02T03:04:05.678Z", 24 characters). */
void mph_format_time(char *buf, size_t size);

/* Copies n bytes of src into dst (room bytes; no NUL added) as a log shows them: printable
 * ASCII and valid UTF-8 as they are; newline, return and tab as \n, \r, \t; any other control
 * character or byte that is not valid UTF-8 as \xNN. Stops before what does not fit whole.
 * Returns the bytes written. */
size_t mph_log_escape(char *dst, size_t room, const char *src, size_t n);

/* Writes one line to stderr: timestamp, level, tag, then the message escaped by
 * mph_log_escape (so a message can never make a second line). Never fails visibly. */
void mph_log(mph_log_level_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define MPH_LOG_ENABLED(level) ((level) >= mph_log_level)

/* A limit on lines that someone else can cause at will (a refused local client): at most one
 * per period, so a flood cannot fill the disk or bury other lines. Zero-initialize. */
typedef struct {
    long long next_ms;        /* CLOCK_MONOTONIC ms before which lines are held back */
    unsigned long suppressed; /* lines held back since the last one written */
} mph_log_limit_t;

/* Returns 1 when a line may be written now, with *held set to how many were held back
 * before it (say so in the line); 0 when it must be dropped (it is counted). */
int mph_log_limit_pass(mph_log_limit_t *limit, unsigned period_ms, unsigned long *held);
#define MPH_REFUSAL_LOG_MS 10000 /* refused local clients: one line per this at most */

/* Recovers the struct that embeds `ptr` as its member `field`. */
#define mph_container_of(ptr, type, field) ((type *)((char *)(ptr)-offsetof(type, field)))

/* url as messages and status may show it: without its credentials ("redis://:secret@host" is
 * shown "redis://host", "https://user:pw@host/path" "https://host/path"); any scheme. All
 * up to the last '@' goes, so a password holding '/' or '@' never shows (an '@' in a path
 * takes some of the path with it). Writes at most size bytes, NUL included. */
void mph_url_shown(const char *url, char *out, size_t size);

#endif
