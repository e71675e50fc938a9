"""Client connections: negotiation, TLS, pg_hba.conf, then the relay to a backend.

A connection moves through explicit states, changed only in _set_state():

    NEGOTIATING -> HANDSHAKE -> NEGOTIATING (inside TLS) -> AUTHENTICATING -> RELAYING
                                                                            -> CLOSED (from any)

NEGOTIATING reads startup packets the way PostgreSQL's ProcessStartupPacket does
(SSLRequest, GSSENCRequest, CancelRequest, StartupMessage). From HANDSHAKE on, the
Cython pump does the TLS work on a pyOpenSSL connection, whose context carries the
callbacks (client-certificate verification, ALPN) and which answers questions about
the session. In RELAYING, the Cython relay (pgfast._relay) is the protocol of both
transports and calls back here only when a side ends.
"""
from __future__ import annotations

import asyncio
import enum
import hmac
import secrets
import struct

from OpenSSL import SSL

from . import _openssl, log, messages
from ._relay import Relay
from ._wire import (CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, PROTOCOL_3_0, SSL_REQUEST_CODE,
                    ProtocolViolation, ReadBuffer, TLSError, parse_startup_parameters)
from .auth import (MAX_AUTH_TOKEN_LENGTH, PASSWORD_METHODS, AuthFailed, ClientInfo,
                   authenticate_password, authorize)
from .backend import BackendConnection, BackendRefused, send_cancel
from .catalog import Catalog, CatalogError, log_catalog_failure
from .config import Settings
from .hba import HbaRules, IdentMap, resolve_client_hostname
from .pool import Pool
from .tls import ServerTLS, alpn_protocol, peer_certificate_cn, verify_failure

# Flow control between the two sides of a relay: stop reading one side while the
# other side's transport queue holds more than this.
HIGH_WATER = 512 * 1024
LOW_WATER = 128 * 1024
# Before authentication a client may only send small things.
_PREAUTH_LIMIT = 64 * 1024
_TLS_RECORD_TYPE_HANDSHAKE = 0x16


class State(enum.IntEnum):
    NEGOTIATING = 0
    HANDSHAKE = 1
    AUTHENTICATING = 2
    RELAYING = 3
    CLOSED = 4


_ALLOWED = {
    State.NEGOTIATING: {State.HANDSHAKE, State.AUTHENTICATING, State.CLOSED},
    State.HANDSHAKE: {State.NEGOTIATING, State.CLOSED},
    State.AUTHENTICATING: {State.RELAYING, State.CLOSED},
    State.RELAYING: {State.CLOSED},
    State.CLOSED: set(),
}


class Refused(Exception):
    """A startup-phase failure reported to the client as a FATAL ErrorResponse."""

    def __init__(self, sqlstate: str, message: str, detail: str | None = None):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.detail = detail


def _replication_mode(value: str | None) -> bool:
    """True for physical replication; logical (database) connections match pg_hba
    by database like any other."""
    if value is None or value.lower() == "database":
        return False
    lowered = value.lower()
    if lowered in ("true", "on", "yes", "1"):
        return True
    if lowered in ("false", "off", "no", "0"):
        return False
    raise Refused("22023", f'invalid value for parameter "replication": "{value}"',
                  "Valid values are: \"false\", 0, \"true\", 1, \"database\".")


class Frontend:
    """What every client connection shares: configuration, rules, the TLS context,
    where PostgreSQL listens, and the cancel keys handed out."""

    def __init__(self, settings: Settings, hba: HbaRules, ident: IdentMap, tls: ServerTLS | None,
                 backend_socket: str, catalog: Catalog, pool: Pool):
        self.settings = settings
        self.hba = hba
        self.ident = ident
        self.tls = tls
        self.backend_socket = backend_socket
        self.catalog = catalog
        self.pool = pool
        # what an unknown role's password is checked as (PostgreSQL: password_encryption)
        self.password_encryption = settings.raw.get("password_encryption", "scram-sha-256").lower()
        self.clients: set[ClientConnection] = set()
        self.sessions = 0               # clients past their startup packet
        self._cancel_keys: dict[int, tuple[int, int]] = {}   # backend pid -> (client key, backend key)
        self._servers: list[asyncio.AbstractServer] = []

    async def serve(self, tcp_sockets, unix_sockets) -> None:
        loop = asyncio.get_running_loop()
        for sock in tcp_sockets:
            self._servers.append(await loop.create_server(lambda: ClientConnection(self, local=False), sock=sock))
        for sock, _path in unix_sockets:
            self._servers.append(await loop.create_unix_server(lambda: ClientConnection(self, local=True), sock=sock))

    def register_cancel_key(self, backend_pid: int, backend_key: int) -> int:
        client_key = secrets.randbits(32)
        self._cancel_keys[backend_pid] = (client_key, backend_key)
        return client_key

    def forget_cancel_key(self, backend_pid: int) -> None:
        self._cancel_keys.pop(backend_pid, None)

    def cancel(self, pid: int, key: int) -> None:
        entry = self._cancel_keys.get(pid)
        if entry is None:
            log.log(f"PID {pid} in cancel request did not match any process")
            return
        client_key, backend_key = entry
        if not hmac.compare_digest(struct.pack("!I", client_key), struct.pack("!I", key)):
            log.log(f"wrong key in cancel request for process {pid}")
            return
        asyncio.get_running_loop().create_task(self._forward_cancel(pid, backend_key))

    async def _forward_cancel(self, pid: int, backend_key: int) -> None:
        try:
            await send_cancel(self.backend_socket, pid, backend_key)
        except OSError as exc:
            log.log(f"could not forward cancel request for process {pid}: {exc}")

    async def shutdown(self) -> None:
        for server in self._servers:
            server.close()
        self.pool.begin_shutdown()
        for client in list(self.clients):
            client.terminate("57P01", "terminating connection due to administrator command")
        for server in self._servers:
            await server.wait_closed()


class ClientConnection(asyncio.Protocol):

    def __init__(self, frontend: Frontend, local: bool):
        self._frontend = frontend
        self._local = local
        self._state = State.NEGOTIATING
        self.transport: asyncio.Transport | None = None
        self._address: str | None = None
        self._inbuf = ReadBuffer()
        self._tls: SSL.Connection | None = None     # pyOpenSSL: the context's callbacks, peer info
        self._handshake = None                        # the Cython pump while it runs the handshake
        self._pump = None                             # ... and once the handshake is done
        self._direct_tls = False
        self._gss_done = False
        self._ssl_done = False
        self._started = False                         # a StartupMessage has been read
        self._timeout: asyncio.TimerHandle | None = None
        self._backend: BackendConnection | None = None
        self._relay: Relay | None = None
        self._task: asyncio.Task | None = None
        self._waiter: asyncio.Future | None = None     # authentication waits here for the client

    # --- state -------------------------------------------------------------------------

    def _set_state(self, new: State) -> None:
        if new not in _ALLOWED[self._state]:
            raise RuntimeError(f"client connection cannot go from {self._state.name} to {new.name}")
        self._state = new

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        if not self._local:
            self._address = transport.get_extra_info("peername")[0]
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        loop = asyncio.get_running_loop()
        self._timeout = loop.call_later(self._frontend.settings.authentication_timeout, self._on_timeout)
        self._frontend.clients.add(self)

    def data_received(self, data: bytes) -> None:
        if self._state == State.HANDSHAKE:
            self._do_handshake(data)
            return
        if self._pump is not None:
            try:
                data = self._pump.decrypt(data)
            except TLSError as exc:
                log.log(f"could not receive data from client: {exc}")
                self._close()
                return
        if self._state == State.CLOSED:
            return
        self._inbuf.feed_data(data)
        if self._state == State.NEGOTIATING:
            self._do_negotiate()
        elif self._inbuf.size() > _PREAUTH_LIMIT:
            self._refuse(Refused("08P01", "too much data received before authentication completed"))
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def eof_received(self):
        if self._state == State.NEGOTIATING and self._inbuf.size():
            log.log("incomplete startup packet")
        return False

    def connection_lost(self, exc) -> None:
        self._release()

    # --- sending and closing -----------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self._pump is not None:
            data = self._pump.encrypt(data)
        self.transport.write(data)

    def _close(self, backend_idle: bool = False) -> None:
        if self._state == State.CLOSED:
            return
        if self._pump is not None:
            self.transport.write(self._pump.close_notify())
        self.transport.close()
        self._release(backend_idle)

    def _release(self, backend_idle: bool = False) -> None:
        """Everything the connection holds goes; backend_idle lets the pool keep the backend."""
        if self._state == State.CLOSED:
            return
        if self._started:
            self._frontend.sessions -= 1
        self._set_state(State.CLOSED)
        self._frontend.clients.discard(self)
        if self._timeout is not None:
            self._timeout.cancel()
        if self._task is not None:
            self._task.cancel()
        if self._backend is not None:
            backend, self._backend, self._relay = self._backend, None, None
            self._frontend.forget_cancel_key(backend.pid)
            if not backend.closed:
                backend.detach()
            self._frontend.pool.release(backend, backend_idle)

    def _refuse(self, refusal: Refused | AuthFailed, detail_for_log: str | None = None) -> None:
        """FATAL to the client and to the server log (PostgreSQL logs what it sends)."""
        detail = getattr(refusal, "detail", None)
        log.fatal(refusal.message, detail=detail_for_log or detail)
        self._send(messages.error(refusal.sqlstate, refusal.message, detail=detail))
        self._close()

    def terminate(self, sqlstate: str, text: str) -> None:
        if self._state != State.CLOSED:
            self._send(messages.error(sqlstate, text))
            self._close()

    def _on_timeout(self) -> None:
        self._timeout = None
        if self._state == State.AUTHENTICATING:
            # PostgreSQL logs this FATAL but does not write to a client still
            # authenticating: the connection just closes
            log.fatal("canceling authentication due to timeout")
            self._close()
        elif self._state in (State.NEGOTIATING, State.HANDSHAKE):
            # PostgreSQL's startup-packet timeout ends the connection without a word
            self._close()

    # --- negotiation -------------------------------------------------------------------

    def _do_negotiate(self) -> None:
        while self._state == State.NEGOTIATING:
            if not self._ssl_done and self._starts_direct_tls():
                self._start_handshake(direct=True)
                return
            try:
                packet = self._inbuf.take_startup()
                if packet is None:
                    return
                self._on_startup_packet(*packet)
            except ProtocolViolation as exc:
                self._refuse(Refused("08P01", str(exc)))
            except Refused as refusal:
                self._refuse(refusal)

    def _starts_direct_tls(self) -> bool:
        return self._inbuf.first_byte() == _TLS_RECORD_TYPE_HANDSHAKE and self._tls_available()

    def _tls_available(self) -> bool:
        return self._frontend.tls is not None and not self._local

    def _on_startup_packet(self, code: int, body: bytes) -> None:
        if code == SSL_REQUEST_CODE and not self._ssl_done:
            self._on_ssl_request()
        elif code == SSL_REQUEST_CODE and self._pump is not None:
            self._send(messages.SSL_REFUSE)
        elif code == GSSENC_REQUEST_CODE and not self._gss_done:
            self._gss_done = True
            self._send(messages.SSL_REFUSE)     # no GSSAPI encryption: 'N', the client goes on
        elif code == CANCEL_REQUEST_CODE:
            self._on_cancel_request(body)
        elif code >> 16 == PROTOCOL_3_0 >> 16:
            self._on_startup_message(code & 0xFFFF, body)
        else:
            raise Refused("0A000", f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                                   "server supports 3.0 to 3.0")

    def _on_ssl_request(self) -> None:
        self._ssl_done = True
        if not self._tls_available():
            self.transport.write(messages.SSL_REFUSE)
            return
        if self._inbuf.size():
            # bytes sent before the handshake were never encrypted: refusing them is
            # the only safe answer (they could be a man-in-the-middle's)
            raise Refused("08P01", "received unencrypted data after SSL request",
                          "This could be either a client-software bug or evidence of an attempted "
                          "man-in-the-middle attack.")
        self.transport.write(messages.SSL_ACCEPT)
        self._start_handshake(direct=False)

    def _on_cancel_request(self, body: bytes) -> None:
        if len(body) != 8:
            raise Refused("08P01", "invalid length of cancel request packet")
        pid, key = struct.unpack("!iI", body)
        self._frontend.cancel(pid, key)
        self._close()

    def _on_startup_message(self, minor: int, body: bytes) -> None:
        params = parse_startup_parameters(body)
        protocol_options = [name for name, _ in params if name.startswith("_pq_.")]
        if minor > 0 or protocol_options:
            self._send(messages.negotiate_protocol_version(0, protocol_options))
        params = [(k, v) for k, v in params if not k.startswith("_pq_.")]
        values = dict(params)
        user = values.get("user")
        if not user:
            raise Refused("28000", "no PostgreSQL user name specified in startup packet")
        database = values.get("database") or user
        replication = _replication_mode(values.get("replication"))
        self._started = True
        self._frontend.sessions += 1
        if self._frontend.sessions > self._frontend.settings.max_connections:
            raise Refused("53300", "sorry, too many clients already")
        info = ClientInfo(local=self._local, ssl=self._pump is not None, address=self._address, user=user,
                          database=database, replication=replication,
                          certificate_cn=peer_certificate_cn(self._tls) if self._tls is not None else None,
                          ca_loaded=self._frontend.tls is not None and self._frontend.tls.requests_client_cert)
        # the parameters go to PostgreSQL as the client sent them (less _pq_ options): it
        # defaults the database to the user itself, and adding it here could push a
        # packet PostgreSQL accepts from the client past its 10000-byte limit
        self._set_state(State.AUTHENTICATING)
        if not self._start_at_once(info, params):
            self._task = asyncio.get_running_loop().create_task(self._authenticate_and_connect(info, params))

    # --- TLS handshake -----------------------------------------------------------------

    def _start_handshake(self, direct: bool) -> None:
        self._direct_tls = direct
        self._ssl_done = True
        self._tls = self._frontend.tls.new_connection()
        self._handshake = _openssl.make_pump(self._tls)
        self._set_state(State.HANDSHAKE)
        self._do_handshake(self._inbuf.take_all())

    def _do_handshake(self, data: bytes) -> None:
        pump = self._handshake
        try:
            done = pump.handshake(data)
        except TLSError as exc:
            self.transport.write(pump.pending_ciphertext())     # the alert
            failure = verify_failure(self._tls)
            log.log(f"could not accept SSL connection: {exc}", detail=failure[1] if failure else None)
            self.transport.close()
            self._release()
            return
        # once TLS 1.3 is done only session tickets are left to send: the first reply
        # carries them (the pump drains everything pending), saving a write
        if not done or self._tls.get_protocol_version_name() != "TLSv1.3":
            out = pump.pending_ciphertext()
            if out:
                self.transport.write(out)
        if done:
            self._on_handshake_complete()

    def _on_handshake_complete(self) -> None:
        self._pump, self._handshake = self._handshake, None
        self._set_state(State.NEGOTIATING)
        if self._direct_tls and alpn_protocol(self._tls) is None:
            self._refuse(Refused("08P01", "received direct SSL connection request without ALPN protocol "
                                          "negotiation extension"))
            return
        # the client may have sent its startup packet right behind its Finished
        self.data_received(b"")

    # --- authentication and the backend ------------------------------------------------

    def send(self, data: bytes) -> None:
        """Exchange.send: an authentication request to the client."""
        self._send(data)

    async def receive(self) -> tuple[int, bytes]:
        """Exchange.receive: the client's next message during authentication."""
        while True:
            try:
                msg = self._inbuf.take_message(MAX_AUTH_TOKEN_LENGTH)
            except ProtocolViolation as exc:
                raise AuthFailed("08P01", str(exc)) from None
            if msg is not None:
                return msg
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    async def _authenticate_and_connect(self, info: ClientInfo, params: list[tuple[str, str]]) -> None:
        frontend = self._frontend
        try:
            roles = await frontend.catalog.roles_of(info.user) if frontend.hba.needs_roles else None
            hostname = None
            if frontend.hba.needs_hostname and info.address is not None:
                hostname = await asyncio.get_running_loop().run_in_executor(
                    None, resolve_client_hostname, info.address)
            line = authorize(frontend.hba, frontend.ident, info, roles, hostname)
            if line.method in PASSWORD_METHODS:
                await authenticate_password(line, info, self, await frontend.catalog.credentials(info.user),
                                            frontend.tls.server_end_point if info.ssl else None,
                                            frontend.password_encryption)
            rules = await self._session_rules(info) if self._poolable(info, params) else None
            backend, leftover = await frontend.pool.acquire(params, rules)
        except AuthFailed as failure:
            self._refuse(failure, failure.log_detail)
            return
        except CatalogError as exc:
            log_catalog_failure(exc)
            self._refuse(Refused("57P03", "the database system is not accepting connections",
                                 "pgfast could not read PostgreSQL's catalogs; the server log says why."))
            return
        except BackendRefused as refusal:
            # PostgreSQL logged it already; the client gets its exact words
            self._send(refusal.raw_error)
            self._close()
            return
        except OSError as exc:
            self._refuse(Refused("57P03", "the database system is not accepting connections",
                                 f"pgfast could not reach PostgreSQL: {exc}"))
            return
        except Exception as exc:    # a bug must not leave the client waiting for authentication_timeout
            log.log(f"pgfast: unexpected error while authenticating: {exc!r}")
            self._close()
            return
        if self._state == State.CLOSED:
            self._frontend.pool.release(backend, idle=not leftover)
            return
        self._on_backend_ready(backend, leftover)

    def _poolable(self, info: ClientInfo, params: list[tuple[str, str]]) -> bool:
        # a walsender (replication=true or database) is never pooled: DISCARD ALL does not
        # end what it holds (temporary replication slots, streaming)
        walsender = info.replication or dict(params).get("replication", "").lower() == "database"
        return self._frontend.pool.enabled and not walsender

    def _start_at_once(self, info: ClientInfo, params: list[tuple[str, str]]) -> bool:
        """The common case, without a task: pg_hba decides alone (no password, no role or
        host name lookups), the catalog answer is cached and an idle backend is ready.
        False, having done nothing, when _authenticate_and_connect must take over."""
        frontend = self._frontend
        if frontend.hba.needs_roles or frontend.hba.needs_hostname or not self._poolable(info, params):
            return False
        rules = frontend.catalog.cached_session_rules(info.user, info.database)
        if rules is None:
            return False
        try:
            line = authorize(frontend.hba, frontend.ident, info, None, None)
        except AuthFailed as failure:
            self._refuse(failure, failure.log_detail)
            return True
        if line.method in PASSWORD_METHODS:
            return False
        backend = frontend.pool.take_idle(params, rules)
        if backend is None:
            return False
        self._on_backend_ready(backend, b"")
        return True

    async def _session_rules(self, info: ClientInfo):
        """What a pooled backend must have started under to serve this client; None
        (a fresh, unpooled backend) when the catalogs cannot say."""
        try:
            return await self._frontend.catalog.session_rules(info.user, info.database)
        except CatalogError as exc:
            log_catalog_failure(exc)
            return None

    def _on_backend_ready(self, backend: BackendConnection, leftover: bytes) -> None:
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None
        self._task = None
        self._backend = backend
        client_key = self._frontend.register_cancel_key(backend.pid, backend.secret_key)
        notices, backend.notices = backend.notices, []
        self._set_state(State.RELAYING)
        self._send(b"".join([messages.AUTHENTICATION_OK, *notices,
                             *(messages.parameter_status(k, v) for k, v in backend.parameters.items()),
                             messages.backend_key_data(backend.pid, client_key), messages.READY_IDLE]))
        self._relay = Relay(self, self.transport, backend.transport, self._pump)
        self.transport.set_protocol(self._relay.client_protocol())
        backend.attach(self._relay.backend_protocol())
        if leftover:
            self._relay.from_backend(leftover)
        pending = self._inbuf.take_all()
        if pending:
            self._relay.forward_client(pending)

    # --- called by the relay ------------------------------------------------------------

    def client_finished(self) -> None:
        """Terminate, or TLS close_notify: the client is done with its session. It
        reads nothing more, so no close_notify is sent back (TLS 1.3 allows that)."""
        backend_idle = self._relay.backend_idle()
        self.transport.close()
        self._release(backend_idle)

    def client_lost(self) -> None:
        self._release(backend_idle=self._relay is not None and self._relay.backend_idle())

    def client_failed(self, exc: Exception) -> None:
        log.log(f"could not receive data from client: {exc}")
        self._close()

    def backend_lost(self) -> None:
        self._close()

    def database_ddl_sent(self) -> None:
        """DROP/ALTER/CREATE DATABASE refuses while other sessions use the database
        concerned, and waits up to 5 s for them: idle pooled backends leave now."""
        self._frontend.pool.retire_idle()

    def backend_failed(self, exc: Exception) -> None:
        log.log(f"pgfast dropped a backend connection (PID {self._backend.pid}): {exc}")
        self._backend.close()
        self._close()
