"""pgfast.workers: several processes share the listening port (SO_REUSEPORT), and what
PgBouncer's so_reuseport workaround lacks holds: limits are global, a cancel that lands
on another worker reaches the right backend, and a worker that dies is started again
without its neighbours' clients noticing."""
from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time

import psycopg
import pytest

import certs
from conftest import Pgfast, tls_server
from rawclient import RawClient, error_fields, query_message

HBA = "local all all trust\nhost all all 127.0.0.1/32 trust\n"


def start(template_cluster, module_dir, env, ca, name: str, conf: str) -> Pgfast:
    return tls_server(template_cluster, module_dir, f"w-{name}-", ca, HBA, "pgfast.workers = 2\n" + conf, env).start()


@pytest.fixture(scope="module")
def ca():
    return certs.CA("pgfast workers CA")


@pytest.fixture
def make(template_cluster, module_dir, module_env, ca):
    started = []

    def make_server(name: str, conf: str = "") -> Pgfast:
        server = start(template_cluster, module_dir, module_env, ca, name, conf)
        started.append(server)
        return server

    yield make_server
    for server in started:
        server.stop()
        assert "Traceback" not in server.log, server.log


def connect(server: Pgfast, **params) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=server.port, dbname="postgres", user="postgres",
                           sslmode="require", connect_timeout=10, autocommit=True, **params)


def worker_pids(server: Pgfast) -> list[int]:
    """The workers: children of pgfast's own process that are not PostgreSQL."""
    parent = server.process.pid
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if int(fields[1]) == parent and not os.path.basename(cmdline.split(b"\0")[0]).startswith(b"postgres"):
            pids.append(int(entry))
    return sorted(pids)


def spread_connections(server: Pgfast, count: int, **params) -> list:
    """count connections, or the error of each that was refused."""
    out = []
    for _ in range(count):
        try:
            out.append(connect(server, **params))
        except psycopg.OperationalError as exc:
            out.append(exc)
    return out


def test_two_workers_serve(make):
    server = make("serve")
    assert len(worker_pids(server)) == 2
    for conn in spread_connections(server, 10):
        assert conn.execute("select 1").fetchone() == (1,)
        conn.close()


@pytest.mark.parametrize("mode,conf", [("transaction", "pgfast.pool_mode = transaction\npgfast.max_client_conn = 6"),
                                       ("session", "max_connections = 9")])
def test_the_client_limit_holds_across_workers(make, mode, conf):
    server = make(f"limit-{mode}", conf)
    limit = 6 if mode == "transaction" else 9
    results = spread_connections(server, limit + 6)
    admitted = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(admitted) == limit, [str(r) for r in refused]
    assert all("sorry, too many clients already" in str(r) for r in refused)
    for conn in admitted:
        conn.close()
    time.sleep(0.3)
    again = spread_connections(server, limit)
    assert not [r for r in again if isinstance(r, Exception)]        # the places came back
    for conn in again:
        conn.close()


def test_the_pool_size_holds_across_workers(make):
    """Three backends for sixteen busy clients spread over two workers, and a seventeenth
    logging in: the limit holds across workers, and no worker's clients starve (a worker
    whose own clients keep every backend busy gives one back when another's wait)."""
    server = make("poolsize", "pgfast.pool_mode = transaction\npgfast.pool_size = 3")
    stop = threading.Event()
    errors = []
    done = [0] * 16

    def busy(i: int):
        try:
            with connect(server) as conn:
                while not stop.is_set():
                    conn.execute("select pg_sleep(0.005)")
                    done[i] += 1
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=busy, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    peak = 0
    with psycopg.connect(host=server.socket_dir, port=server.port, dbname="postgres", user="postgres",
                         autocommit=True, connect_timeout=10) as watch:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            (count,) = watch.execute("select count(*) from pg_stat_activity where backend_type = 'client backend' "
                                     "and application_name <> 'pgfast' and pid <> pg_backend_pid()").fetchone()
            peak = max(peak, count)
            time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert all(done), f"clients that never got a backend: {[i for i, n in enumerate(done) if not n]}"
    # the watcher's own session is pooled too: it may hold one of the three
    assert 0 < peak <= 3


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_cancel_landing_on_another_worker_reaches_its_backend(make, mode):
    server = make(f"cancel-{mode}", f"pgfast.pool_mode = {mode}")
    sessions = []
    for _ in range(8):
        c = RawClient.connect(server.port)
        c.startup(user="postgres", database="postgres")
        c.authenticate()
        c.send(query_message("select pg_sleep(30)"))
        sessions.append(c)
    time.sleep(0.3)
    for c in sessions:
        for _ in range(1):      # a new connection each, spread over the workers by the kernel
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                s.sendall(struct.pack("!iiiI", 16, 80877102, *c.backend_key))
                s.recv(1)
    for c in sessions:
        got = c.read_until_ready()
        errors = [error_fields(p) for t, p in got if t == b"E"]
        assert errors and errors[0]["C"] == "57014", got
        c.terminate()


def test_a_worker_that_dies_is_started_again(make):
    server = make("restart", "pgfast.pool_mode = transaction\npgfast.max_client_conn = 8")
    before = worker_pids(server)
    conns = [c for c in spread_connections(server, 8) if not isinstance(c, Exception)]
    assert len(conns) == 8
    os.kill(before[0], signal.SIGKILL)
    server.wait_for(f"(PID {before[0]}) was terminated by signal 9: Killed; starting it again", timeout=10)
    alive, lost = 0, 0
    for conn in conns:
        try:
            conn.execute("select 1")
            alive += 1
        except psycopg.OperationalError:
            lost += 1
        conn.close()
    assert alive and lost, (alive, lost)       # the dead worker's clients lost theirs, the others did not
    deadline = time.monotonic() + 10
    while len(worker_pids(server)) != 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    # what the dead worker held came back: the whole limit is available again
    again = spread_connections(server, 8)
    assert not [r for r in again if isinstance(r, Exception)], again
    for conn in again:
        conn.close()


def test_sigterm_stops_every_worker(make):
    server = make("stop")
    workers = worker_pids(server)
    assert server.stop() == 0
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
