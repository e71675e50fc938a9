"""Certificates for the test suite, made fresh in each run (nothing secret is checked in).

    ca = CA()                                   # ECDSA P-256 root; CA(key_type="rsa") for RSA-2048
    inter = ca.intermediate()                   # signed by ca
    server = ca.server_cert()                   # SAN localhost, 127.0.0.1, ::1
    alice = inter.client_cert("alice")          # CN=alice, chain = [inter]
    old = ca.client_cert("bob", expired=True)
    crl = ca.crl(revoked=[old])                 # CRL bytes (PEM), signed by ca
    odd = ca.client_cert_unparsable("carol")    # OpenSSL takes it, cryptography refuses to parse it

    write(tmp_path / "server.crt", server.cert_pem())
    write(tmp_path / "server.key", server.key_pem(passphrase=b"secret"))   # mode 0600
    write_crl_dir(tmp_path / "crls", [(ca, ca.crl()), (inter, inter.crl(revoked=[alice]))])

A foreign client certificate is one from another CA(). PostgreSQL checks CRLs for the whole
chain (CRL_CHECK_ALL), so every CA in a chain needs a CRL once any CRL is configured.
"""
from __future__ import annotations

import base64
import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.bindings.openssl.binding import Binding
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
_lib = Binding().lib
_DAY = datetime.timedelta(days=1)


def new_key(key_type: str = "ecdsa") -> PrivateKey:
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r}")


def key_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@dataclass
class Issued:
    """A leaf certificate, its key, and the intermediates between it and the root."""
    cert: x509.Certificate
    key: PrivateKey
    chain: list[x509.Certificate] = field(default_factory=list)

    def cert_pem(self) -> bytes:
        return cert_pem(self.cert)

    def chain_pem(self) -> bytes:
        """Leaf then intermediates: what a server certificate file or a client sends."""
        return cert_pem(self.cert, *self.chain)

    def key_pem(self, passphrase: bytes | None = None) -> bytes:
        return key_pem(self.key, passphrase)


class CA:
    def __init__(self, common_name: str = "pgfast test CA", *, key_type: str = "ecdsa",
                 parent: CA | None = None):
        self.key_type = key_type
        self.key = new_key(key_type)
        self.parent = parent
        self.cert = self._certificate(parent, common_name)

    def _certificate(self, parent: CA | None, common_name: str) -> x509.Certificate:
        issuer_name = parent.cert.subject if parent else _name(common_name)
        signing_key = parent.key if parent else self.key
        issuer_public_key = signing_key.public_key()
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(issuer_name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY).not_valid_after(now + 3650 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public_key),
                           critical=False)
            .sign(signing_key, hashes.SHA256())
        )

    @property
    def chain(self) -> list[x509.Certificate]:
        """This CA and the CAs above it, root excluded: the intermediates a leaf sends."""
        return [self.cert] + self.parent.chain if self.parent else []

    def cert_pem(self) -> bytes:
        return cert_pem(self.cert)

    def intermediate(self, common_name: str = "pgfast test intermediate CA") -> CA:
        return CA(common_name, key_type=self.key_type, parent=self)

    def issue(self, common_name: str, *, names: tuple[str, ...] = (),
              usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
              expired: bool = False, key_type: str | None = None) -> Issued:
        key = new_key(key_type or self.key_type)
        now = datetime.datetime.now(datetime.timezone.utc)
        not_after = now - _DAY if expired else now + 365 * _DAY
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_after - 30 * _DAY if expired else now - _DAY)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        return Issued(builder.sign(self.key, hashes.SHA256()), key, self.chain)

    def server_cert(self, names: tuple[str, ...] = SERVER_NAMES, *, key_type: str | None = None) -> Issued:
        return self.issue(names[0], names=names, usage=ExtendedKeyUsageOID.SERVER_AUTH, key_type=key_type)

    def client_cert(self, common_name: str, *, expired: bool = False, key_type: str | None = None) -> Issued:
        return self.issue(common_name, expired=expired, key_type=key_type)

    def client_cert_unparsable(self, common_name: str) -> "OddIssued":
        """A client certificate OpenSSL accepts (and verifies) but cryptography refuses to
        parse: its extensions spell out the default critical=FALSE, which DER forbids."""
        issued = self.client_cert(common_name)
        der = issued.cert.public_bytes(serialization.Encoding.DER)
        _, certificate, _ = _der_parse(der, 0)
        tbs, algorithm, _signature = _der_children(certificate)
        tbs = (tbs[0], b"".join(_der(t, _explicit_default_critical(v) if t == 0xA3 else v)
                                for t, v in _der_children(tbs[1])))
        tbs_der = _der(*tbs)
        signature = self.key.sign(tbs_der, ec.ECDSA(hashes.SHA256()))
        odd = _der(0x30, tbs_der + _der(*algorithm) + _der(0x03, b"\0" + signature))
        return OddIssued(odd, issued.key, issued.chain)

    def crl(self, revoked: Iterable[Issued] = ()) -> bytes:
        """A current CRL (PEM) from this CA listing the given certificates as revoked."""
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject).last_update(now - _DAY).next_update(now + 30 * _DAY)
            .add_extension(x509.CRLNumber(1), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
        )
        for issued in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(issued.cert.serial_number)
                .revocation_date(now - _DAY).build())
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def subject_hash(self) -> str:
        """OpenSSL's subject name hash (`openssl x509 -hash`), which names files in a CRL directory."""
        x509_pointer = crypto.X509.from_cryptography(self.cert)._x509   # pyOpenSSL's hash() is deprecated
        return f"{_lib.X509_subject_name_hash(x509_pointer):08x}"


@dataclass
class OddIssued:
    """A certificate kept as DER bytes, because cryptography cannot load it."""
    der: bytes
    key: PrivateKey
    chain: list[x509.Certificate] = field(default_factory=list)

    def chain_pem(self) -> bytes:
        body = base64.encodebytes(self.der).replace(b"\n", b"")
        lines = [body[i:i + 64] for i in range(0, len(body), 64)]
        pem = b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(lines) + b"\n-----END CERTIFICATE-----\n"
        return pem + cert_pem(*self.chain)

    def key_pem(self, passphrase: bytes | None = None) -> bytes:
        return key_pem(self.key, passphrase)


def _der_parse(data: bytes, i: int) -> tuple[int, bytes, int]:
    tag, length = data[i], data[i + 1]
    i += 2
    if length & 0x80:
        n = length & 0x7F
        length, i = int.from_bytes(data[i:i + n], "big"), i + n
    return tag, data[i:i + length], i + length


def _der_children(body: bytes) -> list[tuple[int, bytes]]:
    children, i = [], 0
    while i < len(body):
        tag, value, i = _der_parse(body, i)
        children.append((tag, value))
    return children


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = bytes([n]) if n < 128 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + body


def _explicit_default_critical(extensions_field: bytes) -> bytes:
    """[3] { SEQUENCE OF Extension } with BOOLEAN FALSE written into each non-critical one."""
    (_, extensions), = _der_children(extensions_field)
    rebuilt = []
    for tag, extension in _der_children(extensions):
        parts = _der_children(extension)
        if len(parts) == 2:
            parts = [parts[0], (0x01, b"\0"), parts[1]]
        rebuilt.append(_der(tag, b"".join(_der(t, v) for t, v in parts)))
    return _der(0x30, b"".join(rebuilt))


def write(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> str:
    """Write data to path with exactly this mode (whatever the umask); returns the path as str."""
    path = os.fspath(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)
    return path


def write_crl_dir(directory: str | os.PathLike, crls_by_ca: list[tuple[CA, bytes]]) -> str:
    """A CRL directory as `openssl rehash` lays it out: <issuer hash>.r0, .r1, ..."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for ca, crl in crls_by_ca:
        index = 0
        while (directory / f"{ca.subject_hash()}.r{index}").exists():
            index += 1
        write(directory / f"{ca.subject_hash()}.r{index}", crl, 0o644)
    return str(directory)
