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
from sqlalchemy import Table, bindparam, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel

from database import Database, static
from errors import IdempotencyKeyInProgress, IdempotencyKeyReused
from models import IdempotencyRecord, utc_now

KEYS: Table = SQLModel.metadata.tables[IdempotencyRecord.__tablename__]
# The statements of an idempotent create, built and compiled once (`database.static`).
THIS_KEY = (KEYS.c.user_id == bindparam("owner_id")) & (KEYS.c.key == bindparam("idempotency_key"))
DELETE_IF_EXPIRED = static(
    delete(KEYS)
    .where(THIS_KEY, KEYS.c.created_at < bindparam("expired_before"))
    .returning(KEYS.c.key)
)
RESERVE = {
    dialect.dialect.name: static(
        dialect.insert(KEYS)
        .values(
            user_id=bindparam("owner_id"),
            key=bindparam("idempotency_key"),
            request_hash=bindparam("fingerprint"),
            status_code=0,
            response_body="",
            created_at=bindparam("now"),
        )
        .on_conflict_do_nothing(index_elements=["user_id", "key"])
        .returning(KEYS.c.key)
    )
    for dialect in (postgresql, sqlite)
}
SELECT_STORED = static(
    select(KEYS.c.request_hash, KEYS.c.status_code, KEYS.c.response_body).where(THIS_KEY)
)
STORE_RESPONSE = static(
    update(KEYS)
    .where(THIS_KEY)
    .values(status_code=bindparam("stored_status"), response_body=bindparam("stored_body"))
    .returning(KEYS.c.key)
)


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
    this_key = {"owner_id": owner_id, "idempotency_key": key}
    await db.fetch_one(
        DELETE_IF_EXPIRED, {**this_key, "expired_before": now - timedelta(seconds=ttl_seconds)}
    )
    reserved = await db.scalar(
        RESERVE[db.dialect], {**this_key, "fingerprint": fingerprint, "now": now}
    )
    if reserved is not None:
        return None
    record = await db.fetch_one(SELECT_STORED, this_key)
    # Reserved and answered in one transaction, so never seen half-done; but a key can expire
    # and be deleted between the insert and this read.
    if record is None or record[1] == 0:
        raise IdempotencyKeyInProgress()
    request_hash, status_code, response_body = record
    if request_hash != fingerprint:
        raise IdempotencyKeyReused()
    return StoredResponse(status_code, response_body.encode())


async def store_response(db: Database, owner_id: str, key: str, response: StoredResponse) -> None:
    parameters = {
        "owner_id": owner_id,
        "idempotency_key": key,
        "stored_status": response.status_code,
        "stored_body": response.body.decode(),
    }
    await db.fetch_one(STORE_RESPONSE, parameters)


async def purge_expired(engine: AsyncEngine, ttl_seconds: int) -> int:
    async with engine.begin() as connection:
        result = await connection.execute(
            delete(KEYS).where(KEYS.c.created_at < utc_now() - timedelta(seconds=ttl_seconds))
        )
    return result.rowcount
