"""pg_ctl's verbs for pgfast (start, stop -m smart|fast|immediate, reload, status), their
messages and exit codes, the pid file beside postmaster.pid, and PostgreSQL's three
shutdown modes as the signals pg_ctl sends (SIGTERM, SIGINT, SIGQUIT)."""
from __future__ import annotations

import os
import signal
import tempfile
import time

import psycopg
import pytest

from conftest import append_conf, free_port, run_pgfast
from pgfast.pidfile import alive


@pytest.fixture
def served(cluster, scratch, client_env):
    """A data directory and how to start pgfast on it with `pgfast start`; whatever is
    still running at the end is stopped fast."""
    socket_dir = tempfile.mkdtemp(prefix="s-", dir=scratch)
    os.chmod(socket_dir, 0o777)
    port = free_port()
    logfile = os.path.join(scratch, "server.log")

    def start(*extra: str, workers: int = 1):
        append_conf(cluster, f"pgfast.workers = {workers}")
        return run_pgfast("start", "-D", cluster, "-l", logfile, "-o",
                          f"-p {port} -c unix_socket_directories={socket_dir} {' '.join(extra)}", env=client_env)

    served = {"data": cluster, "port": port, "log": logfile, "start": start,
              "dsn": f"host=127.0.0.1 port={port} dbname=postgres user=postgres connect_timeout=10"}
    yield served
    if os.path.exists(os.path.join(cluster, "pgfast.pid")):
        run_pgfast("stop", "-D", cluster, "-m", "immediate", env=client_env)


def log_of(served) -> str:
    with open(served["log"]) as f:
        return f.read()


def pid_file(data: str) -> list[str]:
    with open(os.path.join(data, "pgfast.pid")) as f:
        return f.read().splitlines()


def test_start_status_reload_stop(served, client_env):
    data = served["data"]
    assert run_pgfast("status", "-D", data, env=client_env).returncode == 3
    started = served["start"]()
    assert started.returncode == 0, started.stderr + log_of(served)
    assert started.stdout.endswith("done\nserver started\n")
    lines = pid_file(data)
    assert lines[1] == data and lines[3] == str(served["port"]) and lines[7] == "ready"
    assert os.path.exists(f"/proc/{lines[6]}"), "line 7 is PostgreSQL's pid"

    status = run_pgfast("status", "-D", data, env=client_env)
    assert status.returncode == 0
    assert status.stdout.startswith(f"pgfast: server is running (PID: {lines[0]})\n")
    with psycopg.connect(served["dsn"]) as conn:
        assert conn.execute("select 1").fetchone() == (1,)

    reloaded = run_pgfast("reload", "-D", data, env=client_env)
    assert (reloaded.returncode, reloaded.stdout) == (0, "server signaled\n")
    deadline = time.monotonic() + 10
    while "received SIGHUP, reloading configuration files" not in log_of(served):
        assert time.monotonic() < deadline, log_of(served)
        time.sleep(0.05)

    again = served["start"]()
    assert again.returncode == 1
    assert "pgfast: another server might be running; trying to start server anyway" in again.stderr
    assert 'lock file "pgfast.pid" already exists' in log_of(served)

    stopped = run_pgfast("stop", "-D", data, env=client_env)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.endswith("done\nserver stopped\n")
    assert not os.path.exists(os.path.join(data, "pgfast.pid"))
    assert not os.path.exists(os.path.join(data, "postmaster.pid"))
    assert run_pgfast("status", "-D", data, env=client_env).returncode == 3


def test_verbs_without_a_server(served, client_env, scratch):
    data = served["data"]
    for verb in ("stop", "reload"):
        result = run_pgfast(verb, "-D", data, env=client_env)
        assert result.returncode == 1
        assert result.stderr == f'pgfast: PID file "{data}/pgfast.pid" does not exist\nIs server running?\n'
    missing = os.path.join(scratch, "nowhere")
    result = run_pgfast("status", "-D", missing, env=client_env)
    assert (result.returncode, result.stderr) == (4, f'pgfast: directory "{missing}" does not exist\n')
    result = run_pgfast("status", "-D", scratch, env=client_env)
    assert (result.returncode, result.stderr) == (4, f'pgfast: directory "{scratch}" is not a database '
                                                     'cluster directory\n')
    result = run_pgfast("stop", "-D", data, "-m", "gently", env=client_env)
    assert (result.returncode, result.stderr) == (1, 'pgfast: unrecognized shutdown mode "gently"\n')


def test_start_that_fails_says_so(served, client_env):
    append_conf(served["data"], "ssl = on")      # and no server.crt
    started = served["start"]()
    assert started.returncode == 1
    assert started.stderr.endswith("pgfast: could not start server\nExamine the log output.\n")
    assert 'could not load server certificate file' in log_of(served)
    assert not os.path.exists(os.path.join(served["data"], "pgfast.pid"))


@pytest.mark.parametrize("workers", [1, 2])
def test_smart_waits_for_sessions(served, client_env, workers):
    """New sessions are refused with 57P03, open ones carry on until their clients leave;
    then pgfast and PostgreSQL stop."""
    data = served["data"]
    assert served["start"](workers=workers).returncode == 0, log_of(served)
    pid = int(pid_file(data)[0])
    session = psycopg.connect(served["dsn"], autocommit=True)
    session.execute("create table kept (n int)")
    waited = run_pgfast("stop", "-D", data, "-m", "smart", "-t", "2", env=client_env)
    assert waited.returncode == 1
    assert waited.stderr == ('pgfast: server does not shut down\nHINT: The "-m fast" option immediately '
                             'disconnects sessions rather than\nwaiting for session-initiated disconnection.\n')
    assert pid_file(data)[7] == "stopping"
    for _ in range(workers * 3):       # whichever worker takes it
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(served["dsn"])
        assert "the database system is shutting down" in str(refused.value)
    session.execute("insert into kept values (1)")
    assert session.execute("select count(*) from kept").fetchone() == (1,)
    session.close()
    deadline = time.monotonic() + 20
    while alive(pid):
        assert time.monotonic() < deadline, f"pgfast still runs after its last client left:\n{log_of(served)}"
        time.sleep(0.05)
    assert "received smart shutdown request" in log_of(served)
    assert not os.path.exists(os.path.join(data, "pgfast.pid"))


def test_fast_ends_sessions(served, client_env):
    data = served["data"]
    assert served["start"]().returncode == 0, log_of(served)
    session = psycopg.connect(served["dsn"])
    session.execute("create table t (n int)")      # inside a transaction that never commits
    stopped = run_pgfast("stop", "-D", data, "-m", "fast", env=client_env)
    assert stopped.returncode == 0, stopped.stderr
    with pytest.raises(psycopg.OperationalError) as ended:
        session.execute("select 1")
    assert ended.value.sqlstate == "57P01" or "terminating connection due to administrator command" in str(ended.value)
    assert "received fast shutdown request" in log_of(served)
    assert served["start"]().returncode == 0
    with psycopg.connect(served["dsn"]) as conn:
        assert conn.execute("select to_regclass('t')").fetchone() == (None,), "uncommitted DDL survived"


@pytest.mark.parametrize("workers", [1, 2])
def test_immediate(served, client_env, workers):
    data = served["data"]
    assert served["start"](workers=workers).returncode == 0, log_of(served)
    with psycopg.connect(served["dsn"], autocommit=True) as conn:
        conn.execute("create table durable (n int); insert into durable values (7)")
    session = psycopg.connect(served["dsn"])
    stopped = run_pgfast("stop", "-D", data, "-m", "immediate", env=client_env)
    assert stopped.returncode == 0, stopped.stderr
    with pytest.raises(psycopg.OperationalError):
        session.execute("select 1")
    log = log_of(served)
    assert "received immediate shutdown request" in log
    assert not os.path.exists(os.path.join(data, "postmaster.pid")) or "database system is shut down" not in log
    started = served["start"](workers=workers)
    assert started.returncode == 0, log_of(served)
    assert "database system was interrupted" in log_of(served)      # PostgreSQL recovered
    with psycopg.connect(served["dsn"]) as conn:
        assert conn.execute("select n from durable").fetchone() == (7,)


def test_signals_escalate(served, client_env):
    """A smart shutdown waiting for a session becomes fast on SIGINT."""
    data = served["data"]
    assert served["start"]().returncode == 0, log_of(served)
    pid = int(pid_file(data)[0])
    session = psycopg.connect(served["dsn"])
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    assert session.execute("select 1").fetchone() == (1,)
    stopped = run_pgfast("stop", "-D", data, "-m", "fast", env=client_env)
    assert stopped.returncode == 0, stopped.stderr
    with pytest.raises(psycopg.OperationalError):
        session.execute("select 1")
    log = log_of(served)
    assert log.index("received smart shutdown request") < log.index("received fast shutdown request")


def test_killed_pgfast_leaves_a_stale_pid_file_that_start_replaces(served, client_env):
    data = served["data"]
    assert served["start"]().returncode == 0, log_of(served)
    lines = pid_file(data)
    os.kill(int(lines[0]), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while alive(int(lines[6])):      # its PostgreSQL stops (PDEATHSIG)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert run_pgfast("status", "-D", data, env=client_env).returncode == 3
    started = served["start"]()
    assert started.returncode == 0, log_of(served)
    assert pid_file(data)[0] != lines[0]
