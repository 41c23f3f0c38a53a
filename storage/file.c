/*
 * file.c: the embedded storage backend: one data directory, one log per scope.
 *
 * Files of scope S (its name percent-encoded to E, so no name can leave the directory):
 *   E.log   records appended by commits; one fdatasync per commit (a commit is a whole
 *           group of transactions, see lua/scopes.c)
 *   E.snap  a compacted image of the scope at some version V (optional)
 *   E.lock  the flock() that makes the compare-and-set atomic across processes; an OFD
 *           lock on its first byte (independent of flock on Linux) lets one process at a
 *           time compact the scope
 *   E.claim a fairness claim (storage.h): "ID EXPIRY_MS", read and written under the lock;
 *           advisory, so it is not synced (a claim lost in a crash costs nothing)
 *   E.snap.tmp, E.log.tmp  a compaction's files before their rename
 *   ~ID.intent  a commit of several scopes until its commit point (see that section)
 *
 * The directory and its files belong to one user (issue 19: another local user could plant
 * links, read every scope and freeze calls by holding a lock file's flock). At open the data
 * directory is created 0700 if missing (made durable in its parent), or refused if it is a
 * link, another uid's, or writable by group or others (see "The data directory"), and kept
 * open: every file is opened by its name relative to that descriptor with O_NOFOLLOW
 * (open_in), renamed and removed with renameat and unlinkat, looked at with fstatat; no
 * path through a link is ever followed. Files are created 0600 whatever the umask; an older
 * file with wider modes is narrowed when opened. So no other uid can open anything here,
 * a lock file least of all.
 *
 * A scope that was never written has no files, and reading it creates none: a load that
 * finds no lock, log or snapshot answers version 0 without touching the disk, and the first
 * commit that writes creates the lock, then (holding it) the log (open_files, create_log).
 * A process that read a scope as missing has read nothing of its log (log_ino 0), so its
 * commit reads the scope whole under the lock (catch_up): whatever another process wrote
 * meanwhile, snapshot included, comes back as the conflict's answer.
 *
 * A record (format 2) is: magic "MPR2", payload length, CRC-32 of the payload, CRC-32 of
 * these first 12 header bytes, then the payload: version (u64), entry count (u32), and per
 * entry key length (u32), key, value length (u32, 0xFFFFFFFF for a deletion), JSON text.
 * Integers are little-endian. Format 1 ("MPR1", written before 0.2) has no header CRC; it is
 * still read, so old data directories load, and new records are appended in format 2.
 *
 * Why a log and not a rewritten file per commit: commit cost must grow with what changed,
 * not with the size of the scope (a scope of 100,000 keys commits as fast as one of 1).
 *
 * Recovery (scan_log) must tell what a crash can leave from damage to acknowledged data. A
 * writer holds the lock from its write to its fdatasync, and takes a failed record back
 * before unlocking, so a crash or power loss can only leave bytes after the last
 * acknowledged record: a prefix of one record, possibly zero-filled. Damage anywhere else has
 * whole, valid records after it. So at the first position where no valid record starts, we
 * look for a valid record (frame and checksums) further on: none means a torn tail, cut off
 * under the lock; one means acknowledged data was damaged: the scope is refused (-32002,
 * naming file and offset) and the file is left as it is. The header CRC is what makes this
 * work: without it a flipped bit in a length field reads as a record running past the end
 * of the file, i.e. as a torn tail, and a cut there would drop every later commit. Nothing is
 * ever cut past a record that validates. A format-2 header that holds gives the record's
 * extent, so the search starts after that record: a valid record embedded in its payload
 * (a key can hold one) is not taken for proof of damage. Only when the header itself is torn
 * is the search byte by byte, and then such an embedded record makes the scope refused rather
 * than cut: the safe side.
 *
 * Commit under the lock: read whatever other processes appended since our last look (that
 * is the conflict delta, handed back so the retry needs no second read), and only if there
 * was nothing, append and sync. A failed write or fdatasync is taken back (truncate to the
 * old end, fsync): after a failed fsync the kernel may have dropped the dirty pages or kept
 * them while marking them clean (PostgreSQL's "fsyncgate"), so the record's fate on disk is
 * unknown, and no other reader may build on it. If the take-back fails too, nothing about
 * the file can be trusted any more: this process refuses the scope until it restarts.
 *
 * Keeping the lock after a conflict. Two processes committing back to back to one scope would
 * otherwise refuse each other forever: while the loser re-runs its calls on the conflict's
 * data, the winner's next batch (ready, run speculatively) takes the lock first, and the
 * loser's retry conflicts again (measured: 4.7 attempts per call, calls giving up with
 * -32001). So a commit of one scope that conflicts keeps the scope's lock: nobody can append
 * before our retry, which was computed on what we just read, so the retry lands. The next
 * commit of the scope uses the lock; anything else on the scope (a load, a commit of several
 * scopes, closing its files) gives it back first, and a lock not used within LOCK_KEEP_MS is
 * given back by a timer (the re-run raised, say, and nothing is committed). Under contention
 * each call runs at most twice and commits alternate between processes.
 *
 * Compaction runs as its own job, never inside a commit (see the Compaction section): the
 * snapshot is built and synced without the lock, while commits go on appending; only the
 * switch to a new log holds the lock, for the records that arrived meanwhile and two syncs.
 *
 * All blocking work runs on libuv's thread pool. One load or commit per scope at a time (the
 * runner guarantees it), so those need no mutex; a compaction job touches none of the scope's
 * fields and has its own descriptors; the loop thread hands its result over (adopt_compaction).
 *
 * Test hooks (MPH_TEST_FAULT, MPH_TEST_COMPACT_MIN): see the Test hooks section; inert, one
 * branch per step, unless the environment sets them.
 */
#define _GNU_SOURCE
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "common/list.h"
#include "common/map.h"
#include "storage.h"

#define MAGIC_V1 0x3152504dU /* "MPR1" read as little-endian */
#define MAGIC_V2 0x3252504dU /* "MPR2" */
#define HEADER_V1 12         /* magic, length, payload crc */
#define HEADER_V2 16         /* magic, length, payload crc, header crc */
#define DELETED_LEN 0xFFFFFFFFU
#define MULTI_FLAG 0x80000000U /* in a record's entry count: a part of a multi-scope commit */
#define MULTI_ID 16            /* bytes of a multi-scope commit's random id */
#define DOUBT 1                /* an operation met a part whose commit is in doubt (op->doubt) */
#define COMPACT_MIN_BYTES (4u << 20) /* never compact a log smaller than this */
#define MAX_SCOPE_NAME 512  /* bytes; mp.scope.named allows 200, user names 255, plus a prefix */
#define MAX_FILE_STEM 200   /* an encoded name longer than this is shortened (encode_name) */
#define MAX_OPEN_SCOPES 128 /* scopes whose two files stay open (loop side: note_open) */
#define LOCK_KEEP_MS 20     /* a lock kept after a conflict is given back after this */

typedef struct fscope_s {
    mph_map_node_t node;    /* in fs->scopes, keyed by name (first: common/list.h says why) */
    char *name;             /* owned */
    char *path;             /* owned: dir/E without the extension (for messages; files are
                               opened by their name under the directory's fd: see open_in) */
    int lock_fd;            /* -1 until an operation finds or creates the lock */
    int log_fd;             /* -1 until an operation finds the log or a commit creates it */
    int dir_synced;         /* the directory was fsynced since we found or created files */
    ino_t log_ino;          /* inode of the log we read from its start, 0: none yet (the next
                               operation reads the scope whole); a compaction replaces the file */
    off_t log_end;          /* bytes of the log read and applied by us */
    uint64_t version;       /* the version we last reported to the runner */
    uint64_t known_version; /* loop side: the version the counters vouch for ... */
    uint64_t known_counter; /* ... while the scope's commit counters both still read this */
    int known;              /* ... (0: nothing vouched for; see "Commit counters") */
    off_t snap_size;        /* size of the current snapshot file (compaction policy) */
    int busy;               /* a load or commit is in flight (invariant: at most one) */
    int compacting;         /* a compaction job is in flight (at most one) */
    off_t compact_after;    /* no compaction before the log passes this (backoff after a
                               failed one: a full disk would otherwise rewrite per commit) */
    uv_mutex_t mutex;       /* held by a load or commit, and by a compaction's switch */
    char *failed;           /* owned; set when the file's state is unknown: why we refuse it */
    int forgotten;          /* the runner evicted it while a compaction ran: freed after */
    int lock_kept;          /* the flock is still ours after a conflict, for the retry (written
                               by the job that kept it; read on the loop while not busy) */
    uint64_t kept_at;       /* uv_now when the loop saw it kept */
    mph_list_t open_node;   /* in fs->open while it keeps files open (note_open) */
} fscope_t;

typedef struct {
    mph_store_t base; /* must be first */
    uv_loop_t *loop;
    char *dir;          /* owned: the data directory's path, for messages */
    size_t dir_len;     /* strlen(dir) */
    int dfd;            /* the data directory, checked at open (open_data_dir): every file
                           is reached through it (open_in) */
    uint64_t *counters; /* the commit counters (.commits, mapped), or NULL */
    mph_map_t scopes;   /* fscope_t by name, owned */
    mph_list_t open;    /* scopes with open files (fscope_t.open_node), least recently used
                           first */
    unsigned nopen;     /* how many */
    unsigned ops;       /* operations and compactions in flight */
    int compactions;    /* compaction jobs in flight: at most one per store, so that they
                           hold at most one of libuv's four pool threads, never all */
    uint64_t commits;   /* commits written (loop thread) */
    uint64_t syncs;     /* fsync and fdatasync calls, from any thread (atomic) */
    off_t compact_min;  /* compact logs above this size (COMPACT_MIN_BYTES; a test may lower) */
    int closing;
    void (*closed_cb)(void *ud);
    void *closed_ud;
    uv_timer_t keep_timer; /* gives back locks kept after a conflict and left unused */
    fscope_t **kept;       /* scopes whose lock_kept the loop has seen, unordered */
    size_t nkept, kept_cap;
} file_store_t;

typedef enum { OP_LOAD, OP_COMMIT, OP_COMPACT } op_kind_t;

typedef struct group_s group_t;

typedef struct {
    uv_work_t work;
    file_store_t *fs;
    fscope_t *sc;
    op_kind_t kind;
    uint64_t expected;               /* commit: the CAS version */
    uint64_t committer;              /* commit: who asks (fairness claims) */
    int claim;                       /* commit: reserve the next commit on a conflict */
    int held;                        /* result: >0 refused for another committer's claim,
                                        which has this many milliseconds left */
    const mph_store_entry_t *writes; /* commit: borrowed from the caller until cb */
    size_t nwrites;
    mph_store_cb cb;
    void *ud;
    /* compaction: the log it starts from (the loop's view), and what it produced */
    ino_t old_ino;   /* the log inode compacted */
    off_t from;      /* bytes of that log the snapshot covers (records we had applied) */
    off_t upto;      /* bytes of that log copied into the new log, from `from` */
    int new_log_fd;  /* the new log (owned until adopted or closed), or -1 */
    ino_t new_ino;   /* its inode */
    off_t snap_size; /* the new snapshot's size */
    /* results, filled on the worker thread */
    int status;
    char message[400];
    mph_store_doc_t doc;
    size_t doc_cap;
    mph_buf_t bufs[2]; /* file contents the doc's entries point into */
    mph_buf_t doubt;   /* status DOUBT: a copy of the trailer of the part in doubt */
    group_t *group;    /* a scope of a multi-scope commit, or NULL */
    off_t part_start;  /* multi-scope commit: where our part starts (to take it back) */
    int mutexed;       /* multi-scope commit: we hold sc->mutex ... */
    int flocked;       /* ... and the scope lock */
    int absent;        /* a check (no writes) of a scope that has no files: version 0,
                          nothing to lock (a read creates nothing: see open_files) */
    uint64_t counter;  /* result: the scope's commit counters read this ... */
    int counted;       /* ... when the state reported was read (0: they vouch for nothing) */
} op_t;

/* A commit of several scopes: one work item for all of them, so that their locks are taken
 * together, in name order (every process takes them in that order: no deadlock). */
struct group_s {
    uv_work_t work;
    file_store_t *fs;
    size_t n;
    op_t **ops;        /* n, sorted by scope name; owned, and each op too */
    mph_buf_t trailer; /* what each part carries: id and parts (empty: one scope writes) */
    mph_store_cb cb;
    void *ud;
    int status; /* of the whole commit */
    char message[400];
};

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

static uint32_t crc(const unsigned char *p, size_t n)
{
    return (uint32_t)crc32(0L, p, (uInt)n);
}

/* 64-bit FNV-1a of name, from a given offset basis (two bases give two independent hashes). */
static uint64_t fnv1a64(const char *name, uint64_t basis)
{
    uint64_t h = basis;
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
        h ^= *p;
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* Percent-encodes a scope name into a file name: only [A-Za-z0-9_-] pass. An encoding
 * longer than MAX_FILE_STEM (a name of many escaped bytes: 200 bytes can encode to 600, past
 * NAME_MAX) is cut at a whole escape and ends with "~" and 128 bits of two hashes of the
 * whole name: still one file name per scope name, short enough for every extension. */
static void encode_name(mph_buf_t *out, const char *name)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t start = out->len;
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
        if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
            *p == '_' || *p == '-') {
            mph_buf_append(out, p, 1);
        } else {
            char esc[3] = {'%', hex[*p >> 4], hex[*p & 15]};
            mph_buf_append(out, esc, 3);
        }
    }
    if (out->len - start <= MAX_FILE_STEM)
        return;
    size_t keep = MAX_FILE_STEM - 33; /* room for "~" and 32 hex digits */
    while (keep > 0 &&
           (out->data[start + keep - 1] == '%' || (keep > 1 && out->data[start + keep - 2] == '%')))
        keep--; /* never cut an escape in two */
    out->len = start + keep;
    mph_buf_printf(out, "~%016llx%016llx", (unsigned long long)fnv1a64(name, 0xcbf29ce484222325ULL),
                   (unsigned long long)fnv1a64(name, 0x84222325cbf29ce4ULL));
}

/* ---- Test hooks ----
 *
 * MPH_TEST_FAULT=POINT:N:ACTION[,...] acts at the N-th pass (from 1; 0: every pass) through
 * a named step of this file (the names are the first argument of fault_at() calls):
 *   fail   the step fails with EIO (a write first writes half its bytes, as a full disk may)
 *   crash  the process kills itself with SIGKILL before the step, as kill -9 would: no exit
 *          handler runs (nor a leak check under valgrind or LeakSanitizer)
 *   hold   the step waits until the file named by MPH_TEST_GATE exists (a test's barrier)
 * Each action is logged ("test fault: ACTION at POINT"), so a test can wait for it and a
 * renamed step cannot pass a test silently. MPH_TEST_COMPACT_MIN=BYTES lowers the log size
 * at which compaction starts. Both are read once, at open; unset, fault_at is one branch.
 * SQLite's SimulateIOError and do_ioerr_test are the model; as its SQLITE_TEST, the hooks
 * exist in test builds only (MPH_TEST_HOOKS): elsewhere fault_at is a constant 0.
 */
#ifdef MPH_TEST_HOOKS

typedef enum { FAULT_FAIL, FAULT_CRASH, FAULT_HOLD } fault_action_t;

static struct {
    char point[40];
    unsigned nth; /* 0: every pass */
    fault_action_t action;
    unsigned passes; /* atomic: passes seen so far */
} faults[8];
static int nfaults = -1; /* -1: the environment is not read yet */
static const char *fault_gate;

static void faults_init(void)
{
    if (nfaults >= 0)
        return;
    nfaults = 0;
    const char *spec = getenv("MPH_TEST_FAULT");
    fault_gate = getenv("MPH_TEST_GATE");
    while (spec && *spec && nfaults < (int)(sizeof(faults) / sizeof(faults[0]))) {
        char point[40], action[8];
        unsigned nth;
        int used = 0;
        if (sscanf(spec, "%39[^:]:%u:%7[a-z]%n", point, &nth, action, &used) != 3)
            break;
        fault_action_t a = strcmp(action, "crash") == 0  ? FAULT_CRASH
                           : strcmp(action, "hold") == 0 ? FAULT_HOLD
                                                         : FAULT_FAIL;
        snprintf(faults[nfaults].point, sizeof(faults[0].point), "%s", point);
        faults[nfaults].nth = nth;
        faults[nfaults++].action = a;
        spec += used;
        spec += *spec == ',';
    }
}

/* Returns -1 with errno EIO when a test asked this step to fail, else 0 (after crashing or
 * holding if asked). */
static int fault_at(const char *point)
{
    unsigned pass = 0; /* counted by the first spec naming the point, shared by the others */
    for (int i = 0; i < nfaults; i++) {
        if (strcmp(faults[i].point, point) != 0)
            continue;
        if (pass == 0)
            pass = __atomic_add_fetch(&faults[i].passes, 1, __ATOMIC_RELAXED);
        if (faults[i].nth != 0 && pass != faults[i].nth)
            continue;
        switch (faults[i].action) {
        case FAULT_CRASH:
            mph_log(MPH_LOG_WARN, "test fault: crash at %s", point);
            kill(getpid(), SIGKILL);
            _exit(137); /* not reached */
        case FAULT_HOLD:
            mph_log(MPH_LOG_WARN, "test fault: hold at %s", point);
            while (fault_gate == NULL || access(fault_gate, F_OK) != 0) {
                struct timespec ts = {0, 5 * 1000 * 1000};
                nanosleep(&ts, NULL);
            }
            mph_log(MPH_LOG_WARN, "test fault: released at %s", point);
            break;
        case FAULT_FAIL:
            mph_log(MPH_LOG_WARN, "test fault: fail at %s", point);
            errno = EIO;
            return -1;
        }
    }
    return 0;
}

/* MPH_TEST_COMPACT_MIN: the log size at which compaction starts, if a test lowered it. */
static void compact_min_init(file_store_t *fs)
{
    const char *min = getenv("MPH_TEST_COMPACT_MIN");
    if (min && atol(min) > 0)
        fs->compact_min = (off_t)atol(min);
}
#else
static void faults_init(void)
{
}

static inline int fault_at(const char *point)
{
    (void)point;
    return 0;
}

static void compact_min_init(file_store_t *fs)
{
    (void)fs;
}
#endif

/* ---- Commit counters ----
 *
 * Every process of a data directory maps one small file, .commits: COUNTER_SLOTS pairs of
 * 64-bit counters, a pair per scope (its name hashed to a slot). append_record counts the
 * appends it starts (begun, before the write) and those it ends (ended, once the record is
 * durable or taken back). A reader notes the pair when it reads a scope's state, under the
 * scope's lock or before the unlocked look of unchanged_since_read, and only when no append
 * is in flight (begun == ended). While both still read that value, no append of the scope
 * has started since: the state it read is current, and a read (lua/scopes.c, "Fresh reads")
 * is answered with no I/O at all (file_current). Scopes sharing a slot only cost each other
 * a check. A process killed between the two counts leaves its slot uneven, and that slot's
 * scopes are then checked the slower way (correct) until the file is removed with every
 * process of the directory stopped. Nothing in it needs to survive a crash: it is never
 * synced. */

#define COUNTER_SLOTS 4096
#define COUNTERS_FILE ".commits" /* no scope's: encoded names hold no '.' (encode_name) */

static uint64_t *counter_pair(const file_store_t *fs, const char *name)
{
    if (fs->counters == NULL)
        return NULL;
    return fs->counters + 2 * (fnv1a64(name, 0xcbf29ce484222325ULL) % COUNTER_SLOTS);
}

/* Whether no append of the pair's scopes is in flight; *value gets the count. */
static int counters_even(const uint64_t *pair, uint64_t *value)
{
    uint64_t ended = __atomic_load_n(&pair[1], __ATOMIC_SEQ_CST);
    *value = __atomic_load_n(&pair[0], __ATOMIC_SEQ_CST);
    return *value == ended;
}

/* Notes, for the state op will report, what the scope's counters read: call it under the
 * scope's lock, or before an unlocked look at its files. */
static void counters_note(op_t *op)
{
    const uint64_t *pair = counter_pair(op->fs, op->sc->name);
    op->counted = pair != NULL && counters_even(pair, &op->counter);
}

static void counters_add(const file_store_t *fs, const fscope_t *sc, int which)
{
    uint64_t *pair = counter_pair(fs, sc->name);
    if (pair)
        __atomic_add_fetch(&pair[which], 1, __ATOMIC_SEQ_CST);
}

/* ---- I/O steps, each named for the test hooks ---- */

/* strerror, but saying what the errors open_in makes up mean. */
static const char *why_not(int err)
{
    switch (err) {
    case ELOOP:
        return "a symbolic link, refused (files in the data directory are never followed)";
    case EPERM:
        return "Operation not permitted (a file of another user is refused)";
    case EMEDIUMTYPE:
        return "not a regular file, refused";
    default:
        return strerror(err);
    }
}

static int op_fail(op_t *op, int status, const char *what, const char *path)
{
    op->status = status;
    if (path)
        snprintf(op->message, sizeof(op->message), "%s %s: %s", what, path, why_not(errno));
    else
        snprintf(op->message, sizeof(op->message), "%s", what);
    return status;
}

/* Every sync goes through here so that benchmarks can report syncs per request. Called on
 * worker threads, hence the atomic. */
static int sync_at(const char *point, file_store_t *fs, int fd, int data_only)
{
    if (fault_at(point) != 0)
        return -1;
    __atomic_fetch_add(&fs->syncs, 1, __ATOMIC_RELAXED);
    return data_only ? fdatasync(fd) : fsync(fd);
}

static int fsync_dir(const char *point, file_store_t *fs)
{
    return sync_at(point, fs, fs->dfd, 0);
}

/* The name inside the data directory of `path`, one of our paths (fs->dir, "/", a name). */
static const char *rel(const file_store_t *fs, const char *path)
{
    assert(strncmp(path, fs->dir, fs->dir_len) == 0 && path[fs->dir_len] == '/');
    return path + fs->dir_len + 1;
}

/* Opens the file at `path` (in the data directory) through the directory's fd, never through
 * a symbolic link: a planted link fails with ELOOP whatever it points to, and a link to the
 * directory cannot be followed either (the name is resolved from dfd, one component). A file
 * created is 0600 whatever the umask. An existing one must be a regular file of our uid
 * (else EPERM, or EMEDIUMTYPE for anything but a regular file); one that is open to group or
 * others (0644: older mphost made them so) is narrowed to 0600 here, so that once the directory
 * is 0700 nothing in it can be opened by another uid, lock files included (another uid that
 * held LOCK_EX on a lock stalled every call of its scope). Returns the fd, or -1 with errno. */
static int open_in(file_store_t *fs, const char *path, int flags)
{
    int fd = openat(fs->dfd, rel(fs, path), flags | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    struct stat st;
    if (fstat(fd, &st) != 0)
        goto fail;
    if (!S_ISREG(st.st_mode)) {
        errno = EMEDIUMTYPE; /* an errno nothing else here makes: why_not names it */
        goto fail;
    }
    if (st.st_uid != geteuid()) {
        errno = EPERM;
        goto fail;
    }
    /* 0600 exactly: a umask that takes bits away from the owner (0277) must not leave a
     * file we cannot open again for writing. */
    if ((st.st_mode & 0777) != 0600 && fchmod(fd, 0600) != 0)
        goto fail;
    return fd;
fail:;
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
}

/* Whether anything is named `path` in the data directory (a link is not followed): 1 (and
 * *st, when not NULL, says what), 0, or -1 with errno. */
static int exists_in(const file_store_t *fs, const char *path, struct stat *st)
{
    struct stat ignored;
    if (fstatat(fs->dfd, rel(fs, path), st ? st : &ignored, AT_SYMLINK_NOFOLLOW) == 0)
        return 1;
    return errno == ENOENT ? 0 : -1;
}

static void unlink_in(const file_store_t *fs, const char *path)
{
    unlinkat(fs->dfd, rel(fs, path), 0);
}

/* Creates a compaction's temporary file (E.snap.tmp, E.log.tmp). Its name is predictable,
 * but only our uid can add names to the checked directory, and one process at a time
 * compacts a scope (the guard); still, a leftover of a crashed compaction is removed first
 * and the file is created O_EXCL, so what we write is always a new inode of ours. */
static int create_tmp(file_store_t *fs, const char *path)
{
    unlink_in(fs, path);
    return open_in(fs, path, O_RDWR | O_CREAT | O_EXCL);
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
        if (r == 0)
            errno = EIO; /* the file shrank under us */
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

static int write_at(const char *point, int fd, const void *data, size_t n, off_t at)
{
    if (fault_at(point) != 0) {
        write_all(fd, data, n / 2, at); /* a failed write may still have written some */
        errno = EIO;
        return -1;
    }
    return write_all(fd, data, n, at);
}

static int truncate_at(const char *point, int fd, off_t len)
{
    return fault_at(point) != 0 ? -1 : ftruncate(fd, len);
}

static int rename_at(const char *point, file_store_t *fs, const char *from, const char *to)
{
    return fault_at(point) != 0 ? -1 : renameat(fs->dfd, rel(fs, from), fs->dfd, rel(fs, to));
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

/* Whether a format-2 header whose checksum holds starts at d[at]; sets *size to the length
 * of the record it announces (which may run past len). Such a length can be trusted: a
 * flipped bit would break the header's checksum. */
static int header_v2_valid(const unsigned char *d, size_t len, size_t at, size_t *size)
{
    if (len - at < HEADER_V2 || get_u32(d + at) != MAGIC_V2 ||
        crc(d + at, 12) != get_u32(d + at + 12))
        return 0;
    *size = HEADER_V2 + (size_t)get_u32(d + at + 4);
    return 1;
}

/* Whether a whole record whose frame and checksums hold starts at d[at]. Sets *size to its
 * length and *hdr to its header length. Reads nothing past d[len - 1]. */
static int frame_valid(const unsigned char *d, size_t len, size_t at, size_t *size, size_t *hdr)
{
    if (len - at < HEADER_V1)
        return 0;
    uint32_t magic = get_u32(d + at);
    size_t h;
    if (magic == MAGIC_V2) {
        if (len - at < HEADER_V2 || crc(d + at, 12) != get_u32(d + at + 12))
            return 0;
        h = HEADER_V2;
    } else if (magic == MAGIC_V1) {
        h = HEADER_V1;
    } else {
        return 0;
    }
    uint32_t plen = get_u32(d + at + 4);
    if (len - at - h < plen || crc(d + at + h, plen) != get_u32(d + at + 8))
        return 0;
    *size = h + plen;
    *hdr = h;
    return 1;
}

typedef enum {
    PARSE_OK,       /* a record; *pos advanced past it */
    PARSE_END,      /* *pos is the end of the data */
    PARSE_BAD,      /* no valid record starts at *pos: a torn tail or damage (see scan_log) */
    PARSE_MALFORMED /* its checksums hold but its contents do not add up: damage */
} parse_t;

/* A part's trailer: the commit's id, then its parts (a u32 count, then per part the scope
 * name's length (u32), the name, and the version the part wrote (u64)). */
typedef struct {
    const unsigned char *data; /* NULL: the record is not a part */
    size_t len;
} trailer_t;

/* Whether t[0..len) is a well-formed trailer of at least two parts. */
static int trailer_valid(const unsigned char *t, size_t len)
{
    if (len < MULTI_ID + 4)
        return 0;
    uint32_t parts = get_u32(t + MULTI_ID);
    size_t q = MULTI_ID + 4;
    for (uint32_t i = 0; i < parts; i++) {
        if (len - q < 4 || len - q - 4 < (size_t)get_u32(t + q) + 8)
            return 0;
        q += 4 + get_u32(t + q) + 8;
    }
    return parts >= 2 && q == len;
}

/* Parses the record at data[*pos]; on PARSE_OK advances *pos, sets *version, and (when
 * `into` is not NULL and the version is above `skip_upto`) adds its entries to the doc,
 * pointing into b; `trailer` (may be NULL) tells whether it is a part of a multi-scope
 * commit. */
static parse_t parse_record(const mph_buf_t *b, size_t *pos, uint64_t *version, op_t *into,
                            uint64_t skip_upto, trailer_t *trailer)
{
    const unsigned char *d = (const unsigned char *)b->data;
    size_t at = *pos, size, hdr;
    if (at == b->len)
        return PARSE_END;
    if (!frame_valid(d, b->len, at, &size, &hdr))
        return PARSE_BAD;
    const unsigned char *p = d + at + hdr;
    size_t plen = size - hdr;
    if (plen < 12)
        return PARSE_MALFORMED;
    uint64_t v = get_u64(p);
    uint32_t count = get_u32(p + 8);
    int multi = (count & MULTI_FLAG) != 0;
    count &= ~MULTI_FLAG;
    size_t q = 12;
    int keep = into && v > skip_upto;
    size_t first = keep ? into->doc.n : 0;
    for (uint32_t i = 0; i < count; i++) {
        if (plen - q < 4)
            goto malformed;
        uint32_t klen = get_u32(p + q);
        q += 4;
        if (plen - q < (size_t)klen + 4)
            goto malformed;
        const char *key = (const char *)p + q;
        q += klen;
        uint32_t jlen = get_u32(p + q);
        q += 4;
        const char *json = NULL;
        if (jlen != DELETED_LEN) {
            if (plen - q < jlen)
                goto malformed;
            json = (const char *)p + q;
            q += jlen;
        }
        if (keep)
            doc_add(into, key, klen, json, json ? jlen : 0);
    }
    if (multi) {
        if (!trailer_valid(p + q, plen - q))
            goto malformed;
        if (trailer)
            *trailer = (trailer_t){p + q, plen - q};
        q = plen;
    } else if (trailer) {
        *trailer = (trailer_t){NULL, 0};
    }
    if (q != plen)
        goto malformed;
    *version = v;
    *pos = at + size;
    return PARSE_OK;
malformed:
    if (keep)
        into->doc.n = first; /* none of a malformed record's entries count */
    return PARSE_MALFORMED;
}

/* Builds a record (format 2) of `n` entries at `version`, appended to out; with a trailer
 * (not NULL), a part of a multi-scope commit. */
static void build_record(mph_buf_t *out, uint64_t version, const mph_store_entry_t *e, size_t n,
                         const mph_buf_t *trailer)
{
    size_t start = out->len;
    unsigned char hdr[HEADER_V2 + 12] = {0};
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
    if (trailer)
        mph_buf_append(out, trailer->data, trailer->len);
    unsigned char *p = (unsigned char *)out->data + start;
    size_t plen = out->len - start - HEADER_V2;
    put_u32(p, MAGIC_V2);
    put_u32(p + 4, (uint32_t)plen);
    put_u64(p + HEADER_V2, version);
    put_u32(p + HEADER_V2 + 8, (uint32_t)n | (trailer ? MULTI_FLAG : 0));
    put_u32(p + 8, crc(p + HEADER_V2, plen));
    put_u32(p + 12, crc(p, 12));
}

typedef enum {
    SCAN_END,    /* every byte belongs to a valid record */
    SCAN_TORN,   /* from `end` on: what a crash leaves (no valid record follows): cut it */
    SCAN_CORRUPT /* at `end`: damage to acknowledged data: refuse, touch nothing */
} scan_verdict_t;

typedef struct {
    scan_verdict_t verdict;
    size_t end;        /* bytes of whole, valid, applied records from the start */
    size_t next_valid; /* CORRUPT after a bad frame: where the next valid record starts */
    uint64_t last;     /* version of the last record read, else the `last` passed in */
    trailer_t trailer; /* of the last record read, when it is a part of a multi-scope commit */
    char why[120];     /* CORRUPT: what is wrong at `end` (offsets are the caller's to add) */
} log_scan_t;

/* Reads the records of a log (or part of one: `last` is the version before it, 0 for the
 * start of a log) and says where they end and why. Records at or below `skip_upto` (the
 * snapshot's version) are checked but not applied; `into` (may be NULL) gets the entries of
 * the others. Versions must follow one another: each record is the previous one plus one,
 * and the first above the snapshot is the snapshot's plus one. Pure: no I/O. */
static void scan_log(const mph_buf_t *b, uint64_t last, uint64_t skip_upto, op_t *into,
                     log_scan_t *out)
{
    size_t pos = 0;
    memset(out, 0, sizeof(*out));
    out->last = last;
    for (;;) {
        uint64_t v = 0;
        size_t at = pos;
        trailer_t trailer;
        parse_t r = parse_record(b, &pos, &v, into, skip_upto, &trailer);
        out->end = at;
        if (r == PARSE_END) {
            out->verdict = SCAN_END;
            return;
        }
        if (r == PARSE_MALFORMED) {
            out->verdict = SCAN_CORRUPT;
            snprintf(out->why, sizeof(out->why), "a record with valid checksums is malformed");
            return;
        }
        if (r == PARSE_BAD) {
            /* A crash leaves nothing valid after it; damage to acknowledged data does. When
             * the header itself holds, the record's extent is known: one that runs past the
             * end is an incomplete write, and valid records can only follow its end (so a
             * record embedded in its payload, say in a key, is never mistaken for one). */
            const unsigned char *d = (const unsigned char *)b->data;
            size_t size, hdr, from = at + 1;
            if (header_v2_valid(d, b->len, at, &size)) {
                if (size > b->len - at) {
                    out->verdict = SCAN_TORN;
                    return;
                }
                from = at + size;
            }
            for (size_t y = from; y + HEADER_V1 <= b->len; y++) {
                if (frame_valid(d, b->len, y, &size, &hdr)) {
                    out->verdict = SCAN_CORRUPT;
                    out->next_valid = y;
                    snprintf(out->why, sizeof(out->why),
                             "a bad record, with a valid record after it");
                    return;
                }
            }
            out->verdict = SCAN_TORN;
            return;
        }
        uint64_t prev = out->last;
        if (v > skip_upto && prev < skip_upto)
            prev = skip_upto;
        if ((v > skip_upto || out->last != 0) && v != prev + 1) {
            out->verdict = SCAN_CORRUPT;
            snprintf(out->why, sizeof(out->why), "version %llu follows %llu", (unsigned long long)v,
                     (unsigned long long)prev);
            return;
        }
        out->last = v;
        out->trailer = trailer;
    }
}

/* ---- Worker side (thread pool) ---- */

static char *scope_file(const fscope_t *sc, const char *ext)
{
    char *p = mph_xmalloc(strlen(sc->path) + strlen(ext) + 1);
    strcpy(p, sc->path);
    strcat(p, ext);
    return p;
}

/* Whether the scope has a log or a snapshot (a lock alone holds no data). */
static int has_data(op_t *op)
{
    static const char *const exts[] = {".log", ".snap"};
    int found = 0;
    for (size_t i = 0; i < sizeof(exts) / sizeof(exts[0]) && found == 0; i++) {
        char *path = scope_file(op->sc, exts[i]);
        found = exists_in(op->fs, path, NULL);
        if (found < 0)
            op_fail(op, MPH_ESTORAGE, "cannot stat", path);
        free(path);
    }
    return found;
}

#define ABSENT 2 /* open_files: the scope has no files and none were asked for */

/* Opens the scope's lock file, creating it when `create` is set (a commit that writes) or
 * when the scope has data without a lock. A read of a scope that was never written creates
 * nothing: without `create`, a scope with no lock, log or snapshot is ABSENT, version 0.
 * That answer needs no lock: a commit creates the lock, then the log under it, and only
 * then appends, so a scope with a committed version always has both; one created after we
 * looked was committed after we looked. Returns 0, ABSENT, or an error status. */
static int open_files(op_t *op, int create)
{
    fscope_t *sc = op->sc;
    if (sc->lock_fd >= 0)
        return 0;
    char *lock = scope_file(sc, ".lock");
    int rc = 0;
    sc->lock_fd = open_in(op->fs, lock, O_RDWR);
    if (sc->lock_fd < 0 && errno == ENOENT) {
        int data = create ? 1 : has_data(op);
        if (data < 0)
            rc = op->status;
        else if (data == 0)
            rc = ABSENT;
        else
            sc->lock_fd = open_in(op->fs, lock, O_RDWR | O_CREAT);
    }
    if (rc == 0 && sc->lock_fd < 0)
        rc = op_fail(op, MPH_ESTORAGE, "cannot open", lock);
    free(lock);
    return rc;
}

/* Before anything read from or written to the scope's files is answered: their directory
 * entries are durable. A file we found may have been created by a process that died before
 * its own directory sync; until a sync succeeds, every operation tries again. */
static int dir_sync_once(op_t *op)
{
    if (op->sc->dir_synced)
        return 0;
    if (fsync_dir("open.dirsync", op->fs) != 0)
        return op_fail(op, MPH_ESTORAGE, "cannot sync directory", op->fs->dir);
    op->sc->dir_synced = 1;
    return 0;
}

/* A commit's first write to a scope without a log: creates it (under the scope lock, so
 * that no one else can be creating it) and syncs the directory, so that the log outlives a
 * power loss before the record in it is acknowledged. */
static int create_log(op_t *op)
{
    fscope_t *sc = op->sc;
    char *log = scope_file(sc, ".log");
    struct stat st;
    int rc = 0;
    sc->log_fd = open_in(op->fs, log, O_RDWR | O_CREAT);
    if (sc->log_fd < 0 || fstat(sc->log_fd, &st) != 0) {
        rc = op_fail(op, MPH_ESTORAGE, "cannot create", log);
    } else {
        sc->log_ino = st.st_ino;
        sc->log_end = 0;
        sc->dir_synced = 0;
        rc = dir_sync_once(op);
    }
    free(log);
    return rc;
}

static int lock_fd(int fd)
{
    while (flock(fd, LOCK_EX) != 0) {
        if (errno != EINTR)
            return -1;
    }
    return 0;
}

/* Takes the scope's lock, unless a conflict kept it for us. */
static int lock_scope(op_t *op)
{
    if (op->sc->lock_kept)
        return 0;
    return lock_fd(op->sc->lock_fd) != 0 ? op_fail(op, MPH_ESTORAGE, "cannot lock", op->sc->path)
                                         : 0;
}

static void unlock_scope(op_t *op)
{
    flock(op->sc->lock_fd, LOCK_UN);
    op->sc->lock_kept = 0;
}

/* ---- Commits of several scopes ----
 *
 * One record per scope cannot be written atomically across files, so a commit of several
 * scopes has a commit point of its own, after SQLite's super-journal: with every scope's
 * lock held (in name order), the writer creates an intent file named after the commit's
 * random id and syncs the directory, appends its part to each scope's log (a record whose
 * trailer names the id and every part) and syncs each, then removes the intent and syncs the
 * directory: that removal is the commit point, and only then is anyone answered.
 *
 * So a part is in doubt only while its intent exists, and then its writer is gone (it holds
 * the locks until after the removal): a reader that finds such a part at the end of a log
 * (only the last record can be: no one appends after a part without resolving it) resolves
 * it with recover_commit: under every part's scope lock, in name order, each part still at
 * the end of its log is cut, then the intent is removed. A part whose intent is gone is
 * committed: its writer removed the intent only after every part was durable. Never in
 * doubt: a part followed by another record, and the records in a snapshot. */

static char *intent_path(const file_store_t *fs, const unsigned char *id)
{
    mph_buf_t p = MPH_BUF_INIT;
    mph_buf_printf(&p, "%s/~", fs->dir);
    for (int i = 0; i < MULTI_ID; i++)
        mph_buf_printf(&p, "%02x", id[i]);
    mph_buf_puts(&p, ".intent");
    return mph_buf_steal(&p, NULL);
}

/* Whether the intent of the commit whose trailer is `trailer` still exists. An error other
 * than "no such file" counts as existing: in doubt is the safe side. */
static int intent_exists(const file_store_t *fs, const unsigned char *trailer)
{
    char *path = intent_path(fs, trailer);
    int exists = exists_in(fs, path, NULL) != 0;
    free(path);
    return exists;
}

/* Reads the log from sc->log_end to its end (the caller holds the lock). Complete records
 * go into the doc (when their version is above skip_upto); a torn tail is cut off; damage is
 * reported, naming file and offset, and nothing is touched. *last is the version before the
 * part read (0 from the start of the log); it is set to the last version seen. */
static int read_log_tail(op_t *op, mph_buf_t *buf, uint64_t skip_upto, uint64_t *last)
{
    fscope_t *sc = op->sc;
    char *path = scope_file(sc, ".log");
    struct stat st;
    int rc = 0;
    if (fstat(sc->log_fd, &st) != 0) {
        rc = op_fail(op, MPH_ESTORAGE, "cannot stat", path);
        goto out;
    }
    if (st.st_size < sc->log_end) {
        /* Nothing of ours ever cuts below a record some process has read. */
        snprintf(op->message, sizeof(op->message),
                 "corrupt log %s: %lld bytes long, but %lld bytes of records were read from it",
                 path, (long long)st.st_size, (long long)sc->log_end);
        rc = op->status = MPH_ECORRUPT;
        goto out;
    }
    if (st.st_size == sc->log_end)
        goto out;
    if (read_range(sc->log_fd, sc->log_end, st.st_size, buf) != 0) {
        rc = op_fail(op, MPH_ESTORAGE, "cannot read", path);
        goto out;
    }
    log_scan_t scan;
    scan_log(buf, *last, skip_upto, op, &scan);
    if (scan.verdict == SCAN_CORRUPT) {
        int n = snprintf(op->message, sizeof(op->message), "corrupt log %s at byte %lld: %s", path,
                         (long long)(sc->log_end + (off_t)scan.end), scan.why);
        if (scan.next_valid && n > 0 && (size_t)n < sizeof(op->message))
            snprintf(op->message + n, sizeof(op->message) - (size_t)n, " at byte %lld",
                     (long long)(sc->log_end + (off_t)scan.next_valid));
        rc = op->status = MPH_ECORRUPT;
        goto out;
    }
    if (scan.verdict == SCAN_TORN) {
        /* What a writer that died before its fdatasync returned leaves: never acknowledged. */
        off_t cut = sc->log_end + (off_t)scan.end;
        mph_log(MPH_LOG_WARN,
                "file: %s: cutting %lld bytes of a torn or zero-filled tail at byte %lld", path,
                (long long)(st.st_size - cut), (long long)cut);
        if (truncate_at("cut.truncate", sc->log_fd, cut) != 0 ||
            sync_at("cut.sync", op->fs, sc->log_fd, 0) != 0) {
            rc = op_fail(op, MPH_ESTORAGE, "cannot cut the torn tail of", path);
            goto out;
        }
        buf->len = scan.end;
    }
    if (scan.trailer.data && intent_exists(op->fs, scan.trailer.data)) {
        /* The last record is a part of a multi-scope commit whose writer died before its
         * commit point (it holds the lock until then): the caller resolves it and reads
         * again. Until then nothing of it is applied. */
        op->doubt.len = 0;
        mph_buf_append(&op->doubt, scan.trailer.data, scan.trailer.len);
        rc = op->status = DOUBT;
        goto out;
    }
    *last = scan.last;
    sc->log_end += (off_t)buf->len;
out:
    free(path);
    return rc;
}

/* Reads the snapshot at `path` (if any) into buf, its entries into op's doc; sets *version
 * (0 without a snapshot) and *size. */
static int read_snapshot(op_t *op, const char *path, mph_buf_t *buf, uint64_t *version, off_t *size)
{
    *version = 0;
    *size = 0;
    int fd = open_in(op->fs, path, O_RDONLY);
    if (fd < 0)
        return errno == ENOENT ? 0 : op_fail(op, MPH_ESTORAGE, "cannot open", path);
    struct stat st;
    int bad = fstat(fd, &st) != 0 || read_range(fd, 0, st.st_size, buf) != 0;
    close(fd);
    if (bad)
        return op_fail(op, MPH_ESTORAGE, "cannot read", path);
    size_t pos = 0;
    parse_t parsed = parse_record(buf, &pos, version, op, 0, NULL);
    if (parsed != PARSE_OK || pos != buf->len) {
        /* One record is the whole file: the damage is in it (at byte 0) or after it. */
        snprintf(op->message, sizeof(op->message), "corrupt snapshot %s at byte %zu: %s", path, pos,
                 parsed == PARSE_OK    ? "bytes after its record"
                 : parsed == PARSE_END ? "it is empty"
                 : parsed == PARSE_BAD ? "its record's checksum or length does not hold"
                                       : "its record's contents do not add up");
        return op->status = MPH_ECORRUPT;
    }
    *size = st.st_size;
    return 0;
}

/* Under the scope lock: points sc->log_fd at the file now named E.log (a compaction may
 * have replaced the one we had open), or closes it when there is none. Returns 0 or an error
 * status. */
static int find_log(op_t *op)
{
    fscope_t *sc = op->sc;
    char *log = scope_file(sc, ".log");
    struct stat st, cur;
    int rc = 0, found = exists_in(op->fs, log, &st);
    if (found < 0) {
        rc = op_fail(op, MPH_ESTORAGE, "cannot stat", log);
    } else if (found == 0) {
        if (sc->log_fd >= 0)
            close(sc->log_fd);
        sc->log_fd = -1;
    } else if (sc->log_fd < 0 || fstat(sc->log_fd, &cur) != 0 || cur.st_ino != st.st_ino) {
        int fd = open_in(op->fs, log, O_RDWR);
        if (fd < 0) {
            rc = op_fail(op, MPH_ESTORAGE, "cannot open", log);
        } else {
            if (sc->log_fd >= 0)
                close(sc->log_fd);
            sc->log_fd = fd;
        }
    }
    free(log);
    return rc;
}

/* Reads snapshot and whole log into the op's doc (is_delta = 0). Caller holds the lock. A
 * scope may have neither (a lock alone): version 0, empty. */
static int load_all(op_t *op)
{
    fscope_t *sc = op->sc;
    op->doc.n = 0;
    op->doc.is_delta = 0;
    op->bufs[0].len = op->bufs[1].len = 0;
    sc->log_ino = 0; /* set again once the log is read from its start */
    if (find_log(op) != 0)
        return op->status;
    uint64_t snap_version;
    char *snap = scope_file(sc, ".snap");
    int rc = read_snapshot(op, snap, &op->bufs[0], &snap_version, &sc->snap_size);
    free(snap);
    if (rc)
        return rc;
    sc->log_end = 0;
    uint64_t last = 0;
    struct stat st;
    if (sc->log_fd >= 0) {
        if (fstat(sc->log_fd, &st) != 0) {
            char *log = scope_file(sc, ".log");
            rc = op_fail(op, MPH_ESTORAGE, "cannot stat", log);
            free(log);
            return rc;
        }
        rc = read_log_tail(op, &op->bufs[1], snap_version, &last);
        if (rc)
            return rc;
        sc->log_ino = st.st_ino;
    }
    sc->version = last > snap_version ? last : snap_version;
    op->doc.version = sc->version;
    return 0;
}

/* The answer for a scope without files (open_files said ABSENT): empty at version 0, and a
 * check expecting version 0 holds. */
static void absent_scope(op_t *op)
{
    op->sc->version = 0;
    op->sc->log_ino = 0;
    op->doc.n = 0;
    op->doc.is_delta = 0;
    op->doc.version = 0;
    if (op->kind == OP_COMMIT && op->expected != 0)
        op->status = MPH_ECONFLICT; /* files we had read are gone: the runner starts over */
}

static void do_load(op_t *op)
{
    /* A test's way to hold one load. The outbox's scopes ("o:", "x:": lua/outbox.c reads them
     * in the background, every second) take no pass: the N-th load a test counts is one of
     * its calls'. */
    if (strncmp(op->sc->name, "o:", 2) != 0 && strncmp(op->sc->name, "x:", 2) != 0)
        fault_at("load.start");
    int rc = open_files(op, 0);
    if (rc == ABSENT) {
        absent_scope(op);
        return;
    }
    if (rc != 0 || lock_scope(op) != 0)
        return;
    counters_note(op);
    if (load_all(op) == 0 && op->sc->log_fd >= 0)
        dir_sync_once(op);
    unlock_scope(op);
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* The committer holding an unexpired claim on the scope, or 0; *left_ms: how long it has
 * left. Caller holds the lock. */
static uint64_t claim_holder(op_t *op, int *left_ms)
{
    char *path = scope_file(op->sc, ".claim");
    int fd = open_in(op->fs, path, O_RDONLY);
    free(path);
    unsigned long long id = 0, expiry = 0, now = now_ms();
    char text[64];
    *left_ms = 0;
    if (fd < 0)
        return 0; /* none, or one we refuse to read (a link): advisory either way */
    ssize_t n = pread(fd, text, sizeof(text) - 1, 0);
    close(fd);
    text[n > 0 ? n : 0] = '\0';
    if (sscanf(text, "%llu %llu", &id, &expiry) != 2 || expiry <= now)
        id = 0;
    else /* its claimant's next commit, usually within a millisecond, releases it: wait 1-2 */
        *left_ms = expiry - now > 2 ? 2 : (int)(expiry - now);
    return id;
}

static void claim_set(op_t *op)
{
    char *path = scope_file(op->sc, ".claim");
    int fd = open_in(op->fs, path, O_WRONLY | O_CREAT | O_TRUNC);
    if (fd >= 0) {
        char text[64];
        int n = snprintf(text, sizeof(text), "%llu %llu\n", (unsigned long long)op->committer,
                         (unsigned long long)(now_ms() + MPH_STORE_CLAIM_MS));
        write_all(fd, text, (size_t)n, 0);
        close(fd);
    }
    free(path);
}

static void claim_clear(op_t *op)
{
    char *path = scope_file(op->sc, ".claim");
    unlinkat(op->fs->dfd, rel(op->fs, path), 0);
    free(path);
}

/* Appends a record at the end of what we read and makes it durable. On failure the record
 * is taken back (truncate to the old end, fsync), so that no reader, ours or another
 * process's, builds on a record whose fate on disk is unknown; if that fails too, the scope
 * is refused from now on (sc->failed). Caller holds the lock. */
static int append_record(op_t *op, const mph_buf_t *rec)
{
    fscope_t *sc = op->sc;
    counters_add(op->fs, sc, 0); /* begun: see "Commit counters" */
    if (write_at("append.write", sc->log_fd, rec->data, rec->len, sc->log_end) == 0 &&
        sync_at("append.sync", op->fs, sc->log_fd, 1) == 0) {
        counters_add(op->fs, sc, 1);
        return 0;
    }
    char *path = scope_file(sc, ".log");
    op_fail(op, MPH_ESTORAGE, "cannot write", path);
    if (truncate_at("takeback.truncate", sc->log_fd, sc->log_end) != 0 ||
        sync_at("takeback.sync", op->fs, sc->log_fd, 0) != 0) {
        mph_buf_t why = MPH_BUF_INIT;
        mph_buf_printf(&why,
                       "%s; taking the record back failed too (%s), so what the disk holds "
                       "is unknown: this process refuses the scope until it restarts (check "
                       "the disk first)",
                       op->message, strerror(errno));
        sc->failed = mph_buf_steal(&why, NULL);
        snprintf(op->message, sizeof(op->message), "%s", sc->failed);
        mph_log(MPH_LOG_ERROR, "file: %s", sc->failed);
    }
    counters_add(op->fs, sc, 1); /* ended: taken back (or refused for good) */
    free(path);
    return op->status;
}

/* Brings the scope up to date under its lock: what other processes appended since our last
 * look goes into op's doc (a delta: the conflict's answer); a log replaced by a compaction is
 * read whole. Returns 0, DOUBT, or an error status (op->status). */
static int catch_up(op_t *op)
{
    fscope_t *sc = op->sc;
    char *log = scope_file(sc, ".log");
    struct stat st;
    int found = exists_in(op->fs, log, &st), rc = 0;
    if (found < 0) {
        rc = op_fail(op, MPH_ESTORAGE, "cannot stat", log);
    } else if (found == 0 && sc->log_ino != 0) {
        snprintf(op->message, sizeof(op->message),
                 "corrupt log %s: it is gone, but %lld bytes of records were read from it", log,
                 (long long)sc->log_end);
        rc = op->status = MPH_ECORRUPT;
    } else if (found && sc->log_ino == st.st_ino && sc->log_fd < 0) {
        /* Closed to save descriptors (note_open): the same file, as we hold the lock. */
        if ((sc->log_fd = open_in(op->fs, log, O_RDWR)) < 0)
            rc = op_fail(op, MPH_ESTORAGE, "cannot open", log);
    }
    free(log);
    if (rc != 0)
        return rc;
    if (sc->log_ino == 0 || st.st_ino != sc->log_ino) {
        /* Not read from its start yet (a first commit, say, perhaps racing another process's
         * first commit), or another process compacted: start over from the files. */
        uint64_t before = sc->version;
        if (load_all(op) != 0)
            return op->status;
        if (sc->version == before && before == op->expected) {
            /* Nothing changed: an empty delta. Not an empty whole document, which says the
             * scope is empty: a refusal for another's claim would carry it to the runner. */
            op->doc.n = 0;
            op->doc.is_delta = 1;
        }
        return 0;
    }
    op->doc.is_delta = 1;
    uint64_t last = sc->version;
    if (read_log_tail(op, &op->bufs[1], 0, &last) != 0)
        return op->status;
    sc->version = last;
    op->doc.version = last;
    return 0;
}

/* After catch_up: whether the commit may go ahead on this scope (its version is the
 * expected one and no other committer's claim holds it). If not, op->status is
 * MPH_ECONFLICT (and our own claim is set when asked for). Sets *holder. */
static int may_commit(op_t *op, uint64_t *holder)
{
    fscope_t *sc = op->sc;
    int left_ms;
    *holder = claim_holder(op, &left_ms);
    op->held = *holder != 0 && *holder != op->committer ? left_ms : 0;
    if (sc->version == op->expected && !op->held)
        return 1;
    if (op->held)
        mph_log(MPH_LOG_DEBUG, "file: %s: held off by the claim of committer %llu", sc->name,
                (unsigned long long)*holder);
    else if (op->claim && op->group)
        claim_set(op); /* a commit of one scope keeps the lock instead, which serves better */
    op->status = MPH_ECONFLICT;
    return 0;
}

/* The part (or record) of op is durable: the scope is at its new version. */
static void committed(op_t *op, size_t len, uint64_t holder)
{
    fscope_t *sc = op->sc;
    sc->log_end += (off_t)len;
    sc->version = op->expected + 1;
    if (holder)
        claim_clear(op); /* ours: it has served its purpose */
    op->doc.version = sc->version;
    op->doc.n = 0;
}

/* After may_commit: a scope the op writes has a log (its first commit creates it), and the
 * directory entries of what we read or write are durable. */
static int prepare_log(op_t *op)
{
    if (op->sc->log_fd < 0)
        return op->nwrites > 0 ? create_log(op) : 0;
    return dir_sync_once(op);
}

/* A read's check of one scope (lua/scopes.c, "Fresh reads"), without the lock: a commit's
 * record is in the log before the commit is acknowledged, so while the name still holds the
 * log we read (same inode) and it is no longer than what we read, no commit was acknowledged
 * since we last looked, and our version is current. Returns 1 when that settles it (op
 * succeeds), 0 for the locked way (something changed, or this is no plain check). Only a
 * commit of one scope: in a commit of several, the checks must hold with the writes. */
static int unchanged_since_read(op_t *op)
{
    fscope_t *sc = op->sc;
    if (op->nwrites != 0 || op->group != NULL || sc->log_ino == 0 || sc->version != op->expected)
        return 0;      /* (work_cb holds sc->mutex and has checked sc->failed) */
    counters_note(op); /* before the look: an append after it changes them */
    char *log = scope_file(sc, ".log");
    struct stat st;
    int found = exists_in(op->fs, log, &st);
    free(log);
    if (found != 1 || st.st_ino != sc->log_ino || st.st_size != sc->log_end)
        return 0;
    op->doc.version = sc->version;
    op->doc.n = 0;
    op->doc.is_delta = 1;
    return 1;
}

static void do_commit(op_t *op)
{
    if (unchanged_since_read(op))
        return;
    int rc = open_files(op, op->nwrites > 0);
    if (rc == ABSENT) {
        absent_scope(op); /* only checked, and never written */
        return;
    }
    if (rc != 0 || lock_scope(op) != 0)
        return;
    counters_note(op);
    uint64_t holder;
    if (catch_up(op) != 0 || !may_commit(op, &holder) || prepare_log(op) != 0)
        goto out;
    if (op->nwrites == 0) { /* only checked: the version holds */
        op->doc.n = 0;
        goto out;
    }
    /* Our version is current: append, sync, and only then report success. */
    mph_buf_t rec = MPH_BUF_INIT;
    build_record(&rec, op->expected + 1, op->writes, op->nwrites, NULL);
    if (append_record(op, &rec) == 0) {
        committed(op, rec.len, holder);
        counters_note(op); /* what they read after our own append */
    }
    mph_buf_free(&rec);
out:
    if (op->status == MPH_ECONFLICT && !op->held)
        op->sc->lock_kept = 1; /* for the retry: see "Keeping the lock after a conflict" */
    else
        unlock_scope(op);
}

/* Cuts the part of commit `id` from the log at `path` when it is the log's last record
 * (nothing valid after it). Returns 0 (cut, or not there), or -1 with errno (I/O) or 1 (the
 * log does not end cleanly: left to the next reader, and the commit stays in doubt). */
static int cut_part(file_store_t *fs, const char *path, const unsigned char *id)
{
    int fd = open_in(fs, path, O_RDWR);
    if (fd < 0)
        return errno == ENOENT ? 0 : -1;
    struct stat st;
    mph_buf_t b = MPH_BUF_INIT;
    int rc = -1;
    if (fstat(fd, &st) != 0 || read_range(fd, 0, st.st_size, &b) != 0)
        goto out;
    size_t pos = 0, last_at = 0;
    trailer_t last = {NULL, 0}, t;
    uint64_t v;
    parse_t r;
    while ((r = parse_record(&b, &pos, &v, NULL, 0, &t)) == PARSE_OK) {
        last = t;
        last_at = pos; /* the end of the last record; its start is found below */
    }
    rc = 1;
    if (r != PARSE_END)
        goto out;
    rc = 0;
    if (last.data == NULL || memcmp(last.data, id, MULTI_ID) != 0)
        goto out;
    /* The record ends at last_at and its trailer ends there too: find its start. */
    size_t start = 0;
    for (pos = 0; pos < last_at;) {
        start = pos;
        parse_record(&b, &pos, &v, NULL, 0, &t);
    }
    mph_log(MPH_LOG_WARN,
            "file: %s: cutting the part of an unfinished commit of several scopes at byte %zu",
            path, start);
    if (truncate_at("recover.truncate", fd, (off_t)start) != 0 ||
        sync_at("recover.sync", fs, fd, 0) != 0)
        rc = -1;
out:
    mph_buf_free(&b);
    close(fd);
    return rc;
}

static int compare_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The scope names of a trailer's parts, sorted (the lock order). New array of pointers
 * into `names` (a buffer of NUL-terminated copies). */
static char **trailer_names(const mph_buf_t *trailer, size_t *count, mph_buf_t *names)
{
    const unsigned char *t = (const unsigned char *)trailer->data;
    uint32_t parts = get_u32(t + MULTI_ID);
    size_t *offsets = mph_xmalloc(parts * sizeof(*offsets));
    size_t q = MULTI_ID + 4;
    for (uint32_t i = 0; i < parts; i++) {
        uint32_t len = get_u32(t + q);
        offsets[i] = names->len;
        mph_buf_append(names, t + q + 4, len);
        mph_buf_append(names, "", 1);
        q += 4 + len + 8;
    }
    char **out = mph_xmalloc(parts * sizeof(*out));
    for (uint32_t i = 0; i < parts; i++)
        out[i] = names->data + offsets[i];
    free(offsets);
    qsort(out, parts, sizeof(*out), compare_names);
    *count = parts;
    return out;
}

/* Resolves the commit whose part is in doubt (op->doubt, see the section's comment): takes
 * the lock of every scope it wrote, in name order, cuts each part still at the end of its
 * log, then removes the intent. Called with none of our locks held. Returns 0, or an error
 * status with op->message set. */
static int recover_commit(op_t *op)
{
    file_store_t *fs = op->fs;
    mph_buf_t names = MPH_BUF_INIT, path = MPH_BUF_INIT;
    size_t n;
    char **sorted = trailer_names(&op->doubt, &n, &names);
    int *locks = mph_xmalloc(n * sizeof(*locks));
    size_t locked = 0;
    int rc = 0, unresolved = 0;
    for (; locked < n; locked++) {
        path.len = 0;
        mph_buf_printf(&path, "%s/", fs->dir);
        encode_name(&path, sorted[locked]);
        mph_buf_puts(&path, ".lock");
        locks[locked] = open_in(fs, path.data, O_RDWR | O_CREAT); /* a part: it has data */
        if (locks[locked] < 0 || lock_fd(locks[locked]) != 0) {
            if (locks[locked] >= 0)
                close(locks[locked]);
            rc = op_fail(op, MPH_ESTORAGE, "cannot lock", path.data);
            break;
        }
    }
    const unsigned char *id = (const unsigned char *)op->doubt.data;
    if (rc == 0 && intent_exists(fs, id)) { /* else someone resolved it meanwhile */
        for (size_t i = 0; i < n && rc == 0; i++) {
            path.len = 0;
            mph_buf_printf(&path, "%s/", fs->dir);
            encode_name(&path, sorted[i]);
            mph_buf_puts(&path, ".log");
            int cut = cut_part(fs, path.data, id);
            if (cut < 0)
                rc = op_fail(op, MPH_ESTORAGE, "cannot cut an unfinished commit from", path.data);
            unresolved |= cut > 0;
        }
        char *intent = intent_path(fs, id);
        if (rc == 0 && !unresolved &&
            (unlinkat(fs->dfd, rel(fs, intent), 0) != 0 || fsync_dir("recover.dirsync", fs) != 0))
            rc = op_fail(op, MPH_ESTORAGE, "cannot remove", intent);
        if (rc == 0 && unresolved)
            rc = op_fail(op, MPH_ECORRUPT,
                         "an unfinished commit of several scopes cannot be cut (a log does not "
                         "end cleanly); its intent stays",
                         NULL);
        free(intent);
    }
    while (locked > 0)
        close(locks[--locked]); /* closing releases the flock */
    free(locks);
    free(sorted);
    mph_buf_free(&names);
    mph_buf_free(&path);
    return rc;
}

/* Forgets an operation's results before it runs again (after a recovery). A commit reads
 * its scope whole next time (as after a compaction elsewhere): a scope of a group may have
 * caught up already, and that delta is gone with the results; the whole document replaces
 * it. */
static void reset_op(op_t *op)
{
    if (op->kind == OP_COMMIT)
        op->sc->log_ino = 0;
    op->status = 0;
    op->message[0] = '\0';
    op->held = 0;
    op->absent = 0;
    op->doc.n = 0;
    op->doc.is_delta = 0;
    op->bufs[0].len = op->bufs[1].len = 0;
}

#define MAX_RECOVERIES 8 /* parts in doubt resolved for one operation before it gives up */

/* Takes the mutex, opens the files and takes the lock of one scope of a group. */
static int group_lock(op_t *op)
{
    uv_mutex_lock(&op->sc->mutex);
    op->mutexed = 1;
    if (op->sc->failed) {
        op->status = MPH_ESTORAGE;
        snprintf(op->message, sizeof(op->message), "%s", op->sc->failed);
        return op->status;
    }
    int rc = open_files(op, op->nwrites > 0);
    if (rc == ABSENT) { /* only checked, and never written: nothing to lock */
        op->absent = 1;
        return 0;
    }
    if (rc != 0 || lock_scope(op) != 0)
        return op->status;
    op->flocked = 1;
    return 0;
}

static void group_unlock(group_t *g)
{
    for (size_t i = g->n; i-- > 0;) {
        op_t *op = g->ops[i];
        if (op->flocked)
            unlock_scope(op);
        if (op->mutexed)
            uv_mutex_unlock(&op->sc->mutex);
        op->flocked = op->mutexed = 0;
    }
}

/* The group's first failure: its status, with the message of the op that had it. */
static int group_fail(group_t *g, const op_t *op)
{
    snprintf(g->message, sizeof(g->message), "%s", op->message);
    return g->status = op->status;
}

/* Writes the parts of a group whose every scope may commit (all locks held). */
static int group_write(group_t *g, const uint64_t *holders)
{
    file_store_t *fs = g->fs;
    for (size_t i = 0; i < g->n; i++)
        if (!g->ops[i]->absent && prepare_log(g->ops[i]) != 0)
            return group_fail(g, g->ops[i]);
    int multi = g->trailer.len > 0;
    char *intent = multi ? intent_path(fs, (const unsigned char *)g->trailer.data) : NULL;
    if (multi) {
        int fd = open_in(fs, intent, O_WRONLY | O_CREAT | O_EXCL);
        if (fd < 0 || close(fd) != 0 || fsync_dir("multi.intent", fs) != 0) {
            snprintf(g->message, sizeof(g->message), "cannot create %s: %s", intent,
                     why_not(errno));
            unlinkat(fs->dfd, rel(fs, intent), 0);
            free(intent);
            return g->status = MPH_ESTORAGE;
        }
    }
    mph_buf_t rec = MPH_BUF_INIT;
    size_t written = 0;
    int rc = 0;
    for (; written < g->n; written++) {
        op_t *op = g->ops[written];
        if (op->nwrites == 0)
            continue; /* only checked */
        rec.len = 0;
        build_record(&rec, op->expected + 1, op->writes, op->nwrites, multi ? &g->trailer : NULL);
        op->part_start = op->sc->log_end;
        if (append_record(op, &rec) != 0) {
            rc = group_fail(g, op);
            break;
        }
        op->sc->log_end += (off_t)rec.len; /* ours now; taken back below if the rest fails */
    }
    if (rc != 0) {
        /* Take back the parts already written; while one cannot be, the intent stays and
         * readers cut it (append_record marked the scope failed in this process). */
        int kept = 0;
        for (size_t i = 0; i < written; i++) {
            op_t *op = g->ops[i];
            if (op->nwrites == 0)
                continue;
            op->sc->log_end = op->part_start;
            if (truncate_at("takeback.truncate", op->sc->log_fd, op->part_start) != 0 ||
                sync_at("takeback.sync", fs, op->sc->log_fd, 0) != 0)
                kept = 1;
        }
        if (multi && !kept && unlinkat(fs->dfd, rel(fs, intent), 0) == 0)
            fsync_dir("multi.undo", fs);
    } else if (multi &&
               (fault_at("multi.decide") != 0 || unlinkat(fs->dfd, rel(fs, intent), 0) != 0 ||
                fsync_dir("multi.decide.sync", fs) != 0)) {
        /* Whether the removal reached the disk is unknown: so is the outcome. The runner
         * forgets these scopes and reads them again. */
        snprintf(g->message, sizeof(g->message),
                 "cannot remove %s (the outcome of the commit is unknown): %s", intent,
                 strerror(errno));
        rc = g->status = MPH_ESTORAGE;
    }
    if (rc == 0)
        for (size_t i = 0; i < g->n; i++) {
            op_t *op = g->ops[i];
            op->doc.n = 0;
            if (op->nwrites == 0)
                continue;
            committed(op, 0, holders[i]); /* its log_end already counts the part */
        }
    mph_buf_free(&rec);
    free(intent);
    return rc;
}

/* The commit of several scopes (see the section's comment), on the thread pool. */
static void do_group_commit(group_t *g)
{
    uint64_t *holders = mph_xcalloc(g->n, sizeof(*holders));
    for (int tries = 0;; tries++) {
        op_t *doubt = NULL;
        int rc = 0;
        for (size_t i = 0; i < g->n && rc == 0; i++)
            if ((rc = group_lock(g->ops[i])) != 0)
                group_fail(g, g->ops[i]);
        for (size_t i = 0; i < g->n && rc == 0; i++) {
            if (g->ops[i]->absent) {
                absent_scope(g->ops[i]);
                continue;
            }
            rc = catch_up(g->ops[i]);
            if (rc == DOUBT)
                doubt = g->ops[i];
            else if (rc != 0)
                group_fail(g, g->ops[i]);
        }
        int refused = 0;
        for (size_t i = 0; i < g->n && rc == 0; i++) {
            op_t *op = g->ops[i];
            refused |= op->absent ? op->status == MPH_ECONFLICT : !may_commit(op, &holders[i]);
        }
        if (rc == 0 && refused)
            g->status = MPH_ECONFLICT;
        else if (rc == 0)
            group_write(g, holders);
        group_unlock(g);
        if (doubt == NULL)
            break;
        if (tries == MAX_RECOVERIES || recover_commit(doubt) != 0) {
            if (doubt->status == DOUBT)
                snprintf(doubt->message, sizeof(doubt->message),
                         "a commit of several scopes stays in doubt");
            doubt->status = doubt->status == DOUBT ? MPH_ESTORAGE : doubt->status;
            group_fail(g, doubt);
            break;
        }
        for (size_t i = 0; i < g->n; i++)
            reset_op(g->ops[i]);
    }
    free(holders);
}

/* ---- Compaction ----
 *
 * When a commit leaves the log past the threshold, the loop starts a compaction job
 * (start_compaction); commits go on meanwhile. The job:
 *  1. takes the compaction guard, an OFD lock on E.lock's first byte (flock and OFD locks
 *     are independent on Linux), so one process at a time compacts; busy: it skips;
 *  2. without the scope lock, reads the snapshot and the first `from` bytes of the log: the
 *     records this process had applied when it started. Those bytes cannot change: the log
 *     only grows, and a cut or a take-back removes only bytes after every record anyone has
 *     read. It writes the image to E.snap.tmp, fsyncs, renames it over E.snap and fsyncs the
 *     directory. A crash anywhere in this step is harmless: the old log still holds every
 *     record, and records at or below a snapshot's version are skipped on load;
 *  3. under the scope lock (and the scope's mutex, so this process's own loads and commits
 *     wait), copies the records appended since `from` into E.log.tmp, fsyncs, renames it
 *     over E.log and fsyncs the directory. A crash before the rename leaves the old log,
 *     after it the new one; either is complete with the new snapshot. Other processes see
 *     the new inode and reload; this process adopts the new log in place.
 * A failure at any step leaves correct files (the log stays); the job tries again after a
 * later commit.
 */

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

/* Builds the snapshot record of a doc of changes in order: the latest value per key,
 * deletions dropped. Returns the number of live keys. */
static size_t build_image(mph_buf_t *out, uint64_t version, const mph_store_doc_t *doc)
{
    ranked_t *ranked = mph_xmalloc((doc->n + 1) * sizeof(*ranked));
    mph_store_entry_t *live = mph_xmalloc((doc->n + 1) * sizeof(*live));
    for (size_t i = 0; i < doc->n; i++)
        ranked[i] = (ranked_t){&doc->entries[i], i};
    qsort(ranked, doc->n, sizeof(*ranked), compare_ranked);
    size_t nlive = 0;
    for (size_t i = 0; i < doc->n; i++) {
        int last_of_key = i + 1 == doc->n || ranked[i + 1].e->klen != ranked[i].e->klen ||
                          memcmp(ranked[i + 1].e->key, ranked[i].e->key, ranked[i].e->klen) != 0;
        if (last_of_key && ranked[i].e->json)
            live[nlive++] = *ranked[i].e;
    }
    build_record(out, version, live, nlive, NULL);
    free(ranked);
    free(live);
    return nlive;
}

/* Step 3: copies the log's records after op->from into a new log and renames it into place,
 * then points this process's scope at it when the scope had read exactly a prefix of it.
 * The caller holds the scope's mutex and lock. `last` and `snap_version` continue the
 * version check of the part already read. Returns the failed step or NULL. */
static const char *switch_log(op_t *op, uint64_t last, uint64_t snap_version)
{
    fscope_t *sc = op->sc;
    char *log = scope_file(sc, ".log"), *log_tmp = scope_file(sc, ".log.tmp");
    const char *failed = NULL;
    mph_buf_t tail = MPH_BUF_INIT;
    struct stat st;
    int fd = open_in(op->fs, log, O_RDONLY);
    if (fd < 0 || fstat(fd, &st) != 0 || st.st_ino != op->old_ino || st.st_size < op->from ||
        read_range(fd, op->from, st.st_size, &tail) != 0) {
        failed = "reading the new records";
        goto out;
    }
    log_scan_t scan;
    scan_log(&tail, last, snap_version, NULL, &scan);
    if (scan.verdict == SCAN_CORRUPT) {
        errno = EINVAL;
        failed = "checking the new records (the log is damaged)";
        goto out;
    }
    /* A torn tail is left behind with the old log: it was never acknowledged. */
    op->new_log_fd = create_tmp(op->fs, log_tmp);
    if (op->new_log_fd < 0 ||
        write_at("compact.log.write", op->new_log_fd, tail.data, scan.end, 0) != 0 ||
        sync_at("compact.log.sync", op->fs, op->new_log_fd, 0) != 0) {
        failed = "writing the new log";
        unlink_in(op->fs, log_tmp);
        goto out;
    }
    if (rename_at("compact.log.rename", op->fs, log_tmp, log) != 0) {
        failed = "renaming the new log";
        unlink_in(op->fs, log_tmp);
        goto out;
    }
    struct stat nst;
    fstat(op->new_log_fd, &nst);
    op->upto = op->from + (off_t)scan.end;
    /* Renamed: the switch is made, even if the directory sync fails (both logs are
     * complete with the new snapshot, so either may survive a crash). */
    if (sc->log_fd >= 0 && sc->log_ino == op->old_ino && sc->log_end >= op->from &&
        sc->log_end <= op->upto) {
        close(sc->log_fd);
        sc->log_fd = op->new_log_fd;
        op->new_log_fd = -1;
        sc->log_ino = nst.st_ino;
        sc->log_end -= op->from;
        sc->snap_size = op->snap_size;
    }
    if (fsync_dir("compact.log.dirsync", op->fs) != 0)
        failed = "syncing the directory after the new log";
out:
    if (fd >= 0)
        close(fd);
    if (op->new_log_fd >= 0) {
        close(op->new_log_fd);
        op->new_log_fd = -1;
    }
    mph_buf_free(&tail);
    free(log);
    free(log_tmp);
    return failed;
}

/* Step 2 of a compaction, without the scope lock: the image of the records we had applied
 * (op->from bytes of the log) over the old snapshot, into rec. Returns NULL, or what failed
 * (errno set); *skip when another process compacted first (nothing failed). */
static const char *compact_image(op_t *op, mph_buf_t *rec, uint64_t *last, uint64_t *version,
                                 size_t *nlive, int *skip)
{
    fscope_t *sc = op->sc;
    char *log = scope_file(sc, ".log"), *snap = scope_file(sc, ".snap");
    const char *failed = NULL;
    struct stat st;
    uint64_t snap_version;
    off_t old_snap_size;
    log_scan_t scan;
    int fd = open_in(op->fs, log, O_RDONLY);
    if (fd < 0 || fstat(fd, &st) != 0) {
        failed = "opening the log";
    } else if (st.st_ino != op->old_ino) {
        mph_log(MPH_LOG_DEBUG, "file: %s: not compacting: another process did", sc->name);
        *skip = 1;
    } else if (read_range(fd, 0, op->from, &op->bufs[1]) != 0) {
        failed = "reading the log";
    } else if (read_snapshot(op, snap, &op->bufs[0], &snap_version, &old_snap_size) != 0) {
        failed = op->message;
    } else {
        scan_log(&op->bufs[1], 0, snap_version, op, &scan);
        if (scan.verdict != SCAN_END) {
            errno = EINVAL;
            failed = "reading the log (records we had read no longer check)";
        } else {
            *last = scan.last;
            *version = scan.last > snap_version ? scan.last : snap_version;
            *nlive = build_image(rec, *version, &op->doc);
        }
    }
    if (fd >= 0)
        close(fd);
    free(log);
    free(snap);
    return failed;
}

/* Step 2, continued: the image made durable as the new snapshot (written to a temporary
 * file, synced, renamed, the directory synced). Returns NULL, or what failed (errno set). */
static const char *compact_write(op_t *op, const mph_buf_t *rec)
{
    char *snap = scope_file(op->sc, ".snap"), *snap_tmp = scope_file(op->sc, ".snap.tmp");
    const char *failed = NULL;
    int fd = create_tmp(op->fs, snap_tmp);
    if (fd < 0 || write_at("compact.snap.write", fd, rec->data, rec->len, 0) != 0 ||
        sync_at("compact.snap.sync", op->fs, fd, 0) != 0) {
        failed = "writing the snapshot";
        unlink_in(op->fs, snap_tmp);
    } else if (rename_at("compact.snap.rename", op->fs, snap_tmp, snap) != 0) {
        failed = "renaming the snapshot";
        unlink_in(op->fs, snap_tmp);
    } else {
        op->snap_size = (off_t)rec->len;
        if (fsync_dir("compact.snap.dirsync", op->fs) != 0)
            failed = "syncing the directory after the snapshot";
    }
    if (fd >= 0)
        close(fd);
    free(snap);
    free(snap_tmp);
    return failed;
}

static void do_compact(op_t *op)
{
    fscope_t *sc = op->sc;
    char *lock = scope_file(sc, ".lock");
    const char *failed = NULL;
    mph_buf_t rec = MPH_BUF_INIT;
    size_t nlive = 0;
    uint64_t last = 0, version = 0;
    int skip = 0;

    /* 1. The guard. */
    int guard = open_in(op->fs, lock, O_RDWR);
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
    if (guard < 0 || fcntl(guard, F_OFD_SETLK, &fl) != 0) {
        mph_log(MPH_LOG_DEBUG, "file: %s: not compacting: another process does", sc->name);
        goto done;
    }
    /* 2. The snapshot, from the records we had applied, without the scope lock. */
    if ((failed = compact_image(op, &rec, &last, &version, &nlive, &skip)) != NULL || skip ||
        (failed = compact_write(op, &rec)) != NULL)
        goto done;
    /* 3. The switch, under the scope's mutex and lock. */
    uv_mutex_lock(&sc->mutex);
    if (sc->failed != NULL) { /* set under this mutex */
        errno = EIO;
        failed = "switching logs (the scope is refused)";
    } else if (lock_fd(guard) != 0) {
        failed = "locking the scope";
    } else {
        failed = switch_log(op, last, version);
        flock(guard, LOCK_UN);
    }
    uv_mutex_unlock(&sc->mutex);
    if (failed == NULL)
        mph_log(MPH_LOG_INFO,
                "file: compacted %s: %zu keys at version %llu, %lld bytes of log kept", sc->name,
                nlive, (unsigned long long)version, (long long)(op->upto - op->from));
    fault_at("compact.done");
done:
    if (failed) {
        mph_log(MPH_LOG_WARN, "file: compaction of %s failed %s (the log stays as it is): %s",
                sc->name, failed, strerror(errno));
        op->status = MPH_EIO; /* the loop backs off before the next try */
    }
    if (guard >= 0)
        close(guard); /* releases the guard */
    mph_buf_free(&rec);
    free(lock);
}

static void work_cb(uv_work_t *w)
{
    op_t *op = mph_container_of(w, op_t, work);
    fscope_t *sc = op->sc;
    if (op->kind == OP_COMPACT) {
        do_compact(op);
        return;
    }
    for (int tries = 0;; tries++) {
        uv_mutex_lock(&sc->mutex);
        if (sc->failed) {
            op->status = MPH_ESTORAGE;
            snprintf(op->message, sizeof(op->message), "%s", sc->failed);
        } else if (op->kind == OP_LOAD) {
            do_load(op);
        } else {
            do_commit(op);
        }
        uv_mutex_unlock(&sc->mutex);
        if (op->status != DOUBT)
            return;
        /* A part in doubt at the end of the log: resolve it, with our locks released (its
         * scopes' locks are taken in name order), then read again. */
        if (tries == MAX_RECOVERIES || recover_commit(op) != 0) {
            if (op->status == DOUBT) {
                op->status = MPH_ESTORAGE;
                snprintf(op->message, sizeof(op->message),
                         "a commit of several scopes stays in doubt");
            }
            return;
        }
        reset_op(op);
    }
}

static void group_work_cb(uv_work_t *w)
{
    do_group_commit(mph_container_of(w, group_t, work));
}

/* ---- Loop side ---- */

/* ---- Kept locks (see "Keeping the lock after a conflict") ---- */

static void kept_remove(file_store_t *fs, fscope_t *sc)
{
    for (size_t i = 0; i < fs->nkept; i++) {
        if (fs->kept[i] == sc) {
            fs->kept[i] = fs->kept[--fs->nkept];
            break;
        }
    }
    if (fs->nkept == 0)
        uv_timer_stop(&fs->keep_timer);
}

/* Gives back a lock kept for a retry that did not come (loop side; sc is not busy). */
static void give_back_lock(file_store_t *fs, fscope_t *sc)
{
    if (!sc->lock_kept)
        return;
    flock(sc->lock_fd, LOCK_UN);
    sc->lock_kept = 0;
    kept_remove(fs, sc);
}

static void on_keep_timer(uv_timer_t *t)
{
    file_store_t *fs = t->data;
    uint64_t now = uv_now(fs->loop);
    for (size_t i = fs->nkept; i-- > 0;) {
        fscope_t *sc = fs->kept[i];
        if (!sc->busy && now - sc->kept_at >= LOCK_KEEP_MS)
            give_back_lock(fs, sc);
    }
}

/* An operation of sc ended: note whether it left the lock kept. */
static void note_kept(file_store_t *fs, fscope_t *sc)
{
    int listed = 0;
    for (size_t i = 0; i < fs->nkept && !listed; i++)
        listed = fs->kept[i] == sc;
    if (!sc->lock_kept) {
        if (listed)
            kept_remove(fs, sc);
        return;
    }
    sc->kept_at = uv_now(fs->loop);
    if (listed)
        return;
    if (fs->nkept == fs->kept_cap) {
        fs->kept_cap = fs->kept_cap ? 2 * fs->kept_cap : 4;
        fs->kept = mph_xrealloc(fs->kept, fs->kept_cap * sizeof(*fs->kept));
    }
    fs->kept[fs->nkept++] = sc;
    if (fs->nkept == 1)
        uv_timer_start(&fs->keep_timer, on_keep_timer, LOCK_KEEP_MS, LOCK_KEEP_MS);
}

/* ---- Open files ----
 * A scope's lock and log stay open between operations (a hot scope opens nothing), but a
 * process that touches many scopes must not keep two descriptors for each: past
 * MAX_OPEN_SCOPES, the least recently used idle scopes close theirs (open_files opens them
 * again; what was read, log_end and log_ino, is kept). Loop side only: a scope with an
 * operation or a compaction in flight is never touched. */

static void open_unlink(file_store_t *fs, fscope_t *sc)
{
    if (!mph_list_is_linked(&sc->open_node))
        return;
    mph_list_remove(&sc->open_node);
    fs->nopen--;
}

static void close_files(file_store_t *fs, fscope_t *sc)
{
    give_back_lock(fs, sc); /* closing would, too; this keeps the list right */
    if (sc->lock_fd >= 0)
        close(sc->lock_fd);
    if (sc->log_fd >= 0)
        close(sc->log_fd);
    sc->lock_fd = sc->log_fd = -1;
}

/* An operation of sc ended: it is the most recently used; close the coldest idle ones. */
static void note_open(file_store_t *fs, fscope_t *sc)
{
    open_unlink(fs, sc);
    if (sc->lock_fd >= 0 || sc->log_fd >= 0) {
        mph_list_insert_tail(&fs->open, &sc->open_node);
        fs->nopen++;
    }
    mph_list_t *n, *next;
    mph_list_foreach_safe(n, next, &fs->open) {
        if (fs->nopen <= MAX_OPEN_SCOPES)
            break;
        fscope_t *c = mph_list_entry(n, fscope_t, open_node);
        if (!c->busy && !c->compacting) {
            close_files(fs, c);
            open_unlink(fs, c);
        }
    }
}

/* Closes a scope's files and frees it (not busy: no operation of it is in flight). */
static void free_scope(mph_map_node_t *n, void *ud)
{
    fscope_t *sc = mph_container_of(n, fscope_t, node);
    file_store_t *fs = ud;
    mph_map_remove(&fs->scopes, n);
    open_unlink(fs, sc);
    close_files(fs, sc);
    uv_mutex_destroy(&sc->mutex);
    free(sc->failed);
    free(sc->name);
    free(sc->path);
    free(sc);
}

static void store_free(file_store_t *fs)
{
    mph_log(fs->commits ? MPH_LOG_INFO : MPH_LOG_DEBUG, "file storage: %llu commits, %llu syncs",
            (unsigned long long)fs->commits, (unsigned long long)fs->syncs);
    mph_map_each(&fs->scopes, free_scope, fs); /* gives back kept locks: closing does */
    mph_map_free(&fs->scopes);
    free(fs->kept);
    void (*cb)(void *) = fs->closed_cb;
    void *ud = fs->closed_ud;
    if (fs->counters)
        munmap(fs->counters, COUNTER_SLOTS * 2 * sizeof(uint64_t));
    close(fs->dfd);
    free(fs->dir);
    free(fs);
    if (cb)
        cb(ud);
}

static void after_work_cb(uv_work_t *w, int status);

static void on_keep_timer_closed(uv_handle_t *h)
{
    store_free(h->data);
}

/* The last step of closing: the store frees itself once its timer has closed. */
static void close_timer(file_store_t *fs)
{
    uv_close((uv_handle_t *)&fs->keep_timer, on_keep_timer_closed);
}

/* Starts a compaction job of sc from the log as this process has read it. Called with no
 * load or commit of sc in flight, so its fields are ours to read. */
static void start_compaction(file_store_t *fs, fscope_t *sc)
{
    op_t *op = mph_xcalloc(1, sizeof(*op));
    op->fs = fs;
    op->sc = sc;
    op->kind = OP_COMPACT;
    op->old_ino = sc->log_ino;
    op->from = sc->log_end;
    op->new_log_fd = -1;
    if (uv_queue_work(fs->loop, &op->work, work_cb, after_work_cb) != 0) {
        free(op);
        return;
    }
    mph_log(MPH_LOG_DEBUG, "file: compacting %s (%lld bytes of log)", sc->name,
            (long long)sc->log_end);
    sc->compacting = 1;
    fs->compactions++;
    fs->ops++;
}

static void after_work_cb(uv_work_t *w, int status)
{
    op_t *op = mph_container_of(w, op_t, work);
    file_store_t *fs = op->fs;
    fscope_t *sc = op->sc;
    (void)status; /* work is never cancelled */
    if (op->kind == OP_COMPACT) {
        sc->compacting = 0;
        fs->compactions--;
        if (op->status != 0)
            sc->compact_after = sc->log_end + fs->compact_min;
        if (sc->forgotten && !sc->busy)
            free_scope(&sc->node, fs);
    } else {
        sc->busy = 0;
        note_kept(fs, sc);
        note_open(fs, sc);
        sc->known = op->counted && (op->status == 0 || op->status == MPH_ECONFLICT);
        sc->known_counter = op->counter;
        sc->known_version = op->doc.version;
        if (op->kind == OP_COMMIT && op->status == 0) {
            fs->commits++;
            /* Decided before the callback, which may start the next commit. */
            if (!sc->compacting && fs->compactions == 0 && !fs->closing && sc->failed == NULL &&
                sc->log_end > fs->compact_min && sc->log_end > sc->compact_after &&
                sc->log_end > 2 * sc->snap_size)
                start_compaction(fs, sc);
        }
        mph_store_conflict_t conflict = {sc->name, op->doc, op->held};
        mph_store_result_t res = {
            op->status, op->message[0] ? op->message : NULL, op->doc, sc->name, op->held, 0, NULL};
        if (op->status == MPH_ECONFLICT) {
            res.nconflicts = 1;
            res.conflicts = &conflict;
        }
        op->cb(op->ud, &res);
    }
    free(op->doc.entries);
    mph_buf_free(&op->bufs[0]);
    mph_buf_free(&op->bufs[1]);
    mph_buf_free(&op->doubt);
    free(op);
    if (--fs->ops == 0 && fs->closing)
        close_timer(fs);
}

static void group_free(group_t *g)
{
    for (size_t i = 0; i < g->n; i++) {
        op_t *op = g->ops[i];
        free(op->doc.entries);
        mph_buf_free(&op->bufs[0]);
        mph_buf_free(&op->bufs[1]);
        mph_buf_free(&op->doubt);
        free(op);
    }
    free(g->ops);
    mph_buf_free(&g->trailer);
    free(g);
}

static void after_group_cb(uv_work_t *w, int status)
{
    group_t *g = mph_container_of(w, group_t, work);
    file_store_t *fs = g->fs;
    (void)status; /* work is never cancelled */
    mph_store_conflict_t *conflicts = mph_xcalloc(g->n, sizeof(*conflicts));
    mph_store_result_t res = {
        g->status, g->message[0] ? g->message : NULL, {0, 0, 0, NULL}, NULL, 0, 0, conflicts};
    for (size_t i = 0; i < g->n; i++) {
        op_t *op = g->ops[i];
        op->sc->busy = 0;
        op->sc->known = 0;     /* (a commit of several scopes notes no counters) */
        note_kept(fs, op->sc); /* group_unlock gave back what was kept */
        note_open(fs, op->sc);
        if (g->status == MPH_ECONFLICT && (op->sc->version != op->expected || op->held))
            conflicts[res.nconflicts++] = (mph_store_conflict_t){op->sc->name, op->doc, op->held};
    }
    if (g->status == MPH_ECONFLICT) {
        res.scope = conflicts[0].scope;
        res.doc = conflicts[0].doc;
        res.held = conflicts[0].held;
    } else if (g->status == 0) {
        fs->commits++;
        res.doc.version = g->ops[0]->sc->version;
    }
    g->cb(g->ud, &res);
    free(conflicts);
    group_free(g);
    if (--fs->ops == 0 && fs->closing)
        close_timer(fs);
}

static fscope_t *scope_for(file_store_t *fs, const char *name)
{
    mph_map_node_t *n = mph_map_find(&fs->scopes, name);
    if (n) {
        fscope_t *sc = mph_container_of(n, fscope_t, node);
        sc->forgotten = 0;
        return sc;
    }
    fscope_t *sc = mph_xcalloc(1, sizeof(*sc));
    sc->name = mph_xstrdup(name);
    mph_buf_t p = MPH_BUF_INIT;
    mph_buf_printf(&p, "%s/", fs->dir);
    encode_name(&p, name);
    sc->path = mph_buf_steal(&p, NULL);
    sc->lock_fd = sc->log_fd = -1;
    if (uv_mutex_init(&sc->mutex) != 0)
        abort(); /* like an allocation failure: nothing sensible to do */
    mph_map_insert(&fs->scopes, &sc->node, sc->name);
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

static int compare_ops(const void *a, const void *b)
{
    return strcmp((*(op_t *const *)a)->sc->name, (*(op_t *const *)b)->sc->name);
}

/* The trailer every part of a commit of several scopes carries: a new random id and the
 * parts (scopes with writes). Empty when fewer than two scopes write: one record is atomic
 * by itself. */
static void build_trailer(group_t *g)
{
    uint32_t parts = 0;
    for (size_t i = 0; i < g->n; i++)
        parts += g->ops[i]->nwrites > 0;
    if (parts < 2)
        return;
    unsigned char id[MULTI_ID], u[8];
    if (getrandom(id, sizeof(id), 0) != (ssize_t)sizeof(id)) {
        /* Not expected on Linux >= 3.17; a clock and counter still make the id unique. */
        static uint64_t counter;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        put_u64(id, (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec);
        put_u64(id + 8, ((uint64_t)getpid() << 32) + ++counter);
    }
    mph_buf_append(&g->trailer, id, sizeof(id));
    put_u32(u, parts);
    mph_buf_append(&g->trailer, u, 4);
    for (size_t i = 0; i < g->n; i++) {
        const op_t *op = g->ops[i];
        if (op->nwrites == 0)
            continue;
        size_t len = strlen(op->sc->name);
        put_u32(u, (uint32_t)len);
        mph_buf_append(&g->trailer, u, 4);
        mph_buf_append(&g->trailer, op->sc->name, len);
        put_u64(u, op->expected + 1);
        mph_buf_append(&g->trailer, u, 8);
    }
}

/* A commit of several scopes: one job for all (see "Commits of several scopes"). */
static int commit_group(file_store_t *fs, const mph_store_write_t *writes, size_t nwrites,
                        mph_store_cb cb, void *ud)
{
    if (fs->closing)
        return MPH_ECLOSED;
    for (size_t i = 0; i < nwrites; i++)
        if (writes[i].scope[0] == '\0' || strlen(writes[i].scope) > MAX_SCOPE_NAME)
            return MPH_EINVAL;
    group_t *g = mph_xcalloc(1, sizeof(*g));
    g->fs = fs;
    g->n = nwrites;
    g->cb = cb;
    g->ud = ud;
    g->ops = mph_xcalloc(nwrites, sizeof(*g->ops));
    for (size_t i = 0; i < nwrites; i++) {
        op_t *op = g->ops[i] = mph_xcalloc(1, sizeof(*op));
        op->fs = fs;
        op->sc = scope_for(fs, writes[i].scope);
        assert(!op->sc->busy);
        op->kind = OP_COMMIT;
        op->group = g;
        op->expected = writes[i].expected_version;
        op->committer = writes[i].committer;
        op->claim = writes[i].claim;
        op->writes = writes[i].entries;
        op->nwrites = writes[i].n;
    }
    qsort(g->ops, nwrites, sizeof(*g->ops), compare_ops);
    /* Its locks are taken in name order, the rule that keeps processes out of deadlock: one
     * held since a conflict would break it. */
    for (size_t i = 0; i < nwrites; i++)
        give_back_lock(fs, g->ops[i]->sc);
    build_trailer(g);
    if (uv_queue_work(fs->loop, &g->work, group_work_cb, after_group_cb) != 0) {
        group_free(g);
        return MPH_EIO;
    }
    for (size_t i = 0; i < nwrites; i++)
        g->ops[i]->sc->busy = 1;
    fs->ops++;
    return 0;
}

static int file_commit(mph_store_t *s, const mph_store_write_t *writes, size_t nwrites,
                       mph_store_cb cb, void *ud)
{
    if (nwrites == 0)
        return MPH_EINVAL;
    if (nwrites > 1)
        return commit_group((file_store_t *)s, writes, nwrites, cb, ud);
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
        close_timer(fs);
}

/* Closes the files of a scope the runner evicted (one that failed stays, and keeps refusing:
 * see append_record); during a compaction, once it ends. */
static void file_forget(mph_store_t *s, const char *scope)
{
    file_store_t *fs = (file_store_t *)s;
    mph_map_node_t *n = mph_map_find(&fs->scopes, scope);
    if (n == NULL)
        return;
    fscope_t *sc = mph_container_of(n, fscope_t, node);
    assert(!sc->busy);
    if (sc->failed)
        return;
    if (sc->compacting)
        sc->forgotten = 1;
    else
        free_scope(n, fs);
}

/* Whether the state this process last read of scope, at `version`, is still current, known
 * from the commit counters alone (see "Commit counters"): on the loop, no I/O. */
static int file_current(mph_store_t *s, const char *scope, uint64_t version)
{
    file_store_t *fs = (file_store_t *)s;
    mph_map_node_t *n = mph_map_find(&fs->scopes, scope);
    if (n == NULL)
        return 0;
    const fscope_t *sc = mph_container_of(n, fscope_t, node);
    uint64_t value;
    const uint64_t *pair = counter_pair(fs, scope);
    return sc->known && !sc->busy && sc->known_version == version && pair != NULL &&
           counters_even(pair, &value) && value == sc->known_counter;
}

static const mph_store_methods_t file_methods = {
    MPH_STORE_METHODS_VERSION,
    "file",
    file_load,
    file_commit,
    file_close,
    file_forget,
    NULL,
    file_current,
};

/* ---- The data directory ----
 *
 * Everything the store does goes through one descriptor of the data directory, opened and
 * checked here, at start: a file is opened by its name relative to it (open_in), so a
 * rename of the directory or a link planted in a path cannot redirect a write once we run.
 * What we refuse, and why (each refusal is one line naming the directory; the program exits
 * 1):
 *  - a symbolic link: whoever can change the link decides where root writes;
 *  - a directory of another uid than our effective uid: its owner can read every scope,
 *    swap files under us and plant links;
 *  - a directory writable by group or others: anyone in them can do the same.
 * A directory that passes but is readable by others (0755: an older mphost made it so) is
 * narrowed to 0700: file names list the users, and no other uid may open a file in it,
 * whatever the file's mode. Directories we create are 0700 whatever the umask. */

/* mkdir -p, one component at a time from "/" or ".": each directory created is 0700
 * whatever the umask (fchmod after mkdirat) and is made durable in its parent (fsync of it,
 * then of the parent): without that, a power loss soon after the first acknowledged write
 * could take the new directory away, and every write in it (issue 19). The last component
 * is opened O_NOFOLLOW. Returns an fd of the directory, or -1 with a message in err. */
static int open_data_dir(const char *dir, char *err, size_t errlen)
{
    char *copy = mph_xstrdup(dir), *save = NULL;
    char **parts = mph_xmalloc((strlen(dir) / 2 + 1) * sizeof(*parts));
    size_t n = 0;
    for (char *c = strtok_r(copy, "/", &save); c; c = strtok_r(NULL, "/", &save))
        if (strcmp(c, ".") != 0)
            parts[n++] = c;
    int fd = -1;
    errno = ENOENT; /* an empty name */
    if (dir[0] == '\0' ||
        (fd = open(dir[0] == '/' ? "/" : ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0)
        goto fail;
    for (size_t i = 0; i < n; i++) {
        int last = i + 1 == n;
        int created = mkdirat(fd, parts[i], 0700) == 0;
        if (!created && errno != EEXIST)
            goto fail;
        struct stat st;
        if (last && !created && fstatat(fd, parts[i], &st, AT_SYMLINK_NOFOLLOW) == 0 &&
            S_ISLNK(st.st_mode)) {
            errno = ELOOP;
            goto fail;
        }
        int sub = openat(fd, parts[i],
                         O_RDONLY | O_DIRECTORY | O_CLOEXEC | (created || last ? O_NOFOLLOW : 0));
        if (sub < 0)
            goto fail;
        int durable = !created || (fchmod(sub, 0700) == 0 && fsync(sub) == 0 && fsync(fd) == 0);
        int saved = errno;
        close(fd);
        fd = sub;
        if (!durable) {
            errno = saved;
            goto fail;
        }
    }
    free(parts);
    free(copy);
    return fd;
fail:
    if (errno == ELOOP)
        snprintf(err, errlen,
                 "the data directory %s is a symbolic link; refusing to use it (whoever can "
                 "change the link would choose where this process writes)",
                 dir);
    else
        snprintf(err, errlen, "cannot use data directory %s: %s", dir, strerror(errno));
    if (fd >= 0)
        close(fd);
    free(parts);
    free(copy);
    return -1;
}

/* The checks on the opened data directory (see the section's comment): 0, or -1 with a
 * message in err. */
static int check_data_dir(int fd, const char *dir, char *err, size_t errlen)
{
    struct stat st;
    if (fstat(fd, &st) != 0) {
        snprintf(err, errlen, "cannot use data directory %s: %s", dir, strerror(errno));
        return -1;
    }
    if (st.st_uid != geteuid()) {
        snprintf(err, errlen,
                 "the data directory %s belongs to uid %u, not to uid %u (this process); "
                 "refusing to use it (its owner could read or replace every scope)",
                 dir, (unsigned)st.st_uid, (unsigned)geteuid());
        return -1;
    }
    if (st.st_mode & (S_IWGRP | S_IWOTH)) {
        snprintf(err, errlen,
                 "the data directory %s is writable by group or others (mode %03o); refusing "
                 "to use it (chmod 700 it)",
                 dir, (unsigned)(st.st_mode & 0777));
        return -1;
    }
    if (st.st_mode & 077) {
        if (fchmod(fd, st.st_mode & 07700) != 0) {
            snprintf(err, errlen, "cannot narrow the data directory %s to mode 700: %s", dir,
                     strerror(errno));
            return -1;
        }
        mph_log(MPH_LOG_WARN,
                "file: the data directory %s was mode %03o, open to other users; it is 700 now",
                dir, (unsigned)(st.st_mode & 0777));
    }
    return 0;
}

/* Maps .commits (made if missing, as every file here: 0600, never through a link). Without
 * it every read is checked the slower way, which is correct: a warning says so. */
static void counters_map(file_store_t *fs)
{
    size_t size = COUNTER_SLOTS * 2 * sizeof(uint64_t);
    char *path = mph_xmalloc(fs->dir_len + sizeof(COUNTERS_FILE) + 2);
    sprintf(path, "%s/%s", fs->dir, COUNTERS_FILE);
    struct stat st;
    int fd = open_in(fs, path, O_RDWR | O_CREAT);
    void *p = MAP_FAILED;
    if (fd >= 0 && fstat(fd, &st) == 0 && (st.st_size >= (off_t)size || ftruncate(fd, size) == 0))
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        mph_log(MPH_LOG_WARN, "file: %s: %s; every read checks the log", path, strerror(errno));
    else
        fs->counters = p;
    if (fd >= 0)
        close(fd);
    free(path);
}

int mph_store_file_open(mph_store_t **out, uv_loop_t *loop, const char *dir, char *err,
                        size_t errlen)
{
    int dfd = open_data_dir(dir, err, errlen);
    if (dfd < 0)
        return MPH_ESTORAGE;
    if (check_data_dir(dfd, dir, err, errlen) != 0) {
        close(dfd);
        return MPH_ESTORAGE;
    }
    file_store_t *fs = mph_xcalloc(1, sizeof(*fs));
    fs->base.methods = &file_methods;
    fs->loop = loop;
    mph_list_init(&fs->open);
    fs->dfd = dfd;
    char *abs = realpath(dir, NULL);
    fs->dir = abs ? abs : mph_xstrdup(dir);
    fs->dir_len = strlen(fs->dir);
    fs->compact_min = COMPACT_MIN_BYTES;
    uv_timer_init(loop, &fs->keep_timer);
    uv_unref((uv_handle_t *)&fs->keep_timer); /* a kept lock is no reason to keep running */
    fs->keep_timer.data = fs;
    faults_init();
    compact_min_init(fs);
    counters_map(fs);
    *out = &fs->base;
    return 0;
}

/* The file backend's scheme (storage.h: mph_store_open): "file", in the options' data_dir. */
static int open_url(mph_store_t **out, uv_loop_t *loop, const char *url,
                    const mph_store_options_t *opts, char *err, size_t errlen)
{
    (void)url;
    return mph_store_file_open(out, loop, opts->data_dir, err, errlen);
}

const mph_store_backend_t mph_store_file_backend = {"file", open_url};
