"""Startup packets: pgfast._framing.ReadBuffer, parse_startup_parameters and
pgfast.negotiation.interpret, driven the way client.py drives them.

Input: data[0] % 32 = k, the next k bytes are operations, the rest is the byte stream a
client sends. Each operation byte c does (c % 8):
  0 feed the next (c >> 3) + 1 bytes        1 feed the next ((c >> 3) + 1) * 64 bytes
  2 take_startup()                          3 take_message(MAX_LENGTHS[c >> 3 % ...])
  4 first_byte()                            5 size()
  6 take_all()                              7 feed everything left
Then everything left is fed and take_startup() is called until it returns None or
refuses, then take_message(65535) likewise, then take_all().

Every call is checked against a model of the buffer (the bytes fed and not yet taken);
every startup packet taken goes through interpret(), whose result is checked against
the packet (and against PostgreSQL's ProcessStartupPacket where noted). Allowed
exceptions: ProtocolViolation (from the buffer), Refused and BadCancelRequest (from interpret).
"""
from __future__ import annotations

import struct

import _harness
from _harness import fail

with _harness.instrumented():
    from pgfast import _framing, messages, negotiation
    from pgfast.errors import Refused
    import wire_reference

ProtocolViolation = _framing.ProtocolViolation
MAX_LENGTHS = (0, 4, 5, 8, 64, 1000, 65535, 1 << 20, 1 << 24, 2**31 - 1, 2**32 - 1)


def _sqlstate_ok(code) -> bool:
    return isinstance(code, str) and len(code) == 5 and all(c.isdigit() or "A" <= c <= "Z" for c in code)


def check_refusal(refusal: Refused) -> None:
    if not _sqlstate_ok(refusal.sqlstate):
        fail("refused.sqlstate", repr(refusal.sqlstate))
    if not isinstance(refusal.message, str):
        fail("refused.message", repr(refusal.message))
    # what client.py does with it: this must not fail
    messages.error(refusal.sqlstate, refusal.message, detail=refusal.detail)


def _ascii_lower(s: str) -> str:
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in s)


def pg_parse_bool(value: str):
    """PostgreSQL's parse_bool_with_len: True/False, or None when it is not a boolean."""
    low, n = _ascii_lower(value), len(value)
    if n == 0:
        return None
    first = low[0]
    if first == "t" and "true".startswith(low):
        return True
    if first == "f" and "false".startswith(low):
        return False
    if first == "y" and "yes".startswith(low):
        return True
    if first == "n" and "no".startswith(low):
        return False
    if first == "o" and n >= 2 and "on".startswith(low):
        return True
    if first == "o" and n >= 2 and "off".startswith(low):
        return False
    if value in ("1", "0"):
        return value == "1"
    return None


def check_startup_message(minor: int, body: bytes, result) -> None:
    """interpret() on a protocol 3.x packet, against the parameters parsed independently."""
    try:
        params = _framing.parse_startup_parameters(body)
        parsed = ("ok", params)
    except ProtocolViolation as exc:
        parsed = ("violation", str(exc))
    try:
        ref = ("ok", wire_reference.parse_startup_parameters(body))
    except wire_reference.ProtocolViolation as exc:
        ref = ("violation", str(exc))
    if parsed != ref:
        fail("parse_startup_parameters.differs-from-reference", f"cython={parsed!r} reference={ref!r}")
    if parsed[0] == "violation":
        if not (isinstance(result, Refused) and result.sqlstate == "08P01" and result.message == parsed[1]):
            fail("interpret.bad-layout-not-refused", repr(result))
        return
    # bytes-in-str: re-encoding the pairs must give back the body exactly
    rebuilt = b"".join(k.encode("utf-8", "surrogateescape") + b"\0" + v.encode("utf-8", "surrogateescape") + b"\0"
                       for k, v in params) + b"\0"
    if rebuilt != body:
        fail("parse_startup_parameters.not-lossless", f"{body!r} -> {params!r}")
    forwarded = [(k, v) for k, v in params if not k.startswith("_pq_.")]
    values = dict(forwarded)
    user = values.get("user")
    raw_replication = values.get("replication")
    pg_replication = None
    if raw_replication is not None:
        pg_replication = "database" if raw_replication == "database" else pg_parse_bool(raw_replication)
    # ProcessStartupPacket reads every parameter (refusing a bad replication value at once)
    # before it checks that a user name was given
    bad_replication = [v for k, v in forwarded if k == "replication" and v != "database" and pg_parse_bool(v) is None]
    if isinstance(result, Refused):
        if not user and not bad_replication:
            if (result.sqlstate, result.message) != ("28000", "no PostgreSQL user name specified in startup packet"):
                fail("interpret.wrong-refusal-no-user", repr((result.sqlstate, result.message)))
            return
        if result.sqlstate == "22023" and raw_replication is not None:
            if not bad_replication:
                fail("interpret.replication-refused-but-postgresql-accepts",
                     f"replication={raw_replication!r}: PostgreSQL reads it as {pg_replication!r}")
            return
        fail("interpret.unexpected-refusal", repr((result.sqlstate, result.message)))
    if not isinstance(result, negotiation.StartupMessage):
        fail("interpret.wrong-type", repr(result))
    if not user:
        fail("interpret.accepted-without-user", repr(result))
    earlier = [v for k, v in forwarded if k == "replication"][:-1]
    bad_earlier = [v for v in earlier if v != "database" and pg_parse_bool(v) is None]
    if bad_earlier:     # ProcessStartupPacket checks every occurrence, not only the last
        fail("interpret.earlier-invalid-replication-accepted",
             f"replication={bad_earlier[0]!r} then replication={raw_replication!r}: PostgreSQL refuses the first")
    if raw_replication is not None and pg_replication is None:
        fail("interpret.replication-accepted-but-postgresql-refuses",
             f"replication={raw_replication!r} taken as replication={result.replication} "
             f"walsender={result.walsender}")
    expected_physical = pg_replication is True
    expected_walsender = pg_replication is True or pg_replication == "database"
    if raw_replication is not None and pg_replication is not None and (
            result.replication != expected_physical or result.walsender != expected_walsender):
        fail("interpret.replication-differs-from-postgresql",
             f"replication={raw_replication!r}: physical={result.replication} walsender={result.walsender}")
    if result.minor != minor:
        fail("interpret.minor", f"{result.minor} != {minor}")
    if result.params != forwarded:
        fail("interpret.params", f"{result.params!r} != {forwarded!r}")
    if result.unrecognized_options != [k for k, _ in params if k.startswith("_pq_.")]:
        fail("interpret.options", repr(result.unrecognized_options))
    if result.user != user or result.database != (values.get("database") or user):
        fail("interpret.user-database", repr((result.user, result.database)))
    if result.replication and not result.walsender:
        fail("interpret.walsender", repr(result))
    if result.needs_negotiation:
        messages.negotiate_protocol_version(min(minor, negotiation.NEWEST_MINOR), result.unrecognized_options)


def check_interpret(code: int, body: bytes) -> None:
    try:
        result = negotiation.interpret(code, body)
    except Refused as refusal:
        check_refusal(refusal)
        result = refusal
    except negotiation.BadCancelRequest as bad:
        result = bad
    if code == _framing.SSL_REQUEST_CODE:
        if not isinstance(result, negotiation.SSLRequest):
            fail("interpret.ssl", repr(result))
    elif code == _framing.GSSENC_REQUEST_CODE:
        if not isinstance(result, negotiation.GSSENCRequest):
            fail("interpret.gssenc", repr(result))
    elif code == _framing.CANCEL_REQUEST_CODE:
        # PostgreSQL 18's ProcessCancelRequestPacket: a process ID, then a key of 1-256 bytes
        if len(body) < 4:
            if not (isinstance(result, negotiation.BadCancelRequest)
                    and str(result) == "invalid length of cancel request packet"):
                fail("interpret.cancel-length", repr(result))
        elif not 0 < len(body) - 4 <= negotiation.MAX_CANCEL_KEY_LENGTH:
            if not (isinstance(result, negotiation.BadCancelRequest)
                    and str(result) == "invalid length of cancel key in cancel request packet"):
                fail("interpret.cancel-key-length", repr(result))
        else:
            expected = negotiation.CancelRequest(struct.unpack("!i", body[:4])[0], body[4:])
            if result != expected:
                fail("interpret.cancel", f"{result!r} != {expected!r}")
    elif code >> 16 == 3:
        check_startup_message(code & 0xFFFF, body, result)
    elif not (isinstance(result, Refused) and result.sqlstate == "0A000"):
        fail("interpret.unsupported-protocol", f"code {code:#x}: {result!r}")


class Run:
    def __init__(self, stream: bytes):
        self.stream = stream
        self.pos = 0                    # stream bytes fed so far
        self.pending = bytearray()      # fed, not yet taken: what the buffer must hold
        self.buf = _framing.ReadBuffer()

    def feed(self, n: int) -> None:
        chunk = self.stream[self.pos:self.pos + n]
        self.pos += len(chunk)
        self.buf.feed_data(chunk)
        self.pending += chunk
        self.check_size()

    def check_size(self) -> None:
        size = self.buf.size()
        if size != len(self.pending):
            fail("buffer.size", f"size() {size} != {len(self.pending)} bytes fed and not taken")
        first = self.buf.first_byte()
        if first != (self.pending[0] if self.pending else -1):
            fail("buffer.first_byte", f"{first} with {bytes(self.pending[:8])!r} pending")

    def take_startup(self) -> bool:
        """Whether a packet was taken."""
        pending = self.pending
        expected = None
        if len(pending) >= 4:
            length = int.from_bytes(pending[:4], "big")
            if length < _framing.STARTUP_MIN_LENGTH or length > _framing.STARTUP_MAX_LENGTH:
                expected = ("violation", "invalid length of startup packet")
            elif len(pending) >= length:
                expected = ("ok", (int.from_bytes(pending[4:8], "big"), bytes(pending[8:length])))
        try:
            got = self.buf.take_startup()
            got = None if got is None else ("ok", got)
        except ProtocolViolation as exc:
            got = ("violation", str(exc))
        if got != expected:
            fail("take_startup", f"got {got!r}, expected {expected!r} from {bytes(pending[:16])!r}...")
        if got is not None and got[0] == "ok":
            code, body = got[1]
            if len(body) + 8 != int.from_bytes(pending[:4], "big"):
                fail("take_startup.length", f"len(body) + 8 = {len(body) + 8}")
            del self.pending[:len(body) + 8]
            self.check_size()
            check_interpret(code, body)
            return True
        self.check_size()
        return False

    def take_message(self, max_length: int) -> bool:
        pending = self.pending
        expected = None
        if len(pending) >= 5:
            length = int.from_bytes(pending[1:5], "big")
            if length < 4 or length > max_length:
                expected = ("violation", f"invalid message length {length}")
            elif len(pending) >= 1 + length:
                expected = ("ok", (pending[0], bytes(pending[5:1 + length])))
        try:
            got = self.buf.take_message(max_length)
            got = None if got is None else ("ok", got)
        except ProtocolViolation as exc:
            got = ("violation", str(exc))
        if got != expected:
            fail("take_message", f"max_length={max_length}: got {got!r}, expected {expected!r}")
        if got is not None and got[0] == "ok":
            del self.pending[:5 + len(got[1][1])]
        self.check_size()
        return got is not None and got[0] == "ok"

    def take_all(self) -> None:
        data = self.buf.take_all()
        if data != bytes(self.pending):
            fail("take_all", f"{data[:32]!r} != {bytes(self.pending[:32])!r}")
        self.pending.clear()
        self.check_size()


def test_one_input(data: bytes) -> None:
    if not data:
        return
    k = data[0] % 32
    ops, stream = data[1:1 + k], data[1 + k:]
    run = Run(stream)
    for c in ops:
        op, arg = c % 8, c >> 3
        if op == 0:
            run.feed(arg + 1)
        elif op == 1:
            run.feed((arg + 1) * 64)
        elif op == 2:
            run.take_startup()
        elif op == 3:
            run.take_message(MAX_LENGTHS[arg % len(MAX_LENGTHS)])
        elif op == 4:
            run.check_size()
        elif op == 5:
            run.check_size()
        elif op == 6:
            run.take_all()
        else:
            run.feed(len(stream))
    run.feed(len(stream))
    while run.take_startup():
        pass
    while run.take_message(65535):
        pass
    run.take_all()
    if run.pos != len(stream):
        fail("harness.stream-not-fed")


if __name__ == "__main__":
    _harness.main(test_one_input)
