"""A pure-Python reference for pgfast._framing and pgfast._pump, with the same API.

tests/test_wire_units.py uses it as an oracle for the Cython code, and bench/ as the
baseline the Cython code is measured against. Everything here is written for
obviousness, not speed: framing follows PostgreSQL's rules directly, and the TLS pump
uses pyOpenSSL's own Connection.recv/send/bio_read/bio_write on the same Connection the
Cython pump would drive through raw pointers.

Differences from the Cython modules, all outside the API contract: the exception classes are
this module's own (same names, same messages), and MessageScanner's last_type/tx_status
are plain attributes rather than read-only ones.
"""
from __future__ import annotations

import re

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

# ProcessStartupPacket: the length word counts itself; PostgreSQL subtracts it and then
# refuses fewer than 4 bytes (no request code) or more than MAX_STARTUP_PACKET_LENGTH (10000)
STARTUP_MIN_LENGTH = 4 + 4
STARTUP_MAX_LENGTH = 4 + 10000

PROTOCOL_3_0 = 3 << 16
CANCEL_REQUEST_CODE = 1234 << 16 | 5678
SSL_REQUEST_CODE = 1234 << 16 | 5679
GSSENC_REQUEST_CODE = 1234 << 16 | 5680


class ProtocolViolation(Exception):
    """The peer broke the framing rules; message is PostgreSQL's wording (08P01)."""


class TLSError(Exception):
    """OpenSSL failed the connection; the message is OpenSSL's reason."""


def pack_int32(value: int) -> bytes:
    return value.to_bytes(4, "big")     # OverflowError outside 0 .. 2**32-1, as in Cython


def _int32(data) -> int:
    return int.from_bytes(data[:4], "big")


def _require_bytes(data) -> None:
    if not isinstance(data, bytes):
        raise TypeError(f"expected bytes, got {type(data).__name__}")


class ReadBuffer:
    """Bytes received but not yet framed; feed_data() in, take_*() out."""

    def __init__(self):
        self._buf = bytearray()

    def feed_data(self, data: bytes) -> None:
        _require_bytes(data)
        self._buf += data

    def size(self) -> int:
        return len(self._buf)

    def first_byte(self) -> int:
        return self._buf[0] if self._buf else -1

    def take_startup(self):
        """(request code, body after the code) once a whole startup packet is here, else None."""
        if len(self._buf) < 4:
            return None
        length = _int32(self._buf)
        if length < STARTUP_MIN_LENGTH or length > STARTUP_MAX_LENGTH:
            raise ProtocolViolation("invalid length of startup packet")
        if len(self._buf) < length:
            return None
        code = _int32(self._buf[4:8])
        body = bytes(self._buf[8:length])
        del self._buf[:length]
        return code, body

    def take_message(self, max_length: int):
        """(type byte as int, payload) once a whole regular message is here, else None."""
        if len(self._buf) < 5:
            return None
        length = _int32(self._buf[1:5])
        if length < 4 or length > max_length:
            raise ProtocolViolation(f"invalid message length {length}")
        if len(self._buf) < 1 + length:
            return None
        msg_type = self._buf[0]
        payload = bytes(self._buf[5:1 + length])
        del self._buf[:1 + length]
        return msg_type, payload

    def take_all(self) -> bytes:
        data = bytes(self._buf)
        self._buf = bytearray()
        return data


def parse_startup_parameters(body: bytes) -> list[tuple[str, str]]:
    """Name/value pairs of a StartupMessage body, walked the way ProcessStartupPacket does:
    name NUL value NUL ... until an empty name, which must be the packet's last byte.

    PostgreSQL checks the terminator's offset but not that it is a NUL, so it lets
    through a packet whose last byte is a lone name character (b"user\0u\0x"); that is
    refused here, as the message says it should be.
    """
    _require_bytes(body)
    if not body.endswith(b"\0"):
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")

    def text(raw: bytes) -> str:
        return raw.decode("utf-8", "surrogateescape")

    def string_end(start: int) -> int:
        end = body.find(b"\0", start)
        return len(body) if end < 0 else end    # PostgreSQL's buffer has a NUL after the packet

    params = []
    offset = 0
    while offset < len(body):
        name_end = string_end(offset)
        if name_end == offset:
            break                               # the terminator
        value_offset = name_end + 1
        if value_offset >= len(body):
            break                               # a name without a value
        value_end = string_end(value_offset)
        params.append((text(body[offset:name_end]), text(body[value_offset:value_end])))
        offset = value_end + 1
    if offset != len(body) - 1:
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    return params


class MessageScanner:
    """Follows message boundaries in a relayed stream (type byte, length word, payload)."""

    def __init__(self, from_client: bool = False):
        self._from_client = from_client
        self._header = b""          # the part of a message header received so far
        self._remaining = 0         # payload bytes of the current message still to come
        self.last_type = 0          # type byte of the last message whose header completed
        self.tx_status = 0          # the last byte of the last ReadyForQuery ('I', 'T', 'E')
        self.requests = 0           # client stream: Query, Sync and FunctionCall messages
        self.trailing = 0           # client stream: messages since the last of those, but COPY data and a lone Flush
        self.readies = 0            # backend stream: ReadyForQuery messages
        self.database_ddl = 0       # client stream: Query/Parse starting DROP/ALTER/CREATE DATABASE
        self._sql_head = None       # first 64 payload bytes of the current Query/Parse

    def scan(self, data: bytes) -> int:
        """Follow the messages in data; the offset of a Terminate ('X') starting a message, or -1.
        The Terminate is not consumed: scanning the same bytes again finds it again."""
        _require_bytes(data)
        i = 0
        while i < len(data):
            if self._remaining > 0:
                take = min(self._remaining, len(data) - i)
                if self.last_type == ord("Z") and take == self._remaining:
                    self.tx_status = data[i + take - 1]
                if self._sql_head is not None:
                    self._sql_head += data[i:i + take]
                self._remaining -= take
                i += take
                if self._sql_head is not None and (self._remaining == 0 or len(self._sql_head) >= 64):
                    self._check_sql(self._sql_head[:64])
                    self._sql_head = None
            elif not self._header and data[i] == ord("X"):
                return i
            else:
                take = min(5 - len(self._header), len(data) - i)
                self._header += data[i:i + take]
                i += take
                if len(self._header) == 5:
                    self.last_type = self._header[0]
                    self._remaining = _int32(self._header[1:]) - 4
                    self._header = b""
                    if self._from_client and self.last_type in b"QSF":
                        self.requests += 1
                        self.trailing = 0
                    elif self._from_client and self.last_type not in b"dcf" and (
                            self.last_type != ord("H") or self.trailing):
                        self.trailing += 1
                    if self._from_client and self.last_type in b"QP" and self._remaining > 0:
                        self._sql_head = b""
                    elif not self._from_client and self.last_type == ord("Z"):
                        self.readies += 1
                    if self._remaining < 0:
                        raise ProtocolViolation("invalid message length")
        return -1

    @property
    def at_boundary(self) -> bool:
        return self._remaining == 0 and not self._header

    def _check_sql(self, head: bytes) -> None:
        if self.last_type == ord("P"):
            head = head.partition(b"\0")[2]
        if re.match(rb"[ \t\n\r]*(drop|alter|create)[ \t\n\r]+database(?![a-z0-9_])", head, re.IGNORECASE):
            self.database_ddl += 1


# --- the TLS pump -------------------------------------------------------------------------

_lib = Binding().lib
_OPEN, _PEER_CLOSED, _FAILED = 0, 1, 2
_READ_SIZE = 1 << 16
_MAX_RECORD_PLAINTEXT = 8192


def _reason(exc: SSL.Error) -> str:
    """OpenSSL's reason for the oldest queued error, as ERR_get_error() would give it."""
    errors = exc.args[0] if exc.args else None
    if isinstance(errors, list) and errors:
        return errors[0][2]
    return "SSL error code 1"


class TLSPump:
    """Ciphertext in, plaintext out and back, over a pyOpenSSL Connection with memory BIOs.

    Made with pump_for(), as the Cython one. Like PostgreSQL's be_tls_read/be_tls_write,
    the thread's OpenSSL error queue is cleared before each read or write, so an error some
    other code left queued cannot be taken for this connection's; like PostgreSQL, no record
    carries more than 8192 bytes of plaintext.
    """

    def __init__(self, owner: SSL.Connection):
        self._conn = owner
        self._state = _OPEN

    @property
    def peer_closed(self) -> bool:
        return self._state == _PEER_CLOSED

    @property
    def failed(self) -> bool:
        return self._state == _FAILED

    def _fail(self, exc: SSL.Error) -> TLSError:
        self._state = _FAILED
        if isinstance(exc, SSL.SysCallError) and not (exc.args and isinstance(exc.args[0], list)):
            return TLSError("unexpected EOF")
        return TLSError(_reason(exc))

    def decrypt(self, ciphertext: bytes) -> bytes:
        """Plaintext of every whole record now available (b'' while a record is partial)."""
        _require_bytes(ciphertext)
        if self._state != _OPEN:
            return b""
        if ciphertext:
            self._conn.bio_write(ciphertext)
        plaintext = []
        _lib.ERR_clear_error()
        while True:
            try:
                plaintext.append(self._conn.recv(_READ_SIZE))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._state = _PEER_CLOSED
                break
            except SSL.Error as exc:
                raise self._fail(exc) from None
        return b"".join(plaintext)

    def encrypt(self, plaintext: bytes) -> bytes:
        """Ciphertext records for plaintext."""
        _require_bytes(plaintext)
        if self._state == _FAILED:
            raise TLSError("connection already failed")
        _lib.ERR_clear_error()
        try:
            for start in range(0, len(plaintext), _MAX_RECORD_PLAINTEXT):
                self._conn.sendall(plaintext[start:start + _MAX_RECORD_PLAINTEXT])
        except SSL.Error as exc:
            raise self._fail(exc) from None
        return self.pending_ciphertext()

    def close_notify(self) -> bytes:
        """The close_notify alert to send before closing (b'' when it cannot be sent)."""
        if self._state == _FAILED:
            return b""
        try:
            self._conn.shutdown()
        except SSL.Error:
            pass
        _lib.ERR_clear_error()
        return self.pending_ciphertext()

    def pending_ciphertext(self) -> bytes:
        """Records OpenSSL produced on its own while reading (alerts, key updates)."""
        chunks = []
        while True:
            try:
                chunks.append(self._conn.bio_read(_READ_SIZE))
            except SSL.WantReadError:
                return b"".join(chunks)


def pump_for(conn: SSL.Connection) -> TLSPump:
    """The counterpart of pgfast._pump.pump_for."""
    return TLSPump(conn)


def _shuttle(src: SSL.Connection, dst: SSL.Connection) -> None:
    try:
        dst.bio_write(src.bio_read(1 << 20))
    except SSL.WantReadError:
        pass


def handshake_in_memory(server_ctx: SSL.Context) -> tuple[SSL.Connection, SSL.Connection]:
    """(server, client) pyOpenSSL connections over memory BIOs, handshaken, the client's
    session tickets read: what the oracle tests and the micro-benchmarks start from."""
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    done = set()
    for _ in range(10):
        for name, side in (("client", client), ("server", server)):
            try:
                side.do_handshake()
                done.add(name)
            except SSL.WantReadError:
                pass
        _shuttle(client, server)
        _shuttle(server, client)
        if done == {"client", "server"}:
            break
    assert done == {"client", "server"}
    try:    # TLS 1.3 session tickets the client has not read yet
        client.recv(1)
    except SSL.WantReadError:
        pass
    return server, client
