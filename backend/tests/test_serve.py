"""The production server (serve.py): workers with a socket each, as the README starts them.

Each test starts `python serve.py` for real (two uvicorn workers on the embedded SQLite) and looks
at it from the outside: which process holds which connection (/proc), signals, exit statuses.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pytest

from config import BACKEND_DIR
from serve import MIN_WORKER_LIFETIME_SECONDS
from tests.support import TEST_SECRET, free_port

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="sockets per worker are Linux's")

LISTEN, ESTABLISHED = "0A", "01"


def tcp_sockets(port: int, state: str) -> dict[str, int]:
    """Inode -> remote port of this machine's IPv4 TCP sockets on local `port` in `state`."""
    found: dict[str, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port and fields[3] == state:
            found[fields[9]] = int(fields[2].rsplit(":", 1)[1], 16)
    return found


def socket_owners(pids: list[int], inodes: set[str]) -> Counter[int]:
    owners: Counter[int] = Counter()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                owners[pid] += 1
    return owners


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.extend(int(child) for child in (task / "children").read_text().split())
    return found


class RunningServer:
    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.port = port

    def workers(self) -> list[int]:
        """The supervisor's children but multiprocessing's resource tracker."""
        return [
            pid
            for pid in children(self.process.pid)
            if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]

    def wait_until_serving(self, workers: int = 2) -> list[int]:
        """The worker pids, once `workers` of them listen and /health answers."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "serve.py exited while starting"
            pids = self.workers()
            listening = socket_owners(pids, set(tcp_sockets(self.port, LISTEN)))
            if len(listening) == workers == len(pids):
                with_health = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5)
                assert with_health.status_code == 200
                return pids
            time.sleep(0.1)
        raise AssertionError(f"{workers} workers were not listening in time")


@contextmanager
def serve(tmp_path: Path, *arguments: str, **environment: str) -> Iterator[RunningServer]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "serve.py", "--port", str(port), *arguments],
        cwd=BACKEND_DIR,
        env={
            **os.environ,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}",
            "BETTER_AUTH_SECRET": TEST_SECRET,
            "ENVIRONMENT": "test",
            "LOG_LEVEL": "WARNING",
            **environment,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield RunningServer(process, port)
    finally:
        if process.poll() is None:
            for pid in children(process.pid):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.kill()
        process.wait()


def test_a_burst_of_connections_is_shared_between_the_workers(tmp_path: Path) -> None:
    # uvicorn's own `--workers 2` gives all 40 to one worker here: with one shared socket, the
    # first worker to run accepts them all before the other gets the CPU they share.
    with serve(tmp_path, "--workers", "2") as server:
        workers = server.wait_until_serving()
        for pid in workers:
            os.sched_setaffinity(pid, {min(os.sched_getaffinity(0))})
            os.kill(pid, signal.SIGSTOP)
        try:
            clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        try:
            deadline = time.monotonic() + 10
            while True:
                owners = socket_owners(workers, set(tcp_sockets(server.port, ESTABLISHED)))
                if sum(owners.values()) == 40 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert sum(owners.values()) == 40
            # Each side of a fair coin 40 times: fewer than 10 happens once in 10,000 runs.
            assert min(owners[pid] for pid in workers) >= 10, owners
            for client in clients[:2]:
                client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert client.recv(4096).startswith(b"HTTP/1.1 200")
        finally:
            for client in clients:
                client.close()


def test_a_worker_that_dies_is_replaced(tmp_path: Path) -> None:
    with serve(tmp_path, "--workers", "2") as server:
        first, second = server.wait_until_serving()
        time.sleep(MIN_WORKER_LIFETIME_SECONDS + 0.5)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            workers = server.workers()
            if first not in workers and len(workers) == 2:
                break
            time.sleep(0.1)
        replaced = server.wait_until_serving()
        assert second in replaced
        assert first not in replaced  # and the new one listens (wait_until_serving)
        for _ in range(20):
            assert httpx.get(f"http://127.0.0.1:{server.port}/health").status_code == 200


def test_sigterm_stops_workers_then_the_supervisor(tmp_path: Path) -> None:
    with serve(tmp_path, "--workers", "2") as server:
        workers = server.wait_until_serving()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or "Z" in status_state(pid)
        output = server.process.stdout.read().decode() if server.process.stdout else ""
        assert "Stopped supervisor process" in output
        # The address is free again, for a plain socket that does not share it.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", server.port))


def status_state(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("State:"):
            return line
    return ""


def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path: Path) -> None:
    # Production refuses a short secret: the workers exit at once, and the supervisor with
    # them rather than starting new ones forever.
    with serve(
        tmp_path, "--workers", "2", ENVIRONMENT="production", BETTER_AUTH_SECRET="tiny-secret-value"
    ) as server:
        assert server.process.wait(timeout=60) != 0
        output = server.process.stdout.read().decode() if server.process.stdout else ""
        assert "after it started; stopping" in output
        assert "BETTER_AUTH_SECRET" in output
        assert "tiny-secret-value" not in output


def test_an_address_in_use_is_refused_before_any_worker_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        completed = subprocess.run(
            [sys.executable, "serve.py", "--port", str(port), "--workers", "2"],
            cwd=BACKEND_DIR,
            env={**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert completed.returncode == 1
    assert f"Cannot listen on 127.0.0.1:{port}" in completed.stderr
    assert "Started supervisor" not in completed.stderr
