/*
 * watchdog.c: arms the count hook of a handler that has passed its deadline (watchdog.h says
 * why and how). Two threads touch a watchdog: the loop thread (enter, leave, the signal
 * handler, stop) and the watchdog's own thread (which only reads the deadline and the armed
 * flag, and sends the signal). The fields they share are C11 atomics, lock-free on the
 * platforms LuaJIT runs on, so the signal handler may use them too.
 */
#define _GNU_SOURCE
#include "watchdog.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/common.h"

#define WATCHDOG_TICK_MS 50 /* how late past its deadline a stretch can be noticed */
#define WATCHDOG_SIGNAL SIGURG

struct mph_watchdog_s {
    lua_State *L;                  /* the state whose hook is armed (borrowed) */
    lua_Hook hook;                 /* the count hook to arm */
    int count;                     /* its instruction count */
    pthread_t loop_thread;         /* the thread that runs L, which the signal goes to */
    pthread_t thread;              /* ours */
    atomic_uint_fast64_t deadline; /* of the running stretch, uv_hrtime() ns; 0: none runs */
    atomic_int armed;              /* the hook is set (by the signal handler) */
    pthread_mutex_t mu;            /* guards stop, for the condition variable */
    pthread_cond_t wake;           /* wakes the thread early to stop */
    int stop;                      /* the thread must end */
};

/* The watchdog whose stretches run on this thread: the signal handler's only way to its own. */
static _Thread_local mph_watchdog_t *watched_here;

static uint64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* the clock uv_hrtime reads; async-signal-safe */
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* On the loop thread, between any two instructions of it. Arms the hook only while the
 * stretch that was late is still running (see watchdog.h). */
static void on_watchdog_signal(int sig)
{
    (void)sig;
    int saved = errno;
    mph_watchdog_t *w = watched_here;
    if (w != NULL && !atomic_load(&w->armed)) {
        uint64_t deadline = atomic_load(&w->deadline);
        if (deadline != 0 && monotonic_ns() >= deadline) {
            lua_sethook(w->L, w->hook, LUA_MASKCOUNT, w->count);
            atomic_store(&w->armed, 1);
        }
    }
    errno = saved;
}

static pthread_once_t handler_once = PTHREAD_ONCE_INIT;
static int handler_rc;

static void install_handler(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_watchdog_signal;
    sa.sa_flags = SA_RESTART; /* a system call the signal interrupts goes on */
    sigemptyset(&sa.sa_mask);
    handler_rc = sigaction(WATCHDOG_SIGNAL, &sa, NULL);
}

static void *watch(void *arg)
{
    mph_watchdog_t *w = arg;
    pthread_mutex_lock(&w->mu);
    while (!w->stop) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_nsec += WATCHDOG_TICK_MS * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&w->wake, &w->mu, &until);
        if (w->stop)
            break;
        uint64_t deadline = atomic_load(&w->deadline);
        if (deadline != 0 && !atomic_load(&w->armed) && monotonic_ns() >= deadline)
            pthread_kill(w->loop_thread, WATCHDOG_SIGNAL);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

int mph_watchdog_start(mph_watchdog_t **out, lua_State *L, lua_Hook hook, int count)
{
    pthread_once(&handler_once, install_handler);
    if (handler_rc != 0)
        return MPH_EIO;
    mph_watchdog_t *w = mph_xcalloc(1, sizeof(*w));
    w->L = L;
    w->hook = hook;
    w->count = count;
    w->loop_thread = pthread_self();
    atomic_init(&w->deadline, 0);
    atomic_init(&w->armed, 0);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&w->wake, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&w->mu, NULL);
    /* The thread starts with every signal blocked, so that the process's signals (SIGTERM
     * for libuv's handles, say) are never delivered to it; the loop thread must get ours. */
    sigset_t all, old, ours;
    sigfillset(&all);
    sigemptyset(&ours);
    sigaddset(&ours, WATCHDOG_SIGNAL);
    pthread_sigmask(SIG_UNBLOCK, &ours, NULL);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&w->thread, NULL, watch, w);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        pthread_cond_destroy(&w->wake);
        pthread_mutex_destroy(&w->mu);
        free(w);
        return MPH_EIO;
    }
    *out = w;
    return 0;
}

uint64_t mph_watchdog_enter(mph_watchdog_t *w, uint64_t deadline_ns)
{
    watched_here = w;
    return atomic_exchange(&w->deadline, deadline_ns);
}

void mph_watchdog_leave(mph_watchdog_t *w, uint64_t outer)
{
    atomic_store(&w->deadline, outer); /* first: a signal from now on arms nothing new */
    if (outer == 0 && atomic_load(&w->armed)) {
        lua_sethook(w->L, NULL, 0, 0);
        atomic_store(&w->armed, 0);
    }
}

void mph_watchdog_stop(mph_watchdog_t *w)
{
    atomic_store(&w->deadline, 0);
    pthread_mutex_lock(&w->mu);
    w->stop = 1;
    pthread_cond_signal(&w->wake);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    if (watched_here == w)
        watched_here = NULL;
    pthread_cond_destroy(&w->wake);
    pthread_mutex_destroy(&w->mu);
    free(w);
}
