"""The locked task API: `/api/{user_id}/tasks[/{task_id}[/complete]]`.

Ownership is part of every statement's WHERE clause and `OwnerId` has already checked the path
against the token, so each write is one round trip and no route repeats an ownership check.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response, status
from sqlalchemy import ColumnElement, delete, func, not_, or_, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped
from sqlmodel import col, select

from dependencies import (
    ExpectedETags,
    IdempotencyKey,
    OwnedTask,
    OwnerId,
    SessionDep,
    TaskId,
    enforce_rate_limit,
    etag_for,
    versions_allowed,
)
from errors import PreconditionFailed, TaskNotFound
from idempotency import StoredResponse, request_fingerprint, reserve_or_replay, store_response
from json_body import JSONBodyRoute
from models import (
    CompletionChange,
    ErrorMessage,
    Task,
    TaskCreate,
    TaskPublic,
    TaskUpdate,
    utc_now,
)


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
WRITE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **NOT_FOUND,
    status.HTTP_412_PRECONDITION_FAILED: _error("If-Match no longer matches the task's ETag."),
    status.HTTP_413_CONTENT_TOO_LARGE: _error("The body is over the size limit."),
}
JSON_MEDIA_TYPE = "application/json"

router = APIRouter(
    prefix="/api/{user_id}/tasks",
    tags=["tasks"],
    route_class=JSONBodyRoute,
    responses=COMMON_RESPONSES,
    dependencies=[Depends(enforce_rate_limit)],
)


@dataclass(frozen=True, slots=True)
class ListOptions:
    completed: bool | None
    search: str | None
    order_by: tuple[ColumnElement[Any], ...]
    limit: int | None
    offset: int | None


PENDING_WORDS = {"pending", "incomplete", "active", "open", "todo"}
COMPLETED_WORDS = {"completed", "complete", "done"}
TRUE_WORDS = {"true", "1", "yes"}
FALSE_WORDS = {"false", "0", "no"}
MAX_PAGE_NUMBER = 2**31 - 1


def _first(*values: str | None) -> str | None:
    return next((value.strip() for value in values if value is not None and value.strip()), None)


def _non_negative(value: str | None) -> int | None:
    # isdigit() alone accepts "²" and "①", which int() does not.
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    return min(int(value), MAX_PAGE_NUMBER)


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


def _ordering(sort_value: str | None, order_value: str | None) -> tuple[ColumnElement[Any], ...]:
    sort = (sort_value or "created").lower()
    column: ColumnElement[Any] | Mapped[Any]
    # Each sort key with the direction it takes when no `order` is given.
    if sort in {"created_oldest", "oldest"}:
        column, descending = col(Task.created_at), False
    elif sort in {"updated", "updated_at"}:
        column, descending = col(Task.updated_at), True
    elif sort == "title":
        column, descending = func.lower(col(Task.title)), False
    else:
        column, descending = col(Task.created_at), True
    direction = (order_value or "").lower()
    if direction in {"asc", "desc"}:
        descending = direction == "desc"
    if descending:
        return column.desc(), col(Task.id).desc()
    return column.asc(), col(Task.id).asc()


def list_options(
    status_: Annotated[
        str | None,
        Query(
            alias="status",
            description="all, pending (incomplete, active, open, todo) or completed (done).",
        ),
    ] = None,
    status_filter: Annotated[str | None, Query(description="Same as `status`.")] = None,
    completed: Annotated[
        str | None, Query(description="true or false: another way to filter.")
    ] = None,
    sort: Annotated[
        str | None,
        Query(description="created (newest first, the default), created_oldest, updated, title."),
    ] = None,
    sort_by: Annotated[str | None, Query(description="Same as `sort`.")] = None,
    sort_by_camel: Annotated[
        str | None, Query(alias="sortBy", description="Same as `sort`.")
    ] = None,
    order: Annotated[
        str | None, Query(description="asc or desc: overrides the sort's direction.")
    ] = None,
    sort_order: Annotated[str | None, Query(description="Same as `order`.")] = None,
    sort_order_camel: Annotated[
        str | None, Query(alias="sortOrder", description="Same as `order`.")
    ] = None,
    search: Annotated[
        str | None, Query(description="Case-insensitive substring of the title or description.")
    ] = None,
    q: Annotated[str | None, Query(description="Same as `search`.")] = None,
    limit: Annotated[
        str | None, Query(description="At most this many tasks; all when absent.")
    ] = None,
    offset: Annotated[str | None, Query(description="Skip this many tasks first.")] = None,
    skip: Annotated[str | None, Query(description="Same as `offset`.")] = None,
) -> ListOptions:
    """Lenient by design: an unknown parameter or value is ignored, never a 422."""
    # PostgreSQL text cannot hold NUL, and no stored title contains one.
    search_text = (_first(search, q) or "").replace("\x00", "")
    return ListOptions(
        completed=_completed_filter(_first(status_, status_filter), completed),
        search=search_text or None,
        order_by=_ordering(
            _first(sort, sort_by, sort_by_camel), _first(order, sort_order, sort_order_camel)
        ),
        limit=_non_negative(limit),
        offset=_non_negative(_first(offset, skip)),
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
                }
            }
        }
    },
)
async def list_tasks(
    owner_id: OwnerId,
    session: SessionDep,
    response: Response,
    options: Annotated[ListOptions, Depends(list_options)],
) -> Sequence[Task]:
    """List the user's tasks, newest first, optionally filtered, searched, sorted and paged."""
    conditions: list[ColumnElement[bool]] = [col(Task.user_id) == owner_id]
    if options.completed is not None:
        conditions.append(col(Task.completed) == options.completed)
    if options.search:
        conditions.append(
            or_(
                col(Task.title).icontains(options.search, autoescape=True),
                col(Task.description).icontains(options.search, autoescape=True),
            )
        )
    statement = select(Task).where(*conditions).order_by(*options.order_by)
    paged = options.limit is not None or options.offset is not None
    if options.limit is not None:
        statement = statement.limit(options.limit)
    if options.offset is not None:
        statement = statement.offset(options.offset)
    tasks = (await session.scalars(statement)).all()
    if paged:
        total = await session.scalar(select(func.count()).select_from(Task).where(*conditions))
        response.headers["X-Total-Count"] = str(total or 0)
    else:
        response.headers["X-Total-Count"] = str(len(tasks))
    return tasks


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
    new_task: TaskCreate,
    owner_id: OwnerId,
    session: SessionDep,
    request: Request,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> Task | Response:
    """Create a task for the user. The owner comes from the token, never from the body.

    With an `Idempotency-Key` header, retries with the same key and body return the first 201
    and create nothing more; the same key with another body is a 422.
    """
    now = utc_now()
    task = Task.model_validate(
        new_task, update={"user_id": owner_id, "created_at": now, "updated_at": now}
    )
    if idempotency_key is None:
        session.add(task)
        await session.commit()
        response.headers["ETag"] = etag_for(task)
        return task
    fingerprint = request_fingerprint(new_task.model_dump(mode="json"))
    ttl = request.app.state.settings.idempotency_key_ttl_seconds
    stored = await reserve_or_replay(session, owner_id, idempotency_key, fingerprint, ttl)
    if stored is not None:
        return Response(
            stored.body,
            status_code=stored.status_code,
            media_type=JSON_MEDIA_TYPE,
            headers={"Idempotent-Replayed": "true"},
        )
    session.add(task)
    await session.flush()
    body = TaskPublic.model_validate(task).model_dump_json().encode()
    await store_response(session, owner_id, idempotency_key, StoredResponse(201, body))
    await session.commit()
    return Response(
        body,
        status_code=status.HTTP_201_CREATED,
        media_type=JSON_MEDIA_TYPE,
        headers={"ETag": etag_for(task)},
    )


# OwnedTask reads `task_id` from the path.
@router.get(
    "/{task_id}",  # noqa: FAST003
    response_model=TaskPublic,
    responses={**NOT_FOUND, status.HTTP_304_NOT_MODIFIED: {"description": "Not modified."}},
)
async def read_task(
    task: OwnedTask,
    response: Response,
    if_none_match: Annotated[
        str | None, Header(description="304 when the task still has one of these ETags.")
    ] = None,
) -> Task | Response:
    """Get one of the user's tasks, with its ETag."""
    etag = etag_for(task)
    if if_none_match is not None and _matches(etag, if_none_match):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    response.headers["ETag"] = etag
    return task


def _matches(etag: str, header: str) -> bool:
    """Weak comparison (RFC 9110 §13.1.2), as If-None-Match uses."""
    if header.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in header.split(","))


async def _change_owned(
    session: AsyncSession,
    response: Response,
    task_id: int,
    owner_id: str,
    etags: frozenset[str] | None,
    values: dict[str, Any],
) -> Task:
    """One UPDATE … RETURNING: ownership, If-Match and the change in a single statement."""
    versions = versions_allowed(etags, task_id)
    conditions = [col(Task.id) == task_id, col(Task.user_id) == owner_id]
    if versions is not None:
        conditions.append(col(Task.version).in_(versions))
    statement = (
        update(Task)
        .where(*conditions)
        .values(**values, updated_at=utc_now(), version=col(Task.version) + 1)
        .returning(Task)
    )
    task = await session.scalar(statement)
    if task is None:
        await _raise_missing_or_changed(session, task_id, owner_id, versions)
    await session.commit()
    response.headers["ETag"] = etag_for(task)
    return task


async def _raise_missing_or_changed(
    session: AsyncSession, task_id: int, owner_id: str, versions: frozenset[int] | None
) -> NoReturn:
    if versions is not None:
        exists = await session.scalar(
            select(col(Task.id)).where(col(Task.id) == task_id, col(Task.user_id) == owner_id)
        )
        if exists is not None:
            raise PreconditionFailed()
    raise TaskNotFound()


@router.put("/{task_id}", response_model=TaskPublic, responses=WRITE_RESPONSES)
@router.patch("/{task_id}", response_model=TaskPublic, responses=WRITE_RESPONSES)
async def update_task(
    changes: TaskUpdate,
    task_id: TaskId,
    owner_id: OwnerId,
    etags: ExpectedETags,
    session: SessionDep,
    response: Response,
) -> Task:
    """Change the fields present in the body; others keep their values (PUT and PATCH alike).

    Without `If-Match` the last write wins; with it, a task changed meanwhile gives 412.
    """
    values = changes.model_dump(exclude_unset=True)
    return await _change_owned(session, response, task_id, owner_id, etags, values)


@router.patch("/{task_id}/complete", response_model=TaskPublic, responses=WRITE_RESPONSES)
async def toggle_completion(
    task_id: TaskId,
    owner_id: OwnerId,
    etags: ExpectedETags,
    session: SessionDep,
    response: Response,
    change: Annotated[CompletionChange | None, Body()] = None,
) -> Task:
    """Toggle completion (no body or `{}`), or set it with `{"completed": true|false}`."""
    if change is None or change.completed is None:
        # One atomic statement: concurrent toggles each flip the stored value.
        completed: Any = not_(col(Task.completed))
    else:
        completed = change.completed
    return await _change_owned(
        session, response, task_id, owner_id, etags, {"completed": completed}
    )


@router.delete(
    "/{task_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=WRITE_RESPONSES,
)
async def delete_task(
    task_id: TaskId, owner_id: OwnerId, etags: ExpectedETags, session: SessionDep
) -> None:
    """Delete one of the user's tasks."""
    versions = versions_allowed(etags, task_id)
    conditions = [col(Task.id) == task_id, col(Task.user_id) == owner_id]
    if versions is not None:
        conditions.append(col(Task.version).in_(versions))
    deleted = await session.scalar(delete(Task).where(*conditions).returning(col(Task.id)))
    if deleted is None:
        await _raise_missing_or_changed(session, task_id, owner_id, versions)
    await session.commit()
