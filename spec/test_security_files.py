"""Issue 19, the file storage's part: another local user can neither redirect, read, nor stall
what mphost keeps in its data directory, a read creates nothing, and a data directory mphost
creates itself survives a power loss (docs/security.md).

The attacker is another uid (nobody, through setpriv) acting as one would: it makes or opens up
the data directory before mphost starts, plants symbolic links to a file of root's, opens
files and holds their locks. The power-loss tests mount spec/powerloss_fs.py, a FUSE layer
that keeps only what was fsynced; they need /dev/fuse and Debian's python3-fusepy (./dev
installs both) and fail, not skip, without them.
"""
import os
import select
import stat
import subprocess
import threading
import time

from harness import (EXAMPLES, ROOT, SCRIPTS, Server, TestFailure, check, eq, kill9_under_load,
                     tmpdir, wait_port)
from test_scope import wait_log

SERVER5 = os.path.join(EXAMPLES, "server5.lua")
ACCOUNTS = os.path.join(SCRIPTS, "accounts.lua")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, which has fusepy (the suite's may not)
POWERLOSS_FS = os.path.join(ROOT, "spec", "powerloss_fs.py")


def as_nobody(*cmd):
    """Runs cmd as uid 65534; returns (exit code, stdout + stderr)."""
    check(os.geteuid() == 0, "these tests run as root: the attacker is another uid (setpriv)")
    p = subprocess.run(NOBODY + list(cmd), capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout + p.stderr


def victim_file():
    """A file of root's that no one may change: (path, its bytes)."""
    path = os.path.join(tmpdir("mph-victim-"), "victim")
    content = b"root's file: not to be touched\n"
    with open(path, "wb") as f:
        f.write(content)
    return path, content


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def open_parent(mode=0o755):
    """A fresh directory others may reach (0755) or write into (01777, like /tmp)."""
    parent = tmpdir()
    os.chmod(parent, mode)
    return parent


def files_under(top):
    """{relative path: mode bits} of everything under top."""
    out = {}
    for d, dirs, files in os.walk(top):
        for name in dirs + files:
            p = os.path.join(d, name)
            out[os.path.relpath(p, top)] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


def named_file(name, ext):
    """The file of mp.scope.named(name) (a name of letters, digits and "-")."""
    return "n%3A" + name + ext


UMASK_0 = ["sh", "-c", 'umask 000; exec "$@"', "sh"]  # a prefix: the server runs with umask 000


# -- refused at start --

def refused_at_start(data, reason, victim):
    """mphost as root on data: exits 1 with one line naming data and reason; victim intact."""
    s = Server(SERVER5, data=data)
    s.start(expect_ok=False)  # returns once it serves, or has exited
    code = None if s.proc.poll() is None and s.wait_ready(1) else s.proc.wait(timeout=30)
    if code is None:  # it serves: show what that costs, then fail
        r = s.rpc("simple-storage", [{}])
        s.proc.kill()
        s.proc.wait()
        raise TestFailure("mphost served on %s (%s; victim now %r) instead of refusing: %s"
                          % (data, r, read_bytes(victim[0]), s.read_log()[-800:]))
    lines = [line for line in s.read_log().splitlines() if line.strip()]
    eq(code, 1, "exit status with %s (%s)" % (data, lines))
    check(len(lines) == 1 and data in lines[0] and reason in lines[0],
          "one line naming %s and %r: %s" % (data, reason, lines))
    eq(read_bytes(victim[0]), victim[1], "the victim file")


def plant_links(data, victim, runner=None):
    """Links global.log, .lock, .claim and another scope's .snap in data to victim (as nobody
    when runner says). Not global.snap: an mphost that followed links would refuse that
    snapshot before it wrote anything, and the test is to show the write it makes."""
    for name in ("global.log", "global.lock", "global.claim", "other.snap"):
        link = os.path.join(data, name)
        if runner:
            rc, out = runner("ln", "-s", victim, link)
            eq(rc, 0, "planting %s: %s" % (link, out))
        else:
            os.symlink(victim, link)


def test_data_dir_of_another_uid_or_open_to_others_is_refused_at_start():
    victim = victim_file()
    # Another user made the data directory first (in a /tmp-like parent), links planted.
    parent = open_parent(0o1777)
    data = os.path.join(parent, "data")
    rc, out = as_nobody("mkdir", "-m", "700", data)
    eq(rc, 0, out)
    plant_links(data, victim[0], runner=as_nobody)
    refused_at_start(data, "belongs to uid 65534", victim)
    # Root's own directory, but open to everyone: another user planted the links.
    data = os.path.join(open_parent(), "data")
    os.mkdir(data)
    os.chmod(data, 0o777)
    plant_links(data, victim[0], runner=as_nobody)
    refused_at_start(data, "writable by group or others", victim)
    # Writable by its group only.
    data = os.path.join(open_parent(), "data")
    os.mkdir(data)
    os.chmod(data, 0o770)
    plant_links(data, victim[0])
    refused_at_start(data, "writable by group or others", victim)


def test_data_dir_that_is_a_symbolic_link_is_refused_at_start():
    victim = victim_file()
    # Another user names, as our data directory, a directory of root's it chose.
    target = tmpdir("mph-target-")
    parent = open_parent(0o1777)
    data = os.path.join(parent, "data")
    rc, out = as_nobody("ln", "-s", target, data)
    eq(rc, 0, out)
    refused_at_start(data, "symbolic link", victim)
    eq(os.listdir(target), [], "nothing was written where the link points")


# -- links planted in a directory that passes --

def test_planted_links_in_an_accepted_data_dir_are_never_followed():
    """In root's 0700 data directory (someone with root's uid planted them), a link under any
    of a scope's names is refused (O_NOFOLLOW), the victim stays byte-identical, the call
    fails cleanly or goes on without the link, and the process stays up."""
    victim = victim_file()
    data = tmpdir("mph-data-")
    for scope in ("log", "lock", "snap", "claim"):
        os.symlink(victim[0], os.path.join(data, named_file("n-" + scope, "." + scope)))
    # A compaction's temporary files too (their names are predictable).
    for ext in (".snap.tmp", ".log.tmp"):
        os.symlink(victim[0], os.path.join(data, named_file("comp", ext)))
    env = {"MPH_TEST_COMPACT_MIN": "300"}
    with Server(ACCOUNTS, data=data, env=env) as s:
        for scope in ("log", "lock", "snap"):
            r = s.rpc("count", {"name": "n-" + scope})
            eq(r.get("error", {}).get("code"), -32002, "a call on n-%s: %r" % (scope, r))
            check("symbolic link" in r["error"]["message"], r)
        # The claim is advisory: a link under its name is neither read nor written.
        eq(s.result("count", {"name": "n-claim"}), 1, "n-claim")
        # Enough commits for a compaction, which writes the .tmp names.
        for i in range(12):
            eq(s.result("count", {"name": "comp"}), i + 1)
        wait_log(s, "file: compacted n:comp")
        eq(s.result("read", {"name": "comp"}), 12)
        eq(s.result("count", {"name": "fine"}), 1, "other scopes are served")
        check(s.alive(), "the process stays up")
    eq(read_bytes(victim[0]), victim[1], "the victim file")
    for scope in ("log", "lock", "snap"):
        link = os.path.join(data, named_file("n-" + scope, "." + scope))
        check(os.path.islink(link), "%s left as found" % link)


# -- modes --

def test_a_fresh_data_dir_is_0700_and_its_files_0600_whatever_the_umask():
    parent = open_parent()
    data = os.path.join(parent, "a", "b", "data")  # three levels created by mphost
    with Server(ACCOUNTS, data=data, prefix_cmd=UMASK_0) as s:
        eq(s.result("both", {"name": "x"}), {"named": 1, "global": 1})  # an intent file too
        eq(s.result("count", {"name": "y"}), 1)
        for d in ("a", "a/b", "a/b/data"):
            eq(stat.S_IMODE(os.stat(os.path.join(parent, d)).st_mode), 0o700, d)
        modes = files_under(data)
        check(len(modes) >= 4, modes)
        eq({m for m in modes.values()}, {0o600}, "modes of %r" % modes)
        # Another uid can neither read a scope nor open a lock, by name or by listing.
        for name in ("global.log", "global.lock", named_file("x", ".lock")):
            rc, out = as_nobody(SYSTEM_PYTHON, "-c", "open(%r, 'rb')" % os.path.join(data, name))
            check(rc != 0 and "PermissionError" in out, "nobody opened %s: %s" % (name, out))
        rc, out = as_nobody("ls", data)
        check(rc != 0, "nobody listed the data directory: %s" % out)


def test_a_fresh_state_dir_holds_0700_directories_and_0600_files_whatever_the_umask():
    """Pid file, sockets of the supervisor and its workers: 0600 like every other file."""
    state = os.path.join(tmpdir(), "state")  # created by mphost
    with Server("server2.lua", state=state, prefix_cmd=UMASK_0) as s:  # 3 workers
        check(s.result("replicated-service", [1])["server"] in (1, 2, 3), "a worker answers")
        kinds = {}
        for d, dirs, files in os.walk(state):
            for name in dirs + files:
                st = os.lstat(os.path.join(d, name))
                kind = "socket" if stat.S_ISSOCK(st.st_mode) else \
                    "directory" if stat.S_ISDIR(st.st_mode) else "file"
                kinds.setdefault(kind, set()).add(stat.S_IMODE(st.st_mode))
        eq(sorted(kinds), ["directory", "file", "socket"], "what the state directory holds")
        eq(kinds, {"directory": {0o700}, "file": {0o600}, "socket": {0o600}}, "their modes")
    eq(stat.S_IMODE(os.stat(state).st_mode), 0o700, "the state directory")


def test_existing_files_with_wide_modes_are_narrowed():
    """Our choice for a data directory an older mphost made (0755, files 0644): used, narrowed to
    0700 at start (with a warning), each file to 0600 when first opened."""
    data = os.path.join(open_parent(), "data")
    with Server(SERVER5, data=data) as s:
        s.result("simple-storage", [{}])
    os.chmod(data, 0o755)
    for name in os.listdir(data):
        os.chmod(os.path.join(data, name), 0o644)
    with Server(SERVER5, data=data) as s:
        eq(s.result("simple-storage", [{}]), {"requests": 2})
        check("was mode 755, open to other users; it is 700 now" in s.read_log(), s.read_log())
        eq(stat.S_IMODE(os.stat(data).st_mode), 0o700, "the directory")
        eq(set(files_under(data).values()), {0o600}, "the files")


LOCK_HOLDER = r"""
import fcntl, glob, os, sys, time
data, stop = sys.argv[1], sys.argv[2]
held, opened, rounds = [], set(), 0
while not os.path.exists(stop):
    names = set(os.path.join(data, "global" + e) for e in (".lock", ".log", ".claim"))
    names |= set(glob.glob(os.path.join(data, "*")))
    for name in sorted(names):
        try:
            fd = os.open(name, os.O_RDONLY)
        except OSError:
            continue
        opened.add(name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(fd)
        except OSError:
            os.close(fd)
    rounds += 1
    print("round %d opened %d held %d %s" % (rounds, len(opened), len(held), sorted(opened)),
          flush=True)
    time.sleep(0.005)
"""


def read_line(proc, timeout):
    """The next line proc writes on stdout, or None at EOF or after timeout seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        return None
    line = proc.stdout.readline()
    return line.rstrip("\n") if line else None


def test_another_uid_cannot_hold_a_lock_and_calls_keep_answering():
    # mphost creates the data directory (in a parent others can reach) and its files.
    parent = open_parent()
    data = os.path.join(parent, "data")
    stop = os.path.join(parent, "stop")  # where the attacker can see it
    with Server(SERVER5, data=data) as s:
        eq(s.result("simple-storage", [{}]), {"requests": 1})  # global.lock exists
        attacker = subprocess.Popen(NOBODY + [SYSTEM_PYTHON, "-c", LOCK_HOLDER, data, stop],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            first = read_line(attacker, 30)
            check(first and first.startswith("round 1 "), "the attacker runs: %r" % first)
            for i in range(20):  # each answered within a bound while the attacker tries
                t0 = time.time()
                try:
                    r = s.rpc("simple-storage", [{}], timeout=5)
                except OSError as e:
                    raise TestFailure("call %d unanswered after %.1f s while another uid "
                                      "tried the locks (%s): %r" % (i, time.time() - t0,
                                                                    first, e))
                eq(r.get("result"), {"requests": i + 2}, "call %d" % i)
                check(time.time() - t0 < 5, "call %d took %.1f s" % (i, time.time() - t0))
        finally:
            open(stop, "w").close()
            out, _ = attacker.communicate(timeout=30)
        last = (out.strip().splitlines() or [first])[-1]
        check(" opened 0 held 0 " in last, "another uid opened files: %s" % last)


# -- a read creates nothing --

def test_reading_never_written_named_scopes_creates_no_files():
    data = tmpdir("mph-data-")
    with Server(ACCOUNTS, data=data) as s:
        before = sorted(os.listdir(data))
        for i in range(5):
            eq(s.result("read", {"name": "x%d" % i}), 0)
        eq(s.result("audit", {"n": 5}), {"total": 0, "low": 0})  # five scopes in one call
        eq(s.result("touch", ["never"]), 0)
        eq(sorted(os.listdir(data)), before, "files after reads only")
        # The first write creates them, and the reads that follow see it.
        eq(s.result("count", {"name": "x1"}), 1)
        created = sorted(named_file("x1", e) for e in (".lock", ".log"))
        eq(sorted(set(os.listdir(data)) - set(before)), created, "files after the first write")
        eq(s.result("read", {"name": "x1"}), 1)
        eq(s.result("audit", {"n": 2}), {"total": 0, "low": 0})  # account:1 is not x1
    eq(sorted(os.listdir(data)), sorted(before + created))


def test_a_process_that_read_a_scope_missing_sees_another_create_it():
    """Process a reads named scopes that do not exist (version 0, no files); b then creates
    them, one with enough commits to compact (a snapshot and a new log). a's next commit must
    start from what b wrote, snapshot included."""
    data = tmpdir("mph-data-")
    env = {"MPH_TEST_COMPACT_MIN": "300"}
    with Server(ACCOUNTS, ["--workers=0"], data=data, env=env) as a, \
            Server(ACCOUNTS, ["--workers=0"], data=data, env=env) as b:
        eq(a.result("read", {"name": "p"}), 0)
        eq(a.result("read", {"name": "q"}), 0)
        eq(b.result("count", {"name": "p"}), 1)
        for i in range(15):
            eq(b.result("count", {"name": "q"}), i + 1)
        wait_log(b, "file: compacted n:q")
        check(os.path.exists(os.path.join(data, named_file("q", ".snap"))), os.listdir(data))
        eq(a.result("count", {"name": "p"}), 2, "a counts on b's first commit")
        eq(a.result("count", {"name": "q"}), 16, "a counts on b's snapshot and log")
        eq(b.result("count", {"name": "q"}), 17, "and b on a's commit")


COPY = """
local mp = require("metaparticle")
local function expose(name, fn) mp.service(name, fn).expose = true end
-- Reads scope a (perhaps never written) and writes scope b: one commit, a only checked.
expose("copy", function(p)
  local a, b = mp.scope.named(p.a), mp.scope.named(p.b)
  b.n = (a.n or 0) + 100
  return b.n
end)
expose("count", function(p)
  local s = mp.scope.named(p.name)
  s.n = (s.n or 0) + 1
  return s.n
end)
mp.serve()
"""


def test_a_commit_that_only_checks_a_missing_scope_creates_nothing_and_sees_it_created():
    script = os.path.join(tmpdir(), "copy.lua")
    with open(script, "w") as f:
        f.write(COPY)
    data = tmpdir("mph-data-")
    with Server(script, ["--workers=0"], data=data) as a, \
            Server(script, ["--workers=0"], data=data) as b:
        eq(a.result("copy", {"a": "ghost", "b": "real"}), 100)
        check(not [n for n in os.listdir(data) if "ghost" in n], os.listdir(data))
        eq(b.result("count", {"name": "ghost"}), 1)
        # a read ghost missing; its check of version 0 now fails, and the call runs again.
        eq(a.result("copy", {"a": "ghost", "b": "real"}), 101)


def test_two_processes_racing_to_create_a_scope_lose_no_count():
    data = tmpdir("mph-data-")
    with Server(ACCOUNTS, data=data) as a, Server(ACCOUNTS, data=data) as b:
        names = ["race%d" % i for i in range(20)]
        for name in names:  # both have read it missing: both commit at version 0
            eq(a.result("read", {"name": name}), 0)
            eq(b.result("read", {"name": name}), 0)
        got, errors = {}, []

        def count(server, name):
            try:
                got.setdefault(name, []).append(server.result("count", {"name": name}))
            except Exception as e:  # reported below
                errors.append(repr(e))
        threads = [threading.Thread(target=count, args=(srv, name))
                   for name in names for srv in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        check(not errors, errors[:3])
        for name in names:
            eq(sorted(got[name]), [1, 2], name)
    with Server(ACCOUNTS, data=data) as c:  # a process of its own reads them from the files
        for name in names:
            eq(c.result("read", {"name": name}), 2, name)


# -- power loss --

def fuse_usable():
    """Fails the test, with what to do, when FUSE cannot be used here."""
    check(os.path.exists(SYSTEM_PYTHON), "%s is missing (./dev installs python3)" % SYSTEM_PYTHON)
    p = subprocess.run([SYSTEM_PYTHON, "-c", "import fusepy"], capture_output=True, text=True)
    check(p.returncode == 0, "the power-loss tests need Debian's python3-fusepy and fuse3 "
          "(./dev deps installs them): %s" % p.stderr.strip()[-300:])
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        raise TestFailure("the power-loss tests need FUSE: /dev/fuse cannot be opened (%s); in "
                          "a container, run it with --device /dev/fuse --cap-add SYS_ADMIN" % e)


class PowerLossMount:
    """spec/powerloss_fs.py over a fresh backing directory; power_loss() unmounts it and
    returns the directory holding only what was durable."""

    def __init__(self):
        fuse_usable()
        top = tmpdir("mph-fuse-")
        self.backing, self.mnt, self.out = (os.path.join(top, d) for d in ("b", "m", "after"))
        os.mkdir(self.backing)
        os.mkdir(self.mnt)
        self.proc = subprocess.Popen([SYSTEM_PYTHON, POWERLOSS_FS, self.backing, self.mnt,
                                      self.out], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        line = read_line(self.proc, 30)
        if line != "ready" or not os.path.ismount(self.mnt):
            self.close()
            raise TestFailure("the FUSE layer did not mount (%r): %s"
                              % (line, self.proc.stderr.read()[-1000:]))

    def power_loss(self):
        # A process killed a moment ago may still be letting go of its files (its cwd, its
        # open descriptors: seen under ASan): "target is busy" until it has.
        deadline = time.time() + 30
        while True:
            p = subprocess.run(["umount", self.mnt], capture_output=True, text=True)
            if p.returncode == 0 or "busy" not in p.stderr or time.time() > deadline:
                break
            time.sleep(0.05)
        eq(p.returncode, 0, "umount: %s" % p.stderr)
        line = read_line(self.proc, 60)
        eq(line, "materialized", "the FUSE layer wrote the durable view")
        eq(self.proc.wait(timeout=30), 0, "the FUSE layer's exit")
        return self.out

    def close(self):
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class DefaultDataServer(Server):
    """A Server run in directory cwd with no --data: the default ./mp-data."""

    def __init__(self, script, cwd):
        super().__init__(script, data=os.path.join(cwd, "mp-data"))
        self.cwd = cwd
        self.env.pop("MP_DATA", None)

    def start(self, expect_ok=True):
        self.log = open(self.log_path, "ab")
        cmd = self.prefix_cmd + [self.binary, self.script, "serve", str(self.port),
                                 "--listen=127.0.0.1"]
        self.proc = subprocess.Popen(cmd, cwd=self.cwd, stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL, env=self.env)
        timeout = 60 if self.valgrind_log else 15
        if not (wait_port(self.port, timeout, self.proc) and self.wait_ready(timeout)):
            self.proc.kill()
            self.proc.wait()
            raise TestFailure("server did not start: " + self.read_log()[-2000:])
        return self


def after_power_loss(out, acked):
    """Restarts on what the power loss left: the data directory is there and holds every
    acknowledged count."""
    data = os.path.join(out, "mp-data")
    check(os.path.isdir(data), "the data directory mphost created is gone after the power loss "
          "(left: %r)" % files_under(out))
    eq(stat.S_IMODE(os.stat(data).st_mode), 0o700, "its mode")
    with DefaultDataServer(SERVER5, out) as s:
        n = s.result("simple-storage", [{}])["requests"]
        check(n >= acked + 1, "after the power loss the count went on from %d, but %d was "
              "acknowledged" % (n - 1, acked))


def test_power_loss_after_the_first_write_keeps_the_data_dir_mphost_created():
    m = PowerLossMount()
    try:
        s = DefaultDataServer(SERVER5, m.mnt).start()
        eq(s.result("simple-storage", [{}]), {"requests": 1})
        s.kill9()
        out = m.power_loss()
    finally:
        m.close()
    after_power_loss(out, 1)


def test_power_loss_under_load_loses_no_acknowledged_count():
    m = PowerLossMount()
    try:
        s = DefaultDataServer(SERVER5, m.mnt).start()
        acked = kill9_under_load(s, clients=4, after_acks=30)
        out = m.power_loss()
    finally:
        m.close()
    after_power_loss(out, max(acked))
