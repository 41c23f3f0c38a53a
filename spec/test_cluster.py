"""Redis Cluster: a 3-master cluster started here (redis-server --cluster-enabled yes x 3 on
free loopback ports, redis-cli --cluster create), mphost given one node's address. Counts over
500 named scopes from 2 processes (16 clients, 100 calls each at least, and on until the
reshard ends) stay exact while 300 slots are resharded under the load, no call failing; a
transaction over scopes in different slots is refused, one over co-located scopes commits."""
import socket
import subprocess
import threading

from harness import KeepAliveClient, RedisServer, Server, Threads, check, eq, free_port, wait_until
from test_named import ACCOUNTS




def redis_cli(*args, timeout=120):
    p = subprocess.run(["redis-cli"] + list(args), capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def cluster_port():
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
        finally:
            s.close()


class Cluster:
    """Three masters, no replicas, every slot assigned."""

    def __enter__(self):
        self.nodes = []
        try:
            for _ in range(3):
                self.nodes.append(RedisServer(port=cluster_port(),
                                              args=["--cluster-enabled", "yes",
                                                    "--cluster-node-timeout", "5000"]).start())
            rc, out = redis_cli("--cluster", "create",
                                *["127.0.0.1:%d" % n.port for n in self.nodes], "--cluster-yes")
            check(rc == 0, "redis-cli --cluster create failed: " + out[-1000:])
            wait_until(lambda: all("cluster_state:ok" in n.cli("CLUSTER", "INFO")
                                   for n in self.nodes), "every node says cluster_state:ok")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for n in self.nodes:
            n.stop()

    def url(self):
        return self.nodes[0].url()

    def node_id(self, i):
        return self.nodes[i].cli("CLUSTER", "MYID")

    def keyslot(self, key):
        return int(self.nodes[0].cli("CLUSTER", "KEYSLOT", key))

    def slots_of(self, i):
        """How many slots node i serves (from its own view)."""
        total = 0
        for line in self.nodes[i].cli("CLUSTER", "NODES").splitlines():
            if "myself" in line:
                for part in line.split()[8:]:
                    if "-" in part and not part.startswith("["):
                        a, b = part.split("-")
                        total += int(b) - int(a) + 1
                    elif part.isdigit():
                        total += 1
        return total


def test_cluster_500_scopes_2_processes_exact_through_a_live_reshard():
    with Cluster() as cl:
        procs = [Server(ACCOUNTS, ["--storage=" + cl.url()]).start() for _ in range(2)]
        try:
            nscopes, clients, calls = 500, 16, 100
            seen = {}  # scope -> counts answered
            problems = []
            lock = threading.Lock()
            progress = [0]

            resharded = threading.Event()

            def client(i):
                # At least `calls` calls, and on until the reshard is over: all of it under load.
                c = KeepAliveClient(procs[i % 2].port)
                try:
                    j = 0
                    while j < calls or not resharded.is_set():
                        name = "s%d" % ((i * calls + j) % nscopes)
                        j += 1
                        r = c.call("count", {"name": name})
                        with lock:
                            progress[0] += 1
                            if "error" in r:
                                problems.append((name, r["error"]))
                            else:
                                seen.setdefault(name, []).append(r["result"])
                finally:
                    c.close()

            threads = Threads()  # a client that dies (a reset, a bad status) fails the test
            for i in range(clients):
                threads.start(client, i)
            # Reshard under the load: 300 slots from the first master to the second.
            wait_until(lambda: threads.check_alive() or progress[0] >= 100,
                       "the load is under way")
            before = cl.slots_of(1)
            rc, out = redis_cli("--cluster", "reshard", "127.0.0.1:%d" % cl.nodes[0].port,
                                "--cluster-from", cl.node_id(0), "--cluster-to", cl.node_id(1),
                                "--cluster-slots", "300", "--cluster-yes")
            resharded.set()
            threads.join()
            check(rc == 0, "reshard failed: " + out[-1000:])
            eq(cl.slots_of(1), before + 300, "slots of the second master after the reshard")
            check(not problems, "%d calls failed, e.g. %r" % (len(problems), problems[:3]))
            check(progress[0] >= clients * calls, "only %d calls" % progress[0])
            # The load met the reshard: nodes answered with redirections, which mphost followed.
            redirects = {}
            for n in cl.nodes:
                for line in n.cli("INFO", "errorstats").splitlines():
                    if line.startswith("errorstat_"):
                        kind, count = line[len("errorstat_"):].split(":count=")
                        redirects[kind] = redirects.get(kind, 0) + int(count.strip())
            check(redirects.get("MOVED", 0) + redirects.get("ASK", 0) > 0,
                  "no redirection: %r" % redirects)
            # Every scope's answers are 1..k, each once, and the count stored in the cluster
            # (read with redis-cli -c, which follows redirections) is k.
            names = ["s%d" % k for k in range(nscopes)]
            p = subprocess.run(["redis-cli", "-c", "-p", str(cl.nodes[0].port)],
                               input="".join("HGET mp:{n:%s}:d n\n" % n for n in names),
                               capture_output=True, text=True, timeout=60)
            stored = [line for line in p.stdout.splitlines() if not line.startswith("->")]
            eq(len(stored), nscopes, "stored counts read")
            for name, value in zip(names, stored):
                want = len(seen.get(name, []))
                eq(sorted(seen.get(name, [])), list(range(1, want + 1)), "answers of " + name)
                eq(int(value), want, "stored count of " + name)
        finally:
            for p in procs:
                p.stop()


def test_cluster_cross_slot_transaction_refused_colocated_one_commits():
    with Cluster() as cl, Server(ACCOUNTS, ["--storage=" + cl.url()]) as s:
        # Accounts 1 and 2 are in different slots (checked, not assumed).
        check(cl.keyslot("mp:{n:account:1}:v") != cl.keyslot("mp:{n:account:2}:v"),
              "accounts 1 and 2 share a slot")
        eq(s.result("deposit", {"id": 1, "amount": 100}), 100)
        r = s.rpc("transfer", {"from": 1, "to": 2, "amount": 30})
        check("error" in r, "a cross-slot transfer was answered: %r" % r)
        eq(r["error"]["code"], -32000)
        msg = r["error"]["message"]
        check("n:account:1" in msg and "n:account:2" in msg and "slot" in msg, msg)
        eq(s.result("read", {"name": "account:1"}), 0)  # "count" field untouched
        eq(s.rpc("audit", {"n": 1})["result"], {"total": 100, "low": 100})  # nothing moved
        # Co-located by a hash tag in the names: one slot, one atomic commit.
        a, b = "{42}:savings", "{42}:checking"
        ka, kb = "mp:n:account:%s/v" % a, "mp:n:account:%s/v" % b
        eq(cl.keyslot(ka), cl.keyslot(kb), "slots of the tagged scopes")
        eq(cl.keyslot(ka), cl.keyslot("42"), "the tag decides the slot")
        eq(s.result("deposit", {"id": a, "amount": 100}), 100)
        eq(s.result("transfer", {"from": a, "to": b, "amount": 30}), True)
        eq(s.result("deposit", {"id": a, "amount": 0}), 70)
        eq(s.result("deposit", {"id": b, "amount": 0}), 30)
        # The keys are where the tag says: on the node serving slot 42's tag.
        node = [n for n in cl.nodes if n.cli("EXISTS", ka) == "1"]
        eq(len(node), 1, "nodes holding " + ka)
        eq(node[0].cli("HGET", "mp:n:account:%s/d" % b, "balance"), "30")
