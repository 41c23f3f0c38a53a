/*
 * json.c: JSON text <-> jansson trees, for every layer (json.h); no Lua here (lua/json.c maps
 * JSON to Lua and back, with the writer functions below).
 *
 * Reading: JSON text -> jansson tree (mph_json_load), in one pass over the bytes.
 *
 * Why not json_loadb: jansson reads its input through a stream, one character at a time,
 * each through a function call and a UTF-8 check; callgrind counted 16,000 instructions to
 * read the 80-byte echo request, 30% of everything mphost executed per call. This parser scans
 * the bytes directly and builds the very same tree with jansson's constructors, so every user
 * of the tree (rpc.c, the bridge, the CLI) is unchanged. It accepts exactly what
 * json_loadb(JSON_DECODE_ANY | JSON_ALLOW_NUL) accepts (but for a NUL byte right after a
 * number or a literal, which jansson skips and we refuse: it is no JSON) and builds an equal value,
 * with the same error codes (json_error_numeric_overflow for an integer beyond int64 or a real
 * beyond double, which rpc.c answers with -32602): spec/fuzz/json_parse.c checks all of that
 * against jansson on every input. Error texts are its own.
 *
 * Grammar: RFC 8259, with jansson's limits: nesting deeper than MAX_DEPTH arrays and objects
 * is refused, strings are valid UTF-8 (no overlong forms, no surrogates, nothing above
 * U+10FFFF, raw or escaped), "\u0000" is allowed in strings but not in object keys, and a
 * repeated key keeps its last value.
 */
#define _POSIX_C_SOURCE 200809L
#include "json.h"

#include <assert.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 2048 /* jansson's JSON_PARSER_MAX_DEPTH */

typedef struct {
    const unsigned char *start, *p, *end;
    json_error_t *error;       /* NULL while peeking (syntax_error) */
    enum json_error_code code; /* of the last failure, recorded or not */
    int depth;
    mph_buf_t scratch; /* an unescaped string or key, or a number's text */
} parser_t;

/* Records the first error (line, column and position of where the parser stopped) and
 * returns NULL. */
static json_t *fail(parser_t *ps, enum json_error_code code, const char *fmt, ...)
{
    json_error_t *e = ps->error;
    ps->code = code;
    if (e == NULL)
        return NULL;
    int line = 1, column = 0;
    for (const unsigned char *q = ps->start; q < ps->p; q++) {
        column++;
        if (*q == '\n') {
            line++;
            column = 0;
        }
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->text, JSON_ERROR_TEXT_LENGTH - 1, fmt, ap);
    va_end(ap);
    e->text[JSON_ERROR_TEXT_LENGTH - 1] = (char)code; /* where json_error_code() reads it */
    e->line = line;
    e->column = column;
    e->position = (int)(ps->p - ps->start);
    snprintf(e->source, sizeof(e->source), "<buffer>");
    return NULL;
}

static json_t *nomem(parser_t *ps)
{
    return fail(ps, json_error_out_of_memory, "out of memory");
}

static void skip_space(parser_t *ps)
{
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\n' || *ps->p == '\r' || *ps->p == '\t'))
        ps->p++;
}

/* The length of the valid UTF-8 sequence at p (a first byte >= 0x80), or 0. */
static size_t utf8_sequence(const unsigned char *p, const unsigned char *end)
{
    unsigned c = p[0];
    size_t n;
    unsigned lo = 0x80, hi = 0xBF; /* the second byte's range */
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        if (c == 0xE0)
            lo = 0xA0; /* overlong */
        else if (c == 0xED)
            hi = 0x9F; /* surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0)
            lo = 0x90; /* overlong */
        else if (c == 0xF4)
            hi = 0x8F; /* above U+10FFFF */
    } else {
        return 0;
    }
    if ((size_t)(end - p) < n || p[1] < lo || p[1] > hi)
        return 0;
    for (size_t i = 2; i < n; i++)
        if (p[i] < 0x80 || p[i] > 0xBF)
            return 0;
    return n;
}

/* Four hex digits at p (p + 4 <= end checked by the caller); -1 if one is not. */
static long hex4(const unsigned char *p)
{
    long v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= c - '0';
        else if (c >= 'a' && c <= 'f')
            v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            v |= c - 'A' + 10;
        else
            return -1;
    }
    return v;
}

static void put_utf8(mph_buf_t *b, unsigned long cp)
{
    char u[4];
    size_t n;
    if (cp < 0x80) {
        u[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        u[0] = (char)(0xC0 | (cp >> 6));
        u[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | (cp >> 12));
        u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        u[0] = (char)(0xF0 | (cp >> 18));
        u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    mph_buf_append(b, u, n);
}

/* An escape after the backslash at ps->p, appended to scratch. Returns 0 or -1 (failed). */
static int read_escape(parser_t *ps)
{
    const unsigned char *p = ps->p + 1;
    if (p >= ps->end) {
        fail(ps, json_error_premature_end_of_input, "unterminated string");
        return -1;
    }
    static const char plain[] = "\"\\/bfnrt", meant[] = "\"\\/\b\f\n\r\t";
    const char *hit = *p ? strchr(plain, *p) : NULL;
    if (hit) {
        mph_buf_append(&ps->scratch, &meant[hit - plain], 1);
        ps->p = p + 1;
        return 0;
    }
    if (*p != 'u' || ps->end - p < 5 || hex4(p + 1) < 0) {
        fail(ps, json_error_invalid_syntax, "invalid escape in string");
        return -1;
    }
    unsigned long cp = (unsigned long)hex4(p + 1);
    p += 5;
    if (cp >= 0xDC00 && cp <= 0xDFFF) {
        fail(ps, json_error_invalid_utf8, "invalid Unicode '\\u%04lX': a lone low surrogate", cp);
        return -1;
    }
    if (cp >= 0xD800 && cp <= 0xDBFF) { /* must be followed by its low surrogate */
        long low = ps->end - p >= 6 && p[0] == '\\' && p[1] == 'u' ? hex4(p + 2) : -1;
        if (low < 0xDC00 || low > 0xDFFF) {
            fail(ps, json_error_invalid_utf8, "invalid Unicode '\\u%04lX': no low surrogate", cp);
            return -1;
        }
        cp = 0x10000 + ((cp - 0xD800) << 10) + ((unsigned long)low - 0xDC00);
        p += 6;
    }
    put_utf8(&ps->scratch, cp);
    ps->p = p;
    return 0;
}

/* The string at ps->p (its opening quote), unescaped into scratch (not NUL-terminated).
 * Returns 0, or -1 with the error recorded. */
static int read_string(parser_t *ps)
{
    ps->scratch.len = 0;
    const unsigned char *p = ++ps->p;
    for (;;) {
        const unsigned char *run = p; /* bytes copied as they are */
        while (p < ps->end && *p >= 0x20 && *p < 0x80 && *p != '"' && *p != '\\')
            p++;
        mph_buf_append(&ps->scratch, run, (size_t)(p - run));
        ps->p = p;
        if (p >= ps->end)
            return fail(ps, json_error_premature_end_of_input, "unterminated string"), -1;
        if (*p == '"') {
            ps->p = p + 1;
            return 0;
        }
        if (*p == '\\') {
            if (read_escape(ps) != 0)
                return -1;
            p = ps->p;
        } else if (*p < 0x20) {
            return fail(ps, json_error_invalid_syntax, "control character 0x%x in string", *p), -1;
        } else {
            size_t n = utf8_sequence(p, ps->end);
            if (n == 0)
                return fail(ps, json_error_invalid_utf8, "invalid UTF-8 byte 0x%02x", *p), -1;
            mph_buf_append(&ps->scratch, p, n);
            p += n;
        }
    }
}

static int is_digit(const unsigned char *p, const unsigned char *end)
{
    return p < end && *p >= '0' && *p <= '9';
}

/* A number: an integer (no fraction, no exponent) within int64, or a real within double. */
static json_t *read_number(parser_t *ps)
{
    const unsigned char *p = ps->p, *begin = p;
    int negative = *p == '-';
    if (negative)
        p++;
    if (!is_digit(p, ps->end))
        return fail(ps, json_error_invalid_syntax, "invalid number");
    if (*p == '0') {
        p++;
        if (is_digit(p, ps->end))
            return fail(ps, json_error_invalid_syntax, "invalid number: leading zero");
    } else {
        while (is_digit(p, ps->end))
            p++;
    }
    int integral = 1;
    if (p < ps->end && *p == '.') {
        integral = 0;
        p++;
        if (!is_digit(p, ps->end))
            return fail(ps, json_error_invalid_syntax, "invalid number: no digit after '.'");
        while (is_digit(p, ps->end))
            p++;
    }
    if (p < ps->end && (*p == 'e' || *p == 'E')) {
        integral = 0;
        p++;
        if (p < ps->end && (*p == '+' || *p == '-'))
            p++;
        if (!is_digit(p, ps->end))
            return fail(ps, json_error_invalid_syntax, "invalid number: no digit in exponent");
        while (is_digit(p, ps->end))
            p++;
    }
    ps->p = p;
    /* jansson has read one character past the number, and a byte that is no UTF-8 there is
     * the error it reports first: the same error code for the same input. */
    int bad_next = p < ps->end && *p >= 0x80 && utf8_sequence(p, ps->end) == 0;
    json_t *v;
    if (integral) {
        /* |LLONG_MIN| fits in an unsigned long long; anything past the limit overflows. */
        unsigned long long limit = negative ? 9223372036854775808ULL : 9223372036854775807ULL;
        unsigned long long acc = 0;
        for (const unsigned char *d = begin + negative; d < p; d++) {
            unsigned digit = *d - '0';
            if (acc > (limit - digit) / 10) {
                if (bad_next)
                    return fail(ps, json_error_invalid_utf8, "invalid UTF-8 byte 0x%02x", *p);
                ps->p = begin;
                return fail(ps, json_error_numeric_overflow, "too big %sinteger",
                            negative ? "negative " : "");
            }
            acc = acc * 10 + digit;
        }
        json_int_t n = negative ? (acc == limit ? INT64_MIN : -(json_int_t)acc) : (json_int_t)acc;
        v = json_integer(n);
    } else {
        ps->scratch.len = 0; /* strtod needs a terminated copy */
        mph_buf_append(&ps->scratch, begin, (size_t)(p - begin));
        mph_buf_append(&ps->scratch, "", 1);
        errno = 0;
        double d = strtod(ps->scratch.data, NULL);
        if (errno == ERANGE && isinf(d)) {
            if (bad_next)
                return fail(ps, json_error_invalid_utf8, "invalid UTF-8 byte 0x%02x", *p);
            ps->p = begin;
            return fail(ps, json_error_numeric_overflow, "real number overflow");
        }
        v = json_real(d);
    }
    return v ? v : nomem(ps);
}

static json_t *read_value(parser_t *ps);

/* A token that does not fit the grammar at ps->p. jansson reads the whole token before its
 * parser looks at it, so when that token is a number too big to hold, the error it reports
 * is the overflow (-32602 for a caller, not -32700): so is ours. */
static json_t *syntax_error(parser_t *ps, const char *what)
{
    if (ps->p < ps->end && (*ps->p == '-' || (*ps->p >= '0' && *ps->p <= '9'))) {
        const unsigned char *at = ps->p;
        json_error_t *error = ps->error;
        ps->error = NULL; /* peek: read the number, record nothing */
        ps->code = json_error_unknown;
        json_t *v = read_number(ps);
        json_decref(v);
        ps->error = error;
        enum json_error_code code = ps->code;
        ps->p = at;
        if (code == json_error_numeric_overflow)
            return fail(ps, code, "number too big to hold (where %s)", what);
    }
    return fail(ps, json_error_invalid_syntax, "%s", what);
}

/* Steps over the byte c if it is next; returns whether it was. */
static int eat(parser_t *ps, char c)
{
    if (ps->p < ps->end && *ps->p == (unsigned char)c) {
        ps->p++;
        return 1;
    }
    return 0;
}

static json_t *read_array(parser_t *ps)
{
    json_t *a = json_array();
    if (a == NULL)
        return nomem(ps);
    ps->p++;
    skip_space(ps);
    if (eat(ps, ']'))
        return a;
    for (;;) {
        json_t *v = read_value(ps);
        if (v == NULL || json_array_append_new(a, v) != 0) {
            json_decref(a);
            return v ? nomem(ps) : NULL;
        }
        skip_space(ps);
        if (eat(ps, ',')) {
            skip_space(ps);
            continue;
        }
        if (eat(ps, ']'))
            return a;
        json_decref(a);
        return syntax_error(ps, "',' or ']' expected");
    }
}

static json_t *read_object(parser_t *ps)
{
    json_t *o = json_object();
    if (o == NULL)
        return nomem(ps);
    ps->p++;
    skip_space(ps);
    if (eat(ps, '}'))
        return o;
    for (;;) {
        if (ps->p >= ps->end || *ps->p != '"') {
            json_decref(o);
            return syntax_error(ps, "string expected as object key");
        }
        if (read_string(ps) != 0) {
            json_decref(o);
            return NULL;
        }
        if (memchr(ps->scratch.data ? ps->scratch.data : "", '\0', ps->scratch.len)) {
            json_decref(o);
            return fail(ps, json_error_null_byte_in_key, "NUL byte in object key");
        }
        /* The value reuses scratch: keep the key (short, mostly) apart. */
        char small[64];
        size_t klen = ps->scratch.len;
        char *key = klen < sizeof(small) ? small : malloc(klen + 1);
        if (key == NULL) {
            json_decref(o);
            return nomem(ps);
        }
        if (klen)
            memcpy(key, ps->scratch.data, klen);
        key[klen] = '\0';
        skip_space(ps);
        json_t *v = NULL;
        if (eat(ps, ':')) {
            skip_space(ps);
            v = read_value(ps);
        } else {
            syntax_error(ps, "':' expected");
        }
        int rc = v ? json_object_set_new_nocheck(o, key, v) : -1;
        if (key != small)
            free(key);
        if (rc != 0) {
            json_decref(o);
            return v ? nomem(ps) : NULL;
        }
        skip_space(ps);
        if (eat(ps, ',')) {
            skip_space(ps);
            continue;
        }
        if (eat(ps, '}'))
            return o;
        json_decref(o);
        return syntax_error(ps, "',' or '}' expected");
    }
}

static int literal(parser_t *ps, const char *word, size_t n)
{
    if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, word, n) != 0)
        return 0;
    ps->p += n;
    return 1;
}

static json_t *read_value(parser_t *ps)
{
    if (ps->p >= ps->end)
        return fail(ps, json_error_premature_end_of_input, "unexpected end of input");
    json_t *v;
    switch (*ps->p) {
    case '{':
    case '[':
        if (++ps->depth > MAX_DEPTH)
            return fail(ps, json_error_stack_overflow, "nesting deeper than %d", MAX_DEPTH);
        v = *ps->p == '{' ? read_object(ps) : read_array(ps);
        ps->depth--;
        return v;
    case '"':
        if (read_string(ps) != 0)
            return NULL;
        v = json_stringn_nocheck(ps->scratch.data ? ps->scratch.data : "", ps->scratch.len);
        return v ? v : nomem(ps);
    case 't':
        if (literal(ps, "true", 4))
            return json_true();
        break;
    case 'f':
        if (literal(ps, "false", 5))
            return json_false();
        break;
    case 'n':
        if (literal(ps, "null", 4))
            return json_null();
        break;
    default:
        if (*ps->p == '-' || (*ps->p >= '0' && *ps->p <= '9'))
            return read_number(ps);
        break;
    }
    return fail(ps, json_error_invalid_syntax, "unexpected character '%c'",
                *ps->p >= 0x20 && *ps->p < 0x7F ? *ps->p : '?');
}

json_t *mph_json_load(const char *text, size_t len, json_error_t *error)
{
    parser_t ps = {(const unsigned char *)text,
                   (const unsigned char *)text,
                   (const unsigned char *)text + len,
                   error,
                   json_error_unknown,
                   0,
                   MPH_BUF_INIT};
    skip_space(&ps);
    json_t *v = read_value(&ps);
    if (v) {
        skip_space(&ps);
        if (ps.p < ps.end) {
            json_decref(v);
            v = syntax_error(&ps, "end of input expected");
        }
    }
    mph_buf_free(&ps.scratch);
    return v;
}

/* ---- Writing ---- */

int mph_utf8_valid(const char *str, size_t len)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < len) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t n;
        unsigned cp;
        if (c >= 0xC2 && c <= 0xDF) {
            n = 1;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            n = 2;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            n = 3;
            cp = c & 0x07;
        } else {
            return 0;
        }
        if (len - i <= n) /* the sequence runs past the end */
            return 0;
        for (size_t k = 1; k <= n; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)) ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += n + 1;
    }
    return 1;
}

int mph_json_write_string(mph_buf_t *out, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    if (!mph_utf8_valid(s, len))
        return MPH_EINVAL;
    mph_buf_reserve(out, len + 2);
    out->data[out->len++] = '"';
    size_t run = 0; /* start of the pending run of bytes that need no escape */
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        mph_buf_append(out, s + run, i - run);
        run = i + 1;
        char esc[7] = {'\\', 0};
        size_t elen = 2;
        switch (c) {
        case '"':
            esc[1] = '"';
            break;
        case '\\':
            esc[1] = '\\';
            break;
        case '\n':
            esc[1] = 'n';
            break;
        case '\r':
            esc[1] = 'r';
            break;
        case '\t':
            esc[1] = 't';
            break;
        case '\b':
            esc[1] = 'b';
            break;
        case '\f':
            esc[1] = 'f';
            break;
        default:
            memcpy(esc + 1, "u00", 3);
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            elen = 6;
        }
        mph_buf_append(out, esc, elen);
    }
    mph_buf_append(out, s + run, len - run);
    mph_buf_append(out, "\"", 1);
    return 0;
}

void mph_json_write_number(mph_buf_t *out, double d)
{
    /* Integral and within long long (-2^63 <= d < 2^63; both bounds are exact doubles). */
    if (d == floor(d) && d >= -9223372036854775808.0 && d < 9223372036854775808.0) {
        mph_buf_put_int(out, (long long)d);
        return;
    }
    char tmp[40];
    int n;
    for (int prec = 15;; prec++) {
        n = snprintf(tmp, sizeof(tmp), "%.*g", prec, d);
        if (prec == 17 || strtod(tmp, NULL) == d)
            break;
    }
    /* %.17g fits in 40 bytes: a shortfall is a bug here. */
    assert(n > 0 && (size_t)n < sizeof(tmp));
    mph_buf_append(out, tmp, (size_t)n);
}

int mph_json_write_jansson(mph_buf_t *out, const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        const char *key;
        size_t klen;
        json_t *item;
        int first = 1;
        mph_buf_append(out, "{", 1);
        json_object_keylen_foreach((json_t *)v, key, klen, item)
        {
            if (!first)
                mph_buf_append(out, ",", 1);
            first = 0;
            if (mph_json_write_string(out, key, klen) != 0)
                return MPH_EIO;
            mph_buf_append(out, ":", 1);
            if (mph_json_write_jansson(out, item) != 0)
                return MPH_EIO;
        }
        mph_buf_append(out, "}", 1);
        return 0;
    }
    case JSON_ARRAY:
        mph_buf_append(out, "[", 1);
        for (size_t i = 0; i < json_array_size(v); i++) {
            if (i)
                mph_buf_append(out, ",", 1);
            if (mph_json_write_jansson(out, json_array_get(v, i)) != 0)
                return MPH_EIO;
        }
        mph_buf_append(out, "]", 1);
        return 0;
    case JSON_STRING:
        return mph_json_write_string(out, json_string_value(v), json_string_length(v)) ? MPH_EIO
                                                                                       : 0;
    case JSON_INTEGER:
        mph_buf_put_int(out, (long long)json_integer_value(v));
        return 0;
    case JSON_REAL:
        mph_json_write_number(out, json_real_value(v));
        return 0;
    case JSON_TRUE:
        mph_buf_append(out, "true", 4);
        return 0;
    case JSON_FALSE:
        mph_buf_append(out, "false", 5);
        return 0;
    case JSON_NULL:
        mph_buf_append(out, "null", 4);
        return 0;
    }
    return MPH_EIO;
}
