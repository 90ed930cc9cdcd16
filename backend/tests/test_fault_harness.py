"""The fault-injection harness itself: private PostgreSQL servers and PgBouncer really do what
the fault tests rely on (stop, crash, TLS + SCRAM, transaction pooling)."""

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.pg_cluster import PrivateCluster, private_cluster
from tests.pgbouncer import PgBouncer, pgbouncer

PASSWORD = "correct horse: battery/staple"


def connect(
    url: str, *, autocommit: bool = False, prepare_threshold: int | None = 5
) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(
        url, autocommit=autocommit, prepare_threshold=prepare_threshold, connect_timeout=5
    )


def select_one(url: str) -> object:
    with connect(url) as connection:
        row = connection.execute("SELECT 1").fetchone()
    assert row is not None
    return row[0]


def refused(url: str) -> str:
    with pytest.raises(psycopg.OperationalError) as caught:
        connect(url).close()
    return str(caught.value)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[PrivateCluster]:
    with private_cluster(tmp_path) as started:
        yield started


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    with private_cluster(
        tmp_path_factory.mktemp("secure"), tls=True, scram_password=PASSWORD
    ) as started:
        yield started


def test_a_private_cluster_stops_and_starts_again(cluster: PrivateCluster) -> None:
    assert cluster.is_running()
    assert cluster.port != 5432
    assert select_one(cluster.url) == 1
    assert select_one(cluster.admin_url) == 1

    cluster.stop()
    assert not cluster.is_running()
    assert "Connection refused" in refused(cluster.url)

    cluster.start()
    assert cluster.is_running()
    assert select_one(cluster.url) == 1

    cluster.restart()
    assert select_one(cluster.url) == 1


def test_kill_is_a_crash_that_keeps_committed_data(cluster: PrivateCluster) -> None:
    with connect(cluster.url, autocommit=True) as setup:
        setup.execute("CREATE TABLE facts (value text)")
        setup.execute("INSERT INTO facts VALUES ('committed')")
    in_flight = connect(cluster.url)
    in_flight.execute("INSERT INTO facts VALUES ('never committed')")

    cluster.kill()

    assert not cluster.is_running()
    with pytest.raises(psycopg.OperationalError):
        in_flight.execute("COMMIT")
    in_flight.close()
    assert "Connection refused" in refused(cluster.url)

    cluster.start()
    with connect(cluster.url) as after:
        rows = after.execute("SELECT value FROM facts").fetchall()
    assert rows == [("committed",)]
    # A crash, not a shutdown: the restart had to recover from the WAL.
    assert "automatic recovery in progress" in cluster.log_file.read_text()


def test_tls_scram_cluster_accepts_the_app_role_over_tls_with_channel_binding(
    secure_cluster: PrivateCluster,
) -> None:
    assert "sslmode=require" in secure_cluster.url
    assert "channel_binding=require" in secure_cluster.url
    with connect(secure_cluster.url) as connection:
        row = connection.execute(
            "SELECT ssl, current_user FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone()
    assert row == (True, "app")

    verified = make_conninfo(
        secure_cluster.url, sslmode="verify-full", sslrootcert=str(secure_cluster.ca_file)
    )
    assert select_one(verified) == 1

    key = secure_cluster.key_file.stat()
    assert stat.S_IMODE(key.st_mode) == 0o600
    assert key.st_uid == secure_cluster.user.uid


def test_tls_scram_cluster_refuses_a_wrong_password(secure_cluster: PrivateCluster) -> None:
    wrong = make_conninfo(secure_cluster.url, password="wrong")
    assert 'password authentication failed for user "app"' in refused(wrong)


def test_tls_scram_cluster_refuses_clients_without_tls(secure_cluster: PrivateCluster) -> None:
    plain = make_conninfo(secure_cluster.url, sslmode="disable", channel_binding="disable")
    assert "no pg_hba.conf entry" in refused(plain)


async def test_pgbouncer_pools_50_concurrent_psycopg_clients(
    cluster: PrivateCluster, tmp_path: Path
) -> None:
    with pgbouncer(cluster.host, cluster.port, cluster.dbname, tmp_path) as url:
        assert f":{cluster.port}/" not in url

        async def one_client(number: int) -> tuple[int, int]:
            async with await psycopg.AsyncConnection.connect(
                url, prepare_threshold=None, connect_timeout=5
            ) as connection:
                # Past psycopg's default prepare threshold (5): nothing may be prepared.
                for _ in range(7):
                    cursor = await connection.execute(
                        "SELECT %s::int, pg_backend_pid(), pg_sleep(0.01)", (number,)
                    )
                    row = await cursor.fetchone()
                assert row is not None
                return row[0], row[1]

        results = await asyncio.gather(*(one_client(number) for number in range(50)))

        assert sorted(value for value, _ in results) == list(range(50))
        # 50 clients shared at most default_pool_size (10) server connections.
        assert len({pid for _, pid in results}) <= 10

        admin = make_conninfo(url, dbname="pgbouncer")
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as console:
            cursor = await console.execute("SHOW POOLS")
            columns = [column.name for column in cursor.description or []]
            pools = [dict(zip(columns, row, strict=True)) for row in await cursor.fetchall()]
    app_pool = next(pool for pool in pools if pool["database"] == cluster.dbname)
    assert app_pool["pool_mode"] == "transaction"


def test_pgbouncer_authenticates_with_scram_in_front_of_a_tls_scram_cluster(
    secure_cluster: PrivateCluster, tmp_path: Path
) -> None:
    host, port, dbname = secure_cluster.host, secure_cluster.port, secure_cluster.dbname
    with pgbouncer(host, port, dbname, tmp_path, user="app", password=PASSWORD) as url:
        with connect(url, prepare_threshold=None) as connection:
            row = connection.execute(
                "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone()
        # The pooler logged in to the server as app, over TLS (the server has hostssl only).
        assert row == ("app", True)
        assert "SASL authentication failed" in refused(make_conninfo(url, password="wrong"))


@pytest.mark.parametrize("ci", ["", "true"])
def test_missing_tools_skip_locally_and_fail_under_ci(
    ci: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("PG_BINDIR", str(tmp_path))
    monkeypatch.setenv("PGBOUNCER", str(tmp_path / "pgbouncer"))
    expected = pytest.fail.Exception if ci else pytest.skip.Exception

    with pytest.raises(expected, match="PostgreSQL server binaries"):
        PrivateCluster(tmp_path / "cluster")
    with pytest.raises(expected, match="pgbouncer binary is not installed"):
        PgBouncer("127.0.0.1", 5432, "app", tmp_path)
    assert not (tmp_path / "cluster").exists()
    assert os.listdir(tmp_path) == []
