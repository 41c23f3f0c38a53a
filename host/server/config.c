/*
 * config.c: a host's configuration (config.h): the option rows, the engine that reads them,
 * and mphost.h's opaque mph_host_config_t with its setters.
 */
#define _GNU_SOURCE
#include "config.h"

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "http.h"

/* ---- Values ---- */

/* A whole decimal integer in [min, max]: digits only, so "80x", " 80", "0x50", "1e3", "-1"
 * and overflow are refused rather than read as something else. */
static int parse_integer(const char *s, unsigned long min, unsigned long max, unsigned long *out)
{
    unsigned long v = 0;
    if (*s == '\0')
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        v = v * 10 + (unsigned long)(*s - '0');
        if (v > max) /* also stops the sum long before it could wrap */
            return -1;
    }
    if (v < min)
        return -1;
    *out = v;
    return 0;
}

/* Bytes: a whole number, optionally followed by k, M or G (KiB, MiB, GiB); at most 1 TiB. */
static int parse_bytes(const char *s, unsigned long *out)
{
    char digits[32];
    size_t n = strlen(s), shift = 0;
    if (n > 0 && strchr("kKmMgG", s[n - 1])) {
        char unit = (char)(s[n - 1] | 0x20);
        shift = unit == 'k' ? 10 : unit == 'm' ? 20 : 30;
        n--;
    }
    if (n == 0 || n >= sizeof(digits))
        return -1;
    memcpy(digits, s, n);
    digits[n] = '\0';
    unsigned long v;
    if (parse_integer(digits, 0, (1UL << 40) >> shift, &v) != 0)
        return -1;
    *out = v << shift;
    return 0;
}

/* Seconds as decimal digits with an optional fraction ("1", "0.25"), in [min_ms, max_ms] once
 * made milliseconds (sub-millisecond digits are dropped). No sign, exponent, hex, inf or nan. */
static int parse_seconds(const char *s, unsigned long min_ms, unsigned long max_ms,
                         unsigned long *out_ms)
{
    char whole[16];
    size_t n = strcspn(s, ".");
    if (n == 0 || n >= sizeof(whole))
        return -1;
    memcpy(whole, s, n);
    whole[n] = '\0';
    unsigned long secs, ms = 0;
    if (parse_integer(whole, 0, max_ms / 1000, &secs) != 0)
        return -1;
    if (s[n] == '.') {
        const char *frac = s + n + 1;
        if (*frac == '\0')
            return -1;
        for (int i = 0; frac[i]; i++) {
            if (frac[i] < '0' || frac[i] > '9')
                return -1;
            if (i < 3)
                ms += (unsigned long)(frac[i] - '0') * (i == 0 ? 100 : i == 1 ? 10 : 1);
        }
    }
    ms += secs * 1000;
    if (ms < min_ms || ms > max_ms)
        return -1;
    *out_ms = ms;
    return 0;
}

static int set_logging(void *base, const char *value)
{
    struct mph_host_config_s *cfg = base;
    mph_log_level_t level;
    if (mph_log_parse_level(value, &level) != 0)
        return -1;
    mph_log_level = level; /* the process's: the library has one logger */
    cfg->debug_errors = level <= MPH_LOG_DEBUG;
    return 0;
}

/* --redis-wait=N[,MS] */
static int set_redis_wait(void *base, const char *value)
{
    struct mph_host_config_s *cfg = base;
    char n[16];
    const char *comma = strchr(value, ',');
    size_t len = comma ? (size_t)(comma - value) : strlen(value);
    unsigned long replicas, ms = 1000;
    if (len == 0 || len >= sizeof(n))
        return -1;
    memcpy(n, value, len);
    n[len] = '\0';
    if (parse_integer(n, 0, 100, &replicas) != 0 ||
        (comma && parse_integer(comma + 1, 1, 3600 * 1000, &ms) != 0))
        return -1;
    cfg->redis_wait_replicas = (unsigned)replicas;
    cfg->redis_wait_ms = (unsigned)ms;
    return 0;
}

/* Stores v in the field at o's offset, whatever the width of its unsigned or int type. */
static void store_number(void *base, const mph_option_t *o, unsigned long v)
{
    char *field = (char *)base + o->offset;
    assert(o->size == sizeof(unsigned) || o->size == sizeof(size_t));
    if (o->size == sizeof(unsigned)) {
        unsigned u = (unsigned)v; /* an int field holds the same bits for 0..INT_MAX */
        memcpy(field, &u, sizeof(u));
    } else {
        size_t z = (size_t)v;
        memcpy(field, &z, sizeof(z));
    }
}

/* Why a value was refused: "expected ..." from the row. */
static void expected(const mph_option_t *o, char *out, size_t size)
{
    switch (o->kind) {
    case MPH_OPT_INT:
        snprintf(out, size, "%lu to %lu", o->min, o->max);
        break;
    case MPH_OPT_SECONDS:
        snprintf(out, size, "seconds, %g to %g", o->min / 1000.0, o->max / 1000.0);
        break;
    case MPH_OPT_BYTES:
        snprintf(out, size, "bytes, e.g. 64M; 0: no bound");
        break;
    default:
        snprintf(out, size, "%s", o->expected);
    }
}

int mph_option_apply(void *base, const mph_option_t *o, const char *value, char *err, size_t errlen)
{
    unsigned long v = 0;
    int rc = 0;
    switch (o->kind) {
    case MPH_OPT_STRING:
        rc = *value == '\0' ? -1 : 0;
        if (rc == 0)
            memcpy((char *)base + o->offset, &value, sizeof(value));
        break;
    case MPH_OPT_INT:
        if ((rc = parse_integer(value, o->min, o->max, &v)) == 0)
            store_number(base, o, v);
        break;
    case MPH_OPT_SECONDS:
        if ((rc = parse_seconds(value, o->min, o->max, &v)) == 0)
            store_number(base, o, v);
        break;
    case MPH_OPT_BYTES:
        if ((rc = parse_bytes(value, &v)) == 0)
            store_number(base, o, v);
        break;
    case MPH_OPT_CUSTOM:
        rc = o->custom(base, value);
        break;
    }
    if (rc == 0)
        return 0;
    char why[160];
    expected(o, why, sizeof(why));
    snprintf(err, errlen, "invalid --%s: %s (expected %s)", o->name, value, why);
    return MPH_EINVAL;
}

const mph_option_t *mph_options_find(const mph_option_t *rows, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(rows[i].name, name) == 0)
            return &rows[i];
    return NULL;
}

void mph_options_usage(FILE *out, const mph_option_t *rows, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char head[48];
        snprintf(head, sizeof(head), "  --%s=%s", rows[i].name, rows[i].arg);
        fprintf(out, "%-24s", head);
        if (strlen(head) >= 24)
            fprintf(out, "\n%-24s", "");
        for (const char *p = rows[i].help; *p;) {
            size_t len = strcspn(p, "\n");
            fprintf(out, "%.*s\n", (int)len, p);
            p += len;
            if (*p == '\n' && *++p)
                fprintf(out, "%-24s", "");
        }
    }
}

/* ---- The host's options ---- */

#define FIELD(f) offsetof(struct mph_host_config_s, f), sizeof(((struct mph_host_config_s *)0)->f)

static const mph_option_t host_options[] = {
    {"port", MPH_OPT_INT, 0, 65535, FIELD(port), NULL, NULL, "N",
     "port (default 3000, env MP_PORT)"},
    {"listen", MPH_OPT_STRING, 0, 0, FIELD(listen), NULL, "an address", "ADDR",
     "address to bind (default 0.0.0.0)"},
    {"storage", MPH_OPT_STRING, 0, 0, FIELD(storage), NULL, "file, redis or a URL", "S",
     "file (default): file storage in --data=DIR (env MP_DATA, ./mp-data);\n"
     "redis: Redis at REDIS_HOST, REDIS_PORT, REDIS_PASSWORD;\n"
     "redis://[:password@]host[:port][/db];\n"
     "redis-sentinel://[:password@]host:port[,host:port...]/MASTER: the\n"
     "Redis master MASTER as those sentinels name it"},
    {"data", MPH_OPT_STRING, 0, 0, FIELD(data_dir), NULL, "a directory", "DIR",
     "the file storage's directory (default ./mp-data, env MP_DATA)"},
    {"redis-prefix", MPH_OPT_STRING, 0, 0, FIELD(redis_prefix), NULL, "a prefix", "P",
     "Redis key prefix (default mp:)"},
    {"redis-timeout", MPH_OPT_SECONDS, 10, 3600 * 1000, FIELD(redis_timeout_ms), NULL, NULL, "SEC",
     "a Redis command unanswered this long fails (default 1)"},
    {"redis-wait", MPH_OPT_CUSTOM, 0, 0, 0, 0, set_redis_wait,
     "N[,MS]: N 0 to 100 replicas, MS 1 to 3600000 milliseconds", "N[,MS]",
     "answer a commit only once N Redis replicas confirm it (WAIT N\n"
     "MS; MS default 1000); fewer: -32002, outcome unknown"},
    {"logging", MPH_OPT_CUSTOM, 0, 0, 0, 0, set_logging,
     "trace, debug, info, warn, error or silent", "LEVEL",
     "trace|debug|info|warn|error|silent (default info)"},
    {"max-retries", MPH_OPT_INT, 0, 1000000, FIELD(max_retries), NULL, NULL, "N",
     "refused commits of a call before error -32001 (default 50;\n0: one attempt, no retry)"},
    {"max-body", MPH_OPT_INT, 1, 1 << 30, FIELD(max_body), NULL, NULL, "BYTES",
     "request body limit (default 1048576)"},
    {"max-header", MPH_OPT_INT, 256, 1 << 24, FIELD(max_header), NULL, NULL, "BYTES",
     "request header limit (default 16384)"},
    {"scope-cache", MPH_OPT_BYTES, 0, 0, FIELD(scope_cache), NULL, NULL, "BYTES",
     "memory for scope state; idle scopes past it are evicted, least\n"
     "recently used first (default 128M; suffixes k, M, G; 0: no bound)"},
    {"max-connections", MPH_OPT_INT, 1, 1000000, FIELD(max_connections), NULL, NULL, "N",
     "open connection limit (default 10000)"},
    {"idle-timeout", MPH_OPT_SECONDS, 10, 86400 * 1000, FIELD(idle_timeout_ms), NULL, NULL, "SEC",
     "close idle or stalled connections (default 30)"},
    {"shutdown-timeout", MPH_OPT_SECONDS, 0, 86400 * 1000, FIELD(shutdown_timeout_ms), NULL, NULL,
     "SEC", "how long delete waits for in-flight requests (default 10)"},
    {"handler-timeout", MPH_OPT_SECONDS, 0, 86400 * 1000, FIELD(handler_timeout_ms), NULL, NULL,
     "SEC",
     "a handler running longer fails with -32003, or its worker is\n"
     "replaced (default 10; 0: no limit)"},
    {"idempotency-ttl", MPH_OPT_INT, 1, 10 * 365 * 86400, FIELD(idempotency_ttl), NULL, NULL, "SEC",
     "a call's reply kept for its Idempotency-Key answers the key's\n"
     "duplicates this long (default 86400)"},
    {"users", MPH_OPT_STRING, 0, 0, FIELD(users_file), NULL, "a file", "FILE",
     "users for mp.basicAuth services (lines NAME:HASH, made with\n"
     "mphost passwd; read again by a reload or SIGHUP)"},
    {"access-log", MPH_OPT_STRING, 0, 0, FIELD(access_log), NULL, "a file, or - for stderr", "FILE",
     "one line per HTTP request appended to FILE (- for stderr);\n"
     "SIGUSR1 reopens it and the deployment's log"},
    {"peers", MPH_OPT_STRING, 0, 0, FIELD(peers), NULL, "URLs, comma-separated", "URL,...",
     "the base URL of every host of the deployment, this one included,\n"
     "in the same order on each: mp.shard and mp.scatter place their\n"
     "shards over all of them (needs Redis and --peer-secret-file)"},
    {"host-id", MPH_OPT_INT, 1, 1000, FIELD(host_id), NULL, NULL, "K",
     "which host of --peers this one is (default: N+1 for a host\n"
     "named NAME-N, as a StatefulSet's pods are)"},
    {"peer-secret-file", MPH_OPT_STRING, 0, 0, FIELD(peer_secret_file), NULL, "a file", "FILE",
     "the secret the hosts of --peers sign their calls with (the same\n"
     "file on every host; readable by this user only)"},
    {"send-expiry", MPH_OPT_SECONDS, 1, 30u * 86400 * 1000, FIELD(send_expiry_ms), NULL, NULL,
     "SEC",
     "mp.send retries a message this long after it was due, then\n"
     "keeps it as dead (default 86400; at most 30 days)"},
    {"log-path", MPH_OPT_STRING, 0, 0, FIELD(log_path), NULL, "a file", "FILE",
     "the file stderr writes to, opened again on SIGUSR1 (deploy sets it)"},
};

const mph_option_t *mph_config_options(size_t *n)
{
    *n = sizeof(host_options) / sizeof(host_options[0]);
    return host_options;
}

/* ---- The configuration ---- */

void mph_config_init(struct mph_host_config_s *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->listen = "0.0.0.0";
    cfg->port = 3000;
    cfg->storage = "file";
    cfg->data_dir = "./mp-data";
    cfg->redis_prefix = "mp:";
    cfg->redis_timeout_ms = 1000;
    cfg->redis_wait_ms = 1000;
    cfg->max_retries = 50;
    mph_http_config_t http;
    mph_http_config_default(&http);
    cfg->max_body = http.max_body;
    cfg->max_header = http.max_header;
    cfg->max_connections = http.max_connections;
    cfg->idle_timeout_ms = http.idle_timeout_ms;
    cfg->shutdown_timeout_ms = 10000;
    cfg->handler_timeout_ms = 10000;
    cfg->idempotency_ttl = 86400;
    cfg->listen_fd = -1;
    cfg->peer_dir_fd = -1;
    cfg->worker_id = 1;
    cfg->worker_count = 1;
    cfg->scope_cache = (size_t)128 << 20;
    cfg->send_expiry_ms = 86400 * 1000;
}

/* A copy of s that cfg owns (freed with it). */
static const char *own(struct mph_host_config_s *cfg, const char *s)
{
    if (s == NULL)
        return NULL;
    cfg->owned = mph_xrealloc(cfg->owned, (cfg->nowned + 1) * sizeof(*cfg->owned));
    return cfg->owned[cfg->nowned++] = mph_xstrdup(s);
}

void mph_config_copy(struct mph_host_config_s *dst, const struct mph_host_config_s *src)
{
    *dst = *src;
    dst->owned = NULL;
    dst->nowned = 0;
    for (size_t i = 0; i < sizeof(host_options) / sizeof(host_options[0]); i++) {
        if (host_options[i].kind != MPH_OPT_STRING)
            continue;
        const char **field = (const char **)((char *)dst + host_options[i].offset);
        *field = own(dst, *field);
    }
}

void mph_config_release(struct mph_host_config_s *cfg)
{
    for (size_t i = 0; i < cfg->nowned; i++)
        free(cfg->owned[i]);
    free(cfg->owned);
    cfg->owned = NULL;
    cfg->nowned = 0;
}

int mph_host_config_new(mph_host_config_t **out)
{
    mph_host_config_t *cfg = mph_xmalloc(sizeof(*cfg));
    mph_config_init(cfg);
    *out = cfg;
    return 0;
}

void mph_host_config_free(mph_host_config_t *cfg)
{
    if (cfg == NULL)
        return;
    mph_config_release(cfg);
    free(cfg);
}

int mph_host_config_set(mph_host_config_t *cfg, const char *name, const char *value, char *err,
                        size_t errlen)
{
    size_t n;
    const mph_option_t *rows = mph_config_options(&n);
    const mph_option_t *o = mph_options_find(rows, n, name);
    if (o == NULL || value == NULL) {
        snprintf(err, errlen, o ? "--%s needs a value" : "unknown option --%s", name);
        return MPH_EINVAL;
    }
    if (o->kind == MPH_OPT_STRING && *value)
        value = own(cfg, value); /* the caller's string may go */
    return mph_option_apply(cfg, o, value, err, errlen);
}

void mph_host_config_set_loop(mph_host_config_t *cfg, struct uv_loop_s *loop)
{
    cfg->loop = loop;
}
