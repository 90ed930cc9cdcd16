"""Real faults on the real PostgreSQL: dropped connections, a silent database, SIGTERM mid-request,
two instances sharing one database."""

import asyncio
import contextlib
import signal
import sqlite3
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from httpx import AsyncClient
from sqlalchemy import text

from errors import DatabaseUnavailable
from tests.jwks_server import silent_listener
from tests.support import auth, running_app, uvicorn_server


def tasks_url(user_id: str) -> str:
    return f"/api/{user_id}/tasks"


async def sessions_waiting_on_locks(url: str, until: Callable[[int], bool]) -> int:
    """How many sessions of this database wait on a lock, polled (up to 30 s) until `until`."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as watch:
        for _ in range(600):
            row = await (
                await watch.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).fetchone()
            count = int(row[0]) if row is not None else 0
            if until(count):
                break
            await asyncio.sleep(0.05)
    return count


async def test_connections_killed_while_idle_are_replaced_unseen(postgres_url: str) -> None:
    """What a Neon suspend or a pooler restart does to the app's idle pooled connections.

    A connection idle longer than DATABASE_PING_IDLE_SECONDS is pinged before use; one that was
    just working is not (a busy server would pay a round trip per request for nothing).
    """
    user = f"user-{uuid.uuid4().hex}"
    async with running_app(database_url=postgres_url, database_ping_idle_seconds=0.2) as client:
        warm = await asyncio.gather(
            *(client.get(tasks_url(user), headers=auth(user)) for _ in range(8))
        )
        assert {response.status_code for response in warm} == {200}
        async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as admin:
            killed = await admin.execute(
                # With a timeout, pg_terminate_backend waits until each process has exited.
                "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            row = await killed.fetchone()
            assert row is not None
            assert row[0] >= 1
        await asyncio.sleep(0.5)  # idle, as pooled connections are when Neon suspends
        after = await asyncio.gather(
            *(
                client.post(tasks_url(user), json={"title": f"t{n}"}, headers=auth(user))
                for n in range(20)
            )
        )
        assert [response.status_code for response in after] == [201] * 20


async def test_a_database_that_never_answers_is_503_within_the_bound(tmp_path: Path) -> None:
    async with silent_listener() as address:
        url = address.replace("http://", "postgresql://postgres@") + "/app"
        async with running_app(
            database_url=url,
            migrate_on_startup=False,
            database_connect_timeout_seconds=2,
            request_timeout_seconds=4,
        ) as client:
            # The guard only keeps a regression from hanging the suite; the bound is the app's.
            async with asyncio.timeout(30):
                listed, health, ready = await asyncio.gather(
                    client.get(tasks_url("someone"), headers=auth("someone")),
                    client.get("/health"),
                    client.get("/health/ready"),
                )
    assert listed.status_code == 503
    assert listed.headers["Retry-After"].isdigit()
    assert "detail" in listed.json()
    assert health.status_code == 200
    assert ready.status_code == 503


async def test_the_app_starts_with_the_database_down(tmp_path: Path) -> None:
    """Port 1 refuses connections: start-up must not fail, and readiness says so."""
    async with running_app(database_url="postgresql://postgres@127.0.0.1:1/app") as client:
        assert (await client.get("/health")).status_code == 200
        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json() == {
            "detail": "The database schema is not ready yet; try again shortly."
        }
        listed = await client.get(tasks_url("someone"), headers=auth("someone"))
        assert listed.status_code == 503


async def test_statement_timeout_is_set_per_transaction(postgres_url: str) -> None:
    async with running_app(database_url=postgres_url, database_statement_timeout_ms=300) as client:
        app = client._transport.app  # type: ignore[attr-defined]
        async with app.state.database.atomic() as transaction:
            assert await transaction.scalar(text("SHOW statement_timeout")) == "300ms"
            with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
                await transaction.scalar(text("SELECT pg_sleep(2)"))


async def test_migrations_at_start_up_run_in_one_transaction(postgres_url: str) -> None:
    """The engine that migrates is not in autocommit: a transaction-scoped lock taken in it (as
    migrations/env.py takes the migration lock) is held until the block ends."""
    async with running_app(database_url=postgres_url) as client:
        app = client._transport.app  # type: ignore[attr-defined]
        async with app.state.engine.begin() as connection:
            await connection.execute(text("SELECT pg_advisory_xact_lock(424242)"))
            await connection.execute(text("SELECT 1"))
            async with await psycopg.AsyncConnection.connect(postgres_url) as other:
                held = await (await other.execute("SELECT pg_try_advisory_lock(424242)")).fetchone()
            assert held == (False,)


async def test_a_statement_past_the_deadline_is_cancelled_on_the_server(
    postgres_url: str,
) -> None:
    """Single statements run in autocommit: the request deadline bounds them, and cancelling
    the request cancels the statement in PostgreSQL too (no query left running)."""
    user = f"user-{uuid.uuid4().hex}"
    # The task is created, and checked afterwards, through an app with the default deadline:
    # only the blocked request is meant to outlive its deadline, and on a slow machine the
    # others could outlive 1 s too.
    async with (
        running_app(database_url=postgres_url) as client,
        running_app(database_url=postgres_url, request_timeout_seconds=1) as hurried,
    ):
        created = await client.post(tasks_url(user), json={"title": "t"}, headers=auth(user))
        task_url = f"{tasks_url(user)}/{created.json()['id']}"
        async with await psycopg.AsyncConnection.connect(postgres_url) as blocker:
            await blocker.execute("LOCK TABLE tasks IN EXCLUSIVE MODE")
            async with asyncio.timeout(30):
                stuck = await hurried.patch(f"{task_url}/complete", headers=auth(user))
            assert stuck.status_code == 503
            assert stuck.headers["Retry-After"].isdigit()
            # Cancelled on the server too: nothing of ours still waits on the lock.
            assert (
                await sessions_waiting_on_locks(postgres_url, until=lambda count: count == 0) == 0
            )
            await blocker.rollback()
        after = await client.get(task_url, headers=auth(user))
        assert after.json()["completed"] is False


async def test_a_write_that_another_sqlite_writer_blocks_is_a_503_within_the_deadline(
    tmp_path: Path,
) -> None:
    """The embedded SQLite database: a write waits for the file's lock in a thread that the
    request deadline cannot interrupt, so SQLite itself gives up first and the 503 comes in
    time (before, it came after SQLite's own 30 s)."""
    database = tmp_path / "db.sqlite"
    user = f"user-{uuid.uuid4().hex}"
    async with running_app(
        database_url=f"sqlite:///{database}", request_timeout_seconds=2
    ) as client:
        blocker = sqlite3.connect(database)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
            async with asyncio.timeout(60):
                blocked = await client.post(
                    tasks_url(user), json={"title": "t"}, headers=auth(user)
                )
        finally:
            blocker.rollback()
            blocker.close()
        # The database's answer, not the deadline's ("could not answer in time"), which comes
        # only once the thread is free.
        assert blocked.status_code == 503
        assert blocked.json()["detail"] == DatabaseUnavailable.detail
        assert (await client.get(tasks_url(user), headers=auth(user))).json() == []
        retried = await client.post(tasks_url(user), json={"title": "t"}, headers=auth(user))
        assert retried.status_code == 201


async def test_two_instances_create_once_for_one_idempotency_key(postgres_url: str) -> None:
    user = f"user-{uuid.uuid4().hex}"
    key = str(uuid.uuid4())
    headers = {**auth(user), "Idempotency-Key": key}
    async with (
        running_app(database_url=postgres_url) as first,
        running_app(database_url=postgres_url) as second,
    ):
        responses = await asyncio.gather(
            *(
                (first if n % 2 else second).post(
                    tasks_url(user), json={"title": "once"}, headers=headers
                )
                for n in range(10)
            )
        )
        listed = await first.get(tasks_url(user), headers=auth(user))
    assert {response.status_code for response in responses} == {201}
    assert len({response.json()["id"] for response in responses}) == 1
    assert len(listed.json()) == 1


async def until_nothing_listens(base_url: str) -> None:
    """Polls (up to 30 s) until connections to the server are refused: the first thing uvicorn
    does when it shuts down is to close its listening socket."""
    port = httpx.URL(base_url).port
    for _ in range(600):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return
        writer.close()
        with contextlib.suppress(OSError):  # reset by a server closing its socket meanwhile
            await writer.wait_closed()
        await asyncio.sleep(0.05)
    raise AssertionError(f"{base_url} still accepts connections")


@pytest.fixture
def server(postgres_url: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    with uvicorn_server(postgres_url) as running:
        yield running


async def test_sigterm_lets_in_flight_requests_finish_and_commit(
    server: tuple[subprocess.Popen[bytes], str], postgres_url: str
) -> None:
    process, base_url = server
    user = f"user-{uuid.uuid4().hex}"
    async with await psycopg.AsyncConnection.connect(postgres_url) as blocker:
        # Hold the table so that the creates are in flight when SIGTERM arrives.
        await blocker.execute("LOCK TABLE tasks IN EXCLUSIVE MODE")
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            creates = [
                asyncio.create_task(
                    http.post(tasks_url(user), json={"title": f"t{n}"}, headers=auth(user))
                )
                for n in range(8)
            ]
            # Every create has reached its INSERT before the signal: one the server had not read
            # yet would be refused by the shutdown, rightly, and is not what this test is about.
            waiting = await sessions_waiting_on_locks(postgres_url, until=lambda count: count >= 8)
            assert waiting == 8
            process.send_signal(signal.SIGTERM)
            # The creates are released only once the shutdown has begun.
            await until_nothing_listens(base_url)
            await blocker.commit()  # releases the lock; the creates now finish
            responses = await asyncio.gather(*creates)
    assert [response.status_code for response in responses] == [201] * 8
    # uvicorn re-raises the signal once shut down, so the exit status says "terminated".
    assert await asyncio.to_thread(process.wait, 20) in {0, -signal.SIGTERM}
    async with await psycopg.AsyncConnection.connect(postgres_url) as check:
        stored = await (
            await check.execute("SELECT count(*) FROM tasks WHERE user_id = %s", (user,))
        ).fetchone()
    assert stored == (8,)


async def test_an_unreachable_database_never_yields_a_500(client: AsyncClient) -> None:
    """The session app stays healthy after the fault tests above (a sanity check on isolation)."""
    assert (await client.get("/health/ready")).status_code == 200
