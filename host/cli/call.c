/*
 * call.c: `mphost call METHOD [JSON] [--url URL]`, a small blocking JSON-RPC client. It is a
 * command-line tool, not part of the server, so plain sockets are the simple choice; the
 * response is parsed with http-parser like everything else HTTP here.
 *
 * Exit status: 0 result printed on stdout; 1 a JSON-RPC or HTTP error (printed on stderr)
 * or bad arguments; 2 no connection (or it broke before a full response).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <http_parser.h>
#include <jansson.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "common/json.h"
#include "cli.h"
#include "common/common.h"

typedef struct {
    mph_buf_t body;
    int complete;
} response_t;

static int on_body(http_parser *p, const char *at, size_t len)
{
    response_t *r = p->data;
    mph_buf_append(&r->body, at, len);
    return 0;
}

static int on_complete(http_parser *p)
{
    ((response_t *)p->data)->complete = 1;
    return 0;
}

static int connect_to(const char *host, const char *port, char *err, size_t errlen)
{
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "%s", gai_strerror(rc));
        return -1;
    }
    int fd = -1;
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0)
            continue;
        struct timeval tv = {60, 0};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0)
            break;
        snprintf(err, errlen, "%s", strerror(errno));
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd;
}

/* The parts of an http:// URL the client needs. */
typedef struct {
    char host[256], port[16], path[1024];
} target_t;

/* Reads url (http://host[:port][/path]) into t. 0, or -1 after printing why not. */
static int parse_url(const char *url, target_t *t)
{
    struct http_parser_url u;
    http_parser_url_init(&u);
    if (http_parser_parse_url(url, strlen(url), 0, &u) != 0 || !(u.field_set & (1 << UF_HOST)) ||
        strncmp(url, "http://", 7) != 0) {
        fprintf(stderr, "mphost call: invalid URL %s (expected http://host[:port]/path)\n", url);
        return -1;
    }
    snprintf(t->host, sizeof(t->host), "%.*s", u.field_data[UF_HOST].len,
             url + u.field_data[UF_HOST].off);
    snprintf(t->port, sizeof(t->port), "%u", (u.field_set & (1 << UF_PORT)) ? u.port : 80);
    if (u.field_set & (1 << UF_PATH))
        snprintf(t->path, sizeof(t->path), "%.*s", u.field_data[UF_PATH].len,
                 url + u.field_data[UF_PATH].off);
    else
        snprintf(t->path, sizeof(t->path), "/");
    return 0;
}

/* The whole HTTP request of the call into req. 0, or -1 after printing why not (params is
 * not a JSON array or object). */
static int build_request(const mph_cli_t *cli, const target_t *t, mph_buf_t *req)
{
    json_error_t jerr;
    json_t *params = mph_json_load(cli->params, strlen(cli->params), &jerr);
    if (params == NULL || (!json_is_array(params) && !json_is_object(params))) {
        fprintf(stderr, "mphost call: params must be a JSON array or object: %s\n", cli->params);
        json_decref(params);
        return -1;
    }
    mph_buf_t body = MPH_BUF_INIT;
    mph_buf_puts(&body, "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":");
    mph_json_write_string(&body, cli->method, strlen(cli->method));
    mph_buf_puts(&body, ",\"params\":");
    mph_json_write_jansson(&body, params);
    mph_buf_puts(&body, "}");
    json_decref(params);
    mph_buf_printf(req,
                   "POST %s HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/json\r\n"
                   "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                   t->path, t->host, t->port, body.len);
    mph_buf_append(req, body.data, body.len);
    mph_buf_free(&body);
    return 0;
}

/* Sends req and reads the whole response into resp (its status in *status). 0, or -1 after
 * printing why not (the connection failed or broke). */
static int exchange(const char *url, const target_t *t, const mph_buf_t *req, response_t *resp,
                    unsigned *status)
{
    char err[256] = "connection failed";
    int fd = connect_to(t->host, t->port, err, sizeof(err));
    if (fd < 0) {
        fprintf(stderr, "mphost call: cannot connect to %s: %s\n", url, err);
        return -1;
    }
    for (size_t sent = 0; sent < req->len;) {
        ssize_t w = send(fd, req->data + sent, req->len - sent, MSG_NOSIGNAL);
        if (w <= 0) {
            fprintf(stderr, "mphost call: sending to %s: %s\n", url, strerror(errno));
            close(fd);
            return -1;
        }
        sent += (size_t)w;
    }
    http_parser parser;
    http_parser_init(&parser, HTTP_RESPONSE);
    parser.data = resp;
    http_parser_settings settings = {0};
    settings.on_body = on_body;
    settings.on_message_complete = on_complete;
    char buf[16384];
    while (!resp->complete) {
        ssize_t r = recv(fd, buf, sizeof(buf), 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            break;
        http_parser_execute(&parser, &settings, buf, (size_t)r); /* r == 0 signals EOF */
        if (r == 0 || HTTP_PARSER_ERRNO(&parser) != HPE_OK)
            break;
    }
    close(fd);
    if (!resp->complete) {
        fprintf(stderr, "mphost call: no complete response from %s\n", url);
        return -1;
    }
    *status = parser.status_code;
    return 0;
}

/* Prints v's compact JSON text and a newline on f, after prefix. */
static void print_json(FILE *f, const char *prefix, const json_t *v)
{
    mph_buf_t out = MPH_BUF_INIT;
    mph_json_write_jansson(&out, v);
    fprintf(f, "%s%s\n", prefix, out.data ? out.data : "");
    mph_buf_free(&out);
}

/* Prints the JSON-RPC response in body: its result on stdout (returns 0), or its error on
 * stderr (returns 1). */
static int print_reply(const mph_buf_t *body)
{
    json_error_t jerr;
    json_t *doc = mph_json_load(body->data ? body->data : "", body->len, &jerr);
    json_t *result = json_object_get(doc, "result");
    json_t *error = json_object_get(doc, "error");
    int rc = 1;
    if (result) {
        print_json(stdout, "", result);
        rc = 0;
    } else if (json_is_object(error)) {
        json_t *message = json_object_get(error, "message");
        fprintf(stderr, "error %lld: %s\n",
                (long long)json_integer_value(json_object_get(error, "code")),
                json_is_string(message) ? json_string_value(message) : "(no message)");
        if (json_object_get(error, "data"))
            print_json(stderr, "data: ", json_object_get(error, "data"));
    } else {
        fprintf(stderr, "mphost call: not a JSON-RPC response: %.*s\n", (int)body->len,
                body->data ? body->data : "");
    }
    json_decref(doc);
    return rc;
}

int mph_cli_call(mph_cli_t *cli)
{
    target_t t;
    mph_buf_t req = MPH_BUF_INIT;
    response_t resp = {MPH_BUF_INIT, 0};
    unsigned status = 0;
    int rc = 1;
    if (parse_url(cli->url, &t) != 0 || build_request(cli, &t, &req) != 0)
        goto out;
    if (exchange(cli->url, &t, &req, &resp, &status) != 0) {
        rc = 2;
        goto out;
    }
    if (status != 200 && status != 401) /* 401: a JSON-RPC error (unauthorized) */
        fprintf(stderr, "mphost call: HTTP %u: %.*s", status, (int)resp.body.len,
                resp.body.data ? resp.body.data : "");
    else
        rc = print_reply(&resp.body);
out:
    mph_buf_free(&req);
    mph_buf_free(&resp.body);
    return rc;
}
