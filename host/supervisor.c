/*
 * supervisor.c: serving with worker processes (supervisor.h has the protocol; worker.c is the
 * other side). The supervisor runs no Lua and serves no request: it binds the port, starts the
 * workers, replaces those that exit, and stops them all when it is told to stop.
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
 * workers take turns: mph_http_listen_shared in http.c.)
 *
 * Worker slots, one per worker id; a slot's states:
 *
 *   (idle) --spawn_worker: uv_spawn-->                       STARTING
 *   STARTING --"ready" on its report socket-->                 READY
 *   STARTING/READY --exit (on_worker_exit), then both handles closed
 *                   (on_slot_handle_closed)-->                 (idle)
 *   (idle) --the supervisor runs: respawn timer (backoff)-->   STARTING
 *   (idle) --the supervisor stops-->                           stays idle
 *
 * and the supervisor's: STARTING (until every worker is ready; any failure stops the others
 * and the start fails) -> RUNNING (replaces workers) -> STOPPING (SIGTERM to each worker,
 * SIGKILL to those left after the shutdown timeout + KILL_GRACE_MS; ends when no slot has a
 * process or an open handle).
 *
 * While it runs it also reads the workers' heartbeats in the shared page (supervisor.h) every
 * BEAT_CHECK_MS, and kills a ready worker whose loop has stopped turning (on_beat_check).
 */
#define _GNU_SOURCE
#include "supervisor.h"

#include <assert.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "common.h"
#include "http.h"

extern char **environ;

#define QUICK_DEATH_MS 2000  /* a worker that dies younger than this "died at once" */
#define BACKOFF_FIRST_MS 100 /* the wait before replacing it after a first quick death ... */
#define BACKOFF_MAX_MS 10000 /* ... doubling with each quick death in a row, up to this */
#define KILL_GRACE_MS 2000   /* after the shutdown timeout: then SIGKILL (delete waits +5 s) */
#define BEAT_CHECK_MS 250    /* how often the workers' heartbeats are looked at */

typedef enum { SLOT_IDLE, SLOT_STARTING, SLOT_READY } slot_state_t;
typedef enum { SUP_STARTING, SUP_RUNNING, SUP_STOPPING } sup_state_t;

typedef struct sup_s sup_t;

typedef struct {
    sup_t *sup;          /* owner */
    int id;              /* 1..n */
    slot_state_t state;  /* see the diagram above */
    uv_process_t proc;   /* the worker's process handle (while open_handles counts it) */
    uv_pipe_t report;    /* our end of its report socket (idem) */
    uv_timer_t respawn;  /* the backoff before the next process; open for the whole run */
    int open_handles;    /* proc and report handles not closed yet */
    int exited;          /* on_worker_exit has run for the current process */
    int report_open;     /* the report pipe is not closing yet */
    int pid;             /* of the current process; 0 when idle */
    long long started;   /* time(NULL) when it was spawned, for status */
    uint64_t spawned_ms; /* uv_now() then, for the quick-death test */
    int restarts;        /* processes started for this id after the first */
    int quick_deaths;    /* quick deaths in a row (the backoff's exponent) */
    int beat;            /* the process's heartbeat slot in the shared page; -1: none */
    int stuck;           /* the process was killed for a loop that stopped turning */
    char how[96];        /* how the last process ended ("exited with status 1") */
    char line[1024];     /* the report line being read */
    size_t len;          /* bytes in line */
} slot_t;

struct sup_s {
    uv_loop_t loop;
    mph_cli_t *cli; /* borrowed */
    sup_state_t state;
    int listen_fd;  /* the shared socket; -1 once closed (at the stop) */
    int port;       /* bound */
    int n;          /* workers */
    int generation; /* of the workers running the script now (supervisor.h) */
    slot_t *slots;  /* n, owned */
    int ready;      /* slots READY */
    int busy;       /* slots not idle (a process or a handle still open) */
    uv_signal_t sigint, sigterm;
    uv_timer_t kill_timer;     /* STOPPING: SIGKILL what is left */
    FILE *ready_out;           /* deploy's ready stream until the start ends, else NULL */
    char failure[1100];        /* why the start failed ("" while it has not) */
    const char *log_path;      /* MPH_LOG_PATH, for the pid file */
    int closed;                /* the supervisor's own handles are closing */
    char **args;               /* a worker's command line (owned array, borrowed strings) */
    mph_shared_page_t *shared; /* the shared page (supervisor.h), mapped; owned */
    int shared_fd;             /* its memfd, which workers inherit */
    unsigned char beat_used[MPH_SHARED_BEATS]; /* heartbeat slots given to live processes */
    uv_timer_t beat_check; /* looks at the heartbeats (with a handler time limit) */
    char exe[4096];        /* this binary's path, which workers run */
};

#ifndef NDEBUG
static int assert_slot_state(const slot_t *s)
{
    switch (s->state) {
    case SLOT_IDLE:
        assert(s->open_handles == 0 && s->pid == 0);
        break;
    case SLOT_STARTING:
    case SLOT_READY:
        assert(s->open_handles > 0 || s->exited);
        break;
    default:
        assert(!"unknown slot state");
    }
    return 1;
}
#endif

static void spawn_worker(slot_t *s);
static void on_respawn(uv_timer_t *t);
static void begin_stop(sup_t *sup);

/* ---- The pid file and the start's outcome ---- */

/* Rewrites the pid file with the workers as they are now: status reads them there. A file,
 * rather than a question on the port, because it needs no worker to answer (a stuck one
 * could not, and a method or path of ours would take one from the script), and the pid file
 * already has the checks a file in the state directory needs. Returns 0, or MPH_EIO after
 * logging why (once serving, the workers serve on: only status is stale). */
static int update_pidfile(sup_t *sup)
{
    if (sup->cli->state_dir == NULL || sup->state != SUP_RUNNING)
        return 0;
    mph_cli_worker_t *w = mph_xcalloc((size_t)sup->n, sizeof(*w));
    for (int i = 0; i < sup->n; i++) {
        const slot_t *s = &sup->slots[i];
        w[i] =
            (mph_cli_worker_t){s->id, s->state == SLOT_IDLE ? 0 : s->pid, s->started, s->restarts};
    }
    char err[1200];
    int rc = mph_cli_write_pidfile(sup->cli, sup->port, sup->log_path, w, sup->n, err, sizeof(err));
    if (rc != 0)
        mph_log(MPH_LOG_ERROR, "%s", err);
    free(w);
    return rc;
}

/* The start failed (the first reason is kept): stop whatever did start. */
static void start_failed(sup_t *sup, const char *why)
{
    if (sup->failure[0] == '\0')
        snprintf(sup->failure, sizeof(sup->failure), "%s", why);
    begin_stop(sup);
}

/* Every worker listens: the deployment is up. */
static void start_done(sup_t *sup)
{
    sup->state = SUP_RUNNING;
    sup->cli->started = (long long)time(NULL);
    __atomic_store_n(&sup->shared->generation, (uint64_t)sup->generation, __ATOMIC_RELAXED);
    if (update_pidfile(sup) != 0 && sup->ready_out) {
        /* A deployment that delete and status cannot find must not run (see main.c). */
        start_failed(sup, "cannot write the pid file (see the log)");
        return;
    }
    mph_log(MPH_LOG_INFO, "serving %s on %s:%d (pid %d, %d %s, storage %s)", sup->cli->script,
            sup->cli->host.listen, sup->port, (int)getpid(), sup->n, MPH_WORKERS_WORD(sup->n),
            sup->cli->storage_desc);
    if (sup->ready_out) {
        fprintf(sup->ready_out, "ready %d\n", sup->port);
        fclose(sup->ready_out);
        sup->ready_out = NULL;
    }
}

/* ---- A worker's report line ---- */

static void on_report_closed(uv_handle_t *h);

static void close_report(slot_t *s)
{
    if (!s->report_open)
        return;
    s->report_open = 0;
    uv_close((uv_handle_t *)&s->report, on_report_closed);
}

static void on_report_line(slot_t *s, const char *line)
{
    sup_t *sup = s->sup;
    if (strcmp(line, "ready") == 0 && s->state == SLOT_STARTING) {
        s->state = SLOT_READY;
        sup->ready++;
        mph_log(sup->state == SUP_STARTING ? MPH_LOG_DEBUG : MPH_LOG_INFO,
                "worker %d ready (pid %d)", s->id, s->pid);
        if (sup->state == SUP_STARTING && sup->ready == sup->n)
            start_done(sup);
        else
            update_pidfile(sup);
    } else if (strncmp(line, "error ", 6) == 0) {
        /* The worker logged it too (same log); the start fails with it. */
        if (sup->state == SUP_STARTING)
            start_failed(sup, line + 6);
    } else {
        mph_log(MPH_LOG_WARN, "worker %d (pid %d): unexpected report \"%.100s\"", s->id, s->pid,
                line);
    }
}

static void on_report_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    slot_t *s = h->data;
    (void)suggested;
    *buf = uv_buf_init(s->line + s->len, (unsigned)(sizeof(s->line) - 1 - s->len));
}

static void on_report_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    slot_t *s = stream->data;
    (void)buf;
    if (nread < 0) { /* end of file (the line was all), an error, or no room left */
        close_report(s);
        return;
    }
    s->len += (size_t)nread;
    s->line[s->len] = '\0';
    char *nl;
    while ((nl = strchr(s->line, '\n')) != NULL) {
        *nl = '\0';
        on_report_line(s, s->line);
        size_t rest = s->len - (size_t)(nl + 1 - s->line);
        memmove(s->line, nl + 1, rest + 1);
        s->len = rest;
    }
}

/* ---- A worker's end ---- */

/* Both handles of the slot's process are closed: replace it, or count it out. */
static void slot_closed(slot_t *s)
{
    sup_t *sup = s->sup;
    s->state = SLOT_IDLE;
    s->pid = 0;
    s->exited = 0;
    if (s->beat >= 0)
        sup->beat_used[s->beat] = 0;
    s->beat = -1;
    assert(assert_slot_state(s));
    sup->busy--;
    if (sup->state == SUP_STARTING) {
        /* Its report said nothing (it would have failed the start already): how it ended is
         * the reason. Decided only now, when its report socket has been read to the end. */
        char why[160];
        snprintf(why, sizeof(why), "worker %d %s during startup", s->id, s->how);
        start_failed(sup, why);
        return;
    }
    if (sup->state == SUP_STOPPING) {
        if (sup->busy == 0)
            begin_stop(sup); /* finishes the stop */
        return;
    }
    uint64_t delay = 0;
    if (s->quick_deaths > 0) {
        int shift = s->quick_deaths - 1 < 10 ? s->quick_deaths - 1 : 10;
        delay = (uint64_t)BACKOFF_FIRST_MS << shift;
        if (delay > BACKOFF_MAX_MS)
            delay = BACKOFF_MAX_MS;
    }
    if (delay > 0)
        mph_log(MPH_LOG_WARN,
                "worker %d ended within %d ms of starting (%d time(s) in a row); "
                "starting it again in %.1f s",
                s->id, QUICK_DEATH_MS, s->quick_deaths, (double)delay / 1000);
    update_pidfile(sup);
    uv_timer_start(&s->respawn, on_respawn, delay, 0);
}

static void on_slot_handle_closed(slot_t *s)
{
    if (--s->open_handles == 0 && s->exited)
        slot_closed(s);
}

static void on_report_closed(uv_handle_t *h)
{
    on_slot_handle_closed(h->data);
}

static void on_proc_closed(uv_handle_t *h)
{
    on_slot_handle_closed(h->data);
}

static void on_worker_exit(uv_process_t *proc, int64_t status, int signum)
{
    slot_t *s = proc->data;
    sup_t *sup = s->sup;
    if (signum)
        snprintf(s->how, sizeof(s->how), "was killed by signal %d (%s)", signum, strsignal(signum));
    else
        snprintf(s->how, sizeof(s->how), "exited with status %lld", (long long)status);
    int quick = uv_now(&sup->loop) - s->spawned_ms < QUICK_DEATH_MS;
    s->quick_deaths = quick ? s->quick_deaths + 1 : 0;
    if (s->state == SLOT_READY)
        sup->ready--;
    if (sup->state == SUP_RUNNING)
        mph_log(MPH_LOG_WARN, "worker %d (pid %d) %s; replacing it", s->id, s->pid, s->how);
    else
        mph_log(sup->state == SUP_STARTING || signum || status ? MPH_LOG_WARN : MPH_LOG_DEBUG,
                "worker %d (pid %d) %s", s->id, s->pid, s->how);
    s->exited = 1;
    uv_close((uv_handle_t *)&s->proc, on_proc_closed);
    /* The report socket reaches end of file by itself now that its other end is gone. */
}

/* ---- Starting a worker ---- */

/* A worker's command line: `mphost SCRIPT serve` with our options (--name=value) but not our
 * verb (deploy would fork again) nor a port (it inherits the socket). New array. */
static char **worker_args(const mph_cli_t *cli)
{
    int n = 0;
    while (cli->argv[n])
        n++;
    char **args = mph_xcalloc((size_t)n + 4, sizeof(*args));
    int k = 0;
    args[k++] = cli->argv[0];
    args[k++] = cli->script_path;
    args[k++] = "serve";
    for (int i = 1; i < n; i++)
        if (strncmp(cli->argv[i], "--", 2) == 0 && strchr(cli->argv[i], '='))
            args[k++] = cli->argv[i];
    return args;
}

/* The worker's environment: ours, with MPH_WORKER_ENV set for it. New array; entry n is new. */
static char **worker_env(const slot_t *s, char **spec_out)
{
    size_t n = 0;
    while (environ[n])
        n++;
    char **env = mph_xcalloc(n + 2, sizeof(*env));
    size_t k = 0, elen = strlen(MPH_WORKER_ENV);
    for (size_t i = 0; i < n; i++)
        if (strncmp(environ[i], MPH_WORKER_ENV, elen) != 0 || environ[i][elen] != '=')
            env[k++] = environ[i];
    char *spec = mph_xmalloc(elen + 80);
    sprintf(spec, "%s=%d %d %d %d %d", MPH_WORKER_ENV, s->id, s->sup->n, (int)getpid(),
            s->sup->generation, s->beat);
    env[k] = spec;
    *spec_out = spec;
    return env;
}

/* A free heartbeat slot, zeroed (so that a stamp of its last process is not read as the new
 * one's), or -1 when every slot is taken. */
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

static void spawn_worker(slot_t *s)
{
    sup_t *sup = s->sup;
    assert(assert_slot_state(s) && s->state == SLOT_IDLE);
    s->beat = take_beat(sup);
    assert(s->beat >= 0); /* as many slots as two generations of the most workers */
    s->stuck = 0;
    uv_pipe_init(&sup->loop, &s->report, 0);
    s->report.data = s;
    uv_stdio_container_t stdio[6];
    stdio[0].flags = UV_IGNORE; /* /dev/null */
    stdio[1].flags = UV_INHERIT_FD;
    stdio[1].data.fd = 1;
    stdio[2].flags = UV_INHERIT_FD;
    stdio[2].data.fd = 2;
    stdio[MPH_WORKER_LISTEN_FD].flags = UV_INHERIT_FD;
    stdio[MPH_WORKER_LISTEN_FD].data.fd = sup->listen_fd;
    stdio[MPH_WORKER_REPORT_FD].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
    stdio[MPH_WORKER_REPORT_FD].data.stream = (uv_stream_t *)&s->report;
    stdio[MPH_WORKER_SHARED_FD].flags = UV_INHERIT_FD;
    stdio[MPH_WORKER_SHARED_FD].data.fd = sup->shared_fd;
    char *spec;
    char **env = worker_env(s, &spec);
    uv_process_options_t opt;
    memset(&opt, 0, sizeof(opt));
    opt.exit_cb = on_worker_exit;
    opt.file = sup->exe;
    opt.args = sup->args;
    opt.env = env;
    opt.stdio = stdio;
    opt.stdio_count = 6;
    /* A session of its own: a Ctrl-C at the terminal reaches the supervisor alone, which
     * then stops the workers in order (they would otherwise stop by themselves, and look
     * like workers to replace). */
    opt.flags = UV_PROCESS_DETACHED;
    s->proc.data = s;
    int rc = uv_spawn(&sup->loop, &s->proc, &opt);
    free(spec);
    free(env);
    s->spawned_ms = uv_now(&sup->loop);
    s->started = (long long)time(NULL);
    s->len = 0;
    sup->busy++;
    s->state = SLOT_STARTING;
    s->report_open = 1;
    s->open_handles = 2;
    if (rc != 0) {
        /* No exit callback will come, but the process handle must still be closed. */
        snprintf(s->how, sizeof(s->how), "could not be started (%s)", uv_strerror(rc));
        mph_log(MPH_LOG_ERROR, "worker %d %s", s->id, s->how);
        s->quick_deaths++;
        s->exited = 1;
        uv_close((uv_handle_t *)&s->proc, on_proc_closed);
        close_report(s);
        return;
    }
    s->pid = s->proc.pid;
    uv_read_start((uv_stream_t *)&s->report, on_report_alloc, on_report_read);
    mph_log(MPH_LOG_DEBUG, "worker %d started (pid %d)", s->id, s->pid);
}

static void on_respawn(uv_timer_t *t)
{
    slot_t *s = t->data;
    if (s->sup->state != SUP_RUNNING)
        return;
    s->restarts++;
    spawn_worker(s);
    update_pidfile(s->sup);
}

/* ---- Heartbeats ---- */

/* Kills every ready worker whose loop has not turned for the handler time limit plus
 * MPH_HEARTBEAT_GRACE_MS: it is stuck in a handler that the time limit's hook cannot stop
 * (compiled code runs no hooks), or in C. SIGKILL, because a stuck loop would never run a
 * SIGTERM's graceful stop; its calls in flight get no answer and commit nothing (it has not
 * reached their commits), and it is replaced as any worker that dies. */
static void on_beat_check(uv_timer_t *t)
{
    sup_t *sup = t->data;
    uint64_t now = uv_hrtime() / 1000000; /* the clock the workers' loops stamp */
    uint64_t limit = (uint64_t)sup->cli->host.handler_timeout_ms + MPH_HEARTBEAT_GRACE_MS;
    for (int i = 0; i < sup->n; i++) {
        slot_t *s = &sup->slots[i];
        if (s->state != SLOT_READY || s->exited || s->stuck)
            continue;
        uint64_t alive = __atomic_load_n(&sup->shared->beats[s->beat].alive_ms, __ATOMIC_RELAXED);
        if (alive == 0 || now < alive + limit)
            continue;
        mph_log(MPH_LOG_WARN,
                "worker %d (pid %d): its loop has not turned for %.1f s (handler time limit "
                "%.1f s); killing it",
                s->id, s->pid, (double)(now - alive) / 1000,
                (double)sup->cli->host.handler_timeout_ms / 1000);
        s->stuck = 1;
        uv_process_kill(&s->proc, SIGKILL);
    }
}

/* ---- Stopping ---- */

static void on_kill_timer(uv_timer_t *t)
{
    sup_t *sup = t->data;
    for (int i = 0; i < sup->n; i++) {
        slot_t *s = &sup->slots[i];
        if (s->state != SLOT_IDLE && !s->exited) {
            mph_log(MPH_LOG_WARN,
                    "worker %d (pid %d) still running %u ms after SIGTERM; killing it", s->id,
                    s->pid, sup->cli->host.shutdown_timeout_ms + KILL_GRACE_MS);
            uv_process_kill(&s->proc, SIGKILL);
        }
    }
}

static void on_closed(uv_handle_t *h)
{
    (void)h; /* embedded in sup or its slots, freed after the loop has run dry */
}

/* STARTING/RUNNING -> STOPPING: no more workers, SIGTERM to those running. Called again
 * (from slot_closed) once none is left: closes the supervisor's own handles. */
static void begin_stop(sup_t *sup)
{
    if (sup->state != SUP_STOPPING) {
        sup->state = SUP_STOPPING;
        /* The port is released once the workers have closed their copies too. */
        close(sup->listen_fd);
        sup->listen_fd = -1;
        for (int i = 0; i < sup->n; i++) {
            slot_t *s = &sup->slots[i];
            uv_timer_stop(&s->respawn);
            if (s->state != SLOT_IDLE && !s->exited)
                uv_process_kill(&s->proc, SIGTERM);
        }
        uv_timer_start(&sup->kill_timer, on_kill_timer,
                       (uint64_t)sup->cli->host.shutdown_timeout_ms + KILL_GRACE_MS, 0);
    }
    if (sup->busy > 0 || sup->closed)
        return;
    sup->closed = 1;
    uv_close((uv_handle_t *)&sup->kill_timer, on_closed);
    uv_close((uv_handle_t *)&sup->beat_check, on_closed);
    uv_close((uv_handle_t *)&sup->sigint, on_closed);
    uv_close((uv_handle_t *)&sup->sigterm, on_closed);
    for (int i = 0; i < sup->n; i++)
        uv_close((uv_handle_t *)&sup->slots[i].respawn, on_closed);
}

static void on_signal(uv_signal_t *sig, int signum)
{
    sup_t *sup = sig->data;
    if (sup->state == SUP_STOPPING)
        return;
    mph_log(MPH_LOG_INFO, "received %s; stopping %d %s", signum == SIGINT ? "SIGINT" : "SIGTERM",
            sup->n, MPH_WORKERS_WORD(sup->n));
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
    if (sup->shared_fd < 0 || ftruncate(sup->shared_fd, sizeof(mph_shared_page_t)) != 0) {
        snprintf(err, errlen, "cannot create the workers' shared page: %s", strerror(errno));
        goto fail;
    }
    sup->shared = mmap(NULL, sizeof(mph_shared_page_t), PROT_READ | PROT_WRITE, MAP_SHARED,
                       sup->shared_fd, 0);
    if (sup->shared == MAP_FAILED) {
        sup->shared = NULL;
        snprintf(err, errlen, "cannot map the workers' shared page: %s", strerror(errno));
        goto fail;
    }
    sup->shared->magic = MPH_SHARED_MAGIC; /* the rest is zero, as ftruncate made it */
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
        munmap(sup->shared, sizeof(mph_shared_page_t));
    if (sup->shared_fd >= 0)
        close(sup->shared_fd);
}

int mph_supervisor_run(mph_cli_t *cli, int nworkers, FILE *ready)
{
    sup_t *sup = mph_xcalloc(1, sizeof(*sup));
    char err[1024];
    sup->cli = cli;
    sup->shared_fd = -1;
    sup->n = nworkers;
    sup->generation = 1;
    sup->ready_out = ready;
    sup->log_path = getenv("MPH_LOG_PATH");
    sup->args = worker_args(cli);
    /* The binary's path as /proc/self/exe names it (uv_exepath reads that link). Not the link
     * itself: under valgrind it leads to valgrind's tool, while reading it gives mphost. */
    size_t exelen = sizeof(sup->exe);
    if (uv_exepath(sup->exe, &exelen) != 0)
        snprintf(sup->exe, sizeof(sup->exe), "/proc/self/exe");
    int rc = make_shared_page(sup, err, sizeof(err));
    if (rc == 0)
        rc = mph_http_open_listener(cli->host.listen, cli->host.port, &sup->listen_fd, &sup->port,
                                    err, sizeof(err));
    if (rc != 0) {
        mph_log(MPH_LOG_ERROR, "%s", err);
        mph_cli_report_failure(ready, err);
        free_shared_page(sup);
        free(sup->args);
        free(sup);
        return 1;
    }
    uv_loop_init(&sup->loop);
    uv_signal_init(&sup->loop, &sup->sigint);
    uv_signal_init(&sup->loop, &sup->sigterm);
    sup->sigint.data = sup->sigterm.data = sup;
    uv_signal_start(&sup->sigint, on_signal, SIGINT);
    uv_signal_start(&sup->sigterm, on_signal, SIGTERM);
    uv_timer_init(&sup->loop, &sup->kill_timer);
    sup->kill_timer.data = sup;
    uv_timer_init(&sup->loop, &sup->beat_check);
    sup->beat_check.data = sup;
    if (cli->host.handler_timeout_ms > 0) /* with no limit, a handler may run for ever */
        uv_timer_start(&sup->beat_check, on_beat_check, BEAT_CHECK_MS, BEAT_CHECK_MS);
    sup->slots = mph_xcalloc((size_t)nworkers, sizeof(*sup->slots));
    for (int i = 0; i < nworkers; i++) {
        slot_t *s = &sup->slots[i];
        s->sup = sup;
        s->id = i + 1;
        s->beat = -1;
        uv_timer_init(&sup->loop, &s->respawn);
        s->respawn.data = s;
    }
    mph_log(MPH_LOG_INFO, "starting %d %s for %s on %s:%d", nworkers, MPH_WORKERS_WORD(nworkers),
            cli->script, cli->host.listen, sup->port);
    for (int i = 0; i < nworkers && sup->state == SUP_STARTING; i++)
        spawn_worker(&sup->slots[i]);
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
    free_shared_page(sup);
    free(sup->slots);
    free(sup->args);
    free(sup);
    return rc;
}
