"""bench.throughput's side-by-side ratios, without backends."""

from __future__ import annotations

import math

from bench.common import LoadResult
from bench.throughput import Plan, Result, Row, side_by_side, targets


def load(requests: int) -> LoadResult:
    return LoadResult(requests=requests, seconds=4.0, non_200=0, errors=0)


def test_a_round_where_either_answered_nothing_has_no_ratio() -> None:
    assert side_by_side(load(4000), load(3000), 10.0, 12.5) == (0.75, 0.8)
    assert side_by_side(load(0), load(3000), 10.0, 12.5) is None
    assert side_by_side(load(4000), load(0), 10.0, 12.5) is None


def test_a_kind_with_no_round_measured_meets_no_target() -> None:
    rows = [Row(kind, [1.0], [1.0], 0, 0, 0) for kind in ("plain", "watch")]
    assert rows[0].ratio == 1.0
    assert math.isnan(rows[1].ratio) and math.isnan(rows[1].cpu_ratio)
    result = Result(Plan(1, 1.0, 0.0), rows, "test", "none")
    [(_, _, met)] = targets(result)
    assert met is False
