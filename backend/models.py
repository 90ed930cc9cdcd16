"""The task table and the schemas the API reads and writes."""

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, StrictBool, StringConstraints, field_validator
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    DateTime,
    Index,
    Integer,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
    false,
    func,
    literal_column,
    not_,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import GenericFunction
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

TITLE_MAX_LENGTH = 200
DESCRIPTION_MAX_LENGTH = 1000
USER_ID_MAX_LENGTH = 255
IDEMPOTENCY_KEY_MAX_LENGTH = 255
# The id column is a signed 64-bit integer on PostgreSQL and SQLite alike.
TASK_ID_MIN = -(2**63)
TASK_ID_MAX = 2**63 - 1


def utc_now() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, on PostgreSQL (timestamptz) and SQLite (text) alike.

    SQLite drops the offset and a PostgreSQL session may run in another time zone; a naive or
    shifted timestamp would be read by JavaScript `new Date()` as the browser's local time.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use datetime.now(UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Task(SQLModel, table=True):
    __tablename__ = "tasks"
    # Never reuse a deleted task's id: a stale browser tab must not edit its successor. The
    # owner's indexes are defined below the class, on its columns.
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    # Indexed on its own too (ix_tasks_user_id), for any query by owner that does not go through
    # the two list indexes below: another client of the database, an operator's script.
    user_id: str = Field(sa_column=Column(String(USER_ID_MAX_LENGTH), nullable=False, index=True))
    title: str = Field(sa_column=Column(String(TITLE_MAX_LENGTH), nullable=False))
    description: str | None = Field(
        default=None, sa_column=Column(String(DESCRIPTION_MAX_LENGTH), nullable=True)
    )
    completed: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default=false())
    )
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(UTCDateTime, nullable=False)
    )
    updated_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(UTCDateTime, nullable=False)
    )
    # Bumped by every write; the ETag. Not part of the API's task JSON.
    version: int = Field(default=1, sa_column=Column(Integer, nullable=False, server_default="1"))


class octet_length(GenericFunction[int]):  # noqa: N801 (SQL's name, as SQLAlchemy's func.*)
    """A text's length in bytes (UTF-8): PostgreSQL's `octet_length`; on SQLite, which has it
    only from 3.43, the length of the text as a blob."""

    type = Integer()
    name = "octet_length"
    inherit_cache = True


@compiles(octet_length, "sqlite")
def _sqlite_octet_length(element: octet_length, compiler: SQLCompiler, **kw: Any) -> str:
    return f"length(CAST({compiler.process(element.clauses, **kw)} AS BLOB))"


# The owner's tasks are read through two partial indexes that together hold every task, in the
# list's order (user_id, created_at, id). `ix_tasks_owner` also carries the columns a list shows
# (INCLUDE, on PostgreSQL), so a list is an index-only scan: a user's tasks are next to each
# other in the index however spread they are in the table (one heap page per task, as many users
# writing over time leave them). A B-tree entry holds at most 2,704 bytes, and a task's text may
# be 4,000 bytes of description alone (1,000 characters of 4 bytes each): a task whose text is
# over LIST_INDEX_TEXT_BYTES is in `ix_tasks_owner_long` instead, without the columns. The app's
# queries by owner read both (`queries.owned`): on PostgreSQL and SQLite a partial index serves
# only a query whose WHERE clause has its predicate. A plain `WHERE user_id = ?` gets
# ix_tasks_user_id, and then a page of the table per task.
LIST_INDEX_TEXT_BYTES = 2500  # measured: 2,654 bytes of text fit in the worst case
TASKS_TABLE: Table = SQLModel.metadata.tables[Task.__tablename__]  # Core: the queries' too
FITS_LIST_INDEX: ColumnElement[bool] = (
    octet_length(TASKS_TABLE.c.user_id)
    + octet_length(TASKS_TABLE.c.title)
    + func.coalesce(octet_length(TASKS_TABLE.c.description), literal_column("0"))
    # Literal, not a parameter: the planner must see that the query implies the predicate.
    <= literal_column(str(LIST_INDEX_TEXT_BYTES))
)
OVER_LIST_INDEX: ColumnElement[bool] = not_(FITS_LIST_INDEX)
LIST_INDEX_KEY = (TASKS_TABLE.c.user_id, TASKS_TABLE.c.created_at, TASKS_TABLE.c.id)
Index(
    "ix_tasks_owner",
    *LIST_INDEX_KEY,
    postgresql_include=["title", "description", "completed", "updated_at"],
    postgresql_where=FITS_LIST_INDEX,
    sqlite_where=FITS_LIST_INDEX,
)
Index(
    "ix_tasks_owner_long",
    *LIST_INDEX_KEY,
    postgresql_where=OVER_LIST_INDEX,
    sqlite_where=OVER_LIST_INDEX,
)


class IdempotencyRecord(SQLModel, table=True):
    """The response to a create sent with an `Idempotency-Key`, replayed to its retries."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (PrimaryKeyConstraint("user_id", "key"),)

    user_id: str = Field(sa_column=Column(String(USER_ID_MAX_LENGTH), nullable=False))
    key: str = Field(sa_column=Column(String(IDEMPOTENCY_KEY_MAX_LENGTH), nullable=False))
    request_hash: str = Field(sa_column=Column(String(64), nullable=False))
    status_code: int = Field(sa_column=Column(SmallInteger, nullable=False))
    response_body: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False, index=True))


def storable_text(value: str) -> str:
    """Refuse what PostgreSQL text cannot hold, so it is a 422 and never a driver error."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError("must be valid Unicode text (it contains a lone surrogate)") from error
    return value


def empty_as_none(value: str) -> str | None:
    return value or None


# Lengths count code points, after surrounding whitespace is trimmed.
Title = Annotated[
    str,
    StringConstraints(
        strict=True, strip_whitespace=True, min_length=1, max_length=TITLE_MAX_LENGTH
    ),
    AfterValidator(storable_text),
]
Description = Annotated[
    str,
    StringConstraints(strict=True, strip_whitespace=True, max_length=DESCRIPTION_MAX_LENGTH),
    AfterValidator(storable_text),
    AfterValidator(empty_as_none),
]


class TaskCreate(SQLModel):
    """A new task. Fields other than these (an `id`, a `user_id`, timestamps) are ignored."""

    title: Title
    description: Description | None = None
    completed: StrictBool = False


class TaskUpdate(SQLModel):
    """A partial update: only the fields present change; `description: null` clears it."""

    title: Title | None = None
    description: Description | None = None
    completed: StrictBool | None = None

    @field_validator("title", "completed", mode="before")
    @classmethod
    def refuse_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("may be left out but not set to null")
        return value


class CompletionChange(SQLModel):
    """Body of `PATCH …/complete`: absent or `{}` toggles; `{"completed": bool}` sets."""

    completed: StrictBool | None = None


class ErrorMessage(SQLModel):
    detail: str


class TaskPublic(SQLModel):
    id: int
    user_id: str
    title: str
    description: str | None
    completed: bool
    created_at: datetime
    updated_at: datetime
