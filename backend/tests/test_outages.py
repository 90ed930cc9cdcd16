"""Neon's real life on a private PostgreSQL the tests may stop, crash and restart.

- TLS with SCRAM and channel binding, reached with a URL written the way Neon's console writes it;
- the database restarted, and crashed, under concurrent writes: only 503s meanwhile, recovery
  without restarting the app, and with Idempotency-Key retries every create lands exactly once;
- the app started while the database is down becomes ready by itself;
- PgBouncer in transaction mode in front: 300 mixed concurrent requests, no errors.
"""

import asyncio
import itertools
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from httpx import AsyncClient, Response

from tests.pg_cluster import PrivateCluster, private_cluster
from tests.pgbouncer import pgbouncer
from tests.support import auth, running_app

PASSWORD = "n3on-style-Passw0rd"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[PrivateCluster]:
    with private_cluster(tmp_path) as started:
        yield started


async def test_tls_scram_and_channel_binding_with_a_neon_style_url(tmp_path: Path) -> None:
    with private_cluster(tmp_path, tls=True, scram_password=PASSWORD) as secured:
        url = secured.url
        assert url.endswith("?sslmode=require&channel_binding=require")
        user = f"user-{uuid.uuid4().hex}"
        async with running_app(database_url=url) as client:
            created = await client.post(
                f"/api/{user}/tasks", json={"title": "tls"}, headers=auth(user)
            )
            assert created.status_code == 201
            listed = await client.get(f"/api/{user}/tasks", headers=auth(user))
            assert [task["id"] for task in listed.json()] == [created.json()["id"]]
            app = client._transport.app  # type: ignore[attr-defined]
            async with app.state.engine.connect() as connection:
                from sqlalchemy import text

                ssl_in_use = await connection.scalar(
                    text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                )
            assert ssl_in_use is True


async def create_with_key(client: AsyncClient, user: str, key: str) -> Response:
    return await client.post(
        f"/api/{user}/tasks",
        json={"title": f"task {key}"},
        headers={**auth(user), "Idempotency-Key": key},
    )


async def drive_writes_through(
    cluster: PrivateCluster, client: AsyncClient, user: str, outage: str
) -> None:
    """Writers keep creating while the database goes away and comes back."""
    keys = [str(uuid.uuid4()) for _ in range(120)]
    pending = iter(keys)
    outcomes: dict[str, int] = {}

    async def writer() -> None:
        for key in pending:
            outcomes[key] = (await create_with_key(client, user, key)).status_code
            await asyncio.sleep(0.01)

    async def break_the_database() -> None:
        await asyncio.sleep(0.3)
        if outage == "restart":
            await asyncio.to_thread(cluster.restart)
        else:
            await asyncio.to_thread(cluster.kill)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(cluster.start)

    await asyncio.gather(break_the_database(), *(writer() for _ in range(6)))

    assert set(outcomes.values()) <= {201, 503}, outcomes
    # Recovery without restarting the app: the clients retry what failed, with the same keys.
    for key, status in outcomes.items():
        if status != 201:
            retried = await create_with_key(client, user, key)
            assert retried.status_code == 201
    listed = await client.get(f"/api/{user}/tasks", headers=auth(user))
    assert listed.status_code == 200
    titles = sorted(task["title"] for task in listed.json())
    # Every acknowledged create is there, exactly once: no loss, no duplicate, nothing partial.
    assert titles == sorted(f"task {key}" for key in keys)


@pytest.mark.parametrize("outage", ["restart", "crash"])
async def test_writes_through_a_database_restart_lose_nothing(
    cluster: PrivateCluster, outage: str
) -> None:
    user = f"user-{uuid.uuid4().hex}"
    async with running_app(database_url=cluster.url, database_connect_timeout_seconds=3) as client:
        await drive_writes_through(cluster, client, user, outage)
        assert (await client.get("/health/ready")).status_code == 200


async def test_an_app_started_while_the_database_is_down_becomes_ready(
    cluster: PrivateCluster,
) -> None:
    await asyncio.to_thread(cluster.stop)
    user = f"user-{uuid.uuid4().hex}"
    async with running_app(database_url=cluster.url) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/health/ready")).status_code == 503
        await asyncio.to_thread(cluster.start)
        # Polled for up to two minutes: the background migration retries at growing intervals,
        # up to 30 s apart (startup.RETRY_SECONDS), and on a slow machine the database can come
        # back just after a retry, to be seen only by the next one.
        for _ in range(1200):
            if (await client.get("/health/ready")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert (await client.get("/health/ready")).status_code == 200
        created = await client.post(f"/api/{user}/tasks", json={"title": "up"}, headers=auth(user))
        assert created.status_code == 201


async def test_300_mixed_requests_through_pgbouncer_in_transaction_mode(
    cluster: PrivateCluster, tmp_path: Path
) -> None:
    with pgbouncer(cluster.host, cluster.port, cluster.dbname, tmp_path) as pooled_url:
        async with running_app(
            database_url=pooled_url,
            # Migrations take the direct connection, as on Neon.
            direct_database_url=cluster.url,
            # The 300 requests share the app's 10 connections: the last ones wait for the whole
            # burst ahead of them, which a slow machine could stretch past the default pool
            # timeout (5 s) and request deadline (11 s). This test is about the answers through
            # PgBouncer; those bounds have tests of their own (test_pool.py, test_faults.py).
            database_pool_timeout_seconds=60,
            request_timeout_seconds=120,
        ) as client:
            users = [f"user-{uuid.uuid4().hex}" for _ in range(5)]
            seeded = {
                user: [
                    (
                        await client.post(
                            f"/api/{user}/tasks", json={"title": f"seed {n}"}, headers=auth(user)
                        )
                    ).json()["id"]
                    for n in range(4)
                ]
                for user in users
            }
            rng = random.Random(7)
            counter = itertools.count()

            async def one_request() -> Response:
                user = rng.choice(users)
                task_id = rng.choice(seeded[user])
                base = f"/api/{user}/tasks"
                choice = rng.random()
                if choice < 0.4:
                    return await client.get(base, headers=auth(user))
                if choice < 0.6:
                    return await client.get(f"{base}/{task_id}", headers=auth(user))
                if choice < 0.75:
                    return await client.patch(f"{base}/{task_id}/complete", headers=auth(user))
                if choice < 0.9:
                    return await client.put(
                        f"{base}/{task_id}", json={"title": "edited"}, headers=auth(user)
                    )
                return await client.post(
                    base, json={"title": f"new {next(counter)}"}, headers=auth(user)
                )

            responses = await asyncio.gather(*(one_request() for _ in range(300)))
    statuses = [response.status_code for response in responses]
    assert all(status in {200, 201} for status in statuses), sorted(set(statuses))
