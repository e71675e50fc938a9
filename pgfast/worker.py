"""One serving process: an event loop with its own listening sockets, catalog session,
pools and clients. With pgfast.workers = 1 it is pgfast's own process; with more, each
worker is forked by the supervisor (supervisor.py) and shares the global limits and the
cancel keys' owners through pgfast._shared.
"""
from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import sys
from dataclasses import dataclass, field

from . import log
from ._shared import BACKENDS, Shared
from .catalog import Catalog
from .config import Settings
from .frontend import Frontend
from .hba import HbaRules, IdentMap
from .pool import Pool
from .reload import reload
from .tls import ServerTLS
from .txpool import TransactionPools

try:
    import uvloop
except ImportError:     # pgfast runs on asyncio's own loop too, only slower
    uvloop = None

_PR_SET_PDEATHSIG = 1


@dataclass
class Service:
    """Everything a worker serves with, fixed at start."""
    settings: Settings
    hba: HbaRules
    ident: IdentMap
    tls: ServerTLS | None
    socket_dir: str                      # PostgreSQL's private socket directory
    socket_path: str
    postmaster_pid: int
    admin_user: str
    unix_sockets: list = field(default_factory=list)
    shared: Shared = field(default_factory=Shared)
    workers: int = 1
    # what a reload needs to read the configuration again as at start
    overrides: list = field(default_factory=list)      # -c NAME=VALUE
    known: dict | None = None                          # the settings PostgreSQL knows
    db_uid: int = 0                                    # who may own the key

    def cancel_socket_path(self, worker: int) -> str:
        return os.path.join(self.socket_dir, f"cancel.{worker}")


class _Stop:
    """Why a worker stops: its exit status and what its clients are told (PostgreSQL's words)."""

    def __init__(self, status: int, sqlstate: str, message: str):
        self.status, self.sqlstate, self.message = status, sqlstate, message


def _pools(service: Service) -> tuple[Pool, TransactionPools]:
    option = service.settings.pgfast.get
    shared = service.shared

    def backend_limit() -> int:
        # PostgreSQL's own limit, across workers; its superuser_reserved_connections keep
        # room for the catalog sessions
        return service.settings.max_connections - shared.total(BACKENDS)

    pool = Pool(service.socket_path, size=option("pgfast.pool_size"), idle_timeout=option("pgfast.pool_idle_timeout"),
                lifetime=option("pgfast.pool_lifetime"), reset_query=option("pgfast.server_reset_query"),
                backend_limit=backend_limit, shared=shared, balance=service.workers > 1)
    tx_pools = TransactionPools(
        service.socket_path, size=option("pgfast.pool_size"), reserve_size=option("pgfast.reserve_pool_size"),
        reserve_timeout=option("pgfast.reserve_pool_timeout"), min_size=option("pgfast.min_pool_size"),
        idle_timeout=option("pgfast.pool_idle_timeout"), lifetime=option("pgfast.pool_lifetime"),
        query_wait_timeout=option("pgfast.query_wait_timeout"), reset_query=option("pgfast.server_reset_query"),
        backend_limit=backend_limit, shared=shared, balance=service.workers > 1)
    return pool, tx_pools


def _new_event_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


def prepare_forked_worker(index: int, service: Service) -> None:
    """In a worker just forked from the supervisor: its own signal state, and an end of
    its own if the supervisor is killed outright."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    service.shared.set_worker(index)


def serve(service: Service, index: int, tcp_sockets: list[socket.socket], *, supervised: bool,
          ready_fd: int | None = None) -> int:
    """Serve until told to stop; the exit status."""
    loop = _new_event_loop()
    asyncio.set_event_loop(loop)
    stopping = loop.create_future()

    def request_stop(stop: _Stop) -> None:
        if not stopping.done():
            stopping.set_result(stop)

    def on_signal() -> None:
        if not stopping.done() and not supervised:
            log.log("received fast shutdown request")
        request_stop(_Stop(0, "57P01", "terminating connection due to administrator command"))

    loop.add_signal_handler(signal.SIGTERM, on_signal)
    loop.add_signal_handler(signal.SIGINT, on_signal)
    _watch_postmaster(loop, service.postmaster_pid, request_stop, report=not supervised)

    async def main() -> int:
        catalog = Catalog(service.socket_path, service.admin_user)
        pool, tx_pools = _pools(service)
        frontend = Frontend(service.settings, service.hba, service.ident, service.tls, catalog, pool, tx_pools,
                            service.socket_path, service.shared, index, service.workers,
                            service.cancel_socket_path)
        await frontend.serve(tcp_sockets, service.unix_sockets)

        def on_sighup() -> None:
            # under a supervisor it has read and reported everything already; here it is
            # only applied (and the supervisor tells PostgreSQL)
            reload(service, quiet=supervised)
            frontend.apply(service.settings, service.hba, service.ident, service.tls)
            if not supervised:
                _signal_postmaster(service.postmaster_pid, signal.SIGHUP)
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        log.start_background()
        if ready_fd is not None:
            try:
                os.write(ready_fd, b".")
            except OSError:
                pass        # a restarted worker: nobody waits for it
            os.close(ready_fd)
        else:
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


def _signal_postmaster(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


async def _finish_tasks() -> None:
    """Whatever still runs (logins cut short, cancels being forwarded) ends here, before
    the loop closes, so nothing is left pending."""
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


def _watch_postmaster(loop, pid: int, request_stop, report: bool) -> None:
    """PostgreSQL restarts its own crashed backends; if the postmaster itself goes,
    there is nothing to serve. The process that started it (pgfast, or its supervisor)
    says so with a FATAL; a worker just stops."""
    def on_exit() -> None:
        if report:
            log.fatal("PostgreSQL exited unexpectedly; shutting down")
        request_stop(_Stop(1, "57P01", "terminating connection due to unexpected postmaster exit"))

    if hasattr(os, "pidfd_open"):
        fd = os.pidfd_open(pid)

        def ready() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            on_exit()
        loop.add_reader(fd, ready)
    else:   # no pidfd (macOS): look once a second
        def poll() -> None:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                on_exit()
                return
            loop.call_later(1.0, poll)
        loop.call_later(1.0, poll)
