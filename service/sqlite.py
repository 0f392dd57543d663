"""The one SQLite write transaction of the embedded stores (local queue, local job store)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Cursor]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception, on an autocommit
    (``isolation_level=None``) connection. Takes the write lock up front, so two writers never
    deadlock upgrading; the caller holds its own thread lock around it."""
    cur = db.cursor()
    cur.execute("BEGIN IMMEDIATE")
    try:
        yield cur
    except BaseException:
        cur.execute("ROLLBACK")
        raise
    cur.execute("COMMIT")


__all__ = ["immediate"]
