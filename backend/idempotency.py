"""Exactly-once creates: `POST` with an `Idempotency-Key` header.

The key is reserved and the task created in one transaction, and the response stored with them.
A retry with the same key and body gets the stored 201 again and creates nothing; the same key
with another body is a 422. Concurrent requests with one key: the database's primary key makes
the second wait for the first to commit, then replay it. Keys expire after
`IDEMPOTENCY_KEY_TTL_SECONDS` (24 hours by default).
"""

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
from sqlalchemy import delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col, select

from errors import IdempotencyKeyInProgress, IdempotencyKeyReused
from models import IdempotencyRecord, utc_now


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status_code: int
    body: bytes


def request_fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


async def reserve_or_replay(
    session: AsyncSession, owner_id: str, key: str, fingerprint: str, ttl_seconds: int
) -> StoredResponse | None:
    """Reserve the key inside the caller's transaction (None), or the response already given."""
    now = utc_now()
    expired = col(IdempotencyRecord.created_at) < now - timedelta(seconds=ttl_seconds)
    await session.execute(
        delete(IdempotencyRecord).where(
            col(IdempotencyRecord.user_id) == owner_id, col(IdempotencyRecord.key) == key, expired
        )
    )
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    reserved = await session.scalar(
        dialect.insert(IdempotencyRecord)
        .values(
            user_id=owner_id,
            key=key,
            request_hash=fingerprint,
            status_code=0,
            response_body="",
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=["user_id", "key"])
        .returning(col(IdempotencyRecord.key))
    )
    if reserved is not None:
        return None
    record = await session.scalar(
        select(IdempotencyRecord).where(
            col(IdempotencyRecord.user_id) == owner_id, col(IdempotencyRecord.key) == key
        )
    )
    if record is None or record.status_code == 0:
        raise IdempotencyKeyInProgress()
    if record.request_hash != fingerprint:
        raise IdempotencyKeyReused()
    return StoredResponse(record.status_code, record.response_body.encode())


async def store_response(
    session: AsyncSession, owner_id: str, key: str, response: StoredResponse
) -> None:
    record = await session.get(IdempotencyRecord, (owner_id, key))
    if record is None:  # reserved in this same transaction: cannot vanish
        raise IdempotencyKeyInProgress()
    record.status_code = response.status_code
    record.response_body = response.body.decode()


async def purge_expired(sessions: async_sessionmaker[AsyncSession], ttl_seconds: int) -> int:
    async with sessions() as session:
        result = await session.execute(
            delete(IdempotencyRecord).where(
                col(IdempotencyRecord.created_at) < utc_now() - timedelta(seconds=ttl_seconds)
            )
        )
        await session.commit()
    return int(getattr(result, "rowcount", 0) or 0)
