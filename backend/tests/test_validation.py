"""Bad input gets a clear 4xx, never a 500, and nothing is stored half-way (CONTRACT.md "Requests").

422 bodies carry FastAPI's list-shaped `detail`; 413 and 404 a `detail` sentence. No response
shows a traceback, driver or ORM text, or the secret.
"""

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from httpx import AsyncClient

from middleware import RequestBodyTooLarge
from tests.support import ALICE, TEST_SECRET, auth

BODY_LIMIT = 64 * 1024
LEAKED_WORDS = ("traceback", "sqlalchemy", "psycopg", "aiosqlite", "sqlite3", 'file "')
NOT_FOUND = {"detail": "Task not found."}


# --- helpers -------------------------------------------------------------------------------------


def tasks_url(suffix: str = "") -> str:
    return f"/api/{ALICE}/tasks{suffix}"


def assert_clean(response: httpx.Response) -> None:
    """Nothing internal in the body: no traceback, no driver or ORM text, no secret."""
    text = response.text
    assert TEST_SECRET not in text
    for word in LEAKED_WORDS:
        assert word not in text.lower(), (word, text)
    assert response.status_code < 500, text


def assert_422(response: httpx.Response, field: str | None = None) -> list[dict[str, Any]]:
    """A 422 with FastAPI's list-shaped `detail`; when `field` is given, one item is about it."""
    assert_clean(response)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list)
    assert detail, "an empty list explains nothing"
    for problem in detail:
        assert isinstance(problem, dict)
        assert isinstance(problem["type"], str)
        assert isinstance(problem["loc"], list)
        assert isinstance(problem["msg"], str)
        assert problem["msg"]
    if field is not None:
        assert ["body", field] in [problem["loc"] for problem in detail], detail
    return detail


def assert_too_large(response: httpx.Response) -> None:
    assert_clean(response)
    assert response.status_code == 413, response.text
    assert response.json() == {"detail": RequestBodyTooLarge(BODY_LIMIT).detail}


def json_headers() -> dict[str, str]:
    return {**auth(), "Content-Type": "application/json"}


async def send_raw(
    client: AsyncClient,
    method: str,
    url: str,
    content: bytes,
    content_type: str = "application/json",
) -> httpx.Response:
    return await client.request(
        method, url, content=content, headers={**auth(), "Content-Type": content_type}
    )


async def create(client: AsyncClient, **body: Any) -> dict[str, Any]:
    body.setdefault("title", "Original")
    response = await client.post(tasks_url(), json=body, headers=auth())
    assert response.status_code == 201, response.text
    task: dict[str, Any] = response.json()
    return task


async def stored_tasks(client: AsyncClient) -> list[dict[str, Any]]:
    response = await client.get(tasks_url(), headers=auth())
    assert response.status_code == 200, response.text
    tasks: list[dict[str, Any]] = response.json()
    return tasks


async def assert_nothing_stored(client: AsyncClient) -> None:
    assert await stored_tasks(client) == []


async def assert_unchanged(client: AsyncClient, task: dict[str, Any]) -> None:
    response = await client.get(tasks_url(f"/{task['id']}"), headers=auth())
    assert response.status_code == 200
    assert response.json() == task


# Both update routes take the same body (CONTRACT.md: PUT and PATCH merge partially).
UPDATE_METHODS = ["PUT", "PATCH"]


# --- titles and descriptions: what is accepted ---------------------------------------------------


@pytest.mark.parametrize(
    ("title", "stored"),
    [
        pytest.param("a" * 200, "a" * 200, id="200-ascii"),
        pytest.param("é" * 200, "é" * 200, id="200-two-byte"),
        pytest.param("中" * 200, "中" * 200, id="200-three-byte"),
        pytest.param("😀" * 200, "😀" * 200, id="200-emoji-outside-the-BMP"),
        pytest.param("e\u0301" * 100, "e\u0301" * 100, id="200-code-points-combining"),
        pytest.param("  " + "a" * 200 + " \n", "a" * 200, id="200-after-trimming"),
        pytest.param("x", "x", id="one"),
    ],
)
async def test_titles_up_to_200_code_points_are_accepted(
    client: AsyncClient, title: str, stored: str
) -> None:
    response = await client.post(tasks_url(), json={"title": title}, headers=auth())
    assert response.status_code == 201, response.text
    assert response.json()["title"] == stored
    [task] = await stored_tasks(client)
    assert task["title"] == stored
    for method in UPDATE_METHODS:
        updated = await client.request(
            method, tasks_url(f"/{task['id']}"), json={"title": title}, headers=auth()
        )
        assert updated.status_code == 200, updated.text
        assert updated.json()["title"] == stored


@pytest.mark.parametrize(
    "description",
    [
        pytest.param("d" * 1000, id="1000-ascii"),
        pytest.param("ü" * 1000, id="1000-two-byte"),
        pytest.param("😀" * 1000, id="1000-emoji"),
    ],
)
async def test_descriptions_up_to_1000_code_points_are_accepted(
    client: AsyncClient, description: str
) -> None:
    task = await create(client, description=description)
    assert task["description"] == description
    [stored] = await stored_tasks(client)
    assert stored["description"] == description
    for method in UPDATE_METHODS:
        response = await client.request(
            method, tasks_url(f"/{task['id']}"), json={"description": description}, headers=auth()
        )
        assert response.status_code == 200, response.text
        assert response.json()["description"] == description


async def test_a_null_or_blank_description_is_stored_as_null(client: AsyncClient) -> None:
    assert (await create(client, description=None))["description"] is None
    assert (await create(client, description=" \t\n "))["description"] is None
    task = await create(client, description="something")
    for method in UPDATE_METHODS:
        response = await client.request(
            method, tasks_url(f"/{task['id']}"), json={"description": None}, headers=auth()
        )
        assert response.status_code == 200, response.text
        assert response.json()["description"] is None


# --- titles and descriptions: what is refused -----------------------------------------------------


TOO_LONG_TITLES = [
    pytest.param("a" * 201, id="201-ascii"),
    pytest.param("é" * 201, id="201-two-byte"),
    pytest.param("😀" * 201, id="201-emoji"),
    pytest.param("e\u0301" * 100 + "x", id="201-code-points-combining"),
    pytest.param("a" * 10_000, id="10000"),
]
BLANK_TITLES = [
    pytest.param("", id="empty"),
    pytest.param(" ", id="space"),
    pytest.param(" \t\r\n ", id="whitespace"),
    pytest.param("\u00a0\u3000\u2003", id="unicode-spaces"),
]
WRONG_TYPE_TITLES = [
    pytest.param(42, id="int"),
    pytest.param(4.2, id="float"),
    pytest.param(True, id="bool"),
    pytest.param([], id="empty-list"),
    pytest.param(["Buy milk"], id="list"),
    pytest.param({}, id="empty-object"),
    pytest.param({"text": "Buy milk"}, id="object"),
]
NUL_TEXT = [
    pytest.param("a\u0000b", id="inner-nul"),
    pytest.param("\u0000", id="only-nul"),
    pytest.param("abc\u0000", id="trailing-nul"),
]


@pytest.mark.parametrize("body", [{}, {"description": "no title"}, {"completed": True}])
async def test_create_without_a_title_is_422(client: AsyncClient, body: dict[str, Any]) -> None:
    response = await client.post(tasks_url(), json=body, headers=auth())
    [problem] = assert_422(response, "title")
    assert problem["type"] == "missing"
    await assert_nothing_stored(client)


@pytest.mark.parametrize(
    "title", [*TOO_LONG_TITLES, *BLANK_TITLES, *WRONG_TYPE_TITLES, *NUL_TEXT, None]
)
async def test_create_with_a_bad_title_is_422(client: AsyncClient, title: object) -> None:
    response = await client.post(
        tasks_url(), json={"title": title, "description": "fine"}, headers=auth()
    )
    assert_422(response, "title")
    await assert_nothing_stored(client)


@pytest.mark.parametrize("method", UPDATE_METHODS)
@pytest.mark.parametrize(
    "title", [*TOO_LONG_TITLES, *BLANK_TITLES, *WRONG_TYPE_TITLES, *NUL_TEXT, None]
)
async def test_update_with_a_bad_title_is_422(
    client: AsyncClient, method: str, title: object
) -> None:
    task = await create(client, description="keep")
    response = await client.request(
        method,
        tasks_url(f"/{task['id']}"),
        json={"title": title, "description": "changed", "completed": True},
        headers=auth(),
    )
    assert_422(response, "title")
    await assert_unchanged(client, task)


BAD_DESCRIPTIONS = [
    pytest.param("d" * 1001, id="1001-ascii"),
    pytest.param("ü" * 1001, id="1001-two-byte"),
    pytest.param("😀" * 1001, id="1001-emoji"),
    pytest.param(42, id="int"),
    pytest.param(True, id="bool"),
    pytest.param(["text"], id="list"),
    pytest.param({"text": "x"}, id="object"),
    *NUL_TEXT,
]


@pytest.mark.parametrize("description", BAD_DESCRIPTIONS)
async def test_create_with_a_bad_description_is_422(
    client: AsyncClient, description: object
) -> None:
    response = await client.post(
        tasks_url(), json={"title": "fine", "description": description}, headers=auth()
    )
    assert_422(response, "description")
    await assert_nothing_stored(client)


@pytest.mark.parametrize("method", UPDATE_METHODS)
@pytest.mark.parametrize("description", BAD_DESCRIPTIONS)
async def test_update_with_a_bad_description_is_422(
    client: AsyncClient, method: str, description: object
) -> None:
    task = await create(client, description="keep")
    response = await client.request(
        method,
        tasks_url(f"/{task['id']}"),
        json={"title": "changed", "description": description},
        headers=auth(),
    )
    assert_422(response, "description")
    await assert_unchanged(client, task)


# --- completed is a strict boolean ---------------------------------------------------------------


NOT_BOOLEANS = [
    pytest.param("yes", id="yes"),
    pytest.param("true", id="string-true"),
    pytest.param("false", id="string-false"),
    pytest.param(1, id="one"),
    pytest.param(0, id="zero"),
    pytest.param(1.0, id="float"),
    pytest.param([True], id="list"),
    pytest.param({"value": True}, id="object"),
]


@pytest.mark.parametrize("completed", [*NOT_BOOLEANS, None])
async def test_create_with_a_non_boolean_completed_is_422(
    client: AsyncClient, completed: object
) -> None:
    response = await client.post(
        tasks_url(), json={"title": "fine", "completed": completed}, headers=auth()
    )
    assert_422(response, "completed")
    await assert_nothing_stored(client)


@pytest.mark.parametrize("method", UPDATE_METHODS)
@pytest.mark.parametrize("completed", [*NOT_BOOLEANS, None])
async def test_update_with_a_non_boolean_completed_is_422(
    client: AsyncClient, method: str, completed: object
) -> None:
    task = await create(client)
    response = await client.request(
        method,
        tasks_url(f"/{task['id']}"),
        json={"title": "changed", "completed": completed},
        headers=auth(),
    )
    assert_422(response, "completed")
    await assert_unchanged(client, task)


@pytest.mark.parametrize("completed", NOT_BOOLEANS)
async def test_complete_with_a_non_boolean_completed_is_422(
    client: AsyncClient, completed: object
) -> None:
    task = await create(client)
    response = await client.patch(
        tasks_url(f"/{task['id']}/complete"), json={"completed": completed}, headers=auth()
    )
    assert_422(response, "completed")
    await assert_unchanged(client, task)


@pytest.mark.parametrize("method", ["POST", *UPDATE_METHODS])
async def test_real_booleans_are_accepted(client: AsyncClient, method: str) -> None:
    task = await create(client)
    url = tasks_url() if method == "POST" else tasks_url(f"/{task['id']}")
    for completed in [True, False]:
        response = await client.request(
            method, url, json={"title": "fine", "completed": completed}, headers=auth()
        )
        assert response.status_code in {200, 201}, response.text
        assert response.json()["completed"] is completed


# --- bodies that are not the JSON object we expect ------------------------------------------------


LONE_SURROGATES = [
    pytest.param(b'{"title": "\\ud800"}', id="title-high"),
    pytest.param(b'{"title": "a\\udfffb"}', id="title-low"),
    pytest.param(b'{"title": "\\ude00\\ud83d"}', id="title-reversed-pair"),
    pytest.param(b'{"title": "ok", "description": "\\udc00"}', id="description"),
]
NON_FINITE_NUMBERS = [
    pytest.param(b'{"title": "x", "completed": NaN}', id="NaN"),
    pytest.param(b'{"title": "x", "completed": Infinity}', id="Infinity"),
    pytest.param(b'{"title": "x", "completed": -Infinity}', id="-Infinity"),
    pytest.param(b'{"title": NaN}', id="title-NaN"),
    pytest.param(b'{"title": "x", "completed": 1e400}', id="1e400"),
    pytest.param(b'{"title": "x", "completed": 123456789012345678901234567890}', id="huge-integer"),
]
INVALID_JSON = [
    pytest.param(b"{", id="unterminated"),
    pytest.param(b'{"title": "x"', id="unclosed-object"),
    pytest.param(b'{"title": "x",}', id="trailing-comma"),
    pytest.param(b"{title: 'x'}", id="javascript-literal"),
    pytest.param(b"{'title': 'x'}", id="single-quotes"),
    pytest.param(b'{"title": "x"} {"title": "y"}', id="two-documents"),
    pytest.param(b'{"title": "x" /* comment */}', id="comment"),
    pytest.param(b'{"title": "\xff\xfe"}', id="invalid-utf8"),
    pytest.param(b'{"title": "\xed\xa0\x80"}', id="utf8-encoded-surrogate"),
    pytest.param(b"\x00", id="nul-byte"),
    pytest.param(b"undefined", id="undefined"),
]
DEEPLY_NESTED = [
    pytest.param(b"[" * 5000 + b"]" * 5000, id="5000-lists"),
    pytest.param(b'{"a":' * 5000 + b"1" + b"}" * 5000, id="5000-objects"),
    pytest.param(b'{"title": ' + b"[" * 5000 + b"]" * 5000 + b"}", id="5000-lists-in-title"),
    pytest.param(b'{"title": "x", "extra": ' + b"[" * 5000 + b"]" * 5000 + b"}", id="in-extra"),
]
NOT_AN_OBJECT = [
    pytest.param(b"[]", id="empty-array"),
    pytest.param(b'[{"title": "x"}]', id="array-of-task"),
    pytest.param(b'"Buy milk"', id="string"),
    pytest.param(b"42", id="number"),
    pytest.param(b"true", id="boolean"),
]
MALFORMED_BODIES = [*LONE_SURROGATES, *NON_FINITE_NUMBERS, *INVALID_JSON, *DEEPLY_NESTED]


@pytest.mark.parametrize("content", [*MALFORMED_BODIES, *NOT_AN_OBJECT, b"null", b""])
async def test_create_with_a_malformed_body_is_422(client: AsyncClient, content: bytes) -> None:
    response = await send_raw(client, "POST", tasks_url(), content)
    assert_422(response)
    await assert_nothing_stored(client)


@pytest.mark.parametrize("method", UPDATE_METHODS)
@pytest.mark.parametrize("content", [*MALFORMED_BODIES, *NOT_AN_OBJECT, b"null"])
async def test_update_with_a_malformed_body_is_422(
    client: AsyncClient, method: str, content: bytes
) -> None:
    task = await create(client)
    response = await send_raw(client, method, tasks_url(f"/{task['id']}"), content)
    assert_422(response)
    await assert_unchanged(client, task)


@pytest.mark.parametrize("content", [*MALFORMED_BODIES, *NOT_AN_OBJECT])
async def test_complete_with_a_malformed_body_is_422(client: AsyncClient, content: bytes) -> None:
    task = await create(client)
    response = await send_raw(client, "PATCH", tasks_url(f"/{task['id']}/complete"), content)
    assert_422(response)
    await assert_unchanged(client, task)


@pytest.mark.parametrize(
    ("content_type", "content"),
    [
        pytest.param("text/plain", b"Buy milk", id="text"),
        pytest.param("application/x-www-form-urlencoded", b"title=Buy+milk", id="form"),
        pytest.param("multipart/form-data; boundary=x", b"--x--\r\n", id="multipart"),
        pytest.param("application/octet-stream", b"\x00\x01\x02", id="binary"),
        pytest.param("application/xml", b"<task><title>x</title></task>", id="xml"),
    ],
)
async def test_a_body_that_is_not_json_is_422(
    client: AsyncClient, content_type: str, content: bytes
) -> None:
    task = await create(client)
    created = await send_raw(client, "POST", tasks_url(), content, content_type)
    assert_422(created)
    for method in UPDATE_METHODS:
        url = tasks_url(f"/{task['id']}")
        assert_422(await send_raw(client, method, url, content, content_type))
    assert await stored_tasks(client) == [task]


async def test_a_surrogate_pair_escape_is_one_code_point(client: AsyncClient) -> None:
    response = await send_raw(client, "POST", tasks_url(), b'{"title": "\\ud83d\\ude00"}')
    assert response.status_code == 201, response.text
    assert response.json()["title"] == "😀"


async def test_a_nul_byte_in_an_ignored_field_does_not_fail(client: AsyncClient) -> None:
    response = await send_raw(client, "POST", tasks_url(), b'{"title": "x", "note": "a\\u0000"}')
    assert response.status_code == 201, response.text
    assert "note" not in response.json()


# --- task ids in the path ------------------------------------------------------------------------


TASK_ROUTES = [
    pytest.param("GET", "", id="read"),
    pytest.param("PUT", "", id="put"),
    pytest.param("PATCH", "", id="patch"),
    pytest.param("PATCH", "/complete", id="complete"),
    pytest.param("DELETE", "", id="delete"),
]


async def call_task_route(
    client: AsyncClient, method: str, suffix: str, task_id: object
) -> httpx.Response:
    body = {"title": "changed"} if method in {"PUT", "PATCH"} and not suffix else None
    return await client.request(method, tasks_url(f"/{task_id}{suffix}"), json=body, headers=auth())


@pytest.mark.parametrize(("method", "suffix"), TASK_ROUTES)
@pytest.mark.parametrize(
    "task_id",
    [
        pytest.param(2**63, id="2**63"),
        pytest.param(2**64, id="2**64"),
        pytest.param(10**30, id="10**30"),
        pytest.param("9" * 5000, id="5000-digits"),
        pytest.param(-(2**63) - 1, id="-2**63-1"),
        pytest.param("abc", id="abc"),
        pytest.param("1e3", id="exponent"),
        pytest.param("1.5", id="fraction"),
        pytest.param("NaN", id="NaN"),
        pytest.param("0x10", id="hex"),
        pytest.param("null", id="null"),
    ],
)
async def test_an_impossible_task_id_is_422(
    client: AsyncClient, method: str, suffix: str, task_id: object
) -> None:
    task = await create(client)
    response = await call_task_route(client, method, suffix, task_id)
    [problem] = assert_422(response)
    assert problem["loc"] == ["path", "task_id"]
    await assert_unchanged(client, task)


@pytest.mark.parametrize(("method", "suffix"), TASK_ROUTES)
@pytest.mark.parametrize(
    "task_id",
    [
        pytest.param(0, id="0"),
        pytest.param(-1, id="-1"),
        pytest.param(2**63 - 1, id="2**63-1"),
        pytest.param(-(2**63), id="-2**63"),
        pytest.param(2**31, id="2**31"),
    ],
)
async def test_a_task_id_within_range_that_does_not_exist_is_404(
    client: AsyncClient, method: str, suffix: str, task_id: int
) -> None:
    task = await create(client)
    response = await call_task_route(client, method, suffix, task_id)
    assert_clean(response)
    assert response.status_code == 404, response.text
    assert response.json() == NOT_FOUND
    await assert_unchanged(client, task)


# --- request body size ---------------------------------------------------------------------------


def padded_body(size: int) -> bytes:
    """A valid create body of exactly `size` bytes (JSON whitespace as padding)."""
    body = json.dumps({"title": "padded"}).encode()
    assert len(body) <= size
    return body[:-1] + b" " * (size - len(body)) + b"}"


async def chunks(body: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def test_the_documented_body_limit_is_64_kib(app: FastAPI) -> None:
    assert app.state.settings.max_request_body_bytes == BODY_LIMIT


WRITE_ROUTES = [
    pytest.param("POST", "", id="create"),
    pytest.param("PUT", "/{task_id}", id="put"),
    pytest.param("PATCH", "/{task_id}", id="patch"),
    pytest.param("PATCH", "/{task_id}/complete", id="complete"),
]


@pytest.mark.parametrize(("method", "suffix"), WRITE_ROUTES)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_over_64_kib_is_413(
    client: AsyncClient, method: str, suffix: str, chunked: bool
) -> None:
    task = await create(client)
    body = json.dumps({"title": "big", "description": "x" * BODY_LIMIT}).encode()
    url = tasks_url(suffix.format(task_id=task["id"]))
    content: bytes | AsyncIterator[bytes] = chunks(body) if chunked else body
    response = await client.request(method, url, content=content, headers=json_headers())
    assert_too_large(response)
    assert await stored_tasks(client) == [task]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_of_exactly_64_kib_is_accepted_and_one_byte_more_is_413(
    client: AsyncClient, chunked: bool
) -> None:
    at_limit = padded_body(BODY_LIMIT)
    over_limit = padded_body(BODY_LIMIT + 1)
    assert (len(at_limit), len(over_limit)) == (BODY_LIMIT, BODY_LIMIT + 1)

    content: bytes | AsyncIterator[bytes] = chunks(over_limit) if chunked else over_limit
    refused = await client.post(tasks_url(), content=content, headers=json_headers())
    assert_too_large(refused)
    await assert_nothing_stored(client)

    content = chunks(at_limit) if chunked else at_limit
    accepted = await client.post(tasks_url(), content=content, headers=json_headers())
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["title"] == "padded"
