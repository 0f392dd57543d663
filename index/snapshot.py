"""The gallery's on-disk formats (beside :mod:`index.log`, which frames and fsyncs them).

- A **log payload** (one write-ahead-log record per upsert/remove) is
  ``<u64 header length><JSON header><raw float32 vectors of the upserted items>``.
- A **snapshot** ``snapshot.<gen>.bin`` is
  ``XMGS0001 <u64 header length><JSON header><float32 vectors of every item><u32 crc32>``,
  the crc covering header and vectors; the FAISS index is written beside it as
  ``index.<gen>.faiss`` and checked against ``header["index_crc"]``.

Format only: what the headers hold is the gallery's business (:mod:`index.gallery`).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from index.log import atomic_write

SNAPSHOT_MAGIC = b"XMGS0001"
_U64 = struct.Struct("<Q")
_CRC = struct.Struct("<I")


def pack_change(header: dict[str, Any], blobs: list[bytes]) -> bytes:
    """One log payload: the JSON ``header`` then the raw vector ``blobs``."""
    h = json.dumps(header, separators=(",", ":")).encode()
    return _U64.pack(len(h)) + h + b"".join(blobs)


def unpack_change(payload: bytes) -> tuple[dict[str, Any], memoryview]:
    """Inverse of :func:`pack_change`: ``(header, vector bytes)``."""
    (n,) = _U64.unpack_from(payload, 0)
    header = json.loads(payload[8 : 8 + n])
    return header, memoryview(payload)[8 + n :]


def write_index(path: Path, index_bytes: np.ndarray, fsync: bool) -> int:
    """Write a serialized FAISS index atomically; returns its crc32 for the snapshot header."""
    data = index_bytes.tobytes()
    atomic_write(path, lambda f: f.write(data), fsync)
    return zlib.crc32(data)


def read_index(path: Path, crc: int) -> np.ndarray:
    """Read a serialized FAISS index written by :func:`write_index`, checking its crc32."""
    index_bytes = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if zlib.crc32(index_bytes.tobytes()) != crc:
        raise ValueError(f"{path}: index checksum mismatch")
    return index_bytes


def write_snapshot(
    path: Path, header: dict[str, Any], vectors: Iterable[np.ndarray], fsync: bool
) -> None:
    """Write a snapshot file atomically: ``header`` then each array of ``vectors`` in order."""

    def write(f: BinaryIO) -> None:
        h = json.dumps(header, separators=(",", ":")).encode()
        crc = zlib.crc32(h)
        f.write(SNAPSHOT_MAGIC + _U64.pack(len(h)) + h)
        for v in vectors:
            b = v.tobytes()
            crc = zlib.crc32(b, crc)
            f.write(b)
        f.write(_CRC.pack(crc))

    atomic_write(path, write, fsync)


def read_snapshot(path: Path) -> tuple[dict[str, Any], memoryview]:
    """``(header, vector bytes)`` of a snapshot file, after checking its magic and crc32."""
    data = path.read_bytes()
    if data[:8] != SNAPSHOT_MAGIC:
        raise ValueError(f"{path}: not a gallery snapshot")
    (n,) = _U64.unpack_from(data, 8)
    h = data[16 : 16 + n]
    header = json.loads(h)
    body = memoryview(data)[16 + n : len(data) - 4]
    (crc,) = _CRC.unpack(data[-4:])
    if zlib.crc32(body, zlib.crc32(h)) != crc:
        raise ValueError(f"{path}: snapshot checksum mismatch")
    return header, body
