"""`pgfast run`: start-up in PostgreSQL's order, serve, and stop cleanly.

Everything that can refuse to start is checked before anything listens or runs:
configuration, TLS files, pg_hba.conf; then sockets, then PostgreSQL itself.
"""
from __future__ import annotations

import asyncio
import concurrent.futures.thread  # noqa: F401  (see below)
import encodings.idna  # noqa: F401
import linecache  # noqa: F401
import os
import signal
import sys
import traceback  # noqa: F401

from . import accounts, config, initdb, listeners, log, pgbin
from .auth import SUPPORTED_METHODS
from .catalog import Catalog
from .errors import StartupError
from .hba import load_hba, load_ident
from .pool import Pool
from .txpool import TransactionPools
from .frontend import Frontend
from .postmaster import Postmaster, live_postmaster_pid, remove_stale_socket_dirs, wait_for_orphan
from .tls import load_server_tls, self_check

try:
    import uvloop
except ImportError:     # pgfast runs on asyncio's own loop too, only slower
    uvloop = None

# Everything pgfast imports is imported above, before it drops root's rights: the
# Python installation may be readable by root only (e.g. under /root), and a module
# first needed later (the executor behind run_in_executor, the idna codec behind
# getaddrinfo, traceback printing) could then never be loaded.


def _load_settings(data_dir: str, overrides: list[tuple[str, str]]) -> tuple[config.Settings, str]:
    # pgfast.postgres_bin can only come from the configuration, and the names
    # PostgreSQL knows can only come from that binary: read twice
    first = config.load(data_dir, overrides, known=None)
    bindir = pgbin.find_bindir(first.pgfast.get("pgfast.postgres_bin"))
    return config.load(data_dir, overrides, known=config.describe_config(bindir)), bindir


def _initialise_if_needed(data_dir: str, user: str | None) -> dict | None:
    if not initdb.is_empty_or_missing(data_dir):
        return None
    log.log(f'data directory "{data_dir}" is missing or empty; initialising it')
    account = accounts.database_account(data_dir, user)
    return initdb.initialise(data_dir, pgbin.find_bindir(), account)


def _check_not_running(data_dir: str) -> None:
    pid = live_postmaster_pid(data_dir)
    if pid is not None and wait_for_orphan(data_dir, pid):
        pid = None      # the PostgreSQL of a pgfast that was killed, which has now shut down
    if pid is not None:
        raise StartupError('lock file "postmaster.pid" already exists',
                           hint=f'Is another postmaster (PID {pid}) running in data directory "{data_dir}"?')


def run(data_dir: str, overrides: list[tuple[str, str]], user: str | None) -> int:
    initialised = _initialise_if_needed(data_dir, user)
    if not os.path.isfile(os.path.join(data_dir, "PG_VERSION")):
        raise StartupError(f'"{data_dir}" is not a valid data directory',
                           detail='File "PG_VERSION" is missing.')
    settings, bindir = _load_settings(data_dir, overrides)
    if initialised:
        print(initdb.report(initialised, settings.port), file=sys.stderr, flush=True)
    account = accounts.database_account(data_dir, user)
    _check_not_running(data_dir)
    tls = None
    if settings.ssl:
        self_check()
        tls = load_server_tls(settings, db_uid=account.uid, interactive=sys.stdin.isatty())
    hba = load_hba(settings.hba_file, SUPPORTED_METHODS)
    ident = load_ident(settings.ident_file)
    postmaster = Postmaster(bindir, settings)
    postmaster.check_config(account)
    tcp_sockets = listeners.bind_tcp(settings.listen_addresses, settings.port)
    accounts.drop_privileges(account)
    accounts.check_reachable(data_dir, account)
    remove_stale_socket_dirs()
    unix_sockets = listeners.bind_unix(settings.unix_socket_directories, settings.port)
    try:
        postmaster.start()
        admin = settings.pgfast.get("pgfast.admin_user") or account.name
        catalog = Catalog(postmaster.socket_path, admin)
        pool, tx_pools = _pools(settings, postmaster.socket_path)
        return _serve(settings, hba, ident, tls, postmaster, catalog, pool, tx_pools, tcp_sockets, unix_sockets)
    finally:
        postmaster.stop()
        for _sock, path in unix_sockets:
            try:
                os.unlink(path)
            except OSError:
                pass


def _new_event_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


def _pools(settings: config.Settings, socket_path: str) -> tuple[Pool, TransactionPools]:
    option = settings.pgfast.get
    pools: list = []

    def backend_limit() -> int:
        # PostgreSQL's own limit; its superuser_reserved_connections keep room for the catalog session
        return settings.max_connections - sum(p.size for p in pools)

    pool = Pool(socket_path, size=option("pgfast.pool_size"), idle_timeout=option("pgfast.pool_idle_timeout"),
                lifetime=option("pgfast.pool_lifetime"), reset_query=option("pgfast.server_reset_query"),
                backend_limit=backend_limit)
    tx_pools = TransactionPools(
        socket_path, size=option("pgfast.pool_size"), reserve_size=option("pgfast.reserve_pool_size"),
        reserve_timeout=option("pgfast.reserve_pool_timeout"), min_size=option("pgfast.min_pool_size"),
        idle_timeout=option("pgfast.pool_idle_timeout"), lifetime=option("pgfast.pool_lifetime"),
        query_wait_timeout=option("pgfast.query_wait_timeout"), reset_query=option("pgfast.server_reset_query"),
        backend_limit=backend_limit)
    pools += [pool, tx_pools]
    return pool, tx_pools


class _Stop:
    """Why pgfast stops: its exit status and what its clients are told (PostgreSQL's words)."""

    def __init__(self, status: int, sqlstate: str, message: str):
        self.status, self.sqlstate, self.message = status, sqlstate, message


def _serve(settings, hba, ident, tls, postmaster, catalog, pool, tx_pools, tcp_sockets, unix_sockets) -> int:
    loop = _new_event_loop()
    asyncio.set_event_loop(loop)
    stopping = loop.create_future()

    def request_stop(stop: _Stop) -> None:
        if not stopping.done():
            stopping.set_result(stop)

    def on_signal() -> None:
        if not stopping.done():
            log.log("received fast shutdown request")
        request_stop(_Stop(0, "57P01", "terminating connection due to administrator command"))

    loop.add_signal_handler(signal.SIGTERM, on_signal)
    loop.add_signal_handler(signal.SIGINT, on_signal)
    loop.add_signal_handler(signal.SIGHUP, log.log,
                            "received SIGHUP: pgfast reads its configuration at start; restart it to apply changes")
    _watch_postmaster(loop, postmaster, request_stop)

    async def main() -> int:
        frontend = Frontend(settings, hba, ident, tls, catalog, pool, tx_pools, postmaster.socket_path)
        await frontend.serve(tcp_sockets, unix_sockets)
        log.start_background()
        log.log("database system is ready to accept connections")
        stop = await stopping
        await frontend.shutdown(stop.sqlstate, stop.message)
        await asyncio.gather(pool.close(), tx_pools.close())
        catalog.close()
        await _finish_tasks()
        return stop.status

    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()
        log.stop_background()


async def _finish_tasks() -> None:
    """Whatever still runs (logins cut short, cancels being forwarded) ends here, before
    the loop closes, so nothing is left pending."""
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


def _watch_postmaster(loop, postmaster: Postmaster, request_stop) -> None:
    """PostgreSQL restarts its own crashed backends; if the postmaster itself goes,
    pgfast has nothing to serve and stops too."""
    process = postmaster.process

    def report() -> None:
        log.fatal(f"PostgreSQL exited unexpectedly with status {process.wait()}; shutting down")
        request_stop(_Stop(1, "57P01", "terminating connection due to unexpected postmaster exit"))

    if hasattr(os, "pidfd_open"):
        fd = os.pidfd_open(process.pid)

        def on_exit() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            report()
        loop.add_reader(fd, on_exit)
    else:   # no pidfd (macOS): look once a second
        def poll() -> None:
            if process.poll() is None:
                loop.call_later(1.0, poll)
            else:
                report()
        loop.call_later(1.0, poll)
