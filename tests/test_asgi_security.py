"""Other web pages cannot drive the HTTP API: Host, Origin / Sec-Fetch-Site, JSON-only bodies, headers.

Each finding of the cross-site probe (issue 9) is replayed as the attacker sent it:
the requests a browser would send for a page on another origin (a ``text/plain``
"simple" fetch, a form post, ``<img>``/``<script src>``, an EventSource, a
DNS-rebound name), against the real app on a real SQLite file.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from asgi_helpers import JSON_HEADERS, api_client, next_event, running_server, sse_events
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Mount

from durably_web import Durably, StepContext, define_job
from durably_web.asgi import LOOPBACK_HOSTS, create_app
from durably_web.errors import ValidationError

EVIL = "http://evil.example"


@define_job("sec-echo")
async def echo_job(step: StepContext, payload: Any) -> Any:
    return payload


@pytest.fixture
async def idle(make_durably: Any) -> Durably:
    return await make_durably(echo_job, worker=False)


async def _finished_run(durably: Durably) -> str:
    run = await durably.trigger("sec-echo", {"n": 1})
    await durably.cancel(run.id)
    return run.id


def _bare_client(app: Any, base_url: str = "http://localhost") -> httpx.AsyncClient:
    """A client that sends only what each test gives it (no JSON content type by default)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)


# --- finding 1: any page could drive the no-auth server ------------------------------------------


async def test_a_text_plain_purge_from_another_origin_is_refused_and_purges_nothing(idle: Durably) -> None:
    run_id = await _finished_run(idle)
    async with _bare_client(create_app(idle)) as client:
        # exactly the probe: fetch(url, {method: "POST", mode: "no-cors", body: '{"older_than": 0}'})
        response = await client.post(
            "/purge",
            content=b'{"older_than": 0}',
            headers={
                "Content-Type": "text/plain;charset=UTF-8",
                "Origin": EVIL,
                "Sec-Fetch-Site": "cross-site",
            },
        )
        assert response.status_code == 403, response.text
        assert response.json()["error"] == "Forbidden" and "allowed_origins" in response.json()["message"]
        # an older browser that sends neither Origin nor Sec-Fetch-*: the content type stops it
        old_browser = await client.post(
            "/purge", content=b'{"older_than": 0}', headers={"Content-Type": "text/plain"}
        )
        assert old_browser.status_code == 415, old_browser.text
        assert "application/json" in old_browser.json()["message"]
        # the same request as JSON from the other origin: still refused (the Origin decides)
        as_json = await client.post("/purge", json={"older_than": 0}, headers={"Origin": EVIL})
        assert as_json.status_code == 403
    assert [run.id for run in await idle.get_runs()] == [run_id]


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=latin-1",
        "application/jsonp",
        "text/json",
    ],
)
async def test_post_needs_a_json_content_type_even_without_a_body(
    idle: Durably, content_type: str | None
) -> None:
    run = await idle.trigger("sec-echo", {"n": 1})
    headers = {} if content_type is None else {"Content-Type": content_type}
    async with _bare_client(create_app(idle)) as client:
        for path, body in [
            ("/trigger", b'{"job": "sec-echo"}'),
            ("/trigger/batch", b'{"job": "sec-echo", "items": [{"input": 1}]}'),
            (f"/runs/{run.id}/cancel", b""),
            (f"/runs/{run.id}/retrigger", b""),
            ("/purge", b'{"older_than": 0}'),
        ]:
            response = await client.post(path, content=body, headers=headers)
            assert response.status_code == 415, (path, response.text)
            assert response.json()["error"] == "UnsupportedMediaType"
        # a DELETE with a body is held to the same rule (a DELETE needs no body)
        refused = await client.request("DELETE", f"/runs/{run.id}", content=b"x", headers=headers)
        assert refused.status_code == 415
    assert [(r.id, r.status) for r in await idle.get_runs()] == [(run.id, "pending")]


async def test_json_content_types_that_are_accepted(idle: Durably) -> None:
    run = await idle.trigger("sec-echo", {"n": 1})
    async with _bare_client(create_app(idle)) as client:
        for content_type in (
            "application/json",
            "Application/JSON; charset=UTF-8",
            'application/json;charset="utf-8"',
        ):
            response = await client.post(
                "/trigger", content=b'{"job": "sec-echo"}', headers={"Content-Type": content_type}
            )
            assert response.status_code == 201, (content_type, response.text)
        cancelled = await client.post(f"/runs/{run.id}/cancel", headers=JSON_HEADERS)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        # DELETE without a body needs no content type (a cross-origin DELETE is preflighted anyway)
        assert (await client.delete(f"/runs/{run.id}")).status_code == 200


@pytest.mark.parametrize("path", ["/runs", "/health", "/jobs", "/openapi.json", "/events", "/dashboard/"])
async def test_a_host_the_server_was_not_told_about_is_refused(idle: Durably, path: str) -> None:
    # DNS rebinding: evil.example now resolves to 127.0.0.1, so the browser sends its name.
    async with _bare_client(create_app(idle)) as client:
        response = await client.get(path, headers={"Host": "attacker.example"})
    assert response.status_code == 421, response.text
    body = response.json()
    assert body["error"] == "MisdirectedRequest"
    assert "attacker.example" in body["message"] and "allowed_hosts" in body["message"]


async def test_a_rebound_host_cannot_write_either(idle: Durably) -> None:
    run_id = await _finished_run(idle)
    async with api_client(create_app(idle)) as client:
        response = await client.post(
            "/purge",
            json={"older_than": 0},
            headers={"Host": "attacker.example:8000", "Origin": "http://attacker.example:8000"},
        )
        assert response.status_code == 421
    assert [run.id for run in await idle.get_runs()] == [run_id]


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:8000", "127.0.0.1:1", "[::1]:8000", "LOCALHOST.", "[0:0:0:0:0:0:0:1]"]
)
async def test_loopback_names_are_served_on_any_port(idle: Durably, host: str) -> None:
    async with api_client(create_app(idle)) as client:
        response = await client.get("/runs", headers={"Host": host})
    assert response.status_code == 200, response.text
    assert set(LOOPBACK_HOSTS) == {"localhost", "127.0.0.1", "[::1]"}


async def test_allowed_hosts_names_ports_and_subdomains(idle: Durably) -> None:
    app = create_app(idle, allowed_hosts=["jobs.example.com", "admin.example.com:8443", "*.internal.example"])
    async with api_client(app) as client:

        async def status(host: str) -> int:
            return (await client.get("/runs", headers={"Host": host})).status_code

        assert await status("jobs.example.com") == 200
        assert await status("JOBS.example.com:9000") == 200  # no port given: any port
        assert await status("admin.example.com:8443") == 200
        assert await status("admin.example.com") == 421  # only that port
        assert await status("a.internal.example") == 200
        assert await status("b.a.internal.example:1") == 200
        assert await status("internal.example") == 421  # subdomains only
        assert await status("evilinternal.example") == 421
        assert await status("jobs.example.com.evil.example") == 421
        assert await status("localhost:8000") == 200  # loopback stays served
        assert await status("bad host!") == 400
    async with api_client(create_app(idle, allowed_hosts=["*"])) as client:
        assert (await client.get("/runs", headers={"Host": "anything.example"})).status_code == 200


async def test_the_ip_address_a_connection_arrived_on_is_served(idle: Durably) -> None:
    # Bound to 0.0.0.0, opened as http://192.168.1.5:8000/: the ASGI server reports
    # the local address as scope["server"]; a rebinding page cannot send an IP as its Host.
    async with _bare_client(create_app(idle), "http://192.168.1.5:8000") as client:
        assert (await client.get("/runs")).status_code == 200
        other = await client.get("/runs", headers={"Host": "192.168.1.6:8000"})
        assert other.status_code == 421
        by_name = await client.get("/runs", headers={"Host": "myhost.lan:8000"})
        assert by_name.status_code == 421


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
@pytest.mark.parametrize(
    "path", ["/runs", "/runs/01ANY", "/runs/01ANY/events", "/jobs", "/events", "/openapi.json", "/health"]
)
async def test_cross_site_subresource_gets_are_refused(idle: Durably, site: str, path: str) -> None:
    # <script src=".../runs"> or <img>: no Origin, only Sec-Fetch-Site
    async with _bare_client(create_app(idle)) as client:
        response = await client.get(
            path, headers={"Sec-Fetch-Site": site, "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "script"}
        )
    assert response.status_code == 403, response.text
    assert site in response.json()["message"]


async def test_event_streams_are_refused_cross_origin(idle: Durably) -> None:
    run = await idle.trigger("sec-echo", {"n": 1})
    async with _bare_client(create_app(idle)) as client:
        for path in ("/events", f"/runs/{run.id}/events"):
            # EventSource sends Origin cross-origin; another port of localhost is another origin
            for origin in (EVIL, "http://localhost:3000", "null", "http://localhost.evil.example"):
                response = await client.get(path, headers={"Origin": origin, "Accept": "text/event-stream"})
                assert response.status_code == 403, (path, origin, response.text)


async def test_origin_null_and_other_schemes_and_ports_are_other_origins(idle: Durably) -> None:
    async with api_client(create_app(idle)) as client:
        for origin in ("null", "https://localhost", "http://localhost:8080", "http://127.0.0.1", "garbage"):
            response = await client.post("/trigger", json={"job": "sec-echo"}, headers={"Origin": origin})
            assert response.status_code == 403, origin
    assert await idle.get_runs() == []


# --- finding 2: CSRF under cookie auth --------------------------------------------------------------


class CookieAuth:
    """Who the session cookie says (the dashboard sends no headers, so cookies are what it has)."""

    def authenticate(self, request: Any) -> str:
        user = request.cookies.get("session")
        if user is None:
            raise HTTPException(401, "log in first")
        return str(user)

    def can_purge(self, ctx: str) -> bool:
        return ctx == "admin"


async def test_cross_site_form_posts_with_the_users_cookie_are_refused(idle: Durably) -> None:
    run_id = await _finished_run(idle)
    app = create_app(idle, auth=CookieAuth())
    async with _bare_client(app) as client:
        client.cookies.set("session", "admin")
        form = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Origin": EVIL,
            "Sec-Fetch-Site": "cross-site",
            "Sec-Fetch-Mode": "navigate",
        }
        triggered = await client.post("/trigger", content=b"job=sec-echo", headers=form)
        purged = await client.post("/purge", content=b"older_than=0", headers=form)
        text_plain = {**form, "Content-Type": "text/plain"}
        as_text = await client.post("/trigger", content=b'{"job": "sec-echo"}', headers=text_plain)
        assert (triggered.status_code, purged.status_code, as_text.status_code) == (403, 403, 403)
        # the dashboard itself, same origin with the same cookie: works
        same = {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin", **JSON_HEADERS}
        ok = await client.post("/trigger", json={"job": "sec-echo"}, headers=same)
        assert ok.status_code == 201, ok.text
    assert {run.id for run in await idle.get_runs()} == {run_id, ok.json()["id"]}


# --- the dashboard and well-behaved clients keep working -----------------------------------------------


async def test_same_origin_dashboard_requests_work(idle: Durably) -> None:
    outer = Starlette(routes=[Mount("/api/durably", app=create_app(idle))])
    async with _bare_client(outer) as client:
        page = await client.get(
            "/api/durably/dashboard/", headers={"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"}
        )
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        script = await client.get(
            "/api/durably/dashboard/remote.js", headers={"Sec-Fetch-Site": "same-origin"}
        )
        assert script.status_code == 200
        listed = await client.get("/api/durably/runs", headers={"Sec-Fetch-Site": "same-origin"})
        assert listed.status_code == 200
        post = {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin", **JSON_HEADERS}
        created = await client.post("/api/durably/trigger", json={"job": "sec-echo"}, headers=post)
        assert created.status_code == 201
        run_id = created.json()["id"]
        assert (
            await client.post(f"/api/durably/runs/{run_id}/cancel", json={}, headers=post)
        ).status_code == 200
        assert (await client.delete(f"/api/durably/runs/{run_id}", headers=post)).status_code == 200
        # a non-browser client (curl, the CLI) sends neither Origin nor Sec-Fetch-*
        assert (await client.get("/api/durably/runs")).status_code == 200


async def test_another_site_may_link_to_the_dashboard_and_load_the_static_files_only(idle: Durably) -> None:
    outer = Starlette(routes=[Mount("/api/durably", app=create_app(idle))])
    navigate = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    script = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "script"}
    async with _bare_client(outer) as client:
        assert (await client.get("/api/durably/dashboard/", headers=navigate)).status_code == 200
        redirect = await client.get("/api/durably/dashboard", headers=navigate)
        assert redirect.status_code == 307
        for path in ("/api/durably/static/remote.js", "/api/durably/dashboard/dashboard.js"):
            loaded = await client.get(path, headers=script)
            assert loaded.status_code == 200 and "javascript" in loaded.headers["content-type"], path
        # in a frame the page is answered, but the browser may not render it
        framed = await client.get("/api/durably/dashboard/", headers={**navigate, "Sec-Fetch-Dest": "iframe"})
        assert framed.headers["x-frame-options"] == "DENY"
        assert framed.headers["content-security-policy"] == "frame-ancestors 'none'"
        # not the data, whichever way it is asked for
        assert (await client.get("/api/durably/runs", headers=navigate)).status_code == 403
        assert (await client.get("/api/durably/runs", headers=script)).status_code == 403
        # the public files are public to GET only, and not to a cross-origin fetch
        assert (
            await client.get("/api/durably/static/remote.js", headers={"Origin": EVIL})
        ).status_code == 403
        posted = await client.post("/api/durably/dashboard/", json={}, headers=script)
        assert posted.status_code == 403


# --- allowed origins: CORS ---------------------------------------------------------------------------


APP_ORIGIN = "https://app.example.com"


async def test_an_allowed_origin_gets_a_working_preflight_and_cors_headers(idle: Durably) -> None:
    app = create_app(idle, allowed_origins=[APP_ORIGIN, "http://localhost:3000"])
    async with _bare_client(app) as client:
        preflight = await client.options(
            "/trigger",
            headers={
                "Origin": APP_ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, authorization, x-token",
            },
        )
        assert preflight.status_code == 204, preflight.text
        headers = preflight.headers
        assert headers["access-control-allow-origin"] == APP_ORIGIN
        assert headers["access-control-allow-credentials"] == "true"
        assert {"POST", "DELETE", "GET"} <= {
            m.strip() for m in headers["access-control-allow-methods"].split(",")
        }
        allowed = {h.strip() for h in headers["access-control-allow-headers"].split(",")}
        assert {"content-type", "authorization", "x-token"} <= allowed
        assert int(headers["access-control-max-age"]) > 0
        assert "Origin" in headers["vary"]

        created = await client.post("/trigger", json={"job": "sec-echo"}, headers={"Origin": APP_ORIGIN})
        assert created.status_code == 201
        assert created.headers["access-control-allow-origin"] == APP_ORIGIN
        assert created.headers["access-control-allow-credentials"] == "true"
        assert "Origin" in created.headers["vary"]
        dev = await client.get(
            "/runs", headers={"Origin": "http://localhost:3000", "Sec-Fetch-Site": "same-site"}
        )
        assert (
            dev.status_code == 200 and dev.headers["access-control-allow-origin"] == "http://localhost:3000"
        )
        # errors reach the allowed page too (it must be able to read why)
        missing = await client.get("/runs/01NOPE", headers={"Origin": APP_ORIGIN})
        assert missing.status_code == 404 and missing.headers["access-control-allow-origin"] == APP_ORIGIN

        assert "access-control-allow-private-network" not in headers
        # Chromium's Private Network Access preflight (a public page calling a local server)
        private = await client.options(
            "/runs",
            headers={
                "Origin": APP_ORIGIN,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Private-Network": "true",
            },
        )
        assert private.status_code == 204
        assert private.headers["access-control-allow-private-network"] == "true"

        # other origins: no preflight, no CORS headers
        refused = await client.options(
            "/trigger", headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"}
        )
        assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
        # a same-origin response names no origin
        same = await client.get("/runs", headers={"Origin": "http://localhost"})
        assert same.status_code == 200 and "access-control-allow-origin" not in same.headers


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (["*"], "list each origin"),
        (["null"], "list each origin"),
        (["https://app.example.com/path"], "no path"),
        (["app.example.com"], "scheme://host"),
        (["https://user@app.example.com"], "scheme://host"),
        (["https://app.example.com?x=1"], "scheme://host"),
        ("https://app.example.com", "list of strings"),
        ([42], "not a string"),
    ],
)
def test_allowed_origins_are_validated(db_url: str, value: Any, fragment: str) -> None:
    with pytest.raises(ValidationError, match=r"allowed_origins|origin") as caught:
        create_app(Durably(db_url), allowed_origins=value)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (["https://jobs.example.com"], "not URLs"),
        (["jobs.example.com/api"], "not URLs"),
        (["bad host"], "not a host name"),
        (["jobs.example.com:99999"], "not a host name"),
        ("jobs.example.com", "list of strings"),
        ([None], "not a string"),
    ],
)
def test_allowed_hosts_are_validated(db_url: str, value: Any, fragment: str) -> None:
    with pytest.raises(ValidationError) as caught:
        create_app(Durably(db_url), allowed_hosts=value)
    assert fragment in str(caught.value)


def test_an_allowed_origin_with_a_trailing_slash_or_default_port_is_the_origin(db_url: str) -> None:
    from durably_web.asgi.security import parse_allowed_origins

    assert parse_allowed_origins(
        ["https://App.Example.com/", "https://app.example.com:443", "http://[::1]:80"]
    ) == {"https://app.example.com", "http://[::1]"}


# --- finding 3: headers ---------------------------------------------------------------------------------


async def test_security_headers_on_every_response_and_no_store_on_json(idle: Durably) -> None:
    async with api_client(create_app(idle)) as client:
        for path in ("/runs", "/health", "/openapi.json", "/dashboard/", "/dashboard/dashboard.js", "/nope"):
            response = await client.get(path)
            assert response.headers["x-content-type-options"] == "nosniff", path
            assert response.headers["content-security-policy"] == "frame-ancestors 'none'", path
            assert response.headers["x-frame-options"] == "DENY", path
            if response.headers["content-type"].startswith("application/json"):
                assert response.headers["cache-control"] == "no-store", path
            else:
                assert "no-store" not in response.headers.get("cache-control", ""), path
        # refusals carry them as well
        refused = await client.get("/runs", headers={"Host": "attacker.example"})
        assert refused.headers["x-frame-options"] == "DENY" and refused.headers["cache-control"] == "no-store"


# --- a real server --------------------------------------------------------------------------------------


async def test_on_a_real_server_streams_and_rebinding(idle: Durably) -> None:
    app = create_app(idle, allowed_origins=[APP_ORIGIN], sse_throttle=0)
    async with running_server(app) as base, httpx.AsyncClient(timeout=20, headers=JSON_HEADERS) as http:
        run_id = await _finished_run(idle)
        # uvicorn on 127.0.0.1: served under its own address, not under a rebound name
        assert (await http.get(f"{base}/runs")).status_code == 200
        rebound = await http.get(f"{base}/runs", headers={"Host": "attacker.example"})
        assert rebound.status_code == 421
        purge = await http.post(
            f"{base}/purge",
            content=b'{"older_than": 0}',
            headers={"Content-Type": "text/plain", "Origin": EVIL},
        )
        assert purge.status_code == 403
        assert [run.id for run in await idle.get_runs()] == [run_id]
        # an EventSource from another origin is refused; from the allowed origin it streams with CORS
        refused = await http.get(f"{base}/events", headers={"Origin": "http://localhost:3000"})
        assert refused.status_code == 403
        async with http.stream("GET", f"{base}/events", headers={"Origin": APP_ORIGIN}) as stream:
            assert stream.status_code == 200
            assert stream.headers["access-control-allow-origin"] == APP_ORIGIN
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert "no-store" in stream.headers["cache-control"]
            assert stream.headers["x-content-type-options"] == "nosniff"
            events = sse_events(stream, comments=True)
            assert (await next_event(events)).event == ":"  # ready
            await idle.trigger("sec-echo", {"n": 2})
            assert (await next_event(events)).event == "run:trigger"
        async with http.stream("GET", f"{base}/runs/{run_id}/events", headers={"Origin": APP_ORIGIN}) as one:
            assert one.status_code == 200 and one.headers["access-control-allow-origin"] == APP_ORIGIN
            first = await next_event(sse_events(one))
            assert first.event == "run:snapshot"
    await asyncio.sleep(0)


async def test_openapi_names_the_refusals(idle: Durably) -> None:
    async with api_client(create_app(idle)) as client:
        paths = (await client.get("/openapi.json")).json()["paths"]
    for item in paths.values():
        for method, operation in item.items():
            assert {"403", "421"} <= set(operation["responses"]), method
            assert ("415" in operation["responses"]) == (method == "post")
    assert (
        "rejected by an auth hook, or a cross-origin"
        in paths["/purge"]["post"]["responses"]["403"]["description"]
    )
