/*
 * redis_url.c: the Redis backend's URL schemes (storage.h: mph_store_open):
 *
 *   redis://[:password@]host[:port][/db]              an IPv6 host in brackets: [::1]:6380
 *   redis-sentinel://[:password@]host:port[,host:port...]/MASTER
 *                                                     the master MASTER as those sentinels
 *                                                     name it (the password is the master's)
 *
 * Messages never show the password: they may reach logs and terminals.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "storage.h"

/* The Redis options common to every URL form. */
static mph_store_redis_config_t redis_config(const mph_store_options_t *o)
{
    mph_store_redis_config_t rc = {0};
    rc.host = "127.0.0.1";
    rc.port = 6379;
    rc.prefix = o->redis_prefix;
    rc.timeout_ms = o->redis_timeout_ms;
    rc.wait_replicas = o->redis_wait_replicas;
    rc.wait_ms = o->redis_wait_ms;
    return rc;
}

/* Splits "[:password@]rest" in buf (cut in place): returns rest; *password is NULL when
 * there is none or it is empty. */
static char *take_password(char *buf, const char **password)
{
    char *at = strrchr(buf, '@');
    *password = NULL;
    if (at == NULL)
        return buf;
    *at = '\0';
    *password = buf[0] == ':' ? buf + 1 : buf;
    if (**password == '\0')
        *password = NULL;
    return at + 1;
}

/* redis-sentinel://[:password@]host:port[,host:port...]/MASTER -> the Redis backend, its
 * master named by those sentinels (the password is the master's). */
static int open_sentinel(mph_store_t **out, uv_loop_t *loop, const char *url,
                         const mph_store_options_t *o, char *err, size_t errlen)
{
    char buf[1024], shown[1024];
    snprintf(buf, sizeof(buf), "%s", url + strlen("redis-sentinel://"));
    mph_url_shown(url, shown, sizeof(shown));
    mph_store_redis_config_t rc = redis_config(o);
    char *list = take_password(buf, &rc.password);
    char *slash = strrchr(list, '/');
    if (slash == NULL || slash[1] == '\0' || slash == list) {
        snprintf(err, errlen,
                 "invalid %s (expected redis-sentinel://host:port[,host:port...]/MASTER)", shown);
        return MPH_EINVAL;
    }
    *slash = '\0';
    rc.sentinels = list;
    rc.master = slash + 1;
    return mph_store_redis_open(out, loop, &rc, err, errlen);
}

/* redis://[:password@]host[:port][/db] -> the Redis backend. An IPv6 host is in brackets:
 * redis://[::1]:6380. */
static int open_redis(mph_store_t **out, uv_loop_t *loop, const char *url,
                      const mph_store_options_t *o, char *err, size_t errlen)
{
    char buf[1024], shown[1024];
    snprintf(buf, sizeof(buf), "%s", url + strlen("redis://"));
    mph_url_shown(url, shown, sizeof(shown));
    mph_store_redis_config_t rc = redis_config(o);
    char *hostpart = take_password(buf, &rc.password);
    char *slash = strchr(hostpart, '/');
    if (slash) {
        *slash = '\0';
        char *end;
        long db = strtol(slash + 1, &end, 10);
        if (slash[1] != '\0' && (*end != '\0' || db < 0 || db > 1000000)) {
            snprintf(err, errlen, "invalid Redis database in %s", shown);
            return MPH_EINVAL;
        }
        rc.db = (int)db;
    }
    char *colon = strrchr(hostpart, ':');
    if (hostpart[0] == '[') {
        char *close = strchr(hostpart, ']');
        if (close == NULL || close == hostpart + 1 || (close[1] != '\0' && close[1] != ':')) {
            snprintf(err, errlen, "invalid IPv6 address in %s", shown);
            return MPH_EINVAL;
        }
        *close = '\0';
        colon = close[1] == ':' ? close + 1 : NULL;
        hostpart++;
    } else if (colon && strchr(hostpart, ':') != colon) {
        snprintf(err, errlen, "an IPv6 address in %s needs brackets: redis://[::1]:6379", shown);
        return MPH_EINVAL;
    }
    if (colon) {
        *colon = '\0';
        char *end;
        long port = strtol(colon + 1, &end, 10);
        if (*end != '\0' || port <= 0 || port > 65535) {
            snprintf(err, errlen, "invalid Redis port in %s", shown);
            return MPH_EINVAL;
        }
        rc.port = (int)port;
    }
    if (*hostpart)
        rc.host = hostpart;
    return mph_store_redis_open(out, loop, &rc, err, errlen);
}

const mph_store_backend_t mph_store_redis_backend = {"redis://", open_redis};
const mph_store_backend_t mph_store_sentinel_backend = {"redis-sentinel://", open_sentinel};
