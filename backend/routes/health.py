"""Liveness and readiness, for load balancers and orchestrators. No authentication."""

import asyncio
import logging

from fastapi import APIRouter, Request, status

from errors import DatabaseUnavailable
from models import ErrorMessage

logger = logging.getLogger("todo.health")
READINESS_TIMEOUT_SECONDS = 5

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers. Touches no database, so it stays up while one is down."""
    return {"status": "ok"}


@router.get(
    "/health/ready",
    responses={status.HTTP_503_SERVICE_UNAVAILABLE: {"model": ErrorMessage}},
)
@router.get("/ready", include_in_schema=False)
async def ready(request: Request) -> dict[str, str]:
    """Readiness: one round trip to the database. 503 while it cannot be reached, or while the
    schema is still waiting to be migrated."""
    if not request.app.state.schema_ready:
        raise DatabaseUnavailable("The database schema is not ready yet; try again shortly.")
    try:
        async with asyncio.timeout(READINESS_TIMEOUT_SECONDS):
            await request.app.state.database.ping()
    except Exception as error:
        logger.warning("readiness check failed: %s", type(error).__name__)
        raise DatabaseUnavailable() from None
    return {"status": "ready", "database": "ok"}
