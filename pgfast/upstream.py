"""Upstream mode: the PostgreSQL servers pgfast fronts run elsewhere (pgfast.upstream, a
libpq connection string), reached over TCP and TLS the way libpq reaches them.

Each host's role is learned by asking it (pg_is_in_recovery()) and asked again every
pgfast.health_check_period, as pgfast.auth_user (each worker asks for itself), and at
once when a connection to it fails. A host's state changes only in
UpstreamHost._set_state, from a health check's answer (a check that fails: DOWN, out of
rotation until a later one gets an answer):

    UNKNOWN -> PRIMARY | STANDBY | DOWN,  and between any two of those later

A pooled backend is reused only while its host still has the role its route asks for
(UpstreamHost.serves): a primary demoted after a failover takes no more writes.

Routes say which hosts a backend may run on (negotiation.py): "primary" (read-write), or
"standby" (the clients who asked for a database with pgfast.standby_suffix): standbys
within pgfast.max_standby_lag of the primary, taken in turn. Other database names take
the route of the upstream's target_session_attrs: read-only and standby route to standbys,
prefer-standby to a standby while one is ready, anything else to the primary.
"""
from __future__ import annotations

import asyncio
import enum
import itertools
import os
import socket
import struct
import time

from . import conninfo, log, messages
from ._framing import SSL_REQUEST_CODE
from ._pump import TLSError
from ._tlsstream import TLSTransport
from .backend import CANCEL_TIMEOUT, BackendConnection, BackendRefused, open_backend
from .credentials import Policy, Secret
from .negotiation import ANY, PREFER_STANDBY, PRIMARY, STANDBY
from .tls import ClientTLS, server_end_point_hash

_HEALTH_QUERY = ("SELECT pg_catalog.pg_is_in_recovery(), "
                 "CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn() "
                 "ELSE pg_catalog.pg_current_wal_lsn() END")
_SSL_REQUEST = struct.pack("!ii", 8, SSL_REQUEST_CODE)


_ROUTES = {"read-only": STANDBY, "standby": STANDBY, "prefer-standby": PREFER_STANDBY}
_BUSY = ("53300", "53400")      # too many connections: a full host, not a dead one
_CHECK_SOON_SECONDS = 1.0        # at most this often per host, for failed connections


class HostState(enum.Enum):
    UNKNOWN = "unknown"      # not asked yet
    PRIMARY = "primary"
    STANDBY = "standby"
    DOWN = "down"            # its last health check failed: out of rotation


class UpstreamError(ConnectionError):
    """What libpq would say of a connection attempt, prefixed as libpq prefixes it."""


# libpq keywords pgfast parses (conninfo.py) but does not take, and why: refused at start
# rather than quietly ignored
_NOT_TAKEN = {
    "user": "pgfast logs in as each client's role, and as pgfast.auth_user",
    "password": "passwords go in pgfast.passfile, so that none is in postgresql.conf",
    "passfile": "pgfast reads pgfast.passfile",
    "sslpassword": "an encrypted sslkey is not supported; give pgfast the key decrypted, mode 0600",
    "options": "settings for the upstream's sessions belong to ALTER ROLE/DATABASE ... SET",
}
# pgfast's keepalive defaults, where libpq leaves the system's (two hours idle): a host that
# vanishes without a word is noticed by the kernel in about 25 s, not after a client's hang
_KEEPALIVES = {"keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}


def not_taken(info: conninfo.Upstream) -> str | None:
    """Why pgfast refuses something pgfast.upstream says, or None."""
    for keyword, why in _NOT_TAKEN.items():
        if info.options.get(keyword):
            return f'{keyword} is not taken: {why}'
    if info.options.get("load_balance_hosts") == "random":
        return "load_balance_hosts=random is not taken: new backends go to the standbys in turn"
    return None


def _lsn(text: str | None) -> int | None:
    if not text:
        return None
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


class _Negotiation(asyncio.Protocol):
    """The TCP connection until it carries PostgreSQL's protocol: the SSLRequest's answer
    and the TLS handshake's records."""

    def __init__(self):
        self.transport = None
        self._data = bytearray()
        self._waiter: asyncio.Future | None = None
        self._lost: Exception | None = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self._data += data
        self._wake()

    def eof_received(self):
        self._lost = ConnectionError("server closed the connection unexpectedly")
        self._wake()
        return False

    def connection_lost(self, exc):
        self._lost = exc or ConnectionError("server closed the connection unexpectedly")
        self._wake()

    def _wake(self):
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def receive(self) -> bytes:
        while not self._data:
            if self._lost is not None:
                raise self._lost
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        data, self._data = bytes(self._data), bytearray()
        return data


class UpstreamHost:
    """One host of pgfast.upstream: how to reach it, and what its last health check said."""

    def __init__(self, upstream: "Upstream", host: conninfo.Host):
        self.upstream = upstream
        self.host = host
        # libpq never uses TLS on a Unix socket
        self.unix = host.host.startswith("/")
        # encrypt or not, per attempt: libpq's allow tries without TLS first, then with it;
        # None: as sslmode says
        self.attempts = (False, True) if upstream.info.sslmode == "allow" and not self.unix else (None,)
        self.address = (host.host, host.port)
        self.login_policy = upstream.policy
        self.state = HostState.UNKNOWN
        self.lsn: int | None = None          # its WAL position at the last check
        self.checked_at = 0.0
        self.checking = False                # a health check of it runs
        self.soon_at = float("-inf")         # when a failed connection last asked for a check
        self.failure: str | None = None      # why its last check failed

    def __repr__(self) -> str:
        return f"{self.host.host}:{self.host.port}"

    @property
    def login_timeout(self) -> float:
        """From TCP connect to ReadyForQuery, as libpq's connect_timeout bounds it."""
        return self.upstream.info.connect_timeout or self.upstream.check_timeout

    @property
    def label(self) -> str:
        """libpq's prefix for an error on this host."""
        return f'connection to server at "{self.host.host}", port {self.host.port} failed'

    def _set_state(self, new: HostState, failure: str | None = None) -> None:
        if new is not self.state:
            # about the host, whichever client's connection found it out
            if new is HostState.DOWN:
                log.detached().run(log.log, f"upstream server {self!r} is out of rotation: {failure}")
            elif self.state is not HostState.UNKNOWN:
                log.detached().run(log.log, f"upstream server {self!r} is now a {new.value}")
        self.state = new
        self.failure = failure

    def serves(self, route: str | None) -> bool:
        """Whether a backend here may (still) serve route: pooled backends are reused only
        while their host has the role they were opened for (a standby: within
        pgfast.max_standby_lag)."""
        if route in (PRIMARY, None):
            return self.state is HostState.PRIMARY
        if self.state is HostState.STANDBY:
            return self.upstream.caught_up(self)
        return route != STANDBY and self.state is HostState.PRIMARY

    def passfile_secret(self, user: str, database: str) -> Secret:
        """Without an entry, an empty secret: a password request gets libpq's "no password
        supplied", never a pass through to the client."""
        password = self.upstream.password_for(self.host, database, user)
        return Secret(password=password.encode(), fixed=True) if password is not None else Secret()

    # --- connections ------------------------------------------------------------------

    async def connect(self, factory, encrypt: bool | None = None):
        """factory()'s protocol on a new connection to this host, TLS set up as sslmode
        says (or as encrypt says, for allow's two attempts); raises UpstreamError with
        libpq's words. Without a connect_timeout, the health checks' timeout bounds it: a
        host that stops answering must not leave clients waiting on the kernel's SYN retries."""
        try:
            return await asyncio.wait_for(self._connect(factory, encrypt), self.login_timeout)
        except (OSError, TLSError, asyncio.TimeoutError) as exc:
            # one failure (a full backlog, a slow moment) is not a verdict: a health check is
            self.check_soon()
            raise self._failure(exc) from None

    def check_soon(self) -> None:
        self.upstream.check_soon(self)

    def _failure(self, exc: BaseException) -> UpstreamError:
        """libpq's words for a failed connection or check, prefixed with the host."""
        if isinstance(exc, UpstreamError):
            return exc
        if isinstance(exc, asyncio.TimeoutError):
            return UpstreamError(f"{self.label}: timeout expired")
        return UpstreamError(f"{self.label}: {_reason(exc)}")

    async def _connect(self, factory, encrypt: bool | None):
        loop = asyncio.get_running_loop()
        info = self.upstream.info
        if self.unix:
            transport, negotiation = await loop.create_unix_connection(
                _Negotiation, os.path.join(self.host.host, f".s.PGSQL.{self.host.port}"))
            encrypt = False
        else:
            transport, negotiation = await loop.create_connection(
                _Negotiation, self.host.hostaddr or self.host.host, self.host.port)
        if encrypt is None:
            encrypt = info.sslmode != "disable"
        try:
            if not self.unix:
                self.upstream.set_socket_options(transport.get_extra_info("socket"))
            tls_session = None
            if encrypt and info.options.get("sslnegotiation") == "direct":
                # PostgreSQL 17's direct TLS: the handshake at once, ALPN saying what follows
                tls_session = await self._handshake(transport, negotiation)
                if tls_session.alpn() is None:
                    raise UpstreamError(f"{self.label}: direct SSL connection was established without ALPN "
                                        "protocol negotiation extension")
            elif encrypt:
                transport.write(_SSL_REQUEST)
                answer = await negotiation.receive()
                if answer[:1] == b"S" and len(answer) == 1:
                    tls_session = await self._handshake(transport, negotiation)
                elif answer[:1] == b"N" and len(answer) == 1:
                    if info.sslmode not in ("prefer", "allow"):
                        raise UpstreamError(f"{self.label}: server does not support SSL, but SSL was required")
                else:
                    raise UpstreamError(f"{self.label}: received invalid response to SSL negotiation: "
                                        f"{chr(answer[0]) if answer else ''}")
            binding = self._end_point(tls_session) if tls_session is not None else None
        except BaseException:
            transport.abort()
            raise
        protocol = factory()
        if tls_session is not None:
            wrapped = TLSTransport(transport, tls_session.pump, protocol)
            if isinstance(protocol, BackendConnection):
                protocol.tls = f"{tls_session.version}/{tls_session.connection.get_cipher_name()}"
                protocol.channel_binding = binding
            protocol.connection_made(wrapped)
        else:
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
        return protocol

    def _end_point(self, session) -> bytes | None:
        """SCRAM-SHA-256-PLUS's tls-server-end-point data for the upstream's certificate."""
        try:
            certificate = session.connection.get_peer_certificate(as_cryptography=True)
            return server_end_point_hash(certificate) if certificate is not None else None
        except Exception as exc:        # a signature algorithm cryptography cannot name, say
            raise UpstreamError(f"{self.label}: SSL error: no channel binding data for the server certificate: "
                                f"{exc}") from None

    async def _handshake(self, transport, negotiation: _Negotiation):
        tls: ClientTLS = self.upstream.tls
        session = tls.new_session(self.host.host)
        pump = session.pump
        try:
            done = pump.handshake(b"")
            while True:
                out = pump.pending_ciphertext()
                if out:
                    transport.write(out)
                if done:
                    break
                done = pump.handshake(await negotiation.receive())
        except TLSError as exc:
            out = pump.pending_ciphertext()
            if out:
                transport.write(out)        # the alert, so the server logs why
            raise UpstreamError(f"{self.label}: SSL error: {exc}") from None
        problem = tls.check_peer(session, self.host.host)
        if problem is not None:
            raise UpstreamError(f"{self.label}: {problem}")
        return session

    async def send_cancel(self, pid: int, secret_key: int) -> None:
        """A CancelRequest over a connection of its own (over TLS when sslmode asks for
        it), returning once the server has closed it: it has signalled the backend."""
        protocol = await self.connect(lambda: _Cancel(messages.cancel_request(pid, secret_key)))
        try:
            await asyncio.wait_for(protocol.done, CANCEL_TIMEOUT)
        finally:
            protocol.transport.close()

    # --- health -------------------------------------------------------------------------

    async def check(self) -> None:
        """Ask the host what it is, as pgfast.auth_user; DOWN if it cannot say in time."""
        if self.checking:
            return              # one check of a host at a time: an older answer must not land last
        upstream = self.upstream
        backend = None
        self.checking = True
        try:
            backend, _ = await asyncio.wait_for(open_backend(self, upstream.check_params), upstream.check_timeout)
            rows, error = await backend.fetch(_HEALTH_QUERY, upstream.check_timeout)
            if error is not None:
                raise UpstreamError(error.get("M", "health check failed"))
            (in_recovery, lsn), = rows
            lsn = _lsn(lsn)
        except BackendRefused as exc:
            if exc.fields.get("C") not in _BUSY:
                self._set_state(HostState.DOWN, f"{self.label}: {exc}")
            elif self.failure != str(exc):     # full, not down: it keeps its role and its backends
                self.failure = str(exc)
                log.detached().run(log.log, f"upstream server {self!r} refused a health check: {exc}")
            return
        except Exception as exc:        # whatever went wrong, the host cannot serve now
            self._set_state(HostState.DOWN, str(self._failure(exc)))
            return
        finally:
            self.checking = False
            if backend is not None:
                backend.close()
        self.lsn = lsn
        self.checked_at = time.monotonic()
        self._set_state(HostState.STANDBY if in_recovery == "t" else HostState.PRIMARY)


class _Cancel(asyncio.Protocol):
    """A CancelRequest's connection: the request, then the server's close."""

    def __init__(self, request: bytes):
        self.request = request
        self.transport = None
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data):
        pass            # the server says nothing to a CancelRequest

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result(None)


def _reason(exc: BaseException) -> str:
    """libpq's words for a failed connection, on one line (libpq's hint for a refused
    connection would make it two)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


class Upstream:
    """Every host of pgfast.upstream, their health checks and the routes (see the module
    doc). pick() is what the pools and the catalog open backends through."""

    def __init__(self, info: conninfo.Upstream, tls: ClientTLS | None, *, passfile: list, auth_user: str,
                 check_period: float, check_timeout: float, max_standby_lag: int):
        self.info = info
        self.tls = tls
        self.policy = Policy(info.options.get("require_auth") or None, info.options.get("channel_binding") or "prefer")
        self.hosts = [UpstreamHost(self, host) for host in info.hosts]
        self._passfile = passfile
        self.check_params = [("user", auth_user), ("database", info.dbname or "postgres"),
                             ("application_name", info.application_name or "pgfast health check")]
        self._keepalives = {k: int(info.options.get(k) or default) for k, default in _KEEPALIVES.items()}
        self._soon: set[UpstreamHost] = set()         # hosts a failed connection asked a check for
        self.check_period = check_period
        self.check_timeout = check_timeout
        self.max_standby_lag = max_standby_lag
        self._turn = itertools.count()
        self._checker: asyncio.Task | None = None
        self._checked = asyncio.Event()

    def password_for(self, host: conninfo.Host, database: str, user: str) -> str | None:
        return conninfo.password_for(self._passfile, host.host, host.port, database, user)

    # --- routes -----------------------------------------------------------------------

    def _primary(self) -> UpstreamHost | None:
        """The first host whose last check said primary (split brain: list order decides)."""
        return next((h for h in self.hosts if h.state is HostState.PRIMARY), None)

    @property
    def default_route(self) -> str:
        """The route of a database named without pgfast.standby_suffix."""
        return _ROUTES.get(self.info.target_session_attrs, PRIMARY)

    def pick(self, route: str | None = None) -> UpstreamHost:
        """The host a new backend for route runs on; UpstreamError when none may serve it."""
        primary = self._primary()
        if route in (STANDBY, PREFER_STANDBY) or (route == ANY and primary is None):
            ready = [h for h in self.hosts if h.state is HostState.STANDBY and self.caught_up(h)]
            if ready:
                return ready[next(self._turn) % len(ready)]
            if route == STANDBY:
                raise UpstreamError("no standby server is available" + self._why())
        if primary is None:
            raise UpstreamError("no primary server is available" + self._why())
        return primary

    def prefers(self, host: UpstreamHost, route: str | None) -> bool:
        """Whether host is still a right place for a session of route (the catalog's, ANY:
        the primary while there is one), without taking a standby's turn."""
        primary = self._primary()
        if route == ANY and primary is not None:
            return host is primary
        return host.serves(route)

    def caught_up(self, standby: UpstreamHost) -> bool:
        """Within pgfast.max_standby_lag of the primary at their last checks (with no
        primary to compare with, a standby that has replayed anything serves reads)."""
        if standby.lsn is None:
            return False            # it has replayed nothing yet
        lag = _lag(standby, self._primary())
        return lag is None or lag <= self.max_standby_lag

    def set_socket_options(self, sock) -> None:
        """libpq's keepalives and tcp_user_timeout, with pgfast's defaults (above). Linux
        sends no keepalive while data waits for an acknowledgement, so tcp_user_timeout
        defaults to the keepalives' own bound: a query sent to a host that vanished fails
        as soon as an idle session would."""
        if sock is None:
            return
        keep = int(self.info.options.get("keepalives") or 1) != 0
        user_timeout = self.info.options.get("tcp_user_timeout")
        if keep:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, keyword in ((getattr(socket, "TCP_KEEPIDLE", None), "keepalives_idle"),
                                    (getattr(socket, "TCP_KEEPINTVL", None), "keepalives_interval"),
                                    (getattr(socket, "TCP_KEEPCNT", None), "keepalives_count")):
                if option is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, option, max(1, self._keepalives[keyword]))
            if user_timeout is None:
                k = self._keepalives
                user_timeout = 1000 * (k["keepalives_idle"] + k["keepalives_interval"] * k["keepalives_count"])
        if user_timeout and int(user_timeout) > 0 and hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout))

    def _why(self) -> str:
        failures = [f"{h!r}: {h.failure}" for h in self.hosts if h.failure]
        return f" ({'; '.join(failures)})" if failures else ""

    def describe(self) -> list[dict]:
        """SHOW UPSTREAM's rows (console.py)."""
        primary = self._primary()
        return [{"host": h.host.host, "port": h.host.port, "state": h.state.value, "lag_bytes": _lag(h, primary),
                 "checked": time.time() - (time.monotonic() - h.checked_at) if h.checked_at else None,
                 "failure": h.failure or ""} for h in self.hosts]

    # --- health checks ----------------------------------------------------------------

    async def check_all(self) -> None:
        await asyncio.gather(*(host.check() for host in self.hosts))
        self._checked.set()

    def check_soon(self, host: UpstreamHost) -> None:
        """A health check of host now (one at a time, at most once a second), for a
        connection to it that failed."""
        now = time.monotonic()
        if (host in self._soon or host.checking or self._checker is None
                or now - host.soon_at < _CHECK_SOON_SECONDS):
            return
        host.soon_at = now
        self._soon.add(host)
        task = asyncio.get_running_loop().create_task(host.check(), context=log.detached())
        task.add_done_callback(lambda _: self._soon.discard(host))

    def start(self) -> None:
        self._checker = asyncio.get_running_loop().create_task(self._check_forever(), context=log.detached())

    async def _check_forever(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception as exc:    # a bug here must not freeze every host's state
                log.log(f"pgfast: upstream health checks failed: {exc!r}")
            await asyncio.sleep(self.check_period)

    async def first_check(self, timeout: float) -> None:
        """Until every host has answered or failed its first check (at most timeout)."""
        try:
            await asyncio.wait_for(self._checked.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def close(self) -> None:
        if self._checker is not None:
            self._checker.cancel()


def _lag(standby: UpstreamHost, primary: UpstreamHost | None) -> int | None:
    """Bytes of WAL a standby is behind the primary, at their last checks."""
    if standby.state is not HostState.STANDBY or primary is None or None in (primary.lsn, standby.lsn):
        return None
    return max(0, primary.lsn - standby.lsn)


def load_passfile(path: str) -> list:
    """pgfast.passfile's entries; refused unless private (mode 0600), like a key file."""
    if not os.path.exists(path):
        return []
    conninfo.check_passfile_permissions(path)
    return conninfo.read_passfile(path)
