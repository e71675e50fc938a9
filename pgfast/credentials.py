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
from .scram import SCRAM, SCRAM_PLUS, ScramClient, ScramKeys

_OK, _CLEARTEXT, _MD5, _GSS, _SSPI, _SASL, _SASL_CONTINUE, _SASL_FINAL = 0, 3, 5, 7, 9, 10, 11, 12
NO_PASSWORD = "fe_sendauth: no password supplied"
# require_auth's method for each request, and libpq's words when it is not allowed
_METHODS = {_OK: ("none", "server did not complete authentication"),
            _CLEARTEXT: ("password", "server requested a cleartext password"),
            _MD5: ("md5", "server requested a hashed password"),
            _GSS: ("gss", "server requested GSSAPI authentication"),
            _SSPI: ("sspi", "server requested SSPI authentication"),
            _SASL: ("scram-sha-256", "server requested SASL authentication")}


@dataclass(frozen=True)
class Secret:
    password: bytes | None = None
    scram: ScramKeys | None = None
    md5: str | None = None          # pg_authid's md5 hash, which is all an md5 exchange needs
    fixed: bool = False             # pgfast.passfile's, for a fixed role (not a client's own)

    def __repr__(self) -> str:
        kinds = [name for name in ("password", "scram", "md5") if getattr(self, name) is not None]
        return f"Secret({', '.join(kinds) or 'none'})"


@dataclass(frozen=True)
class Policy:
    """What pgfast.upstream's require_auth and channel_binding allow, as libpq reads them."""
    require_auth: str | None = None
    channel_binding: str = "prefer"

    def allows(self, method: str) -> bool:
        if not self.require_auth:
            return True
        methods = self.require_auth.split(",")
        if methods[0].startswith("!"):
            return method not in {m[1:] for m in methods}
        return method in methods


class Login:
    """Answers one backend's authentication requests (BackendConnection's start-up), as
    libpq's fe-auth.c: a SCRAM exchange must complete, with the server's signature
    checked, before AuthenticationOk counts."""

    def __init__(self, user: str, secret: Secret, policy: Policy = Policy()):
        self._user = user
        self._secret = secret
        self._policy = policy
        self._scram: ScramClient | None = None
        self._scram_done = False
        self._asked = False             # the server asked for any authentication
        self._bound = False             # SCRAM-SHA-256-PLUS was used

    def answer(self, code: int, data: bytes, channel_binding: bytes | None = None) -> bytes | None:
        """The message to send for AuthenticationRequest `code` (None: nothing to send);
        raises ConnectionError with libpq's words when it cannot be answered.
        channel_binding: the upstream's tls-server-end-point data, on TLS."""
        policy = self._policy
        if code == _OK:
            return self._accepted()
        if code in _METHODS:
            if self._scram is not None:
                # a server that starts over, or switches to asking for the password itself,
                # in the middle of a SCRAM exchange gets nothing more
                raise ConnectionError("duplicate SASL authentication request" if code == _SASL else
                                      "server asked for another authentication in the middle of a SASL exchange")
            method, refused = _METHODS[code]
            if not policy.allows(method):
                raise ConnectionError(f'authentication method requirement "{policy.require_auth}" failed: {refused}')
        self._asked = True
        if code in (_CLEARTEXT, _MD5) and policy.channel_binding == "require":
            raise ConnectionError("channel binding required but not supported by server's authentication request")
        if code == _CLEARTEXT:
            return _password_message(self._password())
        if code == _MD5:
            return _password_message(md5_salted(self._md5_secret(), data[:4]))
        if code == _SASL:
            return self._start_scram(data, channel_binding)
        if code == _SASL_CONTINUE and self._scram is not None and not self._scram.finished_client:
            return messages.message(b"p", self._scram.final(data))
        if code == _SASL_FINAL and self._scram is not None and self._scram.finished_client and not self._scram_done:
            self._scram.verify(data)
            self._scram_done = True
            return None
        if code in (_SASL_CONTINUE, _SASL_FINAL):
            raise ConnectionError("AuthenticationSASLFinal received from server, but SASL authentication was not "
                                  "completed" if code == _SASL_FINAL else "unexpected SASL message from server")
        raise ConnectionError(f"authentication method {code} not supported")

    def _accepted(self) -> None:
        if self._scram is not None and not self._scram_done:
            raise ConnectionError("server sent AuthenticationOk before the SCRAM exchange was complete")
        if not self._asked and not self._policy.allows("none"):
            raise ConnectionError(f'authentication method requirement "{self._policy.require_auth}" failed: '
                                  "server did not complete authentication")
        if self._policy.channel_binding == "require" and not self._bound:
            raise ConnectionError("channel binding required, but server authenticated client without channel "
                                  "binding")
        return None

    def _start_scram(self, data: bytes, channel_binding: bytes | None) -> bytes:
        secret = self._secret
        mechanisms = data.split(b"\0")
        plus = (channel_binding is not None and self._policy.channel_binding != "disable"
                and SCRAM_PLUS.encode() in mechanisms)
        if self._policy.channel_binding == "require" and not plus:
            raise ConnectionError("channel binding is required, but server did not offer an authentication "
                                  "method that supports channel binding")
        if not plus and SCRAM.encode() not in mechanisms:
            raise ConnectionError("none of the server's SASL authentication mechanisms are supported")
        if secret.password is None and secret.scram is None:
            raise ConnectionError(NO_PASSWORD)
        # 'y' tells a server that offered no PLUS that this client could have bound (RFC 5802)
        self._scram = ScramClient(secret.password, secret.scram, channel_binding=channel_binding if plus else None,
                                  ssl_in_use=channel_binding is not None and self._policy.channel_binding != "disable",
                                  cache=secret.fixed)
        self._bound = plus
        mechanism = (SCRAM_PLUS if plus else SCRAM).encode()
        first = self._scram.first()
        return messages.message(b"p", mechanism + b"\0" + struct.pack("!i", len(first)) + first)

    def _password(self) -> bytes:
        if self._secret.password is None:
            raise ConnectionError(NO_PASSWORD)
        return self._secret.password

    def _md5_secret(self) -> str:
        if self._secret.password is not None:
            return "md5" + hashlib.md5(self._secret.password + self._user.encode()).hexdigest()
        if is_md5(self._secret.md5):
            return self._secret.md5
        raise ConnectionError(NO_PASSWORD)


def _password_message(password: bytes) -> bytes:
    return messages.message(b"p", password + b"\0")
