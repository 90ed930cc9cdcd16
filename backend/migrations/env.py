"""Alembic environment: the app's own settings and engine, a lock against concurrent upgrades."""

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

import models  # noqa: F401  (registers the tables on SQLModel.metadata)
from config import get_settings
from db import MIGRATION_LOCK_KEY, MIGRATION_LOCK_TIMEOUT_MS, migration_url

config = context.config
target_metadata = SQLModel.metadata


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite alters tables by copying them; batch mode does that for later migrations.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Transaction-scoped, so it also works through a transaction-mode pooler.
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
            connection.execute(text(f"SET LOCAL lock_timeout = {MIGRATION_LOCK_TIMEOUT_MS}"))
        context.run_migrations()


async def run_migrations_from_settings() -> None:
    engine = create_async_engine(
        migration_url(get_settings()), poolclass=pool.NullPool, connect_args=_connect_args()
    )
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


def _connect_args() -> dict[str, object]:
    if migration_url(get_settings()).get_backend_name() == "postgresql":
        return {"prepare_threshold": None, "connect_timeout": 10}
    return {}


if context.is_offline_mode():
    context.configure(
        url=migration_url(get_settings()), target_metadata=target_metadata, literal_binds=True
    )
    with context.begin_transaction():
        context.run_migrations()
elif (shared_connection := config.attributes.get("connection")) is not None:
    # Called by the app at start-up (db.upgrade_schema) with its own connection.
    run_migrations(shared_connection)
else:
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    asyncio.run(run_migrations_from_settings())
