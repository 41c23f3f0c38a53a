"""HTTP Basic authentication: mp.basicAuth, mp.user, --users=FILE, mphost passwd, SIGHUP, the
cache of verified credentials, and secrets kept out of the logs (spec/scripts/auth.lua)."""
import base64
import ctypes
import json
import os
import pty
import select
import signal
import socket
import stat
import struct
import subprocess
import time

from harness import (MPHOST, SCRIPTS, Server, check, eq, free_port, read_response, run, tmpdir)
from test_scope import wait_log

AUTH = os.path.join(SCRIPTS, "auth.lua")
CHALLENGE = 'Basic realm="mphost"'
UNAUTHORIZED = {"code": -32004, "message": "unauthorized"}

# Hashes made outside `mphost passwd`: bcrypt through libcrypt's own crypt(3) (what Python's
# deprecated crypt module calls), sha512-crypt with OpenSSL.
_libcrypt = ctypes.CDLL("libcrypt.so.1")
_libcrypt.crypt_gensalt.restype = ctypes.c_char_p
_libcrypt.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p,
                                    ctypes.c_int]
_libcrypt.crypt.restype = ctypes.c_char_p
_libcrypt.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]


def crypt_hash(password, prefix, cost=0):
    setting = _libcrypt.crypt_gensalt(prefix.encode(), cost, None, 0)
    check(setting, "crypt_gensalt(%s, %d) failed" % (prefix, cost))
    return _libcrypt.crypt(password.encode(), setting).decode()


def openssl_sha512(password):
    p = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password + "\n",
                       capture_output=True, text=True, timeout=30)
    eq(p.returncode, 0, "openssl passwd -6 (%s)" % p.stderr)
    return p.stdout.strip()


def passwd(path, user, password, expect=0):
    """mphost passwd PATH USER with the password on stdin; returns (stdout, stderr)."""
    p = subprocess.run([MPHOST, "passwd", path, user], input=password + "\n",
                       capture_output=True, text=True, timeout=60)
    eq(p.returncode, expect, "mphost passwd %s exit (%s%s)" % (user, p.stdout, p.stderr))
    return p.stdout, p.stderr


def users_file(entries):
    """A users file of (name, hash) lines."""
    path = os.path.join(tmpdir("mph-users-"), "users")
    with open(path, "w") as f:
        f.write("# test users\n")
        for name, h in entries:
            f.write("%s:%s\n" % (name, h))
    return path


def basic(user, password):
    return "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()


def encode(body, authorization=None, extra=()):
    """The bytes of a POST of body with an optional Authorization value."""
    if not isinstance(body, str):
        body = json.dumps(body)
    head = "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if authorization is not None:
        head += "Authorization: %s\r\n" % authorization
    head += "".join("%s\r\n" % h for h in extra)
    return (head + "Content-Length: %d\r\n\r\n" % len(body.encode()) + body).encode()


def request(port, body, authorization=None, extra=(), sock=None):
    """POSTs body with an optional Authorization value; returns (status, headers, JSON)."""
    data = encode(body, authorization, extra)
    own = sock is None
    s = sock or socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        s.sendall(data)
        status, headers, payload, rest = read_response(s)
        check(rest == b"", "bytes after the response")
        return status, headers, json.loads(payload) if payload else None
    finally:
        if own:
            s.close()


def call(method, id=1):
    return {"jsonrpc": "2.0", "method": method, "id": id}


def refused(port, authorization, extra=()):
    status, headers, body = request(port, call("whoami"), authorization, extra)
    eq(status, 401, "status for %r" % (authorization,))
    eq(headers.get("www-authenticate"), CHALLENGE, "WWW-Authenticate")
    eq(body, {"jsonrpc": "2.0", "id": 1, "error": UNAUTHORIZED}, "body")


def whoami(port, user, password, method="whoami"):
    status, _, body = request(port, call(method), basic(user, password))
    eq(status, 200, "status of %s as %s (%r)" % (method, user, body))
    check("result" in body, "%s as %s: %r" % (method, user, body))
    eq(body["result"]["user"], user, "mp.user")
    return body["result"]


def alice_and_bob():
    path = os.path.join(tmpdir("mph-users-"), "users")
    passwd(path, "alice", "alice-pw")
    passwd(path, "bob", "bob-pw")
    return path


def test_401_without_valid_credentials():
    with Server(AUTH, ["--users=" + alice_and_bob()]) as s:
        refused(s.port, None)
        refused(s.port, basic("alice", "wrong"))
        refused(s.port, basic("mallory", "alice-pw"))
        refused(s.port, "Basic !!!not base64!!!")
        refused(s.port, "Basic YWxpY2U6YWxpY2UtcHc")  # unpadded
        refused(s.port, "Basic " + base64.b64encode(b"alice").decode())  # no colon
        refused(s.port, "Basic " + base64.b64encode(b":alice-pw").decode())  # empty user
        refused(s.port, "Bearer " + base64.b64encode(b"alice:alice-pw").decode())
        refused(s.port, basic("alice", "alice-pw")[6:])  # no scheme
        refused(s.port, "Basic")
        refused(s.port, "Basic " + "A" * 3000)  # oversized
        refused(s.port, basic("alice", "alice-pw"),  # sent twice
                extra=["Authorization: " + basic("alice", "alice-pw")])
        # The scheme in any case works; a 401 keeps the connection for the retry.
        whoami(s.port, "alice", "alice-pw")
        status, _, _ = request(s.port, call("whoami"), "bAsIc " + basic("bob", "bob-pw")[6:])
        eq(status, 200, "lower-case scheme")
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=60)
        eq(request(s.port, call("whoami"), sock=sock)[0], 401, "first try")
        status, _, body = request(s.port, call("whoami"), basic("bob", "bob-pw"), sock=sock)
        eq((status, body["result"]["user"]), (200, "bob"), "retry on the same connection")
        sock.close()
        # A basicAuth handler hidden in a wrapper of the script's own fails closed.
        status, headers, body = request(s.port, call("hidden"), basic("alice", "alice-pw"))
        eq((status, headers.get("www-authenticate"), body["error"]), (401, CHALLENGE, UNAUTHORIZED),
           "a hidden basicAuth handler")
        # mphost call reads a 401 as the JSON-RPC error it carries.
        code, out, err = run(["call", "whoami", "--url", "http://127.0.0.1:%d/" % s.port])
        eq((code, out, err), (1, "", "error -32004: unauthorized\n"), "mphost call")
        # Public services answer with or without credentials, and see no user.
        for auth in (None, basic("alice", "alice-pw"), "garbage"):
            status, _, body = request(s.port, call("public"), auth)
            eq((status, body["result"]["user"]), (200, None), "public with %r" % auth)


def test_right_credentials_two_users_and_every_hash_format():
    path = alice_and_bob()  # yescrypt, from mphost passwd
    with open(path, "a") as f:
        f.write("carol:%s\n" % crypt_hash("carol-pw", "$2b$", 5))
        f.write("dave:%s\n" % crypt_hash("dave-pw", "$2y$", 4))
        f.write("erin:%s\n" % openssl_sha512("erin-pw"))
        f.write("frank:%s\n" % crypt_hash("frank-pw", "$6$", 10000))
    with open(path) as f:
        hashes = [line.split(":", 1)[1] for line in f if not line.startswith("#")]
    for h, prefix in zip(hashes, ("$y$", "$y$", "$2b$05$", "$2y$04$", "$6$", "$6$rounds=")):
        check(h.startswith(prefix), "%s... is not %s" % (h[:12], prefix))
    with Server(AUTH, ["--users=" + path]) as s:
        counts = []
        for user in ("alice", "bob", "carol", "dave", "erin", "frank", "alice"):
            counts.append(whoami(s.port, user, user + "-pw")["calls"])
        eq(counts, [1, 2, 3, 4, 5, 6, 7], "every call counted in mp.scope.global")
        refused(s.port, basic("carol", "dave-pw"))  # another user's password


def test_batch_mixing_public_and_protected_without_credentials():
    with Server(AUTH, ["--users=" + alice_and_bob()]) as s:
        batch = [call("whoami", 1), call("public", 2), {"jsonrpc": "2.0", "method": "whoami"}]
        status, headers, body = request(s.port, batch)
        eq(status, 200, "a mixed batch is answered call by call")
        check("www-authenticate" not in headers, "no challenge on a 200")
        eq(body, [{"jsonrpc": "2.0", "id": 1, "error": UNAUTHORIZED},
                  {"jsonrpc": "2.0", "id": 2, "result": {"user": None, "worker": 1}}], "answers")
        # Every call refused: 401, each still answered.
        status, headers, body = request(s.port, [call("whoami", 1), call("auth-of-spread", 2)])
        eq((status, headers.get("www-authenticate")), (401, CHALLENGE), "all refused")
        eq([r["error"] for r in body], [UNAUTHORIZED, UNAUTHORIZED], "answers")
        # With credentials the same batch runs every call as that user.
        status, _, body = request(s.port, batch, basic("bob", "bob-pw"))
        eq(status, 200, "status")
        eq([body[0]["result"]["user"], body[1]["result"]["user"]], ["bob", None], "users")


def test_plain_text_users_file_is_refused_at_start():
    path = alice_and_bob()
    with open(path, "a") as f:
        f.write("\n# carol's\ncarol:Sup3rSecret!\n")
    port = free_port()
    p = subprocess.run([MPHOST, AUTH, "serve", str(port), "--listen=127.0.0.1",
                        "--data=" + tmpdir(), "--users=" + path], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, MP_STATE_DIR=tmpdir()))
    eq(p.returncode, 1, "exit status")
    out = p.stdout + p.stderr
    eq(len(out.strip().splitlines()), 1, "one line: " + out)
    check("users file %s, line 5:" % path in out, out)
    check("plain-text" in out and "Sup3rSecret" not in out and "carol" not in out, out)
    # Deploying says so too, and a missing file is one line as well.
    state = tmpdir()
    for users, why in ((path, "line 5"), (path + ".missing", "cannot read the users file")):
        p = subprocess.run([MPHOST, AUTH, "--port=%d" % port, "--data=" + tmpdir(),
                            "--users=" + users], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, MP_STATE_DIR=state))
        eq(p.returncode, 1, "deploy exit status (%s)" % p.stderr)
        check(why in p.stderr and "Sup3rSecret" not in p.stderr, p.stderr)


def sighup_and_wait(server, times=1, text="re-read"):
    """SIGHUP to the server; waits until `times` more log lines say `text`."""
    before = server.read_log().count(text)
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 60
    while server.read_log().count(text) < before + times:
        check(time.time() < deadline, "no %r after SIGHUP: %s" % (text, server.read_log()[-1500:]))
        check(server.alive(), "the server died of SIGHUP: " + server.read_log()[-1500:])
        time.sleep(0.01)


def test_sighup_rereads_the_users_file():
    """Without a supervisor (--workers=0; an embedded host alike) the process itself reads
    the file again on SIGHUP."""
    path = os.path.join(tmpdir("mph-users-"), "users")
    passwd(path, "alice", "alice-pw")
    with Server(AUTH, ["--users=" + path, "--workers=0"]) as s:
        whoami(s.port, "alice", "alice-pw")  # verified: now in the cache
        refused(s.port, basic("bob", "bob-pw"))
        passwd(path, "bob", "bob-pw")
        sighup_and_wait(s)
        whoami(s.port, "bob", "bob-pw")  # added: works without a restart
        with open(path) as f:
            lines = [line for line in f if not line.startswith("alice:")]
        with open(path, "w") as f:
            f.writelines(lines)
        sighup_and_wait(s)
        refused(s.port, basic("alice", "alice-pw"))  # removed: refused, cache or not
        whoami(s.port, "bob", "bob-pw")
        # A bad file on SIGHUP: logged, and the users of before stay.
        with open(path, "a") as f:
            f.write("carol:not-a-hash\n")
        sighup_and_wait(s, text="keeping the previous 1 users")
        check("not-a-hash" not in s.read_log(), "the bad line is not logged")
        whoami(s.port, "bob", "bob-pw")
        refused(s.port, basic("carol", "not-a-hash"))


def test_sighup_reload_gives_every_worker_the_new_users_and_topologies_compose():
    path = os.path.join(tmpdir("mph-users-"), "users")
    passwd(path, "alice", "alice-pw")
    with Server(AUTH, ["--users=" + path], env={"MPH_TEST_SPREAD": "2"}) as s:
        wait_log(s, "2 workers, storage")
        for method in ("auth-of-spread", "spread-of-auth"):
            status, headers, _ = request(s.port, call(method))
            eq((status, headers.get("www-authenticate")), (401, CHALLENGE), method)
            workers = set()
            for _ in range(60):  # new connections: both workers answer
                workers.add(whoami(s.port, "alice", "alice-pw", method)["worker"])
            eq(workers, {1, 2}, "workers that answered %s" % method)
        for method in ("auth-of-shard", "shard-of-auth"):
            status, headers, _ = request(s.port, call(method))
            eq((status, headers.get("www-authenticate")), (401, CHALLENGE), method)
            for k in range(4):  # forwarded to worker k % 2 + 1 wherever it arrives
                body = dict(call(method), params=[{"k": k}])
                status, _, r = request(s.port, body, basic("alice", "alice-pw"))
                eq((status, r["result"]["user"], r["result"]["worker"]), (200, "alice", k % 2 + 1),
                   "%s with key %d" % (method, k))
        passwd(path, "bob", "bob-pw")
        sighup_and_wait(s, text="reload: done (ok")  # new workers, which read the file
        workers = set()
        for _ in range(60):
            workers.add(whoami(s.port, "bob", "bob-pw", "spread-of-auth")["worker"])
        eq(workers, {1, 2}, "bob is known to both workers")


def test_no_users_file_warns_and_refuses_every_call():
    with Server(AUTH) as s:
        wait_log(s, "no --users=FILE was given")
        refused(s.port, basic("alice", "alice-pw"))
        status, _, body = request(s.port, call("public"))
        eq((status, body["result"]["user"]), (200, None), "public")


def test_passwd_writes_the_users_file():
    d = tmpdir("mph-users-")
    path = os.path.join(d, "users")
    out, _ = passwd(path, "alice", "Alice-Pw-9")
    check("Alice-Pw-9" not in out, out)
    eq(stat.S_IMODE(os.stat(path).st_mode), 0o600, "mode of a new file")
    with open(path, "a") as f:
        f.write("# a comment kept\n\n")
    passwd(path, "bob", "bob-pw")
    os.chmod(path, 0o640)
    with open(path) as f:
        before = f.read().splitlines()
    out, _ = passwd(path, "alice", "new-pw")
    check(out.startswith("replaced user alice"), out)
    with open(path) as f:
        after = f.read().splitlines()
    eq(stat.S_IMODE(os.stat(path).st_mode), 0o640, "mode kept")
    eq(after[1:], before[1:], "every other line kept")
    check(after[0].startswith("alice:$y$") and after[0] != before[0], "alice replaced")
    eq(os.listdir(d), ["users"], "no temporary file left")
    # A symbolic link keeps pointing at the rewritten file.
    link = os.path.join(tmpdir(), "link")
    os.symlink(path, link)
    passwd(link, "carol", "carol-pw")
    check(os.path.islink(link), "still a link")
    with Server(AUTH, ["--users=" + link]) as s:
        for user, pw in (("alice", "new-pw"), ("bob", "bob-pw"), ("carol", "carol-pw")):
            whoami(s.port, user, pw)
        refused(s.port, basic("alice", "Alice-Pw-9"))
    # Bad user names and passwords: exit 1, one clear line, the file untouched.
    with open(path) as f:
        kept = f.read()
    for user, password, why in (("a:b", "pw", "contains ':'"), ("", "pw", "is empty"),
                                ("x" * 256, "pw", "longer than 255"),
                                ("a\nb", "pw", "line break"), ("#x", "pw", "comment"),
                                ("dave", "", "password is empty"),
                                ("dave", "p" * 1025, "longer than 1024")):
        _, err = passwd(path, user, password, expect=1)
        eq(len(err.strip().splitlines()), 1, "one line: " + err)
        check(why in err, "%r: %s" % (user, err))
    with open(path) as f:
        eq(f.read(), kept, "file after refusals")
    passwd(path, "x" * 255, "pw")  # the longest name


def test_passwd_at_a_terminal_asks_twice_without_echo():
    path = os.path.join(tmpdir("mph-users-"), "users")
    secret = "Tty-Secret-77"

    def session(first, second):
        master, slave = pty.openpty()
        p = subprocess.Popen([MPHOST, "passwd", path, "tina"], stdin=slave, stdout=slave,
                             stderr=slave, close_fds=True)
        os.close(slave)
        seen = b""

        def read_until(text):
            nonlocal seen
            deadline = time.time() + 60
            while text not in seen:
                check(time.time() < deadline, "no %r at the terminal: %r" % (text, seen))
                if select.select([master], [], [], 0.5)[0]:
                    try:
                        seen += os.read(master, 4096)
                    except OSError:
                        break
        read_until(b"Password for tina: ")
        os.write(master, first.encode() + b"\n")
        read_until(b"Again: ")
        os.write(master, second.encode() + b"\n")
        code = p.wait(timeout=60)
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        os.close(master)
        return code, seen.decode("utf-8", "replace")

    code, seen = session(secret, secret + "x")
    eq(code, 1, "mismatch exit: " + seen)
    check("do not match" in seen and secret not in seen, seen)
    check(not os.path.exists(path), "nothing written")
    code, seen = session(secret, secret)
    eq(code, 0, "exit: " + seen)
    check(secret not in seen, "the password was echoed: %r" % seen)
    with Server(AUTH, ["--users=" + path]) as s:
        whoami(s.port, "tina", secret)


def timed(fn):
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def test_cache_spares_a_keep_alive_client_the_hash():
    # bcrypt at cost 12: a hash takes a sizeable fraction of a second, on purpose.
    path = users_file([("first", crypt_hash("slow-pw", "$2b$", 12)),
                       ("second", crypt_hash("slow-pw", "$2b$", 12))])
    with Server(AUTH, ["--users=" + path]) as s:
        # A fresh verification costs a hash: a wrong password is never cached, so each try is
        # one; the quickest of a few is the hash's cost with the least noise.
        one_hash = min(timed(lambda: refused(s.port, basic("first", "nope"))) for _ in range(5))
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=120)
        auth = basic("second", "slow-pw")

        def keep_alive_calls():
            for i in range(200):
                status, _, body = request(s.port, call("whoami", i), auth, sock=sock)
                eq((status, body["result"]["user"]), (200, "second"), "call %d" % i)
        total = timed(keep_alive_calls)
        sock.close()
        check(total < 20 * one_hash,
              "200 keep-alive calls took %.2fs; one verification %.3fs" % (total, one_hash))
        # An unknown user costs a hash too (checked against the file's first): no cheap way to
        # learn who exists.
        unknown = min(timed(lambda: refused(s.port, basic("nobody", "nope"))) for _ in range(5))
        check(unknown > 0.5 * one_hash,
              "unknown user %.3fs, wrong password %.3fs" % (unknown, one_hash))


def test_logs_at_trace_hold_no_password_nor_credentials():
    secret = "Trace-Secret-314"
    path = os.path.join(tmpdir("mph-users-"), "users")
    passwd(path, "alice", secret)
    with Server(AUTH, ["--users=" + path, "--logging=trace"]) as s:
        good, bad = basic("alice", secret), basic("alice", secret + "!")
        whoami(s.port, "alice", secret)
        refused(s.port, bad)
        refused(s.port, basic("nobody", secret))
        request(s.port, [call("whoami", 1), call("public", 2)], good)
        # HTTP-level errors with credentials on them: a bad request and a huge header.
        for raw in (b"POST / HTTP/1.1\r\nAuthorization: " + good.encode() + b"\r\nContent-Length:"
                    b" x\r\n\r\n", b"GET / HTTP/1.1\r\nAuthorization: " + good.encode() +
                    b"\r\n\r\n"):
            c = socket.create_connection(("127.0.0.1", s.port), timeout=30)
            c.sendall(raw)
            check(read_response(c)[0] in (400, 405), "an HTTP error")
            c.close()
        wait_log(s, "auth: user alice verified")
    log = s.read_log()
    for text in (secret, good[6:], bad[6:], base64.b64encode(secret.encode()).decode()):
        check(text not in log, "%r in the log:\n%s" % (text, log[-3000:]))


# ---- The queue of password checks: bounded, fair between clients, cancelled when they leave
# (docs/security.md: no queue an unauthenticated client can fill
# without bound). host/server/auth.c logs each step at debug level; the tests count those lines.

BUSY = "too many credential checks"  # in the -32005 message of a check refused at once
STARTED = "auth: checking credentials"
ENDED = ("auth: user ", "auth: credentials refused")
DROPPED = "auth: a check dropped before it ran"
REFUSED_AT_ONCE = "auth: a check refused at once"
EXPIRED = "auth: a check refused after waiting"


def users_named(names, cost=None):
    """A users file where NAME's password is NAME-pw, all hashes of one cost: yescrypt from
    mphost passwd, or bcrypt at `cost` (10: some 70 ms a hash here, enough that a queue of
    them shows against the noise of a loaded machine)."""
    path = os.path.join(tmpdir("mph-users-"), "users")
    if cost is None:
        for name in names:
            passwd(path, name, name + "-pw")
        return path
    with open(path, "w") as f:
        for name in names:
            f.write("%s:%s\n" % (name, crypt_hash(name + "-pw", "$2b$", cost)))
    os.chmod(path, 0o600)
    return path


def pipelined(port, n, user, source="127.0.0.1", first=0):
    """Opens a connection from the loopback address `source` and sends n pipelined calls of
    whoami as user, each with a password of its own (so that no two share a check), without
    reading; returns the socket."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(120)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.sendall(b"".join(encode(call("whoami", i), basic(user, "guess-%d" % i))
                       for i in range(first, first + n)))
    return s


def log_count(server, text):
    log = server.read_log()
    return sum(log.count(t) for t in text) if isinstance(text, tuple) else log.count(text)


def wait_count(server, what, want, timeout=120):
    """Waits until what(server) == want (an event the server logs; the bound only stops a
    test whose event never comes)."""
    deadline = time.time() + timeout
    while what(server) != want:
        check(time.time() < deadline, "waited %ss for %d, have %d: %s"
              % (timeout, want, what(server), server.read_log()[-2500:]))
        check(server.running(), "the server exited: " + server.read_log()[-1500:])
        time.sleep(0.01)


def first_logins(server, names):
    """Each name's first login (one hash each, then its pair is cached): the quickest, the
    baseline of a verification in this run, on this machine, in this build."""
    return min(timed(lambda n=n: whoami(server.port, n, n + "-pw")) for n in names)


def login_bound(baseline):
    """How long a first login may take under a flood, against the same run's baseline: it may
    wait for a check already on the pool to end, and the flood's two checks run beside its own
    (on a 2-core machine, among other loads; one after the other under valgrind): some 4
    hashes at worst, 6 with a margin, and 0.3 s for the noise of a loaded machine. Under
    valgrind, which runs one thread at a time and not in turn (no --fair-sched), the flood's
    hashes can starve the user's for a while: 16 (9 seen). The old queue made it wait for the
    flood's 60, some 30 hashes (60 under valgrind)."""
    if os.environ.get("MPH_VALGRIND"):
        return 16 * baseline + 1.0
    return 6 * baseline + 0.3


def test_a_flood_closed_at_once_does_not_delay_a_real_login():
    """60 pipelined wrong passwords, the connection closed at once: the checks still queued
    are dropped without running, so a real user's first login costs about one hash more than
    without the flood (it may wait for a check already on a thread), never the flood's; and
    the flooder's address has its places back."""
    path = users_named(["alice", "bob", "carol", "dave", "erin", "frank"], cost=10)
    with Server(AUTH, ["--users=" + path, "--logging=debug"]) as s:
        baseline = first_logins(s, ("bob", "carol", "dave"))
        bound = login_bound(baseline)
        pipelined(s.port, 60, "alice", source="127.0.0.2").close()
        took = timed(lambda: whoami(s.port, "erin", "erin-pw"))
        check(took < bound, "a login after a closed flood took %.3fs; one without it %.3fs "
              "(bound %.3fs)" % (took, baseline, bound))
        # Every check of the flood accounted for: run (at most the places on the pool, which
        # it held when its client left), dropped before running, or refused at once (the
        # bound per address).
        logins = 4
        wait_count(s, lambda s: log_count(s, STARTED) - logins + log_count(s, DROPPED) +
                   log_count(s, REFUSED_AT_ONCE) + log_count(s, EXPIRED), 60)
        ran = log_count(s, STARTED) - logins
        check(ran <= 2, "%d checks of the flood ran after its client left" % ran)
        eq(log_count(s, DROPPED), 60 - ran - log_count(s, REFUSED_AT_ONCE), "dropped")
        # From the flooder's address, once the server saw it leave: a login as quick.
        source = socket.socket()
        source.bind(("127.0.0.2", 0))
        source.connect(("127.0.0.1", s.port))
        t = time.monotonic()
        status, _, body = request(s.port, call("whoami"), basic("frank", "frank-pw"), sock=source)
        took = time.monotonic() - t
        source.close()
        eq((status, body["result"]["user"]), (200, "frank"), "a login from the flooder's address")
        check(took < bound, "it took %.3fs (bound %.3fs)" % (took, bound))
        wait_count(s, lambda s: log_count(s, ENDED), log_count(s, STARTED))


def test_checks_per_client_address_are_bounded_and_take_turns():
    """A client address may have 16 checks in progress; more are refused at once (-32005,
    HTTP 200: the server is busy, which says nothing of the credentials). Another address's
    check takes the next free thread in turn, not after the flooder's 14 still waiting."""
    path = users_named(["alice", "bob", "carol", "dave", "erin"], cost=10)
    with Server(AUTH, ["--users=" + path, "--logging=debug"]) as s:
        baseline = first_logins(s, ("bob", "carol", "dave"))
        flooder = pipelined(s.port, 60, "alice", source="127.0.0.2")  # left open
        wait_count(s, lambda s: log_count(s, REFUSED_AT_ONCE), 44)
        took = timed(lambda: whoami(s.port, "erin", "erin-pw"))
        bound = login_bound(baseline)
        check(took < bound, "a login behind another address's 16 checks took %.3fs; one "
              "without them %.3fs (bound %.3fs)" % (took, baseline, bound))
        answers, buf = [], b""
        for i in range(60):
            status, _, payload, buf = read_response(flooder, buf)
            body = json.loads(payload)
            answers.append((status, body["id"], body["error"]["code"], body["error"]["message"]))
        flooder.close()
        eq([a[1] for a in answers], list(range(60)), "answered in order")
        for status, i, code, message in answers[16:]:
            eq((status, code), (200, -32005), "check %d, beyond the bound" % i)
            check(BUSY in message, message)
        for status, i, code, message in answers[:16]:
            # Refused for the password (401), or (on a slow build) after waiting too long.
            check((status, code) in ((401, -32004), (200, -32005)), "check %d: %r" % (i, answers[i]))
            check(code == -32004 or BUSY not in message, "check %d: %r" % (i, answers[i]))
        # The flooder's next check, once its others are answered, is welcome again.
        refused(s.port, basic("alice", "one-more"))


def test_checks_of_a_client_that_leaves_answer_nobody_and_others_still_answer():
    """Identical credentials share one check; when one of the requests waiting for it goes,
    the others still get their answer (the check is not dropped while anyone waits)."""
    path = users_named(["alice", "bob"], cost=10)
    with Server(AUTH, ["--users=" + path, "--logging=debug"]) as s:
        pipelined(s.port, 10, "bob", first=100).close()  # keeps the pool busy, then goes
        stay = socket.create_connection(("127.0.0.1", s.port), timeout=120)
        leave = socket.create_connection(("127.0.0.1", s.port), timeout=120)
        leave.sendall(encode(call("whoami", 1), basic("alice", "alice-pw")))
        stay.sendall(encode(call("whoami", 2), basic("alice", "alice-pw")))
        leave.close()
        status, _, payload, _ = read_response(stay)
        stay.close()
        eq((status, json.loads(payload)["result"]["user"]), (200, "alice"), "the one that stayed")
        # A client that resets its connection (a close with SO_LINGER 0) is gone as well.
        wait_count(s, lambda s: log_count(s, ENDED), log_count(s, STARTED))
        started, dropped = log_count(s, STARTED), log_count(s, DROPPED)
        rst = pipelined(s.port, 10, "bob", source="127.0.0.3", first=200)
        rst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        rst.close()
        wait_count(s, lambda s: log_count(s, STARTED) - started + log_count(s, DROPPED) - dropped,
                   10)
        check(log_count(s, STARTED) - started <= 2, "checks that ran after a reset")


def test_unexposed_basic_auth_service_is_method_not_found():
    """A service behind basicAuth that is not exposed answers as a name that does not exist:
    -32601 with HTTP 200, with or without credentials, and without checking them."""
    with Server(AUTH, ["--users=" + users_named(["alice"]), "--logging=debug"]) as s:
        unknown = request(s.port, call("no-such-method"))
        eq(unknown[0], 200, "an unknown method")
        for auth in (None, basic("alice", "alice-pw"), basic("alice", "wrong")):
            status, headers, body = request(s.port, call("unexposed"), auth)
            eq((status, body), (200, unknown[2]), "unexposed with %r" % auth)
            check("www-authenticate" not in headers, "a challenge for an unexposed service")
        code, out, err = run(["call", "unexposed", "--url", "http://127.0.0.1:%d/" % s.port])
        eq((code, err), (1, "error -32601: Method not found\n"), "mphost call")
        eq(log_count(s, STARTED), 0, "credentials checked for an unexposed service")
        # In a batch with an exposed one, each gets its own answer.
        status, _, body = request(s.port, [call("unexposed", 1), call("whoami", 2)],
                                  basic("alice", "alice-pw"))
        eq((status, body[0]["error"]["code"], body[1]["result"]["user"]), (200, -32601, "alice"),
           "batch")


# ---- User names: UTF-8 without control characters (a name travels in JSON between workers
# and into logs)

BAD_NAMES = ((b"caf\xe9", "is not valid UTF-8"),        # Latin-1, not UTF-8
             (b"\xc0\xaf", "is not valid UTF-8"),        # an overlong "/"
             (b"\xed\xa0\x80x", "is not valid UTF-8"),   # a UTF-16 surrogate
             (b"a\x1b[31mb", "contains a control character"),       # ESC: a terminal escape
             (b"a\tb", "contains a control character"),
             (b"a\x7fb", "contains a control character"),
             (b"a\xc2\x85b", "contains a control character"))       # U+0085, a C1 control


def test_passwd_refuses_user_names_that_are_not_utf8_or_hold_control_characters():
    path = users_named(["alice"])
    with open(path, "rb") as f:
        kept = f.read()
    for name, why in BAD_NAMES:
        p = subprocess.run([MPHOST.encode(), b"passwd", path.encode(), name], input=b"pw\n",
                           capture_output=True, timeout=60)
        err = p.stderr.decode("utf-8", "replace")
        eq(p.returncode, 1, "mphost passwd %r exit (%s)" % (name, err))
        eq(len(err.strip().splitlines()), 1, "one line: " + err)
        check(why in err, "%r: %s" % (name, err))
        check(name not in p.stderr, "the name is echoed: %r" % p.stderr)
    with open(path, "rb") as f:
        eq(f.read(), kept, "the file after refusals")
    passwd(path, "Åsa Öberg", "pw")  # UTF-8 beyond ASCII is a name like any other
    with Server(AUTH, ["--users=" + path]) as s:
        whoami(s.port, "Åsa Öberg", "pw")


def serve_refused(users, why, hidden=()):
    """`mphost SCRIPT serve` with --users=users exits 1 with one line that says why (and
    none of `hidden`)."""
    p = subprocess.run([MPHOST, AUTH, "serve", str(free_port()), "--listen=127.0.0.1",
                        "--data=" + tmpdir(), "--users=" + users], capture_output=True,
                       timeout=60, env=dict(os.environ, MP_STATE_DIR=tmpdir()))
    out = (p.stdout + p.stderr).decode("utf-8", "replace")
    eq(p.returncode, 1, "exit status (%s)" % out)
    eq(len(out.strip().splitlines()), 1, "one line: " + out)
    check(why in out, "%r not in %s" % (why, out))
    for h in hidden:
        check(h not in p.stdout + p.stderr, "%r in %r" % (h, out))


def test_users_file_with_a_name_not_utf8_or_with_control_characters_refuses_start():
    good = users_named(["alice"])
    with open(good, "rb") as f:
        alice = f.read().strip().split(b"\n")[-1]
    hash_ = alice.split(b":", 1)[1]
    for name, why in BAD_NAMES:
        path = os.path.join(tmpdir("mph-users-"), "users")
        with open(path, "wb") as f:
            f.write(b"# users\n" + alice + b"\n" + name + b":" + hash_ + b"\n")
        os.chmod(path, 0o600)
        serve_refused(path, "users file %s, line 3: a user name that %s" % (path, why),
                      hidden=(name,))


# ---- The users file's owner and mode, and its directory's

def users_warnings(server):
    return [line for line in server.read_log().splitlines()
            if "users file" in line and "readable" in line]


def test_users_file_open_to_group_or_others_warns_once_at_start_and_on_reload():
    path = users_named(["alice"])
    os.chmod(path, 0o644)
    with Server(AUTH, ["--users=" + path]) as s:  # a supervisor and its worker: one line
        wait_log(s, "serving")
        whoami(s.port, "alice", "alice-pw")
        lines = users_warnings(s)
        eq(len(lines), 1, "warnings at start: %r" % lines)
        check("mode 644" in lines[0] and path in lines[0] and "chmod" in lines[0], lines[0])
        sighup_and_wait(s, text="reload: done (ok")
        eq(len(users_warnings(s)), 2, "warnings after a reload: %r" % users_warnings(s))
    with Server(AUTH, ["--users=" + path, "--workers=0"]) as s:  # the process re-reads
        eq(len(users_warnings(s)), 1, "warnings at start: %r" % users_warnings(s))
        os.chmod(path, 0o600)
        sighup_and_wait(s)
        eq(len(users_warnings(s)), 1, "a private file warns no more")
        os.chmod(path, 0o640)
        sighup_and_wait(s)
        eq(len(users_warnings(s)), 2, "group-readable: %r" % users_warnings(s))
        # Made writable by others: refused, the users of before stay.
        os.chmod(path, 0o646)
        sighup_and_wait(s, text="keeping the previous 1 users")
        whoami(s.port, "alice", "alice-pw")


def test_users_file_anyone_could_change_is_refused_at_start():
    path = users_named(["alice"])
    os.chmod(path, 0o602)
    serve_refused(path, "users file %s is writable by others (mode 602)" % path)
    os.chmod(path, 0o600)
    os.chown(path, 65534, 65534)
    serve_refused(path, "users file %s belongs to uid 65534" % path)
    os.chown(path, 0, 0)
    d = os.path.dirname(path)
    os.chmod(d, 0o777)
    serve_refused(path, "directory %s, which holds the users file, is writable by others" % d)
    os.chmod(d, 0o1777)  # sticky, as /tmp: only the file's owner may replace it
    with Server(AUTH, ["--users=" + path]) as s:
        whoami(s.port, "alice", "alice-pw")


def test_passwd_makes_private_files_whatever_the_umask_and_refuses_open_directories():
    d = tmpdir("mph-users-")
    path = os.path.join(d, "users")
    for mask in (0, 0o022, 0o777):
        if os.path.exists(path):
            os.unlink(path)
        p = subprocess.run([MPHOST, "passwd", path, "alice"], input="alice-pw\n", text=True,
                           capture_output=True, timeout=60, preexec_fn=lambda m=mask: os.umask(m))
        eq(p.returncode, 0, "passwd under umask %03o: %s" % (mask, p.stderr))
        eq(stat.S_IMODE(os.stat(path).st_mode), 0o600, "mode under umask %03o" % mask)
    eq(os.listdir(d), ["users"], "no temporary file left")
    os.chmod(d, 0o777)
    _, err = passwd(path, "bob", "bob-pw", expect=1)
    check("writable by others" in err and len(err.strip().splitlines()) == 1, err)
    os.chmod(d, 0o700)
    # A file others may read: written, with the warning the server would give.
    os.chmod(path, 0o644)
    _, err = passwd(path, "bob", "bob-pw")
    check("readable" in err and "mode 644" in err, err)
