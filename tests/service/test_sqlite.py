"""service.sqlite.immediate: one write transaction, committed or rolled back as a whole."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from service.sqlite import immediate


def test_commit_on_success_rollback_on_error(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "t.sqlite3", isolation_level=None)
    db.execute("CREATE TABLE t (x INTEGER)")
    with immediate(db) as cur:
        cur.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(RuntimeError), immediate(db) as cur:
        cur.execute("INSERT INTO t VALUES (2)")
        raise RuntimeError("boom")
    assert [r[0] for r in db.execute("SELECT x FROM t")] == [1]
    assert not db.in_transaction
    db.close()
