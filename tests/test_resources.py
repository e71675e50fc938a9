"""Resource bounds under many connections: idle TLS clients dropped at
authentication_timeout without starving anyone else, no memory or descriptor growth over
tens of thousands of connections, and memory handed back after a burst.

Each test runs its own pgfast (one shared data directory: TLS on, every TCP connection
over TLS trusted) and measures the pgfast process itself: VmRSS from /proc/PID/status and
the entries of /proc/PID/fd. The figures are printed (run with -s to see them).
"""
from __future__ import annotations

import os
import resource
import select
import shutil
import socket
import ssl
import statistics
import tempfile
import threading
import time

import psycopg
import pytest

import certs
from conftest import Pgfast, append_conf, chown_tree, free_port, wait_until, write_file
from rawclient import SSL_REQUEST, RawClient

HBA = """\
local    all  all                trust
hostssl  all  all  127.0.0.1/32  trust
hostssl  all  all  ::1/128       trust
"""


# ---------------------------------------------------------------- measuring

def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _socket_inodes(table: str, column: int) -> set[int]:
    try:
        with open(table) as f:
            return {int(row.split()[column]) for row in f.readlines()[1:] if len(row.split()) > column}
    except FileNotFoundError:
        return set()


def fd_kinds(pid: int) -> dict[str, int]:
    """The process's descriptors: TCP sockets (listeners and clients), Unix sockets (its
    listener, PostgreSQL backends and the catalog session) and everything else."""
    tcp = _socket_inodes(f"/proc/{pid}/net/tcp", 9) | _socket_inodes(f"/proc/{pid}/net/tcp6", 9)
    unix = _socket_inodes(f"/proc/{pid}/net/unix", 6)
    kinds = {"tcp": 0, "unix": 0, "other": 0}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        inode = int(target[8:-1]) if target.startswith("socket:[") else None
        kinds["tcp" if inode in tcp else "unix" if inode in unix else "other"] += 1
    return kinds


def raise_nofile(needed: int) -> None:
    """RLIMIT_NOFILE of the test process (and so of pgfast, started from it) at least needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        if os.geteuid() != 0:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors this test needs")
        hard = needed
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def tls_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def normal_client(server: Pgfast) -> float:
    """psycopg over TLS: connect and run a query; how long that took.

    Each test logs in this way once before any concurrent logins: several logins at once
    while pgfast opens its catalog session can freeze it for good (a known defect, see
    test_faults.py::test_a_login_while_the_catalog_session_opens)."""
    started = time.monotonic()
    with psycopg.connect(server.dsn(sslmode="require"), autocommit=True) as conn:
        assert conn.execute("select 'served'").fetchone()[0] == "served"
    return time.monotonic() - started


class IdleTLS:
    """n TCP connections that send an SSLRequest, finish the TLS handshake and then say
    nothing; a watcher thread records when each sees the server end it (EOF, a TLS
    close_notify or a reset)."""

    def __init__(self, port: int, n: int, threads: int = 8):
        self.port, self.n = port, n
        self.ctx = tls_context()
        self.sockets: list[ssl.SSLSocket | None] = [None] * n
        self.connected_at = [0.0] * n
        self.ended_at: list[float | None] = [None] * n
        self.failures: list[str] = []
        self.opened = 0
        self._lock = threading.Lock()
        self._epoll = select.epoll()
        self._by_fd: dict[int, int] = {}
        self._stop = False
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()
        self._openers = [threading.Thread(target=self._open, args=(range(i, n, threads),), daemon=True)
                         for i in range(threads)]

    def start(self) -> "IdleTLS":
        for thread in self._openers:
            thread.start()
        return self

    def wait_opened(self, timeout: float) -> None:
        for thread in self._openers:
            thread.join(timeout)
            assert not thread.is_alive(), "opening the idle TLS connections hangs"

    def _open(self, indexes) -> None:
        for i in indexes:
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
                self.connected_at[i] = time.monotonic()
                sock.sendall(SSL_REQUEST)
                assert sock.recv(1) == b"S"
                tls = self.ctx.wrap_socket(sock, server_hostname="localhost")
            except (OSError, AssertionError) as exc:
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            tls.setblocking(False)
            with self._lock:
                self.sockets[i] = tls
                self._by_fd[tls.fileno()] = i
                self.opened += 1
            self._epoll.register(tls.fileno(), select.EPOLLIN | select.EPOLLRDHUP)

    def _watch(self) -> None:
        while not self._stop:
            for fd, _ in self._epoll.poll(0.05):
                with self._lock:
                    i = self._by_fd.get(fd)
                if i is None or self.ended_at[i] is not None:
                    continue
                try:
                    if self.sockets[i].recv(65536):
                        continue        # data would be odd, but not the end
                except ssl.SSLWantReadError:
                    continue            # a record not complete yet, or session tickets
                except (ssl.SSLError, OSError):
                    pass                # reset, or an alert: the end too
                self.ended_at[i] = time.monotonic()
                self._epoll.unregister(fd)

    @property
    def ended(self) -> int:
        return sum(t is not None for t in self.ended_at)

    def close(self) -> None:
        self._stop = True
        self._watcher.join(5)
        for sock in self.sockets:
            if sock is not None:
                sock.close()
        self._epoll.close()


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def data_dir(template_cluster, module_dir) -> str:
    data = os.path.join(module_dir, "data")
    shutil.copytree(template_cluster, data, symlinks=True)
    os.chmod(data, 0o700)
    cert = certs.CA("pgfast resources test CA").server_cert()
    certs.write(os.path.join(data, "server.crt"), cert.chain_pem(), 0o644)
    certs.write(os.path.join(data, "server.key"), cert.key_pem(), 0o600)
    write_file(os.path.join(data, "pg_hba.conf"), HBA)
    append_conf(data, "ssl = on")
    chown_tree(data)
    return data


@pytest.fixture
def pgfast(data_dir, scratch, client_env):
    """start(*args): a pgfast on the module's data directory, stopped (status 0) at the end."""
    started: list[Pgfast] = []

    def start(*args: str) -> Pgfast:
        socket_dir = tempfile.mkdtemp(prefix="sock-", dir=scratch)
        os.chmod(socket_dir, 0o777)
        server = Pgfast(data_dir, free_port(), socket_dir, list(args), dict(client_env)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        status = server.stop()
        assert status == 0, server.log
        assert "Traceback" not in server.log, server.log


# ---------------------------------------------------------------- 1. idle TLS clients and authentication_timeout

IDLE_CLIENTS = 2000
AUTH_TIMEOUT = 2.0


def test_idle_tls_clients_are_dropped_at_authentication_timeout(pgfast):
    raise_nofile(2 * IDLE_CLIENTS + 1000)
    server = pgfast("-c", f"authentication_timeout={AUTH_TIMEOUT:g}s", "-c", "max_connections=2500")
    pid = server.process.pid
    fds_before = fd_count(pid)
    normal_client(server)        # warm: the first catalog session and backend
    idle = IdleTLS(server.port, IDLE_CLIENTS).start()
    try:
        assert wait_until(lambda: idle.opened >= IDLE_CLIENTS // 2 or idle.failures, 60), "the burst stalled"
        during = normal_client(server)       # while the burst goes on
        opened_then = idle.opened
        idle.wait_opened(120)
        burst_done = time.monotonic()
        after = normal_client(server)        # with all of them connected and silent
        assert not idle.failures, f"{len(idle.failures)} idle clients failed to connect: {idle.failures[:5]}"
        burst = burst_done - min(idle.connected_at)
        print(f"\n{IDLE_CLIENTS} TLS handshakes in {burst:.2f} s; a normal client took {during:.3f} s "
              f"with {opened_then} connected and the burst going on, {after:.3f} s with all {IDLE_CLIENTS} idle")
        assert during < 2 and after < 2, f"a normal client took {during:.2f} s / {after:.2f} s during the burst"

        deadline = max(idle.connected_at) + AUTH_TIMEOUT + 4
        wait_until(lambda: idle.ended == IDLE_CLIENTS, max(0.0, deadline - time.monotonic()))
        lifetimes = sorted(end - start for start, end in zip(idle.connected_at, idle.ended_at) if end is not None)
        print(f"{len(lifetimes)} of {IDLE_CLIENTS} ended; connected for min {lifetimes[0]:.2f} s, median "
              f"{statistics.median(lifetimes):.2f} s, max {lifetimes[-1]:.2f} s (authentication_timeout "
              f"{AUTH_TIMEOUT:g} s)")
        assert idle.ended == IDLE_CLIENTS, \
            f"{IDLE_CLIENTS - idle.ended} idle clients were still connected {AUTH_TIMEOUT + 4:g} s after connecting"
        assert lifetimes[0] >= AUTH_TIMEOUT - 0.1, f"a client was dropped after {lifetimes[0]:.2f} s, before the timeout"
        assert lifetimes[-1] <= AUTH_TIMEOUT + 2.5, f"a client was dropped only after {lifetimes[-1]:.2f} s"
    finally:
        idle.close()
    assert wait_until(lambda: fd_count(pid) <= fds_before + 5, 10), \
        f"pgfast holds {fd_count(pid)} descriptors after the idle clients left ({fds_before} before)"
    assert normal_client(server) < 2


# ---------------------------------------------------------------- 2. many sequential connections

# The full 20,000. A strictly sequential loop manages ~410 TLS sessions/s here (2 cores
# shared by the client, pgfast and PostgreSQL), ~49 s; 4 client threads, each sequential,
# reach ~670/s: ~30 s on an idle machine (~50 s when other jobs share the cores).
# PGFAST_TEST_CONNECTIONS lowers it for a slow CI, never below 5,000.
CONNECTIONS = max(5000, int(os.environ.get("PGFAST_TEST_CONNECTIONS", "20000")))
WARM_UP = 500
CLIENT_THREADS = 4
POOL_SIZE = 20          # pgfast.pool_size's default: idle backends it may keep for one startup packet


def tls_sessions(port: int, count: int, threads: int = CLIENT_THREADS) -> float:
    """count TLS sessions (SSLRequest, handshake, startup as a trust user, ReadyForQuery,
    Terminate), spread over a few threads each running its share one after another;
    the elapsed time."""
    ctx = tls_context()
    errors: list[str] = []

    def run(n: int) -> None:
        for _ in range(n):
            try:
                client = RawClient.connect(port, tls=ctx)
                client.startup(user="postgres", database="postgres")
                client.authenticate()
                client.terminate()
            except Exception as exc:     # noqa: BLE001 - reported below
                errors.append(f"{type(exc).__name__}: {exc}")
                if len(errors) > 20:
                    return

    started = time.monotonic()
    jobs = [threading.Thread(target=run, args=(count // threads + (i < count % threads),), daemon=True)
            for i in range(threads)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(600)
        assert not job.is_alive(), "a client thread hangs"
    assert not errors, f"{len(errors)} sessions failed: {errors[:5]}"
    return time.monotonic() - started


def test_many_sequential_tls_connections_leave_no_growth(pgfast):
    server = pgfast()
    pid = server.process.pid
    fds_at_start, rss_at_start = fd_kinds(pid), rss_kb(pid)
    normal_client(server)     # the catalog session opened by one login (see normal_client)
    warm = tls_sessions(server.port, WARM_UP)
    time.sleep(1)
    fds_warm, rss_warm = fd_kinds(pid), rss_kb(pid)
    took = tls_sessions(server.port, CONNECTIONS)

    def settled() -> bool:
        now = fd_kinds(pid)
        # every client descriptor closed; PostgreSQL connections at most the warm-up's plus
        # what the pool may keep idle (it grows past the client count when a client comes
        # back before its previous backend's DISCARD ALL is done)
        return (abs(now["tcp"] - fds_warm["tcp"]) <= 5 and abs(now["other"] - fds_warm["other"]) <= 5
                and now["unix"] <= fds_warm["unix"] + POOL_SIZE)
    is_settled = wait_until(settled, 10)
    fds_end, rss_end = fd_kinds(pid), rss_kb(pid)
    total = {name: sum(kinds.values()) for name, kinds in
             (("start", fds_at_start), ("warm", fds_warm), ("end", fds_end))}
    print(f"\nwarm-up {WARM_UP} sessions in {warm:.2f} s; {CONNECTIONS} sessions in {took:.2f} s "
          f"({CONNECTIONS / took:.0f}/s over {CLIENT_THREADS} client threads)\n"
          f"RSS: {rss_at_start} KB at start, {rss_warm} KB after the warm-up, {rss_end} KB after "
          f"{CONNECTIONS} ({(rss_end - rss_warm) / 1024:+.1f} MB)\n"
          f"descriptors: {total['start']} at start {fds_at_start}, {total['warm']} after the warm-up {fds_warm}, "
          f"{total['end']} at the end {fds_end}")
    assert rss_end <= rss_warm + 20 * 1024, \
        f"pgfast's RSS grew {(rss_end - rss_warm) / 1024:.1f} MB over {CONNECTIONS} connections"
    assert is_settled, f"pgfast holds descriptors {fds_end} after {CONNECTIONS} connections ({fds_warm} before)"
    # the total, less PostgreSQL connections the pool keeps idle, is back where it was
    pooled_extra = max(0, fds_end["unix"] - fds_warm["unix"])
    assert abs(total["end"] - pooled_extra - total["warm"]) <= 5, (fds_warm, fds_end)


# ---------------------------------------------------------------- 3. memory after a burst

BURST = 2000


def test_memory_is_handed_back_after_a_burst(pgfast):
    raise_nofile(2 * BURST + 1000)
    server = pgfast()
    pid = server.process.pid
    normal_client(server)
    tls_sessions(server.port, 100)          # everything a connection needs is loaded
    time.sleep(1)
    fds_before, rss_before = fd_count(pid), rss_kb(pid)
    idle = IdleTLS(server.port, BURST).start()
    try:
        idle.wait_opened(120)
        assert not idle.failures, f"{len(idle.failures)} clients failed to connect: {idle.failures[:5]}"
        assert wait_until(lambda: fd_count(pid) >= fds_before + BURST, 10), \
            f"pgfast has {fd_count(pid)} descriptors with {BURST} clients connected"
        time.sleep(0.5)
        rss_during = rss_kb(pid)
        assert idle.ended == 0, "clients were dropped before the measurement"
    finally:
        idle.close()
    closed = time.monotonic()
    samples = []
    returned = wait_until(lambda: samples.append((time.monotonic() - closed, rss_kb(pid))) or
                          samples[-1][1] <= rss_before + 15 * 1024, 15, 0.25)
    per_client = (rss_during - rss_before) / BURST
    print(f"\nRSS {rss_before} KB before, {rss_during} KB with {BURST} idle TLS clients "
          f"({per_client:.1f} KB per client), then after closing them: "
          + ", ".join(f"{kb} KB at {t:.1f} s" for t, kb in samples[::4] + samples[-1:]))
    assert per_client < 100, f"{per_client:.1f} KB per idle TLS client (the README says about 26 KB)"
    assert returned, (f"RSS still {samples[-1][1]} KB 15 s after the burst ended "
                      f"({(samples[-1][1] - rss_before) / 1024:.1f} MB above the {rss_before} KB before)")
    assert wait_until(lambda: fd_count(pid) <= fds_before + 5, 10)
