"""Real clients through a real pgfast: psql/libpq, psycopg, asyncpg, pg8000 and pgbench.

Three pgfast servers are shared by the module, each with TLS on (a certificate from a
test CA, SANs localhost / 127.0.0.1 / ::1) and a pg_hba.conf of one kind of TCP rule:

    hostssl    local all all trust + hostssl   all all all trust
    hostnossl  local all all trust + hostnossl all all all trust
    host       local all all trust + host      all all all trust

PostgreSQL behind pgfast only ever sees pgfast's Unix socket, so pg_stat_ssl inside a
session says nothing about the client's TLS: encryption is checked on the client side
(psql's \\conninfo, libpq's PQsslInUse, the client library's socket).
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import glob
import hashlib
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time

import asyncpg
import pg8000.native
import psycopg
import pytest

import certs
from conftest import Pgfast, append_conf, chown_tree, free_port, psql, write_file

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
KINDS = ("hostssl", "hostnossl", "host")

TLS = "TLS"
PLAIN = "plain"
NO_ENCRYPTION = "no encryption"
SSL_ENCRYPTION = "SSL encryption"

# What libpq does against each pg_hba.conf: TLS or plain when it connects, else the
# encryption named in PostgreSQL's "no pg_hba.conf entry" refusal.
#   allow:  plain first, TLS on a refusal;  prefer: TLS first, plain on a refusal.
EXPECTED = {
    "hostssl": {"disable": NO_ENCRYPTION, "allow": TLS, "prefer": TLS,
                "require": TLS, "verify-ca": TLS, "verify-full": TLS},
    "hostnossl": {"disable": PLAIN, "allow": PLAIN, "prefer": PLAIN,
                  "require": SSL_ENCRYPTION, "verify-ca": SSL_ENCRYPTION, "verify-full": SSL_ENCRYPTION},
    "host": {"disable": PLAIN, "allow": PLAIN, "prefer": TLS,
             "require": TLS, "verify-ca": TLS, "verify-full": TLS},
}

SSL_CONNINFO = re.compile(r"^SSL connection \(protocol: TLSv1\.[23], cipher: \S+, compression: off\)$", re.M)
ROWS = 50_000                   # 50,000 rows of ~1 kB: ~50 MB
BIG_QUERY = f"select g, repeat('x', 1000) as s from generate_series(1, {ROWS}) g"
BIG_MD5_SQL = (f"select md5(string_agg(g || E'\\t' || repeat('x', 1000) || E'\\n', '' order by g)) "
               f"from generate_series(1, {ROWS}) g")


# ---------------------------------------------------------------- module fixtures

@pytest.fixture(scope="module")
def ca() -> certs.CA:
    return certs.CA("pgfast clients test CA")


@pytest.fixture(scope="module")
def env(module_env) -> dict:
    return module_env


@pytest.fixture(scope="module")
def root_cert(ca, module_dir) -> str:
    return certs.write(os.path.join(module_dir, "root.crt"), ca.cert_pem(), 0o644)


@pytest.fixture(scope="module")
def wrong_root_cert(module_dir) -> str:
    return certs.write(os.path.join(module_dir, "wrong-root.crt"), certs.CA("another CA").cert_pem(), 0o644)


@pytest.fixture(scope="module")
def servers(template_cluster, module_dir, ca, env):
    """kind -> a running pgfast, started on first use; stopped at the end of the module,
    whose logs must then hold no Python traceback."""
    started: dict[str, Pgfast] = {}
    server_cert = ca.server_cert()

    def get(kind: str) -> Pgfast:
        if kind not in started:
            base = os.path.join(module_dir, kind)
            os.mkdir(base, 0o755)
            data = os.path.join(base, "data")
            shutil.copytree(template_cluster, data, symlinks=True)
            os.chmod(data, 0o700)
            certs.write(os.path.join(data, "server.crt"), server_cert.chain_pem(), 0o644)
            certs.write(os.path.join(data, "server.key"), server_cert.key_pem(), 0o600)
            write_file(os.path.join(data, "pg_hba.conf"),
                       f"local all all trust\n{kind} all all all trust\n")
            # every client here goes through two worker processes, as the default (auto) has it on
            # a machine with two cores
            append_conf(data, "ssl = on\npgfast.workers = 2")
            chown_tree(data)
            socket_dir = tempfile.mkdtemp(prefix="sock-", dir=base)
            os.chmod(socket_dir, 0o777)
            started[kind] = Pgfast(data, free_port(), socket_dir, [], dict(env)).start()
        return started[kind]

    yield get
    for server in started.values():
        server.stop()
    for kind, server in started.items():
        assert "Traceback" not in server.log, f"{kind} server log:\n{server.log}"


@pytest.fixture(scope="module")
def hostssl(servers) -> Pgfast:
    return servers("hostssl")


@pytest.fixture(scope="module")
def hostnossl(servers) -> Pgfast:
    return servers("hostnossl")


@pytest.fixture(scope="module")
def host(servers) -> Pgfast:
    return servers("host")


def conninfo(bindir: str, dsn: str, env: dict) -> subprocess.CompletedProcess:
    return psql(bindir, dsn, r"\conninfo", env, timeout=20)


def refusal(server: Pgfast, encryption: str, user: str = "postgres", database: str = "postgres") -> str:
    return (f'connection to server at "127.0.0.1", port {server.port} failed: FATAL:  '
            f'no pg_hba.conf entry for host "127.0.0.1", user "{user}", database "{database}", {encryption}')


def client_context(cafile: str, alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)     # verify-full: chain and host name
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def count_lines(server: Pgfast, since: int, text: str, expected: int, timeout: float = 5) -> int:
    """How many log lines after index `since` contain text, waiting up to timeout for
    `expected` of them (the log is read by a thread)."""
    deadline = time.monotonic() + timeout
    while True:
        found = sum(text in line for line in server.lines[since:])
        if found >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ---------------------------------------------------------------- psql / libpq: sslmode x pg_hba.conf

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sslmode", SSLMODES)
def test_psql_sslmode_against_pg_hba(bindir, servers, env, root_cert, kind, sslmode):
    server = servers(kind)
    extra = {"sslrootcert": root_cert} if sslmode.startswith("verify") else {}
    before = len(server.lines)
    result = conninfo(bindir, server.dsn(sslmode=sslmode, **extra), env)
    expected = EXPECTED[kind][sslmode]
    if expected in (TLS, PLAIN):
        assert result.returncode == 0, result.stderr
        assert (f'You are connected to database "postgres" as user "postgres" on host "127.0.0.1" '
                f'at port "{server.port}".') in result.stdout
        assert bool(SSL_CONNINFO.search(result.stdout)) == (expected == TLS), result.stdout
        assert "SSL connection" in result.stdout if expected == TLS else "SSL" not in result.stdout
    else:
        assert result.returncode == 2, result.stdout
        assert result.stderr == f"psql: error: {refusal(server, expected)}\n"
    # allow on hostssl and prefer on hostnossl get in on libpq's second try: the first one
    # was refused, and pgfast logged it as PostgreSQL would
    first_try_refused = {("hostssl", "allow"): NO_ENCRYPTION, ("hostnossl", "prefer"): SSL_ENCRYPTION}
    refused_as = first_try_refused.get((kind, sslmode), expected if expected not in (TLS, PLAIN) else None)
    fatal = ('FATAL:  no pg_hba.conf entry for host "127.0.0.1", user "postgres", database "postgres", '
             f'{refused_as}')
    expected_lines = 1 if refused_as else 0
    assert count_lines(server, before, fatal, expected_lines) == expected_lines


def test_verify_full_with_host_localhost(bindir, hostssl, env, root_cert):
    result = conninfo(bindir, hostssl.dsn(host="localhost", sslmode="verify-full", sslrootcert=root_cert), env)
    assert result.returncode == 0, result.stderr
    assert f'on host "localhost" (address "127.0.0.1") at port "{hostssl.port}"' in result.stdout
    assert SSL_CONNINFO.search(result.stdout)


def test_verify_full_with_host_127_0_0_1(bindir, hostssl, env, root_cert):
    result = conninfo(bindir, hostssl.dsn(host="127.0.0.1", sslmode="verify-full", sslrootcert=root_cert), env)
    assert result.returncode == 0, result.stderr
    assert SSL_CONNINFO.search(result.stdout)


@pytest.mark.parametrize("sslmode", ["verify-ca", "verify-full"])
def test_wrong_root_certificate_fails_on_the_client(bindir, host, env, wrong_root_cert, sslmode):
    result = conninfo(bindir, host.dsn(sslmode=sslmode, sslrootcert=wrong_root_cert), env)
    assert result.returncode == 2
    assert result.stderr == (f'psql: error: connection to server at "127.0.0.1", port {host.port} failed: '
                             f'SSL error: certificate verify failed\n')


def test_verify_full_host_name_mismatch(bindir, host, env, root_cert):
    result = conninfo(bindir, host.dsn(host="db.example.invalid", hostaddr="127.0.0.1",
                                       sslmode="verify-full", sslrootcert=root_cert), env)
    assert result.returncode == 2
    assert result.stderr == (
        f'psql: error: connection to server at "127.0.0.1", port {host.port} failed: '
        f'server certificate for "localhost" (and 2 other names) does not match host name '
        f'"db.example.invalid"\n')


def test_verify_ca_accepts_any_host_name(bindir, host, env, root_cert):
    result = conninfo(bindir, host.dsn(host="db.example.invalid", hostaddr="127.0.0.1",
                                       sslmode="verify-ca", sslrootcert=root_cert), env)
    assert result.returncode == 0, result.stderr
    assert SSL_CONNINFO.search(result.stdout)


def test_require_without_root_certificate_does_not_verify(bindir, host, env, wrong_root_cert):
    # a root certificate file makes libpq's require behave as verify-ca; without one it only encrypts
    result = conninfo(bindir, host.dsn(sslmode="require"), env)
    assert result.returncode == 0, result.stderr
    assert SSL_CONNINFO.search(result.stdout)
    result = conninfo(bindir, host.dsn(sslmode="require", sslrootcert=wrong_root_cert), env)
    assert result.returncode == 2
    assert "SSL error: certificate verify failed" in result.stderr


# ---------------------------------------------------------------- Unix socket

@pytest.mark.parametrize("sslmode", ["disable", "prefer", "require"])
def test_psql_over_unix_socket_is_unencrypted(bindir, hostssl, env, sslmode):
    """libpq sends no SSLRequest on a Unix socket ("sslmode is ignored for Unix domain
    socket communication"), so even require connects, unencrypted, through a `local` line."""
    result = conninfo(bindir, hostssl.dsn(host=hostssl.socket_dir, sslmode=sslmode), env)
    assert result.returncode == 0, result.stderr
    assert (f'You are connected to database "postgres" as user "postgres" via socket in '
            f'"{hostssl.socket_dir}" at port "{hostssl.port}".') in result.stdout
    assert "SSL" not in result.stdout


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def _read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    header = _recv_exactly(sock, 5)
    (length,) = struct.unpack("!i", header[1:])
    return header[:1], _recv_exactly(sock, length - 4)


SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def _startup_message(**params: str) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!ii", len(body) + 8, 196608) + body


def _unix_socket(server: Pgfast) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(os.path.join(server.socket_dir, f".s.PGSQL.{server.port}"))
    return sock


def test_ssl_request_on_unix_socket_is_answered_n_then_session_goes_on(hostssl):
    """A client in prefer mode: 'N', then its StartupMessage in the clear, and a session."""
    with _unix_socket(hostssl) as sock:
        sock.sendall(SSL_REQUEST)
        assert _recv_exactly(sock, 1) == b"N"
        sock.sendall(_startup_message(user="postgres", database="postgres"))
        assert _read_message(sock) == (b"R", struct.pack("!i", 0))
        kinds = []
        while not kinds or kinds[-1] != b"Z":
            kinds.append(_read_message(sock)[0])
        assert b"K" in kinds and kinds.count(b"Z") == 1
        query = b"select 'over the socket'\0"
        sock.sendall(b"Q" + struct.pack("!i", len(query) + 4) + query)
        rows = []
        while True:
            kind, payload = _read_message(sock)
            if kind == b"D":
                rows.append(payload[6:])
            if kind == b"Z":
                break
        assert rows == [b"over the socket"]
        sock.sendall(b"X" + struct.pack("!i", 4))


def test_ssl_request_on_unix_socket_refused_client_that_requires_tls_gives_up(hostssl):
    """A client in require mode gets 'N' and hangs up: pgfast closes quietly."""
    before = len(hostssl.lines)
    with _unix_socket(hostssl) as sock:
        sock.sendall(SSL_REQUEST)
        assert _recv_exactly(sock, 1) == b"N"
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    time.sleep(0.1)
    assert not any("FATAL" in line or "Traceback" in line for line in hostssl.lines[before:])


def test_direct_tls_on_unix_socket_is_not_tls(hostssl):
    """A TLS ClientHello on the socket is not taken for direct TLS (PostgreSQL 17 rejects
    direct TLS on a Unix socket too): no TLS session comes of it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["postgresql"])
    with _unix_socket(hostssl) as sock:
        with pytest.raises(ssl.SSLError):
            context.wrap_socket(sock, server_hostname="localhost")


# ---------------------------------------------------------------- psycopg (libpq from psycopg-binary)

def ssl_attribute(conn: psycopg.Connection, name: str) -> str | None:
    """libpq's PQsslAttribute on psycopg's own PGconn (psycopg wraps only PQsslInUse)."""
    if psycopg.pq.__impl__ == "binary":
        import psycopg_binary
        found = glob.glob(os.path.join(os.path.dirname(psycopg_binary.__file__) + ".libs", "libpq-*.so*"))
        path = found[0] if found else None
    else:
        path = ctypes.util.find_library("pq")
    if path is None:
        pytest.skip("cannot find the libpq psycopg uses")
    libpq = ctypes.CDLL(path)      # already loaded by psycopg: the same copy
    libpq.PQsslAttribute.restype = ctypes.c_char_p
    libpq.PQsslAttribute.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    value = libpq.PQsslAttribute(conn.pgconn.pgconn_ptr, name.encode())
    return value.decode() if value is not None else None


def test_psycopg_require(hostssl):
    with psycopg.connect(hostssl.dsn(sslmode="require")) as conn:
        assert conn.pgconn.ssl_in_use
        assert ssl_attribute(conn, "protocol") in ("TLSv1.2", "TLSv1.3")
        assert conn.execute("select current_user").fetchone() == ("postgres",)


def test_psycopg_verify_full(hostssl, root_cert):
    with psycopg.connect(hostssl.dsn(host="localhost", sslmode="verify-full", sslrootcert=root_cert)) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.skipif(psycopg.pq.version() < 170000, reason="sslnegotiation=direct needs libpq 17")
def test_psycopg_direct_tls(hostssl, root_cert):
    with psycopg.connect(hostssl.dsn(host="localhost", sslmode="verify-full", sslrootcert=root_cert,
                                     sslnegotiation="direct")) as conn:
        assert conn.pgconn.ssl_in_use
        assert ssl_attribute(conn, "alpn") == "postgresql"
        assert conn.execute("select 2").fetchone() == (2,)


def test_psycopg_require_refused_by_hostnossl(hostnossl):
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(hostnossl.dsn(sslmode="require"))
    assert ('no pg_hba.conf entry for host "127.0.0.1", user "postgres", database "postgres", '
            'SSL encryption') in str(caught.value)


def test_psycopg_wrong_root_fails_on_the_client(host, wrong_root_cert):
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(host.dsn(sslmode="verify-full", sslrootcert=wrong_root_cert))
    assert "SSL error: certificate verify failed" in str(caught.value)


# ---------------------------------------------------------------- asyncpg

def _asyncpg_ssl_object(conn: asyncpg.Connection):
    return conn._transport.get_extra_info("ssl_object")


async def _asyncpg_session(server: Pgfast, host: str = "127.0.0.1", **kwargs):
    conn = await asyncpg.connect(host=host, port=server.port, user="postgres", database="postgres",
                                 timeout=10, **kwargs)
    try:
        return _asyncpg_ssl_object(conn), await conn.fetchval("select 'asyncpg'")
    finally:
        await conn.close()


def test_asyncpg_require(hostssl):
    ssl_object, value = asyncio.run(_asyncpg_session(hostssl, ssl="require"))
    assert value == "asyncpg"
    assert ssl_object is not None and ssl_object.version() in ("TLSv1.2", "TLSv1.3")
    assert ssl_object.selected_alpn_protocol() == "postgresql"


def test_asyncpg_verify_full(hostssl, root_cert):
    ssl_object, value = asyncio.run(_asyncpg_session(hostssl, host="localhost",
                                                     ssl=client_context(root_cert)))
    assert value == "asyncpg" and ssl_object is not None


def test_asyncpg_verify_full_from_dsn(hostssl, root_cert):
    async def go():
        conn = await asyncpg.connect(f"postgresql://postgres@localhost:{hostssl.port}/postgres"
                                     f"?sslmode=verify-full&sslrootcert={root_cert}", timeout=10)
        try:
            return _asyncpg_ssl_object(conn), await conn.fetchval("select 1")
        finally:
            await conn.close()
    ssl_object, value = asyncio.run(go())
    assert value == 1 and ssl_object is not None


@pytest.mark.parametrize("ssl_mode", ["require", "verify-full"])
def test_asyncpg_direct_tls(hostssl, root_cert, ssl_mode):
    """asyncpg's own contexts (ssl='require', sslmode in a DSN) offer ALPN "postgresql"; a
    context of the caller's must be given it, as PostgreSQL 17 requires it for direct TLS."""
    kwargs = ({"ssl": "require"} if ssl_mode == "require" else
              {"ssl": client_context(root_cert, alpn=["postgresql"]), "host": "localhost"})
    ssl_object, value = asyncio.run(_asyncpg_session(hostssl, direct_tls=True, **kwargs))
    assert value == "asyncpg"
    assert ssl_object is not None and ssl_object.selected_alpn_protocol() == "postgresql"


def test_asyncpg_direct_tls_without_alpn_is_refused(hostssl, root_cert):
    with pytest.raises(asyncpg.ProtocolViolationError) as caught:
        asyncio.run(_asyncpg_session(hostssl, direct_tls=True, host="localhost", ssl=client_context(root_cert)))
    assert caught.value.sqlstate == "08P01"
    assert str(caught.value) == ("received direct SSL connection request without ALPN protocol negotiation "
                                 "extension")


def test_asyncpg_direct_tls_with_other_alpn_gets_a_tls_alert(hostssl, root_cert):
    with pytest.raises(ssl.SSLError, match="tlsv1 alert no application protocol"):
        asyncio.run(_asyncpg_session(hostssl, direct_tls=True, host="localhost",
                                     ssl=client_context(root_cert, alpn=["http/1.1"])))


def test_asyncpg_disable_refused_by_hostssl(hostssl):
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as caught:
        asyncio.run(_asyncpg_session(hostssl, ssl="disable"))
    assert caught.value.sqlstate == "28000"
    assert str(caught.value) == ('no pg_hba.conf entry for host "127.0.0.1", user "postgres", '
                                 'database "postgres", no encryption')


def test_asyncpg_prefer_falls_back_to_plain_on_hostnossl(hostnossl):
    ssl_object, value = asyncio.run(_asyncpg_session(hostnossl, ssl="prefer"))
    assert value == "asyncpg" and ssl_object is None


def test_asyncpg_wrong_root_fails_on_the_client(host, wrong_root_cert):
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(_asyncpg_session(host, ssl=client_context(wrong_root_cert)))


def test_asyncpg_many_concurrent_connections(hostssl):
    count = 50

    async def one(i: int, everyone_connected: asyncio.Barrier):
        conn = await asyncpg.connect(host="127.0.0.1", port=hostssl.port, user="postgres", database="postgres",
                                     ssl="require", timeout=30)
        try:
            pid, total = await conn.fetchrow("select pg_backend_pid(), sum(g) from generate_series(1, $1::int) g",
                                             1000 + i)
            await everyone_connected.wait()     # open at the same time: no backend can be shared
            return pid, total, _asyncpg_ssl_object(conn) is not None
        finally:
            await conn.close()

    async def all_at_once():
        barrier = asyncio.Barrier(count)
        return await asyncio.gather(*(one(i, barrier) for i in range(count)))

    results = asyncio.run(all_at_once())
    assert [total for _, total, _ in results] == [(1000 + i) * (1001 + i) // 2 for i in range(count)]
    assert len({pid for pid, _, _ in results}) == count
    assert all(encrypted for _, _, encrypted in results)


# ---------------------------------------------------------------- pg8000

def _pg8000(server: Pgfast, host: str = "127.0.0.1", **kwargs) -> pg8000.native.Connection:
    return pg8000.native.Connection(user="postgres", host=host, port=server.port, database="postgres",
                                    timeout=10, **kwargs)


def test_pg8000_with_ssl_context(hostssl, root_cert):
    conn = _pg8000(hostssl, host="localhost", ssl_context=client_context(root_cert))
    try:
        assert isinstance(conn._usock, ssl.SSLSocket)
        assert conn.run("select 'pg8000', 41 + 1") == [["pg8000", 42]]
    finally:
        conn.close()


def test_pg8000_default_is_unverified_tls(hostssl):
    conn = _pg8000(hostssl)
    try:
        assert isinstance(conn._usock, ssl.SSLSocket)
        assert conn.run("select 1") == [[1]]
    finally:
        conn.close()


def test_pg8000_without_tls_refused_by_hostssl(hostssl):
    with pytest.raises(pg8000.native.DatabaseError) as caught:
        _pg8000(hostssl, ssl_context=False)
    fields = caught.value.args[0]
    assert (fields["S"], fields["C"], fields["M"]) == (
        "FATAL", "28000",
        'no pg_hba.conf entry for host "127.0.0.1", user "postgres", database "postgres", no encryption')


def test_pg8000_tls_refused_by_hostnossl(hostnossl, root_cert):
    with pytest.raises(pg8000.native.DatabaseError) as caught:
        _pg8000(hostnossl, host="localhost", ssl_context=client_context(root_cert))
    fields = caught.value.args[0]
    assert (fields["C"], fields["M"]) == (
        "28000", 'no pg_hba.conf entry for host "127.0.0.1", user "postgres", database "postgres", SSL encryption')


# ---------------------------------------------------------------- bulk data across many TLS records

@pytest.fixture(scope="module")
def big_md5(host) -> str:
    """md5 of the big result's COPY text, computed by PostgreSQL."""
    with psycopg.connect(host.dsn(host=host.socket_dir)) as conn:
        return conn.execute(BIG_MD5_SQL).fetchone()[0]


@pytest.mark.parametrize("kind, sslmode", [("hostssl", "require"), ("host", "disable")])
def test_big_copy_to_stdout_through_psql(bindir, servers, env, big_md5, kind, sslmode):
    server = servers(kind)
    result = subprocess.run([os.path.join(bindir, "psql"), "-X", "-v", "ON_ERROR_STOP=1",
                             "-d", server.dsn(sslmode=sslmode), "-c", f"copy ({BIG_QUERY}) to stdout"],
                            capture_output=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) > 50_000_000
    assert md5(result.stdout) == big_md5


@pytest.mark.parametrize("kind, sslmode", [("hostssl", "require"), ("host", "disable")])
def test_big_result_set_through_psycopg(servers, big_md5, kind, sslmode):
    server = servers(kind)
    with psycopg.connect(server.dsn(sslmode=sslmode)) as conn:
        assert conn.pgconn.ssl_in_use == (sslmode == "require")
        rows = conn.execute(BIG_QUERY).fetchall()
    assert len(rows) == ROWS
    assert md5(b"".join(f"{g}\t{s}\n".encode() for g, s in rows)) == big_md5


@pytest.mark.parametrize("kind, sslmode", [("hostssl", "require"), ("host", "disable")])
def test_big_copy_from_stdin_lands_intact(servers, kind, sslmode):
    server = servers(kind)
    payload = (bytes(range(ord("a"), ord("z") + 1)) * 40)[:1000].decode()
    lines = [f"{i}\t{payload}{i % 997}\n".encode() for i in range(1, ROWS + 1)]
    sent = b"".join(lines)
    assert len(sent) > 50_000_000
    with psycopg.connect(server.dsn(sslmode=sslmode)) as conn:
        assert conn.pgconn.ssl_in_use == (sslmode == "require")
        conn.execute("create temporary table landed (id int, s text)")
        with conn.cursor() as cur:
            with cur.copy("copy landed (id, s) from stdin") as copy:
                for start in range(0, len(sent), 1 << 20):
                    copy.write(sent[start:start + (1 << 20)])
            count, digest = cur.execute(
                "select count(*), md5(string_agg(id || E'\\t' || s || E'\\n', '' order by id)) "
                "from landed").fetchone()
    assert count == ROWS
    assert digest == md5(sent)


# ---------------------------------------------------------------- cancel through TLS

@pytest.mark.parametrize("how", ["cancel", "cancel_safe"])
def test_psycopg_cancel_through_tls(hostssl, how):
    """cancel() is libpq's PQcancel (a CancelRequest in the clear on a new connection);
    cancel_safe() is libpq 17's PQcancelCreate, which negotiates TLS as the session did."""
    if how == "cancel_safe" and psycopg.pq.version() < 170000:
        pytest.skip("cancel_safe needs libpq 17")
    with psycopg.connect(hostssl.dsn(sslmode="require")) as conn:
        assert conn.pgconn.ssl_in_use
        timer = threading.Timer(0.5, getattr(conn, how))
        started = time.monotonic()
        timer.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled) as caught:
                conn.execute("select pg_sleep(20)")
        finally:
            timer.cancel()
        assert time.monotonic() - started < 10
        assert caught.value.sqlstate == "57014"
        assert caught.value.diag.message_primary == "canceling statement due to user request"
        conn.rollback()
        assert conn.execute("select 'still here'").fetchone() == ("still here",)


# ---------------------------------------------------------------- pgbench

def test_pgbench_through_tls(bindir, hostssl, env):
    """On the hostssl server only TLS sessions get in, so PGSSLMODE=require is in force."""
    bench_env = dict(env, PGHOST="127.0.0.1", PGPORT=str(hostssl.port), PGUSER="postgres",
                     PGDATABASE="postgres", PGSSLMODE="require", PGCONNECT_TIMEOUT="10")
    pgbench = os.path.join(bindir, "pgbench")

    def run(*args: str) -> str:
        result = subprocess.run([pgbench, *args], capture_output=True, text=True, timeout=60, env=bench_env,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout + result.stderr

    out = run("-i", "-s", "1")
    assert "done in" in out
    for extra in ([], ["-C"]):
        out = run("-n", "-S", "-T", "2", "-c", "4", "-j", "2", *extra)
        assert "number of failed transactions: 0 (0.000%)" in out, out
        processed = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
        assert processed > 0, out
    result = psql(bindir, hostssl.dsn(host=hostssl.socket_dir), "select count(*) from pgbench_accounts", env)
    assert result.stdout.strip() == "100000"


# ---------------------------------------------------------------- the logs

def test_no_python_traceback_in_server_logs(servers):
    for kind in KINDS:
        assert "Traceback" not in servers(kind).log
