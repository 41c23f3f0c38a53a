/*
 * manifest.c: `mphost SCRIPT manifest [--replicas=H] [--image=IMAGE] [--storage=URL]
 * [--name=NAME]` (cli.h): prints the Kubernetes objects that run SCRIPT on H hosts
 * (docs/hosts.md, "Running on Kubernetes"), YAML for `kubectl apply -f -` as it is:
 *
 *   Secret NAME-peer       the secret the hosts sign their calls with (--peer-secret-file's
 *                          content, or 32 random bytes made here)
 *   Secret NAME-storage    the Redis URL (with its password): the pods read it from here,
 *                          never from their spec or their arguments (Redis only)
 *   Secret NAME-users      the users file (--users), for mp.basicAuth
 *   ConfigMap NAME-script  the script
 *   Service NAME-headless  the stable names NAME-K.NAME-headless that --peers lists; it
 *                          publishes pods that are not ready, so hosts find each other while
 *                          they start
 *   Service NAME           port 80 to the pods' port, for clients
 *   StatefulSet NAME       H pods, each `mphost SCRIPT serve` with --peers and its host id
 *                          from its name (NAME-K is host K + 1, hosts.h); readiness /readyz,
 *                          liveness /healthz, Prometheus scrape annotations, resources; with
 *                          file storage (one replica only) a volumeClaimTemplate for its data
 *
 * Every field is one the Kubernetes API knows, with its type (spec/test_manifest.py checks
 * them against the python3-kubernetes models). The YAML is written here, not by a library:
 * block style, strings quoted unless plainly safe, the script as a literal block when it can
 * be one and as a double-quoted string when not (a leading space, control characters), and as
 * binaryData when it is not UTF-8. Nothing is read from a cluster: the output depends on the
 * command line and the files only (and on the random peer secret, unless given).
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cli.h"
#include "common/common.h"
#include "common/json.h"

#define NAME_MAX_LEN 52          /* a StatefulSet's name: its pods' revision label must fit 63 */
#define FILE_MAX (1 << 20)       /* bytes of the script or the users file (a ConfigMap's limit) */
#define SECRET_BYTES 32          /* of a peer secret made here */
#define DATA_DIR "/data/mp-data" /* file storage, in the volume claimed for it */
#define UID 10001                /* the image's user (./dev image) */

/* What the objects are made of. */
typedef struct {
    const mph_cli_t *cli;
    const char *name; /* the objects' name */
    int replicas;     /* hosts */
    int port;         /* the pods' port */
    int redis;        /* the storage is a URL (Redis), not file */
    char key[256];    /* the script's name in the ConfigMap (and in the pod) */
    char *script;     /* its text (owned) */
    size_t script_len;
    char *users; /* the users file's text (owned), or NULL */
    size_t users_len;
    char *secret; /* the peer secret (owned) */
    size_t secret_len;
    char script_sha[65]; /* the script's SHA-256: a new script rolls the pods */
    mph_buf_t out;       /* the YAML */
} manifest_t;

/* ---- YAML ---- */

static void put(manifest_t *m, int indent, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* One line at `indent` spaces. */
static void put(manifest_t *m, int indent, const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    mph_buf_printf(&m->out, "%*s%s\n", indent, "", line);
}

/* Whether s can be a plain scalar that YAML reads back as the same string (never as a
 * number, a boolean, null, or with a special first character). */
static int plain_safe(const char *s)
{
    static const char *const words[] = {"y",    "n",     "yes",  "no", "on", "off",
                                        "true", "false", "null", "~",  NULL};
    if (!isalpha((unsigned char)s[0]) && s[0] != '/')
        return 0;
    for (const char *p = s; *p; p++)
        if (!isalnum((unsigned char)*p) && strchr("-._/", *p) == NULL)
            return 0;
    for (int i = 0; words[i]; i++)
        if (strcasecmp(s, words[i]) == 0)
            return 0;
    return 1;
}

/* Appends the code point at s (len bytes, valid UTF-8) as YAML needs it in a double-quoted
 * string; returns the bytes read. */
static size_t quote_char(mph_buf_t *b, const unsigned char *s, size_t len)
{
    unsigned c = s[0];
    size_t n = c < 0x80 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
    unsigned cp = n == 1 ? c : n == 2 ? ((c & 0x1f) << 6) | (s[1] & 0x3f) : 0;
    if (n > len)
        n = len;
    if (c == '"' || c == '\\')
        mph_buf_printf(b, "\\%c", c);
    else if (c == '\n')
        mph_buf_puts(b, "\\n");
    else if (c == '\t')
        mph_buf_puts(b, "\\t");
    else if (c < 0x20 || c == 0x7f || (n == 2 && cp >= 0x80 && cp <= 0x9f))
        mph_buf_printf(b, "\\u%04x", n == 1 ? c : cp); /* not printable in YAML */
    else if (n == 3 && c == 0xef && s[1] == 0xbb && s[2] == 0xbf)
        mph_buf_puts(b, "\\ufeff");
    else
        mph_buf_append(b, s, n);
    return n;
}

/* Appends s (len bytes of UTF-8) as a double-quoted YAML string. */
static void quoted(mph_buf_t *b, const char *s, size_t len)
{
    mph_buf_puts(b, "\"");
    for (size_t i = 0; i < len;)
        i += quote_char(b, (const unsigned char *)s + i, len - i);
    mph_buf_puts(b, "\"");
}

/* "key: value" at indent, the value a string scalar. */
static void kv(manifest_t *m, int indent, const char *key, const char *value)
{
    mph_buf_printf(&m->out, "%*s%s: ", indent, "", key);
    if (plain_safe(value))
        mph_buf_puts(&m->out, value);
    else
        quoted(&m->out, value, strlen(value));
    mph_buf_puts(&m->out, "\n");
}

/* "- value" at indent, a string scalar. */
static void item(manifest_t *m, int indent, const char *value)
{
    mph_buf_printf(&m->out, "%*s- ", indent, "");
    if (plain_safe(value))
        mph_buf_puts(&m->out, value);
    else
        quoted(&m->out, value, strlen(value));
    mph_buf_puts(&m->out, "\n");
}

/* Whether text can be a literal block (|) that reads back byte for byte: printable UTF-8
 * with tabs and newlines only, not starting with white space, no line of white space alone. */
static int literal_safe(const char *s, size_t len)
{
    if (len == 0 || s[0] == ' ' || s[0] == '\t' || s[0] == '\n')
        return 0;
    mph_buf_t probe = MPH_BUF_INIT; /* what quoting would do to each character */
    int ok = 1;
    size_t line_start = 0;
    for (size_t i = 0; i < len && ok;) {
        if (s[i] == '\n') {
            size_t j = line_start;
            while (j < i && (s[j] == ' ' || s[j] == '\t'))
                j++;
            ok = !(j == i && i > line_start); /* a line of blanks only */
            line_start = ++i;
            continue;
        }
        probe.len = 0;
        size_t n = quote_char(&probe, (const unsigned char *)s + i, len - i);
        ok = s[i] == '\t' || (probe.len == n && memcmp(probe.data, s + i, n) == 0) || s[i] == '"' ||
             s[i] == '\\';
        i += n;
    }
    mph_buf_free(&probe);
    return ok;
}

/* "key: TEXT" at indent: a literal block when it can be one, else a double-quoted string. */
static void text_value(manifest_t *m, int indent, const char *key, const char *s, size_t len)
{
    mph_buf_printf(&m->out, "%*s%s: ", indent, "", key);
    if (!literal_safe(s, len)) {
        quoted(&m->out, s, len);
        mph_buf_puts(&m->out, "\n");
        return;
    }
    size_t trailing = 0;
    while (trailing < len && s[len - 1 - trailing] == '\n')
        trailing++;
    mph_buf_puts(&m->out, trailing == 0 ? "|-\n" : trailing == 1 ? "|\n" : "|+\n");
    for (size_t i = 0; i < len - trailing;) {
        size_t n = strcspn(s + i, "\n");
        if (i + n > len - trailing)
            n = len - trailing - i;
        if (n > 0)
            mph_buf_printf(&m->out, "%*s", indent + 2, "");
        mph_buf_append(&m->out, s + i, n);
        mph_buf_puts(&m->out, "\n");
        i += n + 1;
    }
    for (size_t i = 1; i < trailing; i++)
        mph_buf_puts(&m->out, "\n");
}

/* "key: BASE64" at indent. */
static void base64_value(manifest_t *m, int indent, const char *key, const char *s, size_t len)
{
    char *enc = mph_xmalloc(4 * ((len + 2) / 3) + 1);
    EVP_EncodeBlock((unsigned char *)enc, (const unsigned char *)s, (int)len);
    put(m, indent, "%s: %s", key, enc);
    free(enc);
}

/* "key: NAME" + suffix at indent (a name could read as a number alone: "123"). */
static void kv_name(manifest_t *m, int indent, const char *key, const char *suffix)
{
    char value[NAME_MAX_LEN + 32];
    snprintf(value, sizeof(value), "%s%s", m->name, suffix);
    kv(m, indent, key, value);
}

/* The objects' labels, at indent. */
static void labels(manifest_t *m, int indent)
{
    kv(m, indent, "app.kubernetes.io/name", m->name);
    kv(m, indent, "app.kubernetes.io/component", "mphost");
}

/* An object's first lines: apiVersion, kind, metadata with its name and labels. */
static void object(manifest_t *m, const char *api, const char *kind, const char *suffix)
{
    mph_buf_puts(&m->out, "---\n");
    kv(m, 0, "apiVersion", api);
    kv(m, 0, "kind", kind);
    put(m, 0, "metadata:");
    kv_name(m, 2, "name", suffix);
    put(m, 2, "labels:");
    labels(m, 4);
}

/* ---- The objects ---- */

static void secret(manifest_t *m, const char *suffix, const char *key, const char *s, size_t len)
{
    object(m, "v1", "Secret", suffix);
    kv(m, 0, "type", "Opaque");
    put(m, 0, "data:");
    base64_value(m, 2, key, s, len);
}

static void config_map(manifest_t *m)
{
    object(m, "v1", "ConfigMap", "-script");
    if (mph_utf8_valid(m->script, m->script_len)) {
        put(m, 0, "data:");
        text_value(m, 2, m->key, m->script, m->script_len);
    } else {
        put(m, 0, "binaryData:");
        base64_value(m, 2, m->key, m->script, m->script_len);
    }
}

/* The headless Service (stable names, every pod listed, ready or not) and the clients' one. */
static void services(manifest_t *m)
{
    object(m, "v1", "Service", "-headless");
    put(m, 0, "spec:");
    kv(m, 2, "clusterIP", "None");
    put(m, 2, "publishNotReadyAddresses: true");
    put(m, 2, "selector:");
    labels(m, 4);
    put(m, 2, "ports:");
    put(m, 4, "- name: http");
    put(m, 6, "port: %d", m->port);
    kv(m, 6, "targetPort", "http");
    object(m, "v1", "Service", "");
    put(m, 0, "spec:");
    kv(m, 2, "type", "ClusterIP");
    put(m, 2, "selector:");
    labels(m, 4);
    put(m, 2, "ports:");
    put(m, 4, "- name: http");
    put(m, 6, "port: 80");
    kv(m, 6, "targetPort", "http");
}

/* Whether an option given on the command line goes on to the pods as it is. */
static int passed_on(const char *option)
{
    static const char *const kept_out[] = {
        "--storage=", "--data=", "--peers=",  "--host-id=",       "--peer-secret-file=",
        "--users=",   "--port=", "--listen=", "--log-path=",      "--replicas=",
        "--image=",   "--name=", "--url=",    "--start-timeout=", NULL};
    for (int i = 0; kept_out[i]; i++)
        if (strncmp(option, kept_out[i], strlen(kept_out[i])) == 0)
            return 0;
    /* An access log goes to the container's stderr: its files are read-only. */
    return strncmp(option, "--access-log=", 13) != 0 || strcmp(option + 13, "-") == 0;
}

/* The container's arguments. */
static void args(manifest_t *m, int indent)
{
    char buf[1200];
    put(m, indent, "args:");
    snprintf(buf, sizeof(buf), "/etc/mphost/script/%s", m->key);
    item(m, indent + 2, buf);
    item(m, indent + 2, "serve");
    snprintf(buf, sizeof(buf), "--port=%d", m->port);
    item(m, indent + 2, buf);
    if (m->redis) { /* Kubernetes puts the Secret's URL here when it starts the container */
        item(m, indent + 2, "--storage=$(MPHOST_STORAGE_URL)");
    } else {
        item(m, indent + 2, "--storage=file");
        item(m, indent + 2, "--data=" DATA_DIR);
    }
    mph_buf_t peers = MPH_BUF_INIT;
    mph_buf_puts(&peers, "--peers=");
    for (int k = 0; k < m->replicas; k++)
        mph_buf_printf(&peers, "%shttp://%s-%d.%s-headless:%d", k ? "," : "", m->name, k, m->name,
                       m->port);
    item(m, indent + 2, peers.data);
    mph_buf_free(&peers);
    item(m, indent + 2, "--peer-secret-file=/etc/mphost/peer/secret");
    if (m->users)
        item(m, indent + 2, "--users=/etc/mphost/users/users");
    for (int i = 0; i < m->cli->noptions; i++)
        if (passed_on(m->cli->options[i]))
            item(m, indent + 2, m->cli->options[i]);
}

/* The probes, resources and the container's own security settings. */
static void container_checks(manifest_t *m, int in)
{
    put(m, in, "readinessProbe:");
    put(m, in + 2, "httpGet:");
    kv(m, in + 4, "path", "/readyz");
    kv(m, in + 4, "port", "http");
    put(m, in + 2, "periodSeconds: 5");
    put(m, in + 2, "failureThreshold: 2");
    put(m, in, "livenessProbe:");
    put(m, in + 2, "httpGet:");
    kv(m, in + 4, "path", "/healthz");
    kv(m, in + 4, "port", "http");
    put(m, in + 2, "initialDelaySeconds: 10");
    put(m, in + 2, "periodSeconds: 10");
    put(m, in + 2, "failureThreshold: 3");
    put(m, in, "resources:");
    put(m, in + 2, "requests:");
    kv(m, in + 4, "cpu", "250m");
    kv(m, in + 4, "memory", "256Mi");
    put(m, in + 2, "limits:");
    kv(m, in + 4, "memory", "1Gi");
    put(m, in, "securityContext:");
    put(m, in + 2, "allowPrivilegeEscalation: false");
    put(m, in + 2, "readOnlyRootFilesystem: true");
    put(m, in + 2, "capabilities:");
    put(m, in + 4, "drop:");
    item(m, in + 6, "ALL");
}

/* One volume mount. */
static void mount(manifest_t *m, int in, const char *name, const char *path, int read_only)
{
    kv(m, in, "- name", name);
    kv(m, in + 2, "mountPath", path);
    if (read_only)
        put(m, in + 2, "readOnly: true");
}

static void container(manifest_t *m, int in)
{
    put(m, in, "containers:");
    kv(m, in + 2, "- name", "mphost");
    in += 4;
    kv(m, in, "image", m->cli->image);
    put(m, in, "command:");
    item(m, in + 2, "/usr/local/bin/mphost");
    args(m, in);
    if (m->redis) {
        put(m, in, "env:");
        kv(m, in + 2, "- name", "MPHOST_STORAGE_URL");
        put(m, in + 4, "valueFrom:");
        put(m, in + 6, "secretKeyRef:");
        kv_name(m, in + 8, "name", "-storage");
        kv(m, in + 8, "key", "url");
    }
    put(m, in, "ports:");
    kv(m, in + 2, "- name", "http");
    put(m, in + 4, "containerPort: %d", m->port);
    kv(m, in + 4, "protocol", "TCP");
    container_checks(m, in);
    put(m, in, "volumeMounts:");
    mount(m, in + 2, "script", "/etc/mphost/script", 1);
    mount(m, in + 2, "peer-secret", "/etc/mphost/peer", 1);
    if (m->users)
        mount(m, in + 2, "users", "/etc/mphost/users", 1);
    mount(m, in + 2, "tmp", "/tmp", 0); /* the state directory: pid file, sockets */
    if (!m->redis)
        mount(m, in + 2, "data", "/data", 0);
}

/* A volume from a Secret, its files readable by the pod's group only (fsGroup). */
static void secret_volume(manifest_t *m, int in, const char *name, const char *suffix)
{
    kv(m, in, "- name", name);
    put(m, in + 2, "secret:");
    kv_name(m, in + 4, "secretName", suffix);
    put(m, in + 4, "defaultMode: 288 # 0440");
}

static void volumes(manifest_t *m, int in)
{
    put(m, in, "volumes:");
    kv(m, in + 2, "- name", "script");
    put(m, in + 4, "configMap:");
    kv_name(m, in + 6, "name", "-script");
    secret_volume(m, in + 2, "peer-secret", "-peer");
    if (m->users)
        secret_volume(m, in + 2, "users", "-users");
    kv(m, in + 2, "- name", "tmp");
    put(m, in + 4, "emptyDir:");
    kv(m, in + 6, "medium", "Memory");
    kv(m, in + 6, "sizeLimit", "64Mi");
}

static void pod_template(manifest_t *m)
{
    char port[16];
    snprintf(port, sizeof(port), "%d", m->port);
    put(m, 2, "template:");
    put(m, 4, "metadata:");
    put(m, 6, "labels:");
    labels(m, 8);
    put(m, 6, "annotations:");
    kv(m, 8, "prometheus.io/scrape", "true");
    kv(m, 8, "prometheus.io/port", port);
    kv(m, 8, "prometheus.io/path", "/metrics");
    kv(m, 8, "mphost/script-sha256", m->script_sha);
    put(m, 4, "spec:");
    put(m, 6, "enableServiceLinks: false # no NAME_PORT variables: mphost reads MP_PORT");
    put(m, 6, "automountServiceAccountToken: false");
    put(m, 6, "terminationGracePeriodSeconds: %u", m->cli->host.shutdown_timeout_ms / 1000 + 5);
    put(m, 6, "securityContext:");
    put(m, 8, "runAsNonRoot: true");
    put(m, 8, "runAsUser: %d", UID);
    put(m, 8, "runAsGroup: %d", UID);
    put(m, 8, "fsGroup: %d", UID);
    kv(m, 8, "fsGroupChangePolicy", "OnRootMismatch");
    container(m, 6);
    volumes(m, 6);
}

static void stateful_set(manifest_t *m)
{
    object(m, "apps/v1", "StatefulSet", "");
    put(m, 0, "spec:");
    kv_name(m, 2, "serviceName", "-headless");
    put(m, 2, "replicas: %d", m->replicas);
    kv(m, 2, "podManagementPolicy", "Parallel");
    put(m, 2, "selector:");
    put(m, 4, "matchLabels:");
    labels(m, 6);
    pod_template(m);
    if (m->redis)
        return;
    put(m, 2, "volumeClaimTemplates:");
    put(m, 4, "- metadata:");
    kv(m, 8, "name", "data");
    put(m, 6, "spec:");
    put(m, 8, "accessModes:");
    item(m, 10, "ReadWriteOnce");
    put(m, 8, "resources:");
    put(m, 10, "requests:");
    kv(m, 12, "storage", "1Gi");
}

/* ---- Inputs ---- */

/* Reads a whole file of at most FILE_MAX bytes into *out (new). 0, or 1 after saying why. */
static int read_file(const char *what, const char *path, char **out, size_t *len)
{
    FILE *f = fopen(path, "rb");
    mph_buf_t b = MPH_BUF_INIT;
    char chunk[65536];
    size_t n;
    if (f == NULL) {
        fprintf(stderr, "mphost: manifest: cannot read %s %s: %s\n", what, path, strerror(errno));
        return 1;
    }
    while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0 && b.len <= FILE_MAX)
        mph_buf_append(&b, chunk, n);
    int bad = ferror(f) || b.len > FILE_MAX;
    fclose(f);
    if (bad) {
        fprintf(stderr, "mphost: manifest: cannot use %s %s: %s\n", what, path,
                b.len > FILE_MAX ? "larger than 1 MiB" : "read error");
        mph_buf_free(&b);
        return 1;
    }
    mph_buf_append(&b, "", 1); /* a NUL after the text, not counted */
    *out = mph_buf_steal(&b, len);
    (*len)--;
    return 0;
}

/* A Kubernetes name: a DNS label of lowercase letters, digits and '-'. */
static int valid_name(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > NAME_MAX_LEN || !isalnum((unsigned char)s[0]) ||
        !isalnum((unsigned char)s[n - 1]))
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!(islower((unsigned char)s[i]) || isdigit((unsigned char)s[i]) || s[i] == '-'))
            return 0;
    return 1;
}

/* The default name: the script's file name without its extension, made a DNS label. */
static void default_name(const char *script, char *out, size_t size)
{
    const char *base = strrchr(script, '/') ? strrchr(script, '/') + 1 : script;
    size_t n = strcspn(base, "."), j = 0;
    for (size_t i = 0; i < n && j + 1 < size && j < NAME_MAX_LEN; i++) {
        char c = (char)tolower((unsigned char)base[i]);
        out[j++] = isalnum((unsigned char)c) ? c : '-';
    }
    while (j > 0 && out[j - 1] == '-')
        j--;
    out[j] = '\0';
    size_t lead = strspn(out, "-");
    memmove(out, out + lead, j - lead + 1);
    if (!valid_name(out))
        snprintf(out, size, "mphost");
}

/* The script's name in the ConfigMap: its file name when Kubernetes takes it as a key. */
static void script_key(const char *path, char *out, size_t size)
{
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    size_t n = strlen(base), ok = n > 0 && n < size && strcmp(base, ".") && strcmp(base, "..");
    for (size_t i = 0; i < n && ok; i++)
        ok = isalnum((unsigned char)base[i]) || strchr("-._", base[i]) != NULL;
    snprintf(out, size, "%s", ok ? base : "script.lua");
}

static void sha256_hex(const char *s, size_t len, char out[65])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    EVP_Digest(s, len, md, &n, EVP_sha256(), NULL);
    for (unsigned i = 0; i < n && i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

/* The peer secret: --peer-secret-file's, or a new one. 0, or 1 after saying why. */
static int peer_secret(manifest_t *m)
{
    const char *path = m->cli->host.peer_secret_file;
    if (path)
        return read_file("the peer secret file", path, &m->secret, &m->secret_len);
    unsigned char raw[SECRET_BYTES];
    if (RAND_bytes(raw, sizeof(raw)) != 1) {
        fprintf(stderr, "mphost: manifest: cannot make a peer secret (no randomness)\n");
        return 1;
    }
    m->secret = mph_xmalloc(2 * SECRET_BYTES + 2);
    for (int i = 0; i < SECRET_BYTES; i++)
        snprintf(m->secret + 2 * i, 3, "%02x", raw[i]);
    strcpy(m->secret + 2 * SECRET_BYTES, "\n");
    m->secret_len = 2 * SECRET_BYTES + 1;
    if (m->replicas > 1)
        fprintf(stderr,
                "mphost: manifest: made a new peer secret for %s-peer; to apply this "
                "deployment again without changing it (pods read it when they start), "
                "give --peer-secret-file=FILE\n",
                m->name);
    return 0;
}

/* Checks the command line and reads the files. 0, or 1 after saying why. */
static int prepare(manifest_t *m, char *name, size_t namelen)
{
    const mph_cli_t *cli = m->cli;
    m->replicas = cli->replicas;
    m->port = cli->host.port;
    m->redis = strcmp(cli->host.storage, "file") != 0;
    if (cli->name)
        snprintf(name, namelen, "%s", cli->name);
    else
        default_name(cli->script_path, name, namelen);
    m->name = name;
    if (!valid_name(name)) {
        fprintf(stderr,
                "mphost: manifest: invalid --name: %s (expected 1 to %d lowercase "
                "letters, digits or '-', starting and ending with a letter or digit)\n",
                name, NAME_MAX_LEN);
        return 1;
    }
    if (!m->redis && m->replicas > 1) {
        fprintf(stderr,
                "mphost: manifest: file storage cannot be shared by %d replicas: give "
                "--storage=redis://HOST:PORT (or run --replicas=1)\n",
                m->replicas);
        return 1;
    }
    if (m->port == 0) {
        fprintf(stderr, "mphost: manifest: --port=0 names no port for the pods\n");
        return 1;
    }
    script_key(cli->script_path, m->key, sizeof(m->key));
    if (read_file("the script", cli->script_path, &m->script, &m->script_len) != 0 ||
        (cli->host.users_file &&
         read_file("the users file", cli->host.users_file, &m->users, &m->users_len) != 0))
        return 1;
    sha256_hex(m->script, m->script_len, m->script_sha);
    return peer_secret(m);
}

int mph_cli_manifest(mph_cli_t *cli)
{
    manifest_t m = {.cli = cli};
    char name[NAME_MAX_LEN + 16];
    int rc = prepare(&m, name, sizeof(name));
    if (rc == 0) {
        mph_buf_printf(&m.out, "# mphost %s manifest: %d replica%s of %s (docs/hosts.md)\n",
                       MPHOST_VERSION, m.replicas, m.replicas == 1 ? "" : "s", m.key);
        secret(&m, "-peer", "secret", m.secret, m.secret_len);
        if (m.redis)
            secret(&m, "-storage", "url", cli->host.storage, strlen(cli->host.storage));
        if (m.users)
            secret(&m, "-users", "users", m.users, m.users_len);
        config_map(&m);
        services(&m);
        stateful_set(&m);
        rc = fwrite(m.out.data, 1, m.out.len, stdout) == m.out.len && fflush(stdout) == 0 ? 0 : 1;
        if (rc != 0)
            fprintf(stderr, "mphost: manifest: cannot write: %s\n", strerror(errno));
    }
    if (m.secret)
        memset(m.secret, 0, m.secret_len);
    free(m.secret);
    free(m.script);
    free(m.users);
    mph_buf_free(&m.out);
    return rc;
}
