"""Whether the network is there, as the worker asks it: the port behind network-aware steps.

The engine never looks at a browser. It is given a :class:`NetworkStatus`; the browser
runtime's (``durably_web.browser.BrowserNetworkStatus``) answers from ``navigator.onLine``
and knows what a failed fetch looks like in Pyodide. Everywhere else the default,
:data:`ALWAYS_ONLINE`, makes ``step.run(..., needs_network=True)`` a no-op and lets a
step's network errors follow its retry policy as any other error does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class NetworkStatus(Protocol):
    """What the worker needs to know about the network.

    A step that declares ``needs_network=True`` is not attempted while :meth:`online` is
    false, and a step that fails while offline with an error :meth:`is_network_error`
    accepts does not use up a retry: in both cases the run waits (reason ``"offline"``)
    and is checked again when :meth:`watch`'s callback says the network is back, or at
    the latest after the ``offline_recheck_interval``.
    """

    def online(self) -> bool:
        """Whether the network is believed reachable now (cheap: asked around every step)."""

    def is_network_error(self, exc: BaseException) -> bool:
        """Whether ``exc``, raised by a step, means the request never reached its server."""

    def watch(self, on_online: Callable[[], None]) -> Callable[[], None]:
        """Call ``on_online()`` on the worker's event loop whenever the network comes back;
        return a function that stops it (the worker calls it in ``stop()``)."""


class AlwaysOnline:
    """The network status outside the browser: always online, so nothing ever waits for it."""

    def online(self) -> bool:
        return True

    def is_network_error(self, exc: BaseException) -> bool:
        return False

    def watch(self, on_online: Callable[[], None]) -> Callable[[], None]:
        return _no_op


#: The default :class:`NetworkStatus` of ``Durably`` (CPython, servers, tests).
ALWAYS_ONLINE: NetworkStatus = AlwaysOnline()


def _no_op() -> None:
    return None
