"""The worker, as small units (see `core` for how they fit together).

`from kyrie_engine.worker import Worker, JobContext, RetryLater,
PermanentFailure, LeaseLost` keeps working; handlers should import the last
four from `kyrie_engine.context`, which does not load the worker.
"""

from kyrie_engine.context import JobContext, LeaseLost, PermanentFailure, RetryLater
from kyrie_engine.outages import TRANSIENT_ERRORS
from kyrie_engine.worker.core import Worker
from kyrie_engine.worker.executor import Handler
from kyrie_engine.worker.outcomes import Completed, Deferred, Failed, Forgotten, Outcome, Released

__all__ = [
    "TRANSIENT_ERRORS",
    "Completed",
    "Deferred",
    "Failed",
    "Forgotten",
    "Handler",
    "JobContext",
    "LeaseLost",
    "Outcome",
    "PermanentFailure",
    "Released",
    "RetryLater",
    "Worker",
]
