"""The mphost command line: deploy, status, delete, call, errors; the embedding example."""
import os
import shutil
import signal
import socket
import subprocess
import time

from harness import (EXAMPLES, MPHOST, ROOT, SCRIPTS, check, eq, free_port, run, tmpdir,
                     wait_port)


def workspace():
    """A scratch working directory with examples/ reachable as in the walkthrough."""
    d = tmpdir("mph-cwd-")
    os.symlink(EXAMPLES, os.path.join(d, "examples"))
    return d, {"MP_STATE_DIR": tmpdir("mph-state-")}


def shell(cmd, cwd, env):
    full = dict(os.environ)
    full.update(env)
    full["PATH"] = os.path.dirname(MPHOST) + ":" + full["PATH"]
    p = subprocess.run(cmd, shell=True, cwd=cwd, env=full, capture_output=True, text=True,
                       timeout=60)
    return p.returncode, p.stdout, p.stderr


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
        check(not wait_port(port, 0.3), "the port is closed after delete")
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
        t0 = time.time()
        rc, out, err = run(["examples/server1.lua", "--port=%d" % port], env=env, cwd=cwd)
        eq(rc, 1, "port in use")
        check("in use" in err, err)
        check(time.time() - t0 < 10, "no hang")
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
    check(not wait_port(port, 0.2), "nothing was left running")


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
    """delete lets an in-flight request finish before the process exits."""
    cwd, env = workspace()
    port = free_port()
    slow = os.path.join(tmpdir(), "slow.lua")
    with open(slow, "w") as f:
        f.write("local mp = require('metaparticle')\n"
                "mp.service('slow', function() local t = os.clock() "
                "while os.clock() - t < 0.5 do end return 'done' end).expose = true\n"
                "mp.serve()\n")
    rc, _, err = run([slow, "--port=%d" % port], env=env, cwd=cwd)
    eq(rc, 0, err)
    url = "http://127.0.0.1:%d/" % port
    caller = subprocess.Popen([MPHOST, "call", "slow", "--url", url], stdout=subprocess.PIPE,
                              text=True)
    time.sleep(0.15)
    rc, _, err = run([slow, "delete"], env=env, cwd=cwd)
    eq(rc, 0, err)
    out, _ = caller.communicate(timeout=10)
    eq((caller.returncode, out), (0, '"done"\n'), "the in-flight call was answered")


def test_embed_example():
    build = os.environ.get("MPH_BUILD", os.path.join(ROOT, "build"))
    port = free_port()
    cwd = tmpdir()
    p = subprocess.Popen([os.path.join(build, "embed"), str(port)], cwd=cwd,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        check(wait_port(port, 10, p), "embed listens")
        rc, out, err = run(["call", "hello", '{"name":"C"}', "--url",
                            "http://127.0.0.1:%d/" % port])
        eq((rc, out), (0, '{"greeting":"hello, C"}\n'), err)
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
    eq(p.returncode, 0, "embed exits cleanly: " + err)
    check("AddressSanitizer" not in err and "runtime error" not in err, err)
    shutil.rmtree(cwd, ignore_errors=True)
