/*
 * Unit tests of host/auth.c: SipHash against the reference vectors, strict base64 and the
 * Authorization header's parsing (every malformed shape is refused), the hash formats taken,
 * the users file (comments, a plain-text line refused with its file and line and without its
 * content, duplicates), checks on a real loop and thread pool (right, wrong, unknown, the
 * cache, identical checks sharing one hash, a re-read that removes a user while its check
 * runs, a close with checks waiting), and what `mphost passwd` uses.
 */
#define _GNU_SOURCE
#include "common/common.c"
#include "host/server/auth.c"

#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "spec/unit/unit.h"

static void test_siphash_reference_vectors(void)
{
    /* From the SipHash paper's appendix: key 00..0f, messages 00.. of length 0 and 15. */
    uint8_t key[16], msg[15];
    for (int i = 0; i < 16; i++)
        key[i] = (uint8_t)i;
    for (int i = 0; i < 15; i++)
        msg[i] = (uint8_t)i;
    CHECK(siphash24(key, msg, 0) == 0x726fdb47dd0e0e31ULL);
    CHECK(siphash24(key, msg, 15) == 0xa129ca6149be45e5ULL);
    CHECK(siphash24(key, msg, 8) == 0x93f5f5799a932462ULL);
}

static int decodes(const char *in, const char *want)
{
    unsigned char out[64];
    long n = base64_decode(in, strlen(in), out);
    if (want == NULL)
        return n == -1;
    return n == (long)strlen(want) && memcmp(out, want, (size_t)n) == 0;
}

static void test_base64_is_strict(void)
{
    CHECK(decodes("YWxpY2U6c2VjcmV0", "alice:secret"));
    CHECK(decodes("YTpi", "a:b"));
    CHECK(decodes("YTo=", "a:"));
    CHECK(decodes("YQ==", "a"));
    CHECK(decodes("", NULL));
    CHECK(decodes("YTo", NULL));      /* not padded */
    CHECK(decodes("YQ=", NULL));      /* short padding */
    CHECK(decodes("Y===", NULL));     /* too much padding */
    CHECK(decodes("YR==", NULL));     /* unused bits set: not the one encoding of "a" */
    CHECK(decodes("YTp=", NULL));     /* idem for "a:" */
    CHECK(decodes("YQ==YQ==", NULL)); /* padding inside */
    CHECK(decodes("YT-i", NULL));     /* URL-safe alphabet */
    CHECK(decodes("YT i", NULL));     /* a space inside */
    CHECK(decodes("YTpi\n", NULL));   /* a line end */
}

/* "Basic " and the base64 of plain (a static buffer). */
static const char *basic_header(const char *plain)
{
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    static char value[3000];
    size_t n = strlen(plain), o = (size_t)sprintf(value, "Basic ");
    for (size_t i = 0; i < n; i += 3) {
        uint32_t w = (uint32_t)(unsigned char)plain[i] << 16;
        if (i + 1 < n)
            w |= (uint32_t)(unsigned char)plain[i + 1] << 8;
        if (i + 2 < n)
            w |= (unsigned char)plain[i + 2];
        value[o++] = alphabet[w >> 18 & 63];
        value[o++] = alphabet[w >> 12 & 63];
        value[o++] = i + 1 < n ? alphabet[w >> 6 & 63] : '=';
        value[o++] = i + 2 < n ? alphabet[w & 63] : '=';
    }
    value[o] = '\0';
    return value;
}

/* parse_basic on a header value; returns the user (static) or NULL, and the password. */
static const char *basic(const char *value, const char **password)
{
    static char buf[DECODE_ROOM];
    size_t colon;
    if (parse_basic(value, strlen(value), buf, &colon) != 0)
        return NULL;
    buf[colon] = '\0';
    *password = buf + colon + 1;
    return buf;
}

static void test_authorization_header_shapes(void)
{
    const char *pw;
    const char *u = basic("Basic YWxpY2U6c2VjcmV0", &pw);
    CHECK(u && strcmp(u, "alice") == 0 && strcmp(pw, "secret") == 0);
    u = basic("bAsIc   YWxpY2U6c2VjcmV0  ", &pw); /* any case, spaces around the token */
    CHECK(u && strcmp(u, "alice") == 0 && strcmp(pw, "secret") == 0);
    u = basic("Basic YTo6Yjpj", &pw); /* "a::b:c": the password may hold colons */
    CHECK(u && strcmp(u, "a") == 0 && strcmp(pw, ":b:c") == 0);
    u = basic("Basic YTo=", &pw); /* "a:": an empty password is a password */
    CHECK(u && strcmp(u, "a") == 0 && strcmp(pw, "") == 0);
    CHECK(basic("Basic", &pw) == NULL);
    CHECK(basic("Basic ", &pw) == NULL);
    CHECK(basic("BasicYWxpY2U6c2VjcmV0", &pw) == NULL);   /* no space */
    CHECK(basic("Bearer YWxpY2U6c2VjcmV0", &pw) == NULL); /* another scheme */
    CHECK(basic("Digest username=\"alice\"", &pw) == NULL);
    CHECK(basic("Basic YWxpY2U=", &pw) == NULL);     /* "alice": no colon */
    CHECK(basic("Basic OnNlY3JldA==", &pw) == NULL); /* ":secret": an empty user */
    CHECK(basic("Basic YQBiOmM=", &pw) == NULL);     /* "a\0b:c": a NUL */
    CHECK(basic("Basic YWxpY2U6c2VjcmV0!", &pw) == NULL);
    CHECK(basic("Basic YWxpY2U6c2VjcmV0 x", &pw) == NULL); /* two tokens */
    /* Limits: a 255-byte user and a 1024-byte password pass; one byte more does not. */
    char plain[2000];
    for (int user_len = 255; user_len <= 256; user_len++) {
        for (int pw_len = 1024; pw_len <= 1025; pw_len++) {
            memset(plain, 'u', (size_t)user_len);
            plain[user_len] = ':';
            memset(plain + user_len + 1, 'p', (size_t)pw_len);
            plain[user_len + 1 + pw_len] = '\0';
            int ok = user_len <= 255 && pw_len <= 1024;
            CHECK((basic(basic_header(plain), &pw) != NULL) == ok);
        }
    }
}

static char *make_hash(const char *prefix, unsigned long cost, const char *password)
{
    char setting[CRYPT_GENSALT_OUTPUT_SIZE];
    struct crypt_data data;
    memset(&data, 0, sizeof(data));
    if (crypt_gensalt_rn(prefix, cost, NULL, 0, setting, sizeof(setting)) == NULL)
        return NULL;
    const char *h = crypt_rn(password, setting, &data, sizeof(data));
    return h ? mph_xstrdup(h) : NULL;
}

static void test_hash_formats(void)
{
    const char *prefixes[] = {"$2b$", "$2y$", "$6$", "$y$"};
    for (int i = 0; i < 4; i++) {
        char *h = make_hash(prefixes[i], i < 2 ? 4 : 0, "pw");
        CHECK(h != NULL && hash_format_ok(h));
        if (h) { /* cut short or lengthened, it is no longer a hash */
            size_t n = strlen(h);
            h[n - 1] = '\0';
            CHECK(!hash_format_ok(h));
        }
        free(h);
    }
    char *h = make_hash("$6$", 10000, "pw"); /* with rounds=10000$ */
    CHECK(h != NULL && strstr(h, "rounds=") != NULL && hash_format_ok(h));
    free(h);
    const char *bad[] = {"secret",
                         "",
                         "$6$",
                         "$y$",
                         "$2b$",
                         "$1$abc$abcdefghijklmnopqrstuv",
                         "$5$salt$Vo6QjT5lRGyhPcXV1RUHQmgLV2y6cfUx5tG8rN26pR2",
                         "{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=",
                         "$apr1$salt$hash"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        CHECK(!hash_format_ok(bad[i]));
    CHECK(same_hash("abc", "abc") && !same_hash("abc", "abd") && !same_hash("abc", "abcd"));
}

/* Writes text to a new temp file; returns its path (static). */
static const char *write_file(const char *text)
{
    static char path[64];
    snprintf(path, sizeof(path), "/tmp/mph-unit-auth-XXXXXX");
    int fd = mkstemp(path);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
        abort();
    close(fd);
    return path;
}

static void test_users_file(void)
{
    char *bob = make_hash("$2b$", 4, "b"), *alice = make_hash("$6$", 0, "a");
    char text[2000], err[512], warn[MESSAGE];
    snprintf(text, sizeof(text), "# users\n\n   \nbob:%s\n  # indented comment\nalice:%s\r\n", bob,
             alice);
    const char *path = write_file(text);
    users_t u;
    CHECK(users_read(path, &u, err, sizeof(err), warn) == 0);
    CHECK(u.n == 2 && strcmp(u.v[0].name, "alice") == 0 && strcmp(u.v[1].name, "bob") == 0);
    CHECK(u.v[0].line == 6 && u.v[1].line == 4);
    CHECK(u.dummy != NULL && strcmp(u.dummy, bob) == 0); /* the file's first entry */
    CHECK(users_find(&u, "alice") == &u.v[0] && users_find(&u, "carol") == NULL);
    users_free(&u);
    unlink(path);

    /* A plain-text password: refused, naming the file and line, not the password. */
    snprintf(text, sizeof(text), "bob:%s\ncarol:hunter2\n", bob);
    path = write_file(text);
    CHECK(users_read(path, &u, err, sizeof(err), warn) == MPH_EINVAL);
    CHECK(strstr(err, path) != NULL && strstr(err, "line 2:") != NULL);
    CHECK(strstr(err, "hunter2") == NULL && strstr(err, "plain-text") != NULL);
    CHECK(u.n == 0 && u.v == NULL);
    unlink(path);

    snprintf(text, sizeof(text), "bob:%s\njust a line\n", bob);
    path = write_file(text);
    CHECK(users_read(path, &u, err, sizeof(err), warn) == MPH_EINVAL);
    CHECK(strstr(err, "line 2: expected NAME:HASH") != NULL && strstr(err, "just") == NULL);
    unlink(path);

    snprintf(text, sizeof(text), "bob:%s\n:%s\n", bob, bob);
    path = write_file(text);
    CHECK(users_read(path, &u, err, sizeof(err), warn) == MPH_EINVAL && strstr(err, "line 2:"));
    unlink(path);

    snprintf(text, sizeof(text), "bob:%s\nalice:%s\nbob:%s\n", bob, alice, bob);
    path = write_file(text);
    CHECK(users_read(path, &u, err, sizeof(err), warn) == MPH_EINVAL);
    CHECK(strstr(err, "line 3: the same user as line 1") != NULL);
    unlink(path);

    path = write_file("# nobody yet\n");
    CHECK(users_read(path, &u, err, sizeof(err), warn) == 0 && u.n == 0 && u.dummy == NULL);
    unlink(path);
    CHECK(users_read(path, &u, err, sizeof(err), warn) == MPH_EIO && strstr(err, "cannot read"));
    free(bob);
    free(alice);
}

/* ---- Checks on a real loop ---- */

typedef struct {
    int calls;                /* callbacks run */
    char user[300];           /* the last one's user, "" for NULL */
    mph_auth_result_t result; /* the last one's result */
    mph_auth_wait_t *wait;    /* what mph_auth_check returned */
    uint64_t turn;            /* the answered job's place in the order of starts (0: none) */
} answer_t;

static void on_answer(void *ud, mph_auth_result_t result, const char *user)
{
    answer_t *a = ud;
    a->calls++;
    a->result = result;
    snprintf(a->user, sizeof(a->user), "%s", user ? user : "");
    /* Valid while the callback runs: the waiter and its job are freed after it. */
    a->turn = a->wait && a->wait->job->state == JOB_ANSWERING ? a->wait->job->turn : 0;
}

/* "Basic base64(user:password)" (static). */
static const char *header(const char *user, const char *password)
{
    char plain[400];
    snprintf(plain, sizeof(plain), "%s:%s", user, password);
    return basic_header(plain);
}

/* A check of user:password from source (NULL: none known). */
static void check_from(mph_auth_t *a, const struct sockaddr *source, const char *user,
                       const char *password, answer_t *ans)
{
    const char *v = header(user, password);
    int before = ans->calls;
    ans->wait = NULL;
    mph_auth_wait_t *w = mph_auth_check(a, source, v, strlen(v), on_answer, ans);
    if (ans->calls == before)
        ans->wait = w;
    else
        CHECK(w == NULL); /* answered before returning: no wait to cancel */
}

static void check(mph_auth_t *a, const char *user, const char *password, answer_t *ans)
{
    check_from(a, NULL, user, password, ans);
}

static void run_until(uv_loop_t *loop, const int *calls, int n)
{
    for (int i = 0; i < 100000 && *calls < n; i++)
        uv_run(loop, UV_RUN_ONCE);
}

static int closed_count;
static void on_closed(void *ud)
{
    (void)ud;
    closed_count++;
}

static void rewrite(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (f != NULL) {
        fputs(text, f);
        fclose(f);
    }
}

static void reload_and_wait(mph_auth_t *a, uv_loop_t *loop)
{
    mph_auth_reload(a);
    for (int i = 0; i < 100000 && a->reload; i++)
        uv_run(loop, UV_RUN_ONCE);
}

/* The users file at path (bob and alice, with these hashes) is re-read while checks run. */
static void rereads_under_checks(mph_auth_t *a, uv_loop_t *loop, const char *path, const char *bob,
                                 const char *alice)
{
    char text[2000];
    /* A re-read without bob: his cached pair is forgotten, and a check that was running
     * when the table changed is refused. A bad file keeps the table. */
    answer_t late = {.user = "x"};
    check(a, "bob", "b-pw", &late); /* cached: answered now */
    CHECK(late.calls == 1 && strcmp(late.user, "bob") == 0);
    snprintf(text, sizeof(text), "alice:%s\n", alice);
    rewrite(path, text);
    reload_and_wait(a, loop);
    CHECK(mph_auth_count(a) == 1);
    answer_t gone = {.user = "x"};
    check(a, "bob", "b-pw", &gone);
    run_until(loop, &gone.calls, 1);
    CHECK(gone.calls == 1 && gone.user[0] == '\0');
    snprintf(text, sizeof(text), "bob:%s\nalice:%s\n", bob, alice);
    rewrite(path, text);
    answer_t racing = {.user = "x"};
    check(a, "bob", "b-pw", &racing); /* bob is unknown: checked against alice's hash */
    /* bob is back while that runs (the re-read done here, by hand, so that it surely ends
     * first): the check runs again against his hash. */
    reload_t *r = mph_xcalloc(1, sizeof(*r));
    r->auth = a;
    a->reload = r;
    reload_work(&r->work);
    reload_done(&r->work, 0);
    CHECK(mph_auth_count(a) == 2);
    run_until(loop, &racing.calls, 1);
    CHECK(racing.calls == 1 && strcmp(racing.user, "bob") == 0);
    rewrite(path, "bob:plain\n");
    reload_and_wait(a, loop);
    CHECK(mph_auth_count(a) == 2);
}

/* Closing a with checks queued and running: each answered NULL once, then closed. */
static void close_with_checks_queued(mph_auth_t *a, uv_loop_t *loop)
{
    answer_t q[5];
    for (int i = 0; i < 5; i++) {
        q[i] = (answer_t){.user = "x"};
        char pw[16];
        snprintf(pw, sizeof(pw), "guess%d", i);
        check(a, "alice", pw, &q[i]);
    }
    closed_count = 0;
    mph_auth_close(a, on_closed, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    CHECK(closed_count == 1);
    for (int i = 0; i < 5; i++)
        CHECK(q[i].calls == 1 && q[i].user[0] == '\0');
}

static void test_checks_on_the_pool(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    char *bob = make_hash("$2b$", 4, "b-pw"), *alice = make_hash("$y$", 0, "a-pw");
    char text[2000], err[512];
    snprintf(text, sizeof(text), "bob:%s\nalice:%s\n", bob, alice);
    const char *path = write_file(text);
    char saved[64];
    snprintf(saved, sizeof(saved), "%s", path);
    mph_auth_t *a;
    CHECK(mph_auth_new(&a, &loop, saved, 0, err, sizeof(err)) == 0 && mph_auth_count(a) == 2);
    /* The cache is direct-mapped under a random key: with this one, bob's and alice's pairs
     * could share an entry (1 run in 1024) and alice's would evict bob's below. A key that
     * keeps them apart makes the test say the same thing every run. */
    while ((siphash24(a->key, "bob:b-pw", 8) ^ siphash24(a->key, "alice:a-pw", 10)) %
               CACHE_ENTRIES ==
           0)
        a->key[0]++;

    /* Right, wrong, unknown: the first answers with the user, later; the others NULL. */
    answer_t right = {.user = ""}, wrong = {.user = "x"}, unknown = {.user = "x"},
             none = {.user = "x"};
    check(a, "bob", "b-pw", &right);
    CHECK(right.calls == 0); /* a hash: not before returning */
    check(a, "bob", "a-pw", &wrong);
    check(a, "carol", "b-pw", &unknown);
    CHECK(mph_auth_check(a, NULL, NULL, 0, on_answer, &none) == NULL);
    CHECK(none.calls == 1 && none.user[0] == '\0' && none.result == MPH_AUTH_REFUSED);
    run_until(&loop, &unknown.calls, 1);
    run_until(&loop, &right.calls, 1);
    run_until(&loop, &wrong.calls, 1);
    CHECK(right.calls == 1 && strcmp(right.user, "bob") == 0);
    CHECK(wrong.calls == 1 && wrong.user[0] == '\0');
    CHECK(unknown.calls == 1 && unknown.user[0] == '\0');

    /* Verified once: answered from the cache, before returning. */
    answer_t again = {.user = ""};
    check(a, "bob", "b-pw", &again);
    CHECK(again.calls == 1 && strcmp(again.user, "bob") == 0);

    /* Identical checks share one job; a different password gets its own. */
    answer_t s1 = {.user = ""}, s2 = {.user = ""}, s3 = {.user = "x"};
    check(a, "alice", "a-pw", &s1);
    check(a, "alice", "a-pw", &s2);
    check(a, "alice", "a-pX", &s3);
    CHECK(a->nchecks == 2);
    run_until(&loop, &s3.calls, 1);
    run_until(&loop, &s2.calls, 1);
    CHECK(s1.calls == 1 && s2.calls == 1 && strcmp(s1.user, "alice") == 0 &&
          strcmp(s2.user, "alice") == 0 && s3.user[0] == '\0');

    rereads_under_checks(a, &loop, saved, bob, alice);
    close_with_checks_queued(a, &loop);
    CHECK(uv_loop_close(&loop) == 0);
    unlink(saved);
    free(bob);
    free(alice);
}

static void test_no_users_refuses_at_once(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    mph_auth_t *a;
    char err[256];
    CHECK(mph_auth_new(&a, &loop, NULL, 0, err, sizeof(err)) == 0 && mph_auth_count(a) == 0);
    answer_t ans = {.user = "x"};
    check(a, "bob", "b-pw", &ans);
    CHECK(ans.calls == 1 && ans.user[0] == '\0');
    mph_auth_reload(a); /* no file: nothing to do */
    closed_count = 0;
    mph_auth_close(a, on_closed, NULL);
    CHECK(closed_count == 1);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&loop) == 0);
}

/* ---- The queue: bounds, turns, deadline, cancellation ---- */

static struct sockaddr_in ipv4(const char *dotted)
{
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    inet_pton(AF_INET, dotted, &sa.sin_addr);
    return sa;
}

static struct sockaddr_in6 ipv6(const char *text)
{
    struct sockaddr_in6 sa;
    memset(&sa, 0, sizeof(sa));
    sa.sin6_family = AF_INET6;
    inet_pton(AF_INET6, text, &sa.sin6_addr);
    return sa;
}

static void test_source_keys(void)
{
    uint8_t k1[16], k2[16], zero[16] = {0};
    struct sockaddr_in a = ipv4("192.0.2.1"), b = ipv4("192.0.2.2");
    struct sockaddr_in6 m = ipv6("::ffff:192.0.2.1"), x = ipv6("2001:db8:1:2::1"),
                        y = ipv6("2001:db8:1:2:ffff::9"), z = ipv6("2001:db8:1:3::1");
    source_key((struct sockaddr *)&a, k1);
    source_key((struct sockaddr *)&b, k2);
    CHECK(memcmp(k1, k2, 16) != 0); /* each IPv4 address its own */
    source_key((struct sockaddr *)&m, k2);
    CHECK(memcmp(k1, k2, 16) == 0); /* the same client over a dual-stack socket */
    source_key((struct sockaddr *)&x, k1);
    source_key((struct sockaddr *)&y, k2);
    CHECK(memcmp(k1, k2, 16) == 0); /* one /64: one source */
    source_key((struct sockaddr *)&z, k2);
    CHECK(memcmp(k1, k2, 16) != 0);
    struct sockaddr un = {.sa_family = AF_UNIX};
    source_key(&un, k1);
    source_key(NULL, k2);
    CHECK(memcmp(k1, zero, 16) == 0 && memcmp(k2, zero, 16) == 0);
}

/* A users file with alice (bcrypt at cost), and an authenticator on loop reading it. */
static mph_auth_t *queue_fixture(uv_loop_t *loop, int cost, char *path, size_t pathlen)
{
    char *alice = make_hash("$2b$", (unsigned long)cost, "a-pw"), text[200], err[512];
    snprintf(text, sizeof(text), "alice:%s\n", alice);
    snprintf(path, pathlen, "%s", write_file(text));
    free(alice);
    uv_loop_init(loop);
    mph_auth_t *a = NULL;
    CHECK(mph_auth_new(&a, loop, path, 0, err, sizeof(err)) == 0);
    return a;
}

static void close_fixture(mph_auth_t *a, uv_loop_t *loop, const char *path)
{
    closed_count = 0;
    mph_auth_close(a, on_closed, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    CHECK(closed_count == 1);
    CHECK(uv_loop_close(loop) == 0);
    unlink(path);
}

static void test_bounds_in_all_and_per_source(void)
{
    uv_loop_t loop;
    char path[64], pw[32];
    mph_auth_t *a = queue_fixture(&loop, 4, path, sizeof(path));
    a->max_checks = 6;
    a->max_per_source = 3;
    struct sockaddr_in x = ipv4("10.0.0.1"), y = ipv4("10.0.0.2"), z = ipv4("10.0.0.3");
    answer_t ax[4], ay[3], az[2];
    memset(ax, 0, sizeof(ax)), memset(ay, 0, sizeof(ay)), memset(az, 0, sizeof(az));
    /* x: three checks in progress, the fourth refused at once, BUSY (not REFUSED). */
    for (int i = 0; i < 4; i++) {
        snprintf(pw, sizeof(pw), "x%d", i);
        check_from(a, (struct sockaddr *)&x, "alice", pw, &ax[i]);
    }
    CHECK(ax[0].calls == 0 && ax[1].calls == 0 && ax[2].calls == 0);
    CHECK(ax[3].calls == 1 && ax[3].result == MPH_AUTH_BUSY && ax[3].user[0] == '\0');
    /* y: its own three places; then six in all: z is refused though it has none. */
    for (int i = 0; i < 3; i++) {
        snprintf(pw, sizeof(pw), "y%d", i);
        check_from(a, (struct sockaddr *)&y, "alice", pw, &ay[i]);
        CHECK(ay[i].calls == 0);
    }
    check_from(a, (struct sockaddr *)&z, "alice", "z0", &az[0]);
    CHECK(az[0].calls == 1 && az[0].result == MPH_AUTH_BUSY);
    CHECK(a->nchecks == 6 && a->stats.busy == 2);
    /* The same pair as a check in progress takes no place: it waits for that one. */
    check_from(a, (struct sockaddr *)&z, "alice", "x1", &az[1]);
    CHECK(az[1].calls == 0 && a->nchecks == 6);
    /* A name no file can hold is refused at once, without a place or a hash. */
    answer_t odd = {0};
    check_from(a, (struct sockaddr *)&z, "al\x1b[2Jice", "pw", &odd);
    CHECK(odd.calls == 1 && odd.result == MPH_AUTH_REFUSED && a->stats.busy == 2);
    check_from(a, (struct sockaddr *)&z, "caf\xe9", "pw", &odd);
    CHECK(odd.calls == 2 && odd.result == MPH_AUTH_REFUSED);
    for (int i = 0; i < 3; i++) {
        run_until(&loop, &ax[i].calls, 1);
        run_until(&loop, &ay[i].calls, 1);
        CHECK(ax[i].result == MPH_AUTH_REFUSED && ay[i].result == MPH_AUTH_REFUSED);
    }
    run_until(&loop, &az[1].calls, 1);
    CHECK(az[1].calls == 1 && az[1].result == MPH_AUTH_REFUSED);
    CHECK(a->nchecks == 0 && a->nqueued == 0 && mph_list_empty(&a->sources) &&
          a->stats.hashed == 6);
    /* Room again: the one refused is welcome now. */
    check_from(a, (struct sockaddr *)&x, "alice", "a-pw", &ax[3]);
    run_until(&loop, &ax[3].calls, 2);
    CHECK(ax[3].result == MPH_AUTH_VERIFIED && strcmp(ax[3].user, "alice") == 0);
    close_fixture(a, &loop, path);
}

static void test_sources_take_turns(void)
{
    uv_loop_t loop;
    char path[64], pw[32];
    mph_auth_t *a = queue_fixture(&loop, 4, path, sizeof(path));
    struct sockaddr_in x = ipv4("10.0.0.1"), y = ipv4("10.0.0.2");
    answer_t ax[6], ay;
    memset(ax, 0, sizeof(ax)), memset(&ay, 0, sizeof(ay));
    for (int i = 0; i < 6; i++) { /* two start at once, four wait */
        snprintf(pw, sizeof(pw), "x%d", i);
        check_from(a, (struct sockaddr *)&x, "alice", pw, &ax[i]);
    }
    check_from(a, (struct sockaddr *)&y, "alice", "y", &ay);
    CHECK(a->nrunning == MAX_RUNNING && a->nqueued == 5);
    for (int i = 0; i < 6; i++)
        run_until(&loop, &ax[i].calls, 1);
    run_until(&loop, &ay.calls, 1);
    /* y came after x's four were queued, and starts after one more of x's (x's turn came
     * first), not after all four: the order of starts is x0 x1 | x2 y x3 x4 x5. */
    CHECK(ax[0].turn < ax[2].turn && ax[1].turn < ax[2].turn);
    CHECK(ax[2].turn < ay.turn && ay.turn < ax[3].turn && ax[3].turn < ax[4].turn);
    CHECK(ay.calls == 1 && ay.result == MPH_AUTH_REFUSED);
    close_fixture(a, &loop, path);
}

static void test_a_queued_check_expires(void)
{
    uv_loop_t loop;
    char path[64];
    /* bcrypt at cost 10 (some 70 ms a hash) holds both places far longer than 1 ms. */
    mph_auth_t *a = queue_fixture(&loop, 10, path, sizeof(path));
    a->queue_ms = 1;
    answer_t held[2], late;
    memset(held, 0, sizeof(held)), memset(&late, 0, sizeof(late));
    check(a, "alice", "h0", &held[0]);
    check(a, "alice", "h1", &held[1]);
    check(a, "alice", "late", &late);
    CHECK(a->nrunning == 2 && a->nqueued == 1);
    run_until(&loop, &late.calls, 1);
    CHECK(late.calls == 1 && late.result == MPH_AUTH_EXPIRED && late.user[0] == '\0');
    CHECK(a->stats.expired == 1 && a->nqueued == 0 && a->stats.hashed == 2);
    run_until(&loop, &held[0].calls, 1);
    run_until(&loop, &held[1].calls, 1);
    CHECK(held[0].result == MPH_AUTH_REFUSED && held[1].result == MPH_AUTH_REFUSED);
    CHECK(a->stats.hashed == 2); /* the expired one never ran */
    close_fixture(a, &loop, path);
}

/* A callback that cancels another wait (its client closed too). */
static answer_t *cancel_from_callback;
static void on_answer_cancelling(void *ud, mph_auth_result_t result, const char *user)
{
    on_answer(ud, result, user);
    if (cancel_from_callback && cancel_from_callback->wait) {
        mph_auth_cancel(cancel_from_callback->wait);
        cancel_from_callback->wait = NULL;
    }
}

static void test_cancelled_checks_do_not_run(void)
{
    uv_loop_t loop;
    char path[64];
    mph_auth_t *a = queue_fixture(&loop, 8, path, sizeof(path));
    answer_t run[2], gone[3], shared[2];
    memset(run, 0, sizeof(run)), memset(gone, 0, sizeof(gone));
    memset(shared, 0, sizeof(shared));
    check(a, "alice", "r0", &run[0]);
    check(a, "alice", "r1", &run[1]);
    for (int i = 0; i < 3; i++) {
        char pw[16];
        snprintf(pw, sizeof(pw), "g%d", i);
        check(a, "alice", pw, &gone[i]);
    }
    check(a, "alice", "a-pw", &shared[0]);
    check(a, "alice", "a-pw", &shared[1]);
    CHECK(a->nrunning == 2 && a->nqueued == 4 && a->nchecks == 6);
    /* Queued, nobody else waiting: dropped at once, its place given back. */
    for (int i = 0; i < 3; i++)
        mph_auth_cancel(gone[i].wait);
    CHECK(a->stats.dropped == 3 && a->nqueued == 1 && a->nchecks == 3);
    /* One of two waiters of a job leaves: the job stays for the other. */
    mph_auth_cancel(shared[0].wait);
    CHECK(a->stats.dropped == 3 && a->nqueued == 1);
    /* Running: it ends, and answers nobody. */
    mph_auth_cancel(run[0].wait);
    run_until(&loop, &shared[1].calls, 1);
    run_until(&loop, &run[1].calls, 1);
    for (int i = 0; i < 100 && a->nrunning > 0; i++)
        uv_run(&loop, UV_RUN_ONCE);
    CHECK(shared[1].calls == 1 && shared[1].result == MPH_AUTH_VERIFIED);
    CHECK(shared[0].calls == 0 && run[0].calls == 0);
    for (int i = 0; i < 3; i++)
        CHECK(gone[i].calls == 0);
    CHECK(a->stats.hashed == 3 && a->nchecks == 0); /* r0, r1 and the shared one */

    /* A callback cancels a wait on the same job (another request of a closing client). */
    answer_t first = {0}, second = {0};
    const char *v = header("alice", "same");
    first.wait = mph_auth_check(a, NULL, v, strlen(v), on_answer_cancelling, &first);
    check(a, "alice", "same", &second);
    cancel_from_callback = &second;
    run_until(&loop, &first.calls, 1);
    cancel_from_callback = NULL;
    CHECK(first.calls == 1 && second.calls == 0);
    close_fixture(a, &loop, path);
}

/* A callback that closes the authenticator (the host stops in it). */
static mph_auth_t *close_in_callback;
static void on_answer_closing(void *ud, mph_auth_result_t result, const char *user)
{
    on_answer(ud, result, user);
    if (close_in_callback) {
        mph_auth_close(close_in_callback, on_closed, NULL);
        close_in_callback = NULL;
    }
}

static void test_close_answers_waits_and_may_come_from_a_callback(void)
{
    uv_loop_t loop;
    char path[64];
    mph_auth_t *a = queue_fixture(&loop, 8, path, sizeof(path));
    answer_t q[4], first = {0};
    memset(q, 0, sizeof(q));
    const char *v = header("alice", "first");
    first.wait = mph_auth_check(a, NULL, v, strlen(v), on_answer_closing, &first);
    for (int i = 0; i < 4; i++) {
        char pw[16];
        snprintf(pw, sizeof(pw), "q%d", i);
        check(a, "alice", pw, &q[i]);
    }
    closed_count = 0;
    close_in_callback = a;
    run_until(&loop, &first.calls, 1);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(closed_count == 1 && first.calls == 1);
    /* q[0] ran beside `first`: refused if it ended first, else not answered for the
     * password; the others were queued at the close. */
    CHECK(q[0].calls == 1 && (q[0].result == MPH_AUTH_EXPIRED || q[0].result == MPH_AUTH_REFUSED));
    for (int i = 1; i < 4; i++)
        CHECK(q[i].calls == 1 && q[i].result == MPH_AUTH_EXPIRED);
    CHECK(uv_loop_close(&loop) == 0);
    unlink(path);
}

/* ---- The users file's owner and mode ---- */

static int file_check(const char *path, char *err, char *warn)
{
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    if (fd < 0)
        return -100;
    int rc = mph_auth_file_check(fd, path, err, 512, warn, MESSAGE);
    close(fd);
    return rc;
}

static void test_users_file_owner_and_mode(void)
{
    char dir[] = "/tmp/mph-unit-authdir-XXXXXX", path[128], link[128], fifo[128], err[512],
         warn[MESSAGE];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(path, sizeof(path), "%s/users", dir);
    FILE *f = fopen(path, "w");
    fputs("# nobody\n", f);
    fclose(f);
    chmod(path, 0600);
    CHECK(file_check(path, err, warn) == 0 && warn[0] == '\0');
    chmod(path, 0640);
    CHECK(file_check(path, err, warn) == 0 && strstr(warn, "mode 640") && strstr(warn, path));
    chmod(path, 0604);
    CHECK(file_check(path, err, warn) == 0 && strstr(warn, "readable or writable"));
    chmod(path, 0620);
    CHECK(file_check(path, err, warn) == 0 && strstr(warn, "mode 620"));
    chmod(path, 0602);
    CHECK(file_check(path, err, warn) == MPH_EINVAL && strstr(err, "writable by others"));
    chmod(path, 0600);
    if (geteuid() == 0) { /* another owner: refused; root's: taken, whoever we are */
        CHECK(chown(path, 65534, 65534) == 0);
        CHECK(file_check(path, err, warn) == MPH_EINVAL && strstr(err, "belongs to uid 65534"));
        CHECK(chown(path, 0, 0) == 0);
        chmod(dir, 0711);
        chmod(path, 0644);
        CHECK(seteuid(65534) == 0);
        int fd = open(path, O_RDONLY);
        CHECK(fd >= 0 && mph_auth_file_check(fd, path, err, 512, warn, MESSAGE) == 0);
        close(fd);
        CHECK(seteuid(0) == 0);
        chmod(dir, 0700);
        chmod(path, 0600);
    }
    /* The directory: writable by others only with the sticky bit; through a link, both. */
    chmod(dir, 0777);
    CHECK(file_check(path, err, warn) == MPH_EINVAL && strstr(err, "is writable by others") &&
          strstr(err, dir));
    chmod(dir, 01777);
    CHECK(file_check(path, err, warn) == 0);
    chmod(dir, 0700);
    char dir2[] = "/tmp/mph-unit-authdir-XXXXXX";
    CHECK(mkdtemp(dir2) != NULL);
    snprintf(link, sizeof(link), "%s/users-link", dir2);
    CHECK(symlink(path, link) == 0);
    CHECK(file_check(link, err, warn) == 0);
    chmod(dir, 0757);
    CHECK(file_check(link, err, warn) == MPH_EINVAL && strstr(err, dir));
    chmod(dir, 0700);
    chmod(dir2, 0703);
    CHECK(file_check(link, err, warn) == MPH_EINVAL && strstr(err, dir2));
    CHECK(mph_auth_dir_check(dir2, err, sizeof(err)) == MPH_EINVAL);
    CHECK(mph_auth_dir_check(dir, err, sizeof(err)) == 0);
    chmod(dir2, 0700);
    /* Not a regular file: a FIFO does not block the open, and is refused. */
    snprintf(fifo, sizeof(fifo), "%s/fifo", dir);
    CHECK(mkfifo(fifo, 0600) == 0);
    users_t u;
    CHECK(users_read(fifo, &u, err, sizeof(err), warn) == MPH_EINVAL &&
          strstr(err, "not a regular file"));
    unlink(fifo);
    unlink(link);
    unlink(path);
    rmdir(dir2);
    rmdir(dir);
}

static void test_what_passwd_uses(void)
{
    char err[256], name[300];
    CHECK(mph_auth_check_name("alice", err, sizeof(err)) == 0);
    CHECK(mph_auth_check_name("Dr. Ålice #1", err, sizeof(err)) == 0);
    CHECK(mph_auth_check_name("", err, sizeof(err)) == MPH_EINVAL && strstr(err, "empty"));
    CHECK(mph_auth_check_name("a:b", err, sizeof(err)) == MPH_EINVAL && strstr(err, "':'"));
    CHECK(mph_auth_check_name("a\nb", err, sizeof(err)) == MPH_EINVAL);
    CHECK(mph_auth_check_name("#a", err, sizeof(err)) == MPH_EINVAL);
    CHECK(mph_auth_check_name("  ", err, sizeof(err)) == MPH_EINVAL);
    CHECK(mph_auth_check_name(" #a", err, sizeof(err)) == MPH_EINVAL);
    /* UTF-8 only, and no control character: the reason given, the name never quoted. */
    static const struct {
        const char *name, *why;
    } bad[] = {{"caf\xe9", "not valid UTF-8"},
               {"\xc0\xaf", "not valid UTF-8"},
               {"\xe0\x80\xaf", "not valid UTF-8"},
               {"\xed\xa0\x80", "not valid UTF-8"},
               {"\xf4\x90\x80\x80", "not valid UTF-8"},
               {"\xe2\x82", "not valid UTF-8"},
               {"\x80", "not valid UTF-8"},
               {"a\x1b[2Jb", "control character"},
               {"a\tb", "control character"},
               {"a\x7f", "control character"},
               {"a\xc2\x9b", "control character"},
               {"a\xe2\x80\xa8", "line break"},
               {"a\rb", "line break"}};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        CHECK(mph_auth_check_name(bad[i].name, err, sizeof(err)) == MPH_EINVAL &&
              strstr(err, bad[i].why) && strstr(err, bad[i].name) == NULL);
        char line[64];
        snprintf(line, sizeof(line), "%s:$y$x", bad[i].name);
        CHECK(mph_auth_line_user(line, strlen(line)) == 0);
    }
    CHECK(mph_auth_check_name("\xc3\x85sa \xc3\x96"
                              "berg \xf0\x9f\x94\x91",
                              err, sizeof(err)) == 0);
    CHECK(mph_auth_check_name("\xef\xbf\xbd", err, sizeof(err)) == 0); /* U+FFFD */
    memset(name, 'n', 256);
    name[256] = '\0';
    CHECK(mph_auth_check_name(name, err, sizeof(err)) == MPH_EINVAL && strstr(err, "255"));
    name[255] = '\0';
    CHECK(mph_auth_check_name(name, err, sizeof(err)) == 0);

    CHECK(mph_auth_line_user("bob:$y$x", 8) == 3);
    CHECK(mph_auth_line_user("# bob:$y$x", 10) == 0);
    CHECK(mph_auth_line_user("", 0) == 0);
    CHECK(mph_auth_line_user("no colon", 8) == 0);

    char *hash = NULL;
    CHECK(mph_auth_hash_new("s3cret", &hash, err, sizeof(err)) == 0);
    CHECK(hash && strncmp(hash, "$y$", 3) == 0 && hash_format_ok(hash));
    struct crypt_data data;
    memset(&data, 0, sizeof(data));
    const char *again = hash ? crypt_rn("s3cret", hash, &data, sizeof(data)) : NULL;
    CHECK(again && strcmp(again, hash) == 0);
    free(hash);
}

static const mph_unit_test_t tests[] = {
    {"siphash_reference_vectors", test_siphash_reference_vectors},
    {"base64_is_strict", test_base64_is_strict},
    {"authorization_header_shapes", test_authorization_header_shapes},
    {"hash_formats", test_hash_formats},
    {"users_file", test_users_file},
    {"checks_on_the_pool", test_checks_on_the_pool},
    {"source_keys", test_source_keys},
    {"bounds_in_all_and_per_source", test_bounds_in_all_and_per_source},
    {"sources_take_turns", test_sources_take_turns},
    {"a_queued_check_expires", test_a_queued_check_expires},
    {"cancelled_checks_do_not_run", test_cancelled_checks_do_not_run},
    {"close_answers_waits_and_may_come_from_a_callback",
     test_close_answers_waits_and_may_come_from_a_callback},
    {"users_file_owner_and_mode", test_users_file_owner_and_mode},
    {"no_users_refuses_at_once", test_no_users_refuses_at_once},
    {"what_passwd_uses", test_what_passwd_uses},
};

MPH_UNIT_MAIN(tests)
