"""The locked task API: `/api/{user_id}/tasks[/{task_id}[/complete]]`.

Ownership is part of every statement's WHERE clause (`queries.py`) and each route first calls
`authorize`, which checks the path against the token, so each operation is one statement and no
route repeats an ownership check. Rows go out as JSON once, with orjson; `response_model`
documents their shape.
"""

from typing import Annotated, Any, NoReturn

import orjson
import xxhash
from fastapi import APIRouter, Body, Request, Response, status

import queries
from database import Database
from dependencies import (
    MOST_IF_MATCH_VERSIONS,
    IdempotencyKey,
    TaskId,
    UserId,
    authorize,
    database,
    expected_etags,
    versions_allowed,
)
from errors import PreconditionFailed, TaskNotFound
from idempotency import StoredResponse, request_fingerprint, reserve_or_replay, store_response
from json_body import JSONBodyRoute, json_response, to_json
from models import CompletionChange, ErrorMessage, TaskCreate, TaskPublic, TaskUpdate
from queries import ListOptions, etag_for, public_task, public_tasks


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorMessage, "description": description}


COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    status.HTTP_401_UNAUTHORIZED: _error("No valid bearer token."),
    status.HTTP_403_FORBIDDEN: _error("The path names another user."),
    status.HTTP_429_TOO_MANY_REQUESTS: _error("Over the per-user rate limit; see Retry-After."),
    status.HTTP_503_SERVICE_UNAVAILABLE: _error("Database or Better Auth unreachable; retry."),
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    status.HTTP_404_NOT_FOUND: _error("No such task for this user.")
}
NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    status.HTTP_304_NOT_MODIFIED: {"description": "Not modified since the ETag sent."}
}
WRITE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **NOT_FOUND,
    status.HTTP_412_PRECONDITION_FAILED: _error("If-Match no longer matches the task's ETag."),
    status.HTTP_413_CONTENT_TOO_LARGE: _error("The body is over the size limit."),
}


# Read from the request rather than declared: a declared header is one more parameter for FastAPI
# to validate on every read, and this one is only ever compared.
def _optional_header(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": description,
    }


IF_NONE_MATCH = _optional_header(
    "If-None-Match", "304 while the answer still has one of these ETags."
)
IF_MATCH = _optional_header(
    "If-Match",
    "Change only if the task still has one of these ETags; else 412. More than "
    f"{MOST_IF_MATCH_VERSIONS} versions of the task named: 400.",
)

# If-Match is read from the request (`expected_etags`) and documented here.
CONDITIONAL: dict[str, Any] = {"openapi_extra": {"parameters": [IF_MATCH]}}

router = APIRouter(
    prefix="/api/{user_id}/tasks",
    tags=["tasks"],
    route_class=JSONBodyRoute,
    responses=COMMON_RESPONSES,
)

PENDING_WORDS = {"pending", "incomplete", "active", "open", "todo"}
COMPLETED_WORDS = {"completed", "complete", "done"}
TRUE_WORDS = {"true", "1", "yes"}
FALSE_WORDS = {"false", "0", "no"}
MAX_PAGE_NUMBER = 2**31 - 1


def _first(*values: str | None) -> str | None:
    return next((value.strip() for value in values if value is not None and value.strip()), None)


def _non_negative(value: str | None) -> int | None:
    # isdigit() alone accepts "²" and "①", which int() does not; and int() refuses strings of
    # over 4,300 digits, which are beyond any page anyway.
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    return MAX_PAGE_NUMBER if len(value) > 10 else min(int(value), MAX_PAGE_NUMBER)


def _completed_filter(status_value: str | None, completed_value: str | None) -> bool | None:
    word = (status_value or "").lower()
    if word in PENDING_WORDS:
        return False
    if word in COMPLETED_WORDS:
        return True
    flag = (completed_value or "").lower()
    if flag in TRUE_WORDS:
        return True
    if flag in FALSE_WORDS:
        return False
    return None


def _ordering(sort_value: str | None, order_value: str | None) -> tuple[str, bool]:
    """The sort key (`queries.SORT_COLUMNS`) and whether it runs descending."""
    sort = (sort_value or "created").lower()
    # Each sort key with the direction it takes when no `order` is given.
    if sort in {"created_oldest", "oldest"}:
        key, descending = "created", False
    elif sort in {"updated", "updated_at"}:
        key, descending = "updated", True
    elif sort == "title":
        key, descending = "title", False
    else:
        key, descending = "created", True
    direction = (order_value or "").lower()
    if direction in {"asc", "desc"}:
        descending = direction == "desc"
    return key, descending


LIST_PARAMETERS = [
    ("status", "all, pending (incomplete, active, open, todo) or completed (done)."),
    ("status_filter", "Same as `status`."),
    ("completed", "true or false: another way to filter."),
    ("sort", "created (newest first, the default), created_oldest, updated, title."),
    ("sort_by", "Same as `sort`."),
    ("sortBy", "Same as `sort`."),
    ("order", "asc or desc: overrides the sort's direction."),
    ("sort_order", "Same as `order`."),
    ("sortOrder", "Same as `order`."),
    ("search", "Case-insensitive substring of the title or description."),
    ("q", "Same as `search`."),
    ("limit", "At most this many tasks; all when absent."),
    ("offset", "Skip this many tasks first."),
    ("skip", "Same as `offset`."),
]


def list_options(request: Request) -> ListOptions:
    """Read leniently from the query string: an unknown parameter or value is ignored, never
    a 422, so the parameters are read here rather than declared one by one."""
    query = request.query_params
    if not query:
        return queries.DEFAULT_LIST
    # PostgreSQL text cannot hold NUL, and no stored title contains one.
    search_text = (_first(query.get("search"), query.get("q")) or "").replace("\x00", "")
    sort, descending = _ordering(
        _first(query.get("sort"), query.get("sort_by"), query.get("sortBy")),
        _first(query.get("order"), query.get("sort_order"), query.get("sortOrder")),
    )
    return ListOptions(
        completed=_completed_filter(
            _first(query.get("status"), query.get("status_filter")), query.get("completed")
        ),
        search=search_text or None,
        sort=sort,
        descending=descending,
        limit=_non_negative(query.get("limit")),
        offset=_non_negative(_first(query.get("offset"), query.get("skip"))),
    )


@router.get(
    "",
    response_model=list[TaskPublic],
    responses={
        status.HTTP_200_OK: {
            "headers": {
                "X-Total-Count": {
                    "description": "Tasks matching the filters, before paging.",
                    "schema": {"type": "integer"},
                },
                "ETag": {"description": "Of this answer.", "schema": {"type": "string"}},
            }
        },
        **NOT_MODIFIED,
    },
    openapi_extra={
        "parameters": [
            IF_NONE_MATCH,
            *(
                {
                    "name": name,
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": description,
                }
                for name, description in LIST_PARAMETERS
            ),
        ]
    },
)
async def list_tasks(user_id: UserId, request: Request) -> Response:
    """List the user's tasks, newest first, optionally filtered, searched, sorted and paged."""
    await authorize(request, user_id)
    rows, total = await queries.list_tasks(database(request), user_id, list_options(request))
    body = to_json(public_tasks(user_id, rows))
    headers = {
        "X-Total-Count": str(total),
        # A hash of the body: any change to any task listed, or to which are listed, changes it.
        # XXH3 (128 bits) rather than a cryptographic hash: under 1 µs for a 100-task list
        # against 25 for BLAKE2b, and a collision could only make the user's own cache stale.
        "ETag": f'"{xxhash.xxh3_128_hexdigest(body)}"',
    }
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and _matches(headers["ETag"], if_none_match):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return json_response(body, headers=headers)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TaskPublic,
    responses={
        status.HTTP_409_CONFLICT: _error("A request with this Idempotency-Key is in progress."),
        status.HTTP_413_CONTENT_TOO_LARGE: _error("The body is over the size limit."),
    },
)
async def create_task(
    user_id: UserId,
    new_task: TaskCreate,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Create a task for the user. The owner comes from the token, never from the body.

    With an `Idempotency-Key` header, retries with the same key and body return the first 201
    and create nothing more; the same key with another body is a 422.
    """
    await authorize(request, user_id)
    fields = new_task.model_dump()
    if idempotency_key is None:
        row = await queries.create_task(database(request), user_id, fields)
        return json_response(
            to_json(public_task(row)), status.HTTP_201_CREATED, {"ETag": etag_for(row)}
        )
    ttl = request.app.state.settings.idempotency_key_ttl_seconds
    async with database(request).atomic() as transaction:
        stored = await reserve_or_replay(
            transaction, user_id, idempotency_key, request_fingerprint(fields), ttl
        )
        if stored is not None:
            # A stored answer is a create's 201: the new task, at its first version.
            created_id = orjson.loads(stored.body)["id"]
            return json_response(
                stored.body,
                stored.status_code,
                {
                    "Idempotent-Replayed": "true",
                    "ETag": queries.task_etag(created_id, queries.FIRST_VERSION),
                },
            )
        row = await queries.create_task(transaction, user_id, fields)
        body = to_json(public_task(row))
        await store_response(
            transaction, user_id, idempotency_key, StoredResponse(status.HTTP_201_CREATED, body)
        )
    return json_response(body, status.HTTP_201_CREATED, {"ETag": etag_for(row)})


@router.get(
    "/{task_id}",
    response_model=TaskPublic,
    responses={**NOT_FOUND, **NOT_MODIFIED},
    openapi_extra={"parameters": [IF_NONE_MATCH]},
)
async def read_task(user_id: UserId, task_id: TaskId, request: Request) -> Response:
    """Get one of the user's tasks, with its ETag."""
    await authorize(request, user_id)
    task = await queries.get_task(database(request), user_id, task_id)
    if task is None:
        raise TaskNotFound()
    etag = etag_for(task)
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and _matches(etag, if_none_match):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    return json_response(to_json(public_task(task)), headers={"ETag": etag})


def _matches(etag: str, header: str) -> bool:
    """Weak comparison (RFC 9110 §13.1.2), as If-None-Match uses."""
    if header.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in header.split(","))


async def _change_owned(
    db: Database,
    task_id: int,
    owner_id: str,
    etags: frozenset[str] | None,
    changes: dict[str, Any],
    *,
    toggle: bool = False,
) -> Response:
    """One UPDATE … RETURNING: ownership, If-Match and the change in a single statement."""
    versions = versions_allowed(etags, task_id)
    row = await queries.change_task(db, owner_id, task_id, changes, versions, toggle=toggle)
    if row is None:
        await _raise_missing_or_changed(db, task_id, owner_id, versions)
    return json_response(to_json(public_task(row)), headers={"ETag": etag_for(row)})


async def _raise_missing_or_changed(
    db: Database, task_id: int, owner_id: str, versions: frozenset[int] | None
) -> NoReturn:
    if versions is not None and await queries.task_exists(db, owner_id, task_id):
        raise PreconditionFailed()
    raise TaskNotFound()


@router.put("/{task_id}", response_model=TaskPublic, responses=WRITE_RESPONSES, **CONDITIONAL)
@router.patch("/{task_id}", response_model=TaskPublic, responses=WRITE_RESPONSES, **CONDITIONAL)
async def update_task(
    user_id: UserId, task_id: TaskId, changes: TaskUpdate, request: Request
) -> Response:
    """Change the fields present in the body; others keep their values (PUT and PATCH alike).

    Without `If-Match` the last write wins; with it, a task changed meanwhile gives 412.
    """
    await authorize(request, user_id)
    return await _change_owned(
        database(request),
        task_id,
        user_id,
        expected_etags(request),
        changes.model_dump(exclude_unset=True),
    )


@router.patch(
    "/{task_id}/complete", response_model=TaskPublic, responses=WRITE_RESPONSES, **CONDITIONAL
)
async def toggle_completion(
    user_id: UserId,
    task_id: TaskId,
    request: Request,
    change: Annotated[CompletionChange | None, Body()] = None,
) -> Response:
    """Toggle completion (no body or `{}`), or set it with `{"completed": true|false}`."""
    await authorize(request, user_id)
    db, etags = database(request), expected_etags(request)
    if change is None or change.completed is None:
        return await _change_owned(db, task_id, user_id, etags, {}, toggle=True)
    return await _change_owned(db, task_id, user_id, etags, {"completed": change.completed})


@router.delete(
    "/{task_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=WRITE_RESPONSES,
    **CONDITIONAL,
)
async def delete_task(user_id: UserId, task_id: TaskId, request: Request) -> None:
    """Delete one of the user's tasks."""
    await authorize(request, user_id)
    versions = versions_allowed(expected_etags(request), task_id)
    db = database(request)
    if not await queries.delete_task(db, user_id, task_id, versions):
        await _raise_missing_or_changed(db, task_id, user_id, versions)
