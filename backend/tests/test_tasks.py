"""The locked API, route by route, as the frontends use it (CONTRACT.md)."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi import FastAPI
from httpx import AsyncClient
from sqlalchemy.sql import Executable

from database import is_static
from tests.support import ALICE, BOB, auth

TASK_FIELDS = {"id", "user_id", "title", "description", "completed", "created_at", "updated_at"}


def tasks_url(user_id: str = ALICE, suffix: str = "") -> str:
    return f"/api/{user_id}/tasks{suffix}"


async def create(client: AsyncClient, owner: str = ALICE, /, **body: object) -> dict[str, object]:
    body.setdefault("title", "Buy milk")
    response = await client.post(tasks_url(owner), json=body, headers=auth(owner))
    assert response.status_code == 201, response.text
    task: dict[str, object] = response.json()
    return task


def parse_utc(value: object) -> datetime:
    assert isinstance(value, str)
    assert value.endswith(("Z", "+00:00")), value
    moment = datetime.fromisoformat(value)
    assert moment.utcoffset() is not None
    return moment


async def test_create_returns_201_with_the_whole_task(client: AsyncClient) -> None:
    before = datetime.now(UTC)
    response = await client.post(
        tasks_url(), json={"title": "Buy milk", "description": "2 litres"}, headers=auth()
    )
    assert response.status_code == 201
    task = response.json()
    assert set(task) == TASK_FIELDS
    assert isinstance(task["id"], int)
    assert task["user_id"] == ALICE
    assert task["title"] == "Buy milk"
    assert task["description"] == "2 litres"
    assert task["completed"] is False
    created_at = parse_utc(task["created_at"])
    assert parse_utc(task["updated_at"]) == created_at
    assert abs((created_at - before).total_seconds()) < 60


async def test_create_without_description_stores_null_not_empty(client: AsyncClient) -> None:
    assert (await create(client))["description"] is None
    assert (await create(client, description=""))["description"] is None
    assert (await create(client, description=None))["description"] is None


async def test_create_trims_the_title(client: AsyncClient) -> None:
    assert (await create(client, title="  Buy milk \n"))["title"] == "Buy milk"


async def test_create_ignores_read_only_and_unknown_fields(client: AsyncClient) -> None:
    task = await create(
        client,
        title="Mine",
        id=999999,
        user_id=BOB,
        created_at="2000-01-01T00:00:00Z",
        updated_at="2000-01-01T00:00:00Z",
        due_date="2030-01-01",
        priority="high",
    )
    assert task["user_id"] == ALICE
    assert task["id"] != 999999
    assert parse_utc(task["created_at"]).year >= 2026
    assert "due_date" not in task
    listed = (await client.get(tasks_url(), headers=auth())).json()
    assert [item["id"] for item in listed] == [task["id"]]
    bob_tasks = await client.get(tasks_url(BOB), headers=auth(BOB))
    assert bob_tasks.json() == []


async def test_list_is_a_bare_array_newest_first(client: AsyncClient) -> None:
    empty = await client.get(tasks_url(), headers=auth())
    assert empty.status_code == 200
    assert empty.json() == []
    first = await create(client, title="first")
    second = await create(client, title="second")
    third = await create(client, title="third")
    response = await client.get(tasks_url(), headers=auth())
    assert response.status_code == 200
    assert [task["id"] for task in response.json()] == [third["id"], second["id"], first["id"]]
    assert response.headers["X-Total-Count"] == "3"


async def test_list_shows_only_the_owners_tasks(client: AsyncClient) -> None:
    mine = await create(client, ALICE, title="alice's")
    await create(client, BOB, title="bob's")
    listed = (await client.get(tasks_url(ALICE), headers=auth(ALICE))).json()
    assert [task["id"] for task in listed] == [mine["id"]]


async def test_get_returns_the_task(client: AsyncClient) -> None:
    task = await create(client, description="details")
    response = await client.get(tasks_url(suffix=f"/{task['id']}"), headers=auth())
    assert response.status_code == 200
    assert response.json() == task


async def test_get_of_a_missing_task_is_404(client: AsyncClient) -> None:
    response = await client.get(tasks_url(suffix="/424242"), headers=auth())
    assert response.status_code == 404
    assert response.json() == {"detail": "Task not found."}


async def test_another_users_task_is_404_with_the_same_body(client: AsyncClient) -> None:
    bobs = await create(client, BOB, title="bob's secret")
    missing = await client.get(tasks_url(suffix="/424242"), headers=auth())
    for method, suffix, body in [
        ("GET", "", None),
        ("PUT", "", {"title": "stolen"}),
        ("PATCH", "", {"title": "stolen"}),
        ("PATCH", "/complete", None),
        ("DELETE", "", None),
    ]:
        response = await client.request(
            method, tasks_url(ALICE, f"/{bobs['id']}{suffix}"), json=body, headers=auth(ALICE)
        )
        assert response.status_code == 404, (method, suffix)
        assert response.json() == missing.json()
    untouched = await client.get(tasks_url(BOB, f"/{bobs['id']}"), headers=auth(BOB))
    assert untouched.json() == bobs


async def test_put_merges_only_the_fields_present(client: AsyncClient) -> None:
    task = await create(client, title="old", description="keep me")
    response = await client.put(
        tasks_url(suffix=f"/{task['id']}"), json={"title": "new"}, headers=auth()
    )
    assert response.status_code == 200
    updated = response.json()
    assert updated["title"] == "new"
    assert updated["description"] == "keep me"
    assert updated["completed"] is False
    assert updated["created_at"] == task["created_at"]
    assert parse_utc(updated["updated_at"]) >= parse_utc(task["updated_at"])
    stored = await client.get(tasks_url(suffix=f"/{task['id']}"), headers=auth())
    assert stored.json() == updated


async def test_put_accepts_completed_and_null_description(client: AsyncClient) -> None:
    task = await create(client, description="remove me")
    response = await client.put(
        tasks_url(suffix=f"/{task['id']}"),
        json={"completed": True, "description": None},
        headers=auth(),
    )
    assert response.status_code == 200
    assert response.json()["completed"] is True
    assert response.json()["description"] is None
    assert response.json()["title"] == task["title"]


async def test_put_with_the_whole_task_object_sent_back(client: AsyncClient) -> None:
    task = await create(client, title="round trip")
    echoed = {
        **task,
        "title": "edited",
        "user_id": BOB,
        "id": 1,
        "created_at": "1999-01-01T00:00:00Z",
        "due_date": None,
        "tags": ["x"],
    }
    response = await client.put(tasks_url(suffix=f"/{task['id']}"), json=echoed, headers=auth())
    assert response.status_code == 200
    updated = response.json()
    assert updated["id"] == task["id"]
    assert updated["user_id"] == ALICE
    assert updated["title"] == "edited"
    assert updated["created_at"] == task["created_at"]


async def test_patch_is_a_partial_update_too(client: AsyncClient) -> None:
    task = await create(client, title="old", description="keep")
    response = await client.patch(
        tasks_url(suffix=f"/{task['id']}"), json={"description": "changed"}, headers=auth()
    )
    assert response.status_code == 200
    assert response.json()["title"] == "old"
    assert response.json()["description"] == "changed"


async def test_complete_toggles_with_no_body_even_with_a_json_content_type(
    client: AsyncClient,
) -> None:
    task = await create(client)
    url = tasks_url(suffix=f"/{task['id']}/complete")
    headers = {**auth(), "Content-Type": "application/json"}
    first = await client.patch(url, headers=headers)
    assert first.status_code == 200
    assert first.json()["completed"] is True
    second = await client.patch(url, headers=auth())
    assert second.json()["completed"] is False
    third = await client.patch(url, json={}, headers=auth())
    assert third.json()["completed"] is True


async def test_complete_sets_with_an_explicit_value(client: AsyncClient) -> None:
    task = await create(client)
    url = tasks_url(suffix=f"/{task['id']}/complete")
    for _ in range(2):
        response = await client.patch(url, json={"completed": True}, headers=auth())
        assert response.status_code == 200
        assert response.json()["completed"] is True
    response = await client.patch(url, json={"completed": False}, headers=auth())
    assert response.json()["completed"] is False


async def test_concurrent_toggles_each_flip_once(client: AsyncClient) -> None:
    task = await create(client)
    url = tasks_url(suffix=f"/{task['id']}/complete")
    responses = await asyncio.gather(*(client.patch(url, headers=auth()) for _ in range(9)))
    assert [response.status_code for response in responses] == [200] * 9
    stored = await client.get(tasks_url(suffix=f"/{task['id']}"), headers=auth())
    assert stored.json()["completed"] is True  # flipped an odd number of times


async def test_delete_answers_204_with_an_empty_body(client: AsyncClient) -> None:
    task = await create(client)
    url = tasks_url(suffix=f"/{task['id']}")
    response = await client.delete(url, headers=auth())
    assert response.status_code == 204
    assert response.content == b""
    assert (await client.get(url, headers=auth())).status_code == 404
    assert (await client.delete(url, headers=auth())).status_code == 404


async def test_trailing_slashes_are_answered_without_a_redirect(client: AsyncClient) -> None:
    created = await client.post(tasks_url(suffix="/"), json={"title": "slash"}, headers=auth())
    assert created.status_code == 201
    task_id = created.json()["id"]
    listed = await client.get(tasks_url(suffix="/"), headers=auth())
    assert listed.status_code == 200
    assert [task["id"] for task in listed.json()] == [task_id]
    got = await client.get(tasks_url(suffix=f"/{task_id}/"), headers=auth())
    assert got.status_code == 200
    toggled = await client.patch(tasks_url(suffix=f"/{task_id}/complete/"), headers=auth())
    assert toggled.json()["completed"] is True
    deleted = await client.delete(tasks_url(suffix=f"/{task_id}/"), headers=auth())
    assert deleted.status_code == 204


async def test_user_ids_are_opaque_strings(client: AsyncClient) -> None:
    for user_id in ["someone@example.com", "42", "550e8400-e29b-41d4-a716-446655440000"]:
        task = await create(client, user_id, title=f"task of {user_id}")
        assert task["user_id"] == user_id
        listed = await client.get(tasks_url(user_id), headers=auth(user_id))
        assert [item["id"] for item in listed.json()] == [task["id"]]


async def test_data_persists_across_an_app_restart(client: AsyncClient) -> None:
    from fastapi import FastAPI
    from httpx import ASGITransport

    from main import create_app

    task = await create(client, title="survives")
    app: FastAPI = client._transport.app  # type: ignore[attr-defined]
    restarted = create_app(app.state.settings)
    async with restarted.router.lifespan_context(restarted):
        transport = ASGITransport(app=restarted)
        async with AsyncClient(transport=transport, base_url="http://test") as fresh:
            response = await fresh.get(tasks_url(suffix=f"/{task['id']}"), headers=auth())
    assert response.status_code == 200
    assert response.json() == task


# --- Statements: one per shape, the request's values as parameters ------------------------------


@pytest.fixture
def statements_run(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> list[Executable]:
    """Each statement object the app's database is given, in order, in a transaction too
    (`scalar` runs `fetch_one`)."""
    seen: list[Executable] = []

    def record(target: Any) -> None:
        for name in ("fetch_all", "fetch_one"):
            run = getattr(target, name)

            async def recording(
                statement: Executable, parameters: object = None, run: Any = run
            ) -> object:
                seen.append(statement)
                return await run(statement, parameters)

            monkeypatch.setattr(target, name, recording)

    database = app.state.database
    atomic = database.atomic

    @contextlib.asynccontextmanager
    async def recording_atomic() -> AsyncIterator[Any]:
        async with atomic() as transaction:
            record(transaction)
            yield transaction

    record(database)
    monkeypatch.setattr(database, "atomic", recording_atomic)
    return seen


async def test_requests_of_one_shape_reuse_one_statement(
    client: AsyncClient, statements_run: list[Executable]
) -> None:
    """Two requests that differ only in their values run the very same statement objects
    (built and compiled once, not per request), and each still gets its own answer."""
    first, second = await create(client, title="first"), await create(client, title="second")
    done = await client.patch(tasks_url(suffix=f"/{second['id']}/complete"), headers=auth())
    first_url, second_url = (tasks_url(suffix=f"/{task['id']}") for task in (first, second))
    stale = (await client.get(first_url, headers=auth())).headers["ETag"]

    async def ran(
        method: str, url: str, expected: int, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> list[Executable]:
        statements_run.clear()
        response = await client.request(
            method, url, headers={**auth(), **(headers or {})}, **kwargs
        )
        assert response.status_code == expected, response.text
        return list(statements_run)

    async def current_etag(url: str) -> dict[str, str]:
        return {"If-Match": (await client.get(url, headers=auth())).headers["ETag"]}

    pairs = [
        (  # PATCH of the title, then PUT of title and description, one task then the other
            await ran("PATCH", first_url, 200, json={"title": "first, renamed"}),
            await ran("PATCH", second_url, 200, json={"title": "second, renamed"}),
        ),
        (
            await ran("PUT", first_url, 200, json={"title": "a", "description": "x"}),
            await ran("PUT", second_url, 200, json={"title": "b", "description": None}),
        ),
        (  # a create with an Idempotency-Key: the key reserved, the task, the answer stored
            await ran("POST", tasks_url(), 201, {"Idempotency-Key": "one"}, json={"title": "c"}),
            await ran("POST", tasks_url(), 201, {"Idempotency-Key": "two"}, json={"title": "d"}),
        ),
        (  # filtered, searched and paged: the rows and the total
            await ran("GET", tasks_url(), 200, params={"status": "pending", "q": "a", "limit": 1}),
            await ran("GET", tasks_url(), 200, params={"status": "done", "q": "b", "limit": 5}),
        ),
    ]
    pending = await client.get(tasks_url(), params={"status": "pending", "q": "A"}, headers=auth())
    assert [task["title"] for task in pending.json()] == ["a"]  # "c" and "d" are pending too
    completed = await client.get(tasks_url(), params={"status": "done", "q": "B"}, headers=auth())
    assert [task["id"] for task in completed.json()] == [done.json()["id"]]
    assert completed.json()[0]["description"] is None
    assert (
        await client.delete(first_url, headers={**auth(), "If-Match": stale})
    ).status_code == 412
    pairs.append(  # a conditional toggle, then a conditional delete, one task then the other
        (
            await ran("PATCH", f"{first_url}/complete", 200, await current_etag(first_url)),
            await ran("PATCH", f"{second_url}/complete", 200, await current_etag(second_url)),
        )
    )
    pairs.append(
        (
            await ran("DELETE", first_url, 204, await current_etag(first_url)),
            await ran("DELETE", second_url, 204, await current_etag(second_url)),
        )
    )
    for one, other in pairs:
        assert one
        assert len(one) == len(other)
        assert all(a is b for a, b in zip(one, other, strict=True))
        assert all(is_static(statement) for statement in one)  # so compiled once, too
