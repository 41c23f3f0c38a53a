"""Named scopes (mp.scope.named) and transactions over several scopes, on file storage and on
Redis, with two mphost processes sharing the storage."""
import os
import random
import threading

from harness import (SCRIPTS, KeepAliveClient, RedisServer, Server, TestFailure, check, eq,
                     tmpdir)

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

    movers = [threading.Thread(target=mover, args=(i,)) for i in range(clients)]
    auditors = [threading.Thread(target=auditor, args=(p,)) for p in procs]
    for t in movers + auditors:
        t.start()
    for t in movers:
        t.join()
    done.set()
    for t in auditors:
        t.join()
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

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
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
        acked, lock, enough = [0], threading.Lock(), threading.Event()

        def mover(i):
            rng = random.Random(1000 * round_ + i)
            try:
                c = KeepAliveClient(procs[i % 2].port, timeout=30)
                while True:
                    a, b = rng.sample(range(1, N_ACCOUNTS + 1), 2)
                    c.call("transfer", {"from": a, "to": b, "amount": rng.randint(1, 400)})
                    with lock:
                        acked[0] += 1
                        if acked[0] >= 200:
                            enough.set()
            except Exception:  # the kill cuts the connection
                return

        threads = [threading.Thread(target=mover, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        check(enough.wait(60), "200 transfers were acknowledged before the kill")
        for p in procs:
            p.kill9()
        for t in threads:
            t.join()
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
        s = Server(ACCOUNTS, data=data, env={"MPH_TEST_FAULT": fault}).start()
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
    s = Server(ACCOUNTS, data=data, env={"MPH_TEST_FAULT": "multi.decide.sync:1:crash"}).start()
    try:
        s.rpc("transfer", {"from": 1, "to": 2, "amount": 30})
    except (OSError, TestFailure):
        pass  # the process died before answering
    s.proc.wait(30)
    with Server(ACCOUNTS, data=data) as s:
        eq(s.result("audit", {"n": 2}), {"total": 200, "low": 70}, "the commit stands")
        eq(intents(data), [])
