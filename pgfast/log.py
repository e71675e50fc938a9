"""Server log lines in PostgreSQL's default style (log_line_prefix '%m [%p] '), with the
client's address and port (PostgreSQL's %r) on every line said about a client connection:

    2026-11-28 07:40:00.123 UTC [1234] LOG:  listening on IPv4 address "127.0.0.1", port 5432
    2026-11-28 07:40:01.456 UTC [1234] 10.0.0.7(52114) FATAL:  no pg_hba.conf entry for ...

Everything goes to stderr, one write per message so lines never interleave inside a
line. PostgreSQL's own messages come through here too (postmaster.py reads its stderr).

While pgfast serves, logging must never stop service, pgfast's or PostgreSQL's: a
message is queued and a writer thread writes it, so a stderr nobody reads (a full pipe)
blocks that thread, never the event loop or PostgreSQL. The queue is bounded; what does
not fit is dropped and counted, and the count is logged once the writer gets through
again. Before serving (start-up errors) and after it, messages are written directly.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import os
import signal
import sys
import threading
import time

QUEUE_LIMIT = 10000      # messages waiting for the writer; beyond this they are dropped


# the client a line is about ("host(port)", or "[local]"): set by the client connection for
# its callbacks and its login task, so what auth, hba or cancel code logs names it too
CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("client", default=None)


def detached() -> contextvars.Context:
    """A context for work that outlives the client whose callback started it (pool tasks,
    timers, the catalog session): what it logs then names no client."""
    return contextvars.Context()


def _prefix(client: str | None = None) -> str:
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now))
    client = client or CLIENT.get()
    return f"{stamp}.{int(now * 1000) % 1000:03d} UTC [{os.getpid()}] " + (f"{client} " if client else "")


def _write(data: bytes) -> None:
    try:
        os.write(sys.stderr.fileno(), data)
    except (OSError, ValueError):
        pass


class _Writer(threading.Thread):
    def __init__(self):
        super().__init__(name="pgfast-log", daemon=True)
        self._queue: collections.deque[bytes] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self.dropped = 0

    def put(self, data: bytes) -> None:
        if len(self._queue) >= QUEUE_LIMIT:
            self.dropped += 1
            return
        self._queue.append(data)
        self._wake.set()

    def run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._queue:
                _write(self._queue.popleft())
                if self.dropped and not self._queue:
                    dropped, self.dropped = self.dropped, 0
                    _write(f"{_prefix()}LOG:  {dropped} log messages were dropped because the log "
                           f"destination did not keep up\n".encode())
            if self._stopping:
                return

    def stop(self, timeout: float) -> None:
        self._stopping = True
        self._wake.set()
        self.join(timeout)


_writer: _Writer | None = None


@contextlib.contextmanager
def signals_blocked():
    """Threads started inside block every signal (they inherit the mask): a
    process-directed signal is delivered to any thread that does not block it, and the
    supervisor waits for its signals with sigwaitinfo in the main thread (a SIGCHLD taken
    by a helper thread is lost, and a dead postmaster goes unnoticed)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start_thread(thread: threading.Thread) -> None:
    with signals_blocked():
        thread.start()


def start_background() -> None:
    """From now on (while serving) messages are written by a thread of their own."""
    global _writer
    if _writer is None:
        _writer = _Writer()
        start_thread(_writer)


def stop_background(timeout: float = 2.0) -> None:
    """Write what is queued (for at most timeout seconds), then write directly again."""
    global _writer
    writer, _writer = _writer, None
    if writer is not None:
        writer.stop(timeout)


def _forget_writer() -> None:
    # a forked worker has no writer thread (threads do not survive fork): it starts its own
    global _writer
    _writer = None


os.register_at_fork(after_in_child=_forget_writer)


def write_raw(data: bytes) -> None:
    """Bytes already in log form (PostgreSQL's lines), queued like pgfast's own."""
    writer = _writer
    if writer is not None:
        writer.put(data)
    else:
        _write(data)


def emit(level: str, message: str, detail: str | None = None, hint: str | None = None,
         context: str | None = None, client: str | None = None) -> None:
    prefix = _prefix(client)
    lines = [f"{prefix}{level}:  {message}\n"]
    if detail:
        lines.append(f"{prefix}DETAIL:  {detail}\n")
    if hint:
        lines.append(f"{prefix}HINT:  {hint}\n")
    if context:
        lines.append(f"{prefix}CONTEXT:  {context}\n")
    write_raw("".join(lines).encode("utf-8", "replace"))


def log(message: str, **kw) -> None:
    emit("LOG", message, **kw)


def warning(message: str, **kw) -> None:
    emit("WARNING", message, **kw)


def fatal(message: str, **kw) -> None:
    emit("FATAL", message, **kw)
