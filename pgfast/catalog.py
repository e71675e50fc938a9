"""What pgfast asks PostgreSQL's catalogs at each login: the role's credentials
(pg_authid), its memberships (pg_hba's +group and samerole), and the catalog state a
backend for the role and database would start under, in one query, over the private
socket, as the cluster's admin role (upstream mode: as pgfast.auth_user, on the primary, or
on a standby while no primary answers).

The answers are read afresh for every login (concurrent logins for the same role and
database share one query in flight), so a changed password, a dropped or renamed role or
a revoked privilege counts from the next login on, as with PostgreSQL.

One admin session carries every query (a lookup is then one round trip, not a backend
start) and is closed after a quiet minute. It is a shared channel, so it is built so
that an answer can only reach the request that asked:

- Requests are pipelined and answered strictly in the order they were sent. Each is one
  Parse/Bind/Execute/Sync, and PostgreSQL answers each with exactly one ReadyForQuery
  (after an error it skips to that request's own Sync), so the messages up to the n-th
  ReadyForQuery are the n-th request's, whoever still waits for them.
- A waiter that gives up (its client reset the connection mid-login) leaves its request
  in the queue: the answer is dropped when it comes, never handed to the next request.
- Every query echoes its parameters in its first columns, and an answer that does not
  echo the request's own is refused and ends the session.
"""
from __future__ import annotations

import asyncio
import enum
import json
import re
import struct
import time
from collections import deque
from dataclasses import dataclass

from . import log, messages
from ._framing import ProtocolViolation, ReadBuffer
from .backend import BackendConnection, BackendRefused, open_backend
from .negotiation import ANY

IDLE_SECONDS = 60.0
_RESULT_LIMIT = 1 << 24
# where the admin session may live, in order: a cluster may have lost its "postgres"
# database, and pg_authid is a shared catalog, readable from any database
ADMIN_DATABASES = ("postgres", "template1")
_NO_SUCH_DATABASE = {"3D000", "55000"}   # missing, or datallowconn = false

LOGIN_FACTS = (
    "SELECT $1::text, $2::text, $3::text, "
    "r.oid, r.rolpassword, r.rolcanlogin, coalesce(r.rolvaliduntil < pg_catalog.now(), false), r.rolconnlimit, "
    "d.oid, d.datallowconn, d.datconnlimit, pg_catalog.has_database_privilege(r.oid, d.oid, 'CONNECT'), "
    "(SELECT pg_catalog.string_agg(s.setdatabase::text || '/' || s.setrole::text || '='"
    " || pg_catalog.array_to_string(s.setconfig, ','), ';' ORDER BY s.setdatabase, s.setrole)"
    " FROM pg_catalog.pg_db_role_setting s WHERE s.setdatabase IN (0, d.oid) AND s.setrole IN (0, r.oid)), "
    "CASE WHEN $3 = 'roles' THEN (SELECT pg_catalog.array_to_json(pg_catalog.array_agg(m.rolname))::text"
    " FROM pg_catalog.pg_roles m WHERE pg_catalog.pg_has_role(r.oid, m.oid, 'MEMBER')) END, "
    # pgfast's own settings from ALTER ROLE/DATABASE ... SET pgfast.x = ..., most specific last
    "(SELECT pg_catalog.json_agg(pg_catalog.json_build_array(s.setdatabase <> 0, s.setrole <> 0, c)"
    " ORDER BY (s.setrole <> 0), (s.setdatabase <> 0))::text"
    " FROM pg_catalog.pg_db_role_setting s, pg_catalog.unnest(s.setconfig) c"
    " WHERE s.setdatabase IN (0, d.oid) AND s.setrole IN (0, r.oid) AND c LIKE 'pgfast.%') "
    "FROM (SELECT) AS one "
    "LEFT JOIN pg_catalog.pg_authid r ON r.rolname = $1 "
    "LEFT JOIN pg_catalog.pg_database d ON d.datname = $2")


# the columns of LOGIN_FACTS, for a SECURITY DEFINER function that runs it for a role that
# may not read pg_authid itself (upstream mode's pgfast.auth_query; see auth_function_sql)
_FACTS_COLUMNS = ("user_name text, database_name text, asked text, role_oid oid, secret text, can_login boolean, "
                  "expired boolean, role_limit integer, database_oid oid, allow_connections boolean, "
                  "database_limit integer, can_connect boolean, settings text, memberships text, "
                  "pgfast_settings text")
# The catalog session's search_path, from its startup packet (which no role or database
# setting overrides): only the system catalogs, so an auth_query that is not
# schema-qualified finds nothing of anyone else's (PgBouncer's CVE-2025-12819).
SEARCH_PATH = "pg_catalog, pg_temp"


def auth_function_sql(schema: str = "pgfast", grantee: str = "pgfast_auth") -> str:
    """SQL that creates the function pgfast.auth_query can call as a role without access
    to pg_authid: run it as a superuser on the primary. One transaction, so that psql,
    which goes on after an error by default, creates nothing when the check fails."""
    for name in (schema, grantee):
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"{name!r}: use a lower-case SQL identifier")
    # a schema someone else owns could have its function swapped: refused, not reused
    return ("BEGIN;\n"
            f"DO $check$ BEGIN IF EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname = '{schema}' "
            f"AND nspowner <> (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user)) THEN "
            f"RAISE EXCEPTION 'schema {schema} exists and belongs to another role'; END IF; END $check$;\n"
            f"CREATE SCHEMA IF NOT EXISTS {schema};\n"
            f"CREATE OR REPLACE FUNCTION {schema}.login_facts(text, text, text)\n"
            f"  RETURNS TABLE ({_FACTS_COLUMNS})\n"
            f"  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = {SEARCH_PATH}\n"
            f"  AS $pgfast${LOGIN_FACTS}$pgfast$;\n"
            f"REVOKE ALL ON FUNCTION {schema}.login_facts(text, text, text) FROM PUBLIC;\n"
            f"GRANT USAGE ON SCHEMA {schema} TO {grantee};\n"
            f"GRANT EXECUTE ON FUNCTION {schema}.login_facts(text, text, text) TO {grantee};\n"
            "COMMIT;\n")


def _as_text(name: str) -> str:
    """name if it is valid UTF-8 (the catalogs' encoding), else ''."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return ""
    return name


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()        # each waiter has it already; there may be none left


class CatalogError(Exception):
    def __init__(self, message: str, sqlstate: str | None = None):
        super().__init__(message)
        self.sqlstate = sqlstate        # PostgreSQL's, when it refused the query


_BAD_ENCODING = "22021"      # invalid byte sequence for encoding


@dataclass(frozen=True)
class SessionRules:
    """The catalog state a backend for (role, database) starts under: the role's and the
    database's OIDs (a pooled backend belongs to a role, not to a role's name), login and
    connect rights, connection limits and ALTER ROLE/DATABASE ... SET settings."""
    role_oid: str
    database_oid: str
    values: tuple[str | None, ...]

    @property
    def settings(self) -> str | None:
        """ALTER ROLE/DATABASE ... SET for this role and database, as one string."""
        return self.values[5]

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

    def __repr__(self) -> str:   # never the secret, wherever this ends up
        return f"Credentials(secret={'set' if self.secret else None}, can_login={self.can_login})"


@dataclass(frozen=True)
class LoginFacts:
    credentials: Credentials | None       # None: no such role
    roles: frozenset[str] | None          # every role the user is a member of; None if not asked
    session_rules: SessionRules | None    # None: no such role or no such database
    # pgfast.* settings set for the role and database (ALTER ROLE/DATABASE ... SET), as
    # PostgreSQL applies them: role in database, then role, then database
    settings: dict[str, str]


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


class _Request:
    __slots__ = ("params", "future", "rows", "error")

    def __init__(self, params: tuple[str, ...], future: asyncio.Future):
        self.params = params
        self.future = future
        self.rows: list[tuple[str | None, ...]] = []
        self.error: dict[str, str] | None = None


class SessionState(enum.Enum):
    OPEN = "open"            # answering requests in order
    RETIRING = "retiring"    # answers what is queued, takes nothing new, then closes
    CLOSED = "closed"        # gone: every queued request has failed


class CatalogSession(asyncio.Protocol):
    """The protocol of the backend session pgfast queries through (see the module doc)."""

    def __init__(self, backend: BackendConnection, database: str):
        self.backend = backend
        self.database = database
        self.state = SessionState.OPEN
        self._buffer = ReadBuffer()
        self._queue: deque[_Request] = deque()
        self.idle_since = time.monotonic()
        backend.serve(self)

    @property
    def busy(self) -> bool:
        return bool(self._queue)

    def _set_state(self, new: SessionState, reason: str | None = None) -> None:
        if self.state is SessionState.CLOSED or new is self.state:
            return
        self.state = new
        if new is SessionState.RETIRING and not self._queue:
            new = self.state = SessionState.CLOSED
        if new is SessionState.CLOSED:
            self.backend.close()
            failure = CatalogError(reason or "pgfast closed its catalog session")
            while self._queue:
                request = self._queue.popleft()
                if not request.future.done():
                    request.future.set_exception(failure)

    def request(self, sql: str, params: tuple[str, ...]) -> asyncio.Future:
        """A future for the rows of this query; its first columns must echo params."""
        if self.state is not SessionState.OPEN:
            raise CatalogError("pgfast's catalog session is closing")
        request = _Request(params, asyncio.get_running_loop().create_future())
        self._queue.append(request)
        self.backend.transport.write(_extended_query(sql, list(params)))
        return request.future

    def retire(self) -> None:
        self._set_state(SessionState.RETIRING)

    def close(self, reason: str | None = None) -> None:
        self._set_state(SessionState.CLOSED, reason)

    def data_received(self, data: bytes) -> None:
        self._buffer.feed_data(data)
        try:
            while self.state is not SessionState.CLOSED:
                msg = self._buffer.take_message(_RESULT_LIMIT)
                if msg is None:
                    return
                self._on_message(*msg)
        except (ProtocolViolation, CatalogError, struct.error, ValueError) as exc:
            log.log(f"pgfast closed its catalog session: {exc}")
            self.close(f"pgfast's catalog session broke: {exc}")

    def _on_message(self, msg_type: int, payload: bytes) -> None:
        if msg_type in (ord("N"), ord("S"), ord("A")):
            return          # notices, parameter changes, notifications: no one's answer
        if not self._queue:
            # PostgreSQL speaks unasked only to say it is ending the session
            fields = messages.parse_error_fields(payload) if msg_type == ord("E") else {}
            raise CatalogError(fields.get("M", f"unexpected message {chr(msg_type)!r}"))
        request = self._queue[0]
        if msg_type == ord("D"):
            request.rows.append(messages.parse_data_row(payload))
        elif msg_type == ord("E"):
            request.error = messages.parse_error_fields(payload)
        elif msg_type == ord("Z"):
            self._complete(self._queue.popleft())

    def _complete(self, request: _Request) -> None:
        self.idle_since = time.monotonic()
        echo = len(request.params)
        if request.error is None and any(row[:echo] != request.params for row in request.rows):
            failure = CatalogError("an answer did not echo its request's parameters")
            if not request.future.done():
                request.future.set_exception(failure)
            raise failure
        if not request.future.done():      # done: its waiter gave up; the answer is dropped
            if request.error is not None:
                request.future.set_exception(CatalogError(request.error.get("M", "catalog query failed"),
                                                          request.error.get("C")))
            else:
                request.future.set_result(request.rows)
        if self.state is SessionState.RETIRING and not self._queue:
            self._set_state(SessionState.CLOSED)

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self.backend.connection_lost(exc)
        self._set_state(SessionState.CLOSED, "PostgreSQL closed pgfast's catalog session")


class Catalog:
    def __init__(self, servers, admin_user: str, databases: tuple[str, ...] = ADMIN_DATABASES,
                 facts_query: str = LOGIN_FACTS, timeout: float | None = None):
        self.servers = servers                  # backend.LocalServer or upstream.Upstream
        self._admin_user = admin_user
        self._facts_query = facts_query         # LOGIN_FACTS, or pgfast.auth_query's call of it
        # upstream mode: a session whose host stops answering is closed after this, and
        # its queued requests fail, rather than waiting for TCP to give up
        self._timeout = timeout
        self._databases = databases
        self._session: CatalogSession | None = None
        self._opening: asyncio.Task | None = None
        self._inflight: dict[tuple[str, ...], tuple[asyncio.Future, CatalogSession]] = {}
        self._idle_timer: asyncio.TimerHandle | None = None

    async def _open_session(self) -> CatalogSession:
        refusal = None
        for database in self._databases:
            try:
                # the primary, whose catalogs are current, or while there is none a standby
                backend, _ = await open_backend(self.servers.pick(ANY), [
                    ("user", self._admin_user), ("database", database), ("application_name", "pgfast"),
                    ("search_path", SEARCH_PATH)])
            except BackendRefused as exc:
                refusal = exc
                if exc.fields.get("C") in _NO_SUCH_DATABASE:
                    continue
                break
            return CatalogSession(backend, database)
        raise CatalogError(f'pgfast could not read the catalogs as "{self._admin_user}": {refusal}')

    async def _current_session(self) -> CatalogSession:
        session = self._session
        if session is not None and not self.servers.prefers(session.backend.server, ANY):
            # upstream mode: its host is no longer where the catalogs should be read. A
            # standby while a primary answers again answers what is queued, then goes; a
            # host that is down answers nothing more
            self._session = None
            if session.backend.server.serves(ANY):
                session.retire()
            else:
                session.close("the catalog session's upstream server is out of rotation")
        while self._session is None or self._session.state is not SessionState.OPEN:
            if self._opening is None:
                self._opening = asyncio.get_running_loop().create_task(self._open(), context=log.detached())
                self._opening.add_done_callback(_retrieve)
            # shielded: a waiter that gives up must not stop the session opening for the
            # others. The opening task itself records its outcome before it completes, so
            # a waiter that finds it done also finds the session (a done callback would run
            # only later: awaiting the finished task again would never yield).
            await asyncio.shield(self._opening)
        return self._session

    async def _open(self) -> CatalogSession:
        try:
            session = await self._open_session()
        finally:
            self._opening = None
        self._session = session
        self._schedule_idle_check()
        return session

    def _schedule_idle_check(self) -> None:
        if self._idle_timer is None:
            self._idle_timer = asyncio.get_running_loop().call_later(IDLE_SECONDS, self._idle_check,
                                                                     context=log.detached())

    def _idle_check(self) -> None:
        self._idle_timer = None
        session = self._session
        if session is None or session.state is not SessionState.OPEN:
            return
        if not session.busy and time.monotonic() - session.idle_since >= IDLE_SECONDS:
            self._session = None
            session.close()
        else:
            self._schedule_idle_check()

    async def query(self, sql: str, params: tuple[str, ...]) -> list[tuple[str | None, ...]]:
        """Rows of sql, whose first columns echo params; one query in flight per distinct
        (sql, params), shared by everyone who asks meanwhile."""
        key = (sql, *params)
        entry = self._inflight.get(key)
        if entry is None or entry[1] is not self._session:
            # (a query in flight on a session that has been let go is not joined)
            session = await self._current_session()
            future = session.request(sql, params)
            self._inflight[key] = (future, session)
            future.add_done_callback(lambda done: self._answered(key, done))
        else:
            future, session = entry
        # shielded: one waiter giving up must not cancel the answer others wait for
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._timeout)
        except asyncio.TimeoutError:
            # the session that holds this request is stuck, whichever is current now
            reason = f"pgfast's catalog query got no answer in {self._timeout:g} s"
            if self._session is session:
                self._session = None
            session.close(reason)
            raise CatalogError(reason) from None

    def _answered(self, key: tuple, future: asyncio.Future) -> None:
        entry = self._inflight.get(key)
        if entry is not None and entry[0] is future:     # not a later request for the same key
            del self._inflight[key]
        _retrieve(future)

    async def login_facts(self, user: str, database: str, *, roles: bool) -> LoginFacts:
        asked = "roles" if roles else ""
        try:
            rows = await self.query(self._facts_query, (user, database, asked))
        except CatalogError as exc:
            if exc.sqlstate != _BAD_ENCODING:
                raise
            # a name that is not text in the catalogs' encoding names nothing there, as
            # PostgreSQL finds when it looks the bytes up; '' is no role's or database's name
            rows = await self.query(self._facts_query, (_as_text(user), _as_text(database), asked))
        if len(rows) != 1:
            raise CatalogError(f"the login query returned {len(rows)} rows")
        (_, _, _, role_oid, secret, can_login, expired, role_limit, database_oid, allow, database_limit,
         connect, settings, memberships, pgfast_settings) = rows[0]
        credentials = None if role_oid is None else Credentials(secret, can_login == "t", expired == "t")
        member_of = None
        if roles:
            member_of = frozenset(json.loads(memberships)) if memberships else frozenset()
        rules = None
        if role_oid is not None and database_oid is not None:
            rules = SessionRules(role_oid, database_oid,
                                 (can_login, role_limit, allow, database_limit, connect, settings))
        overrides: dict[str, str] = {}
        for _database, _role, setting in json.loads(pgfast_settings) if pgfast_settings else ():
            name, _, value = setting.partition("=")
            overrides[name.lower()] = value
        return LoginFacts(credentials, member_of, rules, overrides)

    def let_go(self) -> None:
        """Leave the database the session is on (a client sent database DDL, which that
        session could block): the session ends once what is queued is answered."""
        session, self._session = self._session, None
        if session is not None:
            session.retire()

    def close(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._opening is not None:
            self._opening.cancel()
        if self._session is not None:
            self._session.close()
        self._session = None


_last_failure_logged = float("-inf")


def log_catalog_failure(exc: CatalogError) -> None:
    """Log why the catalogs could not be read, at most once a minute (it repeats per connection)."""
    global _last_failure_logged
    now = time.monotonic()
    if now - _last_failure_logged < 60:
        return
    _last_failure_logged = now
    log.log(f"pgfast could not read PostgreSQL's catalogs: {exc}",
            hint="pgfast reads them as pgfast.admin_user (default: the account running PostgreSQL), which must "
                 "exist and be a superuser; in upstream mode as pgfast.auth_user, a superuser or a role that "
                 "pgfast.auth_query's function serves.")
