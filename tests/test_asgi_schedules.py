"""The schedule routes: list, create or replace, delete, pause, resume; auth and hostile pages."""

from __future__ import annotations

from typing import Any

import pytest
from asgi_helpers import api_client

from durably_web import Durably, StepContext, define_job
from durably_web.asgi import create_app

pytestmark = pytest.mark.all_backends

EVIL = "http://evil.example"


@define_job("feed")
async def feed_job(step: StepContext, payload: Any) -> Any:
    return payload


@pytest.fixture
async def durably(make_durably: Any) -> Durably:
    return await make_durably(feed_job, worker=False)


async def test_create_list_pause_resume_and_delete_a_schedule(durably: Durably) -> None:
    async with api_client(create_app(durably)) as client:
        body = {"job": "feed", "cron": "*/15 * * * *", "input": {"url": "x"}, "name": "team/poll-feed"}
        created = await client.post("/schedules", json=body)
        assert created.status_code == 200, created.text
        schedule = created.json()
        assert schedule["name"] == "team/poll-feed" and schedule["input"] == {"url": "x"}
        assert (schedule["timezone"], schedule["catch_up"], schedule["paused"]) == ("UTC", "latest", False)
        listed = (await client.get("/schedules")).json()["schedules"]
        assert [s["name"] for s in listed] == ["team/poll-feed"]
        # A name holding "/" travels as %2F.
        paused = await client.post("/schedules/team%2Fpoll-feed/pause")
        assert paused.status_code == 200 and paused.json()["paused"] is True
        assert (await durably.get_schedule("team/poll-feed")).paused
        resumed = await client.post("/schedules/team%2Fpoll-feed/resume", json={})
        assert resumed.status_code == 200 and resumed.json()["paused"] is False
        deleted = await client.delete("/schedules/team%2Fpoll-feed")
        assert deleted.json() == {"name": "team/poll-feed", "deleted": True}
        assert await durably.list_schedules() == []


async def test_bad_schedules_are_400_and_unknown_names_404(durably: Durably) -> None:
    async with api_client(create_app(durably)) as client:
        bad_cron = await client.post("/schedules", json={"job": "feed", "cron": "99 * * * *"})
        assert bad_cron.status_code == 400 and bad_cron.json()["error"] == "ValidationError"
        bad_zone = await client.post(
            "/schedules", json={"job": "feed", "cron": "0 3 * * *", "timezone": "Atlantis/Capital"}
        )
        assert bad_zone.status_code == 400 and "unknown timezone" in bad_zone.json()["message"]
        extra = await client.post("/schedules", json={"job": "feed", "cron": "0 3 * * *", "every": 1})
        assert extra.status_code == 400
        unknown_job = await client.post("/schedules", json={"job": "nope", "cron": "0 3 * * *"})
        assert unknown_job.status_code == 404
        for response in (
            await client.post("/schedules/missing/pause"),
            await client.post("/schedules/missing/resume"),
            await client.delete("/schedules/missing"),
        ):
            assert response.status_code == 404 and response.json()["error"] == "NotFoundError"
        assert await durably.list_schedules() == []


class OnlyListing:
    def authenticate(self, request: Any) -> str:
        return "tenant-a"

    def can_manage_schedules(self, ctx: str, operation: str) -> bool:
        return operation == "list"


class NoScheduleHook:
    def authenticate(self, request: Any) -> str:
        return "tenant-a"


async def test_with_auth_schedules_need_can_manage_schedules(durably: Durably) -> None:
    await durably.schedule(feed_job, "0 3 * * *", name="nightly")
    async with api_client(create_app(durably, auth=NoScheduleHook())) as client:
        assert (await client.get("/schedules")).status_code == 403
        assert (await client.post("/schedules/nightly/pause")).status_code == 403
    async with api_client(create_app(durably, auth=OnlyListing())) as client:
        assert [s["name"] for s in (await client.get("/schedules")).json()["schedules"]] == ["nightly"]
        refused = [
            await client.post("/schedules", json={"job": "feed", "cron": "* * * * *", "name": "x"}),
            await client.post("/schedules/nightly/pause"),
            await client.post("/schedules/nightly/resume"),
            await client.delete("/schedules/nightly"),
        ]
        assert [r.status_code for r in refused] == [403, 403, 403, 403]
    [kept] = await durably.list_schedules()
    assert kept.name == "nightly" and not kept.paused


async def test_a_hostile_page_cannot_create_pause_or_delete_schedules(durably: Durably) -> None:
    await durably.schedule(feed_job, "0 3 * * *", name="nightly")
    async with api_client(create_app(durably)) as client:
        cross = {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"}
        body = {"job": "feed", "cron": "* * * * *", "name": "evil"}
        assert (await client.post("/schedules", json=body, headers=cross)).status_code == 403
        assert (await client.post("/schedules/nightly/pause", headers=cross)).status_code == 403
        assert (await client.delete("/schedules/nightly", headers=cross)).status_code == 403
        # A form post (no JSON content type) from an older browser sending no Origin.
        form = await client.post(
            "/schedules", content=b"job=feed", headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        assert form.status_code == 415
    [kept] = await durably.list_schedules()
    assert kept.name == "nightly" and not kept.paused
