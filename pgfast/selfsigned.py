"""The self-signed server certificate `pgfast init` writes.

The certificate is its own trust anchor: clients verify it with
`sslmode=verify-full sslrootcert=server.crt`. Its extensions are chosen for that use:

- basicConstraints CA:FALSE (critical): it is an end-entity certificate, and some clients
  (webpki/rustls) refuse a CA certificate presented as a server certificate. OpenSSL (3.0
  and 4.0, checked with and without X509_STRICT) and libpq accept a self-signed
  end-entity certificate found in the trust store as its own anchor.
- keyUsage digitalSignature (critical), plus keyEncipherment for RSA so TLS 1.2 clients
  accept RSA key exchange: the usual server profile. No keyCertSign: it issues no
  certificates, and RFC 5280 allows keyCertSign only with CA:TRUE.
- extendedKeyUsage serverAuth, subjectKeyIdentifier and authorityKeyIdentifier (strict
  verifiers want the identifiers to tie the certificate to its issuer, here itself).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=3650)
# a client whose clock is a little behind must not see a certificate from the future
BACKDATE = datetime.timedelta(hours=1)
_MAX_COMMON_NAME = 64  # X.520 ub-common-name


def write_self_signed(cert_path: str | os.PathLike, key_path: str | os.PathLike, *,
                      key_type: str = "ecdsa", passphrase: bytes | None = None,
                      names: list[str] | None = None, owner_uid: int | None = None,
                      owner_gid: int | None = None) -> None:
    """Write a self-signed certificate (mode 0644) and its private key (mode 0600)."""
    key = _new_key(key_type)
    host = socket.gethostname()
    cert = _self_signed_certificate(key, host, _subject_alt_names(host, names or []))
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    _write_atomically(key_path, key_pem, 0o600, owner_uid, owner_gid)
    _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, owner_uid, owner_gid)


def _new_key(key_type: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"key_type must be 'ecdsa' or 'rsa', not {key_type!r}")


def _subject_alt_names(host: str, extra: list[str]) -> list[x509.GeneralName]:
    wanted = ["localhost", "127.0.0.1", "::1", host, *extra]
    general_names: list[x509.GeneralName] = []
    for name in wanted:
        general_name = _general_name(name)
        if general_name not in general_names:
            general_names.append(general_name)
    return general_names


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _self_signed_certificate(key, host: str, alt_names: list[x509.GeneralName]) -> x509.Certificate:
    common_name = host if 0 < len(host) <= _MAX_COMMON_NAME else "localhost"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(key), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _key_usage(key) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, key_encipherment=isinstance(key, rsa.RSAPrivateKey),
        content_commitment=False, data_encipherment=False, key_agreement=False,
        key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False)


def _write_atomically(path: str | os.PathLike, data: bytes, mode: int,
                      owner_uid: int | None, owner_gid: int | None) -> None:
    """Write through a temporary file in the same directory, renamed into place.

    mkstemp creates the file 0600, so a key is never readable by others, not even for a
    moment, and an existing file of the same name is replaced whole or not at all.
    """
    path = os.fspath(path)
    fd, temporary = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".pgfast-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if owner_uid is not None or owner_gid is not None:
                os.fchown(f.fileno(), -1 if owner_uid is None else owner_uid,
                          -1 if owner_gid is None else owner_gid)
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
