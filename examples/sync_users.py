"""The README quick start: ``python examples/sync_users.py`` (writes app.db in the current folder)."""

import asyncio

from pydantic import BaseModel

from durably_web import Durably, StepContext, define_job


class SyncIn(BaseModel):
    org_id: str


class SyncOut(BaseModel):
    synced_count: int


def fetch_users(org_id: str) -> list[dict]:
    # A blocking call (an HTTP request, say): sync callables run in a thread.
    return [{"id": n, "org": org_id} for n in range(3)]


async def save_users(users: list[dict]) -> None:
    await asyncio.sleep(0.1)


@define_job("sync-users", input=SyncIn, output=SyncOut)
async def sync_users(step: StepContext, payload: SyncIn) -> SyncOut:
    users = await step.run("fetch-users", fetch_users, payload.org_id)
    await step.run("save-to-db", save_users, users)
    step.progress(2, 2, "saved")
    step.log.info("synced", {"count": len(users)})
    return SyncOut(synced_count=len(users))


async def main() -> None:
    async with Durably("sqlite:///app.db", jobs=[sync_users]) as durably:
        run = await durably.trigger("sync-users", {"org_id": "o1"})
        print(run.id, run.status, run.disposition)  # ... pending created
        done = await durably.trigger_and_wait(sync_users, SyncIn(org_id="o2"), timeout=30)
        print(done.status, done.output)  # completed synced_count=3


if __name__ == "__main__":
    asyncio.run(main())
