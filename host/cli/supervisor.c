/*
 * supervisor.c: serving with worker processes (supervisor.h has the protocol; worker.c is the
 * other side). The supervisor runs no Lua and serves no request: it binds the port, starts the
 * workers, replaces those that exit, swaps in new ones on a reload, and stops them all when
 * it is told to stop.
 *
 * How connections reach workers: one listening socket, bound here and inherited by every
 * worker, each of which accepts on it from its own loop. The kernel queues a new connection
 * on the socket, and only a worker that is back in its loop calls accept(): a worker stuck in
 * a handler accepts nothing, so new connections go to the others (or wait in the backlog
 * until one is free). SO_REUSEPORT would not give this: it gives each worker a queue of its
 * own and hashes every new connection to one of them, whether that worker is stuck or not.
 * (A worker that wakes up takes what is queued, up to a batch, before it runs a handler, so
 * a few connections can still be caught behind one long call; that is the price of not
 * passing connections around. After each accept a worker pauses a moment so that idle
 * workers take turns: mph_http_listen_shared in http.c.) The same socket makes a reload
 * lose nothing: connections wait in its queue while the old workers stop accepting and the
 * new ones start.
 *
 * Generations. The workers started together (at the start, or by one reload) are a generation
 * (gen_t; every one not freed yet is in sup->gens, newest first). One is CURRENT: its workers
 * serve, and are replaced when they die. A reload makes a second one:
 *
 *   (reload) --spawn its probe, which reads the script's topologies-->    PROBING
 *   PROBING --"topology N": N workers spawned-->                          STARTING
 *   STARTING --every worker "ready": "go" to each (gen_serve)-->          CURRENT
 *       and the generation it replaces --> STOPPING; the reload ends once that one is gone
 *   PROBING/STARTING --an error, a worker's death, the timeout-->         STOPPING
 *       and the reload ends, failed, once this one is gone
 *   CURRENT --the supervisor stops-->                                     STOPPING
 *   STOPPING --SIGTERM to its processes (and the end of the report socket to those waiting
 *       for "go"); SIGKILL after the shutdown timeout + MPH_KILL_GRACE_MS; when every worker
 *       is idle, its timers are closed (gen_close)-->                      freed
 * The first generation is born STARTING (the supervisor read the script itself).
 *
 * Workers (worker_t): a worker id's place in a generation, one per id (and one for its probe),
 * which outlives the processes that hold it one after another:
 *
 *   (idle) --spawn_worker: uv_spawn-->                       STARTING
 *   STARTING --"ready" on its report socket (lines read by
 *         common/linebuf.h)-->                                 READY
 *   READY --"go" written (its generation serves)-->            SERVING
 *   any --exit (on_worker_exit), then both handles closed
 *         (on_worker_handle_closed)-->                         (idle)
 *   (idle) --its generation is CURRENT: respawn timer (backoff)--> STARTING
 *
 * and the supervisor's: STARTING (until the first generation serves; any failure stops
 * everything and the start fails) -> RUNNING (replaces workers, reloads) -> STOPPING (every
 * generation stops; it ends when none is left). While it runs it also reads the serving
 * workers' heartbeats in the shared page (supervisor.h) every BEAT_CHECK_MS, and kills one
 * whose loop has stopped turning (on_beat_check). Each process it starts (but a probe) is
 * given a beat index: its heartbeat's place in the shared page, and its metrics slot's.
 */
#define _GNU_SOURCE
#include "supervisor.h"

#include <assert.h>
#include <errno.h>
#include <signal.h>
#include <systemd/sd-daemon.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "common/common.h"
#include "common/linebuf.h"
#include "common/list.h"
#include "control.h"
#include "host/server/http.h"
#include "host/server/localsock.h"

extern char **environ;

#define QUICK_DEATH_MS 2000  /* a worker that dies younger than this "died at once" */
#define BACKOFF_FIRST_MS 100 /* the wait before replacing it after a first quick death ... */
#define BACKOFF_MAX_MS 10000 /* ... doubling with each quick death in a row, up to this */
#define BEAT_CHECK_MS 100    /* how often the workers' heartbeats are looked at */

typedef enum { WORKER_IDLE, WORKER_STARTING, WORKER_READY, WORKER_SERVING } worker_state_t;
typedef enum { GEN_PROBING, GEN_STARTING, GEN_CURRENT, GEN_STOPPING } gen_state_t;
typedef enum { SUP_STARTING, SUP_RUNNING, SUP_STOPPING } sup_state_t;

typedef struct sup_s sup_t;
typedef struct gen_s gen_t;

/* A worker id's place in a generation (see the diagram above). */
typedef struct {
    gen_t *gen;           /* owner */
    int id;               /* 1..n; 0: the generation's probe */
    worker_state_t state; /* see the diagram above */
    uv_process_t proc;    /* the worker's process handle (while open_handles counts it) */
    uv_pipe_t report;     /* our end of its report socket (idem) */
    uv_write_t go;        /* the "go" line's write */
    uv_timer_t respawn;   /* the backoff before the next process; open for the generation's life */
    int open_handles;     /* proc and report handles not closed yet */
    int exited;           /* on_worker_exit has run for the current process */
    int report_open;      /* the report pipe is not closing yet */
    int pid;              /* of the current process; 0 when idle */
    long long started;    /* time(NULL) when it was spawned, for status */
    uint64_t spawned_ms;  /* uv_now() then, for the quick-death test */
    int restarts;         /* processes started for this id after one died (kept across reloads) */
    int quick_deaths;     /* quick deaths in a row (the backoff's exponent) */
    int beat;             /* the process's beat index (supervisor.h); -1: none */
    int stuck;            /* the process was killed for a loop that stopped turning */
    char how[96];         /* how the last process ended ("exited with status 1") */
    char line[1024];      /* the report line being read, in ... */
    mph_linebuf_t lines;  /* ... which this reads them */
} worker_t;

struct gen_s {
    mph_list_t node;       /* in sup->gens (first: list.h) */
    sup_t *sup;            /* owner */
    int number;            /* its generation number (supervisor.h) */
    gen_state_t state;     /* see the diagram above */
    int n;                 /* workers (0 while PROBING) */
    worker_t *workers;     /* n, owned */
    worker_t probe;        /* a reload's probe process (id 0) */
    int ready;             /* workers READY or SERVING */
    int busy;              /* workers (the probe too) with a process or an open handle */
    int timers;            /* its timers (respawns, kill_timer) not closed yet, once closing */
    int closing;           /* gen_close was called */
    uv_timer_t kill_timer; /* STOPPING: SIGKILL what is left */
};

/* The reload in progress (one at a time: a second is refused, see begin_reload). */
typedef struct {
    int active;             /* a reload runs, from its request to its answer */
    mph_control_req_t *req; /* who asked (NULL: SIGHUP), answered at the end */
    gen_t *gen;             /* the new generation */
    gen_t *awaited;         /* the generation whose end ends the reload: the one replaced,
                               or the new one when it failed */
    char outcome[1200];     /* "ok ..." or "error ..." */
    uv_timer_t timer;       /* MPH_RELOAD_START_MS for the new generation to serve */
} reload_t;

struct sup_s {
    uv_loop_t loop;
    mph_cli_t *cli; /* borrowed */
    sup_state_t state;
    int listen_fd;   /* the shared socket; -1 once closed (at the stop) */
    int port;        /* bound */
    int generations; /* the last generation number given */
    gen_t *current;  /* the generation that serves (or is to, while starting) */
    mph_list_t gens; /* every generation not freed yet (gen_t.node, owned), newest first */
    reload_t reload; /* the reload in progress, if any */
    uv_signal_t sigint, sigterm, sighup, sigusr1;
    uv_timer_t beat_check;     /* looks at the heartbeats (with a handler time limit) */
    mph_control_t *control;    /* the control socket (control.h); NULL once closed */
    int sockets_fd;            /* the socket directory (localsock.h), which workers inherit */
    char *sockets_path;        /* its path (owned), removed with it at the end */
    FILE *ready_out;           /* deploy's ready stream until the start ends, else NULL */
    char failure[1100];        /* why the start failed ("" while it has not) */
    const char *log_path;      /* MPH_LOG_PATH, for the pid file */
    int closed;                /* the supervisor's own handles are closing */
    char **args;               /* a worker's command line (owned array, borrowed strings) */
    mph_shared_page_t *shared; /* the shared page (supervisor.h), mapped; owned */
    int shared_fd;             /* its memfd, which workers inherit */
    size_t shared_len;         /* bytes of it mapped (supervisor.h: with metrics or not) */
    unsigned char beat_used[MPH_SHARED_BEATS]; /* beat indexes given to live processes */
    char exe[4096];                            /* this binary's path, which workers run */
};

#ifndef NDEBUG
static int assert_worker_state(const worker_t *w)
{
    switch (w->state) {
    case WORKER_IDLE:
        assert(w->open_handles == 0 && w->pid == 0 && w->beat < 0);
        break;
    case WORKER_STARTING:
    case WORKER_READY:
    case WORKER_SERVING:
        assert(w->open_handles > 0 || w->exited);
        break;
    default:
        assert(!"unknown worker state");
    }
    return 1;
}
#endif

static void spawn_worker(worker_t *w);
static void on_respawn(uv_timer_t *t);
static void begin_stop(sup_t *sup);
static void gen_stop(gen_t *gen);
static void gen_failed(gen_t *gen, const char *why);
static void reload_probed(gen_t *gen, const char *count);

/* The workers of a generation, its probe first: for (each worker w of gen) loops. */
#define GEN_WORKER(gen, i) ((i) == 0 ? &(gen)->probe : &(gen)->workers[(i)-1])

/* ---- The pid file and the start's outcome ---- */

/* Rewrites the pid file with the current generation's workers: status reads them there. A
 * file, rather than a question on the port, because it needs no worker to answer (a stuck one
 * could not, and a method or path of ours would take one from the script), and the pid file
 * already has the checks a file in the state directory needs. Returns 0, or MPH_EIO after
 * logging why (once serving, the workers serve on: only status is stale). */
static int update_pidfile(sup_t *sup)
{
    if (sup->cli->state_dir == NULL || sup->state != SUP_RUNNING)
        return 0;
    const gen_t *gen = sup->current;
    mph_cli_worker_t *rows = mph_xcalloc((size_t)gen->n, sizeof(*rows));
    for (int i = 0; i < gen->n; i++) {
        const worker_t *w = &gen->workers[i];
        rows[i] = (mph_cli_worker_t){w->id, w->state == WORKER_IDLE ? 0 : w->pid, w->started,
                                     w->restarts};
    }
    char err[1200];
    int rc =
        mph_cli_write_pidfile(sup->cli, sup->port, sup->log_path, rows, gen->n, err, sizeof(err));
    if (rc != 0)
        mph_log(MPH_LOG_ERROR, "%s", err);
    free(rows);
    return rc;
}

/* The start failed (the first reason is kept): stop whatever did start. */
static void start_failed(sup_t *sup, const char *why)
{
    if (sup->failure[0] == '\0')
        snprintf(sup->failure, sizeof(sup->failure), "%s", why);
    begin_stop(sup);
}

/* Every worker of the first generation serves: the deployment is up. */
static void start_done(sup_t *sup)
{
    sup->state = SUP_RUNNING;
    sup->cli->started = (long long)time(NULL);
    __atomic_store_n(&sup->shared->generation, (uint64_t)sup->current->number, __ATOMIC_RELAXED);
    if (update_pidfile(sup) != 0 && sup->ready_out) {
        /* A deployment that delete and status cannot find must not run (see main.c). */
        start_failed(sup, "cannot write the pid file (see the log)");
        return;
    }
    mph_log(MPH_LOG_INFO, "serving %s on %s:%d (pid %d, %d %s, storage %s)", sup->cli->script,
            sup->cli->host.listen, sup->port, (int)getpid(), sup->current->n,
            MPH_WORKERS_WORD(sup->current->n), sup->cli->storage_desc);
    if (sup->ready_out) {
        fprintf(sup->ready_out, "ready %d\n", sup->port);
        fclose(sup->ready_out);
        sup->ready_out = NULL;
    }
    /* Under systemd's Type=notify (NOTIFY_SOCKET set; otherwise it does nothing). */
    sd_notifyf(0, "READY=1\nSTATUS=serving %s on port %d with %d %s", sup->cli->script, sup->port,
               sup->current->n, MPH_WORKERS_WORD(sup->current->n));
}

/* ---- A worker's report line ---- */

static void on_report_closed(uv_handle_t *h);

static void close_report(worker_t *w)
{
    if (!w->report_open)
        return;
    w->report_open = 0;
    uv_close((uv_handle_t *)&w->report, on_report_closed);
}

static void on_go_written(uv_write_t *req, int status)
{
    worker_t *w = req->data;
    (void)status; /* a worker that died meanwhile is replaced as it exits */
    close_report(w);
}

/* READY -> SERVING: tells the worker to accept connections; its report socket then ends. */
static void send_go(worker_t *w)
{
    static char go[] = "go\n";
    assert(w->state == WORKER_READY);
    w->state = WORKER_SERVING;
    uv_buf_t buf = uv_buf_init(go, sizeof(go) - 1);
    w->go.data = w;
    if (uv_write(&w->go, (uv_stream_t *)&w->report, &buf, 1, on_go_written) != 0)
        close_report(w); /* it reads the end: it leaves, and is replaced */
}

/* Every worker of gen is ready: they all serve from now on. */
static void gen_serve(gen_t *gen)
{
    sup_t *sup = gen->sup;
    for (int i = 0; i < gen->n; i++)
        send_go(&gen->workers[i]);
    gen->state = GEN_CURRENT;
    if (sup->state == SUP_STARTING) {
        start_done(sup);
        return;
    }
    /* A reload: the new generation takes over; the replaced one finishes what it has. */
    gen_t *old = sup->current;
    sup->current = gen;
    __atomic_store_n(&sup->shared->generation, (uint64_t)gen->number, __ATOMIC_RELAXED);
    uv_timer_stop(&sup->reload.timer);
    snprintf(sup->reload.outcome, sizeof(sup->reload.outcome), "ok generation %d serves with %d %s",
             gen->number, gen->n, MPH_WORKERS_WORD(gen->n));
    mph_log(MPH_LOG_INFO, "reload: generation %d serves with %d %s; generation %d stops",
            gen->number, gen->n, MPH_WORKERS_WORD(gen->n), old->number);
    sup->reload.awaited = old;
    update_pidfile(sup);
    gen_stop(old);
}

static void on_report_line(worker_t *w, const char *line)
{
    gen_t *gen = w->gen;
    sup_t *sup = gen->sup;
    if (w->id == 0 && strncmp(line, "topology ", 9) == 0 && gen->state == GEN_PROBING) {
        reload_probed(gen, line + 9);
    } else if (strcmp(line, "ready") == 0 && w->state == WORKER_STARTING) {
        w->state = WORKER_READY;
        gen->ready++;
        if (gen->state == GEN_CURRENT) { /* a replacement */
            mph_log(MPH_LOG_INFO, "worker %d ready (pid %d)", w->id, w->pid);
            send_go(w);
            update_pidfile(sup);
        } else if (gen->state == GEN_STARTING) {
            mph_log(MPH_LOG_DEBUG, "worker %d of generation %d ready (pid %d)", w->id, gen->number,
                    w->pid);
            if (gen->ready == gen->n)
                gen_serve(gen);
        }
    } else if (strncmp(line, "error ", 6) == 0) {
        /* A worker logged it too (same log); a probe did not. */
        if (gen->state == GEN_PROBING || gen->state == GEN_STARTING)
            gen_failed(gen, line + 6);
    } else {
        mph_log(MPH_LOG_WARN, "worker %d (pid %d): unexpected report \"%.100s\"", w->id, w->pid,
                line);
    }
}

static void on_report_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    worker_t *w = h->data;
    size_t room;
    (void)suggested;
    char *at = mph_linebuf_room(&w->lines, &room); /* 0 when full: UV_ENOBUFS */
    *buf = uv_buf_init(at, (unsigned)room);
}

static void on_report_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    worker_t *w = stream->data;
    (void)buf;
    if (nread < 0) { /* end of file (the line was all), an error, or no room left */
        if (w->state != WORKER_READY) /* one waiting for "go" keeps its socket until then */
            close_report(w);
        else
            uv_read_stop(stream);
        return;
    }
    mph_linebuf_added(&w->lines, (size_t)nread);
    const char *line;
    while (w->report_open && (line = mph_linebuf_take(&w->lines)) != NULL)
        on_report_line(w, line);
}

/* ---- A worker's end ---- */

static void gen_close(gen_t *gen);

/* The wait before replacing w's process: none, unless it keeps dying young. */
static uint64_t respawn_delay(const worker_t *w)
{
    if (w->quick_deaths == 0)
        return 0;
    int shift = w->quick_deaths - 1 < 10 ? w->quick_deaths - 1 : 10;
    uint64_t delay = (uint64_t)BACKOFF_FIRST_MS << shift;
    return delay > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : delay;
}

/* Both handles of w's process are closed: replace it, or count it out. */
static void worker_closed(worker_t *w)
{
    gen_t *gen = w->gen;
    sup_t *sup = gen->sup;
    w->state = WORKER_IDLE;
    w->pid = 0;
    w->exited = 0;
    if (w->beat >= 0) {
        /* Its process is gone: nobody writes its metrics slot any more. */
        mph_metrics_slot_t *m = &sup->shared->metrics[1 + w->beat];
        if (sup->shared->has_metrics && __atomic_load_n(&m->in_use, __ATOMIC_ACQUIRE)) {
            mph_metrics_fold(&sup->shared->metrics[0], m, 0);
            __atomic_store_n(&m->in_use, 0, __ATOMIC_RELEASE);
            memset(m, 0, sizeof(*m));
        }
        sup->beat_used[w->beat] = 0;
    }
    w->beat = -1;
    assert(assert_worker_state(w));
    gen->busy--;
    char why[200];
    switch (gen->state) {
    case GEN_STOPPING:
        if (gen->busy == 0)
            gen_close(gen);
        return;
    case GEN_PROBING: /* the probe ended without a word: how it ended is the reason */
        snprintf(why, sizeof(why), "the script's check %s", w->how);
        gen_failed(gen, why);
        return;
    case GEN_STARTING:
        if (w->id == 0)
            return; /* the probe, done */
        /* Its report said nothing (it would have failed the start already): how it ended is
         * the reason. Decided only now, when its report socket has been read to the end. */
        snprintf(why, sizeof(why), "worker %d %s during %s", w->id, w->how,
                 sup->state == SUP_STARTING ? "startup" : "the reload");
        gen_failed(gen, why);
        return;
    case GEN_CURRENT:
        break;
    }
    if (sup->state != SUP_RUNNING)
        return;
    uint64_t delay = respawn_delay(w);
    if (delay > 0)
        mph_log(MPH_LOG_WARN,
                "worker %d ended within %d ms of starting (%d time(s) in a row); "
                "starting it again in %.1f s",
                w->id, QUICK_DEATH_MS, w->quick_deaths, (double)delay / 1000);
    update_pidfile(sup);
    uv_timer_start(&w->respawn, on_respawn, delay, 0);
}

static void on_worker_handle_closed(worker_t *w)
{
    if (--w->open_handles == 0 && w->exited)
        worker_closed(w);
}

static void on_report_closed(uv_handle_t *h)
{
    on_worker_handle_closed(h->data);
}

static void on_proc_closed(uv_handle_t *h)
{
    on_worker_handle_closed(h->data);
}

static void on_worker_exit(uv_process_t *proc, int64_t status, int signum)
{
    worker_t *w = proc->data;
    gen_t *gen = w->gen;
    sup_t *sup = gen->sup;
    if (signum)
        snprintf(w->how, sizeof(w->how), "was killed by signal %d (%s)", signum, strsignal(signum));
    else
        snprintf(w->how, sizeof(w->how), "exited with status %lld", (long long)status);
    int quick = uv_now(&sup->loop) - w->spawned_ms < QUICK_DEATH_MS;
    w->quick_deaths = quick ? w->quick_deaths + 1 : 0;
    if (w->state == WORKER_READY || w->state == WORKER_SERVING)
        gen->ready--;
    if (w->id == 0)
        mph_log(status || signum ? MPH_LOG_WARN : MPH_LOG_DEBUG, "the reload's check (pid %d) %s",
                w->pid, w->how);
    else if (sup->state == SUP_RUNNING && gen->state == GEN_CURRENT) {
        mph_log(MPH_LOG_WARN, "worker %d (pid %d) %s; replacing it", w->id, w->pid, w->how);
        if (sup->shared->has_metrics)
            __atomic_store_n(&sup->shared->metrics[0].restarts,
                             sup->shared->metrics[0].restarts + 1, __ATOMIC_RELAXED);
    } else
        mph_log(gen->state != GEN_STOPPING || signum || status ? MPH_LOG_WARN : MPH_LOG_DEBUG,
                "worker %d (pid %d) %s", w->id, w->pid, w->how);
    w->exited = 1;
    uv_close((uv_handle_t *)&w->proc, on_proc_closed);
    /* The report socket reaches end of file by itself now that its other end is gone; one
     * that waited for "go" stopped reading, so close it here. */
    if (w->state == WORKER_READY)
        close_report(w);
}

/* ---- Starting a worker ---- */

/* A worker's command line: `mphost SCRIPT serve` with our options (as "--name=value") but not
 * our verb (deploy would fork again) nor serve's PORT (it inherits the socket). New array of
 * borrowed strings. */
static char **worker_args(const mph_cli_t *cli)
{
    char **args = mph_xcalloc((size_t)cli->noptions + 4, sizeof(*args));
    int k = 0;
    args[k++] = (char *)cli->argv0;
    args[k++] = cli->script_path;
    args[k++] = "serve";
    for (int i = 0; i < cli->noptions; i++)
        args[k++] = cli->options[i];
    return args;
}

/* Unless the user tuned glibc's allocator: a worker frees its calls' many small blocks in
 * bursts (a batch's JSON trees, replies), more of one size than the per-thread cache's
 * default of 7 holds; the rest went through the arena, and freeing into it merged chunks and
 * consolidated its fast bins every time. 64 per size cut a batch's instructions by a tenth
 * (bench/README.md) for at most about 2 MB kept cached. Other C libraries ignore it. */
#define WORKER_MALLOC_TUNABLES "GLIBC_TUNABLES=glibc.malloc.tcache_count=64"

/* The worker's environment: ours, with MPH_WORKER_ENV set for it, the storage's password if
 * it has one (supervisor.h), and WORKER_MALLOC_TUNABLES. New array; *spec_out and
 * *password_out are its new strings. */
static char **worker_env(const worker_t *w, char **spec_out, char **password_out)
{
    const mph_cli_t *cli = w->gen->sup->cli;
    size_t n = 0;
    while (environ[n])
        n++;
    char **env = mph_xcalloc(n + 4, sizeof(*env));
    size_t k = 0, elen = strlen(MPH_WORKER_ENV), plen = strlen(MPH_STORAGE_PASSWORD_ENV);
    int tuned = 0;
    for (size_t i = 0; i < n; i++) {
        tuned |= strncmp(environ[i], "GLIBC_TUNABLES=", 15) == 0;
        if ((strncmp(environ[i], MPH_WORKER_ENV, elen) != 0 || environ[i][elen] != '=') &&
            (strncmp(environ[i], MPH_STORAGE_PASSWORD_ENV, plen) != 0 || environ[i][plen] != '='))
            env[k++] = environ[i];
    }
    if (!tuned)
        env[k++] = WORKER_MALLOC_TUNABLES;
    char *spec = mph_xmalloc(elen + 80);
    sprintf(spec, "%s=%d %d %d %d %d", MPH_WORKER_ENV, w->id, w->id ? w->gen->n : 0, (int)getpid(),
            w->gen->number, w->beat);
    env[k++] = spec;
    *spec_out = spec;
    *password_out = NULL;
    if (cli->storage_password) {
        char *pw = mph_xmalloc(plen + strlen(cli->storage_password) + 2);
        sprintf(pw, "%s=%s", MPH_STORAGE_PASSWORD_ENV, cli->storage_password);
        env[k++] = *password_out = pw;
    }
    return env;
}

/* A free beat index, its heartbeat zeroed (so that a stamp of its last process is not read
 * as the new one's), or -1 when every one is taken. */
static int take_beat(sup_t *sup)
{
    for (int i = 0; i < MPH_SHARED_BEATS; i++) {
        if (!sup->beat_used[i]) {
            sup->beat_used[i] = 1;
            __atomic_store_n(&sup->shared->beats[i].alive_ms, 0, __ATOMIC_RELAXED);
            return i;
        }
    }
    return -1;
}

static void spawn_worker(worker_t *w)
{
    gen_t *gen = w->gen;
    sup_t *sup = gen->sup;
    assert(assert_worker_state(w) && w->state == WORKER_IDLE);
    if (w->id > 0) {
        w->beat = take_beat(sup);
        /* As many indexes as two generations of the most workers, and a reload ends only once
         * one of its two is gone. */
        assert(w->beat >= 0);
    }
    w->stuck = 0;
    uv_pipe_init(&sup->loop, &w->report, 0);
    w->report.data = w;
    uv_stdio_container_t stdio[7];
    stdio[0].flags = UV_IGNORE; /* /dev/null */
    stdio[1].flags = UV_INHERIT_FD;
    stdio[1].data.fd = 1;
    stdio[2].flags = UV_INHERIT_FD;
    stdio[2].data.fd = 2;
    stdio[MPH_WORKER_LISTEN_FD].flags = UV_INHERIT_FD;
    stdio[MPH_WORKER_LISTEN_FD].data.fd = sup->listen_fd;
    stdio[MPH_WORKER_REPORT_FD].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE | UV_READABLE_PIPE;
    stdio[MPH_WORKER_REPORT_FD].data.stream = (uv_stream_t *)&w->report;
    stdio[MPH_WORKER_SHARED_FD].flags = UV_INHERIT_FD;
    stdio[MPH_WORKER_SHARED_FD].data.fd = sup->shared_fd;
    stdio[MPH_WORKER_SOCKETS_FD].flags = UV_INHERIT_FD;
    stdio[MPH_WORKER_SOCKETS_FD].data.fd = sup->sockets_fd;
    char *spec, *password;
    char **env = worker_env(w, &spec, &password);
    uv_process_options_t opt;
    memset(&opt, 0, sizeof(opt));
    opt.exit_cb = on_worker_exit;
    opt.file = sup->exe;
    opt.args = sup->args;
    opt.env = env;
    opt.stdio = stdio;
    opt.stdio_count = 7;
    /* A session of its own: a Ctrl-C at the terminal reaches the supervisor alone, which
     * then stops the workers in order (they would otherwise stop by themselves, and look
     * like workers to replace). */
    opt.flags = UV_PROCESS_DETACHED;
    w->proc.data = w;
    int rc = uv_spawn(&sup->loop, &w->proc, &opt);
    free(spec);
    if (password) {
        explicit_bzero(password, strlen(password));
        free(password);
    }
    free(env);
    w->spawned_ms = uv_now(&sup->loop);
    w->started = (long long)time(NULL);
    mph_linebuf_init(&w->lines, w->line, sizeof(w->line));
    gen->busy++;
    w->state = WORKER_STARTING;
    w->report_open = 1;
    w->open_handles = 2;
    if (rc != 0) {
        /* No exit callback will come, but the process handle must still be closed. */
        snprintf(w->how, sizeof(w->how), "could not be started (%s)", uv_strerror(rc));
        mph_log(MPH_LOG_ERROR, "worker %d %s", w->id, w->how);
        w->quick_deaths++;
        w->exited = 1;
        uv_close((uv_handle_t *)&w->proc, on_proc_closed);
        close_report(w);
        return;
    }
    w->pid = w->proc.pid;
    uv_read_start((uv_stream_t *)&w->report, on_report_alloc, on_report_read);
    mph_log(MPH_LOG_DEBUG, "worker %d of generation %d started (pid %d)", w->id, gen->number,
            w->pid);
}

static void on_respawn(uv_timer_t *t)
{
    worker_t *w = t->data;
    if (w->gen->sup->state != SUP_RUNNING || w->gen->state != GEN_CURRENT)
        return;
    w->restarts++;
    spawn_worker(w);
    update_pidfile(w->gen->sup);
}

/* ---- Generations ---- */

static void worker_init(gen_t *gen, worker_t *w, int id)
{
    w->gen = gen;
    w->id = id;
    w->beat = -1;
    uv_timer_init(&gen->sup->loop, &w->respawn);
    w->respawn.data = w;
}

/* A new generation of n workers (0: its probe tells how many), not started. */
static gen_t *gen_new(sup_t *sup, int n, gen_state_t state)
{
    gen_t *gen = mph_xcalloc(1, sizeof(*gen));
    gen->sup = sup;
    gen->number = ++sup->generations;
    gen->state = state;
    worker_init(gen, &gen->probe, 0);
    uv_timer_init(&sup->loop, &gen->kill_timer);
    gen->kill_timer.data = gen;
    gen->n = n;
    gen->workers = mph_xcalloc((size_t)(n > 0 ? n : 1), sizeof(*gen->workers));
    for (int i = 0; i < n; i++)
        worker_init(gen, &gen->workers[i], i + 1);
    mph_list_insert_head(&sup->gens, &gen->node);
    return gen;
}

static void on_gen_kill_timer(uv_timer_t *t)
{
    gen_t *gen = t->data;
    for (int i = 0; i <= gen->n; i++) {
        worker_t *w = GEN_WORKER(gen, i);
        if (w->state != WORKER_IDLE && !w->exited) {
            mph_log(MPH_LOG_WARN,
                    "worker %d (pid %d) still running %u ms after SIGTERM; killing it", w->id,
                    w->pid, gen->sup->cli->host.shutdown_timeout_ms + MPH_KILL_GRACE_MS);
            uv_process_kill(&w->proc, SIGKILL);
        }
    }
}

/* -> STOPPING: no more replacements; SIGTERM to its processes (a graceful stop for those that
 * serve), and the end of the report socket to those waiting for "go" (they leave). */
static void gen_stop(gen_t *gen)
{
    if (gen->state == GEN_STOPPING)
        return;
    gen->state = GEN_STOPPING;
    for (int i = 0; i <= gen->n; i++) {
        worker_t *w = GEN_WORKER(gen, i);
        uv_timer_stop(&w->respawn);
        if (w->state == WORKER_IDLE || w->exited)
            continue;
        if (w->state != WORKER_SERVING)
            close_report(w);
        uv_process_kill(&w->proc, SIGTERM);
    }
    uv_timer_start(&gen->kill_timer, on_gen_kill_timer,
                   (uint64_t)gen->sup->cli->host.shutdown_timeout_ms + MPH_KILL_GRACE_MS, 0);
    if (gen->busy == 0)
        gen_close(gen);
}

static void reload_end(sup_t *sup);

static void on_gen_timer_closed(uv_handle_t *h)
{
    gen_t *gen = h->data;
    if (--gen->timers > 0)
        return;
    sup_t *sup = gen->sup;
    mph_list_remove(&gen->node);
    if (sup->current == gen)
        sup->current = NULL;
    int awaited = sup->reload.active && sup->reload.awaited == gen;
    for (int i = 0; i < gen->n; i++) { /* the peer sockets its workers left */
        char name[32];
        snprintf(name, sizeof(name), MPH_PEER_SOCKET_FORMAT, gen->number, i + 1);
        mph_localsock_unlink(sup->sockets_fd, name);
    }
    free(gen->workers);
    free(gen);
    if (awaited)
        reload_end(sup);
    if (sup->state == SUP_STOPPING && mph_list_empty(&sup->gens))
        begin_stop(sup); /* finishes the stop */
}

/* Every worker of a stopping generation is idle: closes its timers, then frees it. */
static void gen_close(gen_t *gen)
{
    assert(gen->state == GEN_STOPPING && gen->busy == 0);
    if (gen->closing)
        return;
    gen->closing = 1;
    gen->timers = gen->n + 2;
    for (int i = 0; i <= gen->n; i++) {
        worker_t *w = GEN_WORKER(gen, i);
        w->respawn.data = gen;
        uv_close((uv_handle_t *)&w->respawn, on_gen_timer_closed);
    }
    gen->kill_timer.data = gen;
    uv_close((uv_handle_t *)&gen->kill_timer, on_gen_timer_closed);
}

/* A generation that was starting cannot serve (why: one line). */
static void gen_failed(gen_t *gen, const char *why)
{
    sup_t *sup = gen->sup;
    if (sup->state == SUP_STARTING) {
        start_failed(sup, why);
        return;
    }
    if (gen->state == GEN_STOPPING)
        return;
    assert(sup->reload.active && sup->reload.gen == gen);
    uv_timer_stop(&sup->reload.timer);
    snprintf(sup->reload.outcome, sizeof(sup->reload.outcome), "error %s", why);
    mph_log(MPH_LOG_ERROR, "reload failed: %s; generation %d serves on", why, sup->current->number);
    sup->reload.awaited = gen;
    gen_stop(gen);
}

/* ---- Reloads ---- */

/* The end of a reload: its answer, once the generation it waited for is gone. */
static void reload_end(sup_t *sup)
{
    reload_t *r = &sup->reload;
    mph_log(MPH_LOG_INFO, "reload: done (%s)", r->outcome);
    if (r->req)
        mph_control_reply(r->req, r->outcome);
    r->req = NULL;
    r->active = 0;
    r->gen = r->awaited = NULL;
}

static void on_reload_timer(uv_timer_t *t)
{
    sup_t *sup = t->data;
    char why[100];
    snprintf(why, sizeof(why), "the new workers did not all start within %d s",
             MPH_RELOAD_START_MS / 1000);
    gen_failed(sup->reload.gen, why);
}

/* The probe read the re-read script's topologies: start that many workers (count: the
 * probe's number, as text). */
static void reload_probed(gen_t *gen, const char *count)
{
    sup_t *sup = gen->sup;
    int topology = atoi(count);
    int n = topology > sup->cli->workers ? topology : sup->cli->workers;
    if (n < 1)
        n = 1;
    if (n > MPH_MAX_WORKERS) {
        gen_failed(gen, "the script's topologies ask for too many workers");
        return;
    }
    free(gen->workers);
    gen->workers = mph_xcalloc((size_t)n, sizeof(*gen->workers));
    gen->n = n;
    for (int i = 0; i < n; i++) {
        worker_t *w = &gen->workers[i];
        worker_init(gen, w, i + 1);
        /* restarts counts deaths of an id over the deployment's life: a reload is none. */
        if (sup->current && i < sup->current->n)
            w->restarts = sup->current->workers[i].restarts;
    }
    gen->state = GEN_STARTING;
    mph_log(MPH_LOG_INFO, "reload: starting generation %d (%d %s)", gen->number, n,
            MPH_WORKERS_WORD(n));
    for (int i = 0; i < n && gen->state == GEN_STARTING; i++)
        spawn_worker(&gen->workers[i]);
}

/* A reload asked for (req: by `mphost SCRIPT reload`; NULL: by SIGHUP). One at a time: a
 * second one is refused (not queued: its asker would wait for a script read at a time it did
 * not choose, and the answer it got would be another's). */
static void begin_reload(sup_t *sup, mph_control_req_t *req)
{
    reload_t *r = &sup->reload;
    const char *refused = NULL;
    if (sup->state != SUP_RUNNING)
        refused = sup->state == SUP_STARTING ? "error the deployment is still starting"
                                             : "error the deployment is stopping";
    else if (r->active)
        refused = "error a reload is already in progress; try again once it has ended";
    if (refused) {
        mph_log(MPH_LOG_WARN, "reload refused: %s", refused + 6);
        if (req)
            mph_control_reply(req, refused);
        return;
    }
    memset(r->outcome, 0, sizeof(r->outcome));
    r->active = 1;
    r->req = req;
    r->awaited = NULL;
    r->gen = gen_new(sup, 0, GEN_PROBING);
    mph_log(MPH_LOG_INFO, "reload: reading %s again for generation %d", sup->cli->script,
            r->gen->number);
    uv_timer_start(&r->timer, on_reload_timer, MPH_RELOAD_START_MS, 0);
    spawn_worker(&r->gen->probe);
}

static void on_control(void *ud, mph_control_req_t *req, const char *command)
{
    sup_t *sup = ud;
    if (strcmp(command, "reload") == 0)
        begin_reload(sup, req);
    else
        mph_control_reply(req, "error unknown command");
}

static void on_sighup(uv_signal_t *sig, int signum)
{
    (void)signum;
    mph_log(MPH_LOG_INFO, "received SIGHUP: reloading");
    begin_reload(sig->data, NULL);
}

/* SIGUSR1 (a log rotation): the supervisor reopens its log, then each worker its own and its
 * access log. Only workers that have reported ready are told: one still starting may not
 * handle the signal yet (it would die of it); its lines go to the renamed file meanwhile,
 * none is lost. */
static void on_sigusr1(uv_signal_t *sig, int signum)
{
    sup_t *sup = sig->data;
    (void)signum;
    mph_reopen_stderr(sup->log_path);
    mph_log(MPH_LOG_INFO, "received SIGUSR1: log files reopened; telling the workers");
    mph_list_t *q;
    mph_list_foreach(q, &sup->gens) {
        gen_t *gen = mph_list_entry(q, gen_t, node);
        for (int i = 1; i <= gen->n; i++) {
            worker_t *w = GEN_WORKER(gen, i);
            if ((w->state == WORKER_READY || w->state == WORKER_SERVING) && !w->exited)
                uv_process_kill(&w->proc, SIGUSR1);
        }
    }
}

/* ---- Heartbeats ---- */

/* Kills every serving worker whose loop has not turned for the handler time limit plus
 * MPH_HEARTBEAT_GRACE_MS: it is stuck in a handler that the time limit's hook cannot stop
 * (compiled code runs no hooks), or in C. SIGKILL, because a stuck loop would never run a
 * SIGTERM's graceful stop; its calls in flight get no answer and commit nothing (it has not
 * reached their commits), and it is replaced as any worker that dies. */
static void on_beat_check(uv_timer_t *t)
{
    sup_t *sup = t->data;
    uint64_t now = uv_hrtime() / 1000000; /* the clock the workers' loops stamp */
    uint64_t limit = (uint64_t)sup->cli->host.handler_timeout_ms + MPH_HEARTBEAT_GRACE_MS;
    mph_list_t *q;
    mph_list_foreach(q, &sup->gens) {
        gen_t *gen = mph_list_entry(q, gen_t, node);
        for (int i = 0; i < gen->n; i++) {
            worker_t *w = &gen->workers[i];
            if (w->state != WORKER_SERVING || w->exited || w->stuck)
                continue;
            uint64_t alive =
                __atomic_load_n(&sup->shared->beats[w->beat].alive_ms, __ATOMIC_RELAXED);
            if (alive == 0 || now < alive + limit)
                continue;
            mph_log(MPH_LOG_WARN,
                    "worker %d (pid %d): its loop has not turned for %.1f s (handler time limit "
                    "%.1f s); killing it",
                    w->id, w->pid, (double)(now - alive) / 1000,
                    (double)sup->cli->host.handler_timeout_ms / 1000);
            w->stuck = 1;
            uv_process_kill(&w->proc, SIGKILL);
        }
    }
}

/* ---- Stopping ---- */

static void on_closed(uv_handle_t *h)
{
    (void)h; /* embedded in sup, freed after the loop has run dry */
}

/* STARTING/RUNNING -> STOPPING: every generation stops. Called again (once the last
 * generation is freed): closes the supervisor's own handles. */
static void begin_stop(sup_t *sup)
{
    if (sup->state != SUP_STOPPING) {
        sup->state = SUP_STOPPING;
        /* The port is released once the workers have closed their copies too. */
        close(sup->listen_fd);
        sup->listen_fd = -1;
        if (sup->control) {
            mph_control_close(sup->control);
            sup->control = NULL;
        }
        if (sup->reload.active) {
            uv_timer_stop(&sup->reload.timer);
            snprintf(sup->reload.outcome, sizeof(sup->reload.outcome),
                     "error the deployment is stopping");
        }
        mph_list_t *q;
        mph_list_foreach(q, &sup->gens) /* (gen_stop frees nothing: handles close later) */
            gen_stop(mph_list_entry(q, gen_t, node));
    }
    if (!mph_list_empty(&sup->gens) || sup->closed)
        return;
    if (sup->reload.active) /* the generation it waited for went with the others */
        reload_end(sup);
    sup->closed = 1;
    uv_close((uv_handle_t *)&sup->beat_check, on_closed);
    uv_close((uv_handle_t *)&sup->reload.timer, on_closed);
    uv_close((uv_handle_t *)&sup->sigint, on_closed);
    uv_close((uv_handle_t *)&sup->sigterm, on_closed);
    uv_close((uv_handle_t *)&sup->sighup, on_closed);
    uv_close((uv_handle_t *)&sup->sigusr1, on_closed);
}

static void on_signal(uv_signal_t *sig, int signum)
{
    sup_t *sup = sig->data;
    if (sup->state == SUP_STOPPING)
        return;
    mph_log(MPH_LOG_INFO, "received %s; stopping", signum == SIGINT ? "SIGINT" : "SIGTERM");
    sd_notify(0, "STOPPING=1");
    if (sup->state == SUP_STARTING && sup->failure[0] == '\0')
        snprintf(sup->failure, sizeof(sup->failure), "stopped by %s during startup",
                 signum == SIGINT ? "SIGINT" : "SIGTERM");
    begin_stop(sup);
}

/* ---- The run ---- */

/* Makes the shared page (supervisor.h): a memfd, so that it needs no name in any file system
 * and goes away with the last process that maps it. Returns 0, or MPH_EIO with a message. */
static int make_shared_page(sup_t *sup, char *err, size_t errlen)
{
    sup->shared_fd = memfd_create("mphost-shared", MFD_CLOEXEC);
    sup->shared_len = sizeof(mph_shared_page_t);
    if (sup->shared_fd >= 0 && ftruncate(sup->shared_fd, sup->shared_len) != 0) {
        mph_log(MPH_LOG_WARN,
                "/metrics will show only the worker that answers a scrape: no room "
                "for the workers' counters in shared memory (%s)",
                strerror(errno));
        sup->shared_len = MPH_SHARED_BASE_SIZE;
    }
    if (sup->shared_fd < 0 || ftruncate(sup->shared_fd, sup->shared_len) != 0) {
        snprintf(err, errlen, "cannot create the workers' shared page: %s", strerror(errno));
        goto fail;
    }
    sup->shared =
        mmap(NULL, sup->shared_len, PROT_READ | PROT_WRITE, MAP_SHARED, sup->shared_fd, 0);
    if (sup->shared == MAP_FAILED) {
        sup->shared = NULL;
        snprintf(err, errlen, "cannot map the workers' shared page: %s", strerror(errno));
        goto fail;
    }
    sup->shared->magic = MPH_SHARED_MAGIC; /* the rest is zero, as ftruncate made it */
    sup->shared->has_metrics = sup->shared_len == sizeof(mph_shared_page_t);
    if (sup->shared->has_metrics)
        sup->shared->metrics[0].in_use = 1; /* always summed */
    return 0;
fail:
    if (sup->shared_fd >= 0)
        close(sup->shared_fd);
    sup->shared_fd = -1;
    return MPH_EIO;
}

static void free_shared_page(sup_t *sup)
{
    if (sup->shared)
        munmap(sup->shared, sup->shared_len);
    if (sup->shared_fd >= 0)
        close(sup->shared_fd);
}

/* The socket directory (localsock.h) of the control socket and the workers' peer sockets: the
 * deployment's, in the state directory, so that `reload` finds it from the pid file's port;
 * without a state directory (serve, when it could not be used), a fresh one in /tmp. */
static int open_socket_dir(sup_t *sup, char *err, size_t errlen)
{
    if (sup->cli->state_dir == NULL) {
        sup->sockets_fd = mph_localsock_dir_temp(&sup->sockets_path, err, errlen);
    } else {
        sup->sockets_path = mph_cli_deployment_file(sup->cli, sup->port, ".sockets");
        sup->sockets_fd = mph_localsock_dir_open(sup->sockets_path, 1, err, errlen);
    }
    return sup->sockets_fd < 0 ? sup->sockets_fd : 0;
}

static void close_socket_dir(sup_t *sup)
{
    if (sup->sockets_fd >= 0)
        mph_localsock_dir_remove(sup->sockets_fd, sup->sockets_path);
    free(sup->sockets_path);
}

/* The supervisor's own handles: signals, timers. */
static void init_handles(sup_t *sup)
{
    uv_signal_init(&sup->loop, &sup->sigint);
    uv_signal_init(&sup->loop, &sup->sigterm);
    uv_signal_init(&sup->loop, &sup->sighup);
    uv_signal_init(&sup->loop, &sup->sigusr1);
    sup->sigint.data = sup->sigterm.data = sup->sighup.data = sup->sigusr1.data = sup;
    uv_signal_start(&sup->sigint, on_signal, SIGINT);
    uv_signal_start(&sup->sigterm, on_signal, SIGTERM);
    uv_signal_start(&sup->sighup, on_sighup, SIGHUP);
    uv_signal_start(&sup->sigusr1, on_sigusr1, SIGUSR1);
    uv_timer_init(&sup->loop, &sup->beat_check);
    sup->beat_check.data = sup;
    if (sup->cli->host.handler_timeout_ms > 0) /* with no limit, a handler may run for ever */
        uv_timer_start(&sup->beat_check, on_beat_check, BEAT_CHECK_MS, BEAT_CHECK_MS);
    uv_timer_init(&sup->loop, &sup->reload.timer);
    sup->reload.timer.data = sup;
}

int mph_supervisor_run(mph_cli_t *cli, int nworkers, FILE *ready)
{
    sup_t *sup = mph_xcalloc(1, sizeof(*sup));
    char err[1024];
    mph_list_init(&sup->gens);
    sup->cli = cli;
    sup->shared_fd = -1;
    sup->ready_out = ready;
    sup->log_path = getenv("MPH_LOG_PATH");
    sup->args = worker_args(cli);
    /* The binary's path as /proc/self/exe names it (uv_exepath reads that link). Not the link
     * itself: under valgrind it leads to valgrind's tool, while reading it gives mphost. */
    size_t exelen = sizeof(sup->exe);
    if (uv_exepath(sup->exe, &exelen) != 0)
        snprintf(sup->exe, sizeof(sup->exe), "/proc/self/exe");
    sup->sockets_fd = sup->listen_fd = -1;
    uv_loop_init(&sup->loop);
    int rc = make_shared_page(sup, err, sizeof(err));
    if (rc == 0)
        rc = mph_http_open_listener(cli->host.listen, cli->host.port, &sup->listen_fd, &sup->port,
                                    err, sizeof(err));
    if (rc == 0)
        rc = open_socket_dir(sup, err, sizeof(err));
    if (rc == 0)
        rc = mph_control_listen(&sup->control, &sup->loop, sup->sockets_fd, on_control, sup, err,
                                sizeof(err));
    if (rc != 0) {
        mph_log(MPH_LOG_ERROR, "%s", err);
        if (sup->control)
            mph_control_close(sup->control);
        uv_run(&sup->loop, UV_RUN_DEFAULT);
        uv_loop_close(&sup->loop);
        if (sup->listen_fd >= 0)
            close(sup->listen_fd);
        close_socket_dir(sup);
        mph_cli_report_failure(ready, err); /* once the port is free again */
        free_shared_page(sup);
        free(sup->args);
        free(sup);
        return 1;
    }
    init_handles(sup);
    sup->current = gen_new(sup, nworkers, GEN_STARTING);
    mph_log(MPH_LOG_INFO, "starting %d %s for %s on %s:%d", nworkers, MPH_WORKERS_WORD(nworkers),
            cli->script, cli->host.listen, sup->port);
    for (int i = 0; i < nworkers && sup->state == SUP_STARTING; i++)
        spawn_worker(&sup->current->workers[i]);
    uv_run(&sup->loop, UV_RUN_DEFAULT);

    rc = 0;
    if (sup->ready_out || sup->failure[0]) { /* the start failed */
        mph_log(MPH_LOG_ERROR, "%s", sup->failure);
        mph_cli_report_failure(sup->ready_out, sup->failure);
        rc = 1;
    } else {
        if (cli->state_dir)
            mph_cli_remove_pidfile(cli, sup->port);
        mph_log(MPH_LOG_INFO, "stopped");
    }
    if (uv_loop_close(&sup->loop) != 0)
        mph_log(MPH_LOG_ERROR, "bug: handles left open at exit (supervisor)");
    close_socket_dir(sup);
    free_shared_page(sup);
    free(sup->args);
    free(sup);
    return rc;
}
