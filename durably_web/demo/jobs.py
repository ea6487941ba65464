"""Demo jobs. This very file also runs in the browser (the demo page loads it into
Pyodide), so it sticks to portable Python: no threads, no files, asyncio only.

The "weather service" is simulated: readings are derived from a hash of the
city and day, so the same input always gives the same output in both runtimes.
The last step, "publish", needs the network (``needs_network=True``): in the browser
it makes a real request to the demo's own server, so with the browser offline the
run waits for the network (reason "offline") and finishes once it is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys

from pydantic import BaseModel, Field

from durably_web import StepContext, define_job
from durably_web.http import get_json


class ReportRequest(BaseModel):
    city: str = Field("Oslo", min_length=1, max_length=80)
    days: int = Field(8, ge=1, le=60)
    step_delay: float = Field(0.8, ge=0, le=10, description="seconds each fetch pretends to take")


class DayReading(BaseModel):
    day: int
    temperature_c: float
    rain_mm: float


class Report(BaseModel):
    city: str
    days: int
    mean_temperature_c: float
    total_rain_mm: float
    wettest_day: int


async def fetch_reading(city: str, day: int, delay: float) -> DayReading:
    """Stands in for a slow remote API call."""
    await asyncio.sleep(delay)
    digest = hashlib.sha256(f"{city.lower()}:{day}".encode()).digest()
    return DayReading(
        day=day,
        temperature_c=round(-5 + digest[0] / 255 * 30, 1),
        rain_mm=round(digest[1] / 255 * 12, 1) if digest[2] % 3 else 0.0,
    )


def summarize(city: str, readings: list[DayReading]) -> Report:
    wettest = max(readings, key=lambda r: (r.rain_mm, -r.day))
    return Report(
        city=city,
        days=len(readings),
        mean_temperature_c=round(sum(r.temperature_c for r in readings) / len(readings), 2),
        total_rain_mm=round(sum(r.rain_mm for r in readings), 1),
        wettest_day=wettest.day,
    )


async def publish(report: Report) -> dict[str, object]:
    """Stands in for uploading the report. In a browser it asks the server the page came
    from for the app manifest (a local request that cannot be made offline); with no page
    (the terminal demo, Pyodide under Node) it only pretends. The result is the same in
    every runtime."""
    if _served_page():
        await get_json("manifest.webmanifest")  # next to worker.js in the built site
    return {"city": report.city, "published": True}


def _served_page() -> bool:
    if sys.platform != "emscripten":
        return False
    import js  # type: ignore[import-not-found]  # Pyodide's view of the JS global scope

    return hasattr(js, "location")


@define_job("weather-report", input=ReportRequest, output=Report)
async def weather_report(step: StepContext, request: ReportRequest) -> Report:
    total = request.days + 1
    readings = []
    for day in range(1, request.days + 1):
        restored = step.is_replaying  # asked before the call: is this step already recorded?
        reading = await step.run(f"fetch-day-{day}", fetch_reading, request.city, day, request.step_delay)
        readings.append(reading)
        step.progress(day, total, f"fetched day {day} of {request.days}")
        if not restored:
            step.log.info(f"day {day}: {reading.temperature_c} °C, {reading.rain_mm} mm")
    report = await step.run("summarize", summarize, request.city, readings)
    step.progress(total, total, "report ready")
    restored = step.is_replaying
    receipt = await step.run("publish", publish, report, needs_network=True)
    if not restored:
        step.log.info(f"report for {receipt['city']} published")
    return report


JOBS = [weather_report]
