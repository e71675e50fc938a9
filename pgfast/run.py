"""`pgfast run`: start-up in PostgreSQL's order, serve, and stop cleanly.

Everything that can refuse to start is checked before anything listens or runs:
configuration, TLS files, pg_hba.conf; then sockets, then PostgreSQL itself.
"""
from __future__ import annotations

import concurrent.futures.thread  # noqa: F401  (see below)
import encodings.idna  # noqa: F401
import linecache  # noqa: F401
import os
import pwd
import shutil
import sys
import tempfile
import traceback  # noqa: F401

from . import accounts, config, conninfo, initdb, listeners, log, metrics, pgbin, pidfile, upstream
from ._shared import Shared
from .auth import SUPPORTED_METHODS
from .backend import LocalServer
from .errors import StartupError
from .hba import load_hba, load_ident
from .pidfile import PidFile
from .postmaster import Postmaster, live_postmaster_pid, remove_stale_socket_dirs, wait_for_orphan
from .shutdown import Mode
from .supervisor import Supervisor
from .tls import load_client_tls, load_server_tls, self_check
from .worker import Service, serve

# Everything pgfast imports is imported above, before it drops root's rights: the
# Python installation may be readable by root only (e.g. under /root), and a module
# first needed later (the executor behind run_in_executor, the idna codec behind
# getaddrinfo, traceback printing) could then never be loaded.


def _load_settings(data_dir: str, overrides: list[tuple[str, str]]
                   ) -> tuple[config.Settings, tuple[str, str], dict]:
    """The settings; where PostgreSQL's programs are and how they were found; the
    settings those programs know."""
    # pgfast.postgres_bin can only come from the configuration, and the names
    # PostgreSQL knows can only come from that binary: read twice
    first = config.load(data_dir, overrides, known=None)
    located = pgbin.locate(first.pgfast.get("pgfast.postgres_bin"))
    known = config.describe_config(located[0])
    return config.load(data_dir, overrides, known=known), located, known


def _initialise_if_needed(data_dir: str, overrides: list[tuple[str, str]], user: str | None) -> dict | None:
    if not initdb.is_empty_or_missing(data_dir):
        return None
    log.log(f'data directory "{data_dir}" is missing or empty; initialising it')
    account = accounts.database_account(data_dir, user)
    # no postgresql.conf yet: only -c can name the programs
    configured = next((value for name, value in reversed(overrides) if name.lower() == "pgfast.postgres_bin"), None)
    bindir, how = pgbin.locate(configured)
    pgbin.announce(bindir, how)
    return initdb.initialise(data_dir, bindir, account)


def _check_not_running(data_dir: str) -> None:
    pid = live_postmaster_pid(data_dir)
    if pid is not None and wait_for_orphan(data_dir, pid):
        pid = None      # the PostgreSQL of a pgfast that was killed, which has now shut down
    if pid is not None:
        raise StartupError('lock file "postmaster.pid" already exists',
                           hint=f'Is another postmaster (PID {pid}) running in data directory "{data_dir}"?')


def run(data_dir: str, overrides: list[tuple[str, str]], user: str | None) -> int:
    settings = _upstream_settings(data_dir, overrides)
    if settings is not None:
        return run_upstream(settings, overrides, user)
    initialised = _initialise_if_needed(data_dir, overrides, user)
    if not os.path.isfile(os.path.join(data_dir, "PG_VERSION")):
        raise StartupError(f'"{data_dir}" is not a valid data directory',
                           detail='File "PG_VERSION" is missing.')
    settings, (bindir, found_through), known = _load_settings(data_dir, overrides)
    if initialised:
        print(initdb.report(initialised, settings.port), file=sys.stderr, flush=True)
    account = accounts.database_account(data_dir, user)
    lock = PidFile(data_dir, settings.port, (settings.unix_socket_directories or [""])[0],
                   (settings.listen_addresses or [""])[0])
    lock.create()
    mode = Mode.FAST
    unix_sockets = []
    postmaster = Postmaster(bindir, settings)
    try:
        _check_not_running(data_dir)
        tls, hba, ident = _front_files(settings, account)
        postmaster.check_config(account)
        workers = settings.pgfast["pgfast.workers"]
        tcp_sockets = listeners.bind_tcp(settings.listen_addresses, settings.port, copies=workers)
        accounts.drop_privileges(account)
        accounts.check_reachable(data_dir, account)
        remove_stale_socket_dirs()
        unix_sockets = listeners.bind_unix(settings.unix_socket_directories, settings.port)
        log.start_background()
        pgbin.announce(bindir, found_through)
        shared = _shared(settings, workers)
        postmaster.start()
        lock.postmaster_pid = postmaster.process.pid
        lock.set_status(pidfile.STARTING)
        service = Service(settings, hba, ident, tls, postmaster.socket_dir, LocalServer(postmaster.socket_path),
                          postmaster.process.pid, settings.pgfast.get("pgfast.admin_user") or account.name,
                          unix_sockets, shared, workers, list(overrides), known, account.uid, lock)
        status, mode = _serve(service, tcp_sockets, postmaster)
        return status
    finally:
        postmaster.stop(immediate=mode is Mode.IMMEDIATE)
        _remove_sockets(unix_sockets)
        lock.remove()
        log.stop_background()


def _front_files(settings: config.Settings, account) -> tuple:
    """The server TLS, pg_hba.conf and pg_ident.conf, each checked (or StartupError)."""
    tls = None
    if settings.ssl:
        self_check()
        tls = load_server_tls(settings, db_uid=account.uid, interactive=sys.stdin.isatty())
    return tls, load_hba(settings.hba_file, SUPPORTED_METHODS), load_ident(settings.ident_file)


def _shared(settings: config.Settings, workers: int) -> Shared:
    """What the workers count together, and /metrics when it is asked for."""
    shared = Shared()
    metrics_listen = settings.pgfast["pgfast.metrics_listen"]
    if metrics_listen is not None:
        metrics.metrics.enable(workers)
        metrics.serve(metrics_listen, shared)
    return shared


def _serve(service: Service, tcp_sockets, postmaster) -> tuple[int, Mode]:
    if service.workers == 1:
        return serve(service, 0, tcp_sockets[0], supervised=False)
    return Supervisor(service, tcp_sockets, postmaster).run()


def _remove_sockets(unix_sockets) -> None:
    for _sock, path in unix_sockets:
        try:
            os.unlink(path)
        except OSError:
            pass


# --- upstream mode: no PostgreSQL here; the servers of pgfast.upstream serve ---------------

def _upstream_settings(data_dir: str, overrides: list[tuple[str, str]]) -> config.Settings | None:
    """The settings, when DIR is for upstream mode (a configuration with pgfast.upstream
    and no PostgreSQL data). No PostgreSQL checks the names: any are taken."""
    if os.path.isfile(os.path.join(data_dir, "PG_VERSION")) or not os.path.isfile(
            os.path.join(data_dir, "postgresql.conf")):
        return None
    settings = config.load(data_dir, overrides, known=None)
    return settings if settings.pgfast["pgfast.upstream"] is not None else None


def load_upstream(settings: config.Settings, home: str) -> upstream.Upstream:
    """pgfast.upstream, its TLS and pgfast.passfile, checked as libpq would check them;
    home: the account's that pgfast runs as (its ~/.postgresql, as libpq's)."""
    option = settings.pgfast.get
    data_dir = os.path.abspath(settings.data_dir)
    try:
        info = conninfo.parse(option("pgfast.upstream"), base_dir=data_dir)
    except conninfo.ConninfoError as exc:
        raise StartupError(f"invalid pgfast.upstream: {exc}") from None
    refused = upstream.not_taken(info)
    if refused is not None:
        raise StartupError(f"invalid pgfast.upstream: {refused}")
    try:
        passfile = upstream.load_passfile(os.path.join(data_dir, option("pgfast.passfile")))
    except conninfo.ConninfoError as exc:
        raise StartupError(str(exc)) from None
    # libpq never uses TLS on a Unix socket, nor wants its files for one
    tcp = any(not host.host.startswith("/") for host in info.hosts)
    tls = load_client_tls(info, home) if info.sslmode != "disable" and tcp else None
    return upstream.Upstream(info, tls, passfile=passfile, auth_user=_auth_user(settings),
                             check_period=option("pgfast.health_check_period"),
                             check_timeout=option("pgfast.health_check_timeout"),
                             max_standby_lag=option("pgfast.max_standby_lag"))


def _auth_user(settings: config.Settings) -> str:
    return settings.pgfast.get("pgfast.auth_user") or settings.pgfast.get("pgfast.admin_user") or "postgres"


def run_upstream(settings: config.Settings, overrides: list[tuple[str, str]], user: str | None) -> int:
    data_dir = settings.data_dir
    account = accounts.database_account(data_dir, user)
    lock = PidFile(data_dir, settings.port, (settings.unix_socket_directories or [""])[0],
                   (settings.listen_addresses or [""])[0])
    lock.create()
    unix_sockets = []
    private_dir = None
    try:
        tls, hba, ident = _front_files(settings, account)
        servers = load_upstream(settings, pwd.getpwuid(account.uid).pw_dir)
        workers = settings.pgfast["pgfast.workers"]
        tcp_sockets = listeners.bind_tcp(settings.listen_addresses, settings.port, copies=workers)
        accounts.drop_privileges(account)
        accounts.check_reachable(data_dir, account)
        unix_sockets = listeners.bind_unix(settings.unix_socket_directories, settings.port)
        # the workers' cancel and console sockets: private, as PostgreSQL's socket directory is
        private_dir = tempfile.mkdtemp(prefix="pgfast-")
        log.start_background()
        log.log(f"upstream mode: serving {servers.info.describe()}")
        shared = _shared(settings, workers)
        lock.set_status(pidfile.STARTING)
        service = Service(settings, hba, ident, tls, private_dir, servers, None, _auth_user(settings),
                          unix_sockets, shared, workers, list(overrides), None, account.uid, lock)
        return _serve(service, tcp_sockets, None)[0]
    finally:
        _remove_sockets(unix_sockets)
        if private_dir is not None:
            shutil.rmtree(private_dir, ignore_errors=True)
        lock.remove()
        log.stop_background()
