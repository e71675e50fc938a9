"""pytest-benchmark micro-benchmarks of pgfast._framing and pgfast._pump beside tests/wire_reference.py.

Run: python -m pytest bench/micro --benchmark-only
Each function has its own benchmark group, so the table shows the Cython code and the
pure-Python reference side by side; throughput (MB/s, messages/s) is printed at the end.
"""
from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from micro_support import THROUGHPUT, reference


def pytest_terminal_summary(terminalreporter):
    if not THROUGHPUT:
        return
    terminalreporter.section("throughput (median time per call)")
    for group, name, rate, unit in sorted(THROUGHPUT):
        terminalreporter.write_line(f"{group:62s} {name:10s} {rate:14,.1f} {unit}")


def _server_context() -> SSL.Context:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate(cert)
    ctx.use_privatekey(key)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(SSL.OP_NO_TICKET)
    return ctx


@pytest.fixture(scope="session")
def server_context() -> SSL.Context:
    return _server_context()


@pytest.fixture
def tls_pair(server_context):
    """(server Connection, client Connection) after a TLS 1.3 handshake in memory."""
    return reference.handshake_in_memory(server_context)
