"""Hostile bytes: random and mutated requests never take the server down or corrupt a scope."""
import json
import random
import socket

from harness import KeepAliveClient, Server, Threads, check, eq, read_response

VALID = (b'POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
         b'Content-Length: 62\r\n\r\n'
         b'{"jsonrpc":"2.0","method":"simple-storage","params":[{}],"id":1}')


def send_garbage(port, data):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    except OSError:
        pass  # the server may reset a connection it refuses
    finally:
        s.close()


def mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randint(0, 3)
        pos = rng.randrange(len(data)) if data else 0
        if op == 0 and data:
            data[pos] = rng.randrange(256)
        elif op == 1:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 2 and data:
            del data[pos:pos + rng.randint(1, 16)]
        else:
            data[pos:pos] = data[pos:pos + rng.randint(1, 64)]
    return bytes(data)


def test_random_and_mutated_requests():
    rng = random.Random(20261126)  # fixed seed: a failure is reproducible
    with Server("server5.lua", ["--idle-timeout=1"]) as s:
        before = s.result("simple-storage", [{}])["requests"]
        for i in range(300):
            if i % 3 == 0:
                data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 400)))
            else:
                data = mutate(rng, VALID)
            send_garbage(s.port, data)
        check(s.alive(), "the server is still running")
        after = s.result("simple-storage", [{}])["requests"]
        # Mutants that stay valid requests count too; nothing else may have touched the scope.
        check(after > before, "the counter still works")
        c = KeepAliveClient(s.port)
        eq(c.call("simple-storage", [{}])["result"]["requests"], after + 1, "and counts exactly")
        c.close()


def test_pipelining_past_the_limit_resumes_reading_and_answers_in_order():
    """3000 counter calls pipelined on one connection. Each is answered only once its commit
    is on disk, so the answers owed pile up past the 64 at which the server stops reading: it
    must resume reading again and again to answer them all, in order, each count once. (That
    it stops reading at the limit is checked in spec/unit/http.c,
    pipeline_limit_pauses_and_resumes.)"""
    n = 3000
    with Server("server5.lua") as s:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        body = b'{"jsonrpc":"2.0","method":"simple-storage","params":[{}],"id":%d}'
        reqs = b"".join(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" %
                        (len(body % i), body % i) for i in range(n))
        # Sent by a thread while this one reads the answers: neither side waits on the other.
        sender = Threads()
        sender.start(sock.sendall, reqs)
        rest = b""
        for i in range(n):
            status, _, data, rest = read_response(sock, rest)
            eq((status, json.loads(data)), (200, {"jsonrpc": "2.0", "id": i,
                                                  "result": {"requests": i + 1}}),
               "response %d" % i)
        sender.join(30)
        sock.close()
