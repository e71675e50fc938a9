"""Reloading without dropping anyone (SIGHUP): certificates, keys, pg_hba.conf, CRLs and
settings are read again and checked as at start; what fails keeps the old configuration in
force with PostgreSQL's LOG line; open connections keep their TLS session and backend."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import ssl
import tempfile
import threading
import time

import psycopg
import pytest

import certs
from conftest import Pgfast, append_conf, chown_tree, free_port, write_file

HBA = ("local all all trust\n"
       "hostssl all refused_later 127.0.0.1/32 trust\n"
       "hostssl certdb all 127.0.0.1/32 cert\n"
       "hostssl all all 127.0.0.1/32 trust\n")


@pytest.fixture
def pki(tmp_path):
    ca = certs.CA("reload CA")
    other = certs.CA("rotated-to CA")
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    alice = ca.client_cert("alice")
    certs.write(client_dir / "alice.crt", alice.cert_pem(), 0o644)
    certs.write(client_dir / "alice.key", alice.key_pem(), 0o600)
    certs.write(client_dir / "ca.crt", ca.cert_pem(), 0o644)
    certs.write(client_dir / "other.crt", other.cert_pem(), 0o644)
    return {"ca": ca, "other": other, "alice": alice, "dir": str(client_dir)}


def start(template_cluster, base_dir, env, pki, *, workers: int = 1, conf: str = "") -> Pgfast:
    base = tempfile.mkdtemp(prefix="reload-", dir=base_dir)
    os.chmod(base, 0o755)
    data = os.path.join(base, "data")
    shutil.copytree(template_cluster, data, symlinks=True)
    os.chmod(data, 0o700)
    server = pki["ca"].server_cert()
    certs.write(os.path.join(data, "server.crt"), server.chain_pem(), 0o644)
    certs.write(os.path.join(data, "server.key"), server.key_pem(), 0o600)
    certs.write(os.path.join(data, "root.crt"), pki["ca"].cert_pem(), 0o644)
    certs.write(os.path.join(data, "root.crl"), pki["ca"].crl(), 0o644)
    write_file(os.path.join(data, "pg_hba.conf"), HBA)
    append_conf(data, f"ssl = on\npgfast.workers = {workers}\n{conf}")
    chown_tree(data)
    socket_dir = tempfile.mkdtemp(prefix="sock-", dir=base)
    os.chmod(socket_dir, 0o777)
    return Pgfast(data, free_port(), socket_dir, [], dict(env)).start()


@pytest.fixture
def make(template_cluster, scratch_root, client_env, pki):
    started = []

    def make_server(**kw) -> Pgfast:
        server = start(template_cluster, scratch_root, client_env, pki, **kw)
        started.append(server)
        return server

    yield make_server
    for server in started:
        server.stop()
        assert "Traceback" not in server.log, server.log


def connect(server: Pgfast, pki, root: str = "ca.crt", **params) -> psycopg.Connection:
    kwargs = {"host": "127.0.0.1", "port": server.port, "dbname": "postgres", "user": "postgres",
              "sslmode": "verify-ca", "sslrootcert": os.path.join(pki["dir"], root), "connect_timeout": 10,
              "autocommit": True, **params}
    return psycopg.connect(**kwargs)


def sighup(server: Pgfast, wait_for: str | None = None) -> None:
    mark = len(server.log)
    server.process.send_signal(signal.SIGHUP)
    server.wait_for("received SIGHUP, reloading configuration files")
    if wait_for:
        deadline = time.monotonic() + 10
        while wait_for not in server.log[mark:]:
            assert time.monotonic() < deadline, f"no {wait_for!r} after the reload:\n{server.log[mark:]}"
            time.sleep(0.02)
    time.sleep(0.3)     # workers apply it after the supervisor has read it


def served_certificate(server: Pgfast) -> str:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    import socket
    import struct
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(struct.pack("!ii", 8, 80877103))
        assert raw.recv(1) == b"S"
        with ctx.wrap_socket(raw) as tls:
            return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def replace_server_certificate(server: Pgfast, issued: certs.Issued) -> None:
    certs.write(os.path.join(server.data_dir, "server.crt"), issued.chain_pem(), 0o644)
    certs.write(os.path.join(server.data_dir, "server.key"), issued.key_pem(), 0o600)
    chown_tree(server.data_dir)


@pytest.mark.parametrize("workers", [1, 2])
def test_certificate_rotation_under_busy_clients(make, pki, workers):
    server = make(workers=workers)
    stop, errors, counts = threading.Event(), [], []
    busy = [connect(server, pki) for _ in range(50)]

    def work(conn):
        n = 0
        try:
            while not stop.is_set():
                assert conn.execute("select 1").fetchone() == (1,)
                n += 1
        except Exception as exc:
            errors.append(repr(exc))
        counts.append(n)

    threads = [threading.Thread(target=work, args=(c,)) for c in busy]
    for t in threads:
        t.start()
    before = served_certificate(server)
    new = pki["other"].server_cert()
    replace_server_certificate(server, new)
    sighup(server)
    after = served_certificate(server)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]                       # nobody was dropped
    assert all(n > 0 for n in counts)
    assert before != after
    with connect(server, pki, root="other.crt") as fresh:   # new clients see the new certificate
        assert fresh.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError):
        connect(server, pki, root="ca.crt")
    for conn in busy:
        conn.close()


def test_a_broken_new_key_keeps_the_old_one(make, pki):
    server = make()
    before = served_certificate(server)
    certs.write(os.path.join(server.data_dir, "server.key"), b"-----BEGIN PRIVATE KEY-----\ngarbage\n", 0o600)
    chown_tree(server.data_dir)
    sighup(server, "LOG:  SSL configuration was not reloaded")
    assert 'could not load private key file "server.key"' in server.log
    assert served_certificate(server) == before
    with connect(server, pki) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_an_hba_change_refuses_new_sessions_only(make, pki):
    server = make()
    existing = connect(server, pki, user="postgres")
    with connect(server, pki) as admin:
        admin.execute("create role refused_later login")
    kept = connect(server, pki, user="refused_later")
    hba = HBA.replace("hostssl all refused_later 127.0.0.1/32 trust", "hostssl all refused_later 127.0.0.1/32 reject")
    write_file(os.path.join(server.data_dir, "pg_hba.conf"), hba)
    sighup(server)
    assert kept.execute("select current_user").fetchone() == ("refused_later",)     # stays
    with pytest.raises(psycopg.OperationalError, match="pg_hba.conf rejects connection"):
        connect(server, pki, user="refused_later")
    assert existing.execute("select 1").fetchone() == (1,)
    # a broken pg_hba.conf keeps the one in force
    write_file(os.path.join(server.data_dir, "pg_hba.conf"), HBA + "hostssl all all 127.0.0.1/32 frobnicate\n")
    sighup(server, "LOG:  pg_hba.conf was not reloaded")
    assert 'invalid authentication method "frobnicate"' in server.log
    with pytest.raises(psycopg.OperationalError, match="pg_hba.conf rejects connection"):
        connect(server, pki, user="refused_later")
    kept.close()
    existing.close()


def test_a_crl_update_revokes_a_client_certificate(make, pki):
    server = make()
    with connect(server, pki) as admin:
        admin.execute("create role alice login")
        admin.execute("create database certdb")
    cert = {"user": "alice", "dbname": "certdb", "sslcert": os.path.join(pki["dir"], "alice.crt"),
            "sslkey": os.path.join(pki["dir"], "alice.key")}
    kept = connect(server, pki, **cert)
    certs.write(os.path.join(server.data_dir, "root.crl"), pki["ca"].crl(revoked=[pki["alice"]]), 0o644)
    chown_tree(server.data_dir)
    sighup(server)
    with pytest.raises(psycopg.OperationalError):
        connect(server, pki, **cert)
    server.wait_for("certificate revoked")
    assert kept.execute("select current_user").fetchone() == ("alice",)
    kept.close()


def test_settings_that_need_a_restart_keep_their_value(make, pki):
    server = make()
    append_conf(server.data_dir, "port = 1\npgfast.workers = 3\npgfast.pool_size = 7")
    sighup(server, 'parameter "pgfast.pool_size" changed to "7"')
    assert 'LOG:  parameter "port" cannot be changed without restarting the server' in server.log
    assert 'LOG:  parameter "pgfast.workers" cannot be changed without restarting the server' in server.log
    with connect(server, pki) as conn:          # still on its port
        assert conn.execute("select 1").fetchone() == (1,)


def test_a_broken_postgresql_conf_changes_nothing(make, pki):
    server = make()
    append_conf(server.data_dir, "pgfast.pool_size = lots")
    sighup(server, "contains errors; no changes were applied")
    with connect(server, pki) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.parametrize("supports_reload", [False, True])
def test_a_key_with_a_passphrase_reloads_only_through_a_command_that_supports_it(make, pki, scratch_root,
                                                                                 supports_reload):
    # where the database account (which pgfast runs as after start) can read it
    passphrase_file = certs.write(os.path.join(scratch_root, f"pass-{supports_reload}"), b"sesame\n", 0o644)
    server = make(conf=f"ssl_passphrase_command = 'cat {passphrase_file}'\n"
                       f"ssl_passphrase_command_supports_reload = {'on' if supports_reload else 'off'}")
    issued = pki["other"].server_cert()
    certs.write(os.path.join(server.data_dir, "server.crt"), issued.chain_pem(), 0o644)
    certs.write(os.path.join(server.data_dir, "server.key"), issued.key_pem(passphrase=b"sesame"), 0o600)
    chown_tree(server.data_dir)
    before = served_certificate(server)
    if supports_reload:
        sighup(server)
        assert served_certificate(server) != before
    else:
        sighup(server, "LOG:  SSL configuration was not reloaded")
        assert 'private key file "server.key" cannot be reloaded because it requires a passphrase' in server.log
        assert served_certificate(server) == before
