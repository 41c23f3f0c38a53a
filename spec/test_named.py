"""Named scopes (mp.scope.named) and transactions over several scopes, on file storage and on
Redis, with two mphost processes sharing the storage."""
import os
import random
import threading

from harness import SCRIPTS, KeepAliveClient, RedisServer, Server, check, eq, tmpdir

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
