"""Vector sinks: where the worker writes encoded items (durable when ``write`` returns).

- :class:`GallerySink` (embedded mode): straight into this process's galleries.
- ``service.replication.ReplicationPublisher`` (Redis mode): the replication log every API
  replica applies to its own galleries.

:func:`service.lifecycle.open_backends` picks the one for the configured mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from index.gallery import Gallery, Record


class VectorSink(Protocol):
    """Where encoded items go; ``write`` is durable on return."""

    def write(self, records: Mapping[str, Sequence[Record]]) -> Any: ...

    def known_hashes(self, ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """``id -> (modality, content_hash)`` of the ids already stored."""
        ...


class GallerySink:
    """Embedded mode: write straight into this process's galleries (modality -> Gallery)."""

    def __init__(self, galleries: Mapping[str, Gallery]) -> None:
        self.galleries = galleries

    def write(self, records: Mapping[str, Sequence[Record]]) -> None:
        for modality, recs in records.items():
            if not recs:
                continue
            ids = {r.id for r in recs}
            for other, g in self.galleries.items():  # an id lives in one modality at a time
                if other != modality and any(i in g for i in ids):
                    g.remove([i for i in ids if i in g])
            self.galleries[modality].upsert(recs)

    def known_hashes(self, ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        out = {}
        for modality, g in self.galleries.items():
            for i in ids:
                rec = g.get(i)
                if rec is not None:
                    out[i] = (modality, rec.content_hash)
        return out


__all__ = ["GallerySink", "VectorSink"]
