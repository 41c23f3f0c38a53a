/*
 * internal.h: what the files of lua/ share: vm.c (the state and the module), txn.c (calls,
 * attempts, coroutines, errors, state changes), scopes.c (the scope cache, loads, commits,
 * retries), forward.c (mp.shard and mp.scatter) and fetch.c (mp.fetch and mp.rpc). Private to
 * lua/.
 *
 * A transaction (mph_txn_t) is one JSON-RPC call. Each attempt runs the handler in a new
 * coroutine; its states (txn.c: mph__txn_become makes every change, checking the edge here
 * and, with assert_txn_state below, the new state's invariants):
 *
 *   RUNNING  --handler waits for a scope to load (C.acquire yields)-->  WAITING
 *   WAITING  --on_loaded (scopes.c) resumes it-->                        RUNNING
 *   RUNNING  --mp.shard/mp.scatter forward the call (C.forward yields)-> FORWARDING
 *   FORWARDING --every forwarded call has answered (forward_done)-->     RUNNING
 *   RUNNING  --mp.fetch/mp.rpc start an exchange (F.start yields)-->     FETCHING
 *   FETCHING --the exchange has ended (fetch.c, on_fetch_done)-->        RUNNING
 *   RUNNING  --touched an unloaded scope where it cannot wait-->         RELOAD (attempt void)
 *   RELOAD   --that scope has loaded-->                                  RUNNING (new attempt)
 *   RUNNING  --handler returns, writes merged into its scopes-->         QUEUED (unit's pending)
 *   QUEUED   --runner launches the batch's commit-->                     COMMITTING
 *   COMMITTING --commit ok--> answered (freed)
 *   QUEUED/COMMITTING --conflict or a failed batch it depends on-->      RETRY (unit's rerun)
 *   RETRY    --the unit's backoff ends-->                                RUNNING (new attempt)
 *   QUEUED/COMMITTING --a keyed call's probe is answered (idem.c)-->    RUNNING (new attempt)
 *   RUNNING  --handler raises / no scope touched-->                      answered (freed)
 *   WAITING/RELOAD --the load failed-->                                  answered (freed)
 */
#ifndef MPH_LUA_INTERNAL_H
#define MPH_LUA_INTERNAL_H

#include <assert.h>
#include <lauxlib.h>
#include <lua.h>
#include <stdint.h>

#include "common/list.h"
#include "common/map.h"
#include "bridge.h"
#include "watchdog.h"

typedef enum {
    TXN_RUNNING,
    TXN_WAITING,
    TXN_FORWARDING,
    TXN_FETCHING,
    TXN_RELOAD,
    TXN_QUEUED,
    TXN_COMMITTING,
    TXN_RETRY
} mph_txn_state_t;

typedef struct mph_scope_s mph_scope_t;
typedef struct mph_txn_s mph_txn_t;
typedef struct mph_unit_s mph_unit_t;
typedef struct mph_commit_s mph_commit_t;
typedef struct mph_fetch_out_s mph_fetch_out_t; /* an exchange's outcome (fetch.c) */
typedef struct mph_outbox_s mph_outbox_t;       /* the delivery loop (outbox.c) */

/* The answer of one worker to a forwarded call (forward.c). */
typedef struct {
    mph_txn_t *t;    /* the forwarding transaction */
    int done;        /* the answer is in */
    int code;        /* 0: a result */
    char *json;      /* owned: the result's JSON text, or the error's data (NULL: none) */
    size_t json_len; /* bytes in json */
    char *message;   /* owned: the error's message */
} mph_fwd_answer_t;

struct mph_txn_s {
    mph_list_t node;       /* in whichever queue holds it (scopes.c), or unlinked (first:
                              list.h) */
    mph_lua_t *lua;        /* owner */
    mph_txn_state_t state; /* see the diagram above */
    char *method;          /* owned, NUL-terminated */
    char *user;            /* owned: the verified user of a call to an mp.basicAuth service
                              (mp.user; the record's `user` in Lua), or NULL */
    json_t *params;        /* owned reference, or NULL */
    mph_lua_reply_cb cb;   /* runs once, then the txn is freed */
    void *ud;              /* for cb */
    int attempts;          /* attempts started so far */
    lua_State *co;         /* the current attempt's coroutine; NULL between attempts */
    int co_ref;            /* registry ref anchoring co (LUA_NOREF when none) */
    int rec_ref;           /* registry ref of the attempt's record table */
    mph_scope_t **scopes;  /* the scopes the attempt acquired (pinned: see scopes.c), in order;
                              scopes_inline or owned */
    int nscopes;           /* 0: it touched none */
    int scopes_cap;        /* room in scopes */
    mph_scope_t *scopes_inline[2]; /* most calls touch one or two scopes */
    int wrote;                     /* 1 when the attempt wrote to any of its scopes */
    int cached_reads;              /* its service said reads = "cached" (scopes.c, "Fresh
                                      reads") */
    mph_buf_t result;              /* the attempt's encoded result */
    int refusals;                  /* commits of its own writes refused by a conflict */
    uint64_t deadline;             /* uv_hrtime() when the running stretch must end (0: none) */
    int past_checkpoint;           /* the attempt passed C.checkpoint: its writes are merging */
    mph_scope_t *reload;           /* the attempt is void: run again once this scope has loaded */
    int wake_code;           /* WAITING: the load failed with this JSON-RPC code (0: it did not) */
    char *wake_message;      /* owned: its message, for C.acquire to return */
    mph_lua_role_t role;     /* MPH_LUA_CALL, or the role of a call another worker forwarded */
    mph_lua_role_t fwd_role; /* FORWARDING: the role the forwarded calls run in */
    int fwd_first;           /* ... on workers fwd_first .. fwd_first + fwd_n - 1 */
    int fwd_n;               /* 0: no forward in progress or unread */
    size_t fwd_outstanding;  /* answers still to come (one more while sending) */
    mph_fwd_answer_t *fwd;   /* owned: fwd_n answers, until C.forwarded reads them */
    mph_fetch_out_t *fetch;  /* owned: FETCHING: the exchange's outcome once it has ended, until
                                F.result reads it (fetch.c) */
    int fetch_voids;         /* attempts made void because a scope they had read changed while
                                an exchange waited (fetch.c, "Reads across a wait") */
    /* Idempotency keys (idem.c): */
    char *idem_key;        /* owned: the record's key in its bucket (the user's name and the
                              client's key), or NULL: the call has no key */
    size_t idem_key_at;    /* where the client's key starts in idem_key (what a forward passes) */
    char *idem_scope;      /* owned: the bucket scope that holds the record */
    char idem_req[33];     /* the request's fingerprint, hex (method and params) */
    int idem_armed;        /* the attempt's handler has started: an error it raises is stored */
    int idem_apart;        /* a scope of the call cannot commit with the record (Cluster) */
    int outcome;           /* the error answered instead of the result (0: the result); set
                              by a replay, a -32006, or the attempt that stores an error */
    char *outcome_message; /* owned: its message */
    int replayed;          /* the outcome is an earlier call's stored reply */
    int fwd_replayed;      /* a shard this attempt forwarded to answered a stored reply */
    int idem_probe;        /* no attempt has yet found the record absent in a bucket state known
                              current: the next one that does not find it only checks (idem.c,
                              "Runs nothing") */
    int idem_absent;       /* this attempt found no record and ran no handler: once its read
                              is checked, the call runs its handler in a new attempt */
    int idem_fresh;        /* this attempt waited for the bucket's load: its state is current */
    int fail_code;         /* the handler raised this storable error: the next attempt only
                              stores it (0: none; idem.c, "Storing an error") */
    char *fail_message;    /* owned: its message */
    mph_buf_t fail_data;   /* its data, JSON text (len 0: none) */
    int internal;          /* 1: the outbox's own call (outbox.c): `method` names one of
                              I.outbox_services, which need no exposing */
    int quiet;             /* 1: the outbox's bookkeeping (claims, records), which the
                              statistics leave out (scopes.c, counted) */
};

typedef enum { SCOPE_UNLOADED, SCOPE_LOADING, SCOPE_READY } mph_scope_state_t;

/* A commit unit: the scopes whose next commits must go out together, because a transaction
 * spanning them ran on the speculative state of each (scopes.c explains). Most of the time
 * a unit is one scope alone (its `home` unit). */
struct mph_unit_s {
    mph_lua_t *lua;          /* owner */
    mph_list_t members;      /* its scopes (mph_scope_t.member_node); the unit is one member's
                                home */
    mph_list_t pending;      /* ran on the speculative state; in the next batch (a FIFO of
                                mph_txn_t.node, as are rerun and held) */
    int pending_commits;     /* how many of `pending` need a commit (wrote, or span scopes) */
    mph_list_t commits;      /* in flight (mph_commit_t.node, newest first); more than one
                                only after a merge */
    mph_list_t rerun;        /* RETRY: to run again when the backoff ends, in order */
    mph_list_t held;         /* WAITING: new attempts kept from running speculatively on a
                                contended scope until its commit ends (scopes.c) */
    int backing_off;         /* 1: no commit starts until backoff_until */
    int rerunning;           /* 1: its refused transactions are running again (rerun_now):
                                their commit waits until the last one has run */
    uint64_t backoff_until;  /* uv_now() milliseconds */
    int conflict_streak;     /* conflicts since the last successful commit */
    int error_streak;        /* storage errors since the last successful commit */
    mph_list_t backoff_node; /* in lua->backoffs while backing_off */
};

struct mph_scope_s {
    mph_map_node_t node;     /* in lua->scope_map, keyed by name */
    mph_lua_t *lua;          /* owner */
    char *name;              /* owned */
    mph_scope_state_t state; /* UNLOADED -> LOADING -> READY; back to UNLOADED on error */
    uint64_t version;        /* version of the committed base */
    uint64_t fresh_ms;       /* uv_now when storage last confirmed `version` current (a load,
                                a commit or a check): cached reads trust it this long */
    mph_list_t waiting;      /* transactions suspended until the load ends (mph_txn_t.node,
                                FIFO) */
    mph_unit_t *unit;        /* the unit it belongs to: &home, or another scope's home */
    mph_unit_t home;         /* its own unit, used while it is not merged into another */
    mph_list_t member_node;  /* in unit->members */
    mph_commit_t *commit;    /* the commit in flight that carries it, or NULL */
    int mark;                /* scratch: collecting a batch's scopes */
    int pins;                /* running attempts that acquired it: not evicted meanwhile */
    size_t bytes;            /* estimated memory of its state (scopes.c, "The scope cache") */
    mph_map_t cold;          /* values not read since the load, as JSON text (scopes.c,
                                "Cold values"); owned */
    mph_list_t lru_node;     /* in lua->lru */
};

/* A C function registered as c.NAME (mph_lua_register); the closure holds its address. */
typedef struct mph_lua_cfunc_s {
    mph_list_t node; /* in lua->cfuncs, freed with the bridge (first: list.h) */
    mph_lua_cfunction_t fn;
    void *ud;   /* the registrant's, borrowed */
    char *name; /* owned */
} mph_lua_cfunc_t;

struct mph_lua_s {
    uv_loop_t *loop;            /* borrowed */
    lua_State *L;               /* the one state */
    mph_store_t *store;         /* borrowed; NULL: no storage */
    int max_retries;            /* re-runs allowed after the first attempt */
    int debug_errors;           /* tracebacks in error data */
    uint64_t timeout_ns;        /* handler time limit per running stretch; 0: none */
    uint64_t committer;         /* random nonzero id of this process for fairness claims */
    uint64_t rng;               /* our own PRNG state (jitter): rand() is the embedder's */
    mph_buf_t scratch;          /* C.encode's output, reused (owned; nothing to leak on a raise) */
    int alloc_test;             /* MPH_TEST_LUA_ALLOC_FAIL=1: the state uses test_alloc */
    long alloc_skip;            /* test_alloc: allocations to let through before failing */
    long alloc_fail;            /* test_alloc: allocations to fail after those */
    int internal_ref;           /* registry ref of the module's internal table */
    int serve_called;           /* the script called mp.serve() */
    int worker_id;              /* mp.worker.id (1..worker_count) */
    int worker_count;           /* mp.worker.count */
    int topology_workers;       /* largest n of the script's topologies; 0: none */
    char **auth_services;       /* owned names of the services behind mp.basicAuth (C.service) */
    size_t nauth_services;      /* their number */
    mph_lua_forward_fn forward; /* reaches the other workers (borrowed), or NULL */
    void *forward_ud;           /* for forward */
    int host_id;                /* mp.worker.host (1..host_count) */
    int host_count;             /* mp.worker.hosts */
    mph_lua_forward_host_fn forward_host; /* reaches the other hosts (borrowed), or NULL */
    void *forward_host_ud;                /* for forward_host */
    mph_lua_fetch_fn fetch;               /* mp.fetch's exchanges (borrowed), or NULL */
    void *fetch_ud;                       /* for fetch */
    size_t fetching;        /* transactions in FETCHING: their exchanges have not ended */
    mph_outbox_t *outbox;   /* owned: mp.send's delivery loop */
    const char *version;    /* cfg.version, or "" */
    size_t pending_calls;   /* calls whose callback has not run */
    mph_txn_t *current;     /* the transaction whose coroutine is running, or NULL */
    int spare_threads[16];  /* registry refs of coroutines whose attempt finished, kept to
                               run later attempts in: making one costs more than reusing */
    int nspare_threads;     /* how many */
    mph_map_t scope_map;    /* every scope kept, by name; owned */
    size_t outbox_scopes;   /* how many of them are the outbox's (left out of mph_lua_stats) */
    mph_list_t lru;         /* the same scopes (mph_scope_t.lru_node), least recently
                               acquired first */
    size_t scope_bytes;     /* their estimated memory ... */
    size_t scope_cache;     /* ... kept under this by evicting idle ones (0: no bound) */
    uv_timer_t evict_timer; /* evicts from a clean stack, on the next loop iteration */
    int closing_timers;     /* timers whose close callback has not run yet */
    struct {                /* counted for the log line at close (benchmarks read it) and
                               /metrics (mph_lua_stats) */
        uint64_t calls, attempts, commits, conflicts, storage_errors, idem_replays;
    } stats;
    mph_list_t backoffs;      /* units backing off after a conflict (mph_unit_t.backoff_node),
                                 any order */
    uv_timer_t retry_timer;   /* fires at the earliest backoff_until */
    int closing;              /* mph_lua_close was called */
    void (*closed)(void *ud); /* mph_lua_close's callback, run once the bridge is freed */
    void *closed_ud;
    mph_list_t cfuncs; /* the registered C functions (mph_lua_cfunc_t.node, owned),
                          newest first */
    /* Arms the hook of a stretch past its deadline (owned); NULL: always armed, or no limit. */
    mph_watchdog_t *watchdog;
    unsigned idem_ttl; /* seconds an idempotency record answers duplicates (idem.c) */
};

#ifndef NDEBUG
/* A transaction's invariants in its state (internal.h draws the states); used as
 * assert(assert_txn_state(t)) at each transition. */
static inline int assert_txn_state(const mph_txn_t *t)
{
    switch (t->state) {
    case TXN_RUNNING: /* its coroutine exists (or is being made) and it has no queue */
        assert(t->reload == NULL || t->co != NULL);
        assert(!mph_list_is_linked(&t->node));
        break;
    case TXN_WAITING: /* suspended in C.acquire, queued on a loading scope or held */
        assert(t->co != NULL && t->reload == NULL && !t->past_checkpoint);
        break;
    case TXN_FORWARDING: /* suspended in C.forward, in no queue: the answers resume it */
        assert(t->co != NULL && t->fwd != NULL && t->role == MPH_LUA_CALL && t->nscopes == 0);
        assert(!mph_list_is_linked(&t->node));
        break;
    case TXN_FETCHING: /* suspended in F.start, in no queue: the exchange's end resumes it */
        assert(t->co != NULL && t->fetch != NULL && t->reload == NULL && !t->past_checkpoint);
        assert(!mph_list_is_linked(&t->node));
        break;
    case TXN_RELOAD: /* its void attempt ended; it waits for reload to load */
        assert(t->co == NULL && t->reload != NULL);
        break;
    case TXN_QUEUED:     /* finished; its writes are in the scope's pending state */
    case TXN_COMMITTING: /* ... or in the commit in flight */
        assert(t->co == NULL && t->nscopes > 0 && t->reload == NULL);
        break;
    case TXN_RETRY: /* refused or void; runs again when the unit's backoff ends */
        assert(t->co == NULL && t->nscopes > 0);
        break;
    default:
        assert(!"unknown transaction state");
    }
    return 1;
}
#endif

/* Whether a transaction in state `from` may go to `to` (the edges of the diagram above). */
int mph__txn_may_become(mph_txn_state_t from, mph_txn_state_t to);

/* Moves t to state `to`: the edge must be drawn above; the caller then asserts
 * assert_txn_state(t) once the new state's fields are set. */
void mph__txn_become(mph_txn_t *t, mph_txn_state_t to);

/* txn.c */
void mph__txn_start_attempt(mph_txn_t *t);
void mph__txn_resume(mph_txn_t *t, int nargs);
void mph__txn_reply(mph_txn_t *t, int code, const char *message);
void mph__txn_reply_result(mph_txn_t *t);
void mph__txn_clear_wake(mph_txn_t *t);
/* The C helpers of a running attempt (C.current, C.acquire, C.join, C.set_result,
 * C.checkpoint). */
extern const luaL_Reg mph__txn_helpers[];
/* The handler time limit's count hook (every MPH_HOOK_INSTRUCTIONS instructions, where the
 * hook is armed: txn.c says when). */
void mph__txn_timeout_hook(lua_State *L, lua_Debug *ar);
#define MPH_HOOK_INSTRUCTIONS 10000

/* vm.c */
#define NOMEM_MESSAGE "not enough memory" /* LuaJIT's own, interned at start */
/* Raises a JSON-RPC error object (the module's error_mt) with code and message. [-0, +0, e] */
int mph__lua_raise(mph_lua_t *lua, lua_State *L, int code, const char *message);
/* Raises Lua's out-of-memory message (LuaJIT's preallocated string) as an error, which an
 * attempt answers with -32603 as it does LUA_ERRMEM itself. [-0, +0, e] */
int mph__lua_raise_nomem(lua_State *L);
/* The mph_lua_t whose state L (or a thread of it) is. [-0, +0, -] */
mph_lua_t *mph__lua_owner(lua_State *L);
/* Pushes I[name], a field of the internal table metaparticle.lua returned. [-0, +1, m] */
void mph__lua_get_internal(mph_lua_t *lua, lua_State *L, const char *name);
/* Calls I[fn] with the nargs values on top of L under lua_pcall with a traceback handler and
 * leaves nresults; an error goes on (with its traceback) to the enclosing protected call.
 * Only inside mph__lua_protect. [-nargs, +nresults, e] */
void mph__lua_call_internal(mph_lua_t *lua, lua_State *L, const char *fn, int nargs, int nresults);
/* Runs f under lua_cpcall on the main state with ud as its only argument: the one way C
 * enters Lua other than lua_resume. Returns 0, or the Lua status after logging "what: error";
 * the stack is as before either way. */
int mph__lua_protect(mph_lua_t *lua, lua_CFunction f, void *ud, const char *what);
/* The next number of the bridge's own PRNG (never rand(): that state is the embedder's). */
uint64_t mph__lua_random(mph_lua_t *lua);

/* Pushes a JSON-RPC error object (the module's error_mt) with code and message: what
 * mp.error raises. [-0, +1, m] */
void mph__lua_push_error(mph_lua_t *lua, lua_State *L, int code, const char *message);
/* The mph_lua_t every C helper of the module carries as its first upvalue. */
mph_lua_t *mph__lua_upvalue(lua_State *L);
/* Sets each of `helpers` (NULL-terminated) in the table on top of the stack, as a closure over
 * lua. [-0, +0, m] */
void mph__lua_set_helpers(mph_lua_t *lua, lua_State *L, const luaL_Reg *helpers);
/* A part of the module built into the binary (fetch.lua, outbox.lua): loads the chunk (text,
 * len, named `name` in tracebacks) and pushes its table of C helpers; the caller adds its
 * constants to that table, then mph__lua_run_part runs chunk(T, M, I). Inside init_state's
 * protected call. [-0, +2, e] */
void mph__lua_load_part(mph_lua_t *lua, lua_State *L, const unsigned char *text, size_t len,
                        const char *name, const luaL_Reg *helpers);
/* Runs the part loaded (Stack: chunk, T) with the module M and its internals I. [-2, +0, e] */
void mph__lua_run_part(mph_lua_t *lua, lua_State *L);

/* forward.c */
/* The C helpers of mp.shard and mp.scatter (C.shard_target, C.forward, C.forwarded). */
extern const luaL_Reg mph__forward_helpers[];
/* t yielded in C.forward (FORWARDING): sends its calls; once all have answered, t is resumed,
 * perhaps before this returns (and then t may be gone). */
void mph__forward_send(mph_txn_t *t);
/* Frees t's forwarded answers, if any. */
void mph__forward_clear(mph_txn_t *t);

/* fetch.c */
/* Runs lua/fetch.lua, which adds mp.fetch and mp.rpc to the module (package.loaded). Inside
 * init_state's protected call. [-0, +0, e] */
void mph__fetch_open(mph_lua_t *lua, lua_State *L);
/* Frees t's exchange outcome, if any (never one in flight: t is not FETCHING). */
void mph__fetch_clear(mph_txn_t *t);

/* idem.c */
/* The C helpers of idempotency keys (C.idem_arm, C.idem_outcome, C.result_text,
 * C.idem_expired). */
extern const luaL_Reg mph__idem_helpers[];
/* Gives t (a new call) its key (klen bytes): NULL, or why it is refused (-32600). */
const char *mph__idem_init(mph_txn_t *t, const char *key, size_t klen);
/* Sets rec.idem (and rec.fail for an attempt that stores an error) on the record table on
 * top of L, for a call with a key. [-0, +0, m] */
void mph__idem_push(mph_txn_t *t, lua_State *L);
/* The attempt raised code (message, data): returns 1 when the error is stored (the caller
 * gives up its message and data: they are the transaction's now, and the next attempt
 * stores them), 0 when it is answered as it is. */
int mph__idem_keep_failure(mph_txn_t *t, int code, char **message, mph_buf_t *data);
/* Clears what an attempt of a keyed call leaves (its outcome; its stored failure too when
 * !keep_failure). */
void mph__idem_reset(mph_txn_t *t, int keep_failure);
/* Frees what the call's key owns. */
void mph__idem_free(mph_txn_t *t);
/* The attempt of t is answered: 1 when it was a keyed call's probe (idem.c, "Runs nothing")
 * and the call now runs its handler in a new attempt, so nothing is to be answered yet. */
int mph__idem_probed(mph_txn_t *t);
/* Scope `name` cannot commit with t's first scope `first` (a Redis Cluster): when `first` is
 * the record's bucket, rewrites msg (len bytes) to say how to keep them together and marks
 * the error as the setup's, not stored (idem.c, "Redis Cluster"); else leaves msg. */
void mph__idem_apart(mph_txn_t *t, const char *first, const char *name, char *msg, size_t len);
/* t waits for the load of scope `name`: its state will be current once loaded. */
void mph__idem_loading(mph_txn_t *t, const char *name);

/* outbox.c */
/* Makes lua->outbox (mph_lua_new initialises its timer, mph_lua_close closes it). */
void mph__outbox_new(mph_lua_t *lua);
/* Runs lua/outbox.lua, which adds mp.send, mp.cancel and mp.self to the module and the
 * delivery's operations to I. Inside init_state's protected call. [-0, +0, e] */
void mph__outbox_open(mph_lua_t *lua, lua_State *L);
/* Stops claiming (mph_lua_close does before it answers what waits). */
void mph__outbox_stop(mph_outbox_t *ob);
/* Frees it (its timer closed), with the deliveries whose next step never ran. */
void mph__outbox_free(mph_outbox_t *ob);
/* Its timer, for mph_lua_close to close; the outbox is freed with the bridge. */
uv_handle_t *mph__outbox_handle(mph_outbox_t *ob);
void mph__outbox_stats(const mph_outbox_t *ob, mph_lua_outbox_stats_t *out);
/* Whether scope `name` is one of the outbox's (MPH_OUTBOX_PENDING or MPH_OUTBOX_DEAD). */
int mph__outbox_is_scope(const char *name);

/* txn.c */
/* Runs I.outbox_services[op] (outbox.lua) with params (borrowed; an array: positional
 * arguments) as a transaction of its own, as the verified user `user` (copied; NULL: none);
 * quiet: left out of the statistics (mph_txn_t.quiet). cb runs exactly once, possibly before
 * this returns, as for mph_lua_call. */
void mph__txn_call_internal(mph_lua_t *lua, const char *op, const json_t *params, const char *user,
                            int quiet, mph_lua_reply_cb cb, void *ud);

/* scopes.c */
/* Calls fn on every cold value of scope s (key, JSON text), in no order; fn changes nothing
 * of s. */
void mph__scopes_cold_each(mph_scope_t *s,
                           void (*fn)(const char *key, const char *json, size_t jlen, void *ud),
                           void *ud);
extern const luaL_Reg mph__scopes_helpers[]; /* C.cold_take, C.cold_drop, C.cold_keys */
/* 0: the scope is ready; 1: t was queued until it loads (yield); <0: *code and *why say why
 * not (when !can_wait and the scope is loading, t->reload is set: the attempt is void). */
int mph__scopes_acquire(mph_txn_t *t, const char *name, int can_wait, int *code, const char **why);
/* The finished attempt touched scope `name` (acquired), writing to it or not. */
void mph__scopes_join(mph_txn_t *t, const char *name, int wrote);
/* The attempt ends (or starts again): its scopes are no longer pinned by it. */
void mph__scopes_unpin(mph_txn_t *t);
/* The scope called `name` that the attempt acquired, or NULL. */
mph_scope_t *mph__scopes_acquired(mph_txn_t *t, const char *name);
void mph__scopes_finished(mph_txn_t *t);
/* t's void attempt has ended: it runs again once t->reload has loaded (or hears why not). */
void mph__scopes_reload(mph_txn_t *t);
void mph__scopes_close(mph_lua_t *lua);

#endif
