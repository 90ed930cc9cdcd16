"""The list's query parameters (CONTRACT.md "The list's query parameters").

Lenient by contract: an unknown parameter or value is ignored (200, never 422, never 500).
Tasks whose timestamps matter are stored directly with fixed timestamps, so orderings are exact.
"""

import importlib
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from httpx import AsyncClient
from sqlalchemy import text
from sqlalchemy.dialects.postgresql import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

from models import DESCRIPTION_MAX_LENGTH, LIST_INDEX_TEXT_BYTES, TITLE_MAX_LENGTH, Task
from queries import SORT_COLUMNS, ListOptions, list_statements
from tests.support import ALICE, BOB, auth, random_text

START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


# --- helpers -------------------------------------------------------------------------------------


def tasks_url(user_id: str = ALICE, suffix: str = "") -> str:
    return f"/api/{user_id}/tasks{suffix}"


async def store(
    app: FastAPI,
    title: str,
    *,
    created: int,
    updated: int | None = None,
    owner: str = ALICE,
    description: str | None = None,
    completed: bool = False,
) -> int:
    """Store a task with timestamps `created`/`updated` minutes after START; its id."""
    task = Task(
        user_id=owner,
        title=title,
        description=description,
        completed=completed,
        created_at=START + timedelta(minutes=created),
        updated_at=START + timedelta(minutes=created if updated is None else updated),
    )
    async with AsyncSession(app.state.engine, expire_on_commit=False) as session:
        session.add(task)
        await session.commit()
    assert task.id is not None
    return task.id


async def create(
    client: AsyncClient, title: str, owner: str = ALICE, **fields: Any
) -> dict[str, Any]:
    response = await client.post(
        tasks_url(owner), json={"title": title, **fields}, headers=auth(owner)
    )
    assert response.status_code == 201, response.text
    task: dict[str, Any] = response.json()
    return task


async def fetch(client: AsyncClient, params: Any = None) -> httpx.Response:
    """GET the list; assert what every list answer has: 200, a bare array, a numeric total."""
    response = await client.get(tasks_url(), params=params, headers=auth())
    assert response.status_code == 200, response.text
    assert isinstance(response.json(), list)
    assert response.headers["X-Total-Count"].isdigit()
    return response


async def listed_ids(client: AsyncClient, params: Any = None) -> list[int]:
    return [task["id"] for task in (await fetch(client, params)).json()]


async def listed_titles(client: AsyncClient, params: Any = None) -> list[str]:
    return [task["title"] for task in (await fetch(client, params)).json()]


def total(response: httpx.Response) -> int:
    return int(response.headers["X-Total-Count"])


# --- default order -------------------------------------------------------------------------------


async def test_default_order_is_newest_first_then_highest_id(
    app: FastAPI, client: AsyncClient
) -> None:
    oldest = await store(app, "oldest", created=0)
    # Three tasks with the very same created_at: the id breaks the tie, highest first.
    tied = [await store(app, f"tied {number}", created=10) for number in range(3)]
    newest = await store(app, "newest", created=20)
    expected = [newest, *reversed(tied), oldest]
    assert await listed_ids(client) == expected
    assert await listed_ids(client, {"sort": "created"}) == expected
    assert await listed_ids(client, {"sort": "created_at", "order": "desc"}) == expected
    # Ascending reverses both keys.
    assert await listed_ids(client, {"sort": "created_oldest"}) == list(reversed(expected))
    assert await listed_ids(client, {"order": "asc"}) == list(reversed(expected))


async def test_the_list_holds_only_the_owners_tasks(app: FastAPI, client: AsyncClient) -> None:
    mine = await store(app, "mine milk", created=1, completed=True)
    await store(app, "bob's milk", created=2, owner=BOB, completed=True)
    for params in [{}, {"status": "completed"}, {"search": "milk"}, {"limit": "5"}]:
        response = await fetch(client, params)
        assert [task["id"] for task in response.json()] == [mine]
        assert total(response) == 1


async def test_each_listed_task_is_what_reading_it_returns(client: AsyncClient) -> None:
    await create(client, "plain")
    await create(client, "with notes", description="notes")
    await create(client, "bob's", owner=BOB)
    listed = (await fetch(client)).json()
    assert len(listed) == 2
    for task in listed:
        read = await client.get(tasks_url(suffix=f"/{task['id']}"), headers=auth())
        assert task == read.json()
        assert task["user_id"] == ALICE


# --- status --------------------------------------------------------------------------------------


@pytest.fixture
async def mixed(app: FastAPI, client: AsyncClient) -> dict[str, list[int]]:
    """Two pending and two completed tasks of ALICE (newest first), and a pending and a
    completed one of BOB that must never show."""
    pending_old = await store(app, "pending old", created=1)
    done_old = await store(app, "done old", created=2, completed=True)
    pending_new = await store(app, "pending new", created=3)
    done_new = await store(app, "done new", created=4, completed=True)
    await store(app, "bob pending", created=5, owner=BOB)
    await store(app, "bob done", created=6, owner=BOB, completed=True)
    return {
        "all": [done_new, pending_new, done_old, pending_old],
        "pending": [pending_new, pending_old],
        "completed": [done_new, done_old],
    }


PENDING_WORDS = ["pending", "incomplete", "active", "open", "todo"]
COMPLETED_WORDS = ["completed", "done"]


def spellings(word: str) -> list[str]:
    return [word, word.upper(), word.capitalize()]


@pytest.mark.parametrize("parameter", ["status", "status_filter"])
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        *[(spelling, "pending") for word in PENDING_WORDS for spelling in spellings(word)],
        *[(spelling, "completed") for word in COMPLETED_WORDS for spelling in spellings(word)],
        *[(spelling, "all") for spelling in spellings("all")],
    ],
)
async def test_status_filters(
    client: AsyncClient,
    mixed: dict[str, list[int]],
    parameter: str,
    value: str,
    expected: str,
) -> None:
    response = await fetch(client, {parameter: value})
    assert [task["id"] for task in response.json()] == mixed[expected]
    assert total(response) == len(mixed[expected])
    wanted_completion = {"pending": {False}, "completed": {True}, "all": {True, False}}[expected]
    assert {task["completed"] for task in response.json()} == wanted_completion


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", "completed"), ("false", "pending"), ("TRUE", "completed"), ("False", "pending")],
)
async def test_completed_flag_filters(
    client: AsyncClient, mixed: dict[str, list[int]], value: str, expected: str
) -> None:
    response = await fetch(client, {"completed": value})
    assert [task["id"] for task in response.json()] == mixed[expected]
    assert total(response) == len(mixed[expected])


@pytest.mark.parametrize(
    "params",
    [
        {"status": "archived"},
        {"status": ""},
        {"status": "pending-ish"},
        {"status_filter": "whatever"},
        {"completed": "maybe"},
        {"completed": ""},
    ],
)
async def test_an_unknown_status_value_lists_everything(
    client: AsyncClient, mixed: dict[str, list[int]], params: dict[str, str]
) -> None:
    response = await fetch(client, params)
    assert [task["id"] for task in response.json()] == mixed["all"]
    assert total(response) == 4


# --- sorting -------------------------------------------------------------------------------------


@pytest.fixture
async def sortable(app: FastAPI, client: AsyncClient) -> dict[str, int]:
    """Three tasks whose created, updated and title orders all differ."""
    return {
        "banana": await store(app, "banana", created=1, updated=50),
        "Apple": await store(app, "Apple", created=2, updated=20),
        "cherry": await store(app, "cherry", created=3, updated=30),
    }


SORT_CASES = [
    pytest.param(None, None, ["cherry", "Apple", "banana"], id="default"),
    pytest.param("created", None, ["cherry", "Apple", "banana"], id="created"),
    pytest.param("created_at", None, ["cherry", "Apple", "banana"], id="created_at"),
    pytest.param("created", "desc", ["cherry", "Apple", "banana"], id="created-desc"),
    pytest.param("created", "asc", ["banana", "Apple", "cherry"], id="created-asc"),
    pytest.param("created_at", "asc", ["banana", "Apple", "cherry"], id="created_at-asc"),
    pytest.param("created_oldest", None, ["banana", "Apple", "cherry"], id="created_oldest"),
    pytest.param("created_oldest", "desc", ["cherry", "Apple", "banana"], id="created_oldest-desc"),
    pytest.param("updated", None, ["banana", "cherry", "Apple"], id="updated"),
    pytest.param("updated_at", None, ["banana", "cherry", "Apple"], id="updated_at"),
    pytest.param("updated", "desc", ["banana", "cherry", "Apple"], id="updated-desc"),
    pytest.param("updated", "asc", ["Apple", "cherry", "banana"], id="updated-asc"),
    pytest.param("updated_at", "asc", ["Apple", "cherry", "banana"], id="updated_at-asc"),
    pytest.param("title", None, ["Apple", "banana", "cherry"], id="title"),
    pytest.param("title", "asc", ["Apple", "banana", "cherry"], id="title-asc"),
    pytest.param("title", "desc", ["cherry", "banana", "Apple"], id="title-desc"),
    pytest.param(None, "asc", ["banana", "Apple", "cherry"], id="order-asc-alone"),
    pytest.param(None, "desc", ["cherry", "Apple", "banana"], id="order-desc-alone"),
    pytest.param("bogus", None, ["cherry", "Apple", "banana"], id="unknown-sort"),
    pytest.param("bogus", "asc", ["banana", "Apple", "cherry"], id="unknown-sort-asc"),
    pytest.param("title", "sideways", ["Apple", "banana", "cherry"], id="unknown-order"),
    pytest.param("updated", "", ["banana", "cherry", "Apple"], id="empty-order"),
    pytest.param("", "", ["cherry", "Apple", "banana"], id="both-empty"),
]
SORT_PARAMETER_NAMES = [
    pytest.param("sort", "order", id="sort+order"),
    pytest.param("sort_by", "sort_order", id="sort_by+sort_order"),
    pytest.param("sortBy", "sortOrder", id="sortBy+sortOrder"),
    pytest.param("sort_by", "sortOrder", id="sort_by+sortOrder"),
    pytest.param("sortBy", "order", id="sortBy+order"),
]


@pytest.mark.parametrize(("sort_name", "order_name"), SORT_PARAMETER_NAMES)
@pytest.mark.parametrize(("sort", "order", "expected"), SORT_CASES)
async def test_sorting(
    client: AsyncClient,
    sortable: dict[str, int],
    sort_name: str,
    order_name: str,
    sort: str | None,
    order: str | None,
    expected: list[str],
) -> None:
    params = {}
    if sort is not None:
        params[sort_name] = sort
    if order is not None:
        params[order_name] = order
    response = await fetch(client, params)
    assert [task["title"] for task in response.json()] == expected
    assert total(response) == 3


async def test_title_sort_ignores_case_and_breaks_ties_by_id(
    app: FastAPI, client: AsyncClient
) -> None:
    # A case-sensitive sort would put "Banana" before "apple".
    banana = await store(app, "Banana", created=1)
    apple_lower = await store(app, "apple", created=2)
    cherry = await store(app, "cherry", created=3)
    apple_upper = await store(app, "APPLE", created=4)
    ascending = [apple_lower, apple_upper, banana, cherry]
    assert await listed_ids(client, {"sort": "title"}) == ascending
    assert await listed_ids(client, {"sort": "title", "order": "desc"}) == ascending[::-1]


async def test_updated_sort_follows_a_real_update(client: AsyncClient) -> None:
    first = await create(client, "first")
    second = await create(client, "second")
    edited = await client.put(
        tasks_url(suffix=f"/{first['id']}"), json={"title": "first, edited"}, headers=auth()
    )
    assert edited.status_code == 200
    assert await listed_ids(client) == [second["id"], first["id"]]
    assert await listed_ids(client, {"sort": "updated"}) == [first["id"], second["id"]]


# --- search --------------------------------------------------------------------------------------


@pytest.fixture
async def searchable(app: FastAPI, client: AsyncClient) -> dict[str, int]:
    titles = {
        "milk": ("Buy MILK", None),
        "mom": ("Call mom", "ask about the Oat Milk recipe"),
        "percent": ("100% done", None),
        "no percent": ("1000 done", "nothing special"),
        "underscore": ("snake_case", None),
        "no underscore": ("snakeXcase", None),
        "slash": ("path/to\\file", None),
        "no slash": ("pathXtoXfile", None),
    }
    ids = {}
    for minute, (key, (title, description)) in enumerate(titles.items()):
        ids[key] = await store(app, title, created=minute, description=description)
    await store(app, "bob's milk", created=99, owner=BOB)
    return ids


@pytest.mark.parametrize("parameter", ["search", "q"])
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("milk", ["mom", "milk"], id="title-and-description"),
        pytest.param("MiLk", ["mom", "milk"], id="case-insensitive"),
        pytest.param("oat milk", ["mom"], id="description-only"),
        pytest.param("buy", ["milk"], id="title-only"),
        pytest.param("%", ["percent"], id="percent-literal"),
        pytest.param("0%", ["percent"], id="percent-suffix"),
        pytest.param("100%", ["percent"], id="percent-whole"),
        pytest.param("_", ["underscore"], id="underscore-literal"),
        pytest.param("e_c", ["underscore"], id="underscore-inside"),
        pytest.param("/", ["slash"], id="slash-literal"),
        pytest.param("\\", ["slash"], id="backslash-literal"),
        pytest.param("nothing like this", [], id="no-match"),
        pytest.param("'; DROP TABLE tasks; --", [], id="sql-text"),
    ],
)
async def test_search(
    client: AsyncClient,
    searchable: dict[str, int],
    parameter: str,
    text: str,
    expected: list[str],
) -> None:
    response = await fetch(client, {parameter: text})
    assert [task["id"] for task in response.json()] == [searchable[key] for key in expected]
    assert total(response) == len(expected)


@pytest.mark.parametrize("params", [{"search": ""}, {"q": ""}, {"search": "   "}])
async def test_an_empty_search_lists_everything(
    client: AsyncClient, searchable: dict[str, int], params: dict[str, str]
) -> None:
    assert len(await listed_ids(client, params)) == len(searchable)


@pytest.mark.parametrize("text", ["\x00", "mi\x00lk", "%00", "\x00%"])
async def test_a_nul_in_search_is_200(
    client: AsyncClient, searchable: dict[str, int], text: str
) -> None:
    for parameter in ["search", "q"]:
        await fetch(client, {parameter: text})
    tasks = await listed_ids(client)
    assert len(tasks) == len(searchable)


async def test_search_combines_with_status_and_paging(app: FastAPI, client: AsyncClient) -> None:
    await store(app, "milk, pending", created=1)
    done_old = await store(app, "milk, done", created=2, completed=True)
    done_new = await store(app, "more milk, done", created=3, completed=True)
    await store(app, "bread, done", created=4, completed=True)
    response = await fetch(client, {"q": "MILK", "status": "done", "limit": "1"})
    assert [task["id"] for task in response.json()] == [done_new]
    assert total(response) == 2
    response = await fetch(client, {"q": "MILK", "status": "done", "limit": "1", "offset": "1"})
    assert [task["id"] for task in response.json()] == [done_old]


async def test_search_is_case_insensitive_beyond_ascii(app: FastAPI, client: AsyncClient) -> None:
    summer = await store(app, "Été à Paris", created=1)
    await store(app, "Winter", created=2)
    assert await listed_ids(client, {"search": "été"}) == [summer]
    assert await listed_ids(client, {"search": "ÉTÉ"}) == [summer]
    assert await listed_ids(client, {"search": "À PARIS"}) == [summer]


# --- paging --------------------------------------------------------------------------------------


@pytest.fixture
async def five(app: FastAPI, client: AsyncClient) -> list[int]:
    """Five tasks of ALICE, newest first, and one of BOB."""
    ids = [await store(app, f"task {minute}", created=minute) for minute in range(5)]
    await store(app, "bob's", created=9, owner=BOB)
    return ids[::-1]


@pytest.mark.parametrize(
    ("params", "window"),
    [
        pytest.param({"limit": "2"}, slice(0, 2), id="limit"),
        pytest.param({"limit": "2", "offset": "2"}, slice(2, 4), id="limit-offset"),
        pytest.param({"limit": "2", "skip": "2"}, slice(2, 4), id="limit-skip"),
        pytest.param({"offset": "3"}, slice(3, 5), id="offset-alone"),
        pytest.param({"skip": "4"}, slice(4, 5), id="skip-alone"),
        pytest.param({"limit": "2", "offset": "4"}, slice(4, 5), id="last-page"),
        pytest.param({"offset": "5"}, slice(5, 5), id="offset-at-end"),
        pytest.param({"offset": "500"}, slice(5, 5), id="offset-beyond"),
        pytest.param({"limit": "5"}, slice(0, 5), id="limit-exact"),
        pytest.param({"limit": "100"}, slice(0, 5), id="limit-larger"),
        pytest.param({"offset": "0"}, slice(0, 5), id="offset-zero"),
        pytest.param({"limit": "99999999999999999999"}, slice(0, 5), id="limit-huge"),
        pytest.param({"offset": "99999999999999999999"}, slice(5, 5), id="offset-huge"),
    ],
)
async def test_paging_and_the_total_before_paging(
    client: AsyncClient, five: list[int], params: dict[str, str], window: slice
) -> None:
    response = await fetch(client, params)
    assert [task["id"] for task in response.json()] == five[window]
    assert total(response) == 5


async def test_the_pages_cover_the_list_once(client: AsyncClient, five: list[int]) -> None:
    seen: list[int] = []
    for offset in range(0, 6, 2):
        seen += await listed_ids(client, {"limit": "2", "offset": str(offset)})
    assert seen == five


async def test_paging_applies_to_the_sorted_list(client: AsyncClient, five: list[int]) -> None:
    page = await listed_ids(client, {"sort": "created_oldest", "limit": "2", "offset": "1"})
    assert page == five[::-1][1:3]


async def test_the_total_counts_the_filtered_tasks(
    client: AsyncClient, mixed: dict[str, list[int]]
) -> None:
    response = await fetch(client, {"status": "pending", "limit": "1"})
    assert [task["id"] for task in response.json()] == mixed["pending"][:1]
    assert total(response) == 2
    unpaged = await fetch(client, {"status": "completed"})
    assert total(unpaged) == 2


async def test_the_total_of_an_empty_list_is_zero(client: AsyncClient) -> None:
    for params in [{}, {"limit": "10"}, {"offset": "3"}]:
        response = await fetch(client, params)
        assert response.json() == []
        assert total(response) == 0


# --- conditional GET -----------------------------------------------------------------------------


async def test_the_list_answers_304_to_its_etag_until_anything_listed_changes(
    client: AsyncClient,
) -> None:
    task = await create(client, "first", description="notes")
    url = tasks_url(suffix=f"/{task['id']}")
    etag = (await fetch(client)).headers["ETag"]
    seen = {etag}

    async def toggle() -> int:
        return (await client.patch(f"{url}/complete", headers=auth())).status_code

    async def describe() -> int:
        return (await client.put(url, json={"description": "n2"}, headers=auth())).status_code

    async def add() -> int:
        return (await client.post(tasks_url(), json={"title": "2nd"}, headers=auth())).status_code

    async def remove() -> int:
        return (await client.delete(url, headers=auth())).status_code

    changes: list[tuple[str, Callable[[], Awaitable[int]], int]] = [
        ("toggle", toggle, 200),
        ("description", describe, 200),
        ("create", add, 201),
        ("delete", remove, 204),
    ]
    for change, write, expected in changes:
        unchanged = await client.get(tasks_url(), headers={**auth(), "If-None-Match": etag})
        assert unchanged.status_code == 304, change
        assert unchanged.content == b""
        assert unchanged.headers["ETag"] == etag
        assert unchanged.headers["X-Total-Count"].isdigit()
        assert await write() == expected, change
        changed = await client.get(tasks_url(), headers={**auth(), "If-None-Match": etag})
        assert changed.status_code == 200, change
        etag = changed.headers["ETag"]
        assert etag not in seen, change
        seen.add(etag)


async def test_the_list_etag_follows_the_answer_not_the_query(client: AsyncClient) -> None:
    await create(client, "a")
    await create(client, "b")
    everything = (await fetch(client)).headers["ETag"]
    # Another spelling of the same answer has the same ETag; another answer has another one.
    assert (await fetch(client, {"status": "all"})).headers["ETag"] == everything
    assert (await fetch(client, {"limit": "1"})).headers["ETag"] != everything
    # A weak comparison, in a list of tags (RFC 9110 If-None-Match).
    header = f'"elsewhere", W/{everything}'
    response = await client.get(tasks_url(), headers={**auth(), "If-None-Match": header})
    assert response.status_code == 304
    other = await client.get(tasks_url(), headers={**auth(), "If-None-Match": '"elsewhere"'})
    assert other.status_code == 200


# --- leniency ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"limit": "abc"}, id="limit-abc"),
        pytest.param({"limit": "-1"}, id="limit-negative"),
        pytest.param({"limit": "1.5"}, id="limit-fraction"),
        pytest.param({"limit": ""}, id="limit-empty"),
        pytest.param({"limit": "1e2"}, id="limit-exponent"),
        pytest.param({"limit": "0x2"}, id="limit-hex"),
        pytest.param({"limit": "null"}, id="limit-null"),
        pytest.param({"offset": "x"}, id="offset-x"),
        pytest.param({"offset": "-1"}, id="offset-negative"),
        pytest.param({"skip": "-3"}, id="skip-negative"),
        pytest.param({"skip": "abc"}, id="skip-abc"),
        pytest.param({"sort": "bogus"}, id="sort-bogus"),
        pytest.param({"sort_by": "id; DROP TABLE tasks"}, id="sort-injection"),
        pytest.param({"sortBy": "password"}, id="sortBy-unknown-column"),
        pytest.param({"order": "sideways"}, id="order-bogus"),
        pytest.param({"sortOrder": "random()"}, id="sortOrder-bogus"),
        pytest.param({"status": "archived"}, id="status-bogus"),
        pytest.param({"completed": "maybe"}, id="completed-bogus"),
        pytest.param({"foo": "bar"}, id="unknown-parameter"),
        pytest.param({"page": "2", "per_page": "10", "pageSize": "3"}, id="page-style"),
        pytest.param({"user_id": BOB}, id="user_id-parameter"),
        pytest.param({"fields": "id,title", "include": "all"}, id="more-unknowns"),
        pytest.param({"limit": "\x00"}, id="limit-nul"),
        pytest.param({"sort": "\x00"}, id="sort-nul"),
        pytest.param({"status": "\x00"}, id="status-nul"),
    ],
)
async def test_invalid_values_and_unknown_parameters_are_ignored(
    client: AsyncClient, five: list[int], params: dict[str, str]
) -> None:
    response = await fetch(client, params)
    assert total(response) == 5
    # Ignored means: the default list, whole, newest first.
    assert [task["id"] for task in response.json()] == five


async def test_repeated_and_blank_parameters_are_not_a_422(
    client: AsyncClient, five: list[int]
) -> None:
    response = await client.get(
        tasks_url() + "?status=&status=&limit=&limit=&sort=&q=&search=&&=&order",
        headers=auth(),
    )
    assert response.status_code == 200, response.text
    assert [task["id"] for task in response.json()] == five


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"limit": "\u00b2"}, id="limit-superscript-two"),
        pytest.param({"offset": "\u00b9"}, id="offset-superscript-one"),
        pytest.param({"skip": "\u2460"}, id="skip-circled-one"),
    ],
)
async def test_digit_like_characters_in_paging_are_ignored(
    client: AsyncClient, five: list[int], params: dict[str, str]
) -> None:
    response = await client.get(tasks_url(), params=params, headers=auth())
    assert response.status_code == 200, response.text
    assert [task["id"] for task in response.json()] == five
    assert response.headers["X-Total-Count"] == "5"


@pytest.mark.parametrize("name", ["limit", "offset", "skip"])
async def test_a_page_number_of_thousands_of_digits_is_not_an_error(
    client: AsyncClient, name: str
) -> None:
    await create(client, "only")
    response = await client.get(tasks_url(), params={name: "9" * 5000}, headers=auth())
    assert response.status_code == 200
    assert response.headers["X-Total-Count"] == "1"


# --- tasks too long for the covering index -------------------------------------------------------
# models.py: a task whose text (owner, title, description) is over LIST_INDEX_TEXT_BYTES in UTF-8
# is kept out of the covering index, whose entries hold at most 2,704 bytes; the list reads it
# from the table instead. Random characters of three and four bytes do not compress: the sizes
# below are the sizes PostgreSQL stores.


ALICE_BYTES = len(ALICE.encode())
FULL_TITLE = random_text(600, 3, 1)  # 200 characters: the longest title
# Exactly at the limit (in the covering index), one byte over it (not), and the largest text the
# API accepts: 200 + 1,000 characters of 4 bytes.
AT_LIMIT = random_text(LIST_INDEX_TEXT_BYTES - ALICE_BYTES - 600, 3, 2)
OVER_LIMIT = AT_LIMIT + "y"
LARGEST_TITLE, LARGEST_DESCRIPTION = random_text(800, 4, 3), random_text(4000, 4, 4)


@pytest.fixture
async def sizes(app: FastAPI, client: AsyncClient) -> dict[str, int]:
    """Five of Alice's tasks, both sides of the limit, by name; created in this order."""
    assert len(FULL_TITLE) == len(LARGEST_TITLE) == TITLE_MAX_LENGTH
    assert len(AT_LIMIT) < len(OVER_LIMIT) <= DESCRIPTION_MAX_LENGTH
    assert len(LARGEST_DESCRIPTION) == DESCRIPTION_MAX_LENGTH
    assert ALICE_BYTES + len(FULL_TITLE.encode()) + len(AT_LIMIT.encode()) == LIST_INDEX_TEXT_BYTES
    return {
        "short": await store(app, "Short one", created=1),
        "at limit": await store(app, FULL_TITLE, created=2, description=AT_LIMIT),
        "over limit": await store(
            app, FULL_TITLE, created=3, description=OVER_LIMIT, completed=True
        ),
        "largest": await store(app, LARGEST_TITLE, created=4, description=LARGEST_DESCRIPTION),
        "short done": await store(app, "another SHORT one", created=5, completed=True),
    }


async def test_tasks_too_long_for_the_covering_index_are_listed_like_the_others(
    client: AsyncClient, sizes: dict[str, int]
) -> None:
    newest_first = [sizes[name] for name in reversed(list(sizes))]
    listed = (await fetch(client)).json()
    assert [task["id"] for task in listed] == newest_first
    for task in listed:  # each whole, as reading it returns it
        single = await client.get(tasks_url(suffix=f"/{task['id']}"), headers=auth())
        assert single.json() == task
    assert listed[1]["description"] == LARGEST_DESCRIPTION
    assert await listed_ids(client, {"status": "completed"}) == [
        sizes["short done"],
        sizes["over limit"],
    ]
    assert await listed_ids(client, {"search": OVER_LIMIT[-10:]}) == [sizes["over limit"]]
    assert await listed_ids(client, {"search": LARGEST_DESCRIPTION[500:510]}) == [sizes["largest"]]
    assert await listed_ids(client, {"search": "short"}) == [sizes["short done"], sizes["short"]]
    by_title = sorted(listed, key=lambda task: (task["title"].lower(), task["id"]))
    assert await listed_ids(client, {"sort": "title"}) == [task["id"] for task in by_title]
    for offset in range(5):
        page = await fetch(client, {"limit": "2", "offset": str(offset)})
        assert [task["id"] for task in page.json()] == newest_first[offset : offset + 2]
        assert total(page) == 5
    pending = await fetch(client, {"status": "pending", "limit": "1", "offset": "1"})
    assert [task["id"] for task in pending.json()] == [sizes["at limit"]]
    assert total(pending) == 3


async def test_a_task_changed_across_the_limit_is_listed_once_as_changed(
    client: AsyncClient, sizes: dict[str, int]
) -> None:
    """An update moves a task between the two indexes, both ways."""
    grown, shrunk = sizes["short"], sizes["largest"]
    for task_id, body in [
        (grown, {"title": LARGEST_TITLE, "description": LARGEST_DESCRIPTION}),
        (shrunk, {"title": "small now", "description": None}),
        (sizes["at limit"], {"description": OVER_LIMIT}),
        (sizes["over limit"], {"description": AT_LIMIT}),
    ]:
        response = await client.patch(tasks_url(suffix=f"/{task_id}"), json=body, headers=auth())
        assert response.status_code == 200, response.text
    listed = {task["id"]: task for task in (await fetch(client)).json()}
    assert len(listed) == 5
    assert listed[grown]["description"] == LARGEST_DESCRIPTION
    assert (listed[shrunk]["title"], listed[shrunk]["description"]) == ("small now", None)
    assert listed[sizes["at limit"]]["description"] == OVER_LIMIT
    assert listed[sizes["over limit"]]["description"] == AT_LIMIT
    assert await listed_ids(client, {"search": "small now"}) == [shrunk]


async def test_every_list_statement_reads_through_the_owners_indexes(
    app: FastAPI,
    client: AsyncClient,
    backend: str,
    sizes: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each of the list's shapes and its count, and the benchmark baseline's list, run on
    PostgreSQL on both partial indexes (each serves only a query whose WHERE clause carries its
    predicate), the covering one without reading the table; on SQLite, on them too where their
    order serves the list, else on another index by owner.
    A column added to the list but not to the index's INCLUDE would read the table again for
    every task. Plans are forced off sequential and bitmap scans, which a table this small
    would otherwise get, and PostgreSQL's are its generic plans, as prepared statements get
    them."""
    shapes = [
        ListOptions(completed, search, sort, descending, limit, offset)
        for completed in (None, True)
        for search in (None, "one")
        for sort in SORT_COLUMNS
        for descending in (True, False)
        for limit in (None, 2)
        for offset in (None, 1)
    ]
    statements = [statement for shape in shapes for statement in list_statements(shape)]
    # On SQLite (no INCLUDE) the partial indexes are chosen for their order: for the rows of a
    # list sorted by creation, the default.
    in_index_order = {
        list_statements(shape)[0] for shape in shapes if SORT_COLUMNS[shape.sort][0] == "created_at"
    }
    values = {"owner_id": ALICE, "completed": True, "search": "one", "limit": 2, "offset": 1}
    engine = app.state.engine
    if backend == "sqlite":
        async with engine.connect() as connection:
            for statement in statements:
                compiled = statement.compile(dialect=engine.dialect)
                bound = {**compiled.params, **values}
                positional = tuple(bound[name] for name in compiled.positiontup or ())
                rows = await connection.exec_driver_sql(
                    f"EXPLAIN QUERY PLAN {compiled}", positional
                )
                plan = "\n".join(str(row[-1]) for row in rows)
                assert "SCAN tasks" not in plan, plan
                indexes = re.findall(r"SEARCH tasks USING (?:COVERING )?INDEX (\w+)", plan)
                if statement in in_index_order:
                    assert indexes == ["ix_tasks_owner", "ix_tasks_owner_long"], plan
                else:  # any index by owner, in both branches
                    assert len(indexes) == 2, plan
        return
    async with engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        await autocommit.exec_driver_sql("VACUUM (ANALYZE) tasks")  # index-only: all-visible
    # The baseline reads its settings on import (it connects on its first request).
    monkeypatch.setenv("BETTER_AUTH_SECRET", "s" * 64)
    monkeypatch.setenv("DATABASE_URL", "postgresql://127.0.0.1/unused")
    baseline = importlib.import_module("bench.baseline").LIST_SQL.replace("%(owner)s", "$1")
    prepared: list[tuple[str, list[object]]] = [(baseline, [ALICE])]
    for statement in statements:
        compiled = statement.compile(dialect=NUMBERED)
        prepared.append((str(compiled), [values[name] for name in compiled.positiontup or ()]))
    async with engine.begin() as connection:
        for setting in ("enable_seqscan", "enable_bitmapscan"):
            await connection.exec_driver_sql(f"SET LOCAL {setting} = off")
        await connection.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
        for sql, arguments in prepared:
            # psycopg reads `%` as a placeholder even with no parameters.
            await connection.exec_driver_sql(f"PREPARE list_plan AS {sql}".replace("%", "%%"))
            literals = ", ".join(sql_literal(value) for value in arguments)
            rows = await connection.exec_driver_sql(f"EXPLAIN EXECUTE list_plan({literals})")
            plan = "\n".join(str(row[0]) for row in rows)
            await connection.exec_driver_sql("DEALLOCATE list_plan")
            assert "Index Only Scan using ix_tasks_owner on tasks" in plan, plan
            assert "using ix_tasks_owner_long on tasks" in plan, plan
            assert "Seq Scan" not in plan, plan


async def test_a_plain_query_by_owner_has_an_index_too(
    app: FastAPI, client: AsyncClient, backend: str, sizes: dict[str, int]
) -> None:
    """user_id is indexed (SPEC.md) for any query, not only for those that carry the list
    indexes' predicates: another client's, an operator's."""
    query = "SELECT * FROM tasks WHERE user_id = :owner"
    async with app.state.engine.begin() as connection:
        if backend == "sqlite":
            rows = await connection.execute(text(f"EXPLAIN QUERY PLAN {query}"), {"owner": ALICE})
            assert "USING INDEX ix_tasks_user_id (user_id=?)" in str(rows.fetchall())
            return
        await connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
        rows = await connection.execute(text(f"EXPLAIN {query}"), {"owner": ALICE})
        plan = str(rows.fetchall())
        assert "ix_tasks_user_id " in plan, plan
        assert "Seq Scan" not in plan, plan


# PostgreSQL with $1, $2, … placeholders, as PREPARE takes them.
NUMBERED = asyncpg.dialect()  # type: ignore[no-untyped-call]


def sql_literal(value: object) -> str:
    if isinstance(value, bool | int):
        return str(value).lower()
    assert isinstance(value, str)
    return "'" + value.replace("'", "''") + "'"
