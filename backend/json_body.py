"""JSON in and out with orjson.

In: the standard library parser accepts `NaN`, `Infinity` and lone surrogates (which a database
then fails on) and overflows the stack on deeply nested input. orjson refuses all of these with
a `JSONDecodeError`, which FastAPI answers with a 422, and it is faster.

Out: rows are encoded once, straight to bytes; timestamps as UTC with a `Z`.
"""

from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request, Response
from fastapi.routing import APIRoute


class JSONBodyRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = orjson.loads(await self.body())
        return self._json


class JSONBodyRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_with_strict_json(request: Request) -> Response:
            return await handle(JSONBodyRequest(request.scope, request.receive))

        return handle_with_strict_json


def to_json(value: Any) -> bytes:
    # Datetimes are UTC, written with "Z"; naive ones (rows from PostgreSQL) are UTC too.
    return orjson.dumps(value, option=orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC)


def json_response(
    body: bytes, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(body, status_code=status_code, headers=headers, media_type="application/json")
