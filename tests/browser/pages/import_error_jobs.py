"""A job module that raises while it is imported, for tests/browser/test_dashboard.py."""

from durably_web import define_job

SETTINGS: dict[str, str] = {}
REGION = SETTINGS["region"]  # KeyError at import time


@define_job("never-registered")
async def never_registered(step: object, payload: object) -> None:
    return None
