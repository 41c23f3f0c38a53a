/*
 * deploy.c: background deployments. A deployment is identified by the script's canonical
 * path and its port; its pid file and log live in the state directory under a name made of
 * a hash of that path and the port, so `delete` and `status` find it from any directory.
 *
 * deploy forks; the child starts a new session, sends its output to the log and serves;
 * once it listens (or fails) it writes one line on a pipe, "ready PORT" or "error MESSAGE",
 * which the parent waits for. So `mphost SCRIPT` returns exactly when the port accepts
 * connections, or prints why it never will.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "common.h"

#define STARTUP_TIMEOUT_MS 60000

char *mph_cli_state_dir(void)
{
    char buf[4096];
    const char *env = getenv("MP_STATE_DIR");
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    if (env && *env)
        snprintf(buf, sizeof(buf), "%s", env);
    else if (xdg && *xdg)
        snprintf(buf, sizeof(buf), "%s/mphost", xdg);
    else
        snprintf(buf, sizeof(buf), "/tmp/mphost-%u", (unsigned)getuid());
    mkdir(buf, 0700);
    return mph_xstrdup(buf);
}

static uint64_t path_hash(const char *s)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ULL;
    }
    return h;
}

static char *deployment_prefix(const char *script_path)
{
    char *dir = mph_cli_state_dir();
    char *p = mph_xmalloc(strlen(dir) + 32);
    sprintf(p, "%s/%016llx", dir, (unsigned long long)path_hash(script_path));
    free(dir);
    return p;
}

char *mph_cli_deployment_file(const char *script_path, int port, const char *ext)
{
    char *prefix = deployment_prefix(script_path);
    char *p = mph_xmalloc(strlen(prefix) + strlen(ext) + 16);
    sprintf(p, "%s-%d%s", prefix, port, ext);
    free(prefix);
    return p;
}

int mph_cli_write_pidfile(const mph_cli_t *cli, int port, const char *log_path)
{
    char *path = mph_cli_deployment_file(cli->script_path, port, ".pid");
    char *tmp = mph_xmalloc(strlen(path) + 8);
    sprintf(tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    int rc = -1;
    if (f) {
        fprintf(f, "pid=%d\nport=%d\nscript=%s\nstorage=%s\nstarted=%lld\nlog=%s\n", (int)getpid(),
                port, cli->script_path, cli->storage_desc, (long long)time(NULL),
                log_path ? log_path : "(stderr)");
        rc = fclose(f) == 0 && rename(tmp, path) == 0 ? 0 : -1;
    }
    if (rc != 0)
        mph_log(MPH_LOG_WARN, "cannot write pid file %s: %s", path, strerror(errno));
    free(tmp);
    free(path);
    return rc;
}

void mph_cli_remove_pidfile(const mph_cli_t *cli, int port)
{
    char *path = mph_cli_deployment_file(cli->script_path, port, ".pid");
    /* Only our own: a later deployment on the same port may have replaced it. */
    FILE *f = fopen(path, "r");
    int pid = 0;
    if (f) {
        if (fscanf(f, "pid=%d", &pid) != 1)
            pid = 0;
        fclose(f);
    }
    if (pid == (int)getpid())
        unlink(path);
    free(path);
}

typedef struct {
    int pid;
    int port;
    long long started;
    char storage[2048];
    char log[2048];
    char path[4096]; /* the pid file */
} deployment_t;

static int read_pidfile(const char *path, deployment_t *d)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return -1;
    memset(d, 0, sizeof(*d));
    snprintf(d->path, sizeof(d->path), "%s", path);
    char line[1200];
    while (fgets(line, sizeof(line), f)) {
        line[strcspn(line, "\n")] = '\0';
        if (strncmp(line, "pid=", 4) == 0)
            d->pid = atoi(line + 4);
        else if (strncmp(line, "port=", 5) == 0)
            d->port = atoi(line + 5);
        else if (strncmp(line, "started=", 8) == 0)
            d->started = atoll(line + 8);
        else if (strncmp(line, "storage=", 8) == 0)
            snprintf(d->storage, sizeof(d->storage), "%s", line + 8);
        else if (strncmp(line, "log=", 4) == 0)
            snprintf(d->log, sizeof(d->log), "%s", line + 4);
    }
    fclose(f);
    return d->pid > 0 ? 0 : -1;
}

/* Is pid a live (not zombie) mphost process? Guards against a recycled pid. */
static int is_alive_mphost(int pid)
{
    char path[64], buf[4096];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *close_paren = strrchr(buf, ')');
    if (close_paren == NULL || close_paren[1] == '\0' || close_paren[2] == 'Z')
        return 0;
    snprintf(path, sizeof(path), "/proc/%d/cmdline", pid);
    f = fopen(path, "r");
    if (f == NULL)
        return 0;
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0'; /* argv[0] */
    return strstr(buf, "mphost") != NULL;
}

/* Finds the deployments of cli's script (all ports, or the one port given). */
static int find_deployments(const mph_cli_t *cli, deployment_t **out)
{
    deployment_t *list = NULL;
    int n = 0;
    char *prefix = deployment_prefix(cli->script_path);
    char *slash = strrchr(prefix, '/');
    *slash = '\0';
    const char *dir = prefix, *base = slash + 1;
    DIR *d = opendir(dir);
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL) {
        size_t blen = strlen(base), nlen = strlen(e->d_name);
        if (strncmp(e->d_name, base, blen) != 0 || e->d_name[blen] != '-' || nlen < 5 ||
            strcmp(e->d_name + nlen - 4, ".pid") != 0)
            continue;
        char path[2048];
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        deployment_t dep;
        if (read_pidfile(path, &dep) != 0)
            continue;
        if (cli->port_given && dep.port != cli->host.port)
            continue;
        if (!is_alive_mphost(dep.pid)) {
            unlink(path); /* stale: the process died without cleaning up */
            continue;
        }
        list = mph_xrealloc(list, (size_t)(n + 1) * sizeof(*list));
        list[n++] = dep;
    }
    if (d)
        closedir(d);
    free(prefix);
    *out = list;
    return n;
}

int mph_cli_status(mph_cli_t *cli)
{
    deployment_t *deps;
    int n = find_deployments(cli, &deps);
    if (n == 0) {
        printf("%s: not running\n", cli->script);
        return 3;
    }
    for (int i = 0; i < n; i++) {
        long long up = (long long)time(NULL) - deps[i].started;
        printf("%s: running, pid %d, port %d, storage %s, uptime %llds, log %s\n", cli->script,
               deps[i].pid, deps[i].port, deps[i].storage, up, deps[i].log);
    }
    free(deps);
    return 0;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int mph_cli_delete(mph_cli_t *cli)
{
    deployment_t *deps;
    int n = find_deployments(cli, &deps);
    if (n == 0) {
        fprintf(stderr, "mphost: %s is not running\n", cli->script);
        return 0;
    }
    int rc = 0;
    /* The server's own graceful stop is bounded by its shutdown timeout; allow for it. */
    int wait_ms = (int)cli->host.shutdown_timeout_ms + 5000;
    for (int i = 0; i < n; i++) {
        kill(deps[i].pid, SIGTERM);
        int waited = 0;
        while (is_alive_mphost(deps[i].pid) && waited < wait_ms) {
            sleep_ms(10);
            waited += 10;
        }
        if (is_alive_mphost(deps[i].pid)) {
            fprintf(stderr, "mphost: pid %d did not stop in %d ms; killing it\n", deps[i].pid,
                    wait_ms);
            kill(deps[i].pid, SIGKILL);
            rc = 1;
        }
        unlink(deps[i].path);
    }
    free(deps);
    return rc;
}

/* Prints the last lines of a log file to stderr (why a deployment did not start). */
static void print_log_tail(const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return;
    char buf[4096];
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, size > (long)sizeof(buf) - 1 ? size - (long)sizeof(buf) + 1 : 0, SEEK_SET);
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    fprintf(stderr, "%s", buf);
}

int mph_cli_deploy(mph_cli_t *cli)
{
    deployment_t *deps;
    cli->port_given = 1; /* the configured port (default 3000) identifies the deployment */
    int n = find_deployments(cli, &deps);
    if (n > 0) {
        fprintf(stderr,
                "mphost: %s is already running on port %d (pid %d); "
                "use 'mphost %s delete' first\n",
                cli->script, deps[0].port, deps[0].pid, cli->script);
        free(deps);
        return 1;
    }
    char *log_path = mph_cli_deployment_file(cli->script_path, cli->host.port, ".log");
    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) != 0) {
        fprintf(stderr, "mphost: pipe: %s\n", strerror(errno));
        free(log_path);
        return 1;
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "mphost: fork: %s\n", strerror(errno));
        free(log_path);
        return 1;
    }
    if (pid == 0) {
        /* Child: a daemon of its own session, output to the log. */
        close(pipefd[0]);
        setsid();
        int devnull = open("/dev/null", O_RDONLY);
        int log = open(log_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (devnull >= 0)
            dup2(devnull, 0);
        if (log >= 0) {
            dup2(log, 1);
            dup2(log, 2);
        }
        if (devnull > 2)
            close(devnull);
        if (log > 2)
            close(log);
        setenv("MPH_LOG_PATH", log_path, 1);
        int rc = mph_cli_serve(cli, pipefd[1]);
        fflush(NULL);
        _exit(rc);
    }
    close(pipefd[1]);
    char line[2048];
    size_t len = 0;
    int waited = 0;
    while (len < sizeof(line) - 1 && waited < STARTUP_TIMEOUT_MS) {
        struct pollfd p = {pipefd[0], POLLIN, 0};
        int r = poll(&p, 1, 100);
        waited += 100;
        if (r <= 0)
            continue;
        ssize_t got = read(pipefd[0], line + len, sizeof(line) - 1 - len);
        if (got <= 0)
            break;
        len += (size_t)got;
        if (memchr(line, '\n', len))
            break;
    }
    close(pipefd[0]);
    line[len] = '\0';
    line[strcspn(line, "\n")] = '\0';
    int rc = 1;
    if (strncmp(line, "ready ", 6) == 0) {
        rc = 0;
    } else if (strncmp(line, "error ", 6) == 0) {
        fprintf(stderr, "mphost: %s\n", line + 6);
    } else if (waited >= STARTUP_TIMEOUT_MS) {
        fprintf(stderr, "mphost: %s did not start within %d s; see %s\n", cli->script,
                STARTUP_TIMEOUT_MS / 1000, log_path);
    } else {
        fprintf(stderr, "mphost: %s exited during startup; its log (%s) ends with:\n", cli->script,
                log_path);
        print_log_tail(log_path);
    }
    free(log_path);
    return rc;
}
