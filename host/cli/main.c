/*
 * main.c: the mphost program's entry: parses the line (options.c) and runs one verb. The
 * verbs are two tables: those that come first (call, passwd, list) and those that follow a
 * script (deploy, serve, delete, status, reload, logs, manifest, outbox). Each verb returns the
 * exit status and prints its own one-line errors.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "common/common.h"
#include "supervisor.h"
#include "worker.h"

/* ---- Verbs without a script ---- */

static int run_call(mph_cli_t *cli)
{
    cli->method = cli->positional[1];
    if (cli->npos == 3)
        cli->params = cli->positional[2];
    return mph_cli_call(cli);
}

static int run_passwd(mph_cli_t *cli)
{
    return mph_cli_passwd(cli->positional[1], cli->positional[2]);
}

static int run_list(mph_cli_t *cli)
{
    char err[1200];
    int rc = mph_cli_open_state_dir(cli, err, sizeof(err));
    if (rc != 0)
        fprintf(stderr, "mphost: %s\n", err);
    else
        rc = mph_cli_list(cli);
    return rc ? 1 : 0;
}

typedef struct {
    const char *name;
    int min_args, max_args; /* positionals after the verb */
    int (*run)(mph_cli_t *cli);
    const char *usage;
} command_t;

static const command_t commands[] = {
    {"call", 1, 2, run_call, "mphost call METHOD [JSON] [--url URL]"},
    {"passwd", 2, 2, run_passwd, "mphost passwd FILE USER"},
    {"list", 0, 0, run_list, "mphost list"},
};

/* ---- Verbs of a script ---- */

static int run_serve(mph_cli_t *cli)
{
    /* A worker of a supervisor (supervisor.h) serves as its supervisor says. */
    const char *worker = getenv(MPH_WORKER_ENV);
    return worker ? mph_worker_serve(cli, worker) : mph_cli_serve(cli, -1);
}

typedef struct {
    const char *name;
    int max_args;    /* positionals after the verb (serve's PORT) */
    int may_be_gone; /* works on a deployment whose script was deleted since */
    int (*run)(mph_cli_t *cli);
} script_verb_t;

static const script_verb_t script_verbs[] = {
    {"deploy", 0, 0, mph_cli_deploy},     {"serve", 1, 0, run_serve},
    {"delete", 0, 1, mph_cli_delete},     {"status", 0, 1, mph_cli_status},
    {"reload", 0, 1, mph_cli_reload},     {"logs", 0, 1, mph_cli_logs},
    {"manifest", 0, 0, mph_cli_manifest}, {"outbox", 0, 0, mph_cli_outbox},
};

/* Runs a verb of cli->positional[0], the script. */
static int run_script_verb(mph_cli_t *cli)
{
    cli->script = cli->positional[0];
    cli->verb = cli->npos > 1 ? cli->positional[1] : "deploy";
    const script_verb_t *v = NULL;
    for (size_t i = 0; i < sizeof(script_verbs) / sizeof(script_verbs[0]); i++)
        if (strcmp(script_verbs[i].name, cli->verb) == 0)
            v = &script_verbs[i];
    if (v == NULL)
        return mph_cli_bad_usage("unknown command: %s", cli->verb);
    if (cli->npos > 2 + v->max_args)
        return mph_cli_bad_usage("unexpected argument: %s", cli->positional[cli->npos - 1]);
    if (cli->npos == 3 && mph_cli_set_option(cli, "port", cli->positional[2]) != 0)
        return 1;
    if (cli->follow && strcmp(cli->verb, "logs") != 0)
        return mph_cli_bad_usage("%s", "-f is an option of logs");
    if (cli->dead && strcmp(cli->verb, "outbox") != 0)
        return mph_cli_bad_usage("%s", "--dead is an option of outbox");
    cli->script_path = realpath(cli->script, NULL);
    if (cli->script_path == NULL && !v->may_be_gone) {
        fprintf(stderr, "mphost: cannot open script %s: %s\n", cli->script, strerror(errno));
        return 1;
    }
    if (cli->script_path == NULL) /* a deleted script can still be stopped by its path */
        cli->script_path = mph_xstrdup(cli->script);
    if (mph_cli_resolve_storage(cli) != 0)
        return 1;
    /* manifest prints objects, outbox reads the storage: no deployment here, no state */
    if (v->run == mph_cli_manifest || v->run == mph_cli_outbox)
        return v->run(cli);
    int worker = v->run == run_serve && getenv(MPH_WORKER_ENV) != NULL;
    if (worker) {
        mph_cli_restore_storage_password(cli);
    } else {
        /* The supervisor keeps the pid file, not its workers. */
        char err[1200];
        if (mph_cli_open_state_dir(cli, err, sizeof(err)) != 0) {
            if (v->run != run_serve) {
                fprintf(stderr, "mphost: %s\n", err);
                return 1;
            }
            /* In the foreground the pid file only lets status see this server: go without. */
            mph_log(MPH_LOG_WARN, "%s; serving without a pid file", err);
        }
    }
    return v->run(cli);
}

/* Defaults, then the environment's options, then the line's. 0, -1 (done), or 1. */
static int configure(mph_cli_t *cli, int argc, char **argv)
{
    mph_config_init(&cli->host);
    cli->params = "[{}]";
    cli->argv0 = argv[0];
    cli->url = "http://127.0.0.1:3000/";
    cli->workers = -1;
    cli->start_timeout_ms = 60000;
    cli->replicas = 1;
    cli->image = "mphost:" MPHOST_VERSION;
    cli->host.log_path = getenv("MPH_LOG_PATH"); /* set by deploy: SIGUSR1 reopens it */
    const char *env = getenv("MP_PORT");
    if (env && mph_cli_set_option(cli, "port", env) != 0)
        return 1;
    env = getenv("MP_DATA");
    if (env)
        cli->host.data_dir = env;
    int rc = mph_cli_parse(cli, argc, argv);
    if (rc == 0)
        rc = mph_cli_hide_storage_password(cli, argv);
    return rc;
}

int main(int argc, char **argv)
{
    /* The library leaves signal dispositions to its embedder (mphost.h); this program wants
     * a write to a vanished client or a full file to be an error, not death. */
    signal(SIGPIPE, SIG_IGN);
    signal(SIGXFSZ, SIG_IGN);
    mph_cli_t cli;
    memset(&cli, 0, sizeof(cli));
    int rc = configure(&cli, argc, argv);
    if (rc == 0 && cli.npos == 0) {
        mph_cli_usage(stderr);
        rc = 1;
    } else if (rc == 0) {
        const command_t *c = NULL;
        for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
            if (strcmp(commands[i].name, cli.positional[0]) == 0)
                c = &commands[i];
        if (c && (cli.npos - 1 < c->min_args || cli.npos - 1 > c->max_args))
            rc = mph_cli_bad_usage("usage: %s", c->usage);
        else
            rc = c ? c->run(&cli) : run_script_verb(&cli);
    }
    mph_cli_free_options(&cli);
    free(cli.storage_password);
    free(cli.script_path);
    free(cli.storage_desc);
    free(cli.state_dir);
    return rc < 0 ? 0 : rc;
}
