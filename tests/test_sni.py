"""Server SNI, PostgreSQL 19's pg_hosts.conf: the client's server name chooses the
certificate, key and CA; `/no_sni/` serves clients that send none and `*` every other name;
each entry gets every start-up check; the file's errors are PostgreSQL 19's words."""
from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import struct
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

import certs
from conftest import (Pgfast, chown_tree, psql, psql_script, run_pgfast, server_major, tls_server, wait_until,
                      write_file)
from pgfast import config
from pgfast.errors import TLSSetupError
from pgfast.tls import load_server_tls
from test_tls import client_connection, handshake, make_settings

PASSPHRASE = b"open sesame"
HBA = ("local all all trust\n"
       "hostssl certdb all 127.0.0.1/32 cert\n"
       "hostssl all scram 127.0.0.1/32 scram-sha-256\n"
       "hostssl all all 127.0.0.1/32 trust\n")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """One CA for the servers' certificates, another for client certificates; one certificate
    per server name, so a client can tell which host configuration served it."""
    ca, client_ca = certs.CA("SNI server CA"), certs.CA("SNI client CA")
    issued = {name: ca.server_cert((name,))
              for name in ("a.localhost", "b.localhost", "nosni.localhost", "default.localhost")}
    issued["server"] = ca.server_cert()
    client_dir = tmp_path_factory.mktemp("sni-client")
    alice = client_ca.client_cert("alice")
    certs.write(client_dir / "alice.crt", alice.cert_pem(), 0o644)
    certs.write(client_dir / "alice.key", alice.key_pem(), 0o600)
    certs.write(client_dir / "root.crt", ca.cert_pem(), 0o644)
    return {"ca": ca, "client_ca": client_ca, "issued": issued, "dir": str(client_dir)}


def write_hosts_files(data: str, pki, encrypted: tuple[str, ...] = ()) -> None:
    """NAME.crt/NAME.key for every certificate (the keys of `encrypted` under PASSPHRASE),
    and client_ca.crt, into the data directory."""
    for name, issued in pki["issued"].items():
        certs.write(os.path.join(data, f"{name}.crt"), issued.chain_pem(), 0o644)
        certs.write(os.path.join(data, f"{name}.key"),
                    issued.key_pem(PASSPHRASE if name in encrypted else None), 0o600)
    certs.write(os.path.join(data, "client_ca.crt"), pki["client_ca"].cert_pem(), 0o644)


def served_name(port: int, server_name: str | None) -> str:
    """The CN of the certificate pgfast presents after an SSLRequest, with this SNI (or none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(struct.pack("!ii", 8, 80877103))
        assert sock.recv(1) == b"S"
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["postgresql"])
        with context.wrap_socket(sock, server_hostname=server_name) as tls:
            cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


# ---------------------------------------------------------------- in memory: the choice and the checks

@pytest.fixture
def hosts_dir(tmp_path, pki) -> Path:
    write_hosts_files(str(tmp_path), pki)
    return tmp_path


def sni_settings(data_dir: Path, hosts: str, **overrides):
    (data_dir / "pg_hosts.conf").write_text(hosts)
    settings = make_settings(data_dir, ssl_cert_file=str(data_dir / "server.crt"),
                             ssl_key_file=str(data_dir / "server.key"), **overrides)
    settings.pgfast["pgfast.ssl_sni"] = True
    return settings


def chosen(tls, server_name: str | None) -> tuple[str | None, str]:
    """(CN the client saw or None, the handshake's errors) for one in-memory handshake."""
    session = tls.new_session()
    client = client_connection(alpn=[b"postgresql"])
    if server_name is not None:
        client.set_tlsext_host_name(server_name.encode())
    outcome = handshake(session, client)
    cert = client.get_peer_certificate(as_cryptography=True)
    if cert is None or outcome.client_error is not None:
        return None, repr(outcome.client_error) + repr(outcome.server_error)
    seen = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return seen, ""


def test_each_name_gets_its_own_certificate_and_no_sni_its_entry(hosts_dir):
    tls = load_server_tls(sni_settings(hosts_dir, "a.localhost a.localhost.crt a.localhost.key\n"
                                                  "B.localhost,c.localhost b.localhost.crt b.localhost.key\n"
                                                  "/no_sni/ nosni.localhost.crt nosni.localhost.key\n"),
                          db_uid=os.geteuid(), interactive=False)
    assert chosen(tls, "a.localhost")[0] == "a.localhost"
    assert chosen(tls, "b.LOCALHOST")[0] == "b.localhost"        # names match without regard to case
    assert chosen(tls, "c.localhost")[0] == "b.localhost"
    assert chosen(tls, None)[0] == "nosni.localhost"
    seen, errors = chosen(tls, "x.localhost")                    # no '*': an unknown name is refused
    assert seen is None and "unrecognized name" in errors


def test_the_default_entry_takes_unknown_names_and_clients_without_sni(hosts_dir):
    tls = load_server_tls(sni_settings(hosts_dir, "a.localhost a.localhost.crt a.localhost.key\n"
                                                  "* default.localhost.crt default.localhost.key\n"),
                          db_uid=os.geteuid(), interactive=False)
    assert chosen(tls, "x.localhost")[0] == "default.localhost"
    assert chosen(tls, None)[0] == "default.localhost"
    assert chosen(tls, "a.localhost")[0] == "a.localhost"


def test_without_a_fallback_a_client_without_sni_is_refused(hosts_dir, capfd):
    tls = load_server_tls(sni_settings(hosts_dir, "a.localhost a.localhost.crt a.localhost.key\n"),
                          db_uid=os.geteuid(), interactive=False)
    seen, errors = chosen(tls, None)
    assert seen is None and "missing extension" in errors
    assert "LOG:  no hostname provided in callback, and no fallback configured" in capfd.readouterr().err


def test_ssl_sni_off_or_an_empty_file_serves_postgresql_conf_s_certificate(hosts_dir):
    settings = sni_settings(hosts_dir, "a.localhost a.localhost.crt a.localhost.key\n")
    settings.pgfast["pgfast.ssl_sni"] = False
    tls = load_server_tls(settings, db_uid=os.geteuid(), interactive=False)
    assert chosen(tls, "a.localhost")[0] == "localhost"          # server.crt, for SERVER_NAMES
    for text in ("", "# HOSTNAME SSL CERTIFICATE SSL KEY\n"):
        tls = load_server_tls(sni_settings(hosts_dir, text), db_uid=os.geteuid(), interactive=False)
        assert chosen(tls, "a.localhost")[0] == "localhost"
    os.unlink(hosts_dir / "pg_hosts.conf")                       # missing is empty
    settings.pgfast["pgfast.ssl_sni"] = True
    assert chosen(load_server_tls(settings, db_uid=os.geteuid(), interactive=False), None)[0] == "localhost"


def test_a_host_s_ca_asks_its_clients_for_certificates(hosts_dir):
    tls = load_server_tls(sni_settings(hosts_dir, "a.localhost a.localhost.crt a.localhost.key\n"
                                                  "b.localhost b.localhost.crt b.localhost.key client_ca.crt\n"),
                          db_uid=os.geteuid(), interactive=False)
    assert not tls.named["a.localhost"].requests_client_cert
    assert tls.named["b.localhost"].requests_client_cert
    # the channel binding data is that of the host's own certificate
    assert tls.named["a.localhost"].server_end_point != tls.named["b.localhost"].server_end_point


@pytest.mark.parametrize("hosts, logged, context_line", [
    ("a.localhost a.localhost.crt\n", "missing entry at end of line", 1),
    ("a.localhost\n", "missing entry at end of line", 1),
    ("a.localhost a.crt,b.crt a.localhost.key\n", "multiple values specified for SSL certificate", 1),
    ("a.localhost a.localhost.crt k1,k2\n", "multiple values specified for SSL key", 1),
    ("a.localhost a.localhost.crt a.localhost.key ca1,ca2\n", "multiple values specified for SSL CA", 1),
    ("# ok\na.localhost a.localhost.crt a.localhost.key client_ca.crt \"echo x\" maybe\n",
     "incorrect syntax for boolean value SSL_passphrase_cmd_reload", 2),
    ("a.localhost a.localhost.crt a.localhost.key client_ca.crt \"echo x\" on extra\n",
     "extra fields at end of line", 1),
    ("a.localhost,*,b.localhost a.localhost.crt a.localhost.key\n",
     "default and non-SNI entries cannot be mixed with other entries", 1),
    ("/no_sni/,a.localhost a.localhost.crt a.localhost.key\n",
     "default and non-SNI entries cannot be mixed with other entries", 1),
])
def test_a_bad_line_is_logged_and_the_file_refused(hosts_dir, hosts, logged, context_line):
    with pytest.raises(TLSSetupError) as caught:
        load_server_tls(sni_settings(hosts_dir, hosts), db_uid=os.geteuid(), interactive=False)
    path = hosts_dir / "pg_hosts.conf"
    assert caught.value.message == (f'could not load "pg_hosts.conf": loading config from "{path}" '
                                    "failed due to parsing error")
    # the LOG line PostgreSQL writes for the bad line first
    assert caught.value.preceding == [(logged, f'line {context_line} of configuration file "{path}"')]


@pytest.mark.parametrize("hosts, message, line", [
    ("* a.localhost.crt a.localhost.key\n* b.localhost.crt b.localhost.key\n", "multiple default hosts specified", 2),
    ("/no_sni/ a.localhost.crt a.localhost.key\n/no_sni/ b.localhost.crt b.localhost.key\n",
     "multiple no_sni hosts specified", 2),
    ("a.localhost a.localhost.crt a.localhost.key\nb.localhost,c.localhost,A.localhost b.localhost.crt "
     "b.localhost.key\n", 'multiple entries for host "A.localhost" specified', 2),
])
def test_an_entry_given_twice_is_refused(hosts_dir, hosts, message, line):
    with pytest.raises(TLSSetupError) as caught:
        load_server_tls(sni_settings(hosts_dir, hosts), db_uid=os.geteuid(), interactive=False)
    assert caught.value.message == message
    assert caught.value.context == f'line {line} of configuration file "{hosts_dir / "pg_hosts.conf"}"'


def test_every_entry_gets_the_start_up_checks(hosts_dir):
    os.chmod(hosts_dir / "b.localhost.key", 0o644)
    with pytest.raises(TLSSetupError) as caught:
        load_server_tls(sni_settings(hosts_dir, "a.localhost a.localhost.crt a.localhost.key\n"
                                                "b.localhost b.localhost.crt b.localhost.key\n"),
                        db_uid=os.geteuid(), interactive=False)
    assert caught.value.message == 'private key file "b.localhost.key" has group or world access'
    with pytest.raises(TLSSetupError) as caught:
        load_server_tls(sni_settings(hosts_dir, "a.localhost a.localhost.crt a.localhost.key missing.crt\n"),
                        db_uid=os.geteuid(), interactive=False)
    assert caught.value.message.startswith('could not load root certificate file "missing.crt": ')
    with pytest.raises(TLSSetupError) as caught:
        load_server_tls(sni_settings(hosts_dir, "a.localhost a.localhost.crt nosni.localhost.key\n"),
                        db_uid=os.geteuid(), interactive=False)
    assert caught.value.message.startswith("could not load private key file")   # key values mismatch


def test_a_host_s_passphrase_command_and_its_reload_rule(tmp_path, pki):
    write_hosts_files(str(tmp_path), pki, encrypted=("a.localhost",))
    line = f"a.localhost a.localhost.crt a.localhost.key \"\" \"echo '{PASSPHRASE.decode()}'\""
    tls = load_server_tls(sni_settings(tmp_path, line + "\n"), db_uid=os.geteuid(), interactive=False)
    assert chosen(tls, "a.localhost")[0] == "a.localhost"
    # reloading: only a command that says it supports reload may be run again
    with pytest.raises(TLSSetupError) as caught:
        load_server_tls(sni_settings(tmp_path, line + " off\n"), db_uid=os.geteuid(), interactive=False,
                        reloading=True)
    assert caught.value.message == ('private key file "a.localhost.key" cannot be reloaded because it '
                                    "requires a passphrase")
    tls = load_server_tls(sni_settings(tmp_path, line + " on\n"), db_uid=os.geteuid(), interactive=False,
                          reloading=True)
    assert chosen(tls, "a.localhost")[0] == "a.localhost"
    with pytest.raises(TLSSetupError) as caught:
        load_server_tls(sni_settings(tmp_path, "a.localhost a.localhost.crt a.localhost.key \"\" \"echo wrong\"\n"),
                        db_uid=os.geteuid(), interactive=False)
    assert caught.value.message.startswith('could not load private key file "a.localhost.key"')


def test_host_names_from_an_at_file(hosts_dir):
    (hosts_dir / "names.txt").write_text("b.localhost\nc.localhost\n")
    tls = load_server_tls(sni_settings(hosts_dir, "a.localhost,@names.txt a.localhost.crt a.localhost.key\n"),
                          db_uid=os.geteuid(), interactive=False)
    assert chosen(tls, "c.localhost")[0] == "a.localhost"


# ---------------------------------------------------------------- end to end, with libpq

@pytest.fixture
def sni_server(template_cluster, scratch_root, client_env, pki, bindir):
    """pgfast with ssl_sni on: a.localhost, b.localhost (+ c.localhost from an @file, and a
    CA for client certificates) and /no_sni/; no default entry."""
    server = tls_server(template_cluster, scratch_root, "sni-", pki["ca"], HBA,
                        "pgfast.ssl_sni = on\npassword_encryption = 'scram-sha-256'\n", client_env)
    data = server.data_dir
    write_hosts_files(data, pki)
    write_file(os.path.join(data, "more-names"), "c.localhost\n")
    write_file(os.path.join(data, "pg_hosts.conf"),
               "# HOSTNAME  SSL CERTIFICATE  SSL KEY  SSL CA\n"
               "a.localhost a.localhost.crt a.localhost.key\n"
               "b.localhost,@more-names b.localhost.crt b.localhost.key client_ca.crt\n"
               "/no_sni/ nosni.localhost.crt nosni.localhost.key\n")
    chown_tree(data)
    server.start()
    created = psql_script(bindir, server, "create role scram login password 'pw'; create role alice login;\n"
                                          "create database certdb;\n", client_env)
    assert created.returncode == 0, created.stderr
    yield server
    server.stop()
    assert "Traceback" not in server.log, server.log


def libpq(bindir, server: Pgfast, pki, host: str | None, env, sql: str = "select 1", **params):
    dsn = server.dsn(host=host, hostaddr="127.0.0.1", sslmode="verify-full",
                     sslrootcert=os.path.join(pki["dir"], "root.crt"), **params)
    return psql(bindir, dsn, sql, env)


def test_libpq_sees_each_host_s_own_certificate(bindir, sni_server, pki, client_env):
    # verify-full checks the certificate against the name asked for: each name passing
    # proves it got its own certificate (every one is issued for its name alone)
    for name in ("a.localhost", "B.localhost"):
        result = libpq(bindir, sni_server, pki, name, client_env)
        assert result.returncode == 0, result.stderr
        assert served_name(sni_server.port, name) == name.lower()
    # c.localhost shares b's entry (from the @file), so b's certificate
    result = libpq(bindir, sni_server, pki, "c.localhost", client_env)
    assert "server certificate for \"b.localhost\" does not match host name \"c.localhost\"" in result.stderr
    assert served_name(sni_server.port, "c.localhost") == "b.localhost"
    assert served_name(sni_server.port, None) == "nosni.localhost"
    result = libpq(bindir, sni_server, pki, "nosni.localhost", client_env, sslsni=0)
    assert result.returncode == 0, result.stderr


def test_libpq_is_refused_an_unknown_name(bindir, sni_server, pki, client_env):
    result = libpq(bindir, sni_server, pki, "x.localhost", client_env)
    assert result.returncode != 0
    assert "unrecognized name" in result.stderr
    sni_server.wait_for("could not accept SSL connection: callback failed")


def test_client_certificates_are_asked_for_by_the_host_with_a_ca(bindir, sni_server, pki, client_env):
    cert = {"sslcert": os.path.join(pki["dir"], "alice.crt"), "sslkey": os.path.join(pki["dir"], "alice.key")}
    result = libpq(bindir, sni_server, pki, "b.localhost", client_env, "select current_user", user="alice",
                   dbname="certdb", **cert)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "alice"
    result = libpq(bindir, sni_server, pki, "a.localhost", client_env, user="alice", dbname="certdb", **cert)
    assert result.returncode != 0
    # PostgreSQL 19's words for a host without a CA (004_sni.pl)
    assert "client certificates can only be checked if a root certificate store is available" in result.stderr


def test_scram_channel_binding_uses_the_chosen_host_s_certificate(bindir, sni_server, pki, client_env):
    for name in ("a.localhost", "b.localhost"):
        result = libpq(bindir, sni_server, pki, name, client_env, user="scram", password="pw",
                       channel_binding="require")
        assert result.returncode == 0, (name, result.stderr)


def test_a_reload_brings_new_entries_and_an_unreloadable_key_keeps_the_old(bindir, sni_server, pki, client_env):
    data = sni_server.data_dir
    # a bad line: logged once with its place, the old configuration kept
    hosts = os.path.join(data, "pg_hosts.conf")
    with open(hosts) as f:
        good = f.read()
    write_file(hosts, good + "d.localhost d.crt\n")
    sni_server.process.send_signal(signal.SIGHUP)
    sni_server.wait_for("SSL configuration was not reloaded")
    path = os.path.realpath(hosts)
    assert re.search(r"LOG:  missing entry at end of line\n[^\n]*CONTEXT:  line 5 of configuration file "
                     + re.escape(f'"{path}"') + r"\n[^\n]*LOG:  could not load \"pg_hosts\.conf\": loading config "
                     r"from .* failed due to parsing error\n", sni_server.log), sni_server.log
    assert sni_server.log.count("missing entry at end of line") == 1
    write_file(hosts, good)
    with open(os.path.join(data, "pg_hosts.conf"), "a") as f:
        f.write("* default.localhost.crt default.localhost.key\n")
    sni_server.process.send_signal(signal.SIGHUP)
    def served_default() -> bool:
        try:
            return served_name(sni_server.port, "x.localhost") == "default.localhost"
        except ssl.SSLError:        # unrecognized_name, until the reload is in force
            return False
    assert wait_until(served_default, 10)
    # a key that needs a passphrase, without a command that may be run again
    certs.write(os.path.join(data, "a.localhost.key"), pki["issued"]["a.localhost"].key_pem(PASSPHRASE), 0o600)
    chown_tree(data)
    sni_server.process.send_signal(signal.SIGHUP)
    sni_server.wait_for('private key file "a.localhost.key" cannot be reloaded because it requires a passphrase')
    sni_server.wait_for("SSL configuration was not reloaded")
    result = libpq(bindir, sni_server, pki, "a.localhost", client_env)
    assert result.returncode == 0, result.stderr


def test_ssl_sni_is_postgresql_19_s_name(cluster, client_env):
    """Under an older PostgreSQL the bare names are unknown (PostgreSQL itself would refuse
    them): pgfast.ssl_sni and pgfast.hosts_file work with every version."""
    if server_major() >= 19:
        pytest.skip("PostgreSQL 19 knows ssl_sni")
    result = run_pgfast("run", "-D", cluster, "-c", "ssl_sni=on", env=client_env)
    assert result.returncode == 1
    assert 'FATAL:  unrecognized configuration parameter "ssl_sni"' in result.stderr


def test_postgresql_19_s_names_set_pgfast_s_and_the_later_wins(cluster):
    settings = config.load(cluster, [("ssl_sni", "on"), ("hosts_file", "sni/hosts.conf")], known=None)
    assert settings.pgfast["pgfast.ssl_sni"] is True
    assert settings.pgfast["pgfast.hosts_file"] == "sni/hosts.conf"
    settings = config.load(cluster, [("pgfast.ssl_sni", "on"), ("ssl_sni", "off")], known=None)
    assert settings.pgfast["pgfast.ssl_sni"] is False


def test_hosts_file_names_another_file(hosts_dir):
    settings = sni_settings(hosts_dir, "")
    (hosts_dir / "elsewhere.conf").write_text("* a.localhost.crt a.localhost.key\n")
    settings.pgfast["pgfast.hosts_file"] = "elsewhere.conf"
    assert chosen(load_server_tls(settings, db_uid=os.geteuid(), interactive=False), None)[0] == "a.localhost"


def test_a_bad_file_stops_the_start_with_postgresql_s_lines(template_cluster, scratch_root, client_env, pki):
    server = tls_server(template_cluster, scratch_root, "sni-bad-", pki["ca"], HBA, "pgfast.ssl_sni = on\n",
                        client_env)
    hosts = write_file(os.path.join(server.data_dir, "pg_hosts.conf"),
                       "a.localhost a.crt a.key\n* x.crt\n*,b.localhost b.crt b.key\n")
    result = run_pgfast("run", "-D", server.data_dir, "-p", str(server.port), env=client_env)
    assert result.returncode == 1
    path = os.path.realpath(hosts)
    assert re.search(r"LOG:  missing entry at end of line\n[^\n]*CONTEXT:  line 2 of configuration file "
                     + re.escape(f'"{path}"') + r"\n[^\n]*LOG:  default and non-SNI entries cannot be mixed with "
                     r"other entries\n[^\n]*CONTEXT:  line 3 [^\n]*\n[^\n]*FATAL:  could not load \"pg_hosts\.conf\"",
                     result.stderr), result.stderr
