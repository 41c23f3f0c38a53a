"""Fresh reads (docs/guarantees.md, "What a call sees"): a call, read-only or not, sees every
write acknowledged before it began, on any worker, process or host sharing the storage; a
service with reads = "cached" may answer from its worker's snapshot, for about a second."""
import os
import time

from harness import SCRIPTS, RedisServer, Server, check, eq, tmpdir, wait_until
from test_workers import started

FRESH = os.path.join(SCRIPTS, "fresh.lua")


def warm_every_worker(s, method, scope):
    """Reads on new connections until each of the 3 workers has answered (and so holds the
    scope's state in its cache)."""
    seen = set()
    for _ in range(600):
        seen.add(s.result(method, [scope])["worker"])
        if len(seen) == 3:
            return
    check(False, "only workers %r answered" % sorted(seen))


def read_after_write_across_workers(args, scope):
    with Server(FRESH, args) as s:
        started(s, 3)
        warm_every_worker(s, "get", scope)
        workers = set()
        for i in range(1, 31):
            eq(s.result("incr", [scope])["n"], i, "increment %d" % i)
            r = s.result("get", [scope])  # a new connection: any worker
            workers.add(r["worker"])
            eq(r["n"], i, "a read after %d acknowledged increments (worker %d)" % (i, r["worker"]))
        eq(workers, {1, 2, 3}, "reads ran on every worker")


def test_read_after_write_across_3_workers_on_files_global():
    read_after_write_across_workers([], "")


def test_read_after_write_across_3_workers_on_files_named():
    read_after_write_across_workers([], "room")


def test_read_after_write_across_3_workers_on_redis_global_and_named():
    with RedisServer() as redis:
        read_after_write_across_workers(["--storage=" + redis.url()], "")
        read_after_write_across_workers(["--storage=" + redis.url()], "room")


def write_on_a_read_on_b(args_a, args_b, data=None):
    with Server(FRESH, args_a, data=data) as a, Server(FRESH, args_b, data=data) as b:
        started(a, 3)
        started(b, 3)
        warm_every_worker(b, "get", "")
        for i in range(1, 21):
            eq(a.result("incr", [""])["n"], i, "increment %d on A" % i)
            eq(b.result("get", [""])["n"], i, "B reads after %d acknowledged on A" % i)
        # and the other way round, on a process that has only read so far
        eq(b.result("incr", [""])["n"], 21)
        eq(a.result("get", [""])["n"], 21)


def test_write_on_process_a_read_on_process_b_sharing_a_data_directory():
    write_on_a_read_on_b([], [], data=tmpdir())


def test_write_on_process_a_read_on_process_b_sharing_a_redis():
    with RedisServer() as redis:
        args = ["--storage=" + redis.url()]
        write_on_a_read_on_b(args, args)


def test_a_cached_service_answers_from_its_snapshot_for_about_a_second():
    data = tmpdir()
    with Server(FRESH, ["--workers=0"], data=data) as a, \
            Server(FRESH, ["--workers=0"], data=data) as b:
        eq(a.result("incr", [""])["n"], 1)
        t0 = time.time()
        eq(b.result("get_cached", [""])["n"], 1, "B loads the scope")
        eq(a.result("incr", [""])["n"], 2, "A commits")
        n = b.result("get_cached", [""])["n"]
        if time.time() - t0 < 0.8:  # (a slow build may pass the second before it asks)
            eq(n, 1, "B's cached read answers from its snapshot")
        eq(b.result("get", [""])["n"], 2, "a strict read on B sees A's commit at once")
        eq(a.result("incr", [""])["n"], 3, "A commits again")
        t1 = time.time()
        wait_until(lambda: b.result("get_cached", [""])["n"] == 3, "B's cached read catches up")
        check(time.time() - t1 < 3, "B's cached read took %.1f s to see it" % (time.time() - t1))
