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

from . import log, pidfile
from .metrics import close_in_forked_worker, metrics
from ._shared import BACKENDS, Shared
from .catalog import ADMIN_DATABASES, LOGIN_FACTS, Catalog
from .config import Settings
from .frontend import Frontend
from .hba import HbaRules, IdentMap
from .pool import Pool
from .pidfile import PidFile
from .reload import reload
from .shutdown import FAST_MESSAGE, IMMEDIATE_MESSAGE, POSTMASTER_GONE, SHUTTING_DOWN, SIGNALS, Mode
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
    socket_dir: str                      # private: PostgreSQL's socket directory, or upstream mode's own
    servers: object                      # where backends run: backend.LocalServer or upstream.Upstream
    postmaster_pid: int | None           # None in upstream mode: pgfast started no PostgreSQL
    admin_user: str
    unix_sockets: list = field(default_factory=list)
    shared: Shared = field(default_factory=Shared)
    workers: int = 1
    # what a reload needs to read the configuration again as at start
    overrides: list = field(default_factory=list)      # -c NAME=VALUE
    known: dict | None = None                          # the settings PostgreSQL knows
    db_uid: int = 0                                    # who may own the key
    pidfile: PidFile | None = None

    def cancel_socket_path(self, worker: int) -> str:
        return os.path.join(self.socket_dir, f"cancel.{worker}")

    def admin_socket_path(self, worker: int) -> str:
        return os.path.join(self.socket_dir, f"console.{worker}")


class _Stopper:
    """The shutdown asked for so far: only ever more urgent (shutdown.Mode), with what
    the clients are told and the exit status."""

    def __init__(self):
        self.mode: Mode | None = None
        self.message = FAST_MESSAGE
        self.status = 0
        self._raised = asyncio.Event()

    def request(self, mode: Mode, message: tuple[str, str], status: int = 0) -> bool:
        if self.mode is not None and mode <= self.mode:
            return False
        self.mode, self.message, self.status = mode, message, max(self.status, status)
        self._raised.set()
        return True

    async def more_urgent_than(self, mode: Mode | None) -> None:
        while self.mode is None or (mode is not None and self.mode <= mode):
            self._raised.clear()
            await self._raised.wait()


_MESSAGES = {Mode.SMART: SHUTTING_DOWN, Mode.FAST: FAST_MESSAGE, Mode.IMMEDIATE: IMMEDIATE_MESSAGE}


def _pools(service: Service) -> tuple[Pool, TransactionPools]:
    option = service.settings.pgfast.get
    shared = service.shared

    def backend_limit() -> int:
        # PostgreSQL's own limit, across workers; its superuser_reserved_connections keep
        # room for the catalog sessions
        return service.settings.max_connections - shared.total(BACKENDS)

    pool = Pool(service.servers, size=option("pgfast.pool_size"), idle_timeout=option("pgfast.pool_idle_timeout"),
                lifetime=option("pgfast.pool_lifetime"), reset_query=option("pgfast.server_reset_query"),
                backend_limit=backend_limit, shared=shared, balance=service.workers > 1)
    tx_pools = TransactionPools(
        service.servers, size=option("pgfast.pool_size"), reserve_size=option("pgfast.reserve_pool_size"),
        reserve_timeout=option("pgfast.reserve_pool_timeout"), min_size=option("pgfast.min_pool_size"),
        idle_timeout=option("pgfast.pool_idle_timeout"), lifetime=option("pgfast.pool_lifetime"),
        query_wait_timeout=option("pgfast.query_wait_timeout"), reset_query=option("pgfast.server_reset_query"),
        backend_limit=backend_limit, shared=shared, workers=service.workers)
    return pool, tx_pools


def _catalog_options(service: Service) -> dict:
    """Upstream mode: pgfast.auth_query, pgfast.upstream's dbname first, and a timeout."""
    pgfast = service.settings.pgfast
    if pgfast["pgfast.upstream"] is None:
        return {}
    dbname = service.servers.info.dbname
    return {"facts_query": pgfast["pgfast.auth_query"] or LOGIN_FACTS,
            "databases": (dbname, *(d for d in ADMIN_DATABASES if d != dbname)) if dbname else ADMIN_DATABASES,
            "timeout": pgfast["pgfast.health_check_timeout"]}


def _new_event_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


def prepare_forked_worker(index: int, service: Service) -> None:
    """In a worker just forked from the supervisor: its own signal state, and an end of
    its own if the supervisor is killed outright."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for signum in (*SIGNALS, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    if sys.platform.startswith("linux"):      # a supervisor killed outright: a fast shutdown
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, Mode.FAST.signal)
    service.shared.set_worker(index)
    metrics.set_worker(index)
    close_in_forked_worker()


def serve(service: Service, index: int, tcp_sockets: list[socket.socket], *, supervised: bool,
          ready_fd: int | None = None) -> tuple[int, Mode]:
    """Serve until told to stop; the exit status and how it stopped."""
    loop = _new_event_loop()
    asyncio.set_event_loop(loop)
    stopper = _Stopper()

    def on_signal(mode: Mode) -> None:
        if stopper.request(mode, _MESSAGES[mode]) and not supervised:
            log.log(mode.request_line)
            service.pidfile.set_status(pidfile.STOPPING)

    for mode in Mode:
        loop.add_signal_handler(mode.signal, on_signal, mode)
    if service.postmaster_pid is not None:
        _watch_postmaster(loop, service.postmaster_pid, stopper, report=not supervised)

    async def main() -> tuple[int, Mode]:
        catalog = Catalog(service.servers, service.admin_user, **_catalog_options(service))
        pool, tx_pools = _pools(service)
        frontend = Frontend(service.settings, service.hba, service.ident, service.tls, catalog, pool, tx_pools,
                            service.shared, index, service.workers,
                            service.cancel_socket_path, service.admin_socket_path)
        # the console's RELOAD: what SIGHUP does (under a supervisor, it tells every worker)
        frontend.request_reload = lambda: os.kill(os.getppid() if supervised else os.getpid(), signal.SIGHUP)
        service.servers.start()
        # upstream mode: the hosts' roles are known before the first client comes (a host
        # that does not answer in time is taken for down, and asked again later)
        # (a check is a login and a query, each within the timeout)
        await service.servers.first_check(2 * service.settings.pgfast["pgfast.health_check_timeout"] + 1)
        await frontend.serve(tcp_sockets, service.unix_sockets)

        def on_sighup() -> None:
            # under a supervisor it has read and reported everything already; here it is
            # only applied (and the supervisor tells PostgreSQL)
            reload(service, quiet=supervised)
            frontend.apply(service.settings, service.hba, service.ident, service.tls)
            if not supervised and service.postmaster_pid is not None:
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
            service.pidfile.set_status(pidfile.READY)
            log.log("database system is ready to accept connections")
        await stopper.more_urgent_than(None)
        if stopper.mode is Mode.SMART:
            await _smart_shutdown(frontend, stopper)
        immediate = stopper.mode is Mode.IMMEDIATE
        await frontend.shutdown(*stopper.message)
        grace = 0.0 if immediate else 2.0       # PostgreSQL lets them go in milliseconds; a loaded machine may take longer
        await asyncio.gather(pool.close(grace), tx_pools.close(grace))
        catalog.close()
        service.servers.close()
        await _finish_tasks()
        return stopper.status, stopper.mode

    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()
        if supervised:
            log.stop_background()   # a worker's own writer: what it queued is written before it exits


async def _smart_shutdown(frontend: Frontend, stopper: _Stopper) -> None:
    """New sessions are refused; the open ones end when their clients leave, unless a
    fast or immediate shutdown comes first."""
    frontend.refuse_new(*SHUTTING_DOWN)
    loop = asyncio.get_running_loop()
    idle = loop.create_task(frontend.wait_idle())
    urgent = loop.create_task(stopper.more_urgent_than(Mode.SMART))
    await asyncio.wait({idle, urgent}, return_when=asyncio.FIRST_COMPLETED)
    idle.cancel()
    urgent.cancel()


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


def _watch_postmaster(loop, pid: int, stopper: _Stopper, report: bool) -> None:
    """PostgreSQL restarts its own crashed backends; if the postmaster itself goes,
    there is nothing to serve. The process that started it (pgfast, or its supervisor)
    says so with a FATAL; a worker just stops."""
    def on_exit() -> None:
        if report:
            log.fatal("PostgreSQL exited unexpectedly; shutting down")
        stopper.request(Mode.FAST, POSTMASTER_GONE, status=1)

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
