"""Client certificates and pg_hba.conf, end to end: a real pgfast in front of a real
PostgreSQL 15, and real clients (psql/libpq with sslcert/sslkey/sslrootcert, asyncpg for
SQLSTATEs, psycopg, Python's ssl and `openssl s_client` where the TLS handshake itself is
the point).

Expected client messages were checked against a PostgreSQL 15.18 server configured the
same way (ssl on, the same pg_hba.conf lines): pgfast must answer what PostgreSQL answers.
The log's DETAIL for a client certificate that fails verification is PostgreSQL 16's
(15 logs the LOG line alone).

pgfast reads its configuration at start, so each configuration is one pgfast run. They
share one data directory (copying a cluster costs seconds, a restart a fraction of one)
and run one after the other; the tests are grouped by configuration:
  ca       ssl_ca_file + ssl_crl_file (CRLs of the root and the intermediate CA)
  legacy   root.crt + root.crl in the data directory, ssl_ca_file unset
  nocrl    ssl_ca_file, no CRL
  hba      no CA file at all; the pg_hba.conf rules
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import textwrap
import time
from dataclasses import dataclass

import asyncpg
import psycopg
import pytest

import certs
from conftest import Pgfast, chown_tree, db_account, free_port, psql_script

WHO = "SELECT current_user || '@' || current_database()"

SEED_SQL = """
CREATE ROLE alice LOGIN;
CREATE ROLE bob LOGIN;
CREATE ROLE carol LOGIN;
CREATE ROLE dave LOGIN;
CREATE ROLE u LOGIN;
CREATE ROLE first LOGIN;
CREATE ROLE localu LOGIN;
CREATE ROLE localrej LOGIN;
CREATE ROLE sslu LOGIN;
CREATE ROLE plainu LOGIN;
CREATE ROLE v6u LOGIN;
CREATE ROLE grp NOLOGIN;
CREATE ROLE gmid NOLOGIN IN ROLE grp;
CREATE ROLE gmember LOGIN IN ROLE grp;
CREATE ROLE gnested LOGIN IN ROLE gmid;
CREATE ROLE nonmember LOGIN;
CREATE ROLE latecomer LOGIN;
CREATE ROLE sales NOLOGIN;
CREATE ROLE sam LOGIN IN ROLE sales;
CREATE ROLE sue LOGIN;
CREATE ROLE fileuser LOGIN;
CREATE ROLE rep LOGIN REPLICATION;
CREATE ROLE physrep LOGIN REPLICATION;
""" + "".join(f"CREATE DATABASE {name};\n" for name in (
    # each costs a fraction of a second: where the database does not matter, lines
    # tell clients apart by user and they connect to "postgres"
    "certdb", "trustdb", "fulldb", "cadb", "mapdb", "listdb1", "filedb1", "sue", "sales", "logicaldb"))


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


IPV6 = has_ipv6_loopback()


# ---------------------------------------------------------------- certificates

@dataclass
class Pki:
    directory: str
    root: certs.CA
    inter: certs.CA
    foreign: certs.CA
    server: certs.Issued
    clients: dict[str, certs.Issued]

    @property
    def root_crt(self) -> str:
        return os.path.join(self.directory, "root.crt")

    def crt(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.crt")

    def key(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.key")

    def serial(self, name: str) -> int:
        return self.clients[name].cert.serial_number


@pytest.fixture(scope="module")
def pki(scratch_root) -> Pki:
    """Client files owned by the user running the tests, keys 0600 as libpq wants."""
    directory = tempfile.mkdtemp(prefix="access-pki-", dir=scratch_root)
    root = certs.CA("pgfast test CA")
    inter = root.intermediate("pgfast test intermediate CA")
    foreign = certs.CA("foreign CA")
    clients = {
        "alice": root.client_cert("alice"),
        "bob": root.client_cert("bob"),
        "expired": root.client_cert("alice", expired=True),
        "revoked": root.client_cert("alice"),
        "foreign": foreign.client_cert("alice"),
        "inter_alice": inter.client_cert("alice"),
        "dave_cert": root.client_cert("dave-cert"),
        "carol_ext": root.client_cert("carol.ext"),
        "mallory": root.client_cert("mallory"),
    }
    certs.write(os.path.join(directory, "root.crt"), root.cert_pem(), 0o644)
    for name, issued in clients.items():
        # the leaf alone, except inter_alice: leaf + intermediate in one sslcert file
        pem = issued.chain_pem() if name == "inter_alice" else issued.cert_pem()
        certs.write(os.path.join(directory, f"{name}.crt"), pem, 0o644)
        certs.write(os.path.join(directory, f"{name}.key"), issued.key_pem(), 0o600)
    # OpenSSL takes these and cryptography cannot parse them (an explicitly encoded default)
    for name, issuer in (("odd_alice", root), ("odd_foreign", foreign)):
        odd = issuer.client_cert_unparsable("alice")
        certs.write(os.path.join(directory, f"{name}.crt"), odd.chain_pem(), 0o644)
        certs.write(os.path.join(directory, f"{name}.key"), odd.key_pem(), 0o600)
    # the intermediate-signed leaf without its intermediate
    certs.write(os.path.join(directory, "inter_leaf_only.crt"), clients["inter_alice"].cert_pem(), 0o644)
    certs.write(os.path.join(directory, "inter_leaf_only.key"), clients["inter_alice"].key_pem(), 0o600)
    return Pki(directory, root, inter, foreign, root.server_cert(), clients)


# ---------------------------------------------------------------- configurations

CERT_HBA = """\
    local    all      postgres                   trust
    hostssl  certdb   all       127.0.0.1/32     cert
    hostssl  trustdb  all       127.0.0.1/32     trust
    hostssl  fulldb   all       127.0.0.1/32     trust clientcert=verify-full
    hostssl  cadb     all       127.0.0.1/32     trust clientcert=verify-ca
    hostssl  mapdb    all       127.0.0.1/32     cert map=certmap
"""
CERT_IDENT = """\
    # MAPNAME  SYSTEM-USERNAME   PG-USERNAME
    certmap    dave-cert         dave
    certmap    /^(.*)\\.ext$     \\1
"""
HBA_RULES = """\
    local     all              postgres                       trust
    # Unix-socket lines
    local     all              localu                         trust
    local     all              localrej                       reject
    # the first line that matches wins
    host      d                u           127.0.0.1/32       reject
    host      d                u           127.0.0.1/32       trust
    host      all              first       127.0.0.1/32       trust
    host      all              first       127.0.0.1/32       reject
    # lists, and lists from files
    host      listdb1,listdb2  u           127.0.0.1/32       trust
    host      @dbs.list        @users.list 127.0.0.1/32       trust
    # the connection's encryption
    hostssl   all              sslu        127.0.0.1/32       trust
    hostnossl all              plainu      127.0.0.1/32       trust
    # IPv6 loopback only
    host      all              v6u         ::1/128            trust
    # roles from the catalogs
    host      all              +grp        127.0.0.1/32       trust
    host      sameuser         all         127.0.0.1/32       trust
    host      samerole         all         127.0.0.1/32       trust
    # replication
    host      replication      physrep     127.0.0.1/32       trust
    host      logicaldb        rep         127.0.0.1/32       trust
    # PostgreSQL itself decides about roles and databases that do not exist
    host      postgres         x           127.0.0.1/32       trust
    host      nosuchdb         u           127.0.0.1/32       trust
    # a cert line, but this server has no CA file
    hostssl   all              alice       127.0.0.1/32       cert
"""


def configurations(pki: Pki) -> dict[str, dict]:
    revoking_root_crl = pki.root.crl(revoked=[pki.clients["revoked"]])
    return {
        "ca": dict(hba=CERT_HBA, ident=CERT_IDENT,
                   settings={"ssl_ca_file": "ca.crt", "ssl_crl_file": "crl.pem"},
                   files={"ca.crt": pki.root.cert_pem(), "crl.pem": revoking_root_crl + pki.inter.crl()}),
        "legacy": dict(hba=CERT_HBA, ident=CERT_IDENT, settings={},
                       files={"root.crt": pki.root.cert_pem(), "root.crl": revoking_root_crl}),
        "nocrl": dict(hba=CERT_HBA, ident=CERT_IDENT, settings={"ssl_ca_file": "ca.crt"},
                      files={"ca.crt": pki.root.cert_pem()}),
        "hba": dict(hba=HBA_RULES, ident="",
                    settings={"listen_addresses": "127.0.0.1,::1" if IPV6 else "127.0.0.1"},
                    files={"dbs.list": b"filedb1\nfiledb2  # comment\n", "users.list": b"fileuser\n"}),
    }


class Servers:
    """One data directory, one pgfast at a time, restarted when a test needs another
    configuration."""

    def __init__(self, data_dir: str, base: str, env: dict, configs: dict[str, dict]):
        self.data_dir = data_dir
        self.base = base
        self.env = env
        self.configs = configs
        self.managed = {name for config in configs.values() for name in config["files"]}
        self.name: str | None = None
        self.server: Pgfast | None = None

    def start(self, args: list[str] = ()) -> Pgfast:
        socket_dir = tempfile.mkdtemp(prefix="sock-", dir=self.base)
        os.chmod(socket_dir, 0o777)
        self.server = Pgfast(self.data_dir, free_port(), socket_dir, list(args), dict(self.env)).start()
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            assert self.server.stop() == 0, self.server.log
            self.server = None
            self.name = None

    def use(self, name: str) -> Pgfast:
        if self.name == name and self.server.process.poll() is None:
            return self.server
        self.stop()
        config = self.configs[name]
        for file in self.managed:       # root.crt / root.crl must not linger into other runs
            path = os.path.join(self.data_dir, file)
            if os.path.exists(path):
                os.unlink(path)
        files = {**config["files"], "pg_hba.conf": textwrap.dedent(config["hba"]).encode(),
                 "pg_ident.conf": textwrap.dedent(config["ident"]).encode()}
        for file, content in files.items():
            self._write(file, content, 0o644)
        args = ["-c", "ssl=on"]
        for setting, value in config["settings"].items():
            args += ["-c", f"{setting}={value}"]
        self.start(args)
        self.name = name
        return self.server

    def _write(self, name: str, content: bytes, mode: int) -> None:
        path = certs.write(os.path.join(self.data_dir, name), content, mode)
        if os.geteuid() == 0:
            os.chown(path, db_account().pw_uid, db_account().pw_gid)


@pytest.fixture(scope="module")
def servers(template_cluster, scratch_root, bindir, module_env, pki):
    """The session's initdb copied once, seeded with this module's roles and databases
    (through pgfast on initdb's own trust-only pg_hba.conf), with TLS files in place."""
    base = tempfile.mkdtemp(prefix="access-", dir=scratch_root)
    os.chmod(base, 0o755)
    data = os.path.join(base, "data")
    shutil.copytree(template_cluster, data, symlinks=True)
    os.chmod(data, 0o700)
    certs.write(os.path.join(data, "server.crt"), pki.server.chain_pem(), 0o644)
    certs.write(os.path.join(data, "server.key"), pki.server.key_pem(), 0o600)
    chown_tree(data)
    manager = Servers(data, base, module_env, configurations(pki))
    seeding = manager.start()
    try:
        result = psql_script(bindir, seeding, SEED_SQL, module_env)
        assert result.returncode == 0, result.stderr
    finally:
        manager.stop()
    yield manager
    manager.stop()


@pytest.fixture
def ca_server(servers) -> Pgfast:
    return servers.use("ca")


@pytest.fixture
def legacy_server(servers) -> Pgfast:
    return servers.use("legacy")


@pytest.fixture
def nocrl_server(servers) -> Pgfast:
    return servers.use("nocrl")


@pytest.fixture
def hba_server(servers) -> Pgfast:
    return servers.use("hba")


# ---------------------------------------------------------------- clients

@pytest.fixture(scope="module")
def client(bindir, pki, module_env):
    return Client(bindir, pki, module_env)


class Client:
    """psql (libpq 15) with a certificate by name from the Pki, or none."""

    def __init__(self, bindir: str, pki: Pki, env: dict):
        self.bindir = bindir
        self.pki = pki
        self.env = env

    def dsn(self, server: Pgfast, *, user: str, dbname: str, cert: str | None = None,
            sslmode: str = "verify-full", host: str = "127.0.0.1", **extra) -> str:
        params = {"host": host, "port": server.port, "dbname": dbname, "user": user,
                  "sslmode": sslmode, "connect_timeout": 10}
        if sslmode in ("verify-ca", "verify-full"):
            params["sslrootcert"] = self.pki.root_crt
        if cert is not None:
            params["sslcert"] = self.pki.crt(cert)
            params["sslkey"] = self.pki.key(cert)
        params.update(extra)
        return " ".join(f"{k}={v}" for k, v in params.items())

    def run(self, server: Pgfast, sql: str = WHO, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([os.path.join(self.bindir, "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                               "-d", self.dsn(server, **kw), "-c", sql],
                              capture_output=True, text=True, timeout=30, env=self.env,
                              stdin=subprocess.DEVNULL)

    def admitted(self, server: Pgfast, sql: str = WHO, **kw) -> str:
        result = self.run(server, sql, **kw)
        assert result.returncode == 0, f"refused: {result.stderr}\n{server.log[-3000:]}"
        return result.stdout.strip()

    def refused(self, server: Pgfast, **kw) -> str:
        """The whole of psql's complaint."""
        result = self.run(server, **kw)
        assert result.returncode != 0, f"admitted: {result.stdout}"
        return result.stderr

    def fatal(self, server: Pgfast, **kw) -> str:
        """The FATAL message the server sent, exactly."""
        stderr = self.refused(server, **kw)
        found = re.search(r"failed: FATAL:  (.*)", stderr)
        assert found, stderr
        return found.group(1)


def ssl_context(pki: Pki, cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.root_crt)
    if cert is not None:
        ctx.load_cert_chain(pki.crt(cert), pki.key(cert))
    return ctx


def asyncpg_error(server: Pgfast, *, user: str, database: str, ssl, host: str = "127.0.0.1"):
    """(sqlstate, message) of the server's refusal, through asyncpg; fails if admitted."""
    async def attempt():
        try:
            conn = await asyncpg.connect(host=host, port=server.port, user=user, database=database,
                                         ssl=ssl, timeout=10)
        except asyncpg.PostgresError as e:
            return e.sqlstate, e.message
        await conn.close()
        pytest.fail(f"{user}@{database} was admitted")
    return asyncio.run(attempt())


def wait_for_log(server: Pgfast, pattern: str, timeout: float = 5) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, server.log)
        if found or time.monotonic() > deadline:
            assert found, f"no {pattern!r} in the log:\n{server.log[-4000:]}"
            return found
        time.sleep(0.02)


# a line about a client names its address and port, as PostgreSQL's %r
LOG_PREFIX = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC \[\d+\] 127\.0\.0\.1\(\d+\) "


def assert_verify_failure_logged(server: Pgfast, pki: Pki, name: str, depth: int, reason: str,
                                 issuer: str) -> None:
    """PostgreSQL's LOG line and DETAIL for a client certificate that failed verification."""
    subject = pki.clients[name].cert.subject.rfc4514_string()     # CN=...
    detail = (f"Client certificate verification failed at depth {depth}: {reason}.\n"
              f'Failed certificate data (unverified): subject "/{subject}", '
              f'serial number {pki.serial(name)}, issuer "/CN={issuer}".')
    wait_for_log(server, LOG_PREFIX + re.escape("LOG:  could not accept SSL connection: certificate verify failed")
                 + "\n" + LOG_PREFIX + re.escape("DETAIL:  " + detail))


def tls_startup(server: Pgfast, ctx: ssl.SSLContext, user: str, database: str) -> tuple[str, dict[str, str]]:
    """SSLRequest, a full TLS handshake with Python's ssl, then a StartupMessage inside TLS.
    Returns the negotiated TLS version and the fields of the server's first answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(struct.pack("!ii", 8, 80877103))
        assert raw.recv(1) == b"S"
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            version = tls.version()     # the handshake is complete here
            body = f"user\0{user}\0database\0{database}\0\0".encode()
            tls.sendall(struct.pack("!ii", 8 + len(body), 196608) + body)
            data = b""
            while len(data) < 5 or len(data) < 1 + struct.unpack_from("!i", data, 1)[0]:
                chunk = tls.recv(65536)
                assert chunk, f"connection closed after {data!r}"
                data += chunk
    assert data[:1] == b"E", data
    length = struct.unpack_from("!i", data, 1)[0]
    fields = {part[:1].decode(): part[1:].decode() for part in data[5:1 + length].split(b"\0") if part}
    return version, fields


def s_client(server: Pgfast, *args: str) -> str:
    result = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}",
                             "-starttls", "postgres", "-msg", *args],
                            capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert "Verification" in output or "Cipher is" in output, output     # the handshake ran
    return output


# ================================================================ ssl_ca_file + ssl_crl_file

def test_certificate_whose_cn_is_the_user_is_accepted(client, ca_server):
    assert client.admitted(ca_server, user="alice", dbname="certdb", cert="alice") == "alice@certdb"
    assert client.admitted(ca_server, user="bob", dbname="certdb", cert="bob") == "bob@certdb"


def test_server_asks_for_certificates_of_its_ca(ca_server):
    output = s_client(ca_server)
    assert re.search(r"<<< TLS 1\.3, Handshake \[length [0-9a-f]+\], CertificateRequest", output), output
    assert "Acceptable client certificate CA names\nCN = pgfast test CA\n" in output, output


def test_cert_line_without_certificate(client, ca_server):
    assert client.fatal(ca_server, user="alice", dbname="certdb") == "connection requires a valid client certificate"


def test_no_certificate_completes_the_handshake_and_is_refused_inside_tls(ca_server, pki):
    logged_before = len(ca_server.log)
    version, fields = tls_startup(ca_server, ssl_context(pki), "alice", "certdb")
    assert version == "TLSv1.3"
    assert (fields["S"], fields["C"], fields["M"]) == \
        ("FATAL", "28000", "connection requires a valid client certificate")
    wait_for_log(ca_server, re.escape("FATAL:  connection requires a valid client certificate"))
    assert "could not accept SSL connection" not in ca_server.log[logged_before:]


def test_no_certificate_sqlstate_through_asyncpg(ca_server, pki):
    assert asyncpg_error(ca_server, user="alice", database="certdb", ssl=ssl_context(pki)) == \
        ("28000", "connection requires a valid client certificate")


def test_trust_line_without_clientcert_needs_no_certificate(client, ca_server):
    assert client.admitted(ca_server, user="bob", dbname="trustdb") == "bob@trustdb"
    assert client.admitted(ca_server, user="bob", dbname="trustdb", cert="alice") == "bob@trustdb"


def test_certificate_from_a_foreign_ca_fails_the_handshake(client, ca_server, pki):
    stderr = client.refused(ca_server, user="alice", dbname="trustdb", cert="foreign")
    assert "SSL error: tlsv1 alert unknown ca" in stderr, stderr
    assert "FATAL" not in stderr
    assert_verify_failure_logged(ca_server, pki, "foreign", 0, "unable to get local issuer certificate",
                                 "foreign CA")


def test_python_ssl_client_sees_the_unknown_ca_alert(ca_server, pki):
    with pytest.raises(ssl.SSLError) as caught:
        tls_startup(ca_server, ssl_context(pki, "foreign"), "alice", "trustdb")
    assert "TLSV1_ALERT_UNKNOWN_CA" in str(caught.value)


def test_expired_certificate_fails_the_handshake(client, ca_server, pki):
    stderr = client.refused(ca_server, user="alice", dbname="trustdb", cert="expired")
    assert "SSL error: sslv3 alert certificate expired" in stderr, stderr
    assert_verify_failure_logged(ca_server, pki, "expired", 0, "certificate has expired", "pgfast test CA")


def test_revoked_certificate_fails_with_ssl_crl_file(client, ca_server, pki):
    stderr = client.refused(ca_server, user="alice", dbname="trustdb", cert="revoked")
    assert "SSL error: sslv3 alert certificate revoked" in stderr, stderr
    assert_verify_failure_logged(ca_server, pki, "revoked", 0, "certificate revoked", "pgfast test CA")


def test_certificate_not_revoked_passes_with_the_crl_in_force(client, ca_server):
    assert client.admitted(ca_server, user="alice", dbname="trustdb", cert="alice") == "alice@trustdb"


def test_cert_method_cn_mismatch(client, ca_server):
    assert client.fatal(ca_server, user="bob", dbname="certdb", cert="alice") == \
        'certificate authentication failed for user "bob"'
    wait_for_log(ca_server, re.escape("provided user name (bob) and authenticated user name (alice) do not match"))


def test_cert_method_cn_mismatch_sqlstate(ca_server, pki):
    assert asyncpg_error(ca_server, user="bob", database="certdb", ssl=ssl_context(pki, "alice")) == \
        ("28000", 'certificate authentication failed for user "bob"')


def test_verify_full_accepts_the_matching_cn(client, ca_server):
    assert client.admitted(ca_server, user="alice", dbname="fulldb", cert="alice") == "alice@fulldb"


def test_verify_full_cn_mismatch(client, ca_server):
    # PostgreSQL 15 tells the client that the line's method failed, and logs why
    assert client.fatal(ca_server, user="bob", dbname="fulldb", cert="alice") == \
        '"trust" authentication failed for user "bob"'
    wait_for_log(ca_server, re.escape('LOG:  certificate validation (clientcert=verify-full) failed for user '
                                      '"bob": CN mismatch'))


def test_verify_full_without_certificate(client, ca_server):
    assert client.fatal(ca_server, user="alice", dbname="fulldb") == "connection requires a valid client certificate"


def test_verify_ca_accepts_any_user_with_a_valid_certificate(client, ca_server):
    assert client.admitted(ca_server, user="bob", dbname="cadb", cert="alice") == "bob@cadb"
    assert client.admitted(ca_server, user="carol", dbname="cadb", cert="mallory") == "carol@cadb"


def test_verify_ca_without_certificate(client, ca_server):
    assert client.fatal(ca_server, user="bob", dbname="cadb") == "connection requires a valid client certificate"


def test_map_exact_entry_admits_the_mapped_user(client, ca_server):
    assert client.admitted(ca_server, user="dave", dbname="mapdb", cert="dave_cert") == "dave@mapdb"


def test_map_regex_with_backreference_admits_the_mapped_user(client, ca_server):
    assert client.admitted(ca_server, user="carol", dbname="mapdb", cert="carol_ext") == "carol@mapdb"


@pytest.mark.parametrize("user, cert, cn", [
    ("dave", "mallory", "mallory"),        # no map line for this CN
    ("dave", "carol_ext", "carol.ext"),    # the regex maps carol.ext to carol only
    ("alice", "alice", "alice"),           # with a map, CN = user is not enough
])
def test_map_refuses_an_unmapped_user(client, ca_server, user, cert, cn):
    assert client.fatal(ca_server, user=user, dbname="mapdb", cert=cert) == \
        f'certificate authentication failed for user "{user}"'
    wait_for_log(ca_server, re.escape(f'no match in usermap "certmap" for user "{user}" authenticated as "{cn}"'))


def test_client_sends_leaf_and_intermediate_server_trusts_only_the_root(client, ca_server):
    # the CRL file holds the intermediate's CRL too: the whole chain is checked
    assert client.admitted(ca_server, user="alice", dbname="certdb", cert="inter_alice") == "alice@certdb"


def test_leaf_without_its_intermediate_fails(client, ca_server, pki):
    stderr = client.refused(ca_server, user="alice", dbname="certdb",
                            sslcert=os.path.join(pki.directory, "inter_leaf_only.crt"),
                            sslkey=os.path.join(pki.directory, "inter_leaf_only.key"))
    assert "SSL error: tlsv1 alert unknown ca" in stderr, stderr
    assert_verify_failure_logged(ca_server, pki, "inter_alice", 0, "unable to get local issuer certificate",
                                 "pgfast test intermediate CA")


# ================================================================ root.crt and root.crl, ssl_ca_file unset

def test_root_crt_certificate_accepted(client, legacy_server):
    assert client.admitted(legacy_server, user="alice", dbname="certdb", cert="alice") == "alice@certdb"
    assert client.admitted(legacy_server, user="bob", dbname="certdb", cert="bob") == "bob@certdb"


def test_root_crt_is_the_ca_the_server_names(legacy_server):
    output = s_client(legacy_server)
    assert "Acceptable client certificate CA names\nCN = pgfast test CA\n" in output, output


def test_root_crt_cert_line_without_certificate(client, legacy_server):
    assert client.fatal(legacy_server, user="alice", dbname="certdb") == \
        "connection requires a valid client certificate"
    assert client.admitted(legacy_server, user="alice", dbname="trustdb") == "alice@trustdb"


def test_root_crt_foreign_ca_fails_the_handshake(client, legacy_server, pki):
    stderr = client.refused(legacy_server, user="alice", dbname="trustdb", cert="foreign")
    assert "SSL error: tlsv1 alert unknown ca" in stderr, stderr
    assert_verify_failure_logged(legacy_server, pki, "foreign", 0, "unable to get local issuer certificate",
                                 "foreign CA")


def test_root_crl_revoked_certificate_fails(client, legacy_server, pki):
    stderr = client.refused(legacy_server, user="alice", dbname="trustdb", cert="revoked")
    assert "SSL error: sslv3 alert certificate revoked" in stderr, stderr
    assert_verify_failure_logged(legacy_server, pki, "revoked", 0, "certificate revoked", "pgfast test CA")


# ================================================================ ssl_ca_file without a CRL

def test_revoked_certificate_passes_without_a_crl(client, nocrl_server):
    assert client.admitted(nocrl_server, user="alice", dbname="certdb", cert="revoked") == "alice@certdb"


# ================================================================ no CA file

def test_without_ca_file_no_certificate_is_requested(hba_server):
    output = s_client(hba_server)
    assert "No client certificate CA names sent" in output, output
    assert "CertificateRequest" not in output, output


def test_without_ca_file_a_client_with_a_certificate_connects_on_a_trust_line(client, hba_server):
    assert client.admitted(hba_server, user="sslu", dbname="postgres", cert="alice") == "sslu@postgres"


def test_without_ca_file_cert_lines_cannot_be_satisfied(client, hba_server, pki):
    assert client.fatal(hba_server, user="alice", dbname="postgres", cert="alice") == \
        "client certificates can only be checked if a root certificate store is available"
    assert asyncpg_error(hba_server, user="alice", database="postgres", ssl=ssl_context(pki, "alice")) == \
        ("F0000", "client certificates can only be checked if a root certificate store is available")


# ================================================================ pg_hba.conf

def test_reject_line(client, hba_server):
    assert client.fatal(hba_server, user="u", dbname="d") == \
        'pg_hba.conf rejects connection for host "127.0.0.1", user "u", database "d", SSL encryption'
    assert client.fatal(hba_server, user="u", dbname="d", sslmode="disable") == \
        'pg_hba.conf rejects connection for host "127.0.0.1", user "u", database "d", no encryption'


def test_reject_sqlstate(hba_server):
    assert asyncpg_error(hba_server, user="u", database="d", ssl="disable") == \
        ("28000", 'pg_hba.conf rejects connection for host "127.0.0.1", user "u", database "d", no encryption')


def test_first_matching_line_wins(client, hba_server):
    # u on d: reject before trust; first: trust before reject
    assert client.fatal(hba_server, user="u", dbname="d").startswith("pg_hba.conf rejects connection")
    assert client.admitted(hba_server, user="first", dbname="postgres") == "first@postgres"


def test_no_matching_line_ssl(client, hba_server):
    assert client.fatal(hba_server, user="u", dbname="nomatch") == \
        'no pg_hba.conf entry for host "127.0.0.1", user "u", database "nomatch", SSL encryption'


def test_no_matching_line_without_encryption(client, hba_server):
    assert client.fatal(hba_server, user="u", dbname="nomatch", sslmode="disable") == \
        'no pg_hba.conf entry for host "127.0.0.1", user "u", database "nomatch", no encryption'


@pytest.mark.parametrize("encryption, tls", [("SSL encryption", True), ("no encryption", False)])
def test_no_matching_line_sqlstate(hba_server, pki, encryption, tls):
    assert asyncpg_error(hba_server, user="u", database="nomatch", ssl=ssl_context(pki) if tls else "disable") == \
        ("28000", f'no pg_hba.conf entry for host "127.0.0.1", user "u", database "nomatch", {encryption}')


def test_no_matching_line_through_psycopg(hba_server, client):
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(client.dsn(hba_server, user="u", dbname="nomatch", sslmode="disable"))
    assert 'FATAL:  no pg_hba.conf entry for host "127.0.0.1", user "u", database "nomatch", no encryption' \
        in str(caught.value)
    # libpq keeps the fields of an error during connection start-up to itself, so psycopg
    # 3.3 has no SQLSTATE to report here (asyncpg does, above)
    assert caught.value.sqlstate in (None, "28000")


def test_database_list(client, hba_server):
    assert client.admitted(hba_server, user="u", dbname="listdb1") == "u@listdb1"
    # listdb2 is on the line but does not exist: PostgreSQL itself says so
    assert client.fatal(hba_server, user="u", dbname="listdb2") == 'database "listdb2" does not exist'
    assert client.fatal(hba_server, user="u", dbname="listdb3") == \
        'no pg_hba.conf entry for host "127.0.0.1", user "u", database "listdb3", SSL encryption'


def test_at_file_lists(client, hba_server):
    assert client.admitted(hba_server, user="fileuser", dbname="filedb1") == "fileuser@filedb1"
    assert client.fatal(hba_server, user="fileuser", dbname="filedb2") == 'database "filedb2" does not exist'
    assert client.fatal(hba_server, user="u", dbname="filedb1") == \
        'no pg_hba.conf entry for host "127.0.0.1", user "u", database "filedb1", SSL encryption'
    assert client.fatal(hba_server, user="fileuser", dbname="listdb1") == \
        'no pg_hba.conf entry for host "127.0.0.1", user "fileuser", database "listdb1", SSL encryption'


def test_sameuser(client, hba_server):
    assert client.admitted(hba_server, user="sue", dbname="sue") == "sue@sue"
    assert client.fatal(hba_server, user="u", dbname="sue") == \
        'no pg_hba.conf entry for host "127.0.0.1", user "u", database "sue", SSL encryption'


def test_samerole(client, hba_server):
    assert client.admitted(hba_server, user="sam", dbname="sales") == "sam@sales"
    assert client.fatal(hba_server, user="u", dbname="sales") == \
        'no pg_hba.conf entry for host "127.0.0.1", user "u", database "sales", SSL encryption'


def test_group_membership_direct_and_indirect(client, hba_server):
    assert client.admitted(hba_server, user="gmember", dbname="postgres") == "gmember@postgres"
    assert client.admitted(hba_server, user="gnested", dbname="postgres") == "gnested@postgres"
    assert client.fatal(hba_server, user="nonmember", dbname="postgres") == \
        'no pg_hba.conf entry for host "127.0.0.1", user "nonmember", database "postgres", SSL encryption'


def test_group_membership_granted_later_is_seen_at_the_next_login(client, hba_server, bindir, module_env):
    assert client.fatal(hba_server, user="latecomer", dbname="postgres").startswith("no pg_hba.conf entry")
    grant = subprocess.run([os.path.join(bindir, "psql"), "-X", "-v", "ON_ERROR_STOP=1",
                            "-h", hba_server.socket_dir, "-p", str(hba_server.port), "-U", "postgres",
                            "-d", "postgres", "-c", "GRANT grp TO latecomer"],
                           capture_output=True, text=True, timeout=30, env=module_env)
    assert grant.returncode == 0, grant.stderr
    assert client.admitted(hba_server, user="latecomer", dbname="postgres") == "latecomer@postgres"


def test_hostssl_and_hostnossl(client, hba_server):
    assert client.admitted(hba_server, user="sslu", dbname="postgres") == "sslu@postgres"
    assert client.fatal(hba_server, user="sslu", dbname="postgres", sslmode="disable") == \
        'no pg_hba.conf entry for host "127.0.0.1", user "sslu", database "postgres", no encryption'
    assert client.admitted(hba_server, user="plainu", dbname="postgres", sslmode="disable") == "plainu@postgres"
    assert client.fatal(hba_server, user="plainu", dbname="postgres") == \
        'no pg_hba.conf entry for host "127.0.0.1", user "plainu", database "postgres", SSL encryption'


def test_encryption_as_psycopg_sees_it(client, hba_server):
    with psycopg.connect(client.dsn(hba_server, user="sslu", dbname="postgres")) as conn:
        assert conn.pgconn.ssl_in_use
    with psycopg.connect(client.dsn(hba_server, user="plainu", dbname="postgres", sslmode="disable")) as conn:
        assert not conn.pgconn.ssl_in_use


@pytest.mark.skipif(not IPV6, reason="no IPv6 loopback on this machine")
def test_ipv6_loopback(client, hba_server):
    assert client.admitted(hba_server, user="v6u", dbname="postgres", host="::1") == "v6u@postgres"
    assert client.fatal(hba_server, user="v6u", dbname="postgres") == \
        'no pg_hba.conf entry for host "127.0.0.1", user "v6u", database "postgres", SSL encryption'
    assert client.fatal(hba_server, user="first", dbname="postgres", host="::1") == \
        'no pg_hba.conf entry for host "::1", user "first", database "postgres", SSL encryption'


def test_local_lines_on_the_unix_socket(client, hba_server):
    sock = hba_server.socket_dir
    assert client.admitted(hba_server, user="localu", dbname="postgres", host=sock, sslmode="disable") == \
        "localu@postgres"
    assert client.fatal(hba_server, user="localrej", dbname="postgres", host=sock, sslmode="disable") == \
        'pg_hba.conf rejects connection for host "[local]", user "localrej", database "postgres", no encryption'
    assert client.fatal(hba_server, user="first", dbname="postgres", host=sock, sslmode="disable") == \
        'no pg_hba.conf entry for host "[local]", user "first", database "postgres", no encryption'
    # and local lines never match TCP
    assert client.fatal(hba_server, user="localu", dbname="postgres") == \
        'no pg_hba.conf entry for host "127.0.0.1", user "localu", database "postgres", SSL encryption'


def test_physical_replication_matches_only_the_replication_keyword(client, hba_server):
    row = client.admitted(hba_server, "IDENTIFY_SYSTEM", user="physrep", dbname="postgres", replication="true")
    systemid, timeline, _position, dbname = row.split("|")
    assert systemid.isdigit() and timeline == "1" and dbname == ""
    # rep's line names logicaldb, which a physical connection never matches
    assert client.fatal(hba_server, user="rep", dbname="logicaldb", replication="true") == \
        'no pg_hba.conf entry for replication connection from host "127.0.0.1", user "rep", SSL encryption'


def test_logical_replication_matches_by_database(client, hba_server):
    row = client.admitted(hba_server, "IDENTIFY_SYSTEM", user="rep", dbname="logicaldb", replication="database")
    assert row.split("|")[3] == "logicaldb"
    # physrep's only line is the replication keyword, which a logical connection never matches
    assert client.fatal(hba_server, user="physrep", dbname="logicaldb", replication="database") == \
        'no pg_hba.conf entry for host "127.0.0.1", user "physrep", database "logicaldb", SSL encryption'


def test_role_that_does_not_exist(client, hba_server):
    assert client.fatal(hba_server, user="x", dbname="postgres") == 'role "x" does not exist'
    assert asyncpg_error(hba_server, user="x", database="postgres", ssl="disable") == \
        ("28000", 'role "x" does not exist')


def test_database_that_does_not_exist(client, hba_server):
    assert client.fatal(hba_server, user="u", dbname="nosuchdb") == 'database "nosuchdb" does not exist'
    assert asyncpg_error(hba_server, user="u", database="nosuchdb", ssl="disable") == \
        ("3D000", 'database "nosuchdb" does not exist')


def test_certificate_only_openssl_can_parse_authenticates(client, ca_server):
    """pgfast reads client certificates through OpenSSL alone, so what OpenSSL verified is
    what pg_hba sees, whatever cryptography thinks of its encoding."""
    assert client.admitted(ca_server, user="alice", dbname="certdb", cert="odd_alice") == "alice@certdb"


def test_untrusted_certificate_only_openssl_can_parse_is_refused_with_its_detail(client, ca_server):
    assert "alert unknown ca" in client.refused(ca_server, user="alice", dbname="trustdb", cert="odd_foreign")
    wait_for_log(ca_server, LOG_PREFIX + re.escape("LOG:  could not accept SSL connection: certificate verify failed")
                 + "\n" + LOG_PREFIX + re.escape("DETAIL:  Client certificate verification failed at depth 0: "
                                                 "unable to get local issuer certificate.") + "\n"
                 + re.escape('Failed certificate data (unverified): subject "/CN=alice", serial number ')
                 + r"\d+" + re.escape(', issuer "/CN=foreign CA".'))
    assert client.admitted(ca_server, user="alice", dbname="certdb", cert="alice") == "alice@certdb"
