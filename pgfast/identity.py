"""The client's identity, given to the backend serving it as custom settings.

Behind pgfast, PostgreSQL sees every session come over a Unix socket without TLS:
inet_client_addr() is NULL and pg_stat_ssl.ssl false. pgfast gives each backend what it
knows of the client it serves, readable with current_setting('pgfast.client_addr', true):

    pgfast.client_addr, pgfast.client_port            '' over a Unix socket
    pgfast.ssl                                        'on' or 'off'
    pgfast.ssl_version, pgfast.ssl_cipher             as pg_stat_ssl shows them
    pgfast.ssl_client_dn, pgfast.ssl_client_serial    '' without a client certificate
    pgfast.ssl_server_name                            the SNI name the client asked for

They are re-asserted, not locked: PostgreSQL has no way to make a placeholder setting
read-only, and a client can change any through set_config() however its SET statements
are filtered. So pgfast sets them on every assignment (a session's backend, or, with
pgfast.client_identity = on, each transaction's under transaction pooling whenever the
backend last served someone else or was reset): what one client sets never reaches
another's session, but a session can change its own view, as with application_name.
Under transaction pooling without 'on' nothing is given, and what a client sets with
set_config() stays on the backend, as any such setting does there. Use them for logs and
auditing, never to authorize (pg_hba.conf does that, at the front).
"""
from __future__ import annotations

from .literals import dollar_quoted

NAMES = ("client_addr", "client_port", "ssl", "ssl_version", "ssl_cipher", "ssl_client_dn",
         "ssl_client_serial", "ssl_server_name")


def identity_sql(address: str | None, port: int | None, tls: dict | None) -> str:
    """One statement giving a backend these values (tls: TLSSession.facts())."""
    values = {"client_addr": address or "", "client_port": str(port) if port else "",
              "ssl": "on" if tls else "off"}
    if tls:
        values.update(ssl_version=tls["version"], ssl_cipher=tls["cipher"] or "",
                      ssl_client_dn=tls["client_dn"] or "",
                      ssl_client_serial="" if tls["client_serial"] is None else str(tls["client_serial"]),
                      ssl_server_name=tls["sni"] or "")
    # a certificate's subject and the SNI name are the client's to choose: quoted so that no
    # value can end its literal, and without NULs, which would end the query message
    calls = ", ".join(f"pg_catalog.set_config('pgfast.{name}', "
                      f"{dollar_quoted(values.get(name, '').replace(chr(0), ''))}, false)" for name in NAMES)
    return f"SELECT {calls}"
