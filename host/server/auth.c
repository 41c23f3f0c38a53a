/*
 * auth.c: the users table, credential checks on the thread pool, and the cache (auth.h).
 *
 * A check that needs a hash becomes a job. Jobs wait for one of MAX_RUNNING places on
 * libuv's thread pool: the pool (4 threads by default) is shared with the file storage's
 * writes and syncs, and a crowd of hash checks (a client guessing passwords) must not hold
 * every thread while commits wait. Identical checks (same user and password) that arrive
 * while one is queued or running wait for that one: a client that opens many connections
 * with the same credentials pays one hash, not one per connection.
 *
 * Nothing an unauthenticated client sends may make the queue grow without bound or make
 * others wait behind it (docs/security.md), hence:
 *   - a bound: at most max_checks jobs in progress (queued or running) in all, and at most
 *     max_per_source from one client address, a "source" (an IPv4 address; an IPv6 /64, the
 *     least a host is given; Unix-socket and unknown peers share one). A check that would
 *     need a new job beyond either bound is refused at once, MPH_AUTH_BUSY. Per connection
 *     would bound nothing (a client opens more); per address keeps places for others,
 *     whatever one address sends. Clients behind one proxy share its address: they share its
 *     16 places, and a flood through that proxy still cannot take the others' 48.
 *   - turns: the next free place goes to the source that was served longest ago (each
 *     source's jobs in their order), not to the oldest job: a source with one check waits
 *     for at most one job of each other source, however many they have queued.
 *   - a deadline: a job still queued after queue_ms is refused, MPH_AUTH_EXPIRED (one timer,
 *     at the earliest deadline): a wait stays bounded even when hashes are slow.
 *   - cancellation: the caller cancels the wait of a client that left (mph_auth_cancel). A
 *     queued job left without waiters is dropped, never hashed; a running one cannot be
 *     stopped (crypt_rn is one call on a pool thread): it ends and answers nobody.
 * None of these looks at the user: a wrong user and a wrong password are queued, refused,
 * expired and dropped alike.
 *
 *   mph_auth_check --malformed, impossible name, no users, cached pair--> answered at once
 *                  --same pair queued or running--> waits for that job
 *                  --max_checks in progress, or max_per_source from its source--> BUSY at once
 *                  --else--> job QUEUED (job_queue: at the end of its source's queue)
 *   QUEUED  --its source's turn and a place frees (pump)--> RUNNING (crypt_rn on a thread;
 *             in auth->running)
 *           --queue_ms passed (on_expiry), or closing--> ANSWERING: EXPIRED
 *           --its last waiter cancelled (mph_auth_cancel)--> dropped (freed, never hashed)
 *   RUNNING --done, the table unchanged or the user's hash unchanged (job_done)--> ANSWERING:
 *             VERIFIED (into the cache) or REFUSED, to the waiters left (maybe none)
 *           --done, SIGHUP changed the user's hash meanwhile--> QUEUED again (new hash)
 *           --its last waiter cancelled--> stays RUNNING, answers nobody
 *   ANSWERING --every waiter called (a cancel now only removes its waiter)--> freed
 *
 * A job holds its place from QUEUED to ANSWERING; callbacks run after it is given back, so a
 * callback that checks again sees the room it left. Its waiters (job->waiters, in arrival
 * order) are answered in that order. A source lives in auth->sources while it has a job in
 * progress.
 *
 * What is kept of a password: the job's copy, wiped when the job ends; the cache keeps a
 * SipHash-2-4 of "user:password" under a key drawn at random when the process starts, so a
 * memory dump yields no password and an entry cannot be computed without that key. The
 * cache is direct-mapped (a pair evicts another with the same entry), entries last
 * MPH_AUTH_CACHE_MS, and it is emptied whenever the table is replaced.
 *
 * Same answer, same time: an unknown user is checked against the hash of the file's first
 * entry (the result thrown away), so a wrong user costs what a wrong password costs, exactly
 * when every entry has the same format and cost (as `mphost passwd` writes them), and the
 * answer is the same REFUSED. Hashes are compared in constant time. Only a name that no users
 * file can hold (not UTF-8, a control character: name_problem) is refused without a hash:
 * that says nothing of who exists.
 */
#define _GNU_SOURCE /* explicit_bzero, getrandom */
#include "auth.h"

#include <assert.h>
#include <crypt.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/common.h"
#include "common/list.h"

#define MAX_RUNNING 2      /* jobs on the thread pool at once */
#define CACHE_ENTRIES 1024 /* verified pairs remembered (a power of two) */
#define MAX_LINE 4096      /* bytes of a users file line */
#define BUSY_LOG_MS 60000  /* at most one warning this often about checks refused BUSY */
#define MESSAGE 512        /* bytes of an error or warning about the users file */
#define MAX_DECODED (MPH_AUTH_MAX_USER + 1 + MPH_AUTH_MAX_PASSWORD) /* "user:password" */
#define MAX_BASE64 ((MAX_DECODED + 2) / 3 * 4)                      /* its encoding */
#define DECODE_ROOM (MAX_BASE64 / 4 * 3 + 1) /* what decoding that much may write, and a NUL */

typedef struct {
    char *name; /* owned */
    char *hash; /* owned */
    int line;   /* in the file, for messages */
} user_t;

typedef struct {
    user_t *v;         /* owned, sorted by name */
    size_t n;          /* users */
    const char *dummy; /* the hash unknown users are checked against (the file's first
                          entry's), borrowed from v; NULL when n == 0 */
} users_t;

typedef struct {
    uint64_t key;       /* SipHash of "user:password" */
    const user_t *user; /* borrowed from auth->users; NULL: the entry is empty */
    uint64_t expires;   /* uv_now() milliseconds */
} cache_entry_t;

typedef enum { JOB_QUEUED, JOB_RUNNING, JOB_ANSWERING } job_state_t;

struct mph_auth_wait_s {
    mph_list_t node; /* in job->waiters, in arrival order (first: list.h) */
    mph_auth_cb cb;
    void *ud;
    struct job_s *job; /* what it waits for */
};

/* A client address with jobs in progress. */
typedef struct source_s {
    mph_list_t node;  /* in auth->sources (first: list.h) */
    uint8_t addr[16]; /* IPv4 as ::ffff:a.b.c.d, IPv6 cut to its /64, or all zero (local or
                         unknown) */
    unsigned checks;  /* its jobs in progress (freed at 0) */
    mph_list_t queue; /* its QUEUED jobs (job_t.node), FIFO */
    uint64_t served;  /* auth->serial when it last got a place (or came): the smallest has
                         the next turn */
} source_t;

typedef struct job_s {
    mph_list_t node; /* in source->queue (QUEUED) or auth->running (RUNNING) (first: list.h) */
    uv_work_t work;
    mph_auth_t *auth;    /* owner */
    job_state_t state;   /* (assert_job_state) */
    source_t *source;    /* whose place it takes, counted in source->checks */
    uint64_t deadline;   /* uv_now() milliseconds: refused if still QUEUED then */
    uint64_t turn;       /* auth->serial when it got a place on the pool (order of starts) */
    uint64_t key;        /* the cache key of its pair */
    char *user;          /* owned */
    char *password;      /* owned; wiped before it is freed */
    size_t password_len; /* bytes */
    char *hash;          /* owned copy of the hash to check against (the table may change) */
    int known;           /* the user is in the table: a match verifies */
    unsigned generation; /* of the table `hash` came from */
    int match;           /* written by the thread: crypt(password, hash) == hash */
    mph_list_t waiters;  /* answered when it ends (mph_auth_wait_t.node, owned); empty:
                            nobody waits */
} job_t;

typedef struct {
    uv_work_t work;
    mph_auth_t *auth;   /* owner */
    users_t users;      /* what the thread read (owned until swapped in) */
    int rc;             /* 0 or the error of users_read */
    char err[MESSAGE];  /* its message */
    char warn[MESSAGE]; /* its warning about the file's mode, "" for none */
} reload_t;

enum { TIMER_NONE, TIMER_OPEN, TIMER_CLOSING, TIMER_CLOSED }; /* auth->timer_state */

struct mph_auth_s {
    uv_loop_t *loop;         /* borrowed */
    char *path;              /* owned; NULL: no users file */
    users_t users;           /* the table */
    unsigned generation;     /* bumped each time the table is replaced */
    uint8_t key[16];         /* SipHash key, random per process */
    mph_list_t sources;      /* every source with jobs in progress (owned), newest first */
    unsigned nchecks;        /* jobs in progress (QUEUED or RUNNING) */
    unsigned nqueued;        /* of which QUEUED */
    mph_list_t running;      /* jobs on the pool, newest first */
    int nrunning;            /* their number */
    uint64_t serial;         /* hands out source->served */
    unsigned max_checks;     /* MPH_AUTH_MAX_CHECKS (a field: the unit tests lower it) */
    unsigned max_per_source; /* MPH_AUTH_MAX_PER_SOURCE, idem */
    uint64_t queue_ms;       /* MPH_AUTH_QUEUE_MS, idem */
    uv_timer_t expiry;       /* fires at the earliest deadline of a QUEUED job */
    int timer_state;         /* TIMER_NONE until the first job queues */
    struct {                 /* since the start (the unit tests read them) */
        uint64_t hashed;     /* jobs started on the pool (re-runs after SIGHUP too) */
        uint64_t dropped;    /* jobs dropped unhashed: every waiter left */
        uint64_t busy;       /* checks refused MPH_AUTH_BUSY */
        uint64_t expired;    /* jobs refused MPH_AUTH_EXPIRED after waiting queue_ms */
    } stats;
    uint64_t busy_log_at;   /* uv_now() when the next BUSY warning may be logged */
    uint64_t busy_unlogged; /* BUSY refusals since the last warning */
    int callbacks;          /* callers' callbacks running now: not freed under them */
    reload_t *reload;       /* the re-read in progress, or NULL */
    int reload_again;       /* a re-read was asked for while one ran */
    int closing;            /* mph_auth_close was called */
    void (*closed)(void *); /* runs once nothing is on the pool any more */
    void *closed_ud;
    cache_entry_t cache[CACHE_ENTRIES];
};

/* ---- SipHash-2-4 (Aumasson and Bernstein, "SipHash: a fast short-input PRF", 2012) ---- */

static uint64_t load_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                                   \
    do {                                                                                           \
        v0 += v1;                                                                                  \
        v1 = ROTL(v1, 13);                                                                         \
        v1 ^= v0;                                                                                  \
        v0 = ROTL(v0, 32);                                                                         \
        v2 += v3;                                                                                  \
        v3 = ROTL(v3, 16);                                                                         \
        v3 ^= v2;                                                                                  \
        v0 += v3;                                                                                  \
        v3 = ROTL(v3, 21);                                                                         \
        v3 ^= v0;                                                                                  \
        v2 += v1;                                                                                  \
        v1 = ROTL(v1, 17);                                                                         \
        v1 ^= v2;                                                                                  \
        v2 = ROTL(v2, 32);                                                                         \
    } while (0)

static uint64_t siphash24(const uint8_t key[16], const void *data, size_t len)
{
    const uint8_t *m = data;
    uint64_t k0 = load_le64(key), k1 = load_le64(key + 8);
    uint64_t v0 = k0 ^ 0x736f6d6570736575ULL, v1 = k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ULL, v3 = k1 ^ 0x7465646279746573ULL;
    size_t full = len - len % 8;
    for (size_t i = 0; i < full; i += 8) {
        uint64_t w = load_le64(m + i);
        v3 ^= w;
        SIPROUND;
        SIPROUND;
        v0 ^= w;
    }
    uint64_t last = (uint64_t)len << 56;
    for (size_t i = 0; i < len % 8; i++)
        last |= (uint64_t)m[full + i] << (8 * i);
    v3 ^= last;
    SIPROUND;
    SIPROUND;
    v0 ^= last;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

/* ---- Parsing: Basic credentials and hashes ---- */

static int base64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/* Strict base64 (RFC 4648, section 4): the standard alphabet, padded to a multiple of four,
 * '=' only at the end, unused bits zero (one encoding per value). Writes at most len / 4 * 3
 * bytes to out; returns their number, or -1. */
static long base64_decode(const char *in, size_t len, unsigned char *out)
{
    if (len == 0 || len % 4 != 0)
        return -1;
    size_t pad = in[len - 1] == '=' ? (in[len - 2] == '=' ? 2 : 1) : 0;
    size_t n = 0;
    for (size_t i = 0; i < len; i += 4) {
        int last = i + 4 == len;
        int v[4];
        for (int j = 0; j < 4; j++) {
            int padding = last && j >= 4 - (int)pad;
            v[j] = padding ? 0 : base64_value((unsigned char)in[i + j]);
            if (v[j] < 0)
                return -1;
        }
        uint32_t w = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 | v[3];
        out[n++] = (unsigned char)(w >> 16);
        if (!last || pad < 2)
            out[n++] = (unsigned char)(w >> 8);
        if (!last || pad < 1)
            out[n++] = (unsigned char)w;
        if (last && ((pad == 1 && (v[2] & 3)) || (pad == 2 && (v[1] & 15))))
            return -1;
    }
    return (long)n;
}

/* An Authorization value `Basic <base64>` (the scheme in any case, then spaces, the token,
 * optional trailing spaces) -> "user:password" in out (DECODE_ROOM bytes),
 * NUL-terminated; *colon: where the user ends. Returns 0, or -1 for anything else: another
 * scheme, bad base64, no colon, an empty or too long user, a too long password, a NUL. */
static int parse_basic(const char *v, size_t len, char *out, size_t *colon)
{
    while (len > 0 && (v[len - 1] == ' ' || v[len - 1] == '\t'))
        len--;
    if (len < 6 || strncasecmp(v, "basic", 5) != 0 || (v[5] != ' ' && v[5] != '\t'))
        return -1;
    size_t i = 6;
    while (i < len && (v[i] == ' ' || v[i] == '\t'))
        i++;
    if (len - i > MAX_BASE64)
        return -1;
    long n = base64_decode(v + i, len - i, (unsigned char *)out);
    if (n < 0)
        return -1;
    out[n] = '\0';
    const char *c = memchr(out, ':', (size_t)n);
    if (c == NULL || c == out || memchr(out, '\0', (size_t)n) != NULL ||
        (size_t)(c - out) > MPH_AUTH_MAX_USER ||
        (size_t)n - (size_t)(c - out) - 1 > MPH_AUTH_MAX_PASSWORD)
        return -1;
    *colon = (size_t)(c - out);
    return 0;
}

/* Whether s[0..n) is in crypt's base64 alphabet (./0-9A-Za-z). */
static int crypt64(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!(s[i] == '.' || s[i] == '/' || (s[i] >= '0' && s[i] <= '9') ||
              (s[i] >= 'A' && s[i] <= 'Z') || (s[i] >= 'a' && s[i] <= 'z')))
            return 0;
    return 1;
}

/* A whole hash in one of the formats we take, laid out as that format's hashes are:
 * bcrypt $2b$/$2y$ (cost, 22 bytes of salt, 31 of hash), sha512-crypt $6$ (optional
 * rounds=N$, a salt, 86 bytes of hash), yescrypt $y$ (parameters, salt, 43 bytes of hash).
 * crypt_checksalt alone accepts "$6$" and other fragments. */
static int hash_format_ok(const char *h)
{
    size_t len = strlen(h);
    const char *last = strrchr(h, '$');
    if (crypt_checksalt(h) != CRYPT_SALT_OK || last == NULL)
        return 0;
    if (strncmp(h, "$2b$", 4) == 0 || strncmp(h, "$2y$", 4) == 0)
        return len == 60 && h[4] >= '0' && h[4] <= '3' && h[5] >= '0' && h[5] <= '9' &&
               h[6] == '$' && crypt64(h + 7, 53);
    if (strncmp(h, "$6$", 3) == 0)
        return last > h + 3 && strlen(last + 1) == 86 && crypt64(last + 1, 86);
    if (strncmp(h, "$y$", 3) == 0) {
        int dollars = 0;
        for (const char *p = h; *p; p++)
            dollars += *p == '$';
        return dollars == 4 && last > h + 3 && strlen(last + 1) == 43 && crypt64(last + 1, 43);
    }
    return 0;
}

/* Equal strings, in time that depends on their length only (the length of the format). */
static int same_hash(const char *a, const char *b)
{
    size_t n = strlen(a);
    if (n != strlen(b))
        return 0;
    volatile unsigned char diff = 0;
    for (size_t i = 0; i < n; i++)
        diff |= (unsigned char)(a[i] ^ b[i]);
    return diff == 0;
}

/* ---- The users table ---- */

static void users_free(users_t *u)
{
    for (size_t i = 0; i < u->n; i++) {
        free(u->v[i].name);
        free(u->v[i].hash);
    }
    free(u->v);
    memset(u, 0, sizeof(*u));
}

static int user_cmp(const void *a, const void *b)
{
    return strcmp(((const user_t *)a)->name, ((const user_t *)b)->name);
}

static const user_t *users_find(const users_t *u, const char *name)
{
    user_t probe = {(char *)name, NULL, 0};
    return u->n ? bsearch(&probe, u->v, u->n, sizeof(user_t), user_cmp) : NULL;
}

static int is_blank(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r')
            return 0;
    return 1;
}

/* The length of the UTF-8 sequence at s (n bytes left) and its code point in *cp, or 0 when
 * it is not one: a stray or missing continuation byte, an overlong form, a UTF-16 surrogate,
 * beyond U+10FFFF (RFC 3629, section 4). */
static size_t utf8_next(const unsigned char *s, size_t n, uint32_t *cp)
{
    unsigned char c = s[0];
    size_t len;
    uint32_t min;
    if (c < 0x80) {
        *cp = c;
        return 1;
    } else if (c >= 0xc2 && c <= 0xdf) {
        len = 2, min = 0x80, *cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3, min = 0x800, *cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4, min = 0x10000, *cp = c & 0x07;
    } else {
        return 0; /* a continuation byte, 0xc0, 0xc1 (always overlong) or beyond 0xf4 */
    }
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        *cp = *cp << 6 | (s[i] & 0x3f);
    }
    if (*cp < min || *cp > 0x10ffff || (*cp >= 0xd800 && *cp <= 0xdfff))
        return 0;
    return len;
}

/* Why name (n bytes) cannot be a user's, worded to follow "it" or "a user name that"; NULL
 * when it can. A name travels in JSON (a forwarded call's user, mp.user) and into logs: it is
 * valid UTF-8 without control characters, and it must read back as the same entry. */
static const char *name_problem(const char *name, size_t n)
{
    if (n == 0)
        return "is empty";
    if (n > MPH_AUTH_MAX_USER)
        return "is longer than 255 bytes";
    if (memchr(name, ':', n) != NULL)
        return "contains ':'";
    for (size_t i = 0, len; i < n; i += len) {
        uint32_t c;
        if ((len = utf8_next((const unsigned char *)name + i, n - i, &c)) == 0)
            return "is not valid UTF-8";
        if (c == '\n' || c == '\r' || c == 0x2028 || c == 0x2029)
            return "contains a line break";
        if (c < 0x20 || c == 0x7f || (c >= 0x80 && c < 0xa0))
            return "contains a control character"; /* C0 (NUL and tab too), DEL, C1 */
    }
    size_t lead = 0;
    while (lead < n && name[lead] == ' ')
        lead++;
    if (lead == n || name[lead] == '#')
        return "would read as a comment or a blank line";
    return NULL;
}

/* What a line holds: 0 (blank or comment), 1 (an entry: *name_len bytes of name, then ':'),
 * or -1 with why in err. The line is `len` bytes without its newline. */
static int parse_line(const char *line, size_t len, size_t *name_len, char *err, size_t errlen)
{
    size_t lead = 0;
    while (lead < len && (line[lead] == ' ' || line[lead] == '\t'))
        lead++;
    if (is_blank(line, len) || line[lead] == '#')
        return 0;
    const char *colon = memchr(line, ':', len);
    if (memchr(line, '\0', len) != NULL) {
        snprintf(err, errlen, "a NUL byte");
        return -1;
    }
    if (colon == NULL || colon == line) {
        snprintf(err, errlen, "expected NAME:HASH");
        return -1;
    }
    const char *why = name_problem(line, (size_t)(colon - line));
    if (why != NULL) {
        snprintf(err, errlen, "a user name that %s", why);
        return -1;
    }
    *name_len = (size_t)(colon - line);
    return 1;
}

/* ---- The users file's owner and mode ---- */

int mph_auth_dir_check(const char *dir, char *err, size_t errlen)
{
    struct stat st;
    if (stat(dir, &st) != 0) {
        snprintf(err, errlen, "cannot check the directory %s: %s", dir, strerror(errno));
        return MPH_EINVAL;
    }
    /* Whoever may write to the directory may rename another file (or a symbolic link) over
     * the users file; the sticky bit keeps that to the file's owner, as in /tmp. */
    if ((st.st_mode & S_IWOTH) && !(st.st_mode & S_ISVTX)) {
        snprintf(err, errlen,
                 "the directory %s, which holds the users file, is writable by others (mode "
                 "%03o): anyone could replace the file (chmod o-w it)",
                 dir, (unsigned)(st.st_mode & 07777));
        return MPH_EINVAL;
    }
    return 0;
}

/* mph_auth_dir_check on the directory that holds path. */
static int parent_check(const char *path, char *err, size_t errlen)
{
    char *copy = mph_xstrdup(path);
    int rc = mph_auth_dir_check(dirname(copy), err, errlen);
    free(copy);
    return rc;
}

int mph_auth_file_check(int fd, const char *path, char *err, size_t errlen, char *warn,
                        size_t warnlen)
{
    struct stat st;
    if (warnlen > 0)
        warn[0] = '\0';
    if (fstat(fd, &st) != 0) {
        snprintf(err, errlen, "cannot read the users file %s: %s", path, strerror(errno));
        return MPH_EIO;
    }
    unsigned mode = st.st_mode & 07777;
    uid_t me = geteuid();
    if (!S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "the users file %s is not a regular file", path);
        return MPH_EINVAL;
    }
    /* Who may write the file decides who logs in. Its owner can always chmod it, so the
     * owner must be us or root: root owns what a package or an administrator installs for a
     * service user (0640, the service's group), and could change our files anyway. */
    if (st.st_uid != me && st.st_uid != 0) {
        snprintf(err, errlen,
                 "the users file %s belongs to uid %u, neither to this process's user (uid %u) "
                 "nor to root: its owner could add users",
                 path, (unsigned)st.st_uid, (unsigned)me);
        return MPH_EINVAL;
    }
    if (mode & S_IWOTH) {
        snprintf(err, errlen,
                 "the users file %s is writable by others (mode %03o): anyone could add a user "
                 "(chmod o-w it)",
                 path, mode);
        return MPH_EINVAL;
    }
    /* The directory of the path given, and that of the file a symbolic link leads to. */
    struct stat lst;
    int rc = parent_check(path, err, errlen);
    if (rc == 0 && lstat(path, &lst) == 0 && S_ISLNK(lst.st_mode)) {
        char *target = realpath(path, NULL);
        if (target)
            rc = parent_check(target, err, errlen);
        free(target);
    }
    if (rc != 0)
        return rc;
    /* Readable hashes can be guessed offline at the reader's pace: worth a line at start,
     * not a refusal (a group of the service's own is a legitimate reader). */
    if (mode & (S_IRGRP | S_IWGRP | S_IROTH))
        snprintf(warn, warnlen,
                 "the users file %s is readable or writable by group or others (mode %03o): "
                 "whoever reads it can guess its passwords offline (chmod 600 it, or 640 with "
                 "a group of the service's own)",
                 path, mode);
    return 0;
}

/* Reads and checks a users file into *out (new): its owner and mode first
 * (mph_auth_file_check; a warning in warn, MESSAGE bytes), then its lines. Returns 0, or
 * MPH_EIO / MPH_EINVAL with one line in err naming the file and the line, never their
 * content. Runs on any thread. */
/* Reads one line (len bytes, its end trimmed here) into `out` if it holds a user: returns 0
 * (a user or a blank or comment line), or MPH_EINVAL with why in err. */
static int users_add_line(users_t *out, size_t *alloc, char *line, size_t len, int lineno,
                          const char *path, char *err, size_t errlen)
{
    char why[256];
    while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r' || line[len - 1] == ' ' ||
                       line[len - 1] == '\t'))
        len--;
    size_t name_len = 0;
    int kind = len > MAX_LINE ? -1 : parse_line(line, len, &name_len, why, sizeof(why));
    if (len > MAX_LINE)
        snprintf(why, sizeof(why), "longer than %d bytes", MAX_LINE);
    if (kind == 0)
        return 0;
    if (kind > 0) {
        line[len] = '\0';
        if (!hash_format_ok(line + name_len + 1)) {
            snprintf(why, sizeof(why),
                     "not a bcrypt ($2b$, $2y$), sha512-crypt ($6$) or yescrypt ($y$) hash "
                     "(plain-text passwords are refused; `mphost passwd` writes hashes)");
            kind = -1;
        }
    }
    if (kind < 0) {
        snprintf(err, errlen, "users file %s, line %d: %s", path, lineno, why);
        return MPH_EINVAL;
    }
    if (out->n == *alloc) {
        *alloc = *alloc ? *alloc * 2 : 16;
        out->v = mph_xrealloc(out->v, *alloc * sizeof(user_t));
    }
    user_t *u = &out->v[out->n++];
    u->name = mph_xstrndup(line, name_len);
    u->hash = mph_xstrdup(line + name_len + 1);
    u->line = lineno;
    return 0;
}

/* Sorts the users read, refuses a name given twice, and picks the hash unknown users are
 * checked against (the file's first entry's). Returns 0 or MPH_EINVAL with why in err. */
static int users_finish(users_t *out, const char *path, char *err, size_t errlen)
{
    int first_line = 0;
    qsort(out->v, out->n, sizeof(user_t), user_cmp);
    for (size_t i = 0; i < out->n; i++) {
        if (i > 0 && strcmp(out->v[i - 1].name, out->v[i].name) == 0) {
            int a = out->v[i - 1].line, b = out->v[i].line;
            snprintf(err, errlen, "users file %s, line %d: the same user as line %d", path,
                     a > b ? a : b, a > b ? b : a);
            return MPH_EINVAL;
        }
        if (first_line == 0 || out->v[i].line < first_line) {
            first_line = out->v[i].line;
            out->dummy = out->v[i].hash;
        }
    }
    return 0;
}

static int users_read(const char *path, users_t *out, char *err, size_t errlen, char *warn)
{
    memset(out, 0, sizeof(*out));
    warn[0] = '\0';
    /* O_NONBLOCK: a FIFO put there must not block the open (mph_auth_file_check refuses it);
     * reads from a regular file ignore it. The checks are made on what was opened. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) {
        snprintf(err, errlen, "cannot read the users file %s: %s", path, strerror(errno));
        return MPH_EIO;
    }
    int checked = mph_auth_file_check(fd, path, err, errlen, warn, MESSAGE);
    FILE *f = checked == 0 ? fdopen(fd, "r") : NULL;
    if (f == NULL) {
        if (checked == 0)
            snprintf(err, errlen, "cannot read the users file %s: %s", path, strerror(errno));
        close(fd);
        return checked ? checked : MPH_EIO;
    }
    char *line = NULL;
    size_t cap = 0, alloc = 0;
    ssize_t got;
    int lineno = 0, rc = 0;
    while (rc == 0 && (got = getline(&line, &cap, f)) >= 0)
        rc = users_add_line(out, &alloc, line, (size_t)got, ++lineno, path, err, errlen);
    if (rc == 0 && ferror(f)) {
        snprintf(err, errlen, "cannot read the users file %s: %s", path, strerror(errno));
        rc = MPH_EIO;
    }
    free(line);
    fclose(f);
    if (rc == 0 && out->n > 0)
        rc = users_finish(out, path, err, errlen);
    if (rc != 0)
        users_free(out);
    return rc;
}

/* ---- Jobs ---- */

static void pump(mph_auth_t *a);
static void maybe_closed(mph_auth_t *a);

#ifndef NDEBUG
/* A job's invariants; used as assert(assert_job_state(j)). */
static int assert_job_state(const job_t *j)
{
    const mph_auth_t *a = j->auth;
    assert(j->source != NULL && j->source->checks > 0);
    assert(j->state != JOB_QUEUED || j->deadline > 0);
    assert(j->state != JOB_QUEUED || !mph_list_empty(&j->waiters)); /* else dropped */
    assert(j->state != JOB_RUNNING || a->nrunning > 0);
    assert(a->nqueued <= a->nchecks && (unsigned)a->nrunning <= a->nchecks);
    (void)a;
    return 1;
}
#endif

/* The source key of a client address (source_t.addr). */
static void source_key(const struct sockaddr *sa, uint8_t out[16])
{
    memset(out, 0, 16);
    if (sa && sa->sa_family == AF_INET) {
        out[10] = out[11] = 0xff;
        memcpy(out + 12, &((const struct sockaddr_in *)sa)->sin_addr, 4);
    } else if (sa && sa->sa_family == AF_INET6) {
        const struct in6_addr *in6 = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        /* An IPv4 client of a dual-stack socket is that IPv4 address; an IPv6 one, its /64. */
        memcpy(out, in6->s6_addr, IN6_IS_ADDR_V4MAPPED(in6) ? 16 : 8);
    }
}

static source_t *source_find(mph_auth_t *a, const uint8_t addr[16])
{
    mph_list_t *q;
    mph_list_foreach(q, &a->sources) {
        source_t *s = mph_list_entry(q, source_t, node);
        if (memcmp(s->addr, addr, 16) == 0)
            return s;
    }
    return NULL;
}

/* Takes a place for a new job of the source at addr (made if new: its turn comes last). */
static source_t *source_take(mph_auth_t *a, const uint8_t addr[16])
{
    source_t *s = source_find(a, addr);
    if (s == NULL) {
        s = mph_xcalloc(1, sizeof(*s));
        memcpy(s->addr, addr, 16);
        s->served = a->serial++;
        mph_list_init(&s->queue);
        mph_list_insert_head(&a->sources, &s->node);
    }
    s->checks++;
    a->nchecks++;
    return s;
}

/* Gives back the place of j, which is in no list any more. */
static void job_give_back(mph_auth_t *a, job_t *j)
{
    source_t *s = j->source;
    a->nchecks--;
    if (--s->checks > 0)
        return;
    assert(mph_list_empty(&s->queue));
    mph_list_remove(&s->node);
    free(s);
}

static void on_expiry(uv_timer_t *t);

/* Queues j at the end of its source's queue, until its deadline. */
static void job_queue(mph_auth_t *a, job_t *j)
{
    source_t *s = j->source;
    j->state = JOB_QUEUED;
    j->deadline = uv_now(a->loop) + a->queue_ms;
    mph_list_insert_tail(&s->queue, &j->node);
    a->nqueued++;
    if (a->timer_state == TIMER_NONE) { /* made at the first need: most hosts never queue */
        uv_timer_init(a->loop, &a->expiry);
        a->expiry.data = a;
        a->timer_state = TIMER_OPEN;
    }
    /* Every queued job's deadline is at most this one's: an armed timer is early enough. */
    if (!uv_is_active((uv_handle_t *)&a->expiry))
        uv_timer_start(&a->expiry, on_expiry, a->queue_ms, 0);
}

/* Takes j out of its source's queue. */
static void job_unqueue(mph_auth_t *a, job_t *j)
{
    assert(j->state == JOB_QUEUED);
    mph_list_remove(&j->node);
    if (--a->nqueued == 0 && a->timer_state == TIMER_OPEN)
        uv_timer_stop(&a->expiry);
}

static void job_free(job_t *j)
{
    explicit_bzero(j->password, j->password_len);
    free(j->password);
    free(j->user);
    free(j->hash);
    free(j);
}

/* Runs a caller's callback; a is not freed while it runs (mph_auth_close from inside one
 * frees it only once the callback returns: maybe_closed). */
static void deliver(mph_auth_t *a, mph_auth_cb cb, void *ud, mph_auth_result_t result,
                    const char *user)
{
    a->callbacks++;
    cb(ud, result, user);
    a->callbacks--;
}

/* Answers every waiter of j, which has given its place back (user: the verified name with
 * MPH_AUTH_VERIFIED), then wipes and frees it. A waiter cancelled meanwhile (a callback may
 * close another request of the same job) is only taken off the list. */
static void job_answer(mph_auth_t *a, job_t *j, mph_auth_result_t result, const char *user)
{
    j->state = JOB_ANSWERING;
    mph_list_t *q;
    while ((q = mph_list_pop(&j->waiters)) != NULL) {
        mph_auth_wait_t *w = mph_list_entry(q, mph_auth_wait_t, node);
        deliver(a, w->cb, w->ud, result, user);
        free(w);
    }
    job_free(j);
}

static mph_auth_wait_t *job_add_waiter(job_t *j, mph_auth_cb cb, void *ud)
{
    mph_auth_wait_t *w = mph_xcalloc(1, sizeof(*w));
    w->cb = cb;
    w->ud = ud;
    w->job = j;
    mph_list_insert_tail(&j->waiters, &w->node);
    return w;
}

/* Points the job at the current table's hash for its user. Returns 1 if that changed what
 * it must be checked against (so a finished check must run again). */
static int job_resolve(mph_auth_t *a, job_t *j)
{
    const user_t *u = users_find(&a->users, j->user);
    const char *hash = u ? u->hash : a->users.dummy;
    int changed =
        j->hash == NULL || hash == NULL || (u != NULL) != j->known || strcmp(hash, j->hash) != 0;
    j->generation = a->generation;
    j->known = u != NULL;
    if (changed) {
        free(j->hash);
        j->hash = hash ? mph_xstrdup(hash) : NULL;
    }
    return changed && hash != NULL;
}

/* On a pool thread: hash the password with the job's hash as the setting and compare. */
static void job_work(uv_work_t *work)
{
    job_t *j = mph_container_of(work, job_t, work);
    /* crypt_rn's scratch space is ~32 KB: the heap, not a pool thread's stack. */
    struct crypt_data *data = calloc(1, sizeof(*data));
    j->match = 0;
    if (data == NULL)
        return;
    const char *out = crypt_rn(j->password, j->hash, data, sizeof(*data));
    j->match = out != NULL && same_hash(out, j->hash);
    explicit_bzero(data, sizeof(*data)); /* it held state derived from the password */
    free(data);
}

static void cache_put(mph_auth_t *a, uint64_t key, const user_t *u)
{
    cache_entry_t *e = &a->cache[key & (CACHE_ENTRIES - 1)];
    e->key = key;
    e->user = u;
    e->expires = uv_now(a->loop) + MPH_AUTH_CACHE_MS;
}

/* Back on the loop. status is UV_ECANCELED only if the loop is torn down around us. */
static void job_done(uv_work_t *work, int status)
{
    job_t *j = mph_container_of(work, job_t, work);
    mph_auth_t *a = j->auth;
    assert(j->state == JOB_RUNNING && assert_job_state(j));
    mph_list_remove(&j->node);
    a->nrunning--;
    mph_auth_result_t result = MPH_AUTH_EXPIRED; /* closing: not answered for the password */
    const char *user = NULL;
    if (!a->closing && status == 0) {
        /* A re-read replaced the table while the hash ran: the answer stands only if the
         * user's hash is the same in the new table (a removed user is refused from now on).
         * A job nobody waits for any more is not run again. */
        if (j->generation != a->generation && !mph_list_empty(&j->waiters) && job_resolve(a, j)) {
            job_queue(a, j);
            pump(a);
            return;
        }
        result = MPH_AUTH_REFUSED;
        if (j->known && j->match && j->generation == a->generation) {
            result = MPH_AUTH_VERIFIED;
            user = j->user;
            cache_put(a, j->key, users_find(&a->users, j->user));
            mph_log(MPH_LOG_DEBUG, "auth: user %s verified", user);
        } else {
            mph_log(MPH_LOG_DEBUG, "auth: credentials refused (unknown user or wrong password)");
        }
    }
    job_give_back(a, j);
    job_answer(a, j, result, user);
    pump(a);
    maybe_closed(a);
}

/* The next job to run: the first of the source with queued jobs that was served longest
 * ago. Linear: there are at most max_checks sources. */
static job_t *next_turn(mph_auth_t *a)
{
    source_t *next = NULL;
    mph_list_t *q;
    mph_list_foreach(q, &a->sources) {
        source_t *s = mph_list_entry(q, source_t, node);
        if (!mph_list_empty(&s->queue) && (next == NULL || s->served < next->served))
            next = s;
    }
    return next ? mph_list_entry(mph_list_first(&next->queue), job_t, node) : NULL;
}

/* Starts queued jobs while there is room on the pool, taking turns between sources. */
static void pump(mph_auth_t *a)
{
    job_t *j;
    while (!a->closing && a->nrunning < MAX_RUNNING && (j = next_turn(a)) != NULL) {
        job_unqueue(a, j);
        j->turn = j->source->served = a->serial++;
        j->state = JOB_RUNNING;
        mph_list_insert_head(&a->running, &j->node);
        a->nrunning++;
        a->stats.hashed++;
        mph_log(MPH_LOG_DEBUG, "auth: checking credentials (%d on the pool, %u waiting)",
                a->nrunning, a->nqueued);
        /* uv_queue_work fails only without a work function: never here. */
        if (uv_queue_work(a->loop, &j->work, job_work, job_done) != 0)
            abort();
    }
}

/* Refuses every queued job whose deadline has come (all of them when closing), then re-arms
 * the timer for the earliest deadline left. */
static void expire(mph_auth_t *a)
{
    uint64_t now = uv_now(a->loop), next = 0;
    mph_list_t expired, *qs, *qj, *tmp;
    mph_list_init(&expired); /* the last one taken out first */
    /* First take them out, then give their places back (which may free their sources: not
     * during the walk), then answer: a callback may check again, or cancel. */
    mph_list_foreach(qs, &a->sources) {
        source_t *s = mph_list_entry(qs, source_t, node);
        mph_list_foreach_safe(qj, tmp, &s->queue) {
            job_t *j = mph_list_entry(qj, job_t, node);
            if (!a->closing && j->deadline > now) {
                next = next == 0 || j->deadline < next ? j->deadline : next;
                continue;
            }
            job_unqueue(a, j);
            j->state = JOB_ANSWERING;
            mph_list_insert_head(&expired, &j->node);
        }
    }
    mph_list_foreach(qj, &expired)
        job_give_back(a, mph_list_entry(qj, job_t, node));
    if (next && a->timer_state == TIMER_OPEN)
        uv_timer_start(&a->expiry, on_expiry, next - now, 0);
    while ((qj = mph_list_pop(&expired)) != NULL) {
        job_t *j = mph_list_entry(qj, job_t, node);
        if (!a->closing) {
            a->stats.expired++;
            mph_log(MPH_LOG_DEBUG, "auth: a check refused after waiting %llu ms for the pool",
                    (unsigned long long)a->queue_ms);
        }
        job_answer(a, j, MPH_AUTH_EXPIRED, NULL);
    }
}

static void on_expiry(uv_timer_t *t)
{
    mph_auth_t *a = t->data;
    expire(a);
    maybe_closed(a);
}

/* Whether j checks this pair. Comparing the passwords too (in constant time) makes a
 * collision of the 64-bit key harmless. */
static int same_pair(const job_t *j, uint64_t key, const char *user, const char *password,
                     size_t password_len)
{
    if (j->key != key || j->password_len != password_len || strcmp(j->user, user) != 0)
        return 0;
    volatile unsigned char diff = 0;
    for (size_t i = 0; i < password_len; i++)
        diff |= (unsigned char)(j->password[i] ^ password[i]);
    return diff == 0;
}

/* A queued or running job for the same pair, or NULL. */
static job_t *job_find(mph_auth_t *a, uint64_t key, const char *user, const char *password,
                       size_t password_len)
{
    mph_list_t *qs, *qj;
    mph_list_foreach(qs, &a->sources) {
        mph_list_foreach(qj, &mph_list_entry(qs, source_t, node)->queue) {
            job_t *j = mph_list_entry(qj, job_t, node);
            if (same_pair(j, key, user, password, password_len))
                return j;
        }
    }
    mph_list_foreach(qj, &a->running) {
        job_t *j = mph_list_entry(qj, job_t, node);
        if (same_pair(j, key, user, password, password_len))
            return j;
    }
    return NULL;
}

/* A check refused BUSY: a debug line each, and a warning at most every BUSY_LOG_MS (a flood
 * must not flood the log too). */
static void log_busy(mph_auth_t *a, const source_t *s)
{
    uint64_t now = uv_now(a->loop);
    a->stats.busy++;
    mph_log(MPH_LOG_DEBUG, "auth: a check refused at once: %u in progress, %u from its address",
            a->nchecks, s ? s->checks : 0);
    if (now < a->busy_log_at) {
        a->busy_unlogged++;
        return;
    }
    mph_log(MPH_LOG_WARN,
            "auth: refusing credential checks (-32005): %u in progress, at most %u in all and %u "
            "from one address; %llu more refused since the last such line",
            a->nchecks, a->max_checks, a->max_per_source, (unsigned long long)a->busy_unlogged);
    a->busy_unlogged = 0;
    a->busy_log_at = now + BUSY_LOG_MS;
}

/* ---- The public surface ---- */

int mph_auth_new(mph_auth_t **out, uv_loop_t *loop, const char *path, unsigned flags, char *err,
                 size_t errlen)
{
    mph_auth_t *a = mph_xcalloc(1, sizeof(*a));
    a->loop = loop;
    mph_list_init(&a->sources);
    mph_list_init(&a->running);
    a->max_checks = MPH_AUTH_MAX_CHECKS;
    a->max_per_source = MPH_AUTH_MAX_PER_SOURCE;
    a->queue_ms = MPH_AUTH_QUEUE_MS;
    if (getrandom(a->key, sizeof(a->key), 0) != (ssize_t)sizeof(a->key)) {
        snprintf(err, errlen, "cannot draw a random key: %s", strerror(errno));
        free(a);
        return MPH_EIO;
    }
    if (path) {
        char warn[MESSAGE];
        int rc = users_read(path, &a->users, err, errlen, warn);
        if (rc != 0) {
            free(a);
            return rc;
        }
        if (warn[0] && !(flags & MPH_AUTH_QUIET))
            mph_log(MPH_LOG_WARN, "%s", warn);
        a->path = mph_xstrdup(path);
    }
    *out = a;
    return 0;
}

size_t mph_auth_count(const mph_auth_t *a)
{
    return a->users.n;
}

/* Answers a check before mph_auth_check returns, and wipes what it decoded. */
static mph_auth_wait_t *answer_now(mph_auth_t *a, char *buf, size_t buflen, mph_auth_cb cb,
                                   void *ud, mph_auth_result_t result, const char *user)
{
    explicit_bzero(buf, buflen); /* user, if any, is the table's, not buf's */
    deliver(a, cb, ud, result, user);
    maybe_closed(a);
    return NULL;
}

mph_auth_wait_t *mph_auth_check(mph_auth_t *a, const struct sockaddr *source, const char *value,
                                size_t len, mph_auth_cb cb, void *ud)
{
    assert(!a->closing);
    char buf[DECODE_ROOM];
    size_t colon;
    if (a->users.n == 0 || value == NULL || parse_basic(value, len, buf, &colon) != 0)
        return answer_now(a, buf, sizeof(buf), cb, ud, MPH_AUTH_REFUSED, NULL);
    size_t n = strlen(buf);
    uint64_t key = siphash24(a->key, buf, n);
    buf[colon] = '\0';
    const char *user = buf, *password = buf + colon + 1;
    size_t password_len = n - colon - 1;
    /* A name no users file can hold: refused without a hash (that tells nothing of who
     * exists), and never written to a log. */
    if (name_problem(user, colon) != NULL)
        return answer_now(a, buf, sizeof(buf), cb, ud, MPH_AUTH_REFUSED, NULL);
    const cache_entry_t *e = &a->cache[key & (CACHE_ENTRIES - 1)];
    if (e->user && e->key == key && strcmp(e->user->name, user) == 0 &&
        uv_now(a->loop) < e->expires)
        return answer_now(a, buf, sizeof(buf), cb, ud, MPH_AUTH_VERIFIED, e->user->name);
    job_t *j = job_find(a, key, user, password, password_len);
    if (j == NULL) {
        uint8_t addr[16];
        source_key(source, addr);
        const source_t *s = source_find(a, addr);
        if (a->nchecks >= a->max_checks || (s && s->checks >= a->max_per_source)) {
            log_busy(a, s);
            return answer_now(a, buf, sizeof(buf), cb, ud, MPH_AUTH_BUSY, NULL);
        }
        j = mph_xcalloc(1, sizeof(*j));
        j->auth = a;
        mph_list_init(&j->waiters);
        j->source = source_take(a, addr);
        j->key = key;
        j->user = mph_xstrdup(user);
        j->password = mph_xstrndup(password, password_len);
        j->password_len = password_len;
        job_resolve(a, j);
        job_queue(a, j);
    }
    explicit_bzero(buf, sizeof(buf));
    mph_auth_wait_t *w = job_add_waiter(j, cb, ud);
    assert(assert_job_state(j));
    pump(a); /* never answers: a job starts here, it ends on the loop */
    return w;
}

void mph_auth_cancel(mph_auth_wait_t *w)
{
    job_t *j = w->job;
    mph_auth_t *a = j->auth;
    mph_list_remove(&w->node);
    free(w);
    if (!mph_list_empty(&j->waiters) || j->state != JOB_QUEUED)
        return; /* others wait; or it runs (it ends unanswered), or is being answered */
    job_unqueue(a, j);
    job_give_back(a, j);
    a->stats.dropped++;
    mph_log(MPH_LOG_DEBUG, "auth: a check dropped before it ran: every client waiting for it left");
    job_free(j);
}

static void reload_work(uv_work_t *work)
{
    reload_t *r = mph_container_of(work, reload_t, work);
    r->rc = users_read(r->auth->path, &r->users, r->err, sizeof(r->err), r->warn);
}

static void reload_done(uv_work_t *work, int status)
{
    reload_t *r = mph_container_of(work, reload_t, work);
    mph_auth_t *a = r->auth;
    a->reload = NULL;
    if (a->closing || status != 0) {
        users_free(&r->users);
    } else if (r->rc == 0) {
        users_free(&a->users);
        a->users = r->users;
        a->generation++;
        memset(a->cache, 0, sizeof(a->cache)); /* it points into the old table */
        mph_log(MPH_LOG_INFO, "users file %s re-read: %zu users", a->path, a->users.n);
        if (r->warn[0])
            mph_log(MPH_LOG_WARN, "%s", r->warn);
    } else {
        mph_log(MPH_LOG_WARN, "%s; keeping the previous %zu users", r->err, a->users.n);
    }
    free(r);
    if (a->reload_again && !a->closing) {
        a->reload_again = 0;
        mph_auth_reload(a);
    }
    maybe_closed(a);
}

void mph_auth_reload(mph_auth_t *a)
{
    if (a->path == NULL || a->closing)
        return;
    if (a->reload) {
        a->reload_again = 1;
        return;
    }
    reload_t *r = mph_xcalloc(1, sizeof(*r));
    r->auth = a;
    a->reload = r;
    if (uv_queue_work(a->loop, &r->work, reload_work, reload_done) != 0) { /* cannot happen */
        a->reload = NULL;
        free(r);
    }
}

static void on_timer_closed(uv_handle_t *h)
{
    mph_auth_t *a = h->data;
    a->timer_state = TIMER_CLOSED;
    maybe_closed(a);
}

/* Frees a once it is closing and nothing refers to it any more: no job on the pool, no
 * re-read, its timer closed, no callback of ours on the stack. */
static void maybe_closed(mph_auth_t *a)
{
    if (!a->closing || a->nrunning > 0 || a->reload != NULL || a->closed == NULL ||
        a->callbacks > 0 || a->timer_state == TIMER_OPEN || a->timer_state == TIMER_CLOSING)
        return;
    assert(a->nchecks == 0 && mph_list_empty(&a->sources));
    void (*closed)(void *) = a->closed;
    void *ud = a->closed_ud;
    users_free(&a->users);
    free(a->path);
    free(a);
    closed(ud);
}

void mph_auth_close(mph_auth_t *a, void (*closed)(void *ud), void *ud)
{
    assert(!a->closing && closed != NULL);
    a->closing = 1;
    a->closed = closed;
    a->closed_ud = ud;
    a->callbacks++; /* the answers below may not free a under us */
    expire(a);      /* every queued job: answered EXPIRED */
    a->callbacks--;
    if (a->timer_state == TIMER_OPEN) {
        a->timer_state = TIMER_CLOSING;
        uv_close((uv_handle_t *)&a->expiry, on_timer_closed);
    }
    maybe_closed(a);
}

/* ---- For mphost passwd ---- */

int mph_auth_check_name(const char *name, char *err, size_t errlen)
{
    const char *why = name_problem(name, strlen(name));
    if (why == NULL)
        return 0;
    snprintf(err, errlen, "invalid user name: it %s", why);
    return MPH_EINVAL;
}

size_t mph_auth_line_user(const char *line, size_t len)
{
    size_t name_len = 0;
    char why[128];
    return parse_line(line, len, &name_len, why, sizeof(why)) > 0 ? name_len : 0;
}

int mph_auth_hash_new(const char *password, char **out, char *err, size_t errlen)
{
    char setting[CRYPT_GENSALT_OUTPUT_SIZE];
    if (strlen(password) > MPH_AUTH_MAX_PASSWORD) {
        snprintf(err, errlen, "the password is longer than %d bytes", MPH_AUTH_MAX_PASSWORD);
        return MPH_EINVAL;
    }
    /* NULL prefix: libxcrypt's preferred method (yescrypt on Debian 12), its default cost,
     * and salt from the kernel's random source. */
    if (crypt_gensalt_rn(NULL, 0, NULL, 0, setting, sizeof(setting)) == NULL) {
        snprintf(err, errlen, "cannot make a salt: %s", strerror(errno));
        return MPH_EIO;
    }
    struct crypt_data *data = mph_xcalloc(1, sizeof(*data));
    const char *hash = crypt_rn(password, setting, data, sizeof(*data));
    int rc = 0;
    if (hash == NULL || !hash_format_ok(hash)) {
        snprintf(err, errlen, "cannot hash the password: %s",
                 hash ? "unexpected format" : strerror(errno));
        rc = MPH_EIO;
    } else {
        *out = mph_xstrdup(hash);
    }
    explicit_bzero(data, sizeof(*data));
    free(data);
    return rc;
}
