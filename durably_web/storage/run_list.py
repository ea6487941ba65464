"""The run list's query (``Store.list_runs``), built per filter for both SQL backends.

One catch-all statement (``:statuses IS NULL OR status IN …``) cannot use an index
for the filters and the order together, so every call scanned the whole table. Here
each filter shape gets a statement whose rows come out of an index already in list
order (newest id first), so ``LIMIT`` stops the walk after the page:

* labels: the first wanted pair drives, through ``durably_run_labels (key, value,
  run_id)``; the other pairs, statuses and jobs are checked per row it yields.
* statuses and/or jobs: one branch per (job, status) combination, each a walk of
  ``durably_runs (job_name, status, id)`` or ``(status, id)`` limited to
  ``limit + offset`` rows, merged and cut once more. A job without a status filter
  walks each status (six small walks beat one scan); a status filter alone uses
  ``(status, id)``.
* a parent (``parent_run_id``): its children through ``durably_runs_parent
  (parent_run_id, id)``; statuses, jobs and labels are checked per row it yields
  (a parent has few children).
* versions (``get_runs(version=)``): like jobs, one branch per (version, status), each a
  walk of ``durably_runs (version, status, id)``; a job filter beside it is checked per row.
* nothing: the primary key.

The cost then follows the page size (and the offset), not the table: see
``tests/test_run_list_plans.py`` for the plans both databases choose.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..models import RUN_STATUSES
from .base import RunFilter

#: In schema order; a job filter without a status filter walks each of them.
_STATUSES = tuple(sorted(RUN_STATUSES))


def list_runs_query(
    run_filter: RunFilter, placeholder: Callable[[str], str], *, no_limit: Any
) -> tuple[str, dict[str, Any]]:
    """The SQL and parameters for ``run_filter``.

    ``placeholder(name)`` spells a named parameter in the backend's style (``:name`` or
    ``%(name)s``); ``no_limit`` is the backend's LIMIT value for "all rows"."""
    params: dict[str, Any] = {}

    def bind(value: Any) -> str:
        name = f"p{len(params)}"
        params[name] = value
        return placeholder(name)

    unlimited = run_filter.limit < 0
    offset = max(run_filter.offset, 0)
    page = f"LIMIT {bind(no_limit if unlimited else run_filter.limit)} OFFSET {bind(offset)}"
    statuses = None if run_filter.statuses is None else list(dict.fromkeys(run_filter.statuses))
    jobs = None if run_filter.job_names is None else list(dict.fromkeys(run_filter.job_names))
    versions = None if run_filter.versions is None else list(dict.fromkeys(run_filter.versions))
    if statuses == [] or jobs == [] or versions == []:
        return "SELECT * FROM durably_runs WHERE 0 = 1", {}

    if run_filter.parent_run_id is not None:
        where = [f"r.parent_run_id = {bind(run_filter.parent_run_id)}"]
        if statuses is not None:
            where.append(f"r.status IN ({', '.join(bind(s) for s in statuses)})")
        if jobs is not None:
            where.append(f"r.job_name IN ({', '.join(bind(j) for j in jobs)})")
        for key, value in run_filter.labels.items():
            where.append(
                "EXISTS (SELECT 1 FROM durably_run_labels AS o WHERE o.run_id = r.id "
                f"AND o.key = {bind(key)} AND o.value = {bind(value)})"
            )
        sql = f"SELECT r.* FROM durably_runs AS r WHERE {' AND '.join(where)} ORDER BY r.id DESC {page}"
        return sql, params

    if run_filter.labels:
        (key, value), *others = run_filter.labels.items()
        where = [f"l.key = {bind(key)}", f"l.value = {bind(value)}"]
        for other_key, other_value in others:
            where.append(
                "EXISTS (SELECT 1 FROM durably_run_labels AS o WHERE o.run_id = l.run_id "
                f"AND o.key = {bind(other_key)} AND o.value = {bind(other_value)})"
            )
        if statuses is not None:
            where.append(f"r.status IN ({', '.join(bind(s) for s in statuses)})")
        if jobs is not None:
            where.append(f"r.job_name IN ({', '.join(bind(j) for j in jobs)})")
        if versions is not None:
            where.append(f"r.version IN ({', '.join(bind(v) for v in versions)})")
        # CROSS JOIN keeps the label index as the outer loop (SQLite never reorders it;
        # PostgreSQL does not need telling): its run_id order is the list order.
        sql = (
            "SELECT r.* FROM durably_run_labels AS l CROSS JOIN durably_runs AS r "
            f"WHERE r.id = l.run_id AND {' AND '.join(where)} ORDER BY l.run_id DESC {page}"
        )
        return sql, params

    if versions is not None:
        return _by_version(versions, statuses, jobs, run_filter, bind, page, unlimited), params

    if statuses is None and jobs is None:
        return f"SELECT * FROM durably_runs ORDER BY id DESC {page}", params

    combinations = [
        (job, status)
        for job in (jobs if jobs is not None else [None])
        for status in (statuses if statuses is not None else (_STATUSES if job is not None else [None]))
    ]
    if len(combinations) == 1:  # one walk: no merge
        (job, status), where = combinations[0], []
        if job is not None:
            where.append(f"job_name = {bind(job)}")
        if status is not None:
            where.append(f"status = {bind(status)}")
        return f"SELECT * FROM durably_runs WHERE {' AND '.join(where)} ORDER BY id DESC {page}", params
    branch_limit = "" if unlimited else f" LIMIT {bind(run_filter.limit + offset)}"
    branches: list[str] = []
    for job, status in combinations:
        where = []
        if job is not None:
            where.append(f"job_name = {bind(job)}")
        if status is not None:
            where.append(f"status = {bind(status)}")
        branches.append(
            f"SELECT * FROM (SELECT * FROM durably_runs WHERE {' AND '.join(where)} "
            f"ORDER BY id DESC{branch_limit}) AS b{len(branches)}"
        )
    merged = " UNION ALL ".join(branches)
    return f"SELECT * FROM ({merged}) AS merged ORDER BY id DESC {page}", params


def _by_version(
    versions: list[str],
    statuses: list[str] | None,
    jobs: list[str] | None,
    run_filter: RunFilter,
    bind: Callable[[Any], str],
    page: str,
    unlimited: bool,
) -> str:
    """A version filter drives: one walk of ``(version, status, id)`` per combination."""
    job_check = "" if jobs is None else f" AND job_name IN ({', '.join(bind(j) for j in jobs)})"
    branch_limit = "" if unlimited else f" LIMIT {bind(run_filter.limit + max(run_filter.offset, 0))}"
    branches = [
        f"SELECT * FROM (SELECT * FROM durably_runs WHERE version = {bind(version)} "
        f"AND status = {bind(status)}{job_check} ORDER BY id DESC{branch_limit}) AS b{position}"
        for position, (version, status) in enumerate(
            (version, status) for version in versions for status in (statuses or _STATUSES)
        )
    ]
    merged = " UNION ALL ".join(branches)
    return f"SELECT * FROM ({merged}) AS merged ORDER BY id DESC {page}"
