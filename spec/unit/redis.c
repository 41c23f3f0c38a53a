/*
 * Unit tests of the Redis backend (storage/redis.c, included to reach its statics):
 *  - read_reply() on every shape of the scripts' replies, built from RESP bytes by hiredis's
 *    own redisReader: the shapes storage/redis_cas.lua and redis_load.lua document, and the
 *    wrong ones (errors, NOSCRIPT, nil, wrong types, short arrays, bad records), each of
 *    which must be a clean MPH_ESTORAGE (-32002 to the client) with a message;
 *  - connecting: a host name is resolved on the thread pool (uv_getaddrinfo), before every
 *    connection attempt, and hiredis is only ever given a numeric address.
 * These run without a Redis server (spec/test_redis.py drives real ones).
 */
#define _GNU_SOURCE
#define MPH_REDIS_TESTS /* read_reply */
#include "common/common.c"
#include "storage/redis.c"
#include "storage/redis_route.c"
#include "storage/redis_cluster.c"

#include "spec/unit/unit.h"

/* ---- Replies ---- */

/* Parses one RESP reply (new; free with freeReplyObject). */
static redisReply *resp(const char *bytes)
{
    redisReader *rd = redisReaderCreate();
    void *reply = NULL;
    redisReaderFeed(rd, bytes, strlen(bytes));
    if (redisReaderGetReply(rd, &reply) != REDIS_OK || reply == NULL) {
        fprintf(stderr, "  cannot parse RESP %s\n", bytes);
        failures_in_test++;
    }
    redisReaderFree(rd);
    return reply;
}

/* Reads `bytes` as the reply to a commit (expected version `expected`) or a load. */
static int read_resp(op_kind_t kind, uint64_t expected, const char *bytes, reply_t *out)
{
    redisReply *r = resp(bytes);
    int rc = read_reply(kind, expected, "global", r, out);
    freeReplyObject(r); /* out's entries borrowed from r: tests check them through copies */
    return rc;
}

static char entries_text[4096]; /* "k=v k=v k=-" of the last read_entries() */

/* Reads a reply and renders its entries (a deleted key shows as "k=-") into entries_text. */
static int read_entries(op_kind_t kind, uint64_t expected, const char *bytes, reply_t *out)
{
    redisReply *r = resp(bytes);
    int rc = read_reply(kind, expected, "global", r, out);
    size_t at = 0;
    entries_text[0] = '\0';
    for (size_t i = 0; i < out->res.doc.n && at < sizeof(entries_text); i++) {
        const mph_store_entry_t *e = &out->res.doc.entries[i];
        at += (size_t)snprintf(entries_text + at, sizeof(entries_text) - at, "%s%.*s=%.*s",
                               i ? " " : "", (int)e->klen, e->key, e->json ? (int)e->jlen : 1,
                               e->json ? e->json : "-");
    }
    free(out->res.doc.entries);
    out->res.doc.entries = NULL;
    freeReplyObject(r);
    return rc;
}

/* A wrong shape: a clean storage error with a message, and nothing else in the result. */
static void expect_error(op_kind_t kind, uint64_t expected, const char *bytes, const char *msg)
{
    reply_t out;
    int rc = read_resp(kind, expected, bytes, &out);
    int ok = rc == MPH_ESTORAGE && out.res.status == MPH_ESTORAGE && out.res.message &&
             strstr(out.res.message, msg) && out.res.doc.n == 0 && out.res.doc.entries == NULL &&
             !out.res.held;
    if (!ok) {
        fprintf(stderr, "  reply %s: expected an error with \"%s\", got %d \"%s\"\n", bytes, msg,
                rc, out.res.message ? out.res.message : "(null)");
        failures_in_test++;
    }
    free(out.res.doc.entries);
}

static void test_load_replies(void)
{
    reply_t out;
    CHECK(read_entries(OP_LOAD, 0, "*2\r\n$1\r\n0\r\n*0\r\n", &out) == 0);
    CHECK(out.res.doc.version == 0 && out.res.doc.n == 0 && out.res.message == NULL);
    CHECK(read_entries(OP_LOAD, 0,
                       "*2\r\n$2\r\n12\r\n*4\r\n$1\r\na\r\n$1\r\n1\r\n$1\r\nb\r\n$3\r\n\"x\"\r\n",
                       &out) == 0);
    CHECK(out.res.doc.version == 12 && out.res.doc.n == 2 && !out.res.doc.is_delta);
    CHECK(strcmp(entries_text, "a=1 b=\"x\"") == 0);
    CHECK(strcmp(out.res.scope, "global") == 0);
}

static void test_load_wrong_shapes(void)
{
    const char *what = "unexpected reply from Redis";
    expect_error(OP_LOAD, 0, "$-1\r\n", what);                       /* nil */
    expect_error(OP_LOAD, 0, "*-1\r\n", what);                       /* nil array */
    expect_error(OP_LOAD, 0, "+OK\r\n", what);                       /* status */
    expect_error(OP_LOAD, 0, ":3\r\n", what);                        /* integer */
    expect_error(OP_LOAD, 0, "*0\r\n", what);                        /* short */
    expect_error(OP_LOAD, 0, "*1\r\n$1\r\n3\r\n", what);             /* short */
    expect_error(OP_LOAD, 0, "*3\r\n$1\r\n3\r\n*0\r\n*0\r\n", what); /* long */
    expect_error(OP_LOAD, 0, "*2\r\n:3\r\n*0\r\n", what);            /* int version */
    expect_error(OP_LOAD, 0, "*2\r\n$-1\r\n*0\r\n", what);           /* nil version */
    expect_error(OP_LOAD, 0, "*2\r\n$2\r\n-1\r\n*0\r\n", what);      /* negative */
    expect_error(OP_LOAD, 0, "*2\r\n$0\r\n\r\n*0\r\n", what);        /* empty */
    expect_error(OP_LOAD, 0, "*2\r\n$2\r\n03\r\n*0\r\n", what);      /* not canonical */
    expect_error(OP_LOAD, 0, "*2\r\n$20\r\n99999999999999999999\r\n*0\r\n", what);  /* > 2^64 */
    expect_error(OP_LOAD, 0, "*2\r\n$1\r\n3\r\n$1\r\nx\r\n", what);                 /* no hash */
    expect_error(OP_LOAD, 0, "*2\r\n$1\r\n3\r\n*1\r\n$1\r\na\r\n", what);           /* odd hash */
    expect_error(OP_LOAD, 0, "*2\r\n$1\r\n3\r\n*2\r\n$1\r\na\r\n:1\r\n", what);     /* int value */
    expect_error(OP_LOAD, 0, "*2\r\n$1\r\n3\r\n*2\r\n$1\r\na\r\n$-1\r\n", what);    /* nil value */
    expect_error(OP_LOAD, 0, "*2\r\n$1\r\n3\r\n*2\r\n$1\r\na\r\n$0\r\n\r\n", what); /* empty */
    expect_error(OP_LOAD, 0, "*2\r\n$1\r\n3\r\n*2\r\n*0\r\n$1\r\n1\r\n", what);     /* array key */
}

static void test_commit_ok(void)
{
    reply_t out;
    CHECK(read_resp(OP_COMMIT, 5, "*2\r\n:1\r\n$1\r\n6\r\n", &out) == 0);
    CHECK(out.res.status == 0 && out.res.doc.version == 6 && out.res.doc.n == 0);
    free(out.res.doc.entries);
    /* A success must be exactly {1, expected + 1}. */
    const char *what = "unexpected reply from Redis";
    expect_error(OP_COMMIT, 4, "*2\r\n:1\r\n$1\r\n6\r\n", what);
    expect_error(OP_COMMIT, 6, "*2\r\n:1\r\n$1\r\n6\r\n", what);
    expect_error(OP_COMMIT, UINT64_MAX, "*2\r\n:1\r\n$1\r\n0\r\n", what);
    expect_error(OP_COMMIT, 5, "*2\r\n:1\r\n:6\r\n", what);
    expect_error(OP_COMMIT, 5, "*2\r\n$1\r\n1\r\n$1\r\n6\r\n", what); /* "1", not 1 */
    expect_error(OP_COMMIT, 5, "*2\r\n:2\r\n$1\r\n6\r\n", what);
    expect_error(OP_COMMIT, 5, "*3\r\n:1\r\n$1\r\n6\r\n:0\r\n", what);
    expect_error(OP_COMMIT, 5, "*1\r\n:1\r\n", what);
    expect_error(OP_COMMIT, 5, "*0\r\n", what);
    expect_error(OP_COMMIT, 5, ":1\r\n", what);
    expect_error(OP_COMMIT, 5, "+OK\r\n", what);
    expect_error(OP_COMMIT, 5, "$-1\r\n", what);
    expect_error(OP_COMMIT, 5, "*2\r\n$-1\r\n$1\r\n6\r\n", what);
    expect_error(OP_COMMIT, 5, "*2\r\n:1\r\n$2\r\n6x\r\n", what);
}

static void test_commit_conflict_with_delta(void)
{
    reply_t out;
    /* Expected 3, now 5: records of 5 and 4, newest first; applied oldest first. */
    CHECK(read_entries(OP_COMMIT, 3,
                       "*5\r\n:0\r\n$1\r\n5\r\n:1\r\n*2\r\n"
                       "$14\r\n5\n1:a2:101:b0:\r\n"
                       "$8\r\n4\n1:a1:9\r\n"
                       ":0\r\n",
                       &out) == MPH_ECONFLICT);
    CHECK(out.res.status == MPH_ECONFLICT && out.res.doc.version == 5 && out.res.doc.is_delta);
    CHECK(!out.res.held && strcmp(out.res.scope, "global") == 0);
    CHECK(strcmp(entries_text, "a=9 a=10 b=-") == 0);
    /* A record with no keys (a commit that changed nothing) is fine. */
    CHECK(read_entries(OP_COMMIT, 3, "*5\r\n:0\r\n$1\r\n4\r\n:1\r\n*1\r\n$2\r\n4\n\r\n:0\r\n",
                       &out) == MPH_ECONFLICT);
    CHECK(out.res.doc.n == 0);
    /* An empty key is a key. */
    CHECK(read_entries(OP_COMMIT, 3, "*5\r\n:0\r\n$1\r\n4\r\n:1\r\n*1\r\n$7\r\n4\n0:1:1\r\n:0\r\n",
                       &out) == MPH_ECONFLICT);
    CHECK(strcmp(entries_text, "=1") == 0);
}

static void test_commit_conflict_with_whole_doc(void)
{
    reply_t out;
    CHECK(read_entries(OP_COMMIT, 3,
                       "*5\r\n:0\r\n$2\r\n40\r\n:0\r\n*4\r\n$1\r\na\r\n$2\r\n40\r\n"
                       "$1\r\nb\r\n$4\r\ntrue\r\n:0\r\n",
                       &out) == MPH_ECONFLICT);
    CHECK(out.res.doc.version == 40 && !out.res.doc.is_delta && !out.res.held);
    CHECK(strcmp(entries_text, "a=40 b=true") == 0);
    /* Behind a flushed Redis (the version went back): the whole document, version 0. */
    CHECK(read_entries(OP_COMMIT, 3, "*5\r\n:0\r\n$1\r\n0\r\n:0\r\n*0\r\n:0\r\n", &out) ==
          MPH_ECONFLICT);
    CHECK(out.res.doc.version == 0 && out.res.doc.n == 0);
}

static void test_commit_held_claim(void)
{
    reply_t out;
    /* Refused at the right version because another committer's claim holds. */
    CHECK(read_entries(OP_COMMIT, 7, "*5\r\n:0\r\n$1\r\n7\r\n:1\r\n*0\r\n:1\r\n", &out) ==
          MPH_ECONFLICT);
    CHECK(out.res.held == 1 && out.res.doc.version == 7 && out.res.doc.is_delta &&
          out.res.doc.n == 0);
    /* Held and behind. */
    CHECK(read_entries(OP_COMMIT, 6, "*5\r\n:0\r\n$1\r\n7\r\n:1\r\n*1\r\n$8\r\n7\n1:a1:7\r\n:1\r\n",
                       &out) == MPH_ECONFLICT);
    CHECK(out.res.held == 1 && strcmp(entries_text, "a=7") == 0);
    /* HELD is the claim's milliseconds left: the caller waits that long. */
    CHECK(read_entries(OP_COMMIT, 7, "*5\r\n:0\r\n$1\r\n7\r\n:1\r\n*0\r\n:9\r\n", &out) ==
          MPH_ECONFLICT);
    CHECK(out.res.held == 9 && out.res.conflicts[0].held == 9);
}

static void test_commit_conflict_wrong_shapes(void)
{
    const char *what = "unexpected reply from Redis";
    /* Short and long arrays. */
    expect_error(OP_COMMIT, 3, "*2\r\n:0\r\n$1\r\n5\r\n", what);
    expect_error(OP_COMMIT, 3, "*4\r\n:0\r\n$1\r\n5\r\n:0\r\n*0\r\n", what);
    expect_error(OP_COMMIT, 3, "*6\r\n:0\r\n$1\r\n5\r\n:0\r\n*0\r\n:0\r\n:0\r\n", what);
    /* Wrong types or values of the flags. */
    expect_error(OP_COMMIT, 3, "*5\r\n:0\r\n$1\r\n5\r\n:2\r\n*0\r\n:0\r\n", what);
    expect_error(OP_COMMIT, 3, "*5\r\n:0\r\n$1\r\n5\r\n$1\r\n1\r\n*0\r\n:0\r\n", what);
    expect_error(OP_COMMIT, 3, "*5\r\n:0\r\n$1\r\n5\r\n:0\r\n*0\r\n:-1\r\n", what);
    expect_error(OP_COMMIT, 3, "*5\r\n:0\r\n$1\r\n5\r\n:0\r\n*0\r\n$-1\r\n", what);
    expect_error(OP_COMMIT, 3, "*5\r\n:0\r\n$1\r\n5\r\n:0\r\n*0\r\n:4294967296\r\n", what);
    expect_error(OP_COMMIT, 3, "*5\r\n:-1\r\n$1\r\n5\r\n:0\r\n*0\r\n:0\r\n", what);
    expect_error(OP_COMMIT, 3, "*5\r\n:0\r\n*0\r\n:0\r\n*0\r\n:0\r\n", what);
    /* The document or the records are not an array. */
    expect_error(OP_COMMIT, 3, "*5\r\n:0\r\n$1\r\n5\r\n:0\r\n$-1\r\n:0\r\n", what);
    expect_error(OP_COMMIT, 3, "*5\r\n:0\r\n$1\r\n5\r\n:1\r\n:2\r\n:0\r\n", what);
    expect_error(OP_COMMIT, 3, "*5\r\n:0\r\n$1\r\n5\r\n:1\r\n$-1\r\n:0\r\n", what);
    /* A delta must hold exactly one record per version, in order. */
    expect_error(OP_COMMIT, 3, "*5\r\n:0\r\n$1\r\n5\r\n:1\r\n*1\r\n$8\r\n5\n1:a1:1\r\n:0\r\n",
                 what);
    expect_error(OP_COMMIT, 3,
                 "*5\r\n:0\r\n$1\r\n5\r\n:1\r\n*2\r\n$8\r\n4\n1:a1:1\r\n$8\r\n5\n1:a1:1\r\n:0\r\n",
                 what);
    expect_error(OP_COMMIT, 3, "*5\r\n:0\r\n$1\r\n3\r\n:1\r\n*0\r\n:0\r\n", what); /* no why */
    expect_error(OP_COMMIT, 5, "*5\r\n:0\r\n$1\r\n3\r\n:1\r\n*0\r\n:0\r\n", what); /* back */
    expect_error(OP_COMMIT, 3, "*5\r\n:0\r\n$1\r\n4\r\n:1\r\n*1\r\n:4\r\n:0\r\n", what);
    expect_error(OP_COMMIT, 3, "*5\r\n:0\r\n$1\r\n4\r\n:1\r\n*1\r\n$-1\r\n:0\r\n", what);
    /* Malformed records: no newline, bad lengths, a key without a value, overflow. */
    static const char *const records[] = {
        "$1\r\n4\r\n",
        "$0\r\n\r\n",
        "$3\r\n4\n1\r\n",
        "$5\r\n4\n1:a\r\n",
        "$7\r\n4\n2:a1:\r\n",
        "$8\r\n4\n1:a9:1\r\n",
        "$8\r\n4\nx:a1:1\r\n",
        "$9\r\n4\n1:a1:12\r\n",
        "$8\r\n4\n1:a-:1\r\n",
        "$7\r\n4\n1:a1:\r\n",
        "$27\r\n4\n18446744073709551617:a1:1\r\n",
        "$8\r\n 4\n1:a1:\r\n",
    };
    for (size_t i = 0; i < sizeof(records) / sizeof(records[0]); i++) {
        char bytes[256];
        snprintf(bytes, sizeof(bytes), "*5\r\n:0\r\n$1\r\n4\r\n:1\r\n*1\r\n%s:0\r\n", records[i]);
        expect_error(OP_COMMIT, 3, bytes, what);
    }
}

static void test_error_replies_and_noscript(void)
{
    expect_error(OP_COMMIT, 3, "-ERR something broke\r\n", "Redis: ERR something broke");
    expect_error(OP_LOAD, 0, "-WRONGTYPE Operation against a key\r\n", "Redis: WRONGTYPE");
    expect_error(OP_LOAD, 0, "-\r\n", "Redis: ");
    /* NOSCRIPT: sent again as EVAL once; a second NOSCRIPT is an error like any other. */
    redisReply *r = resp("-NOSCRIPT No matching script. Please use EVAL.\r\n");
    rop_t op = {0};
    CHECK(wants_eval(&op, r));
    op.sent_as_eval = 1;
    CHECK(!wants_eval(&op, r));
    op.sent_as_eval = 0;
    freeReplyObject(r);
    r = resp("-ERR NOSCRIPT is not at the start\r\n");
    CHECK(!wants_eval(&op, r));
    freeReplyObject(r);
    r = resp("$8\r\nNOSCRIPT\r\n");
    CHECK(!wants_eval(&op, r));
    freeReplyObject(r);
    CHECK(!wants_eval(&op, NULL));
    expect_error(OP_COMMIT, 3, "-NOSCRIPT No matching script.\r\n", "Redis: NOSCRIPT");
}

static void test_null_reply(void)
{
    reply_t out;
    CHECK(read_reply(OP_COMMIT, 3, "global", NULL, &out) == MPH_ESTORAGE);
    CHECK(out.res.message && strstr(out.res.message, "outcome is unknown"));
    CHECK(out.res.doc.entries == NULL && out.res.doc.n == 0);
    CHECK(read_reply(OP_LOAD, 0, "global", NULL, &out) == MPH_ESTORAGE);
}

static void test_parse_u64(void)
{
    uint64_t v = 0;
    CHECK(parse_u64("18446744073709551615", 20, &v) == 0 && v == UINT64_MAX);
    CHECK(parse_u64("18446744073709551616", 20, &v) != 0);
    CHECK(parse_u64("99999999999999999999", 20, &v) != 0);
    CHECK(parse_u64("000000000000000000001", 21, &v) != 0);
    CHECK(parse_u64("0", 1, &v) == 0 && v == 0);
    CHECK(parse_u64("", 0, &v) != 0);
    CHECK(parse_u64("+1", 2, &v) != 0);
    CHECK(parse_u64("00", 2, &v) != 0 && parse_u64("012", 3, &v) != 0); /* found by fuzzing */
}

/* ---- Connecting ---- */

static int closed_calls;

static void on_closed(void *ud)
{
    (void)ud;
    closed_calls++;
}

/* A loopback port with nothing listening (bound, never listened, closed on return). */
static int dead_port(void)
{
    uv_loop_t loop;
    uv_tcp_t tcp;
    struct sockaddr_in sin;
    struct sockaddr_storage name;
    int len = sizeof(name);
    uv_loop_init(&loop);
    uv_tcp_init(&loop, &tcp);
    uv_ip4_addr("127.0.0.1", 0, &sin);
    uv_tcp_bind(&tcp, (const struct sockaddr *)&sin, 0);
    uv_tcp_getsockname(&tcp, (struct sockaddr *)&name, &len);
    uv_close((uv_handle_t *)&tcp, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    return ntohs(((struct sockaddr_in *)&name)->sin_port);
}

/* Closes the store and runs the loop dry; checks that everything was closed and freed. */
static void close_store(uv_loop_t *loop, redis_store_t *rs)
{
    closed_calls = 0;
    rs->base.methods->close(&rs->base, on_closed, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    CHECK(closed_calls == 1);
    CHECK(uv_loop_close(loop) == 0);
}

static void ignore_result(void *ud, const mph_store_result_t *res)
{
    (void)ud;
    (void)res;
}

/* Runs the loop until rs reaches `state` with at least `resolutions`. The limit of 10 s of
 * loop time only guards against a hang: each step takes milliseconds (no command timeout can
 * help, the tests set it to 10 minutes). */
static int run_until(uv_loop_t *loop, redis_store_t *rs, conn_state_t state, unsigned resolutions)
{
    uint64_t give_up = uv_now(loop) + 10000;
    while ((rs->state != state || rs->resolutions < resolutions) && uv_now(loop) < give_up)
        uv_run(loop, UV_RUN_ONCE);
    return rs->state == state && rs->resolutions >= resolutions;
}

static void test_numeric_hosts_are_not_resolved(void)
{
    static const char *const hosts[] = {"127.0.0.1", "::1"};
    for (int i = 0; i < 2; i++) {
        uv_loop_t loop;
        uv_loop_init(&loop);
        mph_store_redis_config_t cfg = {hosts[i], dead_port(), NULL, 0,    NULL, 600000,
                                        0,        0,           0,    NULL, NULL};
        redis_store_t *rs = store_new(&loop, &cfg, 0, NULL, 0);
        CHECK(rs->numeric && rs->state == STATE_CONNECTED && rs->ac != NULL);
        CHECK(strcmp(rs->addr, hosts[i]) == 0);
        /* The first connection: calls queue while it is being made. */
        CHECK(can_send(rs));
        /* A refused connect is noticed at once (not after the command timeout: hiredis
         * 0.14.1's libuv adapter dropped that error). */
        CHECK(run_until(&loop, rs, STATE_DOWN, 0));
        CHECK(rs->resolutions == 0 && !rs->was_up);
        /* The next attempt, during a known outage: calls fail at once. */
        CHECK(run_until(&loop, rs, STATE_CONNECTED, 0));
        CHECK(!can_send(rs));
        CHECK(rs->base.methods->load(&rs->base, "global", ignore_result, NULL) == MPH_ESTORAGE);
        close_store(&loop, rs);
    }
}

static void test_names_are_resolved_off_the_loop_on_every_attempt(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    mph_store_redis_config_t cfg = {"localhost", dead_port(), NULL, 0,    NULL, 600000,
                                    0,           0,           0,    NULL, NULL};
    redis_store_t *rs = store_new(&loop, &cfg, 0, NULL, 0);
    /* store_new returned before the name was resolved: it is on the thread pool. */
    CHECK(!rs->numeric && rs->state == STATE_RESOLVING && rs->ac == NULL);
    CHECK(rs->resolutions == 0 && rs->addr[0] == '\0');
    /* Meanwhile calls fail at once. */
    CHECK(rs->base.methods->load(&rs->base, "global", ignore_result, NULL) == MPH_ESTORAGE);
    /* Each attempt fails (nothing listens) and the next one resolves the name again. */
    CHECK(run_until(&loop, rs, STATE_DOWN, 3));
    CHECK(is_numeric_address(rs->addr)); /* what hiredis was given */
    close_store(&loop, rs);
}

static void test_close_while_resolving(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    mph_store_redis_config_t cfg = {"localhost", dead_port(), NULL, 0,    NULL, 600000,
                                    0,           0,           0,    NULL, NULL};
    redis_store_t *rs = store_new(&loop, &cfg, 0, NULL, 0);
    CHECK(rs->state == STATE_RESOLVING);
    close_store(&loop, rs); /* cancelled or awaited; no connection attempt after close */
}

static void test_addresses_in_messages(void)
{
    char buf[80];
    format_where(buf, sizeof(buf), "::1", 6380);
    CHECK(strcmp(buf, "[::1]:6380") == 0);
    format_where(buf, sizeof(buf), "redis.example", 6379);
    CHECK(strcmp(buf, "redis.example:6379") == 0);
    CHECK(is_numeric_address("10.1.2.3") && is_numeric_address("fe80::1"));
    CHECK(!is_numeric_address("localhost") && !is_numeric_address("[::1]"));
}

/* Hash slots against values Redis's CLUSTER KEYSLOT gives, and where scopes' keys go. */
static void test_slots_and_scope_keys(void)
{
    CHECK(mph__redis_key_slot("123456789", 9) == 12739); /* CRC16/XMODEM check value 0x31c3 */
    CHECK(mph__redis_key_slot("foo", 3) == 12182);
    CHECK(mph__redis_key_slot("{user1000}.following", 20) == mph__redis_key_slot("user1000", 8));
    CHECK(mph__redis_key_slot("foo{bar}{zap}", 13) == mph__redis_key_slot("bar", 3));
    CHECK(mph__redis_key_slot("foo{{bar}}zap", 13) == mph__redis_key_slot("{bar", 4));
    CHECK(mph__redis_key_slot("{}x", 3) != mph__redis_key_slot("", 0)); /* empty tag: whole key */
    size_t at, len;
    CHECK(mph__redis_name_tag("n:account:{42}:savings", &at, &len) == 0 && at == 11 && len == 2);
    CHECK(mph__redis_name_tag("global", &at, &len) != 0);
    CHECK(mph__redis_name_tag("a{}b", &at, &len) != 0);
    CHECK(mph__redis_name_tag("a}{b", &at, &len) != 0);
    /* A name's own tag decides the slot of its keys; other names get their own. */
    char *k = scope_key("mp:", "n:account:{42}:savings", "v");
    CHECK(strcmp(k, "mp:n:account:{42}:savings/v") == 0);
    free(k);
    k = scope_key("mp:", "global", "d");
    CHECK(strcmp(k, "mp:{global}:d") == 0);
    free(k);
    CHECK(mph__redis_scope_slot("mp:", "n:a{42}x") == mph__redis_key_slot("42", 2));
    CHECK(mph__redis_scope_slot("mp:", "n:a{42}x") == mph__redis_scope_slot("mp:", "n:b{42}"));
    CHECK(mph__redis_scope_slot("mp:", "global") == mph__redis_key_slot("global", 6));
    /* The collision the two forms could have ("{a}" tagged vs "a}{a" untagged) does not. */
    char *t = scope_key("mp:", "{a}", "v"), *u = scope_key("mp:", "a}{a", "v");
    CHECK(strcmp(t, u) != 0);
    free(t);
    free(u);
}

static const mph_unit_test_t tests[] = {
    {"slots_and_scope_keys", test_slots_and_scope_keys},
    {"load_replies", test_load_replies},
    {"load_wrong_shapes", test_load_wrong_shapes},
    {"commit_ok", test_commit_ok},
    {"commit_conflict_with_delta", test_commit_conflict_with_delta},
    {"commit_conflict_with_whole_doc", test_commit_conflict_with_whole_doc},
    {"commit_held_claim", test_commit_held_claim},
    {"commit_conflict_wrong_shapes", test_commit_conflict_wrong_shapes},
    {"error_replies_and_noscript", test_error_replies_and_noscript},
    {"null_reply", test_null_reply},
    {"parse_u64", test_parse_u64},
    {"numeric_hosts_are_not_resolved", test_numeric_hosts_are_not_resolved},
    {"names_are_resolved_off_the_loop_on_every_attempt",
     test_names_are_resolved_off_the_loop_on_every_attempt},
    {"close_while_resolving", test_close_while_resolving},
    {"addresses_in_messages", test_addresses_in_messages},
};

MPH_UNIT_MAIN(tests)
