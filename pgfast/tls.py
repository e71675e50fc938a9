"""The server TLS context, loaded and checked the way PostgreSQL's be_tls_init() does at start.

Checks run in PostgreSQL's order (be-secure-openssl.c): certificate chain, key file
permissions, private key (asking for a passphrase only when the key is encrypted), key
against certificate, protocol range, session options, DH and ECDH groups, cipher list, CA
file, CRLs. Each failure is a TLSSetupError worded as PostgreSQL words it, naming the file
relative to the data directory when it is inside it (as users of PostgreSQL see
"server.crt"), absolute otherwise.

Where pyOpenSSL has no wrapper, or its wrapper loses what PostgreSQL reports (an OpenSSL
system error's errno, the first queued reason), this module calls the OpenSSL functions
cryptography's bindings expose, on the pyOpenSSL Context's SSL_CTX.
"""
from __future__ import annotations

import functools
import getpass
import os
import re
import signal
import stat
import subprocess
import weakref
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.bindings.openssl.binding import Binding
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import SSL, crypto

from pgfast.config import Settings
from pgfast.errors import TLSSetupError

_binding = Binding()
_ffi = _binding.ffi
_lib = _binding.lib

PASSPHRASE_PROMPT = "Enter PEM pass phrase:"   # OpenSSL's own prompt, which PostgreSQL passes as %p
ALPN_PROTOCOL = b"postgresql"
# PostgreSQL 18's ssl_groups default. PostgreSQL 15's prime256v1 alone makes every OpenSSL
# client that offers X25519 first pay a HelloRetryRequest round trip.
DEFAULT_CURVES = "X25519:prime256v1"

_PROTOCOL_VERSIONS = {
    "tlsv1": SSL.TLS1_VERSION,
    "tlsv1.1": SSL.TLS1_1_VERSION,
    "tlsv1.2": SSL.TLS1_2_VERSION,
    "tlsv1.3": SSL.TLS1_3_VERSION,
}

# OpenSSL 3 marks an errno pushed on the error queue with this bit (ERR_SYSTEM_FLAG).
_ERR_SYSTEM_FLAG = 0x80000000
_ERR_SYSTEM_MASK = 0x7FFFFFFF

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

# A handshake failed by the verify callback always ends with this OpenSSL reason.
_VERIFY_FAILED_MESSAGE = "could not accept SSL connection: certificate verify failed"
_verify_failure_details: weakref.WeakKeyDictionary[SSL.Connection, str] = weakref.WeakKeyDictionary()


class ServerTLS:
    """A checked server context; one Connection per client, over memory BIOs."""

    def __init__(self, context: SSL.Context, requests_client_cert: bool, certificate: x509.Certificate):
        self.context = context
        self.requests_client_cert = requests_client_cert   # a CA file is in force
        self.server_end_point = server_end_point_hash(certificate)

    def new_connection(self) -> SSL.Connection:
        conn = SSL.Connection(self.context, None)
        conn.set_accept_state()
        return conn


def load_server_tls(settings: Settings, *, db_uid: int, interactive: bool) -> ServerTLS:
    """Build the server context from settings, or raise TLSSetupError as PostgreSQL would.

    db_uid is the user the key file must belong to (besides root); interactive says a
    passphrase may be asked for on the terminal (the caller passes stdin.isatty()).
    """
    shown = functools.partial(_path_in_messages, data_dir=os.path.abspath(settings.data_dir))
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    _lib.ERR_clear_error()

    _load_certificate_chain(ctx, settings.ssl_cert_file, shown(settings.ssl_cert_file))
    _check_key_file_permissions(settings.ssl_key_file, shown(settings.ssl_key_file), db_uid)
    _load_private_key(ctx, settings, shown(settings.ssl_key_file), interactive)
    _check_private_key(ctx)
    _set_protocol_range(ctx, settings.ssl_min_protocol_version, settings.ssl_max_protocol_version)
    _disable_resumption_compression_renegotiation(ctx)
    _set_dh_parameters(ctx)
    _set_curves(ctx, settings.ssl_ecdh_curve or DEFAULT_CURVES)
    _set_ciphers(ctx, settings.ssl_ciphers, settings.ssl_prefer_server_ciphers)
    if settings.ssl_ca_file:
        _request_client_certificates(ctx, settings.ssl_ca_file, shown(settings.ssl_ca_file))
    if settings.ssl_crl_file or settings.ssl_crl_dir:
        _load_crls(ctx, settings.ssl_crl_file, settings.ssl_crl_dir, shown)
    _lib.SSL_CTX_set_alpn_select_cb(ctx._context, _select_postgresql_alpn, _ffi.NULL)
    with open(settings.ssl_cert_file, "rb") as f:
        certificate = x509.load_pem_x509_certificates(f.read())[0]
    return ServerTLS(ctx, bool(settings.ssl_ca_file), certificate)


def server_end_point_hash(certificate: x509.Certificate) -> bytes:
    """SCRAM channel binding data, tls-server-end-point (RFC 5929): the server certificate
    hashed with its signature's hash, SHA-256 standing in for MD5 and SHA-1."""
    algorithm = certificate.signature_hash_algorithm
    if algorithm is None or algorithm.name in ("md5", "sha1"):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(certificate.public_bytes(serialization.Encoding.DER))
    return digest.finalize()


def verify_failure(conn: SSL.Connection) -> tuple[str, str] | None:
    """(message, detail) for the server log when the client certificate failed verification."""
    detail = _verify_failure_details.get(conn)
    return (_VERIFY_FAILED_MESSAGE, detail) if detail is not None else None


def peer_certificate_cn(conn: SSL.Connection) -> str | None:
    """The first CN of the client certificate (verified, or the handshake would have failed)."""
    cert = conn.get_peer_certificate(as_cryptography=True)
    if cert is None:
        return None
    common_names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(common_names[0].value) if common_names else None


def alpn_protocol(conn: SSL.Connection) -> bytes | None:
    return conn.get_alpn_proto_negotiated() or None


def _path_in_messages(path: str, data_dir: str) -> str:
    """Relative inside the data directory (PostgreSQL runs there), absolute elsewhere."""
    absolute = os.path.abspath(path)
    if absolute.startswith(data_dir + os.sep):
        return os.path.relpath(absolute, data_dir)
    return absolute


def _openssl_error() -> str:
    """PostgreSQL's SSLerrmessage(ERR_get_error()): the oldest queued reason.

    The rest of the queue is cleared so it cannot be taken for the cause of a later failure.
    """
    code = _lib.ERR_get_error()
    _lib.ERR_clear_error()
    if code == 0:
        return "no SSL error reported"
    reason = _lib.ERR_reason_error_string(code)
    if reason != _ffi.NULL:
        return _ffi.string(reason).decode()
    if code & _ERR_SYSTEM_FLAG:
        return os.strerror(code & _ERR_SYSTEM_MASK)
    return f"SSL error code {code}"


def _load_certificate_chain(ctx: SSL.Context, path: str, shown: str) -> None:
    if _lib.SSL_CTX_use_certificate_chain_file(ctx._context, os.fsencode(path)) != 1:
        raise TLSSetupError(f'could not load server certificate file "{shown}": {_openssl_error()}')


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


def _load_private_key(ctx: SSL.Context, settings: Settings, shown: str, interactive: bool) -> None:
    """SSL_CTX_use_PrivateKey_file with a passphrase callback OpenSSL calls only for an encrypted key."""
    source = _passphrase_source(settings.ssl_passphrase_command, shown, interactive)
    failures: list[BaseException] = []

    @_ffi.callback("int (*)(char *, int, int, void *)")
    def passphrase_callback(buf, size, rwflag, userdata):
        try:
            passphrase = source()[:size]   # PostgreSQL's fgets() truncates to the buffer too
        except BaseException as e:  # an exception must not unwind through OpenSSL: re-raised below
            failures.append(e)
            return -1
        _ffi.memmove(buf, passphrase, len(passphrase))
        return len(passphrase)

    # always ours: OpenSSL's default callback would prompt on /dev/tty and could wait forever
    _lib.SSL_CTX_set_default_passwd_cb(ctx._context, passphrase_callback)
    try:
        loaded = _lib.SSL_CTX_use_PrivateKey_file(ctx._context, os.fsencode(settings.ssl_key_file),
                                                  SSL.FILETYPE_PEM)
    finally:
        _lib.SSL_CTX_set_default_passwd_cb(ctx._context, _ffi.NULL)
    reason = _openssl_error() if loaded != 1 else None
    if failures:
        raise failures[0]
    if reason is not None:
        raise TLSSetupError(f'could not load private key file "{shown}": {reason}')


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


def _check_private_key(ctx: SSL.Context) -> None:
    # OpenSSL already refused a mismatched key while loading it ("key values mismatch");
    # PostgreSQL checks again and so do we
    if _lib.SSL_CTX_check_private_key(ctx._context) != 1:
        raise TLSSetupError(f"check of private key failed: {_openssl_error()}")


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
    if minimum and _lib.SSL_CTX_set_min_proto_version(ctx._context, minimum) != 1:
        _lib.ERR_clear_error()
        raise TLSSetupError("could not set minimum SSL protocol version")
    if maximum and _lib.SSL_CTX_set_max_proto_version(ctx._context, maximum) != 1:
        _lib.ERR_clear_error()
        raise TLSSetupError("could not set maximum SSL protocol version")
    if minimum and maximum and minimum > maximum:
        raise TLSSetupError("could not set SSL protocol version range",
                            detail='"ssl_min_protocol_version" cannot be higher than "ssl_max_protocol_version"')


def _disable_resumption_compression_renegotiation(ctx: SSL.Context) -> None:
    # PostgreSQL also calls SSL_CTX_set_num_tickets(0), which cryptography's bindings lack:
    # TLS 1.3 clients still get two stateful tickets, useless with the session cache off
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)


def _set_dh_parameters(ctx: SSL.Context) -> None:
    bio = _lib.BIO_new_mem_buf(_DH2048_PEM, len(_DH2048_PEM))
    dh = _lib.PEM_read_bio_DHparams(bio, _ffi.NULL, _ffi.NULL, _ffi.NULL)
    _lib.BIO_free(bio)
    if dh == _ffi.NULL:
        _lib.ERR_clear_error()
        raise TLSSetupError("DH: could not load DH parameters")
    try:
        if _lib.SSL_CTX_set_tmp_dh(ctx._context, dh) != 1:
            raise TLSSetupError(f"DH: could not set DH parameters: {_openssl_error()}")
    finally:
        _lib.DH_free(dh)


def _set_curves(ctx: SSL.Context, curves: str) -> None:
    if _lib.SSL_CTX_set1_curves_list(ctx._context, curves.encode()) != 1:
        _lib.ERR_clear_error()
        # PostgreSQL 15's wording for ssl_ecdh_curve (18 reports the same under ssl_groups)
        raise TLSSetupError(f"ECDH: unrecognized curve name: {curves}")


def _set_ciphers(ctx: SSL.Context, ciphers: str, prefer_server_ciphers: bool) -> None:
    try:
        ctx.set_cipher_list(ciphers.encode())
    except SSL.Error:
        raise TLSSetupError("could not set the cipher list (no valid ciphers available)") from None
    if prefer_server_ciphers:
        ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)


def _request_client_certificates(ctx: SSL.Context, ca_file: str, shown: str) -> None:
    """Trust ca_file for client certificates and name its CAs in the CertificateRequest.

    VERIFY_PEER without VERIFY_FAIL_IF_NO_PEER_CERT: a client without a certificate still
    completes the handshake, and pg_hba decides later (as in PostgreSQL).
    """
    path = os.fsencode(ca_file)
    if _lib.SSL_CTX_load_verify_locations(ctx._context, path, _ffi.NULL) != 1:
        raise TLSSetupError(f'could not load root certificate file "{shown}": {_openssl_error()}')
    ca_names = _lib.SSL_load_client_CA_file(path)
    if ca_names == _ffi.NULL:
        raise TLSSetupError(f'could not load root certificate file "{shown}": {_openssl_error()}')
    _lib.SSL_CTX_set_client_CA_list(ctx._context, ca_names)   # the context owns the list now
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _record_verify_failure)


def _load_crls(ctx: SSL.Context, crl_file: str | None, crl_dir: str | None,
               shown: Callable[[str], str]) -> None:
    """CRLs (file, hashed directory or both) into the store PostgreSQL's way."""
    store = _lib.SSL_CTX_get_cert_store(ctx._context)
    loaded = _lib.X509_STORE_load_locations(
        store, os.fsencode(crl_file) if crl_file else _ffi.NULL,
        os.fsencode(crl_dir) if crl_dir else _ffi.NULL)
    if loaded == 1:
        # the whole chain, not just the leaf, as PostgreSQL asks
        _lib.X509_STORE_set_flags(store, _lib.X509_V_FLAG_CRL_CHECK | _lib.X509_V_FLAG_CRL_CHECK_ALL)
    elif not crl_dir:
        raise TLSSetupError(f'could not load SSL certificate revocation list file "{shown(crl_file)}": '
                            f"{_openssl_error()}")
    elif not crl_file:
        raise TLSSetupError(f'could not load SSL certificate revocation list directory "{shown(crl_dir)}": '
                            f"{_openssl_error()}")
    else:
        raise TLSSetupError(f'could not load SSL certificate revocation list file "{shown(crl_file)}" '
                            f'or directory "{shown(crl_dir)}": {_openssl_error()}')


def _record_verify_failure(conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int,
                           ok: int) -> bool:
    """PostgreSQL's verify_cb: OpenSSL's verdict unchanged; on failure, keep a detail for the log."""
    if not ok:
        reason = _ffi.string(_lib.X509_verify_cert_error_string(errnum)).decode()
        failed = cert.to_cryptography()
        _verify_failure_details[conn] = (
            f"Client certificate verification failed at depth {depth}: {reason}.\n"
            f'Failed certificate data (unverified): subject "{_loggable_name(failed.subject)}", '
            f'serial number {failed.serial_number}, issuer "{_loggable_name(failed.issuer)}".')
    return bool(ok)


def _loggable_name(name: x509.Name) -> str:
    """PostgreSQL's prepare_cert_name(X509_NAME_to_cstring(name)): "/CN=..." form, the last
    71 characters at most, and bytes outside printable ASCII escaped as \\xNN, so a hostile
    certificate can neither flood the log nor write control characters into it."""
    text = "".join(f"/{_short_name(attribute.oid)}={_escape_rfc2253(str(attribute.value))}"
                   for attribute in name).encode()
    if len(text) > 71:
        text = b"..." + text[-68:]   # the end holds the most specific field, usually the CN
    return "".join(chr(b) if 32 <= b <= 126 else f"\\x{b:02x}" for b in text)


def _short_name(oid: x509.ObjectIdentifier) -> str:
    nid = _lib.OBJ_txt2nid(oid.dotted_string.encode())
    short = _lib.OBJ_nid2sn(nid) if nid else _ffi.NULL
    return _ffi.string(short).decode() if short != _ffi.NULL else oid.dotted_string


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


# Set with SSL_CTX_set_alpn_select_cb directly: pyOpenSSL's NO_OVERLAPPING_PROTOCOLS answers
# SSL_TLSEXT_ERR_NOACK, which carries on without ALPN instead of refusing. One module-level
# callback serves every context, so it lives as long as any Connection that may call it.
@_ffi.callback("int (*)(SSL *, unsigned char **, unsigned char *, const unsigned char *, unsigned int, void *)")
def _select_postgresql_alpn(ssl, out, outlen, offered, offered_len, arg):
    """PostgreSQL's alpn_cb: choose "postgresql", or fail the handshake with the fatal alert
    no_application_protocol when the client offers only other protocols."""
    protocols = _ffi.buffer(offered, offered_len)[:]
    position = 0
    while position < len(protocols):
        length = protocols[position]
        if protocols[position + 1:position + 1 + length] == ALPN_PROTOCOL:
            # point into the client's list, as SSL_select_next_proto does: OpenSSL copies it
            out[0] = _ffi.cast("unsigned char *", offered) + position + 1
            outlen[0] = length
            return _lib.SSL_TLSEXT_ERR_OK
        position += 1 + length
    return _lib.SSL_TLSEXT_ERR_ALERT_FATAL
