"""Named scopes (mp.scope.named) and transactions over several scopes, on file storage and on
Redis, with two mphost processes sharing the storage."""
import json
import os
import random
import threading

from harness import (KeepAliveClient, RedisServer, SCRIPTS, Server, TestFailure, Threads, check, eq,
                     private_network, read_response, tmpdir)

ACCOUNTS = os.path.join(SCRIPTS, "accounts.lua")
N_ACCOUNTS = 50
START = 1000


def servers(storage_args, data):
    return [Server(ACCOUNTS, storage_args, data=data).start() for _ in range(2)]


def seed(server):
    c = KeepAliveClient(server.port)
    for i in range(1, N_ACCOUNTS + 1):
        r = c.call("deposit", {"id": i, "amount": START})
        check("result" in r, r)
    c.close()


def transfers_with_auditor(procs, clients=16, calls=60):
    """clients move random amounts between random accounts through both processes while an
    auditor on each process reads every account in one call, again and again. Returns the
    audits seen, the number of refused (insufficient funds) transfers and any problem."""
    audits, problems, refused = [], [], [0]
    lock = threading.Lock()
    done = threading.Event()

    def mover(i):
        rng = random.Random(i)
        c = KeepAliveClient(procs[i % len(procs)].port)
        try:
            for _ in range(calls):
                a, b = rng.sample(range(1, N_ACCOUNTS + 1), 2)
                r = c.call("transfer", {"from": a, "to": b, "amount": rng.randint(1, 400)})
                if "error" in r:
                    if r["error"]["code"] == -32010:
                        with lock:
                            refused[0] += 1
                    else:
                        with lock:
                            problems.append(r["error"])
        finally:
            c.close()

    def auditor(proc):
        c = KeepAliveClient(proc.port)
        try:
            while not done.is_set():
                r = c.call("audit", {"n": N_ACCOUNTS})
                with lock:
                    if "error" in r:
                        problems.append(("audit", r["error"]))
                    else:
                        audits.append(r["result"])
        finally:
            c.close()

    # A mover or an auditor that dies (a reset, a bad status) fails the test.
    movers, auditors = Threads(), Threads()
    for i in range(clients):
        movers.start(mover, i)
    for p in procs:
        auditors.start(auditor, p)
    try:
        movers.join()
    finally:
        done.set()
        auditors.join()
    return audits, refused[0], problems


def check_transfers(storage_args):
    data = tmpdir()
    procs = servers(storage_args, data)
    try:
        seed(procs[0])
        audits, refused, problems = transfers_with_auditor(procs)
        eq(problems, [], "failed calls")
        check(len(audits) > 0, "the auditors ran")
        bad = [a for a in audits if a["total"] != N_ACCOUNTS * START or a["low"] < 0]
        eq(bad[:3], [], "audits whose sum changed or with a negative balance (of %d)" % len(audits))
        for p in procs:
            final = p.result("audit", {"n": N_ACCOUNTS})
            eq(final["total"], N_ACCOUNTS * START, "final sum on port %d" % p.port)
    finally:
        for p in procs:
            p.stop()
    # And from storage alone, after a restart.
    with Server(ACCOUNTS, storage_args, data=data) as s:
        eq(s.result("audit", {"n": N_ACCOUNTS})["total"], N_ACCOUNTS * START, "after a restart")
    return refused


def test_transfers_keep_the_sum_on_files():
    check_transfers([])


def test_transfers_keep_the_sum_on_redis():
    with RedisServer() as redis:
        check_transfers(["--storage=" + redis.url()])


def test_named_scope_counts_exact_over_two_processes_on_redis():
    with RedisServer() as redis:
        procs = servers(["--storage=" + redis.url()], tmpdir())
        try:
            seen = {}
            lock = threading.Lock()

            def worker(i):
                c = KeepAliveClient(procs[i % 2].port)
                for k in range(50):
                    name = "room-%d" % (k % 4)
                    r = c.call("count", {"name": name})
                    with lock:
                        seen.setdefault(name, []).append(r["result"])
                c.close()

            threads = Threads()  # a worker that dies (an error reply, a reset) fails the test
            for i in range(8):
                threads.start(worker, i)
            threads.join()
            eq(sorted(seen), ["room-%d" % k for k in range(4)], "rooms counted")
            eq(sum(len(counts) for counts in seen.values()), 8 * 50, "calls answered")
            for name, counts in seen.items():
                eq(sorted(counts), list(range(1, len(counts) + 1)), name)
                eq(redis.cli("HGET", "mp:{n:%s}:d" % name, "n"), str(len(counts)), name + " stored")
        finally:
            for p in procs:
                p.stop()


def test_named_and_global_in_one_call_on_redis():
    with RedisServer() as redis:
        with Server(ACCOUNTS, ["--storage=" + redis.url()]) as s:
            for i in range(1, 4):
                eq(s.result("both", {"name": "x"}), {"named": i, "global": i})
        eq(redis.cli("HGET", "mp:{n:x}:d", "n"), "3")
        eq(redis.cli("HGET", "mp:{global}:d", "n"), "3")


def test_mp_scoped_is_the_same_scopes():
    with Server(ACCOUNTS) as s:
        eq(s.result("both", {"name": "x"}), {"named": 1, "global": 1})
        eq(s.result("both-scoped", {"name": "x"}), {"named": 2, "global": 2}, "mp.scoped")
        eq(s.result("read", {"name": "x"}), 2, "mp.scope.named sees what mp.scoped wrote")


def test_invalid_scope_names_are_a_clear_error():
    with Server(ACCOUNTS) as s:
        for bad, what in ((["", ], "1 to 200 bytes"), (["x" * 201], "1 to 200 bytes"),
                          ([42], "must be a string"), ([{"a": 1}], "must be a string"),
                          (["a\u0000b"], "no NUL byte")):
            r = s.rpc("touch", bad)
            eq(r.get("error", {}).get("code"), -32000, "error code for %r" % (bad,))
            check(what in r["error"]["message"], r["error"])
        eq(s.result("touch", ["x" * 200]), 0, "200 bytes is allowed")
        eq(s.result("touch", ["\u00e9t\u00e9 / ../.. %41"]), 0, "any bytes")
        r = s.rpc("user_outside_auth")
        check("mp.basicAuth" in r["error"]["message"], r)


def kill9_during_transfers(storage_args, rounds=2):
    """Both processes are killed with -9 while 16 clients move money; after each round a
    fresh process finds the sum intact and no balance negative."""
    data = tmpdir()
    with Server(ACCOUNTS, storage_args, data=data) as s:
        seed(s)
    for round_ in range(rounds):
        procs = servers(storage_args, data)
        acked, errors, lock, enough = [0], [], threading.Lock(), threading.Event()
        killed = threading.Event()

        def mover(i):
            rng = random.Random(1000 * round_ + i)
            try:
                c = KeepAliveClient(procs[i % 2].port, timeout=30)
                while True:
                    a, b = rng.sample(range(1, N_ACCOUNTS + 1), 2)
                    r = c.call("transfer", {"from": a, "to": b, "amount": rng.randint(1, 400)})
                    with lock:
                        if "result" in r:
                            acked[0] += 1
                            if acked[0] >= 200:
                                enough.set()
                        elif r["error"]["code"] != -32010 and not killed.is_set():
                            errors.append(r)  # a failure; -32010 (insufficient funds) is not
            except Exception as e:  # the kill cuts the connection; before it, nothing may
                if not killed.is_set():
                    with lock:
                        errors.append(repr(e))

        threads = Threads()
        for i in range(16):
            threads.start(mover, i)
        got = enough.wait(60)
        killed.set()
        for p in procs:
            p.kill9()
        threads.join()
        check(got, "200 transfers were acknowledged before the kill (%d)" % acked[0])
        check(not errors, "calls failed before the kill: %r" % errors[:3])
        with Server(ACCOUNTS, storage_args, data=data) as s:
            audit = s.result("audit", {"n": N_ACCOUNTS})
            eq(audit["total"], N_ACCOUNTS * START, "the sum after kill -9, round %d" % round_)
            check(audit["low"] >= 0, audit)


def test_kill_9_of_both_processes_during_transfers_on_files():
    kill9_during_transfers([])


def test_kill_9_of_both_processes_during_transfers_on_redis():
    with RedisServer() as redis:
        kill9_during_transfers(["--storage=" + redis.url()])


def intents(data):
    return [f for f in os.listdir(data) if f.endswith(".intent")]


def test_a_crash_between_the_parts_of_a_commit_cuts_them_all():
    """The process dies at each step of a commit of two scopes (files): after the first
    part is durable and the second only written, and after both are durable but before the
    commit point. The next process sees neither part, and says it cut them."""
    for fault in ("append.sync:2:crash", "multi.decide:1:crash"):
        data = tmpdir()
        with Server(ACCOUNTS, data=data) as s:
            eq(s.result("deposit", {"id": 1, "amount": 100}), 100)
            eq(s.result("deposit", {"id": 2, "amount": 100}), 100)
        # One process (--workers=0): the crash ends it, rather than a worker to replace.
        s = Server(ACCOUNTS, ["--workers=0"], data=data, env={"MPH_TEST_FAULT": fault}).start()
        r = None
        try:
            r = s.rpc("transfer", {"from": 1, "to": 2, "amount": 30})
        except (OSError, TestFailure):
            pass  # the process died before answering, as it should
        check(r is None, "the transfer was answered although the process died: %r" % (r,))
        s.proc.wait(30)
        eq(len(intents(data)), 1, "%s: the intent stays after the crash" % fault)
        with Server(ACCOUNTS, data=data) as s:
            eq(s.result("audit", {"n": 2}), {"total": 200, "low": 100}, fault)
            eq(intents(data), [], "%s: the intent is gone once resolved" % fault)
            eq(s.result("transfer", {"from": 1, "to": 2, "amount": 30}), True)
            eq(s.result("audit", {"n": 2}), {"total": 200, "low": 70}, fault)
            check("cutting the part of an unfinished commit" in s.read_log(), s.read_log()[-800:])


def test_a_crash_after_the_commit_point_keeps_the_commit():
    data = tmpdir()
    with Server(ACCOUNTS, data=data) as s:
        eq(s.result("deposit", {"id": 1, "amount": 100}), 100)
        eq(s.result("deposit", {"id": 2, "amount": 100}), 100)
    # The intent is removed; the process dies syncing the directory after it.
    s = Server(ACCOUNTS, ["--workers=0"], data=data,
               env={"MPH_TEST_FAULT": "multi.decide.sync:1:crash"}).start()
    try:
        s.rpc("transfer", {"from": 1, "to": 2, "amount": 30})
    except (OSError, TestFailure):
        pass  # the process died before answering
    s.proc.wait(30)
    with Server(ACCOUNTS, data=data) as s:
        eq(s.result("audit", {"n": 2}), {"total": 200, "low": 70}, "the commit stands")
        eq(intents(data), [])


def tree_rss_kb(pid):
    """Resident memory of a process and its children (a supervisor's workers), in KiB."""
    total = 0
    pids = [pid]
    children = "/proc/%d/task/%d/children" % (pid, pid)
    if os.path.exists(children):
        with open(children) as f:
            pids += [int(p) for p in f.read().split()]
    for p in pids:
        with open("/proc/%d/status" % p) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def tree_fds(pid):
    pids = [pid]
    children = "/proc/%d/task/%d/children" % (pid, pid)
    if os.path.exists(children):
        with open(children) as f:
            pids += [int(p) for p in f.read().split()]
    return sum(len(os.listdir("/proc/%d/fd" % p)) for p in pids)


def batch(client, calls):
    """Sends one JSON-RPC batch over a keep-alive client; returns the results by id."""
    import json
    body = json.dumps([{"jsonrpc": "2.0", "method": m, "params": p, "id": i}
                       for i, (m, p) in enumerate(calls)]).encode()
    client.sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    from harness import read_response
    status, _, data, client.buf = read_response(client.sock, client.buf)
    eq(status, 200, "HTTP status")
    out = {}
    for r in json.loads(data):
        check("result" in r, r)
        out[r["id"]] = r["result"]
    return [out[i] for i in range(len(calls))]


def touch_many(server, count, per_batch=500, clients=4):
    """Counts once in each of `count` named scopes, then reads every one back."""
    def part(k):
        c = KeepAliveClient(server.port, timeout=120)
        for start in range(k * per_batch, count, clients * per_batch):
            names = ["s%d" % i for i in range(start, min(start + per_batch, count))]
            got = batch(c, [("count", {"name": n}) for n in names])
            eq(got, [1] * len(names), "first counts")
        c.close()

    threads = Threads()  # a part that fails (a count other than 1, a reset) fails the test
    for k in range(clients):
        threads.start(part, k)
    threads.join()


def check_scope_cache(storage_args, count, cache_mb):
    # Under ASan, freed memory waits in a quarantine (256 MiB by default) before reuse: keep
    # it small, or RSS measures the quarantine rather than mphost.
    env = {"ASAN_OPTIONS": "detect_leaks=1:quarantine_size_mb=1"}
    with Server(ACCOUNTS, storage_args + ["--scope-cache=%dM" % cache_mb], env=env) as s:
        base = tree_rss_kb(s.proc.pid)
        touch_many(s, count)
        rss = tree_rss_kb(s.proc.pid)
        fds = tree_fds(s.proc.pid)
        # Every scope reads back (most were evicted: they load again).
        c = KeepAliveClient(s.port, timeout=120)
        for start in range(0, count, 1000):
            names = ["s%d" % i for i in range(start, min(start + 1000, count))]
            eq(batch(c, [("read", {"name": n}) for n in names]), [1] * len(names), "read back")
        c.close()
        # Twice the bound (the estimate is rough, and the Lua heap holds garbage between
        # collections) plus a fixed allowance; without eviction it would be 10 to 100 times
        # as much.
        limit = base + 2 * cache_mb * 1024 + 16 * 1024
        if "asan" in os.path.basename(os.environ.get("MPH_BUILD", "")):
            limit = base + 2 * (limit - base)  # ASan's redzones double small allocations
        check(rss < limit, "RSS %d KiB after %d scopes, over %d KiB (started at %d)" %
              (rss, count, limit, base))
        check(fds < 400, "%d descriptors open after %d scopes" % (fds, count))
        return rss


def test_200000_scopes_touched_once_stay_under_the_cache_bound_on_redis():
    with RedisServer() as redis:
        check_scope_cache(["--storage=" + redis.url()], 200000, 16)


def test_20000_scopes_touched_once_stay_under_the_cache_bound_on_files():
    check_scope_cache([], 20000, 2)


@private_network
def test_chapter_7_walkthrough_exact_output():
    """README's chapter 7, command by command, on port 3000 as printed."""
    from test_cli import shell, workspace
    cwd, env = workspace()
    body = ("""-X POST -d '{"jsonrpc": "2.0", "params":[{}], "method": "simple-user-storage", """
            """"id": "example"}' -H "Content-Type: application/json" -s localhost:3000/""")

    def ok(user, requests, total):
        return ('{"jsonrpc":"2.0","id":"example","result":{"requests":%d,"total":%d,'
                '"user":"%s"}}\n' % (requests, total, user))

    refused = '{"jsonrpc":"2.0","id":"example","error":{"code":-32004,"message":"unauthorized"}}\n'
    lines = [
        ("printf 'alice-secret\\n' | mphost passwd users.txt alice",
         "added user alice to users.txt\n"),
        ("printf 'bob-secret\\n' | mphost passwd users.txt bob", "added user bob to users.txt\n"),
        ("mphost examples/server7.lua --users=users.txt", ""),
        ("curl -i " + body,
         # (the shell's output is read as text: CRLF arrives as LF)
         "HTTP/1.1 401 Unauthorized\nContent-Type: application/json\nContent-Length: 82\n"
         'WWW-Authenticate: Basic realm="mphost"\n\n' + refused),
        ("curl -u alice:alice-secret " + body, ok("alice", 1, 1)),
        ("curl -u bob:bob-secret " + body, ok("bob", 1, 2)),
        ("curl -u alice:alice-secret " + body, ok("alice", 2, 3)),
        ("curl -u alice:wrong " + body, refused),
    ]
    try:
        for cmd, expected in lines:
            rc, out, err = shell(cmd, cwd, env)
            eq((rc, out), (0, expected), "$ %s (stderr: %s)" % (cmd, err))
    finally:
        rc, out, err = shell("mphost examples/server7.lua delete", cwd, env)
        eq((rc, out), (0, ""), "delete (stderr: %s)" % err)


def per_user_counts(storage_args):
    """4 users x 4 clients x 100 calls of chapter 7 over two processes sharing storage:
    every user's counts are exact and the total is their sum."""
    import base64
    from test_auth import passwd
    users = tmpdir()
    path = os.path.join(users, "users.txt")
    for u in ("ann", "ben", "cat", "dan"):
        passwd(path, u, u + "-pw")
    data = tmpdir()
    procs = [Server("server7.lua", storage_args + ["--users=" + path], data=data).start()
             for _ in range(2)]
    seen, totals, problems = {}, [], []
    lock = threading.Lock()

    def client(k, user):
        auth = base64.b64encode(("%s:%s-pw" % (user, user)).encode()).decode()
        c = KeepAliveClient(procs[k % 2].port)
        mine, mine_totals = [], []
        try:
            for i in range(100):
                body = json.dumps({"jsonrpc": "2.0", "method": "simple-user-storage",
                                   "params": [{}], "id": i}).encode()
                c.sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Basic %s\r\n"
                               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                               % (auth.encode(), len(body), body))
                status, _, data_, c.buf = read_response(c.sock, c.buf)
                r = json.loads(data_)
                if status != 200 or "error" in r:
                    raise TestFailure("%s: %d %r" % (user, status, r))
                eq(r["result"]["user"], user)
                mine.append(r["result"]["requests"])
                mine_totals.append(r["result"]["total"])
        except Exception as e:
            with lock:
                problems.append(e)
        finally:
            c.close()
        with lock:
            seen.setdefault(user, []).extend(mine)
            totals.extend(mine_totals)

    try:
        threads = Threads()
        for k, u in enumerate(["ann", "ben", "cat", "dan"] * 4):
            threads.start(client, k, u)
        threads.join()
        check(not problems, "failed calls: %r" % problems[:3])
        for user, counts in seen.items():
            eq(sorted(counts), list(range(1, 401)), "%s's counts" % user)
        eq(sorted(totals), list(range(1, 1601)), "the totals")
    finally:
        for p in procs:
            p.stop()


def test_per_user_counts_exact_over_two_processes_on_files():
    per_user_counts([])


def test_per_user_counts_exact_over_two_processes_on_redis():
    with RedisServer() as redis:
        per_user_counts(["--storage=" + redis.url()])


def test_a_call_that_waits_for_a_load_after_reading_a_scope_loses_no_update():
    """A call reads scope a, then touches scope b, whose load is held (MPH_TEST_FAULT): while
    it waits, another call increments a. The first call must run again on the new a (it
    would otherwise write a over the increment)."""
    from test_scope import wait_log
    gate = os.path.join(tmpdir(), "gate")
    env = {"MPH_TEST_FAULT": "load.start:2:hold", "MPH_TEST_GATE": gate}
    with Server(ACCOUNTS, ["--workers=0"], env=env) as s:
        eq(s.result("count", {"name": "a"}), 1, "a loaded (first open) and counted")
        out = {}

        def slow():
            out["r"] = s.rpc("read_then_touch", {"a": "a", "b": "b"})
        call = Threads()
        call.start(slow)
        wait_log(s, "hold at load.start")
        eq(s.result("count", {"name": "a"}), 2, "a counted while the other call waits")
        open(gate, "w").close()
        call.join(60)
        eq(out["r"].get("result"), 12, "the waiting call ran again on a = 2: %r" % out["r"])
        eq(s.result("read", {"name": "a"}), 12)
