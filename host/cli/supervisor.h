/*
 * supervisor.h: serving with worker processes. The supervisor binds the port once and runs N
 * workers (worker.h), each a whole host accepting on that one shared socket; it replaces a
 * worker that exits, swaps in a new generation of workers on a reload (its control socket,
 * control.h, or SIGHUP), stops them all on SIGTERM/SIGINT, and keeps the deployment's pid
 * file (with the workers listed, for status).
 *
 * How a worker is started, the whole protocol between the two (both sides include this):
 * the same binary (/proc/self/exe) with the same arguments, plus
 *   - MPH_STORAGE_PASSWORD_ENV in its environment when the storage URL had a password, which
 *     was cut out of every command line (main.c says why);
 *   - MPH_WORKER_ENV="ID COUNT SUPERVISOR_PID GENERATION BEAT" in its environment
 *     (GENERATION counts the sets of workers the supervisor has started: 1 at the start, one
 *     more per reload; a replaced worker joins the generation of the one it replaces. BEAT is
 *     the process's beat index, 0..MPH_SHARED_BEATS-1: where in the shared page it stamps its
 *     heartbeat and counts its metrics, see below);
 *   - the listening socket on descriptor MPH_WORKER_LISTEN_FD;
 *   - a stream socket on MPH_WORKER_REPORT_FD on which it writes one line once it has loaded
 *     the script and can serve ("ready") or has failed to start ("error MESSAGE"). After
 *     "ready" it waits for the supervisor's "go" before it accepts anything (so that a start
 *     or a reload serves with all of its workers or none); the socket's end instead means
 *     that it is not needed (the start or reload was given up): it exits;
 *   - the shared page (mph_shared_page_t, a memfd the supervisor made) on
 *     MPH_WORKER_SHARED_FD, which it maps read-write;
 *   - the deployment's socket directory (localsock.h) on MPH_WORKER_SOCKETS_FD, where it
 *     listens for its peers (peer.h) and finds them.
 * ID 0 (COUNT 0, BEAT -1) is a reload's probe: it loads the script as the supervisor's start
 * did, reports "topology N" (how many workers the script's topologies ask for, 0: none) or
 * "error MESSAGE", and exits without serving.
 * A worker dies with its supervisor (PR_SET_PDEATHSIG, worker.c says why SIGKILL).
 */
#ifndef MPH_SUPERVISOR_H
#define MPH_SUPERVISOR_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "cli.h"
#include "host/server/metrics.h"

#define MPH_WORKER_ENV "MPH_WORKER"
#define MPH_STORAGE_PASSWORD_ENV "MPH_STORAGE_PASSWORD"
#define MPH_WORKER_LISTEN_FD 3
#define MPH_WORKER_REPORT_FD 4
#define MPH_WORKER_SHARED_FD 5
#define MPH_WORKER_SOCKETS_FD 6

#define MPH_KILL_GRACE_MS 2000    /* after the shutdown timeout, a stopping worker is killed */
#define MPH_RELOAD_START_MS 60000 /* a reload's new workers must all be ready within this */

/* ---- The shared page ----
 *
 * One mapping shared by the supervisor and every worker process, made before the first
 * worker starts and never resized. Each field has one writer:
 *   - generation: the supervisor, once every worker of the first generation is ready, then
 *     once every worker of a reload's is; the generation that calls forwarded between
 *     workers go to (0 until the first is ready);
 *   - beats[i]: the worker process given beat index i (in MPH_WORKER_ENV), which stores its
 *     loop's time there at every turn (mph_host_config_t.heartbeat); the supervisor zeroes it
 *     before it gives index i to a new process, and kills a ready worker whose stamp is older
 *     than the handler time limit plus MPH_HEARTBEAT_GRACE_MS.
 *   - metrics[1 + i]: the metrics slot (metrics.h) of the worker process given beat index i,
 *     which counts there; when that process has ended, the supervisor adds its counters to
 *     metrics[0], the retired slot, and zeroes slot 1 + i before index i is given again, so
 *     that a scrape (any worker sums the retired slot and every slot in use) never sees
 *     totals go down. The supervisor writes metrics[0], and counts there the workers it
 *     replaced.
 * Words are read and written with relaxed atomics: each is a value on its own, no field is
 * read together with another. A beat index per process, not per worker id, because during a
 * reload the old and the new worker of an id run at once. */
#define MPH_SHARED_MAGIC 0x31726873687068ULL   /* "mphshr1" */
#define MPH_SHARED_BEATS (2 * MPH_MAX_WORKERS) /* beat indexes: a generation, and a reload's */
#define MPH_HEARTBEAT_GRACE_MS 600

typedef struct {
    uint64_t alive_ms; /* the worker's loop time (CLOCK_MONOTONIC ms) at its last turn; 0: none
                          yet */
    char pad[56];      /* a cache line each: the workers' stores do not contend */
} mph_shared_beat_t;

typedef struct {
    uint64_t magic;       /* MPH_SHARED_MAGIC */
    uint64_t generation;  /* the current generation (see above) */
    uint64_t has_metrics; /* 1: the page goes on with `metrics` (see below) */
    char pad[40];
    mph_shared_beat_t beats[MPH_SHARED_BEATS];
    /* [0]: retired; [1 + i]: beat index i's. ~5 MiB, mostly never touched (so never
     * backed by memory). A scrape sums the whole array (the slots in use). Only when
     * has_metrics: a file size limit (RLIMIT_FSIZE) may leave the memfd too small for it,
     * and the page ends here (MPH_SHARED_BASE_SIZE); each worker then counts on its own and
     * a scrape shows the worker that answers it (the supervisor warns at the start). */
    mph_metrics_slot_t metrics[1 + MPH_SHARED_BEATS];
} mph_shared_page_t;

#define MPH_SHARED_BASE_SIZE offsetof(mph_shared_page_t, metrics)

/* Supervises nworkers (1..MPH_MAX_WORKERS) workers serving cli's script until SIGTERM or
 * SIGINT, then stops them gracefully. Writes deploy's line on ready (may be NULL; closed here)
 * once every worker listens, or the first failure ("error MESSAGE": the port, a worker that
 * cannot load the script or reach the storage), which stops the others. Returns the exit
 * status: 0 after a stop, 1 when the start failed. */
int mph_supervisor_run(mph_cli_t *cli, int nworkers, FILE *ready);

#endif
