/*
 * storage.c: the registry of backends (storage.h: mph_store_open): which backend takes which
 * URL, and how a URL may be shown.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>

#include "storage.h"

extern const mph_store_backend_t mph_store_file_backend;
extern const mph_store_backend_t mph_store_redis_backend;
extern const mph_store_backend_t mph_store_sentinel_backend;

static const mph_store_backend_t *const backends[] = {
    &mph_store_file_backend,
    &mph_store_redis_backend,
    &mph_store_sentinel_backend,
};

static const mph_store_backend_t *find(const char *url)
{
    for (size_t i = 0; i < sizeof(backends) / sizeof(backends[0]); i++) {
        const char *scheme = backends[i]->scheme;
        size_t n = strlen(scheme);
        /* "file" is a whole word; "redis://" a prefix. */
        if (strncmp(url, scheme, n) == 0 && (scheme[n - 1] == '/' || url[n] == '\0'))
            return backends[i];
    }
    return NULL;
}

int mph_store_url_known(const char *url)
{
    return find(url) != NULL;
}

int mph_store_open(mph_store_t **out, uv_loop_t *loop, const char *url,
                   const mph_store_options_t *opts, char *err, size_t errlen)
{
    const mph_store_backend_t *b = find(url);
    if (b == NULL) {
        char shown[1024];
        mph_url_shown(url, shown, sizeof(shown));
        snprintf(err, errlen,
                 "unknown storage \"%s\" (expected file, redis://... or redis-sentinel://...)",
                 shown);
        return MPH_EINVAL;
    }
    return b->open(out, loop, url, opts, err, errlen);
}
