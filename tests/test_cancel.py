"""Cancel requests through pgfast: they reach the backend running the client's own work, and
never another client's, even when the backend is handed on right after (a cancel storm
against session pooling)."""
from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile

import pytest

from conftest import Pgfast, append_conf, chown_tree, free_port, write_file
from rawclient import RawClient, ServerError

HBA = "local all all trust\nhost all all 127.0.0.1/32 trust\n"


@pytest.fixture(scope="module")
def server(template_cluster, module_dir, module_env):
    base = tempfile.mkdtemp(prefix="cancel-", dir=module_dir)
    os.chmod(base, 0o755)
    data = os.path.join(base, "data")
    shutil.copytree(template_cluster, data, symlinks=True)
    os.chmod(data, 0o700)
    write_file(os.path.join(data, "pg_hba.conf"), HBA)
    append_conf(data, "pgfast.pool_size = 2")
    chown_tree(data)
    socket_dir = tempfile.mkdtemp(prefix="sock-", dir=base)
    os.chmod(socket_dir, 0o777)
    pgfast = Pgfast(data, free_port(), socket_dir, [], dict(module_env)).start()
    yield pgfast
    pgfast.stop()
    assert "Traceback" not in pgfast.log, pgfast.log


def session(server: Pgfast) -> RawClient:
    conn = RawClient.connect(server.port)
    conn.startup(user="postgres", database="postgres", application_name="storm")
    conn.authenticate()
    return conn


def send_cancel(server: Pgfast, pid: int, key: int, wait: bool = False) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(struct.pack("!iiiI", 16, 80877102, pid, key))
        if wait:
            sock.recv(1)       # pgfast closes the connection once it has handled it


def test_cancel_interrupts_the_client_s_own_query(server):
    conn = session(server)
    conn.send(b"Q" + struct.pack("!I", 4 + len(b"select pg_sleep(30)\0")) + b"select pg_sleep(30)\0")
    import time
    time.sleep(0.2)
    send_cancel(server, *conn.backend_key, wait=True)
    with pytest.raises(ServerError) as caught:
        for msg_type, payload in conn.read_until_ready():
            if msg_type == b"E":
                from rawclient import error_fields
                raise ServerError(error_fields(payload))
    assert caught.value.sqlstate == "57014"
    assert conn.query("select 1") == [("1",)]
    conn.terminate()


def test_a_late_cancel_never_hits_the_next_client(server):
    """The client sends its cancel and leaves at once; the next client, with the same
    startup packet, gets the same backend and must never see the cancel."""
    cancelled = []
    for round_no in range(100):
        first = session(server)
        first.query("select 1")
        send_cancel(server, *first.backend_key, wait=True)    # pgfast has taken it: forwarding may still run
        first.terminate()
        second = session(server)
        try:
            second.query("select pg_sleep(0.03)")
        except ServerError as exc:
            cancelled.append((round_no, exc.sqlstate))
        second.terminate()
    assert not cancelled, f"another client's cancel reached these queries: {cancelled}"


def test_a_wrong_key_does_nothing(server):
    conn = session(server)
    pid, key = conn.backend_key
    send_cancel(server, pid, key ^ 1, wait=True)
    send_cancel(server, pid + 100000, key, wait=True)
    assert conn.query("select pg_sleep(0.2), 'still here'") == [("", "still here")]
    conn.terminate()
    assert f"wrong key in cancel request for process {pid}" in server.log
    assert f"PID {pid + 100000} in cancel request did not match any process" in server.log
