/*
 * outbox.c: `mphost SCRIPT outbox [--dead]`: lists the messages of mp.send that are pending
 * (or, with --dead, those that expired undelivered), read straight from the storage the
 * deployment uses, opened from the same options as `serve` opens it. It needs no running
 * server and runs no script: the messages are keys of the outbox scopes (lua/bridge.h,
 * MPH_OUTBOX_*), loaded one after another on a loop of its own. A load is a read: the file
 * backend creates nothing for a scope never written (and a data directory that does not
 * exist is not opened, which would create it), and a server running on the same storage goes
 * on undisturbed.
 *
 * What it prints (docs/outbox.md): a header, then one line per message sorted by due time,
 * columns ID, TARGET, METHOD, DUE (UTC, ISO 8601), ATTEMPTS (failed so far), LAST ERROR ("-"
 * when none); or "no pending messages" / "no dead messages".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <uv.h>

#include "cli.h"
#include "common/common.h"
#include "lua/bridge.h"
#include "storage/storage.h"

typedef struct {
    char *id, *target, *method, *error; /* owned */
    double due;                         /* Unix milliseconds */
    long long attempts;
} row_t;

typedef struct {
    mph_store_t *store;
    const char *prefix; /* MPH_OUTBOX_PENDING or MPH_OUTBOX_DEAD */
    int bucket;         /* the one being loaded */
    row_t *rows;        /* owned */
    size_t n, cap;
    int failed; /* a load failed: the message is printed, exit 1 */
    int closed; /* the store has closed */
} listing_t;

static void on_loaded(void *ud, const mph_store_result_t *res);

static void on_closed(void *ud)
{
    ((listing_t *)ud)->closed = 1;
}

/* Loads the next bucket, or closes the store after the last. */
static void load_next(listing_t *l)
{
    char scope[32];
    while (!l->failed && l->bucket < MPH_OUTBOX_BUCKETS) {
        snprintf(scope, sizeof(scope), "%s%d", l->prefix, l->bucket);
        int rc = l->store->methods->load(l->store, scope, on_loaded, l);
        if (rc == 0)
            return;
        fprintf(stderr, "mphost: cannot read the outbox: %s\n", mph_strerror(rc));
        l->failed = 1;
    }
    l->store->methods->close(l->store, on_closed, l);
}

static char *text_of(json_t *v)
{
    const char *s = json_string_value(v);
    return mph_xstrdup(s ? s : "-");
}

/* One message (its key and its value, borrowed) as a row. */
static void add_row(listing_t *l, const char *key, json_t *m)
{
    if (!json_is_object(m))
        return;
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 16;
        l->rows = mph_xrealloc(l->rows, l->cap * sizeof(*l->rows));
    }
    row_t *r = &l->rows[l->n++];
    r->id = mph_xstrdup(key);
    const char *target = json_string_value(json_object_get(m, "t"));
    char shown[512];
    mph_url_shown(target ? target : "-", shown, sizeof(shown)); /* never a URL's credentials */
    r->target = mph_xstrdup(shown);
    r->method = text_of(json_object_get(m, "m"));
    r->error = text_of(json_object_get(m, "err"));
    r->due = json_number_value(json_object_get(m, "due"));
    r->attempts = (long long)json_number_value(json_object_get(m, "n"));
}

/* A load's entries are changes in order (a key may come again, NULL: deleted, as a log
 * replays): the last of each key is its value. */
static void add_rows(listing_t *l, const mph_store_doc_t *doc)
{
    json_t *last = json_object();
    for (size_t i = 0; i < doc->n; i++) {
        const mph_store_entry_t *e = &doc->entries[i];
        char *key = mph_xstrndup(e->key, e->klen);
        if (e->json == NULL)
            json_object_del(last, key);
        else
            json_object_set_new(last, key, json_loadb(e->json, e->jlen, 0, NULL));
        free(key);
    }
    const char *key;
    json_t *m;
    json_object_foreach(last, key, m) add_row(l, key, m);
    json_decref(last);
}

static void on_loaded(void *ud, const mph_store_result_t *res)
{
    listing_t *l = ud;
    if (res->status != 0) {
        fprintf(stderr, "mphost: cannot read the outbox: %s\n",
                res->message ? res->message : mph_strerror(res->status));
        l->failed = 1;
    } else {
        add_rows(l, &res->doc);
    }
    l->bucket++;
    load_next(l);
}

static int by_due(const void *a, const void *b)
{
    const row_t *x = a, *y = b;
    if (x->due != y->due)
        return x->due < y->due ? -1 : 1;
    return strcmp(x->id, y->id);
}

static void format_due(double ms, char *out, size_t size)
{
    time_t secs = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&secs, &tm);
    strftime(out, size, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* Prints the rows as aligned columns (the last, the error, as long as it is). */
static void print_rows(listing_t *l)
{
    size_t wid = 2, wtarget = 6, wmethod = 6;
    for (size_t i = 0; i < l->n; i++) {
        wid = strlen(l->rows[i].id) > wid ? strlen(l->rows[i].id) : wid;
        wtarget = strlen(l->rows[i].target) > wtarget ? strlen(l->rows[i].target) : wtarget;
        wmethod = strlen(l->rows[i].method) > wmethod ? strlen(l->rows[i].method) : wmethod;
    }
    printf("%-*s  %-*s  %-*s  %-20s  %-8s  %s\n", (int)wid, "ID", (int)wtarget, "TARGET",
           (int)wmethod, "METHOD", "DUE", "ATTEMPTS", "LAST ERROR");
    for (size_t i = 0; i < l->n; i++) {
        row_t *r = &l->rows[i];
        char due[32];
        format_due(r->due, due, sizeof(due));
        printf("%-*s  %-*s  %-*s  %-20s  %-8lld  %s\n", (int)wid, r->id, (int)wtarget, r->target,
               (int)wmethod, r->method, due, r->attempts, r->error);
    }
}

int mph_cli_outbox(mph_cli_t *cli)
{
    uv_loop_t loop;
    char err[512];
    uv_loop_init(&loop);
    const struct mph_host_config_s *h = &cli->host;
    mph_store_options_t so = {.data_dir = h->data_dir,
                              .redis_prefix = h->redis_prefix,
                              .redis_timeout_ms = h->redis_timeout_ms};
    listing_t l = {.prefix = cli->dead ? MPH_OUTBOX_DEAD : MPH_OUTBOX_PENDING};
    struct stat st;
    if (strcmp(h->storage, "file") == 0 && lstat(h->data_dir, &st) != 0 && errno == ENOENT) {
        /* Nothing was ever stored here; opening the backend would create the directory. */
        printf("no %s messages\n", cli->dead ? "dead" : "pending");
        uv_loop_close(&loop);
        return 0;
    }
    int rc = mph_store_open(&l.store, &loop, h->storage, &so, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "mphost: %s\n", err);
        uv_loop_close(&loop);
        return 1;
    }
    load_next(&l);
    uv_run(&loop, UV_RUN_DEFAULT); /* until every load has answered and the store closed */
    if (uv_loop_close(&loop) != 0)
        mph_log(MPH_LOG_ERROR, "bug: handles left open after reading the outbox");
    if (l.n > 1)
        qsort(l.rows, l.n, sizeof(*l.rows), by_due);
    if (!l.failed && l.n == 0)
        printf("no %s messages\n", cli->dead ? "dead" : "pending");
    else if (!l.failed)
        print_rows(&l);
    for (size_t i = 0; i < l.n; i++) {
        free(l.rows[i].id);
        free(l.rows[i].target);
        free(l.rows[i].method);
        free(l.rows[i].error);
    }
    free(l.rows);
    return l.failed ? 1 : 0;
}
