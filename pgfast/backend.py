"""Connections from pgfast to PostgreSQL over its private Unix socket.

PostgreSQL behind pgfast trusts only that socket, so a backend session starts with the
client's own StartupMessage parameters and no authentication exchange; pgfast has
already authenticated the client at the front.
"""
from __future__ import annotations

import asyncio
import struct

from . import messages
from ._wire import ReadBuffer

# Messages during backend start-up are small; anything near this is a broken peer.
_STARTUP_MESSAGE_LIMIT = 1 << 20


class BackendRefused(Exception):
    """PostgreSQL answered the start-up with an ErrorResponse; relay it verbatim."""

    def __init__(self, raw_error: bytes, fields: dict[str, str]):
        super().__init__(fields.get("M", "backend refused the connection"))
        self.raw_error = raw_error
        self.fields = fields


class BackendConnection(asyncio.Protocol):
    """One PostgreSQL backend session.

    Start-up messages are framed here; once ReadyForQuery arrives every byte goes
    unframed to the peer (a client connection) through peer.backend_data().
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pid = 0
        self.secret_key = 0
        self.greeting: list[bytes] = []      # ParameterStatus / NoticeResponse, as sent
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.peer = None
        self._inbuf: ReadBuffer | None = ReadBuffer()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._inbuf is None:
            self.peer.backend_data(data)
            return
        self._inbuf.feed_data(data)
        try:
            self._read_greeting()
        except Exception as exc:   # a broken backend stream must not stay half open
            self._fail(exc)

    def _read_greeting(self) -> None:
        while not self.ready.done():
            msg = self._inbuf.take_message(_STARTUP_MESSAGE_LIMIT)
            if msg is None:
                return
            msg_type, payload = msg
            if msg_type == ord("R"):
                (code,) = struct.unpack_from("!i", payload)
                if code != 0:
                    raise ConnectionError(f"PostgreSQL asked pgfast for authentication (request {code}); "
                                          "its private hba_file should trust pgfast's socket")
            elif msg_type == ord("K"):
                self.pid, self.secret_key = struct.unpack("!iI", payload)
            elif msg_type in (ord("S"), ord("N")):
                self.greeting.append(messages.message(bytes((msg_type,)), payload))
            elif msg_type == ord("E"):
                raw = messages.message(b"E", payload)
                raise BackendRefused(raw, messages.parse_error_fields(payload))
            elif msg_type == ord("Z"):
                self.greeting.append(messages.message(b"Z", payload))
                self._on_ready()

    def _on_ready(self) -> None:
        leftover = self._inbuf.take_all()
        self._inbuf = None
        self.ready.set_result(leftover)

    def _fail(self, exc: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
        self.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_client_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_client_reading()

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("PostgreSQL closed the connection during start-up"))
        if self.peer is not None:
            self.peer.backend_lost()

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_backend(socket_path: str, params: list[tuple[str, str]]) -> tuple[BackendConnection, bytes]:
    """A backend session for these StartupMessage parameters, and any bytes it sent
    after its first ReadyForQuery. Raises BackendRefused with PostgreSQL's error."""
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_unix_connection(BackendConnection, socket_path)
    conn.transport.write(messages.startup_message(params))
    try:
        leftover = await conn.ready
    except BaseException:
        conn.close()
        raise
    return conn, leftover


async def send_cancel(socket_path: str, pid: int, secret_key: int) -> None:
    _, writer = await asyncio.open_unix_connection(socket_path)
    writer.write(messages.cancel_request(pid, secret_key))
    await writer.drain()
    writer.close()
