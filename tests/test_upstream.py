"""Upstream mode: pgfast in front of a primary and two streaming standbys on this machine
(tests/replicas.py), TLS verified at both ends, logging in to the upstream as each
client's role with what the client proved at the front.

The module's last tests change the cluster (a standby stopped, then a failover); they run
in file order."""
from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import subprocess
import tempfile
import threading
import time

import asyncpg
import psycopg
import pytest

import certs
from conftest import Pgfast, chown_tree, free_port, psql_script, run_pgfast, tls_server, wait_until, write_file
from rawclient import RawClient
from replicas import SUPERUSER_PASSWORD, ReplicaCluster

from pgfast.catalog import auth_function_sql

APP_PASSWORD = "app-secret"
PLAIN_PASSWORD = "plain-secret"
SERVICE_PASSWORD = "service-secret"
FRONT_HBA = """\
local    pgfast  postgres  trust
local    all  service     trust
local    all  nopassword  trust
hostssl  all  plain_user  127.0.0.1/32  password
hostssl  all  md5_user    127.0.0.1/32  md5
hostssl  all  all         127.0.0.1/32  scram-sha-256
hostnossl all all         127.0.0.1/32  reject
"""


@pytest.fixture(scope="module")
def replicas(bindir, module_dir):
    cluster = ReplicaCluster(bindir, tempfile.mkdtemp(prefix="replicas-", dir=module_dir), standbys=2).start()
    cluster.primary.sql(
        f"CREATE ROLE app_user LOGIN PASSWORD '{APP_PASSWORD}';"
        f"CREATE ROLE plain_user LOGIN PASSWORD '{PLAIN_PASSWORD}';"
        f"CREATE ROLE service LOGIN PASSWORD '{SERVICE_PASSWORD}';"
        "CREATE ROLE nopassword LOGIN PASSWORD 'unknown-to-pgfast';"
        f"CREATE ROLE tx_user LOGIN PASSWORD '{APP_PASSWORD}';"
        "ALTER ROLE tx_user SET pgfast.pool_mode = 'transaction'")
    cluster.primary.sql(f"SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN PASSWORD '{PLAIN_PASSWORD}'")
    # md5_user's logins are md5 exchanges at both ends (the standbys keep the fixture's file)
    hba = os.path.join(cluster.primary.data_dir, "pg_hba.conf")
    with open(hba) as f:
        lines = f.read()
    write_file(hba, "hostssl all md5_user 127.0.0.1/32 md5\n" + lines)
    cluster.primary.sql("SELECT pg_reload_conf()")
    cluster.primary.sql("CREATE DATABASE app OWNER app_user")
    cluster.primary.sql("CREATE TABLE notes (id int PRIMARY KEY, body text); ALTER TABLE notes OWNER TO app_user;"
                        "GRANT SELECT ON notes TO plain_user, service, tx_user", dbname="app")
    cluster.wait_replayed()
    yield cluster
    cluster.stop()


def _upstream_dir(parent: str, conninfo: str, passfile: str, env: dict, extra: str = "") -> str:
    base = tempfile.mkdtemp(prefix="front-", dir=parent)
    os.chmod(base, 0o755)
    data_dir = os.path.join(base, "front")
    result = run_pgfast("init", "-D", data_dir, "--upstream", conninfo, env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    write_file(os.path.join(data_dir, "pg_hba.conf"), FRONT_HBA)
    write_file(os.path.join(data_dir, "upstream.pgpass"), passfile)
    with open(os.path.join(data_dir, "postgresql.conf"), "a") as f:
        f.write("pgfast.workers = 1\npgfast.health_check_period = 1\npgfast.health_check_timeout = 2\n" + extra)
    chown_tree(base)
    return data_dir


def _front(parent: str, conninfo: str, env: dict, extra: str = "", passfile: str | None = None) -> Pgfast:
    passfile = passfile if passfile is not None else (f"*:*:*:postgres:{SUPERUSER_PASSWORD}\n"
                                                      f"*:*:*:service:{SERVICE_PASSWORD}\n")
    data_dir = _upstream_dir(parent, conninfo, passfile, env, extra)
    socket_dir = tempfile.mkdtemp(prefix="sock-", dir=os.path.dirname(data_dir))
    os.chmod(socket_dir, 0o777)
    return Pgfast(data_dir, free_port(), socket_dir, [], dict(env))


@pytest.fixture(scope="module")
def front(replicas, module_dir, module_env):
    conninfo = f"{replicas.hosts_conninfo()} sslmode=verify-full sslrootcert={replicas.ca_file} dbname=postgres"
    server = _front(module_dir, conninfo, module_env).start()
    yield server
    server.stop()
    assert "Traceback" not in server.log, server.log


def front_dsn(front: Pgfast, **params) -> str:
    values = {"host": "localhost", "port": front.port, "dbname": "app", "user": "app_user",
              "password": APP_PASSWORD, "sslmode": "verify-full",
              "sslrootcert": os.path.join(front.data_dir, "server.crt"), "connect_timeout": 10}
    values.update(params)
    return " ".join(f"{k}={v}" for k, v in values.items() if v is not None)


def psql(bindir: str, dsn: str, sql: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(bindir, "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", dsn,
                           "-c", sql], capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)


def cancel_a_sleep(conn: psycopg.Connection) -> None:
    """A query cancelled by libpq's PQcancel half a second in: it ends at once, and the
    session goes on."""
    timer = threading.Timer(0.5, conn.cancel)
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20)")
    finally:
        timer.cancel()
    assert time.monotonic() - started < 10
    conn.rollback()
    assert conn.execute("SELECT 'still here'").fetchone() == ("still here",)


def test_scram_pass_through_reaches_the_primary_over_verified_tls(front, replicas, bindir, module_env):
    """The client's SCRAM proof at the front logs pgfast in to the primary as app_user,
    over TLS (pg_stat_ssl on the upstream) with the certificate checked (verify-full)."""
    result = psql(bindir, front_dsn(front), "SELECT current_user, inet_server_port(), pg_is_in_recovery(), "
                  "(SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())", module_env)
    assert result.returncode == 0, result.stderr + front.log
    assert result.stdout.strip() == f"app_user|{replicas.primary.port}|f|t"


@pytest.mark.parametrize("sslmode", ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"])
def test_every_sslmode_at_the_front_with_verify_full_at_the_back(front, bindir, module_env, sslmode):
    result = psql(bindir, front_dsn(front, sslmode=sslmode, host="localhost"),
                  "SELECT current_user || ':' || (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())",
                  module_env)
    if sslmode == "disable":        # hostssl only, as the front's pg_hba.conf says
        assert result.returncode != 0
        assert ('pg_hba.conf rejects connection for host "127.0.0.1", user "app_user", database "app", '
                "no encryption") in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "app_user:true" or result.stdout.strip() == "app_user:t"


def test_pgfast_status_knows_an_upstream_directory(front, module_env):
    result = run_pgfast("status", "-D", front.data_dir, env=module_env)
    assert result.returncode == 0, result.stderr
    assert "ready on port" in result.stdout and "upstream mode" in result.stdout, result.stdout


def test_the_console_shows_the_hosts(front, replicas, bindir, module_env):
    result = psql(bindir, f"host={front.socket_dir} port={front.port} user=postgres dbname=pgfast",
                  "SHOW UPSTREAM", module_env)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|") for line in result.stdout.splitlines()]
    assert [(host, int(port), state) for host, port, state, *_ in rows] == [
        ("127.0.0.1", node.port, "primary" if node is replicas.primary else "standby") for node in replicas.nodes]

def test_psycopg_and_asyncpg_pass_through(front, replicas):
    with psycopg.connect(front_dsn(front)) as conn:
        conn.execute("INSERT INTO notes VALUES (1, 'from psycopg') ON CONFLICT (id) DO NOTHING")
        conn.commit()
        assert conn.execute("SELECT current_user, inet_server_port()").fetchone() == ("app_user",
                                                                                     replicas.primary.port)

    async def with_asyncpg():
        import ssl
        context = ssl.create_default_context(cafile=os.path.join(front.data_dir, "server.crt"))
        conn = await asyncpg.connect(host="localhost", port=front.port, user="app_user", password=APP_PASSWORD,
                                     database="app", ssl=context)
        try:
            return await conn.fetchval("SELECT body FROM notes WHERE id = $1", 1)
        finally:
            await conn.close()
    assert asyncio.run(with_asyncpg()) == "from psycopg"


def test_a_wrong_password_is_refused_at_the_front(front, bindir, module_env):
    result = psql(bindir, front_dsn(front, password="wrong"), "SELECT 1", module_env)
    assert result.returncode != 0
    assert 'password authentication failed for user "app_user"' in result.stderr


def test_the_password_method_logs_in_upstream_with_the_password(front, bindir, module_env):
    """Under the password method the front has the password itself, and the upstream's
    SCRAM exchange is done with it."""
    result = psql(bindir, front_dsn(front, user="plain_user", password=PLAIN_PASSWORD), "SELECT current_user",
                  module_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "plain_user"


def test_md5_logs_in_upstream_with_the_stored_hash(front, bindir, module_env):
    """An md5 exchange at the front, against the md5 hash the catalogs hold, and then one
    with the upstream, which that hash answers (the password itself is never known)."""
    result = psql(bindir, front_dsn(front, user="md5_user", password=PLAIN_PASSWORD), "SELECT current_user",
                  module_env)
    assert result.returncode == 0, result.stderr + front.log
    assert result.stdout.strip() == "md5_user"


def test_a_role_without_a_password_from_its_client_uses_the_passfile(front, bindir, module_env):
    """A role that logs in at the front without a password (trust, peer, cert) has pgfast
    log in to the upstream with pgfast.passfile's password; without one, libpq's words."""
    local = f"host={front.socket_dir} port={front.port} dbname=app"
    result = psql(bindir, f"{local} user=service", "SELECT current_user, count(*) FROM notes", module_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("service|")
    result = psql(bindir, f"{local} user=nopassword", "SELECT 1", module_env)
    assert result.returncode != 0
    assert "fe_sendauth: no password supplied" in result.stderr, result.stderr


def test_reads_spread_over_the_standbys(front, replicas):
    """dbname=app@standby: a standby of app, each new backend on the next one."""
    connections = [psycopg.connect(front_dsn(front, dbname="app@standby")) for _ in range(4)]
    try:
        for conn in connections:
            assert conn.execute("SELECT pg_is_in_recovery(), current_database()").fetchone() == (True, "app")
        ports = {conn.execute("SELECT inet_server_port()").fetchone()[0] for conn in connections}
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            connections[0].execute("INSERT INTO notes VALUES (2, 'no')")
    finally:
        for conn in connections:
            conn.close()
    assert ports == {standby.port for standby in replicas.standbys}



def test_a_lagging_standby_serves_no_reads(replicas, module_dir, module_env):
    """pgfast.max_standby_lag: a standby whose replay is more WAL behind the primary than
    that, at the last health check, is skipped until it catches up."""
    conninfo = f"{replicas.hosts_conninfo()} sslrootcert={replicas.ca_file}"
    server = _front(module_dir, conninfo, module_env, "pgfast.max_standby_lag = 65536\n").start()
    first, second = replicas.standbys

    def ports() -> set[int]:
        try:
            return _read_ports(server)
        except psycopg.OperationalError:
            return set()        # a moment when both looked behind (the checks read the LSNs one by one)
    try:
        replicas.wait_replayed()
        assert wait_until(lambda: ports() == {first.port, second.port}, timeout=10)
        second.sql("SELECT pg_wal_replay_pause()")
        replicas.primary.sql("CREATE TABLE ballast AS SELECT repeat('x', 1000) AS v FROM generate_series(1, 1000)",
                             dbname="app")
        assert wait_until(lambda: ports() == {first.port}, timeout=10)
        second.sql("SELECT pg_wal_replay_resume()")
        assert wait_until(lambda: ports() == {first.port, second.port}, timeout=10)
    finally:
        second.sql("SELECT pg_wal_replay_resume()")
        replicas.primary.sql("DROP TABLE IF EXISTS ballast", dbname="app")
        server.stop()


def test_target_session_attrs_routes_plain_names(replicas, module_dir, module_env):
    """pgfast.upstream's target_session_attrs=prefer-standby: a database named without
    the suffix reads from a standby, the primary only while none is ready."""
    conninfo = f"{replicas.hosts_conninfo()} sslrootcert={replicas.ca_file} target_session_attrs=prefer-standby"
    server = _front(module_dir, conninfo, module_env).start()
    try:
        with psycopg.connect(front_dsn(server)) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    finally:
        server.stop()


def test_two_workers_pass_cancels_to_each_other(replicas, module_dir, module_env):
    """Under a supervisor with no PostgreSQL of its own: each worker's health checks, and
    a CancelRequest that lands on the other worker reaches the host running the query."""
    conninfo = f"{replicas.hosts_conninfo()} sslrootcert={replicas.ca_file}"
    server = _front(module_dir, conninfo, module_env, "pgfast.workers = 2\n").start()
    try:
        for _ in range(6):
            with psycopg.connect(front_dsn(server)) as conn:
                cancel_a_sleep(conn)
        assert "Traceback" not in server.log, server.log
    finally:
        server.stop()

@pytest.mark.parametrize("dbname", ["app", "app@standby"])
def test_cancel_reaches_the_host_running_the_query(front, dbname):
    with psycopg.connect(front_dsn(front, dbname=dbname)) as conn:
        cancel_a_sleep(conn)


def test_transaction_pooling_lends_upstream_backends(front, replicas):
    """tx_user's sessions (pgfast.pool_mode = transaction for the role) share upstream
    backends, each logged in with the SCRAM keys of the latest client's proof."""
    async def client(n: int) -> list[str]:
        import ssl
        context = ssl.create_default_context(cafile=os.path.join(front.data_dir, "server.crt"))
        conn = await asyncpg.connect(host="localhost", port=front.port, user="tx_user", password=APP_PASSWORD,
                                     database="app", ssl=context, statement_cache_size=0)
        try:
            seen = []
            for i in range(20):
                async with conn.transaction():
                    seen.append(await conn.fetchval("SELECT current_user || ':' || $1::text", f"{n}.{i}"))
            return seen
        finally:
            await conn.close()

    async def main():
        return await asyncio.gather(*(client(n) for n in range(8)))
    results = asyncio.run(main())
    assert results == [[f"tx_user:{n}.{i}" for i in range(20)] for n in range(8)]
    pids = replicas.primary.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'tx_user'")
    assert int(pids) <= 8


def _refusal(bindir: str, server: Pgfast, env: dict) -> str:
    result = psql(bindir, front_dsn(server), "SELECT 1", env)
    assert result.returncode != 0
    return result.stderr


@pytest.mark.parametrize("sslmode", ["disable", "allow", "prefer", "require"])
def test_every_sslmode_at_the_back(replicas, module_dir, module_env, bindir, sslmode):
    """The primary refuses connections without TLS (hostnossl ... reject): disable is
    refused with its words, allow tries again with TLS as libpq does, and the others use
    TLS from the start."""
    conninfo = f"host=127.0.0.1 port={replicas.primary.port} sslmode={sslmode} sslrootcert={replicas.ca_file}"
    server = _front(module_dir, conninfo, module_env).start()
    try:
        result = psql(bindir, front_dsn(server), "SELECT (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())",
                      module_env)
        if sslmode == "disable":
            assert result.returncode != 0
            server.wait_for('pg_hba.conf rejects connection for host "127.0.0.1", user "postgres", '
                            'database "postgres", no encryption')
        else:
            assert result.returncode == 0, result.stderr + server.log
            assert result.stdout.strip() == "t"
    finally:
        server.stop()


@pytest.mark.parametrize("setting, refusal", [
    ("channel_binding=require", None),
    ("require_auth=scram-sha-256", None),
    ("require_auth=md5", 'authentication method requirement "md5" failed: server requested SASL authentication'),
    ("require_auth=!scram-sha-256", 'authentication method requirement "!scram-sha-256" failed: server requested '
                                    "SASL authentication"),
])
def test_channel_binding_and_require_auth_at_the_back(replicas, module_dir, module_env, bindir, setting, refusal):
    """The primary offers SCRAM-SHA-256-PLUS over TLS: channel_binding=require binds the
    pass-through proof to its certificate; require_auth refuses what it does not name."""
    conninfo = f"host=127.0.0.1 port={replicas.primary.port} sslrootcert={replicas.ca_file} {setting}"
    server = _front(module_dir, conninfo, module_env).start()
    try:
        result = psql(bindir, front_dsn(server), "SELECT current_user", module_env)
        if refusal is None:
            assert result.returncode == 0, result.stderr + server.log
            assert result.stdout.strip() == "app_user"
        else:
            assert result.returncode != 0
            server.wait_for(refusal)
    finally:
        server.stop()


def test_an_upstream_on_a_unix_socket(replicas, module_dir, module_env, bindir):
    """host=/directory: the upstream's Unix socket, never TLS (as libpq), here trusted."""
    conninfo = f"host={replicas.primary.socket_dir} port={replicas.primary.port}"
    server = _front(module_dir, conninfo, module_env).start()
    try:
        result = psql(bindir, front_dsn(server), "SELECT current_user, inet_server_port() IS NULL", module_env)
        assert result.returncode == 0, result.stderr + server.log
        assert result.stdout.strip() == "app_user|t"
    finally:
        server.stop()

def test_an_upstream_certificate_from_another_ca_is_refused(replicas, module_dir, module_env, bindir):
    other = certs.write(os.path.join(module_dir, "other-ca.crt"), certs.CA("another CA").cert_pem(), 0o644)
    conninfo = f"host=127.0.0.1 port={replicas.primary.port} sslrootcert={other}"
    server = _front(module_dir, conninfo, module_env).start()
    try:
        expected = (f'connection to server at "127.0.0.1", port {replicas.primary.port} failed: '
                    "SSL error: certificate verify failed")
        assert expected in _refusal(bindir, server, module_env)
        assert f"upstream server 127.0.0.1:{replicas.primary.port} is out of rotation: {expected}" in server.log
    finally:
        server.stop()


def test_verify_full_checks_the_host_name(replicas, module_dir, module_env, bindir):
    """The certificate names localhost and 127.0.0.1; a host name it does not name is
    refused with libpq's words, even at an address it serves."""
    conninfo = (f"host=db.example hostaddr=127.0.0.1 port={replicas.primary.port} "
                f"sslrootcert={replicas.ca_file}")
    server = _front(module_dir, conninfo, module_env).start()
    try:
        assert ('server certificate for "localhost" (and 1 other name) does not match host name "db.example"'
                in _refusal(bindir, server, module_env))
    finally:
        server.stop()
    # verify-ca checks the chain only
    server = _front(module_dir, conninfo + " sslmode=verify-ca", module_env).start()
    try:
        result = psql(bindir, front_dsn(server), "SELECT current_user", module_env)
        assert result.returncode == 0, result.stderr + server.log
    finally:
        server.stop()


@pytest.mark.parametrize("conninfo, fatal", [
    ("host=127.0.0.1 sslrootcert=/nonexistent/ca.crt", 'FATAL:  root certificate file "/nonexistent/ca.crt" '
                                                         "does not exist"),
    ("host=127.0.0.1 sslmode=sometimes", 'FATAL:  invalid pgfast.upstream: invalid sslmode value: "sometimes"'),
    ("host=127.0.0.1 password=hunter2", "FATAL:  invalid pgfast.upstream: password is not taken: passwords go in "
                                        "pgfast.passfile, so that none is in postgresql.conf"),
])
def test_an_unusable_upstream_setting_stops_the_start(module_dir, module_env, conninfo, fatal):
    server = _front(module_dir, "host=127.0.0.1", module_env)
    with open(os.path.join(server.data_dir, "postgresql.conf"), "a") as f:
        f.write(f"pgfast.upstream = '{conninfo}'\n")
    server.start(wait=False)
    assert server.process.wait(60) == 1
    server._reader.join(5)
    assert fatal in server.log, server.log



@pytest.mark.parametrize("sslmode", ["disable", "require"])
def test_an_upstream_that_accepts_and_says_nothing_is_a_timeout_not_a_hang(module_dir, module_env, bindir,
                                                                            sslmode):
    """A host that takes the TCP connection and never answers (the SSLRequest, or the
    startup packet): the connection attempt ends at connect_timeout, the host is out of
    rotation and the client is told why."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held = []
    stop = threading.Event()

    def hold() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass
    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    server = _front(module_dir, f"host=127.0.0.1 port={port} sslmode={sslmode} connect_timeout=2", module_env,
                    "pgfast.health_check_timeout = 2\n").start()
    try:
        started = time.monotonic()
        refusal = _refusal(bindir, server, module_env)
        assert time.monotonic() - started < 10
        assert f'connection to server at "127.0.0.1", port {port} failed: timeout expired' in refusal
        assert f"upstream server 127.0.0.1:{port} is out of rotation" in server.log
    finally:
        server.stop()
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


class _FreezingProxy:
    """A TCP proxy to a node that can stop forwarding without closing anything: the host
    as a client sees it when it loses power or its network (no RST, no FIN)."""

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self.closing = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self.closing.is_set():
            try:
                client = self.listener.accept()[0]
            except OSError:
                continue
            server = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                while self.frozen.is_set() and not self.closing.is_set():
                    time.sleep(0.05)        # hold it: nothing is forwarded, nothing is closed
                b.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.closing.set()
        for sock in [self.listener, *self.sockets]:
            sock.close()


def test_a_host_that_goes_silent_is_an_error_within_seconds_not_a_hang(replicas, module_dir, module_env, bindir):
    """The primary stops answering without closing anything: the catalog session and new
    logins fail within pgfast.health_check_timeout, the host is out of rotation, and once
    it answers again logins work. (Sessions already on it end when TCP keepalives give up,
    which a proxy cannot show: its own kernel answers them.)"""
    proxy = _FreezingProxy(replicas.primary.port)
    conninfo = f"host=127.0.0.1 port={proxy.port} sslrootcert={replicas.ca_file} connect_timeout=2"
    server = _front(module_dir, conninfo, module_env, "pgfast.health_check_timeout = 2\n").start()
    try:
        result = psql(bindir, front_dsn(server), "SELECT current_user", module_env)
        assert result.returncode == 0, result.stderr + server.log
        proxy.frozen.set()
        started = time.monotonic()
        result = psql(bindir, front_dsn(server), "SELECT current_user", module_env)
        assert result.returncode != 0
        assert time.monotonic() - started < 10, result.stderr
        server.wait_for(f"upstream server 127.0.0.1:{proxy.port} is out of rotation", timeout=10)
        proxy.frozen.clear()
        assert wait_until(lambda: psql(bindir, front_dsn(server), "SELECT 1", module_env).returncode == 0,
                          timeout=15, interval=0.5), server.log
    finally:
        server.stop()
        proxy.close()


def test_an_impostor_that_skips_authentication_is_refused(module_dir, module_env, bindir):
    """A server that answers the startup packet with BackendKeyData and ReadyForQuery,
    never AuthenticationOk: as libpq, pgfast takes nothing it says before that."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    def impostor() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn = listener.accept()[0]
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    conn.sendall(b"K" + struct.pack("!iii", 12, 4242, 1) + b"Z" + struct.pack("!i", 5) + b"I")
                    conn.recv(65536)
                except OSError:
                    pass
    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    server = _front(module_dir, f"host=127.0.0.1 port={port} sslmode=disable", module_env).start()
    try:
        assert "expected authentication request from server, but received K" in _refusal(bindir, server, module_env)
    finally:
        server.stop()
        stop.set()
        thread.join(5)
        listener.close()


def test_a_full_host_keeps_its_place(replicas, module_dir, module_env, bindir):
    """A health check refused for too many connections (here the checking role's
    CONNECTION LIMIT 0) says the host is full, not down: it is logged, not taken out."""
    replicas.primary.sql("CREATE ROLE full_checker LOGIN PASSWORD 'full-secret' CONNECTION LIMIT 0")
    conninfo = f"host=127.0.0.1 port={replicas.primary.port} sslrootcert={replicas.ca_file}"
    server = _front(module_dir, conninfo, module_env, "pgfast.auth_user = 'full_checker'\n",
                    passfile="*:*:*:full_checker:full-secret\n").start()
    try:
        server.wait_for(f"upstream server 127.0.0.1:{replicas.primary.port} refused a health check: "
                        'too many connections for role "full_checker"')
        time.sleep(1.5)
        assert "out of rotation" not in server.log, server.log
    finally:
        server.stop()


def test_the_auth_function_script_refuses_a_schema_someone_else_owns(replicas, bindir, module_env):
    """Piped into psql as the README says (psql goes on after an error by default), the
    script creates nothing in a schema another role owns: it is one transaction."""
    replicas.primary.sql("CREATE ROLE mallory; CREATE SCHEMA borrowed AUTHORIZATION mallory")
    primary = replicas.primary
    result = subprocess.run([os.path.join(bindir, "psql"), "-X", "-h", primary.socket_dir, "-p", str(primary.port),
                             "-U", "postgres", "-d", "postgres", "-f", "-"],
                            input=auth_function_sql(schema="borrowed", grantee="mallory"), capture_output=True,
                            text=True, timeout=60, env=module_env)
    assert "schema borrowed exists and belongs to another role" in result.stderr, result.stderr
    assert primary.sql("SELECT count(*) FROM pg_proc WHERE proname = 'login_facts' "
                       "AND pronamespace = 'borrowed'::regnamespace") == "0"

def test_the_passfile_must_be_private(module_dir, module_env):
    server = _front(module_dir, "host=127.0.0.1", module_env)
    os.chmod(os.path.join(server.data_dir, "upstream.pgpass"), 0o644)
    server.start(wait=False)
    assert server.process.wait(60) == 1
    server._reader.join(5)
    assert "has group or world access" in server.log, server.log



@pytest.fixture(scope="module")
def inner(template_cluster, module_dir, module_env, bindir):
    """A pgfast in local mode that wants a client certificate from its CA besides SCRAM,
    with its admin console, for an outer pgfast in upstream mode to front."""
    ca = certs.CA("inner pgfast CA")
    server = tls_server(template_cluster, module_dir, "inner-", ca,
                        "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256 clientcert=verify-ca\n",
                        "ssl_ca_file = 'root.crt'\npgfast.console_users = 'postgres'", module_env)
    certs.write(os.path.join(server.data_dir, "root.crt"), ca.cert_pem(), 0o644)
    chown_tree(server.data_dir)
    server.start()
    result = psql_script(bindir, server, f"ALTER ROLE postgres PASSWORD '{SUPERUSER_PASSWORD}';"
                         f"CREATE ROLE app_user LOGIN PASSWORD '{APP_PASSWORD}'; CREATE DATABASE app OWNER app_user;",
                         module_env)
    assert result.returncode == 0, result.stderr
    server.ca = ca
    server.ca_file = certs.write(os.path.join(module_dir, "inner-ca.crt"), ca.cert_pem(), 0o644)
    issued = ca.client_cert("pgfast front")
    server.client_cert = certs.write(os.path.join(module_dir, "front.crt"), issued.chain_pem(), 0o644)
    server.client_key = certs.write(os.path.join(module_dir, "front.key"), issued.key_pem(), 0o600)
    chown_tree(module_dir)
    yield server
    server.stop()
    assert "Traceback" not in server.log, server.log


@pytest.mark.parametrize("negotiation", ["postgres", "direct"])
def test_pgfast_in_front_of_pgfast(inner, module_dir, module_env, bindir, negotiation):
    """The inner pgfast checks the outer one's SCRAM proof, made from the ClientKey the
    outer one learned from the client: pass-through twice, TLS at every hop with the
    server name sent (SNI) and the outer's client certificate, and a cancel that goes
    through both; with an SSLRequest first or PostgreSQL 17's direct TLS."""
    conninfo = (f"host=localhost port={inner.port} sslrootcert={inner.ca_file} sslcert={inner.client_cert} "
                f"sslkey={inner.client_key} sslnegotiation={negotiation}")
    outer = _front(module_dir, conninfo, module_env).start()
    try:
        with psycopg.connect(front_dsn(outer)) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("app_user",)
            cancel_a_sleep(conn)
            console = psql(bindir, f"host={inner.socket_dir} port={inner.port} user=postgres dbname=pgfast",
                           "SHOW TLS", module_env)
            assert console.returncode == 0, console.stderr
            assert "|localhost|postgresql|/CN=pgfast front|" in console.stdout, console.stdout
        assert "Traceback" not in outer.log, outer.log
    finally:
        outer.stop()


@pytest.mark.parametrize("problem", ["no client certificate", "revoked server certificate"])
def test_the_upstream_refuses_or_is_refused(inner, module_dir, module_env, bindir, problem):
    conninfo = f"host=localhost port={inner.port} sslrootcert={inner.ca_file}"
    if problem == "no client certificate":
        expected = "connection requires a valid client certificate"
    else:
        crl = certs.write(os.path.join(module_dir, "inner.crl"), inner.ca.crl([_served_certificate(inner)]), 0o644)
        conninfo += f" sslcert={inner.client_cert} sslkey={inner.client_key} sslcrl={crl}"
        expected = "SSL error: certificate verify failed"
    outer = _front(module_dir, conninfo, module_env).start()
    try:
        assert expected in _refusal(bindir, outer, module_env)
    finally:
        outer.stop()


def _served_certificate(server: Pgfast):
    """The certificate a server presents, as certs.CA.crl takes it."""
    from cryptography import x509
    with open(os.path.join(server.data_dir, "server.crt"), "rb") as f:
        return certs.Issued(x509.load_pem_x509_certificates(f.read())[0], None)

def test_auth_query_through_a_security_definer_function(replicas, module_dir, module_env, bindir):
    """pgfast.auth_user need not read pg_authid: pgfast.auth_query calls the function
    catalog.auth_function_sql() creates. The catalog session's search_path is pg_catalog
    only, so a query that is not schema-qualified finds nothing (CVE-2025-12819), and a
    password past its VALID UNTIL is refused (CVE-2025-2291)."""
    replicas.primary.sql("CREATE ROLE pgfast_auth LOGIN PASSWORD 'auth-secret';"
                         "CREATE ROLE expired_user LOGIN PASSWORD 'old-secret' VALID UNTIL '2001-01-01'")
    replicas.primary.sql(auth_function_sql())
    passfile = f"*:*:*:pgfast_auth:auth-secret\n"
    base = f"{replicas.hosts_conninfo()} sslrootcert={replicas.ca_file}"
    good = "pgfast.auth_user = 'pgfast_auth'\npgfast.auth_query = 'SELECT * FROM pgfast.login_facts($1, $2, $3)'\n"
    server = _front(module_dir, base, module_env, good, passfile).start()
    try:
        result = psql(bindir, front_dsn(server), "SELECT current_user", module_env)
        assert result.returncode == 0, result.stderr + server.log
        assert result.stdout.strip() == "app_user"
        result = psql(bindir, front_dsn(server, user="expired_user", password="old-secret"), "SELECT 1", module_env)
        assert 'password authentication failed for user "expired_user"' in result.stderr
        server.wait_for('User "expired_user" has an expired password.')
    finally:
        server.stop()
    for query, error in [("SELECT * FROM login_facts($1, $2, $3)", "function login_facts(unknown, unknown, unknown) does not exist"),
                         (None, "permission denied for table pg_authid")]:
        extra = "pgfast.auth_user = 'pgfast_auth'\n" + (f"pgfast.auth_query = '{query}'\n" if query else "")
        server = _front(module_dir, base, module_env, extra, passfile).start()
        try:
            result = psql(bindir, front_dsn(server), "SELECT 1", module_env)
            assert result.returncode != 0
            server.wait_for(f"pgfast could not read PostgreSQL's catalogs: {error}")
        finally:
            server.stop()



def test_resets_while_upstream_backends_are_opened_leave_nothing_behind(front, replicas):
    """300 logins, each reset 0-5 ms after its startup packet: while pgfast connects to
    the primary, negotiates TLS and logs in with the passfile's password. Then a login
    works, the log is clean and the primary keeps no more of the role's sessions than a
    pool holds."""
    rng = random.Random(11)
    path = os.path.join(front.socket_dir, f".s.PGSQL.{front.port}")
    for _ in range(300):
        client = RawClient.unix(path)
        client.startup(user="service", database="app")
        time.sleep(rng.uniform(0, 5e-3))
        client.reset()
    client = RawClient.unix(path)
    client.startup(user="service", database="app")
    client.authenticate()
    assert client.query("SELECT current_user") == [("service",)]
    client.terminate()
    assert wait_until(lambda: int(replicas.primary.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'service'")) <= 20, timeout=15)
    for bad in ("Traceback", "Task exception", "cannot go from", "unexpected"):
        assert bad not in front.log, front.log

# --- these change the cluster: a standby stopped and started again, then a failover -----

def _read_ports(front: Pgfast, sessions: int = 4) -> set[int]:
    connections = [psycopg.connect(front_dsn(front, dbname="app@standby")) for _ in range(sessions)]
    try:
        return {conn.execute("SELECT inet_server_port()").fetchone()[0] for conn in connections}
    finally:
        for conn in connections:
            conn.close()


def test_a_stopped_standby_leaves_the_rotation_and_comes_back(front, replicas):
    first, second = replicas.standbys
    second.stop()
    front.wait_for(f"upstream server 127.0.0.1:{second.port} is out of rotation", timeout=10)
    assert _read_ports(front) == {first.port}
    second.start()
    front.wait_for(f"upstream server 127.0.0.1:{second.port} is now a standby", timeout=10)
    assert _read_ports(front) == {first.port, second.port}


def test_after_a_failover_writes_reach_the_new_primary(front, replicas):
    """The primary dies: its clients get an error at once, never a hang; once a standby
    is promoted, new sessions write there within one health-check period (1 s here)."""
    replicas.wait_replayed()
    old, (new, other) = replicas.primary, replicas.standbys
    conn = psycopg.connect(front_dsn(front))
    conn.execute("SELECT 1")
    old.kill()
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    assert time.monotonic() - started < 5
    conn.close()
    new.promote()
    other.follow(new)
    promoted = time.monotonic()

    def written() -> bool:
        try:
            with psycopg.connect(front_dsn(front)) as conn:
                conn.execute("INSERT INTO notes VALUES (100, 'after the failover')")
                return conn.execute("SELECT inet_server_port()").fetchone()[0] == new.port
        except psycopg.Error:
            return False
    assert wait_until(written, timeout=15, interval=0.2)
    assert time.monotonic() - promoted < 1 + 2 + 3     # a period, a check's timeout, and slack for a busy machine
    assert f"upstream server 127.0.0.1:{new.port} is now a primary" in front.log
