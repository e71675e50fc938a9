"""Session pooling: backends kept after their client leaves and handed to the next
client that starts a session with the same parameters.

A backend goes back to the pool only when its client left it idle (every request
answered, no transaction open); it is then reset with pgfast.server_reset_query
(DISCARD ALL by default), which returns every setting to the session defaults the
startup packet gave. The pool key is the whole startup packet, so a reused backend
has exactly the session defaults a fresh one would have had, and the client is
greeted with the same ParameterStatus values PostgreSQL would send it.
"""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from . import log
from .backend import BackendConnection, BackendRefused, open_backend
from .catalog import SessionRules

_SWEEP_SECONDS = 5.0


class Pool:
    def __init__(self, socket_path: str, *, mode: str, size: int, idle_timeout: float, lifetime: float,
                 reset_query: str, max_backends: int):
        self._socket_path = socket_path
        self.enabled = mode == "session"
        self._size = size
        self._idle_timeout = idle_timeout
        self._lifetime = lifetime
        self._reset_query = reset_query
        self._max_backends = max_backends
        self._idle: dict[tuple, list[BackendConnection]] = defaultdict(list)
        self._idle_count = 0
        self.busy = 0                   # backends serving clients, resetting or starting
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False
        self._retiring: set[asyncio.Task] = set()

    @staticmethod
    def key(params: list[tuple[str, str]]) -> tuple:
        return tuple(sorted(params))

    async def acquire(self, params: list[tuple[str, str]], rules: SessionRules | None
                      ) -> tuple[BackendConnection, bytes]:
        """A backend for this startup packet (reused if one is idle) and any bytes it
        sent after its first ReadyForQuery. Raises what open_backend raises.

        rules is the catalog state PostgreSQL would check and apply at start (None:
        unknown, or a session never to pool): an idle backend is reused only if it
        started under the same, so a role made NOLOGIN, a revoked CONNECT or a new
        ALTER ROLE ... SET reaches the next client as PostgreSQL would have it."""
        backend = self.take_idle(params, rules)
        if backend is not None:
            return backend, b""
        key = self.key(params)
        poolable = self.enabled and rules is not None and rules.poolable
        if self.busy + self._idle_count >= self._max_backends:
            await self._retire_oldest_idle()
        self.busy += 1
        try:
            while True:
                try:
                    backend, leftover = await open_backend(self._socket_path, params)
                    break
                except BackendRefused as refusal:
                    # PostgreSQL is full, at least for this role (superuser_reserved_connections):
                    # backends idle for other startup packets make room, oldest first
                    if refusal.fields.get("C") != "53300" or not await self._retire_oldest_idle():
                        raise
        except BaseException:
            self.busy -= 1
            raise
        backend.pool_key = key if poolable else None
        backend.rules = rules
        return backend, leftover

    def take_idle(self, params: list[tuple[str, str]], rules: SessionRules | None) -> BackendConnection | None:
        """An idle backend that started with these parameters under these rules, or None."""
        if not self.enabled or rules is None or not rules.poolable:
            return None
        idle = self._idle.get(self.key(params))
        now = time.monotonic()
        while idle:
            backend = idle.pop()
            self._idle_count -= 1
            if not backend.closed and now - backend.created < self._lifetime and backend.rules == rules:
                self.busy += 1
                return backend
            backend.close()
        return None

    def release(self, backend: BackendConnection, idle: bool) -> None:
        """The client is done with the backend; idle says it left no work in flight."""
        if self._closing:
            self.busy -= 1
            self._retire_soon(backend)
            return
        if not idle or backend.pool_key is None or backend.closed or \
                time.monotonic() - backend.created >= self._lifetime:
            self.busy -= 1
            backend.close()
            return
        asyncio.get_running_loop().create_task(self._reset_and_park(backend))

    async def _reset_and_park(self, backend: BackendConnection) -> None:
        try:
            await backend.reset(self._reset_query)
        except Exception as exc:
            log.log(f"pgfast closed a pooled backend (PID {backend.pid}) whose reset failed: {exc}")
            backend.close()
            return
        finally:
            self.busy -= 1
        if self._closing:
            self._retire_soon(backend)
            return
        idle = self._idle[backend.pool_key]
        if len(idle) >= self._size or backend.closed:
            backend.close()
            return
        backend.idle_since = time.monotonic()
        idle.append(backend)
        self._idle_count += 1
        self._schedule_sweep()

    async def _retire_oldest_idle(self) -> bool:
        """Close the backend idle longest and wait until PostgreSQL has let it go;
        False when none is idle."""
        oldest = min((b for idle in self._idle.values() for b in idle), key=lambda b: b.idle_since, default=None)
        if oldest is None:
            return False
        self._idle[oldest.pool_key].remove(oldest)
        self._idle_count -= 1
        await oldest.retire()
        return True

    def retire_idle(self) -> None:
        """Let every idle backend go (their sessions would block database DDL)."""
        idle = [backend for backends in self._idle.values() for backend in backends]
        self._idle.clear()
        self._idle_count = 0
        for backend in idle:
            self._retire_soon(backend)

    def _retire_soon(self, backend: BackendConnection) -> None:
        task = asyncio.get_running_loop().create_task(backend.retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _schedule_sweep(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(_SWEEP_SECONDS, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = time.monotonic()
        for key, idle in list(self._idle.items()):
            keep = [b for b in idle if not b.closed and now - b.idle_since < self._idle_timeout
                    and now - b.created < self._lifetime]
            for backend in idle:
                if backend not in keep:
                    backend.close()
            self._idle_count -= len(idle) - len(keep)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle_count:
            self._schedule_sweep()

    def begin_shutdown(self) -> None:
        """From now on every backend handed back is let go, not kept."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.retire_idle()

    async def close(self, timeout: float = 5.0) -> None:
        """Wait until PostgreSQL has let go of every backend, so its shutdown finds
        none of pgfast's sessions to cut short."""
        self.begin_shutdown()
        if self._retiring:
            await asyncio.wait(set(self._retiring), timeout=timeout)
