"""Settings, read once from the environment, refusing to start when wrong.

The KyrieOS team's rule is "fail fast": a service with a missing secret must
die at start-up with a clear line, not answer 500 at the first request.  Each
command validates exactly the settings it needs (`migrate` needs only the
database; `api` needs the secret; `worker` needs the model's key and a
connection that can LISTEN) and turns a validation error into one line naming
the variable.  No message ever repeats a value: a malformed DATABASE_URL may
well carry a password, and a short secret is still a secret.
"""

from __future__ import annotations

import datetime as dt
import re
import sys
from typing import Literal, NoReturn
from urllib.parse import parse_qs, urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# How long finished jobs are kept by default (KYRIE_KEEP_*, and a Worker's own defaults).
KEEP_COMPLETED = dt.timedelta(days=7)
KEEP_FAILED = dt.timedelta(days=30)

SECRET_MIN_LENGTH = 32


def _check_dsn(value: str) -> str:
    # urlsplit's own errors quote pieces of the URL (a port that is really half
    # a password), so every failure here gets a message of our own.
    try:
        parts = urlsplit(value)
        port = parts.port
        host = parts.hostname
    except ValueError:
        raise ValueError("is not a valid URL (check the port, and percent-encode the password)") from None
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError("must be a postgresql:// URL")
    if not host and "host" not in parse_qs(parts.query):
        raise ValueError("must name a host")
    if port == 0:
        raise ValueError("must not use port 0")
    return value


def is_transaction_pooler(dsn: str) -> bool:
    """Supavisor and PgBouncer in transaction mode listen on 6543 by convention.

    LISTEN/NOTIFY and session state do not survive a transaction pooler: each
    transaction may run on another server connection.
    """
    parts = urlsplit(dsn)
    try:
        port = parts.port
    except ValueError:
        return False
    return port == 6543 or "pgbouncer=true" in (parts.query or "").lower()


def _env(*names: str) -> AliasChoices:
    """The variable's name first (error messages quote it), then the field's own name."""
    return AliasChoices(*names)


class DatabaseSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    database_url: str = Field(validation_alias=_env("DATABASE_URL", "database_url"))

    @field_validator("database_url")
    @classmethod
    def _valid_dsn(cls, value: str) -> str:
        return _check_dsn(value)


_KEEP_RE = re.compile(r"(?P<n>\d{1,6})(?P<unit>[dhms])")
_KEEP_UNITS = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}


def parse_keep(text: str) -> dt.timedelta | None:
    """A keep period as operators write it: `7d`, `12h`, `30m`, `45s`; `0` keeps forever (None).

    A bare number is refused rather than guessed: `7` could be days or seconds,
    and guessing seconds would delete a week of history at the first purge.
    """
    value = text.strip().lower()
    if value == "0":
        return None
    match = _KEEP_RE.fullmatch(value)
    if not match or int(match["n"]) == 0:
        raise ValueError("must be a duration like 7d, 12h or 30m, or 0 to keep forever")
    return dt.timedelta(**{_KEEP_UNITS[match["unit"]]: int(match["n"])})


class Settings(DatabaseSettings):
    """Everything `serve`, `api` and `worker` read.

    The secret is optional in the model because a lone `worker` never answers
    HTTP; `api` and `serve` call `require_internal_secret()`.  A secret that is
    present but malformed is refused in every mode.
    """

    internal_secret: SecretStr | None = Field(
        default=None, validation_alias=_env("KYRIE_INTERNAL_SECRET", "internal_secret")
    )
    llm: Literal["groq", "offline"] = Field(default="groq", validation_alias=_env("KYRIE_LLM", "llm"))
    groq_api_key: SecretStr | None = Field(
        default=None, validation_alias=_env("GROQ_API_KEY", "groq_api_key")
    )
    groq_model: str = Field(
        default="llama-3.3-70b-versatile", validation_alias=_env("KYRIE_GROQ_MODEL", "groq_model")
    )
    groq_base_url: str | None = Field(default=None, validation_alias=_env("GROQ_BASE_URL", "groq_base_url"))
    host: str = Field(default="127.0.0.1", validation_alias=_env("KYRIE_HOST", "host"))
    port: int = Field(default=8000, ge=0, le=65535, validation_alias=_env("KYRIE_PORT", "port"))
    concurrency: int = Field(
        default=4, ge=1, le=256, validation_alias=_env("KYRIE_CONCURRENCY", "concurrency")
    )
    max_body_bytes: int = Field(
        default=64 * 1024, ge=1024, le=16 * 1024 * 1024,
        validation_alias=_env("KYRIE_MAX_BODY_BYTES", "max_body_bytes"),
    )
    pool_size: int = Field(default=10, ge=1, le=200, validation_alias=_env("KYRIE_POOL_SIZE", "pool_size"))
    # A direct (or session-mode) connection for LISTEN when DATABASE_URL is a
    # transaction pooler; without one, the API serves everything but live events.
    listen_database_url: str | None = Field(
        default=None, validation_alias=_env("KYRIE_LISTEN_DATABASE_URL", "listen_database_url")
    )
    sse_ping_seconds: float = Field(
        default=15.0, gt=0, le=300, validation_alias=_env("KYRIE_SSE_PING_SECONDS", "sse_ping_seconds")
    )
    shutdown_grace_seconds: float = Field(
        default=20.0, ge=0, le=3600,
        validation_alias=_env("KYRIE_SHUTDOWN_GRACE_SECONDS", "shutdown_grace_seconds"),
    )
    db_timeout_seconds: float = Field(
        default=5.0, gt=0, le=120, validation_alias=_env("KYRIE_DB_TIMEOUT_SECONDS", "db_timeout_seconds")
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", validation_alias=_env("KYRIE_LOG_LEVEL", "log_level")
    )
    # Retention (kyrie_engine.retention): how long finished jobs are kept; None keeps them forever.
    keep_completed: dt.timedelta | None = Field(
        default=KEEP_COMPLETED, validation_alias=_env("KYRIE_KEEP_COMPLETED", "keep_completed")
    )
    keep_failed: dt.timedelta | None = Field(
        default=KEEP_FAILED, validation_alias=_env("KYRIE_KEEP_FAILED", "keep_failed")
    )

    @field_validator("keep_completed", "keep_failed", mode="before")
    @classmethod
    def _keep_period(cls, value: object) -> object:
        return parse_keep(value) if isinstance(value, str) else value

    # The HTTP server's limits against slow or greedy clients (kyrie_engine.service._uvicorn_server).
    header_timeout_seconds: float = Field(
        default=10.0, gt=0, le=300,
        validation_alias=_env("KYRIE_HEADER_TIMEOUT_SECONDS", "header_timeout_seconds"),
    )
    keep_alive_seconds: int = Field(
        default=5, ge=1, le=300, validation_alias=_env("KYRIE_KEEP_ALIVE_SECONDS", "keep_alive_seconds")
    )
    max_connections: int = Field(
        default=1000, ge=1, le=100_000,
        validation_alias=_env("KYRIE_MAX_CONNECTIONS", "max_connections"),
    )
    max_header_bytes: int = Field(
        default=16 * 1024, ge=1024, le=1024 * 1024,
        validation_alias=_env("KYRIE_MAX_HEADER_BYTES", "max_header_bytes"),
    )
    # The shared Groq budget (kyrie_engine.agents.budget), seeded at a worker's first job.
    # Groq's headers report TPM and RPD (and correct these); RPM and TPD are only known from here.
    # The default RPM is Groq's free tier for llama-3.3-70b-versatile: set your organisation's.
    groq_rpm: int | None = Field(default=30, ge=1, validation_alias=_env("KYRIE_GROQ_RPM", "groq_rpm"))
    groq_tpm: int | None = Field(default=None, ge=1, validation_alias=_env("KYRIE_GROQ_TPM", "groq_tpm"))
    groq_rpd: int | None = Field(default=None, ge=1, validation_alias=_env("KYRIE_GROQ_RPD", "groq_rpd"))
    groq_tpd: int | None = Field(default=None, ge=1, validation_alias=_env("KYRIE_GROQ_TPD", "groq_tpd"))
    budget_window_seconds: float = Field(
        default=60.0, gt=0, le=3600,
        validation_alias=_env("KYRIE_BUDGET_WINDOW_SECONDS", "budget_window_seconds"),
    )
    budget_max_wait_seconds: float = Field(
        default=3.0, ge=0, le=60,
        validation_alias=_env("KYRIE_BUDGET_MAX_WAIT_SECONDS", "budget_max_wait_seconds"),
    )

    # The operator console (kyrie_engine.console) is served only when this is set.
    console_token: SecretStr | None = Field(
        default=None, validation_alias=_env("KYRIE_CONSOLE_TOKEN", "console_token")
    )

    @field_validator("internal_secret", "console_token")
    @classmethod
    def _valid_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        text = value.get_secret_value()
        if len(text) < SECRET_MIN_LENGTH:
            raise ValueError(f"must be at least {SECRET_MIN_LENGTH} characters")
        if text != text.strip():
            raise ValueError("must not start or end with whitespace (HTTP strips it from the header)")
        if not all(" " <= ch <= "~" for ch in text):
            raise ValueError("must be printable ASCII (it travels in an HTTP header)")
        return value

    @field_validator("listen_database_url")
    @classmethod
    def _valid_listen_dsn(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _check_dsn(value)
        if is_transaction_pooler(value):
            raise ValueError("must be a direct or session-mode connection, not a transaction pooler")
        return value

    @property
    def listen_dsn(self) -> str | None:
        """Where LISTEN can run, or None when only a transaction pooler was given."""
        if self.listen_database_url is not None:
            return self.listen_database_url
        return None if is_transaction_pooler(self.database_url) else self.database_url

    def require_internal_secret(self) -> SecretStr:
        if self.internal_secret is None:
            raise SettingsError("KYRIE_INTERNAL_SECRET: required but not set")
        return self.internal_secret

    def require_model_key(self) -> None:
        if self.llm == "groq" and (self.groq_api_key is None or not self.groq_api_key.get_secret_value()):
            raise SettingsError("GROQ_API_KEY: required while KYRIE_LLM=groq (set it, or KYRIE_LLM=offline)")

    def require_direct_connection(self) -> None:
        """The worker sleeps on LISTEN and holds leases in session state: no transaction pooler."""
        if is_transaction_pooler(self.database_url):
            raise SettingsError(
                "DATABASE_URL: points at a transaction pooler (port 6543 or pgbouncer=true), which cannot "
                "carry the worker's LISTEN; use the direct connection (port 5432) or Supavisor session mode"
            )

    def secrets(self) -> list[str]:
        """Values that must never appear in a log line (see kyrie_engine.logs)."""
        held = (self.internal_secret, self.groq_api_key, self.console_token)
        values = [s.get_secret_value() for s in held if s is not None]
        for dsn in (self.database_url, self.listen_database_url):
            password = urlsplit(dsn).password if dsn else None
            if password:
                values.append(password)
        return [v for v in values if v]


class SettingsError(Exception):
    """One line naming the variable that is missing or malformed."""


def _env_name(model: type[BaseSettings], field: str) -> str:
    """The location is the alias read (the variable's name) or the field's name: say the variable."""
    info = model.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    return field.upper()


def _one_line(exc: ValidationError, model: type[BaseSettings]) -> str:
    first = exc.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else "settings"
    name = _env_name(model, field)
    if first["type"] == "missing":
        return f"{name}: required but not set"
    message = str(first["msg"]).removeprefix("Value error, ")
    # Never echo the input: it may be a secret.
    return f"{name}: {message}"


def load(model: type[DatabaseSettings] = Settings) -> DatabaseSettings:
    try:
        return model()  # type: ignore[call-arg]
    except ValidationError as exc:
        raise SettingsError(_one_line(exc, model)) from None


def load_or_exit(model: type[DatabaseSettings] = Settings) -> DatabaseSettings:
    try:
        return load(model)
    except SettingsError as exc:
        exit_with(exc)


def exit_with(exc: SettingsError) -> NoReturn:
    print(f"kyrie-engine: refusing to start: {exc}", file=sys.stderr)
    raise SystemExit(2) from None


def database_url_from_env() -> str:
    return load_or_exit(DatabaseSettings).database_url
