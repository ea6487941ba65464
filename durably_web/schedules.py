"""Schedules: cron expressions that create runs, one per tick, exactly once across workers.

Cron parsing and the next tick, in a time zone and across DST changes, come from
``cronsim`` (the cron library of healthchecks.io: pure Python, no dependencies, so it also
runs in Pyodide). It follows Debian cron on DST changes for 5-field expressions with a
fixed minute and hour (``"30 2 * * *"``): a tick in the hour skipped by spring-forward runs
at the first valid minute after it (02:30 → 03:00 on that day), and a tick in the hour
repeated by fall-back runs once (at its first occurrence). Expressions with a ``*`` minute
or hour (``"*/15 * * * *"``) simply follow real time: the skipped hour has no ticks, the
repeated hour has its ticks twice (once per UTC instant).

A tick fires as one transaction of the store (``fire_schedule``): the schedule's next tick
moves on by compare-and-set, and the tick's run is created with the idempotency key
``schedule:<name>:<tick as ISO UTC>``, so two workers racing a tick create one run, and a
firing repeated after a kill finds the run it made. Time zones are ``zoneinfo`` names;
``"UTC"`` needs no zone data (Pyodide has none unless the page loads the ``tzdata``
package).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from . import ids
from .errors import ValidationError
from .job import JOB_NAME_PATTERN, JobDefinition
from .models import iso
from .storage.base import NewRun, RunRecord, ScheduleRecord, Store

logger = logging.getLogger("durably_web")

CatchUp = Literal["latest", "all"]
CATCH_UP_POLICIES: tuple[str, ...] = ("latest", "all")
#: ``catch_up="all"`` creates at most this many runs for the ticks missed during one
#: downtime (the latest ones); older missed ticks are skipped, with a warning in the log.
MAX_CATCH_UP_RUNS = 100
#: How many ticks one firing looks at, one by one, before it jumps to the latest one
#: (a minutely schedule after a month of downtime must not take seconds to fire).
_MAX_TICK_SCAN = 1000
#: A firing looks at no more than this many due schedules per worker turn.
_DUE_BATCH = 50
#: The labels a tick's run carries (visible in get_runs, the dashboard and the CLI).
SCHEDULE_LABEL = "durably:schedule"
TICK_LABEL = "durably:tick"
MAX_CRON_LENGTH = 200


def zone(name: str) -> tzinfo:
    """The ``tzinfo`` of a zone name; ``ValidationError`` for an unknown one."""
    if not isinstance(name, str) or not name or len(name) > 64 or "\x00" in name:
        raise ValidationError(f"timezone must be an IANA zone name such as 'Europe/Oslo', not {name!r}")
    if name == "UTC":
        return UTC  # no zone data needed (Pyodide has none by default)
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValidationError(
            f"unknown timezone {name!r} ({exc}); in the browser worker, zone data comes with the "
            "'tzdata' package: create({packages: ['tzdata']})"
        ) from None


def check_cron(cron: str, timezone: str = "UTC") -> None:
    """``ValidationError`` unless ``cron`` is a cron expression cronsim accepts (5 fields, or 6
    with seconds first) and ``timezone`` a known zone."""
    tz = zone(timezone)
    if not isinstance(cron, str) or not cron.strip() or len(cron) > MAX_CRON_LENGTH:
        raise ValidationError(f"cron must be a cron expression such as '0 3 * * *', not {cron!r}")
    try:
        it = CronSim(cron, datetime.now(tz))
    except (CronSimError, ValueError, IndexError) as exc:
        raise ValidationError(f"invalid cron expression {cron!r}: {exc}") from None
    try:
        next(it)
    except StopIteration:
        raise ValidationError(f"cron expression {cron!r} never fires") from None


def next_tick_after(cron: str, timezone: str, after_ms: int) -> int:
    """The first tick strictly after ``after_ms`` (ms since the epoch)."""
    return _ms(next(CronSim(cron, _dt(after_ms, zone(timezone)))))


def due_ticks(cron: str, timezone: str, first_due: int, now: int, catch_up: str) -> tuple[list[int], int]:
    """The ticks to fire now for a schedule whose next tick ``first_due`` is due by ``now``,
    and the next tick after them (past ``now``).

    ``"latest"``: one tick, the latest that is due (a downtime is caught up once); ``"all"``:
    every missed tick, at most ``MAX_CATCH_UP_RUNS`` (the latest).
    """
    tz = zone(timezone)
    keep = 1 if catch_up == "latest" else MAX_CATCH_UP_RUNS
    ticks = [first_due]
    forward = CronSim(cron, _dt(first_due, tz))
    for _ in range(_MAX_TICK_SCAN):
        following = _ms(next(forward))
        if following > now:
            return ticks[-keep:], following
        ticks.append(following)
        del ticks[:-keep]
    # A long downtime of a frequent schedule: the latest ticks up to now, found backwards (the
    # ticks skipped over are older than any "all" keeps).
    backward = CronSim(cron, _dt((now // 1000 + 1) * 1000, tz), reverse=True)
    latest = sorted(_ms(next(backward)) for _ in range(keep))
    return latest, next_tick_after(cron, timezone, now)


def tick_iso(tick_ms: int) -> str:
    """A tick as ISO 8601 UTC text (``2026-03-29T01:00:00Z``)."""
    return iso(datetime.fromtimestamp(tick_ms / 1000, UTC)) or ""


def tick_key(name: str, tick_ms: int) -> str:
    """The idempotency key of a tick's run: one run per (schedule, tick), whoever fires it."""
    return f"schedule:{name}:{tick_iso(tick_ms)}"


def _dt(ms: int, tz: tzinfo) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz)


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """What ``define_job(schedule=)`` declares (checked at definition time)."""

    cron: str
    timezone: str = "UTC"
    input: Any = None
    catch_up: str = "latest"
    name: str | None = None  # None: the job's name


def check_schedule_options(name: str, catch_up: str) -> None:
    if not isinstance(name, str) or not JOB_NAME_PATTERN.match(name):
        raise ValidationError(
            f"invalid schedule name {name!r}: use 1-128 letters, digits and _ . : - / "
            "starting with a letter or digit"
        )
    if catch_up not in CATCH_UP_POLICIES:
        raise ValidationError(f"catch_up must be one of {list(CATCH_UP_POLICIES)}, not {catch_up!r}")


def new_schedule(
    job: JobDefinition[Any, Any],
    cron: str,
    *,
    input: Any,
    name: str,
    timezone: str,
    catch_up: str,
    now: int,
    max_payload_bytes: int,
) -> ScheduleRecord:
    """The record ``upsert_schedule`` stores, every argument checked (``ValidationError``)."""
    check_schedule_options(name, catch_up)
    check_cron(cron, timezone)
    _, input_json = job.validate_input(input)
    if len(input_json.encode()) > max_payload_bytes:
        raise ValidationError(f"schedule input is larger than max_payload_bytes={max_payload_bytes}")
    return ScheduleRecord(
        name=name,
        job_name=job.name,
        cron=cron,
        timezone=timezone,
        input_json=input_json,
        catch_up=catch_up,
        paused=False,
        next_tick_at=next_tick_after(cron, timezone, now),
        last_tick_at=None,
        last_run_id=None,
        created_at=now,
        updated_at=now,
    )


class ScheduleTicker:
    """Fires the due ticks of every schedule, for the worker's claim loop.

    It knows the store, the clock, the job registry (to sync ``define_job(schedule=)``
    declarations into the table the first time it sees each job) and where to hand the runs
    it created (``Durably`` emits their ``run:trigger`` and wakes the worker).
    """

    def __init__(
        self,
        *,
        store: Store,
        jobs: Mapping[str, JobDefinition[Any, Any]],
        now_ms: Callable[[], int],
        created: Callable[[list[tuple[RunRecord, str]]], object],
        max_payload_bytes: int,
        report_error: Callable[[BaseException], object] = lambda exc: None,
    ) -> None:
        self.store = store
        self.jobs = jobs
        self.now_ms = now_ms
        self.created = created
        self.max_payload_bytes = max_payload_bytes
        self.report_error = report_error
        self._synced: set[str] = set()
        # Schedules this process cannot fire (a zone it has no data for, a cron its cronsim
        # refuses), reported once each rather than at every poll.
        self._reported: set[tuple[str, str]] = set()

    async def sync_definitions(self) -> None:
        """Upsert the schedules of registered jobs not synced yet (each once per process)."""
        for job in list(self.jobs.values()):
            spec = job.schedule
            if spec is None or job.name in self._synced:
                continue
            record = new_schedule(
                job,
                spec.cron,
                input=spec.input,
                name=spec.name or job.name,
                timezone=spec.timezone,
                catch_up=spec.catch_up,
                now=self.now_ms(),
                max_payload_bytes=self.max_payload_bytes,
            )
            await self.store.upsert_schedule(record)
            self._synced.add(job.name)

    async def fire_due(self) -> int | None:
        """Fire every due tick; return when the next one is due (ms), ``None`` if none is."""
        await self.sync_definitions()
        now = self.now_ms()
        for schedule in await self.store.due_schedules(now, _DUE_BATCH):
            try:
                await self.fire(schedule, now)
            except ValidationError as exc:
                # This schedule stays due (another process may fire it); the others go on.
                key = (schedule.name, str(exc))
                if key not in self._reported:
                    self._reported.add(key)
                    self.report_error(exc)
        return await self.store.next_schedule_tick()

    async def fire(self, schedule: ScheduleRecord, now: int) -> list[tuple[RunRecord, str]] | None:
        ticks, following = due_ticks(
            schedule.cron, schedule.timezone, schedule.next_tick_at, now, schedule.catch_up
        )
        if schedule.catch_up == "all" and len(ticks) == MAX_CATCH_UP_RUNS:
            logger.warning(
                "durably-web: schedule %r missed more ticks than catch_up='all' creates (%d); "
                "the older ones are skipped",
                schedule.name,
                MAX_CATCH_UP_RUNS,
            )
        # A tick's run is triggered as trigger() would: the job's deadline (timeout=) and this
        # process's version of the job, when it knows the job (a claim records the version then).
        job = self.jobs.get(schedule.job_name)
        timeout = None if job is None else job.timeout
        runs = [
            NewRun(
                id=ids.new_id(now),
                job_name=schedule.job_name,
                input_json=schedule.input_json,
                labels={SCHEDULE_LABEL: schedule.name, TICK_LABEL: tick_iso(tick)},
                idempotency_key=tick_key(schedule.name, tick),
                concurrency_key=None,
                coalesce=False,
                created_at=now,
                deadline_at=None if timeout is None else now + int(timeout * 1000),
                version=None if job is None else job.version,
            )
            for tick in ticks
        ]
        results = await self.store.fire_schedule(
            schedule.name,
            expected_next_tick=schedule.next_tick_at,
            next_tick_at=following,
            last_tick_at=ticks[-1],
            runs=runs,
            now=now,
        )
        if results:
            self.created(results)
        return results


SchedulerHook = Callable[[], Awaitable[int | None]]
"""What the worker's claim loop calls each turn: fire due ticks, return the next one (ms)."""
