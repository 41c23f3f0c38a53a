/*
 * metrics.h: the counters /metrics shows, and their Prometheus text (format 0.0.4).
 *
 * Each serving process owns one slot (mph_metrics_slot_t) and is its only writer: plain
 * relaxed atomic stores and increments, no lock, no allocation per call, so counting costs
 * nothing measurable on the hot path. Under a supervisor the slots live in the shared page
 * (supervisor.h), one per beat index (a slot per process, as the heartbeats are), plus
 * one "retired" slot: when a worker exits, the supervisor adds its counters there and zeroes
 * its slot before the slot is given to a new process, so totals never go down when a worker
 * dies or a reload replaces them (we chose folding over a slot per process generation: the
 * page stays a fixed size however many workers come and go). A scrape, whichever worker
 * answers it, sums the retired slot and every slot in use. A scrape that runs while the
 * supervisor folds a slot may see that worker's counts twice or not at all for that one
 * scrape; the next one is exact.
 *
 * Labels stay bounded whatever clients send: a process names at most MPH_METRICS_METHODS - 1
 * methods, and only methods that answered with something else than -32601 (so: exposed
 * ones); every other call counts under method="(other)". Codes outside the specification's
 * and the host's (-32700, -32600..-32603, -32000..-32006, -32008) count as code="other".
 *
 * Outbound exchanges (mp.fetch, mp.rpc: host/server/fetch.c) count by HTTP status, 0 when no
 * response came; a slot names at most MPH_METRICS_FETCH_CODES - 2 statuses (the first ones
 * seen), and counts any other under code="other".
 */
#ifndef MPH_METRICS_H
#define MPH_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "common/common.h"

#define MPH_METRICS_METHODS 32 /* method labels per slot; [0] is "(other)" */
#define MPH_METRICS_NAME 64    /* bytes of a method label, NUL included; longer: "(other)" */
#define MPH_METRICS_CODES 15   /* the known codes, then "other" */
#define MPH_METRICS_BUCKETS 16 /* duration buckets; the last is +Inf */

/* Statuses of outbound exchanges per slot: [0] no response, then statuses as first seen, the
 * last "other". */
#define MPH_METRICS_FETCH_CODES 16

typedef struct {
    uint64_t calls[MPH_METRICS_CODES];
    uint64_t buckets[MPH_METRICS_BUCKETS]; /* per bucket, not cumulative */
    uint64_t sum_ns;
} mph_metrics_method_t;

typedef struct mph_metrics_slot_s {
    uint64_t in_use;   /* the owner's pid while a process owns the slot; 0: free or folded */
    uint64_t nmethods; /* names[1..nmethods-1] are set (stored with release: names first) */
    char names[MPH_METRICS_METHODS][MPH_METRICS_NAME];
    mph_metrics_method_t methods[MPH_METRICS_METHODS];
    /* counters, copied from the Lua bridge at every loop turn (mph_lua_stats) */
    uint64_t attempts, commits, conflicts, storage_errors;
    uint64_t idem_replays; /* calls answered with a stored reply (idempotency keys) */
    uint64_t restarts;     /* the retired slot only: workers the supervisor replaced */
    /* outbound exchanges: fetch_code[i] is the status fetch_count[i] counts (i in 1..
       MPH_METRICS_FETCH_CODES-2, 0: unused yet; written before its count), [0] no response,
       the last: any other status */
    uint64_t fetch_code[MPH_METRICS_FETCH_CODES];
    uint64_t fetch_count[MPH_METRICS_FETCH_CODES];
    uint64_t fetch_buckets[MPH_METRICS_BUCKETS]; /* durations, per bucket, not cumulative */
    uint64_t fetch_sum_ns;
    /* the outbox (lua/outbox.c): deliveries by result, retries */
    uint64_t outbox_ok, outbox_error, outbox_dead, outbox_retries;
    /* gauges: summed over the live slots only, never folded */
    uint64_t connections, lua_bytes, scope_bytes, scopes;
    /* a gauge every process measures whole (the messages in the shared storage): the
       largest of the live slots, never summed */
    uint64_t outbox_pending;
} mph_metrics_slot_t;

/* Where a process's method labels are looked up (its own, private side). */
typedef struct {
    mph_metrics_slot_t *slot; /* borrowed (shared) or owned (own_slot) */
    int own_slot;
    void *index; /* name -> label index; owned */
} mph_metrics_t;

/* Starts counting into slot (shared, borrowed; zeroed by its giver), or into a slot of its
 * own when slot is NULL (a process without a supervisor). */
void mph_metrics_init(mph_metrics_t *m, mph_metrics_slot_t *slot);
void mph_metrics_free(mph_metrics_t *m);

/* The label index of method (mlen bytes): 0 ("(other)") when it is not known yet and
 * register_it is 0, when it is too long, or when the slot has no room left. */
int mph_metrics_method(mph_metrics_t *m, const char *method, size_t mlen, int register_it);

/* Counts one answered call of label `ix`, with its code and time taken. */
void mph_metrics_request(mph_metrics_t *m, int ix, int code, uint64_t ns);

/* Counts one outbound exchange: its HTTP status (0: no response) and time taken. */
void mph_metrics_fetch(mph_metrics_t *m, int status, uint64_t ns);

/* Adds src's counters to dst (by method name); gauges too when with_gauges. The supervisor
 * folds an exited worker's slot into the retired one with with_gauges 0. */
void mph_metrics_fold(mph_metrics_slot_t *dst, const mph_metrics_slot_t *src, int with_gauges);

/* Appends the Prometheus text of the sum of slots[0..n-1] (NULL entries skipped). */
void mph_metrics_render(mph_buf_t *out, const mph_metrics_slot_t *const *slots, size_t n);

/* The Content-Type of the text. */
#define MPH_METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

#endif
