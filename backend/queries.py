"""The SQL the task routes run, one statement per operation, ownership in every WHERE clause.

SQLAlchemy Core on the table `models.Task` defines: rows come back as plain tuples and go out as
JSON without building ORM objects or validating them again. The common statements are built once
at import; SQLAlchemy then reuses their compiled form.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from sqlalchemy import (
    ColumnElement,
    Row,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    not_,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import SQLModel

from models import Task, utc_now

TASKS: Table = SQLModel.metadata.tables[Task.__tablename__]
# A row of COLUMNS, read by name: row.id, row.title, ...
TaskRow: TypeAlias = Row[*tuple[Any, ...]]
COLUMNS = (
    TASKS.c.id,
    TASKS.c.user_id,
    TASKS.c.title,
    TASKS.c.description,
    TASKS.c.completed,
    TASKS.c.created_at,
    TASKS.c.updated_at,
    TASKS.c.version,
)
OWNED = and_(TASKS.c.id == bindparam("task_id"), TASKS.c.user_id == bindparam("owner_id"))
NEWEST_FIRST = (TASKS.c.created_at.desc(), TASKS.c.id.desc())

LIST_NEWEST_FIRST = (
    select(*COLUMNS).where(TASKS.c.user_id == bindparam("owner_id")).order_by(*NEWEST_FIRST)
)
SELECT_OWNED = select(*COLUMNS).where(OWNED)
INSERT_TASK = insert(TASKS).returning(*COLUMNS)
# One atomic statement: concurrent toggles each flip the value they find.
TOGGLE_OWNED = (
    update(TASKS)
    .where(OWNED)
    .values(
        completed=not_(TASKS.c.completed),
        updated_at=bindparam("now"),
        version=TASKS.c.version + 1,
    )
    .returning(*COLUMNS)
)
DELETE_OWNED = delete(TASKS).where(OWNED).returning(TASKS.c.id)
OWNED_EXISTS = select(TASKS.c.id).where(OWNED)


@dataclass(frozen=True, slots=True)
class ListOptions:
    completed: bool | None = None
    search: str | None = None
    order_by: tuple[ColumnElement[Any], ...] = NEWEST_FIRST
    limit: int | None = None
    offset: int | None = None

    @property
    def is_default(self) -> bool:
        return self == DEFAULT_LIST


DEFAULT_LIST = ListOptions()


async def list_tasks(
    connection: AsyncConnection, owner_id: str, options: ListOptions
) -> tuple[Sequence[TaskRow], int]:
    """The owner's tasks as the options ask, and how many match before paging."""
    if options.is_default:
        rows = (await connection.execute(LIST_NEWEST_FIRST, {"owner_id": owner_id})).all()
        return rows, len(rows)
    conditions: list[ColumnElement[bool]] = [TASKS.c.user_id == owner_id]
    if options.completed is not None:
        conditions.append(TASKS.c.completed == options.completed)
    if options.search:
        conditions.append(
            or_(
                TASKS.c.title.icontains(options.search, autoescape=True),
                TASKS.c.description.icontains(options.search, autoescape=True),
            )
        )
    statement = select(*COLUMNS).where(*conditions).order_by(*options.order_by)
    if options.limit is not None:
        statement = statement.limit(options.limit)
    if options.offset is not None:
        statement = statement.offset(options.offset)
    rows = (await connection.execute(statement)).all()
    if options.limit is None and options.offset is None:
        return rows, len(rows)
    total = await connection.scalar(select(func.count()).select_from(TASKS).where(*conditions))
    return rows, int(total or 0)


async def get_task(connection: AsyncConnection, owner_id: str, task_id: int) -> TaskRow | None:
    result = await connection.execute(SELECT_OWNED, {"task_id": task_id, "owner_id": owner_id})
    return result.first()


async def create_task(
    connection: AsyncConnection, owner_id: str, fields: dict[str, Any]
) -> TaskRow:
    now = utc_now()
    values = {**fields, "user_id": owner_id, "created_at": now, "updated_at": now, "version": 1}
    return (await connection.execute(INSERT_TASK, values)).one()


async def change_task(
    connection: AsyncConnection,
    owner_id: str,
    task_id: int,
    changes: dict[str, Any],
    versions: frozenset[int] | None,
    *,
    toggle: bool = False,
) -> TaskRow | None:
    """Apply `changes` (or flip `completed`) if the owner has the task at one of `versions`."""
    now = utc_now()
    parameters = {"task_id": task_id, "owner_id": owner_id, "now": now}
    if toggle and versions is None:
        return (await connection.execute(TOGGLE_OWNED, parameters)).first()
    statement = update(TASKS).where(OWNED)
    if versions is not None:
        statement = statement.where(TASKS.c.version.in_(versions))
    values: dict[str, Any] = {**changes, "updated_at": now, "version": TASKS.c.version + 1}
    if toggle:
        values["completed"] = not_(TASKS.c.completed)
    result = await connection.execute(statement.values(values).returning(*COLUMNS), parameters)
    return result.first()


async def delete_task(
    connection: AsyncConnection, owner_id: str, task_id: int, versions: frozenset[int] | None
) -> bool:
    statement = DELETE_OWNED
    if versions is not None:
        statement = statement.where(TASKS.c.version.in_(versions))
    result = await connection.execute(statement, {"task_id": task_id, "owner_id": owner_id})
    return result.first() is not None


async def task_exists(connection: AsyncConnection, owner_id: str, task_id: int) -> bool:
    found = await connection.scalar(OWNED_EXISTS, {"task_id": task_id, "owner_id": owner_id})
    return found is not None


def public_task(row: TaskRow) -> dict[str, Any]:
    """The task as the API shows it (the version stays internal: it is the ETag)."""
    return {
        "id": row.id,
        "user_id": row.user_id,
        "title": row.title,
        "description": row.description,
        "completed": row.completed,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def etag_for(row: TaskRow) -> str:
    return f'"{row.id}.{row.version}"'
