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
import time

from . import accounts, log
from .accounts import Account
from .config import Settings
from .errors import PostgresRefused, StartupError

_PR_SET_PDEATHSIG = 1
# "all" never matches a physical replication connection: it needs its own line
_PRIVATE_HBA = ("# written by pgfast: PostgreSQL serves only pgfast, over this directory's socket\n"
                "local all all trust\nlocal replication all trust\n")


def live_postmaster_pid(data_dir: str) -> int | None:
    """The pid in postmaster.pid when that process still exists."""
    try:
        with open(os.path.join(data_dir, "postmaster.pid")) as f:
            pid = int(f.readline().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


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

    @property
    def socket_path(self) -> str:
        return os.path.join(self.socket_dir, f".s.PGSQL.{self.settings.port}")

    def _command(self) -> list[str]:
        # what keeps PostgreSQL off the network; these win over the user's -c
        forced = {
            "listen_addresses": "",
            "ssl": "off",
            "unix_socket_directories": self.socket_dir,
            "unix_socket_permissions": "0700",
            "unix_socket_group": "",
            "hba_file": os.path.join(self.socket_dir, "pg_hba.conf"),
            "ident_file": os.path.join(self.socket_dir, "pg_ident.conf"),
            "port": str(self.settings.port),
        }
        args = self._user_args(skip=forced)
        for name, value in forced.items():
            args += ["-c", f"{name}={value}"]
        return args

    def _user_args(self, skip=()) -> list[str]:
        args = [os.path.join(self.bindir, "postgres"), "-D", self.settings.data_dir]
        for name, value in self.settings.passthrough:
            if name not in skip:
                args += ["-c", f"{name}={value}"]
        return args

    def check_config(self, account: Account) -> None:
        """Let PostgreSQL vet its own configuration (postgres -C) before anything listens:
        a bad value for a setting only PostgreSQL reads is then reported in its words."""
        result = subprocess.run(self._user_args() + ["-C", "data_directory"], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, cwd="/", **accounts.subprocess_user(account))
        if result.returncode != 0:
            raise PostgresRefused(result.stderr)

    def start(self) -> None:
        """Start PostgreSQL and wait until it accepts connections."""
        self.socket_dir = tempfile.mkdtemp(prefix="pgfast-")
        os.chmod(self.socket_dir, 0o700)
        with open(os.path.join(self.socket_dir, "pg_hba.conf"), "w") as f:
            f.write(_PRIVATE_HBA)
        open(os.path.join(self.socket_dir, "pg_ident.conf"), "w").close()
        self.process = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_die_with_parent)
        self._wait_ready()

    def _status(self) -> str | None:
        # line 8 of postmaster.pid is the postmaster's own readiness report
        try:
            with open(os.path.join(self.settings.data_dir, "postmaster.pid")) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return None
        if len(lines) >= 8 and lines[0].strip() == str(self.process.pid):
            return lines[7].strip()
        return None

    def _wait_ready(self) -> None:
        while True:
            code = self.process.poll()
            if code is not None:
                self._remove_socket_dir()
                raise StartupError("PostgreSQL did not start",
                                   detail=f"postgres exited with status {code}; its messages are above.")
            if self._status() in ("ready", "standby") and os.path.exists(self.socket_path):
                return
            time.sleep(0.02)

    def stop(self, timeout: float = 60.0) -> None:
        """Fast shutdown (SIGINT), as pg_ctl stop -m fast; immediate after timeout."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("PostgreSQL did not stop in time; sending immediate shutdown")
                self.process.send_signal(signal.SIGQUIT)
                self.process.wait()
        self._remove_socket_dir()

    def _remove_socket_dir(self) -> None:
        if self.socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
