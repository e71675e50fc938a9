"""`pgfast start|stop|reload|status`: pg_ctl's verbs, messages and exit codes, for a
pgfast serving a data directory (found through DIR/pgfast.pid, see pidfile.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from . import pidfile
from .shutdown import Mode

PROG = "pgfast"
# pg_ctl's exit codes for status
NOT_RUNNING = 3
NO_DATA_DIRECTORY = 4


def _say(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _complain(text: str) -> None:
    sys.stderr.write(f"{PROG}: {text}\n")


def _running(data_dir: str) -> pidfile.PidInfo | None:
    info = pidfile.read(data_dir)
    if info is None or not pidfile.alive(info.pid):
        return None
    return info


def _no_pid_file(data_dir: str) -> int:
    _complain(f'PID file "{pidfile.path_in(data_dir)}" does not exist')
    sys.stderr.write("Is server running?\n")
    return 1


def _wait(done, timeout: float) -> bool:
    """pg_ctl's progress dots while waiting, one per second."""
    deadline = time.monotonic() + timeout
    next_dot = time.monotonic() + 1
    while time.monotonic() < deadline:
        result = done()
        if result is not None:
            return result
        if time.monotonic() >= next_dot:
            _say(".")
            next_dot += 1
        time.sleep(0.05)
    return False


def start(data_dir: str, logfile: str | None, wait: bool, timeout: float, run_args: list[str]) -> int:
    if _running(data_dir) is not None:
        _complain("another server might be running; trying to start server anyway")
    out = open(logfile, "ab") if logfile else None
    try:
        child = subprocess.Popen([sys.executable, "-m", "pgfast", "run", "-D", data_dir, *run_args],
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT if out else None,
                                 start_new_session=True)
    except OSError as exc:
        _complain(f"could not start server: {exc}")
        return 1
    finally:
        if out is not None:
            out.close()
    if not wait:
        _say("server starting\n")
        return 0
    _say("waiting for server to start...")

    def ready():
        if child.poll() is not None:
            return False
        info = pidfile.read(data_dir)
        if info is not None and info.pid == child.pid and info.status == pidfile.READY:
            return True
        return None

    if _wait(ready, timeout):
        _say(" done\nserver started\n")
        return 0
    _say(" stopped waiting\n")
    if child.poll() is None:
        _complain("server did not start in time")
    else:
        _complain("could not start server")
        sys.stderr.write("Examine the log output.\n")
    return 1


def stop(data_dir: str, mode: Mode, wait: bool, timeout: float) -> int:
    info = pidfile.read(data_dir)
    if info is None:
        return _no_pid_file(data_dir)
    try:
        os.kill(info.pid, mode.signal)
    except OSError as exc:
        _complain(f"could not send stop signal (PID: {info.pid}): {exc.strerror}")
        return 1
    if not wait:
        _say("server shutting down\n")
        return 0
    _say("waiting for server to shut down...")

    def gone():
        return True if not pidfile.alive(info.pid) or pidfile.read(data_dir) is None else None

    if _wait(gone, timeout):
        _say(" done\nserver stopped\n")
        return 0
    _say(" failed\n")
    _complain("server does not shut down")
    if mode is Mode.SMART:
        sys.stderr.write('HINT: The "-m fast" option immediately disconnects sessions rather than\n'
                         'waiting for session-initiated disconnection.\n')
    return 1


def reload(data_dir: str) -> int:
    info = pidfile.read(data_dir)
    if info is None:
        return _no_pid_file(data_dir)
    try:
        os.kill(info.pid, signal.SIGHUP)
    except OSError as exc:
        _complain(f"could not send reload signal (PID: {info.pid}): {exc.strerror}")
        return 1
    _say("server signaled\n")
    return 0


def status(data_dir: str) -> int:
    if not os.path.isdir(data_dir):
        _complain(f'directory "{data_dir}" does not exist')
        return NO_DATA_DIRECTORY
    # a data directory, or upstream mode's (a configuration and no PostgreSQL data)
    if not any(os.path.isfile(os.path.join(data_dir, name)) for name in ("PG_VERSION", "postgresql.conf")):
        _complain(f'directory "{data_dir}" is not a database cluster directory')
        return NO_DATA_DIRECTORY
    info = _running(data_dir)
    if info is None:
        _say(f"{PROG}: no server running\n")
        return NOT_RUNNING
    _say(f"{PROG}: server is running (PID: {info.pid})\n")
    try:
        with open(f"/proc/{info.pid}/cmdline", "rb") as f:
            words = f.read().rstrip(b"\0").split(b"\0")
        _say(" ".join(f'"{w.decode(errors="replace")}"' for w in words) + "\n")
    except OSError:
        pass
    behind = f"PostgreSQL PID {info.postmaster_pid}" if info.postmaster_pid else "upstream mode"
    _say(f"{info.status} on port {info.port}; {behind}\n")
    return 0
