"""HTTP/1.x behaviour of the server, over raw sockets."""
import json
import signal
import socket
import struct
import time

from harness import (KeepAliveClient, Server, TestFailure, check, connection_closed, eq,
                     read_response)

CALL = b'{"jsonrpc":"2.0","method":"simple-service","params":[{"n":%d}],"id":%d}'


def request(body, extra=b"", version=b"1.1"):
    return (b"POST / HTTP/" + version + b"\r\nHost: x\r\nContent-Type: application/json\r\n" +
            extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def served_connection(port, attempts=500):
    """A keep-alive connection the server has accepted and answered on (it may close new ones
    while at its connection limit; retried, 10 ms apart, until it does not)."""
    for _ in range(attempts):
        sock = connect(port)
        try:
            sock.sendall(request(CALL % (0, 0)))
            status, _, _, rest = read_response(sock)
            if status == 200 and rest == b"":
                return sock
        except (OSError, TestFailure):
            pass
        sock.close()
        time.sleep(0.01)
    raise TestFailure("no connection was served")


def wait_log(server, text, timeout=30):
    """Waits for a line of the server's log (polling; the bound turns a hang into a failure)."""
    deadline = time.time() + timeout
    while text not in server.read_log():
        check(time.time() < deadline, "no %r in the log: %s" % (text, server.read_log()[-2000:]))
        time.sleep(0.02)


def test_keep_alive_and_pipelining():
    with Server("server1.lua") as s:
        c = KeepAliveClient(s.port)
        for i in range(3):
            eq(c.call("simple-service", [{"i": i}])["result"], {"request-was": {"i": i}})
        c.close()
        # Three requests in one write: three responses, in order.
        sock = connect(s.port)
        sock.sendall(b"".join(request(CALL % (i, i)) for i in range(3)))
        rest = b""
        for i in range(3):
            status, _, body, rest = read_response(sock, rest)
            eq(status, 200)
            eq(json.loads(body)["id"], i, "pipelined response order")
        sock.close()


def test_nothing_is_answered_after_connection_close():
    with Server("server1.lua") as s:
        sock = connect(s.port)
        sock.sendall(request(CALL % (1, 1), b"Connection: close\r\n") + request(CALL % (2, 2)))
        status, headers, body, rest = read_response(sock)
        eq((status, json.loads(body)["id"]), (200, 1))
        eq(headers.get("connection"), "close")
        check(connection_closed(sock), "closed after the response")
        sock = connect(s.port)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + request(CALL % (3, 3)))
        status, _, _, rest = read_response(sock)
        eq(status, 405)
        sock.settimeout(10)  # EOF comes at once; the bound only turns a hang into a failure
        tail = rest
        while True:
            data = sock.recv(65536)
            if not data:
                break
            tail += data
        eq(tail, b"", "no second response after the error")


def test_chunked_body():
    with Server("server1.lua") as s:
        body = CALL % (5, 5)
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7])
                          for i in range(0, len(body), 7))
        sock = connect(s.port)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" +
                     chunks + b"0\r\n\r\n")
        status, _, data, _ = read_response(sock)
        eq(status, 200)
        eq(json.loads(data)["result"], {"request-was": {"n": 5}})
        sock.close()


def test_expect_100_continue():
    with Server("server1.lua") as s:
        body = CALL % (7, 7)
        sock = connect(s.port)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        interim = sock.recv(100)
        eq(interim, b"HTTP/1.1 100 Continue\r\n\r\n", "interim response")
        sock.sendall(body)
        status, _, data, _ = read_response(sock)
        eq(status, 200)
        eq(json.loads(data)["id"], 7)
        sock.close()


def test_http_1_0():
    with Server("server1.lua") as s:
        sock = connect(s.port)
        sock.sendall(request(CALL % (1, 1), version=b"1.0"))
        status, headers, data, _ = read_response(sock)
        eq(status, 200)
        eq(headers.get("connection"), "close")
        check(connection_closed(sock), "HTTP/1.0 without keep-alive closes")
        sock = connect(s.port)
        sock.sendall(request(CALL % (1, 1), b"Connection: keep-alive\r\n", version=b"1.0") +
                     request(CALL % (2, 2), version=b"1.0"))
        status, headers, _, rest = read_response(sock)
        eq(headers.get("connection"), "keep-alive")
        status, _, data, _ = read_response(sock, rest)
        eq(json.loads(data)["id"], 2)
        sock.close()


def test_status_codes():
    with Server("server1.lua", ["--max-body=1000", "--max-header=2048"]) as s:
        def status_of(raw):
            sock = connect(s.port)
            sock.sendall(raw)
            st, headers, _, _ = read_response(sock)
            closed = connection_closed(sock)
            sock.close()
            return st, headers, closed

        st, headers, _ = status_of(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        eq(st, 405)
        eq(headers.get("allow"), "POST")
        st, _, closed = status_of(request(b"x" * 2000))
        eq(st, 413)
        check(closed, "connection closes after 413")
        st, _, _ = status_of(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" +
                             b"400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n")
        eq(st, 413, "chunked body over the limit")
        st, _, _ = status_of(b"POST / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 +
                             b"\r\nContent-Length: 0\r\n\r\n")
        eq(st, 431)
        st, _, _ = status_of(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        eq(st, 400, "Content-Length with Transfer-Encoding")
        st, _, _ = status_of(b"HELLO THERE\r\n\r\n")
        eq(st, 400)
        eq(s.result("simple-service", [1]), {"request-was": 1})


def test_default_limits_2mib_body_and_64kib_header():
    with Server("server1.lua") as s:
        sock = connect(s.port)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 << 20))
        try:
            sock.sendall(b"x" * (2 << 20))
        except OSError:
            pass  # the server may close before reading it all
        st, _, _, _ = read_response(sock)
        eq(st, 413)
        sock.close()
        sock = connect(s.port)
        try:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 << 10) +
                         b"\r\nContent-Length: 0\r\n\r\n")
        except OSError:
            pass
        st, _, _, _ = read_response(sock)
        eq(st, 431)
        sock.close()
        eq(s.result("simple-service", [1]), {"request-was": 1})


def test_stalled_client_does_not_block_others_and_is_closed():
    with Server("server1.lua", ["--idle-timeout=1"]) as s:
        t0 = time.time()
        stalled = connect(s.port)
        stalled.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"json")
        eq(s.result("simple-service", [2]), {"request-was": 2})  # served meanwhile
        # Bounds with slack: never before the idle timeout (timers do not fire early), and
        # the 10 s upper bound only turns "never closed" into a failure.
        check(connection_closed(stalled, 10), "a stalled connection is closed")
        check(time.time() - t0 >= 0.9, "not before the idle timeout")
        # A client trickling bytes does not keep it open either: it sends one byte every
        # 0.1 s (the pace is the point of the test, not a synchronization), far more than
        # the idle timeout's worth of bytes if each one re-armed the timer.
        trickle = connect(s.port)
        closed = False
        for b in b"POST / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
            try:
                trickle.sendall(bytes([b]))
            except OSError:
                closed = True
                break
            if connection_closed(trickle, 0.1):
                closed = True
                break
        check(closed, "a trickling client is closed before it has sent 20 s of bytes")


def test_client_that_stops_reading_is_closed():
    """A client that sends requests but never reads the responses cannot pin a connection
    (and the memory of its responses): the write queue must shrink within the idle timeout."""
    body = b'{"jsonrpc":"2.0","method":"simple-service","params":["%s"],"id":1}' % (
        b"x" * 900000)
    with Server("server1.lua", ["--idle-timeout=1", "--logging=debug"]) as s:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", s.port))
        # Responses of ~0.9 MB each, never read: far more than the socket buffers hold.
        for _ in range(8):
            sock.sendall(request(body))
        wait_log(s, "closing a connection whose client does not read")
        check(s.alive(), "the server stays up")
        eq(s.result("simple-service", [1]), {"request-was": 1})
        sock.close()


def test_expect_100_continue_behind_a_large_response():
    """The interim answer to a pipelined request comes after the responses owed before it,
    however full the socket is (it was dropped when a write was queued)."""
    big = b'{"jsonrpc":"2.0","method":"simple-service","params":["%s"],"id":1}' % (
        b"y" * 900000)
    small = CALL % (2, 2)
    with Server("server1.lua") as s:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(30)  # only turns a missing interim answer into a failure
        sock.connect(("127.0.0.1", s.port))
        # Twenty responses of ~0.9 MB: more than the socket buffers take (loopback took 5 MB),
        # so the interim answer meets a queued write.
        sock.sendall(request(big) * 20 + b"POST / HTTP/1.1\r\nHost: x\r\n"
                     b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(small))
        rest = b""
        for _ in range(20):
            status, _, data, rest = read_response(sock, rest, keep_interim=True)
            eq((status, json.loads(data)["id"]), (200, 1))
        status, _, _, rest = read_response(sock, rest, keep_interim=True)
        eq(status, 100, "the interim answer follows the responses before it")
        sock.sendall(small)
        status, _, data, _ = read_response(sock, rest)
        eq((status, json.loads(data)["id"]), (200, 2))
        sock.close()


def test_client_resetting_mid_response():
    with Server("server1.lua") as s:
        body = b'{"jsonrpc":"2.0","method":"simple-service","params":["%s"],"id":1}' % (
            b"z" * 500000)
        for _ in range(5):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", s.port))
            sock.sendall(request(body) * 3)
            sock.recv(1000)  # the response has started
            # Close with a reset (linger 0): the server's next write fails with ECONNRESET
            # or EPIPE, which must close that connection and nothing else.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        eq(s.result("simple-service", [4]), {"request-was": 4})
        check(s.alive(), "the server stays up")


def test_connection_limit():
    with Server("server1.lua", ["--max-connections=2"]) as s:
        # Earlier connections (the harness's readiness probe) may still count until the
        # server has seen them close: retry until two connections are served, an event.
        a, b = served_connection(s.port), served_connection(s.port)
        c = connect(s.port)
        check(connection_closed(c, 10), "a connection over the limit is closed")
        a.close()
        b.close()
        served_connection(s.port).close()  # room again once the server saw them go


def test_client_vanishing_mid_request():
    with Server("server1.lua") as s:
        for _ in range(20):
            sock = connect(s.port)
            sock.sendall(request(CALL % (1, 1))[:-5])
            sock.close()
            sock = connect(s.port)
            sock.sendall(request(CALL % (1, 1)))
            sock.close()  # gone before the answer
        eq(s.result("simple-service", [4]), {"request-was": 4})


def test_graceful_stop_ends_keep_alive_connections_after_a_response_not_under_a_request():
    """A stop (also a reload's, for the old workers) must not cut a request a keep-alive client
    is sending: an idle connection may still send one, which is answered with
    "Connection: close"; one that stays silent is closed after a moment."""
    s = Server("server1.lua").start()
    busy, silent = served_connection(s.port), served_connection(s.port)
    s.proc.send_signal(signal.SIGTERM)
    wait_log(s, "stopping: no new connections")
    busy.sendall(request(CALL % (1, 1)))
    status, headers, body, rest = read_response(busy)
    eq(status, 200, "the next request on an idle connection is answered")
    eq(json.loads(body)["result"], {"request-was": {"n": 1}})
    eq(headers.get("connection"), "close", "and ends the connection")
    check(connection_closed(busy), "closed after that response")
    # Closed after a second of silence: the bound only turns a connection held for ever into
    # a failure.
    check(connection_closed(silent, timeout=20), "a silent idle connection is closed")
    eq(s.proc.wait(30), 0, "exit status: " + s.read_log()[-1500:])
    s.log.close()
