/*
 * worker.h: the worker side of supervised serving (supervisor.h has the protocol): a host that
 * accepts on the supervisor's socket, reports that it is ready, and dies with its supervisor.
 */
#ifndef MPH_WORKER_H
#define MPH_WORKER_H

#include "cli.h"

/* Serves as the worker that `spec` (the MPH_WORKER_ENV value) names, until SIGTERM (or checks
 * the script for a reload, as worker 0). Returns the exit status: 0 after a stop, 1 when it
 * could not start (reported to the supervisor). */
int mph_worker_serve(mph_cli_t *cli, const char *spec);

#endif
