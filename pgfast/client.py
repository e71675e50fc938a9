"""One client connection, from its first byte to its last, as one explicit state machine.

States change only in _set_state(), along these edges (any state may go to CLOSING):

    NEGOTIATING --SSLRequest 'S' / direct TLS--> TLS_HANDSHAKE --> STARTUP
    NEGOTIATING (plaintext) or STARTUP (inside TLS) --StartupMessage--> AUTHENTICATING
    AUTHENTICATING --authenticated--> CONNECTING --backend ready--> RELAYING
    CONNECTING --the database is "pgfast", the role a console user's--> CONSOLE
    CLOSING --connection_lost--> CLOSED

NEGOTIATING and STARTUP read startup packets as PostgreSQL's ProcessStartupPacket does
(pgfast.negotiation says what each asks for). AUTHENTICATING and CONNECTING run one
login task (pgfast.login, then a backend from the session pool, or for transaction
pooling the greeting of one of the pool's backends). In RELAYING a Cython relay is the
protocol of the client's transport (pgfast._relay with a backend of the client's own,
pgfast._txrelay with backends lent per transaction through pgfast.txsession) and
calls back here when a side ends.

There is one way out, _disconnect(), as pgbouncer's disconnect_client: it says what may
still be said (an alert during a handshake, never plaintext; an ErrorResponse only
between two messages of what the backend was sending), closes, and hands everything
the connection holds back exactly once, on the way into CLOSING.
"""
from __future__ import annotations

import asyncio
import enum
import socket
import struct
import time
import traceback

from . import console, log, messages
from ._framing import ProtocolViolation, ReadBuffer
from ._pump import TLSError
from ._relay import Relay
from .auth import MAX_AUTH_TOKEN_LENGTH, ClientInfo
from ._txrelay import TxRelay
from .backend import BackendConnection, BackendRefused
from .catalog import CatalogError, log_catalog_failure
from .credentials import Secret
from .errors import ClientGone, Refused
from .identity import identity_sql
from .login import log_in
from .metrics import TLS_VERSIONS, handshake_failure_reason, metrics
from .negotiation import (NEWEST_MINOR, BadCancelRequest, CancelRequest, GSSENCRequest, SSLRequest, StartupMessage,
                          interpret, split_route, unsupported_protocol)
from .tls import TLSSession
from .txpool import pool_key
from .txsession import TransactionSession, greet

# Flow control between the two sides of a relay: stop reading one side while the
# other side's transport queue holds more than this.
HIGH_WATER = 512 * 1024
LOW_WATER = 128 * 1024
# What a client may send ahead of its login before pgfast stops reading from it.
_PREAUTH_LIMIT = 64 * 1024
_TLS_RECORD_TYPE_HANDSHAKE = 0x16
_NOT_ACCEPTING = "the database system is not accepting connections"
IDENTITY_TIMEOUT = 10.0


class State(enum.Enum):
    NEGOTIATING = "negotiating"         # plaintext startup packets, before any encryption
    TLS_HANDSHAKE = "tls handshake"
    STARTUP = "startup"                 # inside TLS: waiting for the StartupMessage
    AUTHENTICATING = "authenticating"   # pg_hba.conf and the authentication exchange
    CONNECTING = "connecting"           # authenticated; a backend is being found
    RELAYING = "relaying"
    CONSOLE = "console"                 # authenticated to the admin console (console.py)
    CLOSING = "closing"                 # the transport is closing; nothing held any more
    CLOSED = "closed"


_ALLOWED = {
    State.NEGOTIATING: {State.TLS_HANDSHAKE, State.AUTHENTICATING, State.CLOSING},
    State.TLS_HANDSHAKE: {State.STARTUP, State.CLOSING},
    State.STARTUP: {State.AUTHENTICATING, State.CLOSING},
    State.AUTHENTICATING: {State.CONNECTING, State.CLOSING},
    State.CONNECTING: {State.RELAYING, State.CONSOLE, State.CLOSING},
    State.RELAYING: {State.CLOSING},
    State.CONSOLE: {State.CLOSING},
    State.CLOSING: {State.CLOSED},
    State.CLOSED: set(),
}
_READING_STARTUP = (State.NEGOTIATING, State.STARTUP)
_LOGGING_IN = (State.AUTHENTICATING, State.CONNECTING)
_ENDING = (State.CLOSING, State.CLOSED)
_STATE_LABELS = {state: state.name.lower() for state in State}     # metrics.CLIENT_STATES


def _where(exc: BaseException) -> str:
    """file:line of an unexpected exception, for the log: never its message, which may
    hold what a client sent (a password among them)."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else "unknown place"


class ClientConnection(asyncio.Protocol):

    def __init__(self, frontend, local: bool):
        self._frontend = frontend
        self._local = local
        self._state = State.NEGOTIATING
        self.transport: asyncio.Transport | None = None
        self._address: str | None = None
        self._inbuf = ReadBuffer()
        self._tls: TLSSession | None = None
        self._direct_tls = False
        self._answered: set[type] = set()         # encryption requests answered (SSLRequest, GSSENCRequest)
        self._startup: StartupMessage | None = None   # set once, when it counts as a session
        self._timeout: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None      # the login
        self._waiter: asyncio.Future | None = None  # the login waits here for the client's next message
        self._backend: BackendConnection | None = None       # a backend of the client's own
        self._relay: Relay | TxRelay | None = None
        self._tx: TransactionSession | None = None            # ... or backends lent per transaction
        self._cancel_pid: int | None = None
        self._reading_paused = False        # the client sent more than _PREAUTH_LIMIT ahead of its login
        self._input_ended = False           # it half-closed while logging in
        self._handshake_started = 0.0
        self._tls_version: str | None = None    # once its handshake is done
        self._console: console.ConsoleSession | None = None
        self._peer: tuple = ()                  # (address, port) of each end, for the admin console
        self._connected_at = time.time()
        self._mode = ""                         # the pool mode it was given
        self._authenticated_at = 0.0
        self._secret: Secret | None = None      # what its authentication proved (credentials.py)
        self._route: str | None = None          # upstream mode: the hosts its backends run on
        self._label = "[local]"                 # who the log lines are about: PostgreSQL's %r
        metrics.count("client_connections", _STATE_LABELS[self._state])

    # --- state -------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    def _set_state(self, new: State) -> None:
        if new not in _ALLOWED[self._state]:
            raise RuntimeError(f"client connection cannot go from {self._state.name} to {new.name}")
        metrics.count("client_connections", _STATE_LABELS[self._state], n=-1)
        if new is not State.CLOSED:
            metrics.count("client_connections", _STATE_LABELS[new])
        self._state = new
        if new is State.CLOSING:
            self._release()

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        metrics.count("client_connections_total", "unix" if self._local else "tcp")
        if not self._local:
            peer = transport.get_extra_info("peername")
            if peer is None:
                # reset before it could be looked at: nothing to serve, nothing to say
                self._set_state(State.CLOSING)
                transport.close()
                return
            self._address = peer[0]
            local = transport.get_extra_info("sockname")
            self._peer = (peer[0], peer[1], local[0] if local else "", local[1] if local else 0)
            self._label = f"{peer[0]}({peer[1]})"
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        loop = asyncio.get_running_loop()
        self._timeout = loop.call_later(self._frontend.settings.authentication_timeout, self._on_timeout)
        self._frontend.client_opened(self)

    def data_received(self, data: bytes) -> None:
        token = log.CLIENT.set(self._label)     # for what the code it calls logs
        try:
            self._on_data(data)
        finally:
            log.CLIENT.reset(token)

    def _on_data(self, data: bytes) -> None:
        if self._state is State.TLS_HANDSHAKE:
            self._do_handshake(data)
            return
        if self._state in _ENDING:
            return
        if self._tls is not None:
            try:
                data = self._tls.pump.decrypt(data)
            except TLSError as exc:
                self.client_failed(exc)
                return
            outgoing = self._tls.pump.take_outgoing()
            if outgoing:
                self.transport.write(outgoing)
        self._inbuf.feed_data(data)
        if self._state in _READING_STARTUP:
            self._do_negotiate()
        elif self._inbuf.size() > _PREAUTH_LIMIT and not self._reading_paused and self._state in _LOGGING_IN:
            # what the client sent ahead of its login waits in the kernel, as it does for
            # PostgreSQL (which reads it only after authentication)
            self._reading_paused = True
            self.transport.pause_reading()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def eof_received(self):
        if self._state in _READING_STARTUP and self._inbuf.size():
            self.log_line("incomplete startup packet")
        if self._state not in _LOGGING_IN:
            return False
        # half-closed while logging in: what it sent is still served, and it still reads
        self._input_ended = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        return True

    def connection_lost(self, exc) -> None:
        if self._state is State.CLOSED:
            return
        if self._state is State.TLS_HANDSHAKE:
            metrics.count("tls_handshake_failures_total", "closed")
        if self._state is not State.CLOSING:
            self._set_state(State.CLOSING)
        self._set_state(State.CLOSED)

    # --- the one way out ---------------------------------------------------------------

    def _disconnect(self, notify: bytes | None = None, *, client_closed: bool = False) -> None:
        """Say what may still be said, close, and let go of everything. notify is an
        ErrorResponse for the client; client_closed: it has said goodbye (Terminate or
        close_notify) and reads nothing more."""
        if self._state in _ENDING:
            return
        out = b""
        tls = self._tls
        if self._state is State.TLS_HANDSHAKE or (tls is not None and tls.pump.failed):
            out = tls.pump.pending_ciphertext()     # the alert: no plaintext inside a handshake
        else:
            if self._state is State.RELAYING and not self._relay.at_boundary:
                notify = None   # the client is inside a message the backend was sending
            out = notify or b""
            if tls is not None:
                try:
                    out = (tls.pump.encrypt(out) if out else b"") + (b"" if client_closed else tls.pump.close_notify())
                except TLSError:
                    out = b""
        if out:
            self.transport.write(out)
        self.transport.close()
        self._set_state(State.CLOSING)

    def _release(self) -> None:
        """On the way into CLOSING, once: everything the connection holds goes."""
        self._cancel_timeout()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        self._task = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()
        self._frontend.client_closed(self)
        if self._tls_version is not None:
            metrics.count("tls_connections", self._tls_version, n=-1)
        if self._startup is not None:
            self._frontend.give_client()
        if self._cancel_pid is not None:
            self._frontend.cancel_keys.forget(self._cancel_pid, self)
        if self._tx is not None:
            self._tx.end()
        backend, self._backend = self._backend, None
        if backend is not None:
            self._frontend.pool.release(backend, self._relay is not None and self._relay.backend_clean())

    def refuse(self, refusal: Refused) -> None:
        """FATAL to the client and to the server log (PostgreSQL logs what it sends)."""
        self.log_line(refusal.message, "FATAL", detail=refusal.log_detail or refusal.detail, hint=refusal.hint)
        self._disconnect(messages.error(refusal.sqlstate, refusal.message, detail=refusal.detail, hint=refusal.hint))

    def backend_refused(self, refusal: BackendRefused) -> None:
        """PostgreSQL refused a backend for this client: it logged why; the client gets
        its words."""
        self._disconnect(refusal.raw_error)

    def end_silently(self, message: str) -> None:
        """What PostgreSQL logs as COMMERROR (a client breaking the protocol, e.g. "invalid
        message length") and answers by closing without a word."""
        self.log_line(message)
        self._disconnect()

    def terminate(self, sqlstate: str, text: str) -> None:
        self._disconnect(messages.error(sqlstate, text))

    def _on_timeout(self) -> None:
        self._timeout = None
        if self._state in _LOGGING_IN:
            # PostgreSQL logs this FATAL but does not write to a client still
            # authenticating: the connection just closes
            self.log_line("canceling authentication due to timeout", "FATAL")
            self._disconnect()
        elif self._state in (State.NEGOTIATING, State.TLS_HANDSHAKE, State.STARTUP):
            # PostgreSQL's startup-packet timeout ends the connection without a word
            if self._state is State.TLS_HANDSHAKE:
                metrics.count("tls_handshake_failures_total", "timeout")
            self._disconnect()

    def _cancel_timeout(self) -> None:
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None

    def log_line(self, message: str, level: str = "LOG", **kw) -> None:
        """A server log line about this client (its address and port in the prefix)."""
        log.emit(level, message, client=self._label, **kw)

    def _send(self, data: bytes) -> None:
        if self._tls is not None:
            data = self._tls.pump.encrypt(data)
        self.transport.write(data)

    # --- negotiation -------------------------------------------------------------------

    def _tls_available(self) -> bool:
        return self._frontend.tls is not None and not self._local

    def _do_negotiate(self) -> None:
        while self._state in _READING_STARTUP:
            if (self._state is State.NEGOTIATING and SSLRequest not in self._answered
                    and self._inbuf.first_byte() == _TLS_RECORD_TYPE_HANDSHAKE and self._tls_available()):
                self._start_handshake(direct=True)
                return
            try:
                packet = self._inbuf.take_startup()
                if packet is None:
                    return
                self._on_request(packet[0], interpret(*packet))
            except BadCancelRequest as exc:
                self.end_silently(str(exc))
            except ProtocolViolation as exc:
                self.refuse(Refused("08P01", str(exc)))
            except Refused as refusal:
                self.refuse(refusal)

    def _on_request(self, code: int, request) -> None:
        # as ProcessStartupPacket: no second SSLRequest, and a GSSENCRequest only while
        # not inside TLS; otherwise the code is an unsupported protocol version
        if isinstance(request, SSLRequest) and SSLRequest not in self._answered:
            self._on_ssl_request()
        elif isinstance(request, SSLRequest) and self._tls is not None and self._direct_tls:
            self._send(messages.SSL_REFUSE)        # inside direct TLS (PostgreSQL 17)
        elif isinstance(request, GSSENCRequest) and GSSENCRequest not in self._answered and self._tls is None:
            self._answered.add(GSSENCRequest)
            self._send(messages.SSL_REFUSE)        # no GSSAPI encryption: 'N', the client goes on
        elif isinstance(request, CancelRequest):
            self._frontend.cancel(request)
            self._disconnect()
        elif isinstance(request, StartupMessage):
            self._on_startup_message(request)
        else:
            raise unsupported_protocol(code)

    def _on_ssl_request(self) -> None:
        self._answered.add(SSLRequest)
        if not self._tls_available():
            self.transport.write(messages.SSL_REFUSE)
            return
        if self._inbuf.size():
            # bytes sent before the handshake were never encrypted: refusing them is
            # the only safe answer (they could be a man-in-the-middle's)
            metrics.count("tls_handshake_failures_total", "unencrypted_data")
            raise Refused("08P01", "received unencrypted data after SSL request",
                          detail="This could be either a client-software bug or evidence of an attempted "
                                 "man-in-the-middle attack.")
        self.transport.write(messages.SSL_ACCEPT)
        self._start_handshake(direct=False)

    def _on_startup_message(self, startup: StartupMessage) -> None:
        if startup.needs_negotiation:
            # PostgreSQL's FrontendProtocol: the version asked for, or the newest it has
            self._send(messages.negotiate_protocol_version(min(startup.minor, NEWEST_MINOR),
                                                           startup.unrecognized_options))
        if self._frontend.refusal is not None:
            raise Refused(*self._frontend.refusal)
        if not self._frontend.take_client():
            raise Refused("53300", "sorry, too many clients already")
        if self._frontend.upstream is not None:
            startup, self._route = split_route(startup, self._frontend.settings.pgfast["pgfast.standby_suffix"],
                                               self._frontend.upstream.default_route)
        self._startup = startup
        # the host configuration the handshake used: a reload does not change it under us
        tls = self._tls.host if self._tls is not None else None
        info = ClientInfo(local=self._local, ssl=tls is not None, address=self._address, user=startup.user,
                          database=startup.database, replication=startup.replication,
                          certificate_cn=self._tls.peer_cn() if self._tls is not None else None,
                          ca_loaded=tls is not None and tls.requests_client_cert,
                          server_end_point=tls.server_end_point if tls is not None else None)
        self._set_state(State.AUTHENTICATING)
        self._task = asyncio.get_running_loop().create_task(self._log_in(startup, info))

    # --- TLS handshake -----------------------------------------------------------------

    def _start_handshake(self, direct: bool) -> None:
        self._direct_tls = direct
        self._handshake_started = time.monotonic()
        self._answered.add(SSLRequest)
        self._tls = self._frontend.tls.new_session()
        self._set_state(State.TLS_HANDSHAKE)
        self._do_handshake(self._inbuf.take_all())

    def _do_handshake(self, data: bytes) -> None:
        pump = self._tls.pump
        try:
            done = pump.handshake(data)
        except TLSError as exc:
            self.log_line(f"could not accept SSL connection: {exc}", detail=self._tls.verify_failure_detail())
            metrics.count("tls_handshake_failures_total", handshake_failure_reason(str(exc)))
            self._disconnect()
            return
        # once TLS 1.3 is done only session tickets are left to send: the first reply
        # carries them (the pump drains everything pending), saving a write
        if not done or self._tls.version != "TLSv1.3":
            out = pump.pending_ciphertext()
            if out:
                self.transport.write(out)
        if done:
            self._on_handshake_complete()

    def _on_handshake_complete(self) -> None:
        self._set_state(State.STARTUP)
        if self._direct_tls and self._tls.alpn() is None:
            metrics.count("tls_handshake_failures_total", "no_alpn")
            self.refuse(Refused("08P01", "received direct SSL connection request without ALPN protocol "
                                          "negotiation extension"))
            return
        version = self._tls.version
        if version in TLS_VERSIONS:
            self._tls_version = version
            metrics.count("tls_handshakes_total", version)
            metrics.count("tls_connections", version)
        metrics.observe("tls_handshake_seconds", time.monotonic() - self._handshake_started)
        # the client may have sent its startup packet right behind its Finished
        self.data_received(b"")

    # --- the login (login.Client) ------------------------------------------------------

    def send(self, data: bytes) -> None:
        """An authentication request to the client."""
        self._send(data)

    async def receive(self) -> tuple[int, bytes]:
        """The client's next message during authentication."""
        while True:
            try:
                msg = self._inbuf.take_message(MAX_AUTH_TOKEN_LENGTH)
            except ProtocolViolation:
                # PostgreSQL reads the type, then fails the length (pq_getmessage logs it):
                # the caller says what that means for its exchange
                self.log_line("invalid message length")
                return self._inbuf.first_byte(), None
            if msg is not None:
                return msg
            if self._input_ended:
                raise ClientGone()          # PostgreSQL's STATUS_EOF: nothing more is said
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def peer_uid(self) -> int | None:
        """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
        sock = self.transport.get_extra_info("socket")
        if sock is None or not hasattr(socket, "SO_PEERCRED"):
            return None
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
        return uid

    def authenticated(self, secret: Secret | None) -> None:
        self._authenticated_at = time.time()
        self._secret = secret
        self._set_state(State.CONNECTING)

    async def _log_in(self, startup: StartupMessage, info: ClientInfo) -> None:
        log.CLIENT.set(self._label)     # the task's own context: what the login logs names the client
        frontend = self._frontend
        try:
            facts = await log_in(frontend, startup, info, self)
            if startup.database == console.DATABASE and not startup.walsender:
                await self._serve_console(startup, facts)
                return
            mode = self._mode = frontend.pool_mode_for(startup, facts)
            waiting_since = time.monotonic()
            if frontend.is_paused(startup.database):
                # authenticated: a PAUSE may last, as PgBouncer's does, past authentication_timeout
                # (under transaction pooling the pool's queue holds it, within query_wait_timeout)
                self._cancel_timeout()
                if mode != "transaction":
                    await frontend.until_resumed(startup.database)
            if mode == "transaction":
                pool = frontend.tx_pools.pool_for(
                    pool_key(facts.session_rules, startup.params, self._route), startup.params,
                    f'role "{startup.user}", database "{startup.database}"',
                    frontend.setting_for("pgfast.pool_size", facts), self._secret)
                params = await greet(frontend.tx_pools, pool, startup.params)
            else:
                rules = facts.session_rules if mode == "session" else None
                backend, leftover = await frontend.pool.acquire(startup.params, rules, self._secret, self._route)
                if not startup.walsender and not leftover:
                    await self._give_identity(backend)
                waited = time.monotonic() - waiting_since
                metrics.observe("pool_wait_seconds", waited, mode)
                frontend.assigned(startup.database, waited)
        except Refused as refusal:
            self.refuse(refusal)
        except ClientGone:
            self._disconnect()
        except CatalogError as exc:
            log_catalog_failure(exc)
            self.refuse(Refused("57P03", _NOT_ACCEPTING,
                                 detail="pgfast could not read PostgreSQL's catalogs; the server log says why."))
        except BackendRefused as refusal:
            self.backend_refused(refusal)
        except OSError as exc:
            self.refuse(Refused("57P03", _NOT_ACCEPTING, detail=f"pgfast could not reach PostgreSQL: {exc}"))
        except Exception as exc:    # a bug must not leave the client waiting for authentication_timeout
            self.log_line(f"pgfast: unexpected {type(exc).__name__} while logging in a client (at {_where(exc)})")
            self._disconnect()
        else:
            if self._state is not State.CONNECTING:
                # the client left while its backend was readied, and the cancel was lost:
                # asyncio.wait_for (Python 3.11) returns a result that came at the same moment
                if mode != "transaction":
                    backend.close()
                return
            if mode == "transaction":
                self._start_transaction_pooling(pool, params)
            else:
                self._start_relaying(backend, leftover)

    # --- the client's identity, for the backend (identity.py) ---------------------------

    def _identity(self, per_transaction: bool = False) -> str | None:
        wanted = self._frontend.settings.pgfast["pgfast.client_identity"]
        if wanted == "off" or (per_transaction and wanted != "on"):
            return None
        address, port = self._peer[:2] if self._peer else (None, None)
        return identity_sql(address, port, self._tls.facts() if self._tls is not None else None)

    async def _give_identity(self, backend: BackendConnection) -> None:
        """Before the session's backend serves it; a failure here is the backend's."""
        identity = self._identity()
        if identity is None:
            return
        try:
            error = await backend.run(identity, IDENTITY_TIMEOUT)
        except BaseException:
            backend.close()
            raise
        if error is not None:
            backend.close()
            raise OSError(f"setting the client's identity failed: {error.get('M')}")
        backend.identity = identity

    # --- the admin console ---------------------------------------------------------------

    async def _serve_console(self, startup: StartupMessage, facts) -> None:
        if self._state is not State.CONNECTING:
            return          # gone meanwhile (see the end of _log_in)
        if facts is None:       # pg_hba did not need the catalogs, and they could not be read
            raise Refused("57P03", _NOT_ACCEPTING,
                          detail="pgfast could not read PostgreSQL's catalogs; the server log says why.")
        credentials = facts.credentials
        if credentials is None or not credentials.can_login:
            raise Refused("28000", f'role "{startup.user}" does not exist' if credentials is None
                          else f'role "{startup.user}" is not permitted to log in')
        role = console.role_of(self._frontend.settings.pgfast, startup.user)
        if role is None:
            raise Refused("28000", "not allowed",
                          log_detail=f'Role "{startup.user}" is not in pgfast.console_users or pgfast.stats_users.')
        self._cancel_timeout()
        pid, key = self._frontend.cancel_keys.issue_virtual(self, startup.cancel_key_length)
        self._cancel_pid = pid
        self._console = console.ConsoleSession(self, self._frontend, role)
        if self._reading_paused:        # what it sent ahead of its login is the console's now
            self._reading_paused = False
            self.transport.resume_reading()
        self._set_state(State.CONSOLE)
        self._send(b"".join([messages.AUTHENTICATION_OK,
                             *(messages.parameter_status(k, v) for k, v in console.PARAMETERS.items()),
                             messages.backend_key_data(pid, key), messages.READY_IDLE]))
        await self._console.run()

    @property
    def database(self) -> str | None:
        return self._startup.database if self._startup is not None else None

    def describe(self) -> dict:
        """SHOW CLIENTS's row (console.py), with the backend it holds (under "backend", its id)
        and its TLS facts."""
        startup = self._startup
        state = self._state
        backend = self._backend
        waiting_since = None
        if state is State.CONNECTING:
            label, waiting_since = "waiting", self._authenticated_at
        elif state in (State.RELAYING, State.CONSOLE):
            label = "active"
            if self._tx is not None:
                backend = self._tx.backend
                since = self._tx.waiting_since
                if since is not None:
                    label, waiting_since = "waiting", time.time() - (time.monotonic() - since)
                elif backend is None:
                    label = "idle"
        elif state in _ENDING:
            label = "closing"
        else:
            label = "login"
        address, port, local_address, local_port = self._peer or ("unix", 0, "", 0)
        tls = self._tls.facts() if self._tls is not None and state not in (State.TLS_HANDSHAKE, *_ENDING) else None
        return {"user": startup.user if startup else "", "database": startup.database if startup else "",
                "state": label, "addr": address, "port": port, "local_addr": local_address, "local_port": local_port,
                "connect_time": self._connected_at, "waiting_since": waiting_since, "ptr": f"{id(self):x}",
                "remote_pid": backend.pid if backend is not None else 0,
                "backend": id(backend) if backend is not None else None,
                "tls": f"{tls['version']}/{tls['cipher']}" if tls else "", "tls_facts": tls,
                "application_name": dict(startup.params).get("application_name", "") if startup else "",
                "pool_mode": "console" if self._console is not None else self._mode}

    # --- the relay ---------------------------------------------------------------------

    def _start_relaying(self, backend: BackendConnection, leftover: bytes) -> None:
        self._cancel_timeout()
        self._task = None
        self._backend = backend
        key = self._frontend.cancel_keys.issue(backend.pid, self, self._startup.cancel_key_length)
        self._cancel_pid = backend.pid
        notices, backend.notices = backend.notices, []
        self._set_state(State.RELAYING)
        self._send(b"".join([messages.AUTHENTICATION_OK, *notices,
                             *(messages.parameter_status(k, v) for k, v in backend.parameters.items()),
                             messages.backend_key_data(backend.pid, key), messages.READY_IDLE]))
        self._relay = Relay(self, self.transport, backend.transport, self._tls.pump if self._tls else None)
        self.transport.set_protocol(self._relay.client_protocol())
        backend.serve(self._relay.backend_protocol())
        if leftover:
            self._relay.from_backend(leftover)
        pending = self._inbuf.take_all()
        if pending:
            self._relay.forward_client(pending)
        self._hand_over_input()

    def _start_transaction_pooling(self, pool, params: dict[str, str]) -> None:
        """Greet the client with what one of its pool's backends said, then relay its
        messages to whichever backend the pool lends it for each transaction."""
        self._cancel_timeout()
        self._task = None
        pid, key = self._frontend.cancel_keys.issue_virtual(self, self._startup.cancel_key_length)
        self._cancel_pid = pid
        self._set_state(State.RELAYING)
        self._send(b"".join([messages.AUTHENTICATION_OK,
                             *(messages.parameter_status(k, v) for k, v in params.items()),
                             messages.backend_key_data(pid, key), messages.READY_IDLE]))
        self._relay = TxRelay(None, self.transport, self._tls.pump if self._tls else None, params)
        self._relay.identity = self._identity(per_transaction=True)
        self._tx = TransactionSession(self, self._frontend.tx_pools, pool, self._relay,
                                      self._frontend.settings.pgfast["pgfast.idle_transaction_timeout"])
        self._relay.set_session(self._tx)
        self.transport.set_protocol(self._relay.client_protocol())
        pending = self._inbuf.take_all()
        if pending:
            self._relay.feed(pending)
        self._hand_over_input()

    def _hand_over_input(self) -> None:
        """What was held back during the login now goes to the relay."""
        if self._input_ended:
            self._relay.client_eof()
        elif self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    def forward_cancel(self) -> None:
        """A CancelRequest with this session's key: for the backend running its work now."""
        if self._console is not None:
            self._console.cancel()
        elif self._tx is not None:
            self._tx.forward_cancel()
        elif self._state is State.RELAYING and self._backend is not None:
            self._backend.forward_cancel()

    # called by the relay

    def client_finished(self) -> None:
        """Terminate, or TLS close_notify: the client is done with its session. It
        reads nothing more, so no close_notify is sent back (TLS 1.3 allows that)."""
        self._disconnect(client_closed=True)

    def client_lost(self) -> None:
        self.connection_lost(None)

    def client_failed(self, exc: Exception) -> None:
        self.log_line(f"could not receive data from client: {exc}")
        self._disconnect()

    def client_input_ended(self) -> None:
        """The session relay's client half-closed: PostgreSQL is told so, answers what it
        was sent and ends the session; the client reads the answers."""
        self._backend.end_input()

    def backend_lost(self) -> None:
        backend = self._backend
        if backend is not None:
            backend.connection_lost(None)      # the relay was its protocol: tell it
        self._disconnect()

    def backend_failed(self, exc: Exception) -> None:
        self.log_line(f"pgfast dropped a backend connection (PID {self._backend.pid}): {exc}")
        self._backend.close()
        self._disconnect()

    def database_ddl_sent(self) -> None:
        """DROP/ALTER/CREATE DATABASE refuses while other sessions use the database
        concerned (or the template), and waits up to 5 s for them: idle pooled backends
        and the catalog session leave now."""
        self._frontend.pool.retire_idle()
        self._frontend.tx_pools.retire_idle()
        self._frontend.catalog.let_go()
