/*
 * localsock.h: Unix stream sockets in a directory of our own, for the processes of one
 * deployment to reach each other (the supervisor's control socket, the workers' peer sockets).
 *
 * Why a directory and not the abstract namespace: an abstract name has no owner and no
 * permissions, is listed for every user in /proc/net/unix, and goes to whoever binds it first,
 * so another local user who binds the names a deployment is about to use (they were made of
 * pids and counters) can make its reload fail or keep a killed worker from coming back. A
 * socket file in a 0700 directory of ours can be neither bound nor reached by another user.
 *
 * Every address goes through the directory's descriptor, as "/proc/self/fd/N/NAME": it is
 * short whatever the directory's path (sun_path holds 107 bytes), and it reaches the directory
 * that was checked when it was opened, even if a path component is renamed afterwards.
 */
#ifndef MPH_LOCALSOCK_H
#define MPH_LOCALSOCK_H

#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>

/* Opens the directory at path, creating it (0700, whatever the umask) if it is missing and
 * create is set, and checks it: a directory and not a symbolic link, owned by our effective uid,
 * closed to group and others. Returns its descriptor (close-on-exec), or a negative MPH_E* code
 * with a message in err. */
int mph_localsock_dir_open(const char *path, int create, char *err, size_t errlen);

/* Makes a fresh directory of ours with an unpredictable name under $TMPDIR (or /tmp) and
 * opens it as mph_localsock_dir_open does; *path gets its path (new string, caller frees).
 * For a process that has no state directory. */
int mph_localsock_dir_temp(char **path, char *err, size_t errlen);

/* The address of `name` in the directory dirfd. Returns its length, or 0 when name is too
 * long (which no name of ours is). */
socklen_t mph_localsock_address(int dirfd, const char *name, struct sockaddr_un *sa);

/* A stream socket bound at `name` in dirfd and listening (a socket file left there by an
 * earlier process is replaced). Returns its descriptor (close-on-exec), or a negative errno. */
int mph_localsock_listen(int dirfd, const char *name, int backlog);

/* A stream socket connected to `name` in dirfd (nonblock: O_NONBLOCK; a Unix socket connects
 * at once or fails at once, EAGAIN when the listener's queue is full). Returns its descriptor
 * (close-on-exec) or a negative errno. */
int mph_localsock_connect(int dirfd, const char *name, int nonblock);

/* Whether the process at the other end of the connected Unix socket fd runs as our effective
 * user (or as root, when root_ok). When not, or when that cannot be read, logs a warning that
 * starts with `what`, at most one per MPH_REFUSAL_LOG_MS with a count of those held back (a
 * stranger must not be able to flood the log), and returns 0. */
int mph_localsock_peer_allowed(int fd, int root_ok, const char *what);

/* Removes the socket file `name` in dirfd, if any. */
void mph_localsock_unlink(int dirfd, const char *name);

/* Removes every socket file in the directory dirfd, then the directory at path (if empty),
 * and closes dirfd. */
void mph_localsock_dir_remove(int dirfd, const char *path);

#endif
