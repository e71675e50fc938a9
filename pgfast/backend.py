"""Connections from pgfast to PostgreSQL: the one it started, over its private Unix
socket (LocalServer), or an upstream server over TCP and TLS (upstream.py).

A backend session starts with the client's own StartupMessage parameters. The local
PostgreSQL trusts pgfast's socket, so it asks for no authentication (pgfast has already
authenticated the client at the front); an upstream server may, and the backend's
credentials.Login answers it with what the front learned.

A backend's life is an explicit state machine, changed only in _set_state():

    STARTING -> SERVING -> RESETTING -> IDLE -> SERVING ...     (session pooling)
    STARTING -> SERVING -> IDLE -> SERVING ...                   (transaction pooling)
             -> CLOSING -> CLOSED (from any; CLOSED once PostgreSQL has let go)

While SERVING, a relay (pgfast._relay, pgfast._txrelay) is the protocol of the
transport; in the other states this class is, and a reply (start-up, reset, the
settings of a client about to be greeted) is awaited by exactly one task, the one
that owns the backend in that state.
"""
from __future__ import annotations

import asyncio
import enum
import struct
import time

from . import credentials, log, messages
from ._framing import ReadBuffer
from ._pump import TLSError
from .negotiation import user_and_database

# Start-up and reset replies are small; anything near this is a broken peer.
_MESSAGE_LIMIT = 1 << 20
# A cancel is forwarded when the postmaster has closed the cancel connection: it has
# then signalled the backend. Beyond this, give up waiting (and do not reuse the backend).
CANCEL_TIMEOUT = 5.0


class BackendRefused(Exception):
    """PostgreSQL answered the start-up with an ErrorResponse; relay it verbatim."""

    def __init__(self, raw_error: bytes, fields: dict[str, str]):
        super().__init__(fields.get("M", "backend refused the connection"))
        self.raw_error = raw_error
        self.fields = fields


class BackendState(enum.Enum):
    STARTING = "starting"      # startup packet sent, waiting for ReadyForQuery
    SERVING = "serving"        # a client's (the relay holds the transport)
    RESETTING = "resetting"    # the pool runs the reset query
    IDLE = "idle"              # in the pool
    CLOSING = "closing"        # Terminate sent; PostgreSQL still holds the slot
    CLOSED = "closed"          # PostgreSQL closed its end: the backend process is gone


_ALLOWED = {
    BackendState.STARTING: {BackendState.SERVING, BackendState.RESETTING, BackendState.IDLE, BackendState.CLOSING,
                            BackendState.CLOSED},
    # SERVING -> SERVING: transaction pooling hands a backend from one client to the next
    BackendState.SERVING: {BackendState.SERVING, BackendState.RESETTING, BackendState.IDLE, BackendState.CLOSING,
                           BackendState.CLOSED},
    BackendState.RESETTING: {BackendState.IDLE, BackendState.SERVING, BackendState.CLOSING, BackendState.CLOSED},
    BackendState.IDLE: {BackendState.SERVING, BackendState.RESETTING, BackendState.CLOSING, BackendState.CLOSED},
    BackendState.CLOSING: {BackendState.CLOSED},
    BackendState.CLOSED: set(),
}
# what an upstream may send before its AuthenticationOk: requests, an error, a notice, and
# NegotiateProtocolVersion
_BEFORE_LOGIN = frozenset(b"REvN")
# PgBouncer's server states, for SHOW SERVERS and SHOW POOLS (sv_login, sv_active, ...)
_CONSOLE_STATES = {BackendState.STARTING: "login", BackendState.SERVING: "active", BackendState.RESETTING: "tested",
                   BackendState.IDLE: "idle", BackendState.CLOSING: "closing", BackendState.CLOSED: "closed"}


class BackendConnection(asyncio.Protocol):

    def __init__(self, server, on_closed=None, login: credentials.Login | None = None) -> None:
        self.server = server                     # where it runs: cancels go there
        self._login = login                      # answers the server's authentication requests
        self._logged_in = False                  # its AuthenticationOk came, and Login accepted it
        self.transport: asyncio.Transport | None = None
        self.state = BackendState.STARTING
        self.pid = 0
        self.secret_key = 0
        self.parameters: dict[str, str] = {}     # ParameterStatus values, as the client must see them
        self.notices: list[bytes] = []           # NoticeResponses sent during start-up
        self.created = time.monotonic()
        self.connected_at = time.time()          # for the admin console
        self.user = self.database = ""           # from its startup packet
        self.identity: str | None = None         # the client identity SQL it last ran (identity.py)
        self.tls = ""                            # an upstream's TLS, "version/cipher" (SHOW SERVERS)
        self.channel_binding: bytes | None = None   # its tls-server-end-point data, for SCRAM-SHA-256-PLUS
        self.idle_since = 0.0
        self.pool_key: tuple | None = None       # None: never to be pooled
        self.rules = None                        # catalog.SessionRules it started under
        self.cancels: set[asyncio.Task] = set()  # cancel requests being forwarded to it
        self._input_ended = False                # end_input(): nothing more may be written
        # transaction pooling (txpool.py): its pool, the statements prepared on it (oldest
        # use first) and the ParameterStatus values it started with
        self.pool = None
        self.prepared: dict[bytes, None] = {}
        self.startup_parameters: dict[str, str] = {}
        self._on_closed = on_closed              # told once PostgreSQL has let go
        self._inbuf = ReadBuffer()
        self._reply: asyncio.Future | None = None   # start-up or reset, until ReadyForQuery
        self._rows: list | None = None              # fetch()'s, while it waits
        self._error: dict[str, str] | None = None
        self._gone: asyncio.Future | None = None

    @property
    def closed(self) -> bool:
        return self.state in (BackendState.CLOSING, BackendState.CLOSED)

    def describe(self, link: str = "") -> dict:
        """SHOW SERVERS's row (console.py); link: the client it serves."""
        address, port = self.server.address
        return {"user": self.user, "database": self.database, "state": _CONSOLE_STATES[self.state],
                "addr": address, "port": port, "local_addr": "", "local_port": 0, "connect_time": self.connected_at,
                "ptr": f"{id(self):x}", "link": link, "remote_pid": self.pid, "tls": self.tls,
                "application_name": self.parameters.get("application_name", ""),
                "pool_mode": "transaction" if self.pool is not None else "session"}

    def _set_state(self, new: BackendState) -> None:
        if new not in _ALLOWED[self.state]:
            raise RuntimeError(f"backend {self.pid} cannot go from {self.state.name} to {new.name}")
        self.state = new

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
            if not isinstance(exc, (ConnectionError, BackendRefused)):
                exc = ConnectionError(f"invalid message from the server: {exc}")
            self._reply.set_exception(exc)
            self.close()

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        if self.state is BackendState.CLOSED:
            return
        self._set_state(BackendState.CLOSED)
        if self._reply is not None and not self._reply.done():
            # an upstream's TLS can fail after the handshake (TLS 1.3 sends a refused client
            # certificate's alert then): libpq's words for it, naming the host
            self._reply.set_exception(ConnectionError(f"{self.server.label}: SSL error: {exc}")
                                      if isinstance(exc, TLSError) else
                                      ConnectionError("PostgreSQL closed the connection"))
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
        if self._on_closed is not None:
            self._on_closed(self)

    # --- replies: start-up and reset ---------------------------------------------------

    def _read_reply(self) -> None:
        while not self._reply.done():
            msg = self._inbuf.take_message(_MESSAGE_LIMIT)
            if msg is None:
                return
            msg_type, payload = msg
            if self._login is not None and not self._logged_in and msg_type not in _BEFORE_LOGIN:
                # as libpq: nothing counts until the server has said AuthenticationOk, which
                # credentials.Login only lets through once its checks have passed
                raise ConnectionError(f"expected authentication request from server, but received {chr(msg_type)}")
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
                if self._login is None:
                    if code == 0:
                        continue
                    raise ConnectionError(f"PostgreSQL asked pgfast for authentication (request {code}); "
                                          "its private hba_file should trust pgfast's socket")
                if self._logged_in:
                    raise ConnectionError(f"unexpected authentication request (request {code}) after "
                                          "AuthenticationOk")
                answer = self._login.answer(code, payload[4:], self.channel_binding)
                if code == 0:
                    self._logged_in = True
                elif answer is not None:
                    self.transport.write(answer)
            elif msg_type == ord("D") and self._rows is not None:
                self._rows.append(messages.parse_data_row(payload))
            elif msg_type == ord("Z"):
                self._reply.set_result(self._inbuf.take_all())

    def _request(self, data: bytes) -> asyncio.Future:
        """Send a request and return the future its reply (up to ReadyForQuery) completes.
        The future exists before the request leaves, so no reply can arrive unexpected."""
        self._reply = asyncio.get_running_loop().create_future()
        self._error = None
        self.transport.write(data)
        return self._reply

    async def run(self, query: str, timeout: float) -> dict[str, str] | None:
        """Run a query of pgfast's (a reset, a client's settings) and note the settings it
        reports; PostgreSQL's error fields if it failed. Raises if it takes longer than
        timeout or the backend says more than it was asked."""
        self._set_state(BackendState.RESETTING)
        leftover = await asyncio.wait_for(self._request(messages.message(b"Q", query.encode() + b"\0")), timeout)
        if leftover:
            raise ConnectionError("extra data after ReadyForQuery")
        return self._error

    async def fetch(self, query: str, timeout: float) -> tuple[list[tuple], dict[str, str] | None]:
        """The rows of a query of pgfast's (a health check), and its error fields if it failed."""
        self._rows = []
        try:
            error = await self.run(query, timeout)
            return self._rows, error
        finally:
            self._rows = None

    async def reset(self, query: str, timeout: float) -> None:
        """Run the reset query (DISCARD ALL); raises if it fails or takes longer than timeout."""
        self.identity = None        # DISCARD ALL takes the client's identity settings too
        error = await self.run(query, timeout)
        if error is not None:
            raise ConnectionError(f"reset query failed: {error.get('M')}")

    # --- ownership -----------------------------------------------------------------------

    def lend(self) -> None:
        """Taken from a pool by a client (transaction pooling): its from now on."""
        self._set_state(BackendState.SERVING)

    def serve(self, protocol) -> None:
        """Hand the transport to a client's relay."""
        self._set_state(BackendState.SERVING)
        self.transport.set_protocol(protocol)

    def take_back(self) -> None:
        """Take the transport back from the relay, for the pool."""
        if not self.closed:
            self.transport.set_protocol(self)
            self.transport.resume_reading()

    def park(self) -> None:
        self._set_state(BackendState.IDLE)
        self.idle_since = time.monotonic()

    def close(self) -> None:
        """Terminate: PostgreSQL ends the session when it reads this (or the end of the
        connection), and the slot is free once it closes its end (connection_lost)."""
        if self.closed:
            return
        self._set_state(BackendState.CLOSING)
        if self.transport is not None:
            if not self._input_ended:
                self.transport.write(messages.message(b"X", b""))
            self.transport.close()

    def end_input(self) -> None:
        """EOF to PostgreSQL: it answers what it has been sent, then ends the session
        as it does when its client goes (the backend is never lent again)."""
        self._input_ended = True
        self.transport.write_eof()

    def forward_cancel(self) -> None:
        """Send PostgreSQL a cancel for what this backend runs. Until it has acted on it,
        the backend is in self.cancels, and pools do not hand it to anyone else."""
        task = asyncio.get_running_loop().create_task(self.server.send_cancel(self.pid, self.secret_key))
        self.cancels.add(task)
        task.add_done_callback(self._on_cancel_sent)

    async def cancels_delivered(self) -> None:
        """Until every cancel forwarded for it has reached PostgreSQL (the set may empty
        itself, or grow, while this waits)."""
        while self.cancels:
            await asyncio.wait(set(self.cancels))

    def _on_cancel_sent(self, task: asyncio.Task) -> None:
        self.cancels.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.log(f"could not forward cancel request for process {self.pid}: {task.exception()}")

    async def closed_by_postgres(self, timeout: float) -> None:
        """Wait (at most timeout) until PostgreSQL has let this backend go."""
        if self.state is BackendState.CLOSED:
            return
        if self._gone is None:
            self._gone = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._gone), timeout)
        except asyncio.TimeoutError:
            pass


async def open_backend(server, params: list[tuple[str, str]], on_closed=None,
                       secret: credentials.Secret | None = None) -> tuple[BackendConnection, bytes]:
    """A backend session on server for these StartupMessage parameters, and any bytes it
    sent after its first ReadyForQuery. Raises BackendRefused with PostgreSQL's error.
    secret: what to log in with, when the server asks (an upstream server)."""
    user, database = user_and_database(params)
    if secret is None:      # fixed roles (pgfast.auth_user, service roles): pgfast.passfile's
        secret = server.passfile_secret(user, database)
    loop = asyncio.get_running_loop()
    for encrypt in server.attempts:
        login = credentials.Login(user, secret, server.login_policy) if secret is not None else None
        # one deadline from TCP connect to ReadyForQuery, as libpq's connect_timeout: an
        # upstream that accepts and then says nothing must not hold a pool's slot for ever
        deadline = None if server.login_timeout is None else loop.time() + server.login_timeout
        conn = await server.connect(lambda: BackendConnection(server, on_closed, login), encrypt)
        conn.user, conn.database = user, database
        try:
            return conn, await asyncio.wait_for(conn._request(messages.startup_message(params)),
                                                None if deadline is None else max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            conn.close()
            server.check_soon()
            raise ConnectionError(f"{server.label}: timeout expired") from None
        except BackendRefused:
            conn.close()
            if encrypt is not server.attempts[-1]:
                continue        # sslmode=allow: refused without TLS, tried again with it
            raise
        except BaseException:
            conn.close()
            raise


class LocalServer:
    """The PostgreSQL pgfast started, over its private Unix socket, which trusts pgfast."""

    address = ("unix", 0)
    label = "connection to PostgreSQL's private socket failed"
    attempts = (None,)          # one connection attempt per backend (upstream.py: sslmode=allow makes two)
    login_timeout = None        # its own PostgreSQL: authentication_timeout at the front bounds a login
    login_policy = credentials.Policy()

    def __init__(self, socket_path: str):
        self.socket_path = socket_path

    def pick(self, route: str | None = None) -> "LocalServer":
        return self             # one server: every route leads here

    def passfile_secret(self, user: str, database: str) -> None:
        return None             # it trusts pgfast's socket

    def serves(self, route: str | None) -> bool:
        return True

    def check_soon(self) -> None:
        pass

    def prefers(self, server, route: str | None) -> bool:
        return True

    # nothing to check: the postmaster is pgfast's child, watched by pid (worker.py)
    def start(self) -> None:
        pass

    async def first_check(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        pass

    async def connect(self, factory, encrypt: bool | None = None) -> BackendConnection:
        _, conn = await asyncio.get_running_loop().create_unix_connection(factory, self.socket_path)
        return conn

    async def send_cancel(self, pid: int, secret_key: int) -> None:
        """A CancelRequest for (pid, secret_key), returning once the postmaster has acted on
        it (it closes the connection after signalling the backend)."""
        reader, writer = await asyncio.open_unix_connection(self.socket_path)
        try:
            writer.write(messages.cancel_request(pid, secret_key))
            await asyncio.wait_for(reader.read(), CANCEL_TIMEOUT)
        finally:
            writer.close()
