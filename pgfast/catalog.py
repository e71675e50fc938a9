"""What pgfast asks PostgreSQL's catalogs: role membership (pg_hba's +group and
samerole) and login credentials (pg_authid), over the private socket, as the
cluster's admin role.

One admin session is kept open while it is used (a lookup is then one round trip,
not a backend start) and closed after a quiet minute. Answers are cached for
CACHE_SECONDS: a burst of logins by one user costs one query, and a changed
password or membership takes effect within that time.
"""
from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass

from . import log, messages
from ._wire import ReadBuffer
from .backend import BackendConnection, BackendRefused, open_backend

CACHE_SECONDS = 1.0
IDLE_SECONDS = 60.0
_RESULT_LIMIT = 1 << 24
_CACHE_ENTRIES = 4096

ROLES_OF = ("SELECT r.rolname FROM pg_catalog.pg_roles r "
            "WHERE pg_catalog.pg_has_role((SELECT u.oid FROM pg_catalog.pg_roles u WHERE u.rolname = $1), "
            "r.oid, 'MEMBER')")
CREDENTIALS_OF = ("SELECT rolpassword, rolcanlogin, "
                  "coalesce(rolvaliduntil < pg_catalog.now(), false) "
                  "FROM pg_catalog.pg_authid WHERE rolname = $1")

# What PostgreSQL checks, or applies, when a backend starts for a role and database;
# a pooled backend that started under other values must not serve (see pool.py).
SESSION_RULES_OF = (
    "SELECT r.rolcanlogin, r.rolconnlimit, d.datallowconn, d.datconnlimit, "
    "pg_catalog.has_database_privilege(r.oid, d.oid, 'CONNECT'), "
    "(SELECT pg_catalog.string_agg(s.setdatabase::text || '/' || s.setrole::text || '='"
    " || pg_catalog.array_to_string(s.setconfig, ','), ';' ORDER BY s.setdatabase, s.setrole)"
    " FROM pg_catalog.pg_db_role_setting s WHERE s.setdatabase IN (0, d.oid) AND s.setrole IN (0, r.oid)) "
    "FROM pg_catalog.pg_roles r, pg_catalog.pg_database d WHERE r.rolname = $1 AND d.datname = $2")


class CatalogError(Exception):
    pass


@dataclass(frozen=True)
class SessionRules:
    """The catalog state a backend for (role, database) starts under."""
    values: tuple[str | None, ...]

    @property
    def poolable(self) -> bool:
        # a connection limit counts live sessions, idle pooled ones included, so
        # backends under one are never kept
        _, role_limit, _, database_limit, *_ = self.values
        return role_limit == "-1" and database_limit == "-1"


@dataclass(frozen=True)
class Credentials:
    secret: str | None       # pg_authid.rolpassword: SCRAM verifier, md5 hash or NULL
    can_login: bool
    expired: bool            # rolvaliduntil has passed


def _extended_query(sql: str, params: list[str]) -> bytes:
    bind = b"\0\0" + struct.pack("!hh", 0, len(params))
    for value in params:
        encoded = value.encode("utf-8", "surrogateescape")
        bind += struct.pack("!i", len(encoded)) + encoded
    bind += struct.pack("!h", 0)
    return b"".join([
        messages.message(b"P", b"\0" + sql.encode() + b"\0" + struct.pack("!h", 0)),
        messages.message(b"B", bind),
        messages.message(b"E", b"\0" + struct.pack("!i", 0)),
        messages.message(b"S", b""),
    ])


def _data_row(payload: bytes) -> tuple[str | None, ...]:
    (count,) = struct.unpack_from("!h", payload)
    offset, values = 2, []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", payload, offset)
        offset += 4
        if length < 0:
            values.append(None)
            continue
        values.append(payload[offset:offset + length].decode("utf-8", "surrogateescape"))
        offset += length
    return tuple(values)


class _AdminSession(asyncio.Protocol):
    """The protocol of the backend session pgfast queries through."""

    def __init__(self, backend: BackendConnection):
        self.backend = backend
        self.lost = False
        self._buffer = ReadBuffer()
        self._rows: list[tuple[str | None, ...]] = []
        self._error: dict[str, str] | None = None
        self._done: asyncio.Future | None = None
        backend.attach(self)

    async def query(self, sql: str, params: list[str]) -> list[tuple[str | None, ...]]:
        self._rows, self._error = [], None
        self._done = asyncio.get_running_loop().create_future()
        self.backend.transport.write(_extended_query(sql, params))
        await self._done
        if self._error:
            raise CatalogError(self._error.get("M", "catalog query failed"))
        return self._rows

    def data_received(self, data: bytes) -> None:
        self._buffer.feed_data(data)
        while True:
            msg = self._buffer.take_message(_RESULT_LIMIT)
            if msg is None:
                return
            msg_type, payload = msg
            if msg_type == ord("D"):
                self._rows.append(_data_row(payload))
            elif msg_type == ord("E"):
                self._error = messages.parse_error_fields(payload)
            elif msg_type == ord("Z") and self._done is not None and not self._done.done():
                self._done.set_result(None)

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self.lost = True
        if self._done is not None and not self._done.done():
            self._done.set_exception(CatalogError("PostgreSQL closed pgfast's catalog session"))

    def close(self) -> None:
        self.backend.close()


class Catalog:
    def __init__(self, backend_socket: str, admin_user: str, database: str = "postgres"):
        self._socket = backend_socket
        self._admin_user = admin_user
        self._database = database
        self._cache: dict[tuple, tuple[float, object]] = {}
        self._session: _AdminSession | None = None
        self._lock = asyncio.Lock()
        self._idle_timer: asyncio.TimerHandle | None = None

    async def _open_session(self) -> _AdminSession:
        try:
            backend, _ = await open_backend(self._socket, [
                ("user", self._admin_user), ("database", self._database), ("application_name", "pgfast")])
        except BackendRefused as refusal:
            raise CatalogError(f'pgfast could not read the catalogs as "{self._admin_user}": {refusal}') from None
        return _AdminSession(backend)

    async def query(self, sql: str, params: list[str]) -> list[tuple[str | None, ...]]:
        async with self._lock:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            if self._session is None or self._session.lost:
                self._session = await self._open_session()
            try:
                return await self._session.query(sql, params)
            finally:
                self._idle_timer = asyncio.get_running_loop().call_later(IDLE_SECONDS, self.close)

    def close(self) -> None:
        if self._session is not None and not self._session.lost:
            self._session.close()
        self._session = None

    async def _cached(self, key: tuple, compute):
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            return hit[1]
        value = await compute()
        if len(self._cache) > _CACHE_ENTRIES:
            self._cache = {k: v for k, v in self._cache.items() if now - v[0] < CACHE_SECONDS}
        self._cache[key] = (now, value)
        return value

    async def roles_of(self, user: str) -> frozenset[str]:
        """Every role `user` is a member of, directly or not, itself included;
        empty when no such role exists."""
        async def compute():
            return frozenset(row[0] for row in await self.query(ROLES_OF, [user]))
        return await self._cached(("roles_of", user), compute)

    def cached_session_rules(self, user: str, database: str) -> SessionRules | None:
        """session_rules() when a fresh answer that names a role and database is cached."""
        hit = self._cache.get(("session_rules", user, database))
        if hit is not None and time.monotonic() - hit[0] < CACHE_SECONDS:
            return hit[1]
        return None

    async def session_rules(self, user: str, database: str) -> SessionRules | None:
        """None when the role or the database does not exist."""
        async def compute():
            rows = await self.query(SESSION_RULES_OF, [user, database])
            return SessionRules(rows[0]) if rows else None
        return await self._cached(("session_rules", user, database), compute)

    async def credentials(self, user: str) -> Credentials | None:
        """The role's login credentials; None when no such role exists."""
        async def compute():
            rows = await self.query(CREDENTIALS_OF, [user])
            if not rows:
                return None
            secret, can_login, expired = rows[0]
            return Credentials(secret, can_login == "t", expired == "t")
        return await self._cached(("credentials", user), compute)


_last_failure_logged = float("-inf")


def log_catalog_failure(exc: CatalogError) -> None:
    """Log why the catalogs could not be read, at most once a minute (it repeats per connection)."""
    global _last_failure_logged
    now = time.monotonic()
    if now - _last_failure_logged < 60:
        return
    _last_failure_logged = now
    log.log(f"pgfast could not read PostgreSQL's catalogs: {exc}",
            hint="pgfast reads them as pgfast.admin_user (default: the account running PostgreSQL); "
                 "that role must exist and be a superuser.")
