"""The benchmark's own arithmetic (bench/run.py): what its table shows for repeated runs, and
where it says the CPU went."""

import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import psycopg.conninfo
import pytest
from sqlalchemy.engine import make_url

from bench.run import (
    DIAGNOSTIC_NOTES,
    DISPLAY_ORDER,
    PHASES,
    SCENARIOS,
    CpuMeter,
    ScenarioResult,
    WrkResult,
    cpu_per_request,
    cpu_report,
    database_is_local,
    drop_database,
    is_loopback,
    machine_busy_seconds,
    machine_info,
    median_result,
    migrate,
    p50_ratio_report,
    parse_options,
    process_cpu_seconds,
    process_name,
    recreate_database,
    seed,
    server_env,
    stat_children_ticks,
)
from tests.conftest import IN_CI


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


def test_cpu_per_request_splits_the_machine_busy_time_by_group() -> None:
    before = {"server": 10.0, "postgres": 4.0, "machine": 100.0}
    after = {"server": 12.0, "postgres": 5.0, "machine": 104.5}
    # 2 s of workers, 1 s of PostgreSQL, 0.5 s of wrk, 1 s of everything else; 1000 requests.
    assert cpu_per_request(before, after, 1000, wrk_seconds=0.5) == {
        "server": 2000.0,
        "postgres": 1000.0,
        "wrk": 500.0,
        "rest": 1000.0,
    }
    # No PostgreSQL processes to see (a remote database): no group, its share is not guessed.
    remote = cpu_per_request(
        {"server": 0.0, "machine": 0.0}, {"server": 1.0, "machine": 3.0}, 2000, wrk_seconds=0.0
    )
    assert remote == {"server": 500.0, "wrk": 0.0, "rest": 1000.0}
    # A group whose time went backwards (PostgreSQL restarted) is left out, not counted as 0.
    restarted = cpu_per_request(before, {**after, "postgres": 1.0}, 1000, wrk_seconds=0.5)
    assert "postgres" not in restarted
    assert restarted["rest"] == 2000.0
    # Tick sampling can leave the machine's total a little under the processes' own.
    assert (
        cpu_per_request(before, {**after, "machine": 101.0}, 1000, wrk_seconds=0.5)["rest"] == 0.0
    )
    assert cpu_per_request({}, {}, 1000, wrk_seconds=0.0) == {}
    assert cpu_per_request(before, after, 0, wrk_seconds=0.0) == {}


def test_proc_lines_are_read_by_their_fields(tmp_path: Path) -> None:
    # A command name with ") " in it must not shift the fields that follow it.
    stat = "4242 (post) gres) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 700 300 20 0 1 0"
    assert process_name(stat) == "post) gres"
    ticks = os.sysconf("SC_CLK_TCK")
    assert process_cpu_seconds(stat) == (250 + 50) / ticks
    assert process_cpu_seconds(stat, with_children=True) == (250 + 50 + 700 + 300) / ticks
    proc_stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    proc_stat.write_text("cpu  1000 20 300 90000 400 5 7 600 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    assert machine_busy_seconds(proc_stat) == (1000 + 20 + 300 + 5 + 7) / ticks


def test_the_meter_sees_a_process_burn_cpu() -> None:
    meter = CpuMeter(database_is_local=False)
    if not meter.available:
        pytest.skip("no /proc on this system")
    before = meter.snapshot([os.getpid()])
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    after = meter.snapshot([os.getpid()])
    assert after["server"] - before["server"] >= 0.2
    assert after["machine"] - before["machine"] >= after["server"] - before["server"] - 0.05
    assert "postgres" not in after


def test_the_meter_keeps_the_cpu_of_a_backend_that_exited_during_the_run(
    postgres_url: str,
) -> None:
    if not database_is_local(postgres_url):
        message = "PostgreSQL is not on this machine: its processes cannot be read"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    meter = CpuMeter(database_is_local=True)
    before = meter.snapshot([])
    if "postgres" not in before:
        message = "PostgreSQL's processes are not visible here (no /proc, or another namespace)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    # A backend born and gone between the two snapshots, as a pooled connection retired at
    # its lifetime is: about 0.2 s of PostgreSQL's CPU.
    with psycopg.connect(postgres_url) as connection:
        connection.execute("SELECT count(*) FROM generate_series(1, 4000000)")
    # The postmaster reaps it soon after it exits; how soon is up to the machine.
    give_up_at = time.monotonic() + 10
    after = meter.snapshot([])
    while after["postgres"] - before["postgres"] < 0.05 and time.monotonic() < give_up_at:
        time.sleep(0.1)
        after = meter.snapshot([])
    assert after["postgres"] - before["postgres"] >= 0.05


def test_a_scan_during_which_a_backend_was_reaped_is_taken_again() -> None:
    """The postmaster's cutime moving between the scan and the check means a backend's time
    may be missing or counted twice: the meter scans again, and keeps the consistent scan."""
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc on this system")
    me = os.getpid()
    children = stat_children_ticks(Path(f"/proc/{me}/stat").read_text())
    scans = [(0.0, 1.0, {me: children + 7}), (0.0, 2.0, {me: children})]

    class RacingMeter(CpuMeter):
        def _scan(self, server_pids: set[int]) -> tuple[float, float, dict[int, int]]:
            return scans.pop(0)

    snapshot = RacingMeter(database_is_local=True).snapshot([])
    assert snapshot["postgres"] == 2.0
    assert scans == []


def test_the_database_is_local_on_a_loopback_address_or_a_socket(postgres_url: str) -> None:
    assert is_loopback("127.0.0.1", "127.0.0.1")
    assert is_loopback("localhost", "")
    assert is_loopback("LOCALHOST", "")
    assert is_loopback("127.0.1.1", "")
    assert is_loopback("::1", "::1")
    assert is_loopback("[0:0:0:0:0:0:0:1]", "")
    assert is_loopback("/var/run/postgresql", "")
    assert not is_loopback("ep-cool-1.eu-central-1.aws.neon.tech", "18.197.1.2")
    assert not is_loopback("db.example.com", "")
    # The address psycopg connected to decides, not the name in the URL.
    assert not is_loopback("localhost", "10.1.2.3")
    host = psycopg.conninfo.conninfo_to_dict(postgres_url).get("host")
    if host in ("127.0.0.1", "localhost"):
        assert database_is_local(postgres_url)


def test_repeated_runs_show_the_median_cpu_of_each_group() -> None:
    runs = [result(1000.0, 40.0), result(1000.0, 40.0), result(1000.0, 40.0)]
    runs[0].cpu_us = {"server": 300.0, "postgres": 100.0, "wrk": 40.0, "rest": 50.0}
    runs[1].cpu_us = {"server": 900.0, "postgres": 90.0, "wrk": 45.0, "rest": 70.0}
    runs[2].cpu_us = {"server": 400.0, "postgres": 80.0, "wrk": 42.0, "rest": 60.0}
    assert median_result(runs).cpu_us == {
        "server": 400.0,
        "postgres": 90.0,
        "wrk": 42.0,
        "rest": 60.0,
    }
    # A group some run lacks (a remote database) is left out rather than half-counted.
    runs[1].cpu_us = {"server": 900.0, "wrk": 45.0, "rest": 70.0}
    assert median_result(runs).cpu_us == {"server": 400.0, "wrk": 42.0, "rest": 60.0}


def test_the_report_shows_each_scenarios_cpu_and_leaves_out_a_missing_group() -> None:
    ours, baseline = result(1000.0, 40.0), result(1200.0, 30.0)
    ours.cpu_us = {"server": 406.0, "postgres": 119.0, "wrk": 30.0, "rest": 38.0}
    baseline.cpu_us = {"server": 348.0, "wrk": 29.0, "rest": 24.0}
    lines = cpu_report({"list": ScenarioResult("list", "GET list", False, [ours], [baseline])})
    row = next(line for line in lines if line.startswith("list "))
    assert row.split() == [
        "list", "406", "/", "119", "/", "30", "/", "38",
        "348", "/", "n/a", "/", "29", "/", "24",
    ]  # fmt: skip
    assert cpu_report({"list": ScenarioResult("list", "", False, [result(1.0, 1.0)], [ours])}) == []


def test_the_large_list_is_compared_with_both_small_lists() -> None:
    def scenario(name: str, ours_p99: float, baseline_p99: float) -> ScenarioResult:
        return ScenarioResult(name, "", False, [result(1.0, ours_p99)], [result(1.0, baseline_p99)])

    results = {
        "list": scenario("list", 20.0, 16.0),
        "list-large": scenario("list-large", 30.0, 32.0),
    }
    assert p50_ratio_report(results) == [
        "list-large p50 / list p50: ours 1.50 (15.0 / 10.0 ms), baseline 2.00 (16.0 / 8.0 ms)"
        " [target]"
    ]
    results["list-1m"] = scenario("list-1m", 24.0, 20.0)
    assert p50_ratio_report(results)[1] == (
        "list-large p50 / list-1m p50: ours 1.25 (15.0 / 12.0 ms), baseline 1.60 (16.0 / 10.0 ms)"
    )
    del results["list-large"]
    assert p50_ratio_report(results) == []


def test_the_machine_description_needs_no_linux_only_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # macOS has no sched_getaffinity; the benchmark says where it ran there too.
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert machine_info()["cpus_usable"] == os.cpu_count()


def test_the_seed_spreads_each_users_tasks_over_the_table(postgres_url: str) -> None:
    """As many users writing over time leave them: a user's tasks on pages of their own, in
    turn with everyone else's, ids and created_at rising together."""
    url = make_url(postgres_url).set(database=f"todo_test_bench_{uuid.uuid4().hex[:8]}")
    bench_url = url.render_as_string(hide_password=False)
    recreate_database(bench_url)
    try:
        migrate(server_env(bench_url, "s" * 64, 1, 0))
        seed(bench_url, ["carol", "alice", "bob"], 4, datetime(2026, 1, 1, tzinfo=UTC))
        with psycopg.connect(bench_url) as connection:
            stored = connection.execute(
                "SELECT user_id, id, created_at FROM tasks ORDER BY ctid"
            ).fetchall()
        assert [user for user, _, _ in stored] == ["carol", "alice", "bob"] * 4
        assert [task for _, task, _ in stored] == sorted(task for _, task, _ in stored)
        assert [at for _, _, at in stored] == sorted({at for _, _, at in stored})
    finally:
        drop_database(bench_url)


def test_every_diagnostic_scenario_is_shown_and_explained() -> None:
    diagnostics = {scenario.name for scenario in SCENARIOS if scenario.diagnostic}
    assert diagnostics == set(DIAGNOSTIC_NOTES)
    assert set(DISPLAY_ORDER) == {scenario.name for scenario in SCENARIOS}
    assert {scenario.phase for scenario in SCENARIOS} == set(PHASES)
