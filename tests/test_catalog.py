"""pgfast.catalog against a real PostgreSQL: the admin session is a shared channel, and an
answer may only ever reach the request that asked for it, whoever gives up waiting."""
from __future__ import annotations

import asyncio
import random
import subprocess

import pytest

from pgfast.backend import LocalServer
from pgfast.catalog import Catalog, CatalogError

ROLES = 60


@pytest.fixture(scope="module")
def roles(postgres, bindir) -> dict[str, str]:
    """role name -> its OID, each with a password of its own."""
    sql = "".join(f"CREATE ROLE cat{i} LOGIN PASSWORD 'pw{i}';\n" for i in range(ROLES))
    sql += "CREATE DATABASE catdb;\n"
    subprocess.run([f"{bindir}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", postgres.socket_dir, "-p",
                    str(postgres.port), "-U", "postgres", "-d", "postgres", "-f", "-"],
                   input=sql, text=True, check=True, capture_output=True)
    out = subprocess.run([f"{bindir}/psql", "-X", "-At", "-F", " ", "-h", postgres.socket_dir, "-p", str(postgres.port),
                          "-U", "postgres", "-d", "postgres", "-c", "select rolname, oid from pg_roles where rolname like 'cat%'"],
                         text=True, check=True, capture_output=True).stdout
    return dict(line.split() for line in out.splitlines())


def run(coro):
    return asyncio.run(coro)


def test_a_cancelled_query_leaves_its_answer_to_no_one(postgres):
    async def scenario():
        catalog = Catalog(LocalServer(postgres.socket_path), "postgres")
        slow = asyncio.ensure_future(catalog.query("SELECT $1::text, pg_catalog.pg_sleep(0.3)::text", ("first",)))
        await asyncio.sleep(0.05)          # the query is in flight, on the one session
        slow.cancel()
        session = catalog._session
        rows = await catalog.query("SELECT $1::text, 'second answer'", ("second",))
        assert catalog._session is session          # the session was not closed to get there
        catalog.close()
        return slow, rows
    slow, rows = run(scenario())
    assert slow.cancelled()
    assert rows == [("second", "second answer")]


def test_concurrent_logins_given_up_at_random_each_get_their_own_answer(postgres, roles):
    async def scenario():
        catalog = Catalog(LocalServer(postgres.socket_path), "postgres")
        rng = random.Random(7)
        tasks = []
        for n in range(600):
            user = f"cat{rng.randrange(ROLES)}"
            tasks.append((user, asyncio.ensure_future(catalog.login_facts(user, "postgres", roles=bool(n % 2)))))
            if rng.random() < 0.3:
                await asyncio.sleep(rng.uniform(0, 0.002))
            if rng.random() < 0.4:
                rng.choice(tasks)[1].cancel()      # a client reset mid-lookup
        await asyncio.gather(*(t for _, t in tasks), return_exceptions=True)
        catalog.close()
        return tasks
    tasks = run(scenario())
    answered = [(user, task.result()) for user, task in tasks if not task.cancelled()]
    assert len(answered) > 200
    for user, facts in answered:
        assert facts.session_rules.role_oid == roles[user], user
        assert facts.credentials.secret.startswith("SCRAM-SHA-256$")
        assert facts.roles is None or user in facts.roles


def test_an_error_is_the_failing_request_s_alone(postgres):
    async def scenario():
        catalog = Catalog(LocalServer(postgres.socket_path), "postgres")
        failing = asyncio.ensure_future(catalog.query("SELECT $1::text, 1/0", ("bad",)))
        fine = asyncio.ensure_future(catalog.query("SELECT $1::text", ("good",)))
        results = await asyncio.gather(failing, fine, return_exceptions=True)
        catalog.close()
        return results
    failing, fine = run(scenario())
    assert isinstance(failing, CatalogError) and "division by zero" in str(failing)
    assert fine == [("good",)]


def test_facts_for_what_does_not_exist(postgres, roles):
    async def scenario():
        catalog = Catalog(LocalServer(postgres.socket_path), "postgres")
        try:
            return (await catalog.login_facts("nobody", "postgres", roles=True),
                    await catalog.login_facts("cat1", "nodb", roles=False),
                    await catalog.login_facts("cat1", "catdb", roles=False))
        finally:
            catalog.close()
    nobody, nodb, catdb = run(scenario())
    assert nobody.credentials is None and nobody.session_rules is None and nobody.roles == frozenset()
    assert nodb.credentials is not None and nodb.session_rules is None
    assert catdb.session_rules.role_oid == roles["cat1"]


def test_the_admin_session_moves_to_a_database_that_exists(postgres, roles):
    async def scenario():
        catalog = Catalog(LocalServer(postgres.socket_path), "postgres", databases=("dropped_long_ago", "template1"))
        try:
            facts = await catalog.login_facts("cat2", "postgres", roles=False)
            return facts, catalog._session.database
        finally:
            catalog.close()
    facts, database = run(scenario())
    assert facts.session_rules.role_oid == roles["cat2"] and database == "template1"


def test_letting_go_answers_what_is_queued_first(postgres):
    async def scenario():
        catalog = Catalog(LocalServer(postgres.socket_path), "postgres")
        queued = asyncio.ensure_future(catalog.query("SELECT $1::text, pg_catalog.pg_sleep(0.1)::text", ("q",)))
        await asyncio.sleep(0.02)
        first = catalog._session
        catalog.let_go()
        later = await catalog.query("SELECT $1::text", ("later",))
        result = await queued
        catalog.close()
        return first, catalog, result, later
    first, catalog, result, later = run(scenario())
    assert result[0][0] == "q" and later == [("later",)]
    assert first.state.name == "CLOSED"
