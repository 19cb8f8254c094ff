"""`kyrie-engine serve | api | worker`: the long-running processes.

`serve` runs the HTTP API and a worker in one process on one event loop (the
small deployment: one container beside the Next.js app); `api` and `worker`
run them apart (scale HTTP and job throughput separately).

Start-up order is the fail-fast contract: settings are validated, and every
setting the mode needs is present and well-formed, before anything heavy is
imported, a port is opened or a job is taken; otherwise the process exits 2
with one line naming the variable.

Shutdown (SIGTERM from the orchestrator, SIGINT from a terminal) is graceful:
uvicorn stops accepting, lets requests finish (live event streams are told to
end), the worker stops claiming and finishes or releases what it holds, then
the process exits 0.  uvicorn installs its own signal handlers while it
serves; the `_Server` subclass below forwards its exit to the worker, so both
halves stop together whichever receives the signal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any

from kyrie_engine.settings import Settings, SettingsError, exit_with, load

log = logging.getLogger("kyrie_engine.service")

MODES = ("serve", "api", "worker")


def checked_settings(mode: str) -> Settings:
    """The settings `mode` needs, or SettingsError naming the first that is wrong."""
    settings = load(Settings)
    assert isinstance(settings, Settings)
    if mode in ("serve", "api"):
        settings.require_internal_secret()
    if mode in ("serve", "worker"):
        settings.require_direct_connection()
        settings.require_model_key()
    return settings


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
        return value

    return parse


def _parser(mode: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"kyrie-engine {mode}",
        description={
            "serve": "Run the HTTP API and a worker in one process.",
            "api": "Run the HTTP API only.",
            "worker": "Run a worker only.",
        }[mode],
        epilog="Configured by the environment: DATABASE_URL, KYRIE_INTERNAL_SECRET, KYRIE_LLM, "
        "GROQ_API_KEY, KYRIE_HOST, KYRIE_PORT, KYRIE_CONCURRENCY, KYRIE_MAX_BODY_BYTES, ... "
        "(see docs/http.md).  A flag wins over its variable.",
    )
    if mode in ("serve", "api"):
        parser.add_argument("--host", help="address to listen on (KYRIE_HOST; default 127.0.0.1)")
        parser.add_argument("--port", type=_bounded_int(0, 65535),
                            help="port to listen on, 0 for any free one (KYRIE_PORT; default 8000)")
    if mode in ("serve", "worker"):
        parser.add_argument("--concurrency", type=_bounded_int(1, 256),
                            help="jobs run at once by the worker (KYRIE_CONCURRENCY; default 4)")
    return parser


def settings_for(mode: str, argv: list[str]) -> Settings:
    """The environment's settings for `mode`, with the command line's flags over
    them (as uvicorn's --host/--port win over its environment).  Flags are
    parsed first, so `--help` needs no environment; SettingsError names the
    first variable that is wrong."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    args = _parser(mode).parse_args(argv)
    settings = checked_settings(mode)
    flags = {name: value for name, value in vars(args).items() if value is not None}
    return settings.model_copy(update=flags) if flags else settings


def main(mode: str, argv: list[str]) -> int:
    try:
        settings = settings_for(mode, argv)
    except SettingsError as exc:
        exit_with(exc)

    from kyrie_engine import logs

    logs.configure(settings.log_level, settings.secrets())
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            return runner.run(run(mode, settings))
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return 130


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (uvicorn[standard] brings it on
    Linux and macOS), else asyncio's.  It is what `uvicorn` itself picks, so
    `kyrie-engine api` runs like the bench's bare app; its transports and
    asyncpg's I/O on it cost less CPU per request than asyncio's selector loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _uvicorn_server(app: Any, settings: Settings, on_exit: Callable[[], None]) -> Any:
    """uvicorn with its limits set deliberately (docs/http.md, "Limits"):

    - a request's headers must arrive within `header_timeout_seconds` of the
      connection opening (or of the previous response): uvicorn has no such
      timeout, and a client trickling a header byte at a time would hold its
      connection for ever;
    - an idle keep-alive connection is closed after `keep_alive_seconds`;
    - at most `max_connections` connections and tasks at once, then 503;
    - headers still incomplete past `max_header_bytes` are refused with a 400
      (headers that arrive whole in one read are not measured).

    The protocol is uvicorn's httptools one (llhttp, in C: the parser `uvicorn`
    picks by default, and the one tests/test_api_support.py serves with), with
    the header deadline and the header limit added by the subclass below.  Its
    pure-Python h11 parser, which the engine used to subclass for these
    limits, cost about a fifth of the API's CPU per request (py-spy under
    `bench --only http`).
    """
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    header_timeout = settings.header_timeout_seconds
    max_header_bytes = settings.max_header_bytes

    class _HeaderLimits(HttpToolsProtocol):
        # A head is awaited from the connection's opening and after each
        # request the parser has finished, until llhttp reports the next
        # head complete; `_head_bytes` counts what arrived meanwhile.
        _deadline: asyncio.TimerHandle | None = None
        _awaiting_head = True
        _head_bytes = 0

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self.transport is not None and not self.transport.is_closing():
                log.info("closed a connection whose request headers did not arrive in time")
                self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._awaiting_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if (self._awaiting_head and self._head_bytes > max_header_bytes
                    and not self.transport.is_closing()):
                # llhttp keeps no limit of its own on a head's size.
                self.send_400_response("Request headers too large.")

        def on_headers_complete(self) -> None:
            self._awaiting_head = False
            self._disarm()  # the headers are in; the body's pace is the app's business
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._awaiting_head = True  # what follows on the connection is the next head
            self._head_bytes = 0
            if self.cycle is not None and self.cycle.response_complete:
                self._arm()  # answered before its body was in: the next head is awaited from now

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # The next request on this connection gets the same deadline, unless
            # its head is already in (a pipelined request, now being served).
            if self._awaiting_head and self.transport is not None and not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            on_exit()

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=_HeaderLimits,
        log_config=None,  # our JSON-lines handler on the root logger (kyrie_engine.logs)
        access_log=False,  # the request middleware writes a richer access line
        lifespan="on",
        server_header=False,
        timeout_graceful_shutdown=round(settings.shutdown_grace_seconds),
        timeout_keep_alive=settings.keep_alive_seconds,
        limit_concurrency=settings.max_connections,
    )
    return _Server(config)


async def run(mode: str, settings: Settings) -> int:
    worker: Any = None
    server: Any = None
    if mode in ("serve", "worker"):
        from kyrie_engine.handlers import default_handlers
        from kyrie_engine.worker import Worker

        handlers = default_handlers(settings)
        if not handlers:
            log.error("no job handlers: kyrie_engine.handlers.default_handlers returned none")
            return 1
        worker = Worker(
            settings.database_url,
            handlers,
            concurrency=settings.concurrency,
            pool_size=settings.pool_size,
            shutdown_grace_seconds=settings.shutdown_grace_seconds,
            keep_completed=settings.keep_completed,
            keep_failed=settings.keep_failed,
            handle_signals=False,  # ours, below: one stop for both halves
        )

    stopping = asyncio.Event()

    def request_stop() -> None:
        # Once only: Worker.stop() counts its calls, and a second one skips
        # the grace period (it is how an impatient operator forces a stop).
        # This runs for the signal and again when the first half has ended.
        if stopping.is_set():
            return
        log.info("stopping", extra={"mode": mode})
        stopping.set()
        if server is not None:
            server.should_exit = True
        if worker is not None:
            worker.stop()

    if mode in ("serve", "api"):
        from kyrie_engine.api import build_app

        server = _uvicorn_server(build_app(settings, worker=worker), settings, request_stop)

    # uvicorn replaces these while it serves (and forwards to request_stop);
    # they cover the worker alone, and the moments before and after uvicorn.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop)

    tasks: dict[asyncio.Task[Any], str] = {}
    if server is not None:
        tasks[asyncio.create_task(_serve_http(server), name="http")] = "http"
    if worker is not None:
        tasks[asyncio.create_task(worker.run(), name="worker")] = "worker"
    log.info("started", extra={"mode": mode, "host": settings.host, "port": settings.port})

    # Whichever half ends first (a signal, or a crash), the other is stopped too.
    stop_wait = asyncio.create_task(stopping.wait())
    await asyncio.wait([*tasks, stop_wait], return_when=asyncio.FIRST_COMPLETED)
    request_stop()
    done, pending = await asyncio.wait(tasks, timeout=settings.shutdown_grace_seconds + 30)
    stop_wait.cancel()
    for task in pending:
        log.error("did not stop in time; cancelling", extra={"part": tasks[task]})
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    failed = False
    for task in done:
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            from kyrie_engine.logs import describe_exception

            log.error("stopped by an error", extra={"part": tasks[task], **describe_exception(exc)})
            failed = True
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    log.info("stopped", extra={"mode": mode})
    return 1 if failed or pending else 0


async def _serve_http(server: Any) -> None:
    try:
        await server.serve()
    except SystemExit as exc:  # uvicorn exits the process when it cannot bind or start up
        raise RuntimeError(f"the HTTP server could not start (exit {exc.code})") from None
    if not server.started and not server.should_exit:
        raise RuntimeError("the HTTP server could not start")
