"""The ``application/health+json`` answer (draft-inadarei-api-health-check).

A request whose ``Accept`` header prefers ``application/health+json`` to
``application/json`` gets the IETF draft's format instead of the original
handler's JSON: ``status`` is ``pass``, ``warn`` or ``fail``, and ``checks``
has one entry per source of the status. Plain requests keep the original JSON.
"""

from __future__ import annotations

import datetime
from typing import Any

from .status import CheckResult

MEDIA_TYPE = "application/health+json"

PASS = "pass"
WARN = "warn"
FAIL = "fail"

_PLAIN = ("application", "json")
_HEALTH = ("application", "health+json")


MAX_ACCEPT_LENGTH = 1024
"""An ``Accept`` header longer than this is not parsed: plain JSON answers."""
MAX_MEDIA_RANGES = 32
"""An ``Accept`` header with more media ranges is not parsed either."""


def wanted(accept: str) -> bool:
    """Whether an ``Accept`` header prefers ``application/health+json``.

    Content negotiation as RFC 9110 section 12.5.1 has it: each of the two
    formats takes the quality (``q``, 1 when absent) of the most specific
    media range that matches it (``application/json`` over ``application/*``
    over ``*/*``), and the higher quality wins. On a tie health+json wins only
    when the header names it, so ``*/*``, ``application/*``, no header and
    headers naming neither keep the original JSON. A media range that cannot
    be parsed (no ``/``, a bad ``q``) is ignored. A header longer than
    :data:`MAX_ACCEPT_LENGTH` or with more than :data:`MAX_MEDIA_RANGES`
    ranges is not parsed at all and gets plain JSON, so that no request costs
    more than a few microseconds here.
    """
    if len(accept) > MAX_ACCEPT_LENGTH:
        return False
    accept = accept.lower()
    if "health+json" not in accept and ";" not in accept:
        return False  # the common case: without q-values plain JSON wins ties
    if accept.count(",") >= MAX_MEDIA_RANGES:
        return False
    ranges = [parsed for r in accept.split(",") if (parsed := _parse(r)) is not None]
    health, health_named = _quality(ranges, _HEALTH)
    plain, _ = _quality(ranges, _PLAIN)
    return health > plain or (health == plain > 0 and health_named)


def _quality(
    ranges: list[tuple[tuple[str, str], float]], media_type: tuple[str, str]
) -> tuple[float, bool]:
    """The quality parsed ``ranges`` give ``media_type``, and whether they name it."""
    best_specificity = -1
    quality = 0.0
    for (main, sub), q in ranges:
        if (main, sub) == media_type:
            specificity = 2
        elif sub == "*" and main in ("*", media_type[0]):
            specificity = 1 if main != "*" else 0
        else:
            continue
        if specificity > best_specificity:
            best_specificity, quality = specificity, q
    return quality, best_specificity == 2


def _parse(media_range: str) -> tuple[tuple[str, str], float] | None:
    """``type/subtype`` and ``q`` of one media range, or None when malformed."""
    media_type, *parameters = media_range.split(";")
    main, slash, sub = media_type.strip().partition("/")
    if not slash or not main or not sub or (main == "*" and sub != "*"):
        return None
    q = 1.0
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip() != "q":
            continue
        try:
            q = float(value.strip())
        except ValueError:
            return None
        if not 0 <= q <= 1:
            return None
        break  # what follows q are accept-extensions, not media type parameters
    return (main, sub), q


def timestamp(age: float = 0.0) -> str:
    """The time ``age`` seconds ago in RFC 3339 UTC, as health+json ``time``."""
    moment = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(
        seconds=age
    )
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def check(
    status: str,
    observed: str,
    component_id: str | None = None,
    output: str | None = None,
    time: str | None = None,
) -> list[dict[str, Any]]:
    """One entry of ``checks``: a list of one measurement, as the draft wants.

    ``time`` is when the observed value was last confirmed (RFC 3339).
    """
    entry: dict[str, Any] = {"status": status, "observedValue": observed}
    if component_id is not None:
        entry["componentId"] = component_id
    if output:
        entry["output"] = output
    if time is not None:
        entry["time"] = time
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
