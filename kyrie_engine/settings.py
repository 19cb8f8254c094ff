"""Settings, read once from the environment, refusing to start when wrong.

The KyrieOS team's rule is "fail fast": a service with a missing secret must
die at start-up with a clear line, not answer 500 at the first request.  Each
command validates exactly the settings it needs (`migrate` needs only the
database; `api` needs the secret; `worker` needs the model's key) and turns a
validation error into one line naming the variable.
"""

from __future__ import annotations

import sys
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _check_dsn(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError("must be a postgresql:// URL")
    if not parts.hostname and "host=" not in (parts.query or ""):
        raise ValueError("must name a host")
    return value


def is_transaction_pooler(dsn: str) -> bool:
    """Supavisor and PgBouncer in transaction mode listen on 6543 by convention.

    LISTEN/NOTIFY and session state do not survive a transaction pooler: each
    transaction may run on another server connection.
    """
    parts = urlsplit(dsn)
    return parts.port == 6543 or "pgbouncer=true" in (parts.query or "")


class DatabaseSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    database_url: str = Field(validation_alias=AliasChoices("DATABASE_URL", "database_url"))

    _check = field_validator("database_url")(classmethod(lambda cls, v: _check_dsn(v)))


class Settings(DatabaseSettings):
    """Everything `serve`, `api` and `worker` read."""

    internal_secret: SecretStr = Field(
        validation_alias=AliasChoices("KYRIE_INTERNAL_SECRET", "internal_secret"),
        min_length=32,
    )
    llm: Literal["groq", "offline"] = Field(
        default="groq", validation_alias=AliasChoices("KYRIE_LLM", "llm")
    )
    groq_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("GROQ_API_KEY", "groq_api_key")
    )
    groq_model: str = Field(
        default="llama-3.3-70b-versatile", validation_alias=AliasChoices("KYRIE_GROQ_MODEL", "groq_model")
    )
    groq_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("GROQ_BASE_URL", "groq_base_url")
    )
    host: str = Field(default="127.0.0.1", validation_alias=AliasChoices("KYRIE_HOST", "host"))
    port: int = Field(default=8000, ge=0, le=65535, validation_alias=AliasChoices("KYRIE_PORT", "port"))
    concurrency: int = Field(
        default=4, ge=1, le=256, validation_alias=AliasChoices("KYRIE_CONCURRENCY", "concurrency")
    )
    max_body_bytes: int = Field(
        default=64 * 1024, ge=1024, validation_alias=AliasChoices("KYRIE_MAX_BODY_BYTES", "max_body_bytes")
    )
    pool_size: int = Field(
        default=10, ge=1, le=200, validation_alias=AliasChoices("KYRIE_POOL_SIZE", "pool_size")
    )

    def require_model_key(self) -> None:
        if self.llm == "groq" and (self.groq_api_key is None or not self.groq_api_key.get_secret_value()):
            raise SettingsError("GROQ_API_KEY: required while KYRIE_LLM=groq (set it, or KYRIE_LLM=offline)")


class SettingsError(Exception):
    """One line naming the variable that is missing or malformed."""


_ENV_NAMES = {
    "database_url": "DATABASE_URL",
    "internal_secret": "KYRIE_INTERNAL_SECRET",
    "llm": "KYRIE_LLM",
    "groq_api_key": "GROQ_API_KEY",
}


def _one_line(exc: ValidationError) -> str:
    first = exc.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else "settings"
    name = _ENV_NAMES.get(field, field.upper())
    if first["type"] == "missing":
        return f"{name}: required but not set"
    # Never echo the input: it may be a secret.
    return f"{name}: {first['msg']}"


def load(model: type[DatabaseSettings] = Settings) -> DatabaseSettings:
    try:
        return model()  # type: ignore[call-arg]
    except ValidationError as exc:
        raise SettingsError(_one_line(exc)) from None


def load_or_exit(model: type[DatabaseSettings] = Settings) -> DatabaseSettings:
    try:
        return load(model)
    except SettingsError as exc:
        print(f"kyrie-engine: refusing to start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def database_url_from_env() -> str:
    return load_or_exit(DatabaseSettings).database_url
