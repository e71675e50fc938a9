"""The server TLS context, loaded and checked the way PostgreSQL's be_tls_init() does at
start, and the TLS side of each client connection.

Checks run in PostgreSQL's order (be-secure-openssl.c): certificate chain, key file
permissions, private key (asking for a passphrase only when the key is encrypted), key
against certificate, protocol range, session options, DH and ECDH groups, cipher list, CA
file, CRLs. Each failure is a TLSSetupError worded as PostgreSQL words it, naming the file
relative to the data directory when it is inside it (as users of PostgreSQL see
"server.crt"), absolute otherwise. Whatever needs OpenSSL below pyOpenSSL's API goes
through pgfast._openssl.
"""
from __future__ import annotations

import datetime
import functools
import ipaddress
import getpass
import os
import re
import signal
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from . import _openssl, log
from ._pump import TLSError, TLSPump, pump_for
from .config import Settings
from .errors import TLSSetupError
from .hosts import DEFAULT_HOST, NO_SNI, hosts_file, load_hosts

PASSPHRASE_PROMPT = "Enter PEM pass phrase:"   # OpenSSL's own prompt, which PostgreSQL passes as %p
ALPN_PROTOCOL = _openssl.ALPN_PROTOCOL
# PostgreSQL 18's ssl_groups default. PostgreSQL 15's prime256v1 alone makes every OpenSSL
# client that offers X25519 first pay a HelloRetryRequest round trip.
DEFAULT_CURVES = "X25519:prime256v1"

_PROTOCOL_VERSIONS = {
    "tlsv1": SSL.TLS1_VERSION,
    "tlsv1.1": SSL.TLS1_1_VERSION,
    "tlsv1.2": SSL.TLS1_2_VERSION,
    "tlsv1.3": SSL.TLS1_3_VERSION,
}

# PostgreSQL's built-in FILE_DH2048 (RFC 3526 group 14), for DHE cipher suites in TLS 1.2 with
# clients that name no FFDHE group (RFC 7919); for the others OpenSSL negotiates from the groups.
_DH2048_PEM = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA///////////JD9qiIWjCNMTGYouA3BzRKQJOCIpnzHQCC76mOxOb
IlFKCHmONATd75UZs806QxswKwpt8l8UN0/hNW1tUcJF5IW1dmJefsb0TELppjft
awv/XLb0Brft7jhr+1qJn6WunyQRfEsf5kkoZlHs5Fs9wgB8uKFjvwWY2kg2HFXT
mmkWP6j9JM9fg2VdI9yjrZYcYvNWIIVSu57VKQdwlpZtZww1Tkq8mATxdGwIyhgh
fDKQXkYuNs474553LBgOhgObJ4Oi7Aeij7XFXfBvTFLJ3ivL9pVYFxg5lUl86pVq
5RXSJhiY+gUQFXKOWoqsqmj//////////wIBAg==
-----END DH PARAMETERS-----
"""

class TLSSession:
    """One client connection's TLS: the pyOpenSSL Connection (which the context's
    callbacks see and which answers questions about the session), the Cython pump that
    moves its records, and what the callbacks learned about it."""

    __slots__ = ("connection", "pump", "verify_failure", "server", "host", "__weakref__")

    def __init__(self, context: SSL.Context, server: "ServerTLS | None" = None):
        self.server = server            # the configuration as it was when the handshake began
        # the configuration serving this connection; the server name the client sends may
        # pick another (choose_host)
        self.host: HostTLS | None = server.first if server is not None else None
        self.connection = SSL.Connection(context, None)
        self.connection.set_accept_state()
        self.pump: TLSPump = pump_for(self.connection)
        self.verify_failure: _openssl.VerifyFailure | None = None
        _openssl.register(self.connection, self)

    def choose_host(self, server_name: bytes | None) -> int | None:
        """The server name callback's decision: None to go on with the host configured for
        server_name, or the TLS alert that ends the handshake (sni_clienthello_cb)."""
        host = self.server.host_for(server_name)
        if host is None:
            if server_name is None:
                log.log("no hostname provided in callback, and no fallback configured")
                return _openssl.ALERT_MISSING_EXTENSION
            return _openssl.ALERT_UNRECOGNIZED_NAME
        if host is not self.host:
            self.connection.set_context(host.context)
            # SSL_set_SSL_CTX takes the certificate, key and CA store, not the verify mode
            _openssl.set_verify_mode(self.connection, host.requests_client_cert)
            self.host = host
        return None

    def verify_failure_detail(self) -> str | None:
        """PostgreSQL's log DETAIL for a client certificate that failed verification."""
        failure = self.verify_failure
        if failure is None:
            return None
        serial = "unknown" if failure.serial is None else str(failure.serial)
        return (f"Client certificate verification failed at depth {failure.depth}: {failure.reason}.\n"
                f'Failed certificate data (unverified): subject "{_loggable_name(failure.subject)}", '
                f'serial number {serial}, issuer "{_loggable_name(failure.issuer)}".')

    def peer_cn(self) -> str | None:
        """The first CN of the client certificate (verified, or the handshake would have failed)."""
        subject = _openssl.peer_certificate_subject(self.connection)
        return next((value for field, value in subject or () if field == "CN"), None)

    def alpn(self) -> bytes | None:
        return self.connection.get_alpn_proto_negotiated() or None

    def facts(self) -> dict:
        """What pg_stat_ssl would show of the session, and the server name asked for (SHOW TLS)."""
        conn = self.connection
        peer = _openssl.peer_certificate_facts(conn)
        subject, serial, issuer = peer if peer is not None else (None, None, None)
        sni = conn.get_servername()
        alpn = self.alpn()
        return {"version": self.version, "cipher": conn.get_cipher_name(), "bits": conn.get_cipher_bits(),
                "sni": sni.decode("ascii", "replace") if sni else None,
                "alpn": alpn.decode("ascii", "replace") if alpn else None,
                "client_dn": _slash_form(subject), "client_serial": serial, "issuer_dn": _slash_form(issuer)}

    @property
    def version(self) -> str:
        return self.connection.get_protocol_version_name()


@dataclass(frozen=True)
class HostTLS:
    """One checked certificate, key and CA: postgresql.conf's, or a pg_hosts.conf line's."""
    context: SSL.Context
    requests_client_cert: bool          # a CA file is in force
    server_end_point: bytes             # SCRAM channel binding data for its certificate


class ServerTLS:
    """The checked configurations; one TLSSession per client.

    Without SNI (ssl_sni off, or pg_hosts.conf empty) postgresql.conf's is the default host
    and serves everyone; with it, the client's server name chooses among pg_hosts.conf's."""

    def __init__(self, default: HostTLS | None, no_sni: HostTLS | None = None,
                 named: dict[str, HostTLS] | None = None):
        self.default = default
        self.no_sni = no_sni
        self.named = named or {}        # lowercased name -> host
        # every context holds the same protocol settings, so a handshake can begin on any
        self.first = default or no_sni or next(iter(self.named.values()))
        if no_sni is not None or self.named:
            for host in {id(h): h for h in (default, no_sni, *self.named.values()) if h}.values():
                _openssl.choose_by_server_name(host.context)

    def host_for(self, server_name: bytes | None) -> HostTLS | None:
        if server_name is None:
            return self.no_sni or self.default
        # RFC 6066 names are ASCII; anything else matches no configured name
        name = server_name.decode("ascii", "replace").lower()
        return self.named.get(name) or self.default

    def new_session(self) -> TLSSession:
        return TLSSession(self.first.context, self)


def load_server_tls(settings: Settings, *, db_uid: int, interactive: bool, reloading: bool = False) -> ServerTLS:
    """Build the server configuration from settings, or raise TLSSetupError as PostgreSQL would.

    db_uid is the user the key files must belong to (besides root); interactive says a
    passphrase may be asked for on the terminal (the caller passes stdin.isatty());
    reloading applies PostgreSQL's rule that a key needing a passphrase is reloaded only
    through a passphrase command that supports it.
    """
    data_dir = os.path.abspath(settings.data_dir)
    shown = functools.partial(_path_in_messages, data_dir=data_dir)
    build = functools.partial(_host_context, settings, shown=shown, db_uid=db_uid, interactive=interactive,
                              reloading=reloading)
    lines = None
    if settings.pgfast["pgfast.ssl_sni"]:
        lines = load_hosts(hosts_file(data_dir, settings.pgfast["pgfast.hosts_file"]))
    if lines is None:
        return ServerTLS(build(settings.ssl_cert_file, settings.ssl_key_file, settings.ssl_ca_file,
                               settings.ssl_passphrase_command, settings.ssl_passphrase_command_supports_reload))
    default = no_sni = None
    named: dict[str, HostTLS] = {}
    file = functools.partial(os.path.join, data_dir)    # relative names: the data directory's
    for line in lines:
        host = build(file(line.ssl_cert), file(line.ssl_key), file(line.ssl_ca) if line.ssl_ca else None,
                     line.passphrase_command, line.passphrase_command_reload)
        if line.special == DEFAULT_HOST:
            default = host
        elif line.special == NO_SNI:
            no_sni = host
        else:
            named.update((name.lower(), host) for name in line.hostnames)
    return ServerTLS(default, no_sni, named)


def _host_context(settings: Settings, cert_file: str, key_file: str, ca_file: str | None,
                  passphrase_command: str, passphrase_reload: bool, *, shown: Callable[[str], str],
                  db_uid: int, interactive: bool, reloading: bool) -> HostTLS:
    """One context with every start-up check; the protocol settings and CRLs are
    postgresql.conf's for every host, as in PostgreSQL."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    _openssl.clear_errors()

    _load_certificate_chain(ctx, cert_file, shown(cert_file))
    _check_key_file_permissions(key_file, shown(key_file), db_uid)
    _load_private_key(ctx, key_file, shown(key_file), passphrase_command, passphrase_reload,
                      interactive, reloading)
    if not _openssl.check_private_key(ctx):
        # OpenSSL already refused a mismatched key while loading it ("key values mismatch");
        # PostgreSQL checks again and so do we
        raise TLSSetupError(f"check of private key failed: {_openssl.error_reason()}")
    _set_protocol_range(ctx, settings.ssl_min_protocol_version, settings.ssl_max_protocol_version)
    _disable_resumption_compression_renegotiation(ctx)
    problem = _openssl.set_dh_parameters(ctx, _DH2048_PEM)
    if problem:
        raise TLSSetupError(problem)
    curves = settings.ssl_ecdh_curve or DEFAULT_CURVES
    if not _openssl.set_groups(ctx, curves):
        if settings.tls_settings_18:
            raise TLSSetupError("could not set group names specified in ssl_groups: No valid groups found",
                                hint="Ensure that each group name is spelled correctly and supported by the "
                                     "installed version of OpenSSL.")
        raise TLSSetupError(f"ECDH: unrecognized curve name: {curves}")
    _set_ciphers(ctx, settings.ssl_ciphers, settings.ssl_prefer_server_ciphers, settings.tls_settings_18)
    if settings.ssl_tls13_ciphers and not _openssl.set_tls13_ciphersuites(ctx, settings.ssl_tls13_ciphers):
        raise TLSSetupError("could not set the TLSv1.3 cipher suites (no valid ciphers available)")
    if ca_file:
        _request_client_certificates(ctx, ca_file, shown(ca_file))
    if settings.ssl_crl_file or settings.ssl_crl_dir:
        _load_crls(ctx, settings.ssl_crl_file, settings.ssl_crl_dir, shown)
    _openssl.require_postgresql_alpn(ctx)
    # OpenSSL frees a connection's record buffers while it has nothing buffered: an idle
    # client then costs a few KB instead of two 16 KB+ buffers
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    with open(cert_file, "rb") as f:
        certificate = x509.load_pem_x509_certificates(f.read())[0]
    return HostTLS(ctx, bool(ca_file), server_end_point_hash(certificate))


def server_end_point_hash(certificate: x509.Certificate) -> bytes:
    """SCRAM channel binding data, tls-server-end-point (RFC 5929): the server certificate
    hashed with its signature's hash, SHA-256 standing in for MD5 and SHA-1."""
    algorithm = certificate.signature_hash_algorithm
    if algorithm is None or algorithm.name in ("md5", "sha1"):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(certificate.public_bytes(serialization.Encoding.DER))
    return digest.finalize()


def _path_in_messages(path: str, data_dir: str) -> str:
    """Relative inside the data directory (PostgreSQL runs there), absolute elsewhere."""
    absolute = os.path.abspath(path)
    if absolute.startswith(data_dir + os.sep):
        return os.path.relpath(absolute, data_dir)
    return absolute


def _load_certificate_chain(ctx: SSL.Context, path: str, shown: str) -> None:
    if not _openssl.use_certificate_chain_file(ctx, path):
        raise TLSSetupError(f'could not load server certificate file "{shown}": {_openssl.error_reason()}')


def _check_key_file_permissions(path: str, shown: str, db_uid: int) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise TLSSetupError(f'could not access private key file "{shown}": {e.strerror}') from None
    if not stat.S_ISREG(st.st_mode):
        raise TLSSetupError(f'private key file "{shown}" is not a regular file')
    if st.st_uid not in (db_uid, 0):
        raise TLSSetupError(f'private key file "{shown}" must be owned by the database user or root')
    # root may let the database user's group read the key (0640), e.g. ssl-cert on Debian
    if (st.st_uid == db_uid and st.st_mode & 0o077) or (st.st_uid == 0 and st.st_mode & 0o037):
        raise TLSSetupError(
            f'private key file "{shown}" has group or world access',
            detail="File must have permissions u=rw (0600) or less if owned by the database user, "
                   "or permissions u=rw,g=r (0640) or less if owned by root.")


def _load_private_key(ctx: SSL.Context, key_file: str, shown: str, command: str, command_reloads: bool,
                      interactive: bool, reloading: bool) -> None:
    if reloading and not (command and command_reloads):
        def source() -> bytes:
            raise TLSSetupError(f'private key file "{shown}" cannot be reloaded because it requires a passphrase')
    else:
        source = _passphrase_source(command, shown, interactive)
    if not _openssl.use_private_key_file(ctx, key_file, source):
        raise TLSSetupError(f'could not load private key file "{shown}": {_openssl.error_reason()}')


def _passphrase_source(command: str, shown_key: str, interactive: bool) -> Callable[[], bytes]:
    """Where an encrypted key's passphrase comes from (OpenSSL asks once per load)."""
    def ask() -> bytes:
        if command:
            return _run_passphrase_command(command)
        if interactive:
            try:
                return getpass.getpass(PASSPHRASE_PROMPT).encode()
            except EOFError:   # Ctrl-D: no passphrase, and OpenSSL says what that means for the key
                return b""
        raise TLSSetupError(
            f'private key file "{shown_key}" requires a passphrase, but there is no terminal to '
            "enter it on and ssl_passphrase_command is not set",
            hint="Set ssl_passphrase_command, start pgfast from a terminal, "
                 "or remove the passphrase from the key.")

    return ask


def _run_passphrase_command(command: str) -> bytes:
    """Run ssl_passphrase_command as PostgreSQL does (popen: /bin/sh -c); its first line."""
    expanded = re.sub(r"%([p%])", lambda m: PASSPHRASE_PROMPT if m[1] == "p" else "%", command)
    try:
        result = subprocess.run(["/bin/sh", "-c", expanded], stdout=subprocess.PIPE)
    except OSError as e:
        raise TLSSetupError(f'could not execute command "{expanded}": {e.strerror}') from None
    if result.returncode != 0:
        raise TLSSetupError(f'command "{expanded}" failed', detail=_wait_result(result.returncode))
    return result.stdout.split(b"\n", 1)[0].rstrip(b"\r")


def _wait_result(returncode: int) -> str:
    """PostgreSQL's wait_result_to_str() for a subprocess return code."""
    if returncode < 0:
        number = -returncode
        return f"child process was terminated by signal {number}: {signal.strsignal(number)}"
    if returncode == 126:
        return "command not executable"
    if returncode == 127:
        return "command not found"
    return f"child process exited with exit code {returncode}"


def _protocol_version(setting: str, value: str) -> int:
    """OpenSSL's number for a version setting; 0 (no bound) for ''."""
    if not value:
        return 0
    try:
        return _PROTOCOL_VERSIONS[value.lower()]   # PostgreSQL's enum settings ignore case
    except KeyError:
        raise TLSSetupError(f'invalid value for parameter "{setting}": "{value}"',
                            hint="Available values: TLSv1, TLSv1.1, TLSv1.2, TLSv1.3.") from None


def _set_protocol_range(ctx: SSL.Context, min_setting: str, max_setting: str) -> None:
    minimum = _protocol_version("ssl_min_protocol_version", min_setting)
    maximum = _protocol_version("ssl_max_protocol_version", max_setting)
    refused = _openssl.set_protocol_bounds(ctx, minimum, maximum)
    if refused:
        raise TLSSetupError(f"could not set {refused} SSL protocol version")
    if minimum and maximum and minimum > maximum:
        raise TLSSetupError("could not set SSL protocol version range",
                            detail='"ssl_min_protocol_version" cannot be higher than "ssl_max_protocol_version"')


def _disable_resumption_compression_renegotiation(ctx: SSL.Context) -> None:
    # PostgreSQL also calls SSL_CTX_set_num_tickets(0), which cryptography's bindings lack:
    # TLS 1.3 clients still get two stateful tickets, useless with the session cache off
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)


def _set_ciphers(ctx: SSL.Context, ciphers: str, prefer_server_ciphers: bool, wording_18: bool) -> None:
    try:
        ctx.set_cipher_list(ciphers.encode())
    except SSL.Error:
        which = "TLSv1.2 cipher list" if wording_18 else "cipher list"
        raise TLSSetupError(f"could not set the {which} (no valid ciphers available)") from None
    if prefer_server_ciphers:
        ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)


def _request_client_certificates(ctx: SSL.Context, ca_file: str, shown: str) -> None:
    """Trust ca_file for client certificates and name its CAs in the CertificateRequest."""
    if not _openssl.load_verify_locations(ctx, ca_file) or not _openssl.set_client_ca_names(ctx, ca_file):
        raise TLSSetupError(f'could not load root certificate file "{shown}": {_openssl.error_reason()}')
    _openssl.request_client_certificates(ctx)


def _load_crls(ctx: SSL.Context, crl_file: str | None, crl_dir: str | None,
               shown: Callable[[str], str]) -> None:
    if _openssl.load_crls(ctx, crl_file, crl_dir):
        return
    if not crl_dir:
        raise TLSSetupError(f'could not load SSL certificate revocation list file "{shown(crl_file)}": '
                            f"{_openssl.error_reason()}")
    if not crl_file:
        raise TLSSetupError(f'could not load SSL certificate revocation list directory "{shown(crl_dir)}": '
                            f"{_openssl.error_reason()}")
    raise TLSSetupError(f'could not load SSL certificate revocation list file "{shown(crl_file)}" '
                        f'or directory "{shown(crl_dir)}": {_openssl.error_reason()}')


def _loggable_name(entries: list[tuple[str, str]]) -> str:
    """PostgreSQL's prepare_cert_name(X509_NAME_to_cstring(name)): "/CN=..." form, the last
    71 characters at most, and bytes outside printable ASCII escaped as \\xNN, so a hostile
    certificate can neither flood the log nor write control characters into it."""
    text = "".join(f"/{field}={_escape_rfc2253(value)}" for field, value in entries).encode()
    if len(text) > 71:
        text = b"..." + text[-68:]   # the end holds the most specific field, usually the CN
    return "".join(chr(b) if 32 <= b <= 126 else f"\\x{b:02x}" for b in text)


def _slash_form(entries: list[tuple[str, str]] | None) -> str | None:
    """X509_NAME_to_cstring's "/CN=..." form, as pg_stat_ssl shows a name."""
    if entries is None:
        return None
    return "".join(f"/{field}={value}" for field, value in entries)


def _escape_rfc2253(value: str) -> str:
    """ASN1_STRING_print_ex with PostgreSQL's flags (RFC 2253 escapes, control characters)."""
    escaped = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            escaped.append("\\" + ch)
        elif ord(ch) < 32 or ord(ch) == 127:
            escaped.append(f"\\{ord(ch):02X}")
        else:
            escaped.append(ch)
    return "".join(escaped)


# --- the pump's self-check ---------------------------------------------------------------

def _self_signed_context() -> SSL.Context:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pgfast self-check")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate(cert)
    ctx.use_privatekey(key)
    return ctx


def _client_step(client: SSL.Connection, data: bytes) -> bytes:
    if data:
        client.bio_write(data)
    try:
        client.do_handshake()
    except SSL.WantReadError:
        pass
    try:
        return client.bio_read(1 << 20)
    except SSL.WantReadError:
        return b""


def self_check() -> None:
    """Handshake a pump with a pyOpenSSL client in memory, then move data both ways and
    compare: a pyOpenSSL or cryptography release that breaks what _openssl relies on fails
    here, loudly, before any client is served."""
    session = TLSSession(_self_signed_context())
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    to_server = _client_step(client, b"")
    try:
        for _ in range(10):
            done = session.pump.handshake(to_server)
            to_server = _client_step(client, session.pump.pending_ciphertext())
            if done:
                break
        else:
            raise TLSError("the handshake did not complete")
        message = bytes(range(256)) * 300    # spans several records
        client.sendall(message)
        received = session.pump.decrypt(to_server + client.bio_read(1 << 20))
        client.bio_write(session.pump.encrypt(received))
        echoed = b""
        while len(echoed) < len(message):
            echoed += client.recv(1 << 20)
    except (TLSError, SSL.Error) as exc:
        raise TLSSetupError(f"pgfast's TLS pump failed its self-check: {exc}") from None
    if received != message or echoed != message:
        raise TLSSetupError("pgfast's TLS pump failed its self-check: data did not round-trip")


# --- pgfast as a client: TLS to an upstream PostgreSQL, as libpq does it -----------------

_VERIFYING_MODES = ("verify-ca", "verify-full")


class ClientTLS:
    """The context for every connection to the upstream servers, and libpq's checks of
    what they present (fe-secure-openssl.c, fe-secure-common.c). One per conninfo: its
    sslmode, sslrootcert, sslcert/sslkey, sslcrl and protocol range."""

    def __init__(self, context: SSL.Context, verify_name: bool, sni: bool):
        self.context = context
        self.verify_name = verify_name      # verify-full: the certificate must name the host
        self.sni = sni

    def new_session(self, host: str) -> TLSSession:
        session = TLSSession(self.context)
        session.connection.set_connect_state()
        if self.sni and not _is_ip_address(host):
            # libpq sends the host name, never an address (RFC 6066 forbids literals)
            session.connection.set_tlsext_host_name(host.encode("idna"))
        return session

    def check_peer(self, session: TLSSession, host: str) -> str | None:
        """After the handshake: libpq's error for a certificate that does not name host."""
        if not self.verify_name:
            return None
        certificate = session.connection.get_peer_certificate(as_cryptography=True)
        if certificate is None:
            return "could not get server's host name from server certificate"
        return peer_name_problem(certificate, host)


def load_client_tls(options, home: str | None = None) -> ClientTLS:
    """The context for conninfo options (a conninfo.Upstream), or TLSSetupError with
    libpq's words for a file it cannot use."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    _openssl.clear_errors()
    home_file = functools.partial(os.path.join, os.path.expanduser("~") if home is None else home, ".postgresql")
    # libpq's default minimum is TLSv1.2
    bounds = {"minimum": options.options.get("ssl_min_protocol_version") or "TLSv1.2",
              "maximum": options.options.get("ssl_max_protocol_version") or ""}
    for which, value in bounds.items():
        if value and value.lower() not in _PROTOCOL_VERSIONS:
            raise TLSSetupError(f'invalid value "{value}" for {which} SSL protocol version')
    refused = _openssl.set_protocol_bounds(ctx, *(_PROTOCOL_VERSIONS[v.lower()] if v else 0 for v in bounds.values()))
    if refused:
        raise TLSSetupError(f'invalid value "{bounds[refused]}" for {refused} SSL protocol version')
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET)
    ctx.set_alpn_protos([ALPN_PROTOCOL])
    root = options.sslrootcert or home_file("root.crt")
    verify = options.sslmode in _VERIFYING_MODES
    if options.sslrootcert == "system":
        ctx.set_default_verify_paths()
        verify = True
    elif os.path.exists(root):
        # as libpq: a root certificate that exists is used, in every sslmode that has TLS
        if not _openssl.load_verify_locations(ctx, root):
            raise TLSSetupError(f'could not read root certificate file "{root}": {_openssl.error_reason()}')
        verify = True
        crl = options.sslcrl or home_file("root.crl")
        crl_dir = options.options.get("sslcrldir")
        crl = crl if os.path.exists(crl) else None
        if (crl or crl_dir) and not _openssl.load_crls(ctx, crl, crl_dir):
            raise TLSSetupError(f'could not load SSL certificate revocation list file "{crl or crl_dir}": '
                                f"{_openssl.error_reason()}")
    elif verify:
        raise TLSSetupError(f'root certificate file "{root}" does not exist',
                            hint="Either provide the file, use the system's trusted roots with sslrootcert=system, "
                                 "or change sslmode to disable server certificate verification.")
    ctx.set_verify(SSL.VERIFY_PEER if verify else SSL.VERIFY_NONE)
    _load_client_certificate(ctx, options.sslcert or home_file("postgresql.crt"),
                             options.sslkey or home_file("postgresql.key"), given=bool(options.sslcert))
    return ClientTLS(ctx, verify_name=options.sslmode == "verify-full", sni=options.sslsni)


def _load_client_certificate(ctx: SSL.Context, cert_file: str, key_file: str, given: bool) -> None:
    if not os.path.exists(cert_file):
        if given:
            raise TLSSetupError(f'could not open certificate file "{cert_file}": No such file or directory')
        return          # as libpq: no certificate to offer
    if not _openssl.use_certificate_chain_file(ctx, cert_file):
        raise TLSSetupError(f'could not read certificate file "{cert_file}": {_openssl.error_reason()}')
    try:
        st = os.stat(key_file)
    except FileNotFoundError:
        raise TLSSetupError(f'certificate present, but not private key file "{key_file}"') from None
    owned_by_root = st.st_uid == 0
    if (st.st_mode & (0o037 if owned_by_root else 0o077)) != 0:
        raise TLSSetupError(f'private key file "{key_file}" has group or world access; file must have permissions '
                            "u=rw (0600) or less if owned by the current user, or permissions u=rw,g=r (0640) or "
                            "less if owned by root")

    def no_passphrase() -> bytes:
        return b""
    if not _openssl.use_private_key_file(ctx, key_file, no_passphrase) or not _openssl.check_private_key(ctx):
        raise TLSSetupError(f'could not load private key file "{key_file}": {_openssl.error_reason()}')


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def peer_name_problem(certificate: x509.Certificate, host: str) -> str | None:
    """libpq's verify-full check (pq_verify_peer_name_matches_certificate): dNSName and
    iPAddress SANs, the CN only when no SAN of the host's kind exists; None if it matches."""
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = None
    as_address = _is_ip_address(host)
    names: list[str] = []
    found = False
    dns_names = sans.get_values_for_type(x509.DNSName) if sans else []
    addresses = sans.get_values_for_type(x509.IPAddress) if sans else []
    for name in dns_names:
        names.append(name)
        found = found or (not as_address and _dns_name_matches(name, host))
    for address in addresses:
        names.append(str(address))
        found = found or (as_address and address == ipaddress.ip_address(host))
    if (not as_address and not dns_names) or (as_address and not addresses):
        common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if common_names:
            cn = str(common_names[0].value)
            names.append(cn)
            found = found or _dns_name_matches(cn, host)
    if found:
        return None
    if not names:
        return "could not get server's host name from server certificate"
    if len(names) == 1:
        return f'server certificate for "{names[0]}" does not match host name "{host}"'
    others = len(names) - 1
    return (f'server certificate for "{names[0]}" (and {others} other name{"s" if others > 1 else ""}) '
            f'does not match host name "{host}"')


def _dns_name_matches(pattern: str, host: str) -> bool:
    """libpq's wildcard_certificate_match: case-insensitive, "*." only as the first label,
    matching one label."""
    pattern, host = pattern.lower(), host.lower()
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return host.endswith(suffix) and len(host) > len(suffix) and "." not in host[:-len(suffix)]
    return pattern == host
