/*
 * options.c: the command line's options (cli.h: mph_cli_parse), declared once, as data.
 *
 * Each option is one row of `options`: its name, how its value is read (an integer or seconds
 * in a range, bytes, a string, or a function of its own), where it goes in mph_cli_t, and its
 * help. Parsing (getopt_long), the range in an error message and the usage text all read the
 * row, so a new option is one row, and a range is written once.
 *
 * Every option that was applied is also kept as "--name=value" (cli->options): a supervisor
 * starts its workers with exactly those, whatever spelling the user chose ("--port 80",
 * "--port=80").
 */
#define _GNU_SOURCE
#include <assert.h>
#include <getopt.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "common.h"

typedef enum {
    OPT_STRING,  /* a const char * (borrowed from argv) */
    OPT_INT,     /* a whole decimal number in [min, max], into an int, unsigned or size_t */
    OPT_SECONDS, /* seconds with an optional fraction, in [min, max] milliseconds, into an
                    unsigned (milliseconds) */
    OPT_BYTES,   /* a whole number with an optional k, M or G, into a size_t */
    OPT_CUSTOM   /* read by `custom` */
} opt_kind_t;

typedef struct {
    const char *name;       /* --name */
    opt_kind_t kind;        /* how its value is read */
    unsigned long min, max; /* OPT_INT: the range; OPT_SECONDS: the range in milliseconds */
    size_t offset, size;    /* its field in mph_cli_t (OPT_CUSTOM: unused) */
    int (*custom)(mph_cli_t *cli, const char *value); /* OPT_CUSTOM: 0, or -1 to refuse */
    const char *expected; /* what a refused value should have been (OPT_CUSTOM, OPT_STRING) */
    const char *arg;      /* the value's name in the help ("N", "SEC") */
    const char *help;     /* its help: lines after the first are indented by usage() */
} option_t;

#define FIELD(f) offsetof(mph_cli_t, f), sizeof(((mph_cli_t *)0)->f)

static int set_logging(mph_cli_t *cli, const char *value);
static int set_redis_wait(mph_cli_t *cli, const char *value);

static const option_t options[] = {
    {"port", OPT_INT, 0, 65535, FIELD(host.port), NULL, NULL, "N",
     "port (default 3000, env MP_PORT)"},
    {"listen", OPT_STRING, 0, 0, FIELD(host.listen), NULL, "an address", "ADDR",
     "address to bind (default 0.0.0.0)"},
    {"storage", OPT_STRING, 0, 0, FIELD(host.storage), NULL, "file, redis or a URL", "S",
     "file (default): file storage in --data=DIR (env MP_DATA, ./mp-data);\n"
     "redis: Redis at REDIS_HOST, REDIS_PORT, REDIS_PASSWORD;\n"
     "redis://[:password@]host[:port][/db];\n"
     "redis-sentinel://[:password@]host:port[,host:port...]/MASTER: the\n"
     "Redis master MASTER as those sentinels name it"},
    {"data", OPT_STRING, 0, 0, FIELD(host.data_dir), NULL, "a directory", "DIR",
     "the file storage's directory (default ./mp-data, env MP_DATA)"},
    {"redis-prefix", OPT_STRING, 0, 0, FIELD(host.redis_prefix), NULL, "a prefix", "P",
     "Redis key prefix (default mp:)"},
    {"redis-timeout", OPT_SECONDS, 10, 3600 * 1000, FIELD(host.redis_timeout_ms), NULL, NULL, "SEC",
     "a Redis command unanswered this long fails (default 1)"},
    {"redis-wait", OPT_CUSTOM, 0, 0, 0, 0, set_redis_wait,
     "N[,MS]: N 0 to 100 replicas, MS 1 to 3600000 milliseconds", "N[,MS]",
     "answer a commit only once N Redis replicas confirm it (WAIT N\n"
     "MS; MS default 1000); fewer: -32002, outcome unknown"},
    {"logging", OPT_CUSTOM, 0, 0, 0, 0, set_logging, "trace, debug, info, warn, error or silent",
     "LEVEL", "trace|debug|info|warn|error|silent (default info)"},
    {"max-retries", OPT_INT, 0, 1000000, FIELD(host.max_retries), NULL, NULL, "N",
     "refused commits of a call before error -32001 (default 50;\n0: one attempt, no retry)"},
    {"max-body", OPT_INT, 1, 1 << 30, FIELD(host.max_body), NULL, NULL, "BYTES",
     "request body limit (default 1048576)"},
    {"max-header", OPT_INT, 256, 1 << 24, FIELD(host.max_header), NULL, NULL, "BYTES",
     "request header limit (default 16384)"},
    {"scope-cache", OPT_BYTES, 0, 0, FIELD(host.scope_cache), NULL, NULL, "BYTES",
     "memory for scope state; idle scopes past it are evicted, least\n"
     "recently used first (default 128M; suffixes k, M, G; 0: no bound)"},
    {"max-connections", OPT_INT, 1, 1000000, FIELD(host.max_connections), NULL, NULL, "N",
     "open connection limit (default 10000)"},
    {"idle-timeout", OPT_SECONDS, 10, 86400 * 1000, FIELD(host.idle_timeout_ms), NULL, NULL, "SEC",
     "close idle or stalled connections (default 30)"},
    {"shutdown-timeout", OPT_SECONDS, 0, 86400 * 1000, FIELD(host.shutdown_timeout_ms), NULL, NULL,
     "SEC", "how long delete waits for in-flight requests (default 10)"},
    {"start-timeout", OPT_SECONDS, 100, 86400 * 1000, FIELD(start_timeout_ms), NULL, NULL, "SEC",
     "deploy stops a server that is not serving by then (default 60)"},
    {"handler-timeout", OPT_SECONDS, 0, 86400 * 1000, FIELD(host.handler_timeout_ms), NULL, NULL,
     "SEC",
     "a handler running longer fails with -32003, or its worker is\n"
     "replaced (default 10; 0: no limit)"},
    {"workers", OPT_INT, 0, MPH_MAX_WORKERS, FIELD(workers), NULL, NULL, "N",
     "serve with N worker processes under a supervisor (default:\n"
     "the largest n of the script's mp.spread, mp.shard and\n"
     "mp.scatter, else 1); 0: one process, no supervisor (for debugging\n"
     "and benchmarks; LuaJIT's compiler is then off while a handler\n"
     "limit is set)"},
    {"users", OPT_STRING, 0, 0, FIELD(host.users_file), NULL, "a file", "FILE",
     "users for mp.basicAuth services (lines NAME:HASH, made with\n"
     "mphost passwd; read again by a reload or SIGHUP)"},
    {"access-log", OPT_STRING, 0, 0, FIELD(host.access_log), NULL, "a file, or - for stderr",
     "FILE",
     "one line per HTTP request appended to FILE (- for stderr);\n"
     "SIGUSR1 reopens it and the deployment's log"},
    {"url", OPT_STRING, 0, 0, FIELD(url), NULL, "a URL", "URL",
     "call's server (default http://127.0.0.1:3000/)"},
};

#define NOPTIONS (sizeof(options) / sizeof(options[0]))

static const char verbs_usage[] =
    "usage: mphost SCRIPT [deploy] [options]    start SCRIPT's services in the background\n"
    "       mphost SCRIPT serve [PORT] [options] run in the foreground, logs to stderr\n"
    "       mphost SCRIPT delete [--port=N]      stop that deployment gracefully\n"
    "       mphost SCRIPT status [--port=N]      is it running: pid, port, storage, uptime\n"
    "       mphost SCRIPT reload [--port=N]      swap in workers running the re-read script\n"
    "       mphost SCRIPT logs [-f] [--port=N]   print its log file (-f: and follow it)\n"
    "       mphost list                          every deployment of this user\n"
    "       mphost call METHOD [JSON] [--url URL]\n"
    "                                            call METHOD with params JSON (default [{}])\n"
    "       mphost passwd FILE USER              add or replace USER in a users file (the\n"
    "                                            password from stdin, or asked twice at a tty)\n"
    "options (--name=VALUE or --name VALUE):\n";

void mph_cli_usage(FILE *out)
{
    fputs(verbs_usage, out);
    for (size_t i = 0; i < NOPTIONS; i++) {
        char head[48];
        snprintf(head, sizeof(head), "  --%s=%s", options[i].name, options[i].arg);
        fprintf(out, "%-24s", head);
        if (strlen(head) >= 24)
            fprintf(out, "\n%-24s", "");
        for (const char *p = options[i].help; *p;) {
            size_t n = strcspn(p, "\n");
            fprintf(out, "%.*s\n", (int)n, p);
            p += n;
            if (*p == '\n' && *++p)
                fprintf(out, "%-24s", "");
        }
    }
    fputs("  --help, --version\n", out);
}

int mph_cli_bad_usage(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "mphost: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, " (see mphost --help)\n");
    va_end(ap);
    return 1;
}

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

static int set_logging(mph_cli_t *cli, const char *value)
{
    mph_log_level_t level;
    if (mph_log_parse_level(value, &level) != 0)
        return -1;
    mph_log_level = level;
    cli->host.debug_errors = level <= MPH_LOG_DEBUG;
    cli->log_level = value;
    return 0;
}

/* --redis-wait=N[,MS] */
static int set_redis_wait(mph_cli_t *cli, const char *value)
{
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
    cli->host.redis_wait_replicas = (unsigned)replicas;
    cli->host.redis_wait_ms = (unsigned)ms;
    return 0;
}

/* Stores v in the field at o's offset, whatever the width of its unsigned or int type. */
static void store_number(mph_cli_t *cli, const option_t *o, unsigned long v)
{
    char *field = (char *)cli + o->offset;
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
static void expected(const option_t *o, char *out, size_t size)
{
    switch (o->kind) {
    case OPT_INT:
        snprintf(out, size, "%lu to %lu", o->min, o->max);
        break;
    case OPT_SECONDS:
        snprintf(out, size, "seconds, %g to %g", o->min / 1000.0, o->max / 1000.0);
        break;
    case OPT_BYTES:
        snprintf(out, size, "bytes, e.g. 64M; 0: no bound");
        break;
    default:
        snprintf(out, size, "%s", o->expected);
    }
}

/* Applies one option's value. Returns 0, or prints why not and returns 1. */
static int apply(mph_cli_t *cli, const option_t *o, const char *value)
{
    unsigned long v = 0;
    int rc = 0;
    switch (o->kind) {
    case OPT_STRING:
        rc = *value == '\0' ? -1 : 0;
        if (rc == 0)
            memcpy((char *)cli + o->offset, &value, sizeof(value));
        break;
    case OPT_INT:
        if ((rc = parse_integer(value, o->min, o->max, &v)) == 0)
            store_number(cli, o, v);
        break;
    case OPT_SECONDS:
        if ((rc = parse_seconds(value, o->min, o->max, &v)) == 0)
            store_number(cli, o, v);
        break;
    case OPT_BYTES:
        if ((rc = parse_bytes(value, &v)) == 0)
            store_number(cli, o, v);
        break;
    case OPT_CUSTOM:
        rc = o->custom(cli, value);
        break;
    }
    if (rc != 0) {
        char why[160];
        expected(o, why, sizeof(why));
        return mph_cli_bad_usage("invalid --%s: %s (expected %s)", o->name, value, why);
    }
    if (o->offset == offsetof(mph_cli_t, host.port))
        cli->port_given = 1;
    char *kept = mph_xmalloc(strlen(o->name) + strlen(value) + 4);
    sprintf(kept, "--%s=%s", o->name, value);
    cli->options = mph_xrealloc(cli->options, (size_t)(cli->noptions + 2) * sizeof(char *));
    cli->options[cli->noptions++] = kept;
    cli->options[cli->noptions] = NULL;
    return 0;
}

int mph_cli_set_option(mph_cli_t *cli, const char *name, const char *value)
{
    for (size_t i = 0; i < NOPTIONS; i++)
        if (strcmp(options[i].name, name) == 0)
            return apply(cli, &options[i], value);
    return mph_cli_bad_usage("unknown option --%s", name);
}

/* ---- The command line ---- */

enum { LONG_HELP = 1000, LONG_VERSION, LONG_FIRST_OPTION };

int mph_cli_parse(mph_cli_t *cli, int argc, char **argv)
{
    struct option longs[NOPTIONS + 3];
    for (size_t i = 0; i < NOPTIONS; i++)
        longs[i] =
            (struct option){options[i].name, required_argument, NULL, LONG_FIRST_OPTION + (int)i};
    longs[NOPTIONS] = (struct option){"help", no_argument, NULL, LONG_HELP};
    longs[NOPTIONS + 1] = (struct option){"version", no_argument, NULL, LONG_VERSION};
    longs[NOPTIONS + 2] = (struct option){NULL, 0, NULL, 0};
    opterr = 0; /* our own messages */
    /* Options may come anywhere on the line (DESIGN.md, "CLI"): with "-" first, getopt_long
     * hands each positional back where it stands (as code 1), so they keep their order; ":"
     * tells a missing value (':') from an unknown option ('?'). */
    int c;
    while ((c = getopt_long(argc, argv, "-:hf", longs, NULL)) != -1) {
        if (c == 1) { /* a positional, in its place */
            if (cli->npos == MPH_CLI_MAX_POSITIONAL)
                return mph_cli_bad_usage("unexpected argument: %s", optarg);
            cli->positional[cli->npos++] = optarg;
        } else if (c == 'h' || c == LONG_HELP) {
            mph_cli_usage(stdout);
            return -1;
        } else if (c == LONG_VERSION) {
            printf("mphost %s\n", MPHOST_VERSION);
            return -1;
        } else if (c == 'f') {
            cli->follow = 1;
        } else if (c >= LONG_FIRST_OPTION) {
            if (apply(cli, &options[c - LONG_FIRST_OPTION], optarg) != 0)
                return 1;
        } else if (c == ':' && optopt >= LONG_FIRST_OPTION) {
            return mph_cli_bad_usage("option --%s needs a value",
                                     options[optopt - LONG_FIRST_OPTION].name);
        } else {
            const char *bad = argv[optind - 1];
            size_t n = strcspn(bad, "=");
            return mph_cli_bad_usage("unknown option %.*s", (int)n, bad);
        }
    }
    return 0;
}

void mph_cli_free_options(mph_cli_t *cli)
{
    for (int i = 0; i < cli->noptions; i++)
        free(cli->options[i]);
    free(cli->options);
    cli->options = NULL;
    cli->noptions = 0;
}
