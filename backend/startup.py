"""The schema at start-up: migrate now if the database answers, else keep trying in the background.

The app starts serving either way (`/health` is 200 at once), so an instance started while Neon is
waking or PostgreSQL is restarting becomes ready by itself; `/health/ready` says 503 until then.
"""

import asyncio
import logging

from fastapi import FastAPI

from config import Settings
from db import create_engine, migration_url, upgrade_schema

logger = logging.getLogger("todo.startup")
FIRST_ATTEMPT_SECONDS = 15
RETRY_SECONDS = (1, 2, 5, 10, 30)


async def migrate(settings: Settings, app: FastAPI) -> None:
    """Upgrade to head, through the direct URL when one is configured."""
    if settings.direct_database_url is None:
        await upgrade_schema(app.state.engine)
        return
    direct = create_engine(settings, migration_url(settings))
    try:
        await upgrade_schema(direct)
    finally:
        await direct.dispose()


async def bring_schema_up(settings: Settings, app: FastAPI) -> asyncio.Task[None] | None:
    """Migrate, or return the background task that keeps trying."""
    if not settings.migrate_on_startup:
        app.state.schema_ready = True
        return None
    app.state.schema_ready = False
    try:
        async with asyncio.timeout(FIRST_ATTEMPT_SECONDS):
            await migrate(settings, app)
    except Exception as error:
        logger.warning(
            "database not reachable for migrations (%s); serving, and retrying in the background",
            type(error).__name__,
        )
        return asyncio.create_task(_keep_trying(settings, app))
    app.state.schema_ready = True
    return None


async def _keep_trying(settings: Settings, app: FastAPI) -> None:
    attempt = 0
    while True:
        await asyncio.sleep(RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)])
        attempt += 1
        try:
            async with asyncio.timeout(FIRST_ATTEMPT_SECONDS):
                await migrate(settings, app)
        except Exception as error:
            logger.warning("migration attempt %d failed (%s)", attempt, type(error).__name__)
            continue
        app.state.schema_ready = True
        logger.info("database schema is up to date")
        return
