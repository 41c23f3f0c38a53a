/*
 * worker.c: one worker of a supervised deployment (supervisor.c starts it; supervisor.h has
 * the protocol). It is the `serve` host with these differences: it accepts on the
 * supervisor's listening socket instead of binding one, it tells the supervisor on the report
 * socket whether it started and serves only once told to, its loop stamps a heartbeat into the
 * shared page (so LuaJIT's compiler stays on: the supervisor ends a loop stuck in compiled
 * code), and it dies with the supervisor.
 *
 * The same entry point runs a reload's probe (worker id 0): it only loads the script, says
 * how many workers its topologies ask for, and exits.
 */
#define _GNU_SOURCE
#include "worker.h"

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/common.h"
#include "supervisor.h"

/* The shared page while this worker serves, else NULL; shared_len bytes of it mapped. */
static mph_shared_page_t *shared_page;
static size_t shared_len;

/* Writes one report line ("what msg"); `last`: and closes the socket. */
static void report(const char *what, const char *msg, int last)
{
    dprintf(MPH_WORKER_REPORT_FD, "%s%s%s\n", what, msg ? " " : "", msg ? msg : "");
    if (last)
        close(MPH_WORKER_REPORT_FD);
}

/* Waits for the supervisor's word after "ready": "go" (serve) or the socket's end (the start
 * or the reload it belongs to was given up: leave without serving). Blocking: this process
 * has nothing else to do yet, and a supervisor that dies kills it. Returns 1 for "go". */
static int wait_for_go(void)
{
    char line[8];
    return mph_read_line(MPH_WORKER_REPORT_FD, line, sizeof(line), -1) == 1 &&
           strcmp(line, "go") == 0;
}

/* The shared page (supervisor.h), mapped until the worker ends; NULL if it cannot be. */
static mph_shared_page_t *map_shared_page(void)
{
    struct stat st; /* its size says whether it has the metrics (supervisor.h) */
    void *p = MAP_FAILED;
    if (fstat(MPH_WORKER_SHARED_FD, &st) == 0 && (size_t)st.st_size >= MPH_SHARED_BASE_SIZE) {
        shared_len = (size_t)st.st_size;
        p = mmap(NULL, shared_len, PROT_READ | PROT_WRITE, MAP_SHARED, MPH_WORKER_SHARED_FD, 0);
    }
    close(MPH_WORKER_SHARED_FD); /* the mapping stays */
    if (p == MAP_FAILED)
        return NULL;
    mph_shared_page_t *page = p;
    if (page->magic != MPH_SHARED_MAGIC ||
        (page->has_metrics && shared_len < sizeof(mph_shared_page_t))) {
        munmap(p, shared_len);
        return NULL;
    }
    return page;
}

/* A reload's probe: loads the script as the supervisor's start does (so mp.worker is
 * { id = 1, count = 1 }), reports "topology N" or the error, and exits. */
static int probe(mph_cli_t *cli)
{
    char err[1024], msg[1100];
    close(MPH_WORKER_SHARED_FD);
    close(MPH_WORKER_SOCKETS_FD);
    mph_log_set_tag("reload check");
    mph_host_t *h = NULL;
    int script_failed = 0;
    int rc = mph_host_new(&h, &cli->host, err, sizeof(err));
    if (rc == 0 && (rc = mph_host_load_file(h, cli->script_path, err, sizeof(err))) != 0)
        script_failed = 1;
    if (rc == 0) {
        snprintf(msg, sizeof(msg), "%d", mph_host_topology_workers(h));
        report("topology", msg, 1);
    } else {
        snprintf(msg, sizeof(msg), "%s%s", script_failed ? "script error: " : "", err);
        report("error", msg, 1);
    }
    if (h)
        mph_host_free(h);
    return rc == 0 ? 0 : 1;
}

/* Loads, listens, reports, waits for "go", serves (as worker id of count, of the given
 * generation, with beat index beat: supervisor.h). */
static int serve(mph_cli_t *cli, int id, int count, int generation, int beat)
{
    char err[1024], msg[1100];
    char tag[32];
    snprintf(tag, sizeof(tag), "worker %d", id);
    mph_log_set_tag(tag);
    shared_page = map_shared_page();
    if (shared_page == NULL) {
        snprintf(msg, sizeof(msg), "worker %d: cannot map the shared page", id);
        mph_log(MPH_LOG_ERROR, "%s", msg);
        report("error", msg, 1);
        return 1;
    }
    struct mph_host_config_s cfg = cli->host; /* strings borrowed: mph_host_new copies */
    cfg.listen_fd = MPH_WORKER_LISTEN_FD;
    cfg.worker_id = id;
    cfg.worker_count = count;
    cfg.supervised = 1;
    cfg.heartbeat = &shared_page->beats[beat].alive_ms;
    if (shared_page->has_metrics) { /* else: a slot of its own (supervisor.h) */
        cfg.metrics_slot = &shared_page->metrics[1 + beat];
        cfg.metrics_slots = shared_page->metrics;
        cfg.metrics_nslots = sizeof(shared_page->metrics) / sizeof(shared_page->metrics[0]);
    }
    cfg.peer_dir_fd = MPH_WORKER_SOCKETS_FD;
    cfg.generation = generation;
    cfg.serving_generation = &shared_page->generation;
    mph_host_t *h = NULL;
    int script_failed = 0;
    int rc = mph_host_new(&h, &cfg, err, sizeof(err));
    if (rc == 0)
        mph_host_handle_signals(h); /* SIGTERM from the supervisor: a graceful stop */
    if (rc == 0 && (rc = mph_host_load_file(h, cli->script_path, err, sizeof(err))) != 0)
        script_failed = 1;
    if (rc == 0)
        rc = mph_host_listen(h, err, sizeof(err)); /* accepts once the loop runs */
    if (rc != 0) {
        snprintf(msg, sizeof(msg), "%s%s", script_failed ? "script error: " : "", err);
        mph_log(MPH_LOG_ERROR, "%s", msg);
        report("error", msg, 1);
    } else {
        report("ready", NULL, 0);
        int go = wait_for_go();
        close(MPH_WORKER_REPORT_FD);
        if (go) {
            mph_log(MPH_LOG_DEBUG, "serving (pid %d)", (int)getpid());
            mph_host_run(h);
        } else {
            mph_log(MPH_LOG_DEBUG, "not needed after all; leaving without serving");
        }
    }
    if (h)
        mph_host_free(h);
    munmap(shared_page, shared_len);
    shared_page = NULL;
    mph_log(MPH_LOG_DEBUG, "stopped");
    return rc == 0 ? 0 : 1;
}

int mph_worker_serve(mph_cli_t *cli, const char *spec)
{
    int id, count, supervisor, generation, beat;
    if (sscanf(spec, "%d %d %d %d %d", &id, &count, &supervisor, &generation, &beat) != 5 ||
        id < 0 || count < id || count > MPH_MAX_WORKERS || generation < 1 ||
        beat < (id == 0 ? -1 : 0) || beat >= MPH_SHARED_BEATS) {
        fprintf(stderr, "mphost: invalid %s=%s (set by a supervisor only)\n", MPH_WORKER_ENV, spec);
        return 1;
    }
    /* Killed when the supervisor dies, however it dies; checked after asking, in case it died
     * before (we would then belong to another parent already). SIGKILL, not SIGTERM: the
     * graceful way to stop a deployment is a SIGTERM to the supervisor, which stops its
     * workers in order; a supervisor that dies without that (kill -9, a crash) is a crash of
     * the deployment, and should look like one: its workers go with it at once, so the port
     * and the data directory are free for a restart right away (draining workers would hold
     * the port for up to the shutdown timeout, and a new deploy would find it in use), and no
     * worker serves on with nobody watching its heartbeat. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != supervisor) {
        fprintf(stderr, "mphost: worker %d: its supervisor (pid %d) is gone\n", id, supervisor);
        return 1;
    }
    /* Nothing the script starts (os.execute) inherits the socket, the report line's end or
     * the belief that it is a worker. */
    fcntl(MPH_WORKER_LISTEN_FD, F_SETFD, FD_CLOEXEC);
    fcntl(MPH_WORKER_REPORT_FD, F_SETFD, FD_CLOEXEC);
    fcntl(MPH_WORKER_SOCKETS_FD, F_SETFD, FD_CLOEXEC);
    unsetenv(MPH_WORKER_ENV);
    return id == 0 ? probe(cli) : serve(cli, id, count, generation, beat);
}
