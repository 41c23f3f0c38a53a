"""Transactional scopes on file storage: write recording, concurrency, crashes, disk errors."""
import glob
import os
import random
import shutil
import struct
import threading
import time

from harness import (SCRIPTS, KeepAliveClient, Server, TestFailure, check, eq,
                     kill9_under_load, tmpdir)

IDIOMS = os.path.join(SCRIPTS, "idioms.lua")


def log_size(data):
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(data, "*.log")))


def test_every_idiom_is_recorded_and_committed():
    data = tmpdir()
    steps = ["set_scalar", "nested_table", "deep_assign", "read_then_assign", "new_list",
             "insert", "sort", "remove", "append_len", "reassign_mutated", "reassign_mutated",
             "delete_key", "delete_nested", "replace_subtree", "replace_subtree2",
             "nested_insert_in_object", "nested_insert_in_object", "empty_containers",
             "null_value"]
    with Server(IDIOMS, data=data) as s:
        for step in steps:
            eq(s.result("step", [step]), True, step)
        before = log_size(data)
        eq(s.result("step", ["same_value"]), True)
        eq(log_size(data), before, "writing the same values commits nothing")
        in_memory = s.result("dump")
    expected = {
        "s": "text", "f": False,
        "t": {"x": {"y": 2, "z": 3}},
        "list": ["b", "c", "d"],
        "list2": [9, 9],
        "r": {"new": 2},
        "obj": {"items": [{"n": 1}, {"n": 2}]},
        "ea": [], "eo": {}, "n": None,
    }
    eq(in_memory, expected, "state seen by the running server")
    with Server(IDIOMS, data=data) as s:  # a fresh process reads it back from disk
        eq(s.result("dump"), expected, "state read back after a restart")
        status, body = s.post_raw('{"jsonrpc":"2.0","method":"dump","id":1}')
        check(b'"ea":[]' in body and b'"eo":{}' in body and b'"n":null' in body, body)
        r = s.result("reads")
        eq(r["keys"], sorted(expected.keys()), "pairs over the scope")
        eq(r["next_count"], len(expected), "next over the scope")
        eq((r["len"], r["concat"], r["unpacked"], r["ipairs"]),
           (3, "b,c,d", ["b", "c", "d"], ["b", "c", "d"]))
        eq((r["type"], r["root_len"]), ("table", 0))


def test_handler_that_raises_commits_nothing():
    data = tmpdir()
    with Server(IDIOMS, data=data) as s:
        s.result("step", ["nested_table"])
        s.result("step", ["set_scalar"])
        before = s.result("dump")
        size = log_size(data)
        r = s.rpc("fail_after_write")
        eq(r["error"], {"code": -32000, "message": "fails after writing"})
        eq(s.result("dump"), before, "unchanged in memory")
        eq(log_size(data), size, "nothing written")
    with Server(IDIOMS, data=data) as s:
        eq(s.result("dump"), before, "unchanged on disk")


def test_scope_misuse_is_a_clear_error():
    with Server(IDIOMS) as s:
        r = s.rpc("bad_key")
        check("keys of a scope must be strings" in r["error"]["message"], r)
        r = s.rpc("insert_root")
        check("keys of a scope must be strings" in r["error"]["message"], r)
        r = s.rpc("store_function")
        eq(r["error"]["code"], -32000)
        check("function at global.fn.f" in r["error"]["message"], r)
        eq(s.result("keep_root"), True)
        r = s.rpc("use_kept")
        check("used after its handler returned" in r["error"]["message"], r)
        eq(s.result("dump"), {}, "none of it was committed")


def hammer(port, clients, calls, method="simple-storage"):
    """clients threads x calls each over keep-alive; returns the list of counts seen."""
    counts, errors = [], []
    lock = threading.Lock()

    def worker():
        try:
            c = KeepAliveClient(port)
            mine = []
            for _ in range(calls):
                r = c.call(method, [{}])
                if "error" in r:
                    raise TestFailure("error: %r" % r["error"])
                mine.append(r["result"]["requests"])
            c.close()
            with lock:
                counts.extend(mine)
        except Exception as e:  # reported by the caller
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return counts


def test_16_clients_x_100_calls_exact():
    with Server("server5.lua") as s:
        counts = hammer(s.port, 16, 100)
        eq(len(counts), 1600)
        eq(len(set(counts)), 1600, "every count distinct")
        eq(sorted(counts), list(range(1, 1601)), "no count lost or repeated")
        eq(s.result("simple-storage", [{}]), {"requests": 1601})


def test_two_processes_on_one_data_directory():
    data = tmpdir()
    a = Server("server5.lua", data=data).start()
    b = Server("server5.lua", data=data).start()
    try:
        results = {}

        def run_on(name, srv):
            results[name] = hammer(srv.port, 8, 100)

        ta = threading.Thread(target=run_on, args=("a", a))
        tb = threading.Thread(target=run_on, args=("b", b))
        ta.start()
        tb.start()
        ta.join()
        tb.join()
        counts = results["a"] + results["b"]
        eq(len(counts), 1600)
        eq(sorted(counts), list(range(1, 1601)), "two processes never lose an update")
        eq(a.result("simple-storage", [{}]), {"requests": 1601})
        eq(b.result("simple-storage", [{}]), {"requests": 1602})
    finally:
        a.stop()
        b.stop()


def test_kill_9_during_load_loses_nothing_acknowledged():
    data = tmpdir()
    acked = []
    for round_ in range(5):
        s = Server("server5.lua", data=data).start()
        before = s.result("simple-storage", [{}])["requests"]
        check(before >= len(acked) + 1, "restart %d reads its data (%d < %d)" %
              (round_, before, len(acked) + 1))
        acked.append(before)
        acked += kill9_under_load(s, 8, 0.2 + random.random() * 0.3)
    s = Server("server5.lua", data=data).start()
    final = s.result("simple-storage", [{}])["requests"] - 1
    s.stop()
    eq(len(set(acked)), len(acked), "every acknowledged count is distinct")
    check(final >= len(acked), "final count %d >= acknowledged calls %d" % (final, len(acked)))
    check(final >= max(acked), "no acknowledged count was rolled back")


def test_torn_tail_is_cut_and_old_state_read():
    data = tmpdir()
    with Server("server5.lua", data=data) as s:
        for _ in range(3):
            s.result("simple-storage", [{}])
    log = os.path.join(data, "global.log")
    with open(log, "rb") as f:
        good = f.read()
    # A writer killed mid-record leaves a prefix of a record: header and half a payload.
    record = good[-(len(good) // 3):]
    with open(log, "ab") as f:
        f.write(struct.pack("<III", 0x3152504D, 200, 0) + b"\x04" * 50)
    with Server("server5.lua", data=data) as s:
        eq(s.result("simple-storage", [{}]), {"requests": 4}, "old state, then a new commit")
    with open(log, "rb") as f:
        after = f.read()
    check(after.startswith(good) and len(after) > len(good), "the torn bytes were replaced")
    del record


def test_corrupt_log_is_reported_not_skipped():
    data = tmpdir()
    with Server("server5.lua", data=data) as s:
        for _ in range(3):
            s.result("simple-storage", [{}])
    log = os.path.join(data, "global.log")
    with open(log, "r+b") as f:
        f.seek(20)
        f.write(b"\xff\xff")  # inside the first record, with records after it
    with Server("server5.lua", data=data) as s:
        r = s.rpc("simple-storage", [{}])
        eq(r["error"]["code"], -32002)
        check("corrupt" in r["error"]["message"], r)
        check(s.alive(), "the process stays up")


def test_unwritable_data_directory_gives_32002():
    parent = tmpdir()  # ours to open up, so that nobody can reach the data directory
    data = os.path.join(parent, "data")
    os.mkdir(data)
    os.chmod(data, 0o555)
    # Root ignores permission bits, so the server runs as nobody.
    prefix = []
    if os.geteuid() == 0:
        shutil.chown(data, "root")
        os.chmod(parent, 0o755)
        prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    with Server("server5.lua", data=data, prefix_cmd=prefix) as s:
        for _ in range(3):
            r = s.rpc("simple-storage", [{}])
            eq(r["error"]["code"], -32002)
            check("Permission denied" in r["error"]["message"], r)
        check(s.alive(), "the process stays up")


def test_disk_full_gives_32002_and_loses_nothing():
    data = tmpdir()
    # A file size limit makes writes fail like a full disk (EFBIG instead of ENOSPC).
    with Server(IDIOMS, data=data, prefix_cmd=["prlimit", "--fsize=300000", "--"]) as s:
        acked = 0
        failed = None
        for i in range(40):
            r = s.rpc("big", ["k%d" % i, 20000])
            if "error" in r:
                failed = r["error"]
                break
            acked = i + 1
        check(failed is not None, "the size limit was reached")
        eq(failed["code"], -32002)
        check(s.alive(), "the process stays up")
        eq(s.result("get", ["k0"]), "x" * 20000, "reads still work")
        eq(s.result("get", ["k%d" % acked]), None, "the failed write is not visible")
    with Server(IDIOMS, data=data) as s:
        for i in range(acked):
            eq(len(s.result("get", ["k%d" % i])), 20000, "acknowledged k%d survived" % i)
        eq(s.result("get", ["k%d" % acked]), None, "the failed write never appears")


def test_compaction_keeps_data_and_other_processes_follow():
    data = tmpdir()
    a = Server(IDIOMS, data=data).start()
    b = Server("server5.lua", data=data).start()
    try:
        b.result("simple-storage", [{}])
        for i in range(110):  # ~5.5 MB of log: past the 4 MiB compaction threshold
            a.result("big", ["k%d" % (i % 7), 50000, str(i)])
        check(os.path.exists(os.path.join(data, "global.snap")), "a snapshot was written")
        check(log_size(data) < 3 << 20, "the log was restarted (%d bytes)" % log_size(data))
        eq(b.result("simple-storage", [{}]), {"requests": 2}, "b follows the replaced log")
        eq(a.result("get", ["k3"]), "108" + "x" * 50000)
    finally:
        a.stop()
        b.stop()
    with Server(IDIOMS, data=data) as s:
        eq(s.result("get", ["requests"]), 2)
        eq(s.result("get", ["k6"]), "104" + "x" * 50000)


def test_fairness_claim_of_another_process_is_waited_for():
    data = tmpdir()
    with Server("server5.lua", data=data) as s:
        eq(s.result("simple-storage", [{}]), {"requests": 1})
        # Another process (id 7) is owed the next commit for 300 ms.
        with open(os.path.join(data, "global.claim"), "w") as f:
            f.write("7 %d\n" % int((time.time() + 0.3) * 1000))
        t0 = time.time()
        eq(s.result("simple-storage", [{}]), {"requests": 2}, "waits, then commits")
        check(0.25 < time.time() - t0 < 2, "held off until the claim expired")


COLD = os.path.join(SCRIPTS, "cold.lua")
COLD_METHODS = ["in_sort", "in_gsub", "in_tostring", "in_coroutine", "in_sort_caught"]


def test_first_scope_touch_inside_a_c_callback_works_on_a_cold_process():
    data = tmpdir()
    for i, method in enumerate(COLD_METHODS):
        with Server(COLD, data=data) as s:  # a fresh process: nothing loaded
            eq(s.result(method), 2 * i + 1, "%s on a cold process" % method)
            eq(s.result(method), 2 * i + 2, "%s on a warm one" % method)
    with Server(COLD, data=data) as s:
        eq(s.result("read_in_sort"), 2 * len(COLD_METHODS), "a read-only one, cold")


def test_scope_touched_in_a_c_callback_after_its_load_failed():
    data = tmpdir()
    with Server(COLD, data=data) as s:
        eq(s.result("in_sort"), 1)
    # A corrupt log refuses the scope (-32002); once repaired, the next cold touch loads it.
    path = glob.glob(os.path.join(data, "*.log"))[0]
    with open(path, "rb") as f:
        good = f.read()
    with open(path, "wb") as f:
        f.write(good[:8] + bytes(b ^ 0xFF for b in good[8:16]) + good[16:] + good)
    with Server(COLD, data=data) as s:
        r = s.rpc("in_sort")
        eq(r["error"]["code"], -32002, "the load failed")
        with open(path, "wb") as f:
            f.write(good)
        eq(s.result("in_sort"), 2, "loaded from inside the comparator after the failure")


def test_lua_out_of_memory_at_every_step_of_a_commit():
    """Fails the N-th Lua allocation (then a few more) from inside a write call, for every N
    up to past the end of the call: the process stays up, a call that fails says -32603 (or
    that the scope is unavailable) and commits nothing, every acknowledged call is committed,
    and later calls work."""
    data = tmpdir()
    env = {"MPH_TEST_LUA_ALLOC_FAIL": "1"}
    acked = 0
    with Server(os.path.join(SCRIPTS, "oom.lua"), data=data, env=env) as s:
        for count in (1, 4):
            for skip in range(0, 120, 1 if count == 1 else 3):
                r = s.rpc("incr", [skip, count])
                if "result" in r:
                    acked += 1
                    eq(r["result"]["n"], acked, "skip %d: acknowledged in order" % skip)
                else:
                    check(r["error"]["code"] in (-32603, -32002), r)
                # What is left of the window may hit the next calls: disarm, retrying.
                for _ in range(count + 1):
                    if "result" in s.rpc("disarm"):
                        break
                got = None
                for _ in range(count + 1):
                    got = s.rpc("get")
                    if "result" in got:
                        break
                eq(got["result"].get("n"), acked or None, "skip %d: nothing half-committed" % skip)
                hist = got["result"].get("hist") or [{"n": None}]
                eq(hist[-1]["n"], acked or None, "skip %d: history" % skip)
        check(s.alive(), "the process stays up")
        check(acked > 0, "some calls succeeded")
    with Server(os.path.join(SCRIPTS, "oom.lua"), data=data) as s:
        eq(s.result("get")["n"], acked, "on disk: exactly the acknowledged calls")
