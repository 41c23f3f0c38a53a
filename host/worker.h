/*
 * worker.h: the worker side of supervised serving (supervisor.h has the protocol): a host that
 * accepts on the supervisor's socket, reports that it is ready, and dies with its supervisor.
 */
#ifndef MPH_WORKER_H
#define MPH_WORKER_H

#include <stdint.h>

#include "cli.h"

/* Serves as the worker that `spec` (the MPH_WORKER_ENV value) names, until SIGTERM (or checks
 * the script for a reload, as worker 0). Returns the exit status: 0 after a stop, 1 when it
 * could not start (reported to the supervisor). */
int mph_worker_serve(mph_cli_t *cli, const char *spec);

/* The generation that calls forwarded between workers should go to: the shared page's word
 * (supervisor.h), which the supervisor moves on once a reload's workers all serve; 0 outside a
 * serving worker. */
uint64_t mph_worker_generation(void);

#endif
