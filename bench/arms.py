"""The things measured: stock PostgreSQL TLS, pgfast, PgBouncer (session, transaction).

Each arm serves the same cluster on a TCP port with the same certificate; start() and stop()
are never inside a timed measurement. cpu_roots() names the processes whose trees make up
"server-side CPU" for the arm (see procs.tree_cpu and bench/README.md).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

from . import procs
from .cluster import BenchError, Cluster, free_port

ARM_NAMES = ("stock", "pgfast", "pgbouncer-session", "pgbouncer-transaction")
LABELS = {
    "stock": "stock PostgreSQL TLS",
    "pgfast": "pgfast",
    "pgbouncer-session": "PgBouncer TLS session",
    "pgbouncer-transaction": "PgBouncer TLS transaction",
}
# what is worth a look in a server log during a measurement
SUSPICIOUS = re.compile(r"\b(ERROR|FATAL|PANIC|WARNING|Traceback|Exception|error)\b")
PGBOUNCER_INSTALL = "apt-get install pgbouncer"


def find_pgbouncer() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer") if os.access(p, os.X_OK)),
        None)


def wait_accepting(cluster: Cluster, port: int, server: procs.Server | None, timeout: float = 60) -> None:
    """Until a TLS client can run a query through the port."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if server is not None and not server.alive():
            raise BenchError(f"{server.name} exited ({server.process.returncode}):\n{server.log_text()[-3000:]}")
        result = subprocess.run([cluster.bin("psql"), "-X", "-A", "-t", "-c", "SELECT 1"],
                                env=cluster.client_env(port), capture_output=True, text=True, cwd="/",
                                stdin=subprocess.DEVNULL, timeout=30)
        if result.returncode == 0 and result.stdout.strip() == "1":
            return
        last = result.stderr.strip()
        time.sleep(0.1)
    raise BenchError(f"port {port} did not accept TLS clients in time: {last}")


class Arm:
    name = ""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.port = 0
        self.tls_info = ""

    @property
    def label(self) -> str:
        return LABELS[self.name]

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def cpu_roots(self) -> list[int]:
        raise NotImplementedError

    def logs(self) -> list[procs.Server]:
        """Servers whose logs are checked for errors during each measurement."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.label

    def probe_tls(self) -> str:
        """The protocol and cipher a client negotiates, as psql's \\conninfo says."""
        result = subprocess.run([self.cluster.bin("psql"), "-X", "-c", "\\conninfo"],
                                env=self.cluster.client_env(self.port), capture_output=True, text=True, cwd="/",
                                stdin=subprocess.DEVNULL, timeout=30)
        match = re.search(r"SSL connection \(([^)]*)\)", result.stdout)
        self.tls_info = match.group(1) if match else f"no TLS? {result.stdout.strip()} {result.stderr.strip()}"
        return self.tls_info


class StockArm(Arm):
    """PostgreSQL's own TLS: clients connect to the postmaster directly."""
    name = "stock"

    def start(self) -> None:
        self.cluster.start_stock()
        self.port = self.cluster.port

    def stop(self) -> None:
        pass        # the stock server stays up for the PgBouncer arms; pgfast's start stops it

    def cpu_roots(self) -> list[int]:
        return [self.cluster.stock.pid]

    def logs(self) -> list[procs.Server]:
        return [self.cluster.stock]


class PgfastArm(Arm):
    """`python -m pgfast run -D <the same data directory>`: pgfast starts that PostgreSQL itself,
    network off, and serves the TCP port."""
    name = "pgfast"

    def __init__(self, cluster: Cluster, settings: list[str]):
        super().__init__(cluster)
        self.settings = settings
        self.port = free_port()
        self.server: procs.Server | None = None
        self.log_path = os.path.join(cluster.logdir, "pgfast.log")

    def command(self) -> list[str]:
        argv = [sys.executable, "-m", "pgfast", "run", "-D", self.cluster.data, "-p", str(self.port),
                "-c", f"unix_socket_directories={self.cluster.sockdir}"]
        for setting in self.settings:
            argv += ["-c", setting]
        return argv

    def describe(self) -> str:
        extra = f" with {', '.join(self.settings)}" if self.settings else ""
        return f"pgfast{extra}"

    def start(self) -> None:
        self.cluster.stop_stock()
        # as root, pgfast drops to the data directory's owner itself
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
        self.server = procs.start_server("pgfast", self.command(), self.log_path, signal.SIGTERM, as_db=False,
                                         env=env)
        ready = f"[{self.server.pid}] LOG:  database system is ready to accept connections"
        start_at = self.server.log_size()
        deadline = time.monotonic() + 120
        while ready not in self.server.log_text():
            if not self.server.alive():
                raise BenchError(f"pgfast exited ({self.server.process.returncode}) during start-up:\n"
                                 f"{self.server.log_text(start_at)[-4000:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"pgfast did not become ready:\n{self.server.log_text(start_at)[-4000:]}")
            time.sleep(0.05)
        wait_accepting(self.cluster, self.port, self.server)

    def stop(self) -> None:
        if self.server is not None:
            status = self.server.stop(timeout=60)
            if status not in (0, None):
                print(f"bench: pgfast exited with status {status} when stopped; see {self.log_path}", flush=True)
            self.server = None
        self.cluster.wait_no_postmaster()

    def cpu_roots(self) -> list[int]:
        return [self.server.pid]        # pgfast, its workers if any, its PostgreSQL and the backends

    def logs(self) -> list[procs.Server]:
        return [self.server]


class PgBouncerArm(Arm):
    """PgBouncer with client TLS in front of the stock PostgreSQL (server side: its Unix socket)."""

    def __init__(self, cluster: Cluster, mode: str, binary: str):
        super().__init__(cluster)
        self.mode = mode
        self.name = f"pgbouncer-{mode}"
        self.binary = binary
        self.port = free_port()
        self.server: procs.Server | None = None
        self.dir = os.path.join(cluster.root, f"pgbouncer-{mode}")
        self.ini = os.path.join(self.dir, "pgbouncer.ini")

    def write_config(self) -> None:
        os.makedirs(self.dir, 0o755, exist_ok=True)
        data = self.cluster.data
        with open(os.path.join(self.dir, "userlist.txt"), "w") as f:
            f.write('"postgres" ""\n')
        with open(self.ini, "w") as f:
            f.write(f"""\
[databases]
postgres = host={self.cluster.sockdir} port={self.cluster.port} dbname=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
pidfile =
logfile =
auth_type = trust
auth_file = {self.dir}/userlist.txt
pool_mode = {self.mode}
max_client_conn = {200}
default_pool_size = 20
ignore_startup_parameters = extra_float_digits
client_tls_sslmode = require
client_tls_cert_file = {data}/server.crt
client_tls_key_file = {data}/server.key
server_tls_sslmode = disable
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
stats_period = 600
""")
        procs.chown_db(self.dir)

    def start(self) -> None:
        self.cluster.start_stock()
        self.write_config()
        self.server = procs.start_server(self.name, [self.binary, self.ini],
                                         os.path.join(self.cluster.logdir, f"{self.name}.log"), signal.SIGTERM)
        wait_accepting(self.cluster, self.port, self.server)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(timeout=30)
            self.server = None

    def cpu_roots(self) -> list[int]:
        return [self.server.pid, self.cluster.stock.pid]

    def logs(self) -> list[procs.Server]:
        return [self.server, self.cluster.stock]


def pgbouncer_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0].strip() if out else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"
