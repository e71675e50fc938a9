"""Password authentication at the front, end to end: a real pgfast in front of a real
PostgreSQL 15, real clients (psql/libpq 15 with PGPASSWORD and ~/.pgpass, psycopg over
libpq 18, asyncpg, pg8000) and a raw client for what no library sends.

What the client sees was checked against a PostgreSQL 15.18 server with the same
pg_hba.conf, roles and TLS (ssl on, TCP): pgfast must answer what PostgreSQL answers.
The client always reads `password authentication failed for user "u"` (28P01), whatever
the reason; pgfast's log gives the reason in the DETAIL, followed by the pg_hba.conf line
(PostgreSQL 16's "Connection matched file ... line N" form, as the rest of pgfast).

A NOLOGIN role fails with 28P01 even with the right password: a difference from PostgreSQL
made on purpose (README), which authenticates the role and then says `role "x" is not
permitted to log in` (28000), telling the client the password was right.

One data directory serves three configurations, one pgfast at a time:
  ecdsa    ssl on, an ECDSA P-256 certificate signed with SHA-256
  rsa      ssl on, an RSA-2048 certificate signed with SHA-512 (so tls-server-end-point is SHA-512)
  timeout  as ecdsa, with authentication_timeout=1
"""
from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import ipaddress
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass

import asyncpg
import pg8000.native
import psycopg
import pytest
import scramp
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import certs
from conftest import Pgfast, chown_tree, db_account, free_port, psql, psql_script, run_pgfast

PASSWORDS = {
    "u": "u-secret",
    "md5u": "md5-secret",
    "nologin": "nologin-secret",
    "expired": "expired-secret",
    "member": "member-secret",
    "outsider": "outsider-secret",
    "changing": "old-secret",
}

SEED_SQL = """
CREATE DATABASE pwdb;
CREATE DATABASE md5db;
CREATE DATABASE scramdb;
CREATE DATABASE groupdb;
SET password_encryption = 'scram-sha-256';
CREATE ROLE u LOGIN PASSWORD 'u-secret';
SET password_encryption = 'md5';
CREATE ROLE md5u LOGIN PASSWORD 'md5-secret';
RESET password_encryption;
CREATE ROLE nologin NOLOGIN PASSWORD 'nologin-secret';
CREATE ROLE expired LOGIN PASSWORD 'expired-secret' VALID UNTIL '2001-01-01';
CREATE ROLE nopass LOGIN;
CREATE ROLE grp NOLOGIN;
CREATE ROLE member LOGIN PASSWORD 'member-secret' IN ROLE grp;
CREATE ROLE outsider LOGIN PASSWORD 'outsider-secret';
CREATE ROLE changing LOGIN PASSWORD 'old-secret';
"""

HBA = """\
# TYPE  DATABASE  USER      ADDRESS        METHOD
local   all       postgres                 trust
host    pwdb      all       127.0.0.1/32   password
host    md5db     all       127.0.0.1/32   md5
host    scramdb   all       127.0.0.1/32   scram-sha-256
host    groupdb   +grp      127.0.0.1/32   scram-sha-256
host    groupdb   all       127.0.0.1/32   reject
"""
METHOD_DB = {"password": "pwdb", "md5": "md5db", "scram-sha-256": "scramdb"}

AUTH_OK, AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 0, 3, 5, 10, 11, 12
SCRAM, SCRAM_PLUS = "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"


def failed(user: str) -> str:
    return f'password authentication failed for user "{user}"'


# ---------------------------------------------------------------- certificates

def rsa_sha512_server_cert(ca: certs.CA) -> tuple[x509.Certificate, bytes]:
    """An RSA server certificate signed with SHA-512 (tests/certs.py signs with SHA-256)."""
    key = certs.new_key("rsa")
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .sign(ca.key, hashes.SHA512())
    )
    return cert, certs.key_pem(key)


def end_point_hash(der: bytes, algorithm: hashes.HashAlgorithm | None = None) -> bytes:
    """RFC 5929 tls-server-end-point, computed here independently of pgfast: the
    certificate hashed with its signature's hash (SHA-256 for MD5 and SHA-1)."""
    if algorithm is None:
        algorithm = x509.load_der_x509_certificate(der).signature_hash_algorithm
        if algorithm.name in ("md5", "sha1"):
            algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(der)
    return digest.finalize()


@dataclass
class Pki:
    directory: str
    ecdsa_ca: str       # root certificate files for the clients
    rsa_ca: str
    ecdsa_cert: x509.Certificate
    rsa_cert: x509.Certificate


# ---------------------------------------------------------------- servers

class Servers:
    """One data directory, one pgfast at a time, restarted when a test needs another
    configuration."""

    CONFIGS = {
        "ecdsa": [],
        "rsa": ["-c", "ssl_cert_file=rsa.crt", "-c", "ssl_key_file=rsa.key"],
        "timeout": ["-c", "authentication_timeout=1"],
    }

    def __init__(self, data_dir: str, base: str, env: dict):
        self.data_dir = data_dir
        self.base = base
        self.env = env
        self.name: str | None = None
        self.server: Pgfast | None = None

    def use(self, name: str) -> Pgfast:
        if self.name == name and self.server.process.poll() is None:
            return self.server
        self.stop()
        socket_dir = tempfile.mkdtemp(prefix="sock-", dir=self.base)
        os.chmod(socket_dir, 0o777)
        self.server = Pgfast(self.data_dir, free_port(), socket_dir, ["-c", "ssl=on", *self.CONFIGS[name]],
                             dict(self.env)).start()
        self.name = name
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            assert self.server.stop() == 0, self.server.log
            self.server = None
            self.name = None


@pytest.fixture(scope="module")
def pki(module_dir) -> Pki:
    directory = os.path.join(module_dir, "pki")
    os.mkdir(directory)
    ecdsa_ca, rsa_ca = certs.CA("ecdsa CA"), certs.CA("rsa CA", key_type="rsa")
    ecdsa = ecdsa_ca.server_cert()
    rsa_cert, rsa_key = rsa_sha512_server_cert(rsa_ca)
    certs.write(os.path.join(directory, "server.crt"), ecdsa.cert_pem(), 0o644)
    certs.write(os.path.join(directory, "server.key"), ecdsa.key_pem(), 0o600)
    certs.write(os.path.join(directory, "rsa.crt"), certs.cert_pem(rsa_cert), 0o644)
    certs.write(os.path.join(directory, "rsa.key"), rsa_key, 0o600)
    return Pki(directory, certs.write(os.path.join(directory, "ecdsa-ca.crt"), ecdsa_ca.cert_pem(), 0o644),
               certs.write(os.path.join(directory, "rsa-ca.crt"), rsa_ca.cert_pem(), 0o644), ecdsa.cert, rsa_cert)


@pytest.fixture(scope="module")
def servers(template_cluster, module_dir, module_env, pki, bindir):
    """The session's initdb, copied once, with this module's pg_hba.conf, TLS files,
    roles and databases (seeded as postgres over pgfast's Unix socket)."""
    data = os.path.join(module_dir, "data")
    shutil.copytree(template_cluster, data, symlinks=True)
    os.chmod(data, 0o700)
    for name in ("server.crt", "server.key", "rsa.crt", "rsa.key"):
        shutil.copy(os.path.join(pki.directory, name), os.path.join(data, name))
    with open(os.path.join(data, "pg_hba.conf"), "w") as f:
        f.write(HBA)
    chown_tree(data)
    manager = Servers(data, module_dir, module_env)
    server = manager.use("ecdsa")
    result = psql_script(bindir, server, SEED_SQL, module_env)
    assert result.returncode == 0, result.stderr + server.log
    yield manager
    manager.stop()


@pytest.fixture
def ecdsa(servers) -> Pgfast:
    return servers.use("ecdsa")


@pytest.fixture
def rsa(servers) -> Pgfast:
    return servers.use("rsa")


@pytest.fixture
def timeout_server(servers) -> Pgfast:
    return servers.use("timeout")


# ---------------------------------------------------------------- log

def hba_context(server: Pgfast, database: str) -> str:
    """PostgreSQL 16's DETAIL tail naming the pg_hba.conf line used for `database`."""
    path = os.path.join(server.data_dir, "pg_hba.conf")
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.startswith("host") and line.split()[1] == database:
                return f'Connection matched file "{path}" line {number}: "{line.strip()}"'
    raise AssertionError(f"no pg_hba.conf line for {database}")


def log_since(server: Pgfast, mark: int) -> str:
    return "".join(server.lines[mark:])


def wait_log(server: Pgfast, mark: int, *texts: str, timeout: float = 5) -> str:
    """The log written since `mark`, once it holds every text (the reader thread may lag)."""
    deadline = time.monotonic() + timeout
    while True:
        log = log_since(server, mark)
        if all(text in log for text in texts) or time.monotonic() > deadline:
            for text in texts:
                assert text in log, f"{text!r} not in the log since the mark:\n{log}"
            return log
        time.sleep(0.02)


def fatal_with_detail(message: str, detail: str) -> re.Pattern:
    """A FATAL line followed directly by its DETAIL line, as pgfast writes them."""
    return re.compile(rf"\] (?:\S+ )?FATAL:  {re.escape(message)}\n[^\n]*\] (?:\S+ )?DETAIL:  {re.escape(detail)}\n")


def assert_logged(server: Pgfast, mark: int, message: str, detail: str | None = None) -> None:
    wait_log(server, mark, f"FATAL:  {message}\n")
    if detail is not None:
        deadline = time.monotonic() + 5
        while not fatal_with_detail(message, detail).search(log_since(server, mark)):
            assert time.monotonic() < deadline, (f"FATAL {message!r} with DETAIL {detail!r} not logged:\n"
                                                 f"{log_since(server, mark)}")
            time.sleep(0.02)


# ---------------------------------------------------------------- clients

@dataclass(frozen=True)
class Outcome:
    user: str | None = None         # current_user when the login worked
    sqlstate: str | None = None     # when the client library reports one
    message: str | None = None      # the FATAL's primary message, or the client's own error

    @property
    def ok(self) -> bool:
        return self.user is not None


CLIENTS = ("psql-env", "psql-pgpass", "psycopg", "asyncpg", "pg8000")
_PSQL_FATAL = re.compile(r"failed: FATAL:  (.*)$", re.M)


def _psql_outcome(result: subprocess.CompletedProcess) -> Outcome:
    if result.returncode == 0:
        return Outcome(user=result.stdout.strip())
    found = _PSQL_FATAL.search(result.stderr)
    return Outcome(message=found.group(1) if found else result.stderr.strip().removeprefix("psql: error: "))


def login(client: str, server: Pgfast, bindir: str, env: dict, user: str, database: str, password: str | None,
          **params) -> Outcome:
    """One login attempt by a real client; params are libpq keywords for psql/psycopg."""
    if client in ("psql-env", "psql-pgpass"):
        env = dict(env)
        if client == "psql-env" and password is not None:
            env["PGPASSWORD"] = password
        if client == "psql-pgpass":
            pgpass = os.path.join(env["HOME"], ".pgpass")
            with open(pgpass, "w") as f:
                f.write(f"127.0.0.1:{server.port}:{database}:{user}:{password}\n")
            os.chmod(pgpass, 0o600)
        dsn = server.dsn(user=user, dbname=database, **params)
        result = subprocess.run([os.path.join(bindir, "psql"), "-X", "-A", "-t", "-w", "-d", dsn,
                                 "-c", "SELECT current_user"],
                                capture_output=True, text=True, timeout=30, env=env, stdin=subprocess.DEVNULL)
        if client == "psql-pgpass":
            os.unlink(pgpass)
        return _psql_outcome(result)
    if client == "psycopg":
        params.setdefault("sslmode", "require")
        try:
            with psycopg.connect(server.dsn(user=user, dbname=database, password=password, **params)) as conn:
                return Outcome(user=conn.execute("SELECT current_user").fetchone()[0])
        except psycopg.OperationalError as exc:
            found = _PSQL_FATAL.search(str(exc))
            return Outcome(message=found.group(1) if found else str(exc))
    if client == "asyncpg":
        async def attempt() -> Outcome:
            try:
                conn = await asyncpg.connect(host="127.0.0.1", port=server.port, user=user, database=database,
                                             password=password, ssl=False, timeout=10)
            except asyncpg.PostgresError as exc:
                return Outcome(sqlstate=exc.sqlstate, message=str(exc))
            try:
                return Outcome(user=await conn.fetchval("SELECT current_user"))
            finally:
                await conn.close()
        return asyncio.run(attempt())
    if client == "pg8000":
        ssl_context = False     # pg8000 tries TLS first unless told not to
        if params.get("sslmode") == "require":
            ssl_context = ssl.create_default_context()
            ssl_context.check_hostname = False
            ssl_context.verify_mode = ssl.CERT_NONE
        try:
            conn = pg8000.native.Connection(user, host="127.0.0.1", port=server.port, database=database,
                                            password=password, ssl_context=ssl_context, timeout=10)
        except pg8000.native.DatabaseError as exc:
            fields = exc.args[0]
            return Outcome(sqlstate=fields["C"], message=fields["M"])
        try:
            return Outcome(user=conn.run("SELECT current_user")[0][0])
        finally:
            conn.close()
    raise ValueError(client)


def ok(user: str) -> Outcome:
    return Outcome(user=user)


def assert_refused(outcome: Outcome, message: str, sqlstate: str) -> None:
    assert not outcome.ok, outcome
    assert outcome.message == message, outcome
    assert outcome.sqlstate in (None, sqlstate), outcome


@pytest.fixture
def attempt(bindir, module_env):
    def run(server: Pgfast, user: str, database: str, password: str | None, client: str = "pg8000",
            **params) -> Outcome:
        return login(client, server, bindir, module_env, user, database, password, **params)
    return run


# ---------------------------------------------------------------- a raw client

def message(msg_type: bytes, payload: bytes) -> bytes:
    return msg_type + struct.pack("!i", len(payload) + 4) + payload


def error_fields(payload: bytes) -> dict[str, str]:
    return {chr(part[0]): part[1:].decode() for part in payload.split(b"\0") if part}


class RawClient:
    """The protocol by hand, for what client libraries never send."""

    def __init__(self, server: Pgfast, tls: bool = False, timeout: float = 5):
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
        self.buffer = b""
        self.server_der: bytes | None = None
        if tls:
            self.sock.sendall(struct.pack("!ii", 8, 80877103))
            assert self.sock.recv(1) == b"S"
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            self.sock = context.wrap_socket(self.sock)
            self.server_der = self.sock.getpeercert(binary_form=True)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def startup(self, user: str, database: str) -> None:
        body = b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
        self.send(struct.pack("!ii", len(body) + 8, 196608) + body)

    def read(self) -> tuple[bytes, bytes] | None:
        """The next message, or None at EOF."""
        while True:
            if len(self.buffer) >= 5:
                (length,) = struct.unpack_from("!i", self.buffer, 1)
                if len(self.buffer) >= length + 1:
                    msg_type, payload = self.buffer[:1], self.buffer[5:length + 1]
                    self.buffer = self.buffer[length + 1:]
                    return msg_type, payload
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return None
            self.buffer += data

    def auth_request(self) -> tuple[int, bytes]:
        msg = self.read()
        assert msg is not None and msg[0] == b"R", msg if msg is None or msg[0] != b"E" else error_fields(msg[1])
        return struct.unpack_from("!i", msg[1])[0], msg[1][4:]

    def mechanisms(self) -> list[str]:
        code, data = self.auth_request()
        assert code == AUTH_SASL, (code, data)
        assert data.endswith(b"\0\0")
        return [m.decode() for m in data[:-2].split(b"\0")]

    def sasl_initial(self, mechanism: str, data: bytes) -> None:
        self.send(message(b"p", mechanism.encode() + b"\0" + struct.pack("!i", len(data)) + data))

    def sasl_response(self, data: bytes) -> None:
        self.send(message(b"p", data))

    def refusal(self) -> dict[str, str]:
        """The ErrorResponse that ends the connection, and then the close."""
        msg = self.read()
        assert msg is not None and msg[0] == b"E", msg
        assert self.read() is None, "the connection stayed open after the FATAL"
        return error_fields(msg[1])

    def until_ready(self) -> list[bytes]:
        types = []
        while True:
            msg = self.read()
            assert msg is not None, types
            assert msg[0] != b"E", error_fields(msg[1])
            types.append(msg[0])
            if msg[0] == b"Z":
                return types


def scram_client(user: str, password: str, mechanism: str, cb_data: bytes | None = None) -> scramp.ScramClient:
    binding = ("tls-server-end-point", cb_data) if mechanism == SCRAM_PLUS else None
    return scramp.ScramClient([mechanism], user, password, channel_binding=binding)


def server_first_of(raw: RawClient) -> str:
    code, data = raw.auth_request()
    assert code == AUTH_SASL_CONTINUE, (code, data)
    return data.decode()


def client_final_with(server_first: str, gs2_header: bytes, nonce: str | None = None,
                      cb_data: bytes = b"") -> bytes:
    """A client-final-message with a well-formed proof (32 bytes) that cannot be right."""
    combined = nonce or dict(a.split("=", 1) for a in server_first.split(","))["r"]
    c = base64.b64encode(gs2_header + cb_data).decode()
    return f"c={c},r={combined},p={base64.b64encode(bytes(32)).decode()}".encode()


# ================================================================ the methods, every client

@pytest.mark.parametrize("method", list(METHOD_DB))
@pytest.mark.parametrize("client", CLIENTS)
def test_right_and_wrong_password(ecdsa, bindir, client_env, client, method):
    database = METHOD_DB[method]
    assert login(client, ecdsa, bindir, client_env, "u", database, PASSWORDS["u"]) == ok("u")
    mark = len(ecdsa.lines)
    outcome = login(client, ecdsa, bindir, client_env, "u", database, "not-the-password")
    assert_refused(outcome, failed("u"), "28P01")
    assert_logged(ecdsa, mark, failed("u"),
                  f'Password does not match for user "u". {hba_context(ecdsa, database)}')


def test_pgpass_file_mode_0600_is_used_and_no_password_fails(ecdsa, bindir, client_env):
    """libpq reads ~/.pgpass (mode 0600) from HOME; without it and without PGPASSWORD, -w gives up."""
    assert login("psql-pgpass", ecdsa, bindir, client_env, "u", "scramdb", PASSWORDS["u"]) == ok("u")
    assert not os.path.exists(os.path.join(client_env["HOME"], ".pgpass"))
    outcome = login("psql-env", ecdsa, bindir, client_env, "u", "scramdb", None)
    assert outcome.message == ('connection to server at "127.0.0.1", port '
                               f'{ecdsa.port} failed: fe_sendauth: no password supplied'), outcome


@pytest.mark.parametrize("method, expected_request", [("password", AUTH_CLEARTEXT), ("md5", AUTH_SASL),
                                                      ("scram-sha-256", AUTH_SASL)])
def test_exchange_for_a_scram_secret(ecdsa, method, expected_request):
    """A SCRAM secret gets SCRAM under an md5 line too, as PostgreSQL does."""
    raw = RawClient(ecdsa)
    raw.startup("u", METHOD_DB[method])
    assert raw.auth_request()[0] == expected_request
    raw.close()


# ================================================================ md5 secrets

def test_md5_secret_is_stored_as_md5(ecdsa, bindir, module_env):
    result = psql(bindir, f"host={ecdsa.socket_dir} port={ecdsa.port} dbname=postgres user=postgres",
                  "SELECT rolname || ' ' || left(rolpassword, 3) FROM pg_authid "
                  "WHERE rolname IN ('u', 'md5u') ORDER BY 1", module_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["md5u md5", "u SCR"]


@pytest.mark.parametrize("client", ["psql-env", "pg8000"])
def test_md5_secret_under_scram_line_fails(ecdsa, bindir, module_env, client):
    mark = len(ecdsa.lines)
    outcome = login(client, ecdsa, bindir, module_env, "md5u", "scramdb", PASSWORDS["md5u"])
    assert_refused(outcome, failed("md5u"), "28P01")
    assert_logged(ecdsa, mark, failed("md5u"),
                  f'User "md5u" does not have a valid SCRAM secret. {hba_context(ecdsa, "scramdb")}')


@pytest.mark.parametrize("client", ["psql-env", "pg8000", "asyncpg"])
@pytest.mark.parametrize("method", ["md5", "password"])
def test_md5_secret_under_md5_and_password_lines(ecdsa, bindir, module_env, client, method):
    database = METHOD_DB[method]
    assert login(client, ecdsa, bindir, module_env, "md5u", database, PASSWORDS["md5u"]) == ok("md5u")
    mark = len(ecdsa.lines)
    assert_refused(login(client, ecdsa, bindir, module_env, "md5u", database, "u-secret"), failed("md5u"), "28P01")
    assert_logged(ecdsa, mark, failed("md5u"),
                  f'Password does not match for user "md5u". {hba_context(ecdsa, database)}')


def test_md5_secret_under_md5_line_gets_an_md5_challenge(ecdsa):
    raw = RawClient(ecdsa)
    raw.startup("md5u", "md5db")
    code, salt = raw.auth_request()
    assert (code, len(salt)) == (AUTH_MD5, 4)
    raw.close()


def test_md5_challenge_answered_by_hand(ecdsa):
    """md5(md5(password || user) || salt), as libpq computes it."""
    raw = RawClient(ecdsa)
    raw.startup("md5u", "md5db")
    code, salt = raw.auth_request()
    inner = hashlib.md5(b"md5-secret" + b"md5u").hexdigest()
    raw.send(message(b"p", b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode() + b"\0"))
    assert raw.auth_request() == (AUTH_OK, b"")
    assert raw.until_ready()[-1] == b"Z"
    raw.close()


# ================================================================ roles that cannot log in

@pytest.mark.parametrize("password", [PASSWORDS["nologin"], "wrong"])
@pytest.mark.parametrize("method", list(METHOD_DB))
@pytest.mark.parametrize("client", ["psql-env", "asyncpg", "pg8000"])
def test_nologin_role(ecdsa, bindir, module_env, client, method, password):
    """28P01 whatever the password (PostgreSQL: 28000 'role "nologin" is not permitted to
    log in' after the right one; pgfast differs on purpose)."""
    database = METHOD_DB[method]
    mark = len(ecdsa.lines)
    outcome = login(client, ecdsa, bindir, module_env, "nologin", database, password)
    assert_refused(outcome, failed("nologin"), "28P01")
    assert_logged(ecdsa, mark, failed("nologin"),
                  f'Role "nologin" is not permitted to log in. {hba_context(ecdsa, database)}')


@pytest.mark.parametrize("method", list(METHOD_DB))
@pytest.mark.parametrize("user, password, reason", [
    ("expired", "expired-secret", 'User "expired" has an expired password.'),
    ("nopass", "anything", 'User "nopass" has no password assigned.'),
    ("nosuch", "anything", 'Role "nosuch" does not exist.'),
])
def test_role_that_cannot_log_in_by_password(ecdsa, attempt, method, user, password, reason):
    database = METHOD_DB[method]
    mark = len(ecdsa.lines)
    assert_refused(attempt(ecdsa, user, database, password), failed(user), "28P01")
    assert_logged(ecdsa, mark, failed(user), f"{reason} {hba_context(ecdsa, database)}")


@pytest.mark.parametrize("database", ["scramdb", "md5db"])
def test_missing_role_goes_through_the_whole_scram_exchange(ecdsa, database):
    """A role that does not exist gets the same exchange as a wrong password: SASL,
    SASLContinue (4096 iterations, a 16-byte salt that is the same on every attempt),
    and only then 28P01. Under an md5 line too (password_encryption is scram-sha-256)."""
    salts = []
    for user in ("nosuch", "nosuch", "u"):
        raw = RawClient(ecdsa)
        raw.startup(user, database)
        assert raw.mechanisms() == [SCRAM]
        raw.sasl_initial(SCRAM, b"n,,n=,r=clientnonce")
        server_first = server_first_of(raw)
        attributes = dict(a.split("=", 1) for a in server_first.split(","))
        assert attributes["r"].startswith("clientnonce") and len(attributes["r"]) > len("clientnonce")
        assert attributes["i"] == "4096"
        assert len(base64.b64decode(attributes["s"])) == 16
        salts.append(attributes["s"])
        raw.sasl_response(client_final_with(server_first, b"n,,"))
        fields = raw.refusal()
        assert (fields["C"], fields["M"]) == ("28P01", failed(user))
    assert salts[0] == salts[1] != salts[2]


# ================================================================ groups

def test_group_line_with_scram(ecdsa, attempt):
    assert attempt(ecdsa, "member", "groupdb", PASSWORDS["member"]) == ok("member")
    assert attempt(ecdsa, "member", "groupdb", PASSWORDS["member"], client="psql-env") == ok("member")
    mark = len(ecdsa.lines)
    assert_refused(attempt(ecdsa, "member", "groupdb", "wrong"), failed("member"), "28P01")
    assert_logged(ecdsa, mark, failed("member"),
                  f'Password does not match for user "member". {hba_context(ecdsa, "groupdb")}')
    # not a member: the next line rejects, whatever the password
    outcome = attempt(ecdsa, "outsider", "groupdb", PASSWORDS["outsider"])
    assert_refused(outcome, 'pg_hba.conf rejects connection for host "127.0.0.1", user "outsider", '
                            'database "groupdb", no encryption', "28000")


# ================================================================ a changed password

def test_altered_password_takes_effect_at_the_next_login(ecdsa, attempt, bindir, module_env):
    assert attempt(ecdsa, "changing", "scramdb", "old-secret") == ok("changing")
    result = psql(bindir, f"host={ecdsa.socket_dir} port={ecdsa.port} dbname=postgres user=postgres",
                  "ALTER ROLE changing PASSWORD 'new-secret'", module_env)
    assert result.returncode == 0, result.stderr
    assert attempt(ecdsa, "changing", "scramdb", "new-secret") == ok("changing")
    assert_refused(attempt(ecdsa, "changing", "scramdb", "old-secret"), failed("changing"), "28P01")
    assert attempt(ecdsa, "changing", "scramdb", "new-secret", client="psql-env") == ok("changing")


# ================================================================ channel binding

@pytest.mark.parametrize("channel_binding", ["require", "prefer", "disable"])
@pytest.mark.parametrize("client", ["psql-env", "psycopg"])
def test_channel_binding_over_tls(ecdsa, attempt, client, channel_binding):
    outcome = attempt(ecdsa, "u", "scramdb", PASSWORDS["u"], client=client, sslmode="require",
                      channel_binding=channel_binding)
    assert outcome == ok("u")


@pytest.mark.parametrize("channel_binding", ["require", "prefer", "disable"])
def test_channel_binding_with_md5_line_and_scram_secret(ecdsa, attempt, channel_binding):
    outcome = attempt(ecdsa, "u", "md5db", PASSWORDS["u"], client="psql-env", sslmode="require",
                      channel_binding=channel_binding)
    assert outcome == ok("u")


def test_wrong_password_with_channel_binding(ecdsa, attempt):
    outcome = attempt(ecdsa, "u", "scramdb", "wrong", client="psql-env", sslmode="require",
                      channel_binding="require")
    assert_refused(outcome, failed("u"), "28P01")


def test_channel_binding_required_without_tls_fails_in_the_client(ecdsa, attempt):
    outcome = attempt(ecdsa, "u", "scramdb", PASSWORDS["u"], client="psql-env", sslmode="disable",
                      channel_binding="require")
    assert outcome == Outcome(message=f'connection to server at "127.0.0.1", port {ecdsa.port} failed: '
                                      'channel binding required, but SSL not in use'), outcome


@pytest.mark.parametrize("user, database", [("u", "pwdb"), ("md5u", "md5db")])
def test_channel_binding_required_but_no_scram_fails_in_the_client(ecdsa, attempt, user, database):
    outcome = attempt(ecdsa, user, database, PASSWORDS[user], client="psql-env", sslmode="require",
                      channel_binding="require")
    assert outcome == Outcome(message=f'connection to server at "127.0.0.1", port {ecdsa.port} failed: '
                                      "channel binding required but not supported by server's "
                                      "authentication request"), outcome


@pytest.mark.parametrize("tls, offered", [(True, [SCRAM_PLUS, SCRAM]), (False, [SCRAM])])
def test_plus_offered_only_over_tls(ecdsa, tls, offered):
    raw = RawClient(ecdsa, tls=tls)
    raw.startup("u", "scramdb")
    assert raw.mechanisms() == offered
    raw.close()


def scram_plus_login(server: Pgfast, cb_data_of) -> tuple[RawClient, scramp.ScramClient]:
    """SCRAM-SHA-256-PLUS by hand (scramp as the client), binding to cb_data_of(der)."""
    raw = RawClient(server, tls=True)
    raw.startup("u", "scramdb")
    assert raw.mechanisms() == [SCRAM_PLUS, SCRAM]
    client = scram_client("u", PASSWORDS["u"], SCRAM_PLUS, cb_data_of(raw.server_der))
    client_first = client.get_client_first()
    assert client_first.startswith("p=tls-server-end-point,,")
    raw.sasl_initial(SCRAM_PLUS, client_first.encode())
    client.set_server_first(server_first_of(raw))
    raw.sasl_response(client.get_client_final().encode())
    return raw, client


@pytest.mark.parametrize("config, hash_name", [("ecdsa", "sha256"), ("rsa", "sha512")])
def test_scram_plus_binds_to_the_certificate_hash(servers, pki, config, hash_name):
    server = servers.use(config)
    expected_cert = pki.ecdsa_cert if config == "ecdsa" else pki.rsa_cert
    assert expected_cert.signature_hash_algorithm.name == hash_name
    raw, client = scram_plus_login(server, end_point_hash)
    assert x509.load_der_x509_certificate(raw.server_der) == expected_cert
    code, server_final = raw.auth_request()
    assert code == AUTH_SASL_FINAL
    client.set_server_final(server_final.decode())      # the server proved it knows the secret
    assert raw.auth_request() == (AUTH_OK, b"")
    assert raw.until_ready()[-1] == b"Z"
    raw.close()


def test_rsa_sha512_certificate_binding_with_sha256_fails(rsa):
    """Binding data hashed with the wrong algorithm is a channel binding failure (28000)."""
    mark = len(rsa.lines)
    raw, _ = scram_plus_login(rsa, lambda der: end_point_hash(der, hashes.SHA256()))
    fields = raw.refusal()
    assert (fields["C"], fields["M"]) == ("28000", "SCRAM channel binding check failed")
    wait_log(rsa, mark, "FATAL:  SCRAM channel binding check failed")


@pytest.mark.parametrize("client", ["psql-env", "psycopg"])
def test_libpq_channel_binding_require_with_rsa_sha512_certificate(rsa, attempt, pki, client):
    outcome = attempt(rsa, "u", "scramdb", PASSWORDS["u"], client=client, sslmode="verify-full",
                      sslrootcert=pki.rsa_ca, host="localhost", channel_binding="require")
    assert outcome == ok("u")


# ================================================================ malformed SASL and password messages

def _p(payload: bytes) -> bytes:
    return message(b"p", payload)


def _initial(mechanism: str, data: bytes) -> bytes:
    return _p(mechanism.encode() + b"\0" + struct.pack("!i", len(data)) + data)


CB_DETAIL = ("The client supports SCRAM channel binding but thinks the server does not.  "
             "However, this server does support channel binding.")
PLUS_WITHOUT = ("The client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include channel "
                "binding data.")
PLAIN_WITH = ("The client selected SCRAM-SHA-256 without channel binding, but the SCRAM message includes "
              "channel binding data.")

# (name, tls, bytes sent after AuthenticationSASL, SQLSTATE, message, detail): PostgreSQL 15's answers
INITIAL_CASES = [
    ("bad mechanism", False, _initial("SCRAM-SHA-1", b"n,,n=,r=abc"), "08P01",
     "client selected an invalid SASL authentication mechanism", None),
    ("plus without tls", False, _initial(SCRAM_PLUS, b"p=tls-server-end-point,,n=,r=abc"), "08P01",
     "client selected an invalid SASL authentication mechanism", None),
    ("garbage client-first", False, _initial(SCRAM, b"garbage"), "08P01", "malformed SCRAM message",
     "Unexpected channel-binding flag \"'g'\"."),
    ("empty client-first", False, _initial(SCRAM, b""), "08P01", "malformed SCRAM message",
     "The message is empty."),
    ("y over tls", True, _initial(SCRAM, b"y,,n=,r=abc"), "28000", "SCRAM channel binding negotiation error",
     CB_DETAIL),
    ("y with plus", True, _initial(SCRAM_PLUS, b"y,,n=,r=abc"), "08P01", "malformed SCRAM message", PLUS_WITHOUT),
    ("n with plus", True, _initial(SCRAM_PLUS, b"n,,n=,r=abc"), "08P01", "malformed SCRAM message", PLUS_WITHOUT),
    ("p without plus", True, _initial(SCRAM, b"p=tls-server-end-point,,n=,r=abc"), "08P01",
     "malformed SCRAM message", PLAIN_WITH),
    ("tls-unique", True, _initial(SCRAM_PLUS, b"p=tls-unique,,n=,r=abc"), "08P01",
     'unsupported SCRAM channel-binding type "tls-unique"', None),
    ("authzid", False, _initial(SCRAM, b"n,a=postgres,n=,r=abc"), "0A000",
     "client uses authorization identity, but it is not supported", None),
    ("extension", False, _initial(SCRAM, b"n,,m=ext,n=,r=abc"), "0A000",
     "client requires an unsupported SCRAM extension", None),
    ("query instead of p", False, message(b"Q", b"SELECT 1\0"), "08P01",
     "expected SASL response, got message type 81", None),
    ("truncated data", False, _p(SCRAM.encode() + b"\0" + struct.pack("!i", 50) + b"n,,n=,r=abc"), "08P01",
     "insufficient data left in message", None),
    ("no length", False, _p(SCRAM.encode() + b"\0\0\0"), "08P01", "insufficient data left in message", None),
    ("no mechanism terminator", False, _p(SCRAM.encode()), "08P01", "invalid string in message", None),
    ("trailing bytes", False, _p(SCRAM.encode() + b"\0" + struct.pack("!i", 3) + b"n,,xyz"), "08P01",
     "invalid message format", None),
]


def assert_still_serving(server: Pgfast) -> None:
    assert server.process.poll() is None, server.log
    raw = RawClient(server)
    raw.startup("md5u", "pwdb")
    assert raw.auth_request()[0] == AUTH_CLEARTEXT
    raw.send(_p(b"md5-secret\0"))
    assert raw.auth_request() == (AUTH_OK, b"")
    assert raw.until_ready()[-1] == b"Z"
    raw.close()


@pytest.mark.parametrize("name, tls, data, sqlstate, text, detail", INITIAL_CASES,
                         ids=[case[0] for case in INITIAL_CASES])
def test_malformed_sasl_initial_response(ecdsa, name, tls, data, sqlstate, text, detail):
    mark = len(ecdsa.lines)
    raw = RawClient(ecdsa, tls=tls)
    raw.startup("u", "scramdb")
    raw.mechanisms()
    raw.send(data)
    fields = raw.refusal()
    assert (fields["S"], fields["C"], fields["M"], fields.get("D")) == ("FATAL", sqlstate, text, detail)
    if detail is None:
        wait_log(ecdsa, mark, f"FATAL:  {text}\n")
    else:
        assert_logged(ecdsa, mark, text, detail)
    assert_still_serving(ecdsa)


@pytest.mark.parametrize("name", ["wrong nonce", "wrong message type", "garbage", "wrong binding data"])
def test_malformed_sasl_final_response(ecdsa, name):
    tls = name == "wrong binding data"
    raw = RawClient(ecdsa, tls=tls)
    raw.startup("u", "scramdb")
    raw.mechanisms()
    mechanism, header = (SCRAM_PLUS, b"p=tls-server-end-point,,") if tls else (SCRAM, b"n,,")
    raw.sasl_initial(mechanism, header + b"n=,r=clientnonce")
    server_first = server_first_of(raw)
    if name == "wrong nonce":
        raw.sasl_response(client_final_with(server_first, header, nonce="clientnonceXXXXXXXXXXXXXXXXXXXX"))
        expected = ("08P01", "invalid SCRAM response", "Nonce does not match.")
    elif name == "wrong message type":
        raw.send(message(b"Q", b"SELECT 1\0"))
        expected = ("08P01", "expected SASL response, got message type 81", None)
    elif name == "garbage":
        raw.sasl_response(b"garbage")
        expected = ("08P01", "malformed SCRAM message", ...)
    else:
        raw.sasl_response(client_final_with(server_first, header, cb_data=bytes(32)))
        expected = ("28000", "SCRAM channel binding check failed", None)
    fields = raw.refusal()
    assert fields["C"] == expected[0] and fields["M"] == expected[1], fields
    if expected[2] is not ...:
        assert fields.get("D") == expected[2], fields
    assert_still_serving(ecdsa)


def test_scram_without_initial_response(ecdsa):
    """A SASLInitialResponse of length -1 gets an empty challenge, then the client-first."""
    raw = RawClient(ecdsa)
    raw.startup("u", "scramdb")
    raw.mechanisms()
    raw.send(_p(SCRAM.encode() + b"\0" + struct.pack("!i", -1)))
    assert raw.auth_request() == (AUTH_SASL_CONTINUE, b"")
    client = scram_client("u", PASSWORDS["u"], SCRAM)
    raw.sasl_response(client.get_client_first().encode())
    client.set_server_first(server_first_of(raw))
    raw.sasl_response(client.get_client_final().encode())
    code, server_final = raw.auth_request()
    assert code == AUTH_SASL_FINAL
    client.set_server_final(server_final.decode())
    assert raw.auth_request() == (AUTH_OK, b"")
    raw.close()


@pytest.mark.parametrize("payload, sqlstate, text", [
    (b"\0", "28P01", "empty password returned by client"),
    (b"secret", "08P01", "invalid password packet size"),
    (b"sec\0ret\0", "08P01", "invalid password packet size"),
])
def test_malformed_password_message(ecdsa, payload, sqlstate, text):
    mark = len(ecdsa.lines)
    raw = RawClient(ecdsa)
    raw.startup("u", "pwdb")
    assert raw.auth_request() == (AUTH_CLEARTEXT, b"")
    raw.send(_p(payload))
    fields = raw.refusal()
    assert (fields["C"], fields["M"]) == (sqlstate, text)
    wait_log(ecdsa, mark, f"FATAL:  {text}\n")
    assert_still_serving(ecdsa)


def test_password_method_wrong_message_type(ecdsa):
    raw = RawClient(ecdsa)
    raw.startup("u", "pwdb")
    raw.auth_request()
    mark = len(ecdsa.lines)
    raw.send(message(b"Q", b"SELECT 1\0"))
    fields = raw.refusal()
    assert (fields["C"], fields["M"]) == ("08P01", "expected password response, got message type 81")
    wait_log(ecdsa, mark, "FATAL:  expected password response, got message type 81\n")


def test_client_that_leaves_mid_exchange_is_forgotten(ecdsa):
    """Closing during SCRAM is not an error PostgreSQL logs; pgfast goes on."""
    time.sleep(0.2)                     # earlier tests' lines are in
    mark = len(ecdsa.lines)
    raw = RawClient(ecdsa)
    raw.startup("u", "scramdb")
    raw.mechanisms()
    raw.sasl_initial(SCRAM, b"n,,n=,r=clientnonce")
    server_first_of(raw)
    raw.close()
    assert_still_serving(ecdsa)
    time.sleep(0.2)
    assert "FATAL" not in log_since(ecdsa, mark) and "LOG" not in log_since(ecdsa, mark), log_since(ecdsa, mark)


# ================================================================ authentication_timeout

def test_client_stalling_mid_scram_is_dropped_at_authentication_timeout(timeout_server):
    """PostgreSQL logs the FATAL and closes without writing to the client."""
    mark = len(timeout_server.lines)
    raw = RawClient(timeout_server)
    started = time.monotonic()
    raw.startup("u", "scramdb")
    raw.mechanisms()
    raw.sasl_initial(SCRAM, b"n,,n=,r=clientnonce")
    server_first_of(raw)
    assert raw.read() is None           # closed, and nothing said
    assert 0.8 < time.monotonic() - started < 3
    wait_log(timeout_server, mark, "FATAL:  canceling authentication due to timeout\n")
    assert_still_serving(timeout_server)


# ================================================================ pgfast init --auth scram-sha-256

def test_init_with_scram_and_pwfile(scratch, client_env, bindir, pgfast_factory):
    pwfile = os.path.join(scratch, "pw")
    with open(pwfile, "w") as f:
        f.write("init-secret\n")
    data_dir = os.path.join(scratch, "data")
    run = run_pgfast("init", "-D", data_dir, "--auth", "scram-sha-256", "--pwfile", pwfile, env=client_env,
                     timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    with open(os.path.join(data_dir, "pg_hba.conf")) as f:
        lines = [line.split() for line in f if line.strip() and not line.startswith("#")]
    hostssl = [line for line in lines if line[0] == "hostssl"]
    assert hostssl and all(line[-1] == "scram-sha-256" for line in hostssl)
    assert not [line for line in lines if line[0] in ("host", "hostnossl")]
    server = pgfast_factory(data_dir)
    user = db_account().pw_name
    base = (f"host=127.0.0.1 port={server.port} dbname=postgres user={user} sslmode=verify-full "
            f"sslrootcert={os.path.join(data_dir, 'server.crt')} connect_timeout=10")
    right = psql(bindir, base + " channel_binding=require", "SELECT current_user", {**client_env,
                                                                                     "PGPASSWORD": "init-secret"})
    assert right.returncode == 0, right.stderr + server.log
    assert right.stdout.strip() == user
    wrong = psql(bindir, base, "SELECT 1", {**client_env, "PGPASSWORD": "wrong"})
    assert f'FATAL:  password authentication failed for user "{user}"' in wrong.stderr
    none = subprocess.run([os.path.join(bindir, "psql"), "-X", "-w", "-d", base, "-c", "SELECT 1"],
                          capture_output=True, text=True, timeout=30, env=client_env, stdin=subprocess.DEVNULL)
    assert none.returncode != 0
    assert "fe_sendauth: no password supplied" in none.stderr
    plain = psql(bindir, base.replace("sslmode=verify-full", "sslmode=disable"), "SELECT 1",
                 {**client_env, "PGPASSWORD": "init-secret"})
    assert (f'FATAL:  no pg_hba.conf entry for host "127.0.0.1", user "{user}", database "postgres", '
            "no encryption") in plain.stderr
    assert server.stop() == 0


# ---------------------------------------------------------------- every secret PostgreSQL accepts

def _postgres_scram_secret(password: bytes, iterations: int, salt: bytes) -> str:
    """What PostgreSQL stores for a password (scram_build_secret), for any iteration count
    and salt (PostgreSQL 16's scram_iterations goes below 4096)."""
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored = hashlib.sha256(client_key).digest()
    server = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = lambda b: base64.b64encode(b).decode()
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server)}"


@pytest.mark.parametrize("iterations,salt_length", [(100, 16), (4096, 8), (1, 1)])
@pytest.mark.parametrize("database", ["scramdb", "pwdb"])
def test_scram_secrets_below_rfc_minimums_work_as_in_postgresql(ecdsa, attempt, bindir, module_env,
                                                                 iterations, salt_length, database):
    role = f"low_{iterations}_{salt_length}_{database}"
    secret = _postgres_scram_secret(b"low-secret", iterations, bytes(range(salt_length)))
    result = psql(bindir, f"host={ecdsa.socket_dir} port={ecdsa.port} dbname=postgres user=postgres",
                  f"CREATE ROLE {role} LOGIN PASSWORD '{secret}'", module_env)
    assert result.returncode == 0, result.stderr
    # libpq: pure-Python SCRAM clients (scramp, so pg8000) refuse fewer than 4096 iterations themselves
    assert attempt(ecdsa, role, database, "low-secret", client="psql-env") == ok(role)
    assert_refused(attempt(ecdsa, role, database, "wrong", client="psql-env"), failed(role), "28P01")


def test_a_password_that_is_not_utf8_is_checked_as_its_bytes(ecdsa, bindir, module_env):
    """PostgreSQL uses the raw bytes when SASLprep cannot apply (here: not UTF-8)."""
    raw = b"caf\xe9-latin1"
    secret = _postgres_scram_secret(raw, 4096, bytes(16))
    result = psql(bindir, f"host={ecdsa.socket_dir} port={ecdsa.port} dbname=postgres user=postgres",
                  f"CREATE ROLE rawbytes LOGIN PASSWORD '{secret}'", module_env)
    assert result.returncode == 0, result.stderr
    for password, expected in ((raw, "R"), (b"cafe-latin1", "E")):
        client = RawClient(ecdsa)
        client.startup("rawbytes", "pwdb")
        msg_type, payload = client.read()
        assert (msg_type, payload[:4]) == (b"R", struct.pack("!i", AUTH_CLEARTEXT))
        client.send(message(b"p", password + b"\0"))
        assert client.read()[0] == expected.encode()
        client.close()
