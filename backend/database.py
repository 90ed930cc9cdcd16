"""What the routes run their statements through.

Statements are SQLAlchemy Core on the SQLModel tables (`queries.py`). On PostgreSQL they are
compiled once and executed by psycopg on the app's own lean pool (`pool.py`): SQLAlchemy's pool
and execution layer cost more than the query itself on the hot path (measured: 270 µs against
80 µs for one primary-key read), SQLAlchemy's pool lets newcomers overtake waiters and starved a
few requests for seconds under load, and psycopg_pool costs about 140 µs per request. On SQLite
(the embedded default) the SQLAlchemy engine runs them.

Single statements run in autocommit: one round trip each. `atomic()` groups several in one
transaction, with `SET LOCAL statement_timeout`.
"""

import logging
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg import AsyncCursor
from psycopg._preparing import Prepare, PrepareManager
from psycopg._queries import PostgresQuery
from psycopg.adapt import AdaptersMap
from psycopg.conninfo import make_conninfo
from psycopg.rows import tuple_row
from psycopg.types.datetime import TimestampBinaryLoader
from sqlalchemy import Select, literal_column, select
from sqlalchemy.dialects.postgresql.psycopg import PGDialectAsync_psycopg
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection as SQLAlchemyConnection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import Executable
from sqlalchemy.sql.elements import ClauseElement

from config import Settings
from pool import ConnectionPool, PooledConnection

logger = logging.getLogger("todo.database")
Parameters = Mapping[str, Any] | None
StatementT = TypeVar("StatementT", bound=Executable)
ResultT = TypeVar("ResultT")
POSTGRES = PGDialectAsync_psycopg()  # type: ignore[no-untyped-call]
SELECT_ONE: Select[Any] = select(literal_column("1"))
# The statements marked `static()`, by id: their SQL is compiled once per process. Held here, so
# that no other statement can take the id of one while its SQL is kept.
_static_statements: dict[int, Executable] = {}
# A binary timestamptz is microseconds since 2000-01-01 UTC, whatever the session's TimeZone:
# read with the plain timestamp loader it is that UTC moment as a naive datetime. psycopg's own
# loader converts each value into the session's zone (zoneinfo), and orjson then asks that zone
# for its offset: together about 1 µs a value, 100 µs on a 50-task list. Every statement on
# PostgreSQL asks for binary results.
ADAPTERS = AdaptersMap(psycopg.adapters)
ADAPTERS.register_loader("timestamptz", TimestampBinaryLoader)


# psycopg prepares a statement on the server from its sixth run on a connection.
PREPARE_THRESHOLD = 5
# What PostgreSQL answers when a statement name is missing from, or already taken in, the server
# session: the sign of a transaction-mode pooler that moves a client between server sessions
# without carrying its prepared statements (PgBouncer before 1.21, or max_prepared_statements=0).
STATEMENT_NAME_ERRORS = (
    psycopg.errors.InvalidSqlStatementName,
    psycopg.errors.DuplicatePreparedStatement,
)


class UniqueStatementNames(PrepareManager):
    """psycopg's prepared-statement bookkeeping, with names no other connection uses, and
    nothing ever deallocated.

    psycopg names a connection's statements `_pg3_0`, `_pg3_1`, … on every connection alike.
    Behind a pooler that shares server sessions between clients without tracking prepared
    statements, one client's `_pg3_3` could then run another client's statement of that name
    (another statement, the same parameter types: a read could run a delete). With a random
    prefix per connection a name only ever stands for its own statement: on a server session
    that lacks it PostgreSQL answers "does not exist" before running anything, and the
    database turns preparing off and runs the statement again (`PostgresDatabase._execute`).

    No DEALLOCATE is sent, by name or ALL: psycopg sends them after a statement has run (to
    evict the least recently used past `prepared_max`, and after a rollback), where a failure
    would look like the statement's own and be run again, and behind an old pooler DEALLOCATE
    ALL lands on another client's server session. The statements are few (the app's query
    shapes) and go with the connection (`max_lifetime`); forgotten ones are never reused, as
    names are never reused.
    """

    prepared_max = sys.maxsize  # nothing evicted: `_rotate` never queues a DEALLOCATE

    def __init__(self) -> None:
        super().__init__()
        self._prefix = f"todo_{secrets.token_hex(8)}".encode()

    def get(self, query: PostgresQuery, prepare: bool | None = None) -> tuple[Prepare, bytes]:
        decision, name = super().get(query, prepare)
        if decision is Prepare.SHOULD:
            name = self._prefix + name
        return decision, name

    def clear(self) -> bool:
        """Forget the statements here only (psycopg would also queue DEALLOCATE ALL)."""
        self._counts.clear()
        if not self._names:
            return False
        self._names.clear()
        return True


class Database(Protocol):
    """Rows are tuples in the statement's column order. Timestamps are UTC: naive datetimes on
    PostgreSQL (`ADAPTERS`), aware ones on SQLite (`models.UTCDateTime`); `json_body.to_json`
    writes both the same way."""

    dialect: str

    async def fetch_all(
        self, statement: Executable, parameters: Parameters = None
    ) -> Sequence[Any]: ...

    async def fetch_one(
        self, statement: Executable, parameters: Parameters = None
    ) -> Any | None: ...

    async def scalar(self, statement: Executable, parameters: Parameters = None) -> Any: ...

    def atomic(self) -> AbstractAsyncContextManager["Database"]: ...


def psycopg_conninfo(url: URL) -> str:
    """libpq keywords from the URL, its query parameters (sslmode, channel_binding, options…)
    passed as they are. Not the URL re-rendered: that would write a space as "+", which libpq
    does not read back as a space."""
    keywords: dict[str, Any] = {
        "host": url.host,
        "port": url.port,
        "dbname": url.database,
        "user": url.username,
        "password": url.password,
    }
    for name, value in url.query.items():
        keywords[name] = value[-1] if isinstance(value, tuple) else value
    return make_conninfo(**{name: value for name, value in keywords.items() if value is not None})


class _Statements:
    """`scalar` on top of `fetch_one`, for every way of running statements."""

    async def fetch_one(self, statement: Executable, parameters: Parameters = None) -> Any | None:
        raise NotImplementedError

    async def scalar(self, statement: Executable, parameters: Parameters = None) -> Any:
        row = await self.fetch_one(statement, parameters)
        return None if row is None else row[0]


class PostgresDatabase(_Statements):
    dialect = "postgresql"

    def __init__(self, url: URL, settings: Settings) -> None:
        self.statement_timeout_ms = settings.database_statement_timeout_ms
        self._compiled: dict[int, tuple[str, dict[str, Any]]] = {}
        conninfo = psycopg_conninfo(url)
        connect_timeout = settings.database_connect_timeout_seconds

        # Server-side prepared statements spare PostgreSQL parsing and planning each statement
        # (half its CPU for a primary-key read). A direct connection keeps them, and so does a
        # pooler that supports them at the protocol level (Neon's; PgBouncer >= 1.21 with
        # max_prepared_statements). Behind one that does not, the first statement that misses
        # its name turns them off (`_execute`); DATABASE_PREPARED_STATEMENTS=false never starts.
        self.prepare_threshold = (
            PREPARE_THRESHOLD if settings.database_prepared_statements else None
        )

        async def connect() -> PooledConnection:
            connection = await PooledConnection.connect(
                conninfo,
                autocommit=True,
                prepare_threshold=None,
                connect_timeout=connect_timeout,
                row_factory=tuple_row,
                context=ADAPTERS,
            )
            connection._prepared = UniqueStatementNames()
            connection.prepare_threshold = self.prepare_threshold
            return connection

        self.pool = ConnectionPool(
            connect,
            max_size=settings.database_pool_size + settings.database_max_overflow,
            timeout=settings.database_pool_timeout_seconds,
            ping_idle=settings.database_ping_idle_seconds,
            # Close idle connections before Neon's five-minute suspend and pooler would.
            max_idle=60,
            max_lifetime=240,
        )

    async def open(self) -> None:
        await self.pool.open()

    async def close(self) -> None:
        await self.pool.close()

    def compile(self, statement: Executable, parameters: Parameters) -> tuple[str, dict[str, Any]]:
        """SQL for psycopg and its parameters; the module-level statements are compiled once."""
        key = id(statement)
        cached = self._compiled.get(key)
        if cached is None:
            assert isinstance(statement, ClauseElement)  # noqa: S101  (every Core statement is)
            compiled = statement.compile(
                dialect=POSTGRES, compile_kwargs={"render_postcompile": True}
            )
            cached = (str(compiled), dict(compiled.params))
            if is_static(statement):
                self._compiled[key] = cached
        sql, defaults = cached
        return sql, {**defaults, **(parameters or {})}

    async def fetch_all(
        self, statement: Executable, parameters: Parameters = None
    ) -> Sequence[Any]:
        return await self._fetch(statement, parameters, AsyncCursor.fetchall)

    async def fetch_one(self, statement: Executable, parameters: Parameters = None) -> Any | None:
        return await self._fetch(statement, parameters, AsyncCursor.fetchone)

    async def _fetch(
        self,
        statement: Executable,
        parameters: Parameters,
        fetch: Callable[[AsyncCursor[Any]], Awaitable[ResultT]],
    ) -> ResultT:
        """Run the statement on a pooled connection and `fetch` its rows before the connection
        goes back: its cursor is the next holder's."""
        sql, values = self.compile(statement, parameters)
        connection = await self.pool.acquire()
        try:
            return await fetch(await self._execute(connection, sql, values, is_static(statement)))
        finally:
            self.pool.release(connection)

    async def _execute(
        self, connection: PooledConnection, sql: str, values: dict[str, Any], prepare: bool = True
    ) -> AsyncCursor[Any]:
        """One statement in autocommit, prepared on the server from its sixth run unless
        `prepare` is false. The request path prepares only `static` statements: one built per
        request (If-Match naming many versions) can be a new SQL text each time, and would pile
        up in the server session. A statement name missing on the server (see
        `UniqueStatementNames`) fails before anything runs: preparing stops on every connection
        and the statement runs again, unprepared."""
        try:
            return await connection.statements.execute(
                sql, values, binary=True, prepare=None if prepare else False
            )
        except STATEMENT_NAME_ERRORS:
            if connection.prepare_threshold is None:
                raise
            self._stop_preparing(connection)
            return await connection.statements.execute(sql, values, binary=True, prepare=False)

    def _stop_preparing(self, connection: PooledConnection) -> None:
        if self.prepare_threshold is not None:
            logger.warning(
                "server-side prepared statements turned off: a prepared statement was missing "
                "on the server, as behind a transaction-mode pooler without support for them "
                "(PgBouncer before 1.21, or max_prepared_statements = 0); "
                "DATABASE_PREPARED_STATEMENTS=false skips the attempt"
            )
        self.prepare_threshold = None
        connection.prepare_threshold = None
        for idle in self.pool.idle_connections():
            idle.prepare_threshold = None

    @asynccontextmanager
    async def atomic(self) -> AsyncIterator[Database]:
        async with self.pool.connection() as connection, connection.transaction():
            if self.statement_timeout_ms:
                await connection.statements.execute(
                    f"SET LOCAL statement_timeout = {int(self.statement_timeout_ms)}",
                    prepare=False,
                )
            yield _PsycopgTransaction(self, connection)

    async def ping(self) -> None:
        async with self.pool.connection() as connection:
            # Never prepared: a readiness check must not depend on the pooler keeping statements.
            await connection.execute("SELECT 1", prepare=False)


class _PsycopgTransaction(_Statements):
    """The statements of one `atomic()` block, on its connection. Never prepared: a statement
    name missing on the server would abort the transaction, which cannot be run again here."""

    dialect = "postgresql"

    def __init__(self, database: PostgresDatabase, connection: PooledConnection) -> None:
        self._database = database
        self._connection = connection

    async def fetch_all(
        self, statement: Executable, parameters: Parameters = None
    ) -> Sequence[Any]:
        sql, values = self._database.compile(statement, parameters)
        cursor = self._connection.statements
        return await (await cursor.execute(sql, values, binary=True, prepare=False)).fetchall()

    async def fetch_one(self, statement: Executable, parameters: Parameters = None) -> Any | None:
        sql, values = self._database.compile(statement, parameters)
        cursor = self._connection.statements
        return await (await cursor.execute(sql, values, binary=True, prepare=False)).fetchone()

    def atomic(self) -> AbstractAsyncContextManager[Database]:
        raise RuntimeError("already in a transaction")


class SQLAlchemyDatabase(_Statements):
    """The embedded SQLite database, through the SQLAlchemy engine; each call commits."""

    dialect = "sqlite"

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def fetch_all(
        self, statement: Executable, parameters: Parameters = None
    ) -> Sequence[Any]:
        async with self.engine.connect() as connection:
            rows = (await connection.execute(statement, dict(parameters or {}))).all()
            await connection.commit()
        return rows

    async def fetch_one(self, statement: Executable, parameters: Parameters = None) -> Any | None:
        async with self.engine.connect() as connection:
            row = (await connection.execute(statement, dict(parameters or {}))).first()
            await connection.commit()
        return row

    @asynccontextmanager
    async def atomic(self) -> AsyncIterator[Database]:
        async with self.engine.begin() as connection:
            yield _SQLAlchemyTransaction(connection)

    async def ping(self) -> None:
        await self.scalar(SELECT_ONE)


class _SQLAlchemyTransaction(_Statements):
    dialect = "sqlite"

    def __init__(self, connection: SQLAlchemyConnection) -> None:
        self._connection = connection

    async def fetch_all(
        self, statement: Executable, parameters: Parameters = None
    ) -> Sequence[Any]:
        return (await self._connection.execute(statement, dict(parameters or {}))).all()

    async def fetch_one(self, statement: Executable, parameters: Parameters = None) -> Any | None:
        return (await self._connection.execute(statement, dict(parameters or {}))).first()

    def atomic(self) -> AbstractAsyncContextManager[Database]:
        raise RuntimeError("already in a transaction")


def static(statement: StatementT) -> StatementT:
    """Mark a statement built once (module-level, or once per shape): compiled once, its SQL and
    the statement kept for the process's life."""
    _static_statements[id(statement)] = statement
    return statement


def is_static(statement: Executable) -> bool:
    return _static_statements.get(id(statement)) is statement


def create_database(
    settings: Settings, url: URL, engine: AsyncEngine
) -> PostgresDatabase | SQLAlchemyDatabase:
    if url.get_backend_name() == "postgresql":
        return PostgresDatabase(url, settings)
    return SQLAlchemyDatabase(engine)
