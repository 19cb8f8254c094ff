"""kyrie-engine: a Postgres-native job runner and AI engine for KyrieOS.

What an embedding program needs: put jobs in the queue, and run a worker with
handlers of its own.

    import asyncpg, kyrie_engine

    async def resize(job: kyrie_engine.JobContext) -> dict:
        await job.progress("resizing", 50)
        return {"done": job.payload["image"]}

    async def main(dsn: str) -> None:
        pool = await asyncpg.create_pool(dsn)
        await kyrie_engine.enqueue(pool, "images.resize", {"image": "a.png"})
        await kyrie_engine.Worker(dsn, {"images.resize": resize}).run_until_drained()
"""

from kyrie_engine.queue import (
    KIND_RULE,
    STATUSES,
    Enqueued,
    Job,
    Status,
    cancel_job,
    check_kind,
    enqueue,
    enqueue_many,
    get_job,
    list_jobs,
    purge_jobs,
    queue_stats,
    recent_failures,
    retry_job,
    running_jobs,
    set_kind_limit,
)
from kyrie_engine.worker import JobContext, LeaseLost, PermanentFailure, RetryLater, Worker

__version__ = "0.1.0"

__all__ = [
    "KIND_RULE",
    "STATUSES",
    "Enqueued",
    "Job",
    "JobContext",
    "LeaseLost",
    "PermanentFailure",
    "RetryLater",
    "Status",
    "Worker",
    "__version__",
    "cancel_job",
    "check_kind",
    "enqueue",
    "enqueue_many",
    "get_job",
    "list_jobs",
    "purge_jobs",
    "queue_stats",
    "recent_failures",
    "retry_job",
    "running_jobs",
    "set_kind_limit",
]
