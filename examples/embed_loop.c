/*
 * embed_loop.c: mphost inside a program that runs its own libuv loop. Two hosts share the
 * program's loop and one data directory (as two processes would), with no HTTP at all: a
 * timer of the program's own starts concurrent in-process calls of a counter service on
 * both, whose commits conflict and run again, and the final count is exact. The service
 * calls a C function of the program (mp.c.label). Then both hosts close, and the loop,
 * with nothing left on it, closes with 0.
 *
 *   embed_loop [DATA_DIR] [CALLS_PER_HOST]     (defaults: ./embed-loop-data, 100)
 */
#define _GNU_SOURCE /* asprintf */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "mphost.h"

static const char service[] = "local mp = require('metaparticle')\n"
                              "mp.service('incr', function()\n"
                              "  local g = mp.scope.global\n"
                              "  g.count = (g.count or 0) + 1\n"
                              "  mp.c.attempt()\n"
                              "  return mp.c.label(g.count)\n"
                              "end).expose = true\n"
                              "mp.serve()\n";

#define CONCURRENT 8 /* calls in flight per host */

typedef struct {
    uv_loop_t loop;
    uv_timer_t timer;    /* ours: starts the calls, then reports */
    mph_host_t *host[2]; /* NULL once closed */
    int per_host;        /* calls to make on each host */
    int issued[2];       /* calls made, per host */
    int answered, failed, attempts, highest;
    int number[2]; /* 1 and 2: what label says of each host */
} app_t;

/* mp.c.label(count) -> "count 7 (host 1)", ud pointing at the host's number. A pure
 * function of its arguments: a handler may run more than once for one call (docs/embedding.md). */
static int label(void *ud, const char *args, size_t len, char **result)
{
    long count = 0;
    if (sscanf(args, "[%ld]", &count) != 1) {
        *result = strdup("label(count) expects an integer");
        return 1;
    }
    if (asprintf(result, "\"count %ld (host %d)\"", count, *(const int *)ud) < 0)
        *result = NULL; /* "label failed" */
    return *result == NULL;
}

/* mp.c.attempt(): counts handler runs, to show the re-runs (a count, not an effect that
 * must happen once). */
static int attempt(void *ud, const char *args, size_t len, char **result)
{
    ((app_t *)ud)->attempts++;
    *result = NULL; /* returns mp.null */
    return 0;
}

static void call_next(app_t *app, int which);

typedef struct {
    app_t *app;
    int which;
} call_ctx_t;

static void on_reply(void *ud, const mph_host_reply_t *r)
{
    call_ctx_t *c = ud;
    app_t *app = c->app;
    app->answered++;
    long count = 0;
    if (r->code != 0 || sscanf(r->json, "\"count %ld", &count) != 1) {
        fprintf(stderr, "embed_loop: call failed: %d %s\n", r->code, r->message);
        app->failed++;
    } else if (count > app->highest) {
        app->highest = (int)count;
    }
    call_next(app, c->which); /* keep CONCURRENT calls in flight */
    free(c);
}

static void call_next(app_t *app, int which)
{
    if (app->issued[which] >= app->per_host)
        return;
    app->issued[which]++;
    call_ctx_t *c = malloc(sizeof(*c));
    *c = (call_ctx_t){app, which};
    if (mph_host_call(app->host[which], "incr", NULL, 0, NULL, on_reply, c) != 0) {
        free(c);
        app->failed++;
        app->answered++;
    }
}

static void on_host_closed(mph_host_t *h, void *ud)
{
    app_t *app = ud;
    for (int i = 0; i < 2; i++)
        if (app->host[i] == h)
            app->host[i] = NULL;
    mph_host_free(h);
}

/* The program's own timer: the first tick starts the calls; later ticks report progress,
 * and once every call is answered, close the hosts and the timer. */
static void on_tick(uv_timer_t *t)
{
    app_t *app = t->data;
    if (app->issued[0] == 0) {
        for (int i = 0; i < CONCURRENT; i++) {
            call_next(app, 0);
            call_next(app, 1);
        }
        return;
    }
    printf("embed_loop: %d of %d calls answered\n", app->answered, 2 * app->per_host);
    if (app->answered < 2 * app->per_host)
        return;
    uv_close((uv_handle_t *)t, NULL);
    for (int i = 0; i < 2; i++)
        mph_host_close(app->host[i], on_host_closed, app);
}

static int open_host(app_t *app, int i, const char *data)
{
    char err[1024];
    mph_host_config_t *cfg;
    mph_host_config_new(&cfg);
    mph_host_config_set_loop(cfg, &app->loop); /* ours: the host never runs it */
    app->number[i] = i + 1;
    int rc = mph_host_config_set(cfg, "data", data, err, sizeof(err));
    if (rc == 0)
        rc = mph_host_new(&app->host[i], cfg, err, sizeof(err));
    mph_host_config_free(cfg);
    if (rc == 0 && mph_host_register_function(app->host[i], "label", label, &app->number[i]) == 0 &&
        mph_host_register_function(app->host[i], "attempt", attempt, app) == 0 &&
        mph_host_load_string(app->host[i], "counter.lua", service, err, sizeof(err)) == 0)
        return 0;
    fprintf(stderr, "embed_loop: %s\n", err);
    return 1;
}

int main(int argc, char **argv)
{
    const char *data = argc > 1 ? argv[1] : "./embed-loop-data";
    app_t app = {.per_host = argc > 2 ? atoi(argv[2]) : 100};
    uv_loop_init(&app.loop);
    if (open_host(&app, 0, data) || open_host(&app, 1, data))
        return 1; /* (a real program would close what it opened) */
    uv_timer_init(&app.loop, &app.timer);
    app.timer.data = &app;
    uv_timer_start(&app.timer, on_tick, 10, 100);
    uv_run(&app.loop, UV_RUN_DEFAULT); /* until the timer and both hosts have closed */
    int rc = uv_loop_close(&app.loop);
    printf("embed_loop: %d calls, %d failed, %d handler runs, final count %d (%s)\n", app.answered,
           app.failed, app.attempts, app.highest,
           app.highest == 2 * app.per_host ? "exact" : "WRONG");
    printf("embed_loop: uv_loop_close: %d\n", rc);
    return rc == 0 && app.failed == 0 && app.highest == 2 * app.per_host ? 0 : 1;
}
