"""What a startup packet asks for, read the way PostgreSQL's ProcessStartupPacket reads it.

The first packets of a connection (SSLRequest, GSSENCRequest, CancelRequest,
StartupMessage) are interpreted here into plain values; client.py decides what to do
with them. Every refusal is a Refused with PostgreSQL's SQLSTATE and wording.
"""
from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass

from ._framing import (CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, PROTOCOL_3_0, SSL_REQUEST_CODE,
                       ProtocolViolation, parse_startup_parameters)
from .config import _BadValue, _boolean
from .errors import Refused

NEWEST_MINOR = 2      # protocol 3.2 (PostgreSQL 18): cancel keys of up to 256 bytes
MAX_CANCEL_KEY_LENGTH = 256


@dataclass(frozen=True)
class SSLRequest:
    pass


@dataclass(frozen=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True)
class CancelRequest:
    pid: int
    key: bytes


@dataclass(frozen=True)
class StartupMessage:
    minor: int
    params: list[tuple[str, str]]     # as PostgreSQL gets them: the client's, less _pq_ options
    unrecognized_options: list[str]   # _pq_.* options, which this server does not know
    user: str
    database: str
    replication: bool                 # physical replication (a walsender without a database)
    walsender: bool                   # replication=true or database: never pooled

    @property
    def cancel_key_length(self) -> int:
        """The length of the cancel keys this client is given: PostgreSQL 18 gives 3.2
        clients 32 random bytes, older ones the 4 bytes 3.0 has room for."""
        return 32 if self.minor >= 2 else 4

    @property
    def needs_negotiation(self) -> bool:
        """A newer minor version or _pq_ options are answered with NegotiateProtocolVersion."""
        return self.minor > NEWEST_MINOR or bool(self.unrecognized_options)


def interpret(code: int, body: bytes):
    """The request a startup packet (its code and the body after it) makes."""
    if code == SSL_REQUEST_CODE:
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        # PostgreSQL 18: a key of any length up to 256 bytes (3.2), and nothing is ever
        # said back to a cancel request, however wrong
        if len(body) < 4:
            raise BadCancelRequest("invalid length of cancel request packet")
        if not 0 < len(body) - 4 <= MAX_CANCEL_KEY_LENGTH:
            raise BadCancelRequest("invalid length of cancel key in cancel request packet")
        return CancelRequest(struct.unpack_from("!i", body)[0], body[4:])
    if code >> 16 == PROTOCOL_3_0 >> 16:
        return _startup_message(code & 0xFFFF, body)
    raise unsupported_protocol(code)


class BadCancelRequest(Exception):
    """A CancelRequest PostgreSQL logs (COMMERROR) and answers by closing."""


def unsupported_protocol(code: int) -> Refused:
    """What PostgreSQL says to a request code it does not take here (an unknown version,
    or an SSLRequest or GSSENCRequest once that encryption has been answered)."""
    return Refused("0A000", f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                            f"server supports 3.0 to 3.{NEWEST_MINOR}")


NAMEDATALEN = 64


def _replication(params: list[tuple[str, str]]) -> tuple[bool, bool]:
    """(physical replication, walsender) from the replication parameters, in the order sent,
    as ProcessStartupPacket reads them: "database" (exactly) is a logical walsender, anything
    else must be a Boolean as parse_bool reads one."""
    physical = walsender = False
    for name, value in params:
        if name != "replication":
            continue
        if value == "database":
            physical, walsender = False, True
            continue
        try:
            physical = walsender = _boolean("replication", value)
        except _BadValue:
            raise Refused("22023", f'invalid value for parameter "replication": "{value}"',
                          hint='Valid values are: "false", 0, "true", 1, "database".') from None
    return physical, walsender


def _name(value: str) -> str:
    """Truncated to a PostgreSQL name (NAMEDATALEN - 1 bytes), as PostgreSQL truncates the
    user and database names of a startup packet before anything looks them up."""
    raw = value.encode("utf-8", "surrogateescape")
    return raw[:NAMEDATALEN - 1].decode("utf-8", "surrogateescape") if len(raw) >= NAMEDATALEN else value


def user_and_database(params: list[tuple[str, str]]) -> tuple[str, str]:
    """The user and database a startup packet names, as PostgreSQL reads them: truncated to
    a name, the database defaulting to the user."""
    values = dict(params)
    user = values.get("user") or ""
    return _name(user), _name(values.get("database") or user)


def _startup_message(minor: int, body: bytes) -> StartupMessage:
    try:
        params = parse_startup_parameters(body)
    except ProtocolViolation as exc:
        raise Refused("08P01", str(exc)) from None
    options = [name for name, _ in params if name.startswith("_pq_.")]
    # the parameters go to PostgreSQL as the client sent them (less _pq_ options): it
    # defaults the database to the user itself, and adding it here could push a packet
    # PostgreSQL accepts from the client past its 10000-byte limit
    params = [(k, v) for k, v in params if not k.startswith("_pq_.")]
    replication, walsender = _replication(params)
    if not dict(params).get("user"):
        raise Refused("28000", "no PostgreSQL user name specified in startup packet")
    return StartupMessage(minor, params, options, *user_and_database(params), replication, walsender)


# upstream mode's routes (upstream.Upstream.pick): which hosts a client's backends run on.
# ANY: the primary while there is one, else a standby (the catalogs: pg_authid is replicated)
PRIMARY, STANDBY, PREFER_STANDBY, ANY = "primary", "standby", "prefer-standby", "any"


def split_route(startup: StartupMessage, suffix: str, default: str = PRIMARY) -> tuple[StartupMessage, str]:
    """The client's real database and its route: "app" + suffix asks for a standby of
    "app", and from here on the client's database is "app" (for pg_hba.conf, the
    catalogs and the backend's startup packet alike); other names take the default."""
    database = startup.database
    if not suffix or not database.endswith(suffix) or database == suffix:
        return startup, default
    real = database[:-len(suffix)]
    params = [(k, real if k == "database" else v) for k, v in startup.params]
    if not any(k == "database" for k, _ in startup.params):
        params.append(("database", real))       # it was the user name, defaulted
    return dataclasses.replace(startup, params=params, database=real), STANDBY
