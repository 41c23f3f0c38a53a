"""Topologies across hosts (docs/hosts.md): three mphost hosts on loopback sharing one
redis-server, with --peers, --host-id and --peer-secret-file (spec/scripts/hosts.lua). Where
shards go from every host, an exact counter behind mp.shard under parallel clients, signed
calls (a wrong secret, a replayed or tampered call, a stale one), basicAuth users carried
between hosts, a host that is killed or never answers, and what is refused at start."""
import base64
import hashlib
import hmac
import http.client
import http.server
import json
import os
import random
import shutil
import socket
import subprocess
import threading
import time

from harness import (MPHOST, SCRIPTS, KeepAliveClient, RedisServer, Server, StubHTTP, TestFailure,
                     Threads, check, console_steps, eq, free_port, private_network, run, tmpdir)
from test_auth import passwd
from test_topologies import fnv1a32

HOSTS = os.path.join(SCRIPTS, "hosts.lua")
N = 4  # the shards of hosts.lua's topologies (MPH_TEST_SHARDS)


def place(shard, hosts=3):
    """Where shard (1..n) runs: (host, worker), as docs/hosts.md says."""
    s0 = shard - 1
    return s0 % hosts + 1, s0 // hosts + 1


def shard_of(key, n=N):
    return (fnv1a32(key) if isinstance(key, str) else key) % n + 1


def secret_file(text=None, mode=0o600):
    path = os.path.join(tmpdir("mph-secret-"), "peer.secret")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.write(fd, (text or os.urandom(32).hex() + "\n").encode())
    os.close(fd)
    os.chmod(path, mode)
    return path


def read_key(path):
    with open(path, "rb") as f:
        return f.read().rstrip(b" \t\r\n")


class Cluster:
    """`hosts` mphost hosts of one deployment on loopback ports, sharing redis. urls: what
    --peers lists (default: the hosts' own ports); secrets: each host's secret file."""

    def __init__(self, redis, hosts=3, args=(), secrets=None, urls=None, env=None, script=HOSTS):
        self.ports = [free_port() for _ in range(hosts)]
        self.urls = list(urls or ["http://127.0.0.1:%d" % p for p in self.ports])
        self.secret = secret_file()
        self.secrets = list(secrets or [self.secret] * hosts)
        self.redis = redis
        self.extra = list(args)
        self.env = env
        self.script = script
        self.servers = [self.server(i) for i in range(hosts)]

    def args(self, i):
        return ["--storage=" + self.redis.url(), "--peers=" + ",".join(self.urls),
                "--host-id=%d" % (i + 1), "--peer-secret-file=" + self.secrets[i]] + self.extra

    def server(self, i):
        return Server(self.script, args=self.args(i), port=self.ports[i], env=self.env)

    def __enter__(self):
        try:
            for s in self.servers:
                s.start()
        except BaseException:
            self.kill()
            raise
        return self

    def kill(self):
        for s in self.servers:
            if s.proc and s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.kill()
            return
        problems = []
        for s in self.servers:
            if s.proc and s.proc.poll() is None:
                try:
                    s.stop()
                except TestFailure as e:
                    problems.append(str(e))
        check(not problems, "a host did not stop cleanly:\n" + "\n".join(problems))

    def restart(self, i):
        self.servers[i] = self.server(i)
        return self.servers[i].start()


def error_of(resp):
    check("error" in resp, "expected an error, got %r" % resp)
    return resp["error"]


def call(port, method, params, headers=None, timeout=30):
    """One JSON-RPC call on a new connection; returns (HTTP status, response JSON)."""
    s = Server.__new__(Server)  # only post_raw's port
    s.port = port
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    status, data = s.post_raw(body, headers, timeout=timeout)
    return status, json.loads(data)


def result(port, method, params, headers=None):
    status, resp = call(port, method, params, headers)
    eq(status, 200, "HTTP status of %s %r: %r" % (method, params, resp))
    check("result" in resp, "%s %r on port %d: %r" % (method, params, port, resp))
    return resp["result"]


def seal(key, role, frm, to, worker, request, ts=None, nonce=None):
    """A call signed as docs/hosts.md says a host signs one."""
    ts = int(time.time() * 1000) if ts is None else ts
    nonce = nonce or os.urandom(16).hex()
    signed = ("mphost-peer/1 %s %d %d %d %d %s\n" % (role, frm, to, worker, ts, nonce)).encode()
    signed += json.dumps(request).encode()
    return hmac.new(key, signed, hashlib.sha256).hexdigest().encode() + b" " + signed


def send_signed(port, body):
    """POSTs a call from another host; returns (HTTP status, response JSON)."""
    s = Server.__new__(Server)
    s.port = port
    status, data = s.post_raw(body, {"X-Mphost-Peer": "1",
                                     "Content-Type": "application/octet-stream"})
    return status, json.loads(data)


def request(method, params, user=None):
    r = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    if user is not None:
        r["mphost_user"] = user
    return r


# ---- Placement ----

def test_hosts_place_shards_the_same_from_every_host_and_use_every_host():
    with RedisServer() as redis, Cluster(redis) as c:
        for i, port in enumerate(c.ports):
            where = result(port, "where", [])
            check(1 <= where.pop("worker") <= N, "mp.worker.id")
            eq(where, {"host": i + 1, "hosts": 3, "count": N}, "mp.worker on host %d" % (i + 1))
        keys = list(range(-3, 13)) + ["alice", "bob", "", "\u00e9t\u00e9", "x" * 300]
        used = set()
        for key in keys:
            host, worker = place(shard_of(key))
            for port in c.ports:  # the same key reaches the same shard from any host
                r = result(port, "by-key", [key])
                eq((r["host"], r["worker"]), (host, worker), "key %r from port %d" % (key, port))
                eq(r["hosts"], 3, "mp.worker.hosts")
            used.add(host)
        eq(used, {1, 2, 3}, "the shards use every host")
        for port in c.ports:  # every leaf once, in shard order, wherever the call arrives
            leaves = result(port, "gather", [7, "x"])
            eq([(leaf["host"], leaf["worker"]) for leaf in leaves],
               [place(s) for s in range(1, N + 1)], "leaves from port %d" % port)
            eq([leaf["args"] for leaf in leaves], [[7, "x"]] * N, "each leaf got the params")


def test_hosts_exact_counter_behind_mp_shard_under_parallel_clients():
    keys = ["k%d" % i for i in range(8)]
    calls_per_client = 40
    with RedisServer() as redis, Cluster(redis) as c:
        got = {k: [] for k in keys}
        lock = threading.Lock()

        def client(n):
            # A keep-alive connection to one host; keys of every host through it.
            kc = KeepAliveClient(c.ports[n % 3])
            rnd = random.Random(n)
            try:
                for _ in range(calls_per_client):
                    key = rnd.choice(keys)
                    r = kc.call("count", [key])
                    check("result" in r, "client %d, key %s: %r" % (n, key, r))
                    eq(r["result"]["host"], place(shard_of(key))[0], "host of " + key)
                    with lock:
                        got[key].append(r["result"]["count"])
            finally:
                kc.close()

        threads = Threads()
        for n in range(9):
            threads.start(client, n)
        threads.join(timeout=120)
        total = 0
        for key in keys:  # every increment answered once: 1..calls, none lost or doubled
            eq(sorted(got[key]), list(range(1, len(got[key]) + 1)), "counts of " + key)
            total += len(got[key])
        eq(total, 9 * calls_per_client, "calls answered")
        for key in keys:  # one more, from each host: the count goes on from there
            for i, port in enumerate(c.ports):
                eq(result(port, "count", [key])["count"], len(got[key]) + i + 1, key)
        check(all(s.alive() for s in c.servers), "no process died")


def test_hosts_a_keyed_call_runs_once_on_its_shards_host():
    """An Idempotency-Key goes with the call to the shard's host (inside the signed call) and
    the call runs keyed there: the same call with the same key through every host counts once."""
    with RedisServer() as redis, Cluster(redis) as c:
        for key in ["k%d" % i for i in range(6)]:
            answers = [result(port, "count", [key], {"Idempotency-Key": "ik-" + key})
                       for port in c.ports]
            eq(answers[0]["count"], 1, key)
            eq(answers[0]["host"], place(shard_of(key))[0], "host of " + key)
            eq(answers, [answers[0]] * 3, key + ": every host answers the first call's reply")
            eq(result(c.ports[0], "count", [key])["count"], 2, key + ": ran once, then again")


# ---- Signed calls ----

def test_hosts_refuse_a_wrong_secret_and_run_nothing():
    with RedisServer() as redis:
        good, bad = secret_file(), secret_file()
        with Cluster(redis, secrets=[good, good, bad]) as c:
            host3_key = 2  # shard 3: host 3
            eq(place(shard_of(host3_key))[0], 3, "key 2's host")
            for port in c.ports[:2]:
                e = error_of(call(port, "count", [host3_key])[1])
                eq(e["code"], -32005, "from port %d" % port)
                check(e["message"].startswith("host 3 unavailable: it refused the call: "
                                              "unauthorized: its signature does not match"),
                      e["message"])
            # Host 3 refuses to send with its secret as the others refuse to take it.
            e = error_of(call(c.ports[2], "count", [0])[1])
            eq(e["code"], -32005)
            check(e["message"].startswith("host 1 unavailable: it refused the call"), e["message"])
            # Nothing ran: host 3's own shard counts only the call made there.
            eq(result(c.ports[2], "count", [host3_key])["count"], 1, "host 3's counter")
            # A call signed with another key, straight to host 3: refused, HTTP 403, -32004.
            status, resp = send_signed(c.ports[2], seal(read_key(good), "shard", 1, 3, 1,
                                                        request("count", [host3_key])))
            eq(status, 403, "a call signed with another secret")
            eq(error_of(resp)["code"], -32004)
            check("signature does not match" in error_of(resp)["message"], resp)
            eq(result(c.ports[2], "count", [host3_key])["count"], 2, "still nothing ran")
            check("refused a call from another host: its signature does not match"
                  in c.servers[2].read_log(), "host 3 logs the refusal")


def test_hosts_refuse_unsigned_stale_tampered_and_misaddressed_calls():
    with RedisServer() as redis, Cluster(redis) as c:
        key = read_key(c.secret)
        port = c.ports[0]
        count = request("count", [0])  # shard 1: host 1, worker 1
        refused = [
            ("unsigned", json.dumps(count).encode(), "it is not a signed call"),
            ("no signature line", b"0" * 64 + b" " + json.dumps(count).encode(),
             "its signature does not match"),
            ("stale", seal(key, "shard", 2, 1, 1, count, ts=int(time.time() * 1000) - 60000),
             "it was signed 60"),
            ("from the future", seal(key, "shard", 2, 1, 1, count,
                                     ts=int(time.time() * 1000) + 60000), "ahead"),
            ("meant for host 2", seal(key, "shard", 3, 2, 1, count), "meant for host 2"),
            ("from itself", seal(key, "shard", 1, 1, 1, count), "not one this host reads"),
            ("unknown role", seal(key, "admin", 2, 1, 1, count), "not one this host reads"),
        ]
        body = seal(key, "shard", 2, 1, 1, count)
        tampered = body.replace(b'"params": [0]', b'"params": [4]')
        check(tampered != body, "the test tampered with the params")
        refused.append(("tampered", tampered, "its signature does not match"))
        for what, data, why in refused:
            status, resp = send_signed(port, data)
            eq(status, 403, what)
            e = error_of(resp)
            eq(e["code"], -32004, what)
            check(e["message"].startswith("unauthorized: ") and why in e["message"],
                  "%s: %s" % (what, e["message"]))
        # None of them ran: the first real count is 1.
        eq(result(port, "count", [0])["count"], 1, "nothing ran")
        # The role header of the workers' channel on the public port is no way in either: the
        # call is routed as any client's (test_topologies), never run in a role here.
        status, data = c.servers[0].post_raw(json.dumps(request("by-key", [1])),
                                             {"X-Mphost-Forward": "shard"})
        eq((status, json.loads(data)["result"]["host"]), (200, 2), "routed to host 2 as usual")


class Recorder(StubHTTP):
    """An HTTP proxy in front of one host that keeps every request body it passes on (what a
    listener on the network between the hosts could capture)."""

    def __init__(self, target_port):
        bodies = self.bodies = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                bodies.append(body)
                conn = http.client.HTTPConnection("127.0.0.1", target_port, timeout=30)
                conn.request("POST", "/", body, {k: v for k, v in self.headers.items()
                                                if k.lower() != "host"})
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        super().__init__(Handler)
        self.start()


def test_hosts_refuse_a_replayed_call():
    with RedisServer() as redis:
        ports = [free_port() for _ in range(3)]
        proxy = Recorder(ports[2])
        urls = ["http://127.0.0.1:%d" % p for p in ports[:2]] + ["http://127.0.0.1:%d" % proxy.port]
        c = Cluster(redis, urls=urls)
        c.ports = ports
        c.servers = [c.server(i) for i in range(3)]
        try:
            with c:
                eq(result(ports[0], "count", [2])["count"], 1, "a call through the proxy")
                eq(len(proxy.bodies), 1, "the proxy saw the signed call")
                captured = proxy.bodies[0]
                check(b" mphost-peer/1 shard 1 3 1 " in captured, captured[:200])
                # New connections: whichever worker of host 3 takes the copy hands it to worker
                # 1, the one it names, which remembers the nonce.
                for _ in range(8):
                    status, resp = send_signed(ports[2], captured)
                    eq(status, 403, "a replayed call: %r" % resp)
                    e = error_of(resp)
                    eq(e["code"], -32004)
                    check("taken once already" in e["message"], e["message"])
                eq(result(ports[2], "count", [2])["count"], 2, "the replays ran nothing")
                check("refused a call from another host: it was taken once already"
                      in c.servers[2].read_log(), "host 3 logs the refusal")
        finally:
            proxy.close()


# ---- Users ----

def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(
        ("%s:%s" % (user, password)).encode()).decode()}


def test_hosts_carry_basic_auth_users_only_under_the_secret():
    users = os.path.join(tmpdir("mph-users-"), "users")
    passwd(users, "alice", "alice-pw")
    passwd(users, "bob", "bob-pw")
    with RedisServer() as redis, Cluster(redis, args=["--users=" + users]) as c:
        seen = {"alice": 0, "bob": 0}
        for port in c.ports:
            for key in range(N):
                for user in ("alice", "bob"):
                    r = result(port, "whoami", [key], basic(user, user + "-pw"))
                    seen[user] += 1
                    eq(r, {"key": key, "user": user, "calls": seen[user],
                           "host": place(shard_of(key))[0]}, "%s, key %d" % (user, key))
        # Wrong password, no credentials: refused where the call arrives.
        for headers in (basic("alice", "bob-pw"), None):
            status, resp = call(c.ports[0], "whoami", [2], headers)
            eq((status, error_of(resp)["code"]), (401, -32004), "refused: %r" % headers)
        # A user named in the body of an ordinary request is no user.
        body = json.dumps(request("whoami", [2], user="alice"))
        status, data = c.servers[0].post_raw(body)
        eq((status, error_of(json.loads(data))["code"]), (401, -32004), "mphost_user ignored")
        # Under the secret, the user named goes with the call, even one the users file lacks
        # (the sending host vouches for it); under another key, nothing runs.
        status, resp = send_signed(c.ports[0], seal(read_key(c.secret), "shard", 2, 1, 1,
                                                    request("whoami", [0], user="carol")))
        eq((status, resp["result"]["user"]), (200, "carol"), "the user under the secret")
        status, resp = send_signed(c.ports[0], seal(b"another secret", "shard", 2, 1, 1,
                                                    request("whoami", [0], user="alice")))
        eq(status, 403, "the user under another key")
        eq(result(c.ports[1], "whoami", [0], basic("alice", "alice-pw"))["calls"],
           seen["alice"] + 1, "alice's count moved only by her calls")


# ---- A host that is gone ----

def test_hosts_a_killed_host_fails_its_shards_only_and_serves_after_restart():
    with RedisServer() as redis, Cluster(redis) as c:
        for port in c.ports:  # connections kept alive to every host
            for key in range(N):
                result(port, "count", [key])
        c.servers[2].kill9()
        for port in c.ports[:2]:
            for key in range(3 * N):
                host = place(shard_of(key))[0]
                t0 = time.time()
                status, resp = call(port, "by-key", [key])
                took = time.time() - t0
                eq(status, 200)
                if host == 3:
                    e = error_of(resp)
                    eq(e["code"], -32005, "key %d" % key)
                    check(e["message"].startswith("host 3 unavailable: "), e["message"])
                    check(took < 3, "answered in %.2f s" % took)
                else:
                    eq(resp["result"]["host"], host, "key %d still served" % key)
            e = error_of(call(port, "gather", [])[1])  # a scatter needs every shard
            eq(e["code"], -32005)
            check(e["message"].startswith("host 3 unavailable"), e["message"])
        c.restart(2)  # returns once it serves: the next calls reach it
        for port in c.ports:
            eq(result(port, "by-key", [2])["host"], 3, "from port %d" % port)
            eq(len(result(port, "gather", [])), N, "the scatter again")
            eq(result(port, "count", [2])["count"] > 1, True, "host 3's counter survived")


def test_hosts_a_host_that_never_answers_fails_within_the_time_limit():
    """A host that takes the connection and never answers (a frozen process): -32005 once the
    call's time limit (here --handler-timeout=1 plus 2 s) has passed, never a hang."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    held = []

    def accept():
        while True:
            try:
                conn, _ = silent.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    with RedisServer() as redis:
        ports = [free_port(), free_port()]
        urls = ["http://127.0.0.1:%d" % p for p in ports] + \
               ["http://127.0.0.1:%d" % silent.getsockname()[1]]
        c = Cluster(redis, hosts=2, urls=urls, args=["--handler-timeout=1"])
        c.ports = ports
        c.servers = [c.server(i) for i in range(2)]
        try:
            with c:
                t0 = time.time()
                e = error_of(call(ports[0], "by-key", [2])[1])
                took = time.time() - t0
                eq(e["code"], -32005)
                check(e["message"].startswith("host 3 unavailable: timed out after 3 s"),
                      e["message"])
                check(2.5 < took < 6, "answered after %.2f s" % took)
                eq(result(ports[1], "by-key", [1])["host"], 2, "the others serve meanwhile")
        finally:
            silent.close()
            for conn in held:
                conn.close()


# ---- Start ----

def start_fails(args, expected, env=None):
    """`mphost hosts.lua serve` with args exits 1 with one line containing `expected`."""
    full = dict(env or {})
    full.setdefault("MP_STATE_DIR", tmpdir("mph-state-"))
    rc, out, err = run([HOSTS, "serve", str(free_port()), "--listen=127.0.0.1",
                        "--data=" + tmpdir("mph-data-")] + list(args), env=full, timeout=60)
    eq(rc, 1, "exit status of %s (%s)" % (args, err))
    lines = [line for line in err.splitlines() if line.strip()]
    eq(len(lines), 1, "one line: %r" % err)
    check(expected in lines[0], "%r not in %r" % (expected, lines[0]))


def test_hosts_refuse_at_start_what_cannot_work():
    peers = "--peers=http://127.0.0.1:1,http://127.0.0.1:2,http://127.0.0.1:3"
    ok = secret_file()
    redis = "--storage=redis://127.0.0.1:1"  # never reached: the checks come first
    start_fails([peers, "--host-id=1", "--peer-secret-file=" + ok],
                "--peers lists 3 hosts, which need storage they all reach")
    start_fails([peers, "--host-id=1", redis], "give --peer-secret-file=FILE")
    start_fails([peers, "--host-id=1", redis, "--peer-secret-file=" + secret_file(mode=0o644)],
                "is readable or writable by others (mode 644)")
    start_fails([peers, "--host-id=1", redis, "--peer-secret-file=" + secret_file(" \n")],
                "is empty")
    start_fails([peers, "--host-id=1", redis, "--peer-secret-file=/nonexistent/secret"],
                "cannot read the peer secret file /nonexistent/secret")
    start_fails([peers, "--host-id=4", redis, "--peer-secret-file=" + ok],
                "--host-id: this is host 4, but --peers lists 3 hosts")
    start_fails(["--host-id=2", redis], "--host-id=2, but --peers lists no hosts")
    start_fails(["--peers=ftp://x,http://y", "--host-id=1", redis, "--peer-secret-file=" + ok],
                "invalid --peers: \"ftp://x\" is not a base URL")
    start_fails(["--peers=http://a,,http://b", redis], "is not a base URL")


def test_hosts_host_id_defaults_to_the_number_in_the_host_name():
    """As a StatefulSet's pod NAME-2 is host 3 (needs a UTS namespace of its own: root)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        raise TestFailure("needs unshare(1) and root (the suite runs as root)")
    with RedisServer() as redis:
        secret = secret_file()
        port = free_port()
        peers = ",".join("http://127.0.0.1:%d" % p for p in (free_port(), free_port(), port))
        s = Server(HOSTS, port=port, prefix_cmd=["unshare", "--uts", "sh", "-c",
                                                 'hostname mphost-web-2 && exec "$@"', "sh"],
                   args=["--storage=" + redis.url(), "--peers=" + peers,
                         "--peer-secret-file=" + secret])
        with s:
            eq(result(port, "where", [])["host"], 3, "mphost-web-2 is host 3")
        p = subprocess.run(
            ["unshare", "--uts", "sh", "-c", 'hostname webserver && exec "$@"', "sh", MPHOST,
             HOSTS, "serve", str(free_port()), "--peers=" + peers, "--peer-secret-file=" + secret,
             "--storage=" + redis.url()], capture_output=True, text=True, timeout=60,
            env=dict(os.environ, MP_STATE_DIR=tmpdir("mph-state-")))
        eq(p.returncode, 1, "a host name without a number needs --host-id")
        check('this host\'s name "webserver" does not say which one it is' in p.stderr and
              "give --host-id=K" in p.stderr, p.stderr)


def test_hosts_one_host_is_host_1_of_1():
    with Server(HOSTS, args=["--peers=http://127.0.0.1:9"]) as s:
        where = result(s.port, "where", [])
        check(1 <= where.pop("worker") <= N, "mp.worker.id")
        eq(where, {"host": 1, "hosts": 1, "count": N}, "mp.worker")
        eq([leaf["host"] for leaf in result(s.port, "gather", [])], [1] * N, "all here")
        status, resp = send_signed(s.port, b"0" * 64 + b" x")
        eq((status, error_of(resp)["code"]), (403, -32004), "no calls from other hosts")
        check("(no --peers)" in error_of(resp)["message"], resp)


# ---- The walkthrough ----

@private_network
def test_docs_walkthrough_prints_what_docs_hosts_md_shows():
    """Runs the console block of docs/hosts.md (three hosts of examples/hosts.lua on ports 3001
    to 3003 and a redis-server on 6390) and compares what each command prints."""
    from test_cli import shell, workspace
    steps = console_steps("hosts.md", 15)
    cwd, env = workspace()
    try:
        for cmd, expected in steps:
            rc, out, err = shell(cmd, cwd, env)
            eq((out + err).splitlines(), expected, "what `%s` prints" % cmd)
    finally:
        shell("for p in 3001 3002 3003; do mphost examples/hosts.lua delete --port=$p; done; "
              "redis-cli -p 6390 shutdown nosave", cwd, env)
