/*
 * embed.c: a C program that embeds mphost through its public header: it serves a Lua
 * service given as a string (or a file named on the command line) until SIGINT or SIGTERM.
 *
 *   embed [PORT] [SCRIPT.lua]
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

#include "mphost.h"

static const char service[] =
    "local mp = require('metaparticle')\n"
    "local svc = mp.service('hello', function(who)\n"
    "  return { greeting = 'hello, ' .. tostring(who and who.name or 'world') }\n"
    "end)\n"
    "svc.expose = true\n"
    "mp.serve()\n";

int main(int argc, char **argv)
{
    /* libuv writes to sockets with write(2): a client that disconnects mid-response would
     * raise SIGPIPE and end the program (mphost.h). EMBED_KEEP_SIGPIPE=1 leaves it alone, so
     * that a test can see the library does not change it by itself. */
    const char *keep = getenv("EMBED_KEEP_SIGPIPE");
    if (keep == NULL || *keep != '1')
        signal(SIGPIPE, SIG_IGN);
    char err[1024];
    mph_host_config_t *cfg;
    mph_host_config_new(&cfg);
    int rc = mph_host_config_set(cfg, "listen", "127.0.0.1", err, sizeof(err));
    if (rc == 0)
        rc = mph_host_config_set(cfg, "port", argc > 1 ? argv[1] : "8080", err, sizeof(err));
    if (rc == 0)
        rc = mph_host_config_set(cfg, "data", "./embed-data", err, sizeof(err));
    mph_host_t *host = NULL;
    if (rc == 0)
        rc = mph_host_new(&host, cfg, err, sizeof(err));
    mph_host_config_free(cfg); /* the host has its own copy */
    if (rc != 0) {
        fprintf(stderr, "embed: %s\n", err);
        return 1;
    }
    rc = argc > 2 ? mph_host_load_file(host, argv[2], err, sizeof(err))
                  : mph_host_load_string(host, "hello.lua", service, err, sizeof(err));
    if (rc == 0)
        rc = mph_host_listen(host, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "embed: %s\n", err);
        mph_host_free(host);
        return 1;
    }
    mph_host_handle_signals(host);
    printf("embed: serving on port %d\n", mph_host_port(host));
    fflush(stdout);
    mph_host_run(host);
    mph_host_free(host);
    return 0;
}
