"""A pooled backend is reused only when provably clean, and only by the role it belongs to
(issue 8, parts 2 and 2b), against real pgfast servers with session pooling.

A client that leaves work in flight (a pipeline without Sync, an open transaction, a
half-sent COPY) and then says Terminate or resets the connection must leave nothing
behind: its backend is closed, never reset and reused, whatever the reset query (with
RESET ALL, whose implicit commit once committed the abandoned INSERT), so PostgreSQL rolls
the work back as it does for a client that leaves it directly. Nothing a client does may
keep a backend, a slot or a lock after it has gone.
"""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time

import psycopg
import pytest

from conftest import Pgfast, append_conf, chown_tree, free_port, write_file
from rawclient import FLUSH, SYNC, RawClient, bind, execute, message, parse, query_message

HBA = "local all all trust\nhost all all 127.0.0.1/32 trust\n"
RESET_QUERIES = ["DISCARD ALL", "RESET ALL", "SELECT 1"]
_markers = itertools.count()


def _server(template_cluster, module_dir, env, name: str, conf: str) -> Pgfast:
    base = tempfile.mkdtemp(prefix=f"reuse-{name}-", dir=module_dir)
    os.chmod(base, 0o755)
    data = os.path.join(base, "data")
    shutil.copytree(template_cluster, data, symlinks=True)
    os.chmod(data, 0o700)
    write_file(os.path.join(data, "pg_hba.conf"), HBA)
    append_conf(data, conf)
    chown_tree(data)
    socket_dir = tempfile.mkdtemp(prefix="sock-", dir=base)
    os.chmod(socket_dir, 0o777)
    return Pgfast(data, free_port(), socket_dir, [], dict(env)).start()


@pytest.fixture(scope="module", params=RESET_QUERIES)
def server(request, template_cluster, module_dir, module_env):
    pgfast = _server(template_cluster, module_dir, module_env, request.param.split()[0].lower(),
                     f"pgfast.server_reset_query = '{request.param}'\nmax_connections = 40")
    with observer(pgfast) as conn:
        conn.execute("create table marks (v text)")
        conn.execute("grant all on marks to public")
        conn.execute("create role alice login")
    yield pgfast
    pgfast.stop()
    assert "Traceback" not in pgfast.log, pgfast.log


def observer(server: Pgfast, **params) -> psycopg.Connection:
    params = {"user": "postgres", "application_name": "observer", **params}
    return psycopg.connect(host="127.0.0.1", port=server.port, dbname="postgres", autocommit=True,
                           connect_timeout=10, **params)


def client(server: Pgfast) -> RawClient:
    conn = RawClient.connect(server.port)
    conn.startup(user="postgres", database="postgres", application_name="reuse")
    conn.authenticate()
    return conn


def read_until(conn: RawClient, msg_type: bytes) -> None:
    while conn.read_message()[0] != msg_type:
        pass


def abandon_pipeline(conn: RawClient, mark: str) -> None:
    conn.send(parse("", f"insert into marks values ('{mark}')") + bind() + execute() + FLUSH)
    read_until(conn, b"C")             # the INSERT ran, in an implicit transaction no Sync ended


def abandon_transaction(conn: RawClient, mark: str) -> None:
    conn.send(query_message(f"begin; insert into marks values ('{mark}')"))
    assert conn.read_until_ready()[-1] == (b"Z", b"T")


def abandon_copy(conn: RawClient, mark: str) -> None:
    conn.send(query_message("copy marks from stdin"))
    read_until(conn, b"G")
    conn.send(message(b"d", f"{mark}\n".encode()))


ABANDONED = {"pipeline": abandon_pipeline, "transaction": abandon_transaction, "copy": abandon_copy}


def wait_for(predicate, timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def pooled_backends(conn: psycopg.Connection) -> list[int]:
    return [pid for (pid,) in conn.execute(
        "select pid from pg_stat_activity where application_name = 'reuse' and backend_type = 'client backend'")]


@pytest.mark.parametrize("ending", ["terminate", "reset"])
@pytest.mark.parametrize("work", list(ABANDONED))
def test_abandoned_work_is_never_committed(server, work, ending):
    mark = f"{work}-{ending}-{next(_markers)}"
    conn = client(server)
    (pid,) = conn.query("select pg_backend_pid()")[0]
    ABANDONED[work](conn, mark)
    conn.terminate() if ending == "terminate" else conn.reset()
    with observer(server) as watch:
        wait_for(lambda: int(pid) not in pooled_backends(watch), what=f"backend {pid} to be closed")
        again = client(server)               # the same startup packet: it would get a pooled backend
        assert again.query("select pg_backend_pid()")[0][0] != pid
        assert again.query(f"select count(*) from marks where v = '{mark}'") == [("0",)]
        again.terminate()
        assert watch.execute("select count(*) from marks where v = %s", (mark,)).fetchone() == (0,)


def test_a_clean_backend_is_still_reused(server):
    conn = client(server)
    (pid,) = conn.query("select pg_backend_pid()")[0]
    conn.send(parse("", "select 1") + bind() + execute() + SYNC + FLUSH)   # a Flush after the Sync is harmless
    conn.read_until_ready()
    conn.terminate()
    with observer(server) as watch:
        wait_for(lambda: watch.execute("select state from pg_stat_activity where pid = %s",
                                       (int(pid),)).fetchone() == ("idle",), what="the reset")
    time.sleep(0.1)
    again = client(server)
    assert again.query("select pg_backend_pid()")[0][0] == pid
    again.terminate()


def test_a_parse_error_without_sync_leaves_no_backend_and_no_lock(server):
    """After an error PostgreSQL ignores everything until a Sync: a reset sent then would wait
    for ever. Such a backend is closed, and its session-level lock goes with it."""
    with observer(server) as watch:
        before = watch.execute("select count(*) from pg_stat_activity where backend_type = 'client backend'"
                               ).fetchone()[0]
        for round_no in range(60):       # more rounds than max_connections
            conn = client(server)
            if round_no == 0:
                conn.query("select pg_advisory_lock(4242)")
            conn.send(parse("", "select 1; select 2"))
            conn.terminate()
        wait_for(lambda: watch.execute("select pg_try_advisory_lock(4242)").fetchone() == (True,),
                 what="the departed client's advisory lock")
        watch.execute("select pg_advisory_unlock(4242)")
        wait_for(lambda: watch.execute("select count(*) from pg_stat_activity where backend_type = 'client backend'"
                                       ).fetchone()[0] <= before + 1, what="the backends to go")
    fresh = client(server)
    assert fresh.query("select 1") == [("1",)]
    fresh.terminate()


def test_a_renamed_role_s_backend_is_not_handed_to_its_namesake(server):
    with observer(server) as admin:
        admin.execute("create role carol login")
        admin.execute("create table carols_secret (v text)")
        admin.execute("grant select on carols_secret to carol")
        with observer(server, user="carol", application_name="role-oid") as first:
            (pid,) = first.execute("select pg_backend_pid()").fetchone()
        wait_for(lambda: admin.execute("select state from pg_stat_activity where pid = %s",
                                       (pid,)).fetchone() == ("idle",), what="the reset")
        admin.execute("alter role carol rename to carol_old")
        admin.execute("create role carol login")
        with observer(server, user="carol", application_name="role-oid") as second:
            assert second.execute("select pg_backend_pid()").fetchone()[0] != pid
            assert second.execute("select current_user, session_user").fetchone() == ("carol", "carol")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                second.execute("select * from carols_secret")


def test_a_dropped_and_recreated_role_gets_a_backend_of_its_own(server):
    with observer(server) as admin:
        admin.execute("create role dave login")
        with observer(server, user="dave", application_name="role-oid-2") as first:
            (pid,) = first.execute("select pg_backend_pid()").fetchone()
        wait_for(lambda: admin.execute("select state from pg_stat_activity where pid = %s",
                                       (pid,)).fetchone() == ("idle",), what="the reset")
        admin.execute("drop role dave")
        admin.execute("create role dave login")
        with observer(server, user="dave", application_name="role-oid-2") as second:
            assert second.execute("select current_user").fetchone() == ("dave",)    # not "invalid role OID"
            assert second.execute("select pg_backend_pid()").fetchone()[0] != pid
