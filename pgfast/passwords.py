"""Checking passwords against the secrets PostgreSQL stores in pg_authid.rolpassword.

Secrets come in PostgreSQL's three shapes: a SCRAM-SHA-256 verifier
(`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`), an md5 hash
(`md5` + md5(password || user)), or (from old clusters) plain text. The SCRAM
exchange itself is scramp's; this module adapts PostgreSQL's rules around it.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass

import scramp
from scramp.core import ServerError

SCRAM = "SCRAM-SHA-256"
SCRAM_PLUS = "SCRAM-SHA-256-PLUS"
CHANNEL_BINDING = "tls-server-end-point"
_MOCK_ITERATIONS = 4096
# Fixed per server run: a mock salt must be the same on every attempt for one user
# name, or an attacker could tell real roles (stable salt) from missing ones.
_MOCK_KEY = secrets.token_bytes(32)


@dataclass(frozen=True)
class ScramSecret:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def auth_info(self) -> tuple[bytes, bytes, bytes, int]:
        """What scramp's auth_fn returns."""
        return self.salt, self.stored_key, self.server_key, self.iterations


def parse_scram(secret: str | None) -> ScramSecret | None:
    if not secret or not secret.startswith(SCRAM + "$"):
        return None
    try:
        _, params, keys = secret.split("$")
        iterations, salt = params.split(":")
        stored_key, server_key = keys.split(":")
        return ScramSecret(int(iterations), base64.b64decode(salt, validate=True),
                           base64.b64decode(stored_key, validate=True), base64.b64decode(server_key, validate=True))
    except (ValueError, binascii.Error):
        return None


def is_md5(secret: str | None) -> bool:
    return bool(secret) and len(secret) == 35 and secret.startswith("md5")


def mock_scram(user: str) -> ScramSecret:
    """A verifier no password matches, with a salt that depends only on the user name:
    an unknown role goes through the same exchange as a known one (PostgreSQL's
    scram_mock_salt does the same)."""
    digest = hmac.new(_MOCK_KEY, user.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
    return ScramSecret(_MOCK_ITERATIONS, digest[:16], secrets.token_bytes(32), secrets.token_bytes(32))


def md5_salted(secret_md5: str, salt: bytes) -> str:
    """What a client must answer to an MD5 challenge for this stored md5 secret."""
    return "md5" + hashlib.md5(secret_md5[3:].encode("ascii") + salt).hexdigest()


def check_plain_password(secret: str | None, password: str, user: str) -> bool:
    """The `password` method: the cleartext against whatever is stored."""
    if not secret:
        return False
    scram = parse_scram(secret)
    if scram is not None:
        try:
            _, stored_key, server_key, _ = scramp.ScramMechanism(SCRAM).make_auth_info(
                password, iteration_count=scram.iterations, salt=scram.salt)
        except scramp.ScramException:
            return False
        return hmac.compare_digest(stored_key, scram.stored_key) and hmac.compare_digest(server_key, scram.server_key)
    if secret.startswith("SCRAM-SHA-256$"):
        return False        # a verifier we could not parse matches nothing
    if is_md5(secret):
        expected = "md5" + hashlib.md5((password + user).encode("utf-8", "surrogateescape")).hexdigest()
        return hmac.compare_digest(expected, secret)
    return hmac.compare_digest(password.encode("utf-8", "surrogateescape"), secret.encode("utf-8", "surrogateescape"))


class ScramServer:
    """One server side of SCRAM-SHA-256 or SCRAM-SHA-256-PLUS, over scramp.

    PostgreSQL ignores the user name inside the SCRAM messages: the role is the one from
    the startup packet, so the secret is fixed up front, and libpq sends an empty name
    ("n=,"), which scramp's strict RFC 5802 parser refuses. scramp is therefore shown a
    placeholder name (what pgJDBC sends, "*") and then given back the message exactly as
    the client sent it, because the proofs are computed over those bytes.
    """

    def __init__(self, mechanism: str, secret: ScramSecret, channel_binding: bytes | None):
        cb = (CHANNEL_BINDING, channel_binding) if channel_binding is not None else None
        self._server = scramp.ScramMechanism(mechanism).make_server(lambda _user: secret.auth_info(),
                                                                     channel_binding=cb)

    def first(self, client_first: str) -> str:
        header_end = _gs2_header_length(client_first)
        bare = client_first[header_end:]
        placeholder = "n=*" + bare[2:] if bare.startswith("n=,") else bare
        self._server.set_client_first(client_first[:header_end] + placeholder)
        self._server.client_first_bare = bare
        return self._server.get_server_first()

    @property
    def nonce(self) -> str:
        """The combined nonce (client's then server's) a client-final-message must repeat."""
        return str(self._server.nonce)

    def final(self, client_final: str) -> tuple[bool, str]:
        """(proof accepted, server-final message); a malformed message raises ScramException."""
        try:
            self._server.set_client_final(client_final)
        except scramp.ScramException as exc:
            if exc.server_error != ServerError.INVALID_PROOF:
                raise
            return False, ""
        return True, self._server.get_server_final()


def _gs2_header_length(client_first: str) -> int:
    """Length of "n,," / "y,," / "p=type,," (flag, authzid, then the bare message)."""
    first = client_first.find(",")
    second = client_first.find(",", first + 1) if first >= 0 else -1
    if second < 0:
        raise scramp.ScramException("The client sent a malformed first message")
    return second + 1
