"""Shared test helpers: real HS256 tokens, settings that ignore the developer's own .env, and
an app of its own for tests that need settings of their own."""

import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import jwt
from httpx import ASGITransport, AsyncClient

from config import Settings

TEST_SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
ALICE = "alice0000000000000000000000000001"
BOB = "bob00000000000000000000000000002"


def make_token(
    user_id: str | None = ALICE,
    *,
    secret: str = TEST_SECRET,
    algorithm: str = "HS256",
    lifetime: int = 600,
    claim: str = "sub",
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"iat": now, "exp": now + lifetime}
    if user_id is not None:
        payload[claim] = user_id
    payload.update(claims)
    payload = {key: value for key, value in payload.items() if value is not None}
    return jwt.encode(payload, secret, algorithm=algorithm, headers=headers)


def auth(user_id: str = ALICE, **kwargs: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(user_id, **kwargs)}"}


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "test",
        "better_auth_secret": TEST_SECRET,
        "better_auth_url": "http://127.0.0.1:3000",
        "database_url": None,
        "jwt_issuer": None,
        "jwt_audience": None,
        "cors_origins": ["http://localhost:3000"],
        "log_level": "WARNING",
        # The suite sends hundreds of requests a second as one user; rate tests turn it on.
        "rate_limit_per_second": 0,
        "redis_url": None,
        "direct_database_url": None,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@asynccontextmanager
async def running_app(**overrides: Any) -> AsyncIterator[AsyncClient]:
    """A started app (lifespan run: engine, migrations) with these settings, and a client for it."""
    from main import create_app

    app = create_app(make_settings(**overrides))
    async with app.router.lifespan_context(app):
        transport = ASGITransport(app=app)
        async with AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port
