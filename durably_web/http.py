"""Portable HTTP for job steps: the same call works under CPython and in Pyodide.

``await durably_web.http.get_json(url)`` uses ``pyodide.http.pyfetch`` in the
browser and the standard library (in a thread) under CPython, so job modules
stay portable. Use it inside ``step.run`` so responses are recorded.
"""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from .errors import DurablyError

__all__ = ["HttpError", "get_json", "post_json", "request"]


class HttpError(DurablyError):
    """A non-2xx response or a network failure; ``status`` is None for the latter."""

    def __init__(self, message: str, status: int | None = None, body: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


async def request(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, str]:
    """Send one request; return ``(status, text)``; raise :class:`HttpError` unless 2xx."""
    status, text = await _transport(method.upper(), url, body, dict(headers or {}), timeout)
    if not 200 <= status < 300:
        raise HttpError(f"{method.upper()} {url} returned HTTP {status}", status, text)
    return status, text


async def get_json(url: str, *, headers: Mapping[str, str] | None = None, timeout: float = 30.0) -> Any:
    _, text = await request(
        "GET", url, headers={"Accept": "application/json", **(headers or {})}, timeout=timeout
    )
    return json.loads(text)


async def post_json(
    url: str, payload: Any, *, headers: Mapping[str, str] | None = None, timeout: float = 30.0
) -> Any:
    _, text = await request(
        "POST",
        url,
        body=json.dumps(payload).encode(),
        timeout=timeout,
        headers={"Content-Type": "application/json", "Accept": "application/json", **(headers or {})},
    )
    return json.loads(text) if text.strip() else None


async def _stdlib_transport(
    method: str, url: str, body: bytes | None, headers: dict[str, str], timeout: float
) -> tuple[int, str]:
    def send() -> tuple[int, str]:
        req = urllib.request.Request(url, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError) as exc:
            raise HttpError(f"{method} {url} failed: {exc}") from exc

    return await asyncio.to_thread(send)


async def _pyodide_transport(
    method: str, url: str, body: bytes | None, headers: dict[str, str], timeout: float
) -> tuple[int, str]:
    from pyodide.http import pyfetch  # type: ignore[import-not-found]

    try:
        response = await asyncio.wait_for(pyfetch(url, method=method, headers=headers, body=body), timeout)
        return response.status, await response.string()
    except TimeoutError:
        raise HttpError(f"{method} {url} timed out after {timeout}s") from None
    except OSError as exc:
        raise HttpError(f"{method} {url} failed: {exc}") from exc


_transport = _pyodide_transport if "_pyodide_core" in sys.modules else _stdlib_transport
