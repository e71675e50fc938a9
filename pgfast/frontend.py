"""What every client connection shares: configuration, rules, the TLS context, the
catalogs, the pools, the cancel keys handed out, and the listening servers."""
from __future__ import annotations

import asyncio
import os
import socket

from ._shared import CLIENTS
from .cancel import CancelKeys
from .backend import BackendState
from .catalog import Catalog
from .client import ClientConnection
from .console import WorkerLink
from .config import ConfigError, Settings, parse_pgfast_setting
from .memory import CHECK_SECONDS, Trimmer
from .hba import HbaRules, IdentMap
from .negotiation import CancelRequest
from .pool import Pool
from .tls import ServerTLS
from .txpool import TransactionPools
from . import log


_BUSY = (BackendState.STARTING, BackendState.SERVING, BackendState.RESETTING)


class Frontend:

    def __init__(self, settings: Settings, hba: HbaRules, ident: IdentMap, tls: ServerTLS | None,
                 catalog: Catalog, pool: Pool, tx_pools: TransactionPools, shared,
                 worker: int = 0, workers: int = 1, cancel_socket_path=None, admin_socket_path=None):
        self.settings = settings
        self.shared = shared                  # _shared.Shared: what workers count together
        self.worker = worker
        self.workers = workers
        self._cancel_socket_path = cancel_socket_path     # worker -> its cancel socket
        self._cancel_socket: socket.socket | None = None
        self.tx_pools = tx_pools
        self.hba = hba
        self.ident = ident
        self.tls = tls
        self.catalog = catalog
        self.pool = pool
        # upstream mode: the servers the backends run on (upstream.Upstream); None: the local one
        self.upstream = catalog.servers if settings.pgfast["pgfast.upstream"] is not None else None
        # what an unknown role's password is checked as (PostgreSQL: password_encryption)
        self.password_encryption = settings.raw.get("password_encryption", "scram-sha-256").lower()
        self.clients: set[ClientConnection] = set()
        self.sessions = 0               # clients past their startup packet
        self.cancel_keys = CancelKeys(shared if workers > 1 else None)
        self._servers: list[asyncio.AbstractServer] = []
        self._trimmer = Trimmer()
        self._trim_timer: asyncio.TimerHandle | None = None
        self.refusal: tuple[str, str] | None = None   # (sqlstate, message) new sessions are refused with
        self._idle: asyncio.Future | None = None
        # the admin console (console.py): every worker's view, PAUSE, and what it counts
        self.link = WorkerLink(self, admin_socket_path, workers)
        self.request_reload = lambda: None     # worker.serve says how a reload is asked for
        self.assignments: dict[str, list[int]] = {}      # database -> [backends assigned, microseconds waited]
        self._paused: set[str] = set()                   # databases, or '*' for all
        self._resumed: asyncio.Future | None = None
        tx_pools.is_paused = self.is_paused

    def client_opened(self, client: ClientConnection) -> None:
        self.clients.add(client)
        self._trimmer.saw(len(self.clients))

    def client_closed(self, client: ClientConnection) -> None:
        self.clients.discard(client)
        if not self.clients and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def refuse_new(self, sqlstate: str, message: str) -> None:
        """From now on every new session is refused with this FATAL; cancel requests
        still reach the open ones."""
        self.refusal = (sqlstate, message)

    async def wait_idle(self) -> None:
        """Until no client is left."""
        if self.clients:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle

    def _check_memory(self) -> None:
        self._trimmer.check(len(self.clients))
        self._trim_timer = asyncio.get_running_loop().call_later(CHECK_SECONDS, self._check_memory)

    async def serve(self, tcp_sockets, unix_sockets) -> None:
        loop = asyncio.get_running_loop()
        self._trim_timer = loop.call_later(CHECK_SECONDS, self._check_memory)
        if self.workers > 1:
            self._open_cancel_socket(loop)
        await self.link.start()
        for sock in tcp_sockets:
            self._servers.append(await loop.create_server(lambda: ClientConnection(self, local=False), sock=sock))
        for sock, _path in unix_sockets:
            self._servers.append(await loop.create_unix_server(lambda: ClientConnection(self, local=True), sock=sock))

    def apply(self, settings: Settings, hba: HbaRules, ident: IdentMap, tls: ServerTLS | None) -> None:
        """A reload: what new connections get from now on (open ones keep theirs)."""
        self.settings = settings
        self.hba = hba
        self.ident = ident
        self.tls = tls
        self.password_encryption = settings.raw.get("password_encryption", "scram-sha-256").lower()
        self.pool.configure(settings.pgfast)
        self.tx_pools.configure(settings.pgfast)

    def setting_for(self, name: str, facts) -> object:
        """A pgfast setting as it applies to a login: ALTER ROLE/DATABASE ... SET wins over
        postgresql.conf, as for PostgreSQL's own settings; a value that is not valid is
        logged and ignored."""
        value = self.settings.pgfast[name]
        override = facts.settings.get(name) if facts is not None else None
        if override is not None:
            try:
                value = parse_pgfast_setting(name, override)
            except ConfigError as exc:
                log.warning(f"ignored {name} set for the role or database: {exc.message}")
        return value

    def pool_mode_for(self, startup, facts) -> str:
        """session, transaction or none: a walsender, or a login the catalogs could not
        describe, always gets a backend of its own."""
        if startup.walsender or facts is None or facts.session_rules is None:
            return "none"
        return self.setting_for("pgfast.pool_mode", facts)

    @property
    def client_limit(self) -> int:
        """Sessions pgfast takes: max_connections, each one a backend, unless backends are
        lent per transaction, where pgfast.max_client_conn bounds the clients."""
        if self.settings.pgfast["pgfast.pool_mode"] == "transaction":
            return self.settings.pgfast["pgfast.max_client_conn"]
        return self.settings.max_connections

    def take_client(self) -> bool:
        """A place for one more session, within the limit across workers."""
        if not self.shared.take(CLIENTS, self.client_limit):
            return False
        self.sessions += 1
        return True

    def give_client(self) -> None:
        self.sessions -= 1
        self.shared.give(CLIENTS)

    # --- the admin console's commands, on this worker ------------------------------------

    def assigned(self, database: str, waited: float) -> None:
        """A backend was assigned to a client (a session, or a transaction), after waiting."""
        entry = self.assignments.get(database)
        if entry is None:
            entry = self.assignments[database] = [0, 0]
        entry[0] += 1
        entry[1] += int(waited * 1e6)

    def paused(self) -> set[str]:
        return set(self._paused)

    def is_paused(self, database: str) -> bool:
        return bool(self._paused) and ("*" in self._paused or database in self._paused)

    def pause(self, database: str) -> None:
        self._paused.add(database)

    def resume(self, database: str) -> None:
        if database == "*":
            self._paused.clear()
        else:
            self._paused.discard(database)
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)
        self._resumed = None
        self.tx_pools.resumed(database)

    async def until_resumed(self, database: str) -> None:
        """A session-pooled login waits here while its database is paused."""
        while self.is_paused(database):
            if self._resumed is None:
                self._resumed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._resumed)

    def busy_backends(self, database: str) -> int:
        """Backends of the database ('*': any) that serve a client or are being readied for one
        (starting, running a reset or the identity), for the console's PAUSE."""
        return sum(1 for backend in [*self.pool.backends(), *self.tx_pools.backends()]
                   if backend.state in _BUSY and database in ("*", backend.database))

    def kill(self, database: str) -> int:
        """The console's KILL: every client of the database goes (with PostgreSQL's words for
        pg_terminate_backend), and idle backends with them."""
        killed = 0
        for client in list(self.clients):
            if client.database == database:
                client.terminate("57P01", "terminating connection due to administrator command")
                killed += 1
        self.pool.retire_idle(database)
        self.tx_pools.retire_idle(database)
        return killed

    def cancel(self, request: CancelRequest) -> None:
        """A CancelRequest, for whichever worker issued its key."""
        owner = self.shared.owner_of(request.pid) if self.workers > 1 else None
        if owner is not None and owner != self.worker:
            try:
                self._cancel_socket.sendto(request.pid.to_bytes(4, "big", signed=True) + request.key,
                                           self._cancel_socket_path(owner))
            except OSError as exc:
                log.log(f"could not pass a cancel request to worker {owner}: {exc}")
            return
        session = self.cancel_keys.session_for(request.pid, request.key)
        if session is not None:
            session.forward_cancel()

    def _open_cancel_socket(self, loop) -> None:
        """Where other workers pass on CancelRequests for keys this worker issued."""
        path = self._cancel_socket_path(self.worker)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setblocking(False)
        self._cancel_socket = sock

        def passed_on() -> None:
            while True:
                try:
                    data = sock.recv(512)
                except BlockingIOError:
                    return
                if len(data) >= 5:
                    self.cancel_here(CancelRequest(int.from_bytes(data[:4], "big", signed=True), data[4:]))
        loop.add_reader(sock.fileno(), passed_on)

    def cancel_here(self, request: CancelRequest) -> None:
        session = self.cancel_keys.session_for(request.pid, request.key)
        if session is not None:
            session.forward_cancel()

    async def shutdown(self, sqlstate: str, message: str) -> None:
        """Stop listening and end every client with this FATAL (where it can be said)."""
        if self._trim_timer is not None:
            self._trim_timer.cancel()
        for server in self._servers:
            server.close()
        self.link.close()
        self.pool.begin_shutdown()
        self.tx_pools.begin_shutdown()
        for client in list(self.clients):
            client.terminate(sqlstate, message)
        for server in self._servers:
            await server.wait_closed()
