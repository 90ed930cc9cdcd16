"""The async engine, its sessions, and the database URL normalisation."""

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from config import BACKEND_DIR, Settings

POSTGRES_DRIVERS = {
    "postgres",
    "postgresql",
    "postgresql+psycopg",
    "postgresql+psycopg2",
    "postgresql+asyncpg",
}
# Any constant: instances starting at once take this lock in turn (migrations/env.py); one
# migrates, the others then find the schema at head.
MIGRATION_LOCK_KEY = 0x70D05C4E
# How long a migration waits for a lock on a table (once it holds the one above). A schema change
# queued behind a long transaction would hold up every request on that table behind it: it fails
# instead, and is tried again (in the background at start-up, `startup.py`).
MIGRATION_LOCK_TIMEOUT_MS = 3000
SQLITE_DRIVERS = {"sqlite", "sqlite+aiosqlite", "sqlite+pysqlite"}
# How long a write waits for another writer's lock on the embedded SQLite file, as a share of the
# request deadline (REQUEST_TIMEOUT_SECONDS; 8.8 s of the default 11).
SQLITE_BUSY_SHARE_OF_DEADLINE = 0.8


class UnsupportedDatabaseURL(ValueError):
    """The configured URL names a database this service does not run on."""


def database_url(settings: Settings) -> URL:
    """The SQLAlchemy URL to use: the configured one, made async, or the embedded SQLite file."""
    if settings.database_url is None:
        return URL.create("sqlite+aiosqlite", database=str(settings.sqlite_path))
    return normalize_database_url(settings.database_url)


def migration_url(settings: Settings) -> URL:
    """Migrations take the direct (non-pooled) URL when one is configured."""
    if settings.direct_database_url is not None:
        return normalize_database_url(settings.direct_database_url)
    return database_url(settings)


def normalize_database_url(raw: str) -> URL:
    """Accept URLs as Neon, Heroku-style hosts and SQLAlchemy users write them.

    `postgres://` and `postgresql://` (with Neon's `sslmode`/`channel_binding` left as they are:
    psycopg passes them to libpq) become psycopg 3 async; `sqlite://` becomes aiosqlite.
    """
    try:
        url = make_url(raw.strip())
    except Exception as error:  # SQLAlchemy raises ArgumentError with the URL in its text
        raise UnsupportedDatabaseURL("the database URL could not be parsed") from error
    if url.drivername in POSTGRES_DRIVERS:
        query = dict(url.query)
        # asyncpg spells TLS `ssl=`; libpq (psycopg) spells it `sslmode=`.
        if "ssl" in query and "sslmode" not in query:
            query["sslmode"] = query.pop("ssl")
        return url.set(drivername="postgresql+psycopg", query=query)
    if url.drivername in SQLITE_DRIVERS:
        return url.set(drivername="sqlite+aiosqlite")
    raise UnsupportedDatabaseURL(
        f"unsupported database scheme {url.drivername!r}: use postgresql:// or sqlite://"
    )


def create_engine(settings: Settings, url: URL | None = None) -> AsyncEngine:
    url = url or database_url(settings)
    if url.get_backend_name() == "sqlite":
        return _create_sqlite_engine(url, settings)
    # On PostgreSQL this engine runs the migrations (and the hourly key purge), each in a real
    # transaction: DDL all or nothing, the migration lock held to the end. Requests run on the
    # app's own pool (pool.py, used by database.py), with their own statement timeout.
    return create_async_engine(
        url,
        pool_pre_ping=True,
        # Neon suspends idle computes after five minutes and its pooler drops idle clients.
        pool_recycle=240,
        pool_size=2,
        max_overflow=2,
        pool_timeout=settings.database_pool_timeout_seconds,
        connect_args={
            # Server-side prepared statements do not survive a transaction-mode pooler.
            "prepare_threshold": None,
            "connect_timeout": settings.database_connect_timeout_seconds,
        },
    )


def _create_sqlite_engine(url: URL, settings: Settings) -> AsyncEngine:
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    # sqlite3's `timeout` is SQLite's busy timeout: how long a write waits for another writer's
    # lock, in aiosqlite's thread, which the request deadline cannot interrupt. It must end
    # first, for the 503 to go out within the deadline.
    busy_seconds = settings.request_timeout_seconds * SQLITE_BUSY_SHARE_OF_DEADLINE
    engine = create_async_engine(url, connect_args={"timeout": busy_seconds})

    @event.listens_for(engine.sync_engine, "connect")
    def configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # WAL lets readers and one writer work at once; the busy timeout queues writers.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()
        # SQLite's own lower() folds ASCII only; search must ignore case as PostgreSQL does.
        dbapi_connection.create_function("lower", 1, _unicode_lower, deterministic=True)

    return engine


def _unicode_lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def alembic_config() -> AlembicConfig:
    return AlembicConfig(str(BACKEND_DIR / "alembic.ini"))


async def upgrade_schema(engine: AsyncEngine) -> None:
    """Apply the Alembic migrations up to head through this engine."""

    def upgrade(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with engine.begin() as connection:
        await connection.run_sync(upgrade)
