"""DevTools' offline emulation, for the page *and* its dedicated worker (where the runs execute).

Measured on Debian's Chromium 156 with a page that fetches from a dedicated worker:

* ``Network.emulateNetworkConditions {offline: true}`` sent to the page (what chromedriver's
  ``execute_cdp_cmd`` reaches) makes ``navigator.onLine`` false in the page and in its
  workers, and fires ``offline``/``online`` at the page's window, but not in the worker;
  and the worker's own fetches still go out;
* the worker's fetches fail ("TypeError: Failed to fetch") only once the Network domain is
  also enabled in a DevTools session attached to the worker target itself (sending
  ``emulateNetworkConditions`` there answers "Not supported": the page's conditions apply).
  ``Target.setAutoAttach`` through chromedriver does not do it, and chromedriver's
  ``execute_cdp_cmd`` cannot address another target's session.

So :class:`OfflineEmulation` opens its own connection to the browser's DevTools endpoint
(chromedriver's ``debuggerAddress``), attaches to the worker targets with flat sessions and
enables Network in each, and switches the page's conditions through chromedriver.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import websocket  # websocket-client, a dependency of selenium

_CONDITIONS = {"latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}


class OfflineEmulation:
    """Attach to the page's dedicated workers now (start the page first); ``set_offline``
    switches; ``close`` goes back online and disconnects."""

    def __init__(self, drv: Any, worker_url_suffix: str = "/worker.js") -> None:
        self._drv = drv
        address = drv.capabilities["goog:chromeOptions"]["debuggerAddress"]
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with no_proxy.open(f"http://{address}/json/version", timeout=10) as reply:
            browser_url = json.loads(reply.read())["webSocketDebuggerUrl"]
        self._ws = websocket.create_connection(browser_url, timeout=30, suppress_origin=True)
        self._next_id = 0
        targets = self._send("Target.getTargets")["targetInfos"]
        workers = [t for t in targets if t["type"] == "worker" and t["url"].endswith(worker_url_suffix)]
        assert workers, f"no dedicated worker {worker_url_suffix} among {[t['url'] for t in targets]}"
        for target in workers:
            session = self._send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
            self._send("Network.enable", {}, session=session["sessionId"])
        drv.execute_cdp_cmd("Network.enable", {})

    def _send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self._ws.send(json.dumps(message))
        while True:  # events of the attached sessions come in between; they are not needed
            reply = json.loads(self._ws.recv())
            if reply.get("id") == self._next_id:
                assert "error" not in reply, reply
                return reply["result"]

    def set_offline(self, offline: bool) -> None:
        self._drv.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": offline, **_CONDITIONS})

    def close(self) -> None:
        try:
            self.set_offline(False)
        finally:
            self._ws.close()
