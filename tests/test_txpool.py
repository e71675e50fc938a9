"""Transaction pooling (pgfast.pool_mode = transaction), end to end with real clients.

Many clients share a few backends, one transaction at a time. What a client can tell
is only the speed: its prepared statements work whatever backend serves it, its
settings (TimeZone, DateStyle, application_name, ...) are its own, session state that
cannot move between backends pins it to its backend, cancels reach only its own work,
and nothing it left unfinished is ever committed.

Servers (module scope, TLS on, pg_hba trusting local and 127.0.0.1):

    tx       pool_mode transaction, pool_size 10
    tiny     pool_mode transaction, pool_size 1, query_wait_timeout 1s, idle_transaction_timeout 1s
    limited  pool_mode transaction, pool_size 2, max_client_conn 5
    session  pool_mode session (per-role overrides to transaction)
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
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
from rawclient import SYNC, RawClient, ServerError, bind, error_fields, execute, message, parse, query_message

HBA = "local all all trust\nlocal replication all trust\nhost all all 127.0.0.1/32 trust\n"
CONFIGS = {
    "tx": "pgfast.pool_mode = transaction\npgfast.pool_size = 10\nmax_connections = 60",
    "tiny": "pgfast.pool_mode = transaction\npgfast.pool_size = 1\npgfast.query_wait_timeout = 1\n"
            "pgfast.idle_transaction_timeout = 1",
    "limited": "pgfast.pool_mode = transaction\npgfast.pool_size = 2\npgfast.max_client_conn = 5",
    "session": "pgfast.pool_mode = session",
}


@pytest.fixture(scope="module")
def ca() -> certs.CA:
    return certs.CA("pgfast transaction pooling CA")


@pytest.fixture(scope="module")
def servers(template_cluster, module_dir, module_env, ca, bindir):
    started: dict[str, Pgfast] = {}
    issued = ca.server_cert()

    def get(name: str) -> Pgfast:
        if name not in started:
            base = tempfile.mkdtemp(prefix=f"tx-{name}-", dir=module_dir)
            os.chmod(base, 0o755)
            data = os.path.join(base, "data")
            shutil.copytree(template_cluster, data, symlinks=True)
            os.chmod(data, 0o700)
            certs.write(os.path.join(data, "server.crt"), issued.chain_pem(), 0o644)
            certs.write(os.path.join(data, "server.key"), issued.key_pem(), 0o600)
            write_file(os.path.join(data, "pg_hba.conf"), HBA)
            append_conf(data, "ssl = on\n" + CONFIGS[name])
            chown_tree(data)
            socket_dir = tempfile.mkdtemp(prefix="sock-", dir=base)
            os.chmod(socket_dir, 0o777)
            started[name] = Pgfast(data, free_port(), socket_dir, [], dict(module_env)).start()
        return started[name]

    yield get
    for server in started.values():
        server.stop()
    for name, server in started.items():
        assert "Traceback" not in server.log, f"{name}:\n{server.log}"
        assert "unexpected" not in server.log, f"{name}:\n{server.log}"


def connect(server: Pgfast, **params) -> psycopg.Connection:
    kwargs = {"host": "127.0.0.1", "port": server.port, "dbname": "postgres", "user": "postgres",
              "sslmode": "require", "connect_timeout": 10, "autocommit": True, **params}
    return psycopg.connect(**kwargs)


def admin(server: Pgfast) -> psycopg.Connection:
    """Over the Unix socket as well, so through pgfast's pooling too."""
    return psycopg.connect(host=server.socket_dir, port=server.port, dbname="postgres", user="postgres",
                           autocommit=True, application_name="admin")


def client_backends(conn: psycopg.Connection) -> int:
    return conn.execute("select count(*) from pg_stat_activity where backend_type = 'client backend' "
                        "and application_name <> 'pgfast'").fetchone()[0]


def pgbench(bindir: str, server: Pgfast, env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(env, PGHOST="127.0.0.1", PGPORT=str(server.port), PGUSER="postgres", PGDATABASE="postgres",
               PGSSLMODE="require")
    return subprocess.run([os.path.join(bindir, "pgbench"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def tx(servers, bindir, module_env) -> Pgfast:
    server = servers("tx")
    init = pgbench(bindir, server, module_env, "-i", "-s", "2", "-q")
    assert init.returncode == 0, init.stderr
    with connect(server) as conn:
        conn.execute("create table marks (v text)")
    return server


# ---------------------------------------------------------------- many clients, few backends

@pytest.mark.parametrize("protocol", ["prepared", "extended", "simple"])
def test_pgbench_200_clients_on_10_backends(tx, bindir, module_env, protocol):
    script = ["-S"] if protocol == "prepared" else []
    result = pgbench(bindir, tx, module_env, "-n", "-c", "200", "-j", "2", "-T", "3", "-M", protocol, *script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "number of failed transactions: 0" in result.stdout, result.stdout
    processed = int(re.search(r"number of transactions actually processed: (\d+)", result.stdout)[1])
    assert processed > 200
    with connect(tx) as conn:
        assert client_backends(conn) <= 10 + 1, "more backends than the pool allows"


def test_asyncpg_default_statement_cache(tx):
    async def worker(i: int):
        conn = await asyncpg.connect(host="127.0.0.1", port=tx.port, user="postgres", database="postgres",
                                     ssl="require")
        try:
            total = 0
            for n in range(30):
                total += await conn.fetchval("select $1::int + $2::int", i, n)
                async with conn.transaction():
                    await conn.fetchval("select count(*) from pgbench_branches where bid = $1", 1)
            return total
        finally:
            await conn.close()

    async def main():
        return await asyncio.gather(*(worker(i) for i in range(40)))
    assert asyncio.run(main()) == [30 * i + sum(range(30)) for i in range(40)]


def test_psycopg_server_prepared_statements(tx):
    """prepare_threshold=0 prepares every query, as pgJDBC does past its prepareThreshold."""
    errors = []

    def worker(i: int):
        try:
            with connect(tx, prepare_threshold=0, autocommit=False) as conn:
                for n in range(20):
                    assert conn.execute("select %s::int * 2", (i + n,)).fetchone() == ((i + n) * 2,)
                    conn.commit()
        except Exception as exc:        # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]


def test_a_statement_prepared_on_one_backend_runs_on_another(servers):
    """pool_size 1 elsewhere would hide it: here one client holds a backend in a
    transaction while another prepares, then the first comes back on another backend."""
    server = servers("tx")
    a, b = RawClient.connect(server.port), RawClient.connect(server.port)
    for c in (a, b):
        c.startup(user="postgres", database="postgres")
        c.authenticate()
    a.send(parse("S1", "select 'from a ' || $1::text") + SYNC)
    assert [t for t, _ in a.read_until_ready()] == [b"1", b"Z"]
    pids = set()
    for n in range(12):
        # b keeps some backend busy in an open transaction now and then
        if n % 3 == 0:
            b.query("begin")
        a.send(bind("", "S1")[:5] and message(b"B", b"\0S1\0" + struct.pack("!hhi", 0, 1, 1) + b"x" + b"\0\0")
               + execute() + SYNC)
        got = a.read_until_ready()
        rows = [p for t, p in got if t == b"D"]
        assert rows and rows[0].endswith(b"from a x"), got
        pids.add(a.query("select pg_backend_pid()")[0][0])
        if n % 3 == 0:
            b.query("commit")
    a.terminate()
    b.terminate()


# ---------------------------------------------------------------- settings stay the client's own

def test_timezones_never_leak_between_clients(servers):
    server = servers("tiny")            # one backend for everyone
    tokyo, lima = connect(server), connect(server)
    tokyo.execute("set timezone = 'Asia/Tokyo'")
    lima.execute("set timezone = 'America/Lima'")
    for _ in range(10):
        assert tokyo.execute("show timezone").fetchone() == ("Asia/Tokyo",)
        assert lima.execute("show timezone").fetchone() == ("America/Lima",)
        assert tokyo.info.parameter_status("TimeZone") == "Asia/Tokyo"
    fresh = connect(server)
    assert fresh.execute("show timezone").fetchone()[0] not in ("Asia/Tokyo", "America/Lima")
    for conn in (tokyo, lima, fresh):
        conn.close()


def test_startup_settings_are_the_client_s_own(servers):
    server = servers("tiny")
    other = connect(server)
    other.execute("set datestyle = 'SQL, DMY'")
    other.execute("set application_name = 'someone else'")
    c = RawClient.connect(server.port)
    c.startup(user="postgres", database="postgres", application_name="mine", DateStyle="German")
    c.authenticate()
    assert c.parameters["application_name"] == "mine"
    assert c.parameters["DateStyle"] == "German, DMY"
    assert c.query("show datestyle") == [("German, DMY",)]
    assert c.query("select current_setting('application_name')") == [("mine",)]
    assert other.execute("show datestyle").fetchone() == ("SQL, DMY",)
    c.terminate()
    other.close()


def test_a_bad_startup_setting_is_refused_as_postgresql_does(servers):
    c = RawClient.connect(servers("tiny").port)
    c.startup(user="postgres", database="postgres", client_encoding="no-such-encoding")
    with pytest.raises(ServerError) as caught:
        c.authenticate()
    assert caught.value.fields["S"] == "FATAL"
    assert 'invalid value for parameter "client_encoding"' in caught.value.fields["M"]


# ---------------------------------------------------------------- session state pins

@pytest.mark.parametrize("sql", ["set search_path = public, pg_catalog", "listen somewhere",
                                 "select pg_advisory_lock(7)", "create temp table t_tmp (x int)",
                                 "prepare p1 as select 1", "set role postgres"])
def test_session_state_pins_the_client_to_its_backend(servers, sql):
    server = servers("tx")
    with connect(server) as pinned, connect(server) as other:
        before = pinned.execute("select pg_backend_pid()").fetchone()[0]
        pinned.execute(sql)
        pid = pinned.execute("select pg_backend_pid()").fetchone()[0]
        for _ in range(20):
            other.execute("select 1")
            assert pinned.execute("select pg_backend_pid()").fetchone()[0] == pid
        assert isinstance(before, int)


def test_listen_gets_its_notifications(servers):
    server = servers("tx")
    with connect(server) as listener, connect(server) as talker:
        listener.execute("listen chan")
        for i in range(3):
            talker.execute(f"notify chan, 'n{i}'")
        got = []
        deadline = time.monotonic() + 5
        gen = listener.notifies(timeout=5, stop_after=3)
        for notify in gen:
            got.append(notify.payload)
        assert got == ["n0", "n1", "n2"] and time.monotonic() < deadline + 1


def test_session_sql_a_backend_cannot_carry_is_recognised():
    from pgfast._txrelay import keeps_session_state, local_command
    assert keeps_session_state(b"SET search_path TO x")
    assert keeps_session_state(b"select 1; set statement_timeout = 5")
    assert keeps_session_state(b"SELECT pg_try_advisory_lock(1)")
    assert keeps_session_state(b"DECLARE c CURSOR WITH HOLD FOR SELECT 1")
    assert keeps_session_state(b"set session authorization alice")
    assert keeps_session_state(b"CREATE TEMPORARY TABLE x (a int)")
    assert not keeps_session_state(b"SET LOCAL search_path TO x")
    assert not keeps_session_state(b"set timezone = 'UTC'")
    assert not keeps_session_state(b"set time zone 'UTC'")
    assert not keeps_session_state(b"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
    assert not keeps_session_state(b"select 'set search_path = x'")
    assert not keeps_session_state(b"select pg_advisory_xact_lock(1)")
    assert not keeps_session_state(b"DECLARE c CURSOR FOR SELECT 1")
    assert local_command(b"DEALLOCATE foo") == (b"DEALLOCATE", b"foo")
    assert local_command(b'deallocate prepare "Foo";') == (b"DEALLOCATE", b"Foo")
    assert local_command(b"DEALLOCATE ALL") == (b"DEALLOCATE ALL", None)
    assert local_command(b"discard all") == (b"DISCARD ALL", None)
    assert local_command(b"discard plans") is None
    assert local_command(b"deallocate foo; select 1") is None


# ---------------------------------------------------------------- prepared statements by name

def test_deallocate_and_close_are_answered_for_the_client(servers):
    server = servers("tx")
    c = RawClient.connect(server.port)
    c.startup(user="postgres", database="postgres")
    c.authenticate()
    c.send(parse("S1", "select 1") + SYNC)
    c.read_until_ready()
    # an unquoted name folds to lower case, so this is "s1", which does not exist: PostgreSQL's error
    with pytest.raises(ServerError) as caught:
        c.query("DEALLOCATE S1")
    assert caught.value.sqlstate == "26000"
    c.send(query_message('DEALLOCATE "S1"'))
    got = c.read_until_ready()
    assert got[0] == (b"C", b"DEALLOCATE\0")
    c.send(parse("S1", "select 2") + SYNC)         # the name is free again
    assert [t for t, _ in c.read_until_ready()] == [b"1", b"Z"]
    c.send(message(b"C", b"SS1\0") + SYNC)          # Close
    assert [t for t, _ in c.read_until_ready()] == [b"3", b"Z"]
    c.send(message(b"B", b"\0S1\0\0\0\0\0\0\0") + execute() + SYNC)
    got = c.read_until_ready()                      # PostgreSQL's own error, and the session goes on
    assert [t for t, _ in got] == [b"E", b"Z"]
    assert error_fields(got[0][1])["C"] == "26000"
    assert error_fields(got[0][1])["M"] == 'prepared statement "S1" does not exist'
    assert c.query("select 'still here'") == [("still here",)]
    c.terminate()


def test_discard_all_gives_the_client_a_fresh_session(servers):
    server = servers("tx")
    with connect(server, prepare_threshold=0) as conn:
        start = conn.execute("show timezone").fetchone()[0]
        conn.execute("set timezone = 'Asia/Tokyo'")
        conn.execute("select %s::int", (1,))      # prepared
        conn.execute("discard all")
        assert conn.execute("show timezone").fetchone() == (start,)
        assert conn.execute("select %s::int", (2,)).fetchone() == (2,)


# ---------------------------------------------------------------- limits and timeouts

def test_max_client_conn(servers):
    server = servers("limited")
    conns = [connect(server) for _ in range(5)]
    with pytest.raises(psycopg.OperationalError, match="sorry, too many clients already"):
        connect(server)
    for conn in conns:
        conn.close()


def test_query_wait_timeout(servers):
    server = servers("tiny")
    holder, waiter = connect(server), connect(server)    # greeted without a backend once the pool knows how
    busy = threading.Thread(target=holder.execute, args=("select pg_sleep(2.5)",))
    busy.start()
    time.sleep(0.3)                                      # the pool's one backend is now the holder's
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="no backend became free in time"):
        waiter.execute("select 1")
    assert 0.8 < time.monotonic() - started < 2.2
    busy.join()
    holder.close()


def test_idle_transaction_timeout(servers):
    server = servers("tiny")
    conn = connect(server)
    conn.execute("begin")
    time.sleep(1.6)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("select 1")
    assert caught.value.sqlstate in ("25P03", None)      # None: psycopg saw the connection close first
    server.wait_for("FATAL:  terminating connection due to idle-in-transaction timeout")
    with connect(server) as other:       # the backend was not left holding the transaction
        assert other.execute("select 1").fetchone() == (1,)


# ---------------------------------------------------------------- nothing unfinished survives

@pytest.mark.parametrize("ending", ["terminate", "reset"])
def test_abandoned_transaction_is_rolled_back(tx, ending):
    mark = f"tx-{ending}-{os.getpid()}"
    c = RawClient.connect(tx.port)
    c.startup(user="postgres", database="postgres")
    c.authenticate()
    c.query(f"begin; insert into marks values ('{mark}')")
    c.terminate() if ending == "terminate" else c.reset()
    time.sleep(0.2)
    with connect(tx) as conn:
        assert conn.execute("select count(*) from marks where v = %s", (mark,)).fetchone() == (0,)


def test_cancel_reaches_only_the_client_s_own_transaction(servers):
    server = servers("tx")
    with connect(server) as victim_holder:
        slow = RawClient.connect(server.port)
        slow.startup(user="postgres", database="postgres")
        slow.authenticate()
        slow.send(query_message("select pg_sleep(30)"))
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(struct.pack("!iiiI", 16, 80877102, *slow.backend_key))
            s.recv(1)
        got = slow.read_until_ready()
        assert any(t == b"E" and b"57014" in p for t, p in got), got
        # between transactions a cancel does nothing to anyone
        idle = RawClient.connect(server.port)
        idle.startup(user="postgres", database="postgres")
        idle.authenticate()
        idle.query("select 1")
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                s.sendall(struct.pack("!iiiI", 16, 80877102, *idle.backend_key))
                s.recv(1)
            assert victim_holder.execute("select pg_sleep(0.01), 'ok'").fetchone()[1] == "ok"
        slow.terminate()
        idle.terminate()


def test_per_role_transaction_pooling_on_a_session_server(servers):
    server = servers("session")
    with admin(server) as conn:
        conn.execute("create role txrole login")
        conn.execute("alter role txrole set pgfast.pool_mode = 'transaction'")
        conn.execute("alter role txrole set pgfast.pool_size = '1'")
    a, b = connect(server, user="txrole"), connect(server, user="txrole")
    assert a.execute("select pg_backend_pid()").fetchone() == b.execute("select pg_backend_pid()").fetchone()
    p, q = connect(server), connect(server)         # postgres: session pooling, a backend each
    assert p.execute("select pg_backend_pid()").fetchone() != q.execute("select pg_backend_pid()").fetchone()
    for conn in (a, b, p, q):
        conn.close()
