"""A lean pool of psycopg connections for the request path.

Why not psycopg_pool: measured with the benchmark (bench/README.md), its checkout and return
cost about 140 µs of CPU per request under load, more than the query itself; this pool costs a
few. It keeps what the app relied on:

- bounded: at most `max_size` connections, opened on demand; a request that finds none free
  waits up to `timeout` seconds, then `PoolTimeout` (a 503);
- fair: a returned connection goes to the longest waiter, so nobody starves under load;
- Neon-fit: a connection idle longer than `ping_idle` seconds is pinged before use (a suspended
  compute or a restarted pooler drops idle clients); connections idle over `max_idle` seconds
  are closed, so an idle app lets Neon scale to zero; every connection is replaced after
  `max_lifetime` seconds;
- a connection that comes back broken, closed, or not idle (a statement cancelled mid-way, a
  transaction left open) is closed, never handed out again.

Checkout is `acquire()`/`release()`, or `async with pool.connection()`.
"""

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import AsyncConnection, AsyncCursor
from psycopg.pq import TransactionStatus

logger = logging.getLogger("todo.database")

IDLE = TransactionStatus.IDLE


class PoolTimeout(psycopg.OperationalError):
    """No connection came free in time."""


class PoolClosed(psycopg.OperationalError):
    """The pool is shutting down."""


class PooledConnection(AsyncConnection[Any]):
    """A connection that knows when it was opened (for `max_lifetime`), with one cursor for the
    statements run on it."""

    opened_at: float = 0.0
    _statements: AsyncCursor[Any] | None = None

    @property
    def statements(self) -> AsyncCursor[Any]:
        """The cursor every statement on this connection runs in, one after the other (a pooled
        connection serves one request at a time). `connection.execute()` makes a new cursor per
        statement, which costs psycopg about 30 µs: its own copy of the adapters, a new
        transformer."""
        if self._statements is None:
            self._statements = self.cursor()
        return self._statements


Connect = Callable[[], Coroutine[Any, Any, PooledConnection]]


class ConnectionPool:
    def __init__(
        self,
        connect: Connect,
        *,
        max_size: int,
        timeout: float,
        ping_idle: float,
        max_idle: float,
        max_lifetime: float,
    ) -> None:
        self._connect = connect
        self.max_size = max_size
        self.timeout = timeout
        self.ping_idle = ping_idle
        self.max_idle = max_idle
        self.max_lifetime = max_lifetime
        # Idle connections with the time each came back; the most recently used at the right.
        self._idle: deque[tuple[PooledConnection, float]] = deque()
        # Each waiter's future gets a connection, or None: "a slot is yours, open one"; with the
        # loop time it gives up at. All wait as long, so the oldest gives up first: one timer,
        # for the oldest waiter, serves them all.
        self._waiters: deque[tuple[asyncio.Future[PooledConnection | None], float]] = deque()
        self._expiry: asyncio.TimerHandle | None = None
        self._size = 0  # connections open or being opened
        self._closed = False
        self._sweeper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def size(self) -> int:
        return self._size

    @property
    def idle(self) -> int:
        return len(self._idle)

    def idle_connections(self) -> list[PooledConnection]:
        return [connection for connection, _ in self._idle]

    async def open(self) -> None:
        """Start closing idle connections in the background. Connections open on demand: the
        app starts while the database is down."""
        self._closed = False
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        while self._waiters:
            waiter, _ = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(PoolClosed("the connection pool is closed"))
        while self._idle:
            connection, _ = self._idle.popleft()
            self._size -= 1
            await connection.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[PooledConnection]:
        connection = await self.acquire()
        try:
            yield connection
        finally:
            self.release(connection)

    async def acquire(self) -> PooledConnection:
        if self._closed:
            raise PoolClosed("the connection pool is closed")
        while self._idle:
            connection, returned_at = self._idle.pop()
            now = time.monotonic()
            if now - connection.opened_at > self.max_lifetime:
                self._discard(connection)
                continue
            if now - returned_at > self.ping_idle:
                try:
                    await connection.execute("", prepare=False)
                except psycopg.Error:
                    # Dropped while idle: a new connection in the same slot, so that whoever
                    # queued during the ping does not overtake this request.
                    self._close_in_background(connection)
                    return await self._open_in_slot()
                except BaseException:
                    self._discard(connection)
                    raise
            return connection
        if self._size < self.max_size:
            self._size += 1
            return await self._open_in_slot()
        return await self._wait()

    def release(self, connection: PooledConnection) -> None:
        if (
            self._closed
            or connection.closed
            or connection.broken
            or connection.pgconn.transaction_status != IDLE
            or time.monotonic() - connection.opened_at > self.max_lifetime
        ):
            self._discard(connection)
            return
        waiter = self._next_waiter()
        if waiter is None:
            self._idle.append((connection, time.monotonic()))
        else:
            waiter.set_result(connection)

    async def _open_in_slot(self) -> PooledConnection:
        """Open a connection in a slot already counted in `_size`; give the slot up on failure."""
        try:
            connection = await self._connect()
        except BaseException:
            self._free_slot()
            raise
        connection.opened_at = time.monotonic()
        return connection

    async def _wait(self) -> PooledConnection:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[PooledConnection | None] = loop.create_future()
        gives_up_at = loop.time() + self.timeout
        self._waiters.append((future, gives_up_at))
        if self._expiry is None:
            self._expiry = loop.call_at(gives_up_at, self._expire_waiters)
        try:
            connection = await future
        except asyncio.CancelledError:
            # Cancelled (a request deadline) just as a connection or a slot was handed over.
            if future.done() and not future.cancelled() and future.exception() is None:
                handed = future.result()
                if handed is None:
                    self._free_slot()
                else:
                    self.release(handed)
            raise
        if connection is None:
            return await self._open_in_slot()
        return connection

    def _next_waiter(self) -> asyncio.Future[PooledConnection | None] | None:
        while self._waiters:
            waiter, _ = self._waiters.popleft()
            if not waiter.done():
                return waiter
        return None

    def _expire_waiters(self) -> None:
        """PoolTimeout for the waiters whose time is up; the timer moves to the next one."""
        self._expiry = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._waiters:
            waiter, gives_up_at = self._waiters[0]
            if not waiter.done():
                if gives_up_at > now:
                    self._expiry = loop.call_at(gives_up_at, self._expire_waiters)
                    return
                waiter.set_exception(
                    PoolTimeout(f"no database connection came free in {self.timeout:g} s")
                )
            self._waiters.popleft()

    def _free_slot(self) -> None:
        """A connection is gone: its slot goes to the longest waiter, else back to the pool."""
        waiter = None if self._closed else self._next_waiter()
        if waiter is None:
            self._size -= 1
        else:
            waiter.set_result(None)

    def _discard(self, connection: PooledConnection) -> None:
        self._free_slot()
        self._close_in_background(connection)

    def _close_in_background(self, connection: PooledConnection) -> None:
        if not connection.closed:
            task = asyncio.get_running_loop().create_task(_close_quietly(connection))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _sweep_forever(self) -> None:
        interval = max(0.05, min(self.max_idle, self.max_lifetime) / 4)
        while True:
            await asyncio.sleep(interval)
            self.sweep()

    def sweep(self) -> None:
        """Close idle connections that have been idle, or open, too long (oldest at the left)."""
        now = time.monotonic()
        kept: deque[tuple[PooledConnection, float]] = deque()
        while self._idle:
            connection, returned_at = self._idle.popleft()
            if now - returned_at > self.max_idle or now - connection.opened_at > self.max_lifetime:
                self._discard(connection)
            else:
                kept.append((connection, returned_at))
        self._idle = kept


async def _close_quietly(connection: PooledConnection) -> None:
    try:
        await connection.close()
    except Exception as error:  # a broken socket may refuse even a close
        logger.debug("closing a pooled connection failed: %s", type(error).__name__)
