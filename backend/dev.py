#!/usr/bin/env python3
"""Developer commands needing nothing but Python >= 3.11: uv and the environment install themselves.

    python3 backend/dev.py serve [--host HOST] [--port PORT] [--reload]
        Start the API (embedded SQLite unless NEON_DATABASE_URL/DATABASE_URL is set); the schema
        is migrated at start-up.
    python3 backend/dev.py serve --production [--host 0.0.0.0] [--workers 2]
        The production server: no development packages, ENVIRONMENT=production (unless set),
        uvloop and httptools, N worker processes, graceful shutdown on SIGTERM.
    python3 backend/dev.py test [PYTEST ARGS...]
        Lint, type-check and run every test (SQLite, PostgreSQL, the real Better Auth server).
    python3 backend/dev.py check
        Lint and type-check only.
    python3 backend/dev.py migrate
        Apply the migrations to the configured database (a release-pipeline step).
    python3 backend/dev.py bench [--quick] [BENCH OPTIONS...]
        The performance benchmark (bench/README.md): the app in production mode and a bare
        baseline on PostgreSQL, driven by wrk; prints the table and the targets.
    python3 backend/dev.py token USER_ID [--minutes N]
        Print an HS256 token for USER_ID signed with the configured BETTER_AUTH_SECRET.

Works from any directory. uv comes from PATH, or is installed once into backend/.tools.
"""

import argparse
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

BACKEND_DIR = Path(__file__).resolve().parent
TOOLS_DIR = BACKEND_DIR / ".tools"
UV_REQUIREMENT = "uv>=0.13,<0.14"

if sys.version_info < (3, 11):  # noqa: UP036  (this file must explain itself on old Pythons too)
    sys.exit("Python 3.11 or newer is needed; this is " + sys.version.split()[0])


def say(message: str) -> None:
    print(f"[dev] {message}", file=sys.stderr, flush=True)


def find_uv() -> str:
    found = shutil.which("uv")
    if found:
        return found
    scripts = "Scripts" if os.name == "nt" else "bin"
    executable = "uv.exe" if os.name == "nt" else "uv"
    for candidate in (TOOLS_DIR / scripts / executable, TOOLS_DIR / "pip" / "bin" / executable):
        if candidate.exists():
            return str(candidate)
    say("uv is not installed: installing it into backend/.tools (once)")
    try:
        venv.create(TOOLS_DIR, with_pip=True, clear=True)
        python = TOOLS_DIR / scripts / ("python.exe" if os.name == "nt" else "python")
        pip_install([str(python), "-m", "pip"], [UV_REQUIREMENT])
        return str(TOOLS_DIR / scripts / executable)
    except (subprocess.CalledProcessError, OSError) as error:
        # Some distributions ship Python without ensurepip; pip itself may still be there.
        say(f"a virtual environment for uv could not be made ({error}); trying pip --target")
        pip_install(
            [sys.executable, "-m", "pip"], ["--target", str(TOOLS_DIR / "pip"), UV_REQUIREMENT]
        )
        return str(TOOLS_DIR / "pip" / "bin" / executable)


def pip_install(pip: list[str], arguments: list[str]) -> None:
    subprocess.run(
        [*pip, "install", "--quiet", "--disable-pip-version-check", *arguments], check=True
    )


def sync(uv: str, *, development: bool = True) -> None:
    """Create or update backend/.venv exactly as uv.lock says (fast when nothing changed)."""
    extra = [] if development else ["--no-dev"]
    subprocess.run(
        [uv, "sync", "--frozen", "--python", sys.executable, "--quiet", *extra],
        cwd=BACKEND_DIR,
        check=True,
    )


def start_server(uv: str, arguments: argparse.Namespace) -> int:
    command = ["uvicorn", "main:app", "--host", arguments.host, "--port", str(arguments.port)]
    if arguments.production:
        os.environ.setdefault("ENVIRONMENT", "production")
        command += ["--workers", str(arguments.workers), "--timeout-graceful-shutdown", "20"]
        command += ["--no-server-header"]
        if os.name != "nt":
            command += ["--loop", "uvloop", "--http", "httptools"]
    elif arguments.reload:
        command.append("--reload")
    return become(uv, *command)


def become(uv: str, *command: str) -> int:
    """Replace this process with `uv run COMMAND`: signals sent to us (SIGTERM from a
    supervisor, Ctrl-C) then reach the server or the benchmark itself, which clean up."""
    if os.name == "nt":
        return run(uv, *command)
    os.chdir(BACKEND_DIR)
    os.execv(uv, [uv, "run", "--frozen", "--no-sync", *command])
    return 0  # not reached: the command replaced this process


def run(uv: str, *command: str) -> int:
    try:
        return subprocess.run(
            [uv, "run", "--frozen", "--no-sync", *command], cwd=BACKEND_DIR
        ).returncode
    except KeyboardInterrupt:
        return 130


PASS_THROUGH = frozenset({"test", "bench"})


def parse_arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The command and its options; for `test` and `bench`, everything after the command goes
    to pytest or the benchmark as it is (argparse alone would reject `test -k toggle`)."""
    passed: list[str] = []
    if argv and argv[0] in PASS_THROUGH:
        argv, passed = argv[:1], argv[1:]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the API")
    serve.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    serve.add_argument("--port", default=os.environ.get("PORT", "8000"))
    serve.add_argument("--reload", action="store_true", help="restart on code changes")
    serve.add_argument("--production", action="store_true", help="the production server")
    serve.add_argument("--workers", default=os.environ.get("WEB_CONCURRENCY", "2"))
    commands.add_parser(
        "test", help="lint, type-check and run every test; what follows goes to pytest"
    )
    commands.add_parser("check", help="lint and type-check")
    commands.add_parser("migrate", help="apply the migrations to the configured database")
    commands.add_parser(
        "bench", help="run the performance benchmark; what follows goes to it (--quick, --json F)"
    )
    token = commands.add_parser("token", help="print a development token")
    token.add_argument("user_id")
    token.add_argument("--minutes", default="60")
    return parser.parse_args(argv), passed


def main() -> int:
    arguments, passed = parse_arguments(sys.argv[1:])
    uv = find_uv()
    sync(uv, development=not (arguments.command == "serve" and arguments.production))
    if arguments.command == "serve":
        return start_server(uv, arguments)
    if arguments.command in {"test", "check"}:
        for step in (("ruff", "check", "."), ("ruff", "format", "--check", "."), ("mypy", ".")):
            say(" ".join(step))
            if code := run(uv, *step):
                return code
        if arguments.command == "check":
            return 0
        say("pytest " + " ".join(passed))
        return run(uv, "pytest", *passed)
    if arguments.command == "bench":
        return become(uv, "python", "-m", "bench.run", *passed)
    if arguments.command == "migrate":
        return run(uv, "alembic", "upgrade", "head")
    return run(uv, "python", "dev_token.py", arguments.user_id, "--minutes", arguments.minutes)


if __name__ == "__main__":
    sys.exit(main())
