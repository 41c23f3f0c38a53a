/*
 * filelog: the file backend's log reader (scan_log) on arbitrary bytes. The first byte picks
 * the snapshot version the log continues (0..3); the rest is the log. Asserted, with an
 * independent reading of the frame (not frame_valid), abort() on a violation:
 *  - every record reported (the first `end` bytes) is whole and its checksums hold;
 *  - entries handed out point inside the input;
 *  - END: every byte was read; TORN (to be cut): no record that validates starts at or after
 *    the cut, so nothing acknowledged is ever cut, except inside the extent announced by a
 *    format-2 header at the cut whose own checksum holds (a record's payload may hold the
 *    bytes of another record; acknowledged records only start where the previous one ends);
 *    CORRUPT: either a valid record follows the bad bytes and that extent (next_valid is the
 *    first one), or the record at `end` validates but is malformed or out of sequence.
 * storage/file.c is included to reach its statics; the fuzzer then takes nothing else of
 * file.c from libmphost, so no symbol is linked twice.
 */
#include "storage/file.c"

static int valid_at(const unsigned char *d, size_t len, size_t at, size_t *size)
{
    if (at + 12 > len)
        return 0;
    uint32_t magic = get_u32(d + at), plen = get_u32(d + at + 4), h;
    if (magic == 0x3252504dU) {
        h = 16;
        if (at + 16 > len || (uint32_t)crc32(0L, d + at, 12) != get_u32(d + at + 12))
            return 0;
    } else if (magic == 0x3152504dU) {
        h = 12;
    } else {
        return 0;
    }
    if ((uint64_t)at + h + plen > len ||
        (uint32_t)crc32(0L, d + at + h, (uInt)plen) != get_u32(d + at + 8))
        return 0;
    *size = h + plen;
    return 1;
}

/* Where records that prove damage may start, after bad bytes at `at`: past the record a
 * checksummed format-2 header announces there, else anywhere after `at`. */
static uint64_t search_from(const unsigned char *d, size_t len, size_t at)
{
    if (at + 16 <= len && get_u32(d + at) == 0x3252504dU &&
        (uint32_t)crc32(0L, d + at, 12) == get_u32(d + at + 12))
        return (uint64_t)at + 16 + get_u32(d + at + 4);
    return at + 1;
}

static int inside(const mph_buf_t *b, const char *p, size_t n)
{
    return p >= b->data && p + n <= b->data + b->len;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    uint64_t skip = data[0] & 3;
    mph_buf_t b = MPH_BUF_INIT;
    mph_buf_append(&b, data + 1, size - 1);
    const unsigned char *d = (const unsigned char *)b.data;
    op_t op;
    memset(&op, 0, sizeof(op));
    log_scan_t s;
    scan_log(&b, 0, skip, &op, &s);

    size_t at = 0, rec;
    while (at < s.end) {
        if (!valid_at(d, b.len, at, &rec))
            abort(); /* a reported record whose frame or checksum fails */
        at += rec;
    }
    if (at != s.end)
        abort();
    for (size_t i = 0; i < op.doc.n; i++) {
        const mph_store_entry_t *e = &op.doc.entries[i];
        if (!inside(&b, e->key, e->klen) || (e->json && !inside(&b, e->json, e->jlen)))
            abort();
    }
    switch (s.verdict) {
    case SCAN_END:
        if (s.end != b.len)
            abort();
        break;
    case SCAN_TORN:
        if (valid_at(d, b.len, s.end, &rec))
            abort(); /* a valid record cut */
        for (uint64_t y = search_from(d, b.len, s.end); y < b.len; y++)
            if (valid_at(d, b.len, y, &rec))
                abort(); /* a cut would drop a record that validates */
        break;
    case SCAN_CORRUPT:
        if (s.next_valid) {
            if (valid_at(d, b.len, s.end, &rec) || !valid_at(d, b.len, s.next_valid, &rec))
                abort();
            if (s.next_valid < search_from(d, b.len, s.end))
                abort();
            for (uint64_t y = search_from(d, b.len, s.end); y < s.next_valid; y++)
                if (valid_at(d, b.len, y, &rec))
                    abort();
        } else if (!valid_at(d, b.len, s.end, &rec)) {
            abort(); /* damage claimed without a valid record after it */
        }
        break;
    }
    free(op.doc.entries);
    mph_buf_free(&b);
    return 0;
}
