"""Child runs over HTTP and on the command line, on a real SQLite file: the parent/child
link and the child wait in runs and lists, ``parent_run_id`` filters, the cancel cascade
and a delete refused while a child is active."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asgi_helpers import api_client
from helpers import wait_until

from durably_web import Durably, StepContext, define_job
from durably_web.asgi import create_app
from durably_web.cli import build_parser, run_command

GATE: dict[str, asyncio.Event] = {}


@define_job("s-child", output=int)
async def child_job(step: StepContext, payload: Any) -> int:
    await step.run("held", lambda: GATE["child"].wait())
    return 7


@define_job("s-parent", output=int)
async def parent_job(step: StepContext, payload: Any) -> int:
    child = await step.start_child("start", child_job, None, labels={"part": "child"})
    return int(await step.wait_for_child("wait", child)) * 6


@pytest.fixture
async def waiting_parent(make_durably: Any) -> AsyncIterator[tuple[Durably, str, str]]:
    """A parent waiting for its child, which is held in its step until the test lets it go."""
    GATE["child"] = asyncio.Event()
    durably = await make_durably(parent_job, child_job)
    run = await durably.trigger(parent_job, labels={"tenant": "t1"})
    await wait_until(lambda: durably.get_runs(status="waiting", job_name="s-parent"))
    [child] = await wait_until(lambda: durably.get_runs(parent_run_id=run.id, status="leased"))
    yield durably, run.id, child.id
    GATE["child"].set()


async def test_http_shows_the_tree_filters_by_parent_refuses_delete_and_cascades_cancel(waiting_parent):
    durably, parent_id, child_id = waiting_parent
    async with api_client(create_app(durably)) as client:
        listed = (await client.get("/runs", params={"parent_run_id": parent_id})).json()["runs"]
        assert [(r["id"], r["parent_run_id"], r["labels"]) for r in listed] == [
            (child_id, parent_id, {"tenant": "t1", "part": "child"})  # the parent's labels, then its own
        ]
        assert (await client.get("/runs", params={"parent_run_id": child_id})).json()["runs"] == []
        parent = (await client.get(f"/runs/{parent_id}")).json()
        assert (parent["status"], parent["wait_reason"], parent["wait_child_id"]) == (
            "waiting",
            "child",
            child_id,
        )
        assert parent["parent_run_id"] is None
        [summary] = [r for r in (await client.get("/runs")).json()["runs"] if r["id"] == parent_id]
        assert summary["wait_child_id"] == child_id
        refused = await client.delete(f"/runs/{parent_id}")
        assert refused.status_code == 409 and "child run" in refused.json()["message"]
        assert (await client.get(f"/runs/{parent_id}")).status_code == 200
        cancelled = await client.post(f"/runs/{parent_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert (await durably.wait_for_run(child_id, timeout=30)).status == "cancelled"
        assert (await client.delete(f"/runs/{parent_id}")).status_code == 200


async def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = await run_command(build_parser().parse_args(args))
    return code, out.getvalue(), err.getvalue()


async def test_cli_lists_children_shows_the_wait_refuses_delete_and_cascades_cancel(waiting_parent, db_url):
    durably, parent_id, child_id = waiting_parent
    code, out, _ = await _cli("runs", db_url, "--parent", parent_id)
    assert code == 0 and child_id in out and "PARENT" in out and parent_id in out
    code, out, _ = await _cli("runs", db_url)
    assert code == 0 and f"when child {child_id} ends" in out
    code, out, _ = await _cli("show", db_url, parent_id)
    assert code == 0 and "wait child" in out and "child runs (1):\n" in out and "s-child" in out
    assert f"child, started {child_id}" in out
    code, out, _ = await _cli("show", db_url, child_id)
    assert code == 0 and f"parent     {parent_id}" in out.replace("  ", " " * 2)
    code, _, err = await _cli("delete", db_url, parent_id)
    assert code != 0 and "child run" in err
    code, out, _ = await _cli("cancel", db_url, parent_id)
    assert code == 0
    # Cancelled in the database in one transaction; the worker in this process stops the child.
    assert (await durably.wait_for_run(child_id, timeout=30)).status == "cancelled"
    code, _, _ = await _cli("delete", db_url, parent_id)
    assert code == 0
    code, out, _ = await _cli("runs", db_url, "--parent", parent_id, "--json")
    assert code == 0 and child_id in out  # the child keeps its link to the deleted parent
