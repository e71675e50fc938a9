"""The admin console (dbname=pgfast): PgBouncer's SHOW commands and column names across
every worker, RELOAD, PAUSE/RESUME and KILL, for pgfast.console_users; SHOW only for
pgfast.stats_users; nobody else."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time

import psycopg
import pytest

import certs
from conftest import append_conf, psql_script, tls_server, wait_until

HBA = ("local all all trust\n"
       "hostssl all all 127.0.0.1/32 trust\n")
ROLES = ("create role admin login; create role watcher login; create role nobody login;\n"
         "create role app login; create database app owner app;\n")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = certs.CA("console CA")
    client_dir = tmp_path_factory.mktemp("console-client")
    alice = ca.client_cert("alice")
    certs.write(client_dir / "alice.crt", alice.cert_pem(), 0o644)
    certs.write(client_dir / "alice.key", alice.key_pem(), 0o600)
    certs.write(client_dir / "root.crt", ca.cert_pem(), 0o644)
    return {"ca": ca, "dir": str(client_dir)}


def start(template_cluster, scratch_root, client_env, bindir, pki, conf: str):
    server = tls_server(template_cluster, scratch_root, "console-", pki["ca"], HBA,
                        "pgfast.console_users = 'admin'\npgfast.stats_users = 'watcher'\n" + conf, client_env)
    certs.write(os.path.join(server.data_dir, "root.crt"), pki["ca"].cert_pem(), 0o644)
    os.chown(os.path.join(server.data_dir, "root.crt"), *_owner(server.data_dir))
    server.start()
    created = psql_script(bindir, server, ROLES, client_env)
    assert created.returncode == 0, created.stderr
    return server


def _owner(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid


@pytest.fixture(scope="module")
def console_server(template_cluster, scratch_root, module_env, bindir, pki):
    """Two workers, transaction pooling: a console on either must see both."""
    server = start(template_cluster, scratch_root, module_env, bindir, pki,
                   "pgfast.workers = 2\npgfast.pool_mode = transaction\n")
    yield server
    server.stop()
    assert "Traceback" not in server.log, server.log


def connect(server, pki, user: str = "app", dbname: str = "app", **params) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=server.port, user=user, dbname=dbname, sslmode="verify-ca",
                           sslrootcert=os.path.join(pki["dir"], "root.crt"), connect_timeout=10, autocommit=True,
                           **params)


_LAST_LOG = []


def console(bindir, server, pki, sql: str, env, user: str = "admin") -> subprocess.CompletedProcess:
    dsn = server.dsn(user=user, dbname="pgfast", sslmode="verify-ca",
                     sslrootcert=os.path.join(pki["dir"], "root.crt"))
    result = subprocess.run([os.path.join(bindir, "psql"), "-X", "-A", "-F", "|", "-P", "footer=off",
                           "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", sql],
                          capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    time.sleep(0.2)
    _LAST_LOG[:] = [server.log[-3000:]]
    return result


def table(result: subprocess.CompletedProcess) -> list[dict[str, str]]:
    assert result.returncode == 0, result.stderr + (_LAST_LOG[0] if _LAST_LOG else "")
    lines = result.stdout.strip().splitlines()
    header = lines[0].split("|")
    return [dict(zip(header, line.split("|"))) for line in lines[1:]]


PGBOUNCER_CLIENT_COLUMNS = ["type", "user", "database", "state", "addr", "port", "local_addr", "local_port",
                            "connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr", "link",
                            "remote_pid", "tls", "application_name"]
PGBOUNCER_POOL_COLUMNS = ["database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used",
                          "sv_tested", "sv_login", "maxwait", "maxwait_us", "pool_mode"]


def test_show_clients_servers_and_pools_across_workers(bindir, console_server, pki, module_env):
    # SO_REUSEPORT spreads connections over the workers by their ports: with 24, both
    # workers get some but once in millions of runs
    clients = [connect(console_server, pki, application_name=f"app{i}") for i in range(24)]
    try:
        holder = clients[0]
        holder.execute("begin")
        pid = holder.execute("select pg_backend_pid()").fetchone()[0]
        rows = table(console(bindir, console_server, pki, "SHOW CLIENTS", module_env))
        assert list(rows[0])[:len(PGBOUNCER_CLIENT_COLUMNS)] == PGBOUNCER_CLIENT_COLUMNS
        apps = [row for row in rows if row["database"] == "app"]
        assert sorted(row["application_name"] for row in apps) == sorted(f"app{i}" for i in range(24))
        assert {row["worker"] for row in rows} == {"0", "1"}, "both workers' clients are shown"
        assert all(row["tls"].startswith("TLSv1.3/") and row["addr"] == "127.0.0.1" for row in apps)
        busy = [row for row in apps if row["state"] == "active"]
        assert [row["remote_pid"] for row in busy] == [str(pid)]
        servers = table(console(bindir, console_server, pki, "SHOW SERVERS", module_env))
        linked = [row for row in servers if row["remote_pid"] == str(pid)]
        assert len(linked) == 1 and linked[0]["state"] == "active" and linked[0]["link"] == busy[0]["ptr"]
        pools = table(console(bindir, console_server, pki, "SHOW POOLS", module_env))
        assert list(pools[0]) == PGBOUNCER_POOL_COLUMNS
        app = [row for row in pools if row["database"] == "app"]
        assert sum(int(row["cl_active"]) for row in app) == 24
        assert sum(int(row["sv_active"]) for row in app) == 1
        assert {row["pool_mode"] for row in app} == {"transaction"}
        databases = {row["name"]: row for row in table(console(bindir, console_server, pki, "SHOW DATABASES",
                                                                module_env))}
        assert databases["app"]["pool_mode"] == "transaction" and databases["app"]["paused"] == "0"
        assert int(databases["app"]["current_connections"]) >= 1
        lists = {row["list"]: int(row["items"]) for row in table(console(bindir, console_server, pki, "SHOW LISTS",
                                                                          module_env))}
        assert lists["used_clients"] >= 25 and lists["pools"] >= 1 and lists["databases"] >= 2
        workers = table(console(bindir, console_server, pki, "SHOW WORKERS", module_env))
        assert [row["worker"] for row in workers] == ["0", "1"]
        assert len({row["pid"] for row in workers}) == 2
        holder.execute("commit")
    finally:
        for conn in clients:
            conn.close()


def test_every_worker_answers_however_many_clients_it_has(bindir, console_server, pki, module_env):
    """A worker's snapshot of 600 clients is far past a line's 64 KiB: it still arrives whole."""
    sockets = [socket.create_connection(("127.0.0.1", console_server.port), timeout=10) for _ in range(600)]
    try:
        def all_shown() -> bool:
            rows = table(console(bindir, console_server, pki, "SHOW CLIENTS", module_env))
            waiting = [row for row in rows if row["state"] == "login"]
            return len(waiting) >= 600 and {row["worker"] for row in waiting} == {"0", "1"}
        assert wait_until(all_shown, 20), _LAST_LOG
    finally:
        for sock in sockets:
            sock.close()


def test_show_stats_counts_assignments(bindir, console_server, pki, module_env):
    before = {row["database"]: int(row["total_server_assignment_count"])
              for row in table(console(bindir, console_server, pki, "SHOW STATS", module_env))}
    with connect(console_server, pki) as conn:
        for _ in range(20):
            conn.execute("select 1")
    after = {row["database"]: int(row["total_server_assignment_count"])
             for row in table(console(bindir, console_server, pki, "SHOW STATS", module_env))}
    assert after["app"] - before.get("app", 0) >= 20


def test_show_tls_is_what_pg_stat_ssl_would_show(bindir, console_server, pki, module_env):
    with connect(console_server, pki, sslcert=os.path.join(pki["dir"], "alice.crt"),
                 sslkey=os.path.join(pki["dir"], "alice.key")):
        rows = table(console(bindir, console_server, pki, "SHOW TLS", module_env))
    alice = [row for row in rows if row["client_dn"] == "/CN=alice"]
    assert len(alice) == 1
    assert alice[0]["version"] == "TLSv1.3" and alice[0]["cipher"].startswith("TLS_")
    assert alice[0]["issuer_dn"] == "/CN=console CA" and int(alice[0]["client_serial"]) > 0
    assert alice[0]["alpn"] in ("", "postgresql")     # libpq 17 and later ask for ALPN
    assert alice[0]["sni"] == ""                       # libpq sends no server name for an address
    admin = [row for row in rows if row["database"] == "pgfast"]
    assert admin and admin[0]["client_dn"] == ""


def test_show_config_help_version(bindir, console_server, pki, module_env):
    config = {row["key"]: row for row in table(console(bindir, console_server, pki, "SHOW CONFIG", module_env))}
    assert config["pgfast.pool_mode"]["value"] == "transaction"
    assert config["pgfast.pool_mode"]["default"] == "session"
    assert config["pgfast.workers"]["changeable"] == "no"
    assert config["pgfast.pool_size"]["changeable"] == "yes"
    assert "SHOW HELP" in console(bindir, console_server, pki, "SHOW HELP", module_env).stdout
    assert "pgfast" in console(bindir, console_server, pki, "SHOW VERSION", module_env).stdout


def test_who_may_do_what(bindir, console_server, pki, module_env):
    assert table(console(bindir, console_server, pki, "SHOW POOLS", module_env, user="watcher"))
    refused = console(bindir, console_server, pki, "RELOAD", module_env, user="watcher")
    assert refused.returncode != 0 and "ERROR:  admin access needed" in refused.stderr
    refused = console(bindir, console_server, pki, "SHOW POOLS", module_env, user="nobody")
    assert refused.returncode != 0 and "FATAL:  not allowed" in refused.stderr
    # the server log names the client refused, and why (only there: the role is not listed)
    assert re.search(r"\] 127\.0\.0\.1\(\d+\) FATAL:  not allowed\n[^\n]*\] 127\.0\.0\.1\(\d+\) DETAIL:  "
                     r'Role "nobody" is not in pgfast\.console_users or pgfast\.stats_users\.', console_server.log)
    refused = console(bindir, console_server, pki, "SHOW POOLS", module_env, user="ghost")
    assert refused.returncode != 0 and 'FATAL:  role "ghost" does not exist' in refused.stderr
    wrong = console(bindir, console_server, pki, "SHOW NOTHING", module_env)
    assert wrong.returncode != 0 and "invalid command 'SHOW NOTHING', use SHOW HELP;" in wrong.stderr
    with psycopg.connect(console_server.dsn(user="admin", dbname="pgfast", sslmode="require"),
                         autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("SHOW POOLS %s", ["x"])       # parameters: the extended protocol
        assert conn.execute("SHOW VERSION").fetchone()[0].startswith("pgfast ")   # and the session goes on


def pause_behind(bindir, server, pki, env, holder: psycopg.Connection, command: str) -> subprocess.Popen:
    """holder in a transaction (so its backend is busy), then the PAUSE command, once it waits."""
    holder.execute("begin")
    holder.execute("select 1")
    paused = subprocess.Popen([os.path.join(bindir, "psql"), "-X", "-d",
                               server.dsn(user="admin", dbname="pgfast", sslmode="require"), "-c", command],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def pausing() -> bool:
        rows = table(console(bindir, server, pki, "SHOW DATABASES", env))
        return any(row["name"] == "app" and row["paused"] == "1" for row in rows)
    assert wait_until(pausing, 10), "the PAUSE did not begin"
    return paused


@pytest.mark.parametrize("pause, resumes", [
    ("PAUSE app", ["RESUME app"]),
    ("PAUSE", ["RESUME app", "RESUME"]),        # RESUME of one database leaves a PAUSE of all in force
], ids=["one", "all"])
def test_pause_waits_for_busy_backends_and_resume_lets_clients_go(bindir, console_server, pki, module_env,
                                                                  pause, resumes):
    holder, waiter = connect(console_server, pki), connect(console_server, pki)
    try:
        paused = pause_behind(bindir, console_server, pki, module_env, holder, pause)
        assert paused.poll() is None, "PAUSE returns only when no backend of the database is busy"
        answered = []
        thread = threading.Thread(target=lambda: answered.append(waiter.execute("select 42").fetchone()[0]))
        thread.start()
        holder.execute("commit")
        assert paused.wait(10) == 0, paused.stderr.read()
        for command in resumes:
            time.sleep(0.3)
            assert not answered, f"a paused database's clients wait (before {command})"
            assert console(bindir, console_server, pki, command, module_env).returncode == 0
        thread.join(10)
        assert answered == [42]
    finally:
        console(bindir, console_server, pki, "RESUME", module_env)
        holder.close()
        waiter.close()


def test_a_console_client_killed_during_a_pause_leaves_nothing_behind(bindir, console_server, pki, module_env):
    with connect(console_server, pki) as holder:
        paused = pause_behind(bindir, console_server, pki, module_env, holder, "PAUSE app")
        paused.kill()                                # psql gone for good, no cancel sent
        paused.wait(10)
        time.sleep(0.3)
        holder.execute("commit")
    assert console(bindir, console_server, pki, "RESUME", module_env).returncode == 0
    assert table(console(bindir, console_server, pki, "SHOW VERSION", module_env))
    for sign in ("Task was destroyed", "Task exception", "unexpected"):
        assert sign not in console_server.log, console_server.log


def test_a_waiting_pause_can_be_cancelled(bindir, console_server, pki, module_env):
    with connect(console_server, pki) as holder:
        paused = pause_behind(bindir, console_server, pki, module_env, holder, "PAUSE")
        paused.send_signal(signal.SIGINT)        # psql sends a CancelRequest
        assert paused.wait(10) != 0
        assert "canceling statement due to user request" in paused.stderr.read()
        holder.execute("commit")
    assert console(bindir, console_server, pki, "RESUME", module_env).returncode == 0


def test_kill_ends_every_client_of_the_database(bindir, console_server, pki, module_env):
    victims = [connect(console_server, pki) for _ in range(4)]
    bystander = connect(console_server, pki, user="postgres", dbname="postgres")
    try:
        assert console(bindir, console_server, pki, "KILL app", module_env).returncode == 0
        for conn in victims:
            with pytest.raises(psycopg.OperationalError) as caught:
                conn.execute("select 1")
            assert "terminating connection due to administrator command" in str(caught.value)
        assert bystander.execute("select 1").fetchone() == (1,)
    finally:
        for conn in [*victims, bystander]:
            conn.close()


def test_reload_from_the_console(bindir, template_cluster, scratch_root, client_env, pki):
    server = start(template_cluster, scratch_root, client_env, bindir, pki, "authentication_timeout = 2s\n")
    try:
        append_conf(server.data_dir, "pgfast.pool_size = 7")
        assert console(bindir, server, pki, "RELOAD", client_env).returncode == 0
        assert wait_until(lambda: {row["key"]: row["value"] for row in
                                   table(console(bindir, server, pki, "SHOW CONFIG", client_env))
                                   }["pgfast.pool_size"] == "7", 10)
        # session pooling: a client holds its backend; SHOW POOLS says so
        with connect(server, pki):
            pools = table(console(bindir, server, pki, "SHOW POOLS", client_env))
        app = [row for row in pools if row["database"] == "app"]
        assert app[0]["pool_mode"] == "session" and app[0]["cl_active"] == "1" and app[0]["sv_active"] == "1"
        # under session pooling a paused database's new sessions wait for RESUME
        assert console(bindir, server, pki, "PAUSE app", client_env).returncode == 0
        connected = []
        thread = threading.Thread(target=lambda: connected.append(connect(server, pki)))
        thread.start()
        time.sleep(2.5)         # past authentication_timeout: a paused login is authenticated already
        assert not connected
        waiting = [row for row in table(console(bindir, server, pki, "SHOW POOLS", client_env))
                   if row["database"] == "app"]
        assert waiting[0]["cl_waiting"] == "1"
        databases = {row["name"]: row for row in table(console(bindir, server, pki, "SHOW DATABASES", client_env))}
        assert databases["app"]["paused"] == "1"
        assert console(bindir, server, pki, "RESUME app", client_env).returncode == 0
        thread.join(10)
        assert connected and connected[0].execute("select 1").fetchone() == (1,)
        connected[0].close()
    finally:
        server.stop()
    assert "Traceback" not in server.log, server.log
