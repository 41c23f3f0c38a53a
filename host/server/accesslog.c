/*
 * accesslog.c: see accesslog.h. The loop appends to `pending` under the mutex; the writer
 * thread swaps it with its own empty buffer and writes that one outside the mutex, so the
 * loop only ever waits for a memcpy, never for write(2).
 */
#define _GNU_SOURCE
#include "accesslog.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/common.h"

/* How often at most a count of dropped lines is logged. */
#define DROP_REPORT_SECONDS 10

struct mph_accesslog_s {
    char *path; /* owned; NULL: stderr */
    int fd;     /* the writer's; 2 for stderr */
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    mph_buf_t pending;     /* lines not yet taken by the writer (under mu) */
    unsigned long dropped; /* lines that did not fit, not yet reported (under mu) */
    int reopen;            /* a reopen was asked for (under mu) */
    int stopping;          /* close was called (under mu) */
};

/* Opens path for appending, as only a file of ours in a directory no other user can write into
 * (common.h: mph_check_dir): mphost often runs as root, and a link or a file planted under the
 * name would have it write (or show its clients' addresses) where someone else chose. A new
 * file is 0600. Returns the descriptor, or -1 with why in err. */
static int open_log(const char *path, char *err, size_t errlen)
{
    char *dir = mph_xstrdup(path);
    char *slash = strrchr(dir, '/');
    if (slash == dir)
        slash[1] = '\0'; /* "/name": the root directory */
    else if (slash)
        *slash = '\0';
    char why[1100];
    int rc = mph_check_dir(slash ? dir : ".", "its directory", 1, why, sizeof(why));
    free(dir);
    if (rc != 0) {
        snprintf(err, errlen, "cannot open the access log %s: %s", path, why);
        return -1;
    }
    struct stat st;
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0 || fstat(fd, &st) != 0) {
        snprintf(err, errlen, "cannot open the access log %s: %s", path,
                 errno == ELOOP ? "it is a symbolic link" : strerror(errno));
    } else if (!S_ISREG(st.st_mode) || (st.st_uid != geteuid() && st.st_uid != 0)) {
        snprintf(err, errlen, "the access log %s is %s; refusing to use it", path,
                 S_ISREG(st.st_mode) ? "another user's file" : "not a plain file");
    } else {
        return fd;
    }
    if (fd >= 0)
        close(fd);
    return -1;
}

/* Writes all of buf; a failing disk loses the lines (said once per batch), never the loop. */
static void write_all(mph_accesslog_t *a, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(a->fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            mph_log(MPH_LOG_ERROR, "access log: write failed: %s; %zu bytes lost",
                    n < 0 ? strerror(errno) : "no progress", len);
            return;
        }
        buf += n;
        len -= (size_t)n;
    }
}

static void *writer_main(void *arg)
{
    mph_accesslog_t *a = arg;
    mph_buf_t batch = MPH_BUF_INIT;
    time_t last_report = 0;
    pthread_mutex_lock(&a->mu);
    for (;;) {
        while (a->pending.len == 0 && !a->reopen && !a->stopping &&
               (a->dropped == 0 || time(NULL) - last_report < DROP_REPORT_SECONDS))
            pthread_cond_wait(&a->cond, &a->mu);
        mph_buf_t swap = a->pending; /* take the lines; the loop fills the spare buffer */
        a->pending = batch;
        batch = swap;
        int reopen = a->reopen, stopping = a->stopping;
        unsigned long dropped = 0;
        if (a->dropped && (stopping || time(NULL) - last_report >= DROP_REPORT_SECONDS)) {
            dropped = a->dropped;
            a->dropped = 0;
            last_report = time(NULL);
        }
        a->reopen = 0;
        pthread_mutex_unlock(&a->mu);
        write_all(a, batch.data, batch.len);
        batch.len = 0;
        if (dropped)
            mph_log(MPH_LOG_WARN,
                    "access log: %lu lines dropped (the disk is slower than the load)", dropped);
        if (reopen && a->path) {
            char why[1200];
            int fd = open_log(a->path, why, sizeof(why));
            if (fd < 0) {
                mph_log(MPH_LOG_ERROR, "access log: %s; still writing the old file", why);
            } else {
                close(a->fd);
                a->fd = fd;
            }
        }
        pthread_mutex_lock(&a->mu);
        if (stopping && a->pending.len == 0)
            break;
    }
    pthread_mutex_unlock(&a->mu);
    mph_buf_free(&batch);
    return NULL;
}

int mph_accesslog_open(mph_accesslog_t **out, const char *path, char *err, size_t errlen)
{
    mph_accesslog_t *a = mph_xcalloc(1, sizeof(*a));
    a->fd = 2;
    if (strcmp(path, "-") != 0) {
        a->path = mph_xstrdup(path);
        a->fd = open_log(path, err, errlen);
        if (a->fd < 0) {
            free(a->path);
            free(a);
            return MPH_EIO;
        }
    }
    pthread_mutex_init(&a->mu, NULL);
    pthread_cond_init(&a->cond, NULL);
    int rc = pthread_create(&a->thread, NULL, writer_main, a);
    if (rc != 0) {
        snprintf(err, errlen, "cannot start the access log writer: %s", strerror(rc));
        pthread_cond_destroy(&a->cond);
        pthread_mutex_destroy(&a->mu);
        if (a->path)
            close(a->fd);
        free(a->path);
        free(a);
        return MPH_EIO;
    }
    *out = a;
    return 0;
}

void mph_accesslog_append(mph_accesslog_t *a, const char *line, size_t len)
{
    pthread_mutex_lock(&a->mu);
    if (a->pending.len + len > MPH_ACCESSLOG_MAX_PENDING) {
        a->dropped++;
    } else {
        mph_buf_append(&a->pending, line, len);
        if (a->pending.len == len) /* it was empty: the writer may be waiting */
            pthread_cond_signal(&a->cond);
    }
    pthread_mutex_unlock(&a->mu);
}

void mph_accesslog_reopen(mph_accesslog_t *a)
{
    pthread_mutex_lock(&a->mu);
    a->reopen = 1;
    pthread_cond_signal(&a->cond);
    pthread_mutex_unlock(&a->mu);
}

void mph_accesslog_close(mph_accesslog_t *a)
{
    if (a == NULL)
        return;
    pthread_mutex_lock(&a->mu);
    a->stopping = 1;
    pthread_cond_signal(&a->cond);
    pthread_mutex_unlock(&a->mu);
    pthread_join(a->thread, NULL);
    pthread_cond_destroy(&a->cond);
    pthread_mutex_destroy(&a->mu);
    mph_buf_free(&a->pending);
    if (a->path)
        close(a->fd);
    free(a->path);
    free(a);
}
