"""A client's session under transaction pooling, between its relay and the pool.

    IDLE --a message arrives--> WAITING --the pool lends a backend--> ACTIVE
    ACTIVE --the transaction ends, everything answered--> IDLE
    any --the client or its backend goes--> ENDED

The relay (pgfast._txrelay.TxRelay) frames the client's messages and follows the
responses; this class gets it backends and gives them back, and takes the client's
ways out to its connection (client.ClientConnection), which has the one exit.
"""
from __future__ import annotations

import asyncio
import enum
import time

from ._txrelay import TRACKED, TxRelay
from .backend import BackendRefused
from .errors import Refused
from .literals import dollar_quoted
from .metrics import metrics

_TRACKED_LOWER = {name.lower(): name for name in TRACKED}
GREETING_TIMEOUT = 5.0


class TxState(enum.Enum):
    IDLE = "idle"           # no backend, nothing to send
    WAITING = "waiting"     # asked the pool; messages wait in the relay
    ACTIVE = "active"       # a backend is lent for the client's transaction
    ENDED = "ended"


_ALLOWED = {
    TxState.IDLE: {TxState.WAITING, TxState.ENDED},
    TxState.WAITING: {TxState.ACTIVE, TxState.ENDED},
    TxState.ACTIVE: {TxState.IDLE, TxState.ENDED},
    TxState.ENDED: set(),
}


def _given(params: list[tuple[str, str]]) -> dict[str, str]:
    """The startup settings among those pgfast carries, by their ParameterStatus names."""
    return {_TRACKED_LOWER[k.lower()]: v for k, v in params if k.lower() in _TRACKED_LOWER}


def greeting_settings(params: list[tuple[str, str]], backend) -> str:
    """SQL that gives a backend the client's own startup settings among those pgfast
    carries (SET for those the client gave, RESET for those another client changed), so
    the ParameterStatus values the client is greeted with are PostgreSQL's own."""
    given = _given(params)
    statements = []
    for name in TRACKED:
        if name in given:
            if backend.parameters.get(name) != given[name]:
                statements.append(f"SET {name} TO {dollar_quoted(given[name])}")
        elif backend.parameters.get(name) != backend.startup_parameters.get(name):
            statements.append(f"RESET {name}")
    return "; ".join(statements)


class _LoginWaiter:
    """Waits in a pool's queue for the login's greeting, as a client would."""

    def __init__(self, pools):
        self._pools = pools
        self.future = asyncio.get_running_loop().create_future()

    def backend_ready(self, backend) -> None:
        if self.future.done():              # the login gave up meanwhile: for the next one
            self._pools.give_back(backend)
        else:
            self.future.set_result(backend)

    def backend_unavailable(self, refusal) -> None:
        if not self.future.done():
            self.future.set_exception(refusal)


async def greet(pools, pool, params: list[tuple[str, str]]) -> dict[str, str]:
    """The ParameterStatus values for a new client of this pool, read from one of its
    backends after giving it the client's startup settings (then given back), once per
    distinct startup settings."""
    given = tuple(sorted(_given(params).items()))
    known = pool.greetings.get(given)
    if known is not None:
        return dict(known)
    waiter = _LoginWaiter(pools)
    backend = pools.lend(pool, waiter)
    if backend is None:
        try:
            backend = await waiter.future
        except asyncio.CancelledError:
            pools.withdraw(pool, waiter)
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                pools.give_back(future.result())     # lent just as the login gave up
            raise
    try:
        sql = greeting_settings(params, backend)
        error = await backend.run(sql, GREETING_TIMEOUT) if sql else None
    except BaseException:
        backend.close()
        raise
    values = dict(backend.parameters)
    pools.give_back(backend)
    if error is not None:
        # what PostgreSQL says to a bad startup setting (e.g. an unknown client_encoding)
        raise Refused(error.get("C", "22023"), error.get("M", "invalid startup setting"), detail=error.get("D"))
    pool.greetings[given] = values
    return dict(values)


class TransactionSession:

    def __init__(self, client, pools, pool, relay: TxRelay, idle_transaction_timeout: float):
        self._client = client
        self._pools = pools
        self._pool = pool
        self.relay = relay
        self._idle_transaction_timeout = idle_transaction_timeout
        self._state = TxState.IDLE
        self._backend = None
        self._writing_paused = False
        self._since = 0.0           # when it asked for a backend, then when it got one

    def _set_state(self, new: TxState) -> None:
        if new not in _ALLOWED[self._state]:
            raise RuntimeError(f"transaction session cannot go from {self._state.name} to {new.name}")
        self._state = new

    @property
    def state(self) -> TxState:
        return self._state

    @property
    def backend(self):
        """The backend lent for the client's transaction now, if any."""
        return self._backend

    @property
    def waiting_since(self) -> float | None:
        """time.monotonic() when it began waiting for a backend, while it waits."""
        return self._since if self._state is TxState.WAITING else None

    # --- backends (called by the relay and the pool) -----------------------------------

    def need_backend(self) -> None:
        self._since = time.monotonic()
        self._set_state(TxState.WAITING)
        backend = self._pools.lend(self._pool, self)
        if backend is not None:
            self.backend_ready(backend)

    def backend_ready(self, backend) -> None:
        if self._state is not TxState.WAITING:    # gone meanwhile
            self._pools.give_back(backend)
            return
        self._set_state(TxState.ACTIVE)
        now = time.monotonic()
        metrics.observe("pool_wait_seconds", now - self._since, "transaction")
        self._pool.assigned(now - self._since)
        self._since = now
        self._backend = backend
        self.relay.attach(backend)
        if self._writing_paused:
            backend.transport.pause_reading()

    def backend_unavailable(self, refusal: Refused | BackendRefused) -> None:
        if self._state is not TxState.WAITING:
            return
        if isinstance(refusal, BackendRefused):
            self._client.backend_refused(refusal)     # PostgreSQL's own words (it logged them)
        else:
            self._client.refuse(refusal)

    def database_ddl_sent(self) -> None:
        self._client.database_ddl_sent()

    def transaction_done(self) -> None:
        metrics.observe("transaction_seconds", time.monotonic() - self._since)
        self._set_state(TxState.IDLE)
        backend, self._backend = self.relay.detach(), None
        self._pools.give_back(backend)

    def idle_in_transaction(self) -> None:
        if self._idle_transaction_timeout:
            messages = self.relay.client_messages
            asyncio.get_running_loop().call_later(self._idle_transaction_timeout, self._check_idle, messages)

    def _check_idle(self, messages: int) -> None:
        # still the same transaction, still nothing asked since: PostgreSQL's own words
        if (self._state is TxState.ACTIVE and self.relay.client_messages == messages
                and self.relay.pending == 0 and self.relay.in_transaction):
            self._client.refuse(Refused("25P03", "terminating connection due to idle-in-transaction timeout"))

    def forward_cancel(self) -> None:
        """A cancel for this client reaches only the backend running its transaction."""
        if self._state is TxState.ACTIVE:
            self._backend.forward_cancel()

    def pause_backend(self) -> None:
        self._writing_paused = True
        if self._backend is not None:
            self._backend.transport.pause_reading()

    def resume_backend(self) -> None:
        self._writing_paused = False
        if self._backend is not None:
            self._backend.transport.resume_reading()

    # --- the ways out, to the client connection -------------------------------------------

    def client_finished(self) -> None:
        self._client.client_finished()

    def client_lost(self) -> None:
        self._client.client_lost()

    def client_failed(self, exc: Exception) -> None:
        self._client.client_failed(exc)

    def protocol_failed(self, exc) -> None:
        self._client.refuse(Refused(exc.sqlstate, exc.message))

    def client_violated(self, message: str) -> None:
        self._client.end_silently(message)

    def backend_lost(self) -> None:
        if self._backend is not None:
            self._backend.connection_lost(None)     # the relay was its protocol: tell it
        self._client.backend_lost()

    def backend_ended(self) -> None:
        """The backend left after answering what the client sent before its stream ended
        (the relay told it so): the client's own end follows."""
        backend, self._backend = self.relay.detach(), None
        backend.connection_lost(None)       # the relay was its protocol: tell it
        self._set_state(TxState.IDLE)

    def backend_failed(self, exc: Exception) -> None:
        self._client.log_line(f"pgfast dropped a backend connection (PID {self._backend.pid}): {exc}")
        self._backend.close()
        self._client.backend_lost()

    def end(self) -> None:
        """The client connection is closing: give back or close what the session holds."""
        state = self._state
        if state is TxState.ENDED:
            return
        self._set_state(TxState.ENDED)
        if state is TxState.WAITING:
            self._pools.withdraw(self._pool, self)
        elif state is TxState.ACTIVE:
            clean = self.relay.backend_clean()
            pinned = self.relay.pinned
            backend, self._backend = self.relay.detach(), None
            self._pools.end_session(backend, clean, pinned)
        self.relay.close()
