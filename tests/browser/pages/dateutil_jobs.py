"""A job module that imports a bundled package (python-dateutil), for tests/browser/test_packages.py."""

import datetime

from dateutil.relativedelta import relativedelta  # from site/, via create({packages})

from durably_web import define_job


@define_job("add-months")
async def add_months(step: object, payload: dict) -> dict:
    start = datetime.date.fromisoformat(payload["date"])
    return {"date": (start + relativedelta(months=payload["months"])).isoformat()}
