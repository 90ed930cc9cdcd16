"""The performance benchmark, one command (from backend/):

    uv run python -m bench.run [--quick] [--duration S] [--connections N] [--workers N]
                               [--database-url URL] [--json PATH]

It recreates its own PostgreSQL database (default `todo_bench`), migrates it with the app's own
Alembic migrations, seeds it with SQL, starts the app as in production (uvicorn, N workers,
uvloop, httptools, ENVIRONMENT=production) and the bare Starlette baseline (bench/baseline.py)
the same way, drives both with wrk (bench/wrk.lua), watches the app workers' memory, and prints
one table with the targets marked PASS or MISS. Every process it starts is stopped at the end,
on Ctrl-C and on failure too. See bench/README.md.
"""

import argparse
import contextlib
import hashlib
import ipaddress
import json
import os
import platform
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import jwt
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

BENCH_DIR = Path(__file__).resolve().parent
BACKEND_DIR = BENCH_DIR.parent
WRK_SCRIPT = BENCH_DIR / "wrk.lua"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/todo_bench"

SMALL_USERS, SMALL_TASKS = 50, 50
LARGE_USERS, LARGE_TASKS = 10_000, 100
TOKEN_LIFETIME_SECONDS = 7 * 24 * 3600
WRK_THREADS = 2
WRK_TIMEOUT_SECONDS = 15
READY_TIMEOUT_SECONDS = 90
STOP_TIMEOUT_SECONDS = 30
MEMORY_POLL_SECONDS = 0.25
USER_ID_ALPHABET = string.ascii_letters + string.digits

# The targets (the issue's): on 2 cores, load generator on the same machine, 2 workers, 50 conns.
TARGET_P99_MS = 50.0
TARGET_RATIOS = {"list": 0.7, "get": 0.7, "create": 0.6}
TARGET_LARGE_LIST_P50_FACTOR = 1.5
TARGET_RSS_MB = 150.0


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """The benchmark could not run; the message says why."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: unwind like Ctrl-C so every started process is stopped."""


# --------------------------------------------------------------------------------------------
# Scenarios


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    mode: str  # the mode bench/wrk.lua runs
    dataset: str  # "small": the 50-task users, with task ids; "large": the 100-task users
    # "small": before the 1M rows are loaded; "large": after
    phase: str
    writes: bool
    what: str
    diagnostic: bool = False  # shown, but not held against a target


SCENARIOS = (
    Scenario("list", "list", "small", "small", False, "GET /api/{u}/tasks (50 tasks each)"),
    Scenario("get", "get", "small", "small", False, "GET /api/{u}/tasks/{id}"),
    Scenario(
        "unauthenticated", "unauthenticated", "small", "small", False, "GET list, no token: 401"
    ),
    Scenario("create", "create", "small", "small", True, 'POST /api/{u}/tasks {"title": ...}'),
    Scenario("toggle", "toggle", "small", "small", True, "PATCH /api/{u}/tasks/{id}/complete"),
    Scenario(
        "mixed",
        "mixed",
        "small",
        "small",
        True,
        "40% list, 40% get, 7.5% create, 7.5% toggle, 5% PATCH title",
    ),
    Scenario(
        "list-large", "list", "large", "large", False, "GET list, 1M-row table, 100 tasks each"
    ),
    Scenario(
        "list-1m",
        "list",
        "small",
        "large",
        False,
        "GET list, 1M-row table, the 50-task users",
        diagnostic=True,
    ),
)
PHASES = ("small", "large")
# What each diagnostic scenario isolates (printed under the table).
DIAGNOSTIC_NOTES = {
    "list-1m": "the 50-task users' list once the table holds 1M rows (table size alone, same "
    "payload as `list`)",
}
SCENARIO_NAMES = tuple(scenario.name for scenario in SCENARIOS)
DISPLAY_ORDER = (
    "list",
    "list-large",
    "list-1m",
    "get",
    "create",
    "toggle",
    "mixed",
    "unauthenticated",
)


@dataclass(slots=True)
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    errors: int  # unexpected statuses + socket errors + timeouts
    unexpected_status: int
    socket_errors: dict[str, int]
    statuses: dict[str, int]
    # CPU microseconds per request during the run, by process group (`CpuMeter`); empty where
    # /proc cannot be read.
    cpu_us: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class ScenarioResult:
    scenario: str
    what: str
    diagnostic: bool
    ours_runs: list[WrkResult]  # one per --repeat
    baseline_runs: list[WrkResult]

    @property
    def ours(self) -> WrkResult:
        return median_result(self.ours_runs)

    @property
    def baseline(self) -> WrkResult:
        return median_result(self.baseline_runs)

    @property
    def ratio(self) -> float:
        return self.ours.rps / self.baseline.rps if self.baseline.rps else 0.0


# --------------------------------------------------------------------------------------------
# The machine and the code


def machine_info() -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory_gib = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = int(line.split()[1]) / 1024 / 1024
                break
    return {
        "cpus": os.cpu_count(),
        # sched_getaffinity is Linux-only (not on macOS, where wrk comes from Homebrew).
        "cpus_usable": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(memory_gib, 1),
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def git_info() -> dict[str, Any]:
    def git(*arguments: str) -> str:
        try:
            completed = subprocess.run(
                ["git", *arguments],
                cwd=BACKEND_DIR,
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return completed.stdout.strip()

    commit = git("rev-parse", "HEAD")
    changed = git("status", "--porcelain", "--untracked-files=no")
    # Tells two runs on different uncommitted states apart (tracked files only).
    diff = git("diff", "HEAD", "--no-ext-diff") if changed else ""
    return {
        "commit": commit or "unknown",
        "uncommitted_changes": bool(changed),
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:12] if diff else None,
    }


def ensure_wrk() -> str:
    """wrk's path; installed from Debian with apt-get when missing and running as root."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        say("wrk is not installed: installing Debian's package (apt-get install -y wrk)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "wrk"]
        if subprocess.run(install, env=env, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
            subprocess.run(install, env=env, check=False)
        found = shutil.which("wrk")
        if found:
            return found
    raise BenchError(
        "wrk is not installed. Install it and run again: `sudo apt-get install -y wrk` "
        "(Debian/Ubuntu), `brew install wrk` (macOS), or build it from "
        "https://github.com/wg/wrk. The benchmark installs it itself only when run as root."
    )


def wrk_version(wrk: str) -> str:
    completed = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False, timeout=10)
    first_line = (completed.stdout or completed.stderr).splitlines()[:1]
    match = re.search(r"wrk\s+(\S+)", first_line[0]) if first_line else None
    return match.group(1) if match else "unknown"


# --------------------------------------------------------------------------------------------
# The database


@dataclass(slots=True)
class Dataset:
    users: list[str]
    task_ids: dict[str, list[int]] = field(default_factory=dict)


def database_name(url: str) -> str:
    try:
        name = conninfo_to_dict(url).get("dbname")
    except psycopg.ProgrammingError as error:
        raise BenchError(f"--database-url is not a PostgreSQL URL ({error})") from None
    if not isinstance(name, str) or not name:
        raise BenchError("--database-url must name a database (…/todo_bench)")
    # The benchmark drops and recreates it: refuse anything that does not look like its own.
    if not re.fullmatch(r"[a-z0-9_]+", name) or "bench" not in name:
        raise BenchError(
            f"refusing to drop and recreate database {name!r}: the benchmark only manages a "
            "database whose name contains 'bench' (lower-case letters, digits, underscores)"
        )
    return name


def admin_conninfo(url: str) -> str:
    return make_conninfo(url, dbname="postgres")


def recreate_database(url: str) -> None:
    name = database_name(url)
    try:
        with psycopg.connect(admin_conninfo(url), autocommit=True, connect_timeout=10) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.OperationalError as error:
        raise BenchError(f"PostgreSQL is not reachable for {name}: {error}") from None


def drop_database(url: str) -> None:
    name = database_name(url)
    with psycopg.connect(admin_conninfo(url), autocommit=True, connect_timeout=10) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def server_version(url: str) -> str:
    with psycopg.connect(url, connect_timeout=10) as connection:
        row = connection.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"


def check_connection_budget(url: str, needed: int) -> None:
    """The app's and the baseline's pools at their fullest must fit under max_connections."""
    with psycopg.connect(url, connect_timeout=10) as connection:
        row = connection.execute(
            "SELECT current_setting('max_connections')::int"
            " - current_setting('superuser_reserved_connections')::int"
            " - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
        ).fetchone()
    available = int(row[0]) if row else 0
    if needed > available:
        raise BenchError(
            f"the app and the baseline may open {needed} connections (2 servers x workers x "
            f"(DATABASE_POOL_SIZE + DATABASE_MAX_OVERFLOW)) but PostgreSQL has {available} free: "
            "lower the pool settings or --workers, or raise max_connections"
        )


def migrate(env: dict[str, str]) -> None:
    """The app's own migrations, as the README's release step runs them."""
    completed = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=BACKEND_DIR,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if completed.returncode != 0:
        raise BenchError("alembic upgrade head failed:\n" + completed.stdout + completed.stderr)


def better_auth_like_ids(count: int, seed: str) -> list[str]:
    """Ids shaped like Better Auth's: 32 letters and digits. Deterministic per dataset."""
    generator = random.Random(seed)
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < count:
        candidate = "".join(generator.choices(USER_ID_ALPHABET, k=32))
        if candidate not in seen:
            seen.add(candidate)
            ids.append(candidate)
    return ids


# Tasks are inserted round-robin over the users (task 1 of every user, then task 2, ...), with
# created_at rising in that order: as when many users write over time, each user's tasks lie on
# many different heap pages, not packed together. Ids and created_at increase together, as in use.
SEED_SQL = """
INSERT INTO tasks (user_id, title, description, completed, created_at, updated_at, version)
SELECT u.user_id,
       'Task ' || g.k || ': ' || left(md5(u.user_id || g.k::text), 16),
       CASE WHEN g.k %% 3 = 0 THEN 'Notes for task ' || g.k || ', written by the benchmark' END,
       g.k %% 4 = 0,
       %(start)s::timestamptz + ((g.k - 1) * %(user_count)s + u.n) * interval '1 second',
       %(start)s::timestamptz + ((g.k - 1) * %(user_count)s + u.n) * interval '1 second',
       1
FROM unnest(%(users)s::text[]) WITH ORDINALITY AS u(user_id, n)
CROSS JOIN generate_series(1, %(tasks)s) AS g(k)
ORDER BY g.k, u.n
"""


def seed(url: str, users: list[str], tasks_per_user: int, start: datetime) -> None:
    with psycopg.connect(url, connect_timeout=10) as connection:
        connection.execute(
            SEED_SQL,
            {
                "users": users,
                "user_count": len(users),
                "tasks": tasks_per_user,
                "start": start,
            },
        )
    vacuum_analyze(url)


def vacuum_analyze(url: str) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as connection:
        connection.execute("VACUUM (ANALYZE) tasks")
        # Write the seeded pages out now, rather than in a checkpoint during a measured run.
        try:
            connection.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            say("no CHECKPOINT after seeding (needs a superuser or pg_checkpoint)")


def task_ids_by_user(url: str, users: list[str]) -> dict[str, list[int]]:
    with psycopg.connect(url, connect_timeout=10) as connection:
        rows = connection.execute(
            "SELECT user_id, array_agg(id ORDER BY id) FROM tasks "
            "WHERE user_id = ANY(%s) GROUP BY user_id",
            (users,),
        ).fetchall()
    return {str(user_id): list(ids) for user_id, ids in rows}


def max_task_id(url: str) -> int:
    with psycopg.connect(url, connect_timeout=10) as connection:
        row = connection.execute("SELECT coalesce(max(id), 0) FROM tasks").fetchone()
    return int(row[0]) if row else 0


def reset_writes(url: str, seeded_max_id: int) -> None:
    """Remove what a write scenario created, so every scenario reads the same dataset."""
    with psycopg.connect(url, connect_timeout=10) as connection:
        connection.execute("DELETE FROM tasks WHERE id > %s", (seeded_max_id,))
        connection.execute("DELETE FROM idempotency_keys")
    vacuum_analyze(url)


def write_users_file(path: Path, dataset: Dataset, secret: str, *, with_ids: bool) -> None:
    """One line per user for bench/wrk.lua: id, a pre-signed HS256 token, its task ids."""
    now = int(time.time())
    lines = []
    for user_id in dataset.users:
        token = jwt.encode(
            {"sub": user_id, "iat": now, "exp": now + TOKEN_LIFETIME_SECONDS},
            secret,
            algorithm="HS256",
        )
        ids = ",".join(str(task_id) for task_id in dataset.task_ids.get(user_id, []))
        lines.append(f"{user_id} {token} {ids}" if with_ids and ids else f"{user_id} {token}")
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# The servers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# Settings the environment (or backend/.env) could otherwise point somewhere else.
FORCED_EMPTY = (
    "NEON_DIRECT_DATABASE_URL",
    "DIRECT_DATABASE_URL",
    "DATABASE_URL_UNPOOLED",
    "REDIS_URL",
    "JWT_ISSUER",
    "JWT_AUDIENCE",
)


def server_env(url: str, secret: str, pool_size: int, max_overflow: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "ENVIRONMENT": "production",
            "BETTER_AUTH_SECRET": secret,
            # NEON_DATABASE_URL wins over DATABASE_URL: both name the bench database.
            "NEON_DATABASE_URL": url,
            "DATABASE_URL": url,
            "DATABASE_POOL_SIZE": str(pool_size),
            "DATABASE_MAX_OVERFLOW": str(max_overflow),
            # The benchmark sends hundreds of requests per second per user, far more than any
            # UI; the per-user limit (200/s by default) would answer 429s and measure nothing.
            "RATE_LIMIT_PER_SECOND": "0",
            # LOG_LEVEL is left at its default (INFO): production logs one line per request,
            # and the benchmark measures that too.
            "BETTER_AUTH_SESSION_LOOKUP": "false",
            "BETTER_AUTH_SESSION_COOKIE": "false",
        }
    )
    for name in FORCED_EMPTY:
        env[name] = ""
    return env


@dataclass(slots=True)
class WorkerMemory:
    peak_rss_kb: int = 0  # the highest VmRSS polled, or VmHWM when higher
    last_rss_kb: int = 0


class Server:
    """A uvicorn master started the way the README's production command starts the app."""

    def __init__(
        self, name: str, target: str, workers: int, env: dict[str, str], log_dir: Path
    ) -> None:
        self.name = name
        self.target = target
        self.workers = workers
        self.env = env
        self.port = free_port()
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.memory: dict[int, WorkerMemory] = {}
        self.final_rss_kb: dict[int, int] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        # `uv run --no-sync uvicorn ...` in the README; the same interpreter, minus uv's wrapper
        # process, so the uvicorn master is this script's child and its workers are easy to find.
        return [
            sys.executable,
            "-m",
            "uvicorn",
            self.target,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--timeout-graceful-shutdown",
            "20",
            "--no-server-header",
        ]

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=BACKEND_DIR,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group: Ctrl-C reaches this script, which stops it in order.
                start_new_session=True,
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise BenchError(f"the {self.name} exited during start-up:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health/ready", timeout=2) as answer:  # noqa: S310
                    if answer.status == 200 and len(self.worker_pids()) >= self.workers:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise BenchError(f"the {self.name} was not ready in time:\n{self.log_tail()}")

    def worker_pids(self) -> list[int]:
        if self.process is None or self.process.poll() is not None:
            return []
        if self.workers == 1:
            return [self.process.pid]  # uvicorn serves in the master itself
        return [pid for pid in child_pids(self.process.pid) if not is_helper_process(pid)]

    def sample_memory(self) -> None:
        for pid in self.worker_pids():
            status = read_proc_status(pid)
            if not status:
                continue
            rss, hwm = status.get("VmRSS", 0), status.get("VmHWM", 0)
            memory = self.memory.setdefault(pid, WorkerMemory())
            memory.peak_rss_kb = max(memory.peak_rss_kb, rss, hwm)
            memory.last_rss_kb = rss

    def record_final_memory(self) -> None:
        self.sample_memory()
        self.final_rss_kb = {
            pid: self.memory[pid].last_rss_kb for pid in self.worker_pids() if pid in self.memory
        }

    def stop(self) -> None:
        """SIGTERM to the master (it stops its workers gracefully); SIGKILL to the group if not."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            say(f"the {self.name} did not stop within {STOP_TIMEOUT_SECONDS} s: killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        # Workers that outlived their master (they should not) are in the same group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def log_lines(self) -> Iterator[str]:
        try:
            with self.log_path.open(errors="replace") as log:
                yield from log
        except OSError:
            return


INFO_LINE_MARKERS = ('"level":"INFO"', '"level":"DEBUG"')


def notable_log_lines(server: Server) -> list[str]:
    """The server's log without uvicorn's start-up and shutdown lines and without the app's
    INFO lines (one per request)."""
    return [
        line.rstrip("\n")
        for line in server.log_lines()
        if line.strip()
        and not line.startswith("INFO:")
        and not any(marker in line for marker in INFO_LINE_MARKERS)
    ]


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text()
            children.extend(int(child) for child in text.split())
        return children
    # Without /proc/<pid>/task/<tid>/children: scan every process's parent.
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat_fields(stat)[1]) == pid:  # the parent pid
                    children.append(int(entry.name))
    return children


def is_helper_process(pid: int) -> bool:
    """multiprocessing's resource tracker, should one exist: not a worker."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"resource_tracker" in cmdline


def read_proc_status(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return values
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            name, amount = line.split(":", 1)
            values[name] = int(amount.split()[0])
    return values


CPU_GROUPS = ("server", "postgres", "wrk", "rest")
SNAPSHOT_ATTEMPTS = 5


class CpuMeter:
    """Where the CPU goes during a run, per request: the measured server's workers, PostgreSQL's
    processes (when the database is on this machine and its processes are visible), wrk (its
    start-up included), and the rest of the machine's busy time (the kernel's work not charged
    to a process, anything else running). From /proc, so Linux only.

    PostgreSQL's group counts what each process has used and, for the postmaster, what its
    finished backends used (cutime + cstime): a backend that exits during a run, as pooled
    connections do when they reach their lifetime, stays counted.
    """

    def __init__(self, database_is_local: bool) -> None:
        self.available = Path("/proc/stat").exists()
        self.database_is_local = database_is_local

    def snapshot(self, server_pids: Iterable[int]) -> dict[str, float]:
        if not self.available:
            return {}
        server_pids = set(server_pids)
        for _ in range(SNAPSHOT_ATTEMPTS):
            server, postgres, children_ticks = self._scan(server_pids)
            # A backend reaped while /proc was being read moves its time into the postmaster's
            # cutime between two reads: lost, or counted twice. Such a scan is taken again.
            unchanged = (children_cpu_ticks(pid) == ticks for pid, ticks in children_ticks.items())
            if all(unchanged):
                break
        snapshot = {"server": server, "machine": machine_busy_seconds(Path("/proc/stat"))}
        if children_ticks:  # PostgreSQL's processes were seen
            snapshot["postgres"] = postgres
        return snapshot

    def _scan(self, server_pids: set[int]) -> tuple[float, float, dict[int, int]]:
        """The server's and PostgreSQL's CPU seconds, and each PostgreSQL process's reaped
        children's ticks as read."""
        server = postgres = 0.0
        children_ticks: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # gone since the listing
            if int(entry.name) in server_pids:
                server += process_cpu_seconds(stat)
            elif self.database_is_local and process_name(stat) == "postgres":
                postgres += process_cpu_seconds(stat, with_children=True)
                children_ticks[int(entry.name)] = stat_children_ticks(stat)
        return server, postgres, children_ticks


def cpu_per_request(
    before: dict[str, float], after: dict[str, float], requests: int, wrk_seconds: float
) -> dict[str, float]:
    """Microseconds per request by group. `rest` is the machine's busy time the groups leave; a
    group whose time went backwards (its processes restarted) is left out rather than guessed."""
    if not before or not after or requests <= 0:
        return {}
    spent: dict[str, float] = {
        name: after[name] - before[name]
        for name in ("server", "postgres")
        if name in before and name in after and after[name] >= before[name]
    }
    spent["wrk"] = wrk_seconds
    machine = after["machine"] - before["machine"]
    spent["rest"] = max(0.0, machine - sum(spent.values()))
    return {name: round(seconds / requests * 1e6, 1) for name, seconds in spent.items()}


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_name(stat: str) -> str:
    """The command name in a /proc/<pid>/stat line: between the first "(" and the last ")"."""
    return stat[stat.find("(") + 1 : stat.rfind(")")]


def stat_fields(stat: str) -> list[str]:
    # After the command name; fields[0] is the state, field 3 of proc(5).
    return stat[stat.rfind(")") + 1 :].split()


def process_cpu_seconds(stat: str, *, with_children: bool = False) -> float:
    """User and system time from a /proc/<pid>/stat line; with the reaped children's too."""
    fields = stat_fields(stat)
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
    if with_children:
        ticks += stat_children_ticks(stat)
    return ticks / CLOCK_TICKS


def stat_children_ticks(stat: str) -> int:
    fields = stat_fields(stat)
    return int(fields[13]) + int(fields[14])  # cutime, cstime: fields 16 and 17


def children_cpu_ticks(pid: int) -> int | None:
    """The reaped children's time of a process now; None once it is gone."""
    try:
        return stat_children_ticks(Path(f"/proc/{pid}/stat").read_text())
    except OSError:
        return None


def machine_busy_seconds(proc_stat: Path) -> float:
    """All CPUs' busy time so far: user, nice, system, irq and softirq (not idle, iowait or a
    hypervisor's steal; guest time is inside user already)."""
    first = proc_stat.read_text().split("\n", 1)[0].split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(value) for value in first[1:8])
    return (user + nice + system + irq + softirq) / CLOCK_TICKS


def children_cpu_seconds() -> float:
    """User and system time of this process's finished children (wrk, once it has exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return float(usage.ru_utime + usage.ru_stime)


def database_is_local(url: str) -> bool:
    """Whether the benchmark's database server runs on this machine, from the address psycopg
    actually connected to."""
    try:
        with psycopg.connect(url, connect_timeout=10) as connection:
            return is_loopback(connection.info.host, connection.info.hostaddr)
    except psycopg.Error:
        return False  # PostgreSQL's CPU is then shown as n/a; the runs say what is wrong


def is_loopback(host: str, hostaddr: str) -> bool:
    if host.startswith("/"):
        return True  # a Unix-domain socket's directory
    address = (hostaddr or host).strip("[]")
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address.lower() == "localhost"


class MemoryWatch(threading.Thread):
    """Polls the workers' VmRSS and VmHWM while the benchmark runs."""

    def __init__(self, servers: Sequence[Server]) -> None:
        super().__init__(name="memory-watch", daemon=True)
        self.servers = servers
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(MEMORY_POLL_SECONDS):
            for server in self.servers:
                server.sample_memory()


# --------------------------------------------------------------------------------------------
# wrk


def run_wrk(
    wrk: str, url: str, mode: str, users_file: Path, duration: int, connections: int
) -> WrkResult:
    command = [
        wrk,
        "-t",
        str(min(WRK_THREADS, connections)),
        "-c",
        str(connections),
        "-d",
        f"{duration}s",
        # Longer than the app's own request deadline (REQUEST_TIMEOUT_SECONDS, 11 s): every
        # request gets its answer into the percentiles; wrk's default (2 s) would drop slow
        # ones from the latency histogram and reconnect.
        "--timeout",
        f"{WRK_TIMEOUT_SECONDS}s",
        "--latency",
        "-s",
        str(WRK_SCRIPT),
        url,
        "--",
        mode,
        str(users_file),
    ]
    completed = subprocess.run(
        command, capture_output=True, text=True, check=False, timeout=duration + 120
    )
    for line in completed.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return parse_wrk_json(json.loads(line.removeprefix("BENCH_JSON ")))
    raise BenchError(
        f"wrk printed no result (exit {completed.returncode}):\n"
        + completed.stdout[-2000:]
        + completed.stderr[-2000:]
    )


def parse_wrk_json(data: dict[str, Any]) -> WrkResult:
    duration_s = data["duration_us"] / 1_000_000 or 1.0
    latency = data["latency_us"]
    socket_errors = {
        name: int(data["errors"][name]) for name in ("connect", "read", "write", "timeout")
    }
    unexpected = int(data["unexpected_status"])
    return WrkResult(
        requests=int(data["requests"]),
        duration_s=round(duration_s, 3),
        rps=round(data["requests"] / duration_s, 1),
        p50_ms=latency["p50"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p95_ms=latency["p95"] / 1000,
        p99_ms=latency["p99"] / 1000,
        max_ms=latency["max"] / 1000,
        mean_ms=round(latency["mean"] / 1000, 3),
        errors=unexpected + sum(socket_errors.values()),
        unexpected_status=unexpected,
        socket_errors=socket_errors,
        statuses={str(code): int(count) for code, count in data["statuses"].items()},
    )


def median_result(runs: Sequence[WrkResult]) -> WrkResult:
    """One result for several runs of a scenario: each rate and percentile the median of the
    runs' (the typical run's, not the best one's), the highest maximum, every count summed."""
    if len(runs) == 1:
        return runs[0]

    def median(values: Iterable[float]) -> float:
        return round(statistics.median(values), 3)

    socket_errors: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    for run in runs:
        socket_errors.update(run.socket_errors)
        statuses.update(run.statuses)
    return WrkResult(
        requests=sum(run.requests for run in runs),
        duration_s=round(sum(run.duration_s for run in runs), 3),
        rps=round(statistics.median(run.rps for run in runs), 1),
        p50_ms=median(run.p50_ms for run in runs),
        p90_ms=median(run.p90_ms for run in runs),
        p95_ms=median(run.p95_ms for run in runs),
        p99_ms=median(run.p99_ms for run in runs),
        max_ms=max(run.max_ms for run in runs),
        mean_ms=median(run.mean_ms for run in runs),
        errors=sum(run.errors for run in runs),
        unexpected_status=sum(run.unexpected_status for run in runs),
        socket_errors=dict(socket_errors),
        statuses=dict(statuses),
        cpu_us={
            name: median(run.cpu_us[name] for run in runs)
            for name in CPU_GROUPS
            if all(name in run.cpu_us for run in runs)
        },
    )


# --------------------------------------------------------------------------------------------
# The report


def fmt_ms(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def mark(passed: bool | None) -> str:
    return "n/a " if passed is None else ("PASS" if passed else "MISS")


def evaluate_targets(
    results: dict[str, ScenarioResult], app: Server
) -> list[tuple[str, bool | None, str]]:
    targets: list[tuple[str, bool | None, str]] = []
    measured = [result for result in results.values() if not result.diagnostic]
    if measured:
        worst = max(measured, key=lambda result: result.ours.p99_ms)
        targets.append(
            (
                f"p99 <= {TARGET_P99_MS:.0f} ms in every scenario",
                worst.ours.p99_ms <= TARGET_P99_MS,
                f"worst: {worst.scenario} {fmt_ms(worst.ours.p99_ms)} ms",
            )
        )
        failing = [f"{r.scenario} {r.ours.errors}" for r in measured if r.ours.errors]
        targets.append(
            (
                "no errors in every scenario",
                not failing,
                ", ".join(failing) if failing else "0 errors",
            )
        )
    else:
        targets.append((f"p99 <= {TARGET_P99_MS:.0f} ms in every scenario", None, "not run"))
        targets.append(("no errors in every scenario", None, "not run"))
    for name, minimum in TARGET_RATIOS.items():
        result = results.get(name)
        label = f"{name} ours/baseline >= {minimum}"
        if result is None:
            targets.append((label, None, "not run"))
        else:
            targets.append((label, result.ratio >= minimum, f"{result.ratio:.2f}"))
    small, large = results.get("list"), results.get("list-large")
    label = f"list-large p50 <= {TARGET_LARGE_LIST_P50_FACTOR} x list p50"
    if small is None or large is None:
        targets.append((label, None, "not run (needs list and list-large; not in --quick)"))
    else:
        factor = large.ours.p50_ms / small.ours.p50_ms if small.ours.p50_ms else 0.0
        targets.append(
            (
                label,
                factor <= TARGET_LARGE_LIST_P50_FACTOR,
                f"{factor:.2f}x ({fmt_ms(large.ours.p50_ms)} / {fmt_ms(small.ours.p50_ms)} ms)",
            )
        )
    label = f"RSS per worker after the run <= {TARGET_RSS_MB:.0f} MB"
    if app.final_rss_kb:
        highest = max(app.final_rss_kb.values()) / 1024
        targets.append((label, highest <= TARGET_RSS_MB, f"highest {highest:.1f} MB"))
    else:
        targets.append((label, None, "no worker seen"))
    return targets


def memory_lines(server: Server) -> list[str]:
    lines = []
    for pid, memory in sorted(server.memory.items()):
        after = server.final_rss_kb.get(pid)
        after_text = f"{after / 1024:.1f} MB after the run" if after else "gone before the end"
        lines.append(f"    pid {pid}: peak {memory.peak_rss_kb / 1024:.1f} MB, {after_text}")
    return lines or ["    (no worker seen)"]


def print_report(
    out: TextIO,
    *,
    info: dict[str, Any],
    results: dict[str, ScenarioResult],
    app: Server,
    baseline: Server,
    targets: list[tuple[str, bool | None, str]],
) -> None:
    machine, code, run = info["machine"], info["code"], info["run"]
    print("", file=out)
    print(f"Todo API benchmark, {info['date']}", file=out)
    print(
        f"machine: {machine['cpus']} CPUs ({machine['cpus_usable']} usable), "
        f"{machine['cpu_model']}, {machine['memory_gib']} GiB RAM, kernel {machine['kernel']}; "
        f"load average at start {' '.join(str(v) for v in machine['load_average'])}",
        file=out,
    )
    dirty = (
        f" + uncommitted changes (diff sha256 {code['diff_sha256']})"
        if code["uncommitted_changes"]
        else ""
    )
    print(
        f"code: git {code['commit'][:12]}{dirty}; Python {machine['python']}; "
        f"PostgreSQL {run['postgresql']}; wrk {run['wrk']}",
        file=out,
    )
    print(
        f"run: uvicorn --workers {run['workers']} --loop uvloop --http httptools, app and "
        f"baseline alike; ENVIRONMENT=production, RATE_LIMIT_PER_SECOND=0, pool "
        f"{run['pool_size']}+{run['max_overflow']} per worker, DATABASE_PREPARED_STATEMENTS="
        f"{run.get('prepared_statements', 'true')}; wrk -t{run['wrk_threads']} "
        f"-c{run['connections']}, {run['warmup']} s warm-up + {run['duration']} s per run"
        + (
            f"; {run['repeat']} runs per scenario and server, taking turns: each number is the "
            "median over the runs"
            if run.get("repeat", 1) > 1
            else ""
        ),
        file=out,
    )
    print(f"data: {run['data']}", file=out)
    print("", file=out)
    header = (
        f"{'scenario':<16} {'ours rps':>9} {'base rps':>9} {'ratio':>6} {'p50 ms':>7} "
        f"{'p95 ms':>7} {'p99 ms':>7} {'base p99':>8}  errors ours/base"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for name in DISPLAY_ORDER:
        result = results.get(name)
        if result is None:
            continue
        ours, base = result.ours, result.baseline
        label = name + (" *" if result.diagnostic else "")
        print(
            f"{label:<16} {ours.rps:>9.1f} {base.rps:>9.1f} {result.ratio:>6.2f} "
            f"{fmt_ms(ours.p50_ms):>7} {fmt_ms(ours.p95_ms):>7} {fmt_ms(ours.p99_ms):>7} "
            f"{fmt_ms(base.p99_ms):>8}  {ours.errors}/{base.errors}",
            file=out,
        )
    for name in DISPLAY_ORDER:
        if name in results and results[name].diagnostic:
            print(f"* {name}: diagnostic, no target: {DIAGNOSTIC_NOTES[name]}", file=out)
    odd = [
        f"{name} ({target}): {result_statuses(getattr(result, target))}"
        for name, result in results.items()
        for target in ("ours", "baseline")
        if getattr(result, target).errors
    ]
    if odd:
        print("errors by kind: " + "; ".join(odd), file=out)
    ratio_lines = p50_ratio_report(results)
    if ratio_lines:
        print("", file=out)
        for line in ratio_lines:
            print(line, file=out)
    cpu_lines = cpu_report(results)
    if cpu_lines:
        print("", file=out)
        for line in cpu_lines:
            print(line, file=out)
    print("", file=out)
    print("peak RSS per app worker (VmHWM / polled VmRSS):", file=out)
    for line in memory_lines(app):
        print(line, file=out)
    print("baseline workers, for comparison:", file=out)
    for line in memory_lines(baseline):
        print(line, file=out)
    print("", file=out)
    print(
        "targets (ours; 2 cores, load generator on the same machine, "
        f"{run['workers']} workers, {run['connections']} connections):",
        file=out,
    )
    for label, passed, detail in targets:
        print(f"  {mark(passed)}  {label:<42} {detail}", file=out)
    if run["workers"] != 2 or run["connections"] != 50:
        print("  (the targets are stated for 2 workers and 50 connections)", file=out)
    print("", file=out)


def p50_ratio_report(results: dict[str, ScenarioResult]) -> list[str]:
    """list-large's p50 against list's (the target), and against list-1m's: the same requests
    as list, run right after list-large, so a machine that slowed down since list shows here."""
    large = results.get("list-large")
    if large is None:
        return []
    lines = []
    for name in ("list", "list-1m"):
        small = results.get(name)
        if small is None or not small.ours.p50_ms:
            continue
        lines.append(
            f"list-large p50 / {name} p50: ours {large.ours.p50_ms / small.ours.p50_ms:.2f} "
            f"({fmt_ms(large.ours.p50_ms)} / {fmt_ms(small.ours.p50_ms)} ms), baseline "
            f"{large.baseline.p50_ms / (small.baseline.p50_ms or 1):.2f} "
            f"({fmt_ms(large.baseline.p50_ms)} / {fmt_ms(small.baseline.p50_ms)} ms)"
            + (" [target]" if name == "list" else "")
        )
    return lines


def cpu_report(results: dict[str, ScenarioResult]) -> list[str]:
    """CPU microseconds per request by process group, ours and the baseline's, per scenario."""

    def cells(cpu: dict[str, float]) -> str:
        return " / ".join(f"{cpu[name]:>5.0f}" if name in cpu else "  n/a" for name in CPU_GROUPS)

    rows = [
        f"{name:<16} {cells(result.ours.cpu_us)}     {cells(result.baseline.cpu_us)}"
        for name in DISPLAY_ORDER
        if (result := results.get(name)) is not None and result.ours.cpu_us
    ]
    if not rows:
        return []
    return [
        "CPU per request, µs: server workers / PostgreSQL / wrk (its start-up too) / the rest",
        f"{'scenario':<16} {'ours':<29}     baseline",
        *rows,
    ]


def result_statuses(result: WrkResult) -> str:
    parts = [f"HTTP {code}: {count}" for code, count in sorted(result.statuses.items())]
    parts += [f"{kind}: {count}" for kind, count in result.socket_errors.items() if count]
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# The run


@dataclass(slots=True)
class Options:
    duration: int
    warmup: int
    connections: int
    workers: int
    quick: bool
    database_url: str
    json_path: Path | None
    scenarios: tuple[str, ...]
    keep_database: bool
    fail_on_miss: bool
    repeat: int = 1


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark the app against a bare Starlette baseline with wrk.",
    )
    parser.add_argument(
        "--duration", type=int, help="seconds per measured run (default 10; 3 with --quick)"
    )
    parser.add_argument(
        "--warmup", type=int, help="seconds of warm-up before each run (default 3; 1 with --quick)"
    )
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers per server (2)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke check: small dataset only (no 1M rows), short runs",
    )
    parser.add_argument(
        "--database-url",
        default=DEFAULT_DATABASE_URL,
        help="the database to (re)create, drop and use; its name must contain 'bench' "
        f"(default {DEFAULT_DATABASE_URL})",
    )
    parser.add_argument("--json", type=Path, dest="json_path", help="also write results here")
    parser.add_argument(
        "--scenarios",
        help=f"comma-separated subset of: {', '.join(SCENARIO_NAMES)} (default: all; "
        "with --quick those on the small dataset)",
    )
    parser.add_argument(
        "--keep-database", action="store_true", help="leave the bench database after the run"
    )
    parser.add_argument(
        "--fail-on-miss", action="store_true", help="exit with status 3 when a target is missed"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measured runs per scenario and server, taking turns; the table shows each "
        "number's median over the runs (default 1)",
    )
    arguments = parser.parse_args(argv)
    if arguments.scenarios:
        chosen = tuple(name.strip() for name in arguments.scenarios.split(",") if name.strip())
        unknown = sorted(set(chosen) - set(SCENARIO_NAMES))
        if unknown:
            parser.error(f"unknown scenarios: {', '.join(unknown)}")
    elif arguments.quick:
        chosen = tuple(s.name for s in SCENARIOS if s.phase == "small")
    else:
        chosen = SCENARIO_NAMES
    if arguments.connections < 1 or arguments.workers < 1 or arguments.repeat < 1:
        parser.error("--connections, --workers and --repeat must be at least 1")
    duration = arguments.duration or (3 if arguments.quick else 10)
    warmup = arguments.warmup if arguments.warmup is not None else (1 if arguments.quick else 3)
    if duration < 1 or warmup < 0:
        parser.error("--duration must be at least 1 and --warmup at least 0")
    return Options(
        duration=duration,
        warmup=warmup,
        connections=arguments.connections,
        workers=arguments.workers,
        quick=arguments.quick,
        database_url=arguments.database_url,
        json_path=arguments.json_path,
        scenarios=chosen,
        keep_database=arguments.keep_database,
        fail_on_miss=arguments.fail_on_miss,
        repeat=arguments.repeat,
    )


def raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[None]:
    previous = {
        sig: signal.signal(sig, raise_interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    started = time.monotonic()
    try:
        with stopping_on_signals():
            return benchmark(options, started)
    except BenchError as error:
        say(f"failed: {error}")
        return 1
    except psycopg.Error as error:
        say(f"failed: PostgreSQL said: {type(error).__name__}: {error}")
        return 1
    except (KeyboardInterrupt, Interrupted):
        say("interrupted: every process the benchmark started has been stopped")
        return 130


def benchmark(options: Options, started: float) -> int:
    database_name(options.database_url)  # refuse a database that is not the benchmark's first
    wrk = ensure_wrk()
    chosen = [s for s in SCENARIOS if s.name in options.scenarios]
    secret = secrets.token_urlsafe(48)  # 64 characters: over the 32 bytes production requires
    pool_size = int(os.environ.get("DATABASE_POOL_SIZE", "5"))
    max_overflow = int(os.environ.get("DATABASE_MAX_OVERFLOW", "5"))
    env = server_env(options.database_url, secret, pool_size, max_overflow)
    info: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": machine_info(),
        "code": git_info(),
    }
    if info["machine"]["load_average"][0] > 0.5:
        say(
            f"the machine is not idle (load {info['machine']['load_average'][0]}): "
            "numbers will be lower and noisier than on an idle machine"
        )
    if (BACKEND_DIR / ".env").exists():
        say("backend/.env exists: the benchmark's environment overrides the settings it sets")

    servers: list[Server] = []
    watch: MemoryWatch | None = None
    database_created = False
    with tempfile.TemporaryDirectory(prefix="todo-bench-") as scratch:
        work = Path(scratch)
        try:
            say(f"recreating database {database_name(options.database_url)}")
            recreate_database(options.database_url)
            database_created = True
            migrate(env)
            say("migrated (alembic upgrade head)")
            postgresql = server_version(options.database_url)
            check_connection_budget(
                options.database_url, 2 * options.workers * (pool_size + max_overflow)
            )

            seed_started = time.monotonic()
            small = Dataset(better_auth_like_ids(SMALL_USERS, "todo-bench-small"))
            seed(options.database_url, small.users, SMALL_TASKS, datetime(2026, 1, 1, tzinfo=UTC))
            small.task_ids = task_ids_by_user(options.database_url, small.users)
            seeded_max_id = max_task_id(options.database_url)
            small_file = work / "small_users.txt"
            write_users_file(small_file, small, secret, with_ids=True)
            say(
                f"seeded {SMALL_USERS} users x {SMALL_TASKS} tasks in "
                f"{time.monotonic() - seed_started:.1f} s"
            )
            data_text = f"small {SMALL_USERS} users x {SMALL_TASKS} tasks"

            app = Server("app", "main:app", options.workers, env, work)
            baseline = Server("baseline", "bench.baseline:app", options.workers, env, work)
            servers.extend([app, baseline])
            for server in servers:
                server.start()
            for server in servers:
                server.wait_ready()
            say(
                f"app on {app.url} (workers {app.worker_pids()}), baseline on {baseline.url} "
                f"(workers {baseline.worker_pids()})"
            )
            watch = MemoryWatch(servers)
            watch.start()

            files = {"small": small_file}
            results: dict[str, ScenarioResult] = {}
            meter = CpuMeter(database_is_local(options.database_url))
            large_file = work / "large_users.txt"
            for phase in PHASES:
                phase_scenarios = [s for s in chosen if s.phase == phase]
                if not phase_scenarios:
                    continue
                if phase != "small" and "large" not in files:
                    seed_started = time.monotonic()
                    say(
                        f"seeding {LARGE_USERS:,} users x {LARGE_TASKS} tasks "
                        f"({LARGE_USERS * LARGE_TASKS:,} rows)"
                    )
                    large = Dataset(better_auth_like_ids(LARGE_USERS, "todo-bench-large"))
                    seed(
                        options.database_url,
                        large.users,
                        LARGE_TASKS,
                        datetime(2026, 2, 1, tzinfo=UTC),
                    )
                    seeded_max_id = max_task_id(options.database_url)
                    write_users_file(large_file, large, secret, with_ids=False)
                    files["large"] = large_file
                    seconds = time.monotonic() - seed_started
                    say(f"seeded the large dataset in {seconds:.1f} s")
                    data_text += (
                        f"; large {LARGE_USERS:,} users x {LARGE_TASKS} tasks "
                        f"({LARGE_USERS * LARGE_TASKS:,} rows, seeded in {seconds:.0f} s)"
                    )
                for scenario in phase_scenarios:
                    results[scenario.name] = run_scenario(
                        scenario, options, wrk, app, baseline, files, seeded_max_id, meter
                    )

            for server in servers:
                server.record_final_memory()
            watch.halt.set()
            watch.join()
            info["run"] = {
                "workers": options.workers,
                "repeat": options.repeat,
                "connections": options.connections,
                "wrk_threads": min(WRK_THREADS, options.connections),
                "duration": options.duration,
                "warmup": options.warmup,
                "pool_size": pool_size,
                "max_overflow": max_overflow,
                "prepared_statements": env.get("DATABASE_PREPARED_STATEMENTS", "true"),
                "postgresql": postgresql,
                "wrk": wrk_version(wrk),
                "data": data_text,
            }
            for server in servers:
                server.stop()
            app_log = notable_log_lines(app)
            baseline_log = notable_log_lines(baseline)

            targets = evaluate_targets(results, app)
            print_report(
                sys.stdout,
                info=info,
                results=results,
                app=app,
                baseline=baseline,
                targets=targets,
            )
            for server, lines in ((app, app_log), (baseline, baseline_log)):
                if lines:
                    print(f"{server.name} logged {len(lines)} warnings or errors; the last ones:")
                    for line in lines[-8:]:
                        print(f"    {line[:300]}")
            elapsed = time.monotonic() - started
            print(f"benchmark took {elapsed / 60:.1f} min")
            if options.json_path is not None:
                write_json(options.json_path, info, results, app, baseline, targets, elapsed)
                say(f"results written to {options.json_path}")
            missed = any(passed is False for _, passed, _ in targets)
            return 3 if options.fail_on_miss and missed else 0
        except BaseException:
            for server in servers:
                if server.process is not None:
                    say(f"{server.name} log, the last lines:\n{server.log_tail(10)}")
            raise
        finally:
            # A second Ctrl-C (or the one `uv run` forwards) must not cut the clean-up short.
            with signals_ignored():
                if watch is not None:
                    watch.halt.set()
                for server in servers:
                    server.stop()
                if database_created and not options.keep_database:
                    with contextlib.suppress(psycopg.Error):
                        drop_database(options.database_url)


def run_scenario(
    scenario: Scenario,
    options: Options,
    wrk: str,
    app: Server,
    baseline: Server,
    files: dict[str, Path],
    seeded_max_id: int,
    meter: CpuMeter,
) -> ScenarioResult:
    runs: dict[str, list[WrkResult]] = {app.name: [], baseline.name: []}
    users_file = files[scenario.dataset]
    if options.warmup and not scenario.writes:
        # Both warm before either is measured: the first run on a dataset would otherwise warm
        # PostgreSQL's buffers for the second.
        for server in (app, baseline):
            run_wrk(wrk, server.url, scenario.mode, users_file, options.warmup, options.connections)
    # With --repeat, the servers take turns: app, baseline, app, baseline, …
    for _ in range(options.repeat):
        for server in (app, baseline):
            if options.warmup and scenario.writes:
                run_wrk(
                    wrk, server.url, scenario.mode, users_file, options.warmup, options.connections
                )
            workers = server.worker_pids()
            before, wrk_before = meter.snapshot(workers), children_cpu_seconds()
            result = run_wrk(
                wrk, server.url, scenario.mode, users_file, options.duration, options.connections
            )
            result.cpu_us = cpu_per_request(
                before,
                meter.snapshot(workers),
                result.requests,
                wrk_seconds=children_cpu_seconds() - wrk_before,
            )
            runs[server.name].append(result)
            say(
                f"{scenario.name:<16} {server.name:<8} {result.rps:>8.1f} req/s  "
                f"p50 {fmt_ms(result.p50_ms)}  p99 {fmt_ms(result.p99_ms)} ms  "
                f"errors {result.errors}"
            )
            if scenario.writes:
                reset_writes(options.database_url, seeded_max_id)
    return ScenarioResult(
        scenario=scenario.name,
        what=scenario.what,
        diagnostic=scenario.diagnostic,
        ours_runs=runs[app.name],
        baseline_runs=runs[baseline.name],
    )


def write_json(
    path: Path,
    info: dict[str, Any],
    results: dict[str, ScenarioResult],
    app: Server,
    baseline: Server,
    targets: list[tuple[str, bool | None, str]],
    elapsed: float,
) -> None:
    def memory(server: Server) -> list[dict[str, Any]]:
        return [
            {
                "pid": pid,
                "peak_rss_mb": round(entry.peak_rss_kb / 1024, 1),
                "rss_after_run_mb": round(server.final_rss_kb[pid] / 1024, 1)
                if pid in server.final_rss_kb
                else None,
            }
            for pid, entry in sorted(server.memory.items())
        ]

    document = {
        **info,
        "elapsed_seconds": round(elapsed, 1),
        "scenarios": {
            name: {
                "what": result.what,
                "diagnostic": result.diagnostic,
                "ratio": round(result.ratio, 3),
                "ours": asdict(result.ours),
                "baseline": asdict(result.baseline),
                "ours_runs": [asdict(run) for run in result.ours_runs],
                "baseline_runs": [asdict(run) for run in result.baseline_runs],
            }
            for name, result in results.items()
        },
        "memory": {"app": memory(app), "baseline": memory(baseline)},
        "targets": [
            {"target": label, "passed": passed, "detail": detail}
            for label, passed, detail in targets
        ],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
