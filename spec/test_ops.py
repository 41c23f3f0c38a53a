"""Operations: GET /metrics (Prometheus text, one scrape covering every worker), /healthz,
/readyz (files and Redis), and the GETs that stay 405."""
import json
import os
import signal
import urllib.error
import urllib.request

import jsonschema
from prometheus_client.parser import text_string_to_metric_families

from harness import (SCRIPTS, RedisServer, Server, check, eq, free_port, http_exchange, run,
                     tmpdir, wait_until)
from test_scope import wait_log
from test_workers import started, status

OPS = os.path.join(SCRIPTS, "ops.lua")


def get(server, path):
    """GET path: (status, Content-Type, body text)."""
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (server.port, path),
                                    timeout=30) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def scrape(server):
    """The samples of one scrape: {(name, sorted label items): value}."""
    code, ctype, text = get(server, "/metrics")
    eq(code, 200, "GET /metrics")
    eq(ctype, "text/plain; version=0.0.4; charset=utf-8", "Content-Type")
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def requests(samples, method, code):
    return samples.get(("mphost_requests_total", (("code", str(code)), ("method", method))), 0)


def check_histogram(samples, method, count):
    buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in samples.items()
                     if name == "mphost_request_duration_seconds_bucket" and
                     dict(labels)["method"] == method)
    eq(len(buckets), 16, "buckets of %s" % method)
    eq(buckets[0][0], 0.0001, "the first bound (100 us)")
    values = [v for _, v in buckets]
    eq(values, sorted(values), "cumulative buckets are monotone")
    eq(buckets[-1], (float("inf"), count), "+Inf bucket of %s" % method)
    key = (("method", method),)
    eq(samples[("mphost_request_duration_seconds_count", key)], count, "_count of " + method)
    check(samples[("mphost_request_duration_seconds_sum", key)] > 0, "_sum of " + method)


def calls_on_every_worker(server, nworkers, least=20):
    """Calls add (one new connection each) until each worker answered `least` of them;
    returns how many were made."""
    seen, n = {}, 0
    while len(seen) < nworkers or min(seen.values()) < least:
        check(n < 5000, "calls reach every worker (so far %r)" % seen)
        r = server.result("add", [1])
        seen[r["worker"]] = seen.get(r["worker"], 0) + 1
        n += 1
    return n


def check_counts(server, nworkers):
    n = calls_on_every_worker(server, nworkers)
    for _ in range(7):
        eq(server.rpc("fail", [])["error"]["code"], -32000, "fail")
    for method in ("nope", "hidden", "made-up-%d" % n):
        eq(server.rpc(method)["error"]["code"], -32601, method)
    samples = scrape(server)
    eq(requests(samples, "add", 0), n, "successful calls")
    eq(requests(samples, "fail", -32000), 7, "failing calls")
    eq(requests(samples, "(other)", -32601), 3, "unknown and unexposed methods, one label")
    check(not [k for k in samples if ("method", "hidden") in k[1] or ("method", "nope") in k[1]],
          "no label for a method not exposed")
    check_histogram(samples, "add", n)
    check_histogram(samples, "fail", 7)
    eq(samples[("mphost_commits_total", ())], n, "a commit per add (calls one after another)")
    conflicts = samples[("mphost_conflicts_total", ())]
    if nworkers == 1:
        eq(conflicts, 0, "no conflicts one call at a time in one process")
    # (Several workers each keep the scope: one that wrote it last refuses another's commit
    # made on its older copy, once per switch of worker. Each conflict is an attempt more.)
    eq(samples[("mphost_storage_errors_total", ())], 0, "storage errors")
    check(samples[("mphost_attempts_total", ())] >= n + 7 + conflicts, "attempts")
    check(samples[("mphost_connections", ())] >= 1, "the scrape's own connection is open")
    check(samples[("mphost_lua_memory_bytes", ())] > 10000, "Lua memory")
    eq(samples[("mphost_scopes", ())], nworkers, "the global scope, kept by each worker")
    check(samples[("mphost_scope_cache_bytes", ())] > 0, "scope cache bytes")
    return samples


def test_metrics_count_calls_exactly_with_one_worker():
    with Server(OPS) as s:
        started(s, 1)
        check_counts(s, 1)
        s.post_raw("{not json")
        eq(requests(scrape(s), "(other)", -32700), 1, "a parse error")


def test_metrics_one_scrape_covers_three_workers():
    with Server(OPS, ["--workers=3"]) as s:
        started(s, 3)
        check_counts(s, 3)
        # Every worker's scrape says the same.
        counts = set()
        for _ in range(60):
            counts.add(requests(scrape(s), "fail", -32000))
        eq(counts, {7}, "failing calls, whichever worker answers the scrape")


def test_metrics_keep_a_killed_workers_calls_and_count_the_restart():
    with Server(OPS, ["--workers=3"]) as s:
        workers = started(s, 3)
        n = calls_on_every_worker(s, 3)
        before = scrape(s)
        eq(requests(before, "add", 0), n, "calls before the kill")
        eq(before[("mphost_worker_restarts_total", ())], 0, "restarts before")
        victim = workers[2]
        os.kill(victim, signal.SIGKILL)
        wait_log(s, "worker 2 (pid %d) was killed by signal 9" % victim)
        wait_until(lambda: status(s)[1].get(2, victim) != victim, "worker 2 is replaced")
        wait_log(s, "worker 2 ready (pid %d)" % status(s)[1][2])
        after = scrape(s)
        eq(requests(after, "add", 0), n, "the killed worker's calls are still counted")
        eq(after[("mphost_request_duration_seconds_count", (("method", "add"),))], n,
           "and timed")
        eq(after[("mphost_commits_total", ())], n, "and its commits")
        eq(after[("mphost_worker_restarts_total", ())], 1, "the restart")
        m = calls_on_every_worker(s, 3, least=1)
        eq(requests(scrape(s), "add", 0), n + m, "counting goes on, the new worker's too")


def test_healthz_readyz_and_other_gets():
    with Server(OPS) as s:
        eq(get(s, "/healthz")[::2], (200, "ok\n"), "/healthz")
        eq(get(s, "/readyz")[::2], (200, "ready\n"), "/readyz on files")
        eq(get(s, "/metrics?x=1")[0], 200, "a query string is not part of the path")
        for path in ("/", "/metric", "/healthz/x", "/" + "x" * 200):
            eq(get(s, path)[0], 405, "GET " + path)
        # POST to /metrics is a JSON-RPC call, as to any path.
        body = b'{"jsonrpc":"2.0","method":"whoami","id":1}'
        head = ("POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                "Connection: close\r\n\r\n" % len(body)).encode()
        code, reply = http_exchange(s.port, head + body)
        eq((code, json.loads(reply)["result"]), (200, 1), "POST /metrics")
        # The data directory gone unusable: not ready, yet healthy.
        os.chmod(s.data, 0o500)
        try:
            if os.access(s.data, os.W_OK):  # root may write anyway: make it a file instead
                os.chmod(s.data, 0o700)
                os.rename(s.data, s.data + ".moved")
                try:
                    eq(get(s, "/readyz")[0], 503, "/readyz without the data directory")
                finally:
                    os.rename(s.data + ".moved", s.data)
            else:
                eq(get(s, "/readyz")[0], 503, "/readyz on a read-only data directory")
        finally:
            os.chmod(s.data, 0o700)
        eq(get(s, "/healthz")[0], 200, "/healthz")
        eq(get(s, "/readyz")[0], 200, "/readyz again")


def test_readyz_follows_redis():
    with RedisServer() as redis, Server(OPS, ["--storage=" + redis.url()]) as s:
        eq(get(s, "/readyz")[0], 200, "/readyz with Redis up")
        redis.kill9()
        eq(get(s, "/readyz")[0], 503, "/readyz with Redis down")
        eq(get(s, "/healthz")[0], 200, "/healthz with Redis down")
        redis.start()
        wait_until(lambda: get(s, "/readyz")[0] == 200, "/readyz is 200 once Redis is back")
        eq(s.result("add", [1])["total"], 1, "it serves again")


def test_rpc_discover_is_an_openrpc_document_of_the_exposed_methods():
    # The meta-schema is our own transcription of the OpenRPC 1.2 specification's required
    # structure (spec/openrpc-1.2.schema.json): the official one is not reachable offline.
    with open(os.path.join(os.path.dirname(__file__), "openrpc-1.2.schema.json")) as f:
        meta = json.load(f)
    jsonschema.Draft7Validator.check_schema(meta)
    with Server(OPS, ["--workers=2"]) as s:
        doc = s.result("rpc.discover")
        jsonschema.validate(doc, meta)
        eq(doc["openrpc"], "1.2.6", "openrpc")
        eq(doc["info"]["title"], "ops.lua", "info.title: the script")
        methods = {m["name"]: m for m in doc["methods"]}
        eq(sorted(methods), ["add", "fail", "whoami"], "exactly the exposed methods")
        eq(len(methods), len(doc["methods"]), "each once")
        eq(methods["add"], {"name": "add", "description": "adds n to the global total",
                            "params": [{"name": "n", "schema": {"type": "number"}}],
                            "result": {"name": "sum", "schema": {"type": "object"}}},
           "a method that describes itself")
        eq(methods["fail"], {"name": "fail", "params": [],
                             "result": {"name": "result", "schema": {}}}, "the defaults")
        # In a batch too, next to an ordinary call.
        code, body = s.post_raw(json.dumps([
            {"jsonrpc": "2.0", "method": "rpc.discover", "id": 1},
            {"jsonrpc": "2.0", "method": "whoami", "id": 2}]))
        replies = {r["id"]: r for r in json.loads(body)}
        eq(replies[1]["result"], doc, "rpc.discover in a batch")
        check(replies[2]["result"] in (1, 2), "the other call of the batch")
        # Not broken by a validator that accepts anything: a method without result fails.
        del doc["methods"][0]["result"]
        try:
            jsonschema.validate(doc, meta)
        except jsonschema.ValidationError:
            pass
        else:
            raise AssertionError("the meta-schema accepted a method without result")


def test_a_script_cannot_define_rpc_names():
    script = os.path.join(tmpdir(), "own_discover.lua")
    with open(script, "w") as f:
        f.write('local mp = require("metaparticle")\n'
                'mp.service("rpc.discover", function() return 1 end).expose = true\n'
                'mp.serve()\n')
    port = free_port()
    rc, out, err = run([script, "serve", str(port), "--listen=127.0.0.1",
                        "--data=" + tmpdir()], timeout=60)
    eq(rc, 1, "exit status of a script defining rpc.discover (%s)" % err)
    check('mp.service: "rpc.discover": names starting with "rpc." are reserved' in err, err)


def test_metrics_without_room_in_shared_memory_show_the_answering_worker():
    # A file size limit too small for the workers' counters (a memfd obeys it too): the
    # supervisor warns, serves, and each worker's scrape shows its own counts.
    with Server(OPS, prefix_cmd=["prlimit", "--fsize=300000", "--"]) as s:
        started(s, 1)
        check("/metrics will show only the worker that answers a scrape" in s.read_log(),
              s.read_log()[-1500:])
        for _ in range(5):
            s.result("add", [1])
        eq(requests(scrape(s), "add", 0), 5, "successful calls, counted by the one worker")
