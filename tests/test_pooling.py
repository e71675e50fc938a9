"""Session pooling, end to end: real clients through a real pgfast (TLS and plain).

A backend whose client left it idle is reset (DISCARD ALL) and handed to the next
client whose startup packet is the same. These tests show that the only thing a
client can tell is the speed: the same pg_backend_pid() for the same parameters, and
otherwise nothing of the previous session (state, ParameterStatus, cancel keys,
unfinished transactions) and no more PostgreSQL backends than the pool allows.

Servers (module scope, each TLS on, pg_hba.conf trusting every local/host and
replication connection):

    main      pgfast.pool_size = 4
    none      pgfast.pool_mode = none
    size0     pgfast.pool_size = 0
    timeouts  pgfast.pool_idle_timeout = 1s, pgfast.pool_lifetime = 2s
    maxconn   max_connections = 10 (superuser_reserved_connections 3 by default)

An `observer` session per server (its own application_name, so never sharing a
backend) watches pg_stat_activity: a backend is pooled once it shows
state 'idle' after the reset query 'DISCARD ALL'.

A known difference is a strict xfail: a custom placeholder setting (SET myapp.x) stays
defined after DISCARD ALL. Catalog changes that PostgreSQL checks or applies at session
start (NOLOGIN, REVOKE CONNECT, ALLOW_CONNECTIONS, CONNECTION LIMIT, ALTER ROLE/DATABASE
SET) reach the next session within pgfast's catalog cache time; DROP DATABASE makes
pgfast let its idle backends go.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time

import asyncpg
import psycopg
import psycopg.errors
import pytest

import certs
from conftest import Pgfast, append_conf, chown_tree, free_port, write_file

MODES = ("tls", "plain")
HBA = ("local all all trust\nlocal replication all trust\n"
       "host all all all trust\nhost replication all all trust\n")
CONFIGS = {
    "main": "pgfast.pool_size = 4",
    "none": "pgfast.pool_mode = none",
    "size0": "pgfast.pool_size = 0",
    "timeouts": "pgfast.pool_idle_timeout = 1\npgfast.pool_lifetime = 2",
    "maxconn": "max_connections = 10",
}
MAIN_POOL_SIZE = 4
# ParameterStatus names PostgreSQL 15 reports (GUC_REPORT)
REPORTED = ("application_name", "client_encoding", "DateStyle", "default_transaction_read_only",
            "in_hot_standby", "integer_datetimes", "IntervalStyle", "is_superuser", "server_encoding",
            "server_version", "session_authorization", "standard_conforming_strings", "TimeZone")

_names = itertools.count()


def unique(prefix: str) -> str:
    """An application_name no other session uses: a startup packet of its own."""
    return f"{prefix}-{os.getpid()}-{next(_names)}"


# ---------------------------------------------------------------- module fixtures

@pytest.fixture(scope="module")
def ca() -> certs.CA:
    return certs.CA("pgfast pooling test CA")


@pytest.fixture(scope="module")
def env(module_env) -> dict:
    return module_env


@pytest.fixture(scope="module")
def root_cert(ca, module_dir) -> str:
    return certs.write(os.path.join(module_dir, "root.crt"), ca.cert_pem(), 0o644)


class Server:
    """A running pgfast and a long-lived observer session on it."""

    def __init__(self, pgfast: Pgfast, root_cert: str):
        self.pgfast = pgfast
        self.port = pgfast.port
        self.root_cert = root_cert
        self._observer: psycopg.Connection | None = None

    @property
    def observer(self) -> psycopg.Connection:
        if self._observer is None or self._observer.closed:
            self._observer = connect(self, "plain", application_name="observer")
        return self._observer

    def activity(self, pid: int) -> tuple | None:
        return self.observer.execute("select state, query, application_name, backend_type "
                                     "from pg_stat_activity where pid = %s", (pid,)).fetchone()

    def client_backends(self) -> list[int]:
        return [pid for (pid,) in self.observer.execute(
            "select pid from pg_stat_activity where backend_type = 'client backend' "
            "and pid <> pg_backend_pid() and application_name <> 'pgfast' order by pid")]

    def wait_pooled(self, pid: int, timeout: float = 5) -> None:
        """Until the backend has been reset and is idle (pgfast parks it right then)."""
        deadline = time.monotonic() + timeout
        while True:
            row = self.activity(pid)
            if row is not None and row[:2] == ("idle", "DISCARD ALL"):
                time.sleep(0.05)
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"backend {pid} was not pooled: {row}")
            time.sleep(0.02)

    def wait_gone(self, pid: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.activity(pid) is not None:
            if time.monotonic() > deadline:
                raise AssertionError(f"backend {pid} is still there: {self.activity(pid)}")
            time.sleep(0.02)

    def close(self) -> None:
        if self._observer is not None:
            self._observer.close()


@pytest.fixture(scope="module")
def servers(template_cluster, module_dir, ca, env, root_cert):
    """name -> a running Server (see CONFIGS), started on first use; at the end of the
    module their logs must hold no Python traceback."""
    started: dict[str, Server] = {}
    server_cert = ca.server_cert()

    def get(name: str) -> Server:
        if name not in started:
            base = os.path.join(module_dir, name)
            os.mkdir(base, 0o755)
            data = os.path.join(base, "data")
            shutil.copytree(template_cluster, data, symlinks=True)
            os.chmod(data, 0o700)
            certs.write(os.path.join(data, "server.crt"), server_cert.chain_pem(), 0o644)
            certs.write(os.path.join(data, "server.key"), server_cert.key_pem(), 0o600)
            write_file(os.path.join(data, "pg_hba.conf"), HBA)
            append_conf(data, "ssl = on\n" + CONFIGS[name])
            chown_tree(data)
            socket_dir = tempfile.mkdtemp(prefix="sock-", dir=base)
            os.chmod(socket_dir, 0o777)
            started[name] = Server(Pgfast(data, free_port(), socket_dir, [], dict(env)).start(), root_cert)
        return started[name]

    yield get
    for server in started.values():
        server.close()
        server.pgfast.stop()
    for name, server in started.items():
        assert "Traceback" not in server.pgfast.log, f"{name} server log:\n{server.pgfast.log}"


@pytest.fixture(scope="module")
def main(servers) -> Server:
    server = servers("main")
    with connect(server, "plain") as conn:
        conn.execute("create role alice login")
        conn.execute("grant pg_monitor to alice")
        conn.execute("create database otherdb")
        conn.execute("create table rows_t (id int)")
        conn.execute("grant all on rows_t to public")
        conn.execute("create sequence seq_t")
    return server


# ---------------------------------------------------------------- clients

def connect(server: Server, mode: str, autocommit: bool = True, **params) -> psycopg.Connection:
    """psycopg (libpq) through pgfast, TLS verified to the test CA or plain."""
    tls = {"sslmode": "verify-full", "sslrootcert": server.root_cert} if mode == "tls" else {"sslmode": "disable"}
    kwargs = {"host": "127.0.0.1", "port": server.port, "dbname": "postgres", "user": "postgres",
              "connect_timeout": 10, **tls, **params}
    conn = psycopg.connect(autocommit=autocommit, **kwargs)
    assert conn.pgconn.ssl_in_use == (mode == "tls")
    return conn


def backend_pid(conn: psycopg.Connection) -> int:
    """pg_backend_pid(), which must also be the PID in the client's BackendKeyData."""
    (pid,) = conn.execute("select pg_backend_pid()").fetchone()
    assert conn.info.backend_pid == pid
    return pid


def session_pid(server: Server, mode: str, **params) -> int:
    """Start a session, note its backend, end it cleanly; waits until it is pooled."""
    with connect(server, mode, **params) as conn:
        pid = backend_pid(conn)
    return pid


def message(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(payload) + 4) + payload


def query_message(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\0")


TERMINATE = message(b"X")


class Raw:
    """A protocol 3.0 client on a bare socket (optionally inside TLS via SSLRequest), for
    what libraries do not let a test do: read BackendKeyData and every ParameterStatus,
    send a Terminate behind a query, vanish mid-COPY."""

    def __init__(self, server: Server, mode: str, **params: str):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        if mode == "tls":
            sock.sendall(struct.pack("!ii", 8, 80877103))
            assert sock.recv(1) == b"S"
            sock = ssl.create_default_context(cafile=server.root_cert).wrap_socket(sock, server_hostname="127.0.0.1")
        self.sock = sock
        self._buf = b""
        params = {"user": "postgres", "database": "postgres", **params}
        body = struct.pack("!i", 196608) + b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                                                     for k, v in params.items()) + b"\0"
        sock.sendall(struct.pack("!i", len(body) + 4) + body)
        self.parameters: list[tuple[str, str]] = []
        self.pid = self.key = None
        for kind, payload in self.until_ready():
            if kind == b"S":
                name, value, _ = payload.split(b"\0")
                self.parameters.append((name.decode(), value.decode()))
            elif kind == b"K":
                self.pid, self.key = struct.unpack("!iI", payload)
            elif kind == b"E":
                raise AssertionError(f"startup failed: {payload!r}")

    def read(self) -> tuple[bytes, bytes] | None:
        while len(self._buf) < 5 or len(self._buf) < 1 + struct.unpack_from("!i", self._buf, 1)[0]:
            data = self.sock.recv(65536)
            if not data:
                return None
            self._buf += data
        length = struct.unpack_from("!i", self._buf, 1)[0]
        kind, payload, self._buf = self._buf[:1], self._buf[5:1 + length], self._buf[1 + length:]
        return kind, payload

    def until(self, *kinds: bytes) -> list[tuple[bytes, bytes]]:
        messages = []
        while True:
            msg = self.read()
            assert msg is not None, f"connection closed after {messages}"
            messages.append(msg)
            if msg[0] in kinds:
                return messages

    def until_ready(self) -> list[tuple[bytes, bytes]]:
        messages = self.until(b"Z")
        self.status = messages[-1][1]
        return messages

    def query(self, sql: str) -> list[tuple[bytes, bytes]]:
        self.sock.sendall(query_message(sql))
        return self.until_ready()

    def terminate(self) -> None:
        self.sock.sendall(TERMINATE)
        self.sock.settimeout(5)
        assert self.read() is None     # pgfast closes the connection
        self.sock.close()

    def close(self) -> None:
        """Vanish: close the socket without Terminate (nor TLS close_notify)."""
        self.sock.close()


# ---------------------------------------------------------------- reuse

@pytest.mark.parametrize("mode", MODES)
def test_same_parameters_reuse_the_backend(main, mode):
    app = unique("reuse")
    pid = session_pid(main, mode, application_name=app)
    main.wait_pooled(pid)
    assert main.activity(pid)[2] == app
    for _ in range(3):
        with connect(main, mode, application_name=app) as conn:
            assert backend_pid(conn) == pid
            assert conn.execute("select current_user, session_user, current_database(), "
                                "current_setting('application_name')").fetchone() == \
                ("postgres", "postgres", "postgres", app)
        main.wait_pooled(pid)


@pytest.mark.parametrize("mode", MODES)
def test_different_parameters_do_not_share(main, mode):
    app = unique("share")
    pid = session_pid(main, mode, application_name=app)
    main.wait_pooled(pid)
    others = {
        "application_name": dict(application_name=unique("share-other")),
        "database": dict(application_name=app, dbname="otherdb"),
        "user": dict(application_name=app, user="alice"),
        "options": dict(application_name=app, options="-c work_mem=8MB"),
        "no application_name": dict(),
    }
    seen = {pid}
    for what, params in others.items():
        with connect(main, mode, **params) as conn:
            other = backend_pid(conn)
            assert other not in seen, what
            seen.add(other)
            assert conn.execute("select current_user, current_database()").fetchone() == \
                (params.get("user", "postgres"), params.get("dbname", "postgres")), what
    # the first backend stayed in the pool for its own parameters
    assert main.activity(pid)[:2] == ("idle", "DISCARD ALL")
    with connect(main, mode, application_name=app) as conn:
        assert backend_pid(conn) == pid


# ---------------------------------------------------------------- no state leaks

def dirty_session(conn: psycopg.Connection) -> None:
    """Leave every kind of session state DISCARD ALL is meant to drop."""
    conn.execute("create temp table tt (a int)")
    conn.execute("insert into tt values (1)")
    conn.execute("prepare sql_stmt as select 42")
    assert conn.execute("execute sql_stmt").fetchone() == (42,)
    # protocol-level prepared statement (psycopg names it _pg3_0)
    assert conn.execute("select %s::int + 1", (1,), prepare=True).fetchone() == (2,)
    assert conn.execute("select count(*) from pg_prepared_statements").fetchone() == (2,)
    conn.execute("set work_mem = '77MB'")
    conn.execute("set datestyle = 'SQL, DMY'")
    conn.execute("create schema if not exists leak_schema")
    conn.execute("set search_path = leak_schema, public")
    conn.execute("select pg_advisory_lock(4242)")
    conn.execute("select pg_advisory_lock_shared(4343)")
    conn.execute("listen leak_channel")
    assert conn.execute("select nextval('seq_t') > 0").fetchone() == (True,)
    conn.execute("begin")
    conn.execute("declare held cursor with hold for select 1")
    conn.execute("commit")
    conn.execute("set session characteristics as transaction isolation level serializable")
    conn.execute("set session authorization alice")
    conn.execute("set role pg_monitor")
    assert conn.execute("select current_user, session_user").fetchone() == ("pg_monitor", "alice")


def assert_clean_session(conn: psycopg.Connection, server: Server) -> None:
    """What a brand-new session would see."""
    with pytest.raises(psycopg.errors.UndefinedTable) as caught:
        conn.execute("select * from tt")
    assert caught.value.diag.message_primary == 'relation "tt" does not exist'
    with pytest.raises(psycopg.errors.InvalidSqlStatementName) as caught:
        conn.execute("execute sql_stmt")
    assert caught.value.sqlstate == "26000"
    assert caught.value.diag.message_primary == 'prepared statement "sql_stmt" does not exist'
    assert conn.execute("select count(*) from pg_prepared_statements").fetchone() == (0,)
    # psycopg numbers its statements from _pg3_0 again: no "already exists" (42P05)
    assert conn.execute("select %s::int + 1", (1,), prepare=True).fetchone() == (2,)
    assert conn.execute("select name from pg_prepared_statements").fetchall() == [("_pg3_0",)]
    settings = conn.execute("select current_setting('work_mem'), current_setting('DateStyle'), "
                            "current_setting('search_path'), "
                            "current_setting('default_transaction_isolation')").fetchone()
    assert settings == ("4MB", "ISO, MDY", '"$user", public', "read committed")
    assert conn.execute("select count(*) from pg_locks where locktype = 'advisory' "
                        "and pid = pg_backend_pid()").fetchone() == (0,)
    assert conn.execute("select pg_listening_channels()").fetchall() == []
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as caught:
        conn.execute("select currval('seq_t')")
    assert caught.value.sqlstate == "55000"
    assert caught.value.diag.message_primary == 'currval of sequence "seq_t" is not yet defined in this session'
    with pytest.raises(psycopg.errors.InvalidCursorName) as caught:
        conn.execute("fetch from held")
    assert caught.value.diag.message_primary == 'cursor "held" does not exist'
    assert conn.execute("select current_user, session_user").fetchone() == ("postgres", "postgres")
    # the locks are free for others, and a NOTIFY on the old channel reaches no one here
    with connect(server, "plain", application_name=unique("locker")) as other:
        assert other.execute("select pg_try_advisory_lock(4242), pg_try_advisory_lock(4343)").fetchone() == \
            (True, True)
        other.execute("notify leak_channel, 'hello'")
    assert list(conn.notifies(timeout=0.3)) == []


@pytest.mark.parametrize("mode", MODES)
def test_state_does_not_leak(main, mode):
    app = unique("leak")
    since = len(main.pgfast.lines)
    with connect(main, mode, application_name=app) as conn:
        pid = backend_pid(conn)
        dirty_session(conn)
    main.wait_pooled(pid)
    assert "reset failed" not in "".join(main.pgfast.lines[since:])
    with connect(main, mode, application_name=app) as conn:
        assert backend_pid(conn) == pid
        assert_clean_session(conn, main)


@pytest.mark.parametrize("mode", ["direct tls", "tls", "plain"])
def test_asyncpg_statement_cache_on_a_reused_backend(main, mode):
    """asyncpg (extended protocol, statement cache): on the reused backend only the
    statements of the new session exist, as on a fresh one."""
    app = unique("asyncpg")
    context = False
    if mode != "plain":
        context = ssl.create_default_context(cafile=main.root_cert)
        context.set_alpn_protocols(["postgresql"])

    async def session() -> tuple[int, list]:
        conn = await asyncpg.connect(host="127.0.0.1", port=main.port, user="postgres", database="postgres",
                                     ssl=context, direct_tls=mode == "direct tls", timeout=10,
                                     server_settings={"application_name": app})
        try:
            pid = conn.get_server_pid()
            assert await conn.fetchval("select pg_backend_pid()") == pid
            names = [r["name"] for r in await conn.fetch("select name from pg_prepared_statements")]
            statement = await conn.prepare("select $1::int * 2")
            assert await statement.fetchval(21) == 42
            await conn.execute("create temp table at (a int)")
            return pid, names
        finally:
            await conn.close()

    first, fresh_names = asyncio.run(session())
    main.wait_pooled(first)
    second, names = asyncio.run(session())
    assert second == first
    assert len(names) == len(fresh_names) and not set(names) & set(fresh_names), (fresh_names, names)
    main.wait_pooled(second)


@pytest.mark.xfail(strict=True, reason="DISCARD ALL (RESET ALL) cannot undefine a custom placeholder "
                                        "setting: it stays defined as '' where a new session has none")
def test_custom_setting_does_not_leak(main):
    app = unique("custom")
    with connect(main, "plain", application_name=app) as conn:
        pid = backend_pid(conn)
        assert conn.execute("select current_setting('myapp.tenant', true)").fetchone() == (None,)
        conn.execute("set myapp.tenant = 'first client'")
    main.wait_pooled(pid)
    with connect(main, "plain", application_name=app) as conn:
        assert backend_pid(conn) == pid
        assert conn.execute("select current_setting('myapp.tenant', true)").fetchone() == (None,)


# ---------------------------------------------------------------- PostgreSQL's start-up checks

# what changes between two sessions, and what a new backend then says (None: it lets the
# client in, with the new DateStyle default)
CATALOG_CHANGES = {
    "nologin": ("alter role {role} nologin",
                'FATAL:  role "{role}" is not permitted to log in'),
    "revoke connect": ("revoke connect on database {db} from public",
                       'FATAL:  permission denied for database "{db}"\nDETAIL:  User does not have CONNECT privilege.'),
    "allow_connections": ("alter database {db} allow_connections false",
                          'FATAL:  database "{db}" is not currently accepting connections'),
    "role connection limit": ("alter role {role} connection limit 0",
                              'FATAL:  too many connections for role "{role}"'),
    "alter role set": ("alter role {role} set datestyle = 'German'", None),
    "alter database set": ("alter database {db} set datestyle = 'German'", None),
}


@pytest.mark.parametrize("change", CATALOG_CHANGES)
def test_catalog_changes_apply_to_the_next_session(main, change):
    sql, refusal = CATALOG_CHANGES[change]
    role, db = unique("role").replace("-", "_"), unique("db").replace("-", "_")
    main.observer.execute(f"create role {role} login")
    main.observer.execute(f"create database {db}")
    app = unique("catalog")
    pid = session_pid(main, "plain", user=role, dbname=db, application_name=app)
    main.wait_pooled(pid)
    main.observer.execute(sql.format(role=role, db=db))     # counts from the next login on
    try:
        if refusal is not None:
            with pytest.raises(psycopg.OperationalError) as caught:
                connect(main, "plain", user=role, dbname=db, application_name=app).close()
            assert refusal.format(role=role, db=db) in str(caught.value)
        else:
            with connect(main, "plain", user=role, dbname=db, application_name=app) as conn:
                assert conn.info.parameter_status("DateStyle") == "German, DMY"
    finally:
        main.observer.execute(f"drop database {db} with (force)")
        main.observer.execute(f"drop role {role}")


def test_drop_database_with_only_pooled_backends(main):
    db = unique("dropme").replace("-", "_")
    main.observer.execute(f"create database {db}")
    pid = session_pid(main, "plain", dbname=db, application_name=unique("dropme"))
    main.wait_pooled(pid)
    try:
        main.observer.execute(f"drop database {db}")
    finally:
        main.observer.execute(f"drop database if exists {db} with (force)")


# ---------------------------------------------------------------- ParameterStatus

STARTUPS = {
    "defaults": ({}, {}),
    "options DateStyle": ({"options": "-c DateStyle=German -c TimeZone=Asia/Tokyo"}, {}),
    "client_encoding": ({"client_encoding": "LATIN1"}, {}),
    "PGCLIENTENCODING": ({}, {"PGCLIENTENCODING": "WIN1252"}),
}


@pytest.mark.parametrize("startup", STARTUPS)
@pytest.mark.parametrize("mode", MODES)
def test_parameter_status_as_from_a_fresh_backend(main, mode, startup, monkeypatch):
    params, environment = STARTUPS[startup]
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    params = dict(params, application_name=unique("status"))
    with connect(main, mode, **params) as conn:
        pid = backend_pid(conn)
        fresh = {name: conn.info.parameter_status(name) for name in REPORTED}
        # the previous client changes every reported setting it can
        conn.execute("set datestyle = 'SQL, DMY'")
        conn.execute("set timezone = 'America/Los_Angeles'")
        conn.execute("set intervalstyle = 'sql_standard'")
        conn.execute("set standard_conforming_strings = off")
        conn.execute("set application_name = 'someone else'")
        conn.execute("set default_transaction_read_only = on")
        conn.execute("set session authorization alice")
        conn.execute("set client_encoding = 'EUC_JP'")
        changed = {name: conn.info.parameter_status(name) for name in REPORTED}
        assert changed["client_encoding"] == "EUC_JP"
        assert changed["session_authorization"] == "alice" and changed["is_superuser"] == "off"
    main.wait_pooled(pid)
    with connect(main, mode, **params) as conn:
        assert backend_pid(conn) == pid
        reused = {name: conn.info.parameter_status(name) for name in REPORTED}
        assert reused == fresh
        # and the backend agrees with what the client was told
        for name in ("DateStyle", "TimeZone", "client_encoding", "IntervalStyle", "application_name"):
            assert conn.execute("select current_setting(%s)", (name,)).fetchone()[0] == fresh[name]
    expected_encoding = {"client_encoding": "LATIN1", "PGCLIENTENCODING": "WIN1252"}.get(startup, "UTF8")
    assert fresh["client_encoding"] == expected_encoding
    if startup == "options DateStyle":
        assert (fresh["DateStyle"], fresh["TimeZone"]) == ("German, DMY", "Asia/Tokyo")
    else:
        assert fresh["DateStyle"] == "ISO, MDY"
    assert fresh["is_superuser"] == "on" and fresh["session_authorization"] == "postgres"


@pytest.mark.parametrize("mode", MODES)
def test_raw_parameter_status_messages_match(main, mode):
    """Every ParameterStatus, in order, as the fresh backend sent them."""
    app = unique("raw-status")
    first = Raw(main, mode, application_name=app, options="-c DateStyle=German")
    first.query("set datestyle = 'Postgres, YMD'; set timezone = 'Europe/Paris'; set client_encoding = 'LATIN2'")
    first.terminate()
    main.wait_pooled(first.pid)
    second = Raw(main, mode, application_name=app, options="-c DateStyle=German")
    assert second.pid == first.pid
    assert second.parameters == first.parameters
    assert second.status == b"I"
    second.terminate()


# ---------------------------------------------------------------- unfinished sessions are not reused

def insert_marker(server: Server) -> int:
    (marker,) = server.observer.execute("select (random() * 1e9)::int").fetchone()
    return marker


def marker_rows(server: Server, marker: int) -> int:
    return server.observer.execute("select count(*) from rows_t where id = %s", (marker,)).fetchone()[0]


@pytest.mark.parametrize("mode, ending", [("tls", "vanish"), ("tls", "terminate"), ("tls", "close_notify"),
                                          ("plain", "vanish"), ("plain", "terminate")])
def test_client_gone_mid_transaction(main, mode, ending):
    app = unique("mid-tx")
    pid = session_pid(main, mode, application_name=app)
    main.wait_pooled(pid)
    marker = insert_marker(main)
    client = Raw(main, mode, application_name=app)
    assert client.pid == pid
    client.query(f"begin; insert into rows_t values ({marker})")
    assert client.status == b"T"
    if ending == "vanish":
        client.close()
    elif ending == "terminate":
        client.terminate()
    else:
        # close_notify goes out; pgfast closes without answering it (TLS 1.3 allows that)
        with pytest.raises(ssl.SSLEOFError):
            client.sock.unwrap()
        client.sock.close()
    main.wait_gone(pid)
    assert marker_rows(main, marker) == 0
    with connect(main, mode, application_name=app) as conn:
        assert backend_pid(conn) != pid
        assert conn.execute("select count(*) from rows_t where id = %s", (marker,)).fetchone() == (0,)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


@pytest.mark.parametrize("mode", MODES)
def test_client_killed_mid_query(main, mode, bindir, env):
    """psql running a long statement is killed: the backend finishes its statement,
    finds its connection gone, and the transaction is rolled back."""
    app = unique("mid-query")
    dsn = (f"host=127.0.0.1 port={main.port} dbname=postgres user=postgres application_name={app} "
           + (f"sslmode=verify-full sslrootcert={main.root_cert}" if mode == "tls" else "sslmode=disable"))
    pid = session_pid(main, mode, application_name=app)
    main.wait_pooled(pid)
    marker = insert_marker(main)
    # one -c per statement: psql sends each as its own Query, so COMMIT is still to come
    client = subprocess.Popen([os.path.join(bindir, "psql"), "-X", "-d", dsn, "-c", "begin",
                               "-c", f"insert into rows_t values ({marker})", "-c", "select pg_sleep(1.5)",
                               "-c", "commit"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while (main.activity(pid) or (None,))[0] != "active":
        assert time.monotonic() < deadline, main.activity(pid)
        time.sleep(0.02)
    client.send_signal(signal.SIGKILL)
    client.wait()
    with connect(main, mode, application_name=app) as conn:
        assert backend_pid(conn) != pid           # the old one is still sleeping, or gone
    main.wait_gone(pid)
    assert marker_rows(main, marker) == 0


@pytest.mark.parametrize("mode", MODES)
def test_client_gone_mid_copy(main, mode):
    app = unique("mid-copy")
    pid = session_pid(main, mode, application_name=app)
    main.wait_pooled(pid)
    marker = insert_marker(main)
    client = Raw(main, mode, application_name=app)
    assert client.pid == pid
    client.sock.sendall(query_message("copy rows_t from stdin"))
    assert client.until(b"G")[-1][0] == b"G"
    client.sock.sendall(message(b"d", f"{marker}\n{marker}\n".encode()))
    client.close()
    main.wait_gone(pid)
    assert marker_rows(main, marker) == 0
    with connect(main, mode, application_name=app) as conn:
        assert backend_pid(conn) != pid
        assert conn.execute("select count(*) from rows_t where id = %s", (marker,)).fetchone() == (0,)


@pytest.mark.parametrize("sql", [
    "set work_mem = '99MB'; create temp table qt (a int); select pg_sleep(0.2)",
    "begin; insert into rows_t values ({marker}); create temp table qt (a int)",
    "select pg_advisory_lock(777); listen qt_channel",
])
@pytest.mark.parametrize("mode", MODES)
def test_terminate_right_behind_a_query(main, mode, sql):
    """Query and Terminate in one send: the answer never reaches the client; whatever
    backend the next client gets must be in a fresh session's state."""
    app = unique("q-then-x")
    pid = session_pid(main, mode, application_name=app)
    main.wait_pooled(pid)
    marker = insert_marker(main)
    client = Raw(main, mode, application_name=app)
    assert client.pid == pid
    client.sock.sendall(query_message(sql.format(marker=marker)) + TERMINATE)
    client.sock.settimeout(5)
    while client.read() is not None:
        pass
    client.sock.close()
    for _ in range(3):
        with connect(main, mode, application_name=app) as conn:
            backend_pid(conn)
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert conn.execute("select current_setting('work_mem'), to_regclass('pg_temp.qt'), "
                                "(select count(*) from pg_listening_channels())").fetchone() == ("4MB", None, 0)
            assert conn.execute("select count(*) from pg_locks where locktype = 'advisory' "
                                "and pid = pg_backend_pid()").fetchone() == (0,)
            assert conn.execute("select 'still fine'").fetchone() == ("still fine",)
    deadline = time.monotonic() + 5
    while main.observer.execute("select count(*) from pg_locks where locktype = 'advisory'").fetchone() != (0,):
        assert time.monotonic() < deadline, "an advisory lock outlived its session"
        time.sleep(0.02)
    assert marker_rows(main, marker) == 0


# ---------------------------------------------------------------- pool settings

@pytest.mark.parametrize("name", ["none", "size0"])
@pytest.mark.parametrize("mode", MODES)
def test_no_pooling_every_session_gets_a_new_backend(servers, name, mode):
    server = servers(name)
    app = unique(name)
    pids = []
    for _ in range(3):
        pids.append(session_pid(server, mode, application_name=app))
        server.wait_gone(pids[-1])
    assert len(set(pids)) == 3
    assert server.client_backends() == []


def test_idle_timeout_closes_idle_backends(servers):
    server = servers("timeouts")
    apps = [unique("idle") for _ in range(3)]
    pids = [session_pid(server, "tls", application_name=app) for app in apps]
    for pid in pids:
        server.wait_pooled(pid)
    assert set(pids) <= set(server.client_backends())
    # pgfast.pool_idle_timeout = 1s (pgfast looks every few seconds)
    for pid in pids:
        server.wait_gone(pid, timeout=10)
    assert server.client_backends() == []
    with connect(server, "tls", application_name=apps[0]) as conn:
        assert backend_pid(conn) not in pids


def test_lifetime_retires_old_backends(servers):
    server = servers("timeouts")
    app = unique("lifetime")
    with connect(server, "plain", application_name=app) as conn:
        pid = backend_pid(conn)
        born = time.monotonic()
    server.wait_pooled(pid)
    with connect(server, "plain", application_name=app) as conn:
        assert backend_pid(conn) == pid           # young enough
        # pgfast.pool_lifetime = 2s: it is past it when this client leaves
        time.sleep(max(0.0, born + 2.2 - time.monotonic()))
    server.wait_gone(pid)
    with connect(server, "plain", application_name=app) as conn:
        assert backend_pid(conn) != pid


# ---------------------------------------------------------------- a pooled backend dies

@pytest.mark.parametrize("mode", MODES)
def test_pooled_backend_terminated_by_admin(main, mode):
    app = unique("terminated")
    pid = session_pid(main, mode, application_name=app)
    main.wait_pooled(pid)
    (victim,) = main.observer.execute("select pid from pg_stat_activity where application_name = %s",
                                      (app,)).fetchone()
    assert victim == pid
    assert main.observer.execute("select pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
    main.wait_gone(pid)
    with connect(main, mode, application_name=app) as conn:
        new = backend_pid(conn)
        assert new != pid
        assert conn.execute("select 'alive'").fetchone() == ("alive",)
    main.wait_pooled(new)


# ---------------------------------------------------------------- cancel

def cancel_request(server: Server, pid: int, key: int) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(struct.pack("!iiiI", 16, 80877102, pid, key))
        assert sock.recv(1) == b""      # answered by closing, as PostgreSQL does


@pytest.mark.parametrize("mode", MODES)
def test_cancel_reaches_the_reused_backend_with_a_new_key(main, mode):
    app = unique("cancel")
    first = Raw(main, mode, application_name=app)
    old_pid, old_key = first.pid, first.key
    first.terminate()
    main.wait_pooled(old_pid)
    with connect(main, mode, application_name=app) as conn:
        assert backend_pid(conn) == old_pid
        outcome = {}

        def sleep():
            try:
                conn.execute("select pg_sleep(20)")
                outcome["result"] = "finished"
            except psycopg.Error as exc:
                outcome["result"] = exc

        started = time.monotonic()
        worker = threading.Thread(target=sleep)
        worker.start()
        while main.activity(old_pid)[:2] != ("active", "select pg_sleep(20)"):
            assert time.monotonic() - started < 5
            time.sleep(0.02)
        since = len(main.pgfast.lines)
        # the previous session's key no longer cancels anything on this backend
        cancel_request(main, old_pid, old_key)
        main.pgfast.wait_for(f"wrong key in cancel request for process {old_pid}", timeout=5)
        assert f"wrong key in cancel request for process {old_pid}" in "".join(main.pgfast.lines[since:])
        time.sleep(0.3)
        assert worker.is_alive() and main.activity(old_pid)[0] == "active"
        conn.cancel()
        worker.join(10)
        assert time.monotonic() - started < 10
        exc = outcome["result"]
        assert isinstance(exc, psycopg.errors.QueryCanceled), exc
        assert exc.sqlstate == "57014"
        assert exc.diag.message_primary == "canceling statement due to user request"
        assert conn.execute("select 'still here'").fetchone() == ("still here",)
    main.wait_pooled(old_pid)
    third = Raw(main, mode, application_name=app)
    assert third.pid == old_pid and third.key != old_key
    third.terminate()


# ---------------------------------------------------------------- replication connections

@pytest.mark.parametrize("replication", ["database", "true"])
@pytest.mark.parametrize("mode", MODES)
def test_replication_connections_are_never_pooled(main, mode, replication):
    app = unique("walsender")
    pids = []
    for _ in range(2):
        client = Raw(main, mode, application_name=app, replication=replication)
        assert main.activity(client.pid)[3] == "walsender"
        result = client.query("IDENTIFY_SYSTEM")
        assert result[0][0] == b"T", result
        # a temporary slot lives as long as its session: the next client must not see it
        result = client.query(f"CREATE_REPLICATION_SLOT tmp_{client.pid} TEMPORARY PHYSICAL")
        assert result[0][0] == b"T", result
        assert client.status == b"I"
        client.terminate()
        pids.append(client.pid)
        main.wait_gone(client.pid)
        assert main.observer.execute("select count(*) from pg_replication_slots").fetchone() == (0,)
    assert pids[0] != pids[1]


# ---------------------------------------------------------------- churn

def test_pgbench_connection_churn_through_tls(main, bindir, env):
    bench_env = dict(env, PGHOST="127.0.0.1", PGPORT=str(main.port), PGUSER="postgres",
                     PGDATABASE="postgres", PGSSLMODE="require", PGCONNECT_TIMEOUT="10")
    pgbench = os.path.join(bindir, "pgbench")

    def run(*args: str) -> str:
        result = subprocess.run([pgbench, *args], capture_output=True, text=True, timeout=60, env=bench_env,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout + result.stderr

    run("-i", "-s", "1", "-q")
    since = len(main.pgfast.lines)
    count_sql = ("select count(*), count(*) filter (where application_name = 'pgbench') "
                 "from pg_stat_activity where backend_type = 'client backend'")
    (before, _) = main.observer.execute(count_sql).fetchone()   # other tests' pooled backends too
    peak = [0, 0]
    stop = threading.Event()

    def sample():
        with connect(main, "plain", application_name=unique("sampler")) as conn:
            while not stop.is_set():
                counts = conn.execute(count_sql).fetchone()
                peak[:] = [max(p, c) for p, c in zip(peak, counts)]
                time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        out = run("-C", "-c", "8", "-j", "2", "-T", "3", "-S", "-n")
    finally:
        stop.set()
        sampler.join()
    assert "number of failed transactions: 0 (0.000%)" in out, out
    processed = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
    assert processed > 100, out
    # pgbench's backends: at most the pool for its startup packet plus its 8 clients
    # (one may still be resetting); all backends: those plus the sampler's
    total, pgbench_peak = peak
    assert 0 < pgbench_peak <= MAIN_POOL_SIZE + 8 + 1, peak
    assert total - before <= MAIN_POOL_SIZE + 8 + 2, (before, peak)
    pgbench_backends = main.observer.execute(
        "select count(*) from pg_stat_activity where application_name = 'pgbench'").fetchone()[0]
    assert pgbench_backends <= MAIN_POOL_SIZE
    log = "".join(main.pgfast.lines[since:])
    assert "reset failed" not in log and "ERROR" not in log and "FATAL" not in log, log


# ---------------------------------------------------------------- max_connections

@pytest.mark.parametrize("user", ["postgres", "alice"])
def test_idle_backends_make_room_at_max_connections(servers, user):
    """max_connections = 10 (3 reserved for superusers): idle pooled backends of other
    startup packets filling PostgreSQL's slots give way to a new session."""
    server = servers("maxconn")
    observer = server.observer
    observer.execute("select 1 from pg_roles where rolname = 'alice'").fetchone() or \
        observer.execute("create role alice login")
    slots = 10 - 1 - (0 if user == "postgres" else 3)     # less the observer's (and the reserved) slots
    pids = []
    for _ in range(slots):
        with connect(server, "tls", user=user, application_name=unique("filler")) as conn:
            pids.append(backend_pid(conn))
        server.wait_pooled(pids[-1])
    assert len(set(pids)) == slots
    for _ in range(3):
        with connect(server, "tls", user=user, application_name=unique("newcomer")) as conn:
            new = backend_pid(conn)
            assert new not in pids
            assert conn.execute("select 'got in'").fetchone() == ("got in",)
        pids.append(new)
        server.wait_pooled(new)


@pytest.mark.parametrize("mode", MODES)
def test_session_without_a_query_is_pooled(main, mode):
    app = unique("no-query")
    with connect(main, mode, application_name=app) as conn:
        pid = conn.info.backend_pid
    main.wait_pooled(pid)
    with connect(main, mode, application_name=app) as conn:
        assert backend_pid(conn) == pid
