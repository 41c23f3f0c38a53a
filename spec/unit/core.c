/*
 * Unit tests of the pure C pieces: the intrusive list, the line buffer, the JSON <-> Lua
 * mapping and the UTF-8 check (the file
 * backend's name encoding and record format are in file.c). The .c files are included to reach
 * their statics (as h2o's t/00unit does). Output is TAP, one line per test.
 */
#define _GNU_SOURCE
#include "common/common.c"
#include "common/linebuf.c"
#include "common/list.h"
#include "lua/json.c"
#include "common/json.c"

#include <lualib.h>

#include "spec/unit/unit.h"

static lua_State *new_state(void)
{
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    mph_json_init(L);
    /* Make the array metatable reachable from Lua snippets as _ARRAY. */
    mph_json_push_array_mt(L);
    lua_setglobal(L, "_ARRAY");
    return L;
}

/* Evaluates a Lua expression and encodes it; returns the text or the error (static buffer). */
static const char *encode_expr(lua_State *L, const char *expr, int *ok)
{
    static char out[4096];
    char code[1024];
    snprintf(code, sizeof(code), "return %s", expr);
    if (luaL_dostring(L, code) != 0) {
        snprintf(out, sizeof(out), "lua error: %s", lua_tostring(L, -1));
        lua_settop(L, 0);
        *ok = 0;
        return out;
    }
    mph_buf_t b = MPH_BUF_INIT;
    char err[512];
    int top = lua_gettop(L);
    *ok = mph_json_encode(L, -1, NULL, &b, err, sizeof(err)) == 0;
    if (lua_gettop(L) != top) {
        fprintf(stderr, "  stack unbalanced after encoding %s\n", expr);
        failures_in_test++;
    }
    snprintf(out, sizeof(out), "%s", *ok ? b.data : err);
    mph_buf_free(&b);
    lua_settop(L, 0);
    return out;
}

static void expect_encode(lua_State *L, const char *expr, const char *expected)
{
    int ok;
    const char *got = encode_expr(L, expr, &ok);
    if (!ok || strcmp(got, expected) != 0) {
        fprintf(stderr, "  encode %s: expected %s, got %s\n", expr, expected, got);
        failures_in_test++;
    }
}

static void expect_encode_error(lua_State *L, const char *expr, const char *fragment)
{
    int ok;
    const char *got = encode_expr(L, expr, &ok);
    if (ok || strstr(got, fragment) == NULL) {
        fprintf(stderr, "  encode %s: expected an error with \"%s\", got %s\n", expr, fragment,
                got);
        failures_in_test++;
    }
}

static void test_encode_scalars(void)
{
    lua_State *L = new_state();
    expect_encode(L, "nil", "null");
    expect_encode(L, "true", "true");
    expect_encode(L, "0.1", "0.1");
    expect_encode(L, "1/3", "0.3333333333333333");
    expect_encode(L, "0.1 + 0.2", "0.30000000000000004");
    expect_encode(L, "2^53", "9007199254740992");
    expect_encode(L, "-2^62", "-4611686018427387904");
    expect_encode(L, "2^70", "1.1805916207174113e+21");
    expect_encode(L, "2.0", "2");
    expect_encode(L, "-0.0", "0");
    expect_encode(L, "'a\"b\\\\c\\n\\1\\0'", "\"a\\\"b\\\\c\\n\\u0001\\u0000\"");
    expect_encode(L, "'\\226\\130\\172'", "\"\xe2\x82\xac\"");
    lua_close(L);
}

static void test_encode_tables(void)
{
    lua_State *L = new_state();
    expect_encode(L, "{}", "{}");
    expect_encode(L, "setmetatable({}, _ARRAY)", "[]");
    expect_encode(L, "{1, 2, {3}}", "[1,2,[3]]");
    expect_encode(L, "{b = 1, a = 2, c = {z = true, y = false}}",
                  "{\"a\":2,\"b\":1,\"c\":{\"y\":false,\"z\":true}}");
    lua_close(L);
}

static void test_encode_errors_name_the_path(void)
{
    lua_State *L = new_state();
    expect_encode_error(L, "{a = {b = {print}}}", "cannot encode a function at $.a.b[1]");
    expect_encode_error(L, "{x = 0/0}", "NaN at $.x");
    expect_encode_error(L, "{1, 2, x = 3}", "mixed");
    expect_encode_error(L, "{[1] = 1, [3] = 3}", "mixed");
    expect_encode_error(L, "(function() local t = {} t.me = {t} return t end)()",
                        "cycle: a table contains itself at $.me[1]");
    expect_encode_error(L, "{s = '\\255'}", "not valid UTF-8 at $.s");
    expect_encode_error(L, "coroutine.create(print)", "cannot encode a thread");
    expect_encode_error(L,
                        "(function() local t = {} for i = 1, 3000 do t = {t} end return t end)()",
                        "nesting deeper");
    lua_close(L);
}

static void test_decode(void)
{
    lua_State *L = new_state();
    char err[256];
    const char *doc = "{\"a\":[1,2,[]],\"n\":null,\"big\":9007199254740992,\"s\":\"x\\u0000y\"}";
    CHECK(mph_json_push_text(L, doc, strlen(doc), err, sizeof(err)) == 0);
    CHECK(lua_gettop(L) == 1);
    lua_getfield(L, 1, "a");
    CHECK(lua_getmetatable(L, -1)); /* arrays remember their kind */
    lua_pop(L, 2);
    lua_getfield(L, 1, "n");
    CHECK(lua_islightuserdata(L, -1) && lua_touserdata(L, -1) == NULL);
    lua_pop(L, 1);
    lua_getfield(L, 1, "s");
    size_t len;
    lua_tolstring(L, -1, &len);
    CHECK(len == 3);
    lua_settop(L, 0);
    /* Round trip keeps kind and bytes. */
    mph_buf_t b = MPH_BUF_INIT;
    CHECK(mph_json_push_text(L, doc, strlen(doc), err, sizeof(err)) == 0);
    CHECK(mph_json_encode(L, 1, NULL, &b, err, sizeof(err)) == 0);
    CHECK(strcmp(b.data,
                 "{\"a\":[1,2,[]],\"big\":9007199254740992,\"n\":null,\"s\":\"x\\u0000y\"}") == 0);
    mph_buf_free(&b);
    lua_settop(L, 0);
    /* Integers a double cannot hold exactly are refused, not rounded. */
    CHECK(mph_json_push_text(L, "9007199254740993", 16, err, sizeof(err)) == MPH_JSON_ERANGE);
    CHECK(strstr(err, "exactly") != NULL);
    CHECK(mph_json_push_text(L, "1152921504606846976", 19, err, sizeof(err)) == 0); /* 2^60 */
    CHECK(lua_tonumber(L, -1) == 1152921504606846976.0);
    CHECK(mph_json_push_text(L, "[1,", 3, err, sizeof(err)) != 0);
    lua_settop(L, 0);
    lua_close(L);
}

static void test_utf8(void)
{
    CHECK(mph_utf8_valid("plain", 5));
    CHECK(mph_utf8_valid("\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 9));
    CHECK(!mph_utf8_valid("\xc0\xaf", 2));         /* overlong */
    CHECK(!mph_utf8_valid("\xed\xa0\x80", 3));     /* surrogate */
    CHECK(!mph_utf8_valid("\xf4\x90\x80\x80", 4)); /* above U+10FFFF */
    CHECK(!mph_utf8_valid("\xe2\x82", 2));         /* truncated */
    CHECK(!mph_utf8_valid("\x80", 1));
    CHECK(!mph_utf8_valid("\xe0\x80\xaf", 3)); /* overlong 3-byte */
}

/* An element of the list tests. */
typedef struct {
    int v;
    mph_list_t node;
} item_t;

/* Whether list holds exactly the values want[0..n-1] in order, both ways round. */
static int list_is(const mph_list_t *list, const int *want, int n)
{
    const mph_list_t *q;
    int i = 0;
    mph_list_foreach(q, list) {
        if (i >= n || mph_list_entry(q, item_t, node)->v != want[i])
            return 0;
        i++;
    }
    if (i != n)
        return 0;
    for (q = list->prev; q != list; q = q->prev)
        if (--i < 0 || mph_list_entry(q, item_t, node)->v != want[i])
            return 0;
    return i == 0;
}

static void test_list(void)
{
    mph_list_t list = MPH_LIST_INIT(list), other;
    mph_list_init(&other);
    item_t it[5]; /* zeroed nodes: unlinked */
    memset(it, 0, sizeof(it));
    for (int i = 0; i < 5; i++)
        it[i].v = i;
    CHECK(mph_list_empty(&list) && mph_list_first(&list) == NULL && mph_list_pop(&list) == NULL);
    CHECK(!mph_list_is_linked(&it[0].node));
    mph_list_insert_tail(&list, &it[1].node);
    mph_list_insert_tail(&list, &it[2].node);
    mph_list_insert_head(&list, &it[0].node);
    CHECK(list_is(&list, (int[]){0, 1, 2}, 3) && mph_list_is_linked(&it[1].node));
    CHECK(mph_list_first(&list) == &it[0].node && mph_list_last(&list) == &it[2].node);
    CHECK(mph_list_next(&list, &it[0].node) == &it[1].node);
    CHECK(mph_list_next(&list, &it[2].node) == NULL);
    mph_list_remove(&it[1].node); /* the middle */
    CHECK(list_is(&list, (int[]){0, 2}, 2) && !mph_list_is_linked(&it[1].node));
    mph_list_insert_after(&it[0].node, &it[1].node);
    CHECK(list_is(&list, (int[]){0, 1, 2}, 3));
    /* The safe walk may take out the node it stands on. */
    mph_list_t *q, *tmp;
    mph_list_foreach_safe(q, tmp, &list) {
        if (mph_list_entry(q, item_t, node)->v != 1)
            mph_list_remove(q);
    }
    CHECK(list_is(&list, (int[]){1}, 1));
    /* Moving appends in order and empties the source. */
    mph_list_insert_tail(&other, &it[3].node);
    mph_list_insert_tail(&other, &it[4].node);
    mph_list_move(&list, &other);
    CHECK(mph_list_empty(&other) && list_is(&list, (int[]){1, 3, 4}, 3));
    mph_list_move(&other, &list); /* into an empty one */
    CHECK(mph_list_empty(&list) && list_is(&other, (int[]){1, 3, 4}, 3));
    mph_list_move(&other, &list); /* from an empty one: nothing */
    CHECK(list_is(&other, (int[]){1, 3, 4}, 3));
    CHECK(mph_list_pop(&other) == &it[1].node && !mph_list_is_linked(&it[1].node));
    CHECK(mph_list_pop(&other) == &it[3].node && mph_list_pop(&other) == &it[4].node);
    CHECK(mph_list_pop(&other) == NULL && mph_list_empty(&other));
}

/* Feeds text into lb as a read of at most its room would; returns the bytes that fit. */
static size_t linebuf_feed(mph_linebuf_t *lb, const char *text)
{
    size_t room, n = strlen(text);
    char *at = mph_linebuf_room(lb, &room);
    n = n < room ? n : room;
    memcpy(at, text, n);
    mph_linebuf_added(lb, n);
    return n;
}

static void test_linebuf(void)
{
    char data[8]; /* 7 bytes of lines at most */
    mph_linebuf_t lb;
    mph_linebuf_init(&lb, data, sizeof(data));
    CHECK(mph_linebuf_take(&lb) == NULL && !mph_linebuf_full(&lb));
    /* Lines split over reads, and several in one read. */
    CHECK(linebuf_feed(&lb, "ab") == 2 && mph_linebuf_take(&lb) == NULL);
    CHECK(linebuf_feed(&lb, "\nc\nd") == 4);
    const char *line = mph_linebuf_take(&lb);
    CHECK(line != NULL && strcmp(line, "ab") == 0);
    line = mph_linebuf_take(&lb);
    CHECK(line != NULL && strcmp(line, "c") == 0);
    CHECK(mph_linebuf_take(&lb) == NULL && lb.len == 1); /* "d" waits for its newline */
    CHECK(linebuf_feed(&lb, "\n") == 1);
    line = mph_linebuf_take(&lb);
    CHECK(line != NULL && strcmp(line, "d") == 0);
    /* An empty line is a line. */
    CHECK(linebuf_feed(&lb, "\n") == 1);
    line = mph_linebuf_take(&lb);
    CHECK(line != NULL && line[0] == '\0');
    /* Too long: the buffer fills without a newline, and there is no room left. */
    CHECK(linebuf_feed(&lb, "0123456789") == 7 && mph_linebuf_take(&lb) == NULL);
    size_t room;
    CHECK(mph_linebuf_full(&lb) && mph_linebuf_room(&lb, &room) != NULL && room == 0);
    /* Exactly full with a newline last: a whole line of size - 2 bytes. */
    mph_linebuf_init(&lb, data, sizeof(data));
    CHECK(linebuf_feed(&lb, "012345\n") == 7 && mph_linebuf_full(&lb));
    line = mph_linebuf_take(&lb);
    CHECK(line != NULL && strcmp(line, "012345") == 0 && !mph_linebuf_full(&lb));
    CHECK(mph_linebuf_room(&lb, &room) == data && room == 7);
    /* A NUL byte hides what follows it: that line never completes. */
    mph_linebuf_init(&lb, data, sizeof(data));
    size_t room2;
    char *at = mph_linebuf_room(&lb, &room2);
    memcpy(at, "a\0b\n", 4);
    mph_linebuf_added(&lb, 4);
    CHECK(mph_linebuf_take(&lb) == NULL);
}

static const mph_unit_test_t tests[] = {
    {"list", test_list},
    {"linebuf", test_linebuf},
    {"encode_scalars", test_encode_scalars},
    {"encode_tables", test_encode_tables},
    {"encode_errors_name_the_path", test_encode_errors_name_the_path},
    {"decode", test_decode},
    {"utf8", test_utf8},
};

MPH_UNIT_MAIN(tests)
