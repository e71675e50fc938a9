"""What pgfast logs in to an upstream server with, as the client's role, and the
client side of the authentication exchange (libpq's fe-auth.c, in its words).

pgfast never stores a client's password. What it learns while authenticating a client
at the front is enough for the upstream when the upstream holds the same secret: the
ClientKey a SCRAM proof reveals, the md5 hash an md5 login is checked against, or the
password itself under the password method. Fixed roles (pgfast.auth_user, service roles)
log in with a password from pgfast.passfile.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from . import messages
from .passwords import is_md5, md5_salted
from .scram import SCRAM, ScramClient, ScramKeys

_OK, _CLEARTEXT, _MD5, _SASL, _SASL_CONTINUE, _SASL_FINAL = 0, 3, 5, 10, 11, 12
NO_PASSWORD = "fe_sendauth: no password supplied"


@dataclass(frozen=True)
class Secret:
    password: bytes | None = None
    scram: ScramKeys | None = None
    md5: str | None = None          # pg_authid's md5 hash, which is all an md5 exchange needs

    def __repr__(self) -> str:
        kinds = [name for name in ("password", "scram", "md5") if getattr(self, name) is not None]
        return f"Secret({', '.join(kinds) or 'none'})"


NONE = Secret()


class Login:
    """Answers one backend's authentication requests (BackendConnection's start-up)."""

    def __init__(self, user: str, secret: Secret):
        self._user = user
        self._secret = secret
        self._scram: ScramClient | None = None

    def answer(self, code: int, data: bytes) -> bytes | None:
        """The message to send for AuthenticationRequest `code` (None: nothing to send);
        raises ConnectionError with libpq's words when it cannot be answered."""
        secret = self._secret
        if code == _CLEARTEXT:
            return _password_message(self._password())
        if code == _MD5:
            if secret.password is not None:
                stored = "md5" + hashlib.md5(secret.password + self._user.encode()).hexdigest()
            elif is_md5(secret.md5):
                stored = secret.md5
            else:
                raise ConnectionError(NO_PASSWORD)
            return _password_message(md5_salted(stored, data[:4]))
        if code == _SASL:
            mechanisms = data.split(b"\0")
            if SCRAM.encode() not in mechanisms:
                raise ConnectionError("none of the server's SASL authentication mechanisms are supported")
            if secret.password is None and secret.scram is None:
                raise ConnectionError(NO_PASSWORD)
            self._scram = ScramClient(secret.password, secret.scram)
            first = self._scram.first()
            return messages.message(b"p", SCRAM.encode() + b"\0" + struct.pack("!i", len(first)) + first)
        if code == _SASL_CONTINUE and self._scram is not None:
            return messages.message(b"p", self._scram.final(data))
        if code == _SASL_FINAL and self._scram is not None:
            self._scram.verify(data)
            return None
        raise ConnectionError(f"authentication method {code} not supported")

    def _password(self) -> bytes:
        if self._secret.password is None:
            raise ConnectionError(NO_PASSWORD)
        return self._secret.password


def _password_message(password: bytes) -> bytes:
    return messages.message(b"p", password + b"\0")
