/*
 * control.h: a supervisor's control socket, on which `mphost SCRIPT reload` asks for a reload
 * and hears how it went. A Unix socket named "control" in the deployment's socket directory
 * (localsock.h: ours, 0700, found from the deployment's pid file), so no other user can take
 * its name or reach it; the supervisor still checks each client's credentials (SO_PEERCRED)
 * and answers only its own user or root, and the client checks that the pid it read in the
 * pid file is the one listening.
 *
 * The exchange is one line each way: the client sends a command ("reload"), the supervisor
 * answers "ok MESSAGE" or "error MESSAGE" once it knows, and closes.
 *
 * Why a socket rather than the pid file (or a signal): the outcome must come back to the one
 * who asked, with the reason when it failed, and only once the reload is over; a socket gives
 * that request and its answer, and tells the client at once when no supervisor listens.
 */
#ifndef MPH_CONTROL_H
#define MPH_CONTROL_H

#include <stddef.h>
#include <uv.h>

typedef struct mph_control_s mph_control_t;
typedef struct mph_control_req_s mph_control_req_t;

/* A command arrived from an allowed client: `command` is the line without its newline
 * (borrowed for the call). The owner must answer it exactly once with mph_control_reply,
 * during the call or later. */
typedef void (*mph_control_cb)(void *ud, mph_control_req_t *req, const char *command);

/* Listens on the control socket in the socket directory dir_fd (borrowed). Returns 0, or
 * MPH_EIO with a message in err. */
int mph_control_listen(mph_control_t **out, uv_loop_t *loop, int dir_fd, mph_control_cb cb,
                       void *ud, char *err, size_t errlen);

/* Answers req with one line ("ok ..." or "error ...", no newline) and closes it; if its client
 * has gone, the answer is dropped. req is freed: do not use it again. */
void mph_control_reply(mph_control_req_t *req, const char *line);

/* Stops listening and closes the clients that have not sent their command yet; frees the
 * control socket once its handles are closed (run the loop). Requests handed to the callback
 * and not answered yet stay the owner's to answer. */
void mph_control_close(mph_control_t *ctl);

/* The client: sends `command` to supervisor `pid`, whose socket directory is at dir_path, and
 * waits up to timeout_ms for its answer, which goes into reply (without the newline). Returns
 * 0 with the answer, or MPH_EIO with why not in reply (nothing listens, another process does,
 * the answer never came). Blocking. */
int mph_control_request(const char *dir_path, int pid, const char *command, unsigned timeout_ms,
                        char *reply, size_t len);

#endif
