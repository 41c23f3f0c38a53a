/*
 * file.c: the embedded storage backend: one data directory, one log per scope.
 *
 * Files of scope S (its name percent-encoded to E, so no name can leave the directory):
 *   E.log   records appended by commits; one fdatasync per commit (a commit is a whole
 *           group of transactions, see lua/runner.c)
 *   E.snap  a compacted image of the scope at some version V (optional)
 *   E.lock  the flock() that makes the compare-and-set atomic across processes
 *   E.claim a fairness claim (storage.h): "ID EXPIRY_MS", read and written under the lock;
 *           advisory, so it is not synced (a claim lost in a crash costs nothing)
 *
 * A record is: magic "MPR1", payload length, CRC-32 of the payload, then the payload:
 * version (u64), entry count (u32), and per entry key length (u32), key, value length (u32,
 * 0xFFFFFFFF for a deletion), JSON text. Integers are little-endian.
 *
 * Why a log and not a rewritten file per commit: commit cost must grow with what changed,
 * not with the size of the scope (a scope of 100,000 keys commits as fast as one of 1).
 * Why it is never seen torn: a record counts only when complete with a matching CRC, and a
 * writer holds the lock from its write to its fdatasync; so an incomplete record at the end
 * can only come from a writer that died, was never acknowledged, and is cut off by the next
 * writer. A bad record that is not the last is corruption, reported as such, never skipped.
 * Snapshots are written the classic way (temp file, fsync, rename, fsync the directory), and
 * the log is then replaced the same way; records at or below the snapshot's version are
 * ignored, so a crash between the two steps loses nothing.
 *
 * Commit under the lock: read whatever other processes appended since our last look (that
 * is the conflict delta, handed back so the retry needs no second read), and only if there
 * was nothing, append and sync. All blocking work runs on libuv's thread pool; one
 * operation per scope at a time (the runner guarantees it), so a scope's fields need no mutex.
 */
#define _GNU_SOURCE
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "storage.h"

#define RECORD_MAGIC 0x3152504dU /* "MPR1" read as little-endian */
#define RECORD_HEADER 12         /* magic, length, crc */
#define DELETED_LEN 0xFFFFFFFFU
#define COMPACT_MIN_BYTES (4u << 20) /* never compact a log smaller than this */
#define MAX_SCOPE_NAME 200

typedef struct fscope_s {
    char *name;       /* owned */
    char *path;       /* owned: dir/E without the extension */
    int lock_fd;      /* -1 until the first operation */
    int log_fd;       /* -1 until the first operation */
    ino_t log_ino;    /* inode of log_fd: a compaction elsewhere replaces the file */
    off_t log_end;    /* bytes of the log read and applied by us */
    uint64_t version; /* the version we last reported to the runner */
    off_t snap_size;  /* size of the current snapshot file (compaction policy) */
    int busy;         /* an operation is in flight (invariant: at most one) */
    struct fscope_s *next;
} fscope_t;

typedef struct {
    mph_store_t base; /* must be first */
    uv_loop_t *loop;
    char *dir;        /* owned */
    fscope_t *scopes; /* owned */
    unsigned ops;     /* operations in flight */
    uint64_t commits; /* commits written (loop thread) */
    uint64_t syncs;   /* fsync and fdatasync calls, from any thread (atomic) */
    int closing;
    void (*closed_cb)(void *ud);
    void *closed_ud;
} file_store_t;

typedef enum { OP_LOAD, OP_COMMIT } op_kind_t;

typedef struct {
    uv_work_t work;
    file_store_t *fs;
    fscope_t *sc;
    op_kind_t kind;
    uint64_t expected;               /* commit: the CAS version */
    uint64_t committer;              /* commit: who asks (fairness claims) */
    int claim;                       /* commit: reserve the next commit on a conflict */
    int held;                        /* result: refused for another committer's claim */
    const mph_store_entry_t *writes; /* commit: borrowed from the caller until cb */
    size_t nwrites;
    mph_store_cb cb;
    void *ud;
    /* results, filled on the worker thread */
    int status;
    char message[300];
    mph_store_doc_t doc;
    size_t doc_cap;
    mph_buf_t bufs[2]; /* file contents the doc's entries point into */
} op_t;

/* ---- Encoding helpers ---- */

static void put_u32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static uint32_t get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get_u64(const unsigned char *p)
{
    return (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32;
}

static void put_u64(unsigned char *p, uint64_t v)
{
    put_u32(p, (uint32_t)v);
    put_u32(p + 4, (uint32_t)(v >> 32));
}

/* Percent-encodes a scope name into a file name: only [A-Za-z0-9_-] pass. */
static void encode_name(mph_buf_t *out, const char *name)
{
    static const char hex[] = "0123456789ABCDEF";
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
        if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
            *p == '_' || *p == '-') {
            mph_buf_append(out, p, 1);
        } else {
            char esc[3] = {'%', hex[*p >> 4], hex[*p & 15]};
            mph_buf_append(out, esc, 3);
        }
    }
}

static int op_fail(op_t *op, int status, const char *what, const char *path)
{
    op->status = status;
    if (path)
        snprintf(op->message, sizeof(op->message), "%s %s: %s", what, path, strerror(errno));
    else
        snprintf(op->message, sizeof(op->message), "%s", what);
    return status;
}

/* Every sync goes through here so that benchmarks can report syncs per request. Called on
 * worker threads, hence the atomic. */
static int counted_sync(file_store_t *fs, int fd, int data_only)
{
    __atomic_fetch_add(&fs->syncs, 1, __ATOMIC_RELAXED);
    return data_only ? fdatasync(fd) : fsync(fd);
}

static int fsync_dir(file_store_t *fs)
{
    int fd = open(fs->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    int rc = counted_sync(fs, fd, 0);
    close(fd);
    return rc;
}

static int read_range(int fd, off_t from, off_t to, mph_buf_t *out)
{
    size_t n = (size_t)(to - from);
    mph_buf_reserve(out, n);
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, out->data + out->len + got, n - got, from + (off_t)got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        got += (size_t)r;
    }
    out->len += n;
    return 0;
}

static int write_all(int fd, const void *data, size_t n, off_t at)
{
    const char *p = data;
    while (n > 0) {
        ssize_t w = pwrite(fd, p, n, at);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -1;
        p += w;
        n -= (size_t)w;
        at += w;
    }
    return 0;
}

/* ---- Records ---- */

static void doc_add(op_t *op, const char *key, size_t klen, const char *json, size_t jlen)
{
    if (op->doc.n == op->doc_cap) {
        op->doc_cap = op->doc_cap ? op->doc_cap * 2 : 64;
        op->doc.entries = mph_xrealloc(op->doc.entries, op->doc_cap * sizeof(*op->doc.entries));
    }
    mph_store_entry_t *e = &op->doc.entries[op->doc.n++];
    e->key = key;
    e->klen = klen;
    e->json = json;
    e->jlen = jlen;
}

typedef enum { PARSE_OK, PARSE_END, PARSE_TORN, PARSE_CORRUPT } parse_t;

/* Parses the record at data[*pos]; on PARSE_OK advances *pos, sets *version, and (when
 * `into` is not NULL and the version is above `skip_upto`) adds its entries to the doc. */
static parse_t parse_record(const mph_buf_t *b, size_t *pos, uint64_t *version, op_t *into,
                            uint64_t skip_upto)
{
    const unsigned char *d = (const unsigned char *)b->data;
    size_t at = *pos, len = b->len;
    if (at == len)
        return PARSE_END;
    if (len - at < RECORD_HEADER)
        return PARSE_TORN;
    if (get_u32(d + at) != RECORD_MAGIC)
        return PARSE_CORRUPT;
    uint32_t plen = get_u32(d + at + 4);
    if (len - at - RECORD_HEADER < plen)
        return PARSE_TORN;
    const unsigned char *p = d + at + RECORD_HEADER;
    if ((uint32_t)crc32(0L, p, plen) != get_u32(d + at + 8))
        return at + RECORD_HEADER + plen == len ? PARSE_TORN : PARSE_CORRUPT;
    if (plen < 12)
        return PARSE_CORRUPT;
    uint64_t v = get_u64(p);
    uint32_t count = get_u32(p + 8);
    size_t q = 12;
    int keep = into && v > skip_upto;
    for (uint32_t i = 0; i < count; i++) {
        if (plen - q < 4)
            return PARSE_CORRUPT;
        uint32_t klen = get_u32(p + q);
        q += 4;
        if (plen - q < (size_t)klen + 4)
            return PARSE_CORRUPT;
        const char *key = (const char *)p + q;
        q += klen;
        uint32_t jlen = get_u32(p + q);
        q += 4;
        const char *json = NULL;
        if (jlen != DELETED_LEN) {
            if (plen - q < jlen)
                return PARSE_CORRUPT;
            json = (const char *)p + q;
            q += jlen;
        }
        if (keep)
            doc_add(into, key, klen, json, json ? jlen : 0);
    }
    *version = v;
    *pos = at + RECORD_HEADER + plen;
    return PARSE_OK;
}

/* Builds a record of `n` entries at `version`. */
static void build_record(mph_buf_t *out, uint64_t version, const mph_store_entry_t *e, size_t n)
{
    size_t start = out->len;
    unsigned char hdr[RECORD_HEADER + 12] = {0};
    mph_buf_append(out, hdr, sizeof(hdr));
    for (size_t i = 0; i < n; i++) {
        unsigned char len[4];
        put_u32(len, (uint32_t)e[i].klen);
        mph_buf_append(out, len, 4);
        mph_buf_append(out, e[i].key, e[i].klen);
        put_u32(len, e[i].json ? (uint32_t)e[i].jlen : DELETED_LEN);
        mph_buf_append(out, len, 4);
        if (e[i].json)
            mph_buf_append(out, e[i].json, e[i].jlen);
    }
    unsigned char *p = (unsigned char *)out->data + start;
    size_t plen = out->len - start - RECORD_HEADER;
    put_u32(p, RECORD_MAGIC);
    put_u32(p + 4, (uint32_t)plen);
    put_u64(p + RECORD_HEADER, version);
    put_u32(p + RECORD_HEADER + 8, (uint32_t)n);
    put_u32(p + 8, (uint32_t)crc32(0L, p + RECORD_HEADER, (uInt)plen));
}

/* ---- Worker side (thread pool) ---- */

static char *scope_file(const fscope_t *sc, const char *ext)
{
    char *p = mph_xmalloc(strlen(sc->path) + strlen(ext) + 1);
    strcpy(p, sc->path);
    strcat(p, ext);
    return p;
}

/* Opens (creating) the lock and log files. */
static int open_files(op_t *op)
{
    fscope_t *sc = op->sc;
    int created = 0;
    if (sc->lock_fd < 0) {
        char *lock = scope_file(sc, ".lock");
        sc->lock_fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        int rc = sc->lock_fd < 0 ? op_fail(op, MPH_ESTORAGE, "cannot open", lock) : 0;
        free(lock);
        if (rc)
            return rc;
        created = 1;
    }
    if (sc->log_fd < 0) {
        char *log = scope_file(sc, ".log");
        sc->log_fd = open(log, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        struct stat st;
        int rc = 0;
        if (sc->log_fd < 0 || fstat(sc->log_fd, &st) != 0)
            rc = op_fail(op, MPH_ESTORAGE, "cannot open", log);
        else
            sc->log_ino = st.st_ino;
        free(log);
        if (rc)
            return rc;
        created = 1;
    }
    if (created && fsync_dir(op->fs) != 0)
        return op_fail(op, MPH_ESTORAGE, "cannot sync directory", op->fs->dir);
    return 0;
}

static int lock_scope(op_t *op)
{
    while (flock(op->sc->lock_fd, LOCK_EX) != 0) {
        if (errno != EINTR)
            return op_fail(op, MPH_ESTORAGE, "cannot lock", op->sc->path);
    }
    return 0;
}

static void unlock_scope(op_t *op)
{
    flock(op->sc->lock_fd, LOCK_UN);
}

/* Reads the log from sc->log_end to its end. Complete records go into the doc (when their
 * version is above skip_upto); a torn tail is cut off (we hold the lock). Sets *last to the
 * last version seen (unchanged when none). */
static int read_log_tail(op_t *op, mph_buf_t *buf, uint64_t skip_upto, uint64_t *last)
{
    fscope_t *sc = op->sc;
    struct stat st;
    if (fstat(sc->log_fd, &st) != 0)
        return op_fail(op, MPH_ESTORAGE, "cannot stat log of", sc->path);
    if (st.st_size <= sc->log_end)
        return 0;
    if (read_range(sc->log_fd, sc->log_end, st.st_size, buf) != 0)
        return op_fail(op, MPH_ESTORAGE, "cannot read log of", sc->path);
    size_t pos = 0;
    for (;;) {
        uint64_t v = 0;
        parse_t r = parse_record(buf, &pos, &v, op, skip_upto);
        if (r == PARSE_OK) {
            if (*last != 0 && v != *last + 1 && v > skip_upto) {
                snprintf(op->message, sizeof(op->message),
                         "corrupt log of %s: version %llu follows %llu", sc->name,
                         (unsigned long long)v, (unsigned long long)*last);
                return op->status = MPH_ECORRUPT;
            }
            *last = v;
            continue;
        }
        if (r == PARSE_END)
            break;
        if (r == PARSE_CORRUPT) {
            snprintf(op->message, sizeof(op->message), "corrupt log of %s at byte %lld", sc->name,
                     (long long)(sc->log_end + (off_t)pos));
            return op->status = MPH_ECORRUPT;
        }
        /* PARSE_TORN: a writer died mid-record; it was never acknowledged. */
        off_t cut = sc->log_end + (off_t)pos;
        mph_log(MPH_LOG_WARN, "file: %s: cutting a torn record at byte %lld", sc->name,
                (long long)cut);
        if (ftruncate(sc->log_fd, cut) != 0 || counted_sync(op->fs, sc->log_fd, 1) != 0)
            return op_fail(op, MPH_ESTORAGE, "cannot truncate log of", sc->path);
        buf->len = pos;
        break;
    }
    sc->log_end += (off_t)buf->len;
    return 0;
}

/* Reads snapshot and whole log into the op's doc (is_delta = 0). Caller holds the lock. */
static int load_all(op_t *op)
{
    fscope_t *sc = op->sc;
    op->doc.n = 0;
    op->doc.is_delta = 0;
    op->bufs[0].len = op->bufs[1].len = 0;
    /* The log may have been replaced by a compaction since we opened it. */
    char *log = scope_file(sc, ".log");
    struct stat st;
    if (stat(log, &st) == 0 && st.st_ino != sc->log_ino) {
        int fd = open(log, O_RDWR | O_CLOEXEC);
        if (fd < 0) {
            int rc = op_fail(op, MPH_ESTORAGE, "cannot open", log);
            free(log);
            return rc;
        }
        close(sc->log_fd);
        sc->log_fd = fd;
        sc->log_ino = st.st_ino;
    }
    free(log);

    uint64_t snap_version = 0;
    char *snap = scope_file(sc, ".snap");
    int fd = open(snap, O_RDONLY | O_CLOEXEC);
    sc->snap_size = 0;
    if (fd >= 0) {
        struct stat ss;
        int bad = fstat(fd, &ss) != 0 || read_range(fd, 0, ss.st_size, &op->bufs[0]) != 0;
        close(fd);
        size_t pos = 0;
        if (bad) {
            int rc = op_fail(op, MPH_ESTORAGE, "cannot read", snap);
            free(snap);
            return rc;
        }
        if (parse_record(&op->bufs[0], &pos, &snap_version, op, 0) != PARSE_OK ||
            pos != op->bufs[0].len) {
            snprintf(op->message, sizeof(op->message), "corrupt snapshot %s", snap);
            free(snap);
            return op->status = MPH_ECORRUPT;
        }
        sc->snap_size = ss.st_size;
    } else if (errno != ENOENT) {
        int rc = op_fail(op, MPH_ESTORAGE, "cannot open", snap);
        free(snap);
        return rc;
    }
    free(snap);
    sc->log_end = 0;
    uint64_t last = 0;
    int rc = read_log_tail(op, &op->bufs[1], snap_version, &last);
    if (rc)
        return rc;
    sc->version = last > snap_version ? last : snap_version;
    op->doc.version = sc->version;
    return 0;
}

typedef struct {
    const mph_store_entry_t *e;
    size_t seq;
} ranked_t;

static int compare_ranked(const void *a, const void *b)
{
    const ranked_t *x = a, *y = b;
    size_t n = x->e->klen < y->e->klen ? x->e->klen : y->e->klen;
    int c = memcmp(x->e->key, y->e->key, n);
    if (c == 0)
        c = (x->e->klen > y->e->klen) - (x->e->klen < y->e->klen);
    if (c == 0)
        c = (x->seq > y->seq) - (x->seq < y->seq);
    return c;
}

/* Writes a snapshot of the whole scope and starts an empty log. Caller holds the lock and
 * the log is fully applied. A failure leaves the old files in place (still correct). */
static void compact(op_t *op)
{
    fscope_t *sc = op->sc;
    op_t tmp = {.fs = op->fs, .sc = sc};
    mph_buf_t rec = MPH_BUF_INIT;
    char *snap = scope_file(sc, ".snap"), *snap_tmp = scope_file(sc, ".snap.tmp");
    char *log = scope_file(sc, ".log"), *log_tmp = scope_file(sc, ".log.tmp");
    ranked_t *ranked = NULL;
    mph_store_entry_t *live = NULL;
    int fd = -1;

    if (load_all(&tmp) != 0)
        goto done;
    /* Latest value per key, deletions dropped. */
    ranked = mph_xmalloc((tmp.doc.n + 1) * sizeof(*ranked));
    for (size_t i = 0; i < tmp.doc.n; i++)
        ranked[i] = (ranked_t){&tmp.doc.entries[i], i};
    qsort(ranked, tmp.doc.n, sizeof(*ranked), compare_ranked);
    live = mph_xmalloc((tmp.doc.n + 1) * sizeof(*live));
    size_t nlive = 0;
    for (size_t i = 0; i < tmp.doc.n; i++) {
        int last_of_key = i + 1 == tmp.doc.n || ranked[i + 1].e->klen != ranked[i].e->klen ||
                          memcmp(ranked[i + 1].e->key, ranked[i].e->key, ranked[i].e->klen) != 0;
        if (last_of_key && ranked[i].e->json)
            live[nlive++] = *ranked[i].e;
    }
    build_record(&rec, sc->version, live, nlive);

    fd = open(snap_tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || write_all(fd, rec.data, rec.len, 0) != 0 || counted_sync(op->fs, fd, 0) != 0)
        goto failed;
    close(fd);
    fd = -1;
    if (rename(snap_tmp, snap) != 0 || fsync_dir(op->fs) != 0)
        goto failed;
    /* The snapshot holds everything up to sc->version; now an empty log replaces the old. */
    fd = open(log_tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || counted_sync(op->fs, fd, 0) != 0 || rename(log_tmp, log) != 0 ||
        fsync_dir(op->fs) != 0)
        goto failed;
    struct stat st;
    if (fstat(fd, &st) == 0) {
        close(sc->log_fd);
        sc->log_fd = fd;
        sc->log_ino = st.st_ino;
        sc->log_end = 0;
        sc->snap_size = (off_t)rec.len;
        fd = -1;
    }
    mph_log(MPH_LOG_DEBUG, "file: compacted %s: %zu keys at version %llu", sc->name, nlive,
            (unsigned long long)sc->version);
    goto done;
failed:
    mph_log(MPH_LOG_WARN, "file: compaction of %s failed (the log stays): %s", sc->name,
            strerror(errno));
    unlink(snap_tmp);
done:
    if (fd >= 0)
        close(fd);
    free(ranked);
    free(live);
    free(tmp.doc.entries);
    mph_buf_free(&tmp.bufs[0]);
    mph_buf_free(&tmp.bufs[1]);
    mph_buf_free(&rec);
    free(snap);
    free(snap_tmp);
    free(log);
    free(log_tmp);
}

static void do_load(op_t *op)
{
    if (open_files(op) != 0 || lock_scope(op) != 0)
        return;
    load_all(op);
    unlock_scope(op);
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* The committer holding an unexpired claim on the scope, or 0. Caller holds the lock. */
static uint64_t claim_holder(op_t *op)
{
    char *path = scope_file(op->sc, ".claim");
    FILE *f = fopen(path, "r");
    free(path);
    unsigned long long id = 0, expiry = 0;
    if (f == NULL)
        return 0;
    if (fscanf(f, "%llu %llu", &id, &expiry) != 2 || expiry <= now_ms())
        id = 0;
    fclose(f);
    return id;
}

static void claim_set(op_t *op)
{
    char *path = scope_file(op->sc, ".claim");
    FILE *f = fopen(path, "w");
    if (f) {
        fprintf(f, "%llu %llu\n", (unsigned long long)op->committer,
                (unsigned long long)(now_ms() + MPH_STORE_CLAIM_MS));
        fclose(f);
    }
    free(path);
}

static void claim_clear(op_t *op)
{
    char *path = scope_file(op->sc, ".claim");
    unlink(path);
    free(path);
}

static void do_commit(op_t *op)
{
    fscope_t *sc = op->sc;
    if (open_files(op) != 0 || lock_scope(op) != 0)
        return;
    /* Replaced log (another process compacted): start over from the files. */
    char *log = scope_file(sc, ".log");
    struct stat st;
    int replaced = stat(log, &st) == 0 && st.st_ino != sc->log_ino;
    free(log);
    if (replaced) {
        uint64_t before = sc->version;
        if (load_all(op) != 0)
            goto out;
        if (sc->version != before || before != op->expected) {
            op->status = MPH_ECONFLICT;
            goto out;
        }
        op->doc.n = 0;
    } else {
        op->doc.is_delta = 1;
        uint64_t last = sc->version;
        if (read_log_tail(op, &op->bufs[1], 0, &last) != 0)
            goto out;
        sc->version = last;
        op->doc.version = last;
    }
    uint64_t holder = claim_holder(op);
    op->held = holder != 0 && holder != op->committer;
    if (sc->version != op->expected || op->held) {
        if (!op->held && op->claim)
            claim_set(op);
        op->status = MPH_ECONFLICT;
        goto out;
    }
    /* Our version is current: append, sync, and only then report success. */
    mph_buf_t rec = MPH_BUF_INIT;
    build_record(&rec, op->expected + 1, op->writes, op->nwrites);
    if (write_all(sc->log_fd, rec.data, rec.len, sc->log_end) != 0 ||
        counted_sync(op->fs, sc->log_fd, 1) != 0) {
        op_fail(op, MPH_ESTORAGE, "cannot write log of", sc->name);
        /* Leave no partial record behind; if even that fails the CRC rejects it. */
        if (ftruncate(sc->log_fd, sc->log_end) == 0)
            counted_sync(op->fs, sc->log_fd, 1);
        mph_buf_free(&rec);
        goto out;
    }
    sc->log_end += (off_t)rec.len;
    sc->version = op->expected + 1;
    if (holder)
        claim_clear(op); /* ours: it has served its purpose */
    op->doc.version = sc->version;
    op->doc.n = 0;
    mph_buf_free(&rec);
    if (sc->log_end > (off_t)COMPACT_MIN_BYTES && sc->log_end > 2 * sc->snap_size)
        compact(op);
out:
    unlock_scope(op);
}

static void work_cb(uv_work_t *w)
{
    op_t *op = mph_container_of(w, op_t, work);
    if (op->kind == OP_LOAD)
        do_load(op);
    else
        do_commit(op);
}

/* ---- Loop side ---- */

static void store_free(file_store_t *fs)
{
    mph_log(fs->commits ? MPH_LOG_INFO : MPH_LOG_DEBUG, "file storage: %llu commits, %llu syncs",
            (unsigned long long)fs->commits, (unsigned long long)fs->syncs);
    fscope_t *sc = fs->scopes;
    while (sc) {
        fscope_t *next = sc->next;
        if (sc->lock_fd >= 0)
            close(sc->lock_fd);
        if (sc->log_fd >= 0)
            close(sc->log_fd);
        free(sc->name);
        free(sc->path);
        free(sc);
        sc = next;
    }
    void (*cb)(void *) = fs->closed_cb;
    void *ud = fs->closed_ud;
    free(fs->dir);
    free(fs);
    if (cb)
        cb(ud);
}

static void after_work_cb(uv_work_t *w, int status)
{
    op_t *op = mph_container_of(w, op_t, work);
    file_store_t *fs = op->fs;
    (void)status; /* work is never cancelled */
    op->sc->busy = 0;
    if (op->kind == OP_COMMIT && op->status == 0)
        fs->commits++;
    mph_store_result_t res = {op->status, op->message[0] ? op->message : NULL, op->doc,
                              op->sc->name, op->held};
    op->cb(op->ud, &res);
    free(op->doc.entries);
    mph_buf_free(&op->bufs[0]);
    mph_buf_free(&op->bufs[1]);
    free(op);
    if (--fs->ops == 0 && fs->closing)
        store_free(fs);
}

static fscope_t *scope_for(file_store_t *fs, const char *name)
{
    for (fscope_t *sc = fs->scopes; sc; sc = sc->next)
        if (strcmp(sc->name, name) == 0)
            return sc;
    fscope_t *sc = mph_xcalloc(1, sizeof(*sc));
    sc->name = mph_xstrdup(name);
    mph_buf_t p = MPH_BUF_INIT;
    mph_buf_printf(&p, "%s/", fs->dir);
    encode_name(&p, name);
    sc->path = mph_buf_steal(&p, NULL);
    sc->lock_fd = sc->log_fd = -1;
    sc->next = fs->scopes;
    fs->scopes = sc;
    return sc;
}

static int start_op(file_store_t *fs, op_kind_t kind, const char *scope, mph_store_cb cb, void *ud,
                    op_t **out)
{
    if (fs->closing)
        return MPH_ECLOSED;
    if (scope[0] == '\0' || strlen(scope) > MAX_SCOPE_NAME)
        return MPH_EINVAL;
    fscope_t *sc = scope_for(fs, scope);
    assert(!sc->busy);
    op_t *op = mph_xcalloc(1, sizeof(*op));
    op->fs = fs;
    op->sc = sc;
    op->kind = kind;
    op->cb = cb;
    op->ud = ud;
    *out = op;
    return 0;
}

static int submit(op_t *op)
{
    int rc = uv_queue_work(op->fs->loop, &op->work, work_cb, after_work_cb);
    if (rc != 0) {
        free(op);
        return MPH_EIO;
    }
    op->sc->busy = 1;
    op->fs->ops++;
    return 0;
}

static int file_load(mph_store_t *s, const char *scope, mph_store_cb cb, void *ud)
{
    op_t *op;
    int rc = start_op((file_store_t *)s, OP_LOAD, scope, cb, ud, &op);
    return rc ? rc : submit(op);
}

static int file_commit(mph_store_t *s, const mph_store_write_t *writes, size_t nwrites,
                       mph_store_cb cb, void *ud)
{
    if (nwrites != 1)
        return MPH_EINVAL; /* one scope per commit: a cross-file atomic commit needs a
                              shared log, which the file backend does not have yet */
    op_t *op;
    int rc = start_op((file_store_t *)s, OP_COMMIT, writes[0].scope, cb, ud, &op);
    if (rc)
        return rc;
    op->expected = writes[0].expected_version;
    op->committer = writes[0].committer;
    op->claim = writes[0].claim;
    op->writes = writes[0].entries;
    op->nwrites = writes[0].n;
    return submit(op);
}

static void file_close(mph_store_t *s, void (*done)(void *ud), void *ud)
{
    file_store_t *fs = (file_store_t *)s;
    fs->closing = 1;
    fs->closed_cb = done;
    fs->closed_ud = ud;
    if (fs->ops == 0)
        store_free(fs);
}

static const mph_store_methods_t file_methods = {
    MPH_STORE_METHODS_VERSION, "file", file_load, file_commit, file_close,
};

/* mkdir -p */
static int make_dirs(const char *dir)
{
    char *p = mph_xstrdup(dir);
    for (char *s = p + 1; *s; s++) {
        if (*s == '/') {
            *s = '\0';
            if (mkdir(p, 0755) != 0 && errno != EEXIST) {
                free(p);
                return -1;
            }
            *s = '/';
        }
    }
    int rc = mkdir(p, 0755) != 0 && errno != EEXIST ? -1 : 0;
    free(p);
    return rc;
}

int mph_store_file_open(mph_store_t **out, uv_loop_t *loop, const char *dir, char *err,
                        size_t errlen)
{
    struct stat st;
    if (make_dirs(dir) != 0 || stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "cannot use data directory %s: %s", dir,
                 errno ? strerror(errno) : "not a directory");
        return MPH_ESTORAGE;
    }
    file_store_t *fs = mph_xcalloc(1, sizeof(*fs));
    fs->base.methods = &file_methods;
    fs->loop = loop;
    char *abs = realpath(dir, NULL);
    fs->dir = abs ? abs : mph_xstrdup(dir);
    *out = &fs->base;
    return 0;
}
