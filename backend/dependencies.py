"""The vocabulary routes are written in: `authorize`, `UserId`, `TaskId`, `expected_etags`,
`IdempotencyKey`.

Authentication errors become 401 and a path that names another user becomes 403 in `authorize`,
which every task route calls first, so no route repeats an ownership check.
"""

import logging
import math
from typing import Annotated

from fastapi import Header, Path, Request
from fastapi.security import HTTPBearer

from auth.jwt import InvalidToken, TokenVerifier, VerificationUnavailable
from config import Settings
from database import Database
from errors import (
    AuthUnavailable,
    InvalidCredentials,
    NotAuthenticated,
    TooManyRequests,
    TooManyVersions,
    WrongUser,
)
from models import IDEMPOTENCY_KEY_MAX_LENGTH, TASK_ID_MAX, TASK_ID_MIN
from ratelimit import RateLimiter

logger = logging.getLogger("todo.auth")
MAX_VERSION = 2**31 - 1  # the version column is a 32-bit integer
# Each version is a comparison in the statement, built for the request past a few (queries.py):
# a client lists one ETag, or a handful of tabs' worth.
MOST_IF_MATCH_VERSIONS = 100

# Documents the bearer token in OpenAPI (main.py adds it to every /api operation); the token
# itself is read by `bearer_token`, the way this scheme would read it.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="BetterAuthJWT",
    bearerFormat="JWT",
    description="A JWT from Better Auth, or one signed with BETTER_AUTH_SECRET "
    "(`python3 dev.py token USER_ID` prints one for development).",
)


def database(request: Request) -> Database:
    """Where statements run: each commits by itself; `db.atomic()` groups several. A connection
    is held only while a statement runs, not while the response is written.

    A plain function, not a dependency: each dependency costs FastAPI some microseconds per
    request, and this one would only read an attribute.
    """
    db: Database = request.app.state.database
    return db


async def authorize(request: Request, user_id: str) -> None:
    """Let the request act for the path's user: 401 without a valid token, then 403 when the
    path names someone else, then 429 over the per-user rate limit. Every task route starts here.

    Called by the routes rather than declared as a dependency: FastAPI's dependency machinery
    cost more per request than the check itself (bench/README.md).
    """
    current_user_id = await authenticate(request)
    # Exact comparison: ids are opaque (Better Auth ids, sometimes e-mail addresses).
    if user_id != current_user_id:
        raise WrongUser()
    await enforce_rate_limit(request, current_user_id)


async def authenticate(request: Request) -> str:
    """The id of the user the bearer token names; 401 when there is no valid token."""
    token = bearer_token(request) or session_cookie_token(request)
    if not token:
        raise NotAuthenticated()
    verifier: TokenVerifier = request.app.state.token_verifier
    try:
        verified = await verifier.verify(token)
    except InvalidToken as error:
        logger.info("token refused: %s", error)
        raise InvalidCredentials() from None
    except VerificationUnavailable as error:
        logger.warning("token could not be checked: %s", error)
        raise AuthUnavailable() from None
    return verified.user_id


def bearer_token(request: Request) -> str | None:
    """The token of `Authorization: Bearer <token>`, read as `bearer_scheme` documents it."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if token and scheme.lower() == "bearer" else None


SESSION_COOKIES = ("better-auth.session_data", "__Secure-better-auth.session_data")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def session_cookie_token(request: Request) -> str | None:
    """Better Auth's cookie-cache JWT, when that is turned on and no Authorization header came.

    A cookie travels with requests a page did not mean to make, so a cookie may change data only
    when the request says it comes from one of the configured frontend origins.
    """
    settings: Settings = request.app.state.settings
    if not settings.better_auth_session_cookie:
        return None
    token = next(
        (request.cookies[name] for name in SESSION_COOKIES if name in request.cookies), None
    )
    origin = request.headers.get("origin", "").rstrip("/")
    if token and request.method not in SAFE_METHODS and origin not in settings.cors_origins:
        return None
    return token


UserId = Annotated[str, Path(description="The signed-in user's id, as in the token.")]
TaskId = Annotated[int, Path(ge=TASK_ID_MIN, le=TASK_ID_MAX, description="The task's id.")]


async def enforce_rate_limit(request: Request, user_id: str) -> None:
    """429 with Retry-After once a user passes the per-second limit (RATE_LIMIT_PER_SECOND)."""
    limiter: RateLimiter = request.app.state.rate_limiter
    wait = await limiter.retry_after(user_id)
    if wait is not None:
        raise TooManyRequests(headers={"Retry-After": str(max(1, math.ceil(wait)))})


def expected_etags(request: Request) -> frozenset[str] | None:
    """The ETags `If-Match` allows, or None when any version will do (absent or `*`).

    If-Match compares strongly (RFC 9110 §13.1.1): a weak `W/"…"` tag never matches.
    """
    if_match = request.headers.get("if-match")
    if if_match is None or if_match.strip() == "*":
        return None
    return frozenset(tag.strip() for tag in if_match.split(","))


def versions_allowed(etags: frozenset[str] | None, task_id: int) -> frozenset[int] | None:
    """The task versions those ETags name (empty: none can match, a 412 if the task exists);
    400 past MOST_IF_MATCH_VERSIONS."""
    if etags is None:
        return None
    versions = set()
    for etag in etags:
        if not (len(etag) > 2 and etag[0] == etag[-1] == '"'):
            continue
        task_part, _, version = etag[1:-1].partition(".")
        # A version the column cannot hold matches nothing (and must not reach the database).
        fits = version.isascii() and version.isdigit() and len(version) <= 10
        if task_part == str(task_id) and fits and int(version) <= MAX_VERSION:
            versions.add(int(version))
    if len(versions) > MOST_IF_MATCH_VERSIONS:
        raise TooManyVersions(
            f"If-Match names more than {MOST_IF_MATCH_VERSIONS} versions of this task."
        )
    return frozenset(versions)


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=IDEMPOTENCY_KEY_MAX_LENGTH,
        pattern=r"^[\x21-\x7e]+$",
        description="Retries with the same key and body return the first response, creating once.",
    ),
]


async def check_access(request: Request) -> None:
    """Run the 401 and 403 checks outside a route: for requests refused before their route ran."""
    user_id = await authenticate(request)
    if request.path_params.get("user_id", user_id) != user_id:
        raise WrongUser()
