"""Who may connect: pg_hba.conf's verdict and the authentication it asks for.

Every refusal carries PostgreSQL's SQLSTATE and wording for the client, and the real
reason separately for the server log, as PostgreSQL keeps them apart.
"""
from __future__ import annotations

import hmac
import os
import pwd
import struct
from dataclasses import dataclass
from typing import Protocol

from . import log, messages
from .catalog import Credentials
from .credentials import Secret
from .errors import AuthFailed, ClientGone
from .hba import HbaLine, HbaRules, IdentMap
from .passwords import check_plain_password, is_md5, md5_salted
from .scram import SCRAM, SCRAM_PLUS, ScramKeys, ScramServer, malformed, mock_scram, parse_scram

PASSWORD_METHODS = frozenset({"password", "md5", "scram-sha-256"})
# Methods pgfast can honour at the front; any other pg_hba.conf method is a start-up
# error rather than something quietly weakened.
SUPPORTED_METHODS = frozenset({"trust", "reject", "cert", "peer"}) | PASSWORD_METHODS
# PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH: the longest password or SASL message accepted
MAX_AUTH_TOKEN_LENGTH = 65535

_AUTH_CLEARTEXT = 3
_AUTH_MD5 = 5
_AUTH_SASL = 10
_AUTH_SASL_CONTINUE = 11
_AUTH_SASL_FINAL = 12


@dataclass(frozen=True)
class ClientInfo:
    local: bool
    ssl: bool
    address: str | None       # client IP, None on a Unix socket
    user: str
    database: str
    replication: bool         # physical replication (replication=true)
    certificate_cn: str | None  # CN of the verified client certificate
    ca_loaded: bool = True    # a root certificate store (ssl_ca_file, root.crt) is in force
    server_end_point: bytes | None = None   # SCRAM channel binding data of the TLS session

    @property
    def host(self) -> str:
        return "[local]" if self.local else self.address

    @property
    def encryption(self) -> str:
        return "SSL encryption" if self.ssl else "no encryption"


def _no_hba_entry(info: ClientInfo) -> AuthFailed:
    if info.replication:
        text = (f'no pg_hba.conf entry for replication connection from host "{info.host}", '
                f'user "{info.user}", {info.encryption}')
    else:
        text = (f'no pg_hba.conf entry for host "{info.host}", user "{info.user}", '
                f'database "{info.database}", {info.encryption}')
    return AuthFailed("28000", text)


def _rejected(info: ClientInfo) -> AuthFailed:
    if info.replication:
        text = (f'pg_hba.conf rejects replication connection for host "{info.host}", '
                f'user "{info.user}", {info.encryption}')
    else:
        text = (f'pg_hba.conf rejects connection for host "{info.host}", user "{info.user}", '
                f'database "{info.database}", {info.encryption}')
    return AuthFailed("28000", text)


def _certificate_names_user(line: HbaLine, info: ClientInfo, ident: IdentMap) -> bool:
    if line.map:
        return ident.check(line.map, info.certificate_cn, info.user)
    return info.certificate_cn == info.user


def _line_context(line: HbaLine) -> str:
    return f'Connection matched file "{line.file}" line {line.line_no}: "{line.text.strip()}"'


def check_client_certificate(line: HbaLine, info: ClientInfo, ident: IdentMap) -> None:
    """clientcert= and the cert method: a verified certificate, and for verify-full a
    CN that is the user (or maps to it through pg_ident.conf)."""
    if line.clientcert is None:
        return
    if not info.ca_loaded:
        raise AuthFailed("F0000", "client certificates can only be checked if a root certificate store "
                                  "is available")
    if info.certificate_cn is None:
        raise AuthFailed("28000", "connection requires a valid client certificate", _line_context(line))
    if line.clientcert != "verify-full" or _certificate_names_user(line, info, ident):
        return
    detail = (f'provided user name ({info.user}) and authenticated user name ({info.certificate_cn}) '
              f'do not match. {_line_context(line)}')
    if line.method == "cert":
        raise AuthFailed("28000", f'certificate authentication failed for user "{info.user}"', detail)
    # PostgreSQL logs the reason and tells the client that the line's method (trust) failed
    log.log(f'certificate validation (clientcert=verify-full) failed for user "{info.user}": CN mismatch')
    raise AuthFailed("28000", f'"{line.method}" authentication failed for user "{info.user}"', detail)


def check_peer(line: HbaLine, info: ClientInfo, ident: IdentMap, peer_uid: int | None) -> None:
    """The peer method (PostgreSQL's auth_peer): the operating-system user at the other end
    of the Unix socket must be the database user, or map to it through pg_ident.conf."""
    failed = f'Peer authentication failed for user "{info.user}"'
    if peer_uid is None:
        log.log("peer authentication is not supported on this platform")
        raise AuthFailed("28000", failed, _line_context(line))
    try:
        system_user = pwd.getpwuid(peer_uid).pw_name
    except KeyError:
        log.log(f"could not look up local user ID {peer_uid}: user does not exist")
        raise AuthFailed("28000", failed, _line_context(line)) from None
    if not ident.check(line.map, system_user, info.user):     # logs why not
        raise AuthFailed("28000", failed, _line_context(line))


def authorize(rules: HbaRules, ident: IdentMap, info: ClientInfo, roles: frozenset[str] | None,
              client_hostname: str | None) -> HbaLine:
    """The pg_hba.conf line that admits this client, checked as far as it can be
    without a password exchange; raises AuthFailed."""
    line = rules.match(local=info.local, ssl=info.ssl, address=info.address, database=info.database,
                       user=info.user, replication=info.replication, roles=roles,
                       client_hostname=client_hostname)
    if line is None:
        raise _no_hba_entry(info)
    if line.method == "reject":
        raise _rejected(info)
    check_client_certificate(line, info, ident)
    return line


class Exchange(Protocol):
    """The client side of an authentication exchange, as the server connection offers it."""

    def send(self, data: bytes) -> None: ...

    async def receive(self) -> tuple[int, bytes | None]: ...  # None: a message of an invalid length


def _request(code: int, data: bytes = b"") -> bytes:
    return messages.message(b"R", struct.pack("!i", code) + data)


class _Unreadable(Exception):
    """A SASL message of an invalid length: PostgreSQL fails the exchange (STATUS_ERROR)."""


async def _password_message(exchange: Exchange, kind: str) -> bytes:
    msg_type, payload = await exchange.receive()
    if msg_type != ord("p"):
        raise AuthFailed("08P01", f"expected {kind} response, got message type {msg_type}")
    if payload is None:
        # PostgreSQL's recv_password_packet takes it for EOF; CheckSASLAuth for a failure
        raise _Unreadable() if kind == "SASL" else ClientGone()
    return payload


def _secret_problem(user: str, credentials: Credentials | None) -> str | None:
    """Why this role cannot log in by password whatever is typed, for the log only."""
    if credentials is None:
        return f'Role "{user}" does not exist.'
    if not credentials.secret:
        return f'User "{user}" has no password assigned.'
    if credentials.expired:
        return f'User "{user}" has an expired password.'
    if not credentials.can_login:
        # on purpose (README): PostgreSQL would authenticate the role and then say
        # 'role "x" is not permitted to log in' (28000), telling the client the password was right
        return f'Role "{user}" is not permitted to log in.'
    return None


async def authenticate_password(line: HbaLine, info: ClientInfo, exchange: Exchange,
                                credentials: Credentials | None, channel_binding: bytes | None,
                                password_encryption: str) -> Secret:
    """The password, md5 and scram-sha-256 methods, with PostgreSQL's rules for which
    exchange each secret gets. A role that cannot log in still goes through the whole
    exchange and fails at its end, so the client learns nothing about which roles exist.
    Returns what the exchange proved, for logging in to an upstream with the same secret."""
    problem = _secret_problem(info.user, credentials)
    secret = credentials.secret if problem is None else None
    mismatch = f'Password does not match for user "{info.user}".'
    proved = Secret()
    if line.method == "password":
        password = await _cleartext_password(exchange)
        if problem is None and not check_plain_password(secret, password, info.user):
            problem = mismatch
        proved = Secret(password=password)
    elif line.method == "md5" and (is_md5(secret) or (secret is None and password_encryption == "md5")):
        if not await _md5_exchange(exchange, secret) and problem is None:
            problem = mismatch
        proved = Secret(md5=secret)
    else:
        scram = parse_scram(secret)
        if problem is None and scram is None:
            problem = f'User "{info.user}" does not have a valid SCRAM secret.'
        try:
            client_key = await _scram_exchange(exchange, scram or mock_scram(info.user), channel_binding)
        except _Unreadable:
            raise AuthFailed("28P01", f'password authentication failed for user "{info.user}"',
                             _line_context(line)) from None
        if client_key is None and problem is None:
            problem = mismatch
        if client_key is not None and scram is not None:
            proved = Secret(scram=ScramKeys(client_key, scram.server_key, scram.salt, scram.iterations))
    if problem is not None:
        raise AuthFailed("28P01", f'password authentication failed for user "{info.user}"',
                         f"{problem} {_line_context(line)}")
    return proved


async def _cleartext_password(exchange: Exchange) -> bytes:
    exchange.send(_request(_AUTH_CLEARTEXT))
    return await _password_bytes(exchange)


async def _md5_exchange(exchange: Exchange, secret: str | None) -> bool:
    salt = os.urandom(4)
    exchange.send(_request(_AUTH_MD5, salt))
    response = await _password_bytes(exchange)
    # bytes, not text: a client may send anything, and whatever it sends is a wrong answer
    # unless it is exactly the expected one
    return secret is not None and hmac.compare_digest(response, md5_salted(secret, salt))


async def _password_bytes(exchange: Exchange) -> bytes:
    """A PasswordMessage: one NUL-terminated string, as PostgreSQL's recv_password_packet reads it."""
    payload = await _password_message(exchange, "password")
    if payload.find(b"\0") != len(payload) - 1:
        raise AuthFailed("08P01", "invalid password packet size")
    if len(payload) == 1:
        raise AuthFailed("28P01", "empty password returned by client")
    return payload[:-1]


def _initial_mechanism(payload: bytes) -> tuple[str, bytes]:
    """SASLInitialResponse's mechanism name, and what follows it."""
    end = payload.find(b"\0")
    if end < 0:
        raise AuthFailed("08P01", "invalid string in message")
    return payload[:end].decode("utf-8", "replace"), payload[end + 1:]


def _initial_data(rest: bytes) -> bytes | None:
    """Then an int32 length and that many bytes (-1: no initial response), with
    PostgreSQL's pq_getmsgint / pq_getmsgbytes / pq_getmsgend errors."""
    if len(rest) < 4:
        raise AuthFailed("08P01", "insufficient data left in message")
    (length,) = struct.unpack_from("!i", rest)
    if length == -1:
        data = None
    elif length < 0 or length > len(rest) - 4:
        raise AuthFailed("08P01", "insufficient data left in message")
    else:
        data = rest[4:4 + length]
    if 4 + max(length, 0) != len(rest):
        raise AuthFailed("08P01", "invalid message format")
    return data


def _check_scram_input(data: bytes) -> None:
    """PostgreSQL's scram_exchange checks on every SCRAM message."""
    if not data:
        raise malformed("The message is empty.")
    if b"\0" in data:
        raise malformed("Message length does not match input length.")


async def _scram_exchange(exchange: Exchange, secret, channel_binding: bytes | None) -> bytes | None:
    """The exchange; the ClientKey the client's proof revealed, or None if it was wrong."""
    mechanisms = [SCRAM_PLUS, SCRAM] if channel_binding is not None else [SCRAM]
    exchange.send(_request(_AUTH_SASL, b"".join(m.encode() + b"\0" for m in mechanisms) + b"\0"))
    mechanism, rest = _initial_mechanism(await _password_message(exchange, "SASL"))
    if mechanism not in mechanisms:
        raise AuthFailed("08P01", "client selected an invalid SASL authentication mechanism")
    initial = _initial_data(rest)
    if initial is None:     # no initial response: an empty challenge asks for it
        exchange.send(_request(_AUTH_SASL_CONTINUE))
        initial = await _password_message(exchange, "SASL")
    _check_scram_input(initial)
    server = ScramServer(mechanism, secret, channel_binding, ssl_in_use=channel_binding is not None)
    exchange.send(_request(_AUTH_SASL_CONTINUE, server.first(initial)))
    client_final = await _password_message(exchange, "SASL")
    _check_scram_input(client_final)
    server_final = server.final(client_final)
    if server_final is None:
        return None
    exchange.send(_request(_AUTH_SASL_FINAL, server_final))
    return server.client_key
