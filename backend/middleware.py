"""Pure ASGI middleware: cheap on every request, unlike `BaseHTTPMiddleware`."""

import asyncio
import itertools
import logging
import os
import time
from typing import Any

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


class GuardMiddleware:
    """What every request gets below CORS, in one layer (each ASGI layer costs microseconds):

    - `/path/` is served as `/path`, never redirected: a 307 breaks CORS preflights, and browsers
      drop `Authorization` when they follow a cross-origin redirect;
    - bodies over `max_body_bytes` get a 413 before they are read into memory or parsed;
    - a request that outlives its deadline (a database that accepts connections and never
      answers, a pool that stays exhausted) gets a 503 rather than a hang;
    - an unhandled exception gets a plain 500 with a `detail` sentence, and one log line without
      a traceback: tracebacks can carry SQL, connection strings or tokens held in local variables,
      so neither the client nor the log gets one; the exception's type and where it was raised
      are enough to start.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, deadline_seconds: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.deadlines = DeadlineWatch(deadline_seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            # In place: outer middleware reads what routing adds to this scope (the route).
            scope["path"] = path = path.rstrip("/") or "/"
            raw_path = scope.get("raw_path")
            if raw_path:
                scope["raw_path"] = raw_path.rstrip(b"/") or b"/"
        limit = self.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _send_json_error(send, RequestBodyTooLarge(limit))
                return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # A chunked body that declared no length: stop reading it here.
                    raise RequestBodyTooLarge(limit)
            return message

        tracked = StartTrackingSend(send)
        task = asyncio.current_task() if path != "/health" else None
        if task is not None:
            self.deadlines.watch(task)
        try:
            await self.app(scope, receive_within_limit, tracked)
        except asyncio.CancelledError:
            if task is None or not self.deadlines.passed(task):
                raise
            task.uncancel()
            logger.warning(
                "request deadline passed during %s %s", scope["method"], _route_template(scope)
            )
            if not tracked.response_started:
                await _send_json(
                    send,
                    503,
                    b'{"detail":"The server could not answer in time; try again shortly."}',
                    extra_headers=[(b"retry-after", b"2")],
                )
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
        finally:
            if task is not None:
                self.deadlines.forget(task)


class DeadlineWatch:
    """Per-request deadlines kept by one watcher task, rather than a timer per request.

    A request's task is cancelled once its deadline has passed (within `tick` seconds); the
    guard tells that cancellation from others with `passed()`. All deadlines have the same
    length, so they expire in the order they were set: each tick looks at the oldest only.
    """

    def __init__(self, seconds: float, tick: float = 0.25) -> None:
        self.seconds = seconds
        self.tick = min(tick, seconds / 4)
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._passed: set[asyncio.Task[Any]] = set()
        self._watcher: asyncio.Task[None] | None = None

    def watch(self, task: "asyncio.Task[Any]") -> None:
        self._deadlines[task] = time.monotonic() + self.seconds
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def forget(self, task: "asyncio.Task[Any]") -> None:
        self._deadlines.pop(task, None)
        self._passed.discard(task)

    def passed(self, task: "asyncio.Task[Any]") -> bool:
        return task in self._passed

    async def _watch(self) -> None:
        try:
            # Stops when nothing is left to watch; the next request starts it again.
            while self._deadlines:
                await asyncio.sleep(self.tick)
                now = time.monotonic()
                for task, deadline in list(self._deadlines.items()):
                    if deadline > now:
                        break
                    del self._deadlines[task]
                    self._passed.add(task)
                    task.cancel()
        finally:
            self._watcher = None


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
            if request_logger.isEnabledFor(logging.INFO):
                self.log(scope, status_code, started, request_id)

    @staticmethod
    def log(scope: Scope, status_code: int, started: float, request_id: str) -> None:
        duration_ms = (time.perf_counter() - started) * 1000
        route = _route_template(scope)
        request_logger.info(
            "%s %s %s %.1fms",
            scope["method"],
            route,
            status_code,
            duration_ms,
            extra={
                "method": scope["method"],
                "route": route,
                "status": status_code,
                "duration_ms": round(duration_ms, 2),
                "request_id": request_id,
            },
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
