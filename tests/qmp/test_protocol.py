"""The sans-IO protocol core: QEMU 7.2's answers to every malformed-input case of the reference."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.qmp.protocol import (
    MAX_NESTING,
    ConnState,
    JSONStreamer,
    Output,
    QMPConnection,
    Request,
    dumps,
)

VERSION = {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "snaplab"}


def feed(conn: QMPConnection, data: bytes) -> list[object]:
    out: list[object] = []
    for item in conn.receive(data):
        out.append(json.loads(item.data) if isinstance(item, Output) else item)
    return out


def negotiated() -> QMPConnection:
    c = QMPConnection(VERSION)
    assert feed(c, b'{"execute": "qmp_capabilities"}\n') == [{"return": {}}]
    return c


def test_greeting_and_negotiation() -> None:
    c = QMPConnection(VERSION)
    assert c.greeting() == (b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
                            b'"package": "snaplab"}, "capabilities": ["oob"]}}\r\n')
    expecting = {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}
    assert feed(c, b'{"execute": "query-status"}') == [{"error": expecting}]
    assert feed(c, b'{"execute": "snapshot-save", "id": 5}') == [{"id": 5, "error": expecting}]
    assert c.event("STOP", None, 1, 2) is None  # no events before negotiation
    assert feed(c, b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}') == [{"return": {}}]
    assert c.oob_enabled and c.state == ConnState.COMMANDS
    (again,) = feed(c, b'{"execute": "qmp_capabilities"}')  # the monitor validates it, then refuses it
    assert isinstance(again, Request) and again.execute == "qmp_capabilities"
    assert c.event("STOP", None, 1, 2) == b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}\r\n'


@pytest.mark.parametrize("line,replies", [
    (b'{"execute": query-status}', [{"error": {"class": "GenericError", "desc": "JSON parse error, stray '-s'"}},
                                   {"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}]),
    (b'{"execute": "query-status",}', [{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}]),
    (b"@@@", [{"error": {"class": "GenericError", "desc": "JSON parse error, stray '@'"}}]),
    (b'{"exec-oob": "query-status", "id": "o1"}',
     [{"id": "o1", "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}]),
    (b"[1, 2]", [{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}]),
    (b'{"foo": 1}', [{"error": {"class": "GenericError", "desc": "QMP input member 'foo' is unexpected"}}]),
    (b'{"execute": 1}', [{"error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}]),
    (b'{"execute": "query-status", "arguments": []}',
     [{"error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}]),
    (b'{"execute": "query-status", "bogus": 1}',
     [{"error": {"class": "GenericError", "desc": "QMP input member 'bogus' is unexpected"}}]),
    (b'{"arguments": {}}', [{"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}]),
    (b'{"execute": "x", "arguments": {"a": tru}}',
     [{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'tru'"}}]),
    (b'{"execute" "x"}', [{"error": {"class": "GenericError", "desc": "JSON parse error, missing : in object pair"}}]),
    (b'{1: 2}', [{"error": {"class": "GenericError", "desc": "JSON parse error, key is not a string in object"}}]),
    (b'{"execute": "x", "arguments": {"a": [1 2]}}',
     [{"error": {"class": "GenericError", "desc": "JSON parse error, expected separator in array"}}]),
])
def test_malformed_input_like_qemu(line: bytes, replies: list[object]) -> None:
    c = negotiated()
    assert feed(c, line + b"\n") == replies
    assert isinstance(feed(c, b'{"execute": "query-status"}')[0], Request)  # still serving


def test_single_quotes_ids_and_unicode() -> None:
    c = negotiated()
    (r,) = feed(c, b"{'execute': 'query-status', 'id': 'it\\'s'}")
    assert isinstance(r, Request) and r.id == "it's"
    assert feed(c, b"{'execute': 'query-status', 'id': 'it''s'}") == [
        {"error": {"class": "GenericError", "desc": "JSON parse error, expected separator in dict"}}]
    (r,) = feed(c, b"{'execute': 'query-\\'x', 'id': {\"any\": [\"json\", 1]}}")
    assert isinstance(r, Request) and r.execute == "query-'x" and r.id == {"any": ["json", 1]}
    assert c.success(r, {"s": "sp ace/\u00fcn\u00ef"}) == (
        b'{"return": {"s": "sp ace/\\u00FCn\\u00EF"}, "id": {"any": ["json", 1]}}\r\n')
    assert c.error(r, "GenericError", "x") == b'{"id": {"any": ["json", 1]}, "error": {"class": "GenericError", "desc": "x"}}\r\n'
    (r,) = feed(c, '{"execute": "h", "arguments": {"s": "\u00e9\\u00e9\\ud83d\\ude00"}}'.encode())
    assert isinstance(r, Request) and r.arguments["s"] == "\u00e9\u00e9\U0001F600"
    assert dumps("\U0001F600\x01") == '"\\uD83D\\uDE00\\u0001"'


def test_texts_and_numbers_as_qemu_7_2_answered() -> None:
    """Each answer here is what the real QEMU 7.2 gave on its QMP socket (2026-12-07); the
    same inputs run against it in tests/conformance/test_qemu_differential.py."""
    c = negotiated()
    for raw, desc in ((b'{"execute": "q", "id": "\\ud800"}', "\\ud800 is not a valid Unicode character"),
                      (b'{"execute": "q", "id": "\\udc00x"}', "\\udc00 is not a valid Unicode character")):
        assert feed(c, raw) == [{"error": {"class": "GenericError", "desc": f"JSON parse error, {desc}"}}]
    (r,) = feed(c, b'{"execute": "q", "id": "\\u0000"}')  # a character, echoed as written
    assert isinstance(r, Request) and r.id == "\x00"
    assert c.success(r, {}) == b'{"return": {}, "id": "\\u0000"}\r\n'
    out = feed(c, b'{"execute": "q", "id": "a\x00b"}')  # the stray token shown up to the NUL
    assert out[0] == {"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"a'"}}
    assert [dumps(v) for v in (1500.0, 1e308, 1.2345678901234568e+29, 0.1, -2.5)] == [
        "1500", "1e+308", "1.2345678901234568e+29", "0.1", "-2.5"]


def test_split_batched_and_unterminated() -> None:
    c = negotiated()
    msg = b'{"execute": "query-status", "id": 1}'
    out: list[object] = []
    for i in range(len(msg)):
        out += feed(c, msg[i:i + 1])
    assert len(out) == 1 and isinstance(out[0], Request) and out[0].id == 1
    out = feed(c, msg + msg + b"\n" + msg)
    assert [o.id for o in out if isinstance(o, Request)] == [1, 1, 1]
    # An unterminated object swallows what follows until the braces balance, then fails once.
    assert feed(c, b'{"execute": "query-status"\n') == []
    assert feed(c, b'{"execute": "query-status"}\n') == []
    assert feed(c, b"}\n") == [{"error": {"class": "GenericError", "desc": "JSON parse error, expected separator in dict"}}]


def test_limits_close_the_connection() -> None:
    c = negotiated()
    deep = b"[" * (MAX_NESTING + 1)
    items = c.receive(deep)
    assert isinstance(items[-1], Output) and items[-1].close
    assert json.loads(items[-1].data)["error"]["desc"] == "JSON nesting depth limit exceeded"
    assert c.state == ConnState.CLOSED and c.receive(b'{"execute": "query-status"}') == []
    s = JSONStreamer(max_message=1000)
    res = s.feed(b'{"execute": "' + b"x" * 2000)
    assert res and res[0].fatal and "size limit" in (res[0].error or "")


def test_numbers_and_keywords() -> None:
    s = JSONStreamer()
    vals = [r.value for r in s.feed(b'[0, -1, 1.5e3, 123456789012345678901234, true, false, null, "a\\/b"]')]
    assert vals == [[0, -1, 1500.0, float(123456789012345678901234), True, False, None, "a/b"]]
    assert [r.error for r in s.feed(b"[01]")] == ["JSON parse error, expected separator in array"]
    assert s.feed(b"-x")[0].error == "JSON parse error, stray '-x'"
    assert JSONStreamer().feed(b'"\\q"')[0].error == "JSON parse error, stray '\"\\q'"


_FRAGMENTS = [b"{", b"}", b"[", b"]", b":", b",", b" ", b"\n", b"\t", b'"execute"', b'"id"', b'"a b/c"', b"'q'",
              b'"\\u00e9"', b'"\xc3\xa9"', b'"\x01"', b"1", b"-0", b"01", b"1.5e3", b"1e400", b"-", b"1.",
              b"123456789012345678901234", b"18446744073709551616", b"true", b"tru", b"null", b"NaN",
              b"Infinity", b"@", b"\x7f", b'"\x7f"', b'{"execute": "query-status"}', b'{"a": [1, {"b": null}]}']


def _results(s: JSONStreamer, chunks: list[bytes]) -> list[tuple[str, str | None, bool]]:
    out = []
    for chunk in chunks:
        out += s.feed(chunk)
    out += s.end_of_input()
    return [(repr(r.value), r.error, r.fatal) for r in out]


_VALUES = [b"1", b"-0", b"01", b"1.5e3", b"1E-2", b"1e400", b"-1e400", b"1.", b"-", b"123456789012345678901234",
           b"18446744073709551615", b"18446744073709551616", b"-9223372036854775809", b"true", b"tru", b"null",
           b"NaN", b"Infinity", b"-Infinity", b'"s"', b'"\x01"', b'"\x7f"', b"[]", b"{}", b'{"k": 1, "k": 2}']
_objects = st.lists(st.tuples(st.sampled_from([b'"k"', b'"id"', b"1", b'""']), st.sampled_from(_VALUES),
                              st.sampled_from([b"", b" ", b"\n"])), min_size=0, max_size=4).map(
    lambda kvs: b"{" + b", ".join(k + b":" + w + v for k, v, w in kvs) + b"}")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(_objects, _objects, st.sampled_from([b" ", b"\n"]), st.sampled_from(_FRAGMENTS),
                          st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                                       | st.text(max_size=8),
                                       lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4),
                                                                                                 kids, max_size=3),
                                       max_leaves=8).map(lambda v: json.dumps({"v": v}).encode())),
                max_size=12),
       st.lists(st.integers(min_value=0, max_value=400), max_size=4))
def test_fast_path_answers_as_the_lexer(parts: list[bytes], cuts: list[int]) -> None:
    """Whatever the bytes and however they are split, the C-scanner fast path gives the same
    values and errors, in the same order, as QEMU's lexer and parser alone."""
    data = b"".join(parts)
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    slow = JSONStreamer()
    slow.fast = False
    assert _results(JSONStreamer(), chunks) == _results(slow, chunks)


def test_fast_path_takes_plain_requests_and_leaves_the_rest() -> None:
    """The fast path is really taken for a plain request (the lexer never sees it), and
    left for what it cannot judge (single quotes, escapes)."""
    s = JSONStreamer()
    seen: list[bytes] = []
    lex = s._number_step  # any lexer activity on a number would go through here

    def spy(c: int) -> str:
        seen.append(bytes([c]))
        return lex(c)

    s._number_step = spy  # type: ignore[method-assign]
    (r,) = s.feed(b'{"execute": "x", "id": 12}\n')
    assert r.value == {"execute": "x", "id": 12} and seen == []
    (r,) = s.feed(b"{'execute': 'x', 'id': 12}\n")
    assert r.value == {"execute": "x", "id": 12} and seen != []


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_strings_are_written_as_qemu_writes_them(s: str) -> None:
    """qobject_to_json()'s strings: JSON escapes, uppercase \\uXXXX for everything outside
    printable ASCII (DEL included); checked against Python's encoder, adjusted to that."""
    expected = re.sub(r"\\u([0-9a-f]{4})", lambda m: "\\u" + m.group(1).upper(), json.dumps(s))
    assert dumps(s) == expected.replace("\x7f", "\\u007F")
