"""The outbox: mp.send, mp.cancel, mp.self, durable timers, `mphost SCRIPT outbox`, /metrics
(lua/outbox.lua, lua/outbox.c, host/cli/outbox.c), on file storage and on Redis, against a
local counter service (a small threaded Python JSON-RPC server that records every request's
Idempotency-Key, and can fail the first attempts) and mp.self. Every wait polls for an event
(a count, a log line) with a deadline that only turns a hang into a failure."""
import json
import os
import re
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler

from harness import (MPHOST, SCRIPTS, RedisServer, Server, StubHTTP, check, console_steps, eq,
                     private_network, tmpdir, wait_until)
from test_fetch import Backend, closed_port, metric

OUTBOX = os.path.join(SCRIPTS, "outbox.lua")
VALGRIND = bool(os.environ.get("MPH_VALGRIND"))
WAIT = 120 if VALGRIND else 60  # deadlines of waits (never reached when things work)


class Counter(StubHTTP):
    """A JSON-RPC endpoint on a free loopback port that records each request: its
    Idempotency-Key, method and params. `fail_first` = N answers each key's first N requests
    with HTTP 503; `answer` = "error" answers a JSON-RPC error instead of a result."""

    def __init__(self, fail_first=0, answer="result"):
        self.lock = threading.Lock()
        self.requests = []  # (key, method, params)
        self.fail_first = fail_first
        self.answer = answer
        counter = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                req = json.loads(self.rfile.read(n))
                key = self.headers.get("Idempotency-Key")
                with counter.lock:
                    counter.requests.append((key, req.get("method"), req.get("params")))
                    tries = sum(1 for r in counter.requests if r[0] == key)
                if tries <= counter.fail_first:
                    self.reply(503, b"busy")
                    return
                out = {"jsonrpc": "2.0", "id": req.get("id")}
                if counter.answer == "error":
                    out["error"] = {"code": -32050, "message": "refused"}
                else:
                    out["result"] = tries
                self.reply(200, json.dumps(out).encode())

            def reply(self, status, body):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(Handler)
        self.url = "http://127.0.0.1:%d/" % self.port

    def keys(self):
        with self.lock:
            return [r[0] for r in self.requests]


def storages():
    """(name, extra server args, redis or None) for files, then Redis (started here)."""
    yield "file", [], None
    with RedisServer() as redis:
        yield "redis", ["--storage=" + redis.url()], redis


def outbox_cli(server, *args):
    """`mphost SCRIPT outbox` on server's storage: (exit status, stdout, stderr)."""
    storage = [a for a in server.args if a.startswith("--storage")]
    p = subprocess.run([MPHOST, server.script, "outbox", "--data=" + server.data] + storage +
                       list(args), capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout, p.stderr


def stats(server):
    return server.result("stats", [])


def wait_log(server, text, timeout=WAIT):
    wait_until(lambda: text in server.read_log(), "log line %r" % text, timeout)


def in_threads(n, fn):
    errors = []

    def run(i):
        try:
            fn(i)
        except Exception as e:  # re-raised below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if errors:
        raise errors[0]


# ---- Atomic with the transaction ----

def test_a_handler_that_sends_then_raises_sends_nothing():
    for name, args, _ in storages():
        with Counter() as counter, Server(OUTBOX, args) as s:
            for target in (counter.url, "self"):
                r = s.rpc("send-raise", [target, "count", ["raised"]])
                eq(r["error"]["message"], "raised after sending", name)
            # A marker sent after them: once it has arrived, the raised ones would have too.
            s.result("send", [counter.url, "count", ["marker"]])
            s.result("send", ["self", "count", ["marker"]])
            wait_until(lambda: len(counter.keys()) >= 1 and stats(s)["got"] >= 1, "the markers")
            eq([r[2] for r in counter.requests], [["marker"]], name + ": what the URL got")
            eq(stats(s), {"sent": 2, "got": 1, "ticks": 0, "failed_runs": 0}, name)
            eq(outbox_cli(s)[1], "no pending messages\n", name + ": outbox")
            s.stop()


def run_200(server, counter, first, last, threads=8, acked=None):
    """Calls send for messages first..last-1, half to the counter, half to mp.self; returns
    how many were acknowledged (a call cut by a kill may or may not have committed). acked,
    a dict, shows the count as it goes (acked["n"])."""
    acked = acked if acked is not None else {}
    acked["n"] = 0
    lock = threading.Lock()

    def one(i):
        for k in range(first + i, last, threads):
            target = counter.url if k % 2 else "self"
            try:
                r = server.rpc("send", [target, "count", [k]], timeout=30)
            except Exception:
                return  # the server was killed under this call
            if "result" in r:
                with lock:
                    acked["n"] += 1
    in_threads(threads, one)
    return acked["n"]


def check_counts_equal(server, counter, name):
    """Once delivery has caught up: every committed send reached its target, mp.self's
    exactly once and each URL message under one Idempotency-Key (sent at least once)."""
    def caught_up():
        st = stats(server)
        return st["got"] + len(set(counter.keys())) >= st["sent"]
    wait_until(caught_up, name + ": deliveries catching up with sends", WAIT)
    st = stats(server)
    keys = counter.keys()
    eq(st["got"] + len(set(keys)), st["sent"], name + ": deliveries = sends")
    return st, keys


def test_200_calls_each_sending_one_message_end_with_equal_counts():
    for name, args, _ in storages():
        with Counter() as counter, Server(OUTBOX, args + ["--workers=2"]) as s:
            eq(run_200(s, counter, 0, 200), 200, name + ": acknowledged")
            st, keys = check_counts_equal(s, counter, name)
            eq(st["sent"], 200, name)
            eq((st["got"], len(keys), len(set(keys))), (100, 100, 100), name + ": no duplicate")
            wait_until(lambda: metric(s, 'mphost_outbox_delivered_total{result="ok"}') == 200,
                       name + ": metrics count 200 deliveries")
            wait_until(lambda: metric(s, "mphost_outbox_pending") == 0, name + ": none pending")
            s.stop()


def test_kill9_in_the_middle_and_a_restart_lose_and_double_nothing():
    """Every process killed with kill -9 while calls send and deliveries run, then started
    again on the same storage: each committed message arrives (mp.self's exactly once)."""
    for name, args, _ in storages():
        with Counter() as counter:
            s = Server(OUTBOX, args + ["--workers=2"]).start()
            acked = {"n": 0}
            # kill -9 once half the calls are acknowledged: the other half, and deliveries
            # of the first, are under way.
            killer = threading.Thread(target=lambda: (wait_until(
                lambda: acked["n"] >= 100, "acknowledgements", WAIT), s.kill9()))
            killer.start()
            n = run_200(s, counter, 0, 200, acked=acked)
            killer.join(60)
            check(100 <= n < 200, name + ": the kill cut some calls (%d acknowledged)" % n)
            s2 = Server(OUTBOX, args + ["--workers=2"], data=s.data, port=s.port,
                        state=s.state).start()
            run_200(s2, counter, 200, 260)
            st, keys = check_counts_equal(s2, counter, name)
            check(st["sent"] >= n + 60, name + ": every acknowledged send counted")
            seen = s2.result("seen", [])  # mp.self: no message ran twice (count's tally)
            eq((seen["keys"], seen["max"]), (st["got"], 1), name + ": mp.self exactly once")
            s2.stop()


# ---- Delivery to a URL ----

def test_a_url_that_fails_twice_then_answers_gets_one_message_under_one_key():
    for name, args, _ in storages():
        with Counter(fail_first=2) as counter, Server(OUTBOX, args) as s:
            mid = s.result("send", [counter.url, "count", {"n": 1}])
            wait_until(lambda: len(counter.keys()) >= 3, name + ": three attempts", WAIT)
            wait_until(lambda: metric(s, 'mphost_outbox_delivered_total{result="ok"}') == 1,
                       name + ": delivered")
            eq(counter.keys(), [mid, mid, mid], name + ": the same Idempotency-Key each time")
            eq([r[1:] for r in counter.requests], [("count", {"n": 1})] * 3, name)
            eq(metric(s, "mphost_outbox_retries_total"), 2, name + ": two retries")
            eq(outbox_cli(s)[1], "no pending messages\n", name)
            check("not delivered: HTTP 503; retrying" in s.read_log(), name + ": logged")
            s.stop()


def test_a_json_rpc_error_answer_is_final():
    with Counter(answer="error") as counter, Server(OUTBOX) as s:
        s.result("send", [counter.url, "count", [1]])
        s.result("send", ["self", "fails", []])
        wait_until(lambda: metric(s, 'mphost_outbox_delivered_total{result="error"}') == 2,
                   "two final errors")
        eq(len(counter.keys()), 1, "sent once")
        check("answered error -32050: refused; that is final" in s.read_log(), "logged")
        eq(stats(s)["failed_runs"], 0, "a handler that raised committed nothing")
        eq(metric(s, "mphost_outbox_retries_total"), 0, "no retry")
        eq(outbox_cli(s)[1], "no pending messages\n", "nothing left")
        s.stop()


# ---- Timers and cancels ----

def test_delays_at_and_cancels():
    for name, args, _ in storages():
        with Counter() as counter, Server(OUTBOX, args) as s:
            before = time.time()
            s.result("send", [counter.url, "count", ["delayed"], {"delay": 1.5}])
            s.result("send", [counter.url, "count", ["at"], {"at": time.time() + 1.5}])
            far = s.result("send", ["self", "count", ["far"], {"delay": 3600}])
            later = s.result("send", [counter.url, "count", ["cancelled"], {"delay": 2}])
            eq(s.result("cancel", [later]), True, name + ": pending, cancelled")
            eq(s.result("cancel", [later]), False, name + ": cancelled already")
            eq(s.result("cancel", ["nonsense"]), False, name + ": not an id")
            r = s.rpc("cancel-raise", [far])
            eq(r["error"]["message"], "raised after cancelling", name)
            wait_until(lambda: len(counter.keys()) >= 2, name + ": the two timers", WAIT)
            arrived = time.time()
            check(arrived - before >= 1.5, name + ": not before they were due")
            # (a delivered message goes once the answer's record commits, just after)
            wait_until(lambda: len(outbox_cli(s)[1].splitlines()) == 2, name + ": one left", WAIT)
            rc, out, _ = outbox_cli(s)
            lines = out.splitlines()
            check(lines[1].startswith(far + "  mp.self"), name + ": " + out)
            eq(s.result("cancel", [far]), True, name + ": a cancel that raised left it")
            eq(outbox_cli(s)[1], "no pending messages\n", name)
            eq(sorted(r[2][0] for r in counter.requests), ["at", "delayed"], name)
            s.stop()


def test_a_job_that_resends_itself_ticks_once_per_period_across_restarts():
    for name, args, _ in storages():
        s = Server(OUTBOX, args).start()
        s.result("start-ticks", [0.4, 8])
        wait_until(lambda: stats(s)["ticks"] >= 2, name + ": ticking", WAIT)
        s.stop()  # a graceful stop between two ticks
        s = Server(OUTBOX, args, data=s.data, port=s.port, state=s.state).start()
        wait_until(lambda: stats(s)["ticks"] >= 4, name + ": ticking again", WAIT)
        s.kill9()  # and a crash
        s = Server(OUTBOX, args, data=s.data, port=s.port, state=s.state).start()
        wait_until(lambda: outbox_cli(s)[1] == "no pending messages\n", name + ": chain ends", WAIT)
        eq(stats(s)["ticks"], 8, name + ": exactly one tick per period, none doubled or lost")
        s.stop()


def test_a_delivery_that_waits_longer_than_its_lease_keeps_its_message():
    """An mp.self handler that waits 8 s in mp.fetch, past the 6 s lease: this process's next
    claim renews the lease instead of starting a second delivery that would void the first (and
    then be voided in turn, for ever)."""
    with Backend() as b, Server(OUTBOX) as s:
        s.result("send", ["self", "slow-count", [b.url("/slow?s=8")]])
        wait_until(lambda: stats(s)["got"] == 1, "the slow message delivered", WAIT)
        eq(b.hit("/slow"), 1, "the handler ran, and fetched, once")
        eq(outbox_cli(s)[1], "no pending messages\n", "nothing left")


# ---- Dead messages ----

def test_an_undeliverable_message_is_kept_as_dead_and_listed():
    for name, args, _ in storages():
        port = closed_port()
        url = "http://127.0.0.1:%d/" % port  # as logs and listings show it: no credentials
        with Server(OUTBOX, args + ["--send-expiry=2"]) as s:
            mid = s.result("send", ["http://alice:sekrit@127.0.0.1:%d/" % port, "notify",
                                    {"order": 7}])
            wait_log(s, "outbox: message %s (notify to %s) is dead" % (mid, url))
            check("sekrit" not in s.read_log(), "the password in the log: " + s.read_log())
            eq(outbox_cli(s)[1], "no pending messages\n", name)
            rc, out, err = outbox_cli(s, "--dead")
            eq(rc, 0, err)
            lines = out.splitlines()
            eq(len(lines), 2, out)
            check(re.match(r"ID +TARGET +METHOD +DUE +ATTEMPTS +LAST ERROR$", lines[0]), out)
            fields = lines[1].split(None, 5)
            eq(fields[:3], [mid, url, "notify"], name)
            check(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", fields[3]), fields[3])
            check(int(fields[4]) >= 2, name + ": attempts " + fields[4])
            check(fields[5].startswith("no answer: "), name + ": " + fields[5])
            check("sekrit" not in out, "the password in the listing: " + out)
            eq(metric(s, 'mphost_outbox_delivered_total{result="dead"}'), 1, name)
            check(metric(s, "mphost_outbox_retries_total") >= 1, name + ": retried first")


# ---- Several hosts ----

def test_two_hosts_sharing_redis_deliver_each_message_once():
    with RedisServer() as redis, Counter() as counter:
        args = ["--storage=" + redis.url()]
        a = Server(OUTBOX, args).start()
        b = Server(OUTBOX, args).start()
        try:
            def one(i):
                server = (a, b)[i % 2]
                for k in range(i, 120, 4):
                    target = counter.url if k % 3 == 0 else "self"
                    eq("result" in server.rpc("send", [target, "count", [k]]), True, "send")
            in_threads(4, one)
            st, keys = check_counts_equal(a, counter, "two hosts")
            eq(st["sent"], 120, "sends")
            eq(len(keys), len(set(keys)), "each URL message sent once")
            eq(len(keys), 40, "URL messages")
            eq(st["got"], 80, "mp.self messages, each run once")
            a.stop()
            b.stop()
        finally:
            for s in (a, b):
                if s.running():
                    s.proc.kill()


def test_messages_left_by_a_host_gone_for_good_are_taken_up_by_another():
    """Host A sends delayed messages and is killed; host B (another home bucket: --host-id)
    delivers them once they are due."""
    with RedisServer() as redis:
        args = ["--storage=" + redis.url()]
        a = Server(OUTBOX, args + ["--workers=2"]).start()
        for i in range(4):
            a.result("send", ["self", "count", ["orphan%d" % i], {"delay": 1}])
        a.kill9()
        b = Server(OUTBOX, args + ["--workers=1"], port=None).start()
        wait_until(lambda: stats(b)["got"] >= 4, "the orphans delivered", WAIT)
        eq(stats(b)["got"], 4, "once each")
        b.stop()


# ---- The command line, metrics, misuse ----

def test_outbox_cli_lists_pending_messages_and_refuses_bad_storage():
    with Server(OUTBOX, ["--workers=2"]) as s:  # (the pending gauge: each worker sees all)
        rc, out, err = outbox_cli(s)
        eq((rc, out, err), (0, "no pending messages\n", ""), "empty")
        eq(outbox_cli(s, "--dead")[1], "no dead messages\n", "no dead")
        ids = [s.result("send", ["self", "count", [i], {"delay": 3600 + i}]) for i in range(3)]
        wait_until(lambda: metric(s, "mphost_outbox_pending") == 3, "the pending gauge")
        for _ in range(8):  # both workers look every second: the gauge stays 3 (not 6)
            eq(metric(s, "mphost_outbox_pending"), 3, "the pending gauge, two workers")
            time.sleep(0.3)
        rc, out, err = outbox_cli(s)
        lines = out.splitlines()
        eq(len(lines), 4, out)
        eq([line.split()[0] for line in lines[1:]], ids, "sorted by due")
        for line in lines[1:]:
            f = line.split()
            eq((f[1], f[2], f[4], f[5]), ("mp.self", "count", "0", "-"), line)
        p = subprocess.run([MPHOST, s.script, "status", "--dead"], capture_output=True,
                           text=True, timeout=30)
        eq(p.returncode, 1, "--dead elsewhere")
        check("--dead is an option of outbox" in p.stderr, p.stderr)
        s.stop()
    p = subprocess.run([MPHOST, OUTBOX, "outbox", "--storage=redis://127.0.0.1:%d" %
                        closed_port()], capture_output=True, text=True, timeout=60)
    eq(p.returncode, 1, "unreachable Redis")
    eq(len(p.stderr.splitlines()), 1, p.stderr)
    # Where nothing was ever stored, the listing creates nothing either.
    fresh = tmpdir()
    for dead in ([], ["--dead"]):
        p = subprocess.run([MPHOST, OUTBOX, "outbox", "--data=" + os.path.join(fresh, "data")] +
                           dead, capture_output=True, text=True, timeout=60)
        eq((p.returncode, p.stdout), (0, "no %s messages\n" % ("dead" if dead else "pending")),
           "a data directory that does not exist: " + p.stderr)
    eq(os.listdir(fresh), [], "what the listing left")


def test_mp_send_refuses_misuse_clearly():
    with Server(OUTBOX) as s:
        cases = {"target": "target must be an http:// or https:// URL, or mp.self",
                 "both": "give delay or at, not both",
                 "params": "params must be a table",
                 "option": 'unknown option "later"',
                 "method": "method must be a string"}
        for what, text in cases.items():
            r = s.rpc("bad", [what])
            eq(r["error"]["code"], -32000, what)
            check(text in r["error"]["message"], "%s: %s" % (what, r["error"]["message"]))
        eq(outbox_cli(s)[1], "no pending messages\n", "nothing sent")
        s.stop()


# ---- The walkthroughs of docs/outbox.md ----

ID = re.compile(r"\b[0-9a-f]{2}\.[0-9a-f]{24}\b")
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def normalised(lines):
    """Ids and times vary from run to run: each becomes a placeholder."""
    return [TIME.sub("<time>", ID.sub("<id>", line)) for line in lines]


def run_walkthrough(block_index, cleanup):
    from test_cli import shell, workspace
    steps = console_steps("outbox.md", 6, block_index)
    cwd, env = workspace()
    try:
        for cmd, expected in steps:
            rc, out, err = shell(cmd, cwd, env)
            eq(normalised((out + err).splitlines()), normalised(expected),
               "what `%s` prints" % cmd)
    finally:
        shell(cleanup, cwd, env)


@private_network
def test_docs_reminder_walkthrough_prints_what_docs_outbox_md_shows():
    run_walkthrough(1, "mphost examples/reminder.lua delete")


@private_network
def test_docs_orders_walkthrough_prints_what_docs_outbox_md_shows():
    run_walkthrough(2, "mphost examples/orders.lua delete; "
                       "mphost examples/orders.lua delete --port=3001")
