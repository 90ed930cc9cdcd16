"""A real JWKS endpoint on a loopback port, with keys the tests control, and a silent listener."""

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import jwt
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.support import free_port

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass
class SigningKey:
    algorithm: str
    private_key: PrivateKey
    kid: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def generate(cls, algorithm: str) -> "SigningKey":
        private_key: PrivateKey
        if algorithm == "EdDSA":
            private_key = ed25519.Ed25519PrivateKey.generate()
        elif algorithm == "ES256":
            private_key = ec.generate_private_key(ec.SECP256R1())
        else:
            private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(algorithm, private_key)

    def public_jwk(self, *, declare_alg: bool = True) -> dict[str, Any]:
        public = self.private_key.public_key()
        exported: dict[str, Any]
        if isinstance(public, ed25519.Ed25519PublicKey):
            exported = OKPAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            exported = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            exported = RSAAlgorithm.to_jwk(public, as_dict=True)
        exported["kid"] = self.kid
        if declare_alg:
            exported["alg"] = self.algorithm
        return exported

    def sign(
        self,
        user_id: str | None,
        *,
        issuer: str | None,
        audience: str | None,
        lifetime: int = 900,
        algorithm: str | None = None,
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + lifetime}
        payload.update({"iss": issuer, "aud": audience, **claims})
        payload = {name: value for name, value in payload.items() if value is not None}
        header = {"kid": self.kid, **(headers or {})}
        return jwt.encode(
            payload, self.private_key, algorithm=algorithm or self.algorithm, headers=header
        )


class JWKSServer:
    """Serves `{"keys": [...]}` at /api/auth/jwks and counts the fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        self.port = 0
        self.delay_seconds = 0.0  # how long each answer takes

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def publish(self, *keys: SigningKey) -> None:
        self.keys = [key.public_jwk() for key in keys]

    async def _jwks(self, _request: Request) -> JSONResponse:
        self.fetches += 1
        await asyncio.sleep(self.delay_seconds)
        return JSONResponse({"keys": self.keys})

    @asynccontextmanager
    async def running(self) -> AsyncIterator["JWKSServer"]:
        app = Starlette(routes=[Route("/api/auth/jwks", self._jwks)])
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110  (uvicorn offers no event to wait on)
            await asyncio.sleep(0.01)
        self.port = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.should_exit = True
            await task


class IdleClosingJWKSServer(JWKSServer):
    """A JWKS endpoint that keeps connections alive but, like Node's server (Better Auth's), lets
    an idle one go after `idle_seconds`. A request that arrives on a connection idle that long
    is taken as one that crossed the server's close of it (the race at a keep-alive timeout,
    made certain here): the connection is closed without an answer, and counted in `dropped`."""

    def __init__(self, idle_seconds: float) -> None:
        super().__init__()
        self.idle_seconds = idle_seconds
        self.dropped = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered_at: float | None = None
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")  # a GET: the head is all there is
                if answered_at is not None and time.monotonic() - answered_at >= self.idle_seconds:
                    self.dropped += 1
                    return
                self.fetches += 1
                await asyncio.sleep(self.delay_seconds)
                body = json.dumps({"keys": self.keys}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%b" % (len(body), body)
                )
                await writer.drain()
                answered_at = time.monotonic()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator["IdleClosingJWKSServer"]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self


@asynccontextmanager
async def silent_listener() -> AsyncIterator[str]:
    """A loopback address that accepts TCP connections and never answers: a hung peer."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def closed_port_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}"
