"""`mphost SCRIPT manifest` (docs/hosts.md, "Running on Kubernetes"): the YAML is parsed with
python3-yaml and every object is checked strictly against Debian's python3-kubernetes models
(every field name known to the model, every value of the type the model says), for 1 and 3
replicas on files and on Redis; file storage with several replicas is refused; the pods'
arguments start a real mphost."""
import base64
import json
import os
import shutil

import yaml
from kubernetes import client as k8s

from harness import SCRIPTS, RedisServer, Server, TestFailure, check, eq, free_port, run, tmpdir
from test_auth import passwd

HOSTS = os.path.join(SCRIPTS, "hosts.lua")
MODELS = {("v1", "Secret"): "V1Secret", ("v1", "ConfigMap"): "V1ConfigMap",
          ("v1", "Service"): "V1Service", ("apps/v1", "StatefulSet"): "V1StatefulSet"}


# ---- The strict check ----

def strict(value, type_name, path):
    """Checks value against a python3-kubernetes type name ("V1Container", "list[str]",
    "dict(str, str)", "int", ...): every field of a model must be one of its attribute_map's,
    of its type. Returns the problems found."""
    if value is None:
        return []  # an absent optional field (required ones: the deserializer's check)
    if type_name.startswith("list["):
        if not isinstance(value, list):
            return ["%s: expected a list, got %r" % (path, value)]
        return [p for i, v in enumerate(value) for p in strict(v, type_name[5:-1],
                                                               "%s[%d]" % (path, i))]
    if type_name.startswith("dict("):
        if not isinstance(value, dict):
            return ["%s: expected a map, got %r" % (path, value)]
        inner = type_name[5:-1].split(", ", 1)[1]
        return [p for k, v in value.items() for p in
                ([] if isinstance(k, str) else ["%s: key %r is not a string" % (path, k)]) +
                strict(v, inner, "%s.%s" % (path, k))]
    simple = {"str": str, "bool": bool, "int": int, "float": (int, float), "datetime": str,
              "date": str}
    if type_name in simple:
        ok = isinstance(value, simple[type_name]) and not (
            type_name in ("int", "float") and isinstance(value, bool))
        return [] if ok else ["%s: expected %s, got %r" % (path, type_name, value)]
    if type_name == "object":  # IntOrString, quantities
        ok = isinstance(value, (str, int)) and not isinstance(value, bool)
        return [] if ok else ["%s: expected an int or a string, got %r" % (path, value)]
    model = getattr(k8s, type_name)
    if not isinstance(value, dict):
        return ["%s: expected a %s object, got %r" % (path, type_name, value)]
    fields = {v: k for k, v in model.attribute_map.items()}
    problems = []
    for key, v in value.items():
        if key not in fields:
            problems.append("%s: %s has no field %r" % (path, type_name, key))
        else:
            problems += strict(v, model.openapi_types[fields[key]], path + "." + key)
    return problems


class Response:
    def __init__(self, doc):
        self.data = json.dumps(doc)


def check_object(doc):
    """Checks one object strictly, then builds it with the client's own deserializer (which
    checks required fields and enumerations); returns the model's name."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    check(key in MODELS, "an object mphost does not make: %r" % (key,))
    problems = strict(doc, MODELS[key], doc["kind"])
    check(not problems, "\n".join(problems))
    try:
        k8s.ApiClient().deserialize(Response(doc), MODELS[key])
    except (ValueError, TypeError) as e:
        raise TestFailure("%s %s: %s" % (doc["kind"], doc["metadata"]["name"], e))
    return MODELS[key]


def manifest(args, expect=0, script=HOSTS):
    """Runs `mphost SCRIPT manifest ARGS`; returns (objects by (kind, name), stdout, stderr)."""
    rc, out, err = run([script, "manifest"] + list(args),
                       env={"MP_STATE_DIR": tmpdir("mph-state-")})
    eq(rc, expect, "exit status (%s)" % err)
    if expect != 0:
        return None, out, err
    docs = [d for d in yaml.safe_load_all(out) if d is not None]
    objects = {}
    for d in docs:
        check_object(d)
        objects[(d["kind"], d["metadata"]["name"])] = d
    eq(len(objects), len(docs), "object names are unique")
    return objects, out, err


def container_of(objects, name):
    sts = objects[("StatefulSet", name)]
    containers = sts["spec"]["template"]["spec"]["containers"]
    eq(len(containers), 1, "containers")
    return sts, containers[0]


def secret_value(objects, name, key):
    return base64.b64decode(objects[("Secret", name)]["data"][key])


def arg(container, name):
    found = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--" + name + "=")]
    eq(len(found), 1, "--%s in %r" % (name, container["args"]))
    return found[0]


def check_common(objects, name, replicas, port=3000):
    """What every manifest has: the script, the services, probes, annotations, resources, the
    peers and their secret."""
    sts, c = container_of(objects, name)
    spec = sts["spec"]
    eq(spec["replicas"], replicas, "replicas")
    eq(spec["serviceName"], name + "-headless", "serviceName")
    pod = spec["template"]
    eq(spec["selector"]["matchLabels"], {k: v for k, v in pod["metadata"]["labels"].items()
                                         if k in spec["selector"]["matchLabels"]}, "selector")
    headless = objects[("Service", name + "-headless")]["spec"]
    eq(headless["clusterIP"], "None", "headless")
    eq(headless["publishNotReadyAddresses"], True, "peers find each other before ready")
    service = objects[("Service", name)]["spec"]
    eq([(p["port"], p["targetPort"]) for p in service["ports"]], [(80, "http")], "port 80")
    for s in (headless, service):
        eq(s["selector"], spec["selector"]["matchLabels"], "the services select the pods")
    eq([(p["name"], p["containerPort"]) for p in c["ports"]], [("http", port)], "container port")
    eq((c["readinessProbe"]["httpGet"]["path"], c["readinessProbe"]["httpGet"]["port"]),
       ("/readyz", "http"), "readiness")
    eq((c["livenessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["port"]),
       ("/healthz", "http"), "liveness")
    notes = pod["metadata"]["annotations"]
    eq((notes["prometheus.io/scrape"], notes["prometheus.io/port"], notes["prometheus.io/path"]),
       ("true", str(port), "/metrics"), "Prometheus annotations")
    check(c["resources"]["requests"] and c["resources"]["limits"], "resources")
    eq(pod["spec"]["securityContext"]["runAsNonRoot"], True, "not root")
    # The script, byte for byte, where the first argument says.
    cm = objects[("ConfigMap", name + "-script")]
    key = os.path.basename(HOSTS)
    with open(HOSTS) as f:
        eq(cm["data"][key], f.read(), "the script in the ConfigMap")
    eq(c["args"][:2], ["/etc/mphost/script/" + key, "serve"], "script and verb")
    eq(arg(c, "port"), str(port), "--port")
    # --peers: every pod by its stable name, in ordinal order (pod NAME-K is host K + 1).
    eq(arg(c, "peers").split(","),
       ["http://%s-%d.%s-headless:%d" % (name, k, name, port) for k in range(replicas)],
       "--peers")
    secret = secret_value(objects, name + "-peer", "secret")
    check(len(secret.strip()) >= 32, "a peer secret of 32 bytes or more: %r" % secret)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    eq(volumes["peer-secret"]["secret"]["secretName"], name + "-peer", "peer secret volume")
    eq(arg(c, "peer-secret-file"), mounts["peer-secret"] + "/secret", "--peer-secret-file")
    eq(volumes["script"]["configMap"]["name"], name + "-script", "script volume")
    eq(mounts["script"], "/etc/mphost/script", "script mount")
    return sts, c


# ---- Tests ----

def test_manifest_three_replicas_on_redis():
    url = "redis://:s3cret-pw@redis.example:6379/2"
    objects, out, err = manifest(["--replicas=3", "--storage=" + url, "--name=shop",
                                  "--image=registry.example/mphost:1.0"])
    eq(sorted(objects), [("ConfigMap", "shop-script"), ("Secret", "shop-peer"),
                         ("Secret", "shop-storage"), ("Service", "shop"),
                         ("Service", "shop-headless"), ("StatefulSet", "shop")], "objects")
    sts, c = check_common(objects, "shop", 3)
    eq(c["image"], "registry.example/mphost:1.0", "image")
    # The Redis URL comes from its Secret, never from the pod's spec or arguments.
    eq(secret_value(objects, "shop-storage", "url"), url.encode(), "the URL in its Secret")
    check("s3cret-pw" not in out and "redis.example" not in json.dumps(sts),
          "the URL is nowhere but in its Secret")
    eq(arg(c, "storage"), "$(MPHOST_STORAGE_URL)", "--storage from the environment")
    eq(c["env"], [{"name": "MPHOST_STORAGE_URL", "valueFrom": {
        "secretKeyRef": {"name": "shop-storage", "key": "url"}}}], "env")
    check("volumeClaimTemplates" not in sts["spec"], "no volumes for Redis")
    check("made a new peer secret for shop-peer" in err, err)


def test_manifest_one_replica_on_redis():
    objects, out, err = manifest(["--storage=redis://10.0.0.7:6379"])
    sts, c = check_common(objects, "hosts", 1)
    eq(secret_value(objects, "hosts-storage", "url"), b"redis://10.0.0.7:6379", "URL")
    eq(err, "", "nothing said on stderr")


def test_manifest_one_replica_on_files_claims_a_volume():
    objects, out, err = manifest([])
    check(("Secret", "hosts-storage") not in objects, "no storage Secret for files")
    sts, c = check_common(objects, "hosts", 1)
    claims = sts["spec"]["volumeClaimTemplates"]
    eq([cl["metadata"]["name"] for cl in claims], ["data"], "one claim")
    eq(claims[0]["spec"]["accessModes"], ["ReadWriteOnce"], "access")
    check(claims[0]["spec"]["resources"]["requests"]["storage"], "a size")
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    eq(mounts["data"], "/data", "mounted")
    eq((arg(c, "storage"), arg(c, "data")), ("file", "/data/mp-data"), "file storage there")


def test_manifest_refuses_file_storage_with_several_replicas():
    for args in (["--replicas=3"], ["--replicas=2", "--storage=file"]):
        objects, out, err = manifest(args, expect=1)
        eq(out, "", "nothing on stdout")
        lines = err.strip().splitlines()
        eq(len(lines), 1, "one line: %r" % err)
        check("file storage cannot be shared by" in lines[0] and "--storage=redis" in lines[0],
              lines[0])
    for args, why in ((["--replicas=0"], "invalid --replicas"),
                      (["--name=Bad_Name"], "invalid --name: Bad_Name"),
                      (["--name=" + "x" * 60], "invalid --name")):
        objects, out, err = manifest(args, expect=1)
        check(why in err and out == "", err)


def test_manifest_carries_users_options_and_a_given_secret():
    d = tmpdir("mph-manifest-")
    users = os.path.join(d, "users")
    passwd(users, "alice", "pw")
    secret = os.path.join(d, "peer.secret")
    with open(secret, "w") as f:
        f.write("the-same-secret-on-every-run-0123456789\n")
    args = ["--replicas=3", "--storage=redis://r:6379", "--users=" + users, "--workers=4",
            "--handler-timeout=5", "--access-log=/var/log/mphost.log", "--logging=debug",
            "--peer-secret-file=" + secret, "--port=8080"]
    objects, out, err = manifest(args)
    eq(err, "", "no new secret made")
    sts, c = check_common(objects, "hosts", 3, port=8080)
    with open(users, "rb") as f:
        eq(secret_value(objects, "hosts-users", "users"), f.read(), "the users file")
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    eq(arg(c, "users"), mounts["users"] + "/users", "--users")
    eq(secret_value(objects, "hosts-peer", "secret"),
       b"the-same-secret-on-every-run-0123456789\n", "the given secret")
    for kept in ("--workers=4", "--handler-timeout=5", "--logging=debug"):
        check(kept in c["args"], "%s passed on: %r" % (kept, c["args"]))
    check(not any(a.startswith("--access-log") for a in c["args"]), "a log file is not")
    eq(manifest(args)[1], out, "the same manifest twice with the same secret")


def test_manifest_default_name_comes_from_the_script():
    d = tmpdir("mph-manifest-")
    script = os.path.join(d, "My_Shop.v2.lua")
    shutil.copy(HOSTS, script)
    objects, out, err = manifest([], script=script)
    check(("StatefulSet", "my-shop") in objects, sorted(objects))
    eq(objects[("ConfigMap", "my-shop-script")]["data"].keys(), {"My_Shop.v2.lua"}, "key")


def test_manifest_keeps_any_script_text_exactly():
    texts = [b"  -- starts with blanks\nreturn 1\n", b"\t-- a tab\n", b"no newline at the end",
             b"blank lines\n\n\n", b"x\n  \ny\n", b"crlf\r\nlines\r\n", b"a \"quote\" \\ back\n",
             b"ctl \x01\x7f and \xc2\x85 C1\n", b"\xef\xbb\xbfbom\n", b"key: value # not YAML\n",
             b"--- \n...\n", b"\xff\xfe not UTF-8\n", "\u00e9t\u00e9 \u2603\n".encode()]
    d = tmpdir("mph-manifest-")
    for i, text in enumerate(texts):
        script = os.path.join(d, "s%d.lua" % i)
        with open(script, "wb") as f:
            f.write(text)
        objects, out, err = manifest(["--name=s%d" % i], script=script)
        cm = objects[("ConfigMap", "s%d-script" % i)]
        key = "s%d.lua" % i
        got = (base64.b64decode(cm["binaryData"][key]) if "binaryData" in cm
               else cm["data"][key].encode())
        eq(got, text, "script %d read back" % i)


def test_manifest_pod_arguments_start_an_mphost():
    """Runs one pod's container as the StatefulSet says (its command and arguments, the Secret
    and ConfigMap files where the volumes put them, $(MPHOST_STORAGE_URL) from the Secret) in
    a host named as the StatefulSet's second pod: it serves as host 2 of 3."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        raise TestFailure("needs unshare(1) and root (the suite runs as root)")
    with RedisServer() as redis:
        port = free_port()
        objects, out, err = manifest(["--replicas=3", "--storage=" + redis.url(),
                                      "--port=%d" % port, "--name=shop"])
        sts, c = container_of(objects, "shop")
        root = tmpdir("mph-pod-")
        files = {"/etc/mphost/script/hosts.lua": objects[("ConfigMap", "shop-script")]["data"][
            "hosts.lua"].encode(), "/etc/mphost/peer/secret": secret_value(
            objects, "shop-peer", "secret")}
        args = []
        for a in c["args"]:
            for path in files:
                a = a.replace(path, root + path)
            a = a.replace("$(MPHOST_STORAGE_URL)",
                          secret_value(objects, "shop-storage", "url").decode())
            args.append(a)
        for path, data in files.items():
            os.makedirs(os.path.dirname(root + path), mode=0o700, exist_ok=True)
            fd = os.open(root + path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, data)
            os.close(fd)
        eq(c["command"], ["/usr/local/bin/mphost"], "command")
        s = Server(args[0], port=port, prefix_cmd=["unshare", "--uts", "sh", "-c",
                                                  'hostname shop-1 && exec "$@"', "sh"])
        s.args = args[3:]  # after SCRIPT serve --port: the Server gives those
        with s:
            r = s.result("where", [])
            eq((r["host"], r["hosts"]), (2, 3), "pod shop-1 is host 2 of 3")
            e = s.rpc("by-key", [0])["error"]  # host 1: shop-0.shop-headless, not here
            eq(e["code"], -32005)
            check(e["message"].startswith("host 1 unavailable: "), e["message"])
