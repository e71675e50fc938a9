"""A PostgreSQL frontend spoken by hand over a raw socket, for tests that need to do what
no well-behaved client library does: stop half-way, reset the connection, pipeline without
Sync, send malformed messages.

    conn = RawClient.connect(server.port, tls=ctx)       # ctx: an ssl.SSLContext or None
    conn.startup(user="u", database="d")                  # StartupMessage, nothing read yet
    conn.authenticate(password="...")                     # trust, cleartext, md5 or SCRAM
    conn.query("select 1")                                # simple query -> rows of str|None
    conn.send(b"P", ...), conn.read_message()             # anything else, by hand
    conn.reset()                                          # close with a TCP RST
"""
from __future__ import annotations

import hashlib
import socket
import ssl
import struct

import scramp

SSL_REQUEST = struct.pack("!II", 8, 80877103)


class ServerError(Exception):
    def __init__(self, fields: dict[str, str]):
        super().__init__(f'{fields.get("S")} {fields.get("C")}: {fields.get("M")}')
        self.fields = fields

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")


def message(msg_type: bytes, payload: bytes = b"") -> bytes:
    return msg_type + struct.pack("!I", len(payload) + 4) + payload


def startup_packet(params: dict[str, str], version: int = 196608) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!II", len(body) + 8, version) + body


def error_fields(payload: bytes) -> dict[str, str]:
    return {chr(p[0]): p[1:].decode("utf-8", "replace") for p in payload.split(b"\0") if p}


def parse(name: str, sql: str) -> bytes:
    return message(b"P", name.encode() + b"\0" + sql.encode() + b"\0" + b"\0\0")


def bind(portal: str = "", statement: str = "") -> bytes:
    return message(b"B", portal.encode() + b"\0" + statement.encode() + b"\0" + struct.pack("!hhh", 0, 0, 0))


def execute(portal: str = "") -> bytes:
    return message(b"E", portal.encode() + b"\0" + struct.pack("!i", 0))


SYNC = message(b"S")
FLUSH = message(b"H")
TERMINATE = message(b"X")


def query_message(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\0")


class RawClient:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = b""
        self.parameters: dict[str, str] = {}
        self.backend_key: tuple[int, int] | None = None

    @classmethod
    def connect(cls, port: int, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1",
                timeout: float = 10, server_hostname: str = "localhost") -> "RawClient":
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock.sendall(SSL_REQUEST)
            answer = sock.recv(1)
            if answer != b"S":
                sock.close()
                raise ConnectionError(f"SSLRequest answered {answer!r}")
            sock = tls.wrap_socket(sock, server_hostname=server_hostname)
        return cls(sock)

    @classmethod
    def unix(cls, path: str, timeout: float = 10) -> "RawClient":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        return cls(sock)

    # --- bytes --------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self._buf += chunk

    def read_message(self) -> tuple[bytes, bytes]:
        while len(self._buf) < 5:
            self._fill()
        (length,) = struct.unpack_from("!I", self._buf, 1)
        while len(self._buf) < 1 + length:
            self._fill()
        msg_type, payload = self._buf[:1], self._buf[5:1 + length]
        self._buf = self._buf[1 + length:]
        return msg_type, payload

    def read_until_ready(self) -> list[tuple[bytes, bytes]]:
        """Messages up to and including ReadyForQuery."""
        messages = []
        while True:
            msg = self.read_message()
            messages.append(msg)
            if msg[0] == b"Z":
                return messages

    def closed_by_server(self, timeout: float = 5) -> bool:
        """True when the server closes the connection (reading and dropping what it sends)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except (ConnectionError, ssl.SSLError):
            return True
        except socket.timeout:
            return False

    # --- the protocol -------------------------------------------------------------------

    def startup(self, **params: str) -> None:
        self.send(startup_packet(params))
        self.user = params.get("user", "")

    def authenticate(self, password: str | None = None) -> None:
        """Answer authentication requests until ReadyForQuery; raises ServerError."""
        scram = None
        while True:
            msg_type, payload = self.read_message()
            if msg_type == b"E":
                raise ServerError(error_fields(payload))
            if msg_type == b"S":
                name, value, _ = payload.split(b"\0")
                self.parameters[name.decode()] = value.decode()
            elif msg_type == b"K":
                self.backend_key = struct.unpack("!iI", payload)
            elif msg_type == b"Z":
                return
            elif msg_type == b"R":
                (code,) = struct.unpack_from("!i", payload)
                if code == 3:
                    self.send(message(b"p", password.encode() + b"\0"))
                elif code == 5:
                    inner = hashlib.md5((password + self.user).encode()).hexdigest()
                    outer = hashlib.md5(inner.encode() + payload[4:8]).hexdigest()
                    self.send(message(b"p", b"md5" + outer.encode() + b"\0"))
                elif code == 10:
                    scram = scramp.ScramClient(["SCRAM-SHA-256"], "*", password)   # the server ignores the name
                    first = scram.get_client_first().encode()
                    self.send(message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
                elif code == 11:
                    scram.set_server_first(payload[4:].decode())
                    self.send(message(b"p", scram.get_client_final().encode()))
                elif code == 12:
                    scram.set_server_final(payload[4:].decode())

    def query(self, sql: str) -> list[tuple[str | None, ...]]:
        """A simple query; the rows of its last result. Raises ServerError."""
        self.send(query_message(sql))
        rows, error = [], None
        for msg_type, payload in self.read_until_ready():
            if msg_type == b"T":
                rows = []
            elif msg_type == b"D":
                rows.append(_data_row(payload))
            elif msg_type == b"E":
                error = ServerError(error_fields(payload))
        if error is not None:
            raise error
        return rows

    def terminate(self) -> None:
        try:
            self.send(TERMINATE)
        finally:
            self.close()

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), as a client that vanishes does."""
        raw = self.sock
        if isinstance(raw, ssl.SSLSocket):
            raw = socket.socket(fileno=raw.detach())
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()


def _data_row(payload: bytes) -> tuple[str | None, ...]:
    (count,) = struct.unpack_from("!h", payload)
    offset, values = 2, []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", payload, offset)
        offset += 4
        if length < 0:
            values.append(None)
        else:
            values.append(payload[offset:offset + length].decode())
            offset += length
    return tuple(values)
