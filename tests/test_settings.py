"""Settings: one line naming the variable, never its value; poolers recognised."""

from __future__ import annotations

import pytest

from kyrie_engine.db import driver_dsn
from kyrie_engine.service import checked_settings
from kyrie_engine.settings import Settings, SettingsError, is_transaction_pooler, load

SECRET = "s" * 40
GOOD = {
    "DATABASE_URL": "postgresql://kyrie:pw-9f8e7d@db.example.test:5432/postgres",
    "KYRIE_INTERNAL_SECRET": SECRET,
    "KYRIE_LLM": "offline",
}
ALL_VARS = [
    "DATABASE_URL", "KYRIE_INTERNAL_SECRET", "KYRIE_LLM", "GROQ_API_KEY", "KYRIE_PORT", "KYRIE_HOST",
    "KYRIE_MAX_BODY_BYTES", "KYRIE_LISTEN_DATABASE_URL", "KYRIE_CONCURRENCY",
]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    for name in ALL_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values: str | None) -> None:
        for name, value in {**GOOD, **values}.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)

    return set_env


@pytest.mark.parametrize(
    ("mode", "changes", "expected", "never"),
    [
        ("api", {"DATABASE_URL": None}, "DATABASE_URL: required but not set", None),
        ("api", {"DATABASE_URL": "mysql://u:hunter2-pw@h/db"}, "DATABASE_URL: must be a postgresql:// URL",
         "hunter2-pw"),
        # '#' unescaped in a password makes urlsplit read half the password as the port.
        ("api", {"DATABASE_URL": "postgresql://u:s3cr#etpass@h/db"}, "DATABASE_URL: is not a valid", "s3cr"),
        ("api", {"DATABASE_URL": "postgresql:///db"}, "DATABASE_URL: must name a host", None),
        ("api", {"KYRIE_INTERNAL_SECRET": None}, "KYRIE_INTERNAL_SECRET: required but not set", None),
        ("api", {"KYRIE_INTERNAL_SECRET": "x" * 31}, "KYRIE_INTERNAL_SECRET: must be at least 32", "x" * 31),
        ("api", {"KYRIE_INTERNAL_SECRET": SECRET + " "}, "KYRIE_INTERNAL_SECRET: must not start", SECRET),
        ("api", {"KYRIE_INTERNAL_SECRET": SECRET + "é"}, "KYRIE_INTERNAL_SECRET: must be printable", SECRET),
        ("api", {"KYRIE_LLM": "gpt"}, "KYRIE_LLM: Input should be 'groq' or 'offline'", None),
        ("api", {"KYRIE_PORT": "http"}, "KYRIE_PORT: Input should be a valid integer", None),
        ("api", {"KYRIE_MAX_BODY_BYTES": "10"}, "KYRIE_MAX_BODY_BYTES: Input should be greater than", None),
        ("api", {"KYRIE_LISTEN_DATABASE_URL": "postgresql://h:6543/db"}, "KYRIE_LISTEN_DATABASE_URL: must be",
         None),
        ("serve", {"KYRIE_LLM": "groq"}, "GROQ_API_KEY: required while KYRIE_LLM=groq", None),
        ("worker", {"KYRIE_LLM": "groq", "GROQ_API_KEY": ""}, "GROQ_API_KEY: required", None),
        ("worker", {"DATABASE_URL": "postgresql://u:pw-1234@pooler.example.test:6543/postgres"},
         "DATABASE_URL: points at a transaction pooler", "pw-1234"),
        ("serve", {"DATABASE_URL": "postgresql://h/db?pgbouncer=true"}, "DATABASE_URL: points at a", None),
    ],
)
def test_a_wrong_setting_is_named_in_one_line(env, mode, changes, expected, never) -> None:  # type: ignore[no-untyped-def]
    env(**changes)
    with pytest.raises(SettingsError) as caught:
        checked_settings(mode)
    message = str(caught.value)
    assert message.startswith(expected)
    assert "\n" not in message
    if never:
        assert never not in message


@pytest.mark.parametrize(
    ("mode", "changes"),
    [
        ("api", {}),
        # The API may sit behind a transaction pooler (prepared statements off, no LISTEN).
        ("api", {"DATABASE_URL": "postgresql://u:pw@pooler.example.test:6543/postgres"}),
        # A lone worker never answers HTTP: it needs no secret.
        ("worker", {"KYRIE_INTERNAL_SECRET": None}),
        ("serve", {"KYRIE_LLM": "groq", "GROQ_API_KEY": "gsk_test"}),
    ],
)
def test_a_complete_environment_loads(env, mode, changes) -> None:  # type: ignore[no-untyped-def]
    env(**changes)
    assert isinstance(checked_settings(mode), Settings)


def test_the_listen_connection_avoids_a_transaction_pooler(env) -> None:  # type: ignore[no-untyped-def]
    env(DATABASE_URL="postgresql://u:pw@pooler.example.test:6543/postgres")
    settings = load()
    assert isinstance(settings, Settings) and settings.listen_dsn is None
    env(DATABASE_URL="postgresql://u:pw@pooler.example.test:6543/postgres",
        KYRIE_LISTEN_DATABASE_URL="postgresql://u:pw@db.example.test:5432/postgres")
    settings = load()
    assert isinstance(settings, Settings) and settings.listen_dsn == "postgresql://u:pw@db.example.test:5432/postgres"


def test_the_secrets_to_mask_include_the_database_password(env) -> None:  # type: ignore[no-untyped-def]
    env(GROQ_API_KEY="gsk_abcdef")
    settings = load()
    assert isinstance(settings, Settings)
    assert set(settings.secrets()) == {SECRET, "gsk_abcdef", "pw-9f8e7d"}


@pytest.mark.parametrize(
    ("dsn", "pooler"),
    [
        ("postgresql://u@db.example.test:5432/postgres", False),
        ("postgresql://u@aws-0-eu.pooler.supabase.com:6543/postgres", True),
        ("postgresql://u@h/db?pgbouncer=true", True),
        ("postgresql://u@h:5432/db?sslmode=require", False),
    ],
)
def test_transaction_poolers_are_recognised(dsn: str, pooler: bool) -> None:
    assert is_transaction_pooler(dsn) is pooler


def test_the_pgbouncer_hint_is_not_sent_to_the_server() -> None:
    assert driver_dsn("postgresql://u@h/db?pgbouncer=true&sslmode=require") == "postgresql://u@h/db?sslmode=require"
    assert driver_dsn("postgresql://u@h/db?sslmode=require") == "postgresql://u@h/db?sslmode=require"
