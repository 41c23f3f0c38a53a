"""Topologies that forward calls between workers: mp.shard and mp.scatter (examples/server3.lua,
examples/server4.lua, spec/scripts/topologies.lua), the peer channel under them (host/server/peer.c)
and its failures: a worker gone, a timeout, a client that leaves, a stop with forwards in
flight."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from harness import (SCRIPTS, KeepAliveClient, Server, TestFailure, check, deployment_file, eq,
                     run, sanitizer_report, tmpdir, wait_until)
from test_scope import wait_log
from test_workers import started, status

TOPOLOGIES = os.path.join(SCRIPTS, "topologies.lua")


def fnv1a32(text):
    """FNV-1a, 32 bits, over the UTF-8 bytes: README's definition of a string key's shard."""
    h = 2166136261
    for b in text.encode():
        h = ((h ^ b) * 16777619) % 2 ** 32
    return h


def error_of(resp):
    check("error" in resp, "expected an error, got %r" % resp)
    return resp["error"]


def call_thread(s, method, params, out, timeout=60):
    """Calls in a thread of its own (a new connection); the reply or the exception goes to
    out["reply"]."""
    def go():
        try:
            out["reply"] = s.rpc(method, params, timeout=timeout)
        except Exception as e:  # reported by the test
            out["reply"] = e
    t = threading.Thread(target=go)
    t.start()
    return t


# ---- mp.shard ----

def test_shard_integer_keys_0_to_29_reach_k_mod_3_plus_1():
    with Server(TOPOLOGIES) as s:
        started(s, 3)
        for k in range(30):  # a new connection per call: it arrives at any worker
            eq(s.result("by-key", [k]), {"key": k, "worker": k % 3 + 1}, "key %d" % k)
        # Negative keys: the floored modulo (Lua's %, Python's %): -1 goes to worker 3.
        for k in range(-6, 0):
            eq(s.result("by-key", [k])["worker"], k % 3 + 1, "key %d" % k)
        # Integral numbers of any size, exactly.
        eq(s.result("by-key", [2 ** 52 + 1])["worker"], (2 ** 52 + 1) % 3 + 1, "key 2^52+1")


def test_shard_a_key_always_reaches_the_same_worker():
    with Server(TOPOLOGIES) as s:
        started(s, 3)
        keys = ["alice", "bob", "carol", "", "\u00e9t\u00e9", "x" * 300]
        seen = {k: set() for k in keys}
        for i in range(20):
            for k in keys:
                seen[k].add(s.result("by-key", [k])["worker"])
        for k in keys:
            eq(seen[k], {fnv1a32(k) % 3 + 1}, "workers of key %r" % k[:20])
        # And over keep-alive connections, which stay with one worker each.
        clients = [KeepAliveClient(s.port) for _ in range(4)]
        try:
            for c in clients:
                for k in keys:
                    eq(c.call("by-key", [k])["result"]["worker"], fnv1a32(k) % 3 + 1, k[:20])
        finally:
            for c in clients:
                c.close()


def test_shard_keyfn_must_return_an_integer_or_a_string():
    with Server(TOPOLOGIES) as s:
        started(s, 3)
        for what, said in (("table", "returned a table"), ("float", "returned 1.5, not an integer"),
                           ("nil", "returned nil"), ("boolean", "returned a boolean")):
            e = error_of(s.rpc("odd-key", [what]))
            eq(e["code"], -32000, what)
            check(e["message"].startswith("mp.shard: keyfn " + said), e["message"])
        eq(s.result("odd-key", ["huge"])["worker"], (2 ** 60) % 3 + 1, "2^60+1 is 2^60 in Lua")
        check(s.alive(), "the server stays up")


def test_server3_walkthrough_one_user_one_worker():
    with Server("server3.lua") as s:
        started(s, 3)
        for user in ("a", "bb", "ccc", "dddd", "a", "bb"):
            eq(s.result("sharded-service", [{"user": user}]),
               {"user": user, "shard": len(user) % 3 + 1}, user)
        e = error_of(s.rpc("sharded-service", [{}]))
        eq(e["code"], -32000, "no user")
        check("user" in e["message"], e["message"])


def test_topologies_do_not_nest():
    rc, out, err = run([TOPOLOGIES, "serve", "0"], env={"MPH_TEST_NEST": "1",
                                                       "MP_DATA": tmpdir()})
    eq(rc, 1, "exit status")
    check("mp.shard: handler is a mp.scatter handler (topologies do not nest)" in err, err)


# ---- mp.scatter ----

def test_server4_histogram_has_10_buckets_of_at_most_1000_numbers():
    with Server("server4.lua") as s:
        started(s, 10)
        for _ in range(5):
            buckets = s.result("histogram-service", [{}])
            eq(len(buckets), 10, "buckets")
            check(all(isinstance(b, int) and b >= 0 for b in buckets), buckets)
            # 1000 numbers; the 1.2% or so beyond +-2.5 are left out.
            check(900 < sum(buckets) <= 1000, "sum %d: %r" % (sum(buckets), buckets))
            # A normal distribution: the middle buckets hold the most.
            check(buckets[4] + buckets[5] > buckets[0] + buckets[9], buckets)


def test_scatter_runs_every_leaf_once_in_worker_order():
    with Server(TOPOLOGIES, env={"MPH_TEST_SCATTER": "10"}) as s:
        started(s, 10)
        for i in range(10):
            r = s.result("gather", [i, "x"])
            eq([leaf["worker"] for leaf in r], list(range(1, 11)), "leaves, in worker order")
            eq([leaf["args"] for leaf in r], [[i, "x"]] * 10, "each leaf got the params")


def test_scatter_leaf_that_raises_fails_the_call_with_its_error():
    with Server(TOPOLOGIES) as s:
        started(s, 3)
        for _ in range(6):  # wherever the call arrives
            e = error_of(s.rpc("leaf-raises", ["error"]))
            eq((e["code"], e["message"]), (-32000, "leaf 2 failed"), "error() in leaf 2")
            e = error_of(s.rpc("leaf-raises", ["code"]))
            eq(e, {"code": -32042, "message": "leaf 2 refuses", "data": {"worker": 2}},
               "mp.error in leaf 2")


def test_routers_may_not_use_scopes_where_the_call_arrives():
    with Server(TOPOLOGIES) as s:
        started(s, 3)
        e = error_of(s.rpc("keyfn-scope", []))
        eq(e["code"], -32000)
        check(e["message"].startswith("mp.shard: keyfn may not use a scope"), e["message"])
        e = error_of(s.rpc("merge-scope", []))
        eq(e["code"], -32000)
        check(e["message"].startswith("mp.scatter: merge may not use a scope"), e["message"])


# ---- The peer channel ----

def test_the_role_header_on_the_public_port_is_ignored():
    with Server(TOPOLOGIES) as s:
        started(s, 3)
        for role in ("shard", "leaf", "bogus"):
            for _ in range(12):  # new connections: they arrive at every worker
                body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "by-key", "params": [0]})
                status_, data = s.post_raw(body, {"X-Mphost-Forward": role})
                eq(status_, 200)
                eq(json.loads(data)["result"], {"key": 0, "worker": 1}, "routed as usual")
                body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "gather", "params": []})
                status_, data = s.post_raw(body, {"X-Mphost-Forward": role})
                eq(len(json.loads(data)["result"]), 3, "every leaf ran, merged")


PEER_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(20)
try:
    s.connect(sys.argv[1])
except PermissionError:  # the socket directory is closed to us
    sys.stdout.write("denied")
    sys.exit(0)
body = sys.argv[3].encode()
data = b""
try:
    s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nX-Mphost-Forward: %s\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (sys.argv[2].encode(), len(body), body))
except BrokenPipeError:  # closed before we sent it
    pass
while True:
    try:
        chunk = s.recv(65536)
    except ConnectionResetError:  # closed with our request unread
        break
    if not chunk:
        break
    data += chunk
    if b"\r\n\r\n" in data and data.split(b"\r\n\r\n", 1)[1].endswith(b"\n"):
        break
sys.stdout.buffer.write(data or b"closed")
"""


def peer_call(s, worker, role, method, params, prefix=()):
    """Sends one call straight to a worker's peer socket (as `prefix` runs it: another user);
    returns the reply's JSON, or "closed"."""
    name = os.path.join(deployment_file(s.state, s.script, s.port, ".sockets"), "g1.w%d" % worker)
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    p = subprocess.run(list(prefix) + [sys.executable, "-c", PEER_CLIENT, name, role, body],
                       capture_output=True, timeout=60)
    eq(p.returncode, 0, "peer client: %r" % p.stderr)
    if p.stdout in (b"closed", b"denied"):
        return p.stdout.decode()
    return json.loads(p.stdout.split(b"\r\n\r\n", 1)[1])


def test_the_peer_socket_runs_a_role_here_and_serves_only_our_user():
    with Server(TOPOLOGIES) as s:
        started(s, 3)
        # Key 0 belongs to worker 1, but a call forwarded as a shard runs where it is sent.
        eq(peer_call(s, 2, "shard", "by-key", [0])["result"], {"key": 0, "worker": 2})
        eq(peer_call(s, 3, "leaf", "gather", ["y"])["result"], {"worker": 3, "args": ["y"]})
        e = peer_call(s, 2, "bogus", "by-key", [0])["error"]
        eq(e["code"], -32600)
        check("unknown forward role" in e["message"], e)
        if os.geteuid() == 0:  # the check needs another user to connect
            nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
            eq(peer_call(s, 2, "shard", "by-key", [0], nobody), "denied", "another user")
        eq(s.result("by-key", [1]), {"key": 1, "worker": 2}, "serving on")


def test_a_leaf_on_a_worker_that_is_gone_fails_with_32005():
    flag = os.path.join(tmpdir(), "broken")
    with Server(TOPOLOGIES, env={"MPH_TEST_BROKEN_FLAG": flag}) as s:
        workers = started(s, 3)
        open(flag, "w").close()  # worker 2's replacements cannot load: it stays gone
        os.kill(workers[2], signal.SIGKILL)
        wait_log(s, "worker 2 (pid %d) was killed by signal 9" % workers[2])
        for _ in range(3):
            t0 = time.time()
            e = error_of(s.rpc("gather", []))
            eq((e["code"], e["message"]), (-32005, "worker 2 unavailable: connection refused"))
            # Refused connections are retried for a second (peer.c's RETRY_WINDOW_MS; timers
            # never fire early), then it fails at once: 4 s of slack for a loaded machine.
            took = time.time() - t0
            check(0.95 < took < 1 + 4, "answered after %.2f s" % took)
            e = error_of(s.rpc("by-key", [1]))
            eq((e["code"], e["message"]), (-32005, "worker 2 unavailable: connection refused"))
        eq(s.result("by-key", [0]), {"key": 0, "worker": 1}, "the other shards answer")
        os.unlink(flag)
        wait_until(lambda: 2 in status(s)[1], "worker 2 comes back")
        wait_until(lambda: "result" in s.rpc("gather", []), "the scatter answers again")


def test_a_kill_that_races_the_call_gives_32005_or_success_never_a_hang():
    with Server(TOPOLOGIES) as s:
        workers = started(s, 3)
        for victim in (2, 3):
            out = {}
            t = call_thread(s, "gather", [], out)
            os.kill(workers[victim], signal.SIGKILL)
            t.join(60)
            check(not t.is_alive(), "the call hangs")
            r = out["reply"]
            if isinstance(r, Exception):
                # The call was in the killed worker's own hands: its connection closes.
                check(isinstance(r, (OSError, TestFailure, ValueError)), repr(r))
            elif "error" in r:
                eq(r["error"]["code"], -32005, "error %r" % r["error"])
                check(r["error"]["message"].startswith("worker %d unavailable" % victim), r)
            else:
                eq([x["worker"] for x in r["result"]], [1, 2, 3])
            wait_until(lambda: status(s)[1].get(victim, workers[victim]) != workers[victim],
                       "worker %d is replaced" % victim)
            workers = status(s)[1]
            wait_until(lambda: "result" in s.rpc("gather", []), "the scatter answers again")


def test_forwarding_under_load_keeps_a_sharded_counter_exact():
    keys = ["k%d" % i for i in range(6)]
    with Server(TOPOLOGIES) as s:
        started(s, 3)
        seen, errors, lock = {k: [] for k in keys}, [], threading.Lock()

        def client(n):
            try:
                c = KeepAliveClient(s.port)
                for i in range(50):
                    key = keys[(n + i) % len(keys)]
                    r = c.call("count", [key])
                    if "error" in r:
                        raise TestFailure("error: %r" % r["error"])
                    eq(r["result"]["worker"], fnv1a32(key) % 3 + 1, "worker of " + key)
                    with lock:
                        seen[key].append(r["result"]["count"])
                c.close()
            except Exception as e:  # reported below
                with lock:
                    errors.append(e)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        check(not errors, "failed clients: %r" % errors[:3])
        eq(sum(len(v) for v in seen.values()), 800, "calls answered")
        for k, counts in seen.items():
            eq(sorted(counts), list(range(1, len(counts) + 1)), "counts of " + k)
            eq(s.result("count", [k])["count"], len(counts) + 1, "stored count of " + k)


def test_waiting_for_a_forward_does_not_count_against_the_time_limit():
    d = tmpdir()
    with Server(TOPOLOGIES, ["--handler-timeout=1"]) as s:
        started(s, 3)
        # Scatters whose leaf 2 takes 0.45 s each: worker 2 runs their leaves one after the
        # other, so the last router waits well over its 1 s limit, while running far less.
        replies, threads = [{} for _ in range(4)], []
        flag = os.path.join(d, "first")
        threads.append(call_thread(s, "slow-leaf", [2, 0.45, flag], replies[0]))
        wait_until(lambda: os.path.exists(flag), "the first leaf 2 runs")
        t0 = time.time()
        for r in replies[1:]:
            threads.append(call_thread(s, "slow-leaf", [2, 0.45], r))
        for t in threads:
            t.join(60)
        waited = time.time() - t0
        for r in replies:
            check(isinstance(r["reply"], dict) and r["reply"].get("result") == [1, 2, 3],
                  "reply %r" % r["reply"])
        check(waited > 1, "the last call waited %.2f s" % waited)


def test_a_forward_to_a_stuck_worker_answers_32005_in_bounded_time():
    d = tmpdir()
    with Server(TOPOLOGIES, ["--handler-timeout=1"]) as s:
        started(s, 3)
        # Worker 2 sleeps 30 s in a C call (the time limit's hook cannot stop it), so it takes
        # no new connection: the scatter below arrives elsewhere and forwards leaf 2 to it.
        # The forward gives up after the limit + 2 s; the supervisor's watchdog kills the
        # stuck worker once its loop has not turned for the limit + 0.6 s (its last turn was at
        # most one 250 ms heartbeat tick before the sleep began), which cuts the forward's
        # connection first: either way a clear -32005, after 1.35 to 3 s, long before the
        # stuck worker would answer.
        flag, first = os.path.join(d, "asleep"), {}
        t = call_thread(s, "sleep", [1, 30, flag], first)
        wait_until(lambda: os.path.exists(flag), "worker 2 sleeps")
        asleep_at = os.stat(flag).st_mtime  # (a coarse clock, never later than the sleep)
        t0 = time.time()
        e = error_of(s.rpc("gather", []))
        gave_up = time.time()
        eq(e["code"], -32005)
        check(e["message"] in ("worker 2 unavailable: no answer within 3000 ms",
                               "worker 2 unavailable: connection reset by peer",
                               "worker 2 unavailable: it closed the connection before answering"),
              e["message"])
        # Not before the worker could be judged stuck (1.35 s into its sleep); well before it
        # wakes (30 s): 10 s leaves a loaded machine 7 s over the forward's own 3 s.
        check(gave_up - asleep_at > 1.3, "the forward gave up %.2f s into the sleep" %
              (gave_up - asleep_at))
        check(gave_up - t0 < 10, "the forward gave up after %.1f s" % (gave_up - t0))
        t.join(60)
        # The sleeper's own call failed one way or another (it ran past its limit): an error,
        # or its connection closed when the watchdog replaced its worker.
        check((isinstance(first["reply"], dict) and "error" in first["reply"]) or
              "connection closed before a response" in str(first["reply"]), first["reply"])
        wait_until(lambda: "result" in s.rpc("gather", []), "worker 2 answers again")
        for k in range(6):
            eq(s.result("by-key", [k])["worker"], k % 3 + 1)


def test_a_client_that_leaves_while_its_forward_is_in_flight():
    d = tmpdir()
    with Server(TOPOLOGIES) as s:
        started(s, 3)
        for i in range(3):
            flag = os.path.join(d, "leaf%d" % i)
            body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "slow-leaf",
                               "params": [2, 0.5, flag]}).encode()
            c = socket.create_connection(("127.0.0.1", s.port), timeout=30)
            c.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(body), body))
            wait_until(lambda: os.path.exists(flag), "leaf 2 runs")
            c.close()  # gone before the answer
        wait_until(lambda: s.rpc("slow-leaf", [0, 0]).get("result") == [1, 2, 3],
                   "the workers answer on")
    # The stop (leak and use-after-free checks under ASan) is the rest of the test.


def test_a_stop_with_forwards_in_flight_answers_them():
    d = tmpdir()
    s = Server(TOPOLOGIES).start()
    try:
        started(s, 3)
        # Leaf 2 runs until `gate` exists, which is written only once the stop has begun:
        # the forward is in flight when the SIGTERM arrives, whatever the machine's speed.
        flag, gate, out = os.path.join(d, "leaf"), os.path.join(d, "gate"), {}
        t = call_thread(s, "slow-leaf", [2, 20, flag, gate], out)
        wait_until(lambda: os.path.exists(flag), "leaf 2 runs")
        s.proc.send_signal(signal.SIGTERM)
        wait_log(s, "received SIGTERM; stopping")
        check("reply" not in out, "the call ended before its leaf did: %r" % out.get("reply"))
        open(gate, "w").close()
        t.join(60)
    finally:
        if s.alive() and "reply" not in locals().get("out", {}):
            s.kill9()
    check(not t.is_alive(), "the call hangs")
    r = out["reply"]
    check(isinstance(r, dict), "no answer: %r" % r)
    if "error" in r:
        eq(r["error"]["code"], -32005, "error %r" % r["error"])
    else:
        eq(r["result"], [1, 2, 3])
    eq(s.proc.wait(60), 0, "exit status: %s" % s.read_log()[-2000:])
    s.log.close()
    text = s.read_log()
    check("stopped" in text and not sanitizer_report(text), text[-4000:])
