"""A job module with a syntax error, for tests/browser/test_dashboard.py (excluded from ruff)."""

from durably_web import define_job


@define_job("never-defined")
async def never_defined(step, payload):
    return {"ok": True
