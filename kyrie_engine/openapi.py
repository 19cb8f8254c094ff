"""The OpenAPI 3.1 document of the HTTP API.

The operations are written out by hand (they are few, and their prose is for
the Next.js developer reading them); every body's schema is generated from the
pydantic models in kyrie_engine.schemas, the same ones that validate requests.
The fuzz test walks this document, so a route or an error left out of it fails
there.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from kyrie_engine import __version__
from kyrie_engine.schemas import (
    AnalyzeRequest,
    ErrorBody,
    Health,
    JobAccepted,
    JobView,
    NotReady,
    Readiness,
    ValidationErrorBody,
)

_MODELS: tuple[type[BaseModel], ...] = (
    AnalyzeRequest, JobAccepted, JobView, ErrorBody, ValidationErrorBody, Health, Readiness, NotReady,
)
_REF = "#/components/schemas/{model}"

SECRET_HEADER = "X-Internal-Secret"  # noqa: S105 (a header name)
# The user a job route acts for, set by the Next.js route handler from its session.
USER_HEADER = "X-Kyrie-User-Id"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _error(description: str) -> dict[str, Any]:
    return _json(ErrorBody, description)


_COMMON_ERRORS = {
    "500": _error("A bug; the body carries only a request id to quote."),
    "503": _error("The database cannot be reached; retry shortly (see Retry-After)."),
}
_AUTH_ERRORS = {"401": _error(f"{SECRET_HEADER} missing or wrong.")}

_JOB_ID = {
    "name": "job_id", "in": "path", "required": True,
    "schema": {"type": "string", "format": "uuid"},
    "description": "A job id; anything that is not a uuid is an unknown job (404).",
}
_USER_ID = {
    "name": USER_HEADER, "in": "header", "required": True,
    "schema": {"type": "string", "format": "uuid"},
    "description": "The user this request acts for, exactly once. The job must belong to a workspace "
    "this user is a member of (or be this user's own job without a workspace); otherwise the answer is "
    "404, as for an unknown job. A header rather than a query parameter: a job id spliced into a URL "
    "cannot rewrite it.",
}


def _job_operation(summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": summary,
        "security": [{"internalSecret": []}],
        "parameters": [_JOB_ID, _USER_ID],
        "responses": {
            **responses,
            "400": _error(f"{USER_HEADER} missing or repeated, or a query string (these routes take none)."),
            **_AUTH_ERRORS,
            "404": _error(f"No such job (or not visible to {USER_HEADER})."),
            "422": _json(ValidationErrorBody, f"{USER_HEADER} is not a uuid."),
            **_COMMON_ERRORS,
        },
    }


def document(max_body_bytes: int) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in _MODELS:
        schema = model.model_json_schema(ref_template=_REF, mode="serialization")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas["AnalyzeRequest"] = AnalyzeRequest.model_json_schema(ref_template=_REF, mode="validation")

    paths: dict[str, Any] = {
        "/ai/cfo/analyze": {
            "post": {
                "summary": "Enqueue a CFO analysis of a workspace for one of its members",
                "description": "The job is enqueued and its id returned at once; follow it with "
                "`GET /ai/jobs/{job_id}`, its `/events` stream, or Supabase Realtime on `jobs`.",
                "security": [{"internalSecret": []}],
                "parameters": [{
                    "name": "Idempotency-Key", "in": "header", "required": False,
                    "schema": {
                        "type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[\\x21-\\x7e]+$",
                    },
                    "description": "A retried request with the same key (for the same workspace) returns "
                    "the same job instead of enqueuing another; the reply then carries "
                    "`Idempotent-Replayed: true`.",
                }, {
                    "name": USER_HEADER, "in": "header", "required": False,
                    "schema": {"type": "string", "format": "uuid"},
                    "description": "Optional here (the body's `user_id` names the user); when sent, "
                    "once, and naming the same user.",
                }],
                "requestBody": {
                    "required": True,
                    "description": f"UTF-8 JSON, at most {max_body_bytes} bytes.",
                    "content": {"application/json": {"schema": _ref(AnalyzeRequest)}},
                },
                "responses": {
                    "202": _json(JobAccepted, "Enqueued (or replayed by Idempotency-Key)."),
                    "400": _error(
                        "The body is not well-formed JSON or names a field twice; a query string; "
                        f"{USER_HEADER} repeated or naming another user than the body."
                    ),
                    **_AUTH_ERRORS,
                    "403": _error("The user is not a member of the workspace."),
                    "404": _error("No such workspace."),
                    "413": _error(f"The body is over {max_body_bytes} bytes."),
                    "415": _error("Content-Type is not application/json."),
                    "422": _json(ValidationErrorBody, "The body or a header does not validate."),
                    **_COMMON_ERRORS,
                },
            }
        },
        "/ai/jobs/{job_id}": {
            "get": _job_operation(
                "A job's status, progress, attempts, result or error, and timestamps",
                {"200": _json(JobView, "The job.")},
            )
        },
        "/ai/jobs/{job_id}/events": {
            "get": _job_operation(
                "Server-Sent Events of the job's changes, ending at a terminal status",
                {
                    "200": {
                        "description": "`text/event-stream`.  Each `event: job` carries the job "
                        "(as `GET /ai/jobs/{job_id}`) in `data`; the first is the current state; the "
                        "stream ends after a terminal status (completed, failed, cancelled); comment "
                        "lines are keep-alives.  A client should close its EventSource when it sees a "
                        "terminal status.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "503": _error("Live events are unavailable (no LISTEN connection configured) "
                                  "or the database cannot be reached."),
                },
            )
        },
        "/ai/jobs/{job_id}/cancel": {
            "post": _job_operation(
                "Cancel a job that has not finished",
                {
                    "200": _json(JobView, "The job after the request: `cancelled` (a running job "
                                 "stops at its next check)."),
                    "409": _error("The job had already finished; nothing was changed."),
                },
            )
        },
        "/healthz": {
            "get": {
                "summary": "The process is alive (no dependency is checked)",
                "responses": {"200": _json(Health, "Alive.")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Ready to serve: the database answers and the listeners are connected",
                "responses": {
                    "200": _json(Readiness, "Ready."),
                    "503": _json(NotReady, "Not ready; `checks` says what is missing."),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text format); open, like the probes",
                "description": "Request counts by route and status, jobs by kind and status, queue "
                "depth and job durations read from the database at scrape time.  Only aggregates: "
                "no ids, no payloads.",
                "responses": {
                    "200": {"description": "Prometheus text format 0.0.4.",
                            "content": {"text/plain": {"schema": {"type": "string"}}}},
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1.",
                                      "content": {"application/json": {"schema": {"type": "object"}}}}},
            }
        },
    }
    for item in paths.values():
        for operation in item.values():
            operation["responses"].setdefault(
                "405", _error("Method not allowed on this path (see the Allow header).")
            )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kyrie-engine",
            "version": __version__,
            "description": "The Intelligence Engine's HTTP API, called by the Next.js app's route "
            "handlers (never by a browser directly).  Every error is JSON "
            '`{"message": ..., "request_id": ...}`; every response carries `X-Request-Id`.',
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "internalSecret": {"type": "apiKey", "in": "header", "name": SECRET_HEADER},
            },
        },
    }
