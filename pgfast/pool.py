"""Session pooling: backends kept after their client leaves and handed to the next
client that starts a session with the same parameters as the same role.

A backend goes back to the pool only when it is provably clean (Relay.backend_clean:
every message its client sent answered by a ReadyForQuery saying idle); any other
backend is closed, never reset and reused, so nothing a departed client left in flight
(an uncommitted transaction, a pipeline without Sync, a half-sent COPY) can be
committed by a reset or seen by the next client. A clean backend is reset with
pgfast.server_reset_query (DISCARD ALL by default), within a time limit, after every
cancel forwarded for its previous client has reached PostgreSQL: a late cancel can
then only hit that client's own work, never the next client's.

The pool key is the role's and the database's OIDs plus the whole startup packet, so a
reused backend runs as the same role (not merely one with the same name), has exactly
the session defaults a fresh one would have had, and the client is greeted with the
same ParameterStatus values PostgreSQL would send it.
"""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from . import log
from ._shared import BACKENDS
from .backend import BackendConnection, BackendRefused, BackendState, open_backend
from .catalog import SessionRules

_SWEEP_SECONDS = 5.0
# With several workers: the name, in the shared counters, of "a worker needs room for a
# backend", how often the others look, and how long the one in need waits for them.
_ROOM_KEY = 2
_BALANCE_SECONDS = 0.05
_ROOM_WAIT = 2.0
RESET_TIMEOUT = 5.0
# How long a backend being let go may keep its slot before pgfast stops waiting for it.
_RETIRE_TIMEOUT = 5.0


class Pool:
    def __init__(self, servers, *, size: int, idle_timeout: float, lifetime: float,
                 reset_query: str, backend_limit, shared, balance: bool = False):
        self._servers = servers                   # backend.LocalServer or upstream.Upstream
        self._size = size
        self._idle_timeout = idle_timeout
        self._lifetime = lifetime
        self._reset_query = reset_query
        self._backend_limit = backend_limit       # () -> how many more backends PostgreSQL may take
        self._shared = shared                     # _shared.Shared: backends are counted across workers
        self._balance = balance                   # other workers exist, with idle backends of their own
        self._balancer: asyncio.TimerHandle | None = None
        self._wanting_room = 0
        # every backend that holds a PostgreSQL slot as far as pgfast knows: from its
        # start until PostgreSQL has closed its end
        self._backends: set[BackendConnection] = set()
        self._idle: dict[tuple, list[BackendConnection]] = defaultdict(list)
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False

    def configure(self, pgfast: dict) -> None:
        """Settings read again by a reload."""
        self._size = pgfast["pgfast.pool_size"]
        self._idle_timeout = pgfast["pgfast.pool_idle_timeout"]
        self._lifetime = pgfast["pgfast.pool_lifetime"]
        self._reset_query = pgfast["pgfast.server_reset_query"]

    @property
    def size(self) -> int:
        return len(self._backends)

    def backends(self) -> list[BackendConnection]:
        return list(self._backends)

    @staticmethod
    def _key(params: list[tuple[str, str]], rules: SessionRules | None, route: str | None) -> tuple | None:
        """None (never pooled): no rules (pool_mode none, a walsender, catalogs that could
        not say), or a connection limit, which counts idle pooled sessions too."""
        if rules is None or not rules.poolable:
            return None
        return rules.role_oid, rules.database_oid, tuple(sorted(params)), route

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, context=log.detached())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _forget(self, backend: BackendConnection) -> None:
        if backend in self._backends:
            self._backends.discard(backend)
            self._shared.add(BACKENDS, -1)

    # --- handing backends out -----------------------------------------------------------

    def take_idle(self, params: list[tuple[str, str]], rules: SessionRules | None,
                  route: str | None = None) -> BackendConnection | None:
        """An idle backend that started with these parameters under these rules, or None."""
        key = self._key(params, rules, route)
        idle = self._idle.get(key) if key is not None else None
        now = time.monotonic()
        while idle:
            backend = idle.pop()
            if (not backend.closed and now - backend.created < self._lifetime and backend.rules == rules
                    and backend.server.serves(route)):      # its host still has the role the route asks for
                return backend
            backend.close()
        return None

    async def acquire(self, params: list[tuple[str, str]], rules: SessionRules | None,
                      secret=None, route: str | None = None) -> tuple[BackendConnection, bytes]:
        """A backend for this startup packet (reused if one is idle) and any bytes it
        sent after its first ReadyForQuery. Raises what open_backend raises.

        rules is the catalog state PostgreSQL would check and apply at start (None:
        unknown, or a session never to pool): an idle backend is reused only if it
        started under the same, so a role made NOLOGIN, renamed or dropped and created
        again, a revoked CONNECT or a new ALTER ROLE ... SET reaches the next client as
        PostgreSQL would have it. secret: what an upstream server's login takes (credentials.py);
        route: which of its hosts (upstream.Upstream.pick)."""
        backend = self.take_idle(params, rules, route)
        if backend is not None:
            return backend, b""
        if self._backend_limit() <= 0 and not await self._retire_oldest_idle():
            await self._room_from_other_workers()
        self._shared.add(BACKENDS, 1)
        try:
            while True:
                try:
                    backend, leftover = await open_backend(self._servers.pick(route), params, self._forget, secret)
                    break
                except BackendRefused as refusal:
                    # PostgreSQL is full, at least for this role (superuser_reserved_connections):
                    # backends idle for other startup packets make room, oldest first
                    if refusal.fields.get("C") != "53300" or not (
                            await self._retire_oldest_idle() or await self._room_from_other_workers()):
                        raise
        except BaseException:
            self._shared.add(BACKENDS, -1)
            raise
        if backend.state is BackendState.CLOSED:
            self._shared.add(BACKENDS, -1)          # gone already: _forget found nothing to forget
        else:
            self._backends.add(backend)
        backend.pool_key = self._key(params, rules, route)
        backend.rules = rules
        return backend, leftover

    # --- taking them back --------------------------------------------------------------

    def release(self, backend: BackendConnection, clean: bool) -> None:
        """The client is done with the backend; clean says it left nothing in flight."""
        backend.take_back()
        if (self._closing or not clean or backend.pool_key is None or backend.closed
                or time.monotonic() - backend.created >= self._lifetime):
            backend.close()
            return
        self._spawn(self._reset_and_park(backend))

    async def _reset_and_park(self, backend: BackendConnection) -> None:
        await backend.cancels_delivered()
        if backend.closed:
            return
        try:
            await backend.reset(self._reset_query, RESET_TIMEOUT)
        except Exception as exc:
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else f"failed: {exc}"
            log.log(f"pgfast closed a pooled backend (PID {backend.pid}) whose reset {reason}")
            backend.close()
            return
        idle = self._idle[backend.pool_key]
        if self._closing or backend.closed or len(idle) >= self._size:
            backend.close()
            return
        backend.park()
        idle.append(backend)
        self._schedule_sweep()
        self._schedule_balance()

    # --- letting them go ---------------------------------------------------------------

    def _idle_backends(self) -> list[BackendConnection]:
        return [backend for backends in self._idle.values() for backend in backends]

    async def _retire_oldest_idle(self) -> bool:
        """Close the backend idle longest and wait until PostgreSQL has let it go;
        False when none is idle."""
        oldest = min(self._idle_backends(), key=lambda b: b.idle_since, default=None)
        if oldest is None:
            return False
        self._idle[oldest.pool_key].remove(oldest)
        oldest.close()
        await oldest.closed_by_postgres(_RETIRE_TIMEOUT)
        return True

    async def _room_from_other_workers(self) -> bool:
        """PostgreSQL is full and this worker has no idle backend to let go: ask the
        others (they close their oldest idle one) and wait a little for the room."""
        if not self._balance:
            return False
        self._wanting_room += 1
        self._shared.set_waiting(_ROOM_KEY, self._wanting_room)
        try:
            deadline = time.monotonic() + _ROOM_WAIT
            while time.monotonic() < deadline:
                await asyncio.sleep(_BALANCE_SECONDS)
                if self._backend_limit() > 0:
                    return True
            return False
        finally:
            self._wanting_room -= 1
            self._shared.set_waiting(_ROOM_KEY, self._wanting_room)

    def _schedule_balance(self) -> None:
        if self._balance and self._balancer is None and not self._closing:
            self._balancer = asyncio.get_running_loop().call_later(_BALANCE_SECONDS, self._rebalance,
                                                                   context=log.detached())

    def _rebalance(self) -> None:
        self._balancer = None
        idle = self._idle_backends()
        if not idle:
            return
        if self._shared.waiting_elsewhere(_ROOM_KEY):
            oldest = min(idle, key=lambda b: b.idle_since)
            self._idle[oldest.pool_key].remove(oldest)
            oldest.close()
        self._schedule_balance()

    def retire_idle(self, database: str | None = None) -> None:
        """Let every idle backend go (their sessions would block database DDL), or those of
        one database."""
        for idle in self._idle.values():
            leaving = [b for b in idle if database in (None, b.database)]
            idle[:] = [b for b in idle if database not in (None, b.database)]
            for backend in leaving:
                backend.close()

    def _schedule_sweep(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(_SWEEP_SECONDS, self._sweep, context=log.detached())

    def _sweep(self) -> None:
        self._sweeper = None
        now = time.monotonic()
        for key, idle in list(self._idle.items()):
            keep = [b for b in idle if not b.closed and now - b.idle_since < self._idle_timeout
                    and now - b.created < self._lifetime]
            for backend in idle:
                if backend not in keep:
                    backend.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            self._schedule_sweep()

    def begin_shutdown(self) -> None:
        """From now on every backend handed back is let go, not kept."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._balancer is not None:
            self._balancer.cancel()
            self._balancer = None
        self.retire_idle()

    async def close(self, timeout: float = 0.5) -> None:
        """Stop resets and cancels still running, close every backend, and give PostgreSQL
        a moment to let the idle ones go (a busy one ends with PostgreSQL's own shutdown)."""
        self.begin_shutdown()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        backends = list(self._backends)
        for backend in backends:
            backend.close()
        if backends:
            await asyncio.wait([asyncio.ensure_future(b.closed_by_postgres(timeout)) for b in backends])
