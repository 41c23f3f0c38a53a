/*
 * cli.h: the mphost command line (docs/operations.md, "Command line"). main.c parses the arguments
 * into an mph_cli_t and runs one verb; deploy.c has deploy, delete and status; call.c the client.
 * Every verb returns the process exit status and prints its own one-line errors.
 */
#ifndef MPH_CLI_H
#define MPH_CLI_H

#include <stdio.h>

#include "host/server/config.h"
#include "host/server/mphost.h"

#define MPH_CLI_MAX_POSITIONAL 4 /* SCRIPT serve PORT; passwd FILE USER; call METHOD JSON */

typedef struct {
    const char *script;            /* as given on the command line */
    char *script_path;             /* canonical path (owned), NULL if the script is missing */
    const char *verb;              /* deploy, serve, delete, status, reload, logs, call */
    int follow;                    /* logs -f */
    int dead;                      /* outbox --dead */
    int port_given;                /* --port, MP_PORT or serve's PORT was given */
    struct mph_host_config_s host; /* everything the host takes (config.h; strings borrowed) */
    char *storage_desc;            /* what status prints, e.g. "file:/abs/mp-data" (owned) */
    char storage_url[1024];        /* --storage=redis made into a redis:// URL, or the URL given
                                      with a password (main.c: hide_storage_password) */
    char *storage_password;        /* that password (owned), for the workers; NULL: none */
    const char *log_level;         /* --logging */
    char *state_dir;               /* checked state directory (owned); NULL: none (serve only) */
    int workers;                   /* --workers=N; 0: one process, no supervisor; -1: not given */
    unsigned start_timeout_ms;     /* --start-timeout: deploy's wait for the server to serve */
    int replicas;                  /* manifest: --replicas, the hosts (default 1) */
    const char *image;             /* manifest: --image (default mphost:VERSION) */
    const char *name;              /* manifest: --name of the objects (default: the script's) */
    const char *argv0;             /* how we were run (workers run the same binary) */
    char **options;                /* every option applied, as "--name=value" (owned, NULL-ended):
                                      what a supervisor runs its workers with */
    int noptions;                  /* entries in options */
    const char *positional[MPH_CLI_MAX_POSITIONAL]; /* the other arguments, in order */
    int npos;                                       /* entries in positional */
    long long started; /* when serving began (time(NULL)); the pid file's started= */
    /* call */
    const char *method;
    const char *params; /* JSON text, default "[{}]" */
    const char *url;    /* default http://127.0.0.1:3000/ */
} mph_cli_t;

/* The most workers a deployment runs (--workers, mp.spread). */
#define MPH_MAX_WORKERS 256

/* "worker" or "workers", after the number n. */
#define MPH_WORKERS_WORD(n) ((n) == 1 ? "worker" : "workers")

/* ---- options.c ---- */

/* Parses argv into cli (options, -f, positionals); --help and --version print and give -1.
 * Returns 0, -1 (done: exit 0), or 1 after printing why the line is wrong. */
int mph_cli_parse(mph_cli_t *cli, int argc, char **argv);

/* Applies option --name=value (from the environment: MP_PORT). 0, or 1 after printing why not. */
int mph_cli_set_option(mph_cli_t *cli, const char *name, const char *value);

/* Frees cli->options. */
void mph_cli_free_options(mph_cli_t *cli);

/* Prints the help. */
void mph_cli_usage(FILE *out);

/* Prints "mphost: MESSAGE (see mphost --help)" on stderr; returns 1 (the exit status). */
int mph_cli_bad_usage(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- storage_arg.c ---- */

/* Makes --storage what the host takes ("redis" becomes a redis:// URL from REDIS_HOST,
 * REDIS_PORT, REDIS_PASSWORD) and fills cli->storage_desc. 0, or 1 after printing why not. */
int mph_cli_resolve_storage(mph_cli_t *cli);

/* Moves a password in --storage's URL out of argv and cli->options into cli->storage_url and
 * cli->storage_password (storage_arg.c says why). 0, or 1 after printing why not. */
int mph_cli_hide_storage_password(mph_cli_t *cli, char **argv);

/* A worker's side: takes the password its supervisor set aside (MPH_STORAGE_PASSWORD_ENV)
 * back into the URL, and out of the environment. */
void mph_cli_restore_storage_password(mph_cli_t *cli);

/* ---- serve.c ---- */

/* serve: loads the script, then becomes the supervisor of as many workers as --workers or the
 * script's topologies ask for (mph_host_topology_workers; at least 1: supervisor.h), or with
 * --workers=0 serves in this process. ready_fd
 * (-1: none) gets deploy's one line, "ready PORT" or "error MESSAGE". */
int mph_cli_serve(mph_cli_t *cli, int ready_fd);

/* Says why serving could not start: "error MSG" on the ready stream (then closed) or, in the
 * foreground, on stderr. */
void mph_cli_report_failure(FILE *ready, const char *msg);
int mph_cli_deploy(mph_cli_t *cli);
int mph_cli_delete(mph_cli_t *cli);
int mph_cli_status(mph_cli_t *cli);
/* list: one line per live deployment in the state directory (script, port, pid, storage,
 * uptime); stale pid files are removed, not listed. Exit 0, even for none. */
int mph_cli_list(mph_cli_t *cli);
/* logs: copies the deployment's log file to stdout; with cli->follow, then prints what is
 * appended (reopening the file when a rotation replaced it) until killed. Exit 1 with one line
 * on stderr when there is no log file, or several deployments and no --port. */
int mph_cli_logs(mph_cli_t *cli);
/* reload: asks the supervisor of each deployment of the script (or of --port) to swap in
 * workers running the re-read script, over its control socket (control.h), and waits for the
 * outcome. Exit 0 when every reload worked; 1 with one line on stderr when one failed (the
 * Lua error of a script that does not load), nothing runs, or a deployment has no workers. */
int mph_cli_reload(mph_cli_t *cli);
int mph_cli_call(mph_cli_t *cli);
/* outbox: lists mp.send's pending messages (cli->dead: the dead ones), read from the storage
 * the options name, as serve would open it (outbox.c says what it prints). Exit 0, or 1 with
 * one line on stderr when the storage cannot be read. */
int mph_cli_outbox(mph_cli_t *cli);

/* manifest (manifest.c): prints Kubernetes YAML that runs the script on cli->replicas hosts
 * (docs/hosts.md): Secrets, a ConfigMap, a headless Service, a Service and a StatefulSet.
 * Exit 0; 1 with one line on stderr for file storage with several replicas, a bad --name,
 * or a file it cannot read. */
int mph_cli_manifest(mph_cli_t *cli);

/* mphost passwd FILE USER (passwd.c): adds USER to the users file or replaces its hash, with
 * the password read from stdin (asked twice without echo when stdin is a terminal). */
int mph_cli_passwd(const char *path, const char *user);

/* ---- statedir.c: the state directory and the files in it ---- */

/* Finds the directory for deployments' pid, log and lock files (MP_STATE_DIR, else
 * $XDG_RUNTIME_DIR/mphost, else /tmp/mphost-UID), creating it 0700, and sets cli->state_dir.
 * Refuses (MPH_EINVAL, a message in err) a directory that is a symbolic link, belongs to
 * another user or is open to others: a planted one would let them steer our writes. */
int mph_cli_open_state_dir(mph_cli_t *cli, char *err, size_t errlen);

/* "<state dir>/<hash of script path>-<port>" + ext. New string. Needs cli->state_dir. */
char *mph_cli_deployment_file(const mph_cli_t *cli, int port, const char *ext);

/* One worker of a supervised deployment, as the pid file records it for status. */
typedef struct {
    int id;            /* 1..count */
    int pid;           /* 0 while it is being replaced */
    long long started; /* time(NULL) when this process of it was started */
    int restarts;      /* processes started for this id after the first */
} mph_cli_worker_t;

/* Writes the pid file of a serving host (0, or MPH_EIO with a message in err), listing
 * `nworkers` workers (a supervisor's; NULL, 0 for a single process); removes it if it is still
 * this process's. Need cli->state_dir. */
int mph_cli_write_pidfile(const mph_cli_t *cli, int port, const char *log_path,
                          const mph_cli_worker_t *workers, int nworkers, char *err, size_t errlen);
void mph_cli_remove_pidfile(const mph_cli_t *cli, int port);

/* Opens a file of the state directory without following a symbolic link (the directory is
 * ours, but a link in it must not redirect a write), close-on-exec, 0600 if created. */
int mph_cli_open_state_file(const char *path, int flags);
FILE *mph_cli_fopen_state_file(const char *path); /* for reading */

/* Serializes deploy and delete of one script: without it, two deploys could both find nothing
 * running, and a delete could find nothing while a deploy is starting and then leave it
 * running. Blocks until the other side is done (a deploy is bounded by its start timeout).
 * Returns the locked fd (close it to release) or -1 with a message in err. */
int mph_cli_lock_script(const mph_cli_t *cli, char *err, size_t errlen);

/* A deployment as its pid file describes it. */
typedef struct {
    int pid;
    int port;
    long long started;
    int nworkers; /* 0: a single process */
    mph_cli_worker_t workers[MPH_MAX_WORKERS];
    char storage[2048];
    char log[2048];
    char script[4096];
    char path[4096]; /* the pid file */
} mph_cli_deployment_t;

/* The live deployments whose pid files in dir are named base-PORT.pid (base NULL: every one;
 * port 0: any port); removes the stale pid files met. *out: new array. Returns how many. */
int mph_cli_scan_deployments(const char *dir, const char *base, int port,
                             mph_cli_deployment_t **out);

/* Is pid a live (not zombie) mphost process? Guards against a recycled pid. */
int mph_cli_is_alive_mphost(int pid);

/* The deployments of cli's script (all ports, or the one port given). */
int mph_cli_find_deployments(const mph_cli_t *cli, mph_cli_deployment_t **out);

#endif
