/*
 * worker.c: one worker of a supervised deployment (supervisor.c starts it; supervisor.h has
 * the protocol). It is the `serve` host with three differences: it accepts on the
 * supervisor's listening socket instead of binding one, it tells the supervisor on the report
 * socket whether it started, and it stops when the supervisor dies (so that no worker goes on
 * holding the port after a kill -9 of the deployment's pid).
 */
#define _GNU_SOURCE
#include "worker.h"

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "common.h"
#include "supervisor.h"

/* Writes the one report line and closes the socket: the supervisor reads to end of file. */
static void report(const char *what, const char *msg)
{
    dprintf(MPH_WORKER_REPORT_FD, "%s%s%s\n", what, msg ? " " : "", msg ? msg : "");
    close(MPH_WORKER_REPORT_FD);
}

int mph_worker_serve(mph_cli_t *cli, const char *spec)
{
    int id, count, supervisor, generation;
    char err[1024], msg[1100];
    if (sscanf(spec, "%d %d %d %d", &id, &count, &supervisor, &generation) != 4 || id < 1 ||
        count < id || count > MPH_MAX_WORKERS || generation < 1) {
        fprintf(stderr, "mphost: invalid %s=%s (set by a supervisor only)\n", MPH_WORKER_ENV, spec);
        return 1;
    }
    /* A graceful stop when the supervisor dies, however it dies; checked after asking, in case
     * it died before (we would then belong to another parent already). */
    if (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0 || getppid() != supervisor) {
        fprintf(stderr, "mphost: worker %d: its supervisor (pid %d) is gone\n", id, supervisor);
        return 1;
    }
    /* Nothing the script starts (os.execute) inherits the socket, the report line's end or
     * the belief that it is a worker. */
    fcntl(MPH_WORKER_LISTEN_FD, F_SETFD, FD_CLOEXEC);
    fcntl(MPH_WORKER_REPORT_FD, F_SETFD, FD_CLOEXEC);
    unsetenv(MPH_WORKER_ENV);
    char tag[32];
    snprintf(tag, sizeof(tag), "worker %d", id);
    mph_log_set_tag(tag);

    mph_host_config_t cfg = cli->host;
    cfg.listen_fd = MPH_WORKER_LISTEN_FD;
    cfg.worker_id = id;
    cfg.worker_count = count;
    cfg.supervisor_pid = supervisor;
    cfg.generation = generation;
    mph_host_t *h = NULL;
    int script_failed = 0;
    int rc = mph_host_new(&h, &cfg, err, sizeof(err));
    if (rc == 0)
        mph_host_handle_signals(h); /* SIGTERM from the supervisor: a graceful stop */
    if (rc == 0 && (rc = mph_host_load_file(h, cli->script_path, err, sizeof(err))) != 0)
        script_failed = 1;
    if (rc == 0)
        rc = mph_host_listen(h, err, sizeof(err));
    if (rc != 0) {
        snprintf(msg, sizeof(msg), "%s%s", script_failed ? "script error: " : "", err);
        mph_log(MPH_LOG_ERROR, "%s", msg);
        report("error", msg);
        if (h)
            mph_host_free(h);
        return 1;
    }
    mph_log(MPH_LOG_DEBUG, "serving (pid %d)", (int)getpid());
    report("ready", NULL);
    mph_host_run(h);
    mph_host_free(h);
    mph_log(MPH_LOG_DEBUG, "stopped");
    return 0;
}
