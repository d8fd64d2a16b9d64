"""QMP's wire protocol, sans I/O: bytes in, requests out; replies and events to bytes.

Mirrors QEMU's JSON lexer, streamer and parser (qobject/json-lexer.c, json-streamer.c,
json-parser.c) closely enough to answer malformed input the way QEMU 7.2 does, and the
request checks of qapi/qmp-dispatch.c.  What it owns:

* :class:`JSONStreamer`: UTF-8 bytes, possibly split or batched arbitrarily, to complete JSON
  values or parse errors ("JSON parse error, ..."), with QEMU's recovery after a stray
  character (skip to the next structural character or control character), single-quoted
  strings, and limits on message size and nesting.
* :class:`QMPConnection`: the per-connection negotiation state (one table,
  :data:`ALLOWED`), request validation, and serialisation in QEMU's exact format (ASCII with
  uppercase ``\\uXXXX``, ``", "`` and ``": "`` separators, CRLF, ``id`` last in a success and
  first in an error).

No sockets, threads or asyncio here (transport.py and client.py wrap it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from emulator.errors import JSONParseError

MAX_MESSAGE = 16 << 20  # bytes in one JSON message
MAX_NESTING = 1024  # QEMU's MAX_NESTING
MAX_TOKENS = 2 << 20  # QEMU's MAX_TOKEN_COUNT

_STRUCTURAL = set(b"[]{}:,")
_WS = set(b" \t\r\n")
_WS_TEXT = " \t\r\n"


class _Tok(Enum):
    LCURLY = "{"
    RCURLY = "}"
    LSQUARE = "["
    RSQUARE = "]"
    COLON = ":"
    COMMA = ","
    INTEGER = "int"
    FLOAT = "float"
    KEYWORD = "keyword"
    STRING = "string"


@dataclass
class _Token:
    kind: _Tok
    text: bytes


class _Lex(Enum):
    """The lexer's state (json-lexer.c's IN_START, IN_DQ_STRING/IN_SQ_STRING, the number
    states, IN_KEYWORD, IN_RECOVERY)."""

    START = "start"
    STRING = "string"
    NUMBER = "number"
    KEYWORD = "keyword"
    RECOVERY = "recovery"


class _Num(Enum):
    """Where a number token is (json-lexer.c's number states), and the two ends of one:
    DONE (the character after it ends it) and ERROR (the character cannot follow)."""

    SIGN = "sign"  # IN_SIGN: '-'
    ZERO = "zero"  # IN_ZERO: a leading 0
    DIGITS = "digits"  # IN_DIGITS
    MANTISSA = "mantissa"  # IN_MANTISSA: after '.'
    MANTISSA_DIGITS = "mantissa digits"  # IN_MANTISSA_DIGITS
    EXP_E = "exp e"  # IN_EXP_E: after 'e' or 'E'
    EXP_SIGN = "exp sign"  # IN_EXP_SIGN
    EXP_DIGITS = "exp digits"  # IN_EXP_DIGITS
    DONE = "done"
    ERROR = "error"


# The members as module constants: the lexer compares them per byte, and a global is several
# times quicker to load than an Enum class attribute.
_START, _STRING, _NUMBER, _KEYWORD, _RECOVERY = (_Lex.START, _Lex.STRING, _Lex.NUMBER, _Lex.KEYWORD,
                                                 _Lex.RECOVERY)
_SIGN, _ZERO, _DIGITS, _MANTISSA, _MANTISSA_DIGITS = (_Num.SIGN, _Num.ZERO, _Num.DIGITS, _Num.MANTISSA,
                                                      _Num.MANTISSA_DIGITS)
_EXP_E, _EXP_SIGN, _EXP_DIGITS, _DONE, _ERROR = (_Num.EXP_E, _Num.EXP_SIGN, _Num.EXP_DIGITS, _Num.DONE,
                                                 _Num.ERROR)
_FLOAT_END = frozenset({_MANTISSA_DIGITS, _EXP_DIGITS})  # a number that stops here is a float
_NUMBER_END = frozenset({_ZERO, _DIGITS, _MANTISSA_DIGITS, _EXP_DIGITS})  # a complete number


@dataclass
class ParseResult:
    value: Any = None
    error: str | None = None
    fatal: bool = False  # a limit was exceeded: reply, then close


class JSONStreamer:
    """Lexer + streamer + parser, fed incrementally."""

    def __init__(self, max_message: int = MAX_MESSAGE, max_nesting: int = MAX_NESTING) -> None:
        self.max_message = max_message
        self.max_nesting = max_nesting
        self._tokens: list[_Token] = []
        self._size = 0
        self._brace = 0
        self._bracket = 0
        self._cur = bytearray()  # text of the token being lexed
        self._state = _START
        self._quote = 0
        self._escape = 0  # 0 none, 1 after backslash, 2.. inside \\uXXXX
        self._num = _DIGITS  # where a number token is (in the NUMBER state)
        self.fast = True  # whole simple objects go through _feed_fast

    # -- lexer (json_lexer_feed_char) ---------------------------------------------------
    def feed(self, data: bytes) -> list[ParseResult]:
        """Every message (or error) that ``data`` completes, in order."""
        out: list[ParseResult] = []
        if self.fast and self._state is _START and not self._tokens:
            data = self._feed_fast(data, out)
        i = 0
        n = len(data)
        while i < n:  # each step lexes bytes until the state changes
            st = self._state
            if st is _START:
                i = self._lex_start(data, i, out)
            elif st is _STRING:
                i = self._lex_string(data, i, out)
            elif st is _NUMBER:
                i = self._lex_number(data, i, out)
            elif st is _KEYWORD:
                i = self._lex_keyword(data, i, out)
            else:
                i = self._lex_recovery(data, i)
        return out

    def _lex_recovery(self, data: bytes, i: int) -> int:
        """After a stray byte: skip to a structural or control byte, which starts a token."""
        n = len(data)
        while i < n:
            c = data[i]
            if c in _STRUCTURAL or c < 0x20 or c >= 0xFE:
                self._state = _START
                return i  # lookahead: lexed again as a token start
            i += 1
        return i

    def _lex_start(self, data: bytes, i: int, out: list[ParseResult]) -> int:
        """Between tokens: white space, a structural character, or the first byte of a token."""
        n = len(data)
        while i < n and self._state is _START:
            c = data[i]
            i += 1
            if c in _WS:
                continue
            if c in _STRUCTURAL:
                self._emit(_Token(_Tok(chr(c)), bytes([c])), out)
            elif c in (0x22, 0x27):
                self._state, self._quote, self._escape = _STRING, c, 0
                self._cur = bytearray([c])
            elif c == 0x2D or 0x30 <= c <= 0x39:
                self._state = _NUMBER
                self._cur = bytearray([c])
                self._num = _SIGN if c == 0x2D else (_ZERO if c == 0x30 else _DIGITS)
            elif 0x61 <= c <= 0x7A:
                self._state = _KEYWORD
                self._cur = bytearray([c])
            else:
                self._lex_error(bytes([c]), out)
        return i

    def _lex_string(self, data: bytes, i: int, out: list[ParseResult]) -> int:
        """Inside a double- or single-quoted string, escapes included."""
        n = len(data)
        while i < n and self._state is _STRING:
            c = data[i]
            i += 1
            self._cur.append(c)
            if len(self._cur) > self.max_message:
                self._limit("JSON token size limit exceeded", out)
                continue
            if self._escape == 1:
                if c in b"\"'\\/bfnrt":
                    self._escape = 0
                elif c == 0x75:
                    self._escape = 2
                else:
                    self._lex_error(bytes(self._cur), out)
            elif self._escape >= 2:
                if chr(c) in "0123456789abcdefABCDEF":
                    self._escape = 0 if self._escape == 5 else self._escape + 1
                else:
                    self._lex_error(bytes(self._cur), out)
            elif c == 0x5C:
                self._escape = 1
            elif c == self._quote:
                self._state = _START
                self._emit(_Token(_Tok.STRING, bytes(self._cur)), out)
            elif c < 0x20 or c >= 0xFE:
                self._lex_error(bytes(self._cur), out)
        return i

    def _lex_keyword(self, data: bytes, i: int, out: list[ParseResult]) -> int:
        """Lower-case letters; the first other byte ends the keyword and is lexed again."""
        n = len(data)
        while i < n and self._state is _KEYWORD:
            c = data[i]
            if 0x61 <= c <= 0x7A:
                self._cur.append(c)
                i += 1
                if len(self._cur) > 64:
                    self._lex_error(bytes(self._cur), out)
                continue
            self._state = _START
            self._emit(_Token(_Tok.KEYWORD, bytes(self._cur)), out)
        return i

    def _lex_number(self, data: bytes, i: int, out: list[ParseResult]) -> int:
        """A number, through :meth:`_number_step`; the byte that ends it is lexed again."""
        n = len(data)
        while i < n and self._state is _NUMBER:
            c = data[i]
            nxt = self._number_step(c)
            if nxt is _ERROR:
                i += 1
                self._cur.append(c)
                self._lex_error(bytes(self._cur), out)
            elif nxt is _DONE:
                self._state = _START
                kind = _Tok.FLOAT if self._num in _FLOAT_END else _Tok.INTEGER
                self._emit(_Token(kind, bytes(self._cur)), out)
            else:
                self._num = nxt
                self._cur.append(c)
                i += 1
                if len(self._cur) > 1024:
                    self._lex_error(bytes(self._cur), out)
        return i

    def _feed_fast(self, data: bytes, out: list[ParseResult]) -> bytes:
        """Whole objects at the start of ``data``, parsed by the C ``json`` scanner where it
        cannot differ from QEMU's: ASCII, no escape and no single quote anywhere, shorter than
        the size limit, fewer brackets than the nesting limit, and every number and keyword
        accepted as QEMU accepts it.  Anything else (an error, a partial object, a value that
        is not an object) is left, from its first byte, to the lexer: it gives QEMU's answer."""
        if (len(data) >= self.max_message or not data.isascii() or b"\\" in data or b"'" in data
                or data.count(b"{") + data.count(b"[") > self.max_nesting):
            return data
        text = data.decode("ascii")
        pos, n = 0, len(text)
        while True:
            while pos < n and text[pos] in _WS_TEXT:
                pos += 1
            if pos == n or text[pos] != "{":
                return data[pos:]
            try:
                value, end = _DECODER.raw_decode(text, pos)
            except (ValueError, RecursionError, JSONParseError):
                return data[pos:]
            out.append(ParseResult(value=value))
            pos = end

    def _number_step(self, c: int) -> _Num:
        """The number state after byte ``c`` (json-lexer.c's number transitions)."""
        d = 0x30 <= c <= 0x39
        s = self._num
        if s is _SIGN:
            return _ZERO if c == 0x30 else (_DIGITS if d else _ERROR)
        if s is _ZERO:
            if c == 0x2E:
                return _MANTISSA
            if c in (0x65, 0x45):
                return _EXP_E
            return _DONE
        if s is _DIGITS:
            if d:
                return _DIGITS
            if c == 0x2E:
                return _MANTISSA
            if c in (0x65, 0x45):
                return _EXP_E
            return _DONE
        if s is _MANTISSA:
            return _MANTISSA_DIGITS if d else _ERROR
        if s is _MANTISSA_DIGITS:
            if d:
                return _MANTISSA_DIGITS
            if c in (0x65, 0x45):
                return _EXP_E
            return _DONE
        if s is _EXP_E:
            if c in (0x2B, 0x2D):
                return _EXP_SIGN
            return _EXP_DIGITS if d else _ERROR
        if s is _EXP_SIGN:
            return _EXP_DIGITS if d else _ERROR
        if s is _EXP_DIGITS:
            return _EXP_DIGITS if d else _DONE
        return _ERROR

    def end_of_input(self) -> list[ParseResult]:
        """The peer closed: flush a pending token and parse what is left (json_lexer_flush)."""
        out: list[ParseResult] = []
        if self._state is _STRING or (self._state is _NUMBER and self._num not in _NUMBER_END):
            # QEMU flushes its lexer with a NUL byte, which no pending token accepts.
            self._lex_error(bytes(self._cur), out)
            self._state = _START
        elif self._state is _KEYWORD:
            self._state = _START
            self._emit(_Token(_Tok.KEYWORD, bytes(self._cur)), out)
        elif self._state is _NUMBER:
            self._state = _START
            kind = _Tok.FLOAT if self._num in _FLOAT_END else _Tok.INTEGER
            self._emit(_Token(kind, bytes(self._cur)), out)
        if self._tokens:
            out.append(self._parse_and_reset())
        return out

    def _lex_error(self, text: bytes, out: list[ParseResult]) -> None:
        self._state = _RECOVERY
        self._reset()
        # QEMU quotes the token as a C string: up to a NUL byte
        shown = text.split(b"\0", 1)[0].decode("utf-8", "replace")
        out.append(ParseResult(error=f"JSON parse error, stray '{shown}'"))

    def _limit(self, msg: str, out: list[ParseResult]) -> None:
        self._state = _RECOVERY
        self._reset()
        out.append(ParseResult(error=msg, fatal=True))

    def _reset(self) -> None:
        self._tokens = []
        self._size = 0
        self._brace = self._bracket = 0
        self._cur = bytearray()

    # -- streamer (json_message_process_token) ---------------------------------------
    def _emit(self, tok: _Token, out: list[ParseResult]) -> None:
        k = tok.kind
        if k == _Tok.LCURLY:
            self._brace += 1
        elif k == _Tok.RCURLY:
            self._brace -= 1
        elif k == _Tok.LSQUARE:
            self._bracket += 1
        elif k == _Tok.RSQUARE:
            self._bracket -= 1
        if self._size + len(tok.text) + 1 > self.max_message:
            self._limit("JSON token size limit exceeded", out)
            return
        if len(self._tokens) + 1 > MAX_TOKENS:
            self._limit("JSON token count limit exceeded", out)
            return
        if self._brace + self._bracket > self.max_nesting:
            self._limit("JSON nesting depth limit exceeded", out)
            return
        self._tokens.append(tok)
        self._size += len(tok.text)
        if (self._brace > 0 or self._bracket > 0) and self._brace >= 0 and self._bracket >= 0:
            return
        out.append(self._parse_and_reset())

    def _parse_and_reset(self) -> ParseResult:
        toks = self._tokens
        self._reset()
        try:  # one value: QEMU ignores the rest of the message's tokens
            return ParseResult(value=_Parser(toks).value())
        except JSONParseError as err:
            return ParseResult(error=f"JSON parse error, {err}")


class _Parser:
    """json-parser.c: recursive descent over one message's tokens."""

    def __init__(self, toks: list[_Token]) -> None:
        self.toks = toks
        self.pos = 0

    def peek(self) -> _Token | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def pop(self) -> _Token | None:
        t = self.peek()
        if t is not None:
            self.pos += 1
        return t

    def value(self) -> Any:
        t = self.pop()
        if t is None:
            raise JSONParseError("premature EOI")
        k = t.kind
        if k == _Tok.LCURLY:
            self.pos -= 1
            return self.obj()
        if k == _Tok.LSQUARE:
            self.pos -= 1
            return self.arr()
        if k == _Tok.STRING:
            return _string(t.text)
        if k == _Tok.INTEGER:
            return _json_int(t.text.decode())
        if k == _Tok.FLOAT:
            return _json_float(t.text.decode())
        if k == _Tok.KEYWORD:
            kw = t.text.decode()
            if kw == "true":
                return True
            if kw == "false":
                return False
            if kw == "null":
                return None
            raise JSONParseError(f"invalid keyword '{kw}'")
        raise JSONParseError("expecting value")

    def pair(self, d: dict[str, Any]) -> None:
        if self.peek() is None:
            raise JSONParseError("premature EOI")
        key = self.value()
        if not isinstance(key, str):
            raise JSONParseError("key is not a string in object")
        t = self.pop()
        if t is None:
            raise JSONParseError("premature EOI")
        if t.kind != _Tok.COLON:
            raise JSONParseError("missing : in object pair")
        d[key] = self.value()

    def obj(self) -> dict[str, Any]:
        self.pop()
        d: dict[str, Any] = {}
        t = self.peek()
        if t is None:
            raise JSONParseError("premature EOI")
        if t.kind == _Tok.RCURLY:
            self.pop()
            return d
        self.pair(d)
        t = self.pop()
        if t is None:
            raise JSONParseError("premature EOI")
        while t.kind != _Tok.RCURLY:
            if t.kind != _Tok.COMMA:
                raise JSONParseError("expected separator in dict")
            self.pair(d)
            t = self.pop()
            if t is None:
                raise JSONParseError("premature EOI")
        return d

    def arr(self) -> list[Any]:
        self.pop()
        out: list[Any] = []
        t = self.peek()
        if t is None:
            raise JSONParseError("premature EOI")
        if t.kind == _Tok.RSQUARE:
            self.pop()
            return out
        out.append(self.value())
        t = self.pop()
        if t is None:
            raise JSONParseError("premature EOI")
        while t.kind != _Tok.RSQUARE:
            if t.kind != _Tok.COMMA:
                raise JSONParseError("expected separator in array")
            out.append(self.value())
            t = self.pop()
            if t is None:
                raise JSONParseError("premature EOI")
        return out


_ESC = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "/": "/", "\\": "\\", '"': '"', "'": "'"}


def _string(raw: bytes) -> str:
    """parse_string(): quotes and escapes; UTF-8 validated; surrogate pairs joined."""
    body = raw[1:-1]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise JSONParseError("invalid UTF-8 sequence in string") from None
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        e = text[i + 1]
        if e == "u":
            written = text[i + 2:i + 6]
            cp = int(written, 16)
            i += 6
            if 0xD800 <= cp < 0xDC00 and text[i:i + 2] == "\\u":
                lo = int(text[i + 2:i + 6], 16)
                if 0xDC00 <= lo < 0xE000:
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
                    i += 6
            if 0xD800 <= cp < 0xE000:  # (\u0000 is a character, as in QEMU 7.2)
                raise JSONParseError(f"\\u{written} is not a valid Unicode character")
            out.append(chr(cp))
        else:
            out.append(_ESC[e])
            i += 2
    return "".join(out)


def _json_int(text: str) -> int | float:
    """An integer as json-parser.c keeps it: int64, else uint64, else a double."""
    v = int(text)
    return v if -(1 << 63) <= v < (1 << 64) else float(v)


def _json_float(text: str) -> float:
    f = float(text)
    if math.isinf(f):
        raise JSONParseError("number out of range")
    return f


def _json_constant(text: str) -> Any:
    raise JSONParseError(f"invalid keyword '{text}'")  # NaN, Infinity: QEMU has no such keyword


_DECODER = json.JSONDecoder(parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)


# -- output ------------------------------------------------------------------------------
def dumps(obj: Any) -> str:
    """QEMU's qobject_to_json(): ASCII, uppercase \\uXXXX, ", " and ": " separators."""
    parts: list[str] = []
    _dump(obj, parts)
    return "".join(parts)


def _dump(o: Any, out: list[str]) -> None:
    if o is None:
        out.append("null")
    elif o is True:
        out.append("true")
    elif o is False:
        out.append("false")
    elif isinstance(o, int):
        out.append(str(o))
    elif isinstance(o, float):
        # the shortest text that reads back, integral values without ".0" (QEMU's 1500, 1e+308)
        out.append(repr(o).removesuffix(".0") if math.isfinite(o) else "null")
    elif isinstance(o, str):
        _dump_str(o, out)
    elif isinstance(o, dict):
        out.append("{")
        first = True
        for k, v in o.items():
            if not first:
                out.append(", ")
            first = False
            _dump_str(str(k), out)
            out.append(": ")
            _dump(v, out)
        out.append("}")
    elif isinstance(o, (list, tuple)):
        out.append("[")
        for i, v in enumerate(o):
            if i:
                out.append(", ")
            _dump(v, out)
        out.append("]")
    else:
        raise TypeError(f"cannot serialise {type(o).__name__}")


_OUT_ESC = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _dump_str(s: str, out: list[str]) -> None:
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
        out.append(f'"{s}"')  # nothing to escape: printable ASCII is written as it is
        return
    out.append('"')
    for ch in s:
        e = _OUT_ESC.get(ch)
        if e is not None:
            out.append(e)
            continue
        cp = ord(ch)
        if 0x20 <= cp < 0x7F:
            out.append(ch)
        elif cp < 0x10000:
            out.append("\\u%04X" % cp)
        else:
            cp -= 0x10000
            out.append("\\u%04X\\u%04X" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF)))
    out.append('"')


# -- the connection ------------------------------------------------------------------------
class ConnState(Enum):
    NEGOTIATING = "capabilities negotiation"
    COMMANDS = "command mode"
    CLOSED = "closed"


# The negotiation states in one table: the commands a state takes, None for every command
# (QEMU's monitor_qmp_dispatch looks them up in qmp_cap_negotiation_commands until
# qmp_capabilities succeeds, then in qmp_commands, where qmp_capabilities again is the
# # monitor's to refuse: CommandNotFound 'already complete').  A CLOSED connection parses no
# input at all, so takes no command.
ALLOWED: dict[ConnState, frozenset[str] | None] = {
    ConnState.NEGOTIATING: frozenset({"qmp_capabilities"}),
    ConnState.COMMANDS: None,
    ConnState.CLOSED: frozenset(),
}


@dataclass
class Request:
    """A well-formed command, ready for dispatch."""

    execute: str
    arguments: dict[str, Any]
    id: Any = None
    has_id: bool = False
    oob: bool = False


@dataclass
class Output:
    """Bytes to send at once (a reply the protocol itself produced)."""

    data: bytes
    close: bool = False


@dataclass
class QMPConnection:
    """One QMP session's protocol state."""

    version: dict[str, Any]
    capabilities: list[str] = field(default_factory=lambda: ["oob"])
    state: ConnState = ConnState.NEGOTIATING
    oob_enabled: bool = False
    streamer: JSONStreamer = field(default_factory=JSONStreamer)

    def greeting(self) -> bytes:
        return self._line({"QMP": {"version": self.version, "capabilities": list(self.capabilities)}})

    @staticmethod
    def _line(obj: Any) -> bytes:
        return (dumps(obj) + "\r\n").encode("ascii")

    def success(self, req: Request, value: Any) -> bytes:
        msg: dict[str, Any] = {"return": value}
        if req.has_id:
            msg["id"] = req.id
        return self._line(msg)

    def error(self, req: Request | None, cls: str, desc: str) -> bytes:
        msg: dict[str, Any] = {}
        if req is not None and req.has_id:
            msg["id"] = req.id
        msg["error"] = {"class": cls, "desc": desc}
        return self._line(msg)

    def event(self, name: str, data: dict[str, Any] | None, seconds: int, micros: int) -> bytes | None:
        """An event line, or None while negotiating (no events before qmp_capabilities)."""
        if self.state != ConnState.COMMANDS:
            return None
        msg: dict[str, Any] = {"timestamp": {"seconds": seconds, "microseconds": micros}, "event": name}
        if data is not None:
            msg["data"] = data
        return self._line(msg)

    def receive(self, data: bytes) -> list[Request | Output]:
        if self.state == ConnState.CLOSED:
            return []
        return self._process(self.streamer.feed(data))

    def eof(self) -> list[Request | Output]:
        out = self._process(self.streamer.end_of_input())
        self.state = ConnState.CLOSED
        return out

    def _process(self, results: list[ParseResult]) -> list[Request | Output]:
        out: list[Request | Output] = []
        for r in results:
            if r.error is not None:
                out.append(Output(self.error(None, "GenericError", r.error), close=r.fatal))
                if r.fatal:
                    self.state = ConnState.CLOSED
                    break
                continue
            item = self._request(r.value)
            out.append(item)
        return out

    def _request(self, obj: Any) -> Request | Output:
        """qmp_dispatch()'s checks, then negotiation (monitor_qmp_dispatch)."""
        if not isinstance(obj, dict):
            return Output(self.error(None, "GenericError", "QMP input must be a JSON object"))
        req = Request(execute="", arguments={}, id=obj.get("id"), has_id="id" in obj)
        cmd = None
        for key, val in obj.items():
            if key == "execute" or (key == "exec-oob" and self.oob_enabled):
                if not isinstance(val, str):
                    return Output(self.error(req, "GenericError", f"QMP input member '{key}' must be a string"))
                cmd = val
                req.oob = key == "exec-oob"
            elif key == "arguments":
                if not isinstance(val, dict):
                    return Output(self.error(req, "GenericError", "QMP input member 'arguments' must be an object"))
                req.arguments = val
            elif key == "id":
                continue
            else:
                return Output(self.error(req, "GenericError", f"QMP input member '{key}' is unexpected"))
        if cmd is None:
            return Output(self.error(req, "GenericError", "QMP input lacks member 'execute'"))
        req.execute = cmd
        allowed = ALLOWED[self.state]
        if allowed is not None and cmd not in allowed:
            return Output(self.error(req, "CommandNotFound",
                                     "Expecting capabilities negotiation with 'qmp_capabilities'"))
        if self.state == ConnState.NEGOTIATING:
            return self._negotiate(req)
        return req  # to the monitor (qmp_capabilities again: it validates, then refuses it)

    def _negotiate(self, req: Request) -> Output:
        args = req.arguments
        for k in args:
            if k != "enable":
                return Output(self.error(req, "GenericError", f"Parameter '{k}' is unexpected"))
        enable = args.get("enable", [])
        if not isinstance(enable, list):
            return Output(self.error(req, "GenericError", "Invalid parameter type for 'enable', expected: array"))
        for i, cap in enumerate(enable):
            if not isinstance(cap, str):
                return Output(self.error(req, "GenericError",
                                         f"Invalid parameter type for 'enable[{i}]', expected: string"))
            if cap not in ("oob",):
                # QEMU names list elements 'null' in enum errors (input_type_enum)
                return Output(self.error(req, "GenericError", f"Parameter 'null' does not accept value '{cap}'"))
            if cap not in self.capabilities:
                return Output(self.error(req, "GenericError", f"Capability '{cap}' not available"))
        self.oob_enabled = "oob" in enable
        self.state = ConnState.COMMANDS
        return Output(self.success(req, {}))
