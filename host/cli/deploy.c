/*
 * deploy.c: the verbs on deployments: deploy, delete, status, list, logs, reload. Where a
 * deployment's files are, and what its pid file says: statedir.c.
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
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "common/common.h"
#include "control.h"
#include "supervisor.h"

int mph_cli_list(mph_cli_t *cli)
{
    mph_cli_deployment_t *deps;
    int n = mph_cli_scan_deployments(cli->state_dir, NULL, 0, &deps);
    long long now = (long long)time(NULL);
    for (int i = 0; i < n; i++)
        printf("%s: port %d, pid %d, storage %s, uptime %llds\n", deps[i].script, deps[i].port,
               deps[i].pid, deps[i].storage, now - deps[i].started);
    free(deps);
    return 0;
}

int mph_cli_status(mph_cli_t *cli)
{
    mph_cli_deployment_t *deps;
    int n = mph_cli_find_deployments(cli, &deps);
    if (n == 0) {
        printf("%s: not running\n", cli->script);
        return 3;
    }
    long long now = (long long)time(NULL);
    for (int i = 0; i < n; i++) {
        const mph_cli_deployment_t *d = &deps[i];
        printf("%s: running, pid %d, port %d, storage %s, uptime %llds, log %s", cli->script,
               d->pid, d->port, d->storage, now - d->started, d->log);
        if (d->nworkers > 0) /* a supervisor (the pid above) and its workers */
            printf(", %d %s", d->nworkers, MPH_WORKERS_WORD(d->nworkers));
        printf("\n");
        for (int j = 0; j < d->nworkers; j++) {
            const mph_cli_worker_t *w = &d->workers[j];
            if (w->pid > 0)
                printf("  worker %d: pid %d, uptime %llds, restarts %d\n", w->id, w->pid,
                       now - w->started, w->restarts);
            else
                printf("  worker %d: being replaced, restarts %d\n", w->id, w->restarts);
        }
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
    char err[1200];
    int lock = mph_cli_lock_script(cli, err, sizeof(err)); /* waits for a deploy still starting */
    if (lock < 0) {
        fprintf(stderr, "mphost: %s\n", err);
        return 1;
    }
    mph_cli_deployment_t *deps;
    int n = mph_cli_find_deployments(cli, &deps);
    if (n == 0) {
        fprintf(stderr, "mphost: %s is not running\n", cli->script);
        close(lock);
        return 0;
    }
    int rc = 0;
    /* The server's own graceful stop is bounded by its shutdown timeout; allow for it. */
    int wait_ms = (int)cli->host.shutdown_timeout_ms + 5000;
    for (int i = 0; i < n; i++) {
        kill(deps[i].pid, SIGTERM);
        int waited = 0;
        while (mph_cli_is_alive_mphost(deps[i].pid) && waited < wait_ms) {
            sleep_ms(10);
            waited += 10;
        }
        if (mph_cli_is_alive_mphost(deps[i].pid)) {
            fprintf(stderr, "mphost: pid %d did not stop in %d ms; killing it\n", deps[i].pid,
                    wait_ms);
            kill(deps[i].pid, SIGKILL);
            rc = 1;
        }
        unlink(deps[i].path);
    }
    free(deps);
    close(lock);
    return rc;
}

/* Sends command to the supervisor of dep (its socket directory is named after its port). */
static int control_request(const mph_cli_t *cli, const mph_cli_deployment_t *dep,
                           const char *command, unsigned timeout_ms, char *reply, size_t len)
{
    char *dir = mph_cli_deployment_file(cli, dep->port, ".sockets");
    int rc = mph_control_request(dir, dep->pid, command, timeout_ms, reply, len);
    free(dir);
    return rc;
}

int mph_cli_reload(mph_cli_t *cli)
{
    char err[1200];
    int lock = mph_cli_lock_script(cli, err, sizeof(err)); /* a deploy or delete of it runs first */
    if (lock < 0) {
        fprintf(stderr, "mphost: %s\n", err);
        return 1;
    }
    mph_cli_deployment_t *deps;
    int n = mph_cli_find_deployments(cli, &deps);
    if (n == 0)
        fprintf(stderr, "mphost: %s is not running\n", cli->script);
    int rc = n > 0 ? 0 : 1;
    /* The supervisor answers once the new workers serve and the old ones are gone: it waits
     * for them to start, then for the old ones' graceful stop. */
    unsigned wait_ms =
        MPH_RELOAD_START_MS + cli->host.shutdown_timeout_ms + MPH_KILL_GRACE_MS + 5000;
    for (int i = 0; i < n; i++) {
        char reply[1200];
        if (deps[i].nworkers == 0) {
            fprintf(stderr,
                    "mphost: %s on port %d runs as one process (--workers=0), which cannot "
                    "reload; delete it and deploy it again\n",
                    cli->script, deps[i].port);
            rc = 1;
        } else if (control_request(cli, &deps[i], "reload", wait_ms, reply, sizeof(reply)) != 0) {
            fprintf(stderr, "mphost: %s on port %d: %s\n", cli->script, deps[i].port, reply);
            rc = 1;
        } else if (strncmp(reply, "ok", 2) != 0) {
            fprintf(stderr, "mphost: %s\n", strncmp(reply, "error ", 6) == 0 ? reply + 6 : reply);
            rc = 1;
        }
    }
    free(deps);
    close(lock);
    return rc;
}

/* Prints the last lines of a log file to stderr (why a deployment did not start). */
static void print_log_tail(const char *path)
{
    FILE *f = mph_cli_fopen_state_file(path);
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

/* Closes every descriptor above 2 but `keep`: a daemon holds nothing of its caller's (a
 * pipe the caller reads to EOF would otherwise stay open for as long as the server runs). */
static void close_inherited_fds(int keep)
{
    if (close_range(3, (unsigned)keep - 1, 0) == 0 && close_range((unsigned)keep + 1, ~0U, 0) == 0)
        return;
    long max = sysconf(_SC_OPEN_MAX); /* kernels before 5.9 have no close_range */
    for (int fd = 3; fd < (max > 0 && max < 65536 ? max : 65536); fd++)
        if (fd != keep)
            close(fd);
}

/* The forked child: detaches from the caller (session, stdin, stdout, stderr and every other
 * descriptor), sends its output to the log and serves. What goes wrong before serving is
 * reported on the ready pipe, so the caller never waits on a descriptor the child kept. */
static void deploy_child(mph_cli_t *cli, int ready_fd, const char *log_path)
{
    setsid();
    /* The ready pipe must not sit on 0, 1 or 2, which are replaced next. */
    int ready = fcntl(ready_fd, F_DUPFD_CLOEXEC, 3);
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (ready < 0 || devnull < 0)
        _exit(1); /* the caller sees the pipe close and says the startup failed */
    dup2(devnull, 0);
    dup2(devnull, 1);
    dup2(devnull, 2);
    close_inherited_fds(ready);
    int log = mph_cli_open_state_file(log_path, O_WRONLY | O_CREAT | O_APPEND);
    if (log < 0) {
        dprintf(ready, "error cannot open the log file %s: %s\n", log_path,
                errno == ELOOP ? "it is a symbolic link" : strerror(errno));
        _exit(1);
    }
    dup2(log, 1);
    dup2(log, 2);
    close(log);
    setenv("MPH_LOG_PATH", log_path, 1);
    int rc = mph_cli_serve(cli, ready);
    fflush(NULL);
    _exit(rc);
}

/* Stops a deployment that did not report within the start timeout: left running, it would
 * serve with no pid file (it writes one only once it listens), which status and delete could
 * not find, and hold the port. SIGTERM first (a supervisor then stops its workers); SIGKILL
 * after MPH_KILL_GRACE_MS (a script stuck in a loop at load hears no signal); its workers die
 * with it (supervisor.h). */
static void stop_unready(pid_t pid)
{
    kill(pid, SIGTERM);
    for (int waited = 0; waited < MPH_KILL_GRACE_MS; waited += 10) {
        if (waitpid(pid, NULL, WNOHANG) == pid)
            return;
        sleep_ms(10);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

/* A pid file that is not a plain file (a planted link, a directory) is refused before anything
 * is started, with its name: status and delete would not see the deployment. */
static int check_plain_or_absent(const char *path, char *err, size_t errlen)
{
    struct stat st;
    if (lstat(path, &st) != 0 || S_ISREG(st.st_mode))
        return 0;
    snprintf(err, errlen, "%s is %s, not a file; refusing to use it", path,
             S_ISLNK(st.st_mode) ? "a symbolic link" : "something else");
    return MPH_EINVAL;
}

int mph_cli_deploy(mph_cli_t *cli)
{
    char err[1200], line[2048];
    char *log_path = mph_cli_deployment_file(cli, cli->host.port, ".log");
    char *pid_path = mph_cli_deployment_file(cli, cli->host.port, ".pid");
    int lock = -1, pipefd[2] = {-1, -1}, rc = 1;
    if (check_plain_or_absent(pid_path, err, sizeof(err)) != 0)
        goto fail; /* (the child refuses a link at the log's name when it opens it) */
    if ((lock = mph_cli_lock_script(cli, err, sizeof(err))) < 0)
        goto fail;
    mph_cli_deployment_t *deps;
    cli->port_given = 1; /* the configured port (default 3000) identifies the deployment */
    if (mph_cli_find_deployments(cli, &deps) > 0) {
        snprintf(err, sizeof(err),
                 "%s is already running on port %d (pid %d); use 'mphost %s delete' first",
                 cli->script, deps[0].port, deps[0].pid, cli->script);
        free(deps);
        goto fail;
    }
    if (pipe2(pipefd, O_CLOEXEC) != 0) {
        snprintf(err, sizeof(err), "pipe: %s", strerror(errno));
        goto fail;
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(err, sizeof(err), "fork: %s", strerror(errno));
        goto fail;
    }
    if (pid == 0)
        deploy_child(cli, pipefd[1], log_path); /* does not return */
    close(pipefd[1]);
    pipefd[1] = -1;
    /* The child's one line, "ready PORT" or "error MESSAGE" ("" when it ended without one). */
    int timed_out = mph_read_line(pipefd[0], line, sizeof(line), (int)cli->start_timeout_ms) < 0 &&
                    line[0] == '\0';
    if (strncmp(line, "ready ", 6) == 0) {
        rc = 0;
    } else if (strncmp(line, "error ", 6) == 0) {
        fprintf(stderr, "mphost: %s\n", line + 6);
    } else if (timed_out) {
        stop_unready(pid);
        fprintf(stderr,
                "mphost: %s did not start within %.1f s (--start-timeout); stopped it; "
                "see %s\n",
                cli->script, cli->start_timeout_ms / 1000.0, log_path);
    } else {
        fprintf(stderr, "mphost: %s exited during startup; its log (%s) ends with:\n", cli->script,
                log_path);
        print_log_tail(log_path);
    }
    goto out;
fail:
    fprintf(stderr, "mphost: %s\n", err);
out:
    if (pipefd[0] >= 0)
        close(pipefd[0]);
    if (pipefd[1] >= 0)
        close(pipefd[1]);
    if (lock >= 0)
        close(lock); /* only now: a delete waiting for this deploy finds it running */
    free(pid_path);
    free(log_path);
    return rc;
}

/* Copies what fd holds past its offset to stdout. -1 when stdout is gone (a closed pipe). */
static int copy_out(int fd)
{
    char buf[65536];
    ssize_t n;
    while ((n = read(fd, buf, sizeof(buf))) > 0)
        if (fwrite(buf, 1, (size_t)n, stdout) != (size_t)n)
            return -1;
    return fflush(stdout) == 0 ? 0 : -1;
}

/* Whether the file at path is no longer the one fd has open (a rotation renamed it and a new
 * one took the name). */
static int replaced(int fd, const char *path)
{
    struct stat open_st, path_st;
    return fstat(fd, &open_st) == 0 && stat(path, &path_st) == 0 &&
           (open_st.st_ino != path_st.st_ino || open_st.st_dev != path_st.st_dev);
}

int mph_cli_logs(mph_cli_t *cli)
{
    mph_cli_deployment_t *deps;
    int n = mph_cli_find_deployments(cli, &deps);
    char *path = NULL;
    if (n > 1) {
        fprintf(stderr, "mphost: %s runs on %d ports (%d, %d%s): give --port\n", cli->script, n,
                deps[0].port, deps[1].port, n > 2 ? ", ..." : "");
    } else if (n == 1 && strcmp(deps[0].log, "(stderr)") == 0) {
        fprintf(stderr, "mphost: %s on port %d logs to its stderr (it was started with serve)\n",
                cli->script, deps[0].port);
    } else {
        /* Not running: the log its last deployment on that port left, if any. */
        path = n == 1 ? mph_xstrdup(deps[0].log)
                      : mph_cli_deployment_file(cli, cli->host.port, ".log");
    }
    free(deps);
    if (path == NULL)
        return 1;
    int fd = mph_cli_open_state_file(path, O_RDONLY);
    if (fd < 0) {
        fprintf(stderr, "mphost: no log for %s on port %d (%s: %s)\n", cli->script, cli->host.port,
                path, strerror(errno));
        free(path);
        return 1;
    }
    int rc = copy_out(fd);
    /* -f: polls, as tail -f does; a rotation is followed into the new file once the old one
     * has been read to its end. */
    while (cli->follow && rc == 0) {
        sleep_ms(200);
        rc = copy_out(fd);
        if (rc == 0 && replaced(fd, path)) {
            int next = mph_cli_open_state_file(path, O_RDONLY);
            if (next >= 0) {
                rc = copy_out(fd);
                close(fd);
                fd = next;
            }
        }
    }
    close(fd);
    free(path);
    return rc == 0 ? 0 : 1;
}
