"""Prometheus metrics (pgfast.metrics_listen) against a real pgfast with two workers: scraped
while pgbench runs through it, the counters must tell what the run did (one handshake,
one SCRAM login and one accepted connection per pgbench connection; one transaction and
one pool wait per pgbench transaction under transaction pooling), and failures must be
counted under their reasons."""
from __future__ import annotations

import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.request

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

import certs
from conftest import Pgfast, append_conf, free_port, run_pgfast, tls_server

HBA = """\
local all all trust
hostssl all postgres 127.0.0.1/32 trust
hostssl all app 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 reject
"""
PASSWORD = "app-secret"


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def ca() -> certs.CA:
    return certs.CA("pgfast metrics CA")


@pytest.fixture(scope="module")
def server(template_cluster, module_dir, module_env, ca, bindir):
    metrics_port = free_port()
    pgfast = tls_server(template_cluster, module_dir, "metrics-", ca, HBA,
                        f"ssl_min_protocol_version = 'TLSv1.3'\npgfast.workers = 2\n"
                        f"pgfast.metrics_listen = '127.0.0.1:{metrics_port}'", module_env).start()
    pgfast.metrics_port = metrics_port
    with psycopg.connect(host=pgfast.socket_dir, port=pgfast.port, dbname="postgres", user="postgres",
                         autocommit=True) as conn:
        conn.execute(f"create role app login password '{PASSWORD}'")
        conn.execute("alter role app set pgfast.pool_mode = transaction")
        conn.execute("grant all on schema public to app")
    init = pgbench(bindir, pgfast, module_env, "app", "-i", "-s", "1", "-q")
    assert init.returncode == 0, init.stderr
    yield pgfast
    assert pgfast.stop() == 0, pgfast.log
    assert "Traceback" not in pgfast.log, pgfast.log


def pgbench(bindir: str, server: Pgfast, env: dict, user: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(env, PGHOST="127.0.0.1", PGPORT=str(server.port), PGUSER=user, PGDATABASE="postgres",
               PGSSLMODE="require", PGPASSWORD=PASSWORD)
    return subprocess.run([os.path.join(bindir, "pgbench"), *args], capture_output=True, text=True,
                          timeout=120, env=env, stdin=subprocess.DEVNULL)


def test_counters_tell_what_a_pgbench_run_did(server, bindir, module_env):
    before = scrape(server.metrics_port)
    scrapes: list[dict] = []
    running = threading.Event()
    running.set()

    def keep_scraping():
        while running.is_set():
            scrapes.append(scrape(server.metrics_port))
            time.sleep(0.05)

    scraper = threading.Thread(target=keep_scraping)
    scraper.start()
    try:
        # -C: a new TLS connection and SCRAM login for every transaction
        run = pgbench(bindir, server, module_env, "app", "-n", "-C", "-c", "4", "-j", "2", "-t", "25", "-S")
    finally:
        running.clear()
        scraper.join()
    assert run.returncode == 0, run.stderr
    assert "number of transactions actually processed: 100/100" in run.stdout, run.stdout
    after = scrape(server.metrics_port)

    assert len(scrapes) >= 2, "no scrape while pgbench ran"
    for earlier, later in zip([before, *scrapes], [*scrapes, after]):
        for key, count in earlier.items():
            if key[0].endswith(("_total", "_count", "_bucket", "_sum")):
                assert later.get(key, 0) >= count, f"{key} went down during the run"

    logins = delta(before, after, "pgfast_authentications_total", method="scram-sha-256", result="ok")
    # pgbench -C: a connection per transaction, and one at its start to look at the tables
    assert 100 <= logins <= 101, logins
    assert delta(before, after, "pgfast_tls_handshakes_total", version="TLSv1.3") == logins
    assert delta(before, after, "pgfast_client_connections_total", transport="tcp") == logins
    assert delta(before, after, "pgfast_tls_handshake_seconds_count") == logins
    assert delta(before, after, "pgfast_authentication_seconds_count", method="scram-sha-256") == logins
    assert delta(before, after, "pgfast_authentications_total", method="scram-sha-256", result="failed") == 0
    # under transaction pooling every transaction waited for a backend and gave it back
    transactions = delta(before, after, "pgfast_transaction_seconds_count")
    assert transactions >= 100, transactions
    assert delta(before, after, "pgfast_pool_wait_seconds_count", pool_mode="transaction") >= 100
    assert delta(before, after, "pgfast_transaction_seconds_bucket", le="+Inf") == transactions
    assert delta(before, after, "pgfast_transaction_seconds_sum") > 0
    assert value(after, "pgfast_workers") == 2

    def settled() -> dict:
        samples = scrape(server.metrics_port)
        open_ = sum(v for (name, _labels), v in samples.items() if name == "pgfast_client_connections")
        return samples if open_ == 0 and value(samples, "pgfast_tls_connections", version="TLSv1.3") == 0 else None

    deadline = time.monotonic() + 10
    while (last := settled()) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert last is not None, "connection gauges did not come back to 0 after the run"


def test_session_clients_are_gauged_by_state(server):
    with psycopg.connect(host="127.0.0.1", port=server.port, dbname="postgres", user="postgres",
                         sslmode="require") as conn:
        conn.execute("select 1")
        samples = scrape(server.metrics_port)
        assert value(samples, "pgfast_client_connections", state="relaying") >= 1
        assert value(samples, "pgfast_tls_connections", version="TLSv1.3") >= 1
        assert value(samples, "pgfast_backends") >= 1
        assert value(samples, "pgfast_pool_wait_seconds_count", pool_mode="session") >= 1


def test_failures_are_counted_by_reason(server, ca):
    before = scrape(server.metrics_port)
    # TLS 1.2 at most against ssl_min_protocol_version = TLSv1.3
    old = ssl.create_default_context(cafile=None)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
        assert sock.recv(1) == b"S"
        with pytest.raises(ssl.SSLError):
            old.wrap_socket(sock).close()
    # plaintext behind the SSLRequest, in the same packet
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f" + b"\x00\x00\x00\x08\x00\x03\x00\x00")
        sock.recv(1024)
    # a wrong password, and a role pg_hba.conf rejects
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host="127.0.0.1", port=server.port, dbname="postgres", user="app",
                        password="wrong", sslmode="require")
    with pytest.raises(psycopg.OperationalError, match="no pg_hba.conf entry|rejects connection"):
        psycopg.connect(host="127.0.0.1", port=server.port, dbname="postgres", user="nobody", sslmode="disable")

    def counted() -> dict | None:
        after = scrape(server.metrics_port)
        checks = [delta(before, after, "pgfast_tls_handshake_failures_total", reason="protocol_version"),
                  delta(before, after, "pgfast_tls_handshake_failures_total", reason="unencrypted_data"),
                  delta(before, after, "pgfast_authentications_total", method="scram-sha-256", result="failed"),
                  delta(before, after, "pgfast_authentications_total", method="none", result="failed")]
        return checks if all(c == 1 for c in checks) else None

    deadline = time.monotonic() + 5
    while counted() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    after = scrape(server.metrics_port)
    assert counted() is not None, {k: v for k, v in after.items() if "failure" in k[0] or "authentications" in k[0]}


def test_a_bad_metrics_listen_is_refused_at_start(cluster):
    append_conf(cluster, "pgfast.metrics_listen = 'localhost'")
    result = run_pgfast("run", "-D", cluster)
    assert result.returncode == 1
    assert 'invalid value for parameter "pgfast.metrics_listen": "localhost"' in result.stderr, result.stderr
