"""The one PostgreSQL 15 cluster every arm serves: initdb, certificate, pgbench data, stock start/stop."""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pgfast.postmaster import live_postmaster_pid

from . import procs

SCALE = 10
MAX_CONNECTIONS = 600         # stock PostgreSQL takes scenario f's 500 TLS clients itself
# bulk data: COPY's text output of repeat('x', 1000) for 200,000 rows, a newline after each row
BULK_ROWS = 200_000
BULK_WIDTH = 1000
BULK_QUERY = f"SELECT repeat('x', {BULK_WIDTH}) FROM generate_series(1, {BULK_ROWS})"
BULK_TABLE = "bench_copy_in"


class BenchError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificate(kind: str) -> tuple[bytes, bytes, str]:
    """(certificate PEM, key PEM, description): self-signed for localhost / 127.0.0.1."""
    if kind == "ecdsa":
        key = ec.generate_private_key(ec.SECP256R1())
        description = "ECDSA P-256, self-signed, SHA-256"
    elif kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        description = "RSA-2048, self-signed, SHA-256"
    else:
        raise ValueError(kind)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, description


def _bulk_dir(root: str) -> str:
    """Bulk files (200 MB each way) go to tmpfs when there is room, so the disk stays out of it."""
    shm = "/dev/shm"
    try:
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > 2 * 1024**3:
            path = tempfile.mkdtemp(prefix="pgfast-bench-bulk-", dir=shm)
            os.chmod(path, 0o755)
            return path
    except OSError:
        pass
    path = os.path.join(root, "bulk")
    os.mkdir(path, 0o755)
    return path


class Cluster:
    def __init__(self, bindir: str, cert_kind: str, keep: bool = False):
        self.bindir = bindir
        self.cert_kind = cert_kind
        self.keep = keep
        self.root = tempfile.mkdtemp(prefix="pgfast-bench-")
        os.chmod(self.root, 0o755)
        self.data = os.path.join(self.root, "data")
        self.sockdir = os.path.join(self.root, "sock")
        self.logdir = os.path.join(self.root, "logs")
        self.home = os.path.join(self.root, "home")     # clients' HOME: no ~/.postgresql, ~/.pgpass
        for path in (self.sockdir, self.logdir, self.home):
            os.mkdir(path, 0o755)
        procs.chown_db(self.sockdir)
        procs.chown_db(self.logdir)
        self.bulk_dir = _bulk_dir(self.root)
        self.port = free_port()
        self.stock: procs.Server | None = None
        self.cert_description = ""
        self.bulk_md5 = ""
        self.bulk_bytes = BULK_ROWS * (BULK_WIDTH + 1)
        self.bulk_in_file = os.path.join(self.bulk_dir, "bulk-in.copy")
        self.bulk_out_file = os.path.join(self.bulk_dir, "bulk-out.copy")
        self.settings_note: list[str] = []

    # -------------------------------------------------------------- helpers

    def bin(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    def client_env(self, port: int, *, tls: bool = True) -> dict:
        """The environment of every client: same for every arm but the port."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(HOME=self.home, PGHOST="127.0.0.1", PGPORT=str(port), PGUSER="postgres",
                   PGDATABASE="postgres", PGCONNECT_TIMEOUT="10", PGAPPNAME="pgfast-bench")
        env["PGSSLMODE"] = "require" if tls else "disable"
        return env

    def local_env(self) -> dict:
        """For set-up only: the stock server's Unix socket."""
        env = self.client_env(self.port)
        env.update(PGHOST=self.sockdir, PGSSLMODE="disable")
        return env

    def psql(self, sql: str, env: dict, timeout: float = 600) -> str:
        result = subprocess.run([self.bin("psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql],
                                env=env, capture_output=True, text=True, timeout=timeout, cwd="/",
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise BenchError(f"psql {sql!r} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout.strip()

    def _as_db(self, argv: list[str], timeout: float = 600) -> None:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/",
                                stdin=subprocess.DEVNULL, **procs.as_db_account())
        if result.returncode != 0:
            raise BenchError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")

    # -------------------------------------------------------------- set-up

    def create(self, log=print) -> None:
        t0 = time.monotonic()
        os.mkdir(self.data, 0o700)
        procs.chown_db(self.data)
        self._as_db([self.bin("initdb"), "-D", self.data, "-U", "postgres", "--auth=trust", "--locale=C",
                     "--encoding=UTF8", "--no-sync"])
        cert, key, self.cert_description = make_certificate(self.cert_kind)
        for name, data in (("server.crt", cert), ("server.key", key)):
            path = os.path.join(self.data, name)
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o600)
            procs.chown_db(path)
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.sockdir}'",
            "max_connections": str(MAX_CONNECTIONS),
            "shared_buffers": "'256MB'",        # the whole scale-10 data set stays cached
            "ssl": "on",
            "ssl_cert_file": "'server.crt'",
            "ssl_key_file": "'server.key'",
            "fsync": "off",                      # a benchmark of the front door, not of the disk
            "autovacuum": "off",                 # VACUUM runs explicitly before each arm's block instead
            "max_wal_size": "'4GB'",             # no checkpoint forced by WAL volume mid-measurement
            "checkpoint_timeout": "'1h'",
        }
        self.settings_note = [f"{k} = {v}" for k, v in settings.items()]
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write("\n# pgfast bench\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        log(f"bench: initdb done in {time.monotonic() - t0:.1f} s; certificate: {self.cert_description}")
        self.start_stock()
        t1 = time.monotonic()
        result = subprocess.run([self.bin("pgbench"), "-i", "-q", "-s", str(SCALE)], env=self.local_env(),
                                capture_output=True, text=True, cwd="/", stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise BenchError(f"pgbench -i failed:\n{result.stderr}")
        env = self.local_env()
        try:
            self.psql("CREATE EXTENSION IF NOT EXISTS pg_prewarm", env)
        except BenchError:
            log("bench: pg_prewarm is not available; warming shared buffers with sequential scans instead")
        self.psql(f"CREATE UNLOGGED TABLE {BULK_TABLE} (v text)", env)
        # the bulk data's checksum, computed by the server once, checked against Python's own
        self.bulk_md5 = self.psql(f"SELECT md5(string_agg(v || E'\\n', '')) FROM ({BULK_QUERY}) AS s(v)", env)
        row = b"x" * BULK_WIDTH + b"\n"
        local = hashlib.md5(row * BULK_ROWS).hexdigest()
        if local != self.bulk_md5:
            raise BenchError(f"server-side md5 {self.bulk_md5} differs from the expected {local}")
        with open(self.bulk_in_file, "wb") as f:
            for _ in range(BULK_ROWS // 1000):
                f.write(row * 1000)
        log(f"bench: pgbench -i -s {SCALE} and bulk data ready in {time.monotonic() - t1:.1f} s")

    # -------------------------------------------------------------- the stock server

    def postmaster_pid(self) -> int | None:
        return live_postmaster_pid(self.data)

    def _ready(self, pid: int) -> bool:
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return False
        return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[7].strip() == "ready"

    def wait_no_postmaster(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.postmaster_pid() is not None:
            if time.monotonic() > deadline:
                raise BenchError(f"a postmaster (pid {self.postmaster_pid()}) still runs in {self.data}")
            time.sleep(0.05)

    def start_stock(self, timeout: float = 60) -> None:
        if self.stock is not None and self.stock.alive():
            return
        self.wait_no_postmaster()
        self.stock = procs.start_server("postgres", [self.bin("postgres"), "-D", self.data],
                                        os.path.join(self.logdir, "postgres.log"), signal.SIGINT)
        deadline = time.monotonic() + timeout
        while not self._ready(self.stock.pid):
            if not self.stock.alive():
                raise BenchError(f"PostgreSQL did not start:\n{self.stock.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise BenchError("PostgreSQL did not become ready in time")
            time.sleep(0.02)

    def stop_stock(self) -> None:
        if self.stock is not None:
            self.stock.stop()
            self.stock = None
        self.wait_no_postmaster()

    # -------------------------------------------------------------- clean-up

    def remove(self) -> None:
        if self.keep:
            print(f"bench: kept {self.root} and {self.bulk_dir}")
            return
        shutil.rmtree(self.bulk_dir, ignore_errors=True)
        shutil.rmtree(self.root, ignore_errors=True)
