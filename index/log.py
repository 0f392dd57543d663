"""Durable storage primitives: an append-only write-ahead log and atomic file writes.

A log file is a sequence of records, each ``<u32 length><u32 crc32(payload)><payload>``
(little-endian). ``append`` writes a batch of records, flushes and fsyncs before it returns,
so a caller may acknowledge the change once it returns. ``replay`` yields every intact
record and stops at the first torn or corrupt one (a crash in the middle of a write); the
file is then truncated back to the last intact record so later appends follow good data.

Snapshots are written with :func:`atomic_write`: temp file in the same directory, fsync,
``os.replace``, fsync of the directory. A reader therefore sees either the old file or the
complete new one, never a partial file.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")  # payload length, crc32(payload)
MAX_RECORD_BYTES = 1 << 30  # a length above this is treated as corruption, not a huge record


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or a new file in it survives power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], object], fsync: bool = True) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temp file that replaces ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if fsync:
        fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    """Atomically replace ``path`` with ``data``."""
    atomic_write(path, lambda f: f.write(data), fsync=fsync)


def encode_record(payload: bytes) -> bytes:
    """Frame one payload as a log record."""
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def read_records(f: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """Yield ``(end_offset, payload)`` for each intact record; stop at the first bad one."""
    while True:
        header = f.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        length, crc = _HEADER.unpack(header)
        if length > MAX_RECORD_BYTES:
            return
        payload = f.read(length)
        if len(payload) < length or zlib.crc32(payload) != crc:
            return
        yield f.tell(), payload


class WriteAheadLog:
    """One append-only log file. Not thread-safe: the owner (a Gallery) holds the lock."""

    def __init__(self, path: Path, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._file: BinaryIO | None = None
        self.records = 0  # intact records in the file (replayed + appended)

    def replay(self) -> Iterator[bytes]:
        """Yield every intact payload, then truncate a torn tail so appends follow good data."""
        if not self.path.exists():
            return
        good_end = 0
        with open(self.path, "rb") as f:
            for end, payload in read_records(f):
                good_end = end
                self.records += 1
                yield payload
        size = self.path.stat().st_size
        if size > good_end:
            logger.warning(
                "log %s: dropping %d bytes of torn/corrupt tail after %d intact records",
                self.path,
                size - good_end,
                self.records,
            )
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())

    def _open(self) -> BinaryIO:
        if self._file is None:
            created = not self.path.exists()
            self._file = open(self.path, "ab")  # noqa: SIM115 - kept open across appends
            if created and self.fsync:
                fsync_dir(self.path.parent)
        return self._file

    def append(self, payloads: list[bytes]) -> None:
        """Append records and make them durable (flush + fsync) before returning."""
        if not payloads:
            return
        f = self._open()
        f.write(b"".join(encode_record(p) for p in payloads))
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())
        self.records += len(payloads)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
