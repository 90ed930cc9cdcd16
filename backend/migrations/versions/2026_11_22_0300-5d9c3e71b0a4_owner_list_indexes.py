"""Read a user's tasks from the index alone: a covering index for the list.

The list's index (user_id, created_at, id) is replaced by two partial indexes on the same key that
together hold every task (models.py explains them): `ix_tasks_owner`, which also carries the
columns a list shows, for tasks whose text fits in a B-tree entry, and `ix_tasks_owner_long` for
the others; and by `ix_tasks_user_id`, for queries by owner other than the app's.

On PostgreSQL, CREATE INDEX blocks writes to the table while it builds (2.5 s in all for a million
tasks on a 2-core machine; reads go on). On a large table, build the three first without blocking
(CREATE INDEX CONCURRENTLY: the statements are in the README, "Upgrading a large table"): the
migration then finds them valid, takes no lock for them, and only drops the old index. An index
an interrupted CREATE INDEX CONCURRENTLY left INVALID is dropped and built again.

Revision ID: 5d9c3e71b0a4
Revises: 8c41d2a7e6f3
Create Date: 2026-11-22 03:00:00
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "5d9c3e71b0a4"
down_revision: str | None = "8c41d2a7e6f3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY = ["user_id", "created_at", "id"]
# models.FITS_LIST_INDEX as each database writes it (a migration keeps its own copy).
TEXT_BYTES = {
    "postgresql": "octet_length(user_id) + octet_length(title)"
    " + coalesce(octet_length(description), 0)",
    "sqlite": "length(CAST(user_id AS BLOB)) + length(CAST(title AS BLOB))"
    " + coalesce(length(CAST(description AS BLOB)), 0)",
}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    text_bytes = TEXT_BYTES[dialect]
    indexes: list[tuple[str, list[str], dict[str, Any]]] = [
        (
            "ix_tasks_owner",
            KEY,
            {
                "postgresql_include": ["title", "description", "completed", "updated_at"],
                f"{dialect}_where": sa.text(f"{text_bytes} <= 2500"),
            },
        ),
        ("ix_tasks_owner_long", KEY, {f"{dialect}_where": sa.text(f"{text_bytes} > 2500")}),
        ("ix_tasks_user_id", ["user_id"], {}),
    ]
    for name, columns, options in indexes:
        valid = index_validity(name)
        if valid is True:
            continue  # built beforehand (README): no lock on the table at all
        if valid is False:
            # What an interrupted CREATE INDEX CONCURRENTLY leaves: kept up to date by every
            # write, but never read. Built again here.
            op.drop_index(name, table_name="tasks")
        op.create_index(name, "tasks", columns, if_not_exists=True, **options)
    op.drop_index("ix_tasks_user_id_created_at_id", table_name="tasks", if_exists=True)


def index_validity(name: str) -> bool | None:
    """Whether PostgreSQL may read the index `name` (None: there is none, or no way to tell;
    the index is then created IF NOT EXISTS). SQLite builds an index in one statement."""
    connection = op.get_bind()
    if connection.dialect.name != "postgresql" or op.get_context().as_sql:
        return None  # offline (`alembic upgrade --sql`): no database to ask
    found = connection.execute(
        sa.text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"),
        {"name": name},
    ).scalar()
    return None if found is None else bool(found)


def downgrade() -> None:
    op.create_index("ix_tasks_user_id_created_at_id", "tasks", KEY, if_not_exists=True)
    op.drop_index("ix_tasks_user_id", table_name="tasks", if_exists=True)
    op.drop_index("ix_tasks_owner_long", table_name="tasks", if_exists=True)
    op.drop_index("ix_tasks_owner", table_name="tasks", if_exists=True)
