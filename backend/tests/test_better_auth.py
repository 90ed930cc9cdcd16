"""End to end with a real Better Auth 1.7.7 server (tests/better_auth/server.mjs).

Two users sign up through Better Auth's HTTP API; their real tokens drive the backend: the JWT
plugin token (EdDSA, JWKS), the cookie-cache JWT (HS256 with the shared secret) and the opaque
session token (bearer plugin, checked with get-session). Node packages come from the lock file
(`npm ci`) on first use; without Node.js the module is skipped with the reason.
"""

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from httpx import AsyncClient

from config import BACKEND_DIR
from tests.support import TEST_SECRET, free_port, running_app

SERVER_DIR = BACKEND_DIR / "tests" / "better_auth"
BETTER_AUTH_VERSION = "1.7.7"
FRONTEND_ORIGIN = "http://localhost:3000"


def node_or_skip() -> str:
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js and npm are not installed: the real Better Auth test needs them")
    return node


def install_better_auth() -> None:
    """`npm ci` from the committed lock file, once per checkout."""
    installed = SERVER_DIR / "node_modules" / "better-auth" / "package.json"
    if installed.exists() and json.loads(installed.read_text())["version"] == BETTER_AUTH_VERSION:
        return
    result = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=SERVER_DIR,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"


class BetterAuthServer:
    """The Node process, restartable on the same port (a restart makes a new signing key)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        environment = {
            **os.environ,
            "PORT": str(self.port),
            "BETTER_AUTH_SECRET": TEST_SECRET,
            "BETTER_AUTH_URL": self.url,
        }
        environment.pop("NODE_ENV", None)
        self.process = subprocess.Popen(
            [self.node, "server.mjs"],
            cwd=SERVER_DIR,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.startswith("READY"), f"Better Auth did not start: {line!r}"

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture(scope="module")
def better_auth() -> Iterator[BetterAuthServer]:
    server = BetterAuthServer(node_or_skip())
    install_better_auth()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class SignedUpUser:
    id: str
    session_token: str  # the raw token of the sign-up body
    signed_session_token: str  # the `set-auth-token` header: token.signature
    plugin_jwt: str  # GET /api/auth/token (EdDSA, JWKS)
    cookie_cache_jwt: str  # the better-auth.session_data cookie (HS256, shared secret)


async def sign_up(better_auth: BetterAuthServer, name: str) -> SignedUpUser:
    async with httpx.AsyncClient(base_url=f"{better_auth.url}/api/auth") as http:
        response = await http.post(
            "/sign-up/email",
            json={
                "email": f"{name}-{uuid.uuid4().hex[:8]}@example.com",
                "password": "correct-horse-battery-staple",
                "name": name,
            },
        )
        assert response.status_code == 200, response.text
        body = response.json()
        cookie_cache_jwt = response.cookies["better-auth.session_data"]
        token = await http.get("/token", headers={"Authorization": f"Bearer {body['token']}"})
        assert token.status_code == 200, token.text
    return SignedUpUser(
        id=body["user"]["id"],
        session_token=body["token"],
        signed_session_token=response.headers["set-auth-token"],
        plugin_jwt=token.json()["token"],
        cookie_cache_jwt=cookie_cache_jwt,
    )


@pytest.fixture
async def backend(better_auth: BetterAuthServer, tmp_path: Path) -> AsyncIterator[AsyncClient]:
    async with running_app(
        better_auth_url=better_auth.url,
        database_url=f"sqlite:///{tmp_path / 'e2e.db'}",
        better_auth_session_lookup=True,
        better_auth_session_cookie=True,
        session_lookup_cache_seconds=0,
        cors_origins=[FRONTEND_ORIGIN],
    ) as client:
        yield client


TOKEN_KINDS = ["plugin_jwt", "cookie_cache_jwt", "session_token", "signed_session_token"]


@pytest.mark.parametrize("kind", TOKEN_KINDS)
async def test_real_tokens_work_for_their_owner_and_nobody_else(
    better_auth: BetterAuthServer, backend: AsyncClient, kind: str
) -> None:
    alice, bob = await sign_up(better_auth, "alice"), await sign_up(better_auth, "bob")
    as_alice = {"Authorization": f"Bearer {getattr(alice, kind)}"}
    as_bob = {"Authorization": f"Bearer {getattr(bob, kind)}"}

    created = await backend.post(f"/api/{alice.id}/tasks", json={"title": "mine"}, headers=as_alice)
    assert created.status_code == 201, created.text
    assert created.json()["user_id"] == alice.id
    task_url = f"/api/{alice.id}/tasks/{created.json()['id']}"
    listed = await backend.get(f"/api/{alice.id}/tasks", headers=as_alice)
    assert [task["id"] for task in listed.json()] == [created.json()["id"]]
    toggled = await backend.patch(f"{task_url}/complete", headers=as_alice)
    assert toggled.json()["completed"] is True

    assert (await backend.get(f"/api/{alice.id}/tasks", headers=as_bob)).status_code == 403
    bobs_view = await backend.get(f"/api/{bob.id}/tasks/{created.json()['id']}", headers=as_bob)
    assert bobs_view.status_code == 404
    assert (await backend.delete(task_url, headers=as_bob)).status_code == 403
    assert (await backend.delete(task_url, headers=as_alice)).status_code == 204


async def test_the_cookie_cache_cookie_is_read_and_guarded_by_origin(
    better_auth: BetterAuthServer, backend: AsyncClient
) -> None:
    alice = await sign_up(better_auth, "alice")
    backend.cookies.set("better-auth.session_data", alice.cookie_cache_jwt)
    try:
        assert (await backend.get(f"/api/{alice.id}/tasks")).status_code == 200
        # A cookie rides along on requests a page did not mean to make: writes need our origin.
        without_origin = await backend.post(f"/api/{alice.id}/tasks", json={"title": "x"})
        assert without_origin.status_code == 401
        foreign = await backend.post(
            f"/api/{alice.id}/tasks",
            json={"title": "x"},
            headers={"Origin": "https://evil.example"},
        )
        assert foreign.status_code == 401
        ours = await backend.post(
            f"/api/{alice.id}/tasks", json={"title": "x"}, headers={"Origin": FRONTEND_ORIGIN}
        )
        assert ours.status_code == 201
    finally:
        backend.cookies.clear()


async def test_cookies_are_ignored_unless_turned_on(
    better_auth: BetterAuthServer, tmp_path: Path
) -> None:
    alice = await sign_up(better_auth, "alice")
    async with running_app(
        better_auth_url=better_auth.url, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}"
    ) as client:
        client.cookies.set("better-auth.session_data", alice.cookie_cache_jwt)
        assert (await client.get(f"/api/{alice.id}/tasks")).status_code == 401


async def test_session_tokens_are_refused_unless_lookup_is_turned_on(
    better_auth: BetterAuthServer, tmp_path: Path
) -> None:
    alice = await sign_up(better_auth, "alice")
    async with running_app(
        better_auth_url=better_auth.url, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}"
    ) as client:
        headers = {"Authorization": f"Bearer {alice.session_token}"}
        assert (await client.get(f"/api/{alice.id}/tasks", headers=headers)).status_code == 401


async def test_a_signed_out_session_is_refused(
    better_auth: BetterAuthServer, backend: AsyncClient
) -> None:
    alice = await sign_up(better_auth, "alice")
    headers = {"Authorization": f"Bearer {alice.session_token}"}
    assert (await backend.get(f"/api/{alice.id}/tasks", headers=headers)).status_code == 200
    async with httpx.AsyncClient() as http:
        signed_out = await http.post(f"{better_auth.url}/api/auth/sign-out", headers=headers)
        assert signed_out.status_code == 200
    assert (await backend.get(f"/api/{alice.id}/tasks", headers=headers)).status_code == 401


async def test_after_better_auth_restarts_with_a_new_key_fresh_tokens_work(
    better_auth: BetterAuthServer, backend: AsyncClient
) -> None:
    before = await sign_up(better_auth, "before")
    headers = {"Authorization": f"Bearer {before.plugin_jwt}"}
    assert (await backend.get(f"/api/{before.id}/tasks", headers=headers)).status_code == 200

    await asyncio.to_thread(better_auth.stop)
    await asyncio.to_thread(better_auth.start)  # in-memory keys: a new kid

    after = await sign_up(better_auth, "after")
    assert after.plugin_jwt.split(".")[0] != before.plugin_jwt.split(".")[0]
    fresh = {"Authorization": f"Bearer {after.plugin_jwt}"}
    created = await backend.post(f"/api/{after.id}/tasks", json={"title": "new"}, headers=fresh)
    assert created.status_code == 201
    # The previous key is no longer published: its tokens are no longer trusted.
    assert (await backend.get(f"/api/{before.id}/tasks", headers=headers)).status_code == 401


async def test_session_lookup_with_better_auth_down_is_503(
    better_auth: BetterAuthServer, backend: AsyncClient
) -> None:
    alice = await sign_up(better_auth, "alice")
    await asyncio.to_thread(better_auth.stop)
    try:
        headers = {"Authorization": f"Bearer {alice.session_token}"}
        response = await backend.get(f"/api/{alice.id}/tasks", headers=headers)
        assert response.status_code == 503
        assert "Retry-After" in response.headers
        # Tokens signed with the shared secret need nobody: they keep working.
        cached = {"Authorization": f"Bearer {alice.cookie_cache_jwt}"}
        assert (await backend.get(f"/api/{alice.id}/tasks", headers=cached)).status_code == 200
    finally:
        await asyncio.to_thread(better_auth.start)
