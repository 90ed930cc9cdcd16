"""Server-side prepared statements (database.py): on by default, names of their own on every
connection, and turned off by themselves where the server session changes under a connection.

A direct PostgreSQL keeps them; PgBouncer 1.18 in transaction mode (Debian's, which tracks no
prepared statements) is the pooler that cannot, and the one these tests put in front.
"""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sqlalchemy import make_url, text

from database import PREPARE_THRESHOLD, PostgresDatabase, UniqueStatementNames, static
from tests.pg_cluster import PrivateCluster, private_cluster
from tests.pgbouncer import pgbouncer
from tests.support import auth, make_settings, running_app

DOUBLE = static(text("SELECT CAST(:n AS integer) * 2"))
NAMES = "SELECT name FROM pg_prepared_statements ORDER BY name"


@asynccontextmanager
async def postgres_database(url: str, **overrides: object) -> AsyncIterator[PostgresDatabase]:
    database = PostgresDatabase(make_url(url), make_settings(database_url=url, **overrides))
    await database.open()
    try:
        yield database
    finally:
        await database.close()


async def server_statement_names(database: PostgresDatabase) -> list[str]:
    async with database.pool.connection() as connection:
        cursor = await connection.execute(NAMES, prepare=False)
        return [name for (name,) in await cursor.fetchall()]


def test_each_connection_names_its_statements_apart() -> None:
    prefixes = {UniqueStatementNames()._prefix for _ in range(50)}
    assert len(prefixes) == 50
    assert all(prefix.startswith(b"todo_") and len(prefix) < 40 for prefix in prefixes)


async def test_statements_are_prepared_by_default_under_the_connections_own_names(
    postgres_url: str,
) -> None:
    assert make_settings().database_prepared_statements is True
    async with postgres_database(
        postgres_url, database_pool_size=1, database_max_overflow=0
    ) as database:
        for n in range(PREPARE_THRESHOLD + 2):
            assert await database.scalar(DOUBLE, {"n": n}) == 2 * n
        names = await server_statement_names(database)
        assert database.prepare_threshold == PREPARE_THRESHOLD
    assert len(names) == 1
    assert names[0].startswith("todo_")


async def test_only_statements_built_once_are_prepared(postgres_url: str) -> None:
    """A statement built per request (If-Match naming many versions) can be a new SQL text each
    time: prepared, it would pile up in the server session. Run as often, it is not prepared."""
    async with postgres_database(
        postgres_url, database_pool_size=1, database_max_overflow=0
    ) as database:
        for n in range(PREPARE_THRESHOLD + 2):
            built = text("SELECT CAST(:n AS integer) * 3")
            assert await database.scalar(built, {"n": n}) == 3 * n
        assert await server_statement_names(database) == []
        for n in range(PREPARE_THRESHOLD + 2):
            await database.scalar(DOUBLE, {"n": n})
        assert len(await server_statement_names(database)) == 1


async def test_a_statement_missing_on_the_server_turns_preparing_off_and_still_runs(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """What a transaction-mode pooler does to a prepared statement (the next statement lands
    on a server session that lacks it) is done here by hand: PL/pgSQL drops it behind psycopg's
    back. The statement must still answer, and nothing be prepared from then on."""
    async with postgres_database(
        postgres_url, database_pool_size=1, database_max_overflow=0
    ) as database:
        for n in range(PREPARE_THRESHOLD + 2):
            await database.scalar(DOUBLE, {"n": n})
        assert len(await server_statement_names(database)) == 1
        async with database.pool.connection() as connection:
            await connection.execute("DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$", prepare=False)
        with caplog.at_level(logging.WARNING, logger="todo.database"):
            assert await database.scalar(DOUBLE, {"n": 21}) == 42
        assert database.prepare_threshold is None
        assert "prepared statements turned off" in caplog.text
        for n in range(2 * PREPARE_THRESHOLD):
            assert await database.scalar(DOUBLE, {"n": n}) == 2 * n
        assert await server_statement_names(database) == []


async def test_readiness_pings_and_transactions_are_never_prepared(postgres_url: str) -> None:
    """Neither can run again after a missing statement name: /health/ready's ping would answer
    503, a transaction would be aborted."""
    async with postgres_database(
        postgres_url, database_pool_size=1, database_max_overflow=0
    ) as database:
        for n in range(2 * PREPARE_THRESHOLD):
            await database.ping()
            async with database.atomic() as transaction:
                assert await transaction.scalar(DOUBLE, {"n": n}) == 2 * n
        assert await server_statement_names(database) == []
        assert database.prepare_threshold == PREPARE_THRESHOLD


async def test_nothing_is_deallocated_after_a_rollback_or_past_a_hundred_statements(
    postgres_url: str,
) -> None:
    """psycopg would send DEALLOCATE after a statement has run: past 100 statements by name
    (with a libpq older than 17, where a missing name fails and the statement that ran would be
    run again) and after any rollback as DEALLOCATE ALL (behind an old pooler, on another
    client's server session). Neither is sent."""
    async with postgres_database(
        postgres_url, database_pool_size=1, database_max_overflow=0
    ) as database:
        shapes = [static(text(f"SELECT CAST(:n AS integer) + {shape}")) for shape in range(110)]
        for statement in shapes:
            for n in range(PREPARE_THRESHOLD + 1):
                await database.scalar(statement, {"n": n})
        assert len(await server_statement_names(database)) == 110

        async def rolled_back() -> None:
            async with database.atomic() as transaction:
                await transaction.scalar(DOUBLE, {"n": 1})
                raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError):
            await rolled_back()
        assert len(await server_statement_names(database)) == 110
        assert await database.scalar(shapes[0], {"n": 1}) == 1
        assert database.prepare_threshold == PREPARE_THRESHOLD


async def test_switched_off_nothing_is_ever_prepared(postgres_url: str) -> None:
    async with postgres_database(
        postgres_url,
        database_pool_size=1,
        database_max_overflow=0,
        database_prepared_statements=False,
    ) as database:
        for n in range(2 * PREPARE_THRESHOLD):
            assert await database.scalar(DOUBLE, {"n": n}) == 2 * n
        assert await server_statement_names(database) == []


# --- Behind PgBouncer 1.18 in transaction mode ------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[PrivateCluster]:
    with private_cluster(tmp_path) as started:
        yield started


async def test_clients_sharing_one_server_session_never_run_each_others_statements(
    cluster: PrivateCluster, tmp_path: Path
) -> None:
    """One server connection behind PgBouncer: every client connection's statements are
    prepared in the same server session. With psycopg's own names (`_pg3_0`, … on every
    connection) the second connection's `_pg3_0` would be refused as a duplicate, or its next
    run would execute the first connection's statement of that name; with names of their own
    they live side by side and each runs its own."""
    with pgbouncer(
        cluster.host, cluster.port, cluster.dbname, tmp_path, default_pool_size=1
    ) as url:
        async with postgres_database(url, database_pool_size=2, database_max_overflow=0) as db:
            first = await db.pool.acquire()
            second = await db.pool.acquire()
            try:
                triple = "SELECT CAST(%(n)s AS integer) * 3"
                negate = "SELECT - CAST(%(n)s AS integer)"
                for n in range(PREPARE_THRESHOLD + 3):
                    # Each connection's first statement: `_pg3_0` for both under psycopg's names.
                    for connection, sql, expected in ((first, triple, 3 * n), (second, negate, -n)):
                        row = await (await db._execute(connection, sql, {"n": n})).fetchone()
                        assert row == (expected,)
                names = await (await first.execute(NAMES, prepare=False)).fetchall()
            finally:
                db.pool.release(first)
                db.pool.release(second)
            assert db.prepare_threshold == PREPARE_THRESHOLD  # nothing was missing
    assert len(names) == 2
    assert len({name[:21] for (name,) in names}) == 2  # two connections' prefixes


async def test_the_app_behind_pgbouncer_answers_every_request_right(
    cluster: PrivateCluster, tmp_path: Path
) -> None:
    """Several server sessions behind PgBouncer: a connection's prepared statements are soon
    missing where its next transaction lands. Every answer must be the right one all the same."""
    with pgbouncer(
        cluster.host, cluster.port, cluster.dbname, tmp_path, default_pool_size=3
    ) as url:
        async with running_app(database_url=url, direct_database_url=cluster.url) as client:
            user = f"user-{uuid.uuid4().hex}"
            base = f"/api/{user}/tasks"
            ids = []
            for n in range(4):
                created = await client.post(base, json={"title": f"t{n}"}, headers=auth(user))
                assert created.status_code == 201
                ids.append(created.json()["id"])
            toggled_ids = []
            for round_number in range(6 * PREPARE_THRESHOLD):
                read_id = ids[round_number % len(ids)]
                toggled_id = ids[(round_number + 1) % len(ids)]
                toggled_ids.append(toggled_id)
                # At once: the app's connections and PgBouncer's server sessions get mixed.
                listed, read, toggled = await asyncio.gather(
                    client.get(base, headers=auth(user)),
                    client.get(f"{base}/{read_id}", headers=auth(user)),
                    client.patch(f"{base}/{toggled_id}/complete", headers=auth(user)),
                )
                assert [task["id"] for task in listed.json()] == ids[::-1]
                assert read.json()["id"] == read_id
                assert toggled.json()["id"] == toggled_id
            final = (await client.get(base, headers=auth(user))).json()
    assert {task["id"]: task["completed"] for task in final} == {
        task_id: toggled_ids.count(task_id) % 2 == 1 for task_id in ids
    }
