"""Shared test helpers: real HS256 tokens, settings that ignore the developer's own .env, and
an app of its own for tests that need settings of their own."""

import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import IO, Any

import httpx
import jwt
import pytest
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


def random_text(size: int, char_bytes: int, seed: int) -> str:
    """`size` bytes of random characters of `char_bytes` bytes each in UTF-8 (CJK: 3 bytes,
    CJK extension B: 4), made up to `size` with ASCII letters."""
    generator = random.Random(seed)
    first = 0x4E00 if char_bytes == 3 else 0x20000
    wide = "".join(chr(first + generator.randrange(20_000)) for _ in range(size // char_bytes))
    return wide + "x" * (size - len(wide.encode()))


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


# How long a uvicorn_server may take to answer /health: far more than it ever needs (it imports
# the app and migrates the database first), so that only a server that hangs reaches it.
SERVER_START_SECONDS = 120


@contextmanager
def uvicorn_server(database_url: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The app under uvicorn in its own process, as production runs it; its base URL once
    /health answers. A server that exits first, or does not answer within SERVER_START_SECONDS,
    fails the test with the end of its output: a test must never run against a dead server.
    Killed at the end if still running."""
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
    # uvicorn writes its start-up errors (a traceback when the app fails to start) to stderr,
    # its access log to stdout.
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "main:app", "--port", str(port), "--loop", "uvloop"],
            cwd=BACKEND_DIR,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_healthy(process, base_url, stderr)
            yield process, base_url
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def _wait_until_healthy(process: subprocess.Popen[bytes], base_url: str, stderr: IO[bytes]) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    # One client for every attempt: a new one each time would load the CA certificates again,
    # CPU taken from the starting server on a small machine.
    with httpx.Client(base_url=base_url) as http:
        while True:
            if process.poll() is not None:
                problem = f"exited with status {process.returncode} before /health answered"
                break
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                problem = f"did not answer /health within {SERVER_START_SECONDS} s"
                break
            try:
                if http.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    # The process has ended: its output can be read without racing its own writes (the file
    # offset is shared with it).
    stderr.seek(0)
    tail = stderr.read()[-4000:].decode(errors="replace")
    pytest.fail(f"uvicorn {problem}; its stderr ends with:\n{tail}", pytrace=False)
