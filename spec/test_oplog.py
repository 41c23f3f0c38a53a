"""Operations: the access log (--access-log) and its rotation by SIGUSR1, `mphost list`,
`mphost SCRIPT logs [-f]`, and systemd's readiness notification."""
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time

from harness import (EXAMPLES, MPHOST, SCRIPTS, KeepAliveClient, Server, check, eq, free_port,
                     http_exchange, run, tmpdir, wait_until)

RPC = os.path.join(SCRIPTS, "rpc.lua")

# time client method(s) code status bytes milliseconds
LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (\S+) (\S+) (\S+) (\d{3}) (\d+) "
                  r"(\d+\.\d{3})$")


def read_lines(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode().splitlines()
    except FileNotFoundError:
        return []


def wait_lines(paths, n, timeout=30):
    """Waits until the files hold n lines in all (the writer thread writes them soon after
    the answers; the bound only turns a hang into a failure)."""
    deadline = time.time() + timeout
    while True:
        lines = [l for p in paths for l in read_lines(p)]
        if len(lines) >= n or time.time() > deadline:
            return lines
        time.sleep(0.01)




def fields(line):
    m = LINE.match(line)
    check(m is not None, "access log line %r does not have the documented format" % line)
    return m.groups()[1:6]  # client, method(s), code, status, bytes


def check_access_log_format(workers):
    log = os.path.join(tmpdir("mph-alog-"), "access.log")
    with Server(RPC, args=["--access-log=" + log, "--workers=%d" % workers]) as s:
        eq(s.result("echo", [1]), 1, "echo")
        status, body = s.post_raw(json.dumps([
            {"jsonrpc": "2.0", "method": "sum", "params": [1, 2], "id": 1},
            {"jsonrpc": "2.0", "method": "nope", "id": 2},
            {"jsonrpc": "2.0", "method": "raise", "params": ["x"], "id": 3}]),
            headers={"Authorization": "Basic c2VjcmV0OnNlY3JldA=="})
        eq(status, 200, "batch status")
        status, _ = http_exchange(s.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        eq(status, 405, "GET status")
        status, _ = s.post_raw("{not json")
        eq(status, 200, "parse error status")
        status, _ = s.post_raw('{"jsonrpc":"2.0","method":"a b\\nc"}')  # a notification
        eq(status, 204, "notification status")
        lines = wait_lines([log], 5)
        got = [fields(l) for l in lines]
        eq(len(got), 5, "lines: %r" % lines)
        # With workers each process appends its own lines: the order in the file is theirs.
        eq(sorted(g[:4] for g in got), sorted([
            ("127.0.0.1", "echo", "0", "200"),                 # a call
            ("127.0.0.1", "sum,nope,raise", "-32601", "200"),  # a batch
            ("127.0.0.1", "-", "-", "405"),                    # a GET
            ("127.0.0.1", "-", "-32700", "200"),               # a parse error
            ("127.0.0.1", "a?b?c", "-32601", "204")]),         # a method with a space
           "the lines")
        echo = [g for g in got if g[1] == "echo"][0]
        eq(int(echo[4]), len(b'{"jsonrpc":"2.0","id":1,"result":1}\n'), "bytes of the echo")
        text = "\n".join(lines)
        check("c2VjcmV0" not in text and "params" not in text, "credentials or bodies logged")
        s.stop()


def test_access_log_format_one_process():
    check_access_log_format(0)


def test_access_log_format_workers():
    check_access_log_format(2)


def test_access_log_to_stderr_and_bad_file():
    with Server(RPC, args=["--access-log=-", "--workers=0"]) as s:
        s.result("echo", [1])
        wait_until(lambda: any(LINE.match(l) for l in s.read_log().splitlines()),
                   "an access log line on stderr: " + s.read_log()[-1000:])
        s.stop()
    rc, out, err = run([RPC, "serve", "0", "--access-log=/nonexistent/dir/a.log"], timeout=30)
    eq(rc, 1, "exit status with an access log that cannot be opened")
    check("cannot open the access log /nonexistent/dir/a.log" in err, "message: " + err)


def test_rotation_under_load_loses_no_line():
    """logrotate's way: rename the files, then SIGUSR1; 16 clients keep calling throughout.
    Every answered call has its line in the old file or the new one."""
    d = tmpdir("mph-alog-")
    log = os.path.join(d, "access.log")
    s = Server(RPC, args=["--access-log=" + log, "--workers=2"])
    s.env["MPH_LOG_PATH"] = s.log_path  # as deploy runs it: the server log is a file too
    with s:
        answered = [0] * 16
        stop = threading.Event()
        errors = []

        def client(i):
            try:
                c = KeepAliveClient(s.port)
                while not stop.is_set():
                    eq(c.call("echo", [i]).get("result"), i, "echo")
                    answered[i] += 1
                c.close()
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        wait_until(lambda: sum(answered) >= 200, "the load to start")
        os.rename(log, log + ".1")
        os.rename(s.log_path, s.log_path + ".1")
        os.kill(s.proc.pid, signal.SIGUSR1)
        # Both workers write to the new file once they reopened it.
        wait_until(lambda: len(read_lines(log)) >= 100, "100 lines in the new access log")
        wait_until(lambda: s.read_log().count("received SIGUSR1") >= 3,
                   "the supervisor and both workers reopen the server log: " +
                   s.read_log())
        stop.set()
        for t in threads:
            t.join(60)
        check(not errors, "client errors: %r" % errors[:3])
        s.stop()
        total = sum(answered)
        lines = wait_lines([log + ".1", log], total)
        eq(len(lines), total, "lines in the old and new access logs")
        for l in lines:
            eq(fields(l)[1:4], ("echo", "0", "200"), "line " + l)
        check(len(read_lines(log + ".1")) >= 200, "the old file kept its lines")


def deploy(script, port, env, *args):
    rc, out, err = run([script, "--port=%d" % port, "--data=" + tmpdir("mph-data-")] +
                       list(args), env=env)
    eq(rc, 0, "deploy: " + err)


def test_list_shows_live_deployments_not_stale_ones():
    env = {"MP_STATE_DIR": tmpdir("mph-state-")}
    rc, out, err = run(["list"], env=env)
    eq((rc, out, err), (0, "", ""), "list with nothing deployed")
    p1, p2 = free_port(), free_port()
    try:
        deploy(RPC, p1, env)
        deploy(RPC, p2, env, "--workers=2")
        # A pid file left by a process that died without cleaning up is not listed.
        stale = os.path.join(env["MP_STATE_DIR"], "0000000000000000-1.pid")
        with open(stale, "w") as f:
            f.write("pid=999999999\nport=1\nscript=/gone.lua\nstorage=file:/x\nstarted=1\n")
        rc, out, err = run(["list"], env=env)
        eq(rc, 0, "list: " + err)
        lines = sorted(out.splitlines())
        eq(len(lines), 2, "lines: %r" % lines)
        for port, line in zip(sorted([p1, p2]), sorted(lines, key=lambda l: int(
                re.search(r"port (\d+)", l).group(1)))):
            m = re.match(r"^(\S+): port (\d+), pid (\d+), storage file:/\S+, uptime (\d+)s$",
                         line)
            check(m is not None, "list line %r" % line)
            eq((m.group(1), int(m.group(2))), (os.path.realpath(RPC), port), "script and port")
            check(os.path.exists("/proc/%s" % m.group(3)), "the pid runs")
        check(not os.path.exists(stale), "the stale pid file was removed")
    finally:
        run([RPC, "delete"], env=env)
    rc, out, err = run(["list"], env=env)
    eq((rc, out), (0, ""), "list after delete")


def test_logs_prints_and_follows_the_log():
    env = {"MP_STATE_DIR": tmpdir("mph-state-")}
    port = free_port()
    try:
        deploy(RPC, port, env)
        rc, out, err = run([RPC, "logs"], env=env)
        eq(rc, 0, "logs: " + err)
        check("serving" in out, "the log: " + out)
        follow = subprocess.Popen([MPHOST, RPC, "logs", "-f", "--port=%d" % port],
                                  stdout=subprocess.PIPE, env=dict(os.environ, **env))
        got = []  # what -f printed, read by a thread so that every wait has a deadline
        reader = threading.Thread(target=lambda: got.extend(iter(follow.stdout.readline, b"")))
        reader.start()
        try:
            wait_until(lambda: b"serving" in b"".join(got), "logs -f prints the log so far")
            # Lines written after -f started: a reload logs some.
            rc, out, err = run([RPC, "reload"], env=env)
            eq(rc, 0, "reload: " + err)
            wait_until(lambda: b"reload" in b"".join(got),
                       "logs -f prints the reload: %r" % got)
            check(follow.poll() is None, "logs -f still runs")
        finally:
            follow.kill()
            follow.wait()
            reader.join(30)
        # Several deployments: -f needs to know which.
        other = free_port()
        deploy(RPC, other, env)
        rc, out, err = run([RPC, "logs"], env=env)
        eq(rc, 1, "logs with two deployments")
        check("give --port" in err, err)
    finally:
        run([RPC, "delete"], env=env)
    # Stopped: the last log is still there.
    rc, out, err = run([RPC, "logs", "--port=%d" % port], env=env)
    eq(rc, 0, "logs of a stopped deployment: " + err)
    check("stopped" in out, out[-500:])
    rc, out, err = run([RPC, "logs", "--port=1"], env=env)
    eq(rc, 1, "logs of a port never deployed")
    check("no log for" in err, err)
    rc, out, err = run([RPC, "status", "-f"], env=env)
    eq(rc, 1, "-f elsewhere")


def check_sd_notify(workers):
    """systemd's Type=notify, with a Python datagram socket as NOTIFY_SOCKET: READY=1 once the
    port serves, STOPPING=1 at a graceful stop."""
    path = os.path.join(tmpdir("mph-notify-"), "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    try:
        s = Server(RPC, args=["--workers=%d" % workers], env={"NOTIFY_SOCKET": path})
        s.log = open(s.log_path, "ab")
        s.proc = subprocess.Popen(
            [MPHOST, RPC, "serve", str(s.port), "--listen=127.0.0.1", "--data=" + s.data] +
            s.args, stdout=s.log, stderr=s.log, stdin=subprocess.DEVNULL, env=s.env)
        try:
            msg = sock.recv(4096).decode()
            lines = msg.split("\n")
            check("READY=1" in lines, "READY=1 in %r" % msg)
            check(any(l.startswith("STATUS=serving ") for l in lines), "STATUS in %r" % msg)
            # Ready means serving: a call answers at once, without waiting for the port.
            eq(s.result("echo", [7]), 7, "a call right after READY=1")
            s.proc.send_signal(signal.SIGTERM)
            eq(sock.recv(4096).decode(), "STOPPING=1", "at a graceful stop")
            eq(s.proc.wait(30), 0, "exit status")
        finally:
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()
            s.log.close()
    finally:
        sock.close()


def test_sd_notify_ready_and_stopping_workers():
    check_sd_notify(2)


def test_sd_notify_ready_and_stopping_one_process():
    check_sd_notify(0)


def test_example_unit_file():
    """examples/mphost.service is a Type=notify unit for `mphost SCRIPT serve`."""
    with open(os.path.join(EXAMPLES, "mphost.service")) as f:
        unit = f.read()
    for line in ["Type=notify", "ExecStart=/usr/local/bin/mphost /srv/service.lua serve 3000",
                 "ExecReload=/bin/kill -HUP $MAINPID", "KillSignal=SIGTERM", "TimeoutStopSec="]:
        check(line in unit, "%s in the unit" % line)
