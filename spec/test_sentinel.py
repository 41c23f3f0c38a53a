"""Replicated Redis: --redis-wait (WAIT after each commit group) against a master and a
replica, and Sentinel failover (redis-sentinel://) with the master killed under load. Every
redis-server and redis-sentinel is started here on free loopback ports."""
import os
import subprocess
import threading
import time

from harness import (KeepAliveClient, RedisServer, Server, check, eq, free_port, tmpdir)
from test_scope import hammer


def wait_until(predicate, what, timeout=30):
    """Polls for an event the test cannot be told about (a replica's link, a failover), every
    20 ms; the timeout only bounds a hang."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError("timed out waiting until " + what)
        time.sleep(0.02)


def info(redis, section):
    """INFO section of a RedisServer as a dict (empty if it does not answer)."""
    out = {}
    for line in redis.cli("INFO", section).splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k] = v.strip()
    return out


def replica_of(master, port=None):
    # No AOF on replicas: a replica refuses SIGTERM while it writes its first one after a sync
    # ("Writing initial AOF, can't exit"), and the tests kill masters, never replicas' disks.
    return RedisServer(port=port, args=["--replicaof", "127.0.0.1", str(master.port),
                                        "--appendonly", "no", "--repl-diskless-sync-delay", "0"])


def replica_online(master, n=1):
    """Waits until n replicas of master acknowledge a write (WAIT on one connection): "online"
    in INFO comes a moment before a replica answers WAIT."""
    def confirmed():
        p = subprocess.run(["redis-cli", "-p", str(master.port)], capture_output=True, text=True,
                           input="SET mph:probe 1\nWAIT %d 200\n" % n, timeout=10)
        return p.stdout.split()[-1:] == [str(n)]
    wait_until(confirmed, "%d replica(s) of %d confirm writes" % (n, master.port))


def cmdstat_calls(redis, name):
    stats = info(redis, "commandstats").get("cmdstat_" + name, "calls=0,")
    return int(stats.split("calls=")[1].split(",")[0])


def test_redis_wait_answers_after_replicas_confirm_one_wait_per_group():
    with RedisServer() as master, replica_of(master) as replica:
        replica_online(master)
        with Server("server5.lua", ["--storage=" + master.url(), "--redis-wait=1,5000",
                                    "--workers=0"]) as s:
            master.cli("CONFIG", "RESETSTAT")  # count only the WAITs of these calls
            counts = hammer(s.port, 16, 50)
            eq(sorted(counts), list(range(1, 801)), "acknowledged counts")
            # Every acknowledged count is on the replica too (WAIT confirmed it).
            eq(replica.cli("HGET", "mp:{global}:d", "requests"), "800", "the replica's count")
            commits = cmdstat_calls(master, "evalsha") + cmdstat_calls(master, "eval")
            waits = cmdstat_calls(master, "wait")
            # One WAIT per group of commits that landed while the last WAIT was out, never more
            # than one per commit (group commit already made commits fewer than calls).
            check(0 < waits <= commits < 800, "WAITs %d, commits %d for 800 calls" % (waits, commits))


def test_redis_wait_short_of_replicas_is_outcome_unknown_and_recovers():
    with RedisServer() as master:
        replica = replica_of(master).start()
        try:
            replica_online(master)
            with Server("server5.lua", ["--storage=" + master.url(), "--redis-wait=1,300",
                                        "--workers=0"]) as s:
                eq(s.result("simple-storage", [{}]), {"requests": 1})
                replica.kill9()
                wait_until(lambda: info(master, "replication").get("connected_slaves") == "0",
                           "the master sees its replica gone")
                r = s.rpc("simple-storage", [{}])
                check("error" in r, "a commit no replica confirmed was acknowledged: %r" % r)
                eq(r["error"]["code"], -32002)
                check("outcome unknown" in r["error"]["message"], r["error"]["message"])
                # The write is applied on the master: a later call sees it (the count goes on).
                eq(master.cli("HGET", "mp:{global}:d", "requests"), "2")
                replica = replica_of(master, port=replica.port).start()
                replica_online(master)
                # Calls succeed again once the replica is back (each failed try still counts).
                done = wait_until(lambda: s.rpc("simple-storage", [{}]).get("result"),
                                  "a call is confirmed by the returned replica")
                check(done["requests"] >= 3, "count %r after the replica returned" % done)
                eq(replica.cli("HGET", "mp:{global}:d", "requests"), str(done["requests"]))
        finally:
            replica.stop()


def test_redis_wait_flag_is_checked():
    for bad in ("x", "1,", "1,0", "-1", "101", ",5", "1,2,3"):
        s = Server("server5.lua", ["--storage=redis://127.0.0.1:1", "--redis-wait=" + bad])
        s.start(expect_ok=False)
        rc = s.proc.wait(timeout=20)
        check(rc != 0 and "invalid --redis-wait" in s.read_log(),
              "--redis-wait=%s: exit %d, %s" % (bad, rc, s.read_log()[-300:]))
