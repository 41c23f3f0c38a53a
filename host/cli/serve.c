/*
 * serve.c: `mphost SCRIPT serve` (cli.h), what deploy runs in its child: one process, or the
 * supervisor of workers (supervisor.c).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <systemd/sd-daemon.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "common/common.h"
#include "supervisor.h"

void mph_cli_report_failure(FILE *ready, const char *msg)
{
    if (ready) {
        fprintf(ready, "error %s\n", msg);
        fclose(ready);
    } else if (mph_log_level > MPH_LOG_ERROR) {
        fprintf(stderr, "mphost: %s\n", msg);
    }
}

/* Serves in this process (--workers=0) with h, whose script is loaded, until it stops. */
static int serve_alone(mph_cli_t *cli, mph_host_t *h, FILE *ready)
{
    char err[1024];
    if (mph_host_listen(h, err, sizeof(err)) != 0) {
        mph_log(MPH_LOG_ERROR, "%s", err);
        mph_host_free(h);
        mph_cli_report_failure(ready, err);
        return 1;
    }
    int port = mph_host_port(h);
    cli->started = (long long)time(NULL);
    if (cli->state_dir &&
        mph_cli_write_pidfile(cli, port, getenv("MPH_LOG_PATH"), NULL, 0, err, sizeof(err)) != 0) {
        mph_log(MPH_LOG_ERROR, "%s", err);
        if (ready) {          /* a deployment that delete and status cannot find must not run */
            mph_host_free(h); /* first: once deploy hears, the port is free again */
            mph_cli_report_failure(ready, err);
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

/* Becomes the supervisor of the workers --workers or the script's topologies (nworkers) ask
 * for. h only read the script's topologies (and checked that it loads): each worker loads its
 * own, so h is freed here. */
static int serve_supervised(mph_cli_t *cli, mph_host_t *h, int nworkers, FILE *ready)
{
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
        if (h)
            mph_host_free(h);
        mph_cli_report_failure(ready, msg);
        return 1;
    }
    int nworkers = mph_host_topology_workers(h);
    if (cli->workers != 0)
        return serve_supervised(cli, h, nworkers, ready);
    if (nworkers > 1)
        mph_log(MPH_LOG_WARN,
                "--workers=0: serving in one process, although the script's topologies ask for "
                "%d workers",
                nworkers);
    return serve_alone(cli, h, ready);
}
