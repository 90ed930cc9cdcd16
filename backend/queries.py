"""The SQL the task routes run, one statement per operation, ownership in every WHERE clause.

SQLAlchemy Core on the table `models.Task` defines: rows come back as plain tuples and go out as
JSON without building ORM objects or validating them again. Every statement is built and compiled
once per shape (`database.static`): the fixed ones here, and those that depend on the request
(which list filters, which fields an update sets, how many ETags If-Match names) on first use,
with the request's values as parameters. Building and compiling one per request cost SQLAlchemy
about 250 µs for a filtered list and 400 µs for an update, more than the rest of the request.
"""

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Executable,
    Integer,
    Select,
    and_,
    bindparam,
    delete,
    false,
    func,
    insert,
    not_,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.sql import Subquery

from database import Database, static
from models import FITS_LIST_INDEX, OVER_LIST_INDEX, TASKS_TABLE, utc_now

TASKS = TASKS_TABLE
# A row of COLUMNS, in that order: a plain tuple from psycopg on PostgreSQL (building named
# tuples costs more than the query's parsing), a SQLAlchemy Row on SQLite. ListRow: the same, of
# LIST_COLUMNS (a list's rows: no owner, no version, so not for `etag_for`).
TaskRow: TypeAlias = Any
ListRow: TypeAlias = Any
ID, VERSION = 0, 7
FIRST_VERSION = 1  # a new task's; each change adds one
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
        version=FIRST_VERSION,
    )
    .returning(*COLUMNS)
)
OWNED_EXISTS = static(select(TASKS.c.id).where(OWNED))
# What a list can be sorted by (then by id, the same way): a column of LIST_COLUMNS, and
# whether it is compared case-insensitively.
SORT_COLUMNS: dict[str, tuple[str, bool]] = {
    "created": ("created_at", False),
    "updated": ("updated_at", False),
    "title": ("title", True),
}
# If-Match naming more of a task's versions than this (one is usual) builds its statement anew:
# the shapes kept stay few.
MOST_VERSIONS_KEPT = 8
LIKE_ESCAPE = "/"


@dataclass(frozen=True, slots=True)
class ListOptions:
    completed: bool | None = None
    search: str | None = None
    sort: str = "created"  # a key of SORT_COLUMNS
    descending: bool = True  # the default: newest first
    limit: int | None = None
    offset: int | None = None


DEFAULT_LIST = ListOptions()


async def list_tasks(
    db: Database, owner_id: str, options: ListOptions
) -> tuple[Sequence[ListRow], int]:
    """The owner's tasks as the options ask (rows of LIST_COLUMNS), and how many match before
    paging."""
    statement, count = list_statements(options)
    parameters: dict[str, Any] = {"owner_id": owner_id}
    if options.completed is not None:
        parameters["completed"] = options.completed
    if options.search is not None:
        parameters["search"] = like_escaped(options.search)
    if options.limit is None and options.offset is None:
        rows = await db.fetch_all(statement, parameters)
        return rows, len(rows)
    rows = await db.fetch_all(
        statement, {**parameters, "limit": options.limit, "offset": options.offset}
    )
    total = await db.scalar(count, parameters)
    return rows, int(total or 0)


def list_statements(options: ListOptions) -> tuple[Select[Any], Select[Any]]:
    """The statements of a list as `options` ask: its rows and its total before paging."""
    return _list_statements(
        options.completed is not None,
        options.search is not None,
        options.sort,
        options.descending,
        options.limit is not None,
        options.offset is not None,
    )


@functools.cache
def _list_statements(
    filtered: bool, searched: bool, sort: str, descending: bool, limited: bool, offset: bool
) -> tuple[Select[Any], Select[Any]]:
    """A list's rows and its total before paging, for one combination of options (96 at most)."""
    conditions: list[ColumnElement[bool]] = [TASKS.c.user_id == bindparam("owner_id")]
    if filtered:
        conditions.append(TASKS.c.completed == bindparam("completed"))
    if searched:
        search: BindParameter[str] = bindparam("search")
        conditions.append(
            or_(
                TASKS.c.title.icontains(search, escape=LIKE_ESCAPE),
                TASKS.c.description.icontains(search, escape=LIKE_ESCAPE),
            )
        )
    tasks = owned(conditions)
    name, folded = SORT_COLUMNS[sort]
    column: ColumnElement[Any] = func.lower(tasks.c[name]) if folded else tasks.c[name]
    order = (column.desc(), tasks.c.id.desc()) if descending else (column.asc(), tasks.c.id.asc())
    statement = select(*tasks.c).order_by(*order)
    if limited:
        statement = statement.limit(bindparam("limit", type_=Integer))
    if offset:
        statement = statement.offset(bindparam("offset", type_=Integer))
    count = select(func.count()).select_from(tasks)
    return static(statement), static(count)


def owned(conditions: Sequence[ColumnElement[bool]]) -> Subquery:
    """The tasks that meet `conditions` (the first: `user_id = …`), as rows of LIST_COLUMNS,
    read through both of the owner's indexes (models.py): those whose text fits the covering
    one from it alone, an index-only scan wherever the table's pages are all-visible, and the
    others from the table (PostgreSQL then sorts the rows of the two branches together). A query
    by owner that leaves out the predicates can use neither index: it gets ix_tasks_user_id, and
    then a table page per task."""
    return union_all(
        select(*LIST_COLUMNS).where(*conditions, FITS_LIST_INDEX),
        select(*LIST_COLUMNS).where(*conditions, OVER_LIST_INDEX),
    ).subquery("owned")


def like_escaped(text: str) -> str:
    """`text` as a LIKE pattern that matches it literally (what SQLAlchemy's `autoescape` does,
    which takes no parameter): the escape character, `%` and `_` escaped."""
    return (
        text.replace(LIKE_ESCAPE, LIKE_ESCAPE * 2)
        .replace("%", LIKE_ESCAPE + "%")
        .replace("_", LIKE_ESCAPE + "_")
    )


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
    setting = tuple(sorted(changes))  # the fields TaskUpdate allows: a few shapes at most
    parameters = {"task_id": task_id, "owner_id": owner_id, "now": utc_now()}
    parameters.update({f"set_{name}": changes[name] for name in setting})
    parameters.update(_version_parameters(versions))
    return await db.fetch_one(_shaped(_build_change, versions, setting, toggle), parameters)


def _build_change(setting: tuple[str, ...], toggle: bool, versions: int | None) -> Executable:
    """An UPDATE … RETURNING of the fields in `setting`, or a flip of `completed` (one atomic
    statement: concurrent toggles each flip the value they find), if the task is at one of
    `versions` versions (parameters `if_match_0`, …; None: any version)."""
    statement = update(TASKS).where(OWNED)
    if versions is not None:
        statement = statement.where(_version_is_one_of(versions))
    # Each field from a parameter of its own (a parameter named as a column is SQLAlchemy's).
    values: dict[str, Any] = {name: bindparam(f"set_{name}") for name in setting}
    if toggle:
        values["completed"] = not_(TASKS.c.completed)
    values.update(updated_at=bindparam("now"), version=TASKS.c.version + 1)
    return statement.values(values).returning(*COLUMNS)


async def delete_task(
    db: Database, owner_id: str, task_id: int, versions: frozenset[int] | None
) -> bool:
    parameters: dict[str, Any] = {"task_id": task_id, "owner_id": owner_id}
    parameters.update(_version_parameters(versions))
    deleted = await db.fetch_one(_shaped(_build_delete, versions), parameters)
    return deleted is not None


def _build_delete(versions: int | None) -> Executable:
    statement = delete(TASKS).where(OWNED)
    if versions is not None:
        statement = statement.where(_version_is_one_of(versions))
    return statement.returning(TASKS.c.id)


def _shaped(
    build: Callable[..., Executable], versions: frozenset[int] | None, *shape: Any
) -> Executable:
    """`build(*shape, number of versions)`: built once and kept (`static`), unless If-Match names
    more than MOST_VERSIONS_KEPT versions, so that the shapes kept stay few."""
    count = None if versions is None else len(versions)
    if count is not None and count > MOST_VERSIONS_KEPT:
        return build(*shape, count)
    return _kept(build, *shape, count)


@functools.cache
def _kept(build: Callable[..., Executable], *shape: Any) -> Executable:
    return static(build(*shape))


async def task_exists(db: Database, owner_id: str, task_id: int) -> bool:
    found = await db.scalar(OWNED_EXISTS, {"task_id": task_id, "owner_id": owner_id})
    return found is not None


def _version_is_one_of(count: int) -> ColumnElement[bool]:
    # Plain comparisons rather than IN: no "expanding" parameter to render at compile time. With
    # no version (If-Match names none of this task's), `false`: nothing matches.
    return or_(false(), *(TASKS.c.version == bindparam(f"if_match_{i}") for i in range(count)))


def _version_parameters(versions: frozenset[int] | None) -> dict[str, int]:
    return {f"if_match_{i}": version for i, version in enumerate(sorted(versions or ()))}


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
    return task_etag(row[ID], row[VERSION])


def task_etag(task_id: int, version: int) -> str:
    return f'"{task_id}.{version}"'
