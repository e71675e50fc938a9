"""The things measured: stock PostgreSQL TLS, pgfast (default, one worker, transaction pooling),
PgBouncer (session, transaction), and both in front of the stock server over TCP with TLS
verify-full at the back too (upstream mode; PgBouncer's server_tls_sslmode = verify-full).

Each arm serves the same cluster on a TCP port with the same certificate; start() and stop()
are never inside a timed measurement. cpu_roots() names the processes whose trees make up
"server-side CPU" for the arm (see procs.tree_cpu and bench/README.md); front_pids() names the
front door's own processes alone ("front CPU": pgfast's processes without PostgreSQL, or the
pgbouncer process; none for stock).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from . import procs
from .cluster import BenchError, Cluster, free_port



def default_workers() -> int:
    """pgfast.workers = auto: one per core this process may run on, at most 8 (pgfast/config.py)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores))


def _workers_label(n: int) -> str:
    return f"{n} worker{'s' if n != 1 else ''}"


ARM_NAMES = ("stock", "pgfast", "pgfast-w1", "pgfast-tx", "pgfast-metrics", "pgbouncer-session",
             "pgbouncer-transaction", "pgfast-upstream", "pgbouncer-upstream")
PGFAST_ARMS = ("pgfast", "pgfast-w1", "pgfast-tx", "pgfast-metrics", "pgfast-upstream")
# the arms served by the stock postmaster (the others start that PostgreSQL themselves)
STOCK_ARMS = ("stock", "pgbouncer-session", "pgbouncer-transaction", "pgfast-upstream", "pgbouncer-upstream")
METRICS_SCRAPE_INTERVAL = 1.0       # seconds; Prometheus scrapes every 15-60 s, so this is the worst case
# each pgfast arm's own settings, before any --pgfast-setting (which every pgfast arm gets)
PGFAST_ARM_SETTINGS = {
    "pgfast": [],
    "pgfast-w1": ["pgfast.workers=1"],
    "pgfast-tx": ["pgfast.pool_mode=transaction", "pgfast.pool_size=20", "pgfast.max_client_conn=1000"],
    "pgfast-metrics": [],      # + pgfast.metrics_listen on a free port, scraped while it runs
    "pgfast-upstream": [],     # its own directory: pgfast init --upstream (PgfastUpstreamArm)
}
LABELS = {
    "stock": "stock PostgreSQL TLS",
    "pgfast": f"pgfast ({_workers_label(default_workers())})",
    "pgfast-w1": "pgfast, 1 worker",
    "pgfast-tx": "pgfast transaction pooling",
    "pgfast-metrics": f"pgfast ({_workers_label(default_workers())}), metrics scraped every "
                      f"{METRICS_SCRAPE_INTERVAL:g} s",
    "pgbouncer-session": "PgBouncer TLS session",
    "pgbouncer-transaction": "PgBouncer TLS transaction",
    "pgfast-upstream": f"pgfast upstream mode ({_workers_label(default_workers())}), TLS verify-full to PostgreSQL",
    "pgbouncer-upstream": "PgBouncer TLS session, server_tls_sslmode = verify-full",
}
NEW_PGBOUNCER = "/opt/pgbouncer-new/bin/pgbouncer"
PGBOUNCER_MAX_CLIENT_CONN = 1000
PGBOUNCER_POOL_SIZE = 20
PGBOUNCER_MAX_PREPARED = 200        # only with PgBouncer >= 1.21 (protocol-level prepared statements)
# what is worth a look in a server log during a measurement
SUSPICIOUS = re.compile(r"\b(ERROR|FATAL|PANIC|WARNING|Traceback|Exception|error)\b")
PGBOUNCER_INSTALL = "apt-get install pgbouncer"


def find_pgbouncer() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer") if os.access(p, os.X_OK)),
        None)


def default_pgbouncer() -> str | None:
    """The newer PgBouncer built in /opt (it has max_prepared_statements) when there, else the system's."""
    if os.path.isfile(NEW_PGBOUNCER) and os.access(NEW_PGBOUNCER, os.X_OK):
        return NEW_PGBOUNCER
    return find_pgbouncer()


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

    def front_pids(self) -> list[int]:
        """The front door's own processes (read one by one, not as trees); [] for none."""
        return []

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
    network off, and serves the TCP port. One class for the three pgfast arms: `pgfast` (its
    default configuration), `pgfast-w1` (one process), `pgfast-tx` (transaction pooling)."""

    def __init__(self, cluster: Cluster, name: str, settings: list[str]):
        super().__init__(cluster)
        self.name = name
        self.arm_settings = list(PGFAST_ARM_SETTINGS[name])
        self.metrics_port = free_port() if name == "pgfast-metrics" else None
        if self.metrics_port is not None:
            self.arm_settings.append(f"pgfast.metrics_listen=127.0.0.1:{self.metrics_port}")
        self._scraper: threading.Thread | None = None
        self._scraping = threading.Event()
        self.scrapes = 0
        self.settings = self.arm_settings + list(settings)       # --pgfast-setting last: it wins
        self.port = free_port()
        self.server: procs.Server | None = None
        self.log_path = os.path.join(cluster.logdir, f"{name}.log")
        self.workers_seen: list[int] = []                          # worker pids at the last start

    def command(self) -> list[str]:
        argv = [sys.executable, "-m", "pgfast", "run", "-D", self.cluster.data, "-p", str(self.port),
                "-c", f"unix_socket_directories={self.cluster.sockdir}"]
        for setting in self.settings:
            argv += ["-c", setting]
        return argv

    def expected_workers(self) -> int:
        """Worker processes (children of `pgfast run`) this configuration should have: 0 with one worker
        (the run process serves itself), else the worker count."""
        value = "auto"
        for setting in self.settings:
            key, _, v = setting.partition("=")
            if key.strip() == "pgfast.workers":
                value = v.strip()
        n = default_workers() if value in ("auto", "") else int(value) if value.isdigit() else default_workers()
        return 0 if n <= 1 else n

    def describe(self) -> str:
        extra = f" with {', '.join(self.settings)}" if self.settings else ""
        workers = f", worker pids {self.workers_seen}" if self.workers_seen else ", no worker processes"
        return f"{self.label}{extra} (pgfast pid {self.server.pid if self.server else '?'}{workers})"

    def worker_pids(self) -> list[int]:
        """Children of the `pgfast run` process whose command line is python ... pgfast (its forked workers;
        not the PostgreSQL postmaster, which is its child too)."""
        if self.server is None:
            return []
        root = self.server.pid
        found = []
        for pid, (ppid, _, _) in procs.process_table().items():
            if ppid != root:
                continue
            cmd = procs.cmdline(pid)
            if "pgfast" in cmd and "python" in os.path.basename(cmd.split(" ", 1)[0]):
                found.append(pid)
        return sorted(found)

    def start(self) -> None:
        self.cluster.stop_stock()
        self._start_pgfast()

    def _start_pgfast(self) -> None:
        # as root, pgfast drops to the data directory's owner itself
        # SIGINT: a fast shutdown, as pg_ctl stop's default (SIGTERM is PostgreSQL's smart one)
        self.server = procs.start_server(self.name, self.command(), self.log_path, signal.SIGINT, as_db=False,
                                         env=_pgfast_env())
        ready = f"[{self.server.pid}] LOG:  database system is ready to accept connections"
        start_at = self.server.log_size()
        deadline = time.monotonic() + 120
        while ready not in self.server.log_text(start_at):
            if not self.server.alive():
                raise BenchError(f"{self.name} exited ({self.server.process.returncode}) during start-up:\n"
                                 f"{self.server.log_text(start_at)[-4000:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} did not become ready:\n{self.server.log_text(start_at)[-4000:]}")
            time.sleep(0.05)
        wait_accepting(self.cluster, self.port, self.server)
        self.workers_seen = self.worker_pids()
        if len(self.workers_seen) != self.expected_workers():
            raise BenchError(f"{self.name}: expected {self.expected_workers()} worker processes under pgfast "
                             f"(pid {self.server.pid}), found {len(self.workers_seen)}: {self.workers_seen}")
        if self.metrics_port is not None:
            self._scraping.set()
            self._scraper = threading.Thread(target=self._scrape, daemon=True)
            self._scraper.start()

    def _scrape(self) -> None:
        """Scrape /metrics as Prometheus would, all the time the arm runs (its cost is measured
        with the rest; a failed scrape is an error of the run)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        while self._scraping.is_set():
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if b"pgfast_client_connections_total" not in response.read():
                        raise BenchError(f"{self.name}: /metrics without pgfast's metrics")
                self.scrapes += 1
            except OSError as exc:
                print(f"bench: {self.name}: scraping {url} failed: {exc}", flush=True)
            time.sleep(METRICS_SCRAPE_INTERVAL)

    def stop(self) -> None:
        self._stop_pgfast()
        self.cluster.wait_no_postmaster()

    def _stop_pgfast(self) -> None:
        if self._scraper is not None:
            self._scraping.clear()
            self._scraper.join(10)
            self._scraper = None
        if self.server is not None:
            status = self.server.stop(timeout=60)
            if status not in (0, None):
                print(f"bench: {self.name} exited with status {status} when stopped; see {self.log_path}",
                      flush=True)
            self.server = None

    def cpu_roots(self) -> list[int]:
        return [self.server.pid]        # pgfast, its workers if any, its PostgreSQL and the backends

    def front_pids(self) -> list[int]:
        return [self.server.pid] + self.worker_pids()      # without the postmaster and its backends

    def logs(self) -> list[procs.Server]:
        return [self.server]


class PgfastUpstreamArm(PgfastArm):
    """`pgfast run -D <its own directory>` in upstream mode (`pgfast init --upstream`): in front of
    the stock PostgreSQL over TCP, TLS with sslmode=verify-full against the cluster's certificate,
    which pgfast also serves at the front. Its pg_hba.conf trusts hostssl, as PgBouncer's auth_type."""

    def __init__(self, cluster: Cluster, settings: list[str]):
        super().__init__(cluster, "pgfast-upstream", settings)
        self.dir = os.path.join(cluster.root, "pgfast-upstream")

    def _prepare(self) -> None:
        if os.path.isdir(self.dir):
            return
        upstream = (f"host=127.0.0.1 port={self.cluster.port} dbname=postgres sslmode=verify-full "
                    f"sslrootcert={self.cluster.data}/server.crt")
        result = subprocess.run([sys.executable, "-m", "pgfast", "init", "-D", self.dir, "--upstream", upstream],
                                capture_output=True, text=True, env=_pgfast_env(), cwd="/", stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise BenchError(f"pgfast init --upstream failed:\n{result.stderr}")
        for name in ("server.crt", "server.key"):
            shutil.copyfile(os.path.join(self.cluster.data, name), os.path.join(self.dir, name))
        with open(os.path.join(self.dir, "pg_hba.conf"), "w") as f:
            f.write("hostssl all all 127.0.0.1/32 trust\n")
        procs.chown_db(self.dir)
        for name in os.listdir(self.dir):
            procs.chown_db(os.path.join(self.dir, name))

    def command(self) -> list[str]:
        argv = super().command()
        argv[argv.index("-D") + 1] = self.dir
        return argv

    def start(self) -> None:
        self.cluster.start_stock()
        self._prepare()
        self._start_pgfast()

    def stop(self) -> None:
        self._stop_pgfast()

    def cpu_roots(self) -> list[int]:
        return [self.server.pid, self.cluster.stock.pid]

    def logs(self) -> list[procs.Server]:
        return [self.server, self.cluster.stock]


def _pgfast_env() -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    return env


class PgBouncerArm(Arm):
    """PgBouncer with client TLS in front of the stock PostgreSQL (server side: its Unix socket;
    upstream: TCP with TLS verify-full, as pgfast's upstream arm)."""

    def __init__(self, cluster: Cluster, mode: str, binary: str, upstream: bool = False):
        super().__init__(cluster)
        self.mode = mode
        self.upstream = upstream
        self.name = "pgbouncer-upstream" if upstream else f"pgbouncer-{mode}"
        self.binary = binary
        self.version = pgbouncer_version_tuple(binary)
        self.port = free_port()
        self.server: procs.Server | None = None
        self.dir = os.path.join(cluster.root, self.name)
        self.ini = os.path.join(self.dir, "pgbouncer.ini")

    def write_config(self) -> None:
        os.makedirs(self.dir, 0o755, exist_ok=True)
        data = self.cluster.data
        with open(os.path.join(self.dir, "userlist.txt"), "w") as f:
            f.write('"postgres" ""\n')
        host = "127.0.0.1" if self.upstream else self.cluster.sockdir
        server_tls = (f"server_tls_sslmode = verify-full\nserver_tls_ca_file = {data}/server.crt\n" if self.upstream
                      else "server_tls_sslmode = disable\n")
        with open(self.ini, "w") as f:
            f.write(f"""\
[databases]
postgres = host={host} port={self.cluster.port} dbname=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
pidfile =
logfile =
auth_type = trust
auth_file = {self.dir}/userlist.txt
pool_mode = {self.mode}
max_client_conn = {PGBOUNCER_MAX_CLIENT_CONN}
default_pool_size = {PGBOUNCER_POOL_SIZE}
{self.prepared_line()}ignore_startup_parameters = extra_float_digits
client_tls_sslmode = require
client_tls_cert_file = {data}/server.crt
client_tls_key_file = {data}/server.key
{server_tls}log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
stats_period = 600
""")
        procs.chown_db(self.dir)

    def prepared_line(self) -> str:
        """max_prepared_statements exists from PgBouncer 1.21 on (0 = off, the default before 1.22)."""
        if self.version >= (1, 21):
            return f"max_prepared_statements = {PGBOUNCER_MAX_PREPARED}\n"
        return ""

    def describe(self) -> str:
        return f"{self.label} ({self.binary}, pid {self.server.pid if self.server else '?'})"

    def _stock_children(self) -> int:
        return sum(1 for ppid, _, _ in procs.process_table().values() if ppid == self.cluster.stock.pid)

    def start(self) -> None:
        self.cluster.start_stock()
        self.stock_children = self._stock_children()      # auxiliary processes, no backend of ours
        self.write_config()
        self.server = procs.start_server(self.name, [self.binary, self.ini],
                                         os.path.join(self.cluster.logdir, f"{self.name}.log"), signal.SIGTERM)
        wait_accepting(self.cluster, self.port, self.server)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(timeout=30)
            self.server = None
            # its server connections' backends see the close and exit: wait for that, so the next arm
            # (or the stop of PostgreSQL for a pgfast arm) does not find them still going
            deadline = time.monotonic() + 15
            while self.cluster.stock is not None and self.cluster.stock.alive() and time.monotonic() < deadline:
                if self._stock_children() <= self.stock_children:
                    break
                time.sleep(0.02)
            else:
                if self.cluster.stock is not None and self.cluster.stock.alive():
                    print(f"bench: {self.name}: PostgreSQL still has {self._stock_children()} children 15 s after "
                          f"PgBouncer stopped ({self.stock_children} at its start)", flush=True)

    def cpu_roots(self) -> list[int]:
        return [self.server.pid, self.cluster.stock.pid]

    def front_pids(self) -> list[int]:
        return [self.server.pid]

    def logs(self) -> list[procs.Server]:
        return [self.server, self.cluster.stock]


def pgbouncer_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0].strip() if out else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def pgbouncer_version_tuple(binary: str) -> tuple[int, ...]:
    """(1, 25, 2) from `PgBouncer 1.25.2`; (0,) when it cannot be told."""
    match = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", pgbouncer_version(binary))
    if not match:
        return (0,)
    return tuple(int(x) for x in match.groups() if x is not None)
