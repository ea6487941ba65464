"""HTTP API for one ``Durably`` instance: JSON routes, Server-Sent Events, OpenAPI, dashboard.

``create_app(durably)`` returns a Starlette application that can be served on its
own (``uvicorn``) or mounted under any prefix of a larger ASGI app. Starlette is
imported only in this package, so the core keeps pydantic as its only dependency
(install ``durably-web[server]``).

``app`` holds the routes, streams and auth hooks; ``requests`` the strict request
bodies and the run filter; ``openapi`` the description of the routes; ``security``
the Host, Origin and content-type checks and the response headers that keep
other web pages from driving the API.
"""

from starlette.exceptions import HTTPException

from .app import DurablyAuth, ProgressThrottle, RunOperation, create_app
from .openapi import openapi_document
from .requests import (
    ForkRequest,
    PurgeRequest,
    RunsFilter,
    SignalRequest,
    TriggerBatchItem,
    TriggerBatchRequest,
    TriggerRequest,
)
from .security import LOOPBACK_HOSTS

__all__ = [
    "LOOPBACK_HOSTS",
    "DurablyAuth",
    "ForkRequest",
    "HTTPException",
    "ProgressThrottle",
    "PurgeRequest",
    "RunOperation",
    "RunsFilter",
    "SignalRequest",
    "TriggerBatchItem",
    "TriggerBatchRequest",
    "TriggerRequest",
    "create_app",
    "openapi_document",
]
