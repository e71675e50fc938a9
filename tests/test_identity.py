"""The client's identity visible to SQL: pgfast.client_addr, pgfast.client_port, pgfast.ssl,
pgfast.ssl_version, pgfast.ssl_cipher, pgfast.ssl_client_dn, pgfast.ssl_client_serial and
pgfast.ssl_server_name, given to every backend for the client it serves (also on pooled
reuse, and per transaction under transaction pooling), and the README's pg_stat_activity
recipe through the admin console."""
from __future__ import annotations

import os
import socket
import threading

import psycopg
import pytest

import certs
from conftest import psql_script, tls_server, wait_until

HBA = ("local all all trust\n"
       "hostssl all all 127.0.0.1/32 trust\n")
NAMES = ("client_addr", "client_port", "ssl", "ssl_version", "ssl_cipher", "ssl_client_dn", "ssl_client_serial",
         "ssl_server_name")
QUERY = "select " + ", ".join(f"current_setting('pgfast.{name}', true)" for name in NAMES) + ", pg_backend_pid()"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = certs.CA("identity CA")
    client_dir = tmp_path_factory.mktemp("identity-client")
    for name in ("alice", "x$pgfast$y', false), set_config('pgfast.ssl', 'off"):
        issued = ca.client_cert(name)
        stem = "odd" if "$" in name else name
        certs.write(client_dir / f"{stem}.crt", issued.cert_pem(), 0o644)
        certs.write(client_dir / f"{stem}.key", issued.key_pem(), 0o600)
    certs.write(client_dir / "root.crt", ca.cert_pem(), 0o644)
    return {"ca": ca, "dir": str(client_dir)}


def start(template_cluster, scratch_root, env, bindir, pki, conf: str = ""):
    server = tls_server(template_cluster, scratch_root, "identity-", pki["ca"], HBA,
                        "pgfast.console_users = 'postgres'\n" + conf, env)
    certs.write(os.path.join(server.data_dir, "root.crt"), pki["ca"].cert_pem(), 0o644)
    st = os.stat(server.data_dir)
    os.chown(os.path.join(server.data_dir, "root.crt"), st.st_uid, st.st_gid)
    return server.start()


@pytest.fixture(scope="module")
def session_server(template_cluster, scratch_root, module_env, bindir, pki):
    server = start(template_cluster, scratch_root, module_env, bindir, pki, "pgfast.pool_size = 1\n")
    yield server
    server.stop()
    assert "Traceback" not in server.log, server.log


def connect(server, pki, cert: str | None = None, **params) -> psycopg.Connection:
    if cert is not None:
        params.update(sslcert=os.path.join(pki["dir"], f"{cert}.crt"), sslkey=os.path.join(pki["dir"], f"{cert}.key"))
    return psycopg.connect(host="127.0.0.1", port=server.port, user="postgres", dbname="postgres",
                           sslmode="verify-ca", sslrootcert=os.path.join(pki["dir"], "root.crt"),
                           connect_timeout=10, autocommit=True, **params)


def local_port(conn: psycopg.Connection) -> int:
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()


def wait_parked(server, pid: int) -> None:
    """Until the backend is back in the pool (its reset runs after the client has gone), so
    the next client is sure to get it."""
    def parked() -> bool:
        with psycopg.connect(host=server.socket_dir, port=server.port, user="postgres", dbname="pgfast",
                             autocommit=True) as console:
            rows = console.execute("SHOW SERVERS").fetchall()
        return any(row[15] == pid and row[3] == "idle" for row in rows)
    assert wait_until(parked, 10), f"backend {pid} did not go back to the pool"


def identity(conn) -> dict[str, str]:
    row = conn.execute(QUERY).fetchone()
    return dict(zip((*NAMES, "pid"), row))


def test_a_session_sees_its_client_and_a_reused_backend_the_next_one(session_server, pki):
    with connect(session_server, pki, cert="alice") as first:
        seen = identity(first)
        assert seen["client_addr"] == "127.0.0.1" and seen["client_port"] == str(local_port(first))
        assert seen["ssl"] == "on" and seen["ssl_version"] == "TLSv1.3" and seen["ssl_cipher"].startswith("TLS_")
        assert seen["ssl_client_dn"] == "/CN=alice" and int(seen["ssl_client_serial"]) > 0
        assert seen["ssl_server_name"] == ""          # libpq sends no SNI for an address
        pid = seen["pid"]
    wait_parked(session_server, pid)
    with connect(session_server, pki) as second:     # the pooled backend, for another client
        seen = identity(second)
        assert seen["pid"] == pid
        assert seen["client_port"] == str(local_port(second))
        assert seen["ssl_client_dn"] == "" and seen["ssl_client_serial"] == ""


def test_a_changed_value_never_reaches_the_next_client(session_server, pki):
    with connect(session_server, pki) as first:
        first.execute("select set_config('pgfast.client_addr', '10.6.6.6', false)")
        assert identity(first)["client_addr"] == "10.6.6.6"    # its own view only
        pid = identity(first)["pid"]
    wait_parked(session_server, pid)
    with connect(session_server, pki) as second:
        seen = identity(second)
        assert seen["pid"] == pid and seen["client_addr"] == "127.0.0.1"


def test_a_hostile_certificate_subject_is_only_a_value(session_server, pki):
    with connect(session_server, pki, cert="odd") as conn:
        seen = identity(conn)
    assert seen["ssl_client_dn"] == "/CN=x$pgfast$y', false), set_config('pgfast.ssl', 'off"
    assert seen["ssl"] == "on"


def test_a_unix_socket_client_has_no_address(session_server, bindir, module_env):
    with psycopg.connect(host=session_server.socket_dir, port=session_server.port, user="postgres",
                         dbname="postgres", autocommit=True) as conn:
        seen = identity(conn)
    assert seen["client_addr"] == "" and seen["client_port"] == "" and seen["ssl"] == "off"
    assert seen["ssl_version"] == ""


def test_transaction_pooling_reasserts_it_per_transaction(template_cluster, scratch_root, client_env, bindir, pki):
    server = start(template_cluster, scratch_root, client_env, bindir, pki,
                   "pgfast.pool_mode = transaction\npgfast.pool_size = 1\npgfast.client_identity = on\n")
    try:
        # an application_name that would end a $pgfast$ literal early
        clients = [connect(server, pki), connect(server, pki, application_name="x$pgfast")]
        ports = [str(local_port(conn)) for conn in clients]
        clients[0].execute("select set_config('pgfast.client_addr', '10.6.6.6', false)")
        errors = []

        def run(i: int) -> None:
            try:
                for _ in range(30):
                    seen = identity(clients[i])
                    assert seen["client_port"] == ports[i], (i, seen)
            except Exception as exc:        # reported below
                errors.append(exc)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors
        # one backend served both, each transaction with its own client's values
        assert identity(clients[1])["client_addr"] == "127.0.0.1"
        assert clients[1].execute("show application_name").fetchone() == ("x$pgfast",)
        assert len({identity(conn)["pid"] for conn in clients}) == 1
        for conn in clients:
            conn.close()
    finally:
        server.stop()
    assert "Traceback" not in server.log, server.log


def test_off_gives_nothing(template_cluster, scratch_root, client_env, bindir, pki):
    server = start(template_cluster, scratch_root, client_env, bindir, pki, "pgfast.client_identity = off\n")
    try:
        with connect(server, pki) as conn:
            assert identity(conn)["client_addr"] is None
    finally:
        server.stop()


def test_the_pg_stat_activity_recipe(session_server, pki, bindir, module_env):
    """README: join pg_stat_activity with the console's SHOW CLIENTS through dblink."""
    created = psql_script(bindir, session_server, "create extension if not exists dblink;\n", module_env)
    assert created.returncode == 0, created.stderr
    with connect(session_server, pki, cert="alice", application_name="recipe") as watched:
        port = local_port(watched)
        with connect(session_server, pki) as admin:
            rows = admin.execute(f"""
                select a.pid, a.application_name, c.addr, c.port, c.tls
                from pg_stat_activity a
                join dblink('host={session_server.socket_dir} port={session_server.port} dbname=pgfast user=postgres',
                            'SHOW CLIENTS')
                     as c(type text, "user" text, database text, state text, addr text, port int, local_addr text,
                          local_port int, connect_time text, request_time text, wait int, wait_us int,
                          close_needed int, ptr text, link text, remote_pid int, tls text, application_name text,
                          pool_mode text, worker int)
                  on c.remote_pid = a.pid
                where a.application_name = 'recipe'""").fetchall()
    assert len(rows) == 1
    assert rows[0][2:4] == ("127.0.0.1", port) and rows[0][4].startswith("TLSv1.3/")
