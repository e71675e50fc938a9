"""pgfast.tls and pgfast.selfsigned: start-up checks worded as PostgreSQL's, and handshakes
in memory between ServerTLS connections and pyOpenSSL / Python ssl clients."""
from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pexpect
import pytest
from cryptography import x509
from cryptography.hazmat.bindings.openssl.binding import Binding
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto

import certs
from pgfast.config import PGFAST_SETTINGS, Settings
from pgfast.errors import TLSSetupError
from pgfast.selfsigned import write_self_signed
from pgfast.tls import TLSSession, load_server_tls

REPO = Path(__file__).resolve().parent.parent
ME = os.geteuid()       # owns the files the tests write, so it is the database user by default
ROOT_UID = 0
DB_UID = 1000           # an ordinary database user, for tests run as root (root reads any file)
OTHER_UID = 2000
requires_root = pytest.mark.skipif(ME != 0, reason="gives files to other users")
PASSPHRASE = b"correct horse"
_lib = Binding().lib

PERMISSIONS_DETAIL = ("File must have permissions u=rw (0600) or less if owned by the database user, "
                      "or permissions u=rw,g=r (0640) or less if owned by root.")


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def ca() -> certs.CA:
    return certs.CA("pgfast test CA")


@pytest.fixture(scope="module")
def server_cert(ca) -> certs.Issued:
    return ca.server_cert()


@pytest.fixture
def data_dir(tmp_path, server_cert) -> Path:
    """A data directory holding server.crt and a 0600 server.key."""
    certs.write(tmp_path / "server.crt", server_cert.chain_pem(), 0o644)
    certs.write(tmp_path / "server.key", server_cert.key_pem())
    return tmp_path


def make_settings(data_dir: Path, **overrides) -> Settings:
    """Settings as the loader would build them for data_dir, PostgreSQL's defaults otherwise."""
    defaults = dict(
        data_dir=str(data_dir), listen_addresses=("localhost",), port=5432, max_connections=100,
        unix_socket_directories=("/tmp",), ssl=True,
        ssl_cert_file=str(data_dir / "server.crt"), ssl_key_file=str(data_dir / "server.key"),
        ssl_ca_file=None, ssl_crl_file=None, ssl_crl_dir=None,
        ssl_ciphers="HIGH:MEDIUM:+3DES:!aNULL", ssl_min_protocol_version="TLSv1.2",
        ssl_max_protocol_version="", ssl_ecdh_curve=None, ssl_prefer_server_ciphers=True,
        ssl_passphrase_command="", ssl_passphrase_command_supports_reload=False,
        hba_file=str(data_dir / "pg_hba.conf"), ident_file=str(data_dir / "pg_ident.conf"),
        authentication_timeout=60.0,
        pgfast={name: default for name, (_, default) in PGFAST_SETTINGS.items()},
    )
    defaults.update(overrides)
    return Settings(**defaults)


def load(data_dir: Path, *, db_uid: int = ME, interactive: bool = False, **overrides):
    return load_server_tls(make_settings(data_dir, **overrides), db_uid=db_uid, interactive=interactive)


def startup_error(data_dir: Path, **kwargs) -> TLSSetupError:
    with pytest.raises(TLSSetupError) as caught:
        load(data_dir, **kwargs)
    return caught.value


def client_connection(*, issued: certs.Issued | certs.OddIssued | None = None, alpn: list[bytes] | None = None,
                      curves: bytes | None = None, max_version: int | None = None,
                      ciphers: bytes | None = None) -> SSL.Connection:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if isinstance(issued, certs.OddIssued):    # not loadable by cryptography: through OpenSSL alone
        ctx.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, issued.chain_pem()))
        ctx.use_privatekey(issued.key)
    elif issued is not None:
        ctx.use_certificate(issued.cert)
        for intermediate in issued.chain:
            ctx.add_extra_chain_cert(intermediate)
        ctx.use_privatekey(issued.key)
    if alpn is not None:
        ctx.set_alpn_protos(alpn)
    if curves is not None:
        assert _lib.SSL_CTX_set1_curves_list(ctx._context, curves) == 1
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    if ciphers is not None:
        ctx.set_cipher_list(ciphers)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    return conn


@dataclasses.dataclass
class Outcome:
    server_error: Exception | None
    client_error: Exception | None
    client_flights: int      # how many times the client had to send: 2 for a TLS 1.3 handshake without HRR


def handshake(server: TLSSession | SSL.Connection, client: SSL.Connection) -> Outcome:
    """Run the handshake over the two connections' memory BIOs until neither side can progress.

    A TLS 1.3 client finishes before the server has checked its certificate, so it only
    sees the server's alert when it next reads: that read is part of the outcome.
    """
    if isinstance(server, TLSSession):
        server = server.connection     # driven by pyOpenSSL here; the callbacks report to the session
    errors: dict[SSL.Connection, Exception | None] = {server: None, client: None}
    finished: set[SSL.Connection] = set()
    flights = 0
    for _ in range(20):
        for side in (client, server):
            if side in finished or errors[side]:
                continue
            try:
                side.do_handshake()
                finished.add(side)
            except SSL.WantReadError:
                pass
            except SSL.Error as e:
                errors[side] = e
        sent_by_client, sent_by_server = _move(client, server), _move(server, client)
        flights += bool(sent_by_client)
        if not (sent_by_client or sent_by_server):
            break
    if client in finished and errors[server]:
        try:
            client.recv(1)
        except SSL.Error as e:
            errors[client] = e
    return Outcome(errors[server], errors[client], flights)


def _move(source: SSL.Connection, destination: SSL.Connection) -> bytes:
    try:
        data = source.bio_read(1 << 20)
    except SSL.WantReadError:
        return b""
    destination.bio_write(data)
    return data


def reasons(error: Exception | None) -> str:
    return repr(error.args) if error else ""


# ---------------------------------------------------------------- start-up checks, in PostgreSQL's order

def test_loads_and_needs_no_client_certificate_without_ca(data_dir):
    tls = load(data_dir)
    assert not tls.default.requests_client_cert


def test_missing_certificate(data_dir):
    os.unlink(data_dir / "server.crt")
    error = startup_error(data_dir)
    assert error.message == 'could not load server certificate file "server.crt": No such file or directory'


def test_missing_certificate_is_reported_before_a_missing_key(data_dir):
    os.unlink(data_dir / "server.crt")
    os.unlink(data_dir / "server.key")
    assert startup_error(data_dir).message.startswith("could not load server certificate file")


def test_file_outside_data_dir_is_named_by_absolute_path(data_dir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "server.crt"
    error = startup_error(data_dir, ssl_cert_file=str(elsewhere))
    assert error.message == f'could not load server certificate file "{elsewhere}": No such file or directory'


def test_file_in_data_dir_subdirectory_is_named_relative(data_dir):
    error = startup_error(data_dir, ssl_cert_file=str(data_dir / "tls" / "server.crt"))
    assert error.message == 'could not load server certificate file "tls/server.crt": No such file or directory'


def test_certificate_file_without_certificate(data_dir):
    certs.write(data_dir / "server.crt", b"not a certificate\n")
    assert startup_error(data_dir).message == 'could not load server certificate file "server.crt": no start line'


def test_missing_key(data_dir):
    os.unlink(data_dir / "server.key")
    error = startup_error(data_dir)
    assert error.message == 'could not access private key file "server.key": No such file or directory'


def test_key_that_is_not_a_regular_file(data_dir):
    os.unlink(data_dir / "server.key")
    os.mkdir(data_dir / "server.key", 0o700)
    assert startup_error(data_dir).message == 'private key file "server.key" is not a regular file'


@requires_root
@pytest.mark.parametrize("owner, mode, accepted", [
    (DB_UID, 0o600, True),
    (DB_UID, 0o400, True),
    (DB_UID, 0o640, False),
    (DB_UID, 0o604, False),
    (DB_UID, 0o610, False),
    (ROOT_UID, 0o600, True),
    (ROOT_UID, 0o640, True),      # root may share the key with the database user's group
    (ROOT_UID, 0o660, False),
    (ROOT_UID, 0o650, False),
    (ROOT_UID, 0o644, False),
])
def test_key_permissions(data_dir, owner, mode, accepted):
    os.chown(data_dir / "server.key", owner, -1)
    os.chmod(data_dir / "server.key", mode)
    if accepted:
        load(data_dir, db_uid=DB_UID)
    else:
        error = startup_error(data_dir, db_uid=DB_UID)
        assert error.message == 'private key file "server.key" has group or world access'
        assert error.detail == PERMISSIONS_DETAIL


@requires_root
def test_key_owned_by_someone_else(data_dir):
    os.chown(data_dir / "server.key", OTHER_UID, -1)
    error = startup_error(data_dir, db_uid=DB_UID)
    assert error.message == 'private key file "server.key" must be owned by the database user or root'


def test_key_of_another_certificate(data_dir, ca):
    certs.write(data_dir / "server.key", ca.server_cert().key_pem())
    assert startup_error(data_dir).message == 'could not load private key file "server.key": key values mismatch'


def test_key_file_without_key(data_dir):
    certs.write(data_dir / "server.key", b"not a key\n")
    assert startup_error(data_dir).message.startswith('could not load private key file "server.key": ')


def test_missing_ca_file(data_dir):
    error = startup_error(data_dir, ssl_ca_file=str(data_dir / "root.crt"))
    assert error.message == 'could not load root certificate file "root.crt": No such file or directory'


def test_ca_file_without_certificates(data_dir):
    certs.write(data_dir / "root.crt", b"nothing here\n")
    error = startup_error(data_dir, ssl_ca_file=str(data_dir / "root.crt"))
    assert error.message == 'could not load root certificate file "root.crt": no certificate or crl found'


def test_missing_crl_file(data_dir):
    error = startup_error(data_dir, ssl_crl_file=str(data_dir / "root.crl"))
    assert error.message == ('could not load SSL certificate revocation list file "root.crl": '
                             "No such file or directory")


def test_missing_crl_file_with_crl_dir(data_dir):
    error = startup_error(data_dir, ssl_crl_file=str(data_dir / "root.crl"), ssl_crl_dir=str(data_dir / "crl"))
    assert error.message == ('could not load SSL certificate revocation list file "root.crl" or directory '
                             '"crl": No such file or directory')


def test_protocol_minimum_above_maximum(data_dir):
    error = startup_error(data_dir, ssl_min_protocol_version="TLSv1.3", ssl_max_protocol_version="TLSv1.2")
    assert error.message == "could not set SSL protocol version range"
    assert error.detail == '"ssl_min_protocol_version" cannot be higher than "ssl_max_protocol_version"'


def test_unknown_protocol_version(data_dir):
    error = startup_error(data_dir, ssl_max_protocol_version="TLSv9")
    assert error.message == 'invalid value for parameter "ssl_max_protocol_version": "TLSv9"'


def test_no_valid_ciphers(data_dir):
    error = startup_error(data_dir, ssl_ciphers="NO-SUCH-CIPHER")
    assert error.message == "could not set the cipher list (no valid ciphers available)"


def test_unknown_curve(data_dir):
    assert startup_error(data_dir, ssl_ecdh_curve="bogus").message == "ECDH: unrecognized curve name: bogus"


@pytest.mark.parametrize("broken, first_reported", [
    (dict(ssl_ca_file="/nonexistent/root.crt", ssl_ciphers="NO-SUCH-CIPHER"), "could not set the cipher list"),
    (dict(ssl_ciphers="NO-SUCH-CIPHER", ssl_ecdh_curve="bogus"), "ECDH: unrecognized curve name"),
    (dict(ssl_ecdh_curve="bogus", ssl_max_protocol_version="TLSv1.1"), "could not set SSL protocol version range"),
    (dict(ssl_crl_file="/nonexistent/root.crl", ssl_ca_file="/nonexistent/root.crt"),
     "could not load root certificate file"),
])
def test_failures_are_reported_in_postgresql_order(data_dir, broken, first_reported):
    assert startup_error(data_dir, **broken).message.startswith(first_reported)


def test_bad_key_is_reported_before_bad_settings(data_dir):
    certs.write(data_dir / "server.key", b"not a key\n", 0o644)
    error = startup_error(data_dir, ssl_ciphers="NO-SUCH-CIPHER")
    assert error.message == 'private key file "server.key" has group or world access'


# ---------------------------------------------------------------- passphrases

@pytest.fixture
def encrypted_key_dir(data_dir, server_cert) -> Path:
    certs.write(data_dir / "server.key", server_cert.key_pem(PASSPHRASE))
    return data_dir


def test_passphrase_from_command(encrypted_key_dir):
    load(encrypted_key_dir, ssl_passphrase_command=f"echo '{PASSPHRASE.decode()}'")


def test_passphrase_is_the_first_line_of_the_output(encrypted_key_dir):
    load(encrypted_key_dir, ssl_passphrase_command=f"printf '{PASSPHRASE.decode()}\\r\\nsomething else\\n'")


def test_wrong_passphrase_from_command(encrypted_key_dir):
    error = startup_error(encrypted_key_dir, ssl_passphrase_command="echo wrong")
    assert error.message == 'could not load private key file "server.key": bad decrypt'


def test_failing_passphrase_command(encrypted_key_dir):
    error = startup_error(encrypted_key_dir, ssl_passphrase_command="echo %p; exit 3")
    assert error.message == 'command "echo Enter PEM pass phrase:; exit 3" failed'
    assert error.detail == "child process exited with exit code 3"


def test_passphrase_command_not_found(encrypted_key_dir):
    error = startup_error(encrypted_key_dir, ssl_passphrase_command="/nonexistent/askpass")
    assert error.detail == "command not found"


def test_passphrase_command_killed_by_signal(encrypted_key_dir):
    error = startup_error(encrypted_key_dir, ssl_passphrase_command="kill -TERM $$")
    assert error.detail == "child process was terminated by signal 15: Terminated"


def test_passphrase_command_placeholders(encrypted_key_dir, tmp_path):
    seen = tmp_path / "seen"
    load(encrypted_key_dir,
         ssl_passphrase_command=f"printf '%s|' \"%p\" 100%% %q >{seen}; echo '{PASSPHRASE.decode()}'")
    assert seen.read_text() == "Enter PEM pass phrase:|100%|%q|"


def test_passphrase_command_is_not_run_for_an_unencrypted_key(data_dir, tmp_path):
    ran = tmp_path / "ran"
    load(data_dir, ssl_passphrase_command=f"touch {ran}; echo x")
    assert not ran.exists()


def test_encrypted_key_without_terminal_or_command_fails_at_once(encrypted_key_dir):
    started = time.monotonic()
    error = startup_error(encrypted_key_dir, interactive=False)
    assert time.monotonic() - started < 5
    assert error.message == ('private key file "server.key" requires a passphrase, but there is no '
                             "terminal to enter it on and ssl_passphrase_command is not set")
    assert "ssl_passphrase_command" in error.hint


def test_unencrypted_key_never_prompts(data_dir, monkeypatch):
    monkeypatch.setattr("getpass.getpass", lambda prompt: pytest.fail("prompted for a passphrase"))
    load(data_dir, interactive=True)


_PROMPTING_SCRIPT = textwrap.dedent("""\
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    from pgfast.config import Settings
    from pgfast.errors import TLSSetupError
    from pgfast.tls import load_server_tls
    settings = Settings(**json.loads(sys.argv[2]))
    try:
        load_server_tls(settings, db_uid=os.geteuid(), interactive=sys.stdin.isatty())
    except TLSSetupError as e:
        print("FATAL:", e.message)
    else:
        print("LOADED")
""")


def spawn_prompting_load(tmp_path: Path, data_dir: Path) -> pexpect.spawn:
    script = tmp_path / "prompting_load.py"
    script.write_text(_PROMPTING_SCRIPT)
    settings = json.dumps(dataclasses.asdict(make_settings(data_dir)))
    return pexpect.spawn(sys.executable, [str(script), str(REPO), settings], timeout=30, encoding="utf-8")


def test_passphrase_prompt_on_terminal(encrypted_key_dir, tmp_path):
    child = spawn_prompting_load(tmp_path, encrypted_key_dir)
    child.expect_exact("Enter PEM pass phrase:")
    child.sendline(PASSPHRASE.decode())
    child.expect_exact("LOADED")
    assert PASSPHRASE.decode() not in child.before     # not echoed
    child.expect(pexpect.EOF)


def test_end_of_file_at_the_passphrase_prompt(encrypted_key_dir, tmp_path):
    child = spawn_prompting_load(tmp_path, encrypted_key_dir)
    child.expect_exact("Enter PEM pass phrase:")
    child.sendeof()
    child.expect_exact('FATAL: could not load private key file "server.key": ')
    child.expect(pexpect.EOF)


def test_wrong_passphrase_on_terminal(encrypted_key_dir, tmp_path):
    child = spawn_prompting_load(tmp_path, encrypted_key_dir)
    child.expect_exact("Enter PEM pass phrase:")
    child.sendline("wrong")
    child.expect_exact('FATAL: could not load private key file "server.key": bad decrypt')
    child.expect(pexpect.EOF)


# ---------------------------------------------------------------- handshakes: options, protocols, groups

def test_session_resumption_compression_and_renegotiation_are_off(data_dir):
    tls = load(data_dir)
    options = tls.new_session().connection.set_options(0)
    for option in (SSL.OP_NO_TICKET, SSL.OP_NO_COMPRESSION, SSL.OP_NO_RENEGOTIATION,
                   SSL.OP_CIPHER_SERVER_PREFERENCE):
        assert options & option
    assert tls.default.context.get_session_cache_mode() == SSL.SESS_CACHE_OFF


def resumed(new_server_connection) -> bool:
    """Whether a client reconnecting with its first session resumes it."""
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    first_server, first_client = new_server_connection(), SSL.Connection(client_ctx, None)
    first_client.set_connect_state()
    handshake(first_server, first_client)
    first_server.send(b"x")
    _move(first_server, first_client)
    assert first_client.recv(1) == b"x"        # the client has read any session tickets too
    server, client = new_server_connection(), SSL.Connection(client_ctx, None)
    client.set_connect_state()
    client.set_session(first_client.get_session())
    assert handshake(server, client).server_error is None
    return bool(_lib.SSL_session_reused(server._ssl))


def test_sessions_are_never_resumed(data_dir):
    tls = load(data_dir)
    assert not resumed(lambda: tls.new_session().connection)


def test_sessions_would_be_resumed_by_openssl_defaults(data_dir):
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(str(data_dir / "server.crt"))
    ctx.use_privatekey_file(str(data_dir / "server.key"))
    def new_connection():
        conn = SSL.Connection(ctx, None)
        conn.set_accept_state()
        return conn
    assert resumed(new_connection)


def test_protocol_versions_ignore_case(data_dir):
    server = load(data_dir, ssl_min_protocol_version="tlsv1", ssl_max_protocol_version="TLSV1.2").new_session()
    assert handshake(server, client_connection()).server_error is None
    assert server.connection.get_protocol_version_name() == "TLSv1.2"


def test_client_cipher_preference_when_asked(data_dir):
    options = load(data_dir, ssl_prefer_server_ciphers=False).new_session().connection.set_options(0)
    assert not options & SSL.OP_CIPHER_SERVER_PREFERENCE


def test_handshake_without_client_certificate_request(data_dir, ca):
    tls = load(data_dir)
    server = tls.new_session()
    client = client_connection(issued=ca.client_cert("alice"))
    outcome = handshake(server, client)
    assert outcome.server_error is None and outcome.client_error is None
    assert client.get_client_ca_list() == []       # no CertificateRequest was sent
    assert server.peer_cn() is None
    assert server.connection.get_protocol_version_name() == "TLSv1.3"


def test_default_groups_take_x25519_without_hello_retry(data_dir):
    server = load(data_dir).new_session()
    outcome = handshake(server, client_connection(curves=b"X25519:prime256v1"))
    assert outcome.server_error is None
    assert server.connection.get_group_name() == "x25519"
    assert outcome.client_flights == 2


def test_prime256v1_only_costs_a_hello_retry(data_dir):
    server = load(data_dir, ssl_ecdh_curve="prime256v1").new_session()
    outcome = handshake(server, client_connection(curves=b"X25519:prime256v1"))
    assert outcome.server_error is None
    assert server.connection.get_group_name() == "secp256r1"
    assert outcome.client_flights == 3


def test_configured_groups_are_enforced(data_dir):
    server = load(data_dir, ssl_ecdh_curve="prime256v1").new_session()
    assert handshake(server, client_connection(curves=b"X25519")).server_error is not None


def test_maximum_protocol_version(data_dir):
    server = load(data_dir, ssl_max_protocol_version="TLSv1.2").new_session()
    assert handshake(server, client_connection()).server_error is None
    assert server.connection.get_protocol_version_name() == "TLSv1.2"


def test_minimum_protocol_version(data_dir):
    server = load(data_dir, ssl_min_protocol_version="TLSv1.3").new_session()
    outcome = handshake(server, client_connection(max_version=SSL.TLS1_2_VERSION))
    assert "unsupported protocol" in reasons(outcome.server_error)


def test_dhe_key_exchange_for_tls12_clients(tmp_path, ca):
    rsa_server = ca.server_cert(key_type="rsa")
    certs.write(tmp_path / "server.crt", rsa_server.chain_pem(), 0o644)
    certs.write(tmp_path / "server.key", rsa_server.key_pem())
    server = load(tmp_path).new_session()
    # a client naming no FFDHE group leaves the DH group to the server (RFC 7919): PostgreSQL's
    client = client_connection(max_version=SSL.TLS1_2_VERSION, ciphers=b"DHE-RSA-AES256-GCM-SHA384",
                               curves=b"X25519:prime256v1")
    assert handshake(server, client).server_error is None
    assert server.connection.get_cipher_name() == "DHE-RSA-AES256-GCM-SHA384"


# ---------------------------------------------------------------- handshakes: ALPN

@pytest.mark.parametrize("offered", [[b"postgresql"], [b"http/1.1", b"postgresql"]])
def test_alpn_postgresql_is_chosen(data_dir, offered):
    server = load(data_dir).new_session()
    assert handshake(server, client_connection(alpn=offered)).server_error is None
    assert server.alpn() == b"postgresql"


def test_no_alpn_offered_is_left_to_the_caller(data_dir):
    server = load(data_dir).new_session()
    assert handshake(server, client_connection()).server_error is None
    assert server.alpn() is None


def test_other_alpn_gets_no_application_protocol_alert(data_dir):
    server = load(data_dir).new_session()
    outcome = handshake(server, client_connection(alpn=[b"http/1.1"]))
    assert "no application protocol" in reasons(outcome.server_error)
    assert "alert no application protocol" in reasons(outcome.client_error)


# ---------------------------------------------------------------- handshakes: client certificates

@pytest.fixture
def ca_dir(data_dir, ca) -> Path:
    certs.write(data_dir / "root.crt", ca.cert_pem(), 0o644)
    return data_dir


def load_with_ca(ca_dir: Path, **overrides):
    return load(ca_dir, ssl_ca_file=str(ca_dir / "root.crt"), **overrides)


def test_client_certificate_accepted(ca_dir, ca):
    tls = load_with_ca(ca_dir)
    assert tls.default.requests_client_cert
    server, client = tls.new_session(), client_connection(issued=ca.client_cert("alice"))
    outcome = handshake(server, client)
    assert outcome.server_error is None and outcome.client_error is None
    assert [name.CN for name in client.get_client_ca_list()] == ["pgfast test CA"]
    assert server.peer_cn() == "alice"
    assert server.verify_failure_detail() is None


def test_no_client_certificate_still_completes(ca_dir):
    server = load_with_ca(ca_dir).new_session()
    outcome = handshake(server, client_connection())
    assert outcome.server_error is None and outcome.client_error is None
    assert server.peer_cn() is None
    assert server.verify_failure_detail() is None


def test_client_certificate_from_foreign_ca(ca_dir):
    foreign = certs.CA("foreign CA").client_cert("mallory")
    server = load_with_ca(ca_dir).new_session()
    outcome = handshake(server, client_connection(issued=foreign))
    assert "certificate verify failed" in reasons(outcome.server_error)
    assert outcome.client_error is not None
    assert server.verify_failure_detail() == (
        "Client certificate verification failed at depth 0: unable to get local issuer certificate.\n"
        f'Failed certificate data (unverified): subject "/CN=mallory", '
        f'serial number {foreign.cert.serial_number}, issuer "/CN=foreign CA".')


def test_expired_client_certificate(ca_dir, ca):
    server = load_with_ca(ca_dir).new_session()
    outcome = handshake(server, client_connection(issued=ca.client_cert("alice", expired=True)))
    assert outcome.server_error is not None
    assert server.verify_failure_detail().startswith(
        "Client certificate verification failed at depth 0: certificate has expired.\n")


def test_failed_certificate_names_are_made_safe_for_the_log(ca_dir):
    foreign = certs.CA("Zoë's CA").client_cert("x" * 60 + ",,,\x01")
    server = load_with_ca(ca_dir).new_session()
    handshake(server, client_connection(issued=foreign))
    detail = server.verify_failure_detail()
    subject = "/CN=" + "x" * 60 + "\\,\\,\\,\\01"
    assert f'subject "...{subject[-68:]}"' in detail       # the last 71 characters
    assert 'issuer "/CN=Zo\\xc3\\xab\'s CA"' in detail


def test_intermediate_ca_sent_by_the_client(ca_dir, ca):
    client_cert = ca.intermediate().client_cert("carol")
    server = load_with_ca(ca_dir).new_session()
    assert handshake(server, client_connection(issued=client_cert)).server_error is None
    assert server.peer_cn() == "carol"


def test_intermediate_ca_not_sent_by_the_client(ca_dir, ca):
    client_cert = ca.intermediate().client_cert("carol")
    client_cert.chain = []
    server = load_with_ca(ca_dir).new_session()
    assert handshake(server, client_connection(issued=client_cert)).server_error is not None
    assert "unable to get local issuer certificate" in server.verify_failure_detail()


def test_revoked_client_certificate_with_crl_file(ca_dir, ca):
    revoked, good = ca.client_cert("eve"), ca.client_cert("alice")
    certs.write(ca_dir / "root.crl", ca.crl(revoked=[revoked]), 0o644)
    tls = load_with_ca(ca_dir, ssl_crl_file=str(ca_dir / "root.crl"))

    server = tls.new_session()
    assert handshake(server, client_connection(issued=revoked)).server_error is not None
    assert server.verify_failure_detail().startswith(
        "Client certificate verification failed at depth 0: certificate revoked.\n")

    server = tls.new_session()
    assert handshake(server, client_connection(issued=good)).server_error is None
    assert server.peer_cn() == "alice"


def test_revoked_client_certificate_with_crl_dir_and_intermediate(ca_dir, ca):
    intermediate = ca.intermediate()
    revoked, good = intermediate.client_cert("eve"), intermediate.client_cert("alice")
    crl_dir = certs.write_crl_dir(ca_dir / "crl", [(ca, ca.crl()), (intermediate, intermediate.crl([revoked]))])
    tls = load_with_ca(ca_dir, ssl_crl_dir=crl_dir)

    server = tls.new_session()
    assert handshake(server, client_connection(issued=revoked)).server_error is not None
    assert "certificate revoked" in server.verify_failure_detail()

    server = tls.new_session()
    assert handshake(server, client_connection(issued=good)).server_error is None


def test_a_certificate_cryptography_cannot_parse_fails_verification_with_its_detail(ca_dir):
    """The verify callback reads the failed certificate through OpenSSL, so one that
    cryptography refuses to parse is described all the same, and refused."""
    foreign = certs.CA("foreign CA").client_cert_unparsable("mallory")
    server = load_with_ca(ca_dir).new_session()
    outcome = handshake(server, client_connection(issued=foreign))
    assert "certificate verify failed" in reasons(outcome.server_error)
    detail = server.verify_failure_detail()
    assert detail.startswith("Client certificate verification failed at depth 0: unable to get local issuer "
                             'certificate.\nFailed certificate data (unverified): subject "/CN=mallory", serial number ')
    assert detail.endswith(', issuer "/CN=foreign CA".')


def test_a_trusted_certificate_cryptography_cannot_parse_still_names_its_user(ca_dir, ca):
    server = load_with_ca(ca_dir).new_session()
    assert handshake(server, client_connection(issued=ca.client_cert_unparsable("carol"))).server_error is None
    assert server.peer_cn() == "carol"


def test_verify_failures_stay_with_their_connection(ca_dir):
    """Nothing accumulates on the shared context however many handshakes fail; what a
    failure leaves lives and dies with its connection."""
    import gc
    from pgfast import _openssl
    tls = load_with_ca(ca_dir)
    foreign = certs.CA("foreign CA").client_cert_unparsable("mallory")
    gc.collect()
    before = len(_openssl._holders)
    for _ in range(50):
        server = tls.new_session()
        assert handshake(server, client_connection(issued=foreign)).server_error is not None
        assert server.verify_failure_detail() is not None
    del server
    gc.collect()
    assert len(_openssl._holders) == before
    assert tls.default.context._verify_helper is None      # pyOpenSSL's own callback (and its _problems list) is unused


def test_crl_is_required_for_every_ca_in_the_chain(ca_dir, ca):
    crl_dir = certs.write_crl_dir(ca_dir / "crl", [(ca, ca.crl())])
    server = load_with_ca(ca_dir, ssl_crl_dir=crl_dir).new_session()
    handshake(server, client_connection(issued=ca.intermediate().client_cert("alice")))
    assert "unable to get certificate CRL" in server.verify_failure_detail()


# ---------------------------------------------------------------- selfsigned.write_self_signed

def python_ssl_handshake(server: SSL.Connection, cafile: str, hostname: str) -> str | None:
    """A Python ssl client (hostname checking on) against a ServerTLS connection; its error or None."""
    client_ctx = ssl.create_default_context(cafile=cafile)
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(incoming, outgoing, server_hostname=hostname)
    for _ in range(10):
        try:
            client.do_handshake()
            return None
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as e:
            return str(e)
        server.bio_write(outgoing.read())
        try:
            server.do_handshake()
        except SSL.WantReadError:
            pass
        try:
            incoming.write(server.bio_read(1 << 20))
        except SSL.WantReadError:
            pass
    return "handshake did not finish"


def read_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_self_signed_defaults(tmp_path):
    write_self_signed(tmp_path / "server.crt", tmp_path / "server.key", names=["db.example.com", "10.1.2.3"])
    cert = read_certificate(tmp_path / "server.crt")
    host = socket.gethostname()
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == host
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    alt_names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(alt_names.get_values_for_type(x509.DNSName)) == {"localhost", host, "db.example.com"}
    assert set(alt_names.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.1.2.3")}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH])
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=3649) < lifetime < datetime.timedelta(days=3651)
    assert stat.S_IMODE(os.stat(tmp_path / "server.key").st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["server.crt", "server.key"]   # no temporary file left


def test_self_signed_key_mode_ignores_umask(tmp_path):
    old_umask = os.umask(0)
    try:
        write_self_signed(tmp_path / "server.crt", tmp_path / "server.key")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(tmp_path / "server.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "server.crt").st_mode) == 0o644


def test_self_signed_replaces_existing_files(tmp_path):
    certs.write(tmp_path / "server.key", b"old", 0o644)
    write_self_signed(tmp_path / "server.crt", tmp_path / "server.key")
    assert stat.S_IMODE(os.stat(tmp_path / "server.key").st_mode) == 0o600
    load(tmp_path)


def test_self_signed_rsa(tmp_path):
    write_self_signed(tmp_path / "server.crt", tmp_path / "server.key", key_type="rsa")
    key = read_certificate(tmp_path / "server.crt").public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048
    load(tmp_path)


def test_self_signed_encrypted_key(tmp_path):
    write_self_signed(tmp_path / "server.crt", tmp_path / "server.key", passphrase=PASSPHRASE)
    assert b"ENCRYPTED" in (tmp_path / "server.key").read_bytes()
    load(tmp_path, ssl_passphrase_command=f"echo '{PASSPHRASE.decode()}'")


@requires_root
def test_self_signed_owner(tmp_path):
    write_self_signed(tmp_path / "server.crt", tmp_path / "server.key", owner_uid=DB_UID, owner_gid=DB_UID)
    for name in ("server.crt", "server.key"):
        st = os.stat(tmp_path / name)
        assert (st.st_uid, st.st_gid) == (DB_UID, DB_UID)
    load(tmp_path, db_uid=DB_UID)


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "::1"])
@pytest.mark.parametrize("key_type", ["ecdsa", "rsa"])
def test_self_signed_is_its_own_trust_anchor(tmp_path, hostname, key_type):
    write_self_signed(tmp_path / "server.crt", tmp_path / "server.key", key_type=key_type)
    server = load(tmp_path).new_session().connection
    assert python_ssl_handshake(server, str(tmp_path / "server.crt"), hostname) is None


def test_self_signed_does_not_match_other_names(tmp_path):
    write_self_signed(tmp_path / "server.crt", tmp_path / "server.key")
    server = load(tmp_path).new_session().connection
    error = python_ssl_handshake(server, str(tmp_path / "server.crt"), "db.example.com")
    assert "Hostname mismatch" in error


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_self_signed_passes_openssl_verify(tmp_path):
    write_self_signed(tmp_path / "server.crt", tmp_path / "server.key")
    cert = str(tmp_path / "server.crt")
    result = subprocess.run(["openssl", "verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", cert, cert],
                            capture_output=True, text=True)
    assert result.stdout.strip() == f"{cert}: OK", result.stderr
