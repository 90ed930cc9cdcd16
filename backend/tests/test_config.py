"""Settings and database URLs: what users paste must work, unsafe production values must not."""

import pytest
from httpx import ASGITransport, AsyncClient
from pydantic import ValidationError
from sqlalchemy import text

from config import DEVELOPMENT_SECRET, Settings, get_settings
from db import UnsupportedDatabaseURL, create_engine, database_url, normalize_database_url
from tests.support import make_settings

GOOD_SECRET = "x" * 40
NEON_URL = (
    "postgresql://alex:AbC123dEf@ep-cool-darkness-123456-pooler.us-east-2.aws.neon.tech"
    "/neondb?sslmode=require&channel_binding=require"
)


def production(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "environment": "production",
        "better_auth_secret": GOOD_SECRET,
        "database_url": "postgresql://app@db/app",
    }
    values.update(overrides)
    return make_settings(**values)


def test_production_accepts_safe_settings() -> None:
    assert production().environment == "production"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"better_auth_secret": ""}, "BETTER_AUTH_SECRET"),
        ({"better_auth_secret": DEVELOPMENT_SECRET}, "BETTER_AUTH_SECRET"),
        ({"better_auth_secret": "changethis"}, "BETTER_AUTH_SECRET"),
        ({"better_auth_secret": "short-but-not-a-placeholder"}, "at least 32 bytes"),
        ({"database_url": None}, "NEON_DATABASE_URL"),
        ({"cors_origins": ["*"]}, "CORS_ORIGINS"),
    ],
)
def test_production_refuses_unsafe_settings(overrides: dict[str, object], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        production(**overrides)


def test_development_runs_with_nothing_configured() -> None:
    settings = Settings(_env_file=None)
    assert settings.environment == "development"
    assert settings.better_auth_secret == DEVELOPMENT_SECRET
    assert settings.uses_placeholder_secret
    assert database_url(settings).drivername == "sqlite+aiosqlite"


def start_up_failure() -> str:
    """What start-up stops with (`get_settings`), for the environment as the test set it."""
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as stopped:
            get_settings()
    finally:
        get_settings.cache_clear()
    return str(stopped.value)


def test_a_bad_setting_stops_start_up_without_echoing_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "leaky-but-too-short"
    monkeypatch.setenv("ENVIRONMENT", "production")
    monkeypatch.setenv("BETTER_AUTH_SECRET", secret)
    monkeypatch.setenv("DATABASE_URL", NEON_URL)
    message = start_up_failure()
    assert "BETTER_AUTH_SECRET must be at least 32 bytes" in message
    assert secret not in message
    assert "AbC123dEf" not in message


@pytest.mark.parametrize("variable", ["BETTER_AUTH_URL", "BETTER_AUTH_JWKS_URL"])
@pytest.mark.parametrize(
    "value",
    [
        'http://localhost:3000"',  # a stray quote: the HTTP client cannot parse it
        "http://[::1]:3000x",  # a port that is not a number
        '"http://localhost:3000"',  # quoted in a shell export: no scheme left
        "localhost:3000",
        "ftp://auth.example.com",
        "http:///api/auth/jwks",  # no host
    ],
)
def test_a_better_auth_address_the_client_cannot_use_stops_start_up(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """Otherwise it passes start-up and the first token that needs Better Auth gets a 500."""
    monkeypatch.setenv(variable, value)
    message = start_up_failure()
    assert f"{variable.lower()}: Value error, must be an http:// or https:// URL" in message
    assert value not in message


@pytest.mark.parametrize(
    "value", ["http://localhost:3000", "https://auth.example.com/base/", "http://[::1]:3000 "]
)
def test_better_auth_addresses_as_users_write_them_are_accepted(value: str) -> None:
    settings = make_settings(better_auth_url=value, better_auth_jwks_url=value)
    assert settings.jwks_url == value


def test_environment_names_the_frontends_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEON_DATABASE_URL", "postgresql://neon@host/db")
    monkeypatch.setenv("CORS_ORIGINS", "https://app.example.com/, http://localhost:3000")
    monkeypatch.setenv("BETTER_AUTH_SECRET", GOOD_SECRET)
    settings = Settings(_env_file=None)
    assert settings.database_url == "postgresql://neon@host/db"
    assert settings.cors_origins == ["https://app.example.com", "http://localhost:3000"]
    assert settings.better_auth_secret == GOOD_SECRET
    monkeypatch.delenv("NEON_DATABASE_URL")
    monkeypatch.setenv("DATABASE_URL", "postgres://plain@host/db")
    assert Settings(_env_file=None).database_url == "postgres://plain@host/db"


def test_a_neon_console_url_is_kept_as_it_is_for_psycopg() -> None:
    url = normalize_database_url(NEON_URL)
    assert url.drivername == "postgresql+psycopg"
    assert url.host == "ep-cool-darkness-123456-pooler.us-east-2.aws.neon.tech"
    assert url.password == "AbC123dEf"
    assert dict(url.query) == {"sslmode": "require", "channel_binding": "require"}


@pytest.mark.parametrize(
    ("raw", "driver"),
    [
        ("postgres://u:p@h/db", "postgresql+psycopg"),
        ("postgresql+asyncpg://u:p@h/db", "postgresql+psycopg"),
        ("postgresql+psycopg2://u:p@h/db", "postgresql+psycopg"),
        ("sqlite:///tmp/x.db", "sqlite+aiosqlite"),
        ("sqlite+aiosqlite:///tmp/x.db", "sqlite+aiosqlite"),
    ],
)
def test_url_schemes_are_made_async(raw: str, driver: str) -> None:
    assert normalize_database_url(raw).drivername == driver


def test_asyncpg_style_ssl_becomes_sslmode() -> None:
    assert dict(normalize_database_url("postgresql+asyncpg://u@h/db?ssl=require").query) == {
        "sslmode": "require"
    }


@pytest.mark.parametrize("raw", ["mysql://u:p@h/db", "not a url at all"])
def test_unsupported_urls_are_refused_without_echoing_them(raw: str) -> None:
    with pytest.raises(UnsupportedDatabaseURL) as refused:
        normalize_database_url(raw)
    assert "u:p" not in str(refused.value)


async def test_libpq_parameters_in_the_url_reach_the_server(postgres_url: str) -> None:
    """Neon's `sslmode`/`channel_binding` travel to libpq untouched, as any parameter does."""
    url = f"{postgres_url}?sslmode=prefer&channel_binding=prefer&application_name=todo-url-test"
    engine = create_engine(make_settings(database_url=url))
    try:
        async with engine.connect() as connection:
            name = await connection.scalar(text("SELECT current_setting('application_name')"))
    finally:
        await engine.dispose()
    assert name == "todo-url-test"


async def test_timestamps_are_utc_whatever_the_session_time_zone(postgres_url: str) -> None:
    """A server or role set to another time zone must not shift what the API says."""
    from datetime import UTC, datetime

    from tests.support import auth, running_app

    url = f"{postgres_url}?options=-c%20TimeZone%3DPacific/Auckland"
    async with running_app(database_url=url) as client:
        before = datetime.now(UTC)
        created = await client.post(
            "/api/tz-user/tasks", json={"title": "t"}, headers=auth("tz-user")
        )
        listed = await client.get("/api/tz-user/tasks", headers=auth("tz-user"))
    for task in (created.json(), listed.json()[0]):
        assert task["created_at"].endswith("Z")
        stamp = datetime.fromisoformat(task["created_at"])
        assert abs((stamp - before).total_seconds()) < 60


@pytest.mark.parametrize("prepared", [False, True])
async def test_server_side_prepared_statements_only_when_configured(
    postgres_url: str, prepared: bool
) -> None:
    """DATABASE_PREPARED_STATEMENTS on (the default): the request statements are prepared on the
    server; off: nothing is; the answers are the same (tests/test_prepared.py has the rest)."""
    import uuid

    from main import create_app
    from tests.support import auth

    user = f"prepared-{uuid.uuid4().hex[:8]}"
    app = create_app(
        make_settings(database_url=postgres_url, database_prepared_statements=prepared)
    )
    async with app.router.lifespan_context(app):
        transport = ASGITransport(app=app)
        async with AsyncClient(transport=transport, base_url="http://test") as client:
            created = await client.post(
                f"/api/{user}/tasks", json={"title": "t"}, headers=auth(user)
            )
            task = created.json()
            for _ in range(8):  # psycopg prepares a statement from its sixth run
                listed = await client.get(f"/api/{user}/tasks", headers=auth(user))
                read = await client.get(f"/api/{user}/tasks/{task['id']}", headers=auth(user))
                assert listed.json() == [task]
                assert read.json() == task
        # The pool hands out the most recently used connection: the one that ran them all.
        prepared_count = await app.state.database.scalar(
            text("SELECT count(*) FROM pg_prepared_statements")
        )
    assert (prepared_count > 0) is prepared
