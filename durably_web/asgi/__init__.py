"""HTTP API for one ``Durably`` instance: JSON routes, Server-Sent Events, OpenAPI, dashboard.

``create_app(durably)`` returns a Starlette application that can be served on its
own (``uvicorn``) or mounted under any prefix of a larger ASGI app. Starlette is
imported only in this package, so the core keeps pydantic as its only dependency
(install ``durably-web[server]``).

``app`` holds the routes, streams and auth hooks; ``requests`` the strict request
bodies and the run filter; ``openapi`` the description of the routes.
"""

from starlette.exceptions import HTTPException

from .app import DurablyAuth, ProgressThrottle, RunOperation, create_app
from .openapi import openapi_document
from .requests import PurgeRequest, RunsFilter, TriggerBatchItem, TriggerBatchRequest, TriggerRequest

__all__ = [
    "DurablyAuth",
    "HTTPException",
    "ProgressThrottle",
    "PurgeRequest",
    "RunOperation",
    "RunsFilter",
    "TriggerBatchItem",
    "TriggerBatchRequest",
    "TriggerRequest",
    "create_app",
    "openapi_document",
]
