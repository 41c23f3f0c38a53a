"""Local security (docs/security.md): what another user of the machine
can do to a deployment, tried as that user (`setpriv` to nobody when the suite runs as root),
and what a deployment must never show: secrets in command lines, lines of a client's making in
its log."""
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from harness import (EXAMPLES, SCRIPTS, RedisServer, Server, TestFailure, check, deployment_file,
                     eq, free_port, run, tmpdir, wait_until)
from test_ops import get
from test_security_files import as_nobody
from test_scope import wait_log
from test_workers import started, status

TOPOLOGIES = os.path.join(SCRIPTS, "topologies.lua")
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def as_root():
    if os.geteuid() != 0:
        raise TestFailure("this test acts as another user: run the suite as root")


def cmdlines(pid):
    """The command lines of pid and of every process below it, as ps shows them to anyone."""
    out = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open("/proc/%d/cmdline" % p, "rb") as f:
                out.append(f.read())
            with open("/proc/%d/task/%d/children" % (p, p)) as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def test_a_redis_password_in_the_url_is_in_no_command_line_log_or_status():
    secret = "s3cr3t-Pa55"
    with RedisServer(password=secret) as r:
        with Server("server5.lua", ["--storage=" + r.url(), "--workers=2"]) as s:
            started(s, 2)
            eq(s.result("simple-storage", [{}]), {"requests": 1}, "the workers reach Redis")
            eq(s.result("simple-storage", [{}]), {"requests": 2})
            lines = cmdlines(s.proc.pid)
            eq(len(lines), 3, "the supervisor and its 2 workers")
            # Under valgrind, /proc shows valgrind's own command line, not the one mphost
            # edits; the rest of the test still holds there.
            for line in lines if not os.environ.get("MPH_VALGRIND") else ():
                check(secret.encode() not in line, "the password in a command line: %r" % line)
                check(b"redis://127.0.0.1:%d" % r.port in line, line)
            line, _ = status(s)
            check(secret not in line, line)
            check(secret not in s.read_log(), "the password in the log")
            code, _, body = get(s, "/metrics")
            eq(code, 200)
            check(secret not in body, "the password in /metrics")
            # The workers hold it only in their environment, which only our user can read.
            for w in glob.glob("/proc/%d/task/%d/children" % (s.proc.pid, s.proc.pid)):
                for pid in open(w).read().split():
                    eq(os.stat("/proc/%s/environ" % pid).st_mode & 0o077, 0, "environ mode")
        # A deployment (deploy forks, then serves): the same.
        state, data = tmpdir(), tmpdir()
        env = {"MP_STATE_DIR": state}
        port = s.port
        rc, out, err = run([os.path.join(EXAMPLES, "server5.lua"), "--port=%d" % port,
                            "--data=" + data, "--storage=" + r.url()], env=env)
        eq(rc, 0, "deploy: " + err)
        try:
            pidfile = deployment_file(state, os.path.join(EXAMPLES, "server5.lua"), port, ".pid")
            pid = int(open(pidfile).read().split()[0].split("=")[-1])
            for line in cmdlines(pid):  # (deploy runs no valgrind)
                check(secret.encode() not in line, "the password in a command line: %r" % line)
        finally:
            rc, out, err = run([os.path.join(EXAMPLES, "server5.lua"), "delete",
                                "--port=%d" % port], env=env)
            eq(rc, 0, "delete: " + err)


def test_a_bad_url_with_a_password_is_refused_without_showing_it():
    rc, out, err = run([os.path.join(EXAMPLES, "server5.lua"), "serve", "--port=1",
                        "--storage=redis://:hunter2@127.0.0.1:notaport"])
    eq(rc, 1)
    check("hunter2" not in out + err, err)
    check("invalid Redis port in redis://127.0.0.1:notaport" in err, err)


FORGER = """
local mp = require("metaparticle")
mp.service("echo-error", function(text)
  print("printed: " .. text)
  mp.log.warn("logged: " .. text)
  io.write("written: ", text, "\\n")
  io.stderr:write("to stderr: " .. text .. "\\n")
  error("raised: " .. text)
end).expose = true
mp.serve()
"""


def test_client_text_cannot_forge_a_log_line():
    script = os.path.join(tmpdir(), "forger.lua")
    with open(script, "w") as f:
        f.write(FORGER)
    forged = "x\n2026-01-01T00:00:00.000Z error FORGED\r\x1b[2J\x9b\x7ftail"  # \x9b: C1 CSI
    with Server(script) as s:
        r = s.rpc("echo-error", [forged])
        eq(r["error"]["code"], -32000)
        eq(r["error"]["message"], "raised: " + forged, "the client still gets its text back")
        wait_log(s, "raised: x")
        log = s.read_log()
        lines = log.splitlines()
        check(not any(l.startswith("2026-01-01T00:00:00.000Z") for l in lines), log[-1500:])
        check("\x1b" not in log and "\r" not in log and "\x9b" not in log, "raw escapes: %r" %
              log[-500:])
        for what in ("printed", "logged", "raised"):
            mine = [l for l in lines if (what + ": x") in l]
            eq(len(mine), 1, "one line for %s" % what)
            check("\\n2026-01-01T00:00:00.000Z error FORGED\\r\\x1b[2J\\xc2\\x9b\\x7ftail" in mine[0],
                  "escaped: %r" % mine[0])
        # io.write and io.stderr log each line they write, escaped, as the handler's.
        for what in ("written", "to stderr"):
            eq(len([l for l in lines if l.endswith("lua: %s: x" % what)]), 1, "one line for " + what)
        rest = [l for l in lines if "lua: 2026-01-01T00:00:00.000Z error FORGED" in l]
        eq(len(rest), 2, "the text after the newline, on a line of its own: %r" % rest)
        for line in rest:
            check(line.endswith("FORGED\\r\\x1b[2J\\xc2\\x9b\\x7ftail"), "escaped: %r" % line)


def test_another_user_taking_the_tmp_state_dir_first_stops_no_deployment():
    """Without MP_STATE_DIR and XDG_RUNTIME_DIR the state directory is $HOME/.mphost, a name
    nobody else can take first; /tmp/mphost-UID, which another user can, only serves a user
    without a home of its own (and is then refused, as any directory of another uid is)."""
    as_root()
    tmp_name = "/tmp/mphost-%d" % os.geteuid()
    kept = tmp_name + ".kept-by-test-%d" % os.getpid()
    if os.path.exists(tmp_name):  # ours, from an earlier run: put back afterwards
        os.rename(tmp_name, kept)
    try:
        # Another user takes the name first, open to all, as a squatter would.
        rc, out = as_nobody("mkdir", "-m", "777", tmp_name)
        eq(rc, 0, "nobody makes %s: %s" % (tmp_name, out))
        home = tmpdir()
        os.chmod(home, 0o700)
        env = {k: v for k, v in os.environ.items() if k not in ("MP_STATE_DIR", "XDG_RUNTIME_DIR")}
        port = free_port()
        script = os.path.join(EXAMPLES, "server1.lua")
        rc, out, err = run([script, "--port=%d" % port], env=dict(env, HOME=home))
        eq(rc, 0, "deploy with another user's %s: %s" % (tmp_name, err))
        try:
            check(any(n.endswith(".pid") for n in os.listdir(os.path.join(home, ".mphost"))),
                  "its pid file is in $HOME/.mphost")
            rc, out, err = run([script, "status", "--port=%d" % port], env=dict(env, HOME=home))
            eq(rc, 0, "status: " + out + err)
        finally:
            rc, out, err = run([script, "delete", "--port=%d" % port], env=dict(env, HOME=home))
        eq(rc, 0, "delete: " + err)
        eq(os.listdir(tmp_name), [], "nothing written into the squatter's directory")
        # Without a home of its own, /tmp/mphost-UID it is: another uid's, so refused.
        rc, out, err = run([script, "--port=%d" % port], env=dict(env, HOME="/nonexistent"))
        eq(rc, 1, "deploy without a home")
        check(tmp_name in err and "belongs to uid" in err, err)
    finally:
        shutil.rmtree(tmp_name, ignore_errors=True)
        if os.path.exists(kept):
            os.rename(kept, tmp_name)


def test_socket_names_squatted_by_another_user_stop_nothing():
    """Another user binds the abstract names mphost once used for the sockets of a deployment's
    generations to come (made of the supervisor's pid, the generation and the worker id):
    reloads and a worker's restart still work, because mphost's sockets are files in its own
    0700 directory."""
    as_root()
    with Server(TOPOLOGIES) as s:
        started(s, 3)
        squatter = subprocess.Popen(NOBODY + [sys.executable, "-c", SQUATTER, str(s.proc.pid)],
                                    stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
        try:
            eq(squatter.stdout.readline().strip(), "bound 9", "the squatter holds the names")
            eq(s.result("by-key", [1]), {"key": 1, "worker": 2})
            for n in (2, 3):
                rc, out, err = run([s.script, "reload", "--port=%d" % s.port],
                                   env={"MP_STATE_DIR": s.state})
                eq(rc, 0, "reload %d: %s" % (n, err))
                eq(s.result("by-key", [2]), {"key": 2, "worker": 3}, "after reload %d" % n)
            _, workers = status(s)
            os.kill(workers[2], signal.SIGKILL)
            wait_until(lambda: status(s)[1].get(2, workers[2]) != workers[2], "worker 2 back")
            wait_until(lambda: s.rpc("by-key", [1]).get("result") == {"key": 1, "worker": 2},
                       "calls reach the new worker 2")
            sockets = deployment_file(s.state, s.script, s.port, ".sockets")
            eq(os.stat(sockets).st_mode & 0o777, 0o700, "the socket directory's mode")
            probe = subprocess.run(NOBODY + [sys.executable, "-c",
                                             "import os,sys; os.listdir(sys.argv[1])", sockets],
                                   capture_output=True)
            check(probe.returncode != 0, "another user lists the socket directory")
        finally:
            squatter.kill()
            squatter.wait()
    eq(os.path.exists(sockets), False, "the socket directory is removed at the stop")


SQUATTER = r"""
import socket, sys
held = []
pid = int(sys.argv[1])
for gen in (2, 3, 4):
    for worker in (1, 2, 3):
        s = socket.socket(socket.AF_UNIX)
        s.bind("\0mphost.%d.%d.%d" % (pid, gen, worker))
        s.listen(1)
        held.append(s)
print("bound", len(held), flush=True)
sys.stdin.read()
"""


def test_refused_local_clients_are_logged_at_most_once_per_period():
    """Root can still reach a socket in the directory of a deployment that runs as nobody; its
    connections are refused, and a flood of them writes one log line, not one each."""
    as_root()
    top = tmpdir()
    os.chmod(top, 0o755)
    state, data = os.path.join(top, "state"), os.path.join(top, "data")
    for d in (state, data):
        os.mkdir(d, 0o700)
        shutil.chown(d, "nobody", "nogroup")
    with Server(TOPOLOGIES, state=state, data=data, prefix_cmd=NOBODY) as s:
        wait_log(s, "3 workers, storage")  # (status, run as root, would refuse nobody's state)
        peer = os.path.join(deployment_file(state, s.script, s.port, ".sockets"), "g1.w2")
        for _ in range(50):
            c = socket.socket(socket.AF_UNIX)
            c.connect(peer)
            c.settimeout(10)
            try:
                c.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
                eq(c.recv(100), b"", "a refused client is closed")
            except (ConnectionResetError, BrokenPipeError):
                pass  # closed with our request unread: refused all the same
            c.close()
        wait_log(s, "refused: pid")
        eq(s.read_log().count("refused: pid"), 1, "refusal lines")
        eq(s.result("by-key", [1]), {"key": 1, "worker": 2}, "serving on")


HANG_AT_LOAD = """
local mp = require("metaparticle")
local f = io.open(os.getenv("MPH_TEST_LOADING"), "w") f:close()  -- the load has begun
while true do end
"""


def processes_running(path):
    """Pids of the processes whose command line names path."""
    found = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            with open(d + "/cmdline", "rb") as f:
                if path.encode() in f.read():
                    found.append(int(d[6:]))
        except OSError:
            pass
    return found


def test_a_deploy_that_does_not_start_in_time_leaves_nothing_running():
    top = tmpdir()
    script = os.path.join(top, "hang.lua")
    with open(script, "w") as f:
        f.write(HANG_AT_LOAD)
    loading = os.path.join(top, "loading")
    env = {"MP_STATE_DIR": os.path.join(top, "state"), "MPH_TEST_LOADING": loading}
    for workers in ("--workers=0", "--workers=2"):
        t0 = time.time()
        rc, out, err = run([script, "--port=%d" % free_port(), "--data=" + top,
                            "--start-timeout=0.5", workers], env=env)
        eq(rc, 1, "deploy fails")
        check(os.path.exists(loading), "the script's load had begun")
        check("did not start within 0.5 s" in err and "stopped it" in err, err)
        check(time.time() - t0 < 20, "deploy returned after %.1f s" % (time.time() - t0))
        eq(processes_running(script), [], "nothing of the deployment runs on")
        rc, out, err = run([script, "status"], env=env)
        check("not running" in out + err, out + err)
        os.unlink(loading)


def test_the_access_log_is_refused_in_a_shared_directory_or_through_a_link():
    victim = os.path.join(tmpdir(), "victim")
    with open(victim, "w") as f:
        f.write("precious\n")
    shared = tmpdir()
    os.chmod(shared, 0o777)
    good = tmpdir()
    os.symlink(victim, os.path.join(good, "linked.log"))
    cases = [(os.path.join(shared, "access.log"), "writable by group or others"),
             (os.path.join(good, "linked.log"), "symbolic link")]
    for path, why in cases:
        rc, out, err = run([os.path.join(EXAMPLES, "server1.lua"), "serve", str(free_port()),
                            "--workers=0", "--access-log=" + path])
        eq(rc, 1, "refused at start: %s" % err)
        check(why in err, err)
        eq(len(err.strip().splitlines()), 1, "one line: %r" % err)
    eq(open(victim).read(), "precious\n", "the link's target is untouched")
    # A new access log is 0600 whatever the umask, and logs.
    path = os.path.join(good, "access.log")
    old = os.umask(0)
    try:
        with Server("server1.lua", ["--access-log=" + path]) as s:
            s.result("simple-service", [{}])
            wait_until(lambda: os.path.getsize(path) > 0, "an access log line")
    finally:
        os.umask(old)
    eq(os.stat(path).st_mode & 0o777, 0o600, "the access log's mode")
