"""The one place that reaches below pyOpenSSL's public API.

pgfast calls OpenSSL where pyOpenSSL has no wrapper, or where its wrapper loses what
PostgreSQL reports (an OpenSSL system error's errno, the first queued reason), and the
TLS pump (pgfast._pump) drives the SSL* and memory BIOs of a pyOpenSSL Connection
itself. Every such call goes through this module, on the bindings cryptography ships
(so there is a single OpenSSL copy, and wheels need no system libssl):

- every symbol used is resolved when this module is imported; one that is missing is
  a start-up error naming it (cryptography trims its bindings from time to time);
- pyOpenSSL's private attributes (Context._context, Connection._ssl/_into_ssl/
  _from_ssl) are read here only, and pyproject.toml pins the versions they were
  checked on;
- every callback OpenSSL makes into Python is total: whatever happens inside, it
  returns a decision (the verify callback OpenSSL's own verdict, the ALPN callback a
  fatal alert), and what it learns about a connection is kept on that connection's
  holder (see register()), never on the shared context.
"""
from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

from .errors import TLSSetupError

_binding = Binding()
_ffi = _binding.ffi
_lib = _binding.lib

_REQUIRED = (
    # the pump
    "SSL_read", "SSL_write", "BIO_read", "BIO_write", "SSL_get_error", "SSL_shutdown", "SSL_do_handshake",
    "ERR_get_error", "ERR_clear_error", "ERR_reason_error_string",
    # the server context's start-up checks
    "SSL_CTX_use_certificate_chain_file", "SSL_CTX_use_PrivateKey_file", "SSL_CTX_set_default_passwd_cb",
    "SSL_CTX_check_private_key", "SSL_CTX_set_min_proto_version", "SSL_CTX_set_max_proto_version",
    "BIO_new_mem_buf", "BIO_free", "PEM_read_bio_DHparams", "SSL_CTX_set_tmp_dh", "DH_free",
    "SSL_CTX_set1_curves_list", "SSL_CTX_set_ciphersuites", "SSL_CTX_load_verify_locations", "SSL_load_client_CA_file",
    "SSL_CTX_set_client_CA_list", "SSL_CTX_set_verify", "SSL_CTX_get_cert_store", "X509_STORE_load_locations",
    "X509_STORE_set_flags", "SSL_CTX_set_alpn_select_cb",
    # callbacks and questions about a connection's certificates
    "X509_STORE_CTX_get_ex_data", "SSL_get_ex_data_X509_STORE_CTX_idx", "X509_STORE_CTX_get_current_cert",
    "X509_STORE_CTX_get_error", "X509_STORE_CTX_get_error_depth", "X509_verify_cert_error_string",
    "SSL_get_peer_certificate", "X509_free", "X509_get_subject_name", "X509_get_issuer_name",
    "X509_get_serialNumber", "X509_NAME_entry_count", "X509_NAME_get_entry", "X509_NAME_ENTRY_get_object",
    "X509_NAME_ENTRY_get_data", "OBJ_obj2nid", "OBJ_nid2sn", "OBJ_nid2ln", "ASN1_STRING_to_UTF8",
    "OPENSSL_free", "ASN1_INTEGER_to_BN", "BN_bn2hex", "BN_free",
    # server name indication
    "SSL_CTX_set_tlsext_servername_callback", "SSL_get_servername", "SSL_set_verify",
)
_CONSTANTS = ("SSL_TLSEXT_ERR_OK", "SSL_TLSEXT_ERR_ALERT_FATAL", "X509_V_FLAG_CRL_CHECK",
              "X509_V_FLAG_CRL_CHECK_ALL", "SSL_VERIFY_PEER", "SSL_VERIFY_CLIENT_ONCE", "SSL_VERIFY_NONE",
              "TLSEXT_NAMETYPE_host_name")


def _check_bindings() -> None:
    for name in _REQUIRED + _CONSTANTS:
        if not hasattr(_lib, name):
            raise TLSSetupError(f'OpenSSL function "{name}" is not available in cryptography\'s bindings',
                                hint="Install a cryptography version in the range pgfast declares.")


_check_bindings()

# OpenSSL 3 marks an errno pushed on the error queue with this bit (ERR_SYSTEM_FLAG).
_ERR_SYSTEM_FLAG = 0x80000000
_ERR_SYSTEM_MASK = 0x7FFFFFFF


# --- for the pump (pgfast._pump) -------------------------------------------------------

def _address(cdata) -> int:
    return int(_ffi.cast("uintptr_t", cdata))


def function_addresses(names: tuple[str, ...]) -> dict[str, int]:
    return {name: _address(getattr(_lib, name)) for name in names}


def connection_pointers(conn: SSL.Connection) -> tuple[int, int, int]:
    """(SSL*, BIO* in, BIO* out) of a Connection made on memory BIOs."""
    if conn._into_ssl is None or conn._from_ssl is None:
        raise TypeError("the connection is not on memory BIOs (make it with Connection(ctx, None))")
    return _address(conn._ssl), _address(conn._into_ssl), _address(conn._from_ssl)


# --- errors --------------------------------------------------------------------------------

def clear_errors() -> None:
    _lib.ERR_clear_error()


def error_reason() -> str:
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


# --- the server context ----------------------------------------------------------------

def use_certificate_chain_file(ctx: SSL.Context, path: str) -> bool:
    return _lib.SSL_CTX_use_certificate_chain_file(ctx._context, os.fsencode(path)) == 1


def use_private_key_file(ctx: SSL.Context, path: str, passphrase: Callable[[], bytes]) -> bool:
    """SSL_CTX_use_PrivateKey_file with a passphrase callback OpenSSL calls only for an
    encrypted key. An exception from `passphrase` is re-raised here, after OpenSSL is done."""
    failures: list[BaseException] = []

    def on_error(exc_type, exc, tb):
        failures.append(exc)

    @_ffi.callback("int (*)(char *, int, int, void *)", error=-1, onerror=on_error)
    def callback(buf, size, rwflag, userdata):
        secret = passphrase()[:size]   # PostgreSQL's fgets() truncates to the buffer too
        _ffi.memmove(buf, secret, len(secret))
        return len(secret)

    # always ours: OpenSSL's default callback would prompt on /dev/tty and could wait forever
    _lib.SSL_CTX_set_default_passwd_cb(ctx._context, callback)
    try:
        loaded = _lib.SSL_CTX_use_PrivateKey_file(ctx._context, os.fsencode(path), SSL.FILETYPE_PEM) == 1
    finally:
        _lib.SSL_CTX_set_default_passwd_cb(ctx._context, _ffi.NULL)
    if failures:
        _lib.ERR_clear_error()
        raise failures[0]
    return loaded


def check_private_key(ctx: SSL.Context) -> bool:
    return _lib.SSL_CTX_check_private_key(ctx._context) == 1


def set_protocol_bounds(ctx: SSL.Context, minimum: int, maximum: int) -> str | None:
    """None, or which bound OpenSSL refused ('minimum'/'maximum'); 0 means no bound."""
    if minimum and _lib.SSL_CTX_set_min_proto_version(ctx._context, minimum) != 1:
        _lib.ERR_clear_error()
        return "minimum"
    if maximum and _lib.SSL_CTX_set_max_proto_version(ctx._context, maximum) != 1:
        _lib.ERR_clear_error()
        return "maximum"
    return None


def set_dh_parameters(ctx: SSL.Context, pem: bytes) -> str | None:
    """None, or what went wrong (PostgreSQL's words) setting these DH parameters."""
    bio = _lib.BIO_new_mem_buf(pem, len(pem))
    dh = _lib.PEM_read_bio_DHparams(bio, _ffi.NULL, _ffi.NULL, _ffi.NULL)
    _lib.BIO_free(bio)
    if dh == _ffi.NULL:
        _lib.ERR_clear_error()
        return "DH: could not load DH parameters"
    try:
        if _lib.SSL_CTX_set_tmp_dh(ctx._context, dh) != 1:
            return f"DH: could not set DH parameters: {error_reason()}"
    finally:
        _lib.DH_free(dh)
    return None


def set_groups(ctx: SSL.Context, groups: str) -> bool:
    # SSL_CTX_set1_groups_list is a macro for the same call in OpenSSL 3
    if _lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode()) != 1:
        _lib.ERR_clear_error()
        return False
    return True


def set_tls13_ciphersuites(ctx: SSL.Context, suites: str) -> bool:
    if _lib.SSL_CTX_set_ciphersuites(ctx._context, suites.encode()) != 1:
        _lib.ERR_clear_error()
        return False
    return True


def load_verify_locations(ctx: SSL.Context, ca_file: str) -> bool:
    return _lib.SSL_CTX_load_verify_locations(ctx._context, os.fsencode(ca_file), _ffi.NULL) == 1


def set_client_ca_names(ctx: SSL.Context, ca_file: str) -> bool:
    """The CA names a CertificateRequest lists, from ca_file."""
    names = _lib.SSL_load_client_CA_file(os.fsencode(ca_file))
    if names == _ffi.NULL:
        return False
    _lib.SSL_CTX_set_client_CA_list(ctx._context, names)   # the context owns the list now
    return True


def load_crls(ctx: SSL.Context, crl_file: str | None, crl_dir: str | None) -> bool:
    """CRLs (file, hashed directory or both) into the store, checked for the whole chain."""
    store = _lib.SSL_CTX_get_cert_store(ctx._context)
    loaded = _lib.X509_STORE_load_locations(
        store, os.fsencode(crl_file) if crl_file else _ffi.NULL, os.fsencode(crl_dir) if crl_dir else _ffi.NULL)
    if loaded != 1:
        return False
    _lib.X509_STORE_set_flags(store, _lib.X509_V_FLAG_CRL_CHECK | _lib.X509_V_FLAG_CRL_CHECK_ALL)
    return True


# --- per connection: what the callbacks learn is kept on the connection's holder ---------

# SSL* address -> the object a connection keeps its TLS facts on (tls.TLSSession). Weak:
# an entry lives exactly as long as its holder, which owns the SSL* through pyOpenSSL.
_holders: weakref.WeakValueDictionary[int, object] = weakref.WeakValueDictionary()


def register(conn: SSL.Connection, holder) -> None:
    """Callbacks for conn report to holder (its verify_failure attribute)."""
    _holders[_address(conn._ssl)] = holder


@dataclass(frozen=True)
class VerifyFailure:
    """What PostgreSQL's verify_cb logs about the certificate that failed verification."""
    depth: int
    reason: str
    subject: list[tuple[str, str]]
    serial: int | None
    issuer: list[tuple[str, str]]


def _string(value) -> str:
    """An ASN1_STRING as text (UTF-8 converted, as ASN1_STRFLGS_UTF8_CONVERT does)."""
    out = _ffi.new("unsigned char **")
    length = _lib.ASN1_STRING_to_UTF8(out, value)
    if length < 0:
        _lib.ERR_clear_error()
        return "?"
    try:
        return _ffi.buffer(out[0], length)[:].decode("utf-8", "replace")
    finally:
        _lib.OPENSSL_free(out[0])


def _name_entries(name) -> list[tuple[str, str]]:
    """(short field name, value) for each entry of an X509_NAME, in order."""
    entries = []
    for i in range(_lib.X509_NAME_entry_count(name)):
        entry = _lib.X509_NAME_get_entry(name, i)
        nid = _lib.OBJ_obj2nid(_lib.X509_NAME_ENTRY_get_object(entry))
        field = _lib.OBJ_nid2sn(nid)
        if field == _ffi.NULL:
            field = _lib.OBJ_nid2ln(nid)
        entries.append((_ffi.string(field).decode() if field != _ffi.NULL else "UNDEF",
                        _string(_lib.X509_NAME_ENTRY_get_data(entry))))
    return entries


def _serial(cert) -> int | None:
    bn = _lib.ASN1_INTEGER_to_BN(_lib.X509_get_serialNumber(cert), _ffi.NULL)
    if bn == _ffi.NULL:
        _lib.ERR_clear_error()
        return None
    try:
        text = _lib.BN_bn2hex(bn)
        try:
            return int(_ffi.string(text).decode(), 16)
        finally:
            _lib.OPENSSL_free(text)
    finally:
        _lib.BN_free(bn)


def _describe_failure(store_ctx) -> VerifyFailure:
    error = _lib.X509_STORE_CTX_get_error(store_ctx)
    reason = _lib.X509_verify_cert_error_string(error)
    cert = _lib.X509_STORE_CTX_get_current_cert(store_ctx)
    reason_text = _ffi.string(reason).decode() if reason != _ffi.NULL else f"error {error}"
    if cert == _ffi.NULL:
        return VerifyFailure(_lib.X509_STORE_CTX_get_error_depth(store_ctx), reason_text, [], None, [])
    return VerifyFailure(_lib.X509_STORE_CTX_get_error_depth(store_ctx), reason_text,
                         _name_entries(_lib.X509_get_subject_name(cert)), _serial(cert),
                         _name_entries(_lib.X509_get_issuer_name(cert)))


def _note_failure(store_ctx) -> None:
    ssl = _lib.X509_STORE_CTX_get_ex_data(store_ctx, _lib.SSL_get_ex_data_X509_STORE_CTX_idx())
    holder = _holders.get(_address(ssl))
    if holder is not None and holder.verify_failure is None:
        try:
            holder.verify_failure = _describe_failure(store_ctx)
        except Exception as exc:   # the detail is for the log only; the verdict stands
            holder.verify_failure = VerifyFailure(-1, f"(details unavailable: {type(exc).__name__})", [], None, [])


def _callback_failed(exc_type, exc, tb) -> None:
    """Last resort for an exception escaping a callback: the callback's `error` value
    (a refusal) is returned to OpenSSL."""
    _lib.ERR_clear_error()


@_ffi.callback("int (*)(int, X509_STORE_CTX *)", error=0, onerror=_callback_failed)
def _verify_callback(ok, store_ctx):
    """PostgreSQL's verify_cb: OpenSSL's verdict unchanged; on failure, facts for the log."""
    if not ok:
        _note_failure(store_ctx)
    return ok


# VERIFY_PEER without VERIFY_FAIL_IF_NO_PEER_CERT: a client without a certificate still
# completes the handshake, and pg_hba decides later (as in PostgreSQL)
_REQUEST_CLIENT_CERTIFICATE = _lib.SSL_VERIFY_PEER | _lib.SSL_VERIFY_CLIENT_ONCE


def request_client_certificates(ctx: SSL.Context) -> None:
    _lib.SSL_CTX_set_verify(ctx._context, _REQUEST_CLIENT_CERTIFICATE, _verify_callback)


def set_verify_mode(conn: SSL.Connection, request_client_certificate: bool) -> None:
    """A connection's own verify mode, for the host its server name chose."""
    mode = _REQUEST_CLIENT_CERTIFICATE if request_client_certificate else _lib.SSL_VERIFY_NONE
    _lib.SSL_set_verify(conn._ssl, mode, _verify_callback)


# TLS alerts (RFC 8446 section 6), which cryptography's bindings do not name
ALERT_MISSING_EXTENSION = 109
ALERT_UNRECOGNIZED_NAME = 112
_ALERT_INTERNAL_ERROR = 80


@_ffi.callback("int (*)(SSL *, int *, void *)", error=_lib.SSL_TLSEXT_ERR_ALERT_FATAL, onerror=_callback_failed)
def _choose_by_server_name(ssl, alert, arg):
    """The servername callback, which OpenSSL calls for every ClientHello (with or without
    the extension): the connection's holder (tls.TLSSession) picks the host or an alert."""
    holder = _holders.get(_address(ssl))
    if holder is None:
        alert[0] = _ALERT_INTERNAL_ERROR
        return _lib.SSL_TLSEXT_ERR_ALERT_FATAL
    name = _lib.SSL_get_servername(ssl, _lib.TLSEXT_NAMETYPE_host_name)
    refusal = holder.choose_host(_ffi.string(name) if name != _ffi.NULL else None)
    if refusal is None:
        return _lib.SSL_TLSEXT_ERR_OK
    alert[0] = refusal
    return _lib.SSL_TLSEXT_ERR_ALERT_FATAL


def choose_by_server_name(ctx: SSL.Context) -> None:
    _lib.SSL_CTX_set_tlsext_servername_callback(ctx._context, _choose_by_server_name)


def peer_certificate_subject(conn: SSL.Connection) -> list[tuple[str, str]] | None:
    """The client certificate's subject entries, read by OpenSSL (which verified it)."""
    cert = _lib.SSL_get_peer_certificate(conn._ssl)
    if cert == _ffi.NULL:
        return None
    try:
        return _name_entries(_lib.X509_get_subject_name(cert))
    finally:
        _lib.X509_free(cert)


def peer_certificate_facts(conn: SSL.Connection) -> tuple[list, int | None, list] | None:
    """(subject entries, serial number, issuer entries) of the client certificate, as
    pg_stat_ssl shows them."""
    cert = _lib.SSL_get_peer_certificate(conn._ssl)
    if cert == _ffi.NULL:
        return None
    try:
        return (_name_entries(_lib.X509_get_subject_name(cert)), _serial(cert),
                _name_entries(_lib.X509_get_issuer_name(cert)))
    finally:
        _lib.X509_free(cert)


ALPN_PROTOCOL = b"postgresql"


# Set with SSL_CTX_set_alpn_select_cb directly: pyOpenSSL's NO_OVERLAPPING_PROTOCOLS answers
# SSL_TLSEXT_ERR_NOACK, which carries on without ALPN instead of refusing. One module-level
# callback serves every context, so it lives as long as any Connection that may call it.
@_ffi.callback("int (*)(SSL *, unsigned char **, unsigned char *, const unsigned char *, unsigned int, void *)",
               error=_lib.SSL_TLSEXT_ERR_ALERT_FATAL, onerror=_callback_failed)
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


def require_postgresql_alpn(ctx: SSL.Context) -> None:
    _lib.SSL_CTX_set_alpn_select_cb(ctx._context, _select_postgresql_alpn, _ffi.NULL)
