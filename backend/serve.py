"""The production server: uvicorn workers that each listen on a socket of their own.

    uv run --no-sync python serve.py --host 0.0.0.0 --port 8000 --workers 2   (from backend/)

`uvicorn --workers N` binds one listening socket and hands it to every worker, and whichever
worker gets to accept() first takes the connection. When clients connect in a burst (a proxy
opening its keep-alive pool, a deploy, a load test) one worker can end up holding most of them:
measured with wrk's 50 connections on two workers, splits of 48/2 and 44/6 and, in half the
runs, 30/20 or worse. Each worker has its own database pool, so the crowded worker's requests
queue for its connections while the other's stay idle: its median wait for a connection was
24 ms against 4 ms, and the p99 of the whole run nearly doubled.

Here, on Linux, every worker binds its own socket to the address with SO_REUSEPORT, and the
kernel assigns each new connection to one of them by a hash of the two addresses, whatever the
workers are doing at the time. The supervisor (this process) keeps the address reserved, starts
the workers, starts a new one when one dies, and on SIGTERM, SIGINT or SIGHUP passes SIGTERM on and
waits for them to finish their requests. The price: a worker that dies takes the connections
still waiting in its own socket's queue with it (the kernel resets them), where one shared socket
would have kept them for the other workers. Elsewhere (SO_REUSEPORT spreads nothing on macOS and
does not exist on Windows), or with one worker, it is plain `uvicorn.run`.

The server settings are those of the README's production command: uvloop and httptools, a
20-second graceful shutdown, no Server header.
"""

import argparse
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

logger = logging.getLogger("uvicorn.error")

GRACEFUL_SHUTDOWN_SECONDS = 20
# A worker that exits this soon after it started is not restarted in a loop: the supervisor stops.
MIN_WORKER_LIFETIME_SECONDS = 5.0
OWN_SOCKETS = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


def server_options(host: str, port: int) -> dict[str, Any]:
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_SECONDS,
        "server_header": False,
    }
    if os.name != "nt":
        options.update(loop="uvloop", http="httptools")
    return options


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to the address with SO_REUSEPORT, not yet listening.

    Created as IPPROTO_TCP (uvicorn's own has protocol 0, and asyncio then leaves Nagle's
    algorithm on for the connections it accepts)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def run_worker(app: str, options: dict[str, Any]) -> None:
    """One worker process: its own socket, one uvicorn server on it (it listens and accepts)."""
    config = uvicorn.Config(app, **options)
    uvicorn.Server(config).run(sockets=[bound_socket(options["host"], options["port"])])


class Supervisor:
    """Starts `workers` processes running `run_worker`, replaces those that die, stops them on
    SIGTERM, SIGINT or SIGHUP."""

    def __init__(self, app: str, workers: int, options: dict[str, Any]) -> None:
        self.app = app
        self.workers = workers
        self.options = options
        self.processes: list[BaseProcess] = []
        self.started_at: dict[int, float] = {}
        self.stopping = False
        self.context = multiprocessing.get_context("spawn")

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._stop)
        logger.info(
            "Started supervisor process [%d]: %d workers on %s:%d, each with its own socket",
            os.getpid(),
            self.workers,
            self.options["host"],
            self.options["port"],
        )
        self.processes = [self._start() for _ in range(self.workers)]
        status = 0
        while not self.stopping:
            wait([process.sentinel for process in self.processes], timeout=1.0)
            for index, process in enumerate(self.processes):
                if process.is_alive() or self.stopping:
                    continue
                lifetime = time.monotonic() - self.started_at.pop(process.pid or 0, 0.0)
                if process.exitcode == STARTUP_FAILURE or lifetime < MIN_WORKER_LIFETIME_SECONDS:
                    logger.error(
                        "Worker [%s] exited with code %s %.1f s after it started; stopping",
                        process.pid,
                        process.exitcode,
                        lifetime,
                    )
                    self.stopping = True
                    status = STARTUP_FAILURE
                    break
                logger.warning(
                    "Worker [%s] exited with code %s; starting another",
                    process.pid,
                    process.exitcode,
                )
                self.processes[index] = self._start()
        self._stop_workers()
        logger.info("Stopped supervisor process [%d]", os.getpid())
        return status

    def _start(self) -> BaseProcess:
        process = self.context.Process(target=run_worker, args=(self.app, self.options))
        process.start()
        self.started_at[process.pid or 0] = time.monotonic()
        return process

    def _stop(self, _signum: int, _frame: FrameType | None) -> None:
        self.stopping = True

    def _stop_workers(self) -> None:
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACEFUL_SHUTDOWN_SECONDS + 5
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                logger.warning("Worker [%s] did not stop in time; killing it", process.pid)
                process.kill()
                process.join()


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", default="main:app", help="the ASGI app (default main:app)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WEB_CONCURRENCY", "2")))
    arguments = parser.parse_args(argv)
    if arguments.workers < 1:
        parser.error("--workers must be at least 1")
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    options = server_options(arguments.host, arguments.port)
    if arguments.workers == 1 or not OWN_SOCKETS:
        uvicorn.run(arguments.app, workers=arguments.workers, **options)
        return 0
    uvicorn.Config(arguments.app, **options)  # sets up uvicorn's logging, as its command does
    try:
        # Held, never listening, until the end: the address is checked before any worker starts
        # and stays ours while workers are replaced. A socket that does not listen is given no
        # connections.
        reservation = bound_socket(arguments.host, arguments.port)
    except OSError as error:
        logger.error("Cannot listen on %s:%s: %s", arguments.host, arguments.port, error.strerror)
        return 1
    with reservation:
        options["port"] = reservation.getsockname()[1]  # the one chosen, for --port 0
        return Supervisor(arguments.app, arguments.workers, options).run()


if __name__ == "__main__":
    sys.exit(main())
