from __future__ import annotations

from pathlib import Path

from index.log import WriteAheadLog, atomic_write_bytes


def test_log_replays_appended_records_and_drops_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "log.0"
    log = WriteAheadLog(path)
    log.append([b"one", b"two"])
    log.append([b"three" * 100])
    log.close()
    size = path.stat().st_size
    with open(path, "ab") as f:  # a torn record: header promises more bytes than follow
        f.write((1000).to_bytes(4, "little") + b"\x00\x00\x00\x00partial")
    assert list(WriteAheadLog(path).replay()) == [b"one", b"two", b"three" * 100]
    assert path.stat().st_size == size  # torn tail truncated away
    log = WriteAheadLog(path)
    assert len(list(log.replay())) == 3
    log.append([b"four"])
    log.close()
    assert list(WriteAheadLog(path).replay())[-1] == b"four"


def test_log_stops_at_corrupt_record(tmp_path: Path) -> None:
    path = tmp_path / "log.0"
    log = WriteAheadLog(path)
    log.append([b"good", b"flipped", b"after"])
    log.close()
    data = bytearray(path.read_bytes())
    data[8 + 4 + 8 + 2] ^= 0xFF  # flip a byte inside the second payload
    path.write_bytes(bytes(data))
    assert list(WriteAheadLog(path).replay()) == [b"good"]


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
