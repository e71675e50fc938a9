"""Connections from pgfast to PostgreSQL over its private Unix socket.

PostgreSQL behind pgfast trusts only that socket, so a backend session starts with the
client's own StartupMessage parameters and no authentication exchange; pgfast has
already authenticated the client at the front.

While a client uses a backend, the relay (pgfast._relay) is the protocol of the
backend's transport; this class handles the rest of its life: start-up, the reset
between clients, and idling in the pool.
"""
from __future__ import annotations

import asyncio
import struct
import time

from . import messages
from ._wire import ReadBuffer

# Start-up and reset replies are small; anything near this is a broken peer.
_MESSAGE_LIMIT = 1 << 20


class BackendRefused(Exception):
    """PostgreSQL answered the start-up with an ErrorResponse; relay it verbatim."""

    def __init__(self, raw_error: bytes, fields: dict[str, str]):
        super().__init__(fields.get("M", "backend refused the connection"))
        self.raw_error = raw_error
        self.fields = fields


class BackendConnection(asyncio.Protocol):

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pid = 0
        self.secret_key = 0
        self.parameters: dict[str, str] = {}     # ParameterStatus values, as the client must see them
        self.notices: list[bytes] = []           # NoticeResponses sent during start-up
        self.created = time.monotonic()
        self.idle_since = 0.0
        self.pool_key: tuple | None = None
        self.rules = None                        # catalog.SessionRules it started under
        self.closed = False
        self._inbuf = ReadBuffer()
        self._reply: asyncio.Future | None = None   # start-up or reset, until ReadyForQuery
        self._error: dict[str, str] | None = None
        self._gone: asyncio.Future | None = None    # retire() waits here for PostgreSQL to let go

    # --- asyncio.Protocol (when no relay holds the transport) --------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._reply is None or self._reply.done():
            # an idle backend has nothing to say unless it is going away
            self.close()
            return
        self._inbuf.feed_data(data)
        try:
            self._read_reply()
        except Exception as exc:   # a broken backend stream must not stay half open
            self._reply.set_exception(exc)
            self.close()

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(ConnectionError("PostgreSQL closed the connection"))

    # --- replies: start-up and reset ---------------------------------------------------

    def _read_reply(self) -> None:
        while not self._reply.done():
            msg = self._inbuf.take_message(_MESSAGE_LIMIT)
            if msg is None:
                return
            msg_type, payload = msg
            if msg_type == ord("S"):
                name, value = payload[:-1].split(b"\0")
                self.parameters[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
            elif msg_type == ord("K"):
                self.pid, self.secret_key = struct.unpack("!iI", payload)
            elif msg_type == ord("N") and not self.pid:
                self.notices.append(messages.message(b"N", payload))
            elif msg_type == ord("E"):
                self._error = messages.parse_error_fields(payload)
                if not self.pid:
                    raise BackendRefused(messages.message(b"E", payload), self._error)
            elif msg_type == ord("R"):
                (code,) = struct.unpack_from("!i", payload)
                if code != 0:
                    raise ConnectionError(f"PostgreSQL asked pgfast for authentication (request {code}); "
                                          "its private hba_file should trust pgfast's socket")
            elif msg_type == ord("Z"):
                self._reply.set_result(self._inbuf.take_all())

    async def _await_reply(self) -> bytes:
        self._reply = asyncio.get_running_loop().create_future()
        self._error = None
        return await self._reply

    async def reset(self, query: str) -> None:
        """Run the reset query (DISCARD ALL) and take note of the settings it reports."""
        self.transport.write(messages.message(b"Q", query.encode() + b"\0"))
        leftover = await self._await_reply()
        if self._error is not None or leftover:
            raise ConnectionError(f"reset query failed: {self._error.get('M') if self._error else 'extra data'}")

    # --- the rest ------------------------------------------------------------------------

    def attach(self, protocol) -> None:
        """Hand the transport to the relay."""
        self.transport.set_protocol(protocol)

    def detach(self) -> None:
        """Take the transport back from the relay."""
        self.transport.set_protocol(self)
        self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.write(messages.message(b"X", b""))
            self.transport.close()

    async def retire(self, timeout: float = 5.0) -> None:
        """Terminate, and wait until PostgreSQL closes its end: the backend process has
        then given its connection slot back (its socket outlives ProcKill)."""
        if self.closed or self.transport is None:
            return
        self.closed = True
        self._gone = asyncio.get_running_loop().create_future()
        self.transport.write(messages.message(b"X", b""))
        try:
            await asyncio.wait_for(self._gone, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self.transport.close()


async def open_backend(socket_path: str, params: list[tuple[str, str]]) -> tuple[BackendConnection, bytes]:
    """A backend session for these StartupMessage parameters, and any bytes it sent
    after its first ReadyForQuery. Raises BackendRefused with PostgreSQL's error."""
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_unix_connection(BackendConnection, socket_path)
    conn.transport.write(messages.startup_message(params))
    try:
        leftover = await conn._await_reply()
    except BaseException:
        conn.close()
        raise
    return conn, leftover


async def send_cancel(socket_path: str, pid: int, secret_key: int) -> None:
    _, writer = await asyncio.open_unix_connection(socket_path)
    writer.write(messages.cancel_request(pid, secret_key))
    await writer.drain()
    writer.close()
