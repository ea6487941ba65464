"""PostgreSQL URLs: our options out of the query string, the rest left for libpq.

``postgresql://user:pass@host:port/db?pool_size=20&statement_timeout=5000&schema=app&sslmode=require``

Ours (removed before the URL reaches libpq):

* ``pool_size``: the most connections the store's pool opens (default 10, at least 1);
* ``pool_timeout``: seconds a call waits for a pool connection before it fails with
  ``StorageError`` (default 10; while the server is down every call waits this long);
* ``statement_timeout``: milliseconds, set on every connection (``0``: none; default: the
  server's setting);
* ``schema``: where every table lives (default ``public``; created by ``migrate()``).

Everything else (``sslmode``, ``connect_timeout``, ``application_name``, …) passes through.
This module needs no driver: ``open_store`` validates a URL before importing psycopg.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ...errors import ValidationError

SCHEMES = ("postgresql", "postgres")
_OURS = {"pool_size", "pool_timeout", "statement_timeout", "schema"}
# Unquoted-identifier characters only: the name is also part of the NOTIFY channel and of
# lock names, and an odd one (spaces, quotes, mixed case surprises) is a typo far more
# often than a wish. PostgreSQL truncates identifiers at 63 bytes.
_SCHEMA = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


@dataclass(frozen=True, slots=True)
class PostgresOptions:
    conninfo: str  # the URL libpq gets: ours removed, everything else as given
    display: str  # the URL with any password masked, for messages
    schema: str = "public"
    pool_size: int = 10
    pool_timeout: float = 10.0
    statement_timeout: int | None = None


def parse_url(url: str) -> PostgresOptions:
    """Split a ``postgresql://`` / ``postgres://`` URL; bad values raise ``ValidationError``."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError as exc:
        raise ValidationError(f"invalid PostgreSQL URL {mask_password(url)!r}: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise ValidationError(f"not a PostgreSQL URL: {mask_password(url)!r}")
    display = mask_password(url)
    ours: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in _OURS:
            ours[key] = value  # the last one wins, as in libpq
        else:
            rest.append((key, value))
    conninfo = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), parts.fragment))

    schema = ours.get("schema", "public")
    if not _SCHEMA.fullmatch(schema):
        raise ValidationError(
            f"schema must be a plain identifier (letters, digits and _, not starting with a digit, "
            f"at most 63 characters), not {schema!r}, in {display!r}"
        )
    size = _int_option(ours, "pool_size", None, minimum=1, display=display)
    pool_size = 10 if size is None else size
    timeout_ms = _int_option(ours, "statement_timeout", None, minimum=0, display=display)
    pool_timeout = 10.0
    if "pool_timeout" in ours:
        try:
            pool_timeout = float(ours["pool_timeout"])
        except ValueError:
            pool_timeout = -1.0
        if not 0 < pool_timeout < 86_400:
            raise ValidationError(
                f"pool_timeout must be seconds (a number above 0), "
                f"not {ours['pool_timeout']!r}, in {display!r}"
            )
    return PostgresOptions(
        conninfo=conninfo,
        display=display,
        schema=schema,
        pool_size=pool_size,
        pool_timeout=pool_timeout,
        statement_timeout=timeout_ms,
    )


def _int_option(
    ours: dict[str, str], name: str, default: int | None, *, minimum: int, display: str
) -> int | None:
    if name not in ours:
        return default
    text = ours[name]
    if not re.fullmatch(r"[0-9]{1,10}", text) or int(text) < minimum or int(text) > 2**31 - 1:
        unit = "milliseconds" if name == "statement_timeout" else "a count"
        raise ValidationError(
            f"{name} must be a whole number ({unit}) of at least {minimum}, not {text!r}, in {display!r}"
        )
    return int(text)


def mask_password(url: str) -> str:
    """``url`` with the password of its user info replaced by ``***`` (never echo a secret)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    masked = f"{userinfo}{at}{host}{slash}{tail}"
    # A password may also be given as a query parameter.
    masked = re.sub(r"([?&]password=)[^&]*", r"\1***", masked)
    return f"{scheme}{sep}{masked}"
