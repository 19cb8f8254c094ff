"""What can go wrong in an analysis, as the handler needs to tell it apart.

These are raised from inside the CrewAI run (a model's `call`, a tool) and
must reach the handler unchanged.  CrewAI wraps every model call in a
rate-limit retry that recognises throttling by status code, error code, class
name or words such as "rate limit" anywhere in the exception's chain; so
`ModelRateLimited` carries no `status_code` or `code`, its message avoids
those words, and it is raised with no chained cause: the job is rescheduled
by the queue instead of sleeping in a worker thread.
"""

from __future__ import annotations


class ModelRateLimited(Exception):
    """The model provider asked us to come back later (an HTTP 429)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the model provider asked to wait {retry_after:g}s before the next request")
        self.retry_after = retry_after


class ModelUnavailable(Exception):
    """Server errors, timeouts or lost connections outlasted the in-call retries."""


class ModelRefused(Exception):
    """The provider refused the request for a reason no retry fixes (bad key, unknown model)."""


class ReportRejected(Exception):
    """The model's answer failed validation (every time it was asked)."""


class AnalysisStopped(Exception):
    """The job was cancelled or lost while its agent was still running."""
