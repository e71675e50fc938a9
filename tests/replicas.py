"""A real streaming-replication cluster on this machine, for tests of pgfast's upstream mode
(pgfast in front of remote PostgreSQL servers, over TCP with TLS on both sides).

    cluster = ReplicaCluster(bindir, parent_dir, standbys=2).start()
    cluster.primary.sql("create table t (i int)")
    cluster.wait_replayed()
    cluster.primary.kill(); cluster.standbys[0].promote(); cluster.standbys[1].follow(cluster.standbys[0])
    cluster.stop()

Every node listens on 127.0.0.1 (its own free port, TLS only, scram-sha-256) and on a Unix
socket of its own (trust, for the test's own superuser queries). Nodes run as the database
account (`postgres` when the tests run as root) because PostgreSQL refuses root. Use the
`bindir` fixture's binaries: those of PGFAST_TEST_SERVER_BINDIR may lack TLS.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess

import certs
from conftest import chown_tree, client_environment, db_account, free_port, wait_until, write_file

SUPERUSER_PASSWORD = "postgres-secret"
REPLICATION_USER = "replicator"
REPLICATION_PASSWORD = "replicator-secret"

HBA = """\
local all all trust
local replication all trust
hostssl all all 127.0.0.1/32 scram-sha-256
hostssl replication all 127.0.0.1/32 scram-sha-256
hostnossl all all 127.0.0.1/32 reject
"""


def _as_db_account() -> dict:
    """subprocess arguments that run a server program as the database account."""
    if os.geteuid() != 0:
        return {}
    account = db_account()
    return {"user": account.pw_uid, "group": account.pw_gid}


def _quote(value) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _set_auto_conf(data_dir: str, **settings) -> None:
    """Set these parameters in postgresql.auto.conf (read last, so it wins over
    postgresql.conf), dropping earlier lines for the same names: what ALTER SYSTEM would
    do, without needing the server up."""
    path = os.path.join(data_dir, "postgresql.auto.conf")
    with open(path) as f:
        lines = [line for line in f if line.split("=", 1)[0].strip() not in settings]
    lines += [f"{name} = {_quote(value)}\n" for name, value in settings.items()]
    write_file(path, "".join(lines))


def _children(pid: int) -> list[int]:
    """The direct children of pid. A postmaster's children make themselves session leaders
    (setsid), so a process group would not reach them."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


class SQLError(AssertionError):
    """psql failed; stderr holds PostgreSQL's message (tests may expect some, e.g. a write on a standby)."""

    def __init__(self, query: str, stderr: str):
        super().__init__(f"{query!r} failed: {stderr.strip()}")
        self.stderr = stderr


class Node:
    """One PostgreSQL server (the postmaster is `process`, started by this object)."""

    def __init__(self, bindir: str, name: str, parent_dir: str, port: int, ca_file: str, env: dict):
        self.bindir = bindir
        self.name = name
        self.data_dir = os.path.join(parent_dir, name)
        self.socket_dir = os.path.join(parent_dir, f"{name}-sock")
        self.log_path = os.path.join(parent_dir, f"{name}.log")
        self.port = port
        self.ca_file = ca_file
        self.env = env
        self.process: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"<Node {self.name} port={self.port} {'running' if self.running else 'stopped'}>"

    def _program(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log(self) -> str:
        """The server's stderr over all its starts (to show when a test fails)."""
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 30) -> "Node":
        """Start the postmaster and wait until it accepts connections (a standby: once it
        is consistent, as hot_standby is on)."""
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen([self._program("postgres"), "-D", self.data_dir],
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            cwd="/", env=self.env, **_as_db_account())
        ready = [self._program("pg_isready"), "-q", "-h", self.socket_dir, "-p", str(self.port)]
        if not wait_until(lambda: not self.running or subprocess.run(ready, env=self.env).returncode == 0,
                          timeout, 0.05) or not self.running:
            status = self.process.poll()
            self.stop("immediate")
            raise AssertionError(f"{self.name} did not start (status {status}):\n{self.log[-4000:]}")
        return self

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """"fast" (SIGINT: clean shutdown) or "immediate" (SIGQUIT: crash recovery on next
        start). The postmaster waits for its children, so nothing is left behind; one that
        does not exit in time is killed."""
        if not self.running:
            return
        self.process.send_signal({"fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode])
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not stop ({mode}):\n{self.log[-4000:]}")

    def kill(self) -> None:
        """SIGKILL the postmaster and its children at once: the server vanishes as with a
        dead host (no shutdown, connections reset), and no orphaned backend keeps the
        shared memory that a later start of this data directory would refuse to share."""
        if not self.running:
            return
        children = _children(self.process.pid)
        self.process.kill()
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()

    def sql(self, query: str, user: str = "postgres", dbname: str = "postgres", timeout: float = 60) -> str:
        """Run query with psql over the Unix socket (trust) and return its unaligned,
        tuples-only output, stripped."""
        result = subprocess.run([self._program("psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                                 "-h", self.socket_dir, "-p", str(self.port), "-U", user, "-d", dbname,
                                 "-c", query],
                                capture_output=True, text=True, timeout=timeout, env=self.env,
                                stdin=subprocess.DEVNULL)
        if result.returncode:
            raise SQLError(query, result.stderr)
        return result.stdout.strip()

    @property
    def in_recovery(self) -> bool:
        return self.sql("select pg_is_in_recovery()") == "t"

    def promote(self, timeout: float = 30) -> None:
        """Make this standby a primary (a new timeline) and wait until it takes writes."""
        self.sql(f"select pg_promote(true, {int(timeout)})")
        if not wait_until(lambda: not self.in_recovery, timeout, 0.1):
            raise AssertionError(f"{self.name} is still in recovery:\n{self.log[-4000:]}")

    def primary_conninfo(self) -> str:
        """How a standby of this node connects to it: TLS (sslmode=require) and scram."""
        return (f"host=127.0.0.1 port={self.port} user={REPLICATION_USER} password={REPLICATION_PASSWORD} "
                "sslmode=require")

    def follow(self, primary: "Node") -> None:
        """Stream from another primary (after a failover nothing re-points the other
        standbys): rewrite primary_conninfo and restart. recovery_target_timeline is
        'latest' by default, so the standby moves to the new primary's timeline, provided
        it has not replayed past the point where that timeline forked off."""
        self.stop()
        _set_auto_conf(self.data_dir, primary_conninfo=primary.primary_conninfo() + f" application_name={self.name}")
        self.start()

    def dsn(self, **params) -> str:
        """A libpq connection string to this node over TCP, verifying its certificate."""
        values = {"host": "127.0.0.1", "port": self.port, "dbname": "postgres", "user": "postgres",
                  "password": SUPERUSER_PASSWORD, "sslmode": "verify-full", "sslrootcert": self.ca_file,
                  "connect_timeout": 10}
        values.update(params)
        return " ".join(f"{k}={v}" for k, v in values.items() if v is not None)


class ReplicaCluster:
    """A primary and its streaming standbys, all with server certificates from `ca`
    (its certificate is in `ca_file`) for `names`."""

    def __init__(self, bindir: str, parent_dir: str, standbys: int = 2,
                 names: tuple[str, ...] = ("localhost", "127.0.0.1")):
        self.bindir = bindir
        self.parent_dir = parent_dir
        self.names = tuple(names)
        os.makedirs(parent_dir, exist_ok=True)
        os.chmod(parent_dir, 0o755)           # the database account must reach the data directories
        self.ca = certs.CA("pgfast replica cluster CA")
        self.ca_file = certs.write(os.path.join(parent_dir, "ca.crt"), self.ca.cert_pem(), 0o644)
        # an empty HOME and no PG* variables, for the servers too: a walreceiver is a libpq
        # client, and would take PGSSLMODE or ~/.postgresql/root.crt from its environment
        self.env = client_environment(os.path.join(parent_dir, "home"))
        ports: list[int] = []
        while len(ports) < 1 + standbys:
            port = free_port()
            if port not in ports:
                ports.append(port)
        self.primary = Node(bindir, "primary", parent_dir, ports[0], self.ca_file, self.env)
        self.standbys = [Node(bindir, f"standby{i}", parent_dir, port, self.ca_file, self.env)
                         for i, port in enumerate(ports[1:], 1)]

    @property
    def nodes(self) -> list[Node]:
        """The primary first, then the standbys (the order of hosts_conninfo)."""
        return [self.primary, *self.standbys]

    def start(self) -> "ReplicaCluster":
        try:
            self._init_primary()
            for standby in self.standbys:
                self._base_backup(standby)
            self.wait_replayed()
        except BaseException:
            self.stop()
            raise
        return self

    def _init_primary(self) -> None:
        node = self.primary
        for directory, mode in ((node.data_dir, 0o700), (node.socket_dir, 0o777)):
            os.mkdir(directory)
            os.chmod(directory, mode)
        chown_tree(node.data_dir)
        subprocess.run([os.path.join(self.bindir, "initdb"), "-D", node.data_dir, "-U", "postgres",
                        "--auth-local=trust", "--auth-host=scram-sha-256", "--locale=C", "--encoding=UTF8",
                        "--no-sync"], check=True, capture_output=True, cwd="/", env=self.env, **_as_db_account())
        issued = self.ca.server_cert(names=self.names)
        write_file(os.path.join(node.data_dir, "server.crt"), issued.chain_pem().decode(), 0o644)
        write_file(os.path.join(node.data_dir, "server.key"), issued.key_pem().decode(), 0o600)
        write_file(os.path.join(node.data_dir, "pg_hba.conf"), HBA)
        with open(os.path.join(node.data_dir, "postgresql.conf"), "a") as f:
            f.write(f"""
listen_addresses = '127.0.0.1'
port = {node.port}
unix_socket_directories = {_quote(node.socket_dir)}
fsync = off
shared_buffers = 16MB
wal_level = replica
max_wal_senders = 10
wal_keep_size = 64MB
hot_standby = on
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
password_encryption = 'scram-sha-256'
log_connections = on
logging_collector = off
""")
        node.start()
        node.sql(f"alter role postgres password {_quote(SUPERUSER_PASSWORD)}; "
                 f"create role {REPLICATION_USER} replication login password {_quote(REPLICATION_PASSWORD)}")

    def _base_backup(self, node: Node) -> None:
        """pg_basebackup over TLS as the replication role; -R writes standby.signal and a
        primary_conninfo (which we replace with our own, naming the standby), and the copy
        brings the primary's configuration, certificate and key along."""
        for directory, mode in ((node.data_dir, 0o700), (node.socket_dir, 0o777)):
            os.mkdir(directory)
            os.chmod(directory, mode)
        chown_tree(node.data_dir)
        env = dict(self.env, PGPASSWORD=REPLICATION_PASSWORD, PGSSLMODE="require")
        result = subprocess.run([os.path.join(self.bindir, "pg_basebackup"), "-D", node.data_dir, "-R",
                                 "-X", "stream", "-c", "fast", "--no-sync", "-w", "-h", "127.0.0.1",
                                 "-p", str(self.primary.port), "-U", REPLICATION_USER],
                                capture_output=True, text=True, cwd="/", env=env, timeout=120,
                                stdin=subprocess.DEVNULL, **_as_db_account())
        if result.returncode:
            raise AssertionError(f"pg_basebackup for {node.name} failed:\n{result.stderr}")
        _set_auto_conf(node.data_dir, port=node.port, unix_socket_directories=node.socket_dir,
                       primary_conninfo=self.primary.primary_conninfo() + f" application_name={node.name}")
        node.start()

    def stop(self) -> None:
        """Stop every node still running (fast shutdown); safe to call again."""
        errors = []
        for node in self.nodes:
            try:
                node.stop()
            except AssertionError as error:
                errors.append(error)
        if errors:
            raise errors[0]

    def current_primary(self) -> Node:
        """The one running node that is not in recovery (after a failover, not `primary`)."""
        primaries = [node for node in self.nodes if node.running and not node.in_recovery]
        if len(primaries) != 1:
            raise AssertionError(f"expected one running primary, found {primaries}")
        return primaries[0]

    def wait_replayed(self, timeout: float = 30) -> None:
        """Wait until every running standby has replayed the current primary's WAL up to
        its current LSN, so that what was committed there is visible on all of them."""
        primary = self.current_primary()
        lsn = primary.sql("select pg_current_wal_lsn()")
        for node in self.nodes:
            if node is primary or not node.running:
                continue
            query = f"select pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"
            if not wait_until(lambda: node.sql(query) == "t", timeout, 0.05):
                raise AssertionError(f"{node.name} has not replayed {lsn} of {primary.name} "
                                     f"(at {node.sql('select pg_last_wal_replay_lsn()')}):\n{node.log[-4000:]}")

    def hosts_conninfo(self) -> str:
        """Multi-host libpq parameters for all nodes, primary first."""
        return (f"host={','.join('127.0.0.1' for _ in self.nodes)} "
                f"port={','.join(str(node.port) for node in self.nodes)}")
