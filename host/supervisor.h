/*
 * supervisor.h: serving with worker processes. The supervisor binds the port once and runs N
 * workers (worker.h), each a whole host accepting on that one shared socket; it replaces a
 * worker that exits, stops them all on SIGTERM/SIGINT, and keeps the deployment's pid file
 * (with the workers listed, for status).
 *
 * How a worker is started, the whole protocol between the two (both sides include this):
 * the same binary (/proc/self/exe) with the same arguments, plus
 *   - MPH_WORKER_ENV="ID COUNT SUPERVISOR_PID GENERATION" in its environment (GENERATION
 *     counts the sets of workers the supervisor has started: 1 at the start, one more per
 *     reload; a replaced worker joins the generation of the one it replaces);
 *   - the listening socket on descriptor MPH_WORKER_LISTEN_FD;
 *   - a stream socket on MPH_WORKER_REPORT_FD on which it writes one line once it listens
 *     ("ready") or has failed to start ("error MESSAGE"), then closes it.
 */
#ifndef MPH_SUPERVISOR_H
#define MPH_SUPERVISOR_H

#include <stdio.h>

#include "cli.h"

#define MPH_WORKER_ENV "MPH_WORKER"
#define MPH_WORKER_LISTEN_FD 3
#define MPH_WORKER_REPORT_FD 4

/* Supervises nworkers (1..MPH_MAX_WORKERS) workers serving cli's script until SIGTERM or
 * SIGINT, then stops them gracefully. Writes deploy's line on ready (may be NULL; closed here)
 * once every worker listens, or the first failure ("error MESSAGE": the port, a worker that
 * cannot load the script or reach the storage), which stops the others. Returns the exit
 * status: 0 after a stop, 1 when the start failed. */
int mph_supervisor_run(mph_cli_t *cli, int nworkers, FILE *ready);

#endif
