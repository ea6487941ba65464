"""PostgreSQL storage: ``postgresql://`` and ``postgres://`` URLs, over psycopg 3 (async).

The store (and with it psycopg) is imported on first use of its names, so that
``open_store`` can check a URL's options, and say how to install the driver, without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .options import PostgresOptions, parse_url

if TYPE_CHECKING:
    from .store import SCHEMA_VERSION, PostgresStore, channel_name

__all__ = ["SCHEMA_VERSION", "PostgresOptions", "PostgresStore", "channel_name", "parse_url"]

_FROM_STORE = {"SCHEMA_VERSION", "PostgresStore", "channel_name"}


def __getattr__(name: str) -> Any:
    if name in _FROM_STORE:
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
