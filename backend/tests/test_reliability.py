"""Retries, concurrent edits and abuse: idempotent creates, ETags, rate limits, request logs."""

import asyncio
import logging
import uuid
from pathlib import Path

import pytest
from httpx import AsyncClient
from redis.asyncio import Redis

from dependencies import MOST_IF_MATCH_VERSIONS
from tests.support import ALICE, BOB, auth, running_app


def tasks_url(user_id: str = ALICE, suffix: str = "") -> str:
    return f"/api/{user_id}/tasks{suffix}"


def with_key(key: str, user_id: str = ALICE) -> dict[str, str]:
    return {**auth(user_id), "Idempotency-Key": key}


async def count_tasks(client: AsyncClient, user_id: str = ALICE) -> int:
    return len((await client.get(tasks_url(user_id), headers=auth(user_id))).json())


# --- Idempotency-Key -----------------------------------------------------------------------------


async def test_a_retried_create_returns_the_first_response_and_creates_once(
    client: AsyncClient,
) -> None:
    key = str(uuid.uuid4())
    first = await client.post(tasks_url(), json={"title": "once"}, headers=with_key(key))
    assert first.status_code == 201
    retry = await client.post(tasks_url(), json={"title": "once"}, headers=with_key(key))
    assert retry.status_code == 201
    assert retry.json() == first.json()
    assert retry.headers["Idempotent-Replayed"] == "true"
    # The first answer's ETag too, so that a client whose first answer was lost can use If-Match.
    assert retry.headers["ETag"] == first.headers["ETag"] == f'"{first.json()["id"]}.1"'
    assert await count_tasks(client) == 1


async def test_the_same_key_with_another_body_is_422(client: AsyncClient) -> None:
    key = str(uuid.uuid4())
    await client.post(tasks_url(), json={"title": "first"}, headers=with_key(key))
    other = await client.post(tasks_url(), json={"title": "second"}, headers=with_key(key))
    assert other.status_code == 422
    assert other.json() == {
        "detail": [
            {
                "type": "idempotency_key_reused",
                "loc": ["header", "Idempotency-Key"],
                "msg": "This Idempotency-Key was already used with a different request body.",
            }
        ]
    }
    assert await count_tasks(client) == 1


async def test_concurrent_requests_with_one_key_create_one_task(client: AsyncClient) -> None:
    key = str(uuid.uuid4())
    responses = await asyncio.gather(
        *(
            client.post(tasks_url(), json={"title": "double click"}, headers=with_key(key))
            for _ in range(10)
        )
    )
    assert {response.status_code for response in responses} == {201}
    assert len({response.json()["id"] for response in responses}) == 1
    assert await count_tasks(client) == 1


async def test_keys_belong_to_their_user(client: AsyncClient) -> None:
    key = str(uuid.uuid4())
    mine = await client.post(tasks_url(ALICE), json={"title": "a"}, headers=with_key(key, ALICE))
    theirs = await client.post(tasks_url(BOB), json={"title": "b"}, headers=with_key(key, BOB))
    assert theirs.status_code == 201
    assert theirs.json()["id"] != mine.json()["id"]
    assert theirs.json()["user_id"] == BOB


async def test_a_create_without_a_key_is_never_deduplicated(client: AsyncClient) -> None:
    for _ in range(2):
        assert (
            await client.post(tasks_url(), json={"title": "x"}, headers=auth())
        ).status_code == 201
    assert await count_tasks(client) == 2


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "tab\there"])
async def test_an_unusable_key_is_422(client: AsyncClient, key: str) -> None:
    response = await client.post(tasks_url(), json={"title": "x"}, headers=with_key(key))
    assert response.status_code == 422
    assert await count_tasks(client) == 0


async def test_an_expired_key_can_be_used_afresh(tmp_path: Path) -> None:
    async with running_app(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", idempotency_key_ttl_seconds=60
    ) as client:
        key = str(uuid.uuid4())
        first = await client.post(tasks_url(), json={"title": "a"}, headers=with_key(key))
        app = client._transport.app  # type: ignore[attr-defined]
        async with app.state.engine.begin() as connection:
            from sqlalchemy import text

            await connection.execute(
                text("UPDATE idempotency_keys SET created_at = '2000-01-01 00:00:00+00:00'")
            )
        again = await client.post(tasks_url(), json={"title": "a"}, headers=with_key(key))
        assert again.status_code == 201
        assert again.json()["id"] != first.json()["id"]
        assert "Idempotent-Replayed" not in again.headers


# --- ETag, If-Match, If-None-Match ---------------------------------------------------------------


async def test_get_returns_an_etag_that_changes_with_every_write(client: AsyncClient) -> None:
    created = await client.post(tasks_url(), json={"title": "t"}, headers=auth())
    url = tasks_url(suffix=f"/{created.json()['id']}")
    first = (await client.get(url, headers=auth())).headers["ETag"]
    assert first == created.headers["ETag"]
    updated = await client.put(url, json={"title": "t2"}, headers=auth())
    assert updated.headers["ETag"] != first
    assert (await client.get(url, headers=auth())).headers["ETag"] == updated.headers["ETag"]


async def test_if_none_match_gives_304_while_unchanged(client: AsyncClient) -> None:
    created = await client.post(tasks_url(), json={"title": "t"}, headers=auth())
    url = tasks_url(suffix=f"/{created.json()['id']}")
    etag = created.headers["ETag"]
    unchanged = await client.get(url, headers={**auth(), "If-None-Match": etag})
    assert unchanged.status_code == 304
    assert unchanged.content == b""
    await client.patch(f"{url}/complete", headers=auth())
    changed = await client.get(url, headers={**auth(), "If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.json()["completed"] is True


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("PUT", "", {"title": "mine"}),
        ("PATCH", "", {"title": "mine"}),
        ("PATCH", "/complete", None),
        ("DELETE", "", None),
    ],
)
async def test_a_stale_if_match_is_412_and_changes_nothing(
    client: AsyncClient, method: str, suffix: str, body: dict[str, str] | None
) -> None:
    created = await client.post(tasks_url(), json={"title": "original"}, headers=auth())
    url = tasks_url(suffix=f"/{created.json()['id']}")
    stale = created.headers["ETag"]
    other_tab = await client.put(url, json={"title": "other tab"}, headers=auth())
    response = await client.request(
        method, f"{url}{suffix}", json=body, headers={**auth(), "If-Match": stale}
    )
    assert response.status_code == 412
    assert response.json()["detail"].startswith("The task has changed")
    current = await client.get(url, headers=auth())
    assert current.json() == other_tab.json()


async def test_a_current_if_match_lets_the_write_through(client: AsyncClient) -> None:
    created = await client.post(tasks_url(), json={"title": "t"}, headers=auth())
    url = tasks_url(suffix=f"/{created.json()['id']}")
    etag = created.headers["ETag"]
    for template in ("{}", '"nope", {}'):
        header = template.format(etag)
        response = await client.put(
            url, json={"title": "new"}, headers={**auth(), "If-Match": header}
        )
        assert response.status_code == 200, header
        etag = response.headers["ETag"]
    # If-Match compares strongly: a weak tag never matches.
    weak = await client.put(url, json={"title": "x"}, headers={**auth(), "If-Match": f"W/{etag}"})
    assert weak.status_code == 412
    star = await client.delete(url, headers={**auth(), "If-Match": "*"})
    assert star.status_code == 204


@pytest.mark.parametrize("stale_tags", [1, 7, 8, 12])
@pytest.mark.parametrize(
    ("method", "suffix", "body", "success"),
    [
        ("PATCH", "", {"title": "mine"}, 200),
        ("PATCH", "/complete", None, 200),
        ("DELETE", "", None, 204),
    ],
)
async def test_if_match_may_name_several_versions(
    client: AsyncClient,
    stale_tags: int,
    method: str,
    suffix: str,
    body: dict[str, str] | None,
    success: int,
) -> None:
    """Only stale ETags listed: 412. The current one among them (the highest version, so the
    last comparison of the statement's): the write goes through. Up to and past the number of
    ETags whose statements are kept (`queries.MOST_VERSIONS_KEPT`)."""
    created = await client.post(tasks_url(), json={"title": "t"}, headers=auth())
    task_id = created.json()["id"]
    url = tasks_url(suffix=f"/{task_id}")
    current = created.headers["ETag"]
    for version in range(2, stale_tags + 2):
        renamed = await client.put(url, json={"title": f"v{version}"}, headers=auth())
        current = renamed.headers["ETag"]
    assert current == f'"{task_id}.{stale_tags + 1}"'
    stale = [f'"{task_id}.{version}"' for version in range(1, stale_tags + 1)]
    none_current = await client.request(
        method, f"{url}{suffix}", json=body, headers={**auth(), "If-Match": ", ".join(stale)}
    )
    assert none_current.status_code == 412
    listed = ", ".join([current, *stale])
    response = await client.request(
        method, f"{url}{suffix}", json=body, headers={**auth(), "If-Match": listed}
    )
    assert response.status_code == success


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [("PUT", "", {"title": "mine"}), ("PATCH", "/complete", None), ("DELETE", "", None)],
)
async def test_if_match_naming_too_many_versions_is_a_400_and_changes_nothing(
    client: AsyncClient, method: str, suffix: str, body: dict[str, str] | None
) -> None:
    """Each version named is a comparison in the statement: past MOST_IF_MATCH_VERSIONS the
    request is refused (on SQLite a thousand made the statement too deep to run: a 503 that
    every retry got again). Up to it, the current version among them still matches."""
    created = await client.post(tasks_url(), json={"title": "t"}, headers=auth())
    task_id = created.json()["id"]
    url = tasks_url(suffix=f"/{task_id}")
    others = [f'"{task_id}.{version}"' for version in range(2, 2 + MOST_IF_MATCH_VERSIONS)]
    too_many = ", ".join([created.headers["ETag"], *others])
    refused = await client.request(
        method, f"{url}{suffix}", json=body, headers={**auth(), "If-Match": too_many}
    )
    assert refused.status_code == 400
    assert refused.json()["detail"] == (
        f"If-Match names more than {MOST_IF_MATCH_VERSIONS} versions of this task."
    )
    assert (await client.get(url, headers=auth())).json() == created.json()
    most = ", ".join([created.headers["ETag"], *others[:-1]])
    allowed = await client.request(
        method, f"{url}{suffix}", json=body, headers={**auth(), "If-Match": most}
    )
    assert allowed.status_code in {200, 204}


async def test_if_match_on_a_missing_task_is_404(client: AsyncClient) -> None:
    response = await client.put(
        tasks_url(suffix="/987654"), json={"title": "x"}, headers={**auth(), "If-Match": '"1.1"'}
    )
    assert response.status_code == 404


async def test_only_one_of_two_concurrent_conditional_writes_wins(client: AsyncClient) -> None:
    created = await client.post(tasks_url(), json={"title": "t"}, headers=auth())
    url = tasks_url(suffix=f"/{created.json()['id']}")
    etag = created.headers["ETag"]
    responses = await asyncio.gather(
        *(
            client.put(url, json={"title": f"tab {n}"}, headers={**auth(), "If-Match": etag})
            for n in range(6)
        )
    )
    assert sorted(response.status_code for response in responses) == [200] + [412] * 5


# --- Rate limits ---------------------------------------------------------------------------------


async def test_a_user_over_the_limit_gets_429_with_retry_after(tmp_path: Path) -> None:
    async with running_app(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", rate_limit_per_second=5
    ) as client:
        # 20 at once: at 5 a second, no 429 would take them spreading over four one-second
        # windows (sent one after another, 8 could fall 4 and 4 on each side of a boundary).
        responses = await asyncio.gather(
            *(client.get(tasks_url(), headers=auth()) for _ in range(20))
        )
        codes = [response.status_code for response in responses]
        assert codes.count(429) >= 1
        assert set(codes) == {200, 429}
        limited = next(response for response in responses if response.status_code == 429)
        assert limited.json() == {"detail": "Too many requests for this user; slow down."}
        assert limited.headers["Retry-After"] == "1"
        # Other users are not affected.
        assert (await client.get(tasks_url(BOB), headers=auth(BOB))).status_code == 200


async def test_instances_share_the_limit_through_redis(tmp_path: Path) -> None:
    redis = Redis.from_url("redis://127.0.0.1:6379/15")
    try:
        await redis.ping()
    except OSError:
        pytest.skip("Redis is not running at 127.0.0.1:6379")
    finally:
        await redis.aclose()
    user = f"user-{uuid.uuid4().hex}"
    settings = {
        "database_url": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "rate_limit_per_second": 6,
        "redis_url": "redis://127.0.0.1:6379/15",
    }
    async with running_app(**settings) as first, running_app(**settings) as second:
        for _ in range(3):
            # 6 to each instance at once: alone, neither would refuse one; a shared counter
            # refuses 6 of the 12, unless a second's boundary splits the burst 6 and 6, hence
            # another burst then.
            responses = await asyncio.gather(
                *(
                    (first if n % 2 else second).get(tasks_url(user), headers=auth(user))
                    for n in range(12)
                )
            )
            codes = [response.status_code for response in responses]
            if 429 in codes:
                break
    assert codes.count(429) >= 1


async def test_an_unreachable_redis_does_not_fail_requests(tmp_path: Path) -> None:
    async with running_app(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        rate_limit_per_second=5,
        redis_url="redis://127.0.0.1:1/0",
    ) as client:
        assert (await client.get(tasks_url(), headers=auth())).status_code == 200


# --- Request logs and headers --------------------------------------------------------------------


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_each_request_is_logged_once_without_secrets(client: AsyncClient) -> None:
    collect = Collect()
    logger = logging.getLogger("todo")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(collect)
    try:
        token_headers = {**auth(), "X-Request-ID": "trace-123"}
        response = await client.get(
            tasks_url(suffix="?search=secret-search"), headers=token_headers
        )
        await client.get(tasks_url(), headers={"Authorization": "Bearer not-a-token"})
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)
    assert response.headers["X-Request-ID"] == "trace-123"
    lines = [record for record in collect.records if record.name == "todo.request"]
    assert len(lines) == 2
    record = lines[0]
    assert record.__dict__["route"] == "/api/{user_id}/tasks"
    assert record.__dict__["status"] == 200
    assert record.__dict__["request_id"] == "trace-123"
    assert lines[1].__dict__["status"] == 401
    text = "\n".join(f"{entry.getMessage()} {entry.__dict__}" for entry in collect.records)
    assert "secret-search" not in text
    assert ALICE not in text
    assert token_headers["Authorization"].split()[1] not in text
    assert "not-a-token" not in text


async def test_a_request_id_is_made_when_none_or_a_bad_one_is_sent(client: AsyncClient) -> None:
    made = await client.get("/health")
    assert len(made.headers["X-Request-ID"]) == 32
    bad = await client.get("/health", headers={"X-Request-ID": "x" * 500})
    assert bad.headers["X-Request-ID"] != "x" * 500


async def test_security_headers(client: AsyncClient) -> None:
    api = await client.get(tasks_url(), headers=auth())
    assert api.headers["X-Content-Type-Options"] == "nosniff"
    assert api.headers["Cache-Control"] == "no-store"
    health = await client.get("/health")
    assert health.headers["X-Content-Type-Options"] == "nosniff"


def test_production_logs_are_json_lines() -> None:
    import json

    from logs import JSONFormatter, configure_logging
    from tests.support import make_settings

    configure_logging(make_settings(environment="test"))
    logger = logging.getLogger("todo")
    assert not isinstance(logger.handlers[0].formatter, JSONFormatter)
    try:
        configure_logging(
            make_settings(
                environment="production",
                better_auth_secret="p" * 40,
                database_url="postgresql://app@db/app",
            )
        )
        formatter = logger.handlers[0].formatter
        assert isinstance(formatter, JSONFormatter)
        record = logging.makeLogRecord(
            {
                "name": "todo.request",
                "levelno": logging.INFO,
                "levelname": "INFO",
                "msg": "%s %s",
                "args": ("GET", "/api/{user_id}/tasks"),
                "status": 200,
                "request_id": "abc",
            }
        )
        line = json.loads(formatter.format(record))
    finally:
        configure_logging(make_settings(environment="test"))
    assert line["message"] == "GET /api/{user_id}/tasks"
    assert line["level"] == "INFO"
    assert line["status"] == 200
    assert line["request_id"] == "abc"
    assert line["time"].endswith("+00:00")


@pytest.mark.parametrize("version", ["3000000000", "99999999999999999999", "9" * 5000])
async def test_an_if_match_version_beyond_the_column_is_412_not_an_error(
    client: AsyncClient, version: str
) -> None:
    created = await client.post(tasks_url(), json={"title": "t"}, headers=auth())
    task_id = created.json()["id"]
    url = tasks_url(suffix=f"/{task_id}")
    header = {**auth(), "If-Match": f'"{task_id}.{version}"'}
    assert (await client.put(url, json={"title": "x"}, headers=header)).status_code == 412
    assert (await client.delete(url, headers=header)).status_code == 412
    missing = tasks_url(suffix="/987654321")
    assert (await client.put(missing, json={"title": "x"}, headers=header)).status_code == 404
