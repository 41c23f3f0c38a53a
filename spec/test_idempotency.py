"""Idempotency keys (docs/idempotency.md): a call with an Idempotency-Key has its reply committed
with its writes, and a duplicate (same key, method and params) gets that reply with
`Idempotent-Replayed: true` and runs nothing, on files and on Redis, in one process, across a
restart and across two processes sharing the storage; concurrent duplicates run once; another
request under the key is -32006; a raised error is replayed, a transient one is not stored;
keys are per user; a batch, a bad key and a routed service are refused; records expire."""
import json
import os
import socket
import threading
import time

from harness import SCRIPTS, MPHOST, RedisServer, Server, Threads, check, eq, read_response, tmpdir

SCRIPT = os.path.join(SCRIPTS, "idem.lua")
BUCKETS_FILE, BUCKETS_REDIS = 16, 1024  # lua/idem.c


def post(port, body, key=None, headers=(), timeout=60):
    """POSTs body (a dict or list, or raw bytes) with an optional Idempotency-Key (str or bytes)
    and more (name, value) headers; returns (status, headers, parsed body or None)."""
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: %d\r\nConnection: close\r\n" % len(body)
    if key is not None:
        head += b"Idempotency-Key: " + (key if isinstance(key, bytes) else key.encode()) + b"\r\n"
    for name, value in headers:
        head += name.encode() + b": " + (value if isinstance(value, bytes) else
                                         value.encode()) + b"\r\n"
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(head + b"\r\n" + body)
        status, hdrs, data, _ = read_response(s)
    finally:
        s.close()
    return status, hdrs, json.loads(data) if data else None


def raw_status(port, key):
    """POSTs an incr with key; returns (status, raw body): for keys HTTP itself may refuse."""
    body = b'{"jsonrpc":"2.0","method":"incr","id":1}'
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nIdempotency-Key: %s"
                  b"\r\nConnection: close\r\n\r\n%s" % (len(body), key, body))
        status, _, data, _ = read_response(s)
    finally:
        s.close()
    return status, data


def call(port, method, params=None, key=None, id=1, headers=()):
    req = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        req["params"] = params
    status, hdrs, body = post(port, req, key, headers)
    eq(status, 200, "HTTP status (%r)" % (body,))
    eq(body["id"], id, "the reply's id is the request's own")
    return body, hdrs.get("idempotent-replayed")


def plain(port, method, params=None):
    body, replayed = call(port, method, params)
    check("result" in body, body)
    eq(replayed, None, "Idempotent-Replayed on a call without a key")
    return body["result"]


def fnv1a64(data):
    h = 14695981039346656037
    for b in data:
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


def bucket_of(key, redis=False):
    """The bucket (lua/idem.c) of a key of a call without a user."""
    return fnv1a64(b"-" + key.encode()) % (BUCKETS_REDIS if redis else BUCKETS_FILE)


def server(storage, data=None, args=()):
    """A server of idem.lua, not started (`with` starts it)."""
    return Server(SCRIPT, list(storage) + list(args), data=data)


def on_both(fn):
    """Runs fn(storage_args) on files, then on a fresh Redis."""
    fn([])
    with RedisServer() as r:
        fn(["--storage=" + r.url()])


# ---- One process ----

def replays(storage):
    with server(storage) as s:
        plain(s.port, "count")  # loads the scope: no attempt runs again for a load below
        first, replayed = call(s.port, "incr", {"a": 1}, key="order-1", id=1)
        eq(first["result"], {"n": 1, "params": {"a": 1}}, "first call")
        eq(replayed, None, "the first call is not a replay")
        again, replayed = call(s.port, "incr", {"a": 1}, key="order-1", id="second")
        eq(replayed, "true", "Idempotent-Replayed on the duplicate")
        eq(again["result"], first["result"], "the duplicate's result")
        # The handler did not run again: neither the stored count nor the process's count moved.
        eq(plain(s.port, "count"), 1, "count after the duplicate")
        eq(plain(s.port, "runs", ["incr"]), 1, "handler runs")
        # Another key runs.
        other, replayed = call(s.port, "incr", {"a": 1}, key="order-2")
        eq((other["result"]["n"], replayed), (2, None), "another key")
        eq(plain(s.port, "count"), 2, "count")


def test_same_key_same_request_replays_and_runs_nothing():
    on_both(replays)


def test_same_request_in_another_spelling_is_the_same_request():
    with server([]) as s:
        body = b'{"jsonrpc":"2.0","id":1,"method":"incr","params":{"a":1,"b":[1,2.5,"x"]}}'
        respelled = (b'{ "params" : { "b" : [ 1, 2.5, "x" ], "a" : 1 }, "method" : "incr",'
                     b' "id" : 2, "jsonrpc" : "2.0" }')
        _, h1, r1 = post(s.port, body, key="k")
        _, h2, r2 = post(s.port, respelled, key="k")
        eq(h2.get("idempotent-replayed"), "true", "replayed")
        eq(r2["result"], r1["result"], "result")
        eq(plain(s.port, "count"), 1, "count")


def reuse_refused(storage):
    with server(storage) as s:
        call(s.port, "incr", {"a": 1}, key="k1")
        for method, params in (("incr", {"a": 2}), ("incr", [1]), ("incr", None),
                               ("deposit", {"id": 1, "amount": 1})):
            body, replayed = call(s.port, method, params, key="k1", id=7)
            eq(body.get("error"), {"code": -32006,
                                   "message": "idempotency key reused with a different request"},
               "reply to %s %r under a used key" % (method, params))
            eq(replayed, None, "Idempotent-Replayed on a refusal")
        eq(plain(s.port, "count"), 1, "count")
        eq(plain(s.port, "runs", ["deposit"]), 0, "deposit runs")
        # The record is intact: the original request still replays.
        _, replayed = call(s.port, "incr", {"a": 1}, key="k1")
        eq(replayed, "true", "the original still replays")


def test_same_key_with_another_request_is_refused():
    on_both(reuse_refused)


def test_a_raised_error_is_stored_and_replayed_and_its_writes_are_not():
    with server([]) as s:
        plain(s.port, "count")  # loads the scope: no attempt runs again for a load below
        first, replayed = call(s.port, "boom", key="b")
        eq(first.get("error"), {"code": 4001, "message": "boom 1", "data": {"attempt": 1}},
           "the handler's error")
        eq(replayed, None, "first")
        again, replayed = call(s.port, "boom", key="b", id=2)
        eq((again.get("error"), replayed), (first["error"], "true"), "replayed error")
        eq(plain(s.port, "runs", ["boom"]), 1, "handler runs")
        # Without a key it runs each time; what it wrote before raising was never committed.
        body, _ = call(s.port, "boom")
        eq(body["error"]["message"], "boom 2", "unkeyed")
        eq(plain(s.port, "peek", ["boomed"]), None, "the raising handler's write")


def test_a_transient_error_is_not_stored():
    with server([]) as s:
        plain(s.port, "count")  # loads the scope: no attempt runs again for a load below
        first, _ = call(s.port, "flaky", key="f")
        eq(first["error"]["code"], -32002, "the first run's transient error")
        second, replayed = call(s.port, "flaky", key="f")
        eq((second.get("result"), replayed), (2, None), "it ran again")
        third, replayed = call(s.port, "flaky", key="f")
        eq((third.get("result"), replayed), (2, "true"), "now stored")
        eq(plain(s.port, "runs", ["flaky"]), 2, "handler runs")


def test_a_call_that_touches_no_scope_is_recorded_too():
    with server([]) as s:
        a, _ = call(s.port, "pure", [5], key="p")
        b, replayed = call(s.port, "pure", [5], key="p")
        eq((b["result"], replayed), (a["result"], "true"), "replay")
        eq(plain(s.port, "runs", ["pure"]), 1, "runs")


def test_a_notification_with_a_key_runs_once_under_it():
    with server([]) as s:
        status, _, body = post(s.port, {"jsonrpc": "2.0", "method": "incr", "params": {"a": 1}},
                               key="note")
        eq((status, body), (204, None), "a notification is not answered")
        status, _, body = post(s.port, {"jsonrpc": "2.0", "method": "incr", "params": {"a": 1}},
                               key="note")
        eq(status, 204, "again")
        again, replayed = call(s.port, "incr", {"a": 1}, key="note")
        eq((again["result"]["n"], replayed), (1, "true"), "the call under the notification's key")
        eq(plain(s.port, "count"), 1, "count")


def test_a_batch_with_a_key_is_refused():
    with server([]) as s:
        for batch in ([{"jsonrpc": "2.0", "method": "incr", "id": 1}],
                      [{"jsonrpc": "2.0", "method": "incr", "id": 1},
                       {"jsonrpc": "2.0", "method": "incr", "id": 2}]):
            status, _, body = post(s.port, batch, key="batch")
            eq(status, 200, "status")
            check(isinstance(body, dict), "one error object for the batch: %r" % (body,))
            eq(body["error"]["code"], -32600, "code")
            check("batch" in body["error"]["message"], body)
        eq(plain(s.port, "count"), 0, "nothing ran")


def test_bad_keys_are_refused():
    with server([]) as s:
        bad = [b"", b" ", b"x" * 201, b"x" * 300, b"caf\xc3\xa9", b"a\x80b"]
        for key in bad:
            body, replayed = call(s.port, "incr", {"a": 1}, key=key, id=3)
            eq(body.get("error", {}).get("code"), -32600, "key %r" % key)
            check("Idempotency-Key" in body["error"]["message"], body)
        # Control characters: the HTTP parser refuses the request itself (400), or -32600.
        for key in (b"a\x7fb", b"a\x01b"):
            status, body = raw_status(s.port, key)
            check(status == 400 or b"-32600" in body, "key %r: %r %r" % (key, status, body))
        # Two keys in one request.
        body, _ = call(s.port, "incr", {"a": 1}, key="a", headers=[("Idempotency-Key", "b")])
        eq(body.get("error", {}).get("code"), -32600, "two keys")
        eq(plain(s.port, "count"), 0, "nothing ran")
        # The longest key and every printable character are fine.
        for key in ("x" * 200, "".join(chr(c) for c in range(0x21, 0x7f)), "a b"):
            body, _ = call(s.port, "incr", {"a": 1}, key=key)
            check("result" in body, "key %r: %r" % (key, body))
            body, replayed = call(s.port, "incr", {"a": 1}, key=key)
            eq(replayed, "true", "key %r replayed" % key)
        eq(plain(s.port, "count"), 3, "count")


def test_keys_are_per_user():
    users = os.path.join(tmpdir("mph-users-"), "users")
    for user in ("alice", "bob"):
        import subprocess
        p = subprocess.run([MPHOST, "passwd", users, user], input=user + "-pw\n",
                           capture_output=True, text=True, timeout=60)
        eq(p.returncode, 0, "mphost passwd: %s" % p.stderr)
    import base64

    def auth(user):
        return [("Authorization",
                 "Basic " + base64.b64encode(("%s:%s-pw" % (user, user)).encode()).decode())]

    with server([], args=["--users=" + users]) as s:
        a1, r1 = call(s.port, "mine", key="same", headers=auth("alice"))
        runs_before_replay = plain(s.port, "runs", ["mine"])
        a2, r2 = call(s.port, "mine", key="same", headers=auth("alice"))
        eq(plain(s.port, "runs", ["mine"]), runs_before_replay, "alice's replay ran nothing")
        b1, r3 = call(s.port, "mine", key="same", headers=auth("bob"))
        eq(a1["result"], {"user": "alice", "n": 1}, "alice")
        eq((a2["result"], r2), (a1["result"], "true"), "alice again: replayed")
        eq((b1["result"], r3), ({"user": "bob", "n": 1}, None), "bob's own key")
        # Without credentials the call is refused, never answered from alice's record.
        status, _, body = post(s.port, {"jsonrpc": "2.0", "method": "mine", "id": 1}, key="same")
        eq((status, body["error"]["code"]), (401, -32004), "no credentials")


ROUTED = """
local mp = require("metaparticle")
local function count(p)
  local s = mp.scope.named("k" .. p.k); s.n = (s.n or 0) + 1
  return {n = s.n, worker = mp.worker.id}
end
mp.service("sharded", mp.shard(3, function(p) return p.k end, count)).expose = true
mp.service("read", function(p) return mp.scope.named("k" .. p.k).n or 0 end).expose = true
mp.service("fails", mp.shard(3, function(p) return p.k end, function(p)
  local s = mp.scope.named("f" .. p.k); s.n = (s.n or 0) + 1
  mp.error(-32050, "no", {runs = s.n})
end)).expose = true
mp.service("gathered", mp.scatter(3, function() return 1 end, function(r) return #r end)).expose = true
mp.serve()
"""


def test_a_keyed_call_to_a_shard_runs_once_on_its_shard():
    """The key goes with the call to the shard's worker, which runs it keyed: its record
    commits with its writes there, and a duplicate, arriving at any worker, replays it."""
    script = os.path.join(tmpdir("mph-script-"), "routed.lua")
    with open(script, "w") as f:
        f.write(ROUTED)

    def run(storage):
        with Server(script, storage) as s:
            for k in range(6):  # every shard, some on the worker the call arrives at
                first, r1 = call(s.port, "sharded", {"k": k}, key="r%d" % k)
                eq((first["result"]["n"], first["result"]["worker"], r1), (1, k % 3 + 1, None),
                   "k=%d, first" % k)
                for _ in range(3):  # new connections: any worker gets them
                    again, r2 = call(s.port, "sharded", {"k": k}, key="r%d" % k)
                    eq((again["result"], r2), (first["result"], "true"), "k=%d, again" % k)
                eq(plain(s.port, "read", {"k": k}), 1, "k=%d: the handler ran once" % k)
                body, _ = call(s.port, "sharded", {"k": k + 3}, key="r%d" % k)
                eq(body["error"]["code"], -32006, "k=%d: the key with other params" % k)
            # An error the shard's handler raised is stored there, and replayed.
            e1, _ = call(s.port, "fails", {"k": 1}, key="f")
            e2, r2 = call(s.port, "fails", {"k": 1}, key="f")
            eq(e1["error"], {"code": -32050, "message": "no", "data": {"runs": 1}}, "the error")
            eq((e2["error"], r2), (e1["error"], "true"), "replayed")
            # A scatter's leaves commit apart: no one record can hold them.
            body, _ = call(s.port, "gathered", [], key="g")
            eq(body.get("error", {}).get("code"), -32600, "keyed call of mp.scatter: %r" % body)
            eq(plain(s.port, "gathered", []), 3, "without a key")
    on_both(run)


def test_metrics_count_replays():
    with server([]) as s:
        call(s.port, "incr", {"a": 1}, key="m")
        call(s.port, "incr", {"a": 1}, key="m")
        call(s.port, "incr", {"a": 1}, key="m")
        s_ = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        s_.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        _, _, text, _ = read_response(s_)
        s_.close()
        check(b"\nmphost_idempotent_replays_total 2\n" in text, text.decode()[-3000:])


# ---- Concurrency, restarts, several processes ----

TRANSIENT = (-32001, -32002, -32003, -32005)  # not stored: the client retries with its key

def concurrent_duplicates(storage, processes=1, clients=16):
    data = tmpdir("mph-data-")
    procs = [server(storage, data).start() for _ in range(processes)]
    results, lock = [], threading.Lock()
    go = threading.Event()

    def client(i):
        go.wait()
        for _ in range(20):  # a transient outcome is what a key is for: retry with it
            body, replayed = call(procs[i % processes].port, "incr", {"a": 1}, key="dup", id=i)
            if body.get("error", {}).get("code") not in TRANSIENT:
                break
        check("result" in body, body)
        with lock:
            results.append((body["result"], replayed))

    threads = Threads()
    for i in range(clients):
        threads.start(client, i)
    go.set()
    threads.join(120)
    eq(len(results), clients, "answers")
    eq({json.dumps(r) for r, _ in results}, {json.dumps({"n": 1, "params": {"a": 1}})},
       "every duplicate got the one run's result")
    eq(sum(1 for _, replayed in results if replayed is None), 1, "calls that were not replays")
    eq(plain(procs[0].port, "count"), 1, "count")
    for p in procs:
        p.stop()


def test_concurrent_duplicates_run_once():
    on_both(concurrent_duplicates)


def test_concurrent_duplicates_on_two_processes_run_once():
    on_both(lambda storage: concurrent_duplicates(storage, processes=2, clients=24))


def across_restart(storage):
    data = tmpdir("mph-data-")
    with server(storage, data) as s:
        first, _ = call(s.port, "deposit", {"id": 7, "amount": 5}, key="dep")
        boom, _ = call(s.port, "boom", key="boom")
    with server(storage, data) as s:
        again, replayed = call(s.port, "deposit", {"id": 7, "amount": 5}, key="dep")
        eq((again["result"], replayed), (first["result"], "true"), "after a restart")
        again, replayed = call(s.port, "boom", key="boom")
        eq((again["error"], replayed), (boom["error"], "true"), "the error after a restart")
        eq(plain(s.port, "balance", {"id": 7}), 5, "balance")
        eq(plain(s.port, "runs", ["deposit"]), 0, "no run after the restart")


def test_replay_across_a_restart():
    on_both(across_restart)


def two_processes(storage):
    data = tmpdir("mph-data-")
    a, b = server(storage, data).start(), server(storage, data).start()
    for i in range(20):
        key = "two-%d" % i
        first, _ = call(a.port, "deposit", {"id": i % 3, "amount": 1}, key=key)
        again, replayed = call(b.port, "deposit", {"id": i % 3, "amount": 1}, key=key)
        eq((again["result"], replayed), (first["result"], "true"), "key %s on the other" % key)
        body, _ = call(b.port, "deposit", {"id": i % 3, "amount": 2}, key=key)
        eq(body["error"]["code"], -32006, "reuse on the other process")
    eq(plain(b.port, "runs", ["deposit"]), 0, "runs on the second process")
    eq(sum(plain(a.port, "balance", {"id": i}) for i in range(3)), 20, "total")
    a.stop()
    b.stop()


def test_two_processes_sharing_the_storage():
    on_both(two_processes)


def test_unique_keys_from_two_processes_lose_no_update():
    """Two processes, many clients, each call with its own key on one of a few accounts: the
    buckets' false conflicts cost retries, never an update; every call ran once."""
    def body(storage):
        data = tmpdir("mph-data-")
        procs = [server(storage, data).start() for _ in range(2)]
        threads = Threads()

        def client(i):
            for j in range(40):
                key = "u-%d-%d" % (i, j)
                r, _ = call(procs[(i + j) % 2].port, "deposit", {"id": i % 4, "amount": 1},
                            key=key)
                check("result" in r, r)
                r2, replayed = call(procs[(i + j + 1) % 2].port, "deposit",
                                    {"id": i % 4, "amount": 1}, key=key)
                eq((r2["result"], replayed), (r["result"], "true"), "duplicate of " + key)

        for i in range(8):
            threads.start(client, i)
        threads.join(300)
        eq(sum(plain(procs[0].port, "balance", {"id": i}) for i in range(4)), 8 * 40, "total")
        for p in procs:
            p.stop()
    on_both(body)


# ---- Expiry ----

def keys_in_bucket(bucket, n, prefix):
    keys, i = [], 0
    while len(keys) < n:
        k = "%s-%d" % (prefix, i)
        if bucket_of(k, redis=True) == bucket:
            keys.append(k)
        i += 1
    return keys


def wait_until_runs_again(port, key, params, deadline_s=60):
    """Repeats a keyed incr until it is no longer a replay (its record expired); returns the
    first run's result (None if no replay was seen) and that last reply's result."""
    first = None
    deadline = time.time() + deadline_s  # turns a hang into a failure; no timing is asserted
    while True:
        check(time.time() < deadline, "the record of %s never expired" % key)
        body, replayed = call(port, "incr", params, key=key)
        if body.get("error", {}).get("code") in TRANSIENT:
            continue  # transient (a slow machine, valgrind): a client retries with the key
        check("result" in body, "a reply of %s: %r" % (key, body))
        if replayed is None:
            return first, body["result"]
        first = first or body["result"]
        time.sleep(0.05)


def test_records_expire_after_the_ttl():
    def body(storage):
        with server(storage, args=["--idempotency-ttl=1"]) as s:
            first, _ = call(s.port, "incr", {"a": 1}, key="ttl")
            replay, after = wait_until_runs_again(s.port, "ttl", {"a": 1})
            check(replay is None or replay == first["result"], "a replay before expiry")
            eq(after["n"], 2, "it ran once more after the record expired")
            # ... and its new record replays in turn.
            again, replayed = call(s.port, "incr", {"a": 1}, key="ttl")
            check(replayed == "true" or again["result"]["n"] == 3, again)
    on_both(body)


def test_expired_records_are_pruned_when_their_bucket_is_written():
    with RedisServer() as r:
        with server(["--storage=" + r.url()], args=["--idempotency-ttl=1"]) as s:
            bucket = 17
            keys = keys_in_bucket(bucket, 12, "old")
            for k in keys:
                call(s.port, "incr", {"a": 1}, key=k)
            hkey = "mp:{i:%d}:d" % bucket
            fields = set(r.cli("HKEYS", hkey).split())
            eq(fields, {"-" + k for k in keys} | {"~prune"}, "the bucket's records")
            # Wait until every record has expired (the last one runs again) and the bucket's
            # pruning time has come, then write one more record into the bucket.
            wait_until_runs_again(s.port, keys[-1], {"a": 1})
            new = keys_in_bucket(bucket, 13, "old")[-1]
            deadline = time.time() + 60
            while True:
                call(s.port, "incr", {"a": 1}, key=new)
                fields = set(r.cli("HKEYS", hkey).split())
                if "-" + keys[0] not in fields:
                    break
                check(time.time() < deadline, "never pruned: %r" % fields)
                new = keys_in_bucket(bucket, len(keys) + 2, "old")[-1]
                keys.append(new)
                time.sleep(0.2)
            # keys[11] ran again (its record is new); the 11 before it had expired.
            check(all("-" + k not in fields for k in keys[:11]), "expired left: %r" % fields)
            check("-" + new in fields, "the new record is there: %r" % fields)


def test_pruning_deletes_at_most_1000_records_per_call_and_goes_on():
    """1005 expired records planted in one bucket (read cold at the load): the first call that
    writes into the bucket deletes 1000 of them, the next one the rest."""
    with RedisServer() as r:
        bucket = 5
        hkey = "mp:{i:%d}:d" % bucket
        planted = ["-planted-%d" % i for i in range(1005)]
        args = ["HSET", hkey, "~prune", "1"]
        for f in planted:
            args += [f, '{"c":0,"e":1,"q":"x","r":"1"}']  # expired in 1970
        r.cli(*args)
        r.cli("SET", "mp:{i:%d}:v" % bucket, "1")
        new = keys_in_bucket(bucket, 2, "new")
        with server(["--storage=" + r.url()]) as s:
            old = lambda: [f for f in r.cli("HKEYS", hkey).split() if f.startswith("-planted-")]
            body, _ = call(s.port, "pure", [1], key=new[0])
            check("result" in body, body)
            eq(len(old()), 5, "planted records left after the first pruning call")
            call(s.port, "pure", [1], key=new[1])
            eq(old(), [], "planted records left after the second")
            fields = set(r.cli("HKEYS", hkey).split())
            eq(fields, {"~prune", "-" + new[0], "-" + new[1]}, "the bucket")


def test_reserved_bucket_scopes_are_out_of_reach_of_scripts():
    """mp.scope.named("i:N") is the scope "n:i:N", never the bucket "i:N": a script that writes
    there changes no record."""
    with server([]) as s:
        key = "reach"
        first, _ = call(s.port, "incr", {"a": 1}, key=key)
        scope = "i:%d" % bucket_of(key)
        body, _ = call(s.port, "tamper", {"scope": scope, "key": "-" + key})
        eq(body.get("result"), True, "tamper ran")
        again, replayed = call(s.port, "incr", {"a": 1}, key=key)
        eq((again["result"], replayed), (first["result"], "true"), "the record is intact")


# ---- Redis Cluster ----

def test_redis_cluster_record_beside_the_scopes_of_the_key_hash_tag():
    from test_cluster import Cluster
    with Cluster() as cl:
        with server(["--storage=" + cl.url()]) as s:
            # The key's hash tag puts the record in the slot of the scopes named with it.
            first, _ = call(s.port, "deposit", {"id": "{42}", "amount": 5}, key="{42}:order-1")
            eq(first.get("result"), {"id": "{42}", "balance": 5}, "tagged key: %r" % first)
            again, replayed = call(s.port, "deposit", {"id": "{42}", "amount": 5},
                                   key="{42}:order-1")
            eq((again["result"], replayed), (first["result"], "true"), "replayed")
            first, _ = call(s.port, "incr", {"a": 1}, key="{global}:x")
            check("result" in first, first)
            # A key without the tag: its record's slot is not the scope's, a clear error that
            # is not stored (a retry gets it again, not replayed).
            key = next(k for k in ("plain-%d" % i for i in range(100))
                       if cl.keyslot("i:%d" % bucket_of(k, redis=True)) != cl.keyslot("42"))
            for _ in range(2):
                body, replayed = call(s.port, "deposit", {"id": "{42}", "amount": 1}, key=key)
                eq((body.get("error", {}).get("code"), replayed), (-32000, None), "untagged")
                check("hash tag" in body["error"]["message"], body)
            eq(plain(s.port, "balance", {"id": "{42}"}), 5, "balance")
