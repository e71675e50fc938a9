"""Who may connect: pg_hba.conf's verdict and the authentication it asks for.

Every refusal carries PostgreSQL's SQLSTATE and wording for the client, and the real
reason separately for the server log, as PostgreSQL keeps them apart.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import log
from .hba import HbaLine, HbaRules, IdentMap

# Methods pgfast can honour at the front today; any other pg_hba.conf method is a
# start-up error rather than something quietly weakened.
SUPPORTED_METHODS = frozenset({"trust", "reject", "cert"})


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

    @property
    def host(self) -> str:
        return "[local]" if self.local else self.address

    @property
    def encryption(self) -> str:
        return "SSL encryption" if self.ssl else "no encryption"


class AuthFailed(Exception):
    def __init__(self, sqlstate: str, message: str, log_detail: str | None = None):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.log_detail = log_detail


def no_hba_entry(info: ClientInfo) -> AuthFailed:
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


def authorize(rules: HbaRules, ident: IdentMap, info: ClientInfo, roles: frozenset[str] | None,
              client_hostname: str | None) -> HbaLine:
    """The pg_hba.conf line that admits this client, checked as far as it can be
    without a password exchange; raises AuthFailed."""
    line = rules.match(local=info.local, ssl=info.ssl, address=info.address, database=info.database,
                       user=info.user, replication=info.replication, roles=roles,
                       client_hostname=client_hostname)
    if line is None:
        raise no_hba_entry(info)
    if line.method == "reject":
        raise _rejected(info)
    check_client_certificate(line, info, ident)
    return line
