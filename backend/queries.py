"""The SQL the task routes run, one statement per operation, ownership in every WHERE clause.

SQLAlchemy Core on the table `models.Task` defines: rows come back as plain tuples and go out as
JSON without building ORM objects or validating them again. The common statements are built and
compiled once (`database.static`).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from sqlalchemy import (
    ColumnElement,
    Table,
    and_,
    bindparam,
    delete,
    false,
    func,
    insert,
    not_,
    or_,
    select,
    update,
)
from sqlmodel import SQLModel

from database import Database, static
from models import Task, utc_now

TASKS: Table = SQLModel.metadata.tables[Task.__tablename__]
# A row of COLUMNS, in that order: a plain tuple from psycopg on PostgreSQL (building named
# tuples costs more than the query's parsing), a SQLAlchemy Row on SQLite. ListRow: the same, of
# LIST_COLUMNS (a list's rows: no owner, no version, so not for `etag_for`).
TaskRow: TypeAlias = Any
ListRow: TypeAlias = Any
ID, VERSION = 0, 7
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
# A list row leaves out the owner, which the WHERE clause fixes, and the version, which only a
# single task's ETag uses (a list's hashes its body): per row, less for PostgreSQL to send and
# for the worker to decode. `public_tasks` puts the owner back.
LIST_COLUMNS = (
    TASKS.c.id,
    TASKS.c.title,
    TASKS.c.description,
    TASKS.c.completed,
    TASKS.c.created_at,
    TASKS.c.updated_at,
)
OWNED = and_(TASKS.c.id == bindparam("task_id"), TASKS.c.user_id == bindparam("owner_id"))
NEWEST_FIRST = (TASKS.c.created_at.desc(), TASKS.c.id.desc())

LIST_NEWEST_FIRST = static(
    select(*LIST_COLUMNS).where(TASKS.c.user_id == bindparam("owner_id")).order_by(*NEWEST_FIRST)
)
SELECT_OWNED = static(select(*COLUMNS).where(OWNED))
INSERT_TASK = static(
    insert(TASKS)
    .values(
        user_id=bindparam("owner_id"),
        title=bindparam("title"),
        description=bindparam("description"),
        completed=bindparam("completed"),
        created_at=bindparam("now"),
        updated_at=bindparam("now"),
        version=1,
    )
    .returning(*COLUMNS)
)
# One atomic statement: concurrent toggles each flip the value they find.
TOGGLE_OWNED = static(
    update(TASKS)
    .where(OWNED)
    .values(
        completed=not_(TASKS.c.completed),
        updated_at=bindparam("now"),
        version=TASKS.c.version + 1,
    )
    .returning(*COLUMNS)
)
DELETE_OWNED = static(delete(TASKS).where(OWNED).returning(TASKS.c.id))
OWNED_EXISTS = static(select(TASKS.c.id).where(OWNED))


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
    db: Database, owner_id: str, options: ListOptions
) -> tuple[Sequence[ListRow], int]:
    """The owner's tasks as the options ask (rows of LIST_COLUMNS), and how many match before
    paging."""
    if options.is_default:
        rows = await db.fetch_all(LIST_NEWEST_FIRST, {"owner_id": owner_id})
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
    statement = select(*LIST_COLUMNS).where(*conditions).order_by(*options.order_by)
    if options.limit is not None:
        statement = statement.limit(options.limit)
    if options.offset is not None:
        statement = statement.offset(options.offset)
    rows = await db.fetch_all(statement)
    if options.limit is None and options.offset is None:
        return rows, len(rows)
    total = await db.scalar(select(func.count()).select_from(TASKS).where(*conditions))
    return rows, int(total or 0)


async def get_task(db: Database, owner_id: str, task_id: int) -> TaskRow | None:
    return await db.fetch_one(SELECT_OWNED, {"task_id": task_id, "owner_id": owner_id})


async def create_task(db: Database, owner_id: str, fields: dict[str, Any]) -> TaskRow:
    row = await db.fetch_one(INSERT_TASK, {**fields, "owner_id": owner_id, "now": utc_now()})
    if row is None:  # INSERT … RETURNING always returns the row
        raise RuntimeError("the inserted task was not returned")
    return row


async def change_task(
    db: Database,
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
        return await db.fetch_one(TOGGLE_OWNED, parameters)
    statement = update(TASKS).where(OWNED)
    if versions is not None:
        statement = statement.where(_version_is_one_of(versions))
    values: dict[str, Any] = {**changes, "updated_at": now, "version": TASKS.c.version + 1}
    if toggle:
        values["completed"] = not_(TASKS.c.completed)
    return await db.fetch_one(statement.values(values).returning(*COLUMNS), parameters)


async def delete_task(
    db: Database, owner_id: str, task_id: int, versions: frozenset[int] | None
) -> bool:
    statement = DELETE_OWNED
    if versions is not None:
        statement = statement.where(_version_is_one_of(versions))
    deleted = await db.fetch_one(statement, {"task_id": task_id, "owner_id": owner_id})
    return deleted is not None


async def task_exists(db: Database, owner_id: str, task_id: int) -> bool:
    found = await db.scalar(OWNED_EXISTS, {"task_id": task_id, "owner_id": owner_id})
    return found is not None


def _version_is_one_of(versions: frozenset[int]) -> ColumnElement[bool]:
    # Plain comparisons rather than IN: no "expanding" parameter to render at compile time.
    return or_(false(), *(TASKS.c.version == version for version in sorted(versions)))


def public_task(row: TaskRow) -> dict[str, Any]:
    """The task as the API shows it (the version stays internal: it is the ETag)."""
    task_id, user_id, title, description, completed, created_at, updated_at, _ = row
    return {
        "id": task_id,
        "user_id": user_id,
        "title": title,
        "description": description,
        "completed": completed,
        "created_at": created_at,  # UTC, naive or aware (`database.Database`)
        "updated_at": updated_at,
    }


def public_tasks(owner_id: str, rows: Sequence[ListRow]) -> list[dict[str, Any]]:
    """Rows of LIST_COLUMNS, all the owner's, as the API shows them (one comprehension: no call
    per row)."""
    return [
        {
            "id": task_id,
            "user_id": owner_id,
            "title": title,
            "description": description,
            "completed": completed,
            "created_at": created_at,
            "updated_at": updated_at,
        }
        for task_id, title, description, completed, created_at, updated_at in rows
    ]


def etag_for(row: TaskRow) -> str:
    return f'"{row[ID]}.{row[VERSION]}"'
