"""harness.py: drives the real mphost binary for the end-to-end tests.

A Server is `mphost SCRIPT serve PORT` on a free loopback port with its own data and state
directories; tests talk to it over real sockets and stop it with SIGTERM (or kill -9 where
crash safety is the point). A clean stop must exit 0 with no sanitizer report in its log.
Unless the test passes --workers=0, the server is a supervisor with worker processes (one by
default), which log to the same file; the supervisor's pid is the server's.
"""
import ctypes
import fcntl
import functools
import glob
import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
from http.server import ThreadingHTTPServer
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPHOST = os.environ.get("MPHOST", os.path.join(ROOT, "build", "mphost"))
EXAMPLES = os.path.join(ROOT, "examples")
SCRIPTS = os.path.join(ROOT, "spec", "scripts")


class TestFailure(AssertionError):
    pass


def check(cond, message="check failed"):
    if not cond:
        raise TestFailure(message)


def short(value, limit=300):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "... (%d chars)" % len(text)


def eq(actual, expected, what="value"):
    if actual != expected:
        raise TestFailure("%s: expected %s, got %s" % (what, short(expected), short(actual)))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_until(predicate, what, timeout=30):
    """Polls every 10 ms for an event the test cannot be told about (a replica's link, a log
    line, a metric) and returns the predicate's first true value; the timeout only turns a
    hang into a failure."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        check(time.time() < deadline, "timed out waiting until " + what)
        time.sleep(0.01)


def wait_port(port, timeout=10.0, proc=None, host="127.0.0.1"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.01)
    return False


def deployment_file(state, script, port, ext):
    """The name deploy.c gives a deployment's file: FNV-1a of the script's real path."""
    h = 1469598103934665603
    for b in os.path.realpath(script).encode():
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return os.path.join(state, "%016x-%d%s" % (h, port, ext))


def tmpdir(prefix="mph-"):
    return tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("MPH_TMP"))


def run(args, env=None, cwd=None, timeout=60, stdin=None):
    """Runs mphost with args; returns (exit code, stdout, stderr)."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    p = subprocess.run([MPHOST] + list(args), cwd=cwd, env=full_env, timeout=timeout,
                       capture_output=True, text=True, stdin=stdin or subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr


def embed_serves(binary, env=None):
    """Runs examples/embed.c built as `binary` on a free port (in a scratch directory, its
    data dir's parent), calls its hello service over a real socket and stops it with SIGTERM;
    checks the answer and a clean exit."""
    port = free_port()
    cwd = tmpdir()
    p = subprocess.Popen([binary, str(port)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        check(wait_port(port, 15, p), "%s listens" % binary)
        rc, out, err = run(["call", "hello", '{"name":"C"}', "--url",
                            "http://127.0.0.1:%d/" % port])
        eq((rc, out), (0, '{"greeting":"hello, C"}\n'), err)
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    eq(p.returncode, 0, "%s exits cleanly: %s" % (binary, err))
    check("AddressSanitizer" not in err and "runtime error" not in err, err)
    shutil.rmtree(cwd, ignore_errors=True)


def sanitizer_report(text):
    for marker in ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer",
                   "bug: handles left open"):
        if marker in text:
            return marker
    return None


def _enter_private_network():
    """Moves this process into a new network namespace with its loopback up. Returns False
    where that is not allowed (not root): the caller then runs in the machine's network."""
    clone_newnet = 0x40000000
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(clone_newnet) != 0:
        return False
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, siocgifflags, req))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))
    return True


def private_network(test):
    """Runs a test in a child process in a network namespace of its own, so that the fixed
    ports a walkthrough prints (3000, 3001...) meet nothing else running on the machine (a
    developer's mphost, a second test run). Its failure is raised here, with its traceback."""
    @functools.wraps(test)
    def in_namespace():
        sys.stdout.flush()
        sys.stderr.flush()
        r, w = os.pipe()
        earlier = len(Server.started)  # the runner's servers: the child leaves them alone
        pid = os.fork()
        if pid == 0:  # the child: run the test, report, never return into the runner
            os.close(r)
            code, report = 0, ""
            try:
                _enter_private_network()
                test()
            except BaseException as e:  # pylint: disable=broad-except
                code = 1
                report = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            stop_leftover_servers(since=earlier)
            os.write(w, report[-6000:].encode())
            os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            report = f.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise TestFailure("in its own network namespace:\n" + (report or "exit status %d" % status))
    return in_namespace


def console_steps(doc, at_least, block=1):
    """The commands of the block-th ```console block of docs/DOC and what each prints."""
    with open(os.path.join(ROOT, "docs", doc)) as f:
        block = f.read().split("```console\n")[block].split("```", 1)[0]
    steps = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    check(len(steps) >= at_least, "docs/%s's walkthrough has its steps" % doc)
    return steps


class StubHTTP:
    """A threaded HTTP server for `handler` (a BaseHTTPRequestHandler class) on a free loopback
    port, https with `tls` (a (cert, key) pair); quiet about clients that leave. Serves from
    start() (or entering `with`) until close(). Stand-ins for the services mphost calls."""

    def __init__(self, handler, tls=None):
        class Quiet(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128  # many connections at once: no SYN left to a retry

            def handle_error(self, request, client_address):
                pass  # a client that left (a stop cut it): nothing to report

        self.server = Quiet(("127.0.0.1", 0), handler)
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


class Server:
    """mphost SCRIPT serve PORT in the foreground, as a child process."""

    def __init__(self, script, args=(), data=None, port=None, env=None, prefix_cmd=(),
                 state=None, binary=None):
        self.script = script if os.path.isabs(script) else os.path.join(EXAMPLES, script)
        self.port = port or free_port()
        self.data = data or tmpdir("mph-data-")
        self.state = state or tmpdir("mph-state-")
        self.log_path = os.path.join(tmpdir("mph-log-"), "server.log")
        self.args = list(args)
        self.env = dict(os.environ)
        self.env["MP_STATE_DIR"] = self.state
        self.env.setdefault("ASAN_OPTIONS", "detect_leaks=1")
        if env:
            self.env.update(env)
        self.prefix_cmd = list(prefix_cmd)
        self.binary = binary or MPHOST  # another mphost than the build's (an installed one)
        self.valgrind_log = None
        if os.environ.get("MPH_VALGRIND"):
            # Opt-in: every server runs under memcheck; a report fails the stop() check.
            self.valgrind_log = self.log_path + ".valgrind"
            # valgrind writes temp files as the server's user, which may be nobody.
            os.chmod(os.path.dirname(self.log_path), 0o777)
            self.env["TMPDIR"] = os.path.dirname(self.log_path)
            # Workers too (they are this binary, run anew): one log file per process.
            self.prefix_cmd += ["valgrind", "--quiet", "--error-exitcode=99",
                                "--leak-check=full", "--errors-for-leak-kinds=definite",
                                "--trace-children=yes",
                                "--suppressions=" + os.path.join(ROOT, "spec", "valgrind.supp"),
                                "--log-file=" + self.valgrind_log + ".%p"]
        self.proc = None

    started = []  # every server started (run.py stops those a test left running)

    def start(self, expect_ok=True):
        self.log = open(self.log_path, "ab")
        cmd = self.prefix_cmd + [self.binary, self.script, "serve", str(self.port),
                                 "--listen=127.0.0.1", "--data=" + self.data] + self.args
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL, env=self.env)
        Server.started.append(self)
        timeout = 60 if self.valgrind_log else 15
        ok = wait_port(self.port, timeout, self.proc) and self.wait_ready(timeout)
        if expect_ok and not ok:
            self.proc.kill()
            self.proc.wait()
            raise TestFailure("server did not start: " + self.read_log()[-2000:])
        return self

    def wait_ready(self, timeout):
        """The port accepts as soon as the supervisor has bound it; the server is ready once
        its workers serve, when it writes its pid file (or, with a state directory it refuses,
        logs that it serves). Returns False if it exits first or takes longer."""
        pidfile = deployment_file(self.state, self.script, self.port, ".pid")
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            if os.path.exists(pidfile) or "serving " in self.read_log():
                return True
            time.sleep(0.01)
        return False

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        if self.proc and self.proc.poll() is None:
            if exc_type is None:
                self.stop()
            else:
                self.proc.kill()
                self.proc.wait()

    def read_log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, timeout=20):
        """Graceful stop; asserts a clean exit."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise TestFailure("server did not stop within %ss" % timeout)
        self.log.close()
        text = self.read_log()
        for path in glob.glob((self.valgrind_log or "/nonexistent") + ".*"):
            with open(path) as f:
                report = f.read()
            if report.strip():
                raise TestFailure("valgrind report:\n" + report[-4000:])
        bad = sanitizer_report(text)
        if bad:
            raise TestFailure("sanitizer/teardown problem (%s):\n%s" % (bad, text[-4000:]))
        eq(code, 0, "exit status after SIGTERM (log: %s)" % text[-1500:])

    def kill9(self):
        """kill -9 of the server's pid, as a crash; returns once its workers, which the kernel
        kills with it, are gone too (they hold the data directory's locks until then)."""
        workers = children(self.proc.pid)
        self.proc.kill()
        self.proc.wait()
        self.log.close()
        deadline = time.time() + 30  # milliseconds; the bound only turns a hang into a failure
        while [p for p in workers if not gone(p)]:
            check(time.time() < deadline, "workers %r outlived their supervisor" % workers)
            time.sleep(0.01)

    def running(self):
        """The server's process runs (the supervisor, which replaces workers that die)."""
        return self.proc.poll() is None

    def alive(self):
        """It runs and no process of it has died since the start: no worker was replaced."""
        return self.running() and "; replacing it" not in self.read_log()

    # -- talking to it --

    def post_raw(self, body, headers=None, timeout=30):
        """POST body (bytes or str) with Content-Length; returns (status, body bytes)."""
        if isinstance(body, str):
            body = body.encode()
        hdrs = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        hdrs.update(headers or {})
        head = "POST / HTTP/1.1\r\nHost: x\r\n" + "".join(
            "%s: %s\r\n" % kv for kv in hdrs.items()) + "Connection: close\r\n\r\n"
        return http_exchange(self.port, head.encode() + body, timeout)

    def rpc(self, method, params=None, id=1, timeout=30):
        req = {"jsonrpc": "2.0", "method": method, "id": id}
        if params is not None:
            req["params"] = params
        status, body = self.post_raw(json.dumps(req), timeout=timeout)
        eq(status, 200, "HTTP status")
        return json.loads(body)

    def result(self, method, params=None):
        resp = self.rpc(method, params)
        if "error" in resp:
            raise TestFailure("%s returned error %r" % (method, resp["error"]))
        return resp["result"]


def stop_leftover_servers(since=0):
    """Kills the servers tests started (those after the first `since`) and left running (their
    supervisors: the workers go with them); returns how many there were."""
    left = [s for s in Server.started[since:] if s.proc and s.proc.poll() is None]
    for s in left:
        s.proc.kill()
        s.proc.wait()
    del Server.started[since:]
    return len(left)


def children(pid):
    """The pids of pid's child processes."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.split("/")[2]))
    return out


def gone(pid):
    """The process is gone (or a zombie nobody waits for, which no longer runs)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def read_response(sock, buf=b"", keep_interim=False):
    """Reads one HTTP response from sock; returns (status, headers dict, body, rest). An
    interim 100 Continue is skipped, or returned with keep_interim."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise TestFailure("connection closed before a response: %r" % buf[:200])
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, v = line.split(":", 1)
        headers[k.strip().lower()] = v.strip()
    if status == 100:
        return (100, headers, b"", rest) if keep_interim else read_response(sock, rest)
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise TestFailure("connection closed inside a body")
        rest += chunk
    return status, headers, rest[:length], rest[length:]


def http_exchange(port, data, timeout=30):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        status, _, body, _ = read_response(s)
        return status, body
    finally:
        s.close()


def connection_closed(sock, timeout=5.0):
    """True if the peer closes sock (EOF or reset) within timeout."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


class KeepAliveClient:
    """One persistent HTTP/1.1 connection for many JSON-RPC calls. Like any HTTP client, it
    opens a new connection after a response that says "Connection: close" (a server stopping
    gracefully, or reloading, ends keep-alive connections so)."""

    def __init__(self, port, timeout=60):
        self.port = port
        self.timeout = timeout
        self.reconnects = 0  # connections opened after a "Connection: close"
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def call(self, method, params=None, id=1):
        req = {"jsonrpc": "2.0", "method": method, "id": id}
        if params is not None:
            req["params"] = params
        body = json.dumps(req).encode()
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
            self.buf = b""
            self.reconnects += 1
        self.sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        status, headers, data, self.buf = read_response(self.sock, self.buf)
        if headers.get("connection") == "close":
            self.sock.close()
            self.sock = None
        eq(status, 200, "HTTP status")
        return json.loads(data)

    def close(self):
        if self.sock is not None:
            self.sock.close()


class Threads:
    """Threads whose death fails the test. start(fn, *args) runs fn(*args) on a thread of its
    own; join() waits for all of them, then raises the first exception any of them raised, so a
    client thread that dies (an error reply it did not expect, a connection reset) cannot vanish
    while the others still meet the test's progress checks. Failures a test expects (-32002
    while Redis fails over, a connection cut by a kill -9) stay the thread function's to catch
    and count. The threads are daemons: a test that fails before it joins them (and before it
    tells them to stop) does not keep the run from ending."""

    def __init__(self):
        self.threads = []
        self.errors = []  # (thread name, exception, its traceback as text), first first
        self.lock = threading.Lock()

    def start(self, fn, *args):
        def body():
            try:
                fn(*args)
            except BaseException as e:  # every death is reported, whatever it is
                with self.lock:
                    self.errors.append((threading.current_thread().name, e,
                                        traceback.format_exc()))
        t = threading.Thread(target=body, name="%s-%d" % (getattr(fn, "__name__", "thread"),
                                                          len(self.threads)), daemon=True)
        self.threads.append(t)
        t.start()
        return t

    def died(self):
        """How many threads have died so far (a wait for progress can give up at once)."""
        with self.lock:
            return len(self.errors)

    def check_alive(self):
        """Raises the first death so far, if any (for a wait that would otherwise go on)."""
        with self.lock:
            first = self.errors[0] if self.errors else None
        if first:
            self.raise_error(first)

    def raise_error(self, error):
        name, e, tb = error
        raise TestFailure("thread %s died (%d of %d threads died): %r\n%s" %
                          (name, len(self.errors), len(self.threads), e, tb[-2000:])) from e

    def join(self, timeout=None):
        """Waits for every thread (each at most `timeout` s, if given: the bound only turns a
        hang into a failure), then raises the first death, if any."""
        deadline = None if timeout is None else time.time() + timeout
        for t in self.threads:
            t.join(None if deadline is None else max(0, deadline - time.time()))
        if self.errors:
            self.raise_error(self.errors[0])
        alive = [t.name for t in self.threads if t.is_alive()]
        check(not alive, "threads still running after %ss: %s" % (timeout, alive))


def kill9_under_load(server, clients=8, after_acks=50):
    """Runs `clients` keep-alive callers of simple-storage against server, kills it with -9
    once `after_acks` calls were acknowledged (so it dies under load, whatever the machine's
    speed), and returns the counts acknowledged before it died. The only failure expected is
    the connection cut by the kill: a JSON-RPC error, or a failure before the kill, fails the
    test, with every such problem listed."""
    acked, problems, lock = [], [], threading.Lock()
    enough, killing = threading.Event(), threading.Event()

    def worker():
        try:
            c = KeepAliveClient(server.port, timeout=30)
        except OSError as e:
            with lock:
                problems.append("connecting: %r" % e)
            return
        while True:
            try:
                r = c.call("simple-storage", [{}])
            except Exception as e:  # the kill cuts the connection: expected only after it
                if not killing.is_set():
                    with lock:
                        problems.append("before the kill: %r" % e)
                break
            with lock:
                if "error" in r:
                    problems.append("JSON-RPC error: %r" % r["error"])
                    enough.set()  # fail at once, not after the wait
                    break
                acked.append(r["result"]["requests"])
                if len(acked) >= after_acks:
                    enough.set()
        c.close()

    threads = Threads()
    for _ in range(clients):
        threads.start(worker)
    # Generous: 50 calls take milliseconds; this only bounds a hung server.
    reached = enough.wait(60)
    killing.set()
    server.kill9()
    threads.join()
    check(reached, "only %d calls were acknowledged in 60 s" % len(acked))
    check(not problems, "calls failed under load: %s" % "; ".join(problems[:5]))
    return acked


class RedisServer:
    """A real redis-server on a free loopback port with its own directory (never 6379);
    bind="::1" for IPv6."""

    def __init__(self, password=None, port=None, directory=None, bind="127.0.0.1", args=()):
        self.bind = bind
        self.args = list(args)  # more redis-server options (--replicaof, --cluster-enabled)
        self.port = port or free_port()
        self.dir = directory or tmpdir("mph-redis-")
        self.password = password
        self.proc = None

    def start(self):
        cmd = ["redis-server", "--port", str(self.port), "--bind", self.bind,
               "--dir", self.dir, "--save", "", "--appendonly", "yes",
               "--appendfsync", "always", "--daemonize", "no", "--logfile",
               os.path.join(self.dir, "redis.log")]
        if self.password:
            cmd += ["--requirepass", self.password]
        cmd += self.args
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_port(self.port, 10, self.proc, self.bind):
            raise TestFailure("redis-server did not start")
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    def kill9(self):
        self.proc.kill()
        self.proc.wait()

    def cli(self, *args):
        cmd = ["redis-cli", "-h", self.bind, "-p", str(self.port)]
        if self.password:
            cmd += ["--no-auth-warning", "-a", self.password]
        return subprocess.run(cmd + list(args), capture_output=True, text=True,
                              timeout=10).stdout.strip()

    def url(self, db=None):
        auth = ":%s@" % self.password if self.password else ""
        host = "[%s]" % self.bind if ":" in self.bind else self.bind
        return "redis://%s%s:%d%s" % (auth, host, self.port, "/%d" % db if db else "")


def wrk_counter(port, seconds, connections):
    """wrk on the counter (spec/load/counter.lua): (calls answered with a result, others, what
    wrk wrote on stderr)."""
    p = subprocess.run(["wrk", "-t2", "-c%d" % connections, "-d%ds" % seconds, "-s",
                        os.path.join(ROOT, "spec", "load", "counter.lua"),
                        "http://127.0.0.1:%d/" % port], timeout=seconds + 60,
                       capture_output=True, text=True)
    out, err = p.stdout, p.stderr
    eq(p.returncode, 0, "wrk exit (%s)" % err)
    m = re.search(r"CALLS ok=(\d+) bad=(\d+)", out)
    check(m, "wrk printed no CALLS line: " + out)
    return int(m.group(1)), int(m.group(2)), err
