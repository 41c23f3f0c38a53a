/*
 * http.h: the HTTP/1.x server: a TCP listener on the loop, one parser per connection
 * (Debian's http-parser), keep-alive and pipelining with responses in request order,
 * chunked bodies, Expect: 100-continue, and limits (body, headers, connections, idle time).
 * It does not parse JSON-RPC: a complete POST body is handed to the handler, which answers
 * exactly once with mph_http_respond, now or later. What it knows of a call is what the
 * handler tells it for the access log line (mph_http_req_set_call: the method names and the
 * JSON-RPC code, as opaque text and number).
 */
#ifndef MPH_HTTP_H
#define MPH_HTTP_H

#include <stddef.h>
#include <sys/socket.h>
#include <uv.h>

#include "accesslog.h"

typedef struct mph_http_server_s mph_http_server_t;
typedef struct mph_http_req_s mph_http_req_t;

typedef struct {
    size_t max_body;            /* bytes of a request body; more -> 413 */
    size_t max_header;          /* bytes of request line plus headers; more -> 431 */
    unsigned max_connections;   /* open connections; more are closed at once */
    unsigned idle_timeout_ms;   /* a connection with nothing in flight that completes no
                                   request for this long is closed (idle or stalled) */
    unsigned max_pipeline;      /* requests in flight per connection before reading pauses */
    const char *capture_header; /* a header (lowercase name, borrowed) whose value each request
                                   keeps for the handler (mph_http_req_header); NULL: none */
    mph_accesslog_t *alog;      /* borrowed: gets one line per request answered
                                   (docs/operations.md, "Logs and rotation"); NULL: none */
} mph_http_config_t;

/* Fills the defaults: 1 MiB body, 16 KiB headers, 10000 connections, 30 s, 64, no header
 * captured. */
void mph_http_config_default(mph_http_config_t *cfg);

/* Called for each complete POST request. body is borrowed for the duration of the call. The
 * handler must call mph_http_respond(req, ...) exactly once, during the call or later. */
typedef void (*mph_http_handler_t)(void *ud, mph_http_req_t *req, const char *body, size_t len);

/* Creates a server (not listening yet). cfg is copied. Returns 0. */
int mph_http_server_new(mph_http_server_t **out, uv_loop_t *loop, const mph_http_config_t *cfg,
                        mph_http_handler_t handler, void *ud);

/* Binds and listens. Returns 0, MPH_EADDRINUSE, or MPH_ELISTEN, with a message in err. */
int mph_http_listen(mph_http_server_t *srv, const char *addr, int port, char *err, size_t errlen);

/* Creates a listening TCP socket bound to addr:port (blocking calls; for a process that
 * hands it to others, such as the supervisor to its workers). *fd_out (new, close-on-exec)
 * and the port bound are set on success. Returns 0, MPH_EINVAL, MPH_EADDRINUSE or MPH_ELISTEN
 * with a message in err. */
int mph_http_open_listener(const char *addr, int port, int *fd_out, int *port_out, char *err,
                           size_t errlen);

/* Accepts on fd, a socket already listening that other processes (the supervisor's other
 * workers) accept on too. After each accept the server pauses pause_ms (0: no pause) so that
 * an idle process gets the next connection. Once this returns 0 the server owns fd (it is
 * closed at the shutdown); MPH_ELISTEN: fd is not a listening socket (left to the caller). */
int mph_http_listen_shared(mph_http_server_t *srv, int fd, unsigned pause_ms, char *err,
                           size_t errlen);

/* Serves on fd, a Unix stream socket already listening (localsock.h makes one). Only
 * clients running as this process's effective user are served (localsock.h:
 * mph_localsock_peer_allowed); others are closed at once. Returns 0 (the server owns fd from then
 * on), or MPH_ELISTEN with a message in err (fd is closed). */
int mph_http_listen_unix(mph_http_server_t *srv, int fd, char *err, size_t errlen);

/* The value of the header cfg.capture_header names, as req carried it (cut to 31 bytes), or
 * "" when it did not. Borrowed: valid until the request is answered. */
const char *mph_http_req_header(const mph_http_req_t *req);

/* What the access log says of req: the JSON-RPC method(s) (copied, cut to fit; "-" unless
 * set) and the JSON-RPC code of the answer (0 for a result). Call before responding. */
void mph_http_req_set_call(mph_http_req_t *req, const char *methods, int code);

/* Called for a complete GET request, with the URL's path (the query left out; "" when longer
 * than 63 bytes). Returns 1 when it answers req (mph_http_respond_text), now or later; 0
 * leaves it to the server, which answers 405 as to any other method but POST. */
typedef int (*mph_http_get_handler_t)(void *ud, mph_http_req_t *req, const char *path);

/* Has GET requests handed to fn (with the server's ud) instead of refused with 405. */
void mph_http_set_get_handler(mph_http_server_t *srv, mph_http_get_handler_t fn);

/* Open connections now. */
unsigned mph_http_connections(const mph_http_server_t *srv);

/* The port actually bound (useful after listening on port 0). */
int mph_http_port(const mph_http_server_t *srv);

/* Answers req. status 200 with a body, or 204 with len 0; body (malloc'd, may be NULL) is
 * stolen. Safe after the client went away: the response is then dropped. */
void mph_http_respond(mph_http_req_t *req, int status, char *body, size_t len);

/* As mph_http_respond, with the body's Content-Type (borrowed for the call). */
void mph_http_respond_text(mph_http_req_t *req, int status, const char *ctype, char *body,
                           size_t len);

/* As mph_http_respond, for a JSON body under another status (401 for a request refused for
 * its credentials), with `headers` added: "Name: value\r\n" lines, at most 128 bytes,
 * borrowed for the call. */
void mph_http_respond_json(mph_http_req_t *req, int status, const char *headers, char *body,
                           size_t len);

/* The longest Authorization value kept; a longer one is unusable. */
#define MPH_HTTP_MAX_AUTHORIZATION 2048

/* The request's Authorization header value (*len bytes, not NUL-terminated; borrowed until
 * the response or mph_http_req_wipe_authorization), or NULL when it sent none or an unusable
 * one (two of them, or one too long). */
const char *mph_http_req_authorization(const mph_http_req_t *req, size_t *len);

/* The longest Idempotency-Key value kept (JSON-RPC refuses more than 200 bytes: bridge.h); a
 * longer one is unusable. */
#define MPH_HTTP_MAX_IDEMPOTENCY_KEY 256

/* The request's Idempotency-Key header: 0 when it sent none; 1 with the value in *key, *len
 * bytes (not NUL-terminated, trailing whitespace left out; borrowed until the response); -1
 * when it sent an unusable one (two of them, or one too long). */
int mph_http_req_idempotency_key(const mph_http_req_t *req, const char **key, size_t *len);

/* Overwrites and forgets the request's copy of its Authorization header, which carries a
 * password: call it once the credentials have been read (freeing the request does it too). */
void mph_http_req_wipe_authorization(mph_http_req_t *req);

/* Called when req's client goes away before req is answered: its connection closed, or the
 * client ended its side of it (EOF) while req waited. A server cannot tell that end from a
 * close until it writes, and a client that half-closes while it waits for an answer is rare,
 * so it counts as gone, as nginx's check for a broken connection counts it. The callback may
 * answer req (dropped if the connection is gone) and nothing else of the server. */
typedef void (*mph_http_gone_cb)(void *ud, mph_http_req_t *req);

/* Registers the cleanup of a request that waits on something (STYLE.md: "Anything a request
 * waits on registers a cleanup that cancels it"): cb runs at most once, on the loop, never
 * during this call nor after req is answered. cb NULL: none (the wait ended). Replaces an
 * earlier one. */
void mph_http_req_on_gone(mph_http_req_t *req, mph_http_gone_cb cb, void *ud);

/* The address of req's client, in *out: returns 0, or MPH_EINVAL when it has none to give
 * (a Unix-socket client, or one already gone). */
int mph_http_req_peer(const mph_http_req_t *req, struct sockaddr_storage *out);

/* Graceful stop: stop accepting, close idle connections, let the others finish the
 * requests they have started, then close them. `drained` runs once when every connection
 * and the listener are closed. Calling it twice is harmless. */
void mph_http_shutdown(mph_http_server_t *srv, void (*drained)(void *ud), void *ud);

/* Closes every connection now (in-flight responses are dropped); used after a shutdown
 * deadline. `drained` still runs as promised. */
void mph_http_abort(mph_http_server_t *srv);

/* Frees the server; only after `drained` has run (or if it never listened). */
void mph_http_server_free(mph_http_server_t *srv);

#endif
