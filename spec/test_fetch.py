"""Outbound calls: mp.fetch and mp.rpc (lua/fetch.c, host/server/fetch.c), against real servers
on loopback: a small threaded Python HTTP server (plain and https with a throwaway certificate
and CA), and a second mphost serving examples/server1.lua. GET/POST/headers/JSON bodies;
refused, timeout, too large, TLS; 40 slow fetches at once on one worker; the loop serving
other calls meanwhile; the handler time limit not counting the wait; conflicts re-running a
handler that fetched (exact counts, two processes); a handler that read a scope before a
fetch run again when the scope changed; mp.rpc's result, remote errors and -32008; the
comparator case; basicAuth and topologies; /metrics; stops with fetches in flight."""
import json
import os
import socket
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler

from harness import (SCRIPTS, Server, StubHTTP, check, console_steps, eq, private_network, tmpdir,
                     wait_until)
from test_auth import basic, call, passwd, request

FETCH = os.path.join(SCRIPTS, "fetch.lua")
VALGRIND = bool(os.environ.get("MPH_VALGRIND"))
SLOW = 3 if VALGRIND else 1  # time bounds stretch under valgrind


# ---- The backend: a small threaded HTTP server ----

class Backend(StubHTTP):
    """A threaded HTTP/1.1 server on a free loopback port (https with `tls`, a (cert, key)
    pair). It counts requests per path, the connections it accepted and the requests in
    progress (and their most at once). Paths:
      /text                  200 "hello, fetch", with X-Dup twice and X-Test
      /echo                  any method: JSON of the method, path, headers and body it got
      /slow?s=SECONDS        waits, then 200 "slow"
      /big?n=BYTES           n bytes
      /status?code=N         that status, body "status N"
      /rpc                   a JSON-RPC endpoint: add(a, b), fail() (an error with data),
                             garbage() (not JSON), wrongid() (another id), refused() (an
                             error with id null, as for a request it could not read)
    """

    def __init__(self, tls=None):
        self.lock = threading.Lock()
        self.hits = {}
        self.connections = set()
        self.inflight = 0
        self.max_inflight = 0
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with backend.lock:
                    backend.connections.add(self.client_address)

            def reply(self, status, body, ctype="text/plain", extra=()):
                if isinstance(body, str):
                    body = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in extra:
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def handle_any(self):
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                with backend.lock:
                    backend.hits[url.path] = backend.hits.get(url.path, 0) + 1
                    backend.inflight += 1
                    backend.max_inflight = max(backend.max_inflight, backend.inflight)
                try:
                    self.route(url.path, query, body)
                finally:
                    with backend.lock:
                        backend.inflight -= 1

            def route(self, path, query, body):
                if path == "/text":
                    self.reply(200, "hello, fetch",
                               extra=(("X-Dup", "1"), ("X-Dup", "2"), ("X-Test", "yes")))
                elif path == "/echo":
                    self.reply(200, json.dumps({
                        "method": self.command, "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body.decode("utf-8", "replace")}), "application/json")
                elif path == "/slow":
                    time.sleep(float(query.get("s", "1")))
                    self.reply(200, "slow")
                elif path == "/big":
                    self.reply(200, b"x" * int(query["n"]))
                elif path == "/status":
                    code = int(query["code"])
                    self.reply(code, "status %d" % code)
                elif path == "/rpc":
                    self.rpc(json.loads(body))
                else:
                    self.reply(404, "no such path")

            def rpc(self, req):
                method, params = req.get("method"), req.get("params")
                out = {"jsonrpc": "2.0", "id": req.get("id")}
                if method == "add":
                    out["result"] = params[0] + params[1]
                elif method == "fail":
                    out["error"] = {"code": -32050, "message": "it failed",
                                    "data": {"why": "on purpose"}}
                elif method == "garbage":
                    self.reply(200, "this is not JSON")
                    return
                elif method == "wrongid":
                    out["id"] = 99
                    out["result"] = 1
                elif method == "refused":
                    out["id"] = None
                    out["error"] = {"code": -32600, "message": "Invalid Request"}
                else:
                    out["error"] = {"code": -32601, "message": "Method not found"}
                self.reply(200, json.dumps(out), "application/json")

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = handle_any

        super().__init__(Handler, tls)
        self.scheme = "https" if tls else "http"

    def url(self, path):
        return "%s://127.0.0.1:%d%s" % (self.scheme, self.port, path)

    def hit(self, path):
        with self.lock:
            return self.hits.get(path, 0)



def throwaway_ca():
    """A CA and a certificate it signed for 127.0.0.1, made with openssl in a temp directory;
    returns (ca.pem, (cert.pem, key.pem))."""
    d = tmpdir("mph-tls-")

    def openssl(*args):
        p = subprocess.run(["openssl"] + list(args), cwd=d, capture_output=True, text=True,
                           timeout=60)
        eq(p.returncode, 0, "openssl %s: %s" % (args[0], p.stderr))
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=mphost test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "req.csr",
            "-subj", "/CN=127.0.0.1")
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "req.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "cert.pem", "-days", "2", "-extfile", "ext.cnf")
    return os.path.join(d, "ca.pem"), (os.path.join(d, "cert.pem"), os.path.join(d, "key.pem"))


def closed_port():
    """A loopback port nothing listens on (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def in_threads(n, fn):
    """Runs fn(i) in n threads at once; returns their results in order (an exception is
    raised again here)."""
    out = [None] * n

    def run(i):
        try:
            out[i] = fn(i)
        except Exception as e:  # re-raised below
            out[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for r in out:
        if isinstance(r, Exception):
            raise r
    return out




def metric(server, name):
    """The value of one sample line of the server's /metrics (0 when absent)."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    try:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    text = data.decode().split("\r\n\r\n", 1)[1]
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0


# ---- mp.fetch ----

def test_fetch_get_sends_headers_and_reads_status_headers_and_body():
    with Backend() as b, Server(FETCH) as s:
        res = s.result("fetch", [b.url("/text")])
        eq(res["status"], 200, "status")
        eq(res["body"], "hello, fetch", "body")
        eq(res["headers"]["x-test"], "yes", "a header, by its lower-case name")
        eq(res["headers"]["x-dup"], "1, 2", "a repeated header, joined")
        eq(res["headers"]["content-length"], "12", "content-length")
        check(all(k == k.lower() for k in res["headers"]), res["headers"])
        # Request headers go out as given; the method is GET without a body.
        res = s.result("fetch", [b.url("/echo?q=1"), {"headers": {"X-Token": "t", "X-N": 7}}])
        got = json.loads(res["body"])
        eq((got["method"], got["path"], got["body"]), ("GET", "/echo?q=1", ""), "request")
        eq((got["headers"]["x-token"], got["headers"]["x-n"]), ("t", "7"), "request headers")
        check(got["headers"]["user-agent"].startswith("mphost/"), got["headers"])
        check("expect" not in got["headers"], got["headers"])
        # A status that is not 2xx is a response like any other.
        res = s.result("fetch", [b.url("/status?code=503")])
        eq((res["status"], res["body"]), (503, "status 503"), "a 503")


def test_fetch_post_json_and_string_bodies_and_other_methods():
    with Backend() as b, Server(FETCH) as s:
        # A table is sent as JSON, as a POST by default, with its Content-Type.
        res = s.result("fetch", [b.url("/echo"), {"body": {"item": 7, "tags": ["a", "b"]}}])
        got = json.loads(res["body"])
        eq(got["method"], "POST", "method with a body")
        eq(json.loads(got["body"]), {"item": 7, "tags": ["a", "b"]}, "JSON body")
        eq(got["headers"]["content-type"], "application/json", "content-type")
        # A string as it is (2000 bytes: past curl's Expect threshold), with the caller's
        # type, or none at all.
        text = "k=v&" + "z" * 1996
        res = s.result("fetch", [b.url("/echo"), {"method": "put", "body": text,
                                                  "headers": {"Content-Type": "text/x-mine"}}])
        got = json.loads(res["body"])
        eq((got["method"], got["body"], got["headers"]["content-type"]),
           ("PUT", text, "text/x-mine"), "PUT with a string body")
        got = json.loads(s.result("fetch", [b.url("/echo"), {"body": "raw"}])["body"])
        eq((got["body"], "content-type" in got["headers"]), ("raw", False), "no type chosen")
        got = json.loads(s.result("fetch", [b.url("/echo"), {"method": "DELETE"}])["body"])
        eq(got["method"], "DELETE", "DELETE")
        res = s.result("fetch", [b.url("/text"), {"method": "HEAD"}])
        eq((res["status"], res["body"]), (200, ""), "HEAD")


def test_fetch_failures_refused_timeout_too_large_and_bad_urls():
    with Backend() as b, Server(FETCH) as s:
        err = s.result("fetch", ["http://127.0.0.1:%d/" % closed_port()])["err"]
        check(err.startswith("connection refused: 127.0.0.1 port"), err)
        t0 = time.time()
        err = s.result("fetch", [b.url("/slow?s=5"), {"timeout": 0.3}])["err"]
        eq(err, "timed out after 0.3 s", "timeout")
        check(time.time() - t0 < 3 * SLOW, "the timeout bounds the wait: %.2fs" % (time.time() - t0))
        # Too large: by Content-Length at once, and by what came when none is known.
        err = s.result("fetch", [b.url("/big?n=100000"), {"max_body": 1000}])["err"]
        check(err.startswith("response too large"), err)
        res = s.result("fetch", [b.url("/big?n=1000"), {"max_body": 1000}])
        eq(len(res["body"]), 1000, "exactly max_body is fine")
        res = s.result("fetch", [b.url("/big?n=%d" % (3 << 20))])
        eq(len(res["body"]), 3 << 20, "3 MiB under the 16 MiB default")
        err = s.result("fetch", [b.url("/big?n=%d" % ((16 << 20) + 1))])["err"]
        check(err.startswith("response too large"), err)
        err = s.result("fetch", ["ftp://127.0.0.1/x"])["err"]
        check(err.startswith("unsupported URL"), err)
        err = s.result("fetch", ["not a url at all"])["err"]
        check(err.startswith("DNS") or err.startswith("invalid URL"), err)
        # Mistakes in the call itself raise.
        for params, text in [([7], "url must be a string"),
                             ([b.url("/text"), {"timout": 1}], 'unknown option "timout"'),
                             ([b.url("/text"), {"headers": {"X-A": "1\r\nX-B: 2"}}], "CR, LF"),
                             ([b.url("/text"), {"method": "GE T"}], "invalid method"),
                             ([b.url("/text"), {"timeout": 0}], "timeout must be")]:
            resp = s.rpc("fetch", params)
            check("error" in resp and text in resp["error"]["message"], (params, resp))
        eq(s.result("ping"), "pong", "still serving")


def test_fetch_https_with_cafile_and_an_unknown_ca_refused():
    ca, pair = throwaway_ca()
    with Backend(tls=pair) as b, Server(FETCH) as s:
        res = s.result("fetch", [b.url("/text"), {"cafile": ca}])
        eq((res["status"], res["body"]), (200, "hello, fetch"), "https with the CA given")
        err = s.result("fetch", [b.url("/text")])["err"]
        check(err.startswith("TLS: ") and "certificate" in err, err)
        # The name is checked too: the certificate is for 127.0.0.1, not localhost.
        err = s.result("fetch", [b.url("/text").replace("127.0.0.1", "localhost"),
                                 {"cafile": ca}])["err"]
        check(err.startswith("TLS: ") or err.startswith("connection refused"), err)


def test_keep_alive_reuses_one_connection():
    with Backend() as b, Server(FETCH) as s:
        for _ in range(20):
            eq(s.result("fetch", [b.url("/text")])["status"], 200, "status")
        eq(b.hit("/text"), 20, "requests")
        eq(len(b.connections), 1, "connections for 20 fetches one after another")


# ---- Waiting without holding the loop ----

def test_40_slow_fetches_on_one_worker_finish_together():
    delay = 2.0
    with Backend() as b, Server(FETCH, ["--workers=1"]) as s:
        t0 = time.time()
        results = in_threads(40, lambda i: s.result("fetch", [b.url("/slow?s=%s" % delay)]))
        took = time.time() - t0
        eq([r["body"] for r in results], ["slow"] * 40, "bodies")
        check(took < 4 * delay * SLOW, "40 fetches of %ss took %.1fs" % (delay, took))
        check(b.max_inflight >= 30, "at once at the backend: %d" % b.max_inflight)


def test_the_loop_answers_other_calls_while_a_fetch_waits():
    with Backend() as b, Server(FETCH) as s:
        out = {}
        t = threading.Thread(target=lambda: out.update(r=s.result("fetch", [b.url("/slow?s=3")])))
        t.start()
        wait_until(lambda: b.inflight == 1, "the fetch to reach the backend")
        t0 = time.time()
        for _ in range(5):
            eq(s.result("ping"), "pong", "ping")
        check(time.time() - t0 < 1.0 * SLOW, "pings took %.2fs" % (time.time() - t0))
        check(t.is_alive(), "the fetch still waits")
        t.join(30)
        eq(out["r"]["body"], "slow", "the fetch's answer")


def test_the_wait_does_not_count_against_the_handler_time_limit():
    with Backend() as b, Server(FETCH, ["--handler-timeout=1"]) as s:
        res = s.result("fetch", [b.url("/slow?s=2"), {"timeout": 5}])
        eq(res["body"], "slow", "a 2 s fetch under a 1 s handler time limit")


# ---- Transactions ----

def test_conflicts_rerun_a_handler_that_fetched_and_the_count_is_exact():
    data = tmpdir("mph-data-")
    with Backend() as b, Server(FETCH, data=data) as s1, Server(FETCH, data=data) as s2:
        servers = [s1, s2]
        before = [metric(x, "mphost_attempts_total") for x in servers]
        per, clients = 30, 8
        in_threads(clients, lambda i: [servers[(i + k) % 2].result("count", [b.url("/text")])
                                       for k in range(per)])
        attempts = sum(metric(x, "mphost_attempts_total") for x in servers) - sum(before)
        conflicts = sum(metric(x, "mphost_conflicts_total") for x in servers)
        eq(s1.result("get-count")["n"], per * clients, "count after %d calls" % (per * clients))
        # One fetch per attempt: a re-run fetches again.
        eq(b.hit("/text"), attempts, "fetches (attempts: %d, conflicts: %d)" % (attempts, conflicts))
        check(attempts >= per * clients, "attempts %d" % attempts)


def test_a_read_made_stale_by_a_wait_runs_the_handler_again():
    with Backend() as b, Server(FETCH) as s:
        n = 20
        in_threads(n, lambda i: s.result("read-fetch-write", [b.url("/slow?s=0.2")]))
        eq(s.result("get-count")["rfw"], n, "read, fetch, write: exact")
        check(b.hit("/slow") > n, "handlers whose read went stale ran again: %d fetches"
              % b.hit("/slow"))


# ---- mp.rpc ----

def test_rpc_results_remote_errors_and_32008():
    with Backend() as b, Server("server1.lua") as other, Server(FETCH) as s:
        url = "http://127.0.0.1:%d/" % other.port
        eq(s.result("rpc", [url, "simple-service", [{"a": [1, 2]}]]),
           {"result": {"request-was": {"a": [1, 2]}}}, "a result from another mphost")
        eq(s.result("rpc", [url, "nope", []]),
           {"error": {"code": -32601, "message": "Method not found"}}, "its error object")
        eq(s.result("rpc", [b.url("/rpc"), "add", [2, 3]]), {"result": 5}, "add")
        eq(s.result("rpc", [b.url("/rpc"), "fail"]),
           {"error": {"code": -32050, "message": "it failed", "data": {"why": "on purpose"}}},
           "an error with data")
        eq(s.result("rpc", [b.url("/rpc"), "refused"]),
           {"error": {"code": -32600, "message": "Invalid Request"}},
           "an error with id null (the server could not read the request's id) is its answer")
        # error(rerr) makes the remote error this call's.
        resp = s.rpc("rpc-raise", [b.url("/rpc"), "fail"])
        eq(resp.get("error"), {"code": -32050, "message": "it failed",
                               "data": {"why": "on purpose"}}, "raised again")
        # No JSON-RPC response: -32008 and why.
        for params, why in [(["http://127.0.0.1:%d/" % closed_port(), "x"], "connection refused"),
                            ([b.url("/text"), "x"], "HTTP 200, and the body is not JSON"),
                            ([b.url("/rpc"), "garbage"], "is not JSON"),
                            ([b.url("/status?code=502"), "x"], "HTTP 502"),
                            ([b.url("/rpc"), "wrongid"], "id"),
                            ([b.url("/slow?s=5"), "x", [], {"timeout": 0.2}], "timed out")]:
            err = s.result("rpc", params)["error"]
            eq(err["code"], -32008, "code for %r" % (params,))
            check(err["message"].startswith("outbound call failed: ") and why in err["message"],
                  err)
        resp = s.rpc("rpc-raise", ["http://127.0.0.1:%d/" % closed_port(), "x"])
        eq(resp["error"]["code"], -32008, "-32008 raised: %r" % resp)
        check(resp["error"]["message"].startswith("outbound call failed: connection refused"),
              resp)


# ---- Where a handler cannot wait ----

def test_fetch_where_the_coroutine_cannot_yield_fails_clearly():
    with Backend() as b, Server(FETCH) as s:
        for method in ("sorted", "in-coroutine"):
            resp = s.rpc(method, [b.url("/text")])
            check("error" in resp, resp)
            eq(resp["error"]["code"], -32000, method)
            check("mp.fetch cannot wait here" in resp["error"]["message"], resp)
        res = s.result("caught", [b.url("/text")])
        check(res["ok"] is False and "cannot wait here" in res["err"], res)
        eq(b.hit("/text"), 0, "nothing was sent")
        eq(s.result("ping"), "pong", "still serving")


# ---- Every place a handler runs ----

def test_fetch_in_a_basic_auth_service():
    path = os.path.join(tmpdir("mph-users-"), "users")
    passwd(path, "alice", "alice-pw")
    with Backend() as b, Server(FETCH, ["--users=" + path]) as s:
        body = call("whoami")
        body["params"] = [b.url("/text")]
        status, _, resp = request(s.port, body, basic("alice", "alice-pw"))
        eq(status, 200, "status")
        eq(resp["result"], {"user": "alice", "status": 200}, "result")


def test_fetch_in_scatter_leaves_and_shards_on_two_workers():
    with Backend() as b, Server(FETCH, env={"MPH_TEST_FETCH_WORKERS": "2"}) as s:
        res = s.result("scatter", [b.url("/text")])
        eq(res, [{"worker": 1, "body": "hello, fetch"}, {"worker": 2, "body": "hello, fetch"}],
           "leaves")
        for k in range(4):
            eq(s.result("shard", [k, b.url("/text")]),
               {"worker": k % 2 + 1, "body": "hello, fetch"}, "shard %d" % k)
        # One scrape, whichever worker answers it, counts both workers' fetches.
        eq(metric(s, 'mphost_fetch_total{code="200"}'), 6, "fetches of both workers")


# ---- /metrics ----

def test_metrics_count_fetches_by_status():
    with Backend() as b, Server(FETCH) as s:
        for _ in range(3):
            s.result("fetch", [b.url("/text")])
        s.result("fetch", [b.url("/status?code=404")])
        s.result("rpc", [b.url("/rpc"), "add", [1, 1]])
        for _ in range(2):
            s.result("fetch", ["http://127.0.0.1:%d/" % closed_port()])
        eq(metric(s, 'mphost_fetch_total{code="200"}'), 4, "200s (an rpc is one)")
        eq(metric(s, 'mphost_fetch_total{code="404"}'), 1, "404s")
        eq(metric(s, 'mphost_fetch_total{code="0"}'), 2, "no response")
        eq(metric(s, "mphost_fetch_duration_seconds_count"), 7, "histogram count")
        eq(metric(s, 'mphost_fetch_duration_seconds_bucket{le="+Inf"}'), 7, "+Inf bucket")
        check(metric(s, "mphost_fetch_duration_seconds_sum") > 0, "sum")


# ---- Stopping with exchanges in flight ----

def test_stop_finishes_fetches_in_flight():
    with Backend() as b:
        s = Server(FETCH).start()
        out = {}
        t = threading.Thread(target=lambda: out.update(
            r=in_threads(5, lambda i: s.result("fetch", [b.url("/slow?s=1")]))))
        t.start()
        wait_until(lambda: b.inflight == 5, "5 fetches in flight")
        s.stop()  # SIGTERM; a clean exit, 0
        t.join(60)
        eq([r["body"] for r in out["r"]], ["slow"] * 5, "answered before the stop ended")


def test_reload_lets_the_old_workers_finish_their_fetches():
    from harness import run
    with Backend() as b, Server(FETCH) as s:
        out = {}
        t = threading.Thread(target=lambda: out.update(
            r=in_threads(5, lambda i: s.result("fetch", [b.url("/slow?s=1")]))))
        t.start()
        wait_until(lambda: b.inflight == 5, "5 fetches in flight")
        rc, _, err = run([s.script, "reload", "--port=%d" % s.port], env={"MP_STATE_DIR": s.state})
        eq(rc, 0, "reload: " + err)
        t.join(60)
        eq([r["body"] for r in out["r"]], ["slow"] * 5, "answered by the old generation")
        eq(s.result("fetch", [b.url("/text")])["body"], "hello, fetch", "the new one fetches")
        check(s.alive(), "no worker died")


def test_stop_cancels_fetches_past_the_deadline_and_exits_clean():
    with Backend() as b:
        s = Server(FETCH, ["--shutdown-timeout=1"]).start()
        errors = []

        def slow(i):
            try:
                s.rpc("fetch", [b.url("/slow?s=30"), {"timeout": 60}], timeout=60)
            except Exception as e:  # the connection is cut by the stop: expected
                errors.append(e)
        threads = [threading.Thread(target=slow, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        wait_until(lambda: b.inflight == 8, "8 fetches in flight")
        t0 = time.time()
        s.stop()  # SIGTERM; exit 0, no sanitizer or valgrind report, every handle closed
        check(time.time() - t0 < 10 * SLOW, "stopped in %.1fs" % (time.time() - t0))
        for t in threads:
            t.join(60)
        eq(len(errors), 8, "calls cut by the stop")


# ---- The walkthrough ----

@private_network
def test_docs_walkthrough_prints_what_docs_fetch_md_shows():
    """Runs the console block of docs/fetch.md (examples/server1.lua on port 3001,
    examples/fetch.lua on 3000) and compares what each command prints, stdout and stderr."""
    from test_cli import shell, workspace
    steps = console_steps("fetch.md", 10)
    cwd, env = workspace()
    try:
        for cmd, expected in steps:
            rc, out, err = shell(cmd, cwd, env)
            eq((out + err).splitlines(), expected, "what `%s` prints" % cmd)
    finally:
        shell("mphost examples/fetch.lua delete; mphost examples/server1.lua delete --port=3001",
              cwd, env)
