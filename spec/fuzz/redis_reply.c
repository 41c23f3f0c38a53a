/*
 * fuzz target redis_reply: arbitrary bytes through hiredis's redisReader, each reply it
 * yields handed to the Redis backend's read_reply() (storage/redis.c, included to reach it;
 * the target therefore does not pull redis.o out of libmphost).
 *
 * Input: byte 0 picks the operation (even: a commit, odd: a load), byte 1 the commit's
 * expected version (0..255, so that replies in the corpus can match it), the rest is RESP.
 * Properties, checked here independently of read_reply's own code (abort() on a violation):
 *  - the status is 0, MPH_ECONFLICT or MPH_ESTORAGE; an error has a message and no entries;
 *  - a commit succeeds only on exactly {1, "expected + 1"};
 *  - a load succeeds only on {decimal string, flat array of strings}, one entry per pair;
 *  - a conflict comes only from {0, version, 0|1, array, 0|1}, its version is the reply's,
 *    and a delta spans exactly the versions after the expected one;
 *  - every entry points inside the reply (ASan checks the bytes are read in bounds).
 */
#define MPH_REDIS_TESTS /* read_reply */
#include "common/common.c"
#include "storage/redis.c"

#define REQUIRE(cond)                                                                              \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "redis_reply: %s violated\n", #cond);                                  \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static int is_int(const redisReply *r, long long v)
{
    return r && r->type == REDIS_REPLY_INTEGER && r->integer == v;
}

/* The reply's string `r` holds the decimal text of v exactly. */
static int is_decimal(const redisReply *r, uint64_t v)
{
    char text[24];
    int n = snprintf(text, sizeof(text), "%llu", (unsigned long long)v);
    return r && r->type == REDIS_REPLY_STRING && r->len == (size_t)n &&
           memcmp(r->str, text, n) == 0;
}

static size_t touch(const char *p, size_t len)
{
    size_t sum = 0;
    for (size_t i = 0; i < len; i++)
        sum += (unsigned char)p[i];
    return sum;
}

static void check(op_kind_t kind, uint64_t expected, const redisReply *r)
{
    reply_t out;
    int rc = read_reply(kind, expected, "s", r, &out);
    const mph_store_result_t *res = &out.res;
    REQUIRE(rc == res->status);
    REQUIRE(rc == 0 || rc == MPH_ECONFLICT || rc == MPH_ESTORAGE);
    REQUIRE(res->scope != NULL && strcmp(res->scope, "s") == 0);
    volatile size_t sum = 0;
    for (size_t i = 0; i < res->doc.n; i++) {
        sum += touch(res->doc.entries[i].key, res->doc.entries[i].klen);
        if (res->doc.entries[i].json)
            sum += touch(res->doc.entries[i].json, res->doc.entries[i].jlen);
        else
            REQUIRE(res->doc.is_delta); /* only a change-log record deletes */
    }
    (void)sum;
    if (rc == MPH_ESTORAGE) {
        REQUIRE(res->message != NULL && res->message[0] != '\0');
        REQUIRE(res->doc.n == 0 && res->doc.entries == NULL && !res->held);
    } else if (kind == OP_COMMIT && rc == 0) {
        REQUIRE(r->type == REDIS_REPLY_ARRAY && r->elements == 2 && is_int(r->element[0], 1));
        REQUIRE(expected < UINT64_MAX && is_decimal(r->element[1], expected + 1));
        REQUIRE(res->doc.version == expected + 1 && res->doc.n == 0);
    } else if (kind == OP_LOAD) {
        REQUIRE(rc == 0);
        REQUIRE(r->type == REDIS_REPLY_ARRAY && r->elements == 2);
        REQUIRE(is_decimal(r->element[0], res->doc.version));
        const redisReply *h = r->element[1];
        REQUIRE(h->type == REDIS_REPLY_ARRAY && h->elements == 2 * res->doc.n);
        for (size_t i = 0; i < res->doc.n; i++)
            REQUIRE(res->doc.entries[i].key == h->element[2 * i]->str &&
                    res->doc.entries[i].json == h->element[2 * i + 1]->str);
    } else {
        REQUIRE(kind == OP_COMMIT && rc == MPH_ECONFLICT);
        REQUIRE(r->type == REDIS_REPLY_ARRAY && r->elements == 5 && is_int(r->element[0], 0));
        REQUIRE(is_decimal(r->element[1], res->doc.version));
        REQUIRE(is_int(r->element[2], res->doc.is_delta) && is_int(r->element[4], res->held));
        const redisReply *list = r->element[3];
        REQUIRE(list->type == REDIS_REPLY_ARRAY);
        if (res->doc.is_delta) {
            REQUIRE(res->doc.version >= expected && list->elements == res->doc.version - expected);
            REQUIRE(list->elements > 0 || res->held);
        } else {
            REQUIRE(list->elements == 2 * res->doc.n);
        }
    }
    free(out.res.doc.entries);
}

/* hiredis 0.14's reader allocates an array's element vector as soon as it reads "*N": a
 * large N is an allocation the size of N pointers (an out-of-memory report, not our bug).
 * Inputs declaring an array of a million elements or more are skipped. */
static int huge_array(const uint8_t *data, size_t size)
{
    for (size_t i = 0; i < size; i++) {
        size_t digits = 0;
        while (data[i] == '*' && i + 1 + digits < size && data[i + 1 + digits] >= '0' &&
               data[i + 1 + digits] <= '9')
            digits++;
        if (digits >= 7)
            return 1;
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2 || huge_array(data, size))
        return 0;
    op_kind_t kind = data[0] & 1 ? OP_LOAD : OP_COMMIT;
    uint64_t expected = data[1];
    redisReader *rd = redisReaderCreate();
    REQUIRE(rd != NULL);
    redisReaderFeed(rd, (const char *)data + 2, size - 2);
    for (;;) {
        void *reply = NULL;
        if (redisReaderGetReply(rd, &reply) != REDIS_OK || reply == NULL)
            break;
        check(kind, expected, reply);
        freeReplyObject(reply);
    }
    redisReaderFree(rd);
    check(kind, expected, NULL); /* the connection died: a clean error too */
    return 0;
}
