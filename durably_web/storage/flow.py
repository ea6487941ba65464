"""Flow control shared by the SQL backends: which of a claim's jobs have limits at all."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .base import JobLimits


def flow_limits_of(job_names: Sequence[str], limits: Mapping[str, JobLimits] | None) -> dict[str, JobLimits]:
    """The limits that apply to this claim, by job name in sorted order (the order in which
    PostgreSQL takes the jobs' advisory locks, so two claimers never wait on each other in a
    cycle). Empty when none of ``job_names`` is limited: the claim is then the plain one."""
    if not limits:
        return {}
    return {
        name: limits[name]
        for name in sorted(set(job_names) & limits.keys())
        if limits[name].max_concurrent is not None or limits[name].rate_count is not None
    }
