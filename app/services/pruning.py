"""Deleting old rows a batch at a time, each batch in a transaction of its own.

One DELETE of every old row holds its locks and its WAL until the end, and past the statement
timeout it is cancelled and rolled back whole, so a table that has grown large could never be
pruned again. Batches keep every transaction short, and what is deleted stays deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from sqlalchemy import ColumnElement, Table, delete, select, tuple_
from sqlalchemy.exc import SQLAlchemyError

from app.extensions import Base, db

log = logging.getLogger(__name__)

BATCH_ROWS = 5000


def delete_in_batches(
    rows: type[Base] | Table, old: ColumnElement[bool], *, batch: int = BATCH_ROWS
) -> int:
    """Delete every row of a model's table (or a table) matching ``old``, ``batch`` rows per
    transaction; how many."""
    table = rows if isinstance(rows, Table) else cast(Table, rows.__table__)
    key = list(table.primary_key.columns)
    chosen = select(*key).where(old).limit(batch)
    matches = key[0].in_(chosen) if len(key) == 1 else tuple_(*key).in_(chosen)
    # ``old`` again on the outer statement: on a partitioned table it limits which partitions
    # the DELETE opens.
    statement = delete(table).where(matches, old)
    deleted = 0
    while True:
        count = int(db.session.execute(statement).rowcount or 0)  # type: ignore[attr-defined]
        db.session.commit()
        deleted += count
        if count < batch:
            return deleted


@dataclass
class Steps:
    """Independent steps of a job: each runs whatever happened to the ones before it."""

    job: str
    failed: dict[str, str] = field(default_factory=dict)

    def run(self, name: str, step: Callable[[], object]) -> None:
        """Run ``step``; if the database refuses it, roll back, note it and go on."""
        try:
            step()
        except SQLAlchemyError as exc:
            db.session.rollback()
            log.exception("%s: %s failed", self.job, name)
            self.failed[name] = type(getattr(exc, "orig", exc)).__name__
