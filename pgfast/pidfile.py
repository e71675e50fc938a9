"""DIR/pgfast.pid, beside PostgreSQL's postmaster.pid and laid out like it: who serves
the data directory, where, and in which state (starting, ready, stopping). It is the
lock against a second pgfast on the same directory and what `pgfast stop/reload/status`
read.

    1 pid   2 data directory   3 start time (Unix epoch)   4 port
    5 first Unix socket directory   6 first listen address   7 PostgreSQL's pid
    8 status
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from .errors import StartupError

NAME = "pgfast.pid"
STARTING, READY, STOPPING = "starting", "ready", "stopping"


def path_in(data_dir: str) -> str:
    return os.path.join(data_dir, NAME)


def alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie nobody reaped has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass
class PidInfo:
    pid: int
    data_dir: str
    started: int
    port: int
    socket_dir: str
    listen_address: str
    postmaster_pid: int
    status: str


def read(data_dir: str) -> PidInfo | None:
    """What the file says; None when there is none or it is not (yet) complete."""
    try:
        with open(path_in(data_dir)) as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return None
    try:
        return PidInfo(int(lines[0]), lines[1], int(lines[2]), int(lines[3]), lines[4], lines[5],
                       int(lines[6] or 0), lines[7].strip())
    except (IndexError, ValueError):
        return None


class PidFile:
    """Created once at start (exclusively: the lock), rewritten whole on every change of
    state, removed at exit by the process that created it."""

    def __init__(self, data_dir: str, port: int, socket_dir: str, listen_address: str):
        self.path = path_in(data_dir)
        self._fields = [str(os.getpid()), data_dir, str(int(time.time())), str(port), socket_dir, listen_address]
        self.postmaster_pid = 0
        self._owner = os.getpid()

    def create(self) -> None:
        for _attempt in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                other = self._holder()
                if other is not None:
                    raise StartupError(f'lock file "{NAME}" already exists',
                                       hint=f'Is another pgfast (PID {other}) running in data directory '
                                            f'"{self._fields[1]}"?') from None
                os.unlink(self.path)        # left by a pgfast that was killed
                continue
            os.close(fd)
            self.set_status(STARTING)
            return
        raise StartupError(f'could not create lock file "{self.path}"')

    def _holder(self) -> int | None:
        try:
            with open(self.path) as f:
                pid = int(f.readline())
        except (OSError, ValueError):
            return None
        # our own pid or our parent's can only be a stale file that a pid was reused for
        # (PostgreSQL's CreateLockFile reasons the same way); a file copied with the data
        # directory (pg_basebackup copies it) names some other machine's process
        if pid in (os.getpid(), os.getppid()) or not alive(pid):
            return None
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"pgfast" not in f.read():
                    return None
        except OSError:
            pass
        return pid

    def set_status(self, status: str) -> None:
        if os.getpid() != self._owner:
            return      # a forked worker: the file is its supervisor's
        text = "\n".join([*self._fields, str(self.postmaster_pid), status]) + "\n"
        temporary = self.path + ".new"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            f.write(text)
        os.replace(temporary, self.path)

    def remove(self) -> None:
        if os.getpid() != self._owner:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
