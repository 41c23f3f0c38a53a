/*
 * statedir.c: the state directory and the files in it (cli.h). A deployment is identified by
 * the script's canonical path and its port; its pid file, log, lock and socket directory live
 * in the state directory under a name made of a hash of that path and the port, so `delete`
 * and `status` find it from any directory. deploy.c's verbs and the supervisor both use it.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "common/common.h"

/* Refuses a state directory another user could have planted or can write into: mphost (often
 * root) writes its pid and log files there and signals the pids it reads back. One others may
 * read is fine (DESIGN.md refuses "writable by group or others"): its files are 0600 and its
 * sockets sit in a 0700 directory of their own. */
static int check_state_dir(const char *dir, char *err, size_t errlen)
{
    if (mkdir(dir, 0700) == 0) {
        chmod(dir, 0700); /* whatever the umask took away: ours must stay usable */
    } else if (errno != EEXIST) {
        snprintf(err, errlen, "cannot create the state directory %s: %s", dir, strerror(errno));
        return MPH_EIO;
    }
    return mph_check_dir(dir, "the state directory", 0, err, errlen);
}

/* Whether $HOME is a directory of ours that nobody else can write into: then nobody else can
 * make a name in it first, as anyone can in /tmp. */
static int home_is_ours(const char *home)
{
    struct stat st;
    return home && home[0] == '/' && stat(home, &st) == 0 && S_ISDIR(st.st_mode) &&
           st.st_uid == geteuid() && (st.st_mode & 022) == 0;
}

/* $MP_STATE_DIR, else $XDG_RUNTIME_DIR/mphost, else $HOME/.mphost when HOME is ours, else
 * /tmp/mphost-UID: the last is a name another user can take first (it is then refused, and
 * MP_STATE_DIR is the way out), so it is only for users without a home of their own. */
int mph_cli_open_state_dir(mph_cli_t *cli, char *err, size_t errlen)
{
    char buf[4096];
    const char *env = getenv("MP_STATE_DIR");
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    const char *home = getenv("HOME");
    if (env && *env)
        snprintf(buf, sizeof(buf), "%s", env);
    else if (xdg && *xdg)
        snprintf(buf, sizeof(buf), "%s/mphost", xdg);
    else if (home_is_ours(home))
        snprintf(buf, sizeof(buf), "%s/.mphost", home);
    else
        snprintf(buf, sizeof(buf), "/tmp/mphost-%u", (unsigned)geteuid());
    int rc = check_state_dir(buf, err, errlen);
    if (rc == 0)
        cli->state_dir = mph_xstrdup(buf);
    return rc;
}

/* Files of the state directory are opened without following a symbolic link (the directory is
 * ours, but a link in it must not redirect a write) and are never inherited by a child. */
int mph_cli_open_state_file(const char *path, int flags)
{
    return open(path, flags | O_NOFOLLOW | O_CLOEXEC, 0600);
}

FILE *mph_cli_fopen_state_file(const char *path)
{
    int fd = mph_cli_open_state_file(path, O_RDONLY);
    FILE *f = fd >= 0 ? fdopen(fd, "r") : NULL;
    if (f == NULL && fd >= 0)
        close(fd);
    return f;
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

/* "<state dir>/<hash of the script path>", the stem of every file of the script. New string. */
static char *deployment_prefix(const mph_cli_t *cli)
{
    char *p = mph_xmalloc(strlen(cli->state_dir) + 32);
    sprintf(p, "%s/%016llx", cli->state_dir, (unsigned long long)path_hash(cli->script_path));
    return p;
}

char *mph_cli_deployment_file(const mph_cli_t *cli, int port, const char *ext)
{
    char *prefix = deployment_prefix(cli);
    char *p = mph_xmalloc(strlen(prefix) + strlen(ext) + 16);
    sprintf(p, "%s-%d%s", prefix, port, ext);
    free(prefix);
    return p;
}

int mph_cli_lock_script(const mph_cli_t *cli, char *err, size_t errlen)
{
    char *prefix = deployment_prefix(cli);
    char *path = mph_xmalloc(strlen(prefix) + 8);
    sprintf(path, "%s.lock", prefix);
    free(prefix);
    int fd = mph_cli_open_state_file(path, O_RDWR | O_CREAT);
    if (fd < 0) {
        snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
    } else {
        int rc;
        while ((rc = flock(fd, LOCK_EX)) != 0 && errno == EINTR)
            ;
        if (rc != 0) {
            snprintf(err, errlen, "cannot lock %s: %s", path, strerror(errno));
            close(fd);
            fd = -1;
        }
    }
    free(path);
    return fd;
}

int mph_cli_write_pidfile(const mph_cli_t *cli, int port, const char *log_path,
                          const mph_cli_worker_t *workers, int nworkers, char *err, size_t errlen)
{
    char *path = mph_cli_deployment_file(cli, port, ".pid");
    char *tmp = mph_xmalloc(strlen(path) + 32);
    sprintf(tmp, "%s.%d.tmp", path, (int)getpid());
    /* A fresh file renamed over the old one: a reader never sees half of it, and a symbolic
     * link planted at either name is replaced, never written through. */
    int fd = mph_cli_open_state_file(tmp, O_WRONLY | O_CREAT | O_EXCL);
    FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
    int rc = MPH_EIO;
    if (f) {
        fprintf(f, "pid=%d\nport=%d\nscript=%s\nstorage=%s\nstarted=%lld\nlog=%s\n", (int)getpid(),
                port, cli->script_path, cli->storage_desc,
                cli->started ? cli->started : (long long)time(NULL),
                log_path ? log_path : "(stderr)");
        for (int i = 0; i < nworkers; i++)
            fprintf(f, "worker=%d %d %lld %d\n", workers[i].id, workers[i].pid, workers[i].started,
                    workers[i].restarts);
        int ok = fflush(f) == 0 && fsync(fd) == 0; /* a full disk shows here, or at close */
        ok = fclose(f) == 0 && ok && rename(tmp, path) == 0;
        rc = ok ? 0 : MPH_EIO;
    } else if (fd >= 0) {
        close(fd);
    }
    if (rc != 0) {
        snprintf(err, errlen, "cannot write the pid file %s: %s", path, strerror(errno));
        unlink(tmp);
    }
    free(tmp);
    free(path);
    return rc;
}

void mph_cli_remove_pidfile(const mph_cli_t *cli, int port)
{
    char *path = mph_cli_deployment_file(cli, port, ".pid");
    /* Only our own: a later deployment on the same port may have replaced it. */
    FILE *f = mph_cli_fopen_state_file(path);
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

static int read_pidfile(const char *path, mph_cli_deployment_t *d)
{
    FILE *f = mph_cli_fopen_state_file(path);
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
        else if (strncmp(line, "script=", 7) == 0)
            snprintf(d->script, sizeof(d->script), "%s", line + 7);
        else if (strncmp(line, "worker=", 7) == 0 && d->nworkers < MPH_MAX_WORKERS) {
            mph_cli_worker_t *w = &d->workers[d->nworkers];
            if (sscanf(line + 7, "%d %d %lld %d", &w->id, &w->pid, &w->started, &w->restarts) == 4)
                d->nworkers++;
        }
    }
    fclose(f);
    return d->pid > 0 ? 0 : -1;
}

int mph_cli_is_alive_mphost(int pid)
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
    buf[n] = '\0';
    /* Any argument, not only argv[0]: a server run under a tool (valgrind mphost ...) is one
     * too. The arguments are NUL-separated. */
    for (size_t at = 0; at < n; at += strlen(buf + at) + 1)
        if (strstr(buf + at, "mphost") != NULL)
            return 1;
    return 0;
}

int mph_cli_scan_deployments(const char *dir, const char *base, int port,
                             mph_cli_deployment_t **out)
{
    mph_cli_deployment_t *list = NULL;
    int n = 0;
    DIR *d = opendir(dir);
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL) {
        size_t blen = base ? strlen(base) : 0, nlen = strlen(e->d_name);
        if ((base && (strncmp(e->d_name, base, blen) != 0 || e->d_name[blen] != '-')) || nlen < 5 ||
            strcmp(e->d_name + nlen - 4, ".pid") != 0)
            continue;
        char path[2048];
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        mph_cli_deployment_t dep;
        if (read_pidfile(path, &dep) != 0)
            continue;
        if (port && dep.port != port)
            continue;
        if (!mph_cli_is_alive_mphost(dep.pid)) {
            unlink(path); /* stale: the process died without cleaning up */
            continue;
        }
        list = mph_xrealloc(list, (size_t)(n + 1) * sizeof(*list));
        list[n++] = dep;
    }
    if (d)
        closedir(d);
    *out = list;
    return n;
}

int mph_cli_find_deployments(const mph_cli_t *cli, mph_cli_deployment_t **out)
{
    char *prefix = deployment_prefix(cli);
    char *slash = strrchr(prefix, '/');
    *slash = '\0';
    int n = mph_cli_scan_deployments(prefix, slash + 1, cli->port_given ? cli->host.port : 0, out);
    free(prefix);
    return n;
}
