/*
 * storage_arg.c: the --storage option of the command line (cli.h).
 *
 * Its forms: "file" (in --data), "redis" (REDIS_HOST, REDIS_PORT, REDIS_PASSWORD, made into a
 * URL here), or a URL the storage layer knows (storage/storage.h). What status and the logs
 * show of it is a description without the password.
 *
 * A password in the URL ("redis://:secret@host") must not stay in our command line, which
 * every local user can read (ps, /proc/PID/cmdline), nor in our workers': the URL is copied
 * into cli->storage_url, and the password is cut out of argv in place. A supervisor hands it
 * to its workers in their environment (MPH_STORAGE_PASSWORD_ENV: /proc/PID/environ is
 * readable by our own user only), and a worker puts it back. What remains is the moment
 * between exec and the cut: REDIS_PASSWORD avoids even that.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "common/common.h"
#include "supervisor.h"
#include "storage/storage.h"

int mph_cli_resolve_storage(mph_cli_t *cli)
{
    struct mph_host_config_s *h = &cli->host;
    if (strcmp(h->storage, "file") == 0) {
        /* Absolute, so that status means something from any directory; the directory may
         * not exist yet (the store creates it). */
        char cwd[4096];
        char *abs = realpath(h->data_dir, NULL);
        const char *rel = strncmp(h->data_dir, "./", 2) == 0 ? h->data_dir + 2 : h->data_dir;
        const char *prefix = "";
        if (abs == NULL && h->data_dir[0] != '/' && getcwd(cwd, sizeof(cwd)))
            prefix = cwd;
        size_t n = strlen(prefix) + strlen(abs ? abs : rel) + 8;
        cli->storage_desc = mph_xmalloc(n);
        snprintf(cli->storage_desc, n, "file:%s%s%s", abs ? "" : prefix, *prefix ? "/" : "",
                 abs ? abs : rel);
        free(abs);
        return 0;
    }
    if (strcmp(h->storage, "redis") == 0) {
        /* REDIS_HOST, REDIS_PORT, REDIS_PASSWORD -> a redis:// URL. */
        const char *host = getenv("REDIS_HOST"), *port = getenv("REDIS_PORT");
        const char *password = getenv("REDIS_PASSWORD");
        int v6 = host && strchr(host, ':'); /* REDIS_HOST=::1 -> redis://[::1]:6379 */
        snprintf(cli->storage_url, sizeof(cli->storage_url), "redis://%s%s%s%s%s%s:%s",
                 password && *password ? ":" : "", password && *password ? password : "",
                 password && *password ? "@" : "", v6 ? "[" : "",
                 host && *host ? host : "127.0.0.1", v6 ? "]" : "", port && *port ? port : "6379");
        h->storage = cli->storage_url;
    }
    char shown[sizeof(cli->storage_url)];
    mph_url_shown(h->storage, shown, sizeof(shown));
    if (!mph_store_url_known(h->storage))
        return mph_cli_bad_usage("unknown storage: %s (expected file, redis, redis://... or "
                                 "redis-sentinel://...)",
                                 shown);
    cli->storage_desc = mph_xstrdup(shown); /* what status shows */
    return 0;
}

/* Cuts "[:password]@" out of the URL at url (len bytes, ours to write), in place, and fills
 * the bytes it freed with NULs. */
static void cut_password(char *url, size_t len)
{
    char *scheme_end = strstr(url, "://");
    char *at = strrchr(url, '@');
    if (scheme_end == NULL || at == NULL || at < scheme_end)
        return;
    char *dst = scheme_end + 3;
    size_t tail = strlen(at + 1);
    memmove(dst, at + 1, tail + 1);
    memset(dst + tail, 0, len - (size_t)(dst - url) - tail);
}

int mph_cli_hide_storage_password(mph_cli_t *cli, char **argv)
{
    const char *storage = cli->host.storage;
    const char *scheme_end = strstr(storage, "://");
    const char *at = strrchr(storage, '@');
    if (scheme_end == NULL || at == NULL || at < scheme_end)
        return 0;
    if (strlen(storage) >= sizeof(cli->storage_url))
        return mph_cli_bad_usage("%s", "--storage: the URL is too long");
    snprintf(cli->storage_url, sizeof(cli->storage_url), "%s", storage);
    const char *pw = scheme_end + 3 + (scheme_end[3] == ':');
    cli->storage_password = mph_xstrndup(pw, (size_t)(at - pw));
    for (int i = 1; argv[i]; i++) { /* "--storage=URL", or "URL" after "--storage" */
        size_t len = strlen(argv[i]);
        if (storage >= argv[i] && storage <= argv[i] + len)
            cut_password((char *)storage, len - (size_t)(storage - argv[i]));
    }
    for (int i = 0; i < cli->noptions; i++) /* what the workers will be given */
        if (strncmp(cli->options[i], "--storage=", 10) == 0)
            cut_password(cli->options[i] + 10, strlen(cli->options[i] + 10));
    cli->host.storage = cli->storage_url;
    return 0;
}

void mph_cli_restore_storage_password(mph_cli_t *cli)
{
    const char *pw = getenv(MPH_STORAGE_PASSWORD_ENV);
    const char *storage = cli->host.storage;
    const char *scheme_end = strstr(storage, "://");
    if (pw != NULL && scheme_end != NULL && strchr(storage, '@') == NULL) {
        char url[sizeof(cli->storage_url)];
        snprintf(url, sizeof(url), "%.*s:%s@%s", (int)(scheme_end + 3 - storage), storage, pw,
                 scheme_end + 3);
        memcpy(cli->storage_url, url, sizeof(url));
        cli->host.storage = cli->storage_url;
    }
    unsetenv(MPH_STORAGE_PASSWORD_ENV);
}
