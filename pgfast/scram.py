"""The server side of SCRAM-SHA-256 and SCRAM-SHA-256-PLUS, as PostgreSQL's auth-scram.c.

pgfast does the SCRAM exchange itself (RFC 5802/7677, a few HMACs) rather than through
a library, because it must accept every secret PostgreSQL accepts (any iteration count
and salt length: PostgreSQL 16's scram_iterations goes below the 4096 that generic
libraries insist on), parse the client's messages on bytes with PostgreSQL's rules and
error messages, and learn the ClientKey a successful proof reveals (what logging in to
another server with the same secret needs).

PostgreSQL's differences from the RFC, kept: the user name inside the SCRAM messages is
ignored (the role is the startup packet's); a password that is not valid UTF-8, or that
SASLprep refuses, is used as its raw bytes; pure ASCII is used as it is.
"""
from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from scramp.utils import saslprep

from .errors import AuthFailed

SCRAM = "SCRAM-SHA-256"
SCRAM_PLUS = "SCRAM-SHA-256-PLUS"
CHANNEL_BINDING = b"tls-server-end-point"
_KEY_LENGTH = 32
_NONCE_BYTES = 18            # PostgreSQL's SCRAM_RAW_NONCE_LEN
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


def parse_scram(secret: str | None) -> ScramSecret | None:
    """pg_authid.rolpassword's SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>."""
    if not secret or not secret.startswith(SCRAM + "$"):
        return None
    try:
        _, params, keys = secret.split("$")
        iterations, salt = params.split(":")
        stored_key, server_key = keys.split(":")
        parsed = ScramSecret(int(iterations), base64.b64decode(salt, validate=True),
                             base64.b64decode(stored_key, validate=True), base64.b64decode(server_key, validate=True))
    except (ValueError, binascii.Error):
        return None
    if parsed.iterations <= 0 or len(parsed.stored_key) != _KEY_LENGTH or len(parsed.server_key) != _KEY_LENGTH:
        return None
    return parsed


def mock_scram(user: str) -> ScramSecret:
    """A secret no password matches, with a salt that depends only on the user name: an
    unknown role goes through the same exchange as a known one (scram_mock_salt)."""
    digest = hmac.new(_MOCK_KEY, user.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
    return ScramSecret(_MOCK_ITERATIONS, digest[:16], secrets.token_bytes(32), secrets.token_bytes(32))


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def prepare_password(password: bytes) -> bytes:
    """PostgreSQL's pg_saslprep use: ASCII as it is, else SASLprep, else the raw bytes."""
    if password.isascii():
        return password
    try:
        return saslprep(password.decode("utf-8")).encode("utf-8")
    except (UnicodeDecodeError, ValueError, Exception):    # scramp raises its own exception for prohibited text
        return password


def keys_for(password: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(StoredKey, ServerKey) for a password."""
    salted = hashlib.pbkdf2_hmac("sha256", prepare_password(password), salt, iterations)
    return hashlib.sha256(_hmac(salted, b"Client Key")).digest(), _hmac(salted, b"Server Key")


def verify_plain_password(secret: ScramSecret, password: bytes) -> bool:
    """The password method against a SCRAM secret (scram_verify_plain_password)."""
    stored_key, server_key = keys_for(password, secret.salt, secret.iterations)
    return hmac.compare_digest(stored_key, secret.stored_key) and hmac.compare_digest(server_key, secret.server_key)


# --- PostgreSQL's parsing of the client's messages ------------------------------------------

def malformed(detail: str) -> AuthFailed:
    return AuthFailed("08P01", "malformed SCRAM message", detail=detail)


def sanitize_char(c: int | None) -> str:
    """sanitize_char: 'x' for a printable character, else 0xNN."""
    if c is None:
        c = 0
    return f"'{chr(c)}'" if 0x21 <= c <= 0x7E else f"0x{c:02x}"


def _sanitize_str(s: bytes) -> str:
    return "".join(chr(c) if 0x21 <= c <= 0x7E else "?" for c in s[:30])


class _Reader:
    """A cursor over a NUL-free message, with read_attr_value / read_any_attr."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def peek(self) -> int | None:
        return self.data[self.pos] if self.pos < len(self.data) else None

    def _value(self) -> bytes:
        end = self.data.find(b",", self.pos)
        if end < 0:
            value, self.pos = self.data[self.pos:], len(self.data)
        else:
            value, self.pos = self.data[self.pos:end], end + 1
        return value

    def attr(self, name: str) -> bytes:
        if self.peek() != ord(name):
            raise malformed(f'Expected attribute "{name}" but found "{sanitize_char(self.peek())}".')
        self.pos += 1
        if self.peek() != ord("="):
            raise malformed(f'Expected character "=" for attribute "{name}".')
        self.pos += 1
        return self._value()

    def any_attr(self) -> tuple[str, bytes]:
        c = self.peek()
        if c is None:
            raise malformed("Attribute expected, but found end of string.")
        if not (ord("A") <= c <= ord("Z") or ord("a") <= c <= ord("z")):
            raise malformed(f'Attribute expected, but found invalid character "{sanitize_char(c)}".')
        self.pos += 1
        if self.peek() != ord("="):
            raise malformed(f'Expected character "=" for attribute "{chr(c)}".')
        self.pos += 1
        return chr(c), self._value()


def _printable(value: bytes) -> bool:
    """is_scram_printable: %x21-2B / %x2D-7E."""
    return all(0x21 <= c <= 0x7E and c != 0x2C for c in value)


class ScramServer:
    """One server side of the exchange for a role's secret (or a mock one)."""

    def __init__(self, mechanism: str, secret: ScramSecret, channel_binding: bytes | None,
                 ssl_in_use: bool):
        self._plus = mechanism == SCRAM_PLUS
        self._secret = secret
        self._channel_binding = channel_binding       # tls-server-end-point data, on TLS connections
        self._ssl_in_use = ssl_in_use
        self._flag = b""
        self._client_first_bare = b""
        self._server_first = b""
        self.nonce = b""
        self.client_key: bytes | None = None          # once a proof is accepted

    def first(self, message: bytes) -> bytes:
        """read_client_first_message; the server-first-message."""
        r = _Reader(message)
        flag = r.peek()
        if flag in (ord("n"), ord("y")):
            if self._plus:
                raise malformed("The client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include "
                                 "channel binding data.")
            if flag == ord("y") and self._ssl_in_use:
                raise AuthFailed("28000", "SCRAM channel binding negotiation error",
                                 detail="The client supports SCRAM channel binding but thinks the server does not.  "
                                        "However, this server does support channel binding.")
            r.pos += 1
            if r.peek() != ord(","):
                raise malformed(f'Comma expected, but found character "{sanitize_char(r.peek())}".')
            r.pos += 1
        elif flag == ord("p"):
            if not self._plus:
                raise malformed("The client selected SCRAM-SHA-256 without channel binding, but the SCRAM message "
                                 "includes channel binding data.")
            cb_type = r.attr("p")
            if cb_type != CHANNEL_BINDING:
                raise AuthFailed("08P01", f'unsupported SCRAM channel-binding type "{_sanitize_str(cb_type)}"')
        else:
            raise malformed(f'Unexpected channel-binding flag "{sanitize_char(flag)}".')
        self._flag = bytes((flag,))
        if r.peek() == ord("a"):
            raise AuthFailed("0A000", "client uses authorization identity, but it is not supported")
        if r.peek() != ord(","):
            raise malformed(f'Unexpected attribute "0x{r.peek() or 0:02x}" in client-first-message.')
        r.pos += 1
        self._client_first_bare = message[r.pos:]
        if r.peek() == ord("m"):
            raise AuthFailed("0A000", "client requires an unsupported SCRAM extension")
        r.attr("n")                 # ignored: the role is the startup packet's
        client_nonce = r.attr("r")
        if not _printable(client_nonce):
            raise AuthFailed("08P01", "non-printable characters in SCRAM nonce")
        while r.peek() is not None:
            r.any_attr()            # extensions, none supported: ignored
        self.nonce = client_nonce + base64.b64encode(secrets.token_bytes(_NONCE_BYTES))
        self._server_first = (b"r=" + self.nonce + b",s=" + base64.b64encode(self._secret.salt)
                              + b",i=" + str(self._secret.iterations).encode())
        return self._server_first

    def final(self, message: bytes) -> bytes | None:
        """read_client_final_message and the proof: the server-final-message, or None
        when the proof is wrong (the password does not match)."""
        r = _Reader(message)
        binding = r.attr("c")
        if self._plus:
            expected = base64.b64encode(b"p=" + CHANNEL_BINDING + b",," + self._channel_binding)
            if binding != expected:
                raise AuthFailed("28000", "SCRAM channel binding check failed")
        elif not ((binding == b"biws" and self._flag == b"n") or (binding == b"eSws" and self._flag == b"y")):
            raise AuthFailed("08P01", "unexpected SCRAM channel-binding attribute in client-final-message")
        final_nonce = r.attr("r")
        while True:                 # extensions are ignored up to the proof
            proof_at = r.pos
            name, value = r.any_attr()
            if name == "p":
                break
        try:
            proof = base64.b64decode(value, validate=True)
        except binascii.Error:
            proof = b""
        if len(proof) != _KEY_LENGTH:
            raise malformed("Malformed proof in client-final-message.")
        if r.peek() is not None:
            raise malformed("Garbage found at the end of client-final-message.")
        if final_nonce != self.nonce:
            raise AuthFailed("08P01", "invalid SCRAM response", detail="Nonce does not match.")
        auth_message = self._client_first_bare + b"," + self._server_first + b"," + message[:proof_at - 1]
        client_key = bytes(a ^ b for a, b in zip(proof, _hmac(self._secret.stored_key, auth_message)))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self._secret.stored_key):
            return None
        self.client_key = client_key
        return b"v=" + base64.b64encode(_hmac(self._secret.server_key, auth_message))


# --- the client side: pgfast logging in to an upstream server -----------------------------

@dataclass(frozen=True)
class ScramKeys:
    """What a successful proof at the front reveals (ClientKey) with the secret it was
    checked against: enough to log in to a server holding the same secret, without the
    password (PgBouncer's SCRAM pass-through)."""
    client_key: bytes
    server_key: bytes
    salt: bytes
    iterations: int

    def __repr__(self) -> str:      # never the keys, wherever this ends up
        return "ScramKeys(...)"


MAX_CLIENT_ITERATIONS = 1_000_000       # about half a second of PBKDF2


class ScramClient:
    """One SCRAM-SHA-256(-PLUS) exchange as a client, from a password or from ScramKeys.
    Errors are libpq's words (fe-auth-scram.c)."""

    def __init__(self, password: bytes | None = None, keys: ScramKeys | None = None, *,
                 channel_binding: bytes | None = None, ssl_in_use: bool = False, cache: bool = False):
        self._password = password
        self._keys = keys
        self._cache = cache         # a fixed role's password (pgfast.passfile), never a client's
        # gs2 header: p= binds to the server's certificate (SCRAM-SHA-256-PLUS); y says this
        # client could have, on a TLS connection whose server offered no PLUS; n: no TLS
        if channel_binding is not None:
            self._gs2 = b"p=" + CHANNEL_BINDING + b",,"
        else:
            self._gs2 = b"y,," if ssl_in_use else b"n,,"
        self._binding = self._gs2 + (channel_binding or b"")
        self._nonce = base64.b64encode(secrets.token_bytes(_NONCE_BYTES))
        self._client_first_bare = b"n=,r=" + self._nonce
        self._server_key = b""
        self._auth_message = b""
        self.finished_client = False        # its client-final-message is sent: a signature may come

    def first(self) -> bytes:
        return self._gs2 + self._client_first_bare

    def final(self, server_first: bytes) -> bytes:
        r = _Reader(server_first)
        try:
            nonce = r.attr("r")
            salt = base64.b64decode(r.attr("s"), validate=True)
            iterations = int(r.attr("i"))
        except (AuthFailed, binascii.Error, ValueError):
            raise ConnectionError("malformed SCRAM message (invalid server-first-message)") from None
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise ConnectionError("invalid SCRAM response (nonce mismatch)")
        if iterations <= 0 or not salt:
            raise ConnectionError("malformed SCRAM message (invalid iteration count or salt)")
        if self._password is not None:
            if iterations > MAX_CLIENT_ITERATIONS:
                # PBKDF2 runs on the event loop: a server must not be able to stall a worker
                raise ConnectionError(f"SCRAM iteration count {iterations} is more than pgfast computes "
                                      f"({MAX_CLIENT_ITERATIONS})")
            derive = _cached_keys if self._cache else _client_and_server_keys
            client_key, self._server_key = derive(self._password, salt, iterations)
        elif self._keys.salt == salt and self._keys.iterations == iterations:
            client_key, self._server_key = self._keys.client_key, self._keys.server_key
        else:
            raise ConnectionError("the upstream server holds another SCRAM secret for this role than the one "
                                  "the client authenticated against")
        without_proof = b"c=" + base64.b64encode(self._binding) + b",r=" + nonce
        self._auth_message = self._client_first_bare + b"," + server_first + b"," + without_proof
        signature = _hmac(hashlib.sha256(client_key).digest(), self._auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        self.finished_client = True
        return without_proof + b",p=" + base64.b64encode(proof)

    def verify(self, server_final: bytes) -> None:
        if not self.finished_client:
            raise ConnectionError("AuthenticationSASLFinal received from server, but SASL authentication was not "
                                  "completed")
        expected = b"v=" + base64.b64encode(_hmac(self._server_key, self._auth_message))
        if not hmac.compare_digest(server_final, expected):
            raise ConnectionError("incorrect server signature")


def _client_and_server_keys(password: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    salted = hashlib.pbkdf2_hmac("sha256", prepare_password(password), salt, iterations)
    return _hmac(salted, b"Client Key"), _hmac(salted, b"Server Key")


# once per fixed role's password, salt and count: pgfast logs in with the same passfile
# passwords (health checks, the catalogs) again and again, on the event loop
_cached_keys = functools.lru_cache(maxsize=64)(_client_and_server_keys)
