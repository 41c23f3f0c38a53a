/*
 * passwd.c: `mphost passwd FILE USER` adds USER to a users file (auth.h has the format) or
 * replaces its hash, and keeps every other line (comments included) as it was.
 *
 * The file is rewritten whole and atomically: a temporary file in the same directory (so the
 * rename stays on one file system) is written, synced, given the old file's mode and owner
 * (0600 for a new file, whatever the umask: hashes are for the server's eyes), renamed over
 * the old one, and the directory is synced. A server that reads the file (at start, on
 * SIGHUP) sees the old file or the new one, never a part of either. A FILE that is a symbolic
 * link has its target rewritten, so a link into a configuration directory stays a link.
 *
 * Every step after the link is resolved goes through one descriptor of the target's
 * directory (openat, renameat): the old file is opened with O_NOFOLLOW, the temporary one is
 * created with O_EXCL | O_NOFOLLOW under a random name, so nothing planted in the directory
 * meanwhile is followed or overwritten. A directory others may write to (without the sticky
 * bit) is refused, as the server refuses it (mph_auth_dir_check): anyone could replace the
 * file there. A file the server would warn about or refuse for its mode or owner is written,
 * with that warning.
 *
 * The password never goes through stdio's buffers: it is read with read(2) into one buffer
 * that is wiped once hashed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#include "host/server/auth.h"
#include "cli.h"
#include "common/common.h"

#define PASSWORD_ROOM (MPH_AUTH_MAX_PASSWORD + 2) /* a password, its line end and a NUL */

/* Reads one line from fd into out (PASSWORD_ROOM bytes), without its "\n" or "\r\n".
 * Returns 0, or MPH_EINVAL with why in err (no line, too long, empty). */
static int read_line(int fd, char *out, char *err, size_t errlen)
{
    size_t n = 0;
    int ended = 0;
    for (;;) {
        char ch;
        ssize_t got = read(fd, &ch, 1);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            break;
        if (ch == '\n') {
            ended = 1;
            break;
        }
        if (n == PASSWORD_ROOM - 1) {
            snprintf(err, errlen, "the password is longer than %d bytes", MPH_AUTH_MAX_PASSWORD);
            return MPH_EINVAL;
        }
        out[n++] = ch;
    }
    if (n > 0 && out[n - 1] == '\r')
        n--;
    out[n] = '\0';
    if (n > MPH_AUTH_MAX_PASSWORD) {
        snprintf(err, errlen, "the password is longer than %d bytes", MPH_AUTH_MAX_PASSWORD);
        return MPH_EINVAL;
    }
    if (n == 0) {
        snprintf(err, errlen, "%s", ended ? "the password is empty" : "no password on stdin");
        return MPH_EINVAL;
    }
    if (memchr(out, '\0', n) != NULL) {
        snprintf(err, errlen, "the password contains a NUL byte");
        return MPH_EINVAL;
    }
    return 0;
}

/* At a terminal: asks on stderr with the echo off. The echo goes off (and what was typed
 * ahead is dropped) before the prompt shows, so nothing typed after it is lost or echoed. */
static int ask(const char *prompt, char *out, char *err, size_t errlen)
{
    struct termios old, quiet;
    int have_termios = tcgetattr(0, &old) == 0;
    if (have_termios) {
        quiet = old;
        quiet.c_lflag &= ~(tcflag_t)ECHO;
        quiet.c_lflag |= ECHONL;
        tcsetattr(0, TCSAFLUSH, &quiet);
    }
    fprintf(stderr, "%s", prompt);
    fflush(stderr);
    int rc = read_line(0, out, err, errlen);
    if (have_termios)
        tcsetattr(0, TCSANOW, &old);
    return rc;
}

/* The password: one line of stdin, or asked twice at a terminal. */
static int get_password(const char *user, char *out, char *err, size_t errlen)
{
    if (!isatty(0))
        return read_line(0, out, err, errlen);
    char prompt[300], again[PASSWORD_ROOM];
    snprintf(prompt, sizeof(prompt), "Password for %s: ", user);
    int rc = ask(prompt, out, err, errlen);
    if (rc == 0)
        rc = ask("Again: ", again, err, errlen);
    if (rc == 0 && strcmp(out, again) != 0) {
        snprintf(err, errlen, "the passwords do not match");
        rc = MPH_EINVAL;
    }
    explicit_bzero(again, sizeof(again));
    return rc;
}

/* The file's lines with USER's entry set to hash: replaced where it was (later entries of
 * the same user dropped), else appended. *replaced says which. */
static void edit(FILE *in, const char *user, const char *hash, mph_buf_t *out, int *replaced)
{
    char *line = NULL;
    size_t cap = 0, ulen = strlen(user);
    ssize_t got;
    *replaced = 0;
    while (in && (got = getline(&line, &cap, in)) >= 0) {
        size_t len = (size_t)got;
        int has_newline = len > 0 && line[len - 1] == '\n';
        size_t body = len - (size_t)has_newline;
        if (mph_auth_line_user(line, body) == ulen && memcmp(line, user, ulen) == 0) {
            if (!*replaced)
                mph_buf_printf(out, "%s:%s\n", user, hash);
            *replaced = 1;
            continue;
        }
        mph_buf_append(out, line, len);
        if (!has_newline)
            mph_buf_puts(out, "\n");
    }
    free(line);
    if (!*replaced)
        mph_buf_printf(out, "%s:%s\n", user, hash);
}

/* Writes data to a new file in dir (an open descriptor of dirpath) and renames it over base
 * there. mode/uid/gid: the old file's (old), else 0600 and ours. */
static int replace_file(int dir, const char *dirpath, const char *base, const mph_buf_t *data,
                        const struct stat *old, char *err, size_t errlen)
{
    uint64_t r;
    if (getrandom(&r, sizeof(r), 0) != (ssize_t)sizeof(r)) {
        snprintf(err, errlen, "cannot draw a random name: %s", strerror(errno));
        return MPH_EIO;
    }
    char tmp[64];
    snprintf(tmp, sizeof(tmp), ".mphost-passwd.%016llx", (unsigned long long)r);
    /* 0600 at creation (the umask may only take bits away), the final mode by fchmod. */
    int rc = 0, fd = openat(dir, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(err, errlen, "cannot create a file in %s: %s", dirpath, strerror(errno));
        return MPH_EIO;
    }
    if (old && fchown(fd, old->st_uid, old->st_gid) != 0 && errno != EPERM)
        fprintf(stderr, "mphost: warning: cannot keep the owner of %s/%s: %s\n", dirpath, base,
                strerror(errno));
    size_t off = 0;
    while (rc == 0 && off < data->len) {
        ssize_t w = write(fd, data->data + off, data->len - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            rc = MPH_EIO;
        else
            off += (size_t)w;
    }
    if (rc == 0 && (fchmod(fd, old ? old->st_mode & 07777 : 0600) != 0 || fsync(fd) != 0))
        rc = MPH_EIO;
    if (close(fd) != 0 && rc == 0)
        rc = MPH_EIO;
    if (rc == 0 && renameat(dir, tmp, dir, base) != 0)
        rc = MPH_EIO;
    if (rc != 0) {
        snprintf(err, errlen, "cannot write %s/%s: %s", dirpath, base, strerror(errno));
        unlinkat(dir, tmp, 0);
        return rc;
    }
    fsync(dir); /* the rename is durable once the directory is */
    return 0;
}

/* Opens the directory that holds file once it passes the server's rule: *dir (new
 * descriptor), *dirpath (its path) and *base (the file's name in it) point into *names (new). */
static int open_dir(const char *file, int *dir, char **names, const char **dirpath,
                    const char **base, char *err, size_t errlen)
{
    size_t n = strlen(file) + 1;
    *names = mph_xmalloc(2 * n);
    memcpy(*names, file, n);
    memcpy(*names + n, file, n);
    *dirpath = dirname(*names);
    *base = basename(*names + n);
    int rc = mph_auth_dir_check(*dirpath, err, errlen);
    if (rc == 0 && (*dir = open(*dirpath, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0) {
        snprintf(err, errlen, "cannot open the directory %s: %s", *dirpath, strerror(errno));
        rc = MPH_EIO;
    }
    return rc;
}

/* What a server running as us would say of the file now in dir: printed as a warning. (Of
 * a file another user owns we cannot tell: that user, or root, may be the server's.) */
static void warn_like_the_server(int dir, const char *base, const char *path)
{
    char err[512], warn[512];
    struct stat st;
    int fd = openat(dir, base, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return;
    if (fstat(fd, &st) != 0 || (st.st_uid != geteuid() && st.st_uid != 0))
        warn[0] = err[0] = '\0';
    else if (mph_auth_file_check(fd, path, err, sizeof(err), warn, sizeof(warn)) != 0)
        fprintf(stderr, "mphost: warning: %s; the server refuses it so\n", err);
    else if (warn[0])
        fprintf(stderr, "mphost: warning: %s\n", warn);
    close(fd);
}

int mph_cli_passwd(const char *path, const char *user)
{
    char err[512], password[PASSWORD_ROOM];
    if (mph_auth_check_name(user, err, sizeof(err)) != 0) {
        fprintf(stderr, "mphost: %s\n", err);
        return 1;
    }
    char *target = realpath(path, NULL); /* through a symbolic link to its target */
    const char *file = target ? target : path;
    const char *dirpath, *base;
    char *names = NULL, *hash = NULL;
    int dir = -1, fd = -1, exists = 0;
    FILE *in = NULL;
    struct stat st;
    int rc = open_dir(file, &dir, &names, &dirpath, &base, err, sizeof(err));
    if (rc != 0)
        goto out;
    /* The old file, if any, read through the same directory and never through a link. */
    fd = openat(dir, base, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 && errno != ENOENT) {
        snprintf(err, sizeof(err), "cannot read %s: %s", path, strerror(errno));
        rc = MPH_EIO;
        goto out;
    }
    if (fd >= 0) {
        if (fstat(fd, &st) != 0 || (S_ISREG(st.st_mode) && (in = fdopen(fd, "r")) == NULL)) {
            snprintf(err, sizeof(err), "cannot read %s: %s", path, strerror(errno));
            rc = MPH_EIO;
            goto out;
        }
        if (!S_ISREG(st.st_mode)) {
            snprintf(err, sizeof(err), "%s is not a regular file", path);
            rc = MPH_EINVAL;
            goto out;
        }
        fd = -1; /* in owns it */
        exists = 1;
    }
    rc = get_password(user, password, err, sizeof(err));
    if (rc == 0)
        rc = mph_auth_hash_new(password, &hash, err, sizeof(err));
    explicit_bzero(password, sizeof(password));
    int replaced = 0;
    mph_buf_t data = MPH_BUF_INIT;
    if (rc == 0) {
        edit(in, user, hash, &data, &replaced);
        rc = replace_file(dir, dirpath, base, &data, exists ? &st : NULL, err, sizeof(err));
    }
    mph_buf_free(&data);
    if (rc == 0) {
        printf("%s user %s %s %s\n", replaced ? "replaced" : "added", user, replaced ? "in" : "to",
               path);
        warn_like_the_server(dir, base, path);
    }
out:
    if (rc != 0)
        fprintf(stderr, "mphost: %s\n", err);
    if (in)
        fclose(in);
    if (fd >= 0)
        close(fd);
    if (dir >= 0)
        close(dir);
    free(hash);
    free(names);
    free(target);
    return rc == 0 ? 0 : 1;
}
