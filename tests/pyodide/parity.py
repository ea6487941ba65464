"""The parity scenario, run unchanged under CPython (host) and inside Pyodide.

Runs the demo jobs module's "weather-report" job (step_delay=0) for a few inputs on
an in-memory stdlib-sqlite3 store and returns, per input, the run's output and the
steps' names and outputs as JSON-ready values.
"""

from __future__ import annotations

import json
import sys
from typing import Any

INPUTS: list[dict[str, Any]] = [
    {"city": "Oslo", "days": 8, "step_delay": 0},
    {"city": "Zürich", "days": 3, "step_delay": 0},
    {"city": "São Paulo", "days": 14, "step_delay": 0},
]


async def weather_reports() -> str:
    from durably_web import Durably
    from durably_web.demo import jobs

    results = []
    async with Durably("sqlite://:memory:", jobs=jobs.JOBS, polling_interval=0.01) as durably:
        for request in INPUTS:
            run = await durably.trigger_and_wait("weather-report", request, timeout=60)
            stored = await durably.get_run(run.id)
            steps = await durably.get_steps(run.id)
            results.append(
                {
                    "input": request,
                    "status": stored.status,
                    "output": stored.to_dict()["output"],
                    "step_names": [s.name for s in steps],
                    "step_outputs": [s.output for s in steps],
                }
            )
    return json.dumps({"platform": sys.platform, "results": results}, sort_keys=True)
