"""Protection of the HTTP API against other web pages: Host, Origin, content type, headers.

The API may run without any auth (``durably-web serve`` on 127.0.0.1) or with
cookie auth (the dashboard cannot send headers). Either way a page on another
site, opened in the same browser, can send requests to it. ``SecurityMiddleware``
refuses them before any route runs, in this order:

1. **Host** (421). A DNS-rebinding page reaches the server under the attacker's
   own name, so only names the app was told about are answered: the loopback
   names (``LOOPBACK_HOSTS``, always), the entries of ``allowed_hosts`` and an IP
   literal equal to the local address the connection arrived on (typing the
   server's IP address is not something a rebinding page can do). ``"*"``
   accepts any Host, for a proxy that checks it.
2. **Origin** (403). A request whose ``Origin`` is not the request's own
   ``scheme://host[:port]`` (another port is another origin) and not in
   ``allowed_origins`` is refused; ``Origin: null`` (sandboxed frames, some
   redirects) always is. Without ``Origin`` the browser's ``Sec-Fetch-Site``
   decides: ``same-origin`` and ``none`` (typed URL, bookmark) pass,
   ``same-site`` and ``cross-site`` are refused (``<img>``/``<script src>`` and
   form GETs send only that), except GETs of the public files: the dashboard
   page and the static files (``durably.js`` and the rest, the same for every
   user, no run data), so a link to the dashboard and ``<script src=".../static/
   remote.js">`` on another site keep working (framing stays refused).
   No ``Origin`` and no ``Sec-Fetch-Site`` is a non-browser client: it passes.
3. **Content type** (415). ``POST`` always needs ``Content-Type:
   application/json`` (UTF-8), even without a body, and so does any request
   with a body: a cross-site form or a "simple" ``fetch`` cannot send that
   type without a CORS preflight, which only ``allowed_origins`` pass.

Allowed origins are trusted like the page itself: preflights (``OPTIONS``) are
answered, and responses, the event streams included, carry
``Access-Control-Allow-Origin: <origin>`` and ``Access-Control-Allow-Credentials:
true`` (Chromium's Private Network Access preflight, a public page calling a
server on a private network, is answered too). A wildcard origin is refused: it
would hand every site the user's cookies.

Every response gets ``X-Content-Type-Options: nosniff``, ``Content-Security-Policy:
frame-ancestors 'none'`` and ``X-Frame-Options: DENY`` (no framing, so no
clickjacking of the dashboard's buttons); JSON responses also get
``Cache-Control: no-store`` (run data must not linger in shared caches).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ValidationError

#: Host names always answered: a rebinding page cannot make a browser send them.
LOOPBACK_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "[::1]")

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_CORS_METHODS = "GET, HEAD, POST, DELETE"
_CORS_HEADERS = ("accept", "authorization", "content-type", "last-event-id")
_PREFLIGHT_MAX_AGE = "600"
_NAME = r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?"
_HOST_RE = re.compile(rf"^(?P<name>\[[0-9a-f:.]+\]|{_NAME})\.?(?::(?P<port>[0-9]{{1,5}}))?$")
_PATTERN_RE = re.compile(rf"^(?P<name>\[[0-9a-f:.]+\]|(?:\*\.)?{_NAME})\.?(?::(?P<port>[0-9]{{1,5}}))?$")
_ORIGIN_RE = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<host>[^/?#@\s]+)$")
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+$")
_Refusal = tuple[int, bytes]  # status, JSON body
_RawHeaders = list[tuple[bytes, bytes]]
_SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
)


# --- parsing -------------------------------------------------------------------------------------


def _split_host(text: str, pattern: re.Pattern[str]) -> tuple[str, int | None] | None:
    """``("name", port or None)`` of ``host[:port]`` (lower-cased, trailing dot dropped), or ``None``."""
    match = pattern.match(text.strip().lower())
    if match is None:
        return None
    name, port = match.group("name"), match.group("port")
    if name.startswith("["):
        try:
            name = f"[{ipaddress.IPv6Address(name[1:-1]).compressed}]"
        except ValueError:
            return None
    if port is not None and not 0 < int(port) < 65536:
        return None
    return name, None if port is None else int(port)


def _origin_key(text: str) -> str | None:
    """An origin in its canonical form (``scheme://host`` or ``scheme://host:port``), or ``None``."""
    match = _ORIGIN_RE.match(text.strip().lower())
    if match is None:
        return None
    scheme = match.group("scheme")
    host = _split_host(match.group("host"), _HOST_RE)
    if host is None:
        return None
    name, port = host
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{name}"
    return f"{scheme}://{name}:{port}"


def _strings(option: str, value: Any) -> list[str]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValidationError(f"{option} must be a list of strings, not {value!r}")
    items = list(value)
    for item in items:
        if not isinstance(item, str):
            raise ValidationError(f"{option} must be a list of strings; {item!r} is not a string")
    return items


@dataclass(frozen=True)
class _HostPattern:
    name: str  # "example.com", "*.example.com" (subdomains only) or "[::1]"
    port: int | None  # None: any port

    def matches(self, name: str, port: int | None) -> bool:
        if self.port is not None and port != self.port:
            return False
        if self.name.startswith("*."):
            return name.endswith(self.name[1:])
        return name == self.name


def parse_allowed_hosts(value: Any) -> tuple[_HostPattern, ...] | None:
    """``allowed_hosts`` as patterns (loopback names included); ``None`` means any host (``"*"``)."""
    patterns: list[_HostPattern] = []
    for item in _strings("allowed_hosts", value):
        if item.strip() == "*":
            return None
        if "://" in item or "/" in item:
            raise ValidationError(
                f"allowed_hosts entries are host names, optionally with a port ('jobs.example.com', "
                f"'jobs.example.com:8443', '*.example.com', '[::1]'), not URLs: {item!r}"
            )
        parsed = _split_host(item, _PATTERN_RE)
        if parsed is None:
            raise ValidationError(
                f"not a host name: {item!r}; expected 'name', 'name:port', '*.domain' or '[ipv6]'"
            )
        patterns.append(_HostPattern(*parsed))
    patterns += [_HostPattern(name, None) for name in LOOPBACK_HOSTS]
    return tuple(dict.fromkeys(patterns))


def parse_allowed_origins(value: Any) -> frozenset[str]:
    """``allowed_origins`` in canonical form; a clear ``ValidationError`` for anything else."""
    origins = set()
    for item in _strings("allowed_origins", value):
        if item.strip() in ("*", "null"):
            raise ValidationError(
                f"allowed_origins cannot contain {item.strip()!r}: allowed origins receive the user's "
                "credentials, so list each origin ('https://app.example.com')"
            )
        key = _origin_key(item.rstrip("/") if item.count("/") == 3 else item)
        if key is None:
            raise ValidationError(
                f"not an origin: {item!r}; expected scheme://host[:port] with no path, "
                "e.g. 'https://app.example.com' or 'http://localhost:3000'"
            )
        origins.add(key)
    return frozenset(origins)


# --- the middleware --------------------------------------------------------------------------------


def _route_path(scope: Scope) -> str:
    """The path below the app's mount point (as Starlette's router sees it)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :] or "/"
    return path


def _json_error(status: int, kind: str, message: str) -> _Refusal:
    return status, json.dumps({"error": kind, "message": message}).encode()


class SecurityMiddleware:
    """The checks and headers described in this module, around the API's ASGI app.

    ``allowed_hosts`` and ``allowed_origins`` are as ``create_app`` takes them;
    ``public_paths`` (below the mount point; one ending in ``/`` covers what is
    under it) are the dashboard page and the static files, which another site
    may link to or load with ``<script src>`` (GET without ``Origin``).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_hosts: Sequence[str] = (),
        allowed_origins: Sequence[str] = (),
        public_paths: Sequence[str] = (),
    ) -> None:
        self.app = app
        self.hosts = parse_allowed_hosts(allowed_hosts)
        self.origins = parse_allowed_origins(allowed_origins)
        self.public_paths = tuple(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for key, raw in scope.get("headers", ()):
            name = key.decode("latin-1").lower()
            # A repeated header is suspicious; keep the first (as the checks must see one value).
            headers.setdefault(name, raw.decode("latin-1"))
        refusal, host = self._check_host(scope, headers)
        cors_origin: str | None = None
        if refusal is None:
            refusal, cors_origin = self._check_origin(scope, headers, host)
        method = scope.get("method", "GET").upper()
        preflight = method == "OPTIONS" and "access-control-request-method" in headers
        if refusal is None and cors_origin is not None and preflight:
            await self._preflight(cors_origin, headers, send)
            return
        if refusal is None:
            refusal = self._check_content_type(method, headers)
        if refusal is not None:
            status, body = refusal
            await self._send_plain(send, status, body)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extended = self._response_headers(message.get("headers", []), cors_origin)
                message = {**message, "headers": extended}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    # -- checks -------------------------------------------------------------------------------------
    def _check_host(self, scope: Scope, headers: dict[str, str]) -> tuple[_Refusal | None, str | None]:
        """``(refusal or None, the request's host[:port] as seen)``."""
        text = headers.get("host")
        server = scope.get("server")
        if text is None:
            if server is None:
                return None, None  # a Unix socket and an HTTP/1.0 client: no name to judge
            address, port = server[0], server[1]
            text = f"[{address}]:{port}" if ":" in str(address) else f"{address}:{port}"
        parsed = _split_host(text, _HOST_RE)
        if parsed is None:
            return _json_error(400, "BadRequest", f"malformed Host header {text!r}"), None
        name, port = parsed
        shown = name if port is None else f"{name}:{port}"
        if self.hosts is None or any(pattern.matches(name, port) for pattern in self.hosts):
            return None, shown
        if server is not None and _same_ip(name, str(server[0])):
            return None, shown
        message = (
            f"Host {shown!r} is not served here (a DNS-rebinding defence). Pass it in "
            "create_app(..., allowed_hosts=[...]) (durably-web serve --allowed-host), "
            "or allowed_hosts=['*'] behind a proxy that checks the Host itself"
        )
        return _json_error(421, "MisdirectedRequest", message), None

    def _check_origin(
        self, scope: Scope, headers: dict[str, str], host: str | None
    ) -> tuple[_Refusal | None, str | None]:
        """``(refusal or None, the allowed cross-origin Origin to answer with CORS headers)``."""
        origin = headers.get("origin")
        if origin is not None:
            key = _origin_key(origin) if origin.strip().lower() != "null" else None
            if key is not None and host is not None:
                own = _origin_key(f"{scope.get('scheme', 'http')}://{host}")
                if key == own:
                    return None, None
            if key is not None and key in self.origins:
                return None, key
            message = (
                f"cross-origin request from {origin!r} refused; allow a trusted origin with "
                "create_app(..., allowed_origins=[...]) (durably-web serve --allowed-origin)"
            )
            return _json_error(403, "Forbidden", message), None
        site = headers.get("sec-fetch-site")
        if site is None or site in ("same-origin", "none"):
            return None, None
        if scope.get("method") in ("GET", "HEAD") and self._is_public(_route_path(scope)):
            return None, None  # a link to the dashboard, a <script src> of durably.js
        message = f"{site} request refused (Sec-Fetch-Site: {site}); the API answers only its own pages"
        return _json_error(403, "Forbidden", message), None

    def _is_public(self, path: str) -> bool:
        return any(
            path == public or (public.endswith("/") and path.startswith(public))
            for public in self.public_paths
        )

    @staticmethod
    def _check_content_type(method: str, headers: dict[str, str]) -> _Refusal | None:
        length = headers.get("content-length", "0").strip()
        has_body = length not in ("", "0") or "transfer-encoding" in headers
        if method not in _BODY_METHODS and not (method not in _SAFE_METHODS and has_body):
            return None
        media, _, params = headers.get("content-type", "").partition(";")
        charset = ""
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "charset":
                charset = value.strip().strip('"').lower()
        if media.strip().lower() == "application/json" and charset in ("", "utf-8", "utf8"):
            return None
        given = headers.get("content-type")
        message = f"{method} needs Content-Type: application/json (UTF-8), even without a body; " + (
            f"got {given!r}" if given else "none was sent"
        )
        return _json_error(415, "UnsupportedMediaType", message)

    # -- responses -------------------------------------------------------------------------------
    def _response_headers(self, raw: Iterable[tuple[bytes, bytes]], cors_origin: str | None) -> _RawHeaders:
        headers = list(raw)
        present = {key.lower() for key, _ in headers}
        headers += [(key, value) for key, value in _SECURITY_HEADERS if key not in present]
        content_type = next((value for key, value in headers if key.lower() == b"content-type"), b"")
        is_json = content_type.split(b";")[0].strip().lower() == b"application/json"
        if is_json and b"cache-control" not in present:
            headers.append((b"cache-control", b"no-store"))
        if self.origins:
            headers.append((b"vary", b"Origin"))  # the CORS headers depend on it
        if cors_origin is not None:
            headers += [
                (b"access-control-allow-origin", cors_origin.encode("latin-1")),
                (b"access-control-allow-credentials", b"true"),
            ]
        return headers

    async def _preflight(self, origin: str, headers: dict[str, str], send: Send) -> None:
        """``OPTIONS`` from an allowed origin: the methods and headers it may use, for 10 minutes."""
        requested = headers.get("access-control-request-headers", "")
        asked = [part.strip().lower() for part in requested.split(",")]
        # An allowed origin is trusted: it may send its own auth headers (X-Token, …) too.
        allowed = list(dict.fromkeys([*_CORS_HEADERS, *(h for h in asked if _TOKEN_RE.match(h))]))
        response = [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-credentials", b"true"),
            (b"access-control-allow-methods", _CORS_METHODS.encode()),
            (b"access-control-allow-headers", ", ".join(allowed).encode("latin-1")),
            (b"access-control-max-age", _PREFLIGHT_MAX_AGE.encode()),
            (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
            (b"content-length", b"0"),
        ]
        if headers.get("access-control-request-private-network", "").strip().lower() == "true":
            # Chromium's Private Network Access: a public page calling a server on this network.
            response.append((b"access-control-allow-private-network", b"true"))
        await send(
            {"type": "http.response.start", "status": 204, "headers": self._response_headers(response, None)}
        )
        await send({"type": "http.response.body", "body": b""})

    async def _send_plain(self, send: Send, status: int, body: bytes) -> None:
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers = self._response_headers(raw, None)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _same_ip(host_name: str, local_address: str) -> bool:
    """Whether the Host is an IP literal equal to the connection's local address."""
    try:
        wanted = ipaddress.ip_address(host_name.strip("[]"))
        local = ipaddress.ip_address(local_address.strip("[]"))
    except ValueError:
        return False
    if isinstance(local, ipaddress.IPv6Address) and local.ipv4_mapped is not None:
        local = local.ipv4_mapped
    if isinstance(wanted, ipaddress.IPv6Address) and wanted.ipv4_mapped is not None:
        wanted = wanted.ipv4_mapped
    return wanted == local and not wanted.is_unspecified
