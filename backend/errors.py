"""Errors that carry their HTTP status. `main.py` maps them to `{"detail": ...}` in one place."""

from typing import ClassVar

from fastapi import status


class APIError(Exception):
    status_code = status.HTTP_500_INTERNAL_SERVER_ERROR
    detail = "The server could not complete the request."
    default_headers: ClassVar[dict[str, str]] = {}
    # A 422 is answered in FastAPI's list shape, which frontends already parse: these fill it.
    error_type = "value_error"
    location: ClassVar[tuple[str, ...]] = ("body",)

    def __init__(self, detail: str | None = None, headers: dict[str, str] | None = None) -> None:
        if detail is not None:
            self.detail = detail
        self.headers = {**self.default_headers, **(headers or {})}
        super().__init__(self.detail)


class NotAuthenticated(APIError):
    status_code = status.HTTP_401_UNAUTHORIZED
    detail = "Not authenticated: send a valid token as 'Authorization: Bearer <token>'."
    default_headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


class InvalidCredentials(NotAuthenticated):
    detail = "The bearer token is invalid or expired."
    default_headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


class WrongUser(APIError):
    status_code = status.HTTP_403_FORBIDDEN
    detail = "This token does not grant access to another user's tasks."


class TaskNotFound(APIError):
    status_code = status.HTTP_404_NOT_FOUND
    # The same sentence whether the task never existed or belongs to someone else.
    detail = "Task not found."


class IdempotencyKeyInProgress(APIError):
    status_code = status.HTTP_409_CONFLICT
    detail = "A request with this Idempotency-Key is still being processed; retry shortly."
    default_headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class TooManyVersions(APIError):
    status_code = status.HTTP_400_BAD_REQUEST
    detail = "If-Match names more versions of this task than are compared."


class PreconditionFailed(APIError):
    status_code = status.HTTP_412_PRECONDITION_FAILED
    detail = "The task has changed since it was read (If-Match does not match its ETag)."


class IdempotencyKeyReused(APIError):
    status_code = status.HTTP_422_UNPROCESSABLE_CONTENT
    detail = "This Idempotency-Key was already used with a different request body."
    error_type = "idempotency_key_reused"
    location: ClassVar[tuple[str, ...]] = ("header", "Idempotency-Key")


class UnstorableValue(APIError):
    status_code = status.HTTP_422_UNPROCESSABLE_CONTENT
    detail = "The database cannot store a value in this request."


class TooManyRequests(APIError):
    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    detail = "Too many requests for this user; slow down."


class AuthUnavailable(APIError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    detail = (
        "The token cannot be checked right now (Better Auth is unreachable); try again shortly."
    )
    default_headers: ClassVar[dict[str, str]] = {"Retry-After": "5"}


class DatabaseUnavailable(APIError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    detail = "The database is unavailable right now; try again shortly."
    default_headers: ClassVar[dict[str, str]] = {"Retry-After": "2"}
