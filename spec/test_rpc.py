"""JSON-RPC 2.0 and the Lua API, against the real binary (spec/scripts/rpc.lua)."""
import json
import os

from harness import SCRIPTS, Server, check, eq

_server = None


def srv():
    global _server
    if _server is None:
        _server = Server(os.path.join(SCRIPTS, "rpc.lua")).start()
    return _server


def post(body):
    status, data = srv().post_raw(body)
    return status, (json.loads(data) if data.strip() else None), data


# -- The examples of the specification (section 7), compared as parsed JSON --

def test_spec_positional_params():
    _, r, _ = post('{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}')
    eq(r, {"jsonrpc": "2.0", "result": 19, "id": 1})
    _, r, _ = post('{"jsonrpc": "2.0", "method": "subtract", "params": [23, 42], "id": 2}')
    eq(r, {"jsonrpc": "2.0", "result": -19, "id": 2})


def test_spec_named_params():
    _, r, _ = post('{"jsonrpc": "2.0", "method": "subtract", '
                   '"params": {"subtrahend": 23, "minuend": 42}, "id": 3}')
    eq(r, {"jsonrpc": "2.0", "result": 19, "id": 3})
    _, r, _ = post('{"jsonrpc": "2.0", "method": "subtract", '
                   '"params": {"minuend": 42, "subtrahend": 23}, "id": 4}')
    eq(r, {"jsonrpc": "2.0", "result": 19, "id": 4})


def test_spec_notification_is_not_answered():
    status, r, raw = post('{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}')
    eq(status, 204, "status")
    eq(raw, b"", "body")
    status, _, _ = post('{"jsonrpc": "2.0", "method": "foobar"}')
    eq(status, 204, "status for a notification of an unknown method")


def test_spec_method_not_found():
    _, r, _ = post('{"jsonrpc": "2.0", "method": "foobar", "id": "1"}')
    eq(r["error"]["code"], -32601)
    eq(r["id"], "1")


def test_unexposed_method_is_not_found():
    _, r, _ = post('{"jsonrpc": "2.0", "method": "hidden", "id": 7}')
    eq(r["error"]["code"], -32601)


def test_spec_invalid_json():
    _, r, _ = post('{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]')
    eq(r["error"]["code"], -32700)
    eq(r["id"], None)


def test_spec_invalid_request_object():
    _, r, _ = post('{"jsonrpc": "2.0", "method": 1, "params": "bar"}')
    eq(r["error"]["code"], -32600)
    eq(r["id"], None)


def test_spec_batch_invalid_json():
    _, r, _ = post('[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
                   '{"jsonrpc": "2.0", "method"]')
    eq(r["error"]["code"], -32700)


def test_spec_empty_batch():
    _, r, _ = post("[]")
    check(isinstance(r, dict), "an empty batch gets one error object, not an array")
    eq(r["error"]["code"], -32600)
    eq(r["id"], None)


def test_spec_invalid_batches():
    _, r, _ = post("[1]")
    eq([e["error"]["code"] for e in r], [-32600])
    _, r, _ = post("[1,2,3]")
    eq([e["error"]["code"] for e in r], [-32600] * 3)
    eq([e["id"] for e in r], [None] * 3)


def test_spec_mixed_batch():
    _, r, _ = post('''[
        {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
        {"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        {"jsonrpc": "2.0", "method": "get_data", "id": "9"}
    ]''')
    eq(r[0], {"jsonrpc": "2.0", "result": 7, "id": "1"})
    eq(r[1], {"jsonrpc": "2.0", "result": 19, "id": "2"})
    eq(r[2]["error"]["code"], -32600)
    eq(r[2]["id"], None)
    eq(r[3]["error"]["code"], -32601)
    eq(r[3]["id"], "5")
    eq(r[4], {"jsonrpc": "2.0", "result": ["hello", 5], "id": "9"})
    eq(len(r), 5)


def test_spec_batch_of_notifications():
    status, _, raw = post('[{"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},'
                          '{"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}]')
    eq(status, 204)
    eq(raw, b"")


def test_ids_are_echoed_exactly():
    for text in ['"abc"', '""', '"\\u00e9\\n"', "0", "-5", "123456789012", "1.5", "null"]:
        status, _, raw = post('{"jsonrpc":"2.0","method":"args","id":%s}' % text)
        eq(status, 200)
        check(raw.startswith(('{"jsonrpc":"2.0","id":%s,' % json.dumps(json.loads(text),
                                                                         ensure_ascii=False,
                                                                         separators=(",", ":"))
                              ).encode()), "id %s echoed as %r" % (text, raw))
    _, r, _ = post('{"jsonrpc":"2.0","method":"args","id":{"a":1}}')
    eq(r["error"]["code"], -32600, "an object id is invalid")


def test_invalid_version_and_params():
    _, r, _ = post('{"jsonrpc":"1.0","method":"args","id":1}')
    eq(r["error"]["code"], -32600)
    _, r, _ = post('{"method":"args","id":1}')
    eq(r["error"]["code"], -32600)
    _, r, _ = post('{"jsonrpc":"2.0","method":"args","params":"x","id":1}')
    eq(r["error"]["code"], -32602)
    _, r, _ = post('"just a string"')
    eq(r["error"]["code"], -32600)


# -- Hostile input: the right error, and the server keeps answering --

def test_deep_nesting_is_a_parse_error():
    _, r, _ = post("[" * 100000 + "]" * 100000)
    eq(r["error"]["code"], -32700)
    _, r, _ = post('{"jsonrpc":"2.0","method":"echo","params":[' + "[" * 100000 + "]" * 100000 +
                   '],"id":1}')
    eq(r["error"]["code"], -32700)
    eq(srv().result("sum", [1, 2]), 3)


def test_invalid_utf8_is_a_parse_error():
    _, r, _ = post(b'{"jsonrpc":"2.0","method":"echo","params":["\xff\xfe"],"id":1}')
    eq(r["error"]["code"], -32700)
    eq(srv().result("sum", [1, 2]), 3)


def test_non_string_method():
    for m in ["1", "null", "[]", "{}", "true"]:
        _, r, _ = post('{"jsonrpc":"2.0","method":%s,"id":1}' % m)
        eq(r["error"]["code"], -32600, "method %s" % m)


def test_integers_beyond_2_53_are_rejected():
    for n in ["9007199254740993", "-9007199254740993", "123456789012345678901234567890"]:
        _, r, _ = post('{"jsonrpc":"2.0","method":"echo","params":[%s],"id":1}' % n)
        eq(r["error"]["code"], -32602, "integer %s" % n)
    # 2^53 itself is exact.
    eq(srv().result("echo", [9007199254740992]), 9007199254740992)
    eq(srv().result("sum", [1, 2]), 3)


# -- The JSON <-> Lua mapping --

def test_values_keep_their_kind():
    v = {"a": [], "b": {}, "c": [1, {"d": None}], "e": "x\u00e9\u4e2d\U0001F600", "f": True,
         "g": False, "h": -12, "i": 0.25, "j": "a\u0000b"}
    eq(srv().result("echo", [v]), v)
    _, _, raw = post('{"jsonrpc":"2.0","method":"echo","params":[[]],"id":1}')
    check(b'"result":[]' in raw, raw)
    _, _, raw = post('{"jsonrpc":"2.0","method":"echo","params":[{}],"id":1}')
    check(b'"result":{}' in raw, raw)


def test_number_formatting():
    _, _, raw = post('{"jsonrpc":"2.0","method":"numbers","id":1}')
    check(b'"result":[0.1,1e+300,-0.5,9007199254740992,0.3333333333333333,2,0]' in raw, raw)
    eq(srv().result("echo", [2.0]), 2)
    # Integral values that a double holds exactly, up to int64's ends, without an exponent.
    for n in ["9223372036854774784", "-9223372036854775808", "9210000000000000000"]:
        _, _, raw = post('{"jsonrpc":"2.0","method":"echo","params":[%s],"id":1}' % n)
        check(b'"result":' + n.encode() + b"}" in raw, raw)


def test_params_shapes():
    eq(srv().result("args", [1, 2, 3]), 3)
    eq(srv().result("args", {"a": 1}), 1)
    eq(srv().result("args"), 0)
    eq(srv().result("types", [None]), "userdata")  # mp.null


def test_null_and_empty_tables():
    _, _, raw = post('{"jsonrpc":"2.0","method":"null","id":1}')
    check(b'"result":{"a":null}' in raw, raw)
    _, _, raw = post('{"jsonrpc":"2.0","method":"empty_array","id":1}')
    check(b'"result":[]' in raw, raw)
    _, _, raw = post('{"jsonrpc":"2.0","method":"empty_object","id":1}')
    check(b'"result":{}' in raw, raw)
    _, _, raw = post('{"jsonrpc":"2.0","method":"object_marked","id":1}')
    check(b'"result":{"1":"one"}' in raw, raw)


def test_unencodable_results_name_the_path():
    cases = {"bad_result": "cannot encode a function at result.f",
             "nan": "NaN at result.x", "inf": "infinity at result",
             "mixed": "mixed", "sparse": "mixed", "cycle": "cycle",
             "bad_utf8": "UTF-8"}
    for method, fragment in cases.items():
        r = srv().rpc(method)
        eq(r["error"]["code"], -32603, method)
        check(fragment in r["error"]["message"], "%s: %r" % (method, r["error"]["message"]))
    eq(srv().result("sum", [1]), 1)


# -- Handler errors and the Lua API --

def test_handler_error_is_32000_with_the_message():
    r = srv().rpc("raise", ["text"])
    eq(r["error"], {"code": -32000, "message": "text"})
    r = srv().rpc("raise_table")
    eq(r["error"]["code"], -32000)


def test_debug_logging_keeps_position_and_traceback():
    with Server(os.path.join(SCRIPTS, "rpc.lua"), ["--logging=debug"]) as s:
        r = s.rpc("raise", ["text"])
        eq(r["error"]["code"], -32000)
        check(r["error"]["message"].startswith("rpc.lua:") and
              r["error"]["message"].endswith(": text"), r)
        check("stack traceback" in r["error"]["data"], r)
        r = s.rpc("raise_obj")
        eq(r["error"]["data"], {"why": "because"})


def test_mp_error_chooses_the_error():
    r = srv().rpc("raise_obj")
    eq(r["error"], {"code": -32050, "message": "custom failure", "data": {"why": "because"}})


def test_handler_may_not_yield_but_may_use_coroutines():
    r = srv().rpc("yield")
    eq(r["error"]["code"], -32603)
    eq(srv().result("inner_coroutine"), [2, 20])


def test_require_sibling_module():
    eq(srv().result("sibling"), "from sibling")


def test_scope_outside_handler_is_a_clear_error():
    r = srv().result("outside_error")
    eq(r["ok"], False)
    check("only available inside a service handler" in r["message"], r["message"])


def test_mp_log_writes_to_the_log():
    eq(srv().result("log"), True)
    log = srv().read_log()
    check("hello from lua 42" in log and "a warning" in log, log[-500:])


def test_handler_time_limit_is_32003_and_commits_nothing():
    import time
    # Under a supervisor (the compiler on, the hook armed once a handler is late) and in one
    # process (--workers=0: the compiler off, the hook always armed).
    for mode in ([], ["--workers=0"]):
        with Server(os.path.join(SCRIPTS, "slow.lua"), ["--handler-timeout=0.3"] + mode) as s:
            for method in ("spin", "spin_table", "writes_then_spins", "catches_then_writes"):
                t0 = time.time()
                r = s.rpc(method)
                elapsed = time.time() - t0
                eq(r["error"]["code"], -32003, "%s %r" % (method, mode))
                check("timed out" in r["error"]["message"], r)
                check(0.25 < elapsed < 2, "%s answered after %.2fs" % (method, elapsed))
            eq(s.result("read"), {}, "nothing was committed")
            eq(s.result("jit"), not mode, "the compiler is off in one process with a limit")
            check(s.alive(), "no worker was replaced: the hook stopped every handler")
    with Server(os.path.join(SCRIPTS, "slow.lua"), ["--handler-timeout=0", "--workers=0"]) as s:
        eq(s.result("jit"), True, "--handler-timeout=0 turns the JIT compiler on")


# -- mp.error and the encoder's edges (issue #7) --

CODE_ERROR = "mp.error: code must be a nonzero integer in the int32 range"


def test_mp_error_always_answers_an_error():
    for code in (0, 2 ** 32, -2 ** 31 - 1, 2 ** 31, 1.5, "x", None):
        for data in ([], [{"d": 1}]):
            r = srv().rpc("mp_error", [code, "msg"] + data)
            check("result" not in r, "code %r answered a result: %r" % (code, r))
            eq(r["error"]["code"], -32000, "code %r" % (code,))
            check(CODE_ERROR in r["error"]["message"], r)
    for code in (-2 ** 31, 2 ** 31 - 1, 1, -32099):
        r = srv().rpc("mp_error", [code, "msg", {"d": 1}])
        eq(r["error"], {"code": code, "message": "msg", "data": {"d": 1}})
        r = srv().rpc("mp_error", [code, "msg"])
        eq(r["error"], {"code": code, "message": "msg"})
    r = srv().rpc("mp_error", [-32050, 42])
    check("message must be a string" in r["error"]["message"], r)
    r = srv().rpc("mp_error", [-32050])
    eq(r["error"], {"code": -32050, "message": "Server error"})


def test_error_objects_nested_forged_and_big():
    eq(srv().rpc("nested_error")["error"],
       {"code": -32050, "message": "outer",
        "data": {"code": -32051, "message": "inner", "data": {"n": 1}}})
    eq(srv().rpc("rethrown_error")["error"], {"code": -32052, "message": "again"})
    for code in (0, 2 ** 40, 1.5, "x"):
        r = srv().rpc("forged_error", [code])
        check("result" not in r, r)
        eq(r["error"]["code"], -32603, "forged code %r" % (code,))
        check("code must be a nonzero integer" in r["error"]["message"], r)
    eq(srv().rpc("forged_error", [7])["error"], {"code": 7, "message": "forged"})
    r = srv().rpc("big_error_data", [3000000])
    eq((r["error"]["code"], len(r["error"]["data"])), (-32050, 3000000))


def test_number_keys_under_object_mark():
    _, _, raw = post('{"jsonrpc":"2.0","method":"number_keys","id":1}')
    eq(raw, b'{"jsonrpc":"2.0","id":1,"result":{"1":"c","1.7976931348623157e+308":"d",'
            b'"1e+300":"a","9007199254740992":"b"}}\n')
    r = srv().rpc("duplicate_keys")
    eq(r["error"]["code"], -32603)
    check("duplicate key" in r["error"]["message"] and "result.x.1" in r["error"]["message"], r)


def test_deep_nesting_both_ways():
    depth = 100000
    _, r, _ = post('{"jsonrpc":"2.0","method":"echo","params":[' + "[" * depth + "]" * depth +
                   '],"id":1}')
    eq(r["error"]["code"], -32700)
    r = srv().rpc("deep_result", [depth])
    eq(r["error"]["code"], -32603)
    check("nesting deeper" in r["error"]["message"], r)
    _, raw = srv().post_raw('{"jsonrpc":"2.0","method":"deep_result","params":[2000],"id":1}')
    eq(raw, b'{"jsonrpc":"2.0","id":1,"result":' + b"[" * 2000 + b"{}" + b"]" * 2000 + b"}\n",
       "2000 levels encode")


def test_endless_plain_forms_are_an_error_not_a_crash():
    r = srv().rpc("endless_plain")
    eq(r["error"]["code"], -32603)
    # Whichever bound comes first: the encoder's own, or the Lua stack's.
    check("nesting too deep" in r["error"]["message"] or
          "stack exhausted" in r["error"]["message"], r)
    eq(srv().rpc("echo", [1])["result"], 1, "the server is still up")


def test_cycles_through_a_scope_are_errors_naming_the_path():
    r = srv().rpc("scope_cycle")
    eq(r["error"]["code"], -32000)
    check("cycle" in r["error"]["message"] and "global.me" in r["error"]["message"], r)
    r = srv().rpc("scope_self_table")
    check("cycle" in r["error"]["message"] and "global.t.self" in r["error"]["message"], r)


def test_zz_clean_shutdown():
    global _server
    s = srv()
    _server = None
    s.stop()
