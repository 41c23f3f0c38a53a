/*
 * auth.h: HTTP Basic authentication (docs/operations.md, "Users and authentication"): the users
 * file
 * (--users=FILE), verification of credentials, and a short-lived cache of verified ones.
 *
 * The users file has one `name:hash` line per user, the hash in a crypt(3) format of
 * libxcrypt (bcrypt $2b$/$2y$, sha512-crypt $6$, yescrypt $y$); lines starting with '#' and
 * blank lines are ignored. A name is valid UTF-8 without control characters. Anything else (a
 * plain-text password, another format, a name that could not travel in JSON or would write
 * raw bytes to a log) refuses the whole file, with a message naming the file and the line,
 * never what the line holds. So does a file that someone else than this process's user or
 * root could have written (mph_auth_file_check); one that others may read is taken with a
 * warning.
 *
 * Hashes are slow by design, so a check that needs one runs on the libuv thread pool and
 * answers later; a verified (user, password) pair is remembered for a minute, keyed by a
 * keyed hash of the two (the password itself is kept only while its check runs), so a
 * client with keep-alive pays the hash once. An unknown user is checked against a real hash
 * all the same: a wrong user and a wrong password take the same time and get the same answer.
 *
 * Checks waiting for a thread are bounded, in all and per client address, and wait at most
 * MPH_AUTH_QUEUE_MS; a check beyond those bounds is answered MPH_AUTH_BUSY (the caller says
 * -32005: try again), never "wrong password". A caller whose client leaves cancels its wait
 * (mph_auth_cancel); a check nobody waits for any more is dropped before it runs.
 */
#ifndef MPH_AUTH_H
#define MPH_AUTH_H

#include <stddef.h>
#include <sys/socket.h>
#include <uv.h>

typedef struct mph_auth_s mph_auth_t;

#define MPH_AUTH_MAX_USER 255      /* bytes of a user name */
#define MPH_AUTH_MAX_PASSWORD 1024 /* bytes of a password (longer ones are refused) */
#define MPH_AUTH_CACHE_MS 60000    /* how long a verified pair is remembered */
#define MPH_AUTH_MAX_CHECKS 64     /* checks in progress (on a thread or waiting for one) */
#define MPH_AUTH_MAX_PER_SOURCE 16 /* of which from one client address (IPv4 address, IPv6 /64) */
#define MPH_AUTH_QUEUE_MS 10000    /* how long a check may wait for a thread */

#define MPH_AUTH_QUIET                                                                             \
    1 /* mph_auth_new flag: log no warning about the users file's mode (a                          \
         worker, whose supervisor has said it already) */

/* Creates the authenticator on loop. path (copied) is the users file, read and checked now
 * (blocking: this runs at start); NULL: no users, every check is refused. A file that others
 * may read is logged as a warning unless flags has MPH_AUTH_QUIET. Returns 0, or MPH_EINVAL
 * or MPH_EIO with one line in err that names the file (and the line, for its content). */
int mph_auth_new(mph_auth_t **out, uv_loop_t *loop, const char *path, unsigned flags, char *err,
                 size_t errlen);

/* How many users the table holds now. */
size_t mph_auth_count(const mph_auth_t *a);

/* Re-reads the users file on the thread pool (SIGHUP). A good file replaces the table and
 * empties the cache; a bad one leaves the old table in place. Logs the outcome either way, and
 * the warning mph_auth_new gives (whatever its flags). A re-read asked for while one runs is
 * done again once that one ends. No-op without a file. */
void mph_auth_reload(mph_auth_t *a);

typedef enum {
    MPH_AUTH_VERIFIED, /* the credentials are right: user is the name */
    MPH_AUTH_REFUSED,  /* missing, malformed or wrong (a wrong user or a wrong password alike),
                          or there are no users */
    MPH_AUTH_BUSY,     /* not checked: too many checks in progress, in all or from the client's
                          address (answered at once) */
    MPH_AUTH_EXPIRED,  /* not checked: it waited MPH_AUTH_QUEUE_MS for a thread, or the
                          authenticator is closing */
} mph_auth_result_t;

/* Called once per check that is not cancelled: user is the verified name (borrowed for the
 * call) with MPH_AUTH_VERIFIED, else NULL. */
typedef void (*mph_auth_cb)(void *ud, mph_auth_result_t result, const char *user);

/* A check being waited for: what mph_auth_cancel takes. */
typedef struct mph_auth_wait_s mph_auth_wait_t;

/* Checks the value of an Authorization header (value NULL: no header, or an unusable one),
 * sent from source (the client's address, borrowed for the call; NULL or not AF_INET/AF_INET6:
 * counted as one address, "local"). value is borrowed for the call only. cb runs exactly once
 * unless the wait is cancelled: before this returns when the answer needs no hash (malformed,
 * no users, a cached pair, a check refused as BUSY), and then this returns NULL; else later,
 * on the loop, and this returns the wait, valid until cb runs or mph_auth_cancel. */
mph_auth_wait_t *mph_auth_check(mph_auth_t *a, const struct sockaddr *source, const char *value,
                                size_t len, mph_auth_cb cb, void *ud);

/* The waiter left (its client closed the connection): cb will not run, w is freed. A check
 * nobody else waits for is dropped if it has not started; one on a thread ends unanswered. */
void mph_auth_cancel(mph_auth_wait_t *w);

/* Stops: checks waiting for a thread are answered MPH_AUTH_EXPIRED at once, those on a
 * thread when it ends; then a is freed and closed(ud) runs (on the loop, after this returns).
 * No check may start afterwards. */
void mph_auth_close(mph_auth_t *a, void (*closed)(void *ud), void *ud);

/* -- The users file's owner and mode -- */

/* Whether the users file open on fd (found at path) is safe to take (docs/security.md,
 * "Passwords and the users file"): a regular file, owned by this process's effective user or by
 * root (a root-owned file readable by a service group is the usual way to hand one to a service
 * user), not writable by others, in a directory (that of path and that of its target when
 * path is a symbolic link) that others cannot write to unless it is sticky, as /tmp is.
 * Returns 0, with a warning in warn when group or others may read or write the file ("" when
 * none), or MPH_EINVAL with why in err. Blocking; any thread. */
int mph_auth_file_check(int fd, const char *path, char *err, size_t errlen, char *warn,
                        size_t warnlen);

/* The directory rule of mph_auth_file_check alone, for dir (a file about to be made in it).
 * Returns 0 or MPH_EINVAL with why in err. */
int mph_auth_dir_check(const char *dir, char *err, size_t errlen);

/* -- What `mphost passwd` needs of the file format -- */

/* 0 if name can be a user: 1 to MPH_AUTH_MAX_USER bytes of valid UTF-8, no ':', line break or
 * other control character (C0, DEL, C1; U+2028 and U+2029 count as line breaks), not reading
 * as a comment or a blank line. Else MPH_EINVAL with the reason in err (which never quotes
 * the name). */
int mph_auth_check_name(const char *name, char *err, size_t errlen);

/* The user a line of a users file names (its first len bytes, without the newline): the
 * length of the name, which starts the line; 0 for a comment, a blank or a malformed line. */
size_t mph_auth_line_user(const char *line, size_t len);

/* Hashes password (at most MPH_AUTH_MAX_PASSWORD bytes) with libxcrypt's preferred method
 * and a fresh salt. *out: the hash (new string). Returns 0 or MPH_EIO with why in err. */
int mph_auth_hash_new(const char *password, char **out, char *err, size_t errlen);

#endif
