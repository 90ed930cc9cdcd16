"""Pure ASGI middleware: cheap on every request, unlike `BaseHTTPMiddleware`."""

import asyncio
import itertools
import logging
import os
import time

import orjson
from fastapi import status
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("todo.errors")
request_logger = logging.getLogger("todo.request")


class RequestBodyTooLarge(HTTPException):
    """An HTTPException so that FastAPI's body reader lets it through as a 413, not a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"The request body is larger than the {limit}-byte limit.",
        )


class StartTrackingSend:
    """A `send` that remembers whether the response has begun (after that, no error answer)."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.response_started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.response_started = True
        await self.send(message)


class TrailingSlashMiddleware:
    """Serve `/path/` as `/path` directly.

    A 307 redirect breaks CORS preflights, and browsers drop `Authorization` when they follow a
    cross-origin redirect, so the frontend would see a 401 it cannot explain.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if len(path) > 1 and path.endswith("/"):
                # In place: outer middleware reads what routing adds to this scope (the route).
                scope["path"] = path.rstrip("/") or "/"
                raw_path = scope.get("raw_path")
                if raw_path:
                    scope["raw_path"] = raw_path.rstrip(b"/") or b"/"
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Refuse bodies over the limit with 413 before they are read into memory or parsed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _send_json_error(send, RequestBodyTooLarge(self.max_bytes))
                return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # A chunked body that declared no length: stop reading it here.
                    raise RequestBodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, receive_within_limit, send)


class RequestLogMiddleware:
    """One log line per request, a request id, and the headers every response carries.

    The line has the method, the route template (never the raw path or query: no user data), the
    status, the duration and the request id (`X-Request-ID` from the caller when it is sane, else a
    new one), which is echoed back. Responses get `X-Content-Type-Options: nosniff`; API responses,
    which are per-user, also `Cache-Control: no-store`.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _caller_request_id(scope) or _new_request_id()
        private = scope["path"].startswith("/api/")
        started = time.perf_counter()
        status_code = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                headers.append((b"x-content-type-options", b"nosniff"))
                if private:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            request_logger.info(
                "%s %s %s %.1fms",
                scope["method"],
                _route_template(scope),
                status_code,
                (time.perf_counter() - started) * 1000,
                extra={
                    "method": scope["method"],
                    "route": _route_template(scope),
                    "status": status_code,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    "request_id": request_id,
                },
            )


class DeadlineMiddleware:
    """Answer 503 rather than hang when a request outlives its deadline (a database that accepts
    connections and never answers, a pool that stays exhausted)."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        tracked = StartTrackingSend(send)
        try:
            async with asyncio.timeout(self.seconds):
                await self.app(scope, receive, tracked)
        except TimeoutError:
            logger.warning(
                "request deadline passed during %s %s", scope["method"], _route_template(scope)
            )
            if tracked.response_started:
                raise
            await _send_json(
                send,
                503,
                b'{"detail":"The server could not answer in time; try again shortly."}',
                extra_headers=[(b"retry-after", b"2")],
            )


class UnhandledErrorMiddleware:
    """A last resort: a plain 500 with a `detail` sentence, and one log line without a traceback.

    Tracebacks can carry SQL, connection strings or tokens held in local variables, so neither the
    client nor the log gets one; the exception's type and where it was raised are enough to start.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = StartTrackingSend(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception as error:
            logger.error(
                "unhandled %s at %s during %s %s",
                type(error).__name__,
                _raised_at(error),
                scope.get("method"),
                _route_template(scope),
            )
            if not tracked.response_started:
                await _send_json(
                    send,
                    status.HTTP_500_INTERNAL_SERVER_ERROR,
                    b'{"detail":"The server hit an unexpected error."}',
                )


def _raised_at(error: BaseException) -> str:
    traceback = error.__traceback__
    if traceback is None:
        return "?"
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    code = traceback.tb_frame.f_code
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{traceback.tb_lineno} in {code.co_name}"


# A random prefix per process and a counter: unique, and cheaper than a uuid4 per request.
_REQUEST_ID_PREFIX = os.urandom(8).hex()
_request_numbers = itertools.count()


def _new_request_id() -> str:
    return f"{_REQUEST_ID_PREFIX}{next(_request_numbers):016x}"


def _caller_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            # Only what cannot forge log lines or bloat them.
            if 0 < len(value) <= 128 and all(0x21 <= byte <= 0x7E for byte in value):
                return str(value.decode("ascii"))
            return None
    return None


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "(no route)"


async def _send_json_error(send: Send, error: HTTPException) -> None:
    # The unread body is still arriving: close the connection rather than drain it.
    body = orjson.dumps({"detail": error.detail})
    await _send_json(send, error.status_code, body, extra_headers=[(b"connection", b"close")])


async def _send_json(
    send: Send,
    status_code: int,
    body: bytes,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send(
        {
            "type": "http.response.start",
            "status": status_code,
            "headers": headers + (extra_headers or []),
        }
    )
    await send({"type": "http.response.body", "body": body})
