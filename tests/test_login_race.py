"""Every login decision belongs to the login that asked (issue 8, part 1).

The attack that once worked: connection A sends a StartupMessage for a role whose
password the attacker knows, and is reset (TCP RST) while pgfast looks that role up in
the catalogs; connection B, right behind it, logs in as a victim with the attacker's
password. If the catalog channel hands A's answer to B, B is checked against the
attacker's secret and logs in as the victim. Here the loop runs a few hundred times per
configuration against a real pgfast, and no round may log in.
"""
from __future__ import annotations

import os
import random
import ssl
import time

import pytest

import certs
from conftest import psql_script, tls_server
from rawclient import RawClient, ServerError

ATTACKERS = 100
VICTIMS = 40
ATTACKER_PASSWORD = "attacker-password"
ROUNDS = 300
HBA = ("local all all trust\n"
       "host all postgres 127.0.0.1/32 trust\n"
       "host all all 127.0.0.1/32 scram-sha-256\n")


@pytest.fixture(scope="module")
def ca() -> certs.CA:
    return certs.CA("pgfast login race CA")


@pytest.fixture(scope="module", params=["session", "none"])
def server(request, template_cluster, module_dir, bindir, module_env, ca):
    pgfast = tls_server(template_cluster, module_dir, f"race-{request.param}-", ca, HBA,
                        f"pgfast.pool_mode = {request.param}\nmax_connections = 300", module_env).start()
    roles = "".join(f"CREATE ROLE attacker{i} LOGIN PASSWORD '{ATTACKER_PASSWORD}';\n" for i in range(ATTACKERS))
    roles += "".join(f"CREATE ROLE victim{i} LOGIN PASSWORD 'secret-{os.urandom(8).hex()}';\n"
                     for i in range(VICTIMS))
    psql_script(bindir, pgfast, roles, module_env).check_returncode()
    yield pgfast
    pgfast.stop()
    assert "Traceback" not in pgfast.log, pgfast.log


def _tls_context(ca: certs.CA, directory: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=certs.write(os.path.join(directory, "race-root.crt"),
                                                        ca.cert_pem(), 0o644))
    return ctx


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_reset_mid_lookup_never_logs_in_as_another_role(server, ca, module_dir, tls):
    ctx = _tls_context(ca, module_dir) if tls else None
    rng = random.Random(8)
    logged_in, refused = [], 0
    deadline = time.monotonic() + 60
    for round_no in range(ROUNDS):
        assert time.monotonic() < deadline, f"only {round_no} rounds in 60 s"
        attacker = f"attacker{rng.randrange(ATTACKERS)}"
        victim = f"victim{rng.randrange(VICTIMS)}"
        a = RawClient.connect(server.port, ctx)
        a.startup(user=attacker, database="postgres")
        time.sleep(rng.uniform(0, 400e-6))
        a.reset()
        b = RawClient.connect(server.port, ctx)
        b.startup(user=victim, database="postgres")
        try:
            b.authenticate(password=ATTACKER_PASSWORD)
        except ServerError as exc:
            assert exc.sqlstate == "28P01", exc.fields
            refused += 1
        else:
            logged_in.append((round_no, victim, b.query("select current_user")[0][0]))
        finally:
            b.close()
    assert not logged_in, f"logged in with another role's password: {logged_in}"
    assert refused == ROUNDS
    # the attacker's own password still works, so the loop really tested the lookups
    c = RawClient.connect(server.port, ctx)
    c.startup(user="attacker0", database="postgres")
    c.authenticate(password=ATTACKER_PASSWORD)
    assert c.query("select current_user") == [("attacker0",)]
    c.terminate()


def test_reset_while_the_backend_is_readied(server):
    """A client reset at any moment from its startup packet to its ReadyForQuery (the
    catalog lookup, the backend's assignment, its identity statement) leaves nothing
    behind: no login task that carries on for a connection already gone."""
    rng = random.Random(9)
    for _ in range(ROUNDS):
        a = RawClient.connect(server.port)
        a.startup(user="postgres", database="postgres")      # trust: straight to the backend
        time.sleep(rng.uniform(0, 3e-3))
        a.reset()
    c = RawClient.connect(server.port)
    c.startup(user="postgres", database="postgres")
    c.authenticate()
    assert c.query("select 1") == [("1",)]
    c.terminate()
    time.sleep(0.5)
    assert "Task exception" not in server.log and "cannot go from" not in server.log, server.log
