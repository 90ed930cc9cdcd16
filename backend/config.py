"""Settings: one object, read from the environment and `backend/.env`, validated at start-up."""

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import httpx
from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BACKEND_DIR = Path(__file__).resolve().parent

# The secret printed in the project's specification. The user's frontend ships with it, so
# development works with no configuration; being public, it is refused in production.
DEVELOPMENT_SECRET = "PU0Tdg9Y0rvcqOFEPtwYhWwDdyPIp20g"  # noqa: S105  (public by design)
PLACEHOLDER_SECRETS = frozenset(
    {
        DEVELOPMENT_SECRET,
        "change-me",
        "changeme",
        "changethis",
        "secret",
        "your-secret-here",
        "replace-with-at-least-32-random-bytes",
    }
)
MIN_SECRET_BYTES = 32


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=BACKEND_DIR / ".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    environment: Literal["development", "production", "test"] = "development"

    better_auth_secret: str = DEVELOPMENT_SECRET
    better_auth_url: str = "http://localhost:3000"
    # Checked on HS256 tokens only when set: the frontends' own tokens rarely carry them.
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_seconds: int = Field(default=30, ge=0, le=60)

    # Better Auth's JWT plugin: keys from its JWKS; `iss` and `aud` are its base URL by default.
    better_auth_jwks_url: str | None = None
    better_auth_issuer: str | None = None
    better_auth_audience: str | None = None
    jwks_refresh_cooldown_seconds: float = Field(default=2.0, ge=0.1, le=300)
    jwks_cache_seconds: float = Field(default=600, ge=10)
    # Opaque session tokens (bearer plugin), checked with Better Auth's get-session: off by default.
    better_auth_session_lookup: bool = False
    session_lookup_cache_seconds: float = Field(default=30, ge=0, le=300)
    # Read the `better-auth.session_data` cookie-cache JWT when no Authorization header is sent.
    better_auth_session_cookie: bool = False

    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("NEON_DATABASE_URL", "DATABASE_URL")
    )
    # Migrations through a direct (non-pooled) connection when given: Neon's DATABASE_URL_UNPOOLED.
    direct_database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "NEON_DIRECT_DATABASE_URL", "DIRECT_DATABASE_URL", "DATABASE_URL_UNPOOLED"
        ),
    )
    sqlite_path: Path = BACKEND_DIR / "todo.db"
    database_pool_size: int = Field(default=5, ge=1, le=100)
    database_max_overflow: int = Field(default=5, ge=0, le=100)
    database_pool_timeout_seconds: float = Field(default=5, gt=0, le=60)
    # Covers a Neon compute waking from suspend.
    database_connect_timeout_seconds: int = Field(default=10, ge=1, le=60)
    # Pooled connections idle longer than this are pinged before use (Neon drops idle ones).
    database_ping_idle_seconds: float = Field(default=1.0, ge=0)
    # Per transaction (SET LOCAL); 0 turns it off.
    database_statement_timeout_ms: int = Field(default=5000, ge=0)
    # Server-side prepared statements (database.py): turned off by themselves behind a pooler
    # that cannot keep them; false never tries.
    database_prepared_statements: bool = True
    # Whole-request bound: past it the answer is 503, never a hang.
    request_timeout_seconds: float = Field(default=11, gt=0, le=300)

    idempotency_key_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    # Per user, per second; 0 turns the limit off. Shared through Redis when REDIS_URL is set.
    rate_limit_per_second: int = Field(default=200, ge=0)
    redis_url: str | None = None

    cors_origins: Annotated[list[str], NoDecode] = [
        "http://localhost:3000",
        "http://127.0.0.1:3000",
    ]
    max_request_body_bytes: int = Field(default=64 * 1024, ge=1024)
    migrate_on_startup: bool = True
    log_level: str = "INFO"

    @field_validator("cors_origins", mode="before")
    @classmethod
    def split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip().rstrip("/") for origin in value.split(",") if origin.strip()]
        return value

    @field_validator(
        "database_url",
        "direct_database_url",
        "redis_url",
        "jwt_issuer",
        "jwt_audience",
        "better_auth_jwks_url",
        "better_auth_issuer",
        "better_auth_audience",
        mode="before",
    )
    @classmethod
    def empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("better_auth_url", "better_auth_jwks_url")
    @classmethod
    def http_url(cls, value: str | None) -> str | None:
        """Better Auth's addresses must be http(s) URLs with a host: a value the HTTP client
        cannot send to (a stray quote, a bad port) would otherwise pass start-up and fail the
        first token that needs Better Auth."""
        if value is None:
            return None
        try:
            url = httpx.URL(value.strip())
        except httpx.InvalidURL:
            url = None
        if url is None or url.scheme not in {"http", "https"} or not url.host:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @model_validator(mode="after")
    def refuse_unsafe_production(self) -> "Settings":
        if self.environment != "production":
            return self
        problems = []
        secret = self.better_auth_secret.strip()
        if not secret or secret in PLACEHOLDER_SECRETS:
            problems.append(
                "BETTER_AUTH_SECRET is missing or a published placeholder: set it to the same "
                "secret as the frontend's Better Auth (generate one with `openssl rand -base64 32`)"
            )
        elif len(secret.encode()) < MIN_SECRET_BYTES:
            problems.append(f"BETTER_AUTH_SECRET must be at least {MIN_SECRET_BYTES} bytes long")
        if self.database_url is None:
            problems.append(
                "NEON_DATABASE_URL (or DATABASE_URL) must be set in production: "
                "the embedded SQLite default is for development"
            )
        if "*" in self.cors_origins:
            problems.append("CORS_ORIGINS must list explicit origins, not '*', in production")
        if problems:
            raise ValueError("unsafe production settings: " + "; ".join(problems))
        return self

    @property
    def better_auth_base_url(self) -> str:
        return self.better_auth_url.strip().rstrip("/")

    @property
    def jwks_url(self) -> str:
        return self.better_auth_jwks_url or f"{self.better_auth_base_url}/api/auth/jwks"

    @property
    def session_url(self) -> str:
        return f"{self.better_auth_base_url}/api/auth/get-session"

    @property
    def jwks_issuer(self) -> str:
        return self.better_auth_issuer or self.better_auth_base_url

    @property
    def jwks_audience(self) -> str:
        return self.better_auth_audience or self.better_auth_base_url

    @property
    def uses_placeholder_secret(self) -> bool:
        return self.better_auth_secret.strip() in PLACEHOLDER_SECRETS


@lru_cache
def get_settings() -> Settings:
    """The process's settings. A bad value stops start-up with a message that names the setting
    and never echoes a value (secrets and connection strings stay out of logs)."""
    try:
        return Settings()
    except ValidationError as error:
        problems = [
            f"{'.'.join(str(part) for part in problem['loc']) or 'settings'}: {problem['msg']}"
            for problem in error.errors(include_input=False, include_url=False)
        ]
        raise SystemExit("Configuration error: " + "; ".join(problems)) from None
