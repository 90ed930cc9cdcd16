"""The schema comes from the Alembic migrations: from empty, down, up again, and concurrently."""

import asyncio
import os
import re
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, insert, inspect, select, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlmodel import SQLModel

from config import BACKEND_DIR
from db import MIGRATION_LOCK_KEY, alembic_config, create_engine, upgrade_schema
from models import FITS_LIST_INDEX, OVER_LIST_INDEX, TASKS_TABLE
from tests.conftest import DEFAULT_ADMIN_URL
from tests.support import make_settings, random_text

SCHEMA_TABLES = {"tasks", "idempotency_keys", "alembic_version"}
BEFORE_THE_OWNER_INDEXES = "8c41d2a7e6f3"  # the revision before 5d9c3e71b0a4


@pytest.fixture
def empty_database_url(
    backend: str, request: pytest.FixtureRequest, tmp_path: object
) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/migrations.db"
        return
    yield request.getfixturevalue("empty_postgres_url")


@pytest.fixture
def empty_postgres_url(postgres_url: str) -> Iterator[str]:
    """A database of its own, with no tables (postgres_url skips or fails as for every
    PostgreSQL test)."""
    admin_url = os.environ.get("TEST_DATABASE_URL", DEFAULT_ADMIN_URL)
    name = f"todo_migrations_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def table_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        names: list[str] = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
    return set(names) - {"sqlite_sequence"}  # SQLite's own bookkeeping for AUTOINCREMENT


async def migrate_to(engine: AsyncEngine, revision: str, *, down: bool = False) -> None:
    def migrate(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)

    async with engine.begin() as connection:
        await connection.run_sync(migrate)


async def test_upgrade_from_empty_then_down_and_up_again(empty_database_url: str) -> None:
    engine = create_engine(make_settings(database_url=empty_database_url))
    try:
        assert await table_names(engine) == set()
        await upgrade_schema(engine)
        assert await table_names(engine) == SCHEMA_TABLES
        await upgrade_schema(engine)  # at head already: nothing to do, no error
        await migrate_to(engine, "base", down=True)
        assert await table_names(engine) == {"alembic_version"}
        await upgrade_schema(engine)
        assert await table_names(engine) == SCHEMA_TABLES
    finally:
        await engine.dispose()


async def test_migrations_match_the_models(empty_database_url: str) -> None:
    engine = create_engine(make_settings(database_url=empty_database_url))
    try:
        await upgrade_schema(engine)

        def differences(connection: Connection) -> list[object]:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            found: list[object] = compare_metadata(context, SQLModel.metadata)
            return found

        async with engine.connect() as connection:
            assert await connection.run_sync(differences) == []
    finally:
        await engine.dispose()


async def test_the_owners_indexes_are_built_over_tasks_of_every_size(
    empty_database_url: str,
) -> None:
    """An upgrade on a table that already holds tasks, some too long for an entry of the
    covering index (models.LIST_INDEX_TEXT_BYTES): those go to the other index, and the upgrade,
    a downgrade and an upgrade again keep every task."""
    engine = create_engine(make_settings(database_url=empty_database_url))
    now = datetime.now(UTC)
    # (title, description): a short task, and the largest the API accepts.
    rows = [("short", None), (random_text(800, 4, 5), random_text(4000, 4, 6))]
    try:
        await migrate_to(engine, BEFORE_THE_OWNER_INDEXES)
        async with engine.begin() as connection:
            await connection.execute(
                insert(TASKS_TABLE),
                [
                    {"user_id": "u", "title": title, "description": description}
                    | {"created_at": now, "updated_at": now}
                    for title, description in rows
                ],
            )
        for revision, down in [("head", False), (BEFORE_THE_OWNER_INDEXES, True), ("head", False)]:
            await migrate_to(engine, revision, down=down)
            async with engine.connect() as connection:
                stored = await connection.execute(
                    select(TASKS_TABLE.c.title, TASKS_TABLE.c.description)
                )
                assert sorted(map(tuple, stored)) == sorted(rows)
        async with engine.connect() as connection:
            for predicate in (FITS_LIST_INDEX, OVER_LIST_INDEX):
                assert await connection.scalar(select(func.count()).where(predicate)) == 1
    finally:
        await engine.dispose()


# The statements README.md gives for building the list's indexes before migration 5d9c3e71b0a4.
README_INDEXES = re.compile(r"\*\*Upgrading a large table:\*\*.*?```sql\n(.*?)```", re.DOTALL)
TASK_INDEXES = text(
    "SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisvalid FROM pg_index i"
    " JOIN pg_class c ON c.oid = i.indexrelid"
    " WHERE i.indrelid = 'tasks'::regclass AND c.relname LIKE 'ix_tasks_%' ORDER BY c.relname"
)


def run_readme_index_statements(database_url: str) -> None:
    found = README_INDEXES.search((BACKEND_DIR.parent / "README.md").read_text())
    assert found is not None
    statements = [part.strip() for part in found.group(1).split(";") if part.strip()]
    assert len(statements) == 4  # three indexes built, then the old one dropped
    with psycopg.connect(database_url, autocommit=True) as connection:
        for statement in statements:  # CONCURRENTLY: outside a transaction
            connection.execute(statement.encode())


async def task_indexes(engine: AsyncEngine) -> list[tuple[str, str, bool]]:
    async with engine.connect() as connection:
        return [
            (name, definition, valid)
            for name, definition, valid in await connection.execute(TASK_INDEXES)
        ]


async def test_the_indexes_the_readme_builds_beforehand_are_those_the_migration_builds(
    empty_postgres_url: str,
) -> None:
    """README, "Upgrading a large table": indexes built beforehand without blocking, then the
    migration, give the very indexes the migration builds by itself (a predicate written
    otherwise would not serve the app's queries)."""
    engine = create_engine(make_settings(database_url=empty_postgres_url))
    found = []
    try:
        await migrate_to(engine, BEFORE_THE_OWNER_INDEXES)
        run_readme_index_statements(empty_postgres_url)
        for _ in range(2):
            await upgrade_schema(engine)
            found.append(await task_indexes(engine))
            await migrate_to(engine, BEFORE_THE_OWNER_INDEXES, down=True)
    finally:
        await engine.dispose()
    assert [(name, valid) for name, _, valid in found[0]] == [
        ("ix_tasks_owner", True),
        ("ix_tasks_owner_long", True),
        ("ix_tasks_user_id", True),
    ]
    assert found[0] == found[1]


async def test_an_index_left_invalid_beforehand_is_built_again(empty_postgres_url: str) -> None:
    """A CREATE INDEX CONCURRENTLY cancelled halfway leaves an INVALID index: kept up to date,
    never read. Found by the migration, it would leave every list reading the whole table."""
    engine = create_engine(make_settings(database_url=empty_postgres_url))
    try:
        await migrate_to(engine, BEFORE_THE_OWNER_INDEXES)
        run_readme_index_statements(empty_postgres_url)
        with psycopg.connect(empty_postgres_url, autocommit=True) as connection:
            # As the cancelled build leaves it (the test runs as a superuser).
            connection.execute(
                "UPDATE pg_index SET indisvalid = false"
                " WHERE indexrelid IN ('ix_tasks_owner'::regclass, 'ix_tasks_user_id'::regclass)"
            )
        assert [valid for _, _, valid in await task_indexes(engine)] == [False, True, False]
        await upgrade_schema(engine)
        assert [valid for _, _, valid in await task_indexes(engine)] == [True, True, True]
    finally:
        await engine.dispose()


async def test_a_migration_behind_a_long_transaction_gives_up_instead_of_queueing(
    empty_postgres_url: str,
) -> None:
    """Waiting for its lock on `tasks`, a migration would hold up every request queued behind
    it: it fails after db.MIGRATION_LOCK_TIMEOUT_MS instead, and succeeds once the way is clear."""
    engine = create_engine(make_settings(database_url=empty_postgres_url))
    try:
        await migrate_to(engine, BEFORE_THE_OWNER_INDEXES)
        with psycopg.connect(empty_postgres_url) as holder:
            # A reader in a long transaction; PostgreSQL ends it after 30 s, so that a migration
            # without a lock timeout fails this test rather than hang it.
            holder.execute("SET idle_in_transaction_session_timeout = '30s'")
            holder.execute("SELECT count(*) FROM tasks")
            with pytest.raises(OperationalError) as waited:
                await upgrade_schema(engine)  # its DROP INDEX needs the table to itself
            assert isinstance(waited.value.orig, psycopg.errors.LockNotAvailable)
        await upgrade_schema(engine)  # the reader is gone
        assert [name for name, _, _ in await task_indexes(engine)] == [
            "ix_tasks_owner",
            "ix_tasks_owner_long",
            "ix_tasks_user_id",
        ]
    finally:
        await engine.dispose()


async def waiting_on_the_lock(connection: AsyncConnection, expected: int) -> bool:
    """Whether `expected` other sessions come to wait on an advisory lock within 30 s."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event = 'advisory'"
    )
    for _ in range(300):
        # Activity is snapshotted once per transaction unless the snapshot is cleared.
        await connection.execute(text("SELECT pg_stat_clear_snapshot()"))
        if await connection.scalar(query) == expected:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_an_upgrade_waits_for_one_already_running(empty_postgres_url: str) -> None:
    """Instances starting together take turns: one migrates, the others then find it done.

    PostgreSQL only: it is where several instances share one database."""
    empty_database_url = empty_postgres_url
    engine = create_engine(make_settings(database_url=empty_database_url))
    environment = {**os.environ, "DATABASE_URL": empty_database_url, "ENVIRONMENT": "test"}
    try:
        async with engine.connect() as holder:
            # Stand in for an instance that is migrating right now.
            await holder.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            # Separate processes, as instances are (Alembic keeps per-process global state).
            upgrades = [
                await asyncio.create_subprocess_exec(
                    *(sys.executable, "-m", "alembic", "upgrade", "head"),
                    cwd=BACKEND_DIR,
                    env=environment,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                )
                for _ in range(3)
            ]
            assert await waiting_on_the_lock(holder, expected=3)
            assert [process.returncode for process in upgrades] == [None] * 3
            assert "tasks" not in await table_names(engine)
            await holder.execute(
                text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
        outputs = await asyncio.gather(*(process.communicate() for process in upgrades))
        assert [process.returncode for process in upgrades] == [0] * 3, outputs
        assert await table_names(engine) == SCHEMA_TABLES
    finally:
        await engine.dispose()
