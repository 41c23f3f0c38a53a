/*
 * metrics.c: per-process counters in a slot, and the Prometheus text of their sum.
 */
#include "metrics.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/map.h"

static const int codes[MPH_METRICS_CODES - 1] = {0,      -32700, -32600, -32601, -32602,
                                                 -32603, -32000, -32001, -32002, -32003,
                                                 -32004, -32005, -32006, -32008};

/* Upper bounds of the duration buckets, in ns and as labels; the last bucket is +Inf. */
static const uint64_t bucket_ns[MPH_METRICS_BUCKETS - 1] = {
    100000,   250000,    500000,    1000000,   2500000,    5000000,    10000000,   25000000,
    50000000, 100000000, 250000000, 500000000, 1000000000, 2500000000, 10000000000};
static const char *const bucket_le[MPH_METRICS_BUCKETS] = {
    "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025",
    "0.05",   "0.1",     "0.25",   "0.5",   "1",      "2.5",   "10",   "+Inf"};

typedef struct {
    mph_map_node_t node; /* first: a found node is its label */
    int ix;
} label_t;

typedef struct {
    mph_map_t map;
    label_t nodes[MPH_METRICS_METHODS];
} label_index_t;

/* Every slot has one writer (its process; the supervisor for the retired one; a scrape's
 * private sum), so an add is a relaxed load and store, not a locked read-modify-write: no
 * lock prefix on the hot path. */
#define ADD(p, n)                                                                                  \
    __atomic_store_n((p), __atomic_load_n((p), __ATOMIC_RELAXED) + (n), __ATOMIC_RELAXED)
#define LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)

void mph_metrics_init(mph_metrics_t *m, mph_metrics_slot_t *slot)
{
    m->own_slot = slot == NULL;
    m->slot = slot ? slot : mph_xcalloc(1, sizeof(*slot));
    m->index = mph_xcalloc(1, sizeof(label_index_t));
    strcpy(m->slot->names[0], "(other)");
    __atomic_store_n(&m->slot->nmethods, 1, __ATOMIC_RELEASE);
    __atomic_store_n(&m->slot->in_use, (uint64_t)getpid(), __ATOMIC_RELEASE);
}

void mph_metrics_free(mph_metrics_t *m)
{
    label_index_t *x = m->index;
    if (x)
        mph_map_free(&x->map);
    free(x);
    if (m->own_slot)
        free(m->slot);
    m->index = NULL;
    m->slot = NULL;
}

int mph_metrics_method(mph_metrics_t *m, const char *method, size_t mlen, int register_it)
{
    label_index_t *x = m->index;
    if (mlen == 0 || mlen >= MPH_METRICS_NAME || strlen(method) != mlen)
        return 0;
    mph_map_node_t *n = mph_map_find(&x->map, method);
    if (n)
        return ((const label_t *)n)->ix;
    mph_metrics_slot_t *s = m->slot;
    uint64_t ix = s->nmethods; /* only this process writes it */
    if (!register_it || ix >= MPH_METRICS_METHODS)
        return 0;
    memcpy(s->names[ix], method, mlen + 1);
    x->nodes[ix].ix = (int)ix;
    mph_map_insert(&x->map, &x->nodes[ix].node, s->names[ix]);
    __atomic_store_n(&s->nmethods, ix + 1, __ATOMIC_RELEASE); /* the name is visible first */
    return (int)ix;
}

static int code_index(int code)
{
    for (int i = 0; i < MPH_METRICS_CODES - 1; i++)
        if (codes[i] == code)
            return i;
    return MPH_METRICS_CODES - 1;
}

/* The duration bucket of ns. */
static int bucket_of(uint64_t ns)
{
    int b = 0;
    while (b < MPH_METRICS_BUCKETS - 1 && ns > bucket_ns[b])
        b++;
    return b;
}

void mph_metrics_request(mph_metrics_t *m, int ix, int code, uint64_t ns)
{
    mph_metrics_method_t *mm = &m->slot->methods[ix];
    ADD(&mm->calls[code_index(code)], 1);
    ADD(&mm->buckets[bucket_of(ns)], 1);
    ADD(&mm->sum_ns, ns);
}

/* The index of status in s's fetch codes: 0 for no response, the status's own entry (made when
 * missing: only the slot's writer calls this), or the last ("other") when they are all taken. */
static int fetch_index(mph_metrics_slot_t *s, uint64_t status)
{
    if (status == 0)
        return 0;
    for (int i = 1; i < MPH_METRICS_FETCH_CODES - 1; i++) {
        uint64_t c = __atomic_load_n(&s->fetch_code[i], __ATOMIC_ACQUIRE);
        if (c == status)
            return i;
        if (c == 0) {
            __atomic_store_n(&s->fetch_code[i], status, __ATOMIC_RELEASE); /* before its count */
            return i;
        }
    }
    return MPH_METRICS_FETCH_CODES - 1;
}

void mph_metrics_fetch(mph_metrics_t *m, int status, uint64_t ns)
{
    mph_metrics_slot_t *s = m->slot;
    ADD(&s->fetch_count[fetch_index(s, status > 0 ? (uint64_t)status : 0)], 1);
    ADD(&s->fetch_buckets[bucket_of(ns)], 1);
    ADD(&s->fetch_sum_ns, ns);
}

/* Adds src's outbound exchange counts to dst (private to its writer). */
static void fold_fetch(mph_metrics_slot_t *dst, const mph_metrics_slot_t *src)
{
    for (int i = 0; i < MPH_METRICS_FETCH_CODES; i++) {
        uint64_t code = __atomic_load_n(&src->fetch_code[i], __ATOMIC_ACQUIRE);
        uint64_t n = LOAD(&src->fetch_count[i]);
        if (n == 0)
            continue;
        int j = i == MPH_METRICS_FETCH_CODES - 1 ? i : fetch_index(dst, i == 0 ? 0 : code);
        ADD(&dst->fetch_count[j], n);
    }
    for (int b = 0; b < MPH_METRICS_BUCKETS; b++)
        ADD(&dst->fetch_buckets[b], LOAD(&src->fetch_buckets[b]));
    ADD(&dst->fetch_sum_ns, LOAD(&src->fetch_sum_ns));
}

/* dst's label index for name, added when missing (or 0, "(other)", when dst is full). dst
 * is private to its caller (an accumulator, or the retired slot the supervisor alone writes). */
static int fold_label(mph_metrics_slot_t *dst, const char *name)
{
    if (dst->nmethods == 0) {
        strcpy(dst->names[0], "(other)");
        dst->nmethods = 1;
    }
    for (uint64_t i = 0; i < dst->nmethods; i++)
        if (strcmp(dst->names[i], name) == 0)
            return (int)i;
    if (dst->nmethods >= MPH_METRICS_METHODS)
        return 0;
    strcpy(dst->names[dst->nmethods], name);
    __atomic_store_n(&dst->nmethods, dst->nmethods + 1, __ATOMIC_RELEASE);
    return (int)dst->nmethods - 1;
}

void mph_metrics_fold(mph_metrics_slot_t *dst, const mph_metrics_slot_t *src, int with_gauges)
{
    uint64_t n = __atomic_load_n(&src->nmethods, __ATOMIC_ACQUIRE);
    for (uint64_t i = 0; i < n && i < MPH_METRICS_METHODS; i++) {
        char name[MPH_METRICS_NAME];
        memcpy(name, src->names[i], sizeof(name));
        name[sizeof(name) - 1] = '\0';
        mph_metrics_method_t *d = &dst->methods[fold_label(dst, name)];
        const mph_metrics_method_t *s = &src->methods[i];
        for (int c = 0; c < MPH_METRICS_CODES; c++)
            ADD(&d->calls[c], LOAD(&s->calls[c]));
        for (int b = 0; b < MPH_METRICS_BUCKETS; b++)
            ADD(&d->buckets[b], LOAD(&s->buckets[b]));
        ADD(&d->sum_ns, LOAD(&s->sum_ns));
    }
    ADD(&dst->attempts, LOAD(&src->attempts));
    ADD(&dst->commits, LOAD(&src->commits));
    ADD(&dst->conflicts, LOAD(&src->conflicts));
    ADD(&dst->storage_errors, LOAD(&src->storage_errors));
    ADD(&dst->idem_replays, LOAD(&src->idem_replays));
    ADD(&dst->restarts, LOAD(&src->restarts));
    fold_fetch(dst, src);
    ADD(&dst->outbox_ok, LOAD(&src->outbox_ok));
    ADD(&dst->outbox_error, LOAD(&src->outbox_error));
    ADD(&dst->outbox_dead, LOAD(&src->outbox_dead));
    ADD(&dst->outbox_retries, LOAD(&src->outbox_retries));
    if (with_gauges && LOAD(&src->outbox_pending) > LOAD(&dst->outbox_pending))
        __atomic_store_n(&dst->outbox_pending, LOAD(&src->outbox_pending), __ATOMIC_RELAXED);
    if (with_gauges) {
        ADD(&dst->connections, LOAD(&src->connections));
        ADD(&dst->lua_bytes, LOAD(&src->lua_bytes));
        ADD(&dst->scope_bytes, LOAD(&src->scope_bytes));
        ADD(&dst->scopes, LOAD(&src->scopes));
    }
}

static void family(mph_buf_t *out, const char *name, const char *type, const char *help)
{
    mph_buf_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void scalar(mph_buf_t *out, const char *name, const char *type, const char *help, uint64_t v)
{
    family(out, name, type, help);
    mph_buf_printf(out, "%s %llu\n", name, (unsigned long long)v);
}

/* Method names are service names: any string; label values escape \, " and newline. */
static void label_value(mph_buf_t *out, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\' || *s == '"')
            mph_buf_printf(out, "\\%c", *s);
        else if (*s == '\n')
            mph_buf_puts(out, "\\n");
        else
            mph_buf_append(out, s, 1);
    }
}

/* mphost_fetch_total{code} and mphost_fetch_duration_seconds of the summed slot. */
static void render_fetch(mph_buf_t *out, const mph_metrics_slot_t *sum)
{
    family(out, "mphost_fetch_total", "counter",
           "outbound exchanges (mp.fetch, mp.rpc) by HTTP status (0: no response)");
    for (int i = 0; i < MPH_METRICS_FETCH_CODES; i++) {
        if (sum->fetch_count[i] == 0)
            continue;
        if (i == MPH_METRICS_FETCH_CODES - 1)
            mph_buf_puts(out, "mphost_fetch_total{code=\"other\"}");
        else
            mph_buf_printf(out, "mphost_fetch_total{code=\"%llu\"}",
                           (unsigned long long)(i == 0 ? 0 : sum->fetch_code[i]));
        mph_buf_printf(out, " %llu\n", (unsigned long long)sum->fetch_count[i]);
    }
    family(out, "mphost_fetch_duration_seconds", "histogram",
           "time from an outbound exchange's start to its end");
    uint64_t cum = 0;
    for (int b = 0; b < MPH_METRICS_BUCKETS; b++) {
        cum += sum->fetch_buckets[b];
        mph_buf_printf(out, "mphost_fetch_duration_seconds_bucket{le=\"%s\"} %llu\n", bucket_le[b],
                       (unsigned long long)cum);
    }
    mph_buf_printf(out, "mphost_fetch_duration_seconds_sum %.9f\n",
                   (double)sum->fetch_sum_ns / 1e9);
    mph_buf_printf(out, "mphost_fetch_duration_seconds_count %llu\n", (unsigned long long)cum);
}

/* mphost_outbox_*: mp.send's messages (lua/outbox.c). */
static void render_outbox(mph_buf_t *out, const mph_metrics_slot_t *sum)
{
    scalar(out, "mphost_outbox_pending", "gauge",
           "messages of mp.send not delivered yet (nor dead), as the last look at the storage "
           "found them",
           sum->outbox_pending);
    family(out, "mphost_outbox_delivered_total", "counter",
           "messages of mp.send delivered, by result: ok (a result), error (a JSON-RPC error, "
           "final), dead (expired undelivered)");
    mph_buf_printf(out, "mphost_outbox_delivered_total{result=\"ok\"} %llu\n",
                   (unsigned long long)sum->outbox_ok);
    mph_buf_printf(out, "mphost_outbox_delivered_total{result=\"error\"} %llu\n",
                   (unsigned long long)sum->outbox_error);
    mph_buf_printf(out, "mphost_outbox_delivered_total{result=\"dead\"} %llu\n",
                   (unsigned long long)sum->outbox_dead);
    scalar(out, "mphost_outbox_retries_total", "counter",
           "deliveries of mp.send's messages that failed and were scheduled again",
           sum->outbox_retries);
}

void mph_metrics_render(mph_buf_t *out, const mph_metrics_slot_t *const *slots, size_t n)
{
    mph_metrics_slot_t *sum = mph_xcalloc(1, sizeof(*sum)); /* ~10 KiB: not on the stack */
    for (size_t i = 0; i < n; i++)
        if (slots[i])
            mph_metrics_fold(sum, slots[i], 1);
    family(out, "mphost_requests_total", "counter",
           "JSON-RPC calls answered, by method and code (0: a result)");
    for (uint64_t i = 0; i < sum->nmethods; i++)
        for (int c = 0; c < MPH_METRICS_CODES; c++) {
            if (sum->methods[i].calls[c] == 0)
                continue;
            mph_buf_puts(out, "mphost_requests_total{method=\"");
            label_value(out, sum->names[i]);
            if (c < MPH_METRICS_CODES - 1)
                mph_buf_printf(out, "\",code=\"%d\"}", codes[c]);
            else
                mph_buf_puts(out, "\",code=\"other\"}");
            mph_buf_printf(out, " %llu\n", (unsigned long long)sum->methods[i].calls[c]);
        }
    family(out, "mphost_request_duration_seconds", "histogram",
           "time from a call's dispatch to its reply, by method");
    for (uint64_t i = 0; i < sum->nmethods; i++) {
        const mph_metrics_method_t *mm = &sum->methods[i];
        uint64_t cum = 0;
        for (int b = 0; b < MPH_METRICS_BUCKETS; b++)
            cum += mm->buckets[b];
        if (cum == 0)
            continue;
        cum = 0;
        for (int b = 0; b < MPH_METRICS_BUCKETS; b++) {
            cum += mm->buckets[b];
            mph_buf_puts(out, "mphost_request_duration_seconds_bucket{method=\"");
            label_value(out, sum->names[i]);
            mph_buf_printf(out, "\",le=\"%s\"} %llu\n", bucket_le[b], (unsigned long long)cum);
        }
        mph_buf_puts(out, "mphost_request_duration_seconds_sum{method=\"");
        label_value(out, sum->names[i]);
        mph_buf_printf(out, "\"} %.9f\n", (double)mm->sum_ns / 1e9);
        mph_buf_puts(out, "mphost_request_duration_seconds_count{method=\"");
        label_value(out, sum->names[i]);
        mph_buf_printf(out, "\"} %llu\n", (unsigned long long)cum);
    }
    render_fetch(out, sum);
    render_outbox(out, sum);
    scalar(out, "mphost_attempts_total", "counter",
           "handler attempts started (more than the calls: retries after conflicts)",
           sum->attempts);
    scalar(out, "mphost_commits_total", "counter", "commits that succeeded", sum->commits);
    scalar(out, "mphost_conflicts_total", "counter", "commits refused by a conflict",
           sum->conflicts);
    scalar(out, "mphost_storage_errors_total", "counter", "storage loads and commits that failed",
           sum->storage_errors);
    scalar(out, "mphost_idempotent_replays_total", "counter",
           "calls answered with the stored reply of their Idempotency-Key", sum->idem_replays);
    scalar(out, "mphost_worker_restarts_total", "counter",
           "worker processes the supervisor replaced", sum->restarts);
    scalar(out, "mphost_connections", "gauge", "open HTTP connections", sum->connections);
    scalar(out, "mphost_lua_memory_bytes", "gauge", "memory the Lua states use", sum->lua_bytes);
    scalar(out, "mphost_scope_cache_bytes", "gauge", "estimated bytes of the scopes kept",
           sum->scope_bytes);
    scalar(out, "mphost_scopes", "gauge", "scopes kept in memory", sum->scopes);
    free(sum);
}
