"""The embedding example on the caller's loop (examples/embed_loop.c): two hosts on the
program's own libuv loop, no HTTP, a C function called from Lua, concurrent in-process
increments that conflict and run again, an exact count, and a loop that closes with 0.
The API itself is tested in C by spec/unit/embed.c."""
import os
import re
import subprocess

from harness import ROOT, check, eq, sanitizer_report, tmpdir

BUILD = os.environ.get("MPH_BUILD", os.path.join(ROOT, "build"))


def test_embed_loop_example():
    data = tmpdir("mph-embed-loop-")
    p = subprocess.run([os.path.join(BUILD, "embed_loop"), data, "100"], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, ASAN_OPTIONS="detect_leaks=1"))
    eq(p.returncode, 0, "embed_loop's exit status (stdout: %s, stderr: %s)" % (
        p.stdout[-2000:], p.stderr[-2000:]))
    check(sanitizer_report(p.stderr) is None, p.stderr[-4000:])
    m = re.search(r"embed_loop: (\d+) calls, (\d+) failed, (\d+) handler runs, "
                  r"final count (\d+) \(exact\)\n", p.stdout)
    check(m, p.stdout)
    calls, failed, runs, count = map(int, m.groups())
    eq((calls, failed, count), (200, 0, 200), "calls, failures, final count")
    check(runs > calls, "conflicting commits ran handlers again: %d runs" % runs)
    check("embed_loop: uv_loop_close: 0\n" in p.stdout, p.stdout)
    # The two hosts' logs: both conflicted and retried, and both stopped.
    conflicts = [int(n) for n in re.findall(r"transactions: 100 calls, \d+ attempts, \d+ "
                                            r"commits, (\d+) conflicts", p.stderr)]
    eq(len(conflicts), 2, "both hosts logged their transactions: " + p.stderr[-2000:])
    check(sum(conflicts) > 0, "commits conflicted: " + p.stderr[-2000:])
