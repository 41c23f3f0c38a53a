"""HTTP/1.x behaviour of the server, over raw sockets."""
import json
import socket
import time

from harness import (KeepAliveClient, Server, check, connection_closed, eq, read_response)

CALL = b'{"jsonrpc":"2.0","method":"simple-service","params":[{"n":%d}],"id":%d}'


def request(body, extra=b"", version=b"1.1"):
    return (b"POST / HTTP/" + version + b"\r\nHost: x\r\nContent-Type: application/json\r\n" +
            extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=10)


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
        sock.settimeout(3)
        tail = rest
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                tail += data
        except OSError:
            pass
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
        stalled = connect(s.port)
        stalled.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"json")
        t0 = time.time()
        eq(s.result("simple-service", [2]), {"request-was": 2})
        check(time.time() - t0 < 0.5, "another client was served at once")
        t0 = time.time()
        check(connection_closed(stalled, 5), "a stalled connection is closed")
        check(time.time() - t0 < 3, "closed after about the idle timeout")
        # A client trickling bytes does not keep it open either.
        trickle = connect(s.port)
        t0 = time.time()
        closed = False
        for b in b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n":
            try:
                trickle.sendall(bytes([b]))
            except OSError:
                closed = True
                break
            time.sleep(0.1)
        check(closed or connection_closed(trickle, 3), "a trickling client is closed")
        check(time.time() - t0 < 6, "within a few seconds")


def test_connection_limit():
    with Server("server1.lua", ["--max-connections=2"]) as s:
        # The harness's readiness probe is a connection too: let its close be seen first.
        eq(s.result("simple-service", [0]), {"request-was": 0})
        time.sleep(0.2)
        a, b = connect(s.port), connect(s.port)
        time.sleep(0.1)
        c = connect(s.port)
        check(connection_closed(c, 3), "a connection over the limit is closed")
        a.close()
        b.close()
        time.sleep(0.1)
        eq(s.result("simple-service", [3]), {"request-was": 3})


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
