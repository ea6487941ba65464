"""Jobs for tests/browser/test_schedules_browser.py: a define_job schedule (UTC, so no zone
data is needed to import it) and a job the page schedules itself."""

from durably_web import define_job


@define_job("nightly-page", schedule="0 3 * * *")
async def nightly_page(step: object, payload: object) -> str:
    return "nightly"


@define_job("ping")
async def ping(step: object, payload: object) -> object:
    return payload
