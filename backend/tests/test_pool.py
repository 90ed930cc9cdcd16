"""The app's own connection pool (pool.py) on the real PostgreSQL, with connections opened the
way PostgresDatabase opens them: bounded, timing out, fair, reusing healthy connections, never
handing out a broken or stale one, closing idle ones, surviving cancellation and an unreachable
database, and shutting down cleanly."""

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import psycopg
import pytest
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow, tuple_row

from pool import ConnectionPool, PoolClosed, PooledConnection, PoolTimeout
from tests.support import free_port

AdminConnection = psycopg.AsyncConnection[TupleRow]

LONG = 3600.0  # seconds: "never" within a test
GENEROUS = 5.0  # seconds: a wait that only a broken pool reaches
HANG = 20.0  # seconds: no test here comes near it


class Connector:
    """The pool's connect function as PostgresDatabase writes it, its connections tagged with an
    application_name of their own (to count them in pg_stat_activity); remembers each one."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self.application_name = f"pool-test-{uuid.uuid4().hex[:12]}"
        self.opened: list[PooledConnection] = []

    async def __call__(self) -> PooledConnection:
        connection = await PooledConnection.connect(
            self.conninfo,
            autocommit=True,
            prepare_threshold=None,
            connect_timeout=5,
            row_factory=tuple_row,
            application_name=self.application_name,
        )
        self.opened.append(connection)
        return connection

    @asynccontextmanager
    async def pool(
        self,
        *,
        max_size: int = 1,
        checkout_timeout: float = GENEROUS,
        ping_idle: float = LONG,
        max_idle: float = LONG,
        max_lifetime: float = LONG,
    ) -> AsyncIterator[ConnectionPool]:
        pool = ConnectionPool(
            self,
            max_size=max_size,
            timeout=checkout_timeout,
            ping_idle=ping_idle,
            max_idle=max_idle,
            max_lifetime=max_lifetime,
        )
        try:
            async with asyncio.timeout(HANG):  # a broken pool fails the test, never hangs it
                yield pool
        finally:
            await pool.close()
            for connection in self.opened:  # a failed test may leave some checked out
                await connection.close()


@pytest.fixture
def connector(postgres_url: str) -> Connector:
    return Connector(postgres_url)


@pytest.fixture
async def admin(postgres_url: str) -> AsyncIterator[AdminConnection]:
    """A connection of the test's own, outside any pool."""
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as connection:
        yield connection


async def backends(admin: AdminConnection, connector: Connector) -> int:
    """Server processes connected with this connector's application_name."""
    cursor = await admin.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = %s",
        (connector.application_name,),
    )
    row = await cursor.fetchone()
    assert row is not None
    count: int = row[0]
    return count


async def terminate(admin: AdminConnection, connection: PooledConnection) -> None:
    """Kill the connection's server process and wait until it has exited."""
    cursor = await admin.execute(
        "SELECT pg_terminate_backend(%s, 5000)", (connection.info.backend_pid,)
    )
    assert await cursor.fetchone() == (True,)


async def select_one(connection: PooledConnection) -> None:
    cursor = await connection.execute("SELECT 1")
    assert await cursor.fetchone() == (1,)


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait until the condition holds (a background close, a sweep); fail if it never does."""
    async with asyncio.timeout(GENEROUS):
        while not condition():  # noqa: ASYNC110  (the pool closes in tasks of its own)
            await asyncio.sleep(0.01)


async def eventually_backends(admin: AdminConnection, connector: Connector, count: int) -> None:
    """Wait until the server sees exactly `count` of the connector's connections."""
    async with asyncio.timeout(GENEROUS):
        while await backends(admin, connector) != count:  # noqa: ASYNC110  (server-side)
            await asyncio.sleep(0.02)


async def started_waiting(task: "asyncio.Task[PooledConnection]") -> None:
    """Let a task that found the pool full queue up, and check it is still waiting."""
    await asyncio.sleep(0.02)
    assert not task.done()


# --- bounded -------------------------------------------------------------------------------------


async def test_a_full_pool_opens_no_more_connections_and_the_next_holder_waits(
    connector: Connector, admin: AdminConnection
) -> None:
    async with connector.pool(max_size=2) as pool:
        first = await pool.acquire()
        second = await pool.acquire()
        third = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0.1)
        assert not third.done()
        assert pool.size == 2
        assert len(connector.opened) == 2
        assert await backends(admin, connector) == 2

        pool.release(second)
        async with asyncio.timeout(GENEROUS):
            assert await third is second
        assert pool.size == 2
        assert len(connector.opened) == 2
        assert await backends(admin, connector) == 2
        pool.release(first)
        pool.release(second)
        assert pool.idle == 2


async def test_concurrent_holders_never_exceed_max_size(
    connector: Connector, admin: AdminConnection
) -> None:
    async with connector.pool(max_size=2) as pool:
        in_use = 0
        peak_in_use = 0
        sizes: list[int] = []
        server_counts: list[int] = []

        async def holder() -> None:
            nonlocal in_use, peak_in_use
            async with pool.connection() as connection:
                in_use += 1
                peak_in_use = max(peak_in_use, in_use)
                sizes.append(pool.size)
                await select_one(connection)
                await asyncio.sleep(0.05)
                in_use -= 1

        async def watcher(holders: "asyncio.Future[list[None]]") -> None:
            while not holders.done():
                server_counts.append(await backends(admin, connector))
                sizes.append(pool.size)
                await asyncio.sleep(0.01)

        holders = asyncio.gather(*(holder() for _ in range(6)))
        await asyncio.gather(holders, watcher(holders))
        assert peak_in_use == 2
        assert max(sizes) == 2
        assert server_counts
        assert max(server_counts) == 2
        assert len(connector.opened) == 2


# --- timeout -------------------------------------------------------------------------------------


async def test_an_acquire_on_a_full_pool_times_out_with_pool_timeout(
    connector: Connector,
) -> None:
    assert issubclass(PoolTimeout, psycopg.OperationalError)
    async with connector.pool(max_size=1, checkout_timeout=0.2) as pool:
        held = await pool.acquire()
        async with asyncio.timeout(GENEROUS):
            with pytest.raises(PoolTimeout):
                await pool.acquire()
        assert pool.size == 1

        # The expired waiter does not swallow the connection when it comes back.
        pool.release(held)
        assert pool.idle == 1
        assert await pool.acquire() is held
        pool.release(held)
        assert len(connector.opened) == 1


async def test_every_waiter_on_a_full_pool_times_out_not_only_the_first(
    connector: Connector,
) -> None:
    async with connector.pool(max_size=1, checkout_timeout=0.2) as pool:
        held = await pool.acquire()
        waiters = []
        for _ in range(3):
            waiters.append(asyncio.create_task(pool.acquire()))
            await asyncio.sleep(0.05)
        async with asyncio.timeout(GENEROUS):
            outcomes = await asyncio.gather(*waiters, return_exceptions=True)
        assert [type(outcome) for outcome in outcomes] == [PoolTimeout] * 3

        # One that queues after an earlier waiter was served times out too: the timer set for
        # the served one's deadline moves on to the next waiter's. (The timeout stays the same
        # throughout: the pool's one timer relies on deadlines coming in the order of arrival.)
        for _ in range(5):
            served = asyncio.create_task(pool.acquire())
            await asyncio.sleep(0.02)  # it queues
            pool.release(held)  # hands it over, or makes it idle if the wait is already over
            async with asyncio.timeout(GENEROUS):
                try:
                    assert await served is held
                    break
                except PoolTimeout:  # the machine stalled 0.2 s before the release: again
                    assert await pool.acquire() is held
        else:
            pytest.fail("the served waiter timed out five times before the release")
        async with asyncio.timeout(GENEROUS):
            with pytest.raises(PoolTimeout):
                await pool.acquire()
        pool.release(held)
        assert (pool.size, pool.idle) == (1, 1)


# --- fairness ------------------------------------------------------------------------------------


async def test_waiters_get_connections_in_the_order_they_started_waiting(
    connector: Connector,
) -> None:
    async with connector.pool(max_size=1) as pool:
        held = await pool.acquire()
        served: list[int] = []

        async def waiter(number: int) -> PooledConnection:
            connection = await pool.acquire()
            served.append(number)
            await asyncio.sleep(0.01)
            pool.release(connection)
            return connection

        waiters = []
        for number in range(5):
            waiters.append(asyncio.create_task(waiter(number)))
            await started_waiting(waiters[-1])
        pool.release(held)
        async with asyncio.timeout(GENEROUS):
            handed = await asyncio.gather(*waiters)
        assert served == [0, 1, 2, 3, 4]
        assert all(connection is held for connection in handed)
        assert len(connector.opened) == 1


async def test_a_newcomer_does_not_overtake_a_waiter(connector: Connector) -> None:
    async with connector.pool(max_size=1, checkout_timeout=1.0) as pool:
        held = await pool.acquire()
        served: list[str] = []

        async def waiter() -> PooledConnection:
            connection = await pool.acquire()
            served.append("waiter")
            await asyncio.sleep(0.05)
            pool.release(connection)
            return connection

        waiting = asyncio.create_task(waiter())
        await started_waiting(waiting)
        pool.release(held)
        # Straight after the release, without letting the waiter run first.
        newcomer = await pool.acquire()
        served.append("newcomer")
        assert await waiting is held
        assert newcomer is held
        assert served == ["waiter", "newcomer"]
        pool.release(newcomer)


# --- reuse ---------------------------------------------------------------------------------------


async def test_a_released_healthy_connection_is_handed_out_again(connector: Connector) -> None:
    async with connector.pool(max_size=2) as pool:
        connection = await pool.acquire()
        backend_pid = connection.info.backend_pid
        pool.release(connection)
        assert (pool.size, pool.idle) == (1, 1)

        again = await pool.acquire()
        assert again is connection
        assert again.info.backend_pid == backend_pid
        assert (pool.size, pool.idle) == (1, 0)
        pool.release(again)

        for _ in range(3):
            async with pool.connection() as used:
                assert used is connection
                await select_one(used)
        assert len(connector.opened) == 1
        assert (pool.size, pool.idle) == (1, 1)


async def test_statements_on_a_reused_connection_share_one_cursor_and_each_gets_its_own_result(
    connector: Connector,
) -> None:
    """`statements` is one cursor per connection, for request after request: a failed statement
    or a long result must not leak into the next statement's result."""
    async with connector.pool(max_size=1) as pool:
        async with pool.connection() as connection:
            cursor = connection.statements
            await cursor.execute("SELECT g FROM generate_series(1, 500) AS g")
            assert len(await cursor.fetchall()) == 500
        async with pool.connection() as connection:
            assert connection.statements is cursor
            with pytest.raises(psycopg.errors.DivisionByZero):
                await connection.statements.execute("SELECT 1 / 0")
        async with pool.connection() as connection:
            assert connection.statements is cursor
            await cursor.execute("SELECT %s::int, %s::text", (7, "seven"), binary=True)
            assert await cursor.fetchall() == [(7, "seven")]
            await cursor.execute("SELECT 1 WHERE false")
            assert await cursor.fetchone() is None
        assert len(connector.opened) == 1


async def test_the_most_recently_returned_connection_is_reused_first(
    connector: Connector,
) -> None:
    """So that under light load the others stay idle and `max_idle` closes them."""
    async with connector.pool(max_size=2) as pool:
        older = await pool.acquire()
        newer = await pool.acquire()
        pool.release(older)
        pool.release(newer)
        assert await pool.acquire() is newer
        assert await pool.acquire() is older
        pool.release(older)
        pool.release(newer)


# --- connections that come back not idle --------------------------------------------------------


async def leave_a_transaction_open(connection: PooledConnection, admin: AdminConnection) -> None:
    await connection.execute("BEGIN")
    assert connection.pgconn.transaction_status == TransactionStatus.INTRANS


async def fail_inside_a_transaction(connection: PooledConnection, admin: AdminConnection) -> None:
    await connection.execute("BEGIN")
    with pytest.raises(psycopg.errors.DivisionByZero):
        await connection.execute("SELECT 1 / 0")
    assert connection.pgconn.transaction_status == TransactionStatus.INERROR


async def close_it(connection: PooledConnection, admin: AdminConnection) -> None:
    await connection.close()


async def kill_its_server_process(connection: PooledConnection, admin: AdminConnection) -> None:
    await terminate(admin, connection)
    with pytest.raises(psycopg.OperationalError):
        await connection.execute("SELECT 1")
    assert connection.broken


Spoil = Callable[[PooledConnection, AdminConnection], Awaitable[None]]
SPOILERS = pytest.mark.parametrize(
    "spoil",
    [leave_a_transaction_open, fail_inside_a_transaction, close_it, kill_its_server_process],
)


@SPOILERS
async def test_a_connection_returned_not_idle_is_closed_and_its_slot_freed(
    connector: Connector, admin: AdminConnection, spoil: Spoil
) -> None:
    async with connector.pool(max_size=1) as pool:
        spoiled = await pool.acquire()
        await spoil(spoiled, admin)
        pool.release(spoiled)
        assert (pool.size, pool.idle) == (0, 0)
        await eventually(lambda: spoiled.closed)

        fresh = await pool.acquire()
        assert fresh is not spoiled
        await select_one(fresh)
        assert fresh.pgconn.transaction_status == TransactionStatus.IDLE
        pool.release(fresh)
        assert len(connector.opened) == 2
        await eventually_backends(admin, connector, 1)


@SPOILERS
async def test_a_waiter_on_a_full_pool_gets_a_new_connection_when_a_spoiled_one_comes_back(
    connector: Connector, admin: AdminConnection, spoil: Spoil
) -> None:
    async with connector.pool(max_size=1) as pool:
        spoiled = await pool.acquire()
        waiting = asyncio.create_task(pool.acquire())
        await started_waiting(waiting)
        await spoil(spoiled, admin)
        pool.release(spoiled)
        async with asyncio.timeout(GENEROUS):
            fresh = await waiting
        assert fresh is not spoiled
        await select_one(fresh)
        assert pool.size == 1
        assert len(connector.opened) == 2
        await eventually(lambda: spoiled.closed)
        pool.release(fresh)
        assert (pool.size, pool.idle) == (1, 1)


# --- ping ----------------------------------------------------------------------------------------


async def test_a_stale_connection_whose_server_process_died_is_replaced_at_acquire(
    connector: Connector, admin: AdminConnection
) -> None:
    async with connector.pool(max_size=1, ping_idle=0.05) as pool:
        dead = await pool.acquire()
        pool.release(dead)
        await terminate(admin, dead)
        await asyncio.sleep(0.1)

        connection = await pool.acquire()
        assert connection is not dead
        await select_one(connection)
        assert pool.size == 1
        assert len(connector.opened) == 2
        await eventually(lambda: dead.closed)
        pool.release(connection)


async def test_a_request_whose_stale_connection_fails_its_ping_is_not_overtaken(
    connector: Connector, admin: AdminConnection
) -> None:
    async with connector.pool(max_size=1, ping_idle=0.01) as pool:
        stale = await pool.acquire()
        pool.release(stale)
        await terminate(admin, stale)
        await asyncio.sleep(0.05)
        served: list[str] = []

        async def hold(name: str) -> None:
            async with pool.connection() as connection:
                served.append(name)
                await select_one(connection)
                await asyncio.sleep(0.05)

        first = asyncio.create_task(hold("first"))
        await asyncio.sleep(0)  # it is pinging the stale connection
        second = asyncio.create_task(hold("second"))
        await asyncio.gather(first, second)
        assert served == ["first", "second"]
        assert pool.size == 1


async def test_a_stale_healthy_connection_passes_the_ping_and_is_reused(
    connector: Connector,
) -> None:
    async with connector.pool(max_size=1, ping_idle=0.05) as pool:
        connection = await pool.acquire()
        pool.release(connection)
        await asyncio.sleep(0.1)
        assert await pool.acquire() is connection
        await select_one(connection)
        pool.release(connection)
        assert len(connector.opened) == 1


async def test_a_recently_used_connection_is_not_pinged(
    connector: Connector, admin: AdminConnection
) -> None:
    """Within `ping_idle` the pool trusts the connection: a dead one is handed out as it is,
    fails on first use, and is closed when it comes back."""
    async with connector.pool(max_size=1, ping_idle=LONG) as pool:
        dead = await pool.acquire()
        pool.release(dead)
        await terminate(admin, dead)

        handed = await pool.acquire()
        assert handed is dead
        with pytest.raises(psycopg.OperationalError):
            await handed.execute("SELECT 1")
        pool.release(handed)
        assert (pool.size, pool.idle) == (0, 0)
        async with pool.connection() as connection:
            await select_one(connection)


# --- max_lifetime --------------------------------------------------------------------------------


async def test_an_idle_connection_older_than_max_lifetime_is_not_handed_out_again(
    connector: Connector,
) -> None:
    async with connector.pool(max_size=1, max_lifetime=GENEROUS) as pool:
        old = await pool.acquire()
        pool.release(old)
        assert pool.idle == 1
        # Now past its lifetime, however long the lines above took.
        pool.max_lifetime = 0.1
        await asyncio.sleep(0.15)

        connection = await pool.acquire()
        assert connection is not old
        await select_one(connection)
        assert pool.size == 1
        await eventually(lambda: old.closed)
        pool.release(connection)
        assert len(connector.opened) == 2


async def test_a_connection_older_than_max_lifetime_is_closed_when_it_comes_back(
    connector: Connector,
) -> None:
    async with connector.pool(max_size=1, max_lifetime=0.1) as pool:
        old = await pool.acquire()
        await asyncio.sleep(0.15)
        pool.release(old)
        assert (pool.size, pool.idle) == (0, 0)
        await eventually(lambda: old.closed)
        async with pool.connection() as connection:
            assert connection is not old


# --- sweep ---------------------------------------------------------------------------------------


async def test_sweep_closes_connections_idle_longer_than_max_idle(
    connector: Connector, admin: AdminConnection
) -> None:
    async with connector.pool(max_size=3, max_idle=0.1) as pool:
        connections = [await pool.acquire() for _ in range(3)]
        for connection in connections:
            pool.release(connection)
        pool.sweep()
        assert (pool.size, pool.idle) == (3, 3)  # none idle long enough yet

        await asyncio.sleep(0.15)
        recent = await pool.acquire()
        pool.release(recent)  # idle again from now
        pool.sweep()
        assert (pool.size, pool.idle) == (1, 1)
        others = [connection for connection in connections if connection is not recent]
        assert len(others) == 2
        await eventually(lambda: all(connection.closed for connection in others))
        assert not recent.closed
        await eventually_backends(admin, connector, 1)
        assert await pool.acquire() is recent
        pool.release(recent)


async def test_sweep_closes_idle_connections_older_than_max_lifetime(
    connector: Connector,
) -> None:
    async with connector.pool(max_size=1, max_lifetime=0.1) as pool:
        connection = await pool.acquire()
        pool.release(connection)
        await asyncio.sleep(0.15)
        pool.sweep()
        assert (pool.size, pool.idle) == (0, 0)
        await eventually(lambda: connection.closed)


async def test_an_open_pool_sweeps_idle_connections_by_itself(
    connector: Connector, admin: AdminConnection
) -> None:
    async with connector.pool(max_size=2, max_idle=0.1) as pool:
        await pool.open()
        first = await pool.acquire()
        second = await pool.acquire()
        pool.release(first)
        pool.release(second)
        await eventually(lambda: pool.size == 0)
        assert pool.idle == 0
        await eventually(lambda: first.closed and second.closed)
        await eventually_backends(admin, connector, 0)


# --- cancellation --------------------------------------------------------------------------------


async def test_a_waiter_cancelled_while_waiting_leaks_no_slot(connector: Connector) -> None:
    async with connector.pool(max_size=2, checkout_timeout=1.0) as pool:
        held = [await pool.acquire(), await pool.acquire()]
        waiting = asyncio.create_task(pool.acquire())
        await started_waiting(waiting)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert pool.size == 2

        for connection in held:
            pool.release(connection)
        assert (pool.size, pool.idle) == (2, 2)  # the cancelled waiter took neither
        again = await asyncio.gather(pool.acquire(), pool.acquire())
        assert {id(connection) for connection in again} == {id(connection) for connection in held}
        for connection in again:
            pool.release(connection)
        assert len(connector.opened) == 2


async def test_a_connection_handed_to_a_waiter_cancelled_in_the_same_moment_is_not_lost(
    connector: Connector,
) -> None:
    async with connector.pool(max_size=1, checkout_timeout=1.0) as pool:
        held = await pool.acquire()
        waiting = asyncio.create_task(pool.acquire())
        await started_waiting(waiting)
        pool.release(held)  # hands `held` to the waiter...
        waiting.cancel()  # ...which is cancelled before it could run
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert (pool.size, pool.idle) == (1, 1)
        async with asyncio.timeout(GENEROUS):
            assert await pool.acquire() is held
        pool.release(held)
        assert len(connector.opened) == 1


async def test_a_slot_handed_to_a_waiter_cancelled_in_the_same_moment_is_not_lost(
    connector: Connector,
) -> None:
    async with connector.pool(max_size=1, checkout_timeout=1.0) as pool:
        spoiled = await pool.acquire()
        await spoiled.execute("BEGIN")
        waiting = asyncio.create_task(pool.acquire())
        await started_waiting(waiting)
        pool.release(spoiled)  # discarded: its slot goes to the waiter...
        waiting.cancel()  # ...which is cancelled before it could open a connection
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert (pool.size, pool.idle) == (0, 0)
        async with asyncio.timeout(GENEROUS), pool.connection() as connection:
            assert connection is not spoiled
            await select_one(connection)
        assert len(connector.opened) == 2


async def test_an_acquire_cancelled_while_connecting_frees_its_slot(
    connector: Connector,
) -> None:
    async with connector.pool(max_size=1, checkout_timeout=1.0) as pool:
        opening = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0)  # it has taken the slot and started to connect
        assert pool.size == 1
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        assert pool.size == 0
        async with pool.connection() as connection:
            await select_one(connection)


# --- an unreachable database ---------------------------------------------------------------------


async def test_a_failed_connect_raises_and_gives_its_slot_back() -> None:
    unreachable = Connector(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    async with unreachable.pool(max_size=1, checkout_timeout=GENEROUS) as pool:
        for _ in range(3):
            async with asyncio.timeout(GENEROUS):
                with pytest.raises(psycopg.OperationalError) as raised:
                    await pool.acquire()
            assert not isinstance(raised.value, PoolTimeout)
            assert pool.size == 0
        assert unreachable.opened == []


async def test_waiters_on_a_failing_connect_fail_too_instead_of_timing_out() -> None:
    unreachable = Connector(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    async with unreachable.pool(max_size=1, checkout_timeout=GENEROUS) as pool:
        async with asyncio.timeout(GENEROUS):
            outcomes = await asyncio.gather(
                *(pool.acquire() for _ in range(4)), return_exceptions=True
            )
        for outcome in outcomes:
            assert isinstance(outcome, psycopg.OperationalError)
            assert not isinstance(outcome, PoolTimeout)
        assert pool.size == 0


async def test_the_pool_recovers_when_the_database_becomes_reachable(
    connector: Connector,
) -> None:
    reachable = connector.conninfo
    connector.conninfo = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    async with connector.pool(max_size=1, checkout_timeout=1.0) as pool:
        with pytest.raises(psycopg.OperationalError):
            await pool.acquire()
        connector.conninfo = reachable
        async with pool.connection() as connection:
            await select_one(connection)
        assert (pool.size, pool.idle) == (1, 1)


# --- close ---------------------------------------------------------------------------------------


async def test_close_fails_waiters_and_later_acquires_with_pool_closed(
    connector: Connector,
) -> None:
    assert issubclass(PoolClosed, psycopg.OperationalError)
    async with connector.pool(max_size=1) as pool:
        await pool.open()
        held = await pool.acquire()
        waiters = [asyncio.create_task(pool.acquire()) for _ in range(2)]
        for waiting in waiters:
            await started_waiting(waiting)

        await pool.close()
        for waiting in waiters:
            with pytest.raises(PoolClosed):
                await waiting
        with pytest.raises(PoolClosed):
            await pool.acquire()
        with pytest.raises(PoolClosed):
            async with pool.connection():
                pass

        # The connection in use at close time is closed when it comes back.
        assert not held.closed
        await select_one(held)
        pool.release(held)
        assert (pool.size, pool.idle) == (0, 0)
        await eventually(lambda: held.closed)


async def test_close_closes_idle_connections(connector: Connector, admin: AdminConnection) -> None:
    async with connector.pool(max_size=2) as pool:
        await pool.open()
        connections = [await pool.acquire() for _ in range(2)]
        for connection in connections:
            pool.release(connection)
        assert await backends(admin, connector) == 2

        await pool.close()
        assert all(connection.closed for connection in connections)
        assert (pool.size, pool.idle) == (0, 0)
        await eventually_backends(admin, connector, 0)
