"""Shared test helpers: real HS256 tokens, settings that ignore the developer's own .env, and
an app of its own for tests that need settings of their own."""

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
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


@contextmanager
def uvicorn_server(database_url: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The app under uvicorn in its own process, as production runs it; its base URL once
    /health answers. Killed at the end if still running."""
    from config import BACKEND_DIR

    port = free_port()
    environment = {
        **os.environ,
        "DATABASE_URL": database_url,
        "BETTER_AUTH_SECRET": TEST_SECRET,
        "ENVIRONMENT": "test",
        "RATE_LIMIT_PER_SECOND": "0",
        "LOG_LEVEL": "ERROR",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "main:app", "--port", str(port), "--loop", "uvloop"],
        cwd=BACKEND_DIR,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base_url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        yield process, base_url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
