/*
 * redis_route.c: where Redis commands go (see redis_route.h): Sentinel's answer for a master,
 * checked with ROLE, and Cluster hash slots.
 *
 * The Sentinel lookup is blocking on purpose: it runs once at start (before the loop) and
 * then only on libuv's thread pool (storage/redis.c's RESOLVING state), so a slow or dead
 * sentinel costs a pool thread for at most its timeout, never the loop. Every sentinel is
 * asked in turn until one names a server that says ROLE master: a sentinel that missed the
 * last failover names the old master, now a replica, and is passed over.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <hiredis/hiredis.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <uv.h>

#include "redis_route.h"
#include "storage.h"

/* ---- Address lists ---- */

/* One "host:port" (IPv6 in brackets) into *a, resolving a name. Returns 0 or -1 + err. */
static int parse_one(char *item, mph__redis_addr_t *a, char *err, size_t errlen)
{
    char *host = item, *colon;
    if (item[0] == '[') {
        char *close = strchr(item, ']');
        if (close == NULL || close[1] != ':') {
            snprintf(err, errlen, "invalid address \"%s\" (expected [v6]:port)", item);
            return -1;
        }
        *close = '\0';
        host = item + 1;
        colon = close + 1;
    } else {
        colon = strrchr(item, ':');
        if (colon == NULL || strchr(item, ':') != colon) {
            snprintf(err, errlen, "invalid address \"%s\" (expected host:port)", item);
            return -1;
        }
    }
    *colon = '\0';
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*host == '\0' || colon[1] == '\0' || *end != '\0' || port <= 0 || port > 65535) {
        snprintf(err, errlen, "invalid host or port in \"%s:%s\"", host, colon + 1);
        return -1;
    }
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int gai = getaddrinfo(host, NULL, &hints, &res);
    if (gai != 0) {
        snprintf(err, errlen, "cannot resolve %s: %s", host,
                 gai == EAI_SYSTEM ? strerror(errno) : gai_strerror(gai));
        return -1;
    }
    int rc = -1;
    for (struct addrinfo *ai = res; ai && rc != 0; ai = ai->ai_next) {
        if (ai->ai_family == AF_INET)
            rc = uv_ip4_name((struct sockaddr_in *)ai->ai_addr, a->host, sizeof(a->host));
        else if (ai->ai_family == AF_INET6)
            rc = uv_ip6_name((struct sockaddr_in6 *)ai->ai_addr, a->host, sizeof(a->host));
    }
    freeaddrinfo(res);
    if (rc != 0)
        snprintf(err, errlen, "%s has no IPv4 or IPv6 address", host);
    a->port = (int)port;
    return rc == 0 ? 0 : -1;
}

int mph__redis_parse_addrs(const char *list, mph__redis_addr_t **out, size_t *n, char *err,
                           size_t errlen)
{
    char *copy = mph_xstrdup(list);
    size_t cap = 1;
    for (const char *p = list; *p; p++)
        cap += *p == ',';
    mph__redis_addr_t *addrs = mph_xcalloc(cap, sizeof(*addrs));
    size_t count = 0;
    char *save = NULL;
    int rc = 0;
    for (char *item = strtok_r(copy, ",", &save); item && rc == 0;
         item = strtok_r(NULL, ",", &save))
        rc = parse_one(item, &addrs[count++], err, errlen);
    free(copy);
    if (rc == 0 && count == 0) {
        snprintf(err, errlen, "no address in \"%s\"", list);
        rc = -1;
    }
    if (rc != 0) {
        free(addrs);
        return MPH_EINVAL;
    }
    *out = addrs;
    *n = count;
    return 0;
}

/* ---- Sentinel ---- */

/* A blocking connection to a (`what` names it in err), every step limited to timeout_ms,
 * or NULL with why in err. */
static redisContext *connect_blocking(const mph__redis_addr_t *a, const char *what,
                                      unsigned timeout_ms, char *err, size_t errlen)
{
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    redisContext *c = redisConnectWithTimeout(a->host, a->port, tv);
    if (c == NULL || c->err) {
        snprintf(err, errlen, "%s %s:%d: %s", what, a->host, a->port,
                 c ? c->errstr : "out of memory");
        if (c)
            redisFree(c);
        return NULL;
    }
    redisSetTimeout(c, tv);
    return c;
}

/* Asks one sentinel. Returns 0 and *out, or -1 with why in err. */
static int ask_sentinel(const mph__redis_addr_t *s, const char *name, unsigned timeout_ms,
                        mph__redis_addr_t *out, char *err, size_t errlen)
{
    redisContext *c = connect_blocking(s, "sentinel", timeout_ms, err, errlen);
    if (c == NULL)
        return -1;
    redisReply *r = redisCommand(c, "SENTINEL get-master-addr-by-name %s", name);
    int rc = -1;
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
        r->element[0]->type == REDIS_REPLY_STRING && r->element[1]->type == REDIS_REPLY_STRING &&
        r->element[0]->len < sizeof(out->host)) {
        snprintf(out->host, sizeof(out->host), "%s", r->element[0]->str);
        out->port = atoi(r->element[1]->str);
        rc = out->port > 0 && out->port <= 65535 ? 0 : -1;
    }
    if (rc != 0)
        snprintf(err, errlen, "sentinel %s:%d does not know master \"%s\"%s%s", s->host, s->port,
                 name, r && r->type == REDIS_REPLY_ERROR ? ": " : "",
                 r && r->type == REDIS_REPLY_ERROR ? r->str : "");
    if (r)
        freeReplyObject(r);
    redisFree(c);
    return rc;
}

/* Whether the server at a says ROLE master. Returns 0, or -1 with why in err. */
static int check_master(const mph__redis_addr_t *a, const char *password, unsigned timeout_ms,
                        char *err, size_t errlen)
{
    redisContext *c = connect_blocking(a, "master", timeout_ms, err, errlen);
    if (c == NULL)
        return -1;
    redisReply *r = NULL;
    if (password) {
        r = redisCommand(c, "AUTH %s", password);
        if (r == NULL || r->type == REDIS_REPLY_ERROR) {
            snprintf(err, errlen, "master %s:%d refused AUTH: %s", a->host, a->port,
                     r ? r->str : c->errstr);
            if (r)
                freeReplyObject(r);
            redisFree(c);
            return -1;
        }
        freeReplyObject(r);
    }
    r = redisCommand(c, "ROLE");
    int rc = -1;
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements > 0 &&
        r->element[0]->type == REDIS_REPLY_STRING && strcmp(r->element[0]->str, "master") == 0)
        rc = 0;
    else
        snprintf(err, errlen, "%s:%d, named master by Sentinel, is not a master (ROLE: %s)",
                 a->host, a->port,
                 r && r->type == REDIS_REPLY_ARRAY && r->elements > 0 &&
                         r->element[0]->type == REDIS_REPLY_STRING
                     ? r->element[0]->str
                 : r ? "unexpected reply"
                     : c->errstr);
    if (r)
        freeReplyObject(r);
    redisFree(c);
    return rc;
}

int mph__sentinel_locate(const mph__redis_addr_t *sentinels, size_t n, size_t first,
                         const char *name, const char *password, unsigned timeout_ms,
                         mph__redis_addr_t *out, char *err, size_t errlen)
{
    for (size_t i = 0; i < n; i++) {
        const mph__redis_addr_t *s = &sentinels[(first + i) % n];
        if (ask_sentinel(s, name, timeout_ms, out, err, errlen) == 0 &&
            check_master(out, password, timeout_ms, err, errlen) == 0)
            return 0;
    }
    return MPH_ESTORAGE;
}

/* ---- Cluster slots ---- */

/* CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), which Redis Cluster uses. */
static unsigned crc16(const char *buf, size_t len)
{
    unsigned crc = 0;
    for (size_t i = 0; i < len; i++) {
        crc ^= (unsigned)(unsigned char)buf[i] << 8;
        for (int b = 0; b < 8; b++)
            crc = crc & 0x8000 ? ((crc << 1) ^ 0x1021) & 0xffff : (crc << 1) & 0xffff;
    }
    return crc;
}

int mph__redis_name_tag(const char *name, size_t *at, size_t *len)
{
    return mph_hash_tag(name, strlen(name), at, len) ? 0 : -1;
}

unsigned mph__redis_key_slot(const char *key, size_t len)
{
    size_t at, tlen;
    if (mph_hash_tag(key, len, &at, &tlen))
        return crc16(key + at, tlen) & (MPH_REDIS_SLOTS - 1);
    return crc16(key, len) & (MPH_REDIS_SLOTS - 1);
}
