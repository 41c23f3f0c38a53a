/*
 * common.c: error messages, the aborting allocator and the stderr logger shared by every
 * module. Logging is synchronous on purpose: lines are short, stderr is a file or a pipe,
 * and a log that is lost when the process dies is worse than a few microseconds.
 */
#define _POSIX_C_SOURCE 200809L
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

mph_log_level_t mph_log_level = MPH_LOG_INFO;

const char *mph_strerror(int err)
{
    switch (err) {
#define MPH_ERR_CASE(name, value, msg)                                                             \
    case value:                                                                                    \
        return msg;
        MPH_ERRNO_MAP(MPH_ERR_CASE)
#undef MPH_ERR_CASE
    case 0:
        return "success";
    }
    return "unknown error";
}

const char *mph_rpc_message(int code)
{
    switch (code) {
#define MPH_RPC_CASE(name, value, msg)                                                             \
    case value:                                                                                    \
        return msg;
        MPH_RPC_ERROR_MAP(MPH_RPC_CASE)
#undef MPH_RPC_CASE
    }
    return "Server error";
}

static void out_of_memory(size_t size)
{
    fprintf(stderr, "mphost: out of memory (allocating %zu bytes)\n", size);
    abort();
}

void *mph_xmalloc(size_t size)
{
    void *p = malloc(size ? size : 1);
    if (p == NULL)
        out_of_memory(size);
    return p;
}

void *mph_xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (p == NULL)
        out_of_memory(n * size);
    return p;
}

void *mph_xrealloc(void *p, size_t size)
{
    void *q = realloc(p, size ? size : 1);
    if (q == NULL)
        out_of_memory(size);
    return q;
}

char *mph_xstrndup(const char *s, size_t n)
{
    char *p = mph_xmalloc(n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

char *mph_xstrdup(const char *s)
{
    return mph_xstrndup(s, strlen(s));
}

void mph_buf_reserve(mph_buf_t *b, size_t extra)
{
    if (b->len + extra + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + extra + 1)
        cap *= 2;
    b->data = mph_xrealloc(b->data, cap);
    b->cap = cap;
}

void mph_buf_append(mph_buf_t *b, const void *data, size_t len)
{
    mph_buf_reserve(b, len);
    memcpy(b->data + b->len, data, len);
    b->len += len;
    b->data[b->len] = '\0';
}

void mph_buf_puts(mph_buf_t *b, const char *s)
{
    mph_buf_append(b, s, strlen(s));
}

void mph_buf_printf(mph_buf_t *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n <= 0)
        return;
    mph_buf_reserve(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

int mph_hash_tag(const char *s, size_t len, size_t *at, size_t *taglen)
{
    const char *open = memchr(s, '{', len);
    if (open == NULL)
        return 0;
    size_t start = (size_t)(open - s) + 1;
    const char *close = memchr(s + start, '}', len - start);
    if (close == NULL || close == s + start)
        return 0;
    *at = start;
    *taglen = (size_t)(close - s) - start;
    return 1;
}

size_t mph_format_int(char *out, long long v)
{
    char tmp[MPH_INT_CHARS];
    /* Through unsigned, so that LLONG_MIN's magnitude does not overflow. */
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    size_t len = 0;
    if (v < 0)
        out[len++] = '-';
    while (n)
        out[len++] = tmp[--n];
    return len;
}

void mph_buf_put_int(mph_buf_t *b, long long v)
{
    char digits[MPH_INT_CHARS];
    mph_buf_append(b, digits, mph_format_int(digits, v));
}

char *mph_buf_steal(mph_buf_t *b, size_t *len)
{
    char *data = b->data;
    if (len)
        *len = b->len;
    b->data = NULL;
    b->len = b->cap = 0;
    return data;
}

void mph_buf_free(mph_buf_t *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

int mph_check_dir(const char *path, const char *what, int root_ok, char *err, size_t errlen)
{
    struct stat st;
    if (lstat(path, &st) != 0) {
        snprintf(err, errlen, "cannot use %s %s: %s", what, path, strerror(errno));
        return MPH_EIO;
    }
    if (S_ISLNK(st.st_mode) || !S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "%s %s is %s; refusing to use it", what, path,
                 S_ISLNK(st.st_mode) ? "a symbolic link" : "not a directory");
        return MPH_EINVAL;
    }
    if (st.st_uid != geteuid() && !(root_ok && st.st_uid == 0)) {
        snprintf(err, errlen, "%s %s belongs to uid %u, not to uid %u; refusing to use it", what,
                 path, (unsigned)st.st_uid, (unsigned)geteuid());
        return MPH_EINVAL;
    }
    if (st.st_mode & 022) {
        snprintf(err, errlen,
                 "%s %s is writable by group or others (mode %03o); refusing to use it", what, path,
                 (unsigned)(st.st_mode & 0777));
        return MPH_EINVAL;
    }
    return 0;
}

static const char *const level_names[] = {"trace", "debug", "info", "warn", "error", "silent"};

static long long monotonic_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int mph_read_line(int fd, char *line, size_t size, int timeout_ms)
{
    size_t len = 0;
    int rc = 0;
    long long deadline = monotonic_ms() + timeout_ms;
    line[0] = '\0';
    while (len < size - 1) {
        long long left = timeout_ms < 0 ? -1 : deadline - monotonic_ms();
        if (timeout_ms >= 0 && left <= 0) {
            rc = -1;
            break;
        }
        struct pollfd p = {fd, POLLIN, 0};
        int r = poll(&p, 1, (int)left);
        if (r < 0 && errno == EINTR)
            continue;
        if (r == 0)
            continue; /* the deadline is looked at above */
        ssize_t got = r > 0 ? read(fd, line + len, size - 1 - len) : -1;
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            break;
        len += (size_t)got;
        line[len] = '\0';
        char *nl = memchr(line, '\n', len);
        if (nl) {
            *nl = '\0';
            return 1;
        }
    }
    return rc;
}

int mph_log_limit_pass(mph_log_limit_t *limit, unsigned period_ms, unsigned long *held)
{
    long long now = monotonic_ms();
    if (now < limit->next_ms) {
        limit->suppressed++;
        return 0;
    }
    limit->next_ms = now + period_ms;
    *held = limit->suppressed;
    limit->suppressed = 0;
    return 1;
}

int mph_log_parse_level(const char *name, mph_log_level_t *out)
{
    for (int i = 0; i <= MPH_LOG_SILENT; i++) {
        if (strcasecmp(name, level_names[i]) == 0) {
            *out = (mph_log_level_t)i;
            return 0;
        }
    }
    return MPH_EINVAL;
}

static char log_tag[32]; /* "worker 2: " in a worker's lines, else empty */

void mph_log_set_tag(const char *tag)
{
    snprintf(log_tag, sizeof(log_tag), "%s%s", tag, *tag ? ": " : "");
}

void mph_reopen_stderr(const char *path)
{
    if (path == NULL)
        return;
    fflush(stdout);
    fflush(stderr);
    /* O_NOFOLLOW: as deploy opened it, a link planted under the name is refused. */
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) {
        mph_log(MPH_LOG_ERROR, "cannot reopen the log file %s: %s", path, strerror(errno));
        return;
    }
    dup2(fd, 1);
    dup2(fd, 2);
    close(fd);
}

void mph_format_time(char *buf, size_t size)
{
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    snprintf(buf, size, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900, tm.tm_mon + 1,
             tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000);
}

/* Length of the valid UTF-8 sequence at s (at most n bytes) that is not a control character
 * (C1, U+0080..U+009F, which some terminals obey as C0's escape does); 0 when there is none. */
static size_t printable_utf8(const unsigned char *s, size_t n)
{
    size_t len = s[0] >= 0xF0 && s[0] <= 0xF4 ? 4 : s[0] >= 0xE0 ? 3 : s[0] >= 0xC2 ? 2 : 0;
    if (s[0] >= 0xF5 || len == 0 || len > n)
        return 0;
    for (size_t i = 1; i < len; i++)
        if ((s[i] & 0xC0) != 0x80)
            return 0;
    uint32_t cp = len == 2 ? (uint32_t)(s[0] & 0x1F) << 6 | (s[1] & 0x3F)
                  : len == 3
                      ? (uint32_t)(s[0] & 0x0F) << 12 | (uint32_t)(s[1] & 0x3F) << 6 | (s[2] & 0x3F)
                      : (uint32_t)(s[0] & 0x07) << 18 | (uint32_t)(s[1] & 0x3F) << 12 |
                            (uint32_t)(s[2] & 0x3F) << 6 | (s[3] & 0x3F);
    int overlong = (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000);
    if (overlong || cp < 0xA0 || (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF)
        return 0;
    return len;
}

size_t mph_log_escape(char *dst, size_t room, const char *src, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *s = (const unsigned char *)src;
    size_t out = 0, i = 0;
    while (i < n) {
        char esc[4];
        size_t elen = 0, take = 1;
        if (s[i] >= 0x20 && s[i] < 0x7F) {
            esc[elen++] = (char)s[i];
        } else if (s[i] >= 0x80 && (take = printable_utf8(s + i, n - i)) > 0) {
            elen = 0; /* copied whole below */
        } else {
            take = 1;
            esc[elen++] = '\\';
            if (s[i] == '\n' || s[i] == '\r' || s[i] == '\t') {
                esc[elen++] = s[i] == '\n' ? 'n' : s[i] == '\r' ? 'r' : 't';
            } else {
                esc[elen++] = 'x';
                esc[elen++] = hex[s[i] >> 4];
                esc[elen++] = hex[s[i] & 15];
            }
        }
        const char *piece = elen ? esc : (const char *)s + i;
        size_t plen = elen ? elen : take;
        if (out + plen > room)
            break; /* cut, never in the middle of an escape or a character */
        memcpy(dst + out, piece, plen);
        out += plen;
        i += take;
    }
    return out;
}

void mph_log(mph_log_level_t level, const char *fmt, ...)
{
    if (!MPH_LOG_ENABLED(level) || level >= MPH_LOG_SILENT)
        return;
    /* The message is escaped as a whole: its arguments may hold what clients sent or handlers
     * made (an error message, a user name), and no one may start a line of their own in our
     * log, nor send a terminal escape to whoever reads it. */
    char msg[2048], line[4096], now[32];
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    size_t mlen = m < 0 ? 0 : (size_t)m < sizeof(msg) ? (size_t)m : sizeof(msg) - 1;
    mph_format_time(now, sizeof(now));
    int n = snprintf(line, sizeof(line), "%s %-5s %s", now, level_names[level], log_tag);
    size_t len = (size_t)n + mph_log_escape(line + n, sizeof(line) - (size_t)n - 1, msg, mlen);
    line[len++] = '\n';
    fwrite(line, 1, len, stderr);
}

void mph_url_shown(const char *url, char *out, size_t size)
{
    const char *scheme_end = strstr(url, "://");
    const char *at = strrchr(url, '@');
    if (scheme_end == NULL || at == NULL || at < scheme_end)
        snprintf(out, size, "%s", url);
    else
        snprintf(out, size, "%.*s%s", (int)(scheme_end + 3 - url), url, at + 1);
}
