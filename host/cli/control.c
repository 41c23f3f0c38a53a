/*
 * control.c: the supervisor's control socket (control.h), both sides.
 *
 * A request (one accepted client) goes READING (in ctl->reading, which mph_control_close
 * closes; its line read by common/linebuf.h) -> HANDED (its command went to the owner's
 * callback) -> ANSWERING (the answer is being written) -> closed. One refused or broken before
 * its command (wrong user, too long a line, the client left) is closed from READING. A request
 * is freed once its handle is closed and, if it was handed, once it was answered: the owner
 * holds it in between, whatever its client does.
 */
#define _GNU_SOURCE
#include "control.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/common.h"
#include "common/linebuf.h"
#include "common/list.h"
#include "host/server/localsock.h"

#define COMMAND_MAX 64 /* bytes of a command line */

typedef enum { REQ_READING, REQ_HANDED, REQ_ANSWERING } req_state_t;

struct mph_control_req_s {
    mph_list_t node;            /* in ctl->reading while READING (first: list.h) */
    mph_control_t *ctl;         /* while READING (NULL once handed: the owner's then) */
    req_state_t state;          /* see the top of this file */
    uv_pipe_t pipe;             /* the client's connection */
    uv_write_t write;           /* the answer's write */
    int closed;                 /* the pipe's close callback has run */
    int closing;                /* uv_close was called */
    char line[COMMAND_MAX + 1]; /* the command being read, in ... */
    mph_linebuf_t lines;        /* ... which this reads it */
    char *answer;               /* being written (owned) */
};

struct mph_control_s {
    uv_pipe_t listener;
    mph_control_cb cb;
    void *ud;
    mph_list_t reading;  /* requests still READING (closed by mph_control_close) */
    int listener_closed; /* its close callback has run */
    int closing;         /* mph_control_close was called */
};

#define CONTROL_NAME "control" /* the socket's name in the socket directory */

/* ---- The supervisor's side ---- */

static void maybe_free_control(mph_control_t *ctl)
{
    if (ctl->closing && ctl->listener_closed && mph_list_empty(&ctl->reading))
        free(ctl);
}

static void unlink_reading(mph_control_req_t *req)
{
    mph_control_t *ctl = req->ctl;
    if (ctl == NULL)
        return;
    mph_list_remove(&req->node);
    req->ctl = NULL;
    maybe_free_control(ctl);
}

static void maybe_free_req(mph_control_req_t *req)
{
    if (req->closed && req->state != REQ_HANDED) {
        free(req->answer);
        free(req);
    }
}

static void on_req_closed(uv_handle_t *h)
{
    mph_control_req_t *req = h->data;
    req->closed = 1;
    maybe_free_req(req);
}

static void close_req(mph_control_req_t *req)
{
    if (req->closing)
        return;
    req->closing = 1;
    if (req->state == REQ_READING)
        unlink_reading(req);
    uv_close((uv_handle_t *)&req->pipe, on_req_closed);
}

static void on_answer_written(uv_write_t *w, int status)
{
    (void)status; /* a client that left gets nothing, as promised */
    close_req(w->data);
}

/* Writes "line\n" and then closes. */
static void answer(mph_control_req_t *req, const char *line)
{
    unlink_reading(req);
    req->state = REQ_ANSWERING;
    if (req->closing) { /* the control socket was closed under it */
        maybe_free_req(req);
        return;
    }
    size_t n = strlen(line);
    req->answer = mph_xmalloc(n + 1);
    memcpy(req->answer, line, n);
    req->answer[n] = '\n';
    uv_buf_t buf = uv_buf_init(req->answer, (unsigned)(n + 1));
    req->write.data = req;
    if (uv_write(&req->write, (uv_stream_t *)&req->pipe, &buf, 1, on_answer_written) != 0)
        close_req(req);
}

void mph_control_reply(mph_control_req_t *req, const char *line)
{
    if (req->state != REQ_HANDED)
        return;
    answer(req, line);
}

static void on_req_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    mph_control_req_t *req = h->data;
    size_t room;
    (void)suggested;
    char *at = mph_linebuf_room(&req->lines, &room);
    *buf = uv_buf_init(at, (unsigned)room);
}

static void on_req_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    mph_control_req_t *req = s->data;
    (void)buf;
    if (req->state != REQ_READING)
        return;      /* refused for too long a line: its answer is on its way */
    if (nread < 0) { /* the client left before its command ended */
        close_req(req);
        return;
    }
    mph_linebuf_added(&req->lines, (size_t)nread);
    const char *command = mph_linebuf_take(&req->lines);
    if (command == NULL) {
        if (mph_linebuf_full(&req->lines)) {
            uv_read_stop(s);
            answer(req, "error command too long");
        }
        return;
    }
    uv_read_stop(s);
    mph_control_t *ctl = req->ctl;
    unlink_reading(req);
    req->state = REQ_HANDED;
    ctl->cb(ctl->ud, req, command);
}

/* Only our own user, or root, may steer this supervisor. */
static int allowed(mph_control_req_t *req)
{
    uv_os_fd_t fd;
    return uv_fileno((uv_handle_t *)&req->pipe, &fd) == 0 &&
           mph_localsock_peer_allowed(fd, 1, "control: a client");
}

static void on_connection(uv_stream_t *server, int status)
{
    mph_control_t *ctl = server->data;
    if (status < 0 || ctl->closing)
        return;
    mph_control_req_t *req = mph_xcalloc(1, sizeof(*req));
    uv_pipe_init(server->loop, &req->pipe, 0);
    req->pipe.data = req;
    mph_linebuf_init(&req->lines, req->line, sizeof(req->line));
    req->ctl = ctl;
    mph_list_insert_head(&ctl->reading, &req->node);
    if (uv_accept(server, (uv_stream_t *)&req->pipe) != 0) {
        close_req(req);
        return;
    }
    if (!allowed(req)) {
        answer(req, "error permission denied");
        return;
    }
    uv_read_start((uv_stream_t *)&req->pipe, on_req_alloc, on_req_read);
}

int mph_control_listen(mph_control_t **out, uv_loop_t *loop, int dir_fd, mph_control_cb cb,
                       void *ud, char *err, size_t errlen)
{
    int fd = mph_localsock_listen(dir_fd, CONTROL_NAME, 16);
    if (fd < 0) {
        snprintf(err, errlen, "cannot open the control socket: %s", strerror(-fd));
        return MPH_EIO;
    }
    mph_control_t *ctl = mph_xcalloc(1, sizeof(*ctl));
    mph_list_init(&ctl->reading);
    ctl->cb = cb;
    ctl->ud = ud;
    uv_pipe_init(loop, &ctl->listener, 0);
    ctl->listener.data = ctl;
    int rc = uv_pipe_open(&ctl->listener, fd);
    if (rc != 0)
        close(fd); /* not the handle's */
    else
        rc = uv_listen((uv_stream_t *)&ctl->listener, 16, on_connection);
    if (rc != 0) {
        snprintf(err, errlen, "cannot listen on the control socket: %s", uv_strerror(rc));
        ctl->closing = 1;
        mph_control_close(ctl);
        return MPH_EIO;
    }
    *out = ctl;
    return 0;
}

static void on_listener_closed(uv_handle_t *h)
{
    mph_control_t *ctl = h->data;
    ctl->listener_closed = 1;
    maybe_free_control(ctl);
}

void mph_control_close(mph_control_t *ctl)
{
    ctl->closing = 1;
    if (!uv_is_closing((uv_handle_t *)&ctl->listener))
        uv_close((uv_handle_t *)&ctl->listener, on_listener_closed);
    mph_list_t *q;
    while ((q = mph_list_first(&ctl->reading)) != NULL)
        close_req(mph_list_entry(q, mph_control_req_t, node)); /* unlinks it */
}

/* ---- The client's side ---- */

/* Connects to the control socket in dir_path and checks that supervisor pid listens on it
 * (the pid file's: a socket left by another process is not taken for it). Returns the
 * connected descriptor, or MPH_EIO with why not in reply. */
static int connect_control(const char *dir_path, int pid, char *reply, size_t len)
{
    char err[512];
    int dir = mph_localsock_dir_open(dir_path, 0, err, sizeof(err));
    if (dir < 0) {
        snprintf(reply, len, "its supervisor (pid %d) cannot be reached: %s", pid, err);
        return MPH_EIO;
    }
    int fd = mph_localsock_connect(dir, CONTROL_NAME, 0);
    close(dir);
    if (fd < 0) {
        snprintf(reply, len, "its supervisor (pid %d) does not answer: %s", pid, strerror(-fd));
        return MPH_EIO;
    }
    struct ucred cred;
    socklen_t clen = sizeof(cred);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) != 0 || cred.pid != pid) {
        snprintf(reply, len, "its supervisor (pid %d) does not answer: another process listens",
                 pid);
        close(fd);
        return MPH_EIO;
    }
    return fd;
}

int mph_control_request(const char *dir_path, int pid, const char *command, unsigned timeout_ms,
                        char *reply, size_t len)
{
    int fd = connect_control(dir_path, pid, reply, len);
    if (fd < 0)
        return fd;
    char line[COMMAND_MAX + 2];
    int n = snprintf(line, sizeof(line), "%s\n", command);
    if (write(fd, line, (size_t)n) != n) {
        snprintf(reply, len, "cannot write to the supervisor (pid %d): %s", pid, strerror(errno));
        close(fd);
        return MPH_EIO;
    }
    int rc = mph_read_line(fd, reply, len, (int)timeout_ms);
    close(fd);
    if (rc == 1)
        return 0;
    if (rc < 0)
        snprintf(reply, len, "the supervisor (pid %d) did not answer within %u s", pid,
                 timeout_ms / 1000);
    else
        snprintf(reply, len, "the supervisor (pid %d) ended the exchange without an answer", pid);
    return MPH_EIO;
}
