"""What pgfast asks PostgreSQL's catalogs: role membership (pg_hba's +group and
samerole), over the private socket, as the cluster's admin role.

Answers are cached briefly: a membership change takes effect within CACHE_SECONDS,
while a burst of connections by one user costs one query.
"""
from __future__ import annotations

import asyncio
import struct
import time

from . import messages
from ._wire import ReadBuffer
from .backend import BackendRefused, open_backend

CACHE_SECONDS = 2.0
_RESULT_LIMIT = 1 << 24

ROLES_OF = ("SELECT r.rolname FROM pg_catalog.pg_roles r "
            "WHERE pg_catalog.pg_has_role((SELECT u.oid FROM pg_catalog.pg_roles u WHERE u.rolname = $1), "
            "r.oid, 'MEMBER')")


class CatalogError(Exception):
    pass


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


class _Collector:
    """Stands where a client would, on a backend session used for one query."""

    def __init__(self) -> None:
        self.buffer = ReadBuffer()
        self.rows: list[tuple[str | None, ...]] = []
        self.error: dict[str, str] | None = None
        self.done = asyncio.get_running_loop().create_future()

    def backend_data(self, data: bytes) -> None:
        self.buffer.feed_data(data)
        while not self.done.done():
            msg = self.buffer.take_message(_RESULT_LIMIT)
            if msg is None:
                return
            msg_type, payload = msg
            if msg_type == ord("D"):
                self.rows.append(_data_row(payload))
            elif msg_type == ord("E"):
                self.error = messages.parse_error_fields(payload)
            elif msg_type == ord("Z"):
                self.done.set_result(None)

    def backend_lost(self) -> None:
        if not self.done.done():
            self.done.set_exception(CatalogError("PostgreSQL closed the catalog connection"))

    def pause_client_reading(self) -> None:
        pass

    def resume_client_reading(self) -> None:
        pass


class Catalog:
    def __init__(self, backend_socket: str, admin_user: str, database: str = "postgres"):
        self._socket = backend_socket
        self._admin_user = admin_user
        self._database = database
        self._cache: dict[tuple, tuple[float, object]] = {}

    async def query(self, sql: str, params: list[str]) -> list[tuple[str | None, ...]]:
        try:
            backend, _ = await open_backend(self._socket, [
                ("user", self._admin_user), ("database", self._database), ("application_name", "pgfast")])
        except BackendRefused as refusal:
            raise CatalogError(f'pgfast could not connect as "{self._admin_user}": {refusal}') from None
        collector = _Collector()
        backend.peer = collector
        try:
            backend.write(_extended_query(sql, params))
            await collector.done
            backend.write(messages.message(b"X", b""))
        finally:
            backend.close()
        if collector.error:
            raise CatalogError(collector.error.get("M", "catalog query failed"))
        return collector.rows

    async def _cached(self, key: tuple, compute):
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            return hit[1]
        value = await compute()
        self._cache[key] = (now, value)
        return value

    async def roles_of(self, user: str) -> frozenset[str]:
        """Every role `user` is a member of, directly or not, itself included;
        empty when no such role exists."""
        async def compute():
            return frozenset(row[0] for row in await self.query(ROLES_OF, [user]))
        return await self._cached(("roles_of", user), compute)
