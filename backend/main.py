"""The application: settings, lifespan, middleware, routers and the error mapping, assembled."""

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpx
import psycopg
from fastapi import FastAPI, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from auth.jwt import JWKSCache, SessionLookup, TokenVerifier
from config import Settings, get_settings
from database import create_database
from db import create_engine, database_url
from dependencies import bearer_scheme, check_access
from errors import APIError, DatabaseUnavailable, UnstorableValue
from idempotency import purge_expired
from logs import configure_logging
from middleware import GuardMiddleware, RequestLogMiddleware
from ratelimit import create_rate_limiter
from routes import health, tasks
from startup import bring_schema_up

logger = logging.getLogger("todo")

CORS_HEADERS = [
    "Authorization",
    "Content-Type",
    "Idempotency-Key",
    "If-Match",
    "If-None-Match",
    "X-Request-ID",
]
EXPOSED_HEADERS = ["X-Total-Count", "ETag", "Retry-After", "X-Request-ID", "Idempotent-Replayed"]
PURGE_INTERVAL_SECONDS = 3600
YOUNG_GENERATION_THRESHOLD = 10_000


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    if settings.uses_placeholder_secret:
        logger.warning(
            "BETTER_AUTH_SECRET is a published placeholder (the specification's development "
            "value unless you set one): set the frontend's secret in backend/.env"
        )
    engine = create_engine(settings)
    app.state.engine = engine
    app.state.database = create_database(settings, database_url(settings), engine)
    await app.state.database.open()
    app.state.rate_limiter = create_rate_limiter(settings.rate_limit_per_second, settings.redis_url)
    background = [asyncio.create_task(_purge_idempotency_keys(app))]
    migrating = await bring_schema_up(settings, app)
    if migrating is not None:
        background.append(migrating)
    # Everything loaded so far lives as long as the process: keep it out of the collector's
    # way, so that full collections stay short and do not stretch the slowest requests.
    gc.collect()
    gc.freeze()
    # Under load, the requests in flight hold about 2,000 young objects (their coroutines,
    # cells and rows), more than the default trigger of 700 net allocations: the collector then
    # ran about 230 times a second per busy worker, walked them each time and found them alive,
    # 3.7-5.3% of the workers' CPU (README, Performance: "The garbage collector"). Above that
    # working set, it runs when cyclic garbage has built up.
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, *gc.get_threshold()[1:])
    try:
        yield
    finally:
        # uvicorn has let in-flight requests finish before this runs (graceful shutdown).
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await app.state.database.close()
        await engine.dispose()
        await app.state.auth_http.aclose()
        await app.state.rate_limiter.close()


async def _purge_idempotency_keys(app: FastAPI) -> None:
    settings: Settings = app.state.settings
    while True:
        await asyncio.sleep(PURGE_INTERVAL_SECONDS)
        try:
            purged = await purge_expired(app.state.engine, settings.idempotency_key_ttl_seconds)
        except Exception as error:
            logger.warning("expired idempotency keys not purged (%s)", type(error).__name__)
        else:
            logger.info("purged %d expired idempotency keys", purged)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings)
    app = FastAPI(
        # The task routes first: routing tries routes in order, and they take nearly all
        # requests. Given here rather than with include_router(), whose routing layer costs
        # about 20 µs per request (measured; FastAPI 0.165).
        routes=[*tasks.router.routes, *health.router.routes],
        title="Todo API",
        version="1.0.0",
        summary="Per-user tasks for the Todo app, behind Better Auth tokens.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    # For Better Auth's JWKS and session endpoints; no redirects: the URLs are configured ones.
    # No cookie jar: a session cookie Better Auth sets on one user's lookup must never ride along
    # on the next user's (it would also let a signed-out session live on in its cookie cache).
    # Idle connections go after 1 s, sooner than servers close them (Node's, Better Auth's, after
    # 5 s; gunicorn's after 2): a request sent on one just as the server closes it would fail
    # (httpx's default, 5 s, is exactly Node's).
    app.state.auth_http = httpx.AsyncClient(
        follow_redirects=False,
        limits=httpx.Limits(max_connections=20, keepalive_expiry=1.0),
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
    )
    app.state.token_verifier = build_token_verifier(settings, app.state.auth_http)
    # Trailing slashes are answered by GuardMiddleware, never redirected.
    app.router.redirect_slashes = False

    document_bearer_token(app)
    app.add_exception_handler(APIError, handle_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, handle_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, handle_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(sa_exc.SQLAlchemyError, handle_database_error)  # type: ignore[arg-type]
    app.add_exception_handler(psycopg.Error, handle_database_error)  # type: ignore[arg-type]

    # Added innermost first. CORS wraps everything but the request log, so even errors and
    # deadline 503s carry its headers; the log sees every response, preflights included.
    app.add_middleware(
        GuardMiddleware,
        max_body_bytes=settings.max_request_body_bytes,
        deadline_seconds=settings.request_timeout_seconds,
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_credentials=True,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        allow_headers=CORS_HEADERS,
        expose_headers=EXPOSED_HEADERS,
        max_age=600,
    )
    app.add_middleware(RequestLogMiddleware)
    return app


def document_bearer_token(app: FastAPI) -> None:
    """Every /api operation requires the bearer token: say so in OpenAPI (and /docs' Authorize
    button). The routes check it with `authorize` rather than through a security dependency,
    which FastAPI would resolve on every request."""
    generate = app.openapi
    scheme = bearer_scheme.model.model_dump(mode="json", by_alias=True, exclude_none=True)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {})
            components.setdefault("securitySchemes", {})[bearer_scheme.scheme_name] = scheme
            for path, operations in schema["paths"].items():
                if path.startswith("/api/"):
                    for operation in operations.values():
                        operation["security"] = [{bearer_scheme.scheme_name: []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_token_verifier(settings: Settings, http: httpx.AsyncClient) -> TokenVerifier:
    sessions = None
    if settings.better_auth_session_lookup:
        sessions = SessionLookup(
            settings.session_url, http, cache_seconds=settings.session_lookup_cache_seconds
        )
    return TokenVerifier(
        secret=settings.better_auth_secret,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        leeway_seconds=settings.jwt_leeway_seconds,
        jwks=JWKSCache(
            settings.jwks_url,
            http,
            refresh_cooldown_seconds=settings.jwks_refresh_cooldown_seconds,
            max_age_seconds=settings.jwks_cache_seconds,
        ),
        jwks_issuer=settings.jwks_issuer,
        jwks_audience=settings.jwks_audience,
        sessions=sessions,
    )


def error_response(error: APIError) -> JSONResponse:
    detail: object = error.detail
    if error.status_code == status.HTTP_422_UNPROCESSABLE_CONTENT:
        detail = [{"type": error.error_type, "loc": list(error.location), "msg": error.detail}]
    return JSONResponse({"detail": detail}, status_code=error.status_code, headers=error.headers)


async def handle_api_error(_request: Request, error: APIError) -> JSONResponse:
    return error_response(error)


async def handle_http_error(request: Request, error: StarletteHTTPException) -> Response:
    """FastAPI's answer, but a 405's Allow names the methods of every route on the path: the
    router stops at the first one, which has only some of them."""
    if error.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
        allowed: set[str] = set()
        for route in request.app.router.routes:
            if isinstance(route, Route) and route.matches(request.scope)[0] is not Match.NONE:
                allowed |= route.methods or set()
        error.headers = {**(error.headers or {}), "Allow": ", ".join(sorted(allowed))}
    return await http_exception_handler(request, error)


async def handle_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    # FastAPI parses the body before it runs dependencies. Authentication comes first all the
    # same: a caller without a valid token for this path learns nothing about its input.
    if request.url.path.startswith("/api/"):
        try:
            await check_access(request)
        except APIError as refusal:
            return error_response(refusal)
    # The offending input is not echoed: it may be large, or not representable as JSON.
    problems = [
        {"type": problem["type"], "loc": list(problem["loc"]), "msg": problem["msg"]}
        for problem in error.errors()
    ]
    return JSONResponse({"detail": problems}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


async def handle_database_error(
    request: Request, error: sa_exc.SQLAlchemyError | psycopg.Error
) -> JSONResponse:
    # Driver messages can hold SQL, parameters or the host: only the class name is logged.
    logger.warning(
        "database error %s during %s %s",
        type(getattr(error, "orig", None) or error).__name__,
        request.method,
        getattr(request.scope.get("route"), "path", "(no route)"),
    )
    if isinstance(error, sa_exc.DataError | psycopg.DataError):
        return error_response(UnstorableValue())
    if isinstance(error, sa_exc.IntegrityError | psycopg.IntegrityError):
        return JSONResponse(
            {"detail": "The request conflicts with the stored data."},
            status_code=status.HTTP_409_CONFLICT,
        )
    # Unreachable, timed out, out of connections, or a connection dropped mid-request.
    return error_response(DatabaseUnavailable())


app = create_app()
