/*
 * options.c: the command line (cli.h: mph_cli_parse). Options are rows (config.h): the host's
 * own, which the embedding API takes by the same names (config.c), and the few that only the
 * command line has (cli_options). Parsing (getopt_long), the range in an error message and
 * the usage text all read the rows, so a new option is one row, and a range is written once.
 *
 * Every option that was applied is also kept as "--name=value" (cli->options): a supervisor
 * starts its workers with exactly those, whatever spelling the user chose ("--port 80",
 * "--port=80").
 */
#define _GNU_SOURCE
#include <assert.h>
#include <getopt.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "common/common.h"
#include "host/server/config.h"

#define FIELD(f) offsetof(mph_cli_t, f), sizeof(((mph_cli_t *)0)->f)

/* The command line's own options; the host's are config.c's rows (into cli->host). */
static const mph_option_t cli_options[] = {
    {"start-timeout", MPH_OPT_SECONDS, 100, 86400 * 1000, FIELD(start_timeout_ms), NULL, NULL,
     "SEC", "deploy stops a server that is not serving by then (default 60)"},
    {"workers", MPH_OPT_INT, 0, MPH_MAX_WORKERS, FIELD(workers), NULL, NULL, "N",
     "serve with N worker processes under a supervisor (default:\n"
     "the largest n of the script's mp.spread, mp.shard and\n"
     "mp.scatter, else 1); 0: one process, no supervisor (for debugging\n"
     "and benchmarks; LuaJIT's compiler is then off while a handler\n"
     "limit is set)"},
    {"url", MPH_OPT_STRING, 0, 0, FIELD(url), NULL, "a URL", "URL",
     "call's server (default http://127.0.0.1:3000/)"},
    {"replicas", MPH_OPT_INT, 1, 1000, FIELD(replicas), NULL, NULL, "H",
     "manifest: the hosts (pods) to run (default 1)"},
    {"image", MPH_OPT_STRING, 0, 0, FIELD(image), NULL, "an image", "IMAGE",
     "manifest: the container image (default mphost:" MPHOST_VERSION ", ./dev image)"},
    {"name", MPH_OPT_STRING, 0, 0, FIELD(name), NULL, "a name", "NAME",
     "manifest: the Kubernetes objects' name (default: the script's)"},
};

#define NCLI (sizeof(cli_options) / sizeof(cli_options[0]))

static const char verbs_usage[] =
    "usage: mphost SCRIPT [deploy] [options]    start SCRIPT's services in the background\n"
    "       mphost SCRIPT serve [PORT] [options] run in the foreground, logs to stderr\n"
    "       mphost SCRIPT delete [--port=N]      stop that deployment gracefully\n"
    "       mphost SCRIPT status [--port=N]      is it running: pid, port, storage, uptime\n"
    "       mphost SCRIPT reload [--port=N]      swap in workers running the re-read script\n"
    "       mphost SCRIPT logs [-f] [--port=N]   print its log file (-f: and follow it)\n"
    "       mphost list                          every deployment of this user\n"
    "       mphost call METHOD [JSON] [--url URL]\n"
    "                                            call METHOD with params JSON (default [{}])\n"
    "       mphost passwd FILE USER              add or replace USER in a users file (the\n"
    "                                            password from stdin, or asked twice at a tty)\n"
    "       mphost SCRIPT manifest [--replicas=H] [--image=IMAGE] [--storage=URL] [--name=NAME]\n"
    "                                            print Kubernetes objects that run SCRIPT\n"
    "       mphost SCRIPT outbox [--dead]        list mp.send's pending (or dead) messages\n"
    "options (--name=VALUE or --name VALUE):\n";

void mph_cli_usage(FILE *out)
{
    size_t n;
    const mph_option_t *host = mph_config_options(&n);
    fputs(verbs_usage, out);
    mph_options_usage(out, host, n);
    mph_options_usage(out, cli_options, NCLI);
    fputs("  --help, --version\n", out);
}

int mph_cli_bad_usage(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "mphost: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, " (see mphost --help)\n");
    va_end(ap);
    return 1;
}

/* Applies one option (a row of cli_options, or of the host's into cli->host) and keeps it
 * for the workers. Returns 0, or prints why not and returns 1. */
static int apply(mph_cli_t *cli, const mph_option_t *o, int of_host, const char *value)
{
    char err[512];
    if (mph_option_apply(of_host ? (void *)&cli->host : (void *)cli, o, value, err, sizeof(err)) !=
        0)
        return mph_cli_bad_usage("%s", err);
    if (of_host && strcmp(o->name, "port") == 0)
        cli->port_given = 1;
    if (of_host && strcmp(o->name, "logging") == 0)
        cli->log_level = value;
    char *kept = mph_xmalloc(strlen(o->name) + strlen(value) + 4);
    sprintf(kept, "--%s=%s", o->name, value);
    cli->options = mph_xrealloc(cli->options, (size_t)(cli->noptions + 2) * sizeof(char *));
    cli->options[cli->noptions++] = kept;
    cli->options[cli->noptions] = NULL;
    return 0;
}

int mph_cli_set_option(mph_cli_t *cli, const char *name, const char *value)
{
    size_t n;
    const mph_option_t *host = mph_config_options(&n);
    const mph_option_t *o = mph_options_find(host, n, name);
    if (o)
        return apply(cli, o, 1, value);
    if ((o = mph_options_find(cli_options, NCLI, name)) != NULL)
        return apply(cli, o, 0, value);
    return mph_cli_bad_usage("unknown option --%s", name);
}

/* ---- The command line ---- */

enum { LONG_HELP = 1000, LONG_VERSION, LONG_DEAD, LONG_FIRST_OPTION };

/* Applies getopt_long's option number k: the host's rows first, then cli_options. */
static int apply_nth(mph_cli_t *cli, size_t k, const char *value)
{
    size_t nhost;
    const mph_option_t *host = mph_config_options(&nhost);
    return k < nhost ? apply(cli, &host[k], 1, value)
                     : apply(cli, &cli_options[k - nhost], 0, value);
}

static const char *nth_name(size_t k)
{
    size_t nhost;
    const mph_option_t *host = mph_config_options(&nhost);
    return k < nhost ? host[k].name : cli_options[k - nhost].name;
}

int mph_cli_parse(mph_cli_t *cli, int argc, char **argv)
{
    size_t nhost, n;
    mph_config_options(&nhost);
    n = nhost + NCLI;
    struct option *longs = mph_xcalloc(n + 4, sizeof(*longs));
    for (size_t k = 0; k < n; k++)
        longs[k] =
            (struct option){nth_name(k), required_argument, NULL, LONG_FIRST_OPTION + (int)k};
    longs[n] = (struct option){"help", no_argument, NULL, LONG_HELP};
    longs[n + 1] = (struct option){"version", no_argument, NULL, LONG_VERSION};
    longs[n + 2] = (struct option){"dead", no_argument, NULL, LONG_DEAD};
    opterr = 0; /* our own messages */
    /* Options may come anywhere on the line (docs/operations.md, "Command line"): with "-" first,
     * getopt_long hands each positional back where it stands (as code 1), so they keep their order;
     * ":" tells a missing value (':') from an unknown option ('?'). */
    int c, rc = 0;
    while (rc == 0 && (c = getopt_long(argc, argv, "-:hf", longs, NULL)) != -1) {
        if (c == 1) { /* a positional, in its place */
            if (cli->npos == MPH_CLI_MAX_POSITIONAL)
                rc = mph_cli_bad_usage("unexpected argument: %s", optarg);
            else
                cli->positional[cli->npos++] = optarg;
        } else if (c == 'h' || c == LONG_HELP) {
            mph_cli_usage(stdout);
            rc = -1;
        } else if (c == LONG_VERSION) {
            printf("mphost %s\n", MPHOST_VERSION);
            rc = -1;
        } else if (c == 'f') {
            cli->follow = 1;
        } else if (c == LONG_DEAD) {
            cli->dead = 1;
        } else if (c >= LONG_FIRST_OPTION) {
            rc = apply_nth(cli, (size_t)(c - LONG_FIRST_OPTION), optarg);
        } else if (c == ':' && optopt >= LONG_FIRST_OPTION) {
            rc = mph_cli_bad_usage("option --%s needs a value",
                                   nth_name((size_t)(optopt - LONG_FIRST_OPTION)));
        } else {
            const char *bad = argv[optind - 1];
            rc = mph_cli_bad_usage("unknown option %.*s", (int)strcspn(bad, "="), bad);
        }
    }
    free(longs);
    return rc;
}

void mph_cli_free_options(mph_cli_t *cli)
{
    for (int i = 0; i < cli->noptions; i++)
        free(cli->options[i]);
    free(cli->options);
    cli->options = NULL;
    cli->noptions = 0;
}
