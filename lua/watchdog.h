/*
 * watchdog.h: the handler time limit with LuaJIT's compiler on (private to lua/).
 *
 * LuaJIT runs no hooks inside compiled code, and a count hook that is always armed costs
 * every handler a check per HOOK_INSTRUCTIONS instructions (about 5% on the Redis counter).
 * So the hook is armed only once a running stretch of a handler has passed its deadline: the
 * loop thread publishes each stretch's deadline (one atomic store, no system call), and a
 * thread of ours looks at it every WATCHDOG_TICK_MS; past it, the thread signals the loop
 * thread (SIGURG, through pthread_kill), whose handler arms the hook with lua_sethook, which
 * LuaJIT allows from a signal handler (lj_dispatch.c says it may be called asynchronously).
 * When the stretch ends (the handler returned or waits) the loop thread disarms the hook, so
 * compiled code runs at full speed again.
 *
 * What the hook then stops is interpreted code (a loop calling into C, or code the compiler
 * gave up on); a compiled loop runs on, and only whoever watches the process from outside (the
 * supervisor's heartbeat check) can end it.
 *
 * The race between the thread and the end of a stretch is settled on the loop thread: the
 * signal handler runs there, and arms the hook only if the deadline it reads is still set and
 * passed; mph_watchdog_leave clears the deadline before it looks whether the hook is armed.
 */
#ifndef MPH_LUA_WATCHDOG_H
#define MPH_LUA_WATCHDOG_H

#include <lua.h>
#include <stdint.h>

typedef struct mph_watchdog_s mph_watchdog_t;

/* Starts watching L's stretches from a new thread: once a deadline has passed, `hook` is set
 * as L's count hook every `count` instructions until the stretch ends. Must be called on the
 * loop thread (the one signalled). Installs the process's SIGURG handler on first use.
 * Returns 0, or MPH_EIO when the thread cannot be started. */
int mph_watchdog_start(mph_watchdog_t **out, lua_State *L, lua_Hook hook, int count);

/* A stretch begins on the loop thread; it must end by deadline_ns (uv_hrtime(); 0: none).
 * Returns the deadline of the stretch it interrupts (a resume inside another's callback),
 * which mph_watchdog_leave puts back. */
uint64_t mph_watchdog_enter(mph_watchdog_t *w, uint64_t deadline_ns);

/* The stretch has ended: `outer` (what enter returned) is the deadline again, and a hook armed
 * for the stretch is removed once no stretch runs. */
void mph_watchdog_leave(mph_watchdog_t *w, uint64_t outer);

/* Stops and joins the thread, frees w. On the loop thread, with no stretch running. */
void mph_watchdog_stop(mph_watchdog_t *w);

#endif
