"""A worker PROCESS running `cfo.analyze` on a (fake) Groq, for the budget and crash tests.

    python tests/budget_worker.py DSN GROQ_URL [--concurrency N] [--lease S] [--window S] [--rpm N]

The handler is production's (CFOAnalysis, GroqLLM, the real CrewAI agent);
only the model's address, the analysed day and the budget's window are the
test's.  It runs until SIGTERM (or SIGKILL).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging

from kyrie_engine.agents.budget import Limits
from kyrie_engine.agents.cfo import KIND, CFOAnalysis, groq_model
from kyrie_engine.worker import Worker

MODEL = "llama-3.3-70b-versatile"
API_KEY = "gsk_test_0123456789abcdefSECRETkey"
TODAY = dt.date(2026, 5, 15)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("groq_url")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--rpm", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(relativeCreated)7.0f %(name)s %(message)s")
    handler = CFOAnalysis(
        groq_model(API_KEY, MODEL, base_url=args.groq_url, backoff_seconds=0.01, timeout=60.0),
        model_name=MODEL,
        today=lambda: TODAY,
        limits=Limits(rpm=args.rpm, window_seconds=args.window),
    )
    worker = Worker(
        args.dsn,
        {KIND: handler},
        concurrency=args.concurrency,
        lease_seconds=args.lease,
        heartbeat_seconds=args.lease / 6,
        poll_seconds=0.2,
        retry_base_seconds=0.0,
        pool_size=args.concurrency + 2,
        handle_signals=True,
    )
    asyncio.run(worker.run())


if __name__ == "__main__":
    main()
