"""Transactional scopes on file storage: write recording, concurrency, crashes, disk errors."""
import glob
import os
import random
import shutil
import struct
import threading
import time
import zlib

from harness import (SCRIPTS, KeepAliveClient, Server, TestFailure, Threads, check, eq,
                     kill9_under_load, tmpdir)

IDIOMS = os.path.join(SCRIPTS, "idioms.lua")
COLLIDE = os.path.join(SCRIPTS, "collide.lua")
FAULT_EXIT = -9  # MPH_TEST_FAULT=POINT:N:crash dies of SIGKILL, as kill -9


def log_size(data):
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(data, "*.log")))


# The file backend's record formats (storage/file.c): 2 has a CRC of its header, 1 had not.

def record(version, entries, fmt=2):
    """entries: [(key, JSON text or None for a deletion)]"""
    payload = struct.pack("<QI", version, len(entries))
    for key, value in entries:
        payload += struct.pack("<I", len(key)) + key.encode()
        if value is None:
            payload += struct.pack("<I", 0xFFFFFFFF)
        else:
            payload += struct.pack("<I", len(value)) + value.encode()
    if fmt == 1:
        return struct.pack("<III", 0x3152504D, len(payload), zlib.crc32(payload)) + payload
    head = struct.pack("<III", 0x3252504D, len(payload), zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def records_of(data):
    """[(offset, size)] of the records of a well-formed log."""
    out, at = [], 0
    while at < len(data):
        magic, plen = struct.unpack_from("<II", data, at)
        size = (16 if magic == 0x3252504D else 12) + plen
        out.append((at, size))
        at += size
    return out


def wait_log(server, text, timeout=60):
    """Waits for a line containing text in the server's log (a generous bound: the events
    waited for take milliseconds; it only stops a test whose event never comes)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in server.read_log():
            return
        check(server.running() or text in server.read_log(),
              "server exited before logging %r: %s" % (text, server.read_log()[-1500:]))
        time.sleep(0.01)
    raise TestFailure("no %r in the log after %ss: %s" % (text, timeout, server.read_log()[-1500:]))


def wait_exit(server, status, timeout=60):
    """Waits for a server that is to die by itself (a test fault), and checks its status."""
    eq(server.proc.wait(timeout), status, "exit status (log: %s)" % server.read_log()[-1500:])
    server.log.close()


def test_values_not_read_since_the_load_behave_as_read_ones():
    """A loaded scope's values stay JSON text until first read (lua/scopes.c, "Cold values"):
    writing, deleting, iterating and reading them, before and after a restart, cannot tell."""
    data = tmpdir()
    with Server(IDIOMS, data=data) as s:
        for k in ("a", "b", "c", "d"):
            eq(s.result("set", [k, {"v": k}]), True)
    with Server(IDIOMS, data=data) as s:  # every value cold
        eq(s.result("set", ["a", 2]), True, "written, never read")
        eq(s.result("del", ["b"]), True, "deleted, never read")
        eq(s.result("keys"), ["a", "c", "d"], "pairs: a written, c and d still cold")
        eq(s.result("get", ["c"]), {"v": "c"}, "read: decoded now")
        eq(s.result("get", ["b"]), None)
        eq(s.result("set", ["e", [1, 2]]), True)
        expected = {"a": 2, "c": {"v": "c"}, "d": {"v": "d"}, "e": [1, 2]}
        eq(s.result("dump"), expected)
    with Server(IDIOMS, data=data) as s:
        eq(s.result("dump"), expected, "after another restart")


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
    """clients threads x calls each over keep-alive; returns the list of counts seen. Any
    error, reset or bad status in any client fails the call (Threads.join raises it)."""
    counts = []
    lock = threading.Lock()

    def worker():
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

    threads = Threads()
    for _ in range(clients):
        threads.start(worker)
    threads.join()
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

        threads = Threads()
        threads.start(run_on, "a", a)
        threads.start(run_on, "b", b)
        threads.join()
        counts = results["a"] + results["b"]
        eq(len(counts), 1600)
        eq(sorted(counts), list(range(1, 1601)), "two processes never lose an update")
        eq(a.result("simple-storage", [{}]), {"requests": 1601})
        eq(b.result("simple-storage", [{}]), {"requests": 1602})
    finally:
        a.stop()
        b.stop()


def test_a_lock_kept_for_a_retry_that_does_not_commit_is_given_back():
    # A commit that conflicts keeps the scope's lock for its retry. When the retry commits
    # nothing (here its re-run raises), the lock must still go back, or the other process
    # would wait on it forever.
    data = tmpdir()
    swap = os.path.join(SCRIPTS, "swap.lua")
    a = Server(swap, data=data).start()
    b = Server(swap, data=data).start()
    try:
        eq(a.result("swap", [0, 1]), 1)
        eq(b.result("swap", [1, 2]), 2)  # b loads n = 1; a still has 1 in memory
        r = a.rpc("swap", [1, 3])  # runs on 1, conflicts, re-runs on 2 and raises
        eq(r["error"]["code"], -32000, "the re-run's error")
        check("n is 2, not 1" in r["error"]["message"], r)
        started = time.monotonic()
        eq(b.result("swap", [2, 4]), 4)  # a's kept lock is given back: b commits
        check(time.monotonic() - started < 10, "b waited %.1f s" % (time.monotonic() - started))
        r = a.rpc("swap", [2, 5])  # a caught up to 2 only: the same again, on 4
        check("n is 4, not 2" in r["error"]["message"], r)
        eq(b.result("swap", [4, 6]), 6)
        eq(b.result("get"), 6)
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
        acked += kill9_under_load(s, 8, random.randint(20, 300))
    s = Server("server5.lua", data=data).start()
    final = s.result("simple-storage", [{}])["requests"] - 1
    s.stop()
    eq(len(set(acked)), len(acked), "every acknowledged count is distinct")
    check(final >= len(acked), "final count %d >= acknowledged calls %d" % (final, len(acked)))
    check(final >= max(acked), "no acknowledged count was rolled back")


def commits(data, n):
    """n calls of simple-storage on a fresh server over data; returns the log's bytes."""
    with Server("server5.lua", data=data) as s:
        for i in range(n):
            eq(s.result("simple-storage", [{}]), {"requests": i + 1})
    with open(os.path.join(data, "global.log"), "rb") as f:
        return f.read()


def test_torn_or_zero_filled_tail_is_cut_and_acknowledged_commits_served():
    # What a crash or a power cut can leave after the last acknowledged commit: a prefix of a
    # record, zeros (the size grew, the data did not make it), or both.
    for name, tail in [("half a record", lambda r: r[:len(r) // 2]),
                       ("a header alone", lambda r: r[:16]),
                       ("zeros", lambda r: b"\0" * 4096),
                       ("half a record, then zeros", lambda r: r[:len(r) // 2] + b"\0" * 300)]:
        data = tmpdir()
        good = commits(data, 5)
        log = os.path.join(data, "global.log")
        with open(log, "ab") as f:
            f.write(tail(record(6, [("requests", "6")])))
        with Server("server5.lua", data=data) as s:
            eq(s.result("simple-storage", [{}]), {"requests": 6}, name + ": all 5 served")
            check("cutting" in s.read_log(), name + ": the cut is logged")
        with open(log, "rb") as f:
            after = f.read()
        check(after.startswith(good), name + ": acknowledged records untouched")
        eq(len(records_of(after)), 6, name + ": the tail was cut, one new record appended")


def test_damaged_record_before_valid_ones_is_refused_and_left_alone():
    # One flipped bit in the 3rd of 6 records: in its length (which once read as a torn
    # tail and cut every later commit), in its payload, in its magic.
    for name, where in [("length", 5), ("payload", 30), ("magic", 0), ("header crc", 13)]:
        data = tmpdir()
        commits(data, 6)
        log = os.path.join(data, "global.log")
        with open(log, "rb") as f:
            good = bytearray(f.read())
        offset = records_of(bytes(good))[2][0]
        good[offset + where] ^= 0x10
        with open(log, "wb") as f:
            f.write(good)
        with Server("server5.lua", data=data) as s:
            for _ in range(2):
                r = s.rpc("simple-storage", [{}])
                eq(r["error"]["code"], -32002, name)
                msg = r["error"]["message"]
                check("corrupt log %s at byte %d" % (os.path.realpath(log), offset) in msg,
                      "%s: names file and offset: %s" % (name, msg))
            check(s.alive(), "the process stays up")
        with open(log, "rb") as f:
            eq(f.read(), bytes(good), name + ": the file is untouched")


def test_a_damaged_snapshot_is_refused_naming_file_and_offset():
    snap = record(3, [("requests", "3")])
    data = tmpdir()
    with open(os.path.join(data, "global.snap"), "wb") as f:
        f.write(snap)
    with Server("server5.lua", data=data) as s:
        eq(s.result("simple-storage", [{}]), {"requests": 4}, "a sound snapshot loads")
    flipped = bytearray(snap)
    flipped[30] ^= 0x10
    for name, content, offset in [("a flipped bit", bytes(flipped), 0),
                                  ("bytes after its record", snap + b"junk", len(snap))]:
        data = tmpdir()
        path = os.path.join(data, "global.snap")
        with open(path, "wb") as f:
            f.write(content)
        with Server("server5.lua", data=data) as s:
            r = s.rpc("simple-storage", [{}])
            eq(r.get("error", {}).get("code"), -32002, name)
            check("corrupt snapshot %s at byte %d" % (os.path.realpath(path), offset)
                  in r["error"]["message"], "%s: %s" % (name, r["error"]["message"]))
            check(s.alive(), "the process stays up")
        with open(path, "rb") as f:
            eq(f.read(), content, name + ": the file is untouched")


def test_version_0_1_log_still_loads():
    data = tmpdir()
    with open(os.path.join(data, "global.log"), "wb") as f:
        for v in range(1, 4):
            f.write(record(v, [("requests", str(v))], fmt=1))
    with Server("server5.lua", data=data) as s:
        eq(s.result("simple-storage", [{}]), {"requests": 4})
    with Server("server5.lua", data=data) as s:
        eq(s.result("simple-storage", [{}]), {"requests": 5}, "old and new records together")


def test_log_shorter_than_what_was_read_is_refused():
    data = tmpdir()
    with Server("server5.lua", data=data) as s:
        for _ in range(3):
            s.result("simple-storage", [{}])
        log = os.path.join(data, "global.log")
        os.truncate(log, records_of(open(log, "rb").read())[1][0])  # someone cut records
        r = s.rpc("simple-storage", [{}])
        eq(r["error"]["code"], -32002)
        check("bytes of records were read" in r["error"]["message"], r)


def test_unwritable_data_directory_gives_32002():
    parent = tmpdir()  # ours to open up, so that nobody can reach the data directory
    data = os.path.join(parent, "data")
    os.mkdir(data)
    os.chmod(data, 0o555)
    # Root ignores permission bits, so the server runs as nobody, in a directory of its own
    # (one of another uid is refused at start: test_security_files.py).
    prefix = []
    if os.geteuid() == 0:
        shutil.chown(data, "nobody")
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
        wait_log(a, "file: compacted global")
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


def compacting_server(data, fault, args=()):
    """IDIOMS with compaction from 100 kB of log, and a test fault."""
    gate = os.path.join(tmpdir(), "gate")
    return Server(IDIOMS, list(args), data=data,
                  env={"MPH_TEST_COMPACT_MIN": "100000", "MPH_TEST_FAULT": fault,
                       "MPH_TEST_GATE": gate}), gate


def test_commits_go_on_while_a_compaction_runs():
    data = tmpdir()
    s, gate = compacting_server(data, "compact.snap.write:1:hold")
    with s:
        expected = {}
        i = 0
        while "hold at compact.snap.write" not in s.read_log():
            check(i < 50, "a compaction started")
            expected["k%d" % (i % 3)] = str(i) + "x" * 20000
            eq(s.result("big", ["k%d" % (i % 3), 20000, str(i)]), True)
            i += 1
        # The compaction has read the log and waits before writing its snapshot: every
        # commit now must be answered without it.
        for j in range(i, i + 10):
            expected["k%d" % (j % 4)] = str(j) + "x" * 20000
            eq(s.result("big", ["k%d" % (j % 4), 20000, str(j)]), True)
        check("file: compacted" not in s.read_log() and "released" not in s.read_log(),
              "ten commits answered while the compaction was held")
        open(gate, "w").close()
        wait_log(s, "file: compacted global")
        for k, v in expected.items():
            eq(s.result("get", [k]), v, k)
        eq(s.result("big", ["after", 10, "a"]), True, "commits after the switch")
    check(os.path.getsize(os.path.join(data, "global.log")) < 250000, "the log was replaced")
    with Server(IDIOMS, data=data) as s:
        for k, v in expected.items():
            eq(s.result("get", [k]), v, k + " after a restart")
        eq(s.result("get", ["after"]), "a" + "x" * 10)


COMPACTION_STEPS = ["compact.snap.write", "compact.snap.sync", "compact.snap.rename",
                    "compact.snap.dirsync", "compact.log.write", "compact.log.sync",
                    "compact.log.rename", "compact.log.dirsync", "compact.done"]


def fill_until_exit(s, acked):
    """Commits big values until the server dies; returns the call that was cut, if any."""
    for i in range(200):
        key, tag = "k%d" % (i % 4), str(i)
        try:
            r = s.rpc("big", [key, 20000, tag], timeout=60)
        except (OSError, TestFailure):
            return key, tag  # cut by the crash: its outcome is unknown
        if "error" in r:
            raise TestFailure("error before the crash: %r" % r["error"])
        acked[key] = tag
    raise TestFailure("the server never crashed")


def test_crash_at_every_step_of_compaction_loses_nothing():
    for step in COMPACTION_STEPS:
        data = tmpdir()
        # One process (--workers=0): the crash ends the server, which the test then restarts
        # on the data; a supervisor would start a worker that crashes there again.
        s, _ = compacting_server(data, step + ":1:crash", ["--workers=0"])
        s.start()
        acked = {}
        cut = fill_until_exit(s, acked)
        wait_exit(s, FAULT_EXIT)
        check("test fault: crash at " + step in s.read_log(), step + ": crashed there")
        with Server(IDIOMS, data=data) as r:
            for k, tag in acked.items():
                got = r.result("get", [k])
                ok = got == tag + "x" * 20000 or (cut[0] == k and got == cut[1] + "x" * 20000)
                check(ok, "%s: %s is the acknowledged value (or the cut call's), not %r" %
                      (step, k, (got or "")[:10]))
            eq(r.result("big", ["new", 5, "n"]), True, step + ": commits go on")
        with Server(IDIOMS, data=data) as r:
            eq(r.result("get", ["new"]), "nxxxxx", step + ": and survive a restart")


def test_failure_at_every_step_of_compaction_keeps_the_log():
    for step in COMPACTION_STEPS[:-1]:
        data = tmpdir()
        s, _ = compacting_server(data, step + ":1:fail")
        with s:
            expected = {}
            for i in range(12):  # 240 kB: the compaction starts (and fails) on the way
                expected["k%d" % (i % 4)] = str(i) + "x" * 20000
                eq(s.result("big", ["k%d" % (i % 4), 20000, str(i)]), True)
            wait_log(s, "compaction of global failed")
            check("test fault: fail at " + step in s.read_log(), step)
            for k, v in expected.items():
                eq(s.result("get", [k]), v, step + ": " + k)
        with Server(IDIOMS, data=data) as s:
            for k, v in expected.items():
                eq(s.result("get", [k]), v, step + ": " + k + " after a restart")
            check(s.alive(), step)


def test_failed_compaction_backs_off_until_the_log_grows():
    # A compaction that fails (a full disk, say) is not tried again at every commit: only once
    # the log has grown by another compaction threshold (100 kB here).
    data = tmpdir()
    s, _ = compacting_server(data, "compact.snap.write:1:fail", ["--logging=debug"])
    with s:
        i = 0
        while "compaction of global failed" not in s.read_log():
            check(i < 50, "a compaction started and failed")
            eq(s.result("big", ["k%d" % (i % 3), 20000, str(i)]), True)
            i += 1
        wait_log(s, "compaction of global failed")
        for j in range(3):  # 60 kB more: below the next threshold
            eq(s.result("big", ["k%d" % (j % 3), 20000, "b%d" % j]), True)
        eq(s.read_log().count("file: compacting global"), 1, "no new try yet")
        for j in range(4):  # 80 kB more: past it
            eq(s.result("big", ["k%d" % (j % 3), 20000, "c%d" % j]), True)
        wait_log(s, "file: compacted global")
        eq(s.read_log().count("file: compacting global"), 2, "one more try, which worked")


def test_storage_faults_in_a_commit():
    # (fault, answers of 4 calls of simple-storage: a count or an error code, count after a
    # restart). A failed append is taken back, so the next commit reuses its version.
    cases = [
        ("append.write:2:fail", [1, -32002, 2, 3], 4),
        ("append.sync:2:fail", [1, -32002, 2, 3], 4),
        # The directory entry of a new log must be durable before anything in it is
        # acknowledged: a failed directory fsync is tried again by the next call.
        ("open.dirsync:1:fail,open.dirsync:2:fail", [-32002, -32002, 1, 2], 3),
    ]
    for fault, answers, after in cases:
        data = tmpdir()
        with Server("server5.lua", data=data, env={"MPH_TEST_FAULT": fault}) as s:
            got = []
            for _ in answers:
                r = s.rpc("simple-storage", [{}])
                got.append(r["result"]["requests"] if "result" in r else r["error"]["code"])
            eq(got, answers, fault)
            check(s.alive(), fault)
        with Server("server5.lua", data=data) as s:
            eq(s.result("simple-storage", [{}]), {"requests": after}, fault + ", restarted")


def test_failed_take_back_refuses_the_scope():
    # After a failed fdatasync the record's fate on disk is unknown; if it cannot even be
    # taken back, the scope is refused (a clear -32002), never served on unknown data.
    for fault in ["append.sync:2:fail,takeback.truncate:1:fail",
                  "append.sync:2:fail,takeback.sync:1:fail"]:
        data = tmpdir()
        with Server("server5.lua", data=data, env={"MPH_TEST_FAULT": fault}) as s:
            eq(s.result("simple-storage", [{}]), {"requests": 1})
            for _ in range(3):
                r = s.rpc("simple-storage", [{}])
                eq(r["error"]["code"], -32002, fault)
                check("refuses the scope until it restarts" in r["error"]["message"], r)
            check(s.alive(), fault)
        with Server("server5.lua", data=data) as s:
            # The unacknowledged commit may or may not be there; the acknowledged one is.
            n = s.result("simple-storage", [{}])["requests"]
            check(n in (2, 3), "%s: restarted at %d" % (fault, n))


def test_failure_to_cut_a_torn_tail_is_reported_then_retried():
    data = tmpdir()
    commits(data, 2)
    with open(os.path.join(data, "global.log"), "ab") as f:
        f.write(record(3, [("requests", "3")])[:20])
    with Server("server5.lua", data=data, env={"MPH_TEST_FAULT": "cut.sync:1:fail"}) as s:
        r = s.rpc("simple-storage", [{}])
        eq(r["error"]["code"], -32002)
        check("cannot cut the torn tail" in r["error"]["message"], r)
        eq(s.result("simple-storage", [{}]), {"requests": 3})


def test_retries_exhausted_gives_32001_and_writes_nothing():
    for retries in (1, 3):
        data = tmpdir()
        records = tmpdir()
        log = os.path.join(data, "global.log")
        # Another writer's commits, appended by the handler itself before it returns, so
        # that every commit of the call's own writes finds the scope moved on.
        for v in range(1, 10):
            with open(os.path.join(records, str(v)), "wb") as f:
                f.write(record(v, [("other", str(v))]))
        with Server(COLLIDE, ["--max-retries=%d" % retries], data=data) as s:
            eq(s.result("get", ["other"]), None)  # loads the empty scope, version 0
            r = s.rpc("collide", [log, records])
            eq(r["error"]["code"], -32001, "retries=%d" % retries)
            check("gave up after %d attempts" % (retries + 1) in r["error"]["message"], r)
            eq(s.result("runs"), retries + 1, "the first run and one per retry")
            eq(s.result("get", ["mine"]), None, "nothing of the call in memory")
            eq(s.result("get", ["other"]), retries + 1, "the other writer's commits are")
        with open(log, "rb") as f:
            body = f.read()
        eq(len(records_of(body)), retries + 1, "only the other writer's records")
        check(b"mine" not in body, "nothing of the call on disk")
        with Server(COLLIDE, data=data) as s:
            eq(s.result("get", ["mine"]), None)
            eq(s.result("get", ["other"]), retries + 1)


def counter_call_held_by_claim(server, data):
    """Starts a counter call (server5, --logging=debug) while another process (id 7) holds a
    claim on the global scope, for longer than a test runs, and waits until the call is held
    off by it. Returns (the list its result goes to, release): release removes the claim (the
    claimant committed, or its claim expired) and waits for the call."""
    claim = os.path.join(data, "global.claim")
    with open(claim, "w") as f:
        f.write("7 %d\n" % int((time.time() + 600) * 1000))
    result = []
    call = Threads()  # a call that fails (an error, a reset) fails the test at release()
    call.start(lambda: result.append(server.result("simple-storage", [{}])))
    wait_log(server, "held off by the claim of committer 7")

    def release():
        os.unlink(claim)
        call.join(60)  # generous: the commit lands within a few milliseconds of the unlink

    return result, release


def test_fairness_claim_of_another_process_is_waited_for():
    data = tmpdir()
    with Server("server5.lua", ["--logging=debug"], data=data) as s:
        eq(s.result("simple-storage", [{}]), {"requests": 1})
        result, release = counter_call_held_by_claim(s, data)
        check(not result, "not answered while the claim stands")
        release()
        eq(result, [{"requests": 2}], "then it commits")


def test_a_claim_met_after_the_log_was_replaced_keeps_the_scope():
    """The log replaced under a process (a compaction elsewhere; here a copy renamed over it,
    same records, new inode) makes its next commit read the scope whole; when nothing had
    changed and another process's claim holds the scope, the refusal must not report an
    empty whole document: the process would take the scope for empty and count from 0."""
    data = tmpdir()
    with Server("server5.lua", ["--logging=debug"], data=data) as s:
        for n in (1, 2, 3):
            eq(s.result("simple-storage", [{}]), {"requests": n})
        log = os.path.join(data, "global.log")
        shutil.copy(log, log + ".copy")
        os.rename(log + ".copy", log)
        result, release = counter_call_held_by_claim(s, data)
        release()
        eq(result, [{"requests": 4}], "counted on from 3")
    with Server("server5.lua", data=data) as s:
        eq(s.result("simple-storage", [{}]), {"requests": 5})


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
    # One process with the default time limit, so LuaJIT's compiler is off: the host's own
    # handling of a failed allocation is what is tested here. With the compiler on, this
    # LuaJIT (2.1-20230119) itself sometimes crashes when an allocation fails inside compiled
    # code (README, "Limits": the worker is then replaced).
    with Server(os.path.join(SCRIPTS, "oom.lua"), ["--workers=0"], data=data, env=env) as s:
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
