"""The ``application/health+json`` answer (draft-inadarei-api-health-check).

A request whose ``Accept`` header asks for ``application/health+json`` gets
the IETF draft's format instead of the original handler's JSON: ``status`` is
``pass``, ``warn`` or ``fail``, and ``checks`` has one entry per source of
the status. Plain requests keep the original JSON.
"""

from __future__ import annotations

import datetime
from typing import Any

from .status import CheckResult

MEDIA_TYPE = "application/health+json"

PASS = "pass"
WARN = "warn"
FAIL = "fail"


def wanted(accept: str) -> bool:
    """Whether an ``Accept`` header asks for ``application/health+json``."""
    accept = accept.lower()
    if "health+json" not in accept:  # the common case, decided at once
        return False
    for media_range in accept.split(","):
        media_type, _, parameters = media_range.partition(";")
        if media_type.strip() != MEDIA_TYPE:
            continue
        for parameter in parameters.split(";"):
            name, _, value = parameter.partition("=")
            if name.strip() == "q":
                try:
                    return float(value) > 0
                except ValueError:
                    return False
        return True
    return False


def check(
    status: str,
    observed: str,
    component_id: str | None = None,
    output: str | None = None,
) -> list[dict[str, Any]]:
    """One entry of ``checks``: a list of one measurement, as the draft wants."""
    entry: dict[str, Any] = {"status": status, "observedValue": observed}
    if component_id is not None:
        entry["componentId"] = component_id
    if output:
        entry["output"] = output
    return [entry]


def worst(*statuses: str) -> str:
    """The overall status of several: fail over warn over pass."""
    for status in (FAIL, WARN):
        if status in statuses:
            return status
    return PASS


def check_result(result: CheckResult) -> list[dict[str, Any]]:
    """The entry of one of the application's checks: ``observedValue`` is how
    long its last run took, ``time`` when it ended, ``output`` the last
    failure's reason. A failing non-critical check is ``warn``."""
    status = PASS
    if result.failing:
        status = FAIL if result.critical else WARN
    entry: dict[str, Any] = {"status": status, "componentType": "component"}
    if result.duration is not None:
        entry["observedValue"] = round(result.duration * 1000, 3)
        entry["observedUnit"] = "ms"
    if result.time is not None:
        entry["time"] = (
            datetime.datetime.fromtimestamp(result.time, datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )
    if result.message:
        entry["output"] = result.message
    return [entry]
