"""Prometheus metrics (pgfast.metrics_listen = 'host:port', off when empty).

Each worker counts into its own column of one anonymous shared mapping made before the
workers are forked, so counting is a plain store into memory no other process writes
(no lock, no message), and nothing is counted per TLS record or per message: only at
the edges pgfast's Python code already runs (a connection, a handshake, a login, a
transaction lent under transaction pooling). The process that started pgfast serves
/metrics with prometheus_client from a thread of its own, off the event loops: a
scrape sums the columns (a dead worker's counters stay counted; its gauges are zeroed
when it is reaped).
"""
from __future__ import annotations

import bisect
import mmap
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from . import log
from ._shared import BACKENDS, CLIENTS

MAX_WORKERS = 64

# seconds; from well under a millisecond (a pooled hand-off) to the authentication timeout
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
            1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
# why a TLS handshake failed, from OpenSSL's reason (see handshake_failure_reason)
HANDSHAKE_FAILURES = ("bad_certificate", "no_certificate", "protocol_version", "no_shared_cipher",
                      "no_alpn", "unencrypted_data", "timeout", "closed", "other")
_REASON_WORDS = (
    ("peer did not return a certificate", "no_certificate"),
    ("certificate", "bad_certificate"),
    ("unsupported protocol", "protocol_version"),
    ("version", "protocol_version"),
    ("no shared cipher", "no_shared_cipher"),
    ("no suitable", "no_shared_cipher"),
    ("application protocol", "no_alpn"),
)
CLIENT_STATES = ("negotiating", "tls_handshake", "startup", "authenticating", "connecting",
                 "relaying", "console", "closing")
# "none": no pg_hba.conf line let the client in (no entry, or reject)
AUTH_METHODS = ("trust", "password", "md5", "scram-sha-256", "cert", "peer", "none")
AUTH_RESULTS = ("ok", "failed")
POOL_MODES = ("session", "transaction", "none")


@dataclass(frozen=True)
class _Family:
    name: str
    help: str
    kind: str                              # counter, gauge or histogram
    labels: tuple[str, ...] = ()
    values: tuple[tuple[str, ...], ...] = ((),)    # every label combination, in slot order
    base: int = 0                          # its first slot

    @property
    def width(self) -> int:
        """Slots per label combination: one, or a histogram's buckets, +Inf, count and sum."""
        return 1 if self.kind != "histogram" else len(_BUCKETS) + 3


def _combinations(*dimensions: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    combos: list[tuple[str, ...]] = [()]
    for dimension in dimensions:
        combos = [c + (v,) for c in combos for v in dimension]
    return tuple(combos)


_DEFINITIONS = [
    ("client_connections_total", "Client connections accepted, by transport", "counter",
     ("transport",), _combinations(("tcp", "unix"))),
    ("client_connections", "Client connections open, by state", "gauge",
     ("state",), _combinations(CLIENT_STATES)),
    ("tls_connections", "Client connections open with TLS, by protocol version", "gauge",
     ("version",), _combinations(TLS_VERSIONS)),
    ("tls_handshakes_total", "TLS handshakes completed, by protocol version", "counter",
     ("version",), _combinations(TLS_VERSIONS)),
    ("tls_handshake_failures_total", "TLS handshakes that failed, by reason", "counter",
     ("reason",), _combinations(HANDSHAKE_FAILURES)),
    ("authentications_total", "Logins decided, by pg_hba.conf method and result", "counter",
     ("method", "result"), _combinations(AUTH_METHODS, AUTH_RESULTS)),
    ("tls_handshake_seconds", "TLS handshake time, first byte to Finished", "histogram", (), ((),)),
    ("authentication_seconds", "Login time, StartupMessage to the decision (catalogs, client exchange)",
     "histogram", ("method",), _combinations(AUTH_METHODS)),
    ("pool_wait_seconds", "Time a client waited for a backend (at login; under transaction pooling "
     "for each transaction), by pool mode", "histogram",
     ("pool_mode",), _combinations(POOL_MODES)),
    ("transaction_seconds", "Transaction time as seen at the front under transaction pooling "
     "(backend lent to backend back)", "histogram", (), ((),)),
]


def _layout() -> tuple[dict[str, _Family], int]:
    families, base = {}, 0
    for name, help_, kind, labels, values in _DEFINITIONS:
        family = _Family(name, help_, kind, labels, values, base)
        families[name] = family
        base += family.width * len(values)
    return families, base


FAMILIES, _SLOTS = _layout()


def _nothing(*args, **kwargs) -> None:
    pass


class Metrics:
    """The shared counters: off (counting does nothing) until enable(), which runs once
    before the workers are forked; set_worker() in each worker."""

    def __init__(self):
        self.workers = 0
        self._words = None
        self._column = 0
        self._slot = {(f.name, v): f.base + i * f.width for f in FAMILIES.values() for i, v in enumerate(f.values)}
        self.count = self.observe = _nothing

    def enable(self, workers: int) -> None:
        self._map = mmap.mmap(-1, 8 * _SLOTS * MAX_WORKERS)
        self._words = memoryview(self._map).cast("q")
        self.workers = workers
        self.count, self.observe = self._count, self._observe

    def set_worker(self, index: int) -> None:
        self._column = index * _SLOTS

    def _count(self, name: str, *labels: str, n: int = 1) -> None:
        self._words[self._column + self._slot[name, labels]] += n

    def _observe(self, name: str, seconds: float, *labels: str) -> None:
        at = self._column + self._slot[name, labels]
        words = self._words
        words[at + bisect.bisect_left(_BUCKETS, seconds)] += 1     # its bucket; cumulated when read
        words[at + len(_BUCKETS) + 1] += 1
        words[at + len(_BUCKETS) + 2] += int(seconds * 1e6)        # the sum, in microseconds

    def forget_gauges(self, worker: int) -> None:
        """A worker died: what it had open is closed."""
        if self._words is None:
            return
        column = worker * _SLOTS
        for family in FAMILIES.values():
            if family.kind == "gauge":
                for i in range(len(family.values)):
                    self._words[column + family.base + i] = 0

    def total(self, family: _Family, index: int, offset: int = 0) -> int:
        at = family.base + index * family.width + offset
        return sum(self._words[w * _SLOTS + at] for w in range(self.workers))


metrics = Metrics()


def handshake_failure_reason(message: str) -> str:
    """A metrics label for an OpenSSL failure reason."""
    lowered = message.lower()
    for words, reason in _REASON_WORDS:
        if words in lowered:
            return reason
    return "other"


class _Collector:
    """prometheus_client's view of the shared counters, plus what the global limits hold."""

    def __init__(self, store: Metrics, shared):
        self._store = store
        self._shared = shared

    def collect(self):
        store = self._store
        for family in FAMILIES.values():
            name = "pgfast_" + (family.name[:-6] if family.kind == "counter" else family.name)
            if family.kind == "histogram":
                out = HistogramMetricFamily(name, family.help, labels=family.labels)
                for i, values in enumerate(family.values):
                    counts, running = [], 0
                    for b, bound in enumerate(_BUCKETS + (float("inf"),)):
                        running += store.total(family, i, b)
                        counts.append(("+Inf" if bound == float("inf") else repr(bound), running))
                    out.add_metric(list(values), counts, store.total(family, i, len(_BUCKETS) + 2) / 1e6)
            else:
                kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
                out = kind(name, family.help, labels=family.labels)
                for i, values in enumerate(family.values):
                    out.add_metric(list(values), store.total(family, i))
            yield out
        clients = GaugeMetricFamily("pgfast_clients", "Client sessions logged in or logging in (max_client_conn)")
        clients.add_metric([], self._shared.total(CLIENTS))
        yield clients
        backends = GaugeMetricFamily("pgfast_backends", "PostgreSQL backends pgfast holds, busy or pooled")
        backends.add_metric([], self._shared.total(BACKENDS))
        yield backends
        workers = GaugeMetricFamily("pgfast_workers", "Worker processes (pgfast.workers)")
        workers.add_metric([], store.workers)
        yield workers


_server = None


def serve(listen: tuple[str, int], shared) -> None:
    """Serve /metrics from a thread of this process (signals stay with the main thread)."""
    global _server
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(metrics, shared))
    with log.signals_blocked():
        _server, _thread = start_http_server(listen[1], listen[0], registry=registry)
    shown = f"[{listen[0]}]" if ":" in listen[0] else listen[0]
    log.log(f"serving metrics at http://{shown}:{listen[1]}/metrics")


def close_in_forked_worker() -> None:
    """A worker inherits the listening socket, not the thread serving it."""
    if _server is not None:
        _server.socket.close()
