"""Exactly-once creates: `POST` with an `Idempotency-Key` header.

The key is reserved and the task created in one transaction (`db.atomic`), and the response
stored with them. A retry with the same key and body gets the stored 201 again and creates
nothing; the same key with another body is a 422. Concurrent requests with one key: the primary
key makes the second wait for the first to commit, then replay it. Keys expire after
`IDEMPOTENCY_KEY_TTL_SECONDS` (24 hours by default).
"""

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
from sqlalchemy import Table, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel

from database import Database
from errors import IdempotencyKeyInProgress, IdempotencyKeyReused
from models import IdempotencyRecord, utc_now

KEYS: Table = SQLModel.metadata.tables[IdempotencyRecord.__tablename__]


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status_code: int
    body: bytes


def request_fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


async def reserve_or_replay(
    db: Database, owner_id: str, key: str, fingerprint: str, ttl_seconds: int
) -> StoredResponse | None:
    """Reserve the key in the caller's transaction (None), or the response already given."""
    now = utc_now()
    this_key = (KEYS.c.user_id == owner_id) & (KEYS.c.key == key)
    await db.fetch_one(
        delete(KEYS)
        .where(this_key, KEYS.c.created_at < now - timedelta(seconds=ttl_seconds))
        .returning(KEYS.c.key)
    )
    dialect = postgresql if db.dialect == "postgresql" else sqlite
    reserved = await db.scalar(
        dialect.insert(KEYS)
        .values(
            user_id=owner_id,
            key=key,
            request_hash=fingerprint,
            status_code=0,
            response_body="",
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=["user_id", "key"])
        .returning(KEYS.c.key)
    )
    if reserved is not None:
        return None
    record = await db.fetch_one(
        select(KEYS.c.request_hash, KEYS.c.status_code, KEYS.c.response_body).where(this_key)
    )
    # Reserved and answered in one transaction, so never seen half-done; but a key can expire
    # and be deleted between the insert and this read.
    if record is None or record[1] == 0:
        raise IdempotencyKeyInProgress()
    request_hash, status_code, response_body = record
    if request_hash != fingerprint:
        raise IdempotencyKeyReused()
    return StoredResponse(status_code, response_body.encode())


async def store_response(db: Database, owner_id: str, key: str, response: StoredResponse) -> None:
    await db.fetch_one(
        update(KEYS)
        .where(KEYS.c.user_id == owner_id, KEYS.c.key == key)
        .values(status_code=response.status_code, response_body=response.body.decode())
        .returning(KEYS.c.key)
    )


async def purge_expired(engine: AsyncEngine, ttl_seconds: int) -> int:
    async with engine.begin() as connection:
        result = await connection.execute(
            delete(KEYS).where(KEYS.c.created_at < utc_now() - timedelta(seconds=ttl_seconds))
        )
    return result.rowcount
