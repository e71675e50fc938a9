"""The login decision: pg_hba.conf and authentication.

One procedure for every client, whatever pg_hba.conf asks: it awaits only where it must
ask someone (the catalogs, DNS, the client itself), and reads the catalogs at most once
per login, so the role's credentials, memberships, the state its backend starts under
and its pgfast settings are one consistent answer, read for this login alone.
"""
from __future__ import annotations

import asyncio
import time
from typing import Protocol

from .auth import PASSWORD_METHODS, ClientInfo, authenticate_password, authorize, check_peer
from .catalog import CatalogError, LoginFacts, log_catalog_failure
from .credentials import Secret
from .errors import AuthFailed
from .hba import resolve_client_hostname
from .metrics import AUTH_METHODS, metrics
from .negotiation import StartupMessage


class Client(Protocol):
    """What the login needs of the client connection."""

    def send(self, data: bytes) -> None: ...

    async def receive(self) -> tuple[int, bytes]: ...

    def peer_uid(self) -> int | None: ...

    def authenticated(self, secret: Secret | None) -> None: ...


async def log_in(frontend, startup: StartupMessage, info: ClientInfo, client: Client) -> LoginFacts | None:
    """What the catalogs say of an authenticated client's role and database (None for a
    walsender, which is never pooled, or when the catalogs could not say and pg_hba did
    not need them). Raises AuthFailed (refused) or CatalogError (the catalogs cannot
    say what authentication needs)."""
    started = time.monotonic()
    decided = _Decided()
    try:
        facts = await _log_in(frontend, startup, info, client, decided)
    except AuthFailed:
        metrics.count("authentications_total", decided.method, "failed")
        raise
    metrics.count("authentications_total", decided.method, "ok")
    metrics.observe("authentication_seconds", time.monotonic() - started, decided.method)
    return facts


class _Decided:
    """The pg_hba.conf method that decided, once a line matched."""
    method = "none"


async def _log_in(frontend, startup: StartupMessage, info: ClientInfo, client: Client,
                  decided: _Decided) -> LoginFacts | None:
    facts: LoginFacts | None = None
    if frontend.hba.needs_roles:
        facts = await frontend.catalog.login_facts(info.user, info.database, roles=True)
    hostname = None
    if frontend.hba.needs_hostname and info.address is not None:
        hostname = await asyncio.get_running_loop().run_in_executor(None, resolve_client_hostname, info.address)
    line = authorize(frontend.hba, frontend.ident, info, facts.roles if facts else None, hostname)
    decided.method = line.method if line.method in AUTH_METHODS else "none"
    # a walsender (replication=true or database) is never pooled: DISCARD ALL does not
    # end what it holds (temporary replication slots, streaming)
    if facts is None and (line.method in PASSWORD_METHODS or not startup.walsender):
        try:
            facts = await frontend.catalog.login_facts(info.user, info.database, roles=False)
        except CatalogError as exc:
            if line.method in PASSWORD_METHODS:
                raise
            log_catalog_failure(exc)        # then a fresh backend, and PostgreSQL decides
    secret = None
    if line.method in PASSWORD_METHODS:
        secret = await authenticate_password(line, info, client, facts.credentials,
                                             info.server_end_point,
                                             frontend.password_encryption)
    elif line.method == "peer":
        check_peer(line, info, frontend.ident, client.peer_uid())
    client.authenticated(secret)
    return facts if not startup.walsender else None
