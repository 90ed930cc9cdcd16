"""Per-user request limits: counters in process, or in Redis so that instances share them.

A fixed one-second window per user: cheap (one Redis round trip, pipelined), and a normal UI,
which sends a few requests a second at most, never meets it. When Redis is unreachable the
limit is not enforced (logged), rather than failing requests.
"""

import logging
import time
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

logger = logging.getLogger("todo.ratelimit")


class RateLimiter(Protocol):
    async def retry_after(self, user_id: str) -> float | None:
        """Count one request; None when it is within the limit, else seconds to wait."""

    async def close(self) -> None: ...


class NoLimit:
    async def retry_after(self, user_id: str) -> float | None:
        return None

    async def close(self) -> None:
        return None


class InProcessLimiter:
    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self._window = 0
        self._counts: dict[str, int] = {}

    async def retry_after(self, user_id: str) -> float | None:
        now = time.time()
        window = int(now)
        if window != self._window:
            self._window, self._counts = window, {}
        count = self._counts.get(user_id, 0) + 1
        self._counts[user_id] = count
        return None if count <= self.per_second else window + 1 - now

    async def close(self) -> None:
        return None


class RedisLimiter:
    def __init__(self, url: str, per_second: int) -> None:
        self.per_second = per_second
        self._redis = Redis.from_url(
            url, socket_timeout=0.5, socket_connect_timeout=0.5, health_check_interval=30
        )
        self._warned_at = 0.0

    async def retry_after(self, user_id: str) -> float | None:
        now = time.time()
        window = int(now)
        key = f"todo:ratelimit:{window}:{user_id}"
        try:
            async with self._redis.pipeline(transaction=False) as pipeline:
                pipeline.incr(key)
                pipeline.expire(key, 2)
                count, _ = await pipeline.execute()
        except (RedisError, OSError) as error:
            if now - self._warned_at > 60:
                self._warned_at = now
                logger.warning(
                    "rate limit not enforced: Redis unavailable (%s)", type(error).__name__
                )
            return None
        return None if int(count) <= self.per_second else window + 1 - now

    async def close(self) -> None:
        await self._redis.aclose()


def create_rate_limiter(per_second: int, redis_url: str | None) -> RateLimiter:
    if per_second <= 0:
        return NoLimit()
    if redis_url:
        return RedisLimiter(redis_url, per_second)
    return InProcessLimiter(per_second)
