"""The benchmark's baseline: the task API's hot paths with as little as possible around them.

A bare Starlette app (no FastAPI, no SQLModel, no SQLAlchemy) on the app's driver, psycopg 3,
with the same HS256 check of the same bearer token, the same SQL and the same JSON. It is what
"our/baseline" in bench/run.py divides by: the cost of the same work with no framework layers.

    uvicorn bench.baseline:app --workers 2 --loop uvloop --http httptools   (from backend/)

Configured from the environment, like the app: BETTER_AUTH_SECRET, DATABASE_URL,
DATABASE_POOL_SIZE + DATABASE_MAX_OVERFLOW (the connections per worker), JWT_LEEWAY_SECONDS,
DATABASE_STATEMENT_TIMEOUT_MS, DATABASE_PREPARED_STATEMENTS.

What it leaves out on purpose (each is a cost the app pays and the ratio shows): middleware
(request log, request id, deadline, CORS, security headers, body size limit), the rate limiter,
idempotency keys, If-Match, the list's ETag, list filters and paging, the app's stricter token
checks (duplicate JSON members, forbidden headers), pydantic validation beyond a title check, a
transaction and a SET LOCAL per request, and the pool's pre-ping. Each request is one statement
in autocommit mode; the statement timeout is a connection option instead of a SET LOCAL.
"""

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import jwt
import orjson
import psycopg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

# The columns `select(Task)` reads; `version` makes the ETag and stays out of the JSON. Spelled
# out in each statement, as the app's statements are. The list, as the app's, leaves out the
# owner (the WHERE clause fixes it) and the version, and reads both of the owner's indexes
# (`queries.owned`): the covering one for the tasks whose text fits it (models.FITS_LIST_INDEX),
# the other for the rest. A plain `WHERE user_id = %s` would find the tasks through
# ix_tasks_user_id and read a table page for each.
LIST_SQL = (
    "SELECT id, title, description, completed, created_at, updated_at FROM ("
    "SELECT id, title, description, completed, created_at, updated_at FROM tasks"
    " WHERE user_id = %(owner)s"
    " AND octet_length(user_id) + octet_length(title) + coalesce(octet_length(description), 0)"
    " <= 2500"
    " UNION ALL SELECT id, title, description, completed, created_at, updated_at FROM tasks"
    " WHERE user_id = %(owner)s"
    " AND octet_length(user_id) + octet_length(title) + coalesce(octet_length(description), 0)"
    " > 2500"
    ") AS owned ORDER BY created_at DESC, id DESC"
)
GET_SQL = (
    "SELECT id, user_id, title, description, completed, created_at, updated_at, version "
    "FROM tasks WHERE id = %s AND user_id = %s"
)
CREATE_SQL = (
    "INSERT INTO tasks (user_id, title, description, completed, created_at, updated_at) "
    "VALUES (%s, %s, %s, %s, %s, %s) "
    "RETURNING id, user_id, title, description, completed, created_at, updated_at, version"
)
TOGGLE_SQL = (
    "UPDATE tasks SET completed = NOT completed, updated_at = %s, version = version + 1 "
    "WHERE id = %s AND user_id = %s "
    "RETURNING id, user_id, title, description, completed, created_at, updated_at, version"
)
RENAME_SQL = (
    "UPDATE tasks SET title = %s, updated_at = %s, version = version + 1 "
    "WHERE id = %s AND user_id = %s "
    "RETURNING id, user_id, title, description, completed, created_at, updated_at, version"
)
DELETE_SQL = "DELETE FROM tasks WHERE id = %s AND user_id = %s RETURNING id"

TITLE_MAX_LENGTH = 200
JSON_OPTIONS = orjson.OPT_UTC_Z
BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}

Row = tuple[Any, ...]
Connection = psycopg.AsyncConnection[Row]

# Like the app, no access log line per request (the app turns uvicorn's off and logs its own).
logging.getLogger("uvicorn.access").disabled = True


class PoolTimeout(Exception):
    """No connection came free in time."""


class Pool:
    """A minimal connection pool: up to `size` autocommit connections, idle ones in a queue.

    The smallest pool that works (the app's, `pool.py`, also pings idle connections, retires
    old ones and serves waiters in order): connections open on demand, wait for a free one up
    to `timeout` seconds, and a connection that broke is closed and forgotten (the next request
    opens a new one).
    """

    def __init__(
        self,
        conninfo: str,
        size: int,
        timeout: float,
        statement_timeout_ms: int,
        *,
        prepared_statements: bool,
    ) -> None:
        self._conninfo = conninfo
        self._prepare_threshold = 5 if prepared_statements else None
        self._size = size
        self._timeout = timeout
        self._options = f"-c TimeZone=UTC -c statement_timeout={int(statement_timeout_ms)}"
        self._idle: asyncio.Queue[Connection] = asyncio.Queue()
        self._opened = 0

    async def _open(self) -> Connection:
        self._opened += 1
        try:
            return await psycopg.AsyncConnection.connect(
                self._conninfo,
                autocommit=True,
                # As the app: server-side prepared statements unless configured off.
                prepare_threshold=self._prepare_threshold,
                connect_timeout=10,
                options=self._options,
            )
        except BaseException:
            self._opened -= 1
            raise

    async def _acquire(self) -> Connection:
        if not self._idle.empty():
            return self._idle.get_nowait()
        if self._opened < self._size:
            return await self._open()
        try:
            return await asyncio.wait_for(self._idle.get(), self._timeout)
        except TimeoutError:
            raise PoolTimeout from None

    def _release(self, connection: Connection) -> None:
        if connection.closed or connection.broken:
            self._opened -= 1
        else:
            self._idle.put_nowait(connection)

    async def fetch(self, sql: str, params: Sequence[Any] | Mapping[str, Any]) -> list[Row]:
        connection = await self._acquire()
        try:
            cursor = await connection.execute(sql, params)
            return await cursor.fetchall()
        finally:
            self._release(connection)

    async def close(self) -> None:
        while not self._idle.empty():
            await self._idle.get_nowait().close()
            self._opened -= 1


def _secret() -> bytes:
    return os.environ["BETTER_AUTH_SECRET"].encode("utf-8")


SECRET = _secret()
LEEWAY = int(os.environ.get("JWT_LEEWAY_SECONDS", "30"))
POOL = Pool(
    os.environ["DATABASE_URL"],
    size=int(os.environ.get("DATABASE_POOL_SIZE", "5"))
    + int(os.environ.get("DATABASE_MAX_OVERFLOW", "5")),
    timeout=float(os.environ.get("DATABASE_POOL_TIMEOUT_SECONDS", "5")),
    statement_timeout_ms=int(os.environ.get("DATABASE_STATEMENT_TIMEOUT_MS", "5000")),
    prepared_statements=os.environ.get("DATABASE_PREPARED_STATEMENTS", "true").lower()
    not in {"0", "false", "no", "off"},
)


def json_response(
    content: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(content, option=JSON_OPTIONS),
        status_code=status_code,
        media_type="application/json",
        headers=headers,
    )


def error(status_code: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"detail": detail}, status_code, headers)


def task_json(row: Row) -> dict[str, Any]:
    return {
        "id": row[0],
        "user_id": row[1],
        "title": row[2],
        "description": row[3],
        "completed": row[4],
        "created_at": row[5],
        "updated_at": row[6],
    }


def task_response(row: Row, status_code: int = 200) -> Response:
    return json_response(task_json(row), status_code, {"ETag": f'"{row[0]}.{row[7]}"'})


def authorize(request: Request) -> str | Response:
    """The path's user when the bearer token is a valid HS256 JWT for it; else 401 or 403."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return error(401, "Not authenticated.", BEARER_CHALLENGE)
    try:
        claims = jwt.decode(
            token, SECRET, algorithms=["HS256"], leeway=LEEWAY, options={"require": ["exp"]}
        )
    except jwt.PyJWTError:
        return error(401, "Invalid or expired token.", BEARER_CHALLENGE)
    user_id = claims.get("sub")
    if not isinstance(user_id, str) or not user_id:
        return error(401, "Invalid or expired token.", BEARER_CHALLENGE)
    if user_id != request.path_params["user_id"]:
        return error(403, "You can only access your own tasks.")
    return user_id


def task_id_of(request: Request) -> int:
    task_id: int = request.path_params["task_id"]
    return task_id


async def list_tasks(request: Request) -> Response:
    user_id = authorize(request)
    if isinstance(user_id, Response):
        return user_id
    rows = await POOL.fetch(LIST_SQL, {"owner": user_id})
    tasks = [
        {
            "id": task_id,
            "user_id": user_id,
            "title": title,
            "description": description,
            "completed": completed,
            "created_at": created_at,
            "updated_at": updated_at,
        }
        for task_id, title, description, completed, created_at, updated_at in rows
    ]
    return json_response(tasks, 200, {"X-Total-Count": str(len(rows))})


async def title_of(request: Request) -> str | Response:
    """The body's `title`, stripped; or the 422 answer."""
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return error(422, "The body is not JSON.")
    title = body.get("title") if isinstance(body, dict) else None
    if not isinstance(title, str) or not 1 <= len(title.strip()) <= TITLE_MAX_LENGTH:
        return error(422, "title must be 1-200 characters.")
    return title.strip()


async def create_task(request: Request) -> Response:
    user_id = authorize(request)
    if isinstance(user_id, Response):
        return user_id
    title = await title_of(request)
    if isinstance(title, Response):
        return title
    now = datetime.now(UTC)
    rows = await POOL.fetch(CREATE_SQL, (user_id, title, None, False, now, now))
    return task_response(rows[0], 201)


async def read_task(request: Request) -> Response:
    user_id = authorize(request)
    if isinstance(user_id, Response):
        return user_id
    rows = await POOL.fetch(GET_SQL, (task_id_of(request), user_id))
    return task_response(rows[0]) if rows else error(404, "Task not found.")


async def toggle_task(request: Request) -> Response:
    user_id = authorize(request)
    if isinstance(user_id, Response):
        return user_id
    rows = await POOL.fetch(TOGGLE_SQL, (datetime.now(UTC), task_id_of(request), user_id))
    return task_response(rows[0]) if rows else error(404, "Task not found.")


async def rename_task(request: Request) -> Response:
    """PATCH with a title (the mixed scenario's update); other fields are not handled."""
    user_id = authorize(request)
    if isinstance(user_id, Response):
        return user_id
    title = await title_of(request)
    if isinstance(title, Response):
        return title
    params = (title, datetime.now(UTC), task_id_of(request), user_id)
    rows = await POOL.fetch(RENAME_SQL, params)
    return task_response(rows[0]) if rows else error(404, "Task not found.")


async def delete_task(request: Request) -> Response:
    user_id = authorize(request)
    if isinstance(user_id, Response):
        return user_id
    rows = await POOL.fetch(DELETE_SQL, (task_id_of(request), user_id))
    return Response(status_code=204) if rows else error(404, "Task not found.")


async def ready(_request: Request) -> Response:
    await POOL.fetch("SELECT 1", ())
    return json_response({"status": "ready"})


async def pool_timeout(_request: Request, _error: Exception) -> Response:
    return error(503, "The database is busy; retry.", {"Retry-After": "1"})


@asynccontextmanager
async def lifespan(_app: Starlette) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await POOL.close()


app = Starlette(
    routes=[
        Route("/health/ready", ready, methods=["GET"]),
        Route("/api/{user_id}/tasks", list_tasks, methods=["GET"]),
        Route("/api/{user_id}/tasks", create_task, methods=["POST"]),
        Route("/api/{user_id}/tasks/{task_id:int}", read_task, methods=["GET"]),
        Route("/api/{user_id}/tasks/{task_id:int}", rename_task, methods=["PATCH", "PUT"]),
        Route("/api/{user_id}/tasks/{task_id:int}", delete_task, methods=["DELETE"]),
        Route("/api/{user_id}/tasks/{task_id:int}/complete", toggle_task, methods=["PATCH"]),
    ],
    exception_handlers={PoolTimeout: pool_timeout},
    lifespan=lifespan,
)
