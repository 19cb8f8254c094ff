"""`--host`/`--port` on `serve` and `api`, `--concurrency` on `serve` and
`worker`: flags win over the environment, bad values stop the command with
exit 2 before anything starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from kyrie_engine import service

KYRIE = str(Path(sys.executable).parent / "kyrie-engine")
SECRET = "flags-test-secret-" + "f" * 24


def _env(dsn: str, **changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KYRIE_", "GROQ_", "DATABASE_URL"))}
    env.update({"DATABASE_URL": dsn, "KYRIE_INTERNAL_SECRET": SECRET, "KYRIE_LLM": "offline",
                "KYRIE_SHUTDOWN_GRACE_SECONDS": "5", **changes})
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("mode", "argv", "env", "expected"),
    [
        ("api", ["--port", "9123", "--host", "::1"], {"KYRIE_PORT": "8111", "KYRIE_HOST": "127.0.0.1"},
         {"port": 9123, "host": "::1"}),
        ("serve", ["--port", "0", "--concurrency", "12"], {"KYRIE_PORT": "8111", "KYRIE_CONCURRENCY": "3"},
         {"port": 0, "concurrency": 12}),
        ("worker", ["--concurrency", "7"], {"KYRIE_CONCURRENCY": "3"}, {"concurrency": 7}),
        ("worker", [], {"KYRIE_CONCURRENCY": "3"}, {"concurrency": 3}),  # no flag: the variable
        ("api", [], {}, {"port": 8000, "host": "127.0.0.1"}),  # neither: the defaults
    ],
)
def test_flags_win_over_the_environment(
    monkeypatch: pytest.MonkeyPatch, mode: str, argv: list[str], env: dict[str, str],
    expected: dict[str, object],
) -> None:
    for name in [k for k in os.environ if k.startswith("KYRIE_")]:
        monkeypatch.delenv(name)
    for name, value in {"DATABASE_URL": "postgresql://u@127.0.0.1:5432/db", "KYRIE_INTERNAL_SECRET": SECRET,
                        "KYRIE_LLM": "offline", **env}.items():
        monkeypatch.setenv(name, value)
    settings = service.settings_for(mode, argv)
    assert {k: getattr(settings, k) for k in expected} == expected


@pytest.mark.parametrize(
    ("mode", "argv", "says"),
    [
        ("api", ["--port", "70000"], "--port: must be between 0 and 65535"),
        ("serve", ["--port", "eighty"], "--port: 'eighty' is not a whole number"),
        ("worker", ["--concurrency", "0"], "--concurrency: must be between 1 and 256"),
        ("worker", ["--port", "8001"], "unrecognized arguments: --port"),  # a worker listens on nothing
        ("api", ["--concurrency", "2"], "unrecognized arguments: --concurrency"),
    ],
)
def test_a_bad_flag_stops_the_command_with_exit_2(mode: str, argv: list[str], says: str) -> None:
    done = subprocess.run([KYRIE, mode, *argv], env=_env("postgresql://u@127.0.0.1:1/db"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert says in done.stderr


def test_api_listens_on_the_port_given_by_flag_not_by_the_variable(db_dsn: str) -> None:
    flag_port, env_port = _free_port(), _free_port()
    proc = subprocess.Popen(
        [KYRIE, "api", "--host", "127.0.0.1", "--port", str(flag_port)],
        env=_env(db_dsn, KYRIE_PORT=str(env_port)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{flag_port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the API never answered on the flag's port"
            time.sleep(0.1)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{env_port}/healthz", timeout=2)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert f'"port": {flag_port}' in out + err
