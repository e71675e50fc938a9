"""Reloading the configuration (SIGHUP, `pgfast reload`), with PostgreSQL's rules.

postgresql.conf (with postgresql.auto.conf and includes, and the same -c settings as at
start), pg_hba.conf, pg_ident.conf, and the TLS files are read again and each is checked
as at start; what fails to load leaves the old one in force, with PostgreSQL's LOG line
(`pg_hba.conf was not reloaded`, `SSL configuration was not reloaded`, ...), and pgfast
goes on. Settings that need a restart keep their value (`parameter "port" cannot be
changed without restarting the server`). Connections already open keep their TLS
session and their backend; the next connection gets the new configuration.
"""
from __future__ import annotations

import dataclasses

from . import config, log
from .auth import SUPPORTED_METHODS
from .errors import StartupError
from .hba import load_hba, load_ident
from .tls import load_server_tls

# what pgfast reads at start only (PostgreSQL's PGC_POSTMASTER, and pgfast's own)
_RESTART_FIELDS = ("listen_addresses", "port", "unix_socket_directories", "max_connections")
RESTART_PGFAST = ("pgfast.workers", "pgfast.postgres_bin", "pgfast.admin_user", "pgfast.metrics_listen",
                   "pgfast.hosts_file",
                   # upstream mode's: the hosts, their TLS and passwords, and the checks are set up once
                   "pgfast.upstream", "pgfast.auth_user", "pgfast.auth_query", "pgfast.passfile",
                   "pgfast.health_check_period", "pgfast.health_check_timeout", "pgfast.max_standby_lag")


def _emit(quiet: bool, message: str, **kw) -> None:
    if not quiet:
        log.log(message, **kw)


def _report(quiet: bool, exc: StartupError) -> None:
    for message, context in exc.preceding:
        _emit(quiet, message, context=context)
    _emit(quiet, exc.message, detail=exc.detail, hint=exc.hint, context=exc.context)


def reload(service, *, quiet: bool = False) -> None:
    """Read everything again and update service (worker.Service) in place. quiet: another
    process (the supervisor) has said all there is to say."""
    _emit(quiet, "received SIGHUP, reloading configuration files")
    old = service.settings
    try:
        new = config.load(old.data_dir, service.overrides, known=service.known)
    except StartupError as exc:
        _report(quiet, exc)
        _emit(quiet, f'configuration file "{old.data_dir}/postgresql.conf" contains errors; no changes were applied')
        return
    # as PostgreSQL: the files' word on a setting that needs a restart is compared with
    # the value in force, even where -c set it
    try:
        in_files = config.load(old.data_dir, [], known=service.known)
    except StartupError:
        in_files = new
    kept = {}
    for name in _RESTART_FIELDS:
        said = getattr(in_files if name in in_files.raw else new, name)
        if said != getattr(old, name):
            _emit(quiet, f'parameter "{name}" cannot be changed without restarting the server')
        kept[name] = getattr(old, name)
    pgfast = dict(new.pgfast)
    for name in RESTART_PGFAST:
        said = (in_files if name in in_files.raw else new).pgfast[name]
        if said != old.pgfast[name]:
            _emit(quiet, f'parameter "{name}" cannot be changed without restarting the server')
        pgfast[name] = old.pgfast[name]
    for name, value in pgfast.items():
        if value != old.pgfast[name]:
            shown = new.raw.get(name, "" if value is None else str(value))
            _emit(quiet, f'parameter "{name}" changed to "{shown}"')
    new = dataclasses.replace(new, pgfast=pgfast, **kept)

    try:
        service.hba = load_hba(new.hba_file, SUPPORTED_METHODS)
    except StartupError as exc:
        _report(quiet, exc)
        _emit(quiet, "pg_hba.conf was not reloaded")
    try:
        service.ident = load_ident(new.ident_file)
    except StartupError as exc:
        _report(quiet, exc)
        _emit(quiet, "pg_ident.conf was not reloaded")
    if new.ssl:
        try:
            service.tls = load_server_tls(new, db_uid=service.db_uid, interactive=False, reloading=True)
        except StartupError as exc:
            _report(quiet, exc)
            _emit(quiet, "SSL configuration was not reloaded")
    else:
        service.tls = None
    service.settings = new
