"""Errors that carry their HTTP status. `main.py` maps them to `{"detail": ...}` in one place."""

from typing import ClassVar

from fastapi import status


class APIError(Exception):
    status_code = status.HTTP_500_INTERNAL_SERVER_ERROR
    detail = "The server could not complete the request."
    headers: ClassVar[dict[str, str] | None] = None

    def __init__(self, detail: str | None = None) -> None:
        if detail is not None:
            self.detail = detail
        super().__init__(self.detail)


class NotAuthenticated(APIError):
    status_code = status.HTTP_401_UNAUTHORIZED
    detail = "Not authenticated: send a valid token as 'Authorization: Bearer <token>'."
    headers: ClassVar[dict[str, str] | None] = {"WWW-Authenticate": "Bearer"}


class InvalidCredentials(NotAuthenticated):
    detail = "The bearer token is invalid or expired."
    headers: ClassVar[dict[str, str] | None] = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


class WrongUser(APIError):
    status_code = status.HTTP_403_FORBIDDEN
    detail = "This token does not grant access to another user's tasks."


class TaskNotFound(APIError):
    status_code = status.HTTP_404_NOT_FOUND
    # The same sentence whether the task never existed or belongs to someone else.
    detail = "Task not found."


class AuthUnavailable(APIError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    detail = (
        "The token cannot be checked right now (Better Auth is unreachable); try again shortly."
    )
    headers: ClassVar[dict[str, str] | None] = {"Retry-After": "5"}


class DatabaseUnavailable(APIError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    detail = "The database is unavailable right now; try again shortly."
    headers: ClassVar[dict[str, str] | None] = {"Retry-After": "2"}
