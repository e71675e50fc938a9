"""Server log lines in PostgreSQL's default style (log_line_prefix '%m [%p] ').

    2026-11-28 07:40:00.123 UTC [1234] LOG:  listening on IPv4 address "127.0.0.1", port 5432

Everything goes to stderr, unbuffered, one write per message so lines from the
PostgreSQL child (which shares stderr) never interleave inside a line.
"""
import os
import sys
import time


def _prefix() -> str:
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now))
    return f"{stamp}.{int(now * 1000) % 1000:03d} UTC [{os.getpid()}] "


def emit(level: str, message: str, detail: str | None = None, hint: str | None = None) -> None:
    prefix = _prefix()
    lines = [f"{prefix}{level}:  {message}\n"]
    if detail:
        lines.append(f"{prefix}DETAIL:  {detail}\n")
    if hint:
        lines.append(f"{prefix}HINT:  {hint}\n")
    try:
        os.write(sys.stderr.fileno(), "".join(lines).encode("utf-8", "replace"))
    except OSError:
        pass


def log(message: str, **kw) -> None:
    emit("LOG", message, **kw)


def warning(message: str, **kw) -> None:
    emit("WARNING", message, **kw)


def fatal(message: str, **kw) -> None:
    emit("FATAL", message, **kw)
