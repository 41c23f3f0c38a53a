/*
 * main.c: the mphost binary: argument parsing and the foreground `serve` verb. Everything
 * else is the library (mphost.h) or the other verbs (deploy.c, call.c).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <systemd/sd-daemon.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "common.h"
#include "supervisor.h"
#include "worker.h"

static const char usage[] =
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
    "options:\n"
    "  --port=N              port (default 3000, env MP_PORT)\n"
    "  --listen=ADDR         address to bind (default 0.0.0.0)\n"
    "  --storage=file        file storage (default) in --data=DIR (env MP_DATA, ./mp-data)\n"
    "  --storage=redis       Redis at REDIS_HOST, REDIS_PORT, REDIS_PASSWORD, or\n"
    "  --storage=redis://[:password@]host[:port][/db]\n"
    "  --storage=redis-sentinel://[:password@]host:port[,host:port...]/MASTER\n"
    "                        Redis master MASTER as those sentinels name it\n"
    "  --redis-prefix=P      Redis key prefix (default mp:)\n"
    "  --redis-timeout=SEC   a Redis command unanswered this long fails (default 1)\n"
    "  --redis-wait=N[,MS]   answer a commit only once N Redis replicas confirm it (WAIT N\n"
    "                        MS; MS default 1000); fewer: -32002, outcome unknown\n"
    "  --logging=LEVEL       trace|debug|info|warn|error|silent (default info)\n"
    "  --max-retries=N       refused commits of a call before error -32001 (default 50;\n"
    "                        0: one attempt, no retry)\n"
    "  --max-body=BYTES      request body limit (default 1048576)\n"
    "  --scope-cache=BYTES   memory for scope state; idle scopes past it are evicted, least\n"
    "                        recently used first (default 128M; suffixes k, M, G; 0: no bound)\n"
    "  --max-header=BYTES    request header limit (default 16384)\n"
    "  --max-connections=N   open connection limit (default 10000)\n"
    "  --idle-timeout=SEC    close idle or stalled connections (default 30)\n"
    "  --shutdown-timeout=SEC  how long delete waits for in-flight requests (default 10)\n"
    "  --start-timeout=SEC   deploy stops a server that is not serving by then (default 60)\n"
    "  --handler-timeout=SEC a handler running longer fails with -32003, or its worker is\n"
    "                        replaced (default 10; 0: no limit)\n"
    "  --workers=N           serve with N worker processes under a supervisor (default:\n"
    "                        the largest n of the script's mp.spread, mp.shard and\n"
    "                        mp.scatter, else 1);\n"
    "                        0: one process, no supervisor (for debugging and benchmarks;\n"
    "                        LuaJIT's compiler is then off while a handler limit is set)\n"
    "  --users=FILE          users for mp.basicAuth services (lines NAME:HASH, made with\n"
    "                        mphost passwd; read again by a reload or SIGHUP)\n"
    "  --access-log=FILE     one line per HTTP request appended to FILE (- for stderr);\n"
    "                        SIGUSR1 reopens it and the deployment's log\n"
    "  --help, --version\n";

static int bad_usage(const char *fmt, const char *arg)
{
    fprintf(stderr, "mphost: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, " (see mphost --help)\n");
    return 1;
}

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
static int parse_bytes(const char *s, size_t *out)
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
    *out = (size_t)v << shift;
    return 0;
}

/* Seconds as decimal digits with an optional fraction ("1", "0.25"), in [min_ms, max_ms] once
 * made milliseconds (sub-millisecond digits are dropped). No sign, exponent, hex, inf or nan. */
static int parse_seconds(const char *s, unsigned long min_ms, unsigned long max_ms,
                         unsigned *out_ms)
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
    *out_ms = (unsigned)ms;
    return 0;
}

/* --redis-wait=N[,MS] into h. Returns 0 or -1. */
static int parse_redis_wait(const char *value, mph_host_config_t *h)
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
    h->redis_wait_replicas = (unsigned)replicas;
    h->redis_wait_ms = (unsigned)ms;
    return 0;
}

/* Applies one --name=value option. Returns 0 or prints why not and returns 1. */
static int apply_option(mph_cli_t *cli, const char *name, const char *value)
{
    mph_host_config_t *h = &cli->host;
    unsigned long v;
    if (strcmp(name, "port") == 0) {
        if (parse_integer(value, 0, 65535, &v) != 0)
            return bad_usage("invalid port: %s (expected 0 to 65535)", value);
        h->port = (int)v;
        cli->port_given = 1;
    } else if (strcmp(name, "listen") == 0) {
        h->listen = value;
    } else if (strcmp(name, "storage") == 0) {
        h->storage = value;
    } else if (strcmp(name, "data") == 0) {
        h->data_dir = value;
    } else if (strcmp(name, "redis-prefix") == 0) {
        h->redis_prefix = value;
    } else if (strcmp(name, "redis-timeout") == 0) {
        if (parse_seconds(value, 10, 3600 * 1000, &h->redis_timeout_ms) != 0)
            return bad_usage("invalid --redis-timeout: %s (expected seconds, 0.01 to 3600)", value);
    } else if (strcmp(name, "redis-wait") == 0) {
        if (parse_redis_wait(value, h) != 0)
            return bad_usage("invalid --redis-wait: %s (expected N[,MS]: N 0 to 100 replicas, "
                             "MS 1 to 3600000 milliseconds)",
                             value);
    } else if (strcmp(name, "logging") == 0) {
        mph_log_level_t level;
        if (mph_log_parse_level(value, &level) != 0)
            return bad_usage("invalid logging level: %s", value);
        mph_log_level = level;
        h->debug_errors = level <= MPH_LOG_DEBUG;
        cli->log_level = value;
    } else if (strcmp(name, "max-retries") == 0) {
        if (parse_integer(value, 0, 1000000, &v) != 0)
            return bad_usage("invalid --max-retries: %s (expected 0 to 1000000)", value);
        h->max_retries = (int)v;
    } else if (strcmp(name, "scope-cache") == 0) {
        if (parse_bytes(value, &h->scope_cache) != 0)
            return bad_usage("invalid --scope-cache: %s (expected bytes, e.g. 64M; 0: no bound)",
                             value);
    } else if (strcmp(name, "max-body") == 0) {
        if (parse_integer(value, 1, 1 << 30, &v) != 0)
            return bad_usage("invalid --max-body: %s (expected 1 to 1073741824)", value);
        h->max_body = (size_t)v;
    } else if (strcmp(name, "max-header") == 0) {
        if (parse_integer(value, 256, 1 << 24, &v) != 0)
            return bad_usage("invalid --max-header: %s (expected 256 to 16777216)", value);
        h->max_header = (size_t)v;
    } else if (strcmp(name, "max-connections") == 0) {
        if (parse_integer(value, 1, 1000000, &v) != 0)
            return bad_usage("invalid --max-connections: %s (expected 1 to 1000000)", value);
        h->max_connections = (unsigned)v;
    } else if (strcmp(name, "idle-timeout") == 0) {
        if (parse_seconds(value, 10, 86400 * 1000, &h->idle_timeout_ms) != 0)
            return bad_usage("invalid --idle-timeout: %s (expected seconds, 0.01 to 86400)", value);
    } else if (strcmp(name, "handler-timeout") == 0) {
        if (parse_seconds(value, 0, 86400 * 1000, &h->handler_timeout_ms) != 0)
            return bad_usage("invalid --handler-timeout: %s (expected seconds, 0 to 86400)", value);
    } else if (strcmp(name, "shutdown-timeout") == 0) {
        if (parse_seconds(value, 0, 86400 * 1000, &h->shutdown_timeout_ms) != 0)
            return bad_usage("invalid --shutdown-timeout: %s (expected seconds, 0 to 86400)",
                             value);
    } else if (strcmp(name, "start-timeout") == 0) {
        if (parse_seconds(value, 100, 86400 * 1000, &cli->start_timeout_ms) != 0)
            return bad_usage("invalid --start-timeout: %s (expected seconds, 0.1 to 86400)", value);
    } else if (strcmp(name, "workers") == 0) {
        if (parse_integer(value, 0, MPH_MAX_WORKERS, &v) != 0)
            return bad_usage("invalid --workers: %s (expected 0 to 256)", value);
        cli->workers = (int)v;
    } else if (strcmp(name, "users") == 0) {
        if (*value == '\0')
            return bad_usage("%s", "--users needs a file");
        h->users_file = value;
    } else if (strcmp(name, "access-log") == 0) {
        if (*value == '\0')
            return bad_usage("%s", "--access-log needs a file, or - for stderr");
        h->access_log = value;
    } else if (strcmp(name, "url") == 0) {
        cli->url = value;
    } else {
        return bad_usage("unknown option --%s", name);
    }
    return 0;
}

/* Storage as given -> what the host takes; fills storage_desc. */
static int resolve_storage(mph_cli_t *cli)
{
    mph_host_config_t *h = &cli->host;
    if (strcmp(h->storage, "file") == 0) {
        /* Absolute, so that status means something from any directory; the directory may
         * not exist yet (the store creates it). */
        char cwd[4096];
        char *abs = realpath(h->data_dir, NULL);
        const char *rel = strncmp(h->data_dir, "./", 2) == 0 ? h->data_dir + 2 : h->data_dir;
        const char *prefix = "";
        if (abs == NULL && h->data_dir[0] != '/' && getcwd(cwd, sizeof(cwd)))
            prefix = cwd;
        size_t n = strlen(prefix) + strlen(abs ? abs : rel) + 8;
        cli->storage_desc = mph_xmalloc(n);
        snprintf(cli->storage_desc, n, "file:%s%s%s", abs ? "" : prefix, *prefix ? "/" : "",
                 abs ? abs : rel);
        free(abs);
        return 0;
    }
    if (strcmp(h->storage, "redis") == 0) {
        /* REDIS_HOST, REDIS_PORT, REDIS_PASSWORD -> a redis:// URL. */
        const char *host = getenv("REDIS_HOST"), *port = getenv("REDIS_PORT");
        const char *password = getenv("REDIS_PASSWORD");
        int v6 = host && strchr(host, ':'); /* REDIS_HOST=::1 -> redis://[::1]:6379 */
        snprintf(cli->storage_url, sizeof(cli->storage_url), "redis://%s%s%s%s%s%s:%s",
                 password && *password ? ":" : "", password && *password ? password : "",
                 password && *password ? "@" : "", v6 ? "[" : "",
                 host && *host ? host : "127.0.0.1", v6 ? "]" : "", port && *port ? port : "6379");
        h->storage = cli->storage_url;
    }
    static const char *const schemes[] = {"redis://", "redis-sentinel://"};
    for (int i = 0; i < 2; i++) {
        size_t len = strlen(schemes[i]);
        if (strncmp(h->storage, schemes[i], len) != 0)
            continue;
        /* What status shows: the URL without its password. */
        const char *at = strrchr(h->storage, '@');
        size_t n = strlen(h->storage) + 24;
        cli->storage_desc = mph_xmalloc(n);
        snprintf(cli->storage_desc, n, "%s%s", schemes[i], at ? at + 1 : h->storage + len);
        return 0;
    }
    char shown[sizeof(cli->storage_url)]; /* without the password */
    const char *at = cli->storage_password ? strrchr(h->storage, '@') : NULL;
    snprintf(shown, sizeof(shown), "%.*s%s",
             at ? (int)(strstr(h->storage, "://") + 3 - h->storage) : (int)strlen(h->storage),
             h->storage, at ? at + 1 : "");
    return bad_usage("unknown storage: %s (expected file, redis, redis://... or "
                     "redis-sentinel://...)",
                     shown);
}

/* A password in --storage's URL ("redis://:secret@host") must not stay in our command line,
 * which every local user can read (ps, /proc/PID/cmdline), nor in our workers': the URL is
 * copied into cli->storage_url, and the password is cut out of argv in place. A supervisor
 * hands it to its workers in their environment (MPH_STORAGE_PASSWORD_ENV: /proc/PID/environ
 * is readable by our own user only), and a worker puts it back (restore_storage_password).
 * What remains is the moment between exec and this call: REDIS_PASSWORD avoids even that. */
static int hide_storage_password(mph_cli_t *cli, char **argv)
{
    const char *storage = cli->host.storage;
    const char *scheme_end = strstr(storage, "://");
    const char *at = strrchr(storage, '@');
    if (scheme_end == NULL || at == NULL || at < scheme_end)
        return 0;
    if (strlen(storage) >= sizeof(cli->storage_url))
        return bad_usage("%s", "--storage: the URL is too long");
    snprintf(cli->storage_url, sizeof(cli->storage_url), "%s", storage);
    const char *pw = scheme_end + 3 + (scheme_end[3] == ':');
    cli->storage_password = mph_xstrndup(pw, (size_t)(at - pw));
    for (int i = 1; argv[i]; i++) {
        if (argv[i] + strlen("--storage=") != storage)
            continue;
        char *dst = argv[i] + (scheme_end + 3 - argv[i]); /* argv is ours to write */
        size_t tail = strlen(at + 1), old = strlen(dst);
        memmove(dst, at + 1, tail + 1);
        memset(dst + tail, 0, old - tail);
    }
    cli->host.storage = cli->storage_url;
    return 0;
}

/* A worker's side of hide_storage_password: the password its supervisor set aside comes back
 * into the URL, and leaves the environment (the script could read it there, and nothing the
 * worker starts needs it). */
static void restore_storage_password(mph_cli_t *cli)
{
    const char *pw = getenv(MPH_STORAGE_PASSWORD_ENV);
    const char *storage = cli->host.storage;
    const char *scheme_end = strstr(storage, "://");
    if (pw != NULL && scheme_end != NULL && strchr(storage, '@') == NULL) {
        char url[sizeof(cli->storage_url)];
        snprintf(url, sizeof(url), "%.*s:%s@%s", (int)(scheme_end + 3 - storage), storage, pw,
                 scheme_end + 3);
        memcpy(cli->storage_url, url, sizeof(url));
        cli->host.storage = cli->storage_url;
    }
    unsetenv(MPH_STORAGE_PASSWORD_ENV);
}

void mph_cli_report_failure(FILE *ready, const char *msg)
{
    if (ready) {
        fprintf(ready, "error %s\n", msg);
        fclose(ready);
    } else if (mph_log_level > MPH_LOG_ERROR) {
        fprintf(stderr, "mphost: %s\n", msg);
    }
}

int mph_cli_serve(mph_cli_t *cli, int ready_fd)
{
    char err[1024], msg[1100];
    mph_host_t *h = NULL;
    FILE *ready = ready_fd >= 0 ? fdopen(ready_fd, "w") : NULL;
    int rc = mph_host_new(&h, &cli->host, err, sizeof(err));
    int script_failed = 0;
    /* From the start: a SIGTERM that arrives once the port accepts (the pid file is written
     * after that) must mean a graceful stop, not the default death. */
    if (rc == 0)
        mph_host_handle_signals(h);
    if (rc == 0 && (rc = mph_host_load_file(h, cli->script_path, err, sizeof(err))) != 0)
        script_failed = 1;
    if (rc != 0) {
        snprintf(msg, sizeof(msg), "%s%s", script_failed ? "script error: " : "", err);
        mph_log(MPH_LOG_ERROR, "%s", msg);
        mph_cli_report_failure(ready, msg);
        if (h)
            mph_host_free(h);
        return 1;
    }
    int nworkers = mph_host_topology_workers(h);
    if (cli->workers != 0) {
        /* Workers: this process becomes their supervisor. Its host only read the script's
         * topologies (and checked that the script loads); each worker loads its own. */
        if (cli->workers > 0 && cli->workers < nworkers)
            mph_log(MPH_LOG_WARN, "--workers=%d raised to %d: the script's topologies need %d",
                    cli->workers, nworkers, nworkers);
        if (cli->workers > nworkers)
            nworkers = cli->workers;
        int stop = mph_host_stop_requested(h); /* a SIGTERM during the load is not lost */
        mph_host_free(h);
        if (stop) {
            mph_log(MPH_LOG_INFO, "stopped before serving");
            if (ready) {
                fprintf(ready, "error stopped before serving\n");
                fclose(ready);
            }
            return 0;
        }
        return mph_supervisor_run(cli, nworkers > 0 ? nworkers : 1, ready);
    }
    if (nworkers > 1) /* --workers=0 */
        mph_log(MPH_LOG_WARN,
                "--workers=0: serving in one process, although the script's topologies ask for "
                "%d workers",
                nworkers);
    if ((rc = mph_host_listen(h, err, sizeof(err))) != 0) {
        mph_log(MPH_LOG_ERROR, "%s", err);
        mph_cli_report_failure(ready, err);
        mph_host_free(h);
        return 1;
    }
    int port = mph_host_port(h);
    const char *log_path = getenv("MPH_LOG_PATH");
    cli->started = (long long)time(NULL);
    if (cli->state_dir &&
        mph_cli_write_pidfile(cli, port, log_path, NULL, 0, err, sizeof(err)) != 0) {
        mph_log(MPH_LOG_ERROR, "%s", err);
        if (ready) { /* a deployment that delete and status cannot find must not run */
            fprintf(ready, "error %s\n", err);
            fclose(ready);
            mph_host_free(h);
            return 1;
        }
    }
    mph_log(MPH_LOG_INFO, "serving %s on %s:%d (pid %d, storage %s)", cli->script, cli->host.listen,
            port, (int)getpid(), cli->storage_desc);
    if (ready) {
        fprintf(ready, "ready %d\n", port);
        fclose(ready);
    }
    /* Under systemd's Type=notify (NOTIFY_SOCKET set; otherwise it does nothing). The host
     * library does not tell when a stop begins, so STOPPING=1 comes once it has drained. */
    sd_notifyf(0, "READY=1\nSTATUS=serving %s on port %d", cli->script, port);
    mph_host_run(h);
    sd_notify(0, "STOPPING=1");
    mph_host_free(h);
    if (cli->state_dir)
        mph_cli_remove_pidfile(cli, port);
    mph_log(MPH_LOG_INFO, "stopped");
    return 0;
}

int main(int argc, char **argv)
{
    /* The library leaves signal dispositions to its embedder (mphost.h); this program wants
     * a write to a vanished client or a full file to be an error, not death. */
    signal(SIGPIPE, SIG_IGN);
    signal(SIGXFSZ, SIG_IGN);
    mph_cli_t cli;
    memset(&cli, 0, sizeof(cli));
    mph_host_config_default(&cli.host);
    cli.params = "[{}]";
    cli.argv = argv;
    cli.url = "http://127.0.0.1:3000/";
    cli.workers = -1;
    cli.start_timeout_ms = 60000;

    cli.host.log_path = getenv("MPH_LOG_PATH"); /* set by deploy: SIGUSR1 reopens it */
    const char *env = getenv("MP_PORT");
    if (env && apply_option(&cli, "port", env) != 0)
        return 1;
    env = getenv("MP_DATA");
    if (env)
        cli.host.data_dir = env;

    const char *positional[4];
    int npos = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(usage, stdout);
            return 0;
        }
        if (strcmp(a, "--version") == 0) {
            printf("mphost %s\n", MPHOST_VERSION);
            return 0;
        }
        if (strcmp(a, "-f") == 0) { /* logs -f */
            cli.follow = 1;
            continue;
        }
        if (strncmp(a, "--", 2) == 0) {
            const char *eq = strchr(a, '=');
            char name[64];
            const char *value;
            if (eq) {
                snprintf(name, sizeof(name), "%.*s", (int)(eq - a - 2), a + 2);
                value = eq + 1;
            } else if (strcmp(a, "--url") == 0 && i + 1 < argc) {
                snprintf(name, sizeof(name), "url");
                value = argv[++i];
            } else {
                return bad_usage("option %s needs a value (--name=value)", a);
            }
            if (apply_option(&cli, name, value) != 0)
                return 1;
            continue;
        }
        if (npos == 4)
            return bad_usage("unexpected argument: %s", a);
        positional[npos++] = a;
    }
    if (hide_storage_password(&cli, argv) != 0)
        return 1;
    if (npos == 0) {
        fputs(usage, stderr);
        return 1;
    }

    if (strcmp(positional[0], "call") == 0) {
        if (npos < 2 || npos > 3)
            return bad_usage("%s", "usage: mphost call METHOD [JSON] [--url URL]");
        cli.method = positional[1];
        if (npos == 3)
            cli.params = positional[2];
        return mph_cli_call(&cli);
    }
    if (strcmp(positional[0], "passwd") == 0) {
        if (npos != 3)
            return bad_usage("%s", "usage: mphost passwd FILE USER");
        return mph_cli_passwd(positional[1], positional[2]);
    }

    if (strcmp(positional[0], "list") == 0 && npos == 1) {
        char err[1200];
        int rc = mph_cli_open_state_dir(&cli, err, sizeof(err));
        if (rc != 0)
            fprintf(stderr, "mphost: %s\n", err);
        else
            rc = mph_cli_list(&cli);
        free(cli.state_dir);
        return rc ? 1 : 0;
    }

    cli.script = positional[0];
    cli.verb = npos > 1 ? positional[1] : "deploy";
    int serve = strcmp(cli.verb, "serve") == 0;
    if (npos > (serve ? 3 : 2))
        return bad_usage("unexpected argument: %s", positional[npos - 1]);
    if (serve && npos == 3 && apply_option(&cli, "port", positional[2]) != 0)
        return 1;
    if (cli.follow && strcmp(cli.verb, "logs") != 0)
        return bad_usage("%s", "-f is an option of logs");
    cli.script_path = realpath(cli.script, NULL);
    int managing = strcmp(cli.verb, "delete") == 0 || strcmp(cli.verb, "status") == 0 ||
                   strcmp(cli.verb, "reload") == 0 || strcmp(cli.verb, "logs") == 0;
    if (cli.script_path == NULL && !managing) {
        fprintf(stderr, "mphost: cannot open script %s: %s\n", cli.script, strerror(errno));
        return 1;
    }
    if (cli.script_path == NULL) /* a deleted script can still be stopped by its path */
        cli.script_path = mph_xstrdup(cli.script);
    int rc = 1;
    if (resolve_storage(&cli) != 0)
        goto out;
    char err[1200];
    /* A worker of a supervisor (supervisor.h): the supervisor keeps the pid file. */
    const char *worker = serve ? getenv(MPH_WORKER_ENV) : NULL;
    if (worker)
        restore_storage_password(&cli);
    if (worker == NULL && mph_cli_open_state_dir(&cli, err, sizeof(err)) != 0) {
        if (!serve) {
            fprintf(stderr, "mphost: %s\n", err);
            goto out;
        }
        /* In the foreground the pid file only lets status see this server: go without. */
        mph_log(MPH_LOG_WARN, "%s; serving without a pid file", err);
    }

    if (worker)
        rc = mph_worker_serve(&cli, worker);
    else if (serve)
        rc = mph_cli_serve(&cli, -1);
    else if (strcmp(cli.verb, "deploy") == 0)
        rc = mph_cli_deploy(&cli);
    else if (strcmp(cli.verb, "delete") == 0)
        rc = mph_cli_delete(&cli);
    else if (strcmp(cli.verb, "status") == 0)
        rc = mph_cli_status(&cli);
    else if (strcmp(cli.verb, "reload") == 0)
        rc = mph_cli_reload(&cli);
    else if (strcmp(cli.verb, "logs") == 0)
        rc = mph_cli_logs(&cli);
    else
        rc = bad_usage("unknown command: %s", cli.verb);
out:
    free(cli.storage_password);
    free(cli.script_path);
    free(cli.storage_desc);
    free(cli.state_dir);
    return rc;
}
