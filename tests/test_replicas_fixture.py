"""The replica cluster of tests/replicas.py does what upstream-mode tests will rely on:
streaming replication, TLS over TCP, and a failover. The tests run in order and the
last one changes the cluster (a new primary)."""
from __future__ import annotations

import os
import subprocess
import tempfile

import pytest

from conftest import client_environment
from replicas import ReplicaCluster


@pytest.fixture(scope="module")
def replicas(bindir, module_dir):
    cluster = ReplicaCluster(bindir, tempfile.mkdtemp(prefix="replicas-", dir=module_dir), standbys=2).start()
    yield cluster
    cluster.stop()
    assert not any(node.running for node in cluster.nodes)


def test_standbys_replay_the_primary(replicas):
    replicas.primary.sql("create table fruit (name text); insert into fruit values ('apple'), ('pear')")
    replicas.wait_replayed()
    for standby in replicas.standbys:
        assert standby.sql("select string_agg(name, ',' order by name) from fruit") == "apple,pear"


def test_only_the_primary_is_out_of_recovery(replicas):
    assert not replicas.primary.in_recovery
    assert all(standby.in_recovery for standby in replicas.standbys)
    ports = ",".join(str(node.port) for node in replicas.nodes)
    assert replicas.hosts_conninfo() == f"host=127.0.0.1,127.0.0.1,127.0.0.1 port={ports}"


def test_every_node_serves_verified_tls_with_scram(replicas, bindir):
    env = client_environment(os.path.join(replicas.parent_dir, "client-home"))
    for node in replicas.nodes:
        result = subprocess.run([os.path.join(bindir, "psql"), "-X", "-A", "-t", "-d", node.dsn(),
                                 "-c", "select ssl from pg_stat_ssl where pid = pg_backend_pid()"],
                                capture_output=True, text=True, env=env, timeout=30, stdin=subprocess.DEVNULL)
        assert (result.returncode, result.stdout.strip()) == (0, "t"), result.stderr
        refused = subprocess.run([os.path.join(bindir, "psql"), "-X", "-d", node.dsn(sslmode="disable"), "-c", ""],
                                 capture_output=True, text=True, env=env, timeout=30, stdin=subprocess.DEVNULL)
        assert refused.returncode and "no encryption" in refused.stderr, refused.stderr


def test_failover_to_a_standby_that_the_other_follows(replicas):
    old, new, other = replicas.primary, *replicas.standbys
    replicas.wait_replayed()    # both standbys at the same point, so the other can follow the new timeline
    old.kill()
    assert not old.running
    new.promote()
    other.follow(new)
    assert replicas.current_primary() is new
    new.sql("insert into fruit values ('quince')")
    replicas.wait_replayed()
    assert other.sql("select string_agg(name, ',' order by name) from fruit") == "apple,pear,quince"
    assert other.in_recovery
