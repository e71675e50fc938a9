"""Faults: what pgfast does when something dies under it, when it is killed itself, when it
is stopped under load, when nobody reads its log, and a few edges where PostgreSQL's
state changes under it (a dropped `postgres` database, a password that is not UTF-8).

Every test runs its own pgfast on a fresh copy of the session's data directory (TLS on,
pg_hba.conf below), talks to it with psycopg (libpq, sslmode=require) or the raw client,
and bounds every wait: a hang is a failure with a message, never a stuck test run.

Each defect these tests found has its test here: a login while the catalog session opens
(the event loop spun forever), a restart while the old PostgreSQL is not yet reaped,
PostgreSQL's log lines blocking on a full stderr (now passed through pgfast's log writer),
DROP DATABASE under transaction pooling, and PostgreSQL's refusal of a waiting client's
backend under transaction pooling.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time

import psycopg
import psycopg.errors
import pytest

import certs
from conftest import READY, Pgfast, alive, append_conf, db_account, free_port, port_is_free, wait_until, write_file
from rawclient import RawClient, error_fields

HBA = """\
# TYPE   DATABASE USER     ADDRESS        METHOD
local    all      all                     trust
hostssl  all      pwuser   127.0.0.1/32   scram-sha-256
hostssl  all      md5user  127.0.0.1/32   md5
hostssl  all      all      127.0.0.1/32   trust
hostssl  all      all      ::1/128        trust
"""

# what libpq says when the server went away without (or with an unreadable) goodbye
CLOSED = re.compile(r"server closed the connection unexpectedly|SSL connection has been closed unexpectedly"
                    r"|SSL SYSCALL error|connection is closed|consuming input failed|EOF detected"
                    r"|the connection is lost|no connection to the server", re.I)
CRASH_57P02 = "terminating connection because of crash of another server process"
ADMIN_57P01 = "terminating connection due to administrator command"
PM_EXIT_57P01 = "terminating connection due to unexpected postmaster exit"


# ---------------------------------------------------------------- helpers

def postgres_processes(data_dir: str) -> list[int]:
    """PostgreSQL processes of data_dir: they all run with it as working directory."""
    real = os.path.realpath(data_dir)
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
            with open(f"/proc/{name}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if cwd == real and comm.startswith("postgres"):
            found.append(int(name))
    return found


def process_title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def pid_file_lines(data_dir: str) -> list[str]:
    try:
        with open(os.path.join(data_dir, "postmaster.pid")) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def pid_file_pid(data_dir: str) -> int | None:
    lines = pid_file_lines(data_dir)
    try:
        return int(lines[0])
    except (IndexError, ValueError):
        return None


def assert_nothing_left(data_dir: str, port: int, socket_dir: str, *, grace: float = 5) -> None:
    """No listener on port, no PostgreSQL in data_dir, postmaster.pid gone or dead, socket removed."""
    wait_until(lambda: not postgres_processes(data_dir), grace)
    left = postgres_processes(data_dir)
    assert left == [], f"PostgreSQL processes left running: {[process_title(p) for p in left]}"
    pid = pid_file_pid(data_dir)
    assert pid is None or not alive(pid), f"postmaster.pid names live process {pid}"
    assert port_is_free(port), f"port {port} is still taken"
    assert not os.path.exists(os.path.join(socket_dir, f".s.PGSQL.{port}")), "pgfast's Unix socket was left"


def assert_clean_log(log: str) -> None:
    assert "Traceback" not in log, f"a Traceback in pgfast's log:\n{log}"
    assert "Task was destroyed but it is pending" not in log, f"pending tasks destroyed:\n{log}"


class Background:
    """fn() in a daemon thread; join() fails the test (instead of hanging it) past a timeout."""

    def __init__(self, fn, name: str = "background"):
        self.name = name
        self.result = None
        self.error: BaseException | None = None
        self.finished_at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True, name=name)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self.result = fn()
        except BaseException as exc:   # noqa: B902 - reported by join()
            self.error = exc
        self.finished_at = time.monotonic()

    def join(self, timeout: float) -> "Background":
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"{self.name}: still waiting after {timeout} s (a hang)"
        return self


def tls_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connect(server: Pgfast, **params) -> psycopg.Connection:
    params.setdefault("sslmode", "require")
    return psycopg.connect(server.dsn(**params), autocommit=True)


def query_value(server: Pgfast, sql: str, **params):
    with connect(server, **params) as conn:
        return conn.execute(sql).fetchone()[0]


def retry(fn, timeout: float, what: str):
    """fn() until it succeeds; its result and how long that took. Fails after timeout."""
    started = time.monotonic()
    last = None
    while time.monotonic() - started < timeout:
        try:
            return fn(), time.monotonic() - started
        except Exception as exc:    # noqa: BLE001 - kept for the message
            last = exc
            time.sleep(0.2)
    raise AssertionError(f"{what} did not succeed within {timeout} s; last error: {last!r}")


def wait_active(server: Pgfast, pids: list[int], timeout: float = 15) -> None:
    """Until every backend in pids runs a pg_sleep (seen from a session of its own)."""
    with connect(server, application_name="watcher") as watcher:
        def running() -> bool:
            rows = watcher.execute("select pid from pg_stat_activity where state = 'active' "
                                   "and strpos(query, 'pg_sleep') > 0 and pid = any(%s)", (pids,)).fetchall()
            return {r[0] for r in rows} == set(pids)
        assert wait_until(running, timeout), f"backends {pids} never became active"


def describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no error"
    return f"{type(exc).__name__} [{getattr(exc, 'sqlstate', None)}]: {str(exc).strip()}"


def is_closed_or(exc: BaseException | None, *texts: str, sqlstates: tuple[str, ...] = ()) -> bool:
    """An OperationalError saying one of texts (with one of sqlstates), or a closed connection."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    message = str(exc)
    return (getattr(exc, "sqlstate", None) in sqlstates or any(t in message for t in texts)
            or CLOSED.search(message) is not None)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def ca() -> certs.CA:
    return certs.CA("pgfast faults test CA")


@pytest.fixture(scope="module")
def server_cert(ca) -> certs.Issued:
    return ca.server_cert()


@pytest.fixture
def data_dir(cluster, server_cert) -> str:
    """A fresh data directory: ssl = on, this module's certificate and pg_hba.conf."""
    account = db_account()
    for name, data, mode in (("server.crt", server_cert.chain_pem(), 0o644),
                             ("server.key", server_cert.key_pem(), 0o600)):
        path = certs.write(os.path.join(cluster, name), data, mode)
        if os.geteuid() == 0:
            os.chown(path, account.pw_uid, account.pw_gid)
    write_file(os.path.join(cluster, "pg_hba.conf"), HBA)
    append_conf(cluster, "ssl = on")
    return cluster


def make_socket_dir(parent: str) -> str:
    path = tempfile.mkdtemp(prefix="sock-", dir=parent)
    os.chmod(path, 0o777)
    return path


@pytest.fixture
def servers():
    """pgfast processes a test starts (a Pgfast or an UnreadLog, with its data directory);
    stopped at the end (SIGINT, then SIGKILL), and their PostgreSQL with them."""
    started: list[tuple[Pgfast | UnreadLog, str]] = []
    yield started
    for item, data in started:
        process = item.process
        if isinstance(item, UnreadLog):
            item.drain()            # a log nobody reads could keep it from stopping
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)          # fast shutdown, whatever clients are left
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # a PostgreSQL orphaned by a test that killed things: give it time, then end it
        if not wait_until(lambda: not postgres_processes(data), 30):
            for pid in postgres_processes(data):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def start(servers, data_dir: str, scratch: str, env: dict, *args: str, port: int | None = None,
          socket_dir: str | None = None, wait: bool = True) -> Pgfast:
    server = Pgfast(data_dir, port or free_port(), socket_dir or make_socket_dir(scratch), list(args), dict(env))
    servers.append((server, data_dir))
    server.start(wait=wait)
    return server


# the suite's data directories run one process (pgfast.workers = 1, conftest); the tests of
# pgfast's own death and stopping also run with a supervisor and two workers
WORKERS = [1, 2]


# ---------------------------------------------------------------- 1. a backend crashes

def test_backend_killed_mid_query(data_dir, scratch, client_env, servers):
    server = start(servers, data_dir, scratch, client_env)
    # a backend parked in the session pool when the crash comes (a startup packet of its
    # own, so no client below takes it), and pgfast's catalog session open (a password login)
    with connect(server, application_name="parked") as conn:
        parked = conn.execute("select pg_backend_pid()").fetchone()[0]
        conn.execute("create role pwuser login password 'pw-secret'")
    assert password_login(server, "postgres") == "pwuser@postgres"
    with connect(server, application_name="watcher") as watcher:
        assert wait_until(lambda: watcher.execute("select state, query from pg_stat_activity where pid = %s",
                                                  (parked,)).fetchone() == ("idle", "DISCARD ALL"), 10), \
            "the parked backend was not reset and pooled"
    victim, other_busy, other_idle = connect(server), connect(server), connect(server)
    # PostgreSQL tells the other sessions with a WARNING (57P02) just before it ends them
    notices: dict[str, list[tuple[str, str]]] = {"busy": [], "idle": []}
    for name, conn in (("busy", other_busy), ("idle", other_idle)):
        conn.add_notice_handler(lambda diag, name=name: notices[name].append((diag.sqlstate, diag.message_primary)))
    victim_pid = victim.execute("select pg_backend_pid()").fetchone()[0]
    busy_pid = other_busy.execute("select pg_backend_pid()").fetchone()[0]
    other_idle.execute("select 1")
    victim_query = Background(lambda: victim.execute("select pg_sleep(60)"), "the victim's query")
    busy_query = Background(lambda: other_busy.execute("select pg_sleep(60)"), "another client's query")
    wait_active(server, [victim_pid, busy_pid])
    mark = len(server.lines)

    os.kill(victim_pid, signal.SIGKILL)

    victim_query.join(15)
    assert isinstance(victim_query.error, psycopg.OperationalError), \
        f"the client whose backend was killed got {describe(victim_query.error)}"
    busy_query.join(15)
    assert is_closed_or(busy_query.error, CRASH_57P02, sqlstates=("57P02",)), \
        f"a client mid-query in another backend got {describe(busy_query.error)}"
    idle_query = Background(lambda: other_idle.execute("select 1"), "an idle client's next query").join(15)
    assert is_closed_or(idle_query.error, CRASH_57P02, sqlstates=("57P02",)), \
        f"an idle client of another backend got {describe(idle_query.error)}"
    print(f"\nvictim: {describe(victim_query.error)}\nbusy: {describe(busy_query.error)}\n"
          f"idle: {describe(idle_query.error)}\nnotices: {notices}")
    for name, job in (("busy", busy_query), ("idle", idle_query)):
        told = CRASH_57P02 in str(job.error) or ("57P02", CRASH_57P02) in notices[name]
        assert told, f"the {name} client was not told of the crash (57P02): {notices[name]}"
    for conn in (victim, other_busy, other_idle):
        conn.close()

    # PostgreSQL restarts; new clients get in again through pgfast, the pool included
    pid, took = retry(lambda: query_value(server, "select pg_backend_pid()", connect_timeout=5),
                      30, "a new connection after the crash")
    print(f"first query after the crash served after {took:.2f} s (backend {pid})")
    # from now on every connection must work at once: no dead pooled backend handed out
    pids = [pid, query_value(server, "select pg_backend_pid()", application_name="parked")]
    for _ in range(10):
        pids.append(query_value(server, "select pg_backend_pid()", application_name="parked"))
    concurrent = [Background(lambda: query_value(server, "select pg_backend_pid() from pg_sleep(0.2)"))
                  for _ in range(5)]
    for job in concurrent:
        job.join(30)
        assert job.error is None, f"a connection after recovery failed: {describe(job.error)}"
        pids.append(job.result)
    assert not {parked, victim_pid, busy_pid} & set(pids), "a backend from before the crash served"
    assert password_login(server, "postgres") == "pwuser@postgres"      # a new catalog session too
    print(f"backends after recovery: {sorted(set(pids))} (pooled: {len(pids) - len(set(pids))} reuses)")
    server.wait_for("terminated by signal 9", 5)      # PostgreSQL's own account of it
    assert server.process.poll() is None, f"pgfast exited after a backend crash:\n{server.log}"
    assert_clean_log("".join(server.lines[mark:]))
    assert server.stop() == 0, server.log
    assert_clean_log(server.log)


# ---------------------------------------------------------------- 2. the postmaster dies

@pytest.mark.parametrize("workers", WORKERS)
def test_postmaster_killed(data_dir, scratch, client_env, servers, workers):
    server = start(servers, data_dir, scratch, client_env, "-c", f"pgfast.workers={workers}")
    idle, busy = connect(server), connect(server)
    idle.execute("select 1")
    busy_pid = busy.execute("select pg_backend_pid()").fetchone()[0]
    busy_query = Background(lambda: busy.execute("select pg_sleep(60)"), "a client's query")
    wait_active(server, [busy_pid])
    postmaster, private_dir = int(pid_file_lines(data_dir)[0]), pid_file_lines(data_dir)[4]

    killed_at = time.monotonic()
    os.kill(postmaster, signal.SIGKILL)
    try:
        status = server.process.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pgfast still runs 10 s after its postmaster was killed:\n{server.log}")
    took = time.monotonic() - killed_at
    server._reader.join(5)
    print(f"\npgfast exited with status {status} {took:.2f} s after the postmaster was killed")
    assert status != 0, f"pgfast exited with status 0 after losing its PostgreSQL:\n{server.log}"
    assert re.search(r"\] FATAL:  PostgreSQL exited unexpectedly", server.log), server.log
    busy_query.join(10)
    assert is_closed_or(busy_query.error, PM_EXIT_57P01, ADMIN_57P01, sqlstates=("57P01",)), \
        f"a client mid-query got {describe(busy_query.error)}"
    idle_query = Background(lambda: idle.execute("select 1"), "an idle client's next query").join(10)
    assert is_closed_or(idle_query.error, PM_EXIT_57P01, ADMIN_57P01, sqlstates=("57P01",)), \
        f"an idle client got {describe(idle_query.error)}"
    print(f"busy: {describe(busy_query.error)}\nidle: {describe(idle_query.error)}")
    assert port_is_free(server.port), "pgfast's port is still taken"
    assert not os.path.exists(os.path.join(server.socket_dir, f".s.PGSQL.{server.port}")), "its socket was left"
    assert not os.path.exists(private_dir), f"its private directory {private_dir} was left"
    assert_clean_log(server.log)
    lingering = postgres_processes(data_dir)
    assert wait_until(lambda: not postgres_processes(data_dir), 30), \
        f"PostgreSQL processes still run 30 s after their postmaster was killed: {lingering}"
    print(f"PostgreSQL processes left by the killed postmaster: {len(lingering)}, gone since")

    # the data directory serves again (PostgreSQL's crash recovery, a stale postmaster.pid)
    again = start(servers, data_dir, scratch, client_env, "-c", f"pgfast.workers={workers}",
                  port=server.port, socket_dir=server.socket_dir)
    assert query_value(again, "select 'served'") == "served"
    assert again.stop() == 0, again.log
    assert_clean_log(again.log)


# ---------------------------------------------------------------- 3. pgfast itself is killed

def pgfast_workers(pid: int) -> list[int]:
    """pgfast's worker processes: its children that are not PostgreSQL."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/comm") as f:
                comm = f.read().strip()
        except (OSError, ValueError):
            continue
        if name.isdigit() and int(fields[1]) == pid and not comm.startswith("postgres"):
            found.append(int(name))
    return found


def _kill_pgfast(server: Pgfast) -> tuple[int, str]:
    """SIGKILL pgfast (and reap it); its postmaster's pid and its private socket directory."""
    postmaster = pid_file_pid(server.data_dir)
    private_dir = pid_file_lines(server.data_dir)[4]
    assert os.path.basename(private_dir).startswith("pgfast-") and os.path.isdir(private_dir), private_dir
    server.process.kill()
    server.process.wait(5)      # reaped: a zombie would still look alive
    server._reader.join(5)
    return postmaster, private_dir


@pytest.mark.parametrize("workers", WORKERS)
def test_pgfast_killed_then_restarted(data_dir, scratch, client_env, servers, workers):
    server = start(servers, data_dir, scratch, client_env, "-c", f"pgfast.workers={workers}")
    client = connect(server)
    client.execute("select 1")
    workers_before = pgfast_workers(server.process.pid)
    assert len(workers_before) == (workers if workers > 1 else 0), workers_before
    postmaster, private_dir = _kill_pgfast(server)
    killed_at = time.monotonic()
    assert wait_until(lambda: not any(alive(pid) for pid in workers_before), 10), \
        f"pgfast's workers {workers_before} still run 10 s after it was killed"

    assert wait_until(lambda: not alive(postmaster), 30), \
        f"PostgreSQL (PID {postmaster}) still runs 30 s after its pgfast was killed"
    print(f"\nPostgreSQL gone {time.monotonic() - killed_at:.2f} s after pgfast was killed")
    assert wait_until(lambda: not postgres_processes(data_dir), 10), "PostgreSQL children left running"
    failed = Background(lambda: client.execute("select 1")).join(10)
    assert isinstance(failed.error, psycopg.OperationalError), describe(failed.error)
    client.close()
    assert os.path.isdir(private_dir), "precondition: the killed pgfast left its private directory"

    again = start(servers, data_dir, scratch, client_env, "-c", f"pgfast.workers={workers}",
                  port=server.port, socket_dir=server.socket_dir)
    assert query_value(again, "select 'served'") == "served"
    assert not os.path.exists(private_dir), f"the killed pgfast's private directory {private_dir} is still there"
    assert pid_file_lines(data_dir)[4] != private_dir
    assert "FATAL" not in again.log, again.log
    assert again.stop() == 0, again.log
    assert_nothing_left(data_dir, again.port, again.socket_dir)
    assert_clean_log(again.log)


_PR_SET_CHILD_SUBREAPER = 36


def set_child_subreaper(on: bool) -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_restart_waits_for_a_postgresql_still_shutting_down(data_dir, scratch, client_env, servers):
    """The orphaned PostgreSQL is held in its fast shutdown ("stopping" in postmaster.pid)
    by pausing its checkpointer (SIGSTOP) for 3 s while a new pgfast starts. The test
    process is made the orphan's reaper (PR_SET_CHILD_SUBREAPER) and reaps it 1 s after it
    exits, as a slow init would: the new pgfast must wait it out and then serve."""
    server = start(servers, data_dir, scratch, client_env)
    checkpointer = [p for p in postgres_processes(data_dir) if "checkpointer" in process_title(p)]
    assert len(checkpointer) == 1, [process_title(p) for p in postgres_processes(data_dir)]
    postmaster = pid_file_pid(data_dir)
    set_child_subreaper(True)
    os.kill(checkpointer[0], signal.SIGSTOP)
    try:
        postmaster, private_dir = _kill_pgfast(server)
        assert wait_until(lambda: len(pid_file_lines(data_dir)) >= 8 and
                          pid_file_lines(data_dir)[7].strip() == "stopping", 10), \
            f"PostgreSQL did not start its shutdown when pgfast was killed: {pid_file_lines(data_dir)}"
        again = start(servers, data_dir, scratch, client_env, port=server.port, socket_dir=server.socket_dir,
                      wait=False)
        time.sleep(3)
        assert again.process.poll() is None, f"pgfast gave up on a PostgreSQL still shutting down:\n{again.log}"
        assert READY not in again.log, again.log
        assert alive(postmaster)
        os.kill(checkpointer[0], signal.SIGCONT)
        resumed = time.monotonic()
        assert wait_until(lambda: process_state(postmaster) == "Z", 30), "the old PostgreSQL did not exit"
        print(f"\nthe old PostgreSQL exited {time.monotonic() - resumed:.2f} s after it resumed")
        time.sleep(1)
        os.waitpid(postmaster, 0)
    finally:
        try:
            os.kill(checkpointer[0], signal.SIGCONT)
        except ProcessLookupError:
            pass
        set_child_subreaper(False)
        if wait_until(lambda: process_state(postmaster) in ("Z", "gone"), 30):
            try:
                os.waitpid(postmaster, os.WNOHANG)
            except ChildProcessError:
                pass
    again.wait_for(f"[{again.process.pid}] {READY}", 30)
    print(f"the new pgfast served {time.monotonic() - resumed:.2f} s after the old PostgreSQL resumed")
    assert query_value(again, "select 'served'") == "served"
    assert not os.path.exists(private_dir), f"the killed pgfast's private directory {private_dir} is still there"
    assert "FATAL" not in again.log, again.log
    assert again.stop() == 0, again.log
    assert_clean_log(again.log)


# ---------------------------------------------------------------- 4. a fast shutdown under load

# The brief asked for SIGTERM, which stopped pgfast at once until b1a0ea6; since then pgfast
# takes PostgreSQL's shutdown modes on PostgreSQL's signals (SIGTERM smart: it waits for the
# open sessions to end; SIGINT fast), so the prompt stop with 57P01 for everyone is SIGINT's
# (it was SIGINT's as well before).
FAST_SHUTDOWN = signal.SIGINT

class Worker(threading.Thread):
    """A client running sql over and over until its connection fails."""

    def __init__(self, server: Pgfast, sql: str):
        super().__init__(daemon=True)
        self.server, self.sql = server, sql
        self.queries = 0
        self.pid: int | None = None
        self.error: BaseException | None = None
        self.connected = threading.Event()

    def run(self) -> None:
        try:
            conn = connect(self.server)
        except BaseException as exc:   # noqa: B902
            self.error = exc
            self.connected.set()
            return
        try:
            self.pid = conn.execute("select pg_backend_pid()").fetchone()[0]
            self.connected.set()
            while True:
                conn.execute(self.sql)
                self.queries += 1
        except BaseException as exc:   # noqa: B902
            self.error = exc
        finally:
            conn.close()


@pytest.mark.parametrize("workers", WORKERS)
def test_fast_shutdown_with_busy_clients(data_dir, scratch, client_env, servers, workers):
    server = start(servers, data_dir, scratch, client_env, "-c", f"pgfast.workers={workers}")
    # logins one at a time first, until every worker has its catalog session open: 53 at once
    # on a worker whose catalog session is not open yet can freeze it
    # (test_a_login_while_the_catalog_session_opens), which is not this test's subject
    assert wait_until(lambda: query_value(server, "select count(*) from pg_stat_activity "
                                                  "where application_name = 'pgfast'") >= workers, 30), \
        "pgfast's workers did not all open their catalog sessions"
    busy = [Worker(server, "select pg_sleep(0.05)") for _ in range(50)]
    long = [Worker(server, "select pg_sleep(30)") for _ in range(3)]
    for worker in busy + long:
        worker.start()
    for worker in busy + long:
        assert worker.connected.wait(60), "a client could not connect"
        assert worker.error is None, describe(worker.error)
    assert wait_until(lambda: all(w.queries > 0 for w in busy), 30), "the busy clients never got going"
    wait_active(server, [w.pid for w in long])

    signalled = time.monotonic()
    server.process.send_signal(FAST_SHUTDOWN)
    try:
        status = server.process.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pgfast did not exit within 10 s of {FAST_SHUTDOWN.name} with 53 busy clients:\n{server.log}")
    took = time.monotonic() - signalled
    server._reader.join(5)
    for worker in busy + long:
        worker.join(10)
        assert not worker.is_alive(), "a client still waits after pgfast exited (a hang)"
    told = [w for w in busy + long if is_closed_or(w.error, sqlstates=("57P01",)) and
            (getattr(w.error, "sqlstate", None) == "57P01" or ADMIN_57P01 in str(w.error))]
    print(f"\nexit status {status} {took:.2f} s after {FAST_SHUTDOWN.name}; {len(told)} of {len(busy) + len(long)} clients "
          f"read 57P01, the others: {sorted({describe(w.error) for w in busy + long if w not in told})}")
    assert status == 0, server.log
    assert took < 3, f"pgfast took {took:.2f} s to stop:\n{server.log}"
    for worker in busy + long:
        assert is_closed_or(worker.error, ADMIN_57P01, sqlstates=("57P01",)), \
            f"a client got {describe(worker.error)}"
    for worker in long:
        assert worker in told, f"a client inside pg_sleep(30) got {describe(worker.error)}, not 57P01"
    assert len(told) >= 0.8 * (len(busy) + len(long)), "few clients were told why their connection ended"
    assert_nothing_left(data_dir, server.port, server.socket_dir)
    assert_clean_log(server.log)


# ---------------------------------------------------------------- 5. a log nobody reads

BAD_STARTUP = struct.pack("!II", 4, 0)      # a length below 8: "invalid length of startup packet"
_F_GETPIPE_SZ = 1032


def bad_startups(port: int, count: int, threads: int = 8) -> int:
    """count connections that each send BAD_STARTUP and read to EOF; how many were answered."""
    answered = [0] * threads

    def run(i: int) -> None:
        for _ in range(count // threads + (i < count % threads)):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(BAD_STARTUP)
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
                answered[i] += data[:1] == b"E"

    jobs = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(300)
    return sum(answered)


def pipe_bytes(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD), without reading them."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


class UnreadLog:
    """`pgfast run` with stdout and stderr (its log and PostgreSQL's) going to a pipe the
    test does not read until drain()."""

    def __init__(self, servers, data_dir: str, scratch: str, env: dict):
        self.port, socket_dir = free_port(), make_socket_dir(scratch)
        self.process = subprocess.Popen([sys.executable, "-m", "pgfast", "run", "-D", data_dir, "-p", str(self.port),
                                         "-c", f"unix_socket_directories={socket_dir}"],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=env)
        servers.append((self, data_dir))
        self.pipe = self.process.stdout.fileno()
        self.capacity = fcntl.fcntl(self.pipe, _F_GETPIPE_SZ)
        self.output = bytearray()
        self._reader: threading.Thread | None = None
        # ready once it answers: its log is not read, so "ready" cannot be looked for there
        retry(lambda: self.query("select 1", 5), 60, "pgfast start")

    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} dbname=postgres user=postgres sslmode=require connect_timeout=10"

    def query(self, sql: str, timeout: float):
        """A new client runs sql: (its result, how long it took); (None, timeout) when it has no
        answer within timeout. Raises what the client raised."""
        def run():
            with psycopg.connect(self.dsn(), autocommit=True) as conn:
                return conn.execute(sql).fetchone()[0]
        started = time.monotonic()
        job = Background(run, f"a client running {sql!r}")
        job._thread.join(timeout)
        took = time.monotonic() - started
        if job._thread.is_alive():
            return None, took
        if job.error is not None:
            raise job.error
        return job.result, took

    def fill(self) -> None:
        started = time.monotonic()
        answered = bad_startups(self.port, 3000)
        print(f"\n3000 bad startup packets in {time.monotonic() - started:.2f} s; the pipe holds "
              f"{pipe_bytes(self.pipe)} of {self.capacity} bytes")
        assert answered == 3000, f"only {answered} of 3000 bad startup packets were answered"
        # full: nothing more gets in (pipes fill by pages, so the last page may keep some room)
        held = [pipe_bytes(self.pipe)]
        wait_until(lambda: held.append(pipe_bytes(self.pipe)) or held[-1] == held[-2], 5, 0.5)
        assert held[-1] > self.capacity - 4096, \
            f"the log pipe holds {held[-1]} of {self.capacity} bytes: not full (the test would prove nothing)"

    def drain(self) -> None:
        def read() -> None:
            while chunk := os.read(self.pipe, 65536):
                self.output.extend(chunk)
        if self._reader is None:
            self._reader = threading.Thread(target=read, daemon=True)
            self._reader.start()

    def finish(self) -> str:
        """Read the log, stop pgfast (status 0) and return its whole log."""
        self.drain()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        assert self.process.wait(30) == 0
        self._reader.join(10)
        return self.output.decode("utf-8", "replace")


def test_logging_never_stops_service(data_dir, scratch, client_env, servers):
    server = UnreadLog(servers, data_dir, scratch, client_env)
    # 1. fill the pipe: every bad startup packet is a FATAL line
    server.fill()
    result, took = server.query("select 'still serving'", 5)
    print(f"a normal client with the log pipe full: {took:.3f} s")
    assert result == "still serving" and took < 5, f"a normal client took {took:.2f} s with the log pipe full"

    # 2. past pgfast's queue of messages waiting for the writer (10000): some are dropped now
    answered = bad_startups(server.port, 9000)
    assert answered == 9000, f"only {answered} of 9000 bad startup packets were answered"
    result, took = server.query("select 'still serving'", 5)
    print(f"a normal client with the log queue overflowing: {took:.3f} s")
    assert result == "still serving" and took < 5, f"a normal client took {took:.2f} s with the log queue full"
    assert server.process.poll() is None, "pgfast exited"

    # 3. read the log again: pgfast says what it dropped
    server.drain()
    assert wait_until(lambda: b"log messages were dropped" in server.output, 30), \
        f"no 'log messages were dropped' line in {len(server.output)} bytes of log"
    log = server.finish()
    line = re.search(r"\] LOG:  (\d+) log messages were dropped[^\n]*", log)
    print(line[0])
    assert log.count("FATAL:  invalid length of startup packet") + int(line[1]) >= 12000
    assert_clean_log(log)


def test_a_query_postgresql_logs_is_answered_while_the_log_pipe_is_full(data_dir, scratch, client_env, servers):
    server = UnreadLog(servers, data_dir, scratch, client_env)
    server.fill()
    try:
        with pytest.raises(psycopg.errors.DivisionByZero):
            result, took = server.query("select 1/0", 5)
            print(f"select 1/0 with the log pipe full: no answer within {took:.1f} s")
    finally:
        log = server.finish()
    assert_clean_log(log)


def test_fast_shutdown_while_the_log_pipe_is_full(data_dir, scratch, client_env, servers):
    server = UnreadLog(servers, data_dir, scratch, client_env)
    server.fill()
    signalled = time.monotonic()
    server.process.send_signal(FAST_SHUTDOWN)
    try:
        status = server.process.wait(10)
    except subprocess.TimeoutExpired:
        status = None
    took = time.monotonic() - signalled
    log = server.finish()       # reads the pipe: now it exits
    print(f"{FAST_SHUTDOWN.name} with the log pipe full: {'exited ' + str(status) if status is not None else 'still running'} "
          f"after {took:.1f} s; {time.monotonic() - signalled:.1f} s once the pipe was read")
    assert status == 0, f"pgfast still ran {took:.1f} s after {FAST_SHUTDOWN.name}, its log pipe full"
    assert_clean_log(log)


# ---------------------------------------------------------------- 5b. a login while the catalog session opens

def raw_tls_client(port: int) -> RawClient:
    """Connected, SSLRequest answered, TLS handshake done: pgfast waits for the startup packet."""
    return RawClient.connect(port, tls=tls_context(), timeout=15)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_login_while_the_catalog_session_opens(data_dir, scratch, client_env, servers):
    # every PostgreSQL session takes 2 s to start: the catalog session's opening can be caught
    server = start(servers, data_dir, scratch, client_env, "-c", "post_auth_delay=2")
    first, second = raw_tls_client(server.port), raw_tls_client(server.port)
    frozen = False
    try:
        first.startup(user="postgres", database="postgres")   # pgfast opens its catalog session for it
        time.sleep(0.5)
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            time.sleep(2.5)                # the catalog backend's ReadyForQuery waits in pgfast's socket
            second.startup(user="postgres", database="postgres")     # and so does this login
            time.sleep(0.2)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        cpu_before = cpu_seconds(server.process.pid)
        served = Background(lambda: (first.authenticate(), second.authenticate()), "the two logins")
        served._thread.join(10)
        frozen = served._thread.is_alive()
        busy = cpu_seconds(server.process.pid) - cpu_before
        print(f"\nafter SIGCONT: {'no login served within 10 s' if frozen else 'both logins served'}; "
              f"pgfast used {busy:.1f} s of CPU")
        assert not frozen, f"pgfast served neither login within 10 s (and used {busy:.1f} s of CPU: a busy loop)"
        assert served.error is None, describe(served.error)
        assert first.query("select 'served'") == [("served",)] and second.query("select 1") == [("1",)]
    finally:
        first.close()
        second.close()
        if frozen:
            server.process.kill()       # SIGTERM cannot reach an event loop that never runs
    assert server.stop() == 0, server.log
    assert_clean_log(server.log)


# ---------------------------------------------------------------- 6. -c settings reach PostgreSQL

@pytest.mark.parametrize("name, value", [
    # max_connections counts clients: PostgreSQL gets room for pgfast's own catalog session
    # (one per worker; this server has one) on top, as the README says
    ("max_connections", "151"),
    ("authentication_timeout", "7s"),
])
def test_command_line_settings_reach_postgresql(data_dir, scratch, client_env, servers, name, value):
    server = start(servers, data_dir, scratch, client_env,
                   "-c", "max_connections=150", "-c", "authentication_timeout=7s")
    with connect(server) as conn:
        shown = conn.execute(f"show {name}").fetchone()[0]
    assert server.stop() == 0, server.log
    assert shown == value, f"-c {name}, but PostgreSQL says {name} = {shown} (expected {value})"


# ---------------------------------------------------------------- 7. DROP DATABASE postgres

def password_login(server: Pgfast, dbname: str) -> str:
    with connect(server, user="pwuser", password="pw-secret", dbname=dbname) as conn:
        return conn.execute("select current_user || '@' || current_database()").fetchone()[0]


POOL_MODES = ["session", "transaction"]


@pytest.mark.parametrize("pool_mode", POOL_MODES)
def test_drop_database_postgres_keeps_password_logins(data_dir, scratch, client_env, servers, pool_mode):
    server = start(servers, data_dir, scratch, client_env, "-c", f"pgfast.pool_mode={pool_mode}")
    with connect(server) as conn:
        conn.execute("create role pwuser login password 'pw-secret'")
        conn.execute("create database other")
    assert password_login(server, "other") == "pwuser@other"     # the catalog session is on postgres now

    with connect(server, dbname="template1") as conn:
        conn.execute("drop database postgres")
    assert password_login(server, "other") == "pwuser@other"
    assert password_login(server, "template1") == "pwuser@template1"

    with connect(server, dbname="template1") as conn:
        conn.execute("create database postgres")
    assert password_login(server, "postgres") == "pwuser@postgres"
    assert query_value(server, "select current_database()") == "postgres"
    assert server.stop() == 0, server.log
    assert_clean_log(server.log)


# ---------------------------------------------------------------- 7b. transaction pooling: PostgreSQL refuses a backend

def test_transaction_pool_client_gets_postgresqls_refusal(data_dir, scratch, client_env, servers):
    server = start(servers, data_dir, scratch, client_env, "-c", "pgfast.pool_mode=transaction",
                   "-c", "pgfast.query_wait_timeout=5")
    with connect(server) as conn:
        conn.execute("create database doomed")
    client = connect(server, dbname="doomed")
    assert client.execute("select current_database()").fetchone()[0] == "doomed"
    with connect(server) as conn:
        conn.execute("drop database doomed with (force)")   # the client holds no backend between transactions
    try:
        job = Background(lambda: client.execute("select 1"), "the client's next query").join(8)
    finally:
        client.close()
    # PostgreSQL's own refusal (FATAL 3D000), as a client of PostgreSQL itself would get it
    assert isinstance(job.error, psycopg.Error) and (
        getattr(job.error, "sqlstate", None) == "3D000" or 'database "doomed" does not exist' in str(job.error)), \
        f"the client's next query got {describe(job.error)}"
    assert server.stop() == 0, server.log
    assert_clean_log(server.log)


# ---------------------------------------------------------------- 8. md5 with a password that is not UTF-8

def test_md5_password_message_not_utf8(data_dir, scratch, client_env, servers):
    server = start(servers, data_dir, scratch, client_env)
    with connect(server) as conn:
        conn.execute("set password_encryption = 'md5'")
        conn.execute("create role md5user login password 'md5-secret'")
        assert conn.execute("select rolpassword from pg_authid where rolname = 'md5user'").fetchone()[0] \
            .startswith("md5")
    mark = len(server.lines)
    raw = RawClient.connect(server.port, tls=tls_context())
    try:
        raw.startup(user="md5user", database="postgres")
        msg_type, payload = raw.read_message()
        assert (msg_type, struct.unpack_from("!i", payload)[0]) == (b"R", 5), (msg_type, payload)
        password = b"\xff\xfe\x80secretbytes\0"
        raw.send(b"p" + struct.pack("!I", len(password) + 4) + password)
        msg_type, payload = raw.read_message()
        assert msg_type == b"E", (msg_type, payload)
        fields = error_fields(payload)
        assert (fields.get("S"), fields.get("C"), fields.get("M")) == \
            ("FATAL", "28P01", 'password authentication failed for user "md5user"'), fields
        assert raw.closed_by_server(), "the connection stayed open after the failure"
    finally:
        raw.close()
    server.wait_for('FATAL:  password authentication failed for user "md5user"', 5)
    # the right password still works (the bad one broke nothing)
    ok = RawClient.connect(server.port, tls=tls_context())
    ok.startup(user="md5user", database="postgres")
    ok.authenticate(password="md5-secret")
    assert ok.query("select current_user") == [("md5user",)]
    ok.terminate()
    assert server._reader.is_alive(), "the log could not be read (not text)"
    log = "".join(server.lines[mark:])
    assert "secretbytes" not in log, log
    assert "\\xff" not in log and "\ufffd" not in log, log
    assert_clean_log(log)
    assert server.stop() == 0, server.log
