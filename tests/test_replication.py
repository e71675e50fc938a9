"""Replication clients through pgfast over TLS: pg_basebackup with WAL streaming, which
reads the replication stream with libpq's asynchronous reader and so depends on TLS
records no larger than PostgreSQL's own (8192 bytes of plaintext)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

import certs
from conftest import tls_server

HBA = ("local all all trust\nlocal replication all trust\n"
       "hostssl all all 127.0.0.1/32 trust\nhostssl replication all 127.0.0.1/32 trust\n")
RUNS = 20


@pytest.fixture(scope="module")
def server(template_cluster, module_dir, module_env):
    ca = certs.CA("pgfast replication test CA")
    pgfast = tls_server(template_cluster, module_dir, "repl-", ca, HBA, "max_wal_senders = 10", module_env).start()
    yield pgfast
    pgfast.stop()
    assert "Traceback" not in pgfast.log, pgfast.log


def _major(bindir: str) -> str:
    out = subprocess.run([os.path.join(bindir, "pg_config"), "--version"], capture_output=True, text=True).stdout
    return out.split()[1].split(".")[0]


def test_pg_basebackup_with_wal_streaming_over_tls(server, bindir, server_bindir, module_dir, module_env):
    """WAL is written all through each backup, so the stream ends with WAL data, CopyDone,
    CommandComplete and ReadyForQuery close behind each other: the case that once hung."""
    if _major(bindir) != _major(server_bindir):
        pytest.skip("pg_basebackup takes only its own major version (the server's own has no TLS)")
    psql = [os.path.join(bindir, "psql"), "-X", "-q", "-h", server.socket_dir, "-p", str(server.port),
            "-U", "postgres", "-d", "postgres"]
    subprocess.run(psql + ["-c", "create table filler as select g, repeat('x', 200) v "
                                 "from generate_series(1, 50000) g"], check=True, env=module_env)
    writer = subprocess.Popen(psql + ["-c", "do $$ begin for i in 1..100000 loop "
                                            "insert into filler values (i, repeat('y', 300)); commit; "
                                            "perform pg_sleep(0.0005); end loop; end $$"],
                              env=module_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _backups(server, bindir, module_dir, module_env)
    finally:
        writer.kill()
        writer.wait()


def _backups(server, bindir, module_dir, module_env):
    for run in range(RUNS):
        target = tempfile.mkdtemp(prefix=f"backup{run}-", dir=module_dir)
        try:
            result = subprocess.run(
                [os.path.join(bindir, "pg_basebackup"), "-X", "stream", "-v", "-c", "fast", "-D", target,
                 "-d", f"host=127.0.0.1 port={server.port} user=postgres sslmode=require"],
                capture_output=True, text=True, timeout=60, env=module_env, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"pg_basebackup hung on run {run}:\n{exc.stderr}")
        assert result.returncode == 0, f"run {run}: {result.stderr}"
        assert "base backup completed" in result.stderr
        assert os.path.exists(os.path.join(target, "PG_VERSION"))
        shutil.rmtree(target)
