/*
 * hosts.c: the calls mp.shard and mp.scatter send between the hosts of a deployment
 * (hosts.h says what it promises; forward.c, "Where a shard runs", where they go).
 *
 * On the wire. A call to another host is an HTTP POST to that host's base URL (--peers),
 * on its public port, with the header MPH_RPC_PEER_HEADER ("X-Mphost-Peer: 1") and this body:
 *
 *   SIG " mphost-peer/1 " ROLE " " FROM " " TO " " WORKER " " TS " " NONCE "\n" CALL
 *
 * CALL is the JSON-RPC request the workers of one host forward to each other (forward.c:
 * method, params, the verified user as MPH_LUA_FORWARD_USER, a keyed call's key as
 * MPH_LUA_FORWARD_KEY); ROLE is "shard" or "leaf";
 * FROM and TO are host numbers, WORKER the worker of TO the call is for; TS the sender's
 * wall clock in milliseconds; NONCE 32 hex digits never used twice by the sender (a random
 * prefix per process and a counter). SIG is HMAC-SHA256, in 64 lowercase hex digits, over
 * every byte after SIG and its space, keyed with the secret of --peer-secret-file. So the
 * signature covers the method, the params, the user, the role, the addressee and the time:
 * nothing of a signed call can be changed, and a request without a valid signature runs
 * nothing. The answer is the worker's JSON-RPC response, HTTP 200; a refused call is HTTP 403
 * with error -32004 and the reason, which the sender reports as -32005 "host K unavailable:
 * it refused the call: ...". Both ends log refusals (at most one line per 10 s).
 *
 * Replay. A signed call is taken once: TS must be within WINDOW_MS of the receiver's clock
 * either way, and the worker that runs it (the one WORKER names, so every copy of a call
 * reaches the same one) remembers the nonces it took for that long, at most SEEN_MAX of them.
 * A call is refused when its nonce is remembered, or when TS is not after `floor`: the time
 * this worker started, raised to the TS of every nonce it forgets (the oldest first, when the
 * window has passed them or the cache is full). So whatever is forgotten can no longer be
 * taken, and a restarted worker, which remembers nothing, takes no call signed before it
 * started (it may refuse a call signed by a host whose clock is behind by more than the time
 * since the restart: keep clocks in sync, as NTP does). The cost of that safety is that a
 * call can reach its worker at most WINDOW_MS after it was signed, and under more than
 * SEEN_MAX calls per WINDOW_MS per worker, less (the time since the oldest nonce kept).
 *
 * This also makes a resent request harmless: libcurl sends a request again on a new
 * connection when a kept-alive one turns out to be closed before any answer byte came (which
 * cannot be told from a host that took the call and died): the copy carries the same nonce,
 * and if the first ran, the copy is refused.
 *
 * Time bounds (host.c sets them): a connection not made within CONNECT_TIMEOUT_MS, or an
 * answer not complete within the call's timeout (the handler time limit plus slack, as
 * between workers), fails with -32005 "host K unavailable: ...". A host that is down refuses
 * the connection at once; one whose machine is gone costs the connect timeout.
 *
 * A sent call: WAITING for its exchange (in the fetcher), or FAILED (in hs->failed, answered
 * on the next turn of the loop by the idle handle when the exchange could not even start),
 * then answered exactly once and freed.
 */
#define _GNU_SOURCE
#include "hosts.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/common.h"
#include "common/json.h"
#include "common/list.h"
#include "common/map.h"
#include "fetch.h"

#define PROTOCOL "mphost-peer/1"
#define SIG_HEX 64               /* HMAC-SHA256 in hex */
#define NONCE_HEX 32             /* a nonce's hex digits */
#define WINDOW_MS 30000          /* a signed call is taken this long at most, either way */
#define SEEN_MAX 32768           /* nonces a worker remembers */
#define CONNECT_TIMEOUT_MS 2000  /* to another host */
#define DNS_CACHE_S 5            /* a restarted pod may have a new address */
#define MAX_ANSWER (256UL << 20) /* bytes of a worker's answer */
#define SECRET_MAX 4096          /* bytes of the secret file */
#define SECRET_SHORT 16          /* fewer bytes are weak: warned about */
#define URL_MAX 2048             /* a --peers URL */
#define LINE_MAX_LEN 160         /* the signed line, without CALL */

/* A nonce the worker took (the replay cache). */
typedef struct {
    mph_list_t order;    /* in hs->seen_order, oldest first (first: it holds the struct) */
    mph_map_node_t node; /* in hs->seen, keyed by nonce */
    uint64_t ts;         /* the call's TS */
    char nonce[NONCE_HEX + 1];
} seen_t;

/* A call sent to another host, until answered. */
typedef struct {
    mph_list_t node;     /* in hs->failed while it waits to be answered a failure */
    mph_hosts_t *hs;     /* owner */
    int host;            /* where it went */
    mph_lua_reply_cb cb; /* runs once */
    void *ud;            /* for cb */
    char why[400];       /* FAILED: why */
} hcall_t;

/* A received call handed on to another worker of this host. */
typedef struct {
    mph_hosts_t *hs;
    mph_http_req_t *req; /* answered with the worker's reply */
    int worker;          /* the worker it went to */
} relay_t;

struct mph_hosts_s {
    uv_loop_t *loop;          /* borrowed */
    int id;                   /* this host, 1..count */
    int count;                /* hosts in --peers */
    char **urls;              /* [count] base URLs (owned) */
    unsigned char *key;       /* the shared secret (owned; wiped when freed) */
    size_t keylen;            /* its bytes */
    int worker_id;            /* this worker */
    int worker_count;         /* the workers of this host */
    unsigned timeout_ms;      /* a call to another host fails past this */
    unsigned idle_ms;         /* connections to other hosts older than this are not reused */
    mph_rpc_t *rpc;           /* runs received calls (borrowed; set by attach) */
    mph_peer_t *peer;         /* hands them to other workers (borrowed), or NULL */
    mph_fetch_t *fetch;       /* sends calls (owned); NULL before attach and once closed */
    uv_idle_t later;          /* answers hs->failed on the next turn (attached only) */
    mph_list_t failed;        /* calls that could not start (hcall_t.node) */
    int attached;             /* the fetcher and the idle handle exist */
    int closing;              /* mph_hosts_close was called */
    unsigned open;            /* the idle handle and the fetcher, until closed */
    void (*closed)(void *ud); /* mph_hosts_close's callback */
    void *closed_ud;
    char nonce_prefix[17];    /* this process's: 16 random hex digits */
    uint64_t nonce_seq;       /* the next nonce's counter */
    mph_map_t seen;           /* the nonces taken (seen_t), by nonce */
    mph_list_t seen_order;    /* the same, oldest first */
    size_t nseen;             /* how many */
    uint64_t floor_ms;        /* a call with TS at or before this is refused (see the top) */
    mph_log_limit_t refused;  /* log lines about calls refused here */
    mph_log_limit_t failures; /* log lines about calls to other hosts that failed */
};

/* ---- Time, hex, signatures ---- */

static uint64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void to_hex(const unsigned char *in, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 15];
    }
}

static int all_hex(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return 1;
}

/* The signature of data (len bytes) under the secret, in SIG_HEX hex digits (no NUL). */
static void sign(const mph_hosts_t *hs, const char *data, size_t len, char *hex)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (HMAC(EVP_sha256(), hs->key, (int)hs->keylen, (const unsigned char *)data, len, md,
             &mdlen) == NULL ||
        mdlen != SIG_HEX / 2) {
        mph_log(MPH_LOG_ERROR, "hosts: HMAC-SHA256 failed: calls between hosts are refused");
        memset(hex, '-', SIG_HEX); /* matches no signature */
        return;
    }
    to_hex(md, mdlen, hex);
}

/* ---- Configuration ---- */

/* Splits --peers into hs->urls. Returns 0, or MPH_EINVAL with why in err. */
static int read_peers(mph_hosts_t *hs, const char *peers, char *err, size_t errlen)
{
    const char *p = peers;
    while (1) {
        size_t n = strcspn(p, ",");
        int http = n > 7 && strncasecmp(p, "http://", 7) == 0;
        int https = n > 8 && strncasecmp(p, "https://", 8) == 0;
        int clean = 1;
        for (size_t i = 0; i < n; i++)
            clean &= (unsigned char)p[i] > ' ' && p[i] != 0x7f;
        if ((!http && !https) || !clean || n > URL_MAX) {
            snprintf(err, errlen,
                     "invalid --peers: \"%.*s\" is not a base URL (expected http://HOST:PORT or "
                     "https://..., comma-separated, one per host)",
                     (int)(n < 200 ? n : 200), p);
            return MPH_EINVAL;
        }
        if (hs->count == MPH_MAX_HOSTS) {
            snprintf(err, errlen, "invalid --peers: more than %d hosts", MPH_MAX_HOSTS);
            return MPH_EINVAL;
        }
        hs->urls = mph_xrealloc(hs->urls, (size_t)(hs->count + 1) * sizeof(*hs->urls));
        hs->urls[hs->count++] = mph_xstrndup(p, n);
        if (p[n] == '\0')
            return 0;
        p += n + 1;
    }
}

/* The host number the host name gives: NAME-N is host N + 1 (a StatefulSet's pod NAME-0 is
 * host 1). Returns it, or 0 with the name in name when it ends in no such number. */
static int id_from_hostname(char *name, size_t size)
{
    if (gethostname(name, size) != 0)
        snprintf(name, size, "?");
    name[size - 1] = '\0';
    const char *dash = strrchr(name, '-');
    if (dash == NULL || dash[1] == '\0' || strlen(dash + 1) > 6)
        return 0;
    for (const char *d = dash + 1; *d; d++)
        if (*d < '0' || *d > '9')
            return 0;
    return atoi(dash + 1) + 1;
}

/* Which host this is: --host-id, or the host name's. Returns 0 or MPH_EINVAL. */
static int find_id(mph_hosts_t *hs, int given, char *err, size_t errlen)
{
    char name[256];
    if (given > 0) {
        hs->id = given;
    } else if ((hs->id = id_from_hostname(name, sizeof(name))) == 0) {
        snprintf(err, errlen,
                 "--peers lists %d hosts, and this host's name \"%s\" does not say which one it "
                 "is (NAME-N is host N+1, as a StatefulSet's pods are named): give --host-id=K",
                 hs->count, name);
        return MPH_EINVAL;
    }
    if (hs->id > hs->count) {
        snprintf(err, errlen, "--host-id: this is host %d%s, but --peers lists %d host%s", hs->id,
                 given > 0 ? "" : " (by its name)", hs->count, hs->count == 1 ? "" : "s");
        return MPH_EINVAL;
    }
    return 0;
}

/* Refuses a secret file that someone else could read, change or replace (docs/security.md, as
 * the users file). st is the open file's. Returns 0 or MPH_EINVAL. */
static int check_secret_file(const char *path, const struct stat *st, int quiet, char *err,
                             size_t errlen)
{
    unsigned mode = st->st_mode & 07777;
    struct stat dst;
    char *copy = mph_xstrdup(path);
    const char *dir = dirname(copy);
    int dir_open = stat(dir, &dst) == 0 && (dst.st_mode & S_IWOTH) && !(dst.st_mode & S_ISVTX);
    int rc = MPH_EINVAL;
    if (!S_ISREG(st->st_mode))
        snprintf(err, errlen, "the peer secret file %s is not a regular file", path);
    else if (st->st_uid != geteuid() && st->st_uid != 0)
        snprintf(err, errlen,
                 "the peer secret file %s belongs to uid %u, neither ours (%u) nor root's", path,
                 (unsigned)st->st_uid, (unsigned)geteuid());
    else if (mode & (S_IROTH | S_IWOTH))
        snprintf(err, errlen,
                 "the peer secret file %s is readable or writable by others (mode %03o): whoever "
                 "reads it can run any call as any user on every host; chmod 600 it",
                 path, mode);
    else if (dir_open)
        snprintf(err, errlen,
                 "the directory %s, which holds the peer secret file, is writable by others "
                 "(mode %03o) without the sticky bit: anyone could replace the file",
                 dir, (unsigned)(dst.st_mode & 07777));
    else
        rc = 0;
    if (rc == 0 && !quiet && (mode & (S_IRGRP | S_IWGRP)))
        mph_log(MPH_LOG_WARN,
                "the peer secret file %s is readable or writable by its group (mode %03o): "
                "chmod 600 it unless that group is this service's alone",
                path, mode);
    free(copy);
    return rc;
}

/* Reads the shared secret (its trailing white space left out, so that a newline an editor
 * adds makes no difference between hosts). Returns 0, MPH_EIO or MPH_EINVAL. */
static int read_secret(mph_hosts_t *hs, const char *path, int quiet, char *err, size_t errlen)
{
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0 || fstat(fd, &st) != 0) {
        snprintf(err, errlen, "cannot read the peer secret file %s: %s", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return MPH_EIO;
    }
    int rc = check_secret_file(path, &st, quiet, err, errlen);
    if (rc == 0 && st.st_size > SECRET_MAX) {
        snprintf(err, errlen, "the peer secret file %s is longer than %d bytes", path, SECRET_MAX);
        rc = MPH_EINVAL;
    }
    unsigned char buf[SECRET_MAX + 1];
    ssize_t n = rc == 0 ? read(fd, buf, sizeof(buf)) : 0;
    close(fd);
    if (rc == 0 && (n < 0 || n > SECRET_MAX)) {
        snprintf(err, errlen, "cannot read the peer secret file %s: %s", path,
                 n < 0 ? strerror(errno) : "it grew while read");
        rc = MPH_EIO;
    }
    while (rc == 0 && n > 0 && strchr(" \t\r\n", buf[n - 1]) != NULL)
        n--;
    if (rc == 0 && n == 0) {
        snprintf(err, errlen, "the peer secret file %s is empty", path);
        rc = MPH_EINVAL;
    }
    if (rc == 0) {
        hs->key = mph_xmalloc((size_t)n);
        memcpy(hs->key, buf, (size_t)n);
        hs->keylen = (size_t)n;
        if (n < SECRET_SHORT && !quiet)
            mph_log(MPH_LOG_WARN,
                    "the peer secret in %s is only %zd bytes: use 32 random ones (openssl rand "
                    "-hex 32)",
                    path, n);
    }
    OPENSSL_cleanse(buf, sizeof(buf));
    return rc;
}

int mph_hosts_new(mph_hosts_t **out, uv_loop_t *loop, const mph_hosts_config_t *cfg, char *err,
                  size_t errlen)
{
    *out = NULL;
    mph_hosts_t *hs = mph_xcalloc(1, sizeof(*hs));
    int rc = cfg->peers ? read_peers(hs, cfg->peers, err, errlen) : 0;
    if (rc == 0 && hs->count <= 1) { /* one host: nothing to reach */
        if (cfg->host_id > 1) {
            snprintf(err, errlen, "--host-id=%d, but --peers lists %s", cfg->host_id,
                     hs->count ? "one host" : "no hosts");
            rc = MPH_EINVAL;
        }
        mph_hosts_free(hs);
        return rc;
    }
    if (rc == 0)
        rc = find_id(hs, cfg->host_id, err, errlen);
    if (rc == 0 && !cfg->storage_shared) {
        snprintf(err, errlen,
                 "--peers lists %d hosts, which need storage they all reach (--storage=redis://"
                 "...): file storage belongs to one machine",
                 hs->count);
        rc = MPH_EINVAL;
    }
    if (rc == 0 && cfg->secret_file == NULL) {
        snprintf(err, errlen,
                 "--peers lists %d hosts: calls between them are signed with a shared secret, "
                 "give --peer-secret-file=FILE (e.g. made with: openssl rand -hex 32 > FILE)",
                 hs->count);
        rc = MPH_EINVAL;
    }
    if (rc == 0)
        rc = read_secret(hs, cfg->secret_file, cfg->quiet, err, errlen);
    if (rc != 0) {
        mph_hosts_free(hs);
        return rc;
    }
    unsigned char prefix[8];
    if (RAND_bytes(prefix, sizeof(prefix)) != 1) { /* uniqueness is all a nonce needs */
        uint64_t seed = uv_hrtime() ^ ((uint64_t)getpid() << 32);
        memcpy(prefix, &seed, sizeof(prefix));
    }
    to_hex(prefix, sizeof(prefix), hs->nonce_prefix);
    hs->loop = loop;
    hs->worker_id = cfg->worker_id > 0 ? cfg->worker_id : 1;
    hs->worker_count = cfg->worker_count > 0 ? cfg->worker_count : 1;
    hs->timeout_ms = cfg->timeout_ms;
    hs->idle_ms = cfg->idle_ms;
    hs->floor_ms = wall_ms(); /* nothing signed before this worker started */
    mph_list_init(&hs->failed);
    mph_list_init(&hs->seen_order);
    *out = hs;
    return 0;
}

int mph_hosts_id(const mph_hosts_t *hs)
{
    return hs ? hs->id : 1;
}

int mph_hosts_count(const mph_hosts_t *hs)
{
    return hs ? hs->count : 1;
}

/* ---- Sending ---- */

/* Answers c (the reply borrowed by the callback) and frees it. */
static void answer(hcall_t *c, mph_lua_reply_t *reply)
{
    c->cb(c->ud, reply);
    free(reply->json);
    free(reply->message);
    free(c);
}

/* Answers c with -32005 "host K unavailable: why". */
static void fail(hcall_t *c, const char *why)
{
    mph_hosts_t *hs = c->hs;
    char msg[512];
    unsigned long held;
    snprintf(msg, sizeof(msg), "host %d unavailable: %s", c->host, why);
    if (!hs->closing && mph_log_limit_pass(&hs->failures, MPH_REFUSAL_LOG_MS, &held))
        mph_log(MPH_LOG_WARN, "forward: %s (%lu more such failures since the last line)", msg,
                held);
    mph_lua_reply_t reply = {MPH_RPC_WORKER_UNAVAILABLE, NULL, 0, mph_xstrdup(msg), 0};
    answer(c, &reply);
}

static void on_later(uv_idle_t *idle)
{
    mph_hosts_t *hs = mph_container_of(idle, mph_hosts_t, later);
    mph_list_t batch, *q;
    mph_list_init(&batch);
    mph_list_move(&batch, &hs->failed); /* those failed meanwhile wait for the next turn */
    uv_idle_stop(idle);
    while ((q = mph_list_pop(&batch)) != NULL) {
        hcall_t *c = mph_list_entry(q, hcall_t, node);
        fail(c, c->why);
    }
}

/* Fails c on the next turn of the loop (the bridge is never answered before the forward
 * returns), or at once once closing (forward.c takes that). */
static void fail_later(hcall_t *c, const char *why)
{
    mph_hosts_t *hs = c->hs;
    if (hs->closing || !hs->attached) {
        fail(c, why);
        return;
    }
    snprintf(c->why, sizeof(c->why), "%s", why);
    if (mph_list_empty(&hs->failed))
        uv_idle_start(&hs->later, on_later);
    mph_list_insert_tail(&hs->failed, &c->node);
}

/* The other host's answer came (an mph_lua_fetch_cb). */
static void on_fetched(void *ud, mph_lua_fetch_res_t *res)
{
    hcall_t *c = ud;
    mph_lua_reply_t reply = {0, NULL, 0, NULL, 0};
    char why[300], refusal[400];
    if (res->status == 0) {
        fail(c, res->error);
        return;
    }
    int read =
        mph_peer_read_answer(res->body ? res->body : "", res->body_len, &reply, why, sizeof(why));
    if ((res->status == 200 || res->status == 401) && read == 0) { /* 401: a handler's -32004 */
        answer(c, &reply);
        return;
    }
    if (res->status == 403 && read == 0 && reply.message != NULL) {
        snprintf(refusal, sizeof(refusal), "it refused the call: %s", reply.message);
    } else if (res->status == 413) { /* the forwarded call is re-encoded, so may be longer */
        snprintf(refusal, sizeof(refusal), "the call is larger than its --max-body");
    } else if (res->status != 200 && res->status != 401) {
        snprintf(refusal, sizeof(refusal),
                 "it answered HTTP %d (is it an mphost of this deployment, on the URL --peers "
                 "gives?)",
                 res->status);
    } else {
        snprintf(refusal, sizeof(refusal), "%s", why);
    }
    free(reply.json);
    free(reply.message);
    fail(c, refusal);
}

/* The signed body of a call for `worker` of `host` (see the top of the file), in env. */
static void seal(mph_hosts_t *hs, int host, int worker, mph_lua_role_t role, const char *body,
                 size_t len, mph_buf_t *env)
{
    char sig[SIG_HEX];
    memset(sig, '0', sizeof(sig));
    mph_buf_append(env, sig, SIG_HEX);
    mph_buf_printf(env, " %s %s %d %d %d %" PRIu64 " %s%016" PRIx64 "\n", PROTOCOL,
                   mph_lua_role_name(role), hs->id, host, worker, wall_ms(), hs->nonce_prefix,
                   hs->nonce_seq++);
    mph_buf_append(env, body, len);
    sign(hs, env->data + SIG_HEX + 1, env->len - SIG_HEX - 1, env->data);
}

void mph_hosts_forward(void *fud, int host, int worker, mph_lua_role_t role, const char *body,
                       size_t len, mph_lua_reply_cb cb, void *ud)
{
    mph_hosts_t *hs = fud;
    assert(host >= 1 && host <= hs->count && host != hs->id);
    hcall_t *c = mph_xcalloc(1, sizeof(*c));
    *c = (hcall_t){.hs = hs, .host = host, .cb = cb, .ud = ud};
    if (hs->fetch == NULL) {
        fail_later(c, hs->closing ? "this host is stopping" : "not ready to send");
        return;
    }
    mph_buf_t env = MPH_BUF_INIT;
    seal(hs, host, worker, role, body, len, &env);
    static const char *const headers[] = {"Content-Type: application/octet-stream",
                                          "X-Mphost-Peer: 1"};
    mph_lua_fetch_req_t req = {.url = hs->urls[host - 1],
                               .method = "POST",
                               .headers = headers,
                               .nheaders = sizeof(headers) / sizeof(headers[0]),
                               .body = env.data,
                               .body_len = env.len,
                               .timeout_ms = hs->timeout_ms,
                               .max_body = MAX_ANSWER};
    char why[300];
    int rc = mph_fetch_start(hs->fetch, &req, on_fetched, c, why, sizeof(why));
    mph_buf_free(&env); /* the fetcher has its copy */
    if (rc != 0)
        fail_later(c, why);
}

/* ---- Receiving ---- */

/* A received call, as its signed line says. */
typedef struct {
    mph_lua_role_t role;
    int from, to, worker;
    uint64_t ts;
    char nonce[NONCE_HEX + 1];
    const char *call; /* the JSON-RPC request (borrowed from the body) */
    size_t call_len;
} envelope_t;

/* Reads the signed line after its signature was checked. Returns 0, or -1 with why. */
static int read_line(const mph_hosts_t *hs, const char *line, envelope_t *e, char *why,
                     size_t whylen)
{
    char version[16], role[8], nonce[NONCE_HEX + 2];
    unsigned long long ts;
    int used = 0;
    if (sscanf(line, "%15s %7s %d %d %d %llu %33s%n", version, role, &e->from, &e->to, &e->worker,
               &ts, nonce, &used) != 7 ||
        line[used] != '\0' || strcmp(version, PROTOCOL) != 0) {
        snprintf(why, whylen, "it is not a %s call (another version of mphost?)", PROTOCOL);
        return -1;
    }
    if (e->to != hs->id) {
        snprintf(why, whylen,
                 "it was meant for host %d and came to host %d (do the hosts list --peers in "
                 "the same order?)",
                 e->to, hs->id);
        return -1;
    }
    if (mph_lua_role_parse(role, &e->role) != 0 || e->role == MPH_LUA_CALL ||
        strlen(nonce) != NONCE_HEX || !all_hex(nonce, NONCE_HEX) || e->worker < 1 || e->from < 1 ||
        e->from > hs->count || e->from == hs->id) {
        snprintf(why, whylen, "its signed line is not one this host reads");
        return -1;
    }
    e->ts = ts;
    memcpy(e->nonce, nonce, sizeof(e->nonce));
    return 0;
}

/* Checks a received body's signature, addressee and time. Returns 0 with e filled, or -1
 * with why. */
static int open_envelope(const mph_hosts_t *hs, const char *body, size_t len, envelope_t *e,
                         char *why, size_t whylen)
{
    char sig[SIG_HEX], line[LINE_MAX_LEN + 1];
    if (len <= SIG_HEX + 1 || body[SIG_HEX] != ' ' || !all_hex(body, SIG_HEX)) {
        snprintf(why, whylen, "it is not a signed call");
        return -1;
    }
    sign(hs, body + SIG_HEX + 1, len - SIG_HEX - 1, sig);
    if (CRYPTO_memcmp(sig, body, SIG_HEX) != 0) {
        snprintf(why, whylen,
                 "its signature does not match (do the hosts share the same "
                 "--peer-secret-file?)");
        return -1;
    }
    const char *start = body + SIG_HEX + 1, *end = body + len;
    const char *nl = memchr(start, '\n', (size_t)(end - start));
    if (nl == NULL || nl - start > LINE_MAX_LEN) {
        snprintf(why, whylen, "its signed line is not one this host reads");
        return -1;
    }
    memcpy(line, start, (size_t)(nl - start));
    line[nl - start] = '\0';
    if (read_line(hs, line, e, why, whylen) != 0)
        return -1;
    uint64_t now = wall_ms();
    if (e->ts + WINDOW_MS < now || e->ts > now + WINDOW_MS) {
        snprintf(why, whylen,
                 "it was signed %.1f s %s by host %d's clock (calls are taken within %d s: are "
                 "the clocks in sync?)",
                 (double)(e->ts > now ? e->ts - now : now - e->ts) / 1000,
                 e->ts > now ? "ahead" : "ago", e->from, WINDOW_MS / 1000);
        return -1;
    }
    e->call = nl + 1;
    e->call_len = (size_t)(end - e->call);
    return 0;
}

/* Forgets the oldest nonce; whatever carried it can be taken no more (floor). */
static void forget_oldest(mph_hosts_t *hs)
{
    seen_t *s = mph_list_entry(mph_list_pop(&hs->seen_order), seen_t, order);
    if (s->ts > hs->floor_ms)
        hs->floor_ms = s->ts;
    mph_map_remove(&hs->seen, &s->node);
    free(s);
    hs->nseen--;
}

/* Takes e's nonce, or says why not: seen already, or older than what is remembered. */
static int take_nonce(mph_hosts_t *hs, const envelope_t *e, char *why, size_t whylen)
{
    uint64_t now = wall_ms();
    mph_list_t *first;
    while ((first = mph_list_first(&hs->seen_order)) != NULL &&
           (hs->nseen >= SEEN_MAX || mph_list_entry(first, seen_t, order)->ts + WINDOW_MS < now))
        forget_oldest(hs);
    if (e->ts <= hs->floor_ms) {
        snprintf(why, whylen,
                 "it was signed before the calls this worker remembers begin (a call sent "
                 "again, or one signed before this worker started)");
        return -1;
    }
    if (mph_map_find(&hs->seen, e->nonce) != NULL) {
        snprintf(why, whylen, "it was taken once already (a replayed call)");
        return -1;
    }
    seen_t *s = mph_xcalloc(1, sizeof(*s));
    s->ts = e->ts;
    memcpy(s->nonce, e->nonce, sizeof(s->nonce));
    mph_list_insert_tail(&hs->seen_order, &s->order);
    mph_map_insert(&hs->seen, &s->node, s->nonce);
    hs->nseen++;
    return 0;
}

/* Refuses a received call, and says so (at most one line per MPH_REFUSAL_LOG_MS). */
static void refuse(mph_hosts_t *hs, mph_http_req_t *req, const char *why)
{
    unsigned long held;
    if (mph_log_limit_pass(&hs->refused, MPH_REFUSAL_LOG_MS, &held))
        mph_log(MPH_LOG_WARN,
                "refused a call from another host: %s (%lu more refused since the last such "
                "line)",
                why, held);
    mph_rpc_refuse_host(req, why);
}

/* Answers req with a worker's reply, as a JSON-RPC response of id 1 (the sender's). */
static void respond_reply(mph_http_req_t *req, const mph_lua_reply_t *reply)
{
    mph_buf_t b = MPH_BUF_INIT;
    mph_buf_puts(&b, "{\"jsonrpc\":\"2.0\",\"id\":1,");
    if (reply->code == 0) {
        mph_buf_puts(&b, "\"result\":");
        if (reply->json)
            mph_buf_append(&b, reply->json, reply->json_len);
        else
            mph_buf_puts(&b, "null");
    } else {
        const char *message = reply->message ? reply->message : mph_rpc_message(reply->code);
        mph_buf_printf(&b, "\"error\":{\"code\":%d,\"message\":", reply->code);
        if (mph_json_write_string(&b, message, strlen(message)) != 0)
            mph_buf_puts(&b, "\"(message was not valid UTF-8)\"");
        if (reply->json) {
            mph_buf_puts(&b, ",\"data\":");
            mph_buf_append(&b, reply->json, reply->json_len);
        }
        mph_buf_puts(&b, "}");
    }
    if (reply->replayed) /* a keyed shard call found its record (forward.c) */
        mph_buf_puts(&b, ",\"" MPH_LUA_FORWARD_REPLAYED "\":true");
    mph_buf_puts(&b, "}\n");
    size_t n;
    char *data = mph_buf_steal(&b, &n);
    mph_http_req_set_call(req, "-", reply->code);
    mph_http_respond(req, 200, data, n);
}

/* The worker a call was handed on to answered (an mph_lua_reply_cb). Its refusal goes back
 * as a refusal (peer.c reads the 403's error); a failure of the channel itself ("worker N
 * unavailable: ...") says which host it was. */
static void on_relayed(void *ud, mph_lua_reply_t *reply)
{
    relay_t *r = ud;
    char prefix[48], msg[600];
    size_t refused = strlen(MPH_RPC_HOST_REFUSED);
    if (reply->code == MPH_RPC_UNAUTHORIZED && reply->message &&
        strncmp(reply->message, MPH_RPC_HOST_REFUSED, refused) == 0) {
        mph_rpc_refuse_host(r->req, reply->message + refused); /* the worker logged it */
        free(r);
        return;
    }
    snprintf(prefix, sizeof(prefix), "worker %d unavailable", r->worker);
    if (reply->code == MPH_RPC_WORKER_UNAVAILABLE && reply->message &&
        strncmp(reply->message, prefix, strlen(prefix)) == 0) {
        snprintf(msg, sizeof(msg), "host %d unavailable: %s", r->hs->id, reply->message);
        free(reply->message);
        reply->message = mph_xstrdup(msg);
    }
    respond_reply(r->req, reply);
    free(r);
}

/* Hands a checked call on to the worker it is for. */
static void relay(mph_hosts_t *hs, mph_http_req_t *req, int worker, const char *body, size_t len)
{
    if (hs->peer == NULL || worker > mph_peer_count(hs->peer)) {
        char msg[200];
        snprintf(msg, sizeof(msg), "host %d unavailable: worker %d: this host runs %d worker%s",
                 hs->id, worker, hs->worker_count, hs->worker_count == 1 ? "" : "s");
        mph_lua_reply_t reply = {MPH_RPC_WORKER_UNAVAILABLE, NULL, 0, msg, 0};
        respond_reply(req, &reply);
        return;
    }
    relay_t *r = mph_xcalloc(1, sizeof(*r));
    *r = (relay_t){hs, req, worker};
    mph_peer_relay(hs->peer, worker, body, len, on_relayed, r);
}

void mph_hosts_receive(void *ud, mph_http_req_t *req, const char *body, size_t len, int relayed)
{
    mph_hosts_t *hs = ud;
    envelope_t e;
    char why[300];
    if (open_envelope(hs, body, len, &e, why, sizeof(why)) != 0) {
        refuse(hs, req, why);
        return;
    }
    if (e.worker != hs->worker_id && !relayed) {
        relay(hs, req, e.worker, body, len);
        return;
    }
    if (e.worker != hs->worker_id) { /* a worker of ours handed it to the wrong one */
        snprintf(why, sizeof(why), "it is meant for worker %d, not %d", e.worker, hs->worker_id);
        refuse(hs, req, why);
        return;
    }
    if (take_nonce(hs, &e, why, sizeof(why)) != 0) {
        refuse(hs, req, why);
        return;
    }
    mph_rpc_handle_role(hs->rpc, req, e.call, e.call_len, e.role);
}

/* ---- Lifecycle ---- */

void mph_hosts_attach(mph_hosts_t *hs, mph_rpc_t *rpc, mph_peer_t *peer)
{
    hs->rpc = rpc;
    hs->peer = peer;
    mph_fetch_new(&hs->fetch, hs->loop, NULL); /* not mp.fetch's: not in its metrics */
    unsigned age = hs->idle_ms / 1000;
    mph_fetch_tuning_t tuning = {CONNECT_TIMEOUT_MS, DNS_CACHE_S, age ? age : 1};
    mph_fetch_tune(hs->fetch, &tuning);
    uv_idle_init(hs->loop, &hs->later);
    hs->attached = 1;
}

static void one_closed(mph_hosts_t *hs)
{
    if (--hs->open == 0 && hs->closed)
        hs->closed(hs->closed_ud);
}

static void on_idle_closed(uv_handle_t *h)
{
    one_closed(mph_container_of((uv_idle_t *)h, mph_hosts_t, later));
}

static void on_fetch_closed(void *ud)
{
    one_closed(ud);
}

void mph_hosts_close(mph_hosts_t *hs, void (*closed)(void *ud), void *ud)
{
    assert(!hs->closing);
    hs->closing = 1;
    hs->closed = closed;
    hs->closed_ud = ud;
    if (!hs->attached) {
        if (closed)
            closed(ud);
        return;
    }
    hs->open = 2;
    on_later(&hs->later); /* the failures waiting for the next turn: now */
    uv_close((uv_handle_t *)&hs->later, on_idle_closed);
    mph_fetch_t *f = hs->fetch;
    hs->fetch = NULL; /* forwards from the callbacks below fail at once */
    mph_fetch_close(f, on_fetch_closed, hs);
}

void mph_hosts_free(mph_hosts_t *hs)
{
    if (hs == NULL)
        return;
    while (hs->nseen > 0)
        forget_oldest(hs);
    mph_map_free(&hs->seen);
    for (int i = 0; i < hs->count; i++)
        free(hs->urls[i]);
    free(hs->urls);
    if (hs->key) {
        OPENSSL_cleanse(hs->key, hs->keylen);
        free(hs->key);
    }
    free(hs);
}
