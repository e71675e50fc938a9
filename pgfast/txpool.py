"""Transaction pooling: backends lent to clients one transaction at a time.

There is one pool per role, database and startup parameters a backend cannot change
later (pgfast carries client_encoding, DateStyle, TimeZone, application_name and the
other reported settings from backend to backend itself, so those are not part of it).
A pool holds at most pgfast.pool_size backends (pgfast.reserve_pool_size more for
clients that have waited pgfast.reserve_pool_timeout), keeps pgfast.min_pool_size
open, and lends them to clients in the order they asked; a client that waits longer
than pgfast.query_wait_timeout is told so and disconnected.

A backend comes back at the ReadyForQuery that ends its client's transaction with
every request answered (the relay decides; see _txrelay.pyx), and is lent again at
once, without a reset: between transactions there is nothing to reset. It is lent
again only once every cancel forwarded for its last client has reached PostgreSQL.
A client that leaves with work in flight leaves its backend closed, never lent again.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque

from . import log
from ._shared import BACKENDS
from ._txrelay import TRACKED
from .backend import BackendConnection, BackendRefused, BackendState, open_backend
from .errors import Refused
from .negotiation import user_and_database

_TRACKED_LOWER = frozenset(name.lower() for name in TRACKED)
_SWEEP_SECONDS = 5.0
RESET_TIMEOUT = 5.0
# with several workers, how often a pool that is full and has waiters looks again, and a
# worker with idle backends looks whether another worker's clients wait for them
_BALANCE_SECONDS = 0.05


def pool_key(rules, params: list[tuple[str, str]], route: str | None = None) -> tuple:
    """What a backend must share with a client to serve it: the role and database (by
    OID), the settings ALTER ROLE/DATABASE gives their sessions (changed ones make a new
    pool, whose backends start under them), the startup parameters pgfast does not
    carry itself, and (upstream mode) which hosts it runs on, last (_Pool.route)."""
    return rules.role_oid, rules.database_oid, rules.settings, backend_params(params), route


def backend_params(params: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The startup packet a pool's backends are opened with: the client's, less the
    settings pgfast carries, so each backend starts at the server's defaults for them."""
    return tuple(sorted((k, v) for k, v in params if k.lower() not in _TRACKED_LOWER))


class _Waiter:
    __slots__ = ("client", "since", "timer")

    def __init__(self, client, timer):
        self.client = client
        self.since = time.monotonic()
        self.timer = timer


class _Pool:
    def __init__(self, key: tuple, params: tuple, description: str, size: int):
        self.key = key
        _, self.database = user_and_database(params)
        # the key's name in the counters shared by workers (Python's hash() is per process)
        self.shared_key = int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "big") >> 1
        self.params = list(params)
        self.description = description        # 'role "u", database "d"', for messages
        self.size = size
        self.idle: list[BackendConnection] = []
        self.waiters: deque[_Waiter] = deque()
        self.count = 0          # backends holding a slot: opening, idle, lent, being reset
        self.opening = 0
        self.reserve_timer: asyncio.TimerHandle | None = None
        # the ParameterStatus values a new client is greeted with, by the settings it
        # started with: read from a backend once, so a busy pool still greets at once
        self.greetings: dict[tuple, dict[str, str]] = {}
        self.sized_for_role = False           # pgfast.pool_size from ALTER ROLE/DATABASE: kept by reloads
        # upstream mode: which hosts its backends run on (pool_key's last part), and what the
        # role logs in with, the latest client's (credentials.py); None with the local PostgreSQL
        self.route: str | None = key[-1]
        self.secret = None
        self.assignments = 0                  # backends lent, and the microseconds clients waited for them
        self.wait_us = 0

    def assigned(self, waited: float) -> None:
        self.assignments += 1
        self.wait_us += int(waited * 1e6)


class TransactionPools:
    def __init__(self, servers, *, size: int, reserve_size: int, reserve_timeout: float, min_size: int,
                 idle_timeout: float, lifetime: float, query_wait_timeout: float, reset_query: str,
                 backend_limit, shared, workers: int = 1):
        self._servers = servers                   # backend.LocalServer or upstream.Upstream
        self._size = size
        self._reserve_size = reserve_size
        self._reserve_timeout = reserve_timeout
        self._min_size = min_size
        self._idle_timeout = idle_timeout
        self._lifetime = lifetime
        self._query_wait_timeout = query_wait_timeout
        self._reset_query = reset_query
        self._backend_limit = backend_limit       # () -> how many more backends PostgreSQL may take
        self._shared = shared                     # _shared.Shared: the limits hold across workers
        self._workers = workers
        self._balance = workers > 1               # other workers exist, with pools of their own
        self._balancer: asyncio.TimerHandle | None = None
        self._pools: dict[tuple, _Pool] = {}
        self._backends: set[BackendConnection] = set()
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False
        # the admin console's PAUSE: database -> paused (frontend.Frontend.is_paused)
        self.is_paused = lambda database: False

    def configure(self, pgfast: dict) -> None:
        """Settings read again by a reload; pools sized by ALTER ROLE/DATABASE keep theirs."""
        self._size = pgfast["pgfast.pool_size"]
        self._reserve_size = pgfast["pgfast.reserve_pool_size"]
        self._reserve_timeout = pgfast["pgfast.reserve_pool_timeout"]
        self._min_size = pgfast["pgfast.min_pool_size"]
        self._idle_timeout = pgfast["pgfast.pool_idle_timeout"]
        self._lifetime = pgfast["pgfast.pool_lifetime"]
        self._query_wait_timeout = pgfast["pgfast.query_wait_timeout"]
        self._reset_query = pgfast["pgfast.server_reset_query"]
        for pool in self._pools.values():
            if not pool.sized_for_role:
                pool.size = self._size
            self._keep_minimum(pool)

    @property
    def size(self) -> int:
        return len(self._backends)

    def backends(self) -> list[BackendConnection]:
        return list(self._backends)

    def pools(self) -> list[_Pool]:
        return list(self._pools.values())

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, context=log.detached())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def pool_for(self, key: tuple, params: list[tuple[str, str]], description: str, size: int | None = None,
                 secret=None) -> _Pool:
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(key, backend_params(params), description,
                                            self._size if size is None else size)
            pool.sized_for_role = size is not None and size != self._size
            pool.secret = secret
            self._keep_minimum(pool)
            self._schedule_sweep()
        elif secret is not None:
            pool.secret = secret
        return pool

    # --- lending --------------------------------------------------------------------------

    def lend(self, pool: _Pool, client) -> BackendConnection | None:
        """A backend for the client's next transaction, or None: the client waits, and
        client.backend_ready(backend) or client.backend_unavailable(refusal) follows.
        While the pool's database is paused every client waits."""
        while pool.idle and not self.is_paused(pool.database):
            backend = pool.idle.pop()
            if self._usable(backend):
                backend.lend()
                return backend
            backend.close()
        loop = asyncio.get_running_loop()
        waiter = _Waiter(client, loop.call_later(self._query_wait_timeout, self._wait_timed_out, pool, client))
        pool.waiters.append(waiter)
        self._grow(pool)
        self._waiting_changed(pool)
        return None

    def withdraw(self, pool: _Pool, client) -> None:
        """The client is gone (or timed out) while waiting."""
        for waiter in pool.waiters:
            if waiter.client is client:
                waiter.timer.cancel()
                pool.waiters.remove(waiter)
                self._waiting_changed(pool)
                return

    def _waiting_changed(self, pool: _Pool) -> None:
        if self._balance:
            self._shared.set_waiting(pool.shared_key, len(pool.waiters))
            self._schedule_balance()

    def _schedule_balance(self) -> None:
        if self._balancer is None and not self._closing:
            self._balancer = asyncio.get_running_loop().call_later(_BALANCE_SECONDS, self._rebalance,
                                                                   context=log.detached())

    def _owes_a_backend(self, pool: _Pool, holding: int) -> bool:
        """Holding this many of the pool's backends, this worker would hold more than its
        share of the pool's size while another worker's clients wait for one: it neither
        keeps nor opens one then (else its own busy clients, served first, could starve
        the other worker's for ever)."""
        return (self._balance and holding > -(-pool.size // self._workers)
                and self._shared.waiting_elsewhere(pool.shared_key) > 0)

    def _rebalance(self) -> None:
        """Pools are per worker, their limits global: a worker whose clients wait for a
        full pool tries again to open a backend, and one with idle backends of that pool
        closes one when another worker's clients wait, so that worker can open it."""
        self._balancer = None
        again = False
        for pool in self._pools.values():
            if self.is_paused(pool.database):
                continue            # its waiters wait for RESUME, not for room
            if pool.waiters:
                self._grow(pool)
                again = True
            if pool.idle and self._shared.waiting_elsewhere(pool.shared_key):
                pool.idle.pop(0).close()
                again = True
            elif pool.idle:
                again = again or self._shared.pool_total(pool.shared_key) >= pool.size
        if again:
            self._schedule_balance()

    def _wait_timed_out(self, pool: _Pool, client) -> None:
        self.withdraw(pool, client)
        client.backend_unavailable(Refused(
            "53300", "no backend became free in time",
            detail=f"The pool of {pool.description} was busy for pgfast.query_wait_timeout "
                   f"({self._query_wait_timeout:g} s)."))

    def _usable(self, backend: BackendConnection) -> bool:
        # serves: its host still has the role its pool's route asks for (a primary demoted
        # after a failover no longer takes the writes)
        return (not backend.closed and time.monotonic() - backend.created < self._lifetime
                and backend.server.serves(backend.pool.route))

    def _grow(self, pool: _Pool) -> None:
        """Open backends for the clients waiting, within the pool's size (or its reserve,
        for clients that have waited long enough) and what PostgreSQL can take."""
        if self.is_paused(pool.database):
            return
        limit = pool.size
        if pool.waiters and self._reserve_size and time.monotonic() - pool.waiters[0].since >= self._reserve_timeout:
            limit += self._reserve_size
        while (pool.opening < len(pool.waiters) and self._backend_limit() > 0
               and not self._owes_a_backend(pool, pool.count + 1)
               and self._shared.pool_take(pool.shared_key, limit)):
            self._open(pool)
        if pool.waiters and pool.count >= limit and self._reserve_size and pool.reserve_timer is None:
            pool.reserve_timer = asyncio.get_running_loop().call_later(self._reserve_timeout, self._reserve_due, pool,
                                                                       context=log.detached())

    def _reserve_due(self, pool: _Pool) -> None:
        pool.reserve_timer = None
        self._grow(pool)

    def _open(self, pool: _Pool) -> None:
        """Open a backend for pool, whose shared count the caller has taken a place in."""
        pool.count += 1
        pool.opening += 1
        self._shared.add(BACKENDS, 1)
        self._spawn(self._open_backend(pool))

    def _uncount(self, pool: _Pool) -> None:
        pool.count -= 1
        self._shared.pool_give(pool.shared_key)
        self._shared.add(BACKENDS, -1)

    async def _open_backend(self, pool: _Pool) -> None:
        try:
            backend, leftover = await open_backend(self._servers.pick(pool.route), pool.params, self._forget,
                                                   pool.secret)
        except asyncio.CancelledError:
            pool.opening -= 1
            self._uncount(pool)
            raise
        except (BackendRefused, OSError) as exc:
            pool.opening -= 1
            self._uncount(pool)
            self._open_failed(pool, exc)
            return
        pool.opening -= 1
        if leftover or backend.closed:
            if backend.state is BackendState.CLOSED:
                self._uncount(pool)      # gone already: _forget found nothing to forget
            else:
                backend.pool = pool      # counted until PostgreSQL lets it go
                self._backends.add(backend)
            backend.close()
            return
        backend.pool = pool
        backend.prepared = {}
        backend.startup_parameters = dict(backend.parameters)
        self._backends.add(backend)
        self._hand_out(backend)

    def _open_failed(self, pool: _Pool, exc: Exception) -> None:
        if isinstance(exc, BackendRefused) and exc.fields.get("C") == "53300" and pool.count > 0:
            return              # PostgreSQL is full: the waiters get one of the pool's backends
        if isinstance(exc, BackendRefused):
            refusal = exc
        else:
            refusal = Refused("57P03", "the database system is not accepting connections",
                              detail=f"pgfast could not reach PostgreSQL: {exc}")
        if pool.count == 0:
            while pool.waiters:
                waiter = pool.waiters.popleft()
                waiter.timer.cancel()
                waiter.client.backend_unavailable(refusal)
        else:
            log.log(f"pgfast could not open a backend for {pool.description}: {exc}")

    def _forget(self, backend: BackendConnection) -> None:
        """PostgreSQL let the backend go."""
        if backend in self._backends:
            self._backends.discard(backend)
            pool = backend.pool
            self._uncount(pool)
            if backend in pool.idle:
                pool.idle.remove(backend)
            if not self._closing:
                self._grow(pool)
                self._keep_minimum(pool)

    def _hand_out(self, backend: BackendConnection) -> None:
        pool = backend.pool
        if self._closing or not self._usable(backend):
            backend.close()
            return
        if self._owes_a_backend(pool, pool.count):
            # this worker's own clients would keep every backend busy for ever while
            # another worker's wait (their logins time out): one goes back to PostgreSQL,
            # and the other worker opens it
            backend.close()
            return
        while pool.waiters and not self.is_paused(pool.database):
            waiter = pool.waiters.popleft()
            waiter.timer.cancel()
            self._waiting_changed(pool)
            backend.lend()
            waiter.client.backend_ready(backend)
            return
        backend.park()
        pool.idle.append(backend)
        if self._balance:
            self._schedule_balance()

    def resumed(self, database: str) -> None:
        """The console's RESUME: the clients waiting in the database's pools (every pool's
        for '*') get the idle backends, then new ones."""
        for pool in self._pools.values():
            if database in ("*", pool.database) and not self.is_paused(pool.database):
                while pool.waiters and pool.idle:
                    self._hand_out(pool.idle.pop())
                self._grow(pool)

    # --- taking back -----------------------------------------------------------------

    def give_back(self, backend: BackendConnection) -> None:
        """A transaction ended cleanly: the backend serves the next client, once cancels
        forwarded for this one have reached PostgreSQL."""
        backend.take_back()
        if backend.cancels:
            self._spawn(self._after_cancels(backend))
        else:
            self._hand_out(backend)

    async def _after_cancels(self, backend: BackendConnection) -> None:
        await backend.cancels_delivered()
        self._hand_out(backend)

    def end_session(self, backend: BackendConnection, clean: bool, pinned: bool) -> None:
        """The client left holding this backend: closed unless clean; reset first if the
        client had pinned it with session state."""
        backend.take_back()
        if not clean or self._closing:
            backend.close()
        elif pinned:
            self._spawn(self._reset(backend))
        else:
            self.give_back(backend)

    async def _reset(self, backend: BackendConnection) -> None:
        await backend.cancels_delivered()
        try:
            await backend.reset(self._reset_query, RESET_TIMEOUT)
        except Exception as exc:
            log.log(f"pgfast closed a pooled backend (PID {backend.pid}) whose reset failed: {exc}")
            backend.close()
            return
        backend.prepared.clear()         # DISCARD ALL deallocated them
        self._hand_out(backend)

    # --- keeping the pools right ------------------------------------------------------

    def _keep_minimum(self, pool: _Pool) -> None:
        while (not self._closing and pool.count < min(self._min_size, pool.size) and self._backend_limit() > 0
               and self._shared.pool_take(pool.shared_key, pool.size)):
            self._open(pool)

    def _schedule_sweep(self) -> None:
        if self._sweeper is None and not self._closing:
            self._sweeper = asyncio.get_running_loop().call_later(_SWEEP_SECONDS, self._sweep, context=log.detached())

    def _sweep(self) -> None:
        self._sweeper = None
        now = time.monotonic()
        for pool in self._pools.values():
            surplus = pool.count - self._min_size
            for backend in list(pool.idle):
                expired = now - backend.created >= self._lifetime
                if expired or (surplus > 0 and now - backend.idle_since >= self._idle_timeout):
                    pool.idle.remove(backend)
                    backend.close()
                    surplus -= 1
        if self._backends:
            self._schedule_sweep()

    def retire_idle(self, database: str | None = None) -> None:
        """Let every idle backend go (their sessions would block database DDL), or those of
        one database."""
        for pool in self._pools.values():
            if database is None or pool.database == database:
                idle, pool.idle = pool.idle, []
                for backend in idle:
                    backend.close()

    def begin_shutdown(self) -> None:
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._balancer is not None:
            self._balancer.cancel()
            self._balancer = None
        for pool in self._pools.values():
            if pool.reserve_timer is not None:
                pool.reserve_timer.cancel()
            while pool.waiters:
                pool.waiters.popleft().timer.cancel()
            self._waiting_changed(pool)
        self.retire_idle()

    async def close(self, timeout: float = 0.5) -> None:
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
