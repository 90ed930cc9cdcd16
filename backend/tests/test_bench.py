"""The benchmark's own arithmetic (bench/run.py): what its table shows for repeated runs."""

import pytest

from bench.run import WrkResult, median_result, parse_options


def result(rps: float, p99: float, *, errors: int = 0, max_ms: float = 100.0) -> WrkResult:
    return WrkResult(
        requests=int(rps * 10),
        duration_s=10.0,
        rps=rps,
        p50_ms=p99 / 2,
        p90_ms=p99 * 0.8,
        p95_ms=p99 * 0.9,
        p99_ms=p99,
        max_ms=max_ms,
        mean_ms=p99 / 2,
        errors=errors,
        unexpected_status=errors,
        socket_errors={"connect": 0, "read": 0, "write": 0, "timeout": 0},
        statuses={"200": int(rps * 10) - errors, "500": errors},
    )


def test_one_run_is_shown_as_it_is() -> None:
    only = result(1000.0, 40.0)
    assert median_result([only]) is only


def test_each_number_is_the_median_run_and_every_count_is_summed() -> None:
    runs = [
        result(3000.0, 70.0, max_ms=200.0),
        result(1000.0, 30.0, errors=2),
        result(2000.0, 45.0),
    ]
    combined = median_result(runs)
    assert combined.rps == 2000.0
    assert combined.p99_ms == 45.0
    assert combined.p50_ms == 22.5
    assert combined.max_ms == 200.0  # the worst of all, not a median
    assert combined.errors == 2  # an error in any run counts
    assert combined.requests == 60000
    assert combined.statuses == {"200": 59998, "500": 2}
    assert combined.duration_s == 30.0


def test_repeat_is_a_count_of_at_least_one() -> None:
    assert parse_options(["--repeat", "3"]).repeat == 3
    assert parse_options([]).repeat == 1
    with pytest.raises(SystemExit):
        parse_options(["--repeat", "0"])
