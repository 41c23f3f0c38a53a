/*
 * Unit tests of the file backend's pure pieces: scope-name encoding, the record format (both
 * formats), and recovery's verdicts (scan_log): what a crash can leave is a torn tail, to be
 * cut; damage with valid records after it is corruption, never cut; and the data directory's
 * checks (refused links, modes, files opened only as regular files of ours). storage/file.c
 * is included to reach its statics (as h2o's t/00unit does).
 */
#define _GNU_SOURCE
#include "common/common.c"
#include "common/map.c"
#include "storage/file.c"

#include "spec/unit/scratch.h"
#include "spec/unit/unit.h"

#include <ftw.h>

/* A log of records at versions first..first+n-1, each with one key "k" = "<version>". Sets
 * starts[i] to where record i begins (starts[n] to the end). */
static void build_log(mph_buf_t *b, uint64_t first, size_t n, size_t *starts)
{
    for (size_t i = 0; i < n; i++) {
        char json[32];
        snprintf(json, sizeof(json), "%llu", (unsigned long long)(first + i));
        mph_store_entry_t e = {"k", 1, json, strlen(json)};
        starts[i] = b->len;
        build_record(b, first + i, &e, 1, NULL);
    }
    starts[n] = b->len;
}

/* A format-1 record (no header CRC), as mphost 0.1 wrote them. */
static void build_record_v1(mph_buf_t *b, uint64_t version, const char *key, const char *json)
{
    mph_buf_t v2 = MPH_BUF_INIT;
    mph_store_entry_t e = {key, strlen(key), json, strlen(json)};
    build_record(&v2, version, &e, 1, NULL);
    unsigned char hdr[HEADER_V1];
    memcpy(hdr, v2.data, HEADER_V1);
    put_u32(hdr, MAGIC_V1);
    mph_buf_append(b, hdr, HEADER_V1);
    mph_buf_append(b, v2.data + HEADER_V2, v2.len - HEADER_V2);
    mph_buf_free(&v2);
}

static scan_verdict_t scan(const mph_buf_t *b, size_t *end, uint64_t *last)
{
    log_scan_t s;
    scan_log(b, 0, 0, NULL, &s);
    *end = s.end;
    *last = s.last;
    return s.verdict;
}

static void test_scope_names_stay_in_the_directory(void)
{
    mph_buf_t b = MPH_BUF_INIT;
    encode_name(&b, "../../etc/passwd");
    CHECK(strcmp(b.data, "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd") == 0);
    b.len = 0;
    encode_name(&b, "global");
    CHECK(strcmp(b.data, "global") == 0);
    b.len = 0;
    encode_name(&b, "user:\xc3\xa9");
    CHECK(strcmp(b.data, "user%3A%C3%A9") == 0);
    mph_buf_free(&b);
}

/* Whether entry `got` holds exactly the bytes of `want` (a deletion: json NULL, no length). */
static int same_entry(const mph_store_entry_t *got, const mph_store_entry_t *want)
{
    if (got->klen != want->klen || memcmp(got->key, want->key, want->klen) != 0)
        return 0;
    if (want->json == NULL)
        return got->json == NULL && got->jlen == 0;
    return got->json != NULL && got->jlen == want->jlen &&
           memcmp(got->json, want->json, want->jlen) == 0;
}

static void test_records_round_trip(void)
{
    /* Keys and values of several lengths (one over 255 bytes, so every byte of a length
     * counts), UTF-8, a deletion, bytes JSON escapes would show; then a part of a multi-scope
     * commit, whose trailer comes back as written. */
    char big[300];
    for (size_t i = 0; i < sizeof(big); i++)
        big[i] = (char)('a' + i % 26);
    big[0] = '"';
    big[sizeof(big) - 1] = '"';
    mph_store_entry_t e[] = {
        {"a", 1, "1", 1},
        {"gone", 4, NULL, 0},
        {"user:\xc3\xa9", 7, "\"caf\xc3\xa9\\n\\u0000\"", 15},
        {big + 1, 298, big, sizeof(big)},
    };
    size_t n = sizeof(e) / sizeof(e[0]);
    unsigned char parts[MULTI_ID + 4 + 2 * (4 + 2 + 8)];
    memset(parts, 0x5a, MULTI_ID);
    put_u32(parts + MULTI_ID, 2);
    for (size_t i = 0, q = MULTI_ID + 4; i < 2; i++, q += 4 + 2 + 8) {
        put_u32(parts + q, 2);
        memcpy(parts + q + 4, i ? "s2" : "s1", 2);
        put_u64(parts + q + 6, 40 + i);
    }
    mph_buf_t trailer = {(char *)parts, sizeof(parts), sizeof(parts)};
    mph_buf_t b = MPH_BUF_INIT;
    build_record(&b, 7, e, n, NULL);
    build_record(&b, 8, e + 2, 1, NULL);
    build_record(&b, 9, e + 3, 1, &trailer);
    op_t op;
    memset(&op, 0, sizeof(op));
    size_t pos = 0;
    uint64_t v = 0;
    trailer_t t = {(const unsigned char *)"x", 1};
    CHECK(parse_record(&b, &pos, &v, &op, 0, &t) == PARSE_OK && v == 7 && t.data == NULL);
    CHECK(op.doc.n == n);
    for (size_t i = 0; i < n && i < op.doc.n; i++)
        CHECK(same_entry(&op.doc.entries[i], &e[i]));
    /* At or below skip_upto, a record is read but adds nothing. */
    size_t again = pos;
    CHECK(parse_record(&b, &again, &v, &op, 8, NULL) == PARSE_OK && v == 8 && op.doc.n == n);
    CHECK(parse_record(&b, &pos, &v, &op, 7, NULL) == PARSE_OK && v == 8 && pos == again);
    CHECK(op.doc.n == n + 1 && same_entry(&op.doc.entries[n], &e[2]));
    CHECK(parse_record(&b, &pos, &v, &op, 0, &t) == PARSE_OK && v == 9);
    CHECK(op.doc.n == n + 2 && same_entry(&op.doc.entries[n + 1], &e[3]));
    CHECK(t.data != NULL && t.len == sizeof(parts) && memcmp(t.data, parts, sizeof(parts)) == 0);
    CHECK(pos == b.len && parse_record(&b, &pos, &v, &op, 0, NULL) == PARSE_END);
    free(op.doc.entries);
    mph_buf_free(&b);
}

static void test_format_1_records_still_load(void)
{
    mph_buf_t b = MPH_BUF_INIT;
    build_record_v1(&b, 1, "a", "\"old\"");
    size_t starts[2];
    build_log(&b, 2, 1, starts); /* a format-2 record appended after an upgrade */
    op_t op;
    memset(&op, 0, sizeof(op));
    log_scan_t s;
    scan_log(&b, 0, 0, &op, &s);
    CHECK(s.verdict == SCAN_END && s.end == b.len && s.last == 2);
    CHECK(op.doc.n == 2 && op.doc.entries[0].jlen == 5);
    free(op.doc.entries);
    mph_buf_free(&b);
}

static void test_every_prefix_of_the_last_record_is_torn(void)
{
    mph_buf_t b = MPH_BUF_INIT;
    size_t starts[4];
    build_log(&b, 1, 3, starts);
    for (size_t cut = starts[2] + 1; cut < starts[3]; cut++) {
        mph_buf_t t = {b.data, cut, b.cap};
        size_t end;
        uint64_t last;
        CHECK(scan(&t, &end, &last) == SCAN_TORN && end == starts[2] && last == 2);
    }
    mph_buf_free(&b);
}

static void test_zero_filled_tails_are_torn(void)
{
    size_t lens[] = {1, 11, 12, 16, 100, 4096};
    for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
        mph_buf_t b = MPH_BUF_INIT;
        size_t starts[4];
        build_log(&b, 1, 3, starts);
        /* What a power cut can leave: the size grew, the data did not make it (all zero), or
         * part of the last record did and the rest is zeros. */
        for (int half = 0; half < 2; half++) {
            b.len = starts[3];
            if (half) {
                char part[256]; /* a copy: appending may move b.data */
                size_t n = (starts[3] - starts[2]) / 2;
                CHECK(n <= sizeof(part));
                memcpy(part, b.data + starts[2], n);
                mph_buf_append(&b, part, n);
            }
            static const char zeros[4096];
            mph_buf_append(&b, zeros, lens[i]);
            size_t end;
            uint64_t last;
            CHECK(scan(&b, &end, &last) == SCAN_TORN && end == starts[3] && last == 3);
        }
        mph_buf_free(&b);
    }
}

/* A key may hold the bytes of a whole valid record (users choose keys). If a crash tears the
 * record around it, or zeroes the end of its payload, that is still a torn tail: the torn
 * record's header announces its extent, and only records after it can prove damage. */
static void test_a_record_inside_a_torn_record_is_not_taken_for_one(void)
{
    mph_buf_t inner = MPH_BUF_INIT, b = MPH_BUF_INIT;
    mph_store_entry_t ie = {"k", 1, "1", 1};
    build_record(&inner, 7, &ie, 1, NULL);
    size_t starts[4];
    build_log(&b, 1, 3, starts);
    size_t at = b.len;
    mph_store_entry_t oe = {inner.data, inner.len, "2", 1};
    build_record(&b, 4, &oe, 1, NULL);
    size_t full = b.len;
    for (size_t cut = at + HEADER_V2 + 1; cut < full; cut++) {
        mph_buf_t t = {b.data, cut, b.cap};
        size_t end;
        uint64_t last;
        CHECK(scan(&t, &end, &last) == SCAN_TORN && end == at && last == 3);
    }
    /* Whole length, but the last bytes of the payload never made it (zeros). */
    memset(b.data + full - 3, 0, 3);
    size_t end;
    uint64_t last;
    CHECK(scan(&b, &end, &last) == SCAN_TORN && end == at && last == 3);
    mph_buf_free(&inner);
    mph_buf_free(&b);
}

static void test_damage_before_valid_records_is_corruption(void)
{
    mph_buf_t b = MPH_BUF_INIT;
    size_t starts[5];
    build_log(&b, 1, 4, starts);
    /* One flipped bit anywhere in records 2 and 3 (header, length, CRCs, payload): a valid
     * record follows, so it is damage to acknowledged data, reported where it is. */
    for (size_t at = starts[1]; at < starts[3]; at++) {
        for (int bit = 0; bit < 8; bit++) {
            b.data[at] ^= (char)(1 << bit);
            log_scan_t s;
            scan_log(&b, 0, 0, NULL, &s);
            size_t damaged = at < starts[2] ? starts[1] : starts[2];
            CHECK(s.verdict == SCAN_CORRUPT && s.end == damaged && s.next_valid > damaged);
            b.data[at] ^= (char)(1 << bit);
        }
    }
    /* The same in the last record: indistinguishable from a torn write, so it is cut. */
    b.data[starts[3] + 5] ^= 0x40; /* its length */
    size_t end;
    uint64_t last;
    CHECK(scan(&b, &end, &last) == SCAN_TORN && end == starts[3] && last == 3);
    mph_buf_free(&b);
}

static void test_format_1_length_damage_is_corruption(void)
{
    /* Without a header CRC, a damaged length reads as a record running past the end; the
     * valid record after it still shows it is not a torn tail. */
    mph_buf_t b = MPH_BUF_INIT;
    build_record_v1(&b, 1, "a", "1");
    size_t second = b.len;
    build_record_v1(&b, 2, "a", "2");
    build_record_v1(&b, 3, "a", "3");
    b.data[second + 6] ^= 0x10;
    size_t end;
    uint64_t last;
    CHECK(scan(&b, &end, &last) == SCAN_CORRUPT && end == second);
    mph_buf_free(&b);
}

static void test_versions_must_follow(void)
{
    mph_buf_t b = MPH_BUF_INIT;
    size_t starts[4];
    build_log(&b, 5, 3, starts); /* 5, 6, 7 */
    log_scan_t s;
    scan_log(&b, 0, 0, NULL, &s);
    CHECK(s.verdict == SCAN_CORRUPT && s.end == 0); /* a log without a snapshot starts at 1 */
    scan_log(&b, 4, 0, NULL, &s);
    CHECK(s.verdict == SCAN_END && s.last == 7); /* the tail after version 4 */
    scan_log(&b, 0, 4, NULL, &s);
    CHECK(s.verdict == SCAN_END && s.last == 7); /* after a snapshot at 4 */
    scan_log(&b, 0, 6, NULL, &s);
    CHECK(s.verdict == SCAN_END && s.last == 7); /* records up to the snapshot are skipped */
    scan_log(&b, 0, 3, NULL, &s);
    CHECK(s.verdict == SCAN_CORRUPT && s.end == 0); /* a gap after the snapshot */
    mph_buf_t g = MPH_BUF_INIT;
    size_t gs[3];
    build_log(&g, 1, 2, gs);
    build_log(&g, 4, 1, gs); /* 1, 2, 4 */
    scan_log(&g, 0, 0, NULL, &s);
    CHECK(s.verdict == SCAN_CORRUPT && s.end == gs[0] && s.last == 2);
    CHECK(strstr(s.why, "version 4 follows 2") != NULL);
    mph_buf_free(&g);
    mph_buf_free(&b);
}

static void test_malformed_record_is_corruption_even_last(void)
{
    mph_buf_t b = MPH_BUF_INIT;
    size_t starts[3];
    build_log(&b, 1, 2, starts);
    /* Claim two entries in the last record and fix both CRCs: checksums hold, contents do
     * not add up. That is no crash's doing. */
    unsigned char *p = (unsigned char *)b.data + starts[1];
    put_u32(p + HEADER_V2 + 8, 2);
    put_u32(p + 8, crc(p + HEADER_V2, get_u32(p + 4)));
    put_u32(p + 12, crc(p, 12));
    size_t end;
    uint64_t last;
    CHECK(scan(&b, &end, &last) == SCAN_CORRUPT && end == starts[1]);
    mph_buf_free(&b);
}

static void test_fault_specs(void)
{
    setenv("MPH_TEST_FAULT", "append.sync:2:fail,compact.snap.write:1:hold", 1);
    faults_init();
    CHECK(nfaults == 2);
    CHECK(strcmp(faults[0].point, "append.sync") == 0 && faults[0].nth == 2);
    CHECK(faults[0].action == FAULT_FAIL && faults[1].action == FAULT_HOLD);
    CHECK(fault_at("append.sync") == 0);
    CHECK(fault_at("append.sync") == -1 && errno == EIO);
    CHECK(fault_at("append.sync") == 0);
    CHECK(fault_at("append.write") == 0);
    nfaults = 0;
}

/* ---- The data directory and the files in it ---- */

static unsigned mode_of(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0 ? (unsigned)(st.st_mode & 07777) : 0;
}

static void test_data_dir_is_made_0700_whatever_the_umask(void)
{
    char *top = scratch_dir("mph-unit"), path[512], err[256];
    snprintf(path, sizeof(path), "%s/a/./b//c/", top);
    mode_t old = umask(0);
    int fd = open_data_dir(path, err, sizeof(err));
    umask(old);
    CHECK(fd >= 0 && check_data_dir(fd, path, err, sizeof(err)) == 0);
    const char *made[] = {"a", "a/b", "a/b/c"};
    for (size_t i = 0; i < 3; i++) {
        snprintf(path, sizeof(path), "%s/%s", top, made[i]);
        CHECK(mode_of(path) == 0700);
    }
    if (fd >= 0)
        close(fd);
    scratch_remove(top);
}

static void test_data_dir_refusals(void)
{
    char *top = scratch_dir("mph-unit"), path[512], link[512], err[256];
    snprintf(path, sizeof(path), "%s/d", top);
    snprintf(link, sizeof(link), "%s/link", top);
    CHECK(mkdir(path, 0700) == 0 && symlink(path, link) == 0);
    CHECK(open_data_dir(link, err, sizeof(err)) < 0 && strstr(err, "symbolic link") != NULL);
    CHECK(strstr(err, link) != NULL);
    const struct {
        unsigned mode;
        const char *said; /* NULL: accepted, and narrowed to 0700 */
    } cases[] = {{0777, "writable by group or others"},
                 {0720, "writable by group or others"},
                 {0702, "writable by group or others"},
                 {0755, NULL},
                 {0700, NULL}};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        chmod(path, cases[i].mode);
        int fd = open_data_dir(path, err, sizeof(err));
        CHECK(fd >= 0);
        int rc = check_data_dir(fd, path, err, sizeof(err));
        if (cases[i].said)
            CHECK(rc < 0 && strstr(err, cases[i].said) && strstr(err, path));
        else
            CHECK(rc == 0 && mode_of(path) == 0700);
        close(fd);
    }
    if (geteuid() == 0) { /* another uid's directory */
        CHECK(chmod(path, 0700) == 0 && chown(path, 65534, 65534) == 0);
        int fd = open_data_dir(path, err, sizeof(err));
        CHECK(fd >= 0 && check_data_dir(fd, path, err, sizeof(err)) < 0);
        CHECK(strstr(err, "belongs to uid 65534") != NULL);
        close(fd);
    }
    snprintf(path, sizeof(path), "%s/file", top);
    close(open(path, O_CREAT | O_WRONLY, 0600));
    CHECK(open_data_dir(path, err, sizeof(err)) < 0 && strstr(err, "Not a directory"));
    scratch_remove(top);
}

static void test_files_open_only_as_our_regular_files(void)
{
    char *top = scratch_dir("mph-unit"), err[256], path[512];
    file_store_t fs;
    memset(&fs, 0, sizeof(fs));
    fs.dir = top;
    fs.dir_len = strlen(top);
    fs.dfd = open_data_dir(top, err, sizeof(err));
    CHECK(fs.dfd >= 0);
    /* Created 0600 whatever the umask. */
    snprintf(path, sizeof(path), "%s/new", top);
    mode_t old = umask(0);
    int fd = open_in(&fs, path, O_RDWR | O_CREAT);
    umask(old);
    CHECK(fd >= 0 && mode_of(path) == 0600);
    close(fd);
    /* A link is never followed, even to a file of ours. */
    char link[512];
    snprintf(link, sizeof(link), "%s/link", top);
    CHECK(symlink(path, link) == 0);
    CHECK(open_in(&fs, link, O_RDWR | O_CREAT) < 0 && errno == ELOOP);
    CHECK(strstr(why_not(ELOOP), "symbolic link") != NULL);
    CHECK(exists_in(&fs, link, NULL) == 1); /* but seen as there */
    /* Not a regular file. */
    snprintf(path, sizeof(path), "%s/fifo", top);
    CHECK(mkfifo(path, 0600) == 0);
    CHECK(open_in(&fs, path, O_RDWR) < 0 && errno == EMEDIUMTYPE);
    /* An older file open to others is narrowed. */
    snprintf(path, sizeof(path), "%s/old", top);
    close(open(path, O_CREAT | O_WRONLY, 0644));
    chmod(path, 0644);
    fd = open_in(&fs, path, O_RDONLY);
    CHECK(fd >= 0 && mode_of(path) == 0600);
    close(fd);
    if (geteuid() == 0) { /* another uid's file */
        CHECK(chown(path, 65534, 65534) == 0);
        CHECK(open_in(&fs, path, O_RDONLY) < 0 && errno == EPERM);
    }
    close(fs.dfd);
    scratch_remove(top);
}

static const mph_unit_test_t tests[] = {
    {"scope_names_stay_in_the_directory", test_scope_names_stay_in_the_directory},
    {"records_round_trip", test_records_round_trip},
    {"format_1_records_still_load", test_format_1_records_still_load},
    {"every_prefix_of_the_last_record_is_torn", test_every_prefix_of_the_last_record_is_torn},
    {"zero_filled_tails_are_torn", test_zero_filled_tails_are_torn},
    {"a_record_inside_a_torn_record_is_not_taken_for_one",
     test_a_record_inside_a_torn_record_is_not_taken_for_one},
    {"damage_before_valid_records_is_corruption", test_damage_before_valid_records_is_corruption},
    {"format_1_length_damage_is_corruption", test_format_1_length_damage_is_corruption},
    {"versions_must_follow", test_versions_must_follow},
    {"malformed_record_is_corruption_even_last", test_malformed_record_is_corruption_even_last},
    {"fault_specs", test_fault_specs},
    {"data_dir_is_made_0700_whatever_the_umask", test_data_dir_is_made_0700_whatever_the_umask},
    {"data_dir_refusals", test_data_dir_refusals},
    {"files_open_only_as_our_regular_files", test_files_open_only_as_our_regular_files},
};

MPH_UNIT_MAIN(tests)
