"""The one place that reaches below pyOpenSSL's public API.

The TLS pump calls SSL_read/SSL_write/BIO_read/BIO_write itself, on the SSL* and
memory BIOs of a pyOpenSSL Connection, through the function addresses cffi exposes on
cryptography's bindings. That keeps a single OpenSSL copy (cryptography's, so wheels
need no system libssl) and no Python object per record. It relies on pyOpenSSL
private attributes (Connection._ssl, _into_ssl, _from_ssl), so pyproject.toml pins the
pyOpenSSL range and this module checks itself at import: a pyOpenSSL upgrade that
breaks the assumption fails loudly here, never with corrupted traffic.
"""
import datetime

from cryptography import x509
from cryptography.hazmat.bindings.openssl.binding import Binding
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from . import _wire

_binding = Binding()
_ffi = _binding.ffi
_lib = _binding.lib

_CALLS = (
    "SSL_read", "SSL_write", "BIO_read", "BIO_write", "SSL_get_error", "SSL_shutdown", "SSL_do_handshake",
    "ERR_get_error", "ERR_clear_error", "ERR_reason_error_string",
)


def _address(cdata) -> int:
    return int(_ffi.cast("uintptr_t", cdata))


def make_pump(conn: SSL.Connection) -> _wire.TLSPump:
    """A pump for a pyOpenSSL server Connection built on memory BIOs (Connection(ctx, None))."""
    return _wire.TLSPump(conn, _address(conn._ssl), _address(conn._into_ssl), _address(conn._from_ssl))


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
    """Handshake a pump with a pyOpenSSL client in memory, then move data both ways
    and compare."""
    server = SSL.Connection(_self_signed_context(), None)
    server.set_accept_state()
    pump = make_pump(server)
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    to_server = _client_step(client, b"")
    for _ in range(10):
        done = pump.handshake(to_server)
        to_server = _client_step(client, pump.pending_ciphertext())
        if done:
            break
    else:
        raise RuntimeError("pgfast TLS pump self-check failed: the handshake did not complete")
    message = bytes(range(256)) * 300    # spans several records
    client.sendall(message)
    received = pump.decrypt(to_server + client.bio_read(1 << 20))
    client.bio_write(pump.encrypt(received))
    echoed = b""
    while len(echoed) < len(message):
        echoed += client.recv(1 << 20)
    if received != message or echoed != message:
        raise RuntimeError("pgfast TLS pump self-check failed: data did not round-trip")


_wire.install_openssl_calls({name: _address(getattr(_lib, name)) for name in _CALLS})
self_check()
