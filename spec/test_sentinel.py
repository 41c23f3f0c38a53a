"""Replicated Redis: --redis-wait (WAIT after each commit group) against a master and a
replica, and Sentinel failover (redis-sentinel://) with the master killed under load. Every
redis-server and redis-sentinel is started here on free loopback ports."""
import os
import subprocess
import threading

from harness import (KeepAliveClient, RedisServer, Server, Threads, check, eq, free_port, tmpdir,
                     wait_until)
from test_redis import cmdstat_calls
from test_scope import hammer




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
    auth = ["--masterauth", master.password] if master.password else []
    return RedisServer(port=port, password=master.password,
                       args=["--replicaof", "127.0.0.1", str(master.port), "--appendonly", "no",
                             "--repl-diskless-sync-delay", "0"] + auth)


def replica_online(master, n=1):
    """Waits until n replicas of master acknowledge a write (WAIT on one connection): "online"
    in INFO comes a moment before a replica answers WAIT."""
    def confirmed():
        auth = ["--no-auth-warning", "-a", master.password] if master.password else []
        p = subprocess.run(["redis-cli", "-p", str(master.port)] + auth, capture_output=True,
                           text=True,
                           input="SET mph:probe 1\nWAIT %d 200\n" % n, timeout=10)
        return p.stdout.split()[-1:] == [str(n)]
    wait_until(confirmed, "%d replica(s) of %d confirm writes" % (n, master.port))


def test_redis_wait_answers_after_replicas_confirm_one_wait_per_group():
    with RedisServer() as master, replica_of(master) as replica:
        replica_online(master)
        with Server("server5.lua", ["--storage=" + master.url(), "--redis-wait=1,5000",
                                    "--workers=0"]) as s:
            master.cli("CONFIG", "RESETSTAT")  # count only the WAITs of these calls
            # Idle, the outbox checks its buckets (commits that write nothing): nothing of
            # theirs is unconfirmed, so they send no WAIT.
            wait_until(lambda: cmdstat_calls(master, "evalsha") >= 16, "the outbox's idle checks")
            eq(cmdstat_calls(master, "wait"), 0, "WAITs sent by commits that wrote nothing")
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
            # 2 s: on this noisy machine a healthy replica has been seen to take over 300 ms to
            # confirm; a missing one costs a call those 2 s.
            with Server("server5.lua", ["--storage=" + master.url(), "--redis-wait=1,2000",
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


class Sentinel:
    """One redis-sentinel (redis-server --sentinel) watching master NAME, with failure
    detection in one second and failovers of a few seconds."""

    def __init__(self, master_port, name="mymaster", password=None):
        self.port = free_port()
        self.dir = tmpdir("mph-sentinel-")
        self.conf = os.path.join(self.dir, "sentinel.conf")
        with open(self.conf, "w") as f:
            f.write("port %d\nbind 127.0.0.1\ndir %s\nlogfile %s\n"
                    "sentinel monitor %s 127.0.0.1 %d 2\n"
                    "sentinel down-after-milliseconds %s 1000\n"
                    "sentinel failover-timeout %s 4000\n"
                    % (self.port, self.dir, os.path.join(self.dir, "sentinel.log"), name,
                       master_port, name, name))
            if password:
                f.write("sentinel auth-pass %s %s\n" % (name, password))
        self.proc = subprocess.Popen(["redis-server", self.conf, "--sentinel"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def cli(self, *args):
        return subprocess.run(["redis-cli", "-p", str(self.port)] + list(args),
                              capture_output=True, text=True, timeout=10).stdout.split()

    def master(self, name="mymaster"):
        """SENTINEL master NAME as a dict."""
        out = self.cli("SENTINEL", "master", name)
        return dict(zip(out[0::2], out[1::2]))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


class ReplicatedRedis:
    """A master, one replica and three sentinels, all on free loopback ports; ready once every
    sentinel knows the replica and the other two sentinels (a failover needs both)."""

    def __init__(self, password=None):
        self.password = password

    def __enter__(self):
        self.master = RedisServer(password=self.password).start()
        self.replica = replica_of(self.master).start()
        self.sentinels = [Sentinel(self.master.port, password=self.password) for _ in range(3)]
        replica_online(self.master)

        def ready():
            for s in self.sentinels:
                m = s.master()
                if m.get("num-slaves") != "1" or m.get("num-other-sentinels") != "2":
                    return False
            return True
        wait_until(ready, "the sentinels know the replica and each other", timeout=60)
        return self

    def __exit__(self, *exc):
        for s in self.sentinels:
            s.stop()
        self.replica.stop()
        self.master.stop()

    def url(self, password=None):
        auth = ":%s@" % password if password else ""
        return "redis-sentinel://%s%s/mymaster" % (auth, ",".join(
            "127.0.0.1:%d" % s.port for s in self.sentinels))

    def current_master_port(self):
        out = self.sentinels[0].cli("SENTINEL", "get-master-addr-by-name", "mymaster")
        return int(out[1]) if len(out) == 2 else None


def failover_under_load(wait, clients=4, before=100, after=50):
    """Kills the master with -9 once `before` calls were acknowledged, restarts it once the
    replica is promoted, and keeps calling until `after` more calls were acknowledged. Returns (acknowledged counts, the
    count stored on the new master, number of -32002 answers)."""
    with ReplicatedRedis() as rr:
        args = ["--storage=" + rr.url()] + (["--redis-wait=1"] if wait else [])
        with Server("server5.lua", args) as s:
            acked, problems, unavailable = [], [], [0]
            lock = threading.Lock()
            killed_at = [None]
            enough = threading.Event()

            def worker():
                c = KeepAliveClient(s.port, timeout=30)
                while not enough.is_set():
                    r = c.call("simple-storage", [{}])
                    with lock:
                        if "result" in r:
                            acked.append(r["result"]["requests"])
                            if killed_at[0] is not None:
                                killed_at[0] += 1
                                if killed_at[0] >= after:
                                    enough.set()
                        elif r["error"]["code"] == -32002:
                            unavailable[0] += 1
                        else:
                            problems.append(r["error"])
                            enough.set()
                c.close()

            threads = Threads()  # a client that dies (a reset, a bad status) fails the test
            for _ in range(clients):
                threads.start(worker)
            wait_until(lambda: threads.check_alive() or len(acked) >= before,
                       "%d calls acknowledged" % before)
            old = rr.master.port
            with lock:
                killed_at[0] = 0
            rr.master.kill9()
            # The promoted replica has no replica of its own: WAIT 1 needs the old master back,
            # which the sentinels turn into the new master's replica once it returns (were it
            # back before the failover, it would simply stay master).
            wait_until(lambda: rr.current_master_port() == rr.replica.port,
                       "the sentinels promote the replica", timeout=60)
            rr.master = RedisServer(port=old, directory=rr.master.dir).start()
            resumed = enough.wait(90)
            enough.set()
            threads.join()
            check(not problems, "calls failed otherwise than -32002: %r" % problems[:3])
            check(resumed, "service did not resume after the failover (%d acknowledged after "
                  "the kill)" % killed_at[0])
            # The replica was promoted (waited for above). On a loaded machine the sentinels
            # may later fail over again, back to the old master, now the new one's replica
            # (down-after-milliseconds is 1 s here): legitimate, and what counts is that no
            # acknowledged count is lost, so the count is read on whichever is master now.
            new = rr.current_master_port()
            check(new in (old, rr.replica.port), "the master is one of ours: %r" % new)
            check("Sentinel switched master mymaster" in s.read_log(),
                  "+switch-master was not heard: " + s.read_log()[-1500:])
            master = rr.replica if new == rr.replica.port else rr.master
            stored = int(master.cli("HGET", "mp:{global}:d", "requests"))
            return acked, stored, unavailable[0]


def test_sentinel_failover_under_load_with_wait_loses_no_acknowledged_count():
    acked, stored, unavailable = failover_under_load(wait=True)
    # Every acknowledged count is distinct (a lost commit would make the next call answer a
    # count already answered) and the promoted replica holds at least the highest one.
    eq(len(set(acked)), len(acked), "acknowledged counts are distinct")
    check(stored >= max(acked), "stored %d < acknowledged %d" % (stored, max(acked)))
    check(unavailable > 0, "the failover was not even noticed")


def test_sentinel_url_errors_at_start():
    dead = free_port()
    cases = [("redis-sentinel://127.0.0.1:%d/mymaster" % dead, "sentinel 127.0.0.1:%d" % dead),
             ("redis-sentinel://127.0.0.1:%d" % dead, "expected redis-sentinel://"),
             ("redis-sentinel://127.0.0.1/mymaster", "expected host:port")]
    for url, why in cases:
        s = Server("server5.lua", ["--storage=" + url])
        s.start(expect_ok=False)
        rc = s.proc.wait(timeout=30)
        check(rc != 0 and why in s.read_log(), "%s: exit %d, %s" % (url, rc, s.read_log()[-300:]))


def test_sentinel_with_a_password():
    with ReplicatedRedis(password="s3cret") as rr:
        with Server("server5.lua", ["--storage=" + rr.url("s3cret"), "--redis-wait=1"]) as s:
            for i in range(1, 4):
                eq(s.result("simple-storage", [{}]), {"requests": i})
            eq(rr.replica.cli("HGET", "mp:{global}:d", "requests"), "3")
            check("s3cret" not in s.read_log(), "the password is in the log")
        bad = Server("server5.lua", ["--storage=" + rr.url("wrong")])
        bad.start(expect_ok=False)
        rc = bad.proc.wait(timeout=30)
        check(rc != 0 and "refused AUTH" in bad.read_log(), "a wrong password: exit %d, %s"
              % (rc, bad.read_log()[-300:]))
