"""The mphost command line: deploy, status, delete, call, errors; the embedding example."""
import os
import re
import shutil
import signal
import socket
import subprocess
import time

from harness import (EXAMPLES, MPHOST, ROOT, SCRIPTS, Server, TestFailure, check, deployment_file,
                     embed_serves, eq, free_port, private_network, run, tmpdir, wait_port,
                     wait_until)


def workspace():
    """A scratch working directory with examples/ reachable as in the walkthrough."""
    d = tmpdir("mph-cwd-")
    os.symlink(EXAMPLES, os.path.join(d, "examples"))
    return d, {"MP_STATE_DIR": tmpdir("mph-state-")}


def wait_file(path, timeout=30):
    """Waits for path to exist (polling; the bound only turns a hang into a failure)."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        check(time.time() < deadline, "%s did not appear" % path)
        time.sleep(0.01)


def port_closed(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return False
    except OSError:
        return True


def shell(cmd, cwd, env):
    full = dict(os.environ)
    full.update(env)
    full["PATH"] = os.path.dirname(MPHOST) + ":" + full["PATH"]
    p = subprocess.run(cmd, shell=True, cwd=cwd, env=full, capture_output=True, text=True,
                       timeout=60)
    return p.returncode, p.stdout, p.stderr


@private_network
def test_walkthrough_file_storage_exact_output():
    cwd, env = workspace()
    try:
        rc, out, err = shell("mphost examples/server5.lua", cwd, env)
        eq((rc, out), (0, ""), "deploy (stderr: %s)" % err)
        rc, out, err = shell("mphost call simple-storage", cwd, env)
        eq((rc, out), (0, '{"requests":1}\n'), "first call (stderr: %s)" % err)
        rc, out, err = shell(
            """curl -X POST -d '{"jsonrpc": "2.0", "params":[{}], "method": "simple-storage", """
            """"id": "example"}' -H "Content-Type: application/json" -s localhost:3000/""",
            cwd, env)
        eq(out, '{"jsonrpc":"2.0","id":"example","result":{"requests":2}}\n', "curl output")
        rc, out, err = shell("mphost examples/server5.lua delete", cwd, env)
        eq((rc, out), (0, ""), "delete")
        rc, out, err = shell("mphost examples/server5.lua && mphost call simple-storage", cwd,
                             env)
        eq(out, '{"requests":3}\n', "count survives a restart on file storage")
    finally:
        shell("mphost examples/server5.lua delete", cwd, env)


def test_deploy_status_delete_from_another_directory():
    cwd, env = workspace()
    other = tmpdir("mph-other-")
    port = free_port()
    script = os.path.join(cwd, "examples", "server1.lua")
    try:
        rc, out, err = run(["examples/server1.lua", "--port=%d" % port], env=env, cwd=cwd)
        eq(rc, 0, "deploy: " + err)
        check(wait_port(port, 1), "the port accepts once deploy returns")
        rc, out, err = run([script, "status"], env=env, cwd=other)
        eq(rc, 0, "status exit")
        check("running" in out and "port %d" % port in out and "storage file:/" in out, out)
        rc, out, err = run(["examples/server1.lua", "--port=%d" % port], env=env, cwd=cwd)
        eq(rc, 1, "a second deploy of the same script and port")
        check("already running" in err, err)
        rc, out, err = run([script, "delete"], env=env, cwd=other)
        eq(rc, 0, "delete: " + err)
        check(port_closed(port), "the port is closed once delete returns")
        rc, out, err = run([script, "status"], env=env, cwd=other)
        eq(rc, 3, "status of a stopped deployment")
        check("not running" in out, out)
        rc, out, err = run([script, "delete"], env=env, cwd=other)
        eq(rc, 0)
        check("not running" in err, "delete when nothing runs says so: %r" % err)
    finally:
        run([script, "delete"], env=env)


def test_deploy_errors_are_one_clear_line():
    cwd, env = workspace()
    port = free_port()
    blocker = socket.socket()
    blocker.bind(("0.0.0.0", port))
    blocker.listen(1)
    try:
        rc, out, err = run(["examples/server1.lua", "--port=%d" % port], env=env, cwd=cwd)
        eq(rc, 1, "port in use")  # (run's own timeout turns a hang into a failure)
        check("in use" in err, err)
    finally:
        blocker.close()
    rc, out, err = run([os.path.join(SCRIPTS, "syntax_error.lua"), "--port=%d" % port],
                       env=env, cwd=cwd)
    eq(rc, 1, "syntax error")
    check("script error" in err and "syntax_error.lua:3" in err, err)
    rc, out, err = run([os.path.join(SCRIPTS, "raises_at_load.lua"), "--port=%d" % port],
                       env=env, cwd=cwd)
    eq(rc, 1, "error at load")
    check("this script fails while loading" in err, err)
    rc, out, err = run(["no/such/script.lua"], env=env, cwd=cwd)
    eq(rc, 1, "missing script")
    check("cannot open script" in err, err)
    rc, out, err = run(["examples/server1.lua", "--bogus=1"], env=env, cwd=cwd)
    eq(rc, 1, "unknown flag")
    check("unknown option --bogus" in err, err)
    rc, out, err = run(["examples/server1.lua", "--port=99999"], env=env, cwd=cwd)
    eq(rc, 1, "bad port")
    rc, out, err = run(["examples/server1.lua", "serve", "--storage=ftp"], env=env, cwd=cwd)
    eq(rc, 1, "bad storage")
    check(port_closed(port), "nothing was left running")


def test_help_and_version():
    rc, out, _ = run(["--help"])
    eq(rc, 0)
    check("mphost SCRIPT" in out and "mphost call METHOD" in out, out)
    rc, out, _ = run(["--version"])
    eq(rc, 0)
    check(out.startswith("mphost "), out)


def test_call_exit_codes():
    cwd, env = workspace()
    port = free_port()
    url = "http://127.0.0.1:%d/" % port
    try:
        rc, _, err = run(["examples/server1.lua", "--port=%d" % port], env=env, cwd=cwd)
        eq(rc, 0, err)
        rc, out, err = run(["call", "simple-service", '[{"hello":"world"}]', "--url", url])
        eq((rc, out), (0, '{"request-was":{"hello":"world"}}\n'))
        rc, out, err = run(["call", "simple-service", "--url=" + url])
        eq((rc, out), (0, '{"request-was":{}}\n'), "default params [{}]")
        rc, out, err = run(["call", "no-such-method", "--url", url])
        eq(rc, 1, "a JSON-RPC error")
        eq(out, "")
        check("-32601" in err and "Method not found" in err, err)
        rc, out, err = run(["call", "simple-service", "{not json", "--url", url])
        eq(rc, 1, "bad params")
    finally:
        run(["examples/server1.lua", "delete", "--port=%d" % port], env=env, cwd=cwd)
    rc, out, err = run(["call", "simple-service", "--url", url])
    eq(rc, 2, "connection failure")
    check("cannot connect" in err, err)


def test_delete_is_graceful():
    """delete lets an in-flight request finish before the process exits: its SIGTERM arrives
    while a handler runs (the handler waits for a file the test writes only once the log says
    the SIGTERM was received), and the call is still answered."""
    cwd, env = workspace()
    port = free_port()
    work = tmpdir()
    started, go = os.path.join(work, "started"), os.path.join(work, "go")
    slow = os.path.join(work, "slow.lua")
    with open(slow, "w") as f:
        # The handler marks that it runs, then runs on until `go` exists (at most 20 s; the
        # handler time limit, 10 s, would end it first and fail the test).
        f.write("local mp = require('metaparticle')\n"
                "local function exists(p) local f = io.open(p) if f then f:close() end "
                "return f ~= nil end\n"
                "mp.service('slow', function() io.open(%r, 'w'):close() local t = os.time() "
                "while not exists(%r) and os.time() - t < 20 do os.execute('sleep 0.01') end "
                "return 'done' end).expose = true\n"
                "mp.serve()\n" % (started, go))
    rc, _, err = run([slow, "--port=%d" % port], env=env, cwd=cwd)
    eq(rc, 0, err)
    rc, out, err = run([slow, "status"], env=env, cwd=cwd)
    log = re.search(r", log ([^,\s]+)", out)
    check(rc == 0 and log, "status: %s%s" % (out, err))
    url = "http://127.0.0.1:%d/" % port
    caller = subprocess.Popen([MPHOST, "call", "slow", "--url", url], stdout=subprocess.PIPE,
                              text=True)
    delete = None
    try:
        wait_file(started)
        delete = subprocess.Popen([MPHOST, slow, "delete"], env=dict(os.environ, **env),
                                  cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        wait_until(lambda: "received SIGTERM" in read_text(log.group(1)),
                   "the server logs delete's SIGTERM")
        check(caller.poll() is None and delete.poll() is None,
              "the call and delete wait for the handler")
        open(go, "w").close()
        out, _ = caller.communicate(timeout=30)
        eq((caller.returncode, out), (0, '"done"\n'), "the in-flight call was answered")
        dout, derr = delete.communicate(timeout=30)
        eq(delete.returncode, 0, derr)
    finally:
        open(go, "w").close()
        for p in (caller, delete):
            if p and p.poll() is None:
                p.kill()
                p.wait()
        run([slow, "delete"], env=env, cwd=cwd)
    check(port_closed(port), "delete stopped the deployment")


def read_text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""




def test_embed_example():
    embed_serves(os.path.join(os.environ.get("MPH_BUILD", os.path.join(ROOT, "build")), "embed"))


def test_bad_numeric_options_are_one_line_and_exit_1():
    cwd, env = workspace()
    bad = {"port": ["80x", "0x50", "1e3", "-1", "65536", "nan", " 80", "", "8.5",
                    "99999999999999999999999"],
           "max-retries": ["-1", "2x", "1e2", "1000001"],
           "max-body": ["0", "1k", "-5"],
           "max-header": ["10", "16K"],
           "max-connections": ["0", "inf"],
           "idle-timeout": ["0", "inf", "nan", "1e2", "-1", "1.", ".5", "0x10", "1s"],
           "handler-timeout": ["-1", "nan", "86401"],
           "shutdown-timeout": ["inf", "2x"],
           "redis-timeout": ["0", "1e9"]}
    for name, values in bad.items():
        for value in values:
            rc, out, err = run(["examples/server1.lua", "serve", "--%s=%s" % (name, value)],
                               env=env, cwd=cwd, timeout=20)
            eq(rc, 1, "--%s=%r" % (name, value))
            eq(len(err.strip().splitlines()), 1, "one line for --%s=%r: %r" % (name, value, err))
            check(("invalid --%s" % name in err) or ("invalid port" in err), err)
    rc, out, err = run(["examples/server1.lua", "status"], env=dict(env, MP_PORT="30o0"),
                       cwd=cwd)
    eq(rc, 1, "MP_PORT is checked like --port")


def test_max_retries_0_is_one_attempt():
    """--max-retries=0 means no retry: a conflict answers -32001 at once (it meant 50)."""
    data = tmpdir()
    with Server("server5.lua", ["--max-retries=0"], data=data) as a, \
            Server("server5.lua", data=data) as b:
        eq(a.result("simple-storage", [{}]), {"requests": 1})  # a caches the scope ...
        eq(b.result("simple-storage", [{}]), {"requests": 2})  # ... b moves it on
        r = a.rpc("simple-storage", [{}])
        eq(r.get("error", {}).get("code"), -32001, "a's stale attempt is not retried: %r" % r)
        eq(a.result("simple-storage", [{}]), {"requests": 3}, "then a sees b's write")


def test_state_dir_of_another_user_or_writable_by_others_is_refused():
    cwd, env = workspace()
    state = env["MP_STATE_DIR"]
    port = free_port()
    cases = [(0o777, None, "writable by group or others"),
             (0o775, None, "writable by group or others")]
    if os.geteuid() == 0:
        cases.append((0o700, "nobody", "belongs to uid"))
    for mode, owner, message in cases:
        os.chmod(state, mode)
        if owner:
            shutil.chown(state, owner)
        try:
            for verb in ([], ["status"], ["delete"]):
                rc, out, err = run(["examples/server1.lua"] + verb + ["--port=%d" % port],
                                   env=env, cwd=cwd)
                eq(rc, 1, "%s with a state dir of mode %o owned by %s" % (verb, mode, owner))
                check(message in err and state in err and len(err.splitlines()) == 1, err)
            eq(os.listdir(state), [], "nothing was written into it")
            check(port_closed(port), "nothing was started")
        finally:
            if owner:
                shutil.chown(state, "root")
            os.chmod(state, 0o700)
            if not port_closed(port):
                run(["examples/server1.lua", "delete", "--port=%d" % port], env=env, cwd=cwd)
    link = tmpdir() + "/link"
    os.symlink(state, link)
    rc, out, err = run(["examples/server1.lua", "--port=%d" % port],
                       env={"MP_STATE_DIR": link}, cwd=cwd)
    eq(rc, 1, "a state dir that is a symbolic link")
    check("symbolic link" in err, err)
    # A foreground server only warns: its pid file is a convenience there.
    fresh = tmpdir()
    os.chmod(fresh, 0o777)
    with Server("server1.lua", state=fresh) as s:
        eq(s.result("simple-service", [1]), {"request-was": 1})
    check("refusing to use it" in s.read_log() and "serving without a pid file" in s.read_log(),
          s.read_log())
    eq(os.listdir(fresh), [], "nothing was written into it")
    # One that others may only read (as os.makedirs leaves it) is used.
    readable = os.path.join(tmpdir(), "state")
    os.makedirs(readable, 0o755)
    os.chmod(readable, 0o755)
    env = dict(env, MP_STATE_DIR=readable)
    rc, out, err = run(["examples/server1.lua", "--port=%d" % port], env=env, cwd=cwd)
    eq(rc, 0, "deploy with a state directory of mode 755: " + err)
    try:
        rc, out, err = run(["examples/server1.lua", "status", "--port=%d" % port], env=env,
                           cwd=cwd)
        eq(rc, 0, "status: " + out + err)
    finally:
        run(["examples/server1.lua", "delete", "--port=%d" % port], env=env, cwd=cwd)
    check(port_closed(port), "deleted")


def test_links_at_the_log_or_pid_file_are_refused():
    cwd, env = workspace()
    state = env["MP_STATE_DIR"]
    port = free_port()
    script = os.path.join(cwd, "examples", "server1.lua")
    target = os.path.join(tmpdir(), "precious")
    with open(target, "w") as f:
        f.write("precious\n")
    mode = os.stat(target).st_mode
    for ext in (".log", ".pid"):
        link = deployment_file(state, script, port, ext)
        os.symlink(target, link)
        try:
            rc, out, err = run([script, "--port=%d" % port], env=env, cwd=cwd)
            eq(rc, 1, "deploy with a link at the %s file (stderr %r)" % (ext, err))
            check("symbolic link" in err and link in err, err)
            check(port_closed(port), "nothing was started")
            with open(target) as f:
                eq(f.read(), "precious\n", "the link's target is untouched")
            eq(os.stat(target).st_mode, mode, "its mode too")
        finally:
            os.unlink(link)
            run([script, "delete"], env=env, cwd=cwd)


def test_deploy_that_cannot_open_its_log_does_not_keep_the_callers_pipes():
    cwd, env = workspace()
    port = free_port()
    script = os.path.join(cwd, "examples", "server1.lua")
    os.mkdir(deployment_file(env["MP_STATE_DIR"], script, port, ".log"))  # open() fails
    full = dict(os.environ, **env)
    p = subprocess.Popen([MPHOST, script, "--port=%d" % port], cwd=cwd, env=full,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        # communicate() returns once both pipes reach EOF, that is once no process holds
        # them; the timeout only turns the old hang (the server kept them) into a failure.
        out, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        run([script, "delete", "--port=%d" % port], env=env, cwd=cwd)  # the pipes' holder
        p.kill()
        p.communicate()
        raise TestFailure("the caller's pipes stayed open after deploy returned")
    finally:
        run([script, "delete", "--port=%d" % port], env=env, cwd=cwd)
    eq(p.returncode, 1, "deploy fails")
    check("cannot open the log file" in err and "Is a directory" in err, err)
    eq(out, "")
    check(port_closed(port), "nothing was left running")


def test_deploy_without_room_for_its_pid_file_fails():
    """A full disk under the state directory (a file size limit here) fails the deploy: a
    server that status and delete cannot find must not be left running."""
    cwd, env = workspace()
    port = free_port()
    # In one process, whose first file is its pid file ...
    rc, out, err = shell("prlimit --fsize=0 -- mphost examples/server1.lua --port=%d "
                         "--workers=0" % port, cwd, env)
    eq(rc, 1, "deploy (stderr %r)" % err)
    check("cannot write the pid file" in err and "File too large" in err, err)
    check(port_closed(port), "nothing was left running")
    # ... and with workers, whose supervisor cannot even size the page it shares with them.
    rc, out, err = shell("prlimit --fsize=0 -- mphost examples/server1.lua --port=%d" % port,
                         cwd, env)
    eq(rc, 1, "deploy (stderr %r)" % err)
    eq(len(err.strip().splitlines()), 1, "one line: %r" % err)
    check("File too large" in err, err)
    check(port_closed(port), "nothing was left running")


def test_two_deploys_at_once_and_delete_racing_a_deploy():
    cwd, env = workspace()
    port = free_port()
    work = tmpdir()
    loading, go = os.path.join(work, "loading"), os.path.join(work, "go")
    script = os.path.join(SCRIPTS, "waits_at_load.lua")
    full = dict(os.environ, MPH_TEST_LOADING=loading, MPH_TEST_GO=go, **env)

    def start(*verb):
        return subprocess.Popen([MPHOST, script, "--port=%d" % port] + list(verb), cwd=cwd,
                                env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        first, second = start(), start()
        wait_file(loading)  # one of them is loading the script now
        delete = start("delete")
        # delete must wait for the deploy in progress, not report "not running" and leave it
        # to come up behind its back; give a delete that does not wait a second to show it.
        try:
            out, err = delete.communicate(timeout=1)
            raise TestFailure("delete returned while a deploy was starting: %r" % err)
        except subprocess.TimeoutExpired:
            pass
        open(go, "w").close()
        results = sorted([p.communicate(timeout=60) + (p.returncode,)
                          for p in (first, second)], key=lambda r: r[2])
        eq(results[0][2], 0, "one deploy succeeds: %r" % (results,))
        eq(results[1][2], 1, "the other fails: %r" % (results,))
        check("already running" in results[1][1], results[1][1])
        out, err = delete.communicate(timeout=60)
        eq(delete.returncode, 0, err)
        check("not running" not in err, err)
        check(port_closed(port), "delete stopped the deployment")
        rc, out, err = run([script, "status"], env=full, cwd=cwd)
        eq(rc, 3, "status after delete: " + out)
    finally:
        open(go, "w").close()
        run([script, "delete"], env=full, cwd=cwd)


def test_sigpipe_is_left_to_the_embedder():
    """The library changes no signal disposition: an embedder that keeps SIGPIPE's default
    is warned at start; the mphost binary ignores it."""
    build = os.environ.get("MPH_BUILD", os.path.join(ROOT, "build"))
    port = free_port()
    p = subprocess.Popen([os.path.join(build, "embed"), str(port)], cwd=tmpdir(),
                         env=dict(os.environ, EMBED_KEEP_SIGPIPE="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        check(wait_port(port, 10, p), "embed listens")
        check(not sigpipe_ignored(p.pid), "the library left SIGPIPE alone")
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
    check("SIGPIPE is neither ignored nor blocked" in err, err)
    with Server("server1.lua") as s:
        check(sigpipe_ignored(s.proc.pid), "mphost ignores SIGPIPE")


def sigpipe_ignored(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGPIPE - 1)))
    raise TestFailure("no SigIgn line")


def test_the_release_build_has_no_test_hooks():
    """./dev test builds build-release too (what ./dev start installs): the suite's fault
    hooks (MPH_TEST_* variables, mp.test_fail_allocations) are compiled out of it."""
    binary = os.path.join(ROOT, "build-release", "mphost")
    check(os.path.exists(binary), "no release build: run ./dev build release")
    data = open(binary, "rb").read()
    for hook in (b"MPH_TEST_FAULT", b"MPH_TEST_GATE", b"MPH_TEST_COMPACT_MIN",
                 b"MPH_TEST_LUA_ALLOC_FAIL"):
        check(hook not in data, "the release binary reads %s" % hook.decode())
    script = os.path.join(tmpdir(), "hooks.lua")
    with open(script, "w") as f:
        f.write("local mp = require('metaparticle')\n"
                "mp.service('hook', function() return type(mp.test_fail_allocations) end)"
                ".expose = true\nmp.serve()\n")
    env = {"MPH_TEST_LUA_ALLOC_FAIL": "1"}
    with Server(script, env=env, binary=binary) as s:
        eq(s.result("hook", []), "nil", "mp.test_fail_allocations in the release build")
    with Server(script, env=env) as s:
        eq(s.result("hook", []), "function", "mp.test_fail_allocations in the test build")
