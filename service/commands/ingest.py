"""``xmodal ingest PATH...``: index folders of images, videos and text files (or a
captions.jsonl) into a running service, with a progress bar and a summary.

Each file's item id is derived from its absolute path (``<name>-<sha1 of the path>``), so a
re-run finds what is already indexed: files whose content hash the service already holds
under that id are skipped, changed files are re-indexed. The exit code is 1 when any item
failed (the reasons are listed), 0 otherwise.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.client import XmodalError
from service.commands import common

IMAGE_EXT = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
VIDEO_EXT = frozenset({".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v"})
TEXT_EXT = frozenset({".txt", ".md"})
TEXT_PREVIEW = 500  # characters of a text item kept in its metadata (for result display)

EXAMPLE = """
xmodal ingest ~/Pictures --recursive
xmodal ingest clips/ notes/ --url http://search.internal:8000 --batch 32
xmodal ingest --captions ../shared/data/flickr8k/captions.jsonl --texts
"""


@dataclass
class Source:
    """One file to index (or one caption text)."""

    id: str
    modality: str
    path: Path | None
    text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def item_id(path: Path) -> str:
    """A stable, valid item id for a file: its name, sanitised, plus a hash of its path."""
    absolute = str(path.resolve())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", path.name).lstrip(".-") or "file"
    return f"{slug[:200]}-{hashlib.sha1(absolute.encode()).hexdigest()[:10]}"


def modality_of(path: Path) -> str | None:
    ext = path.suffix.lower()
    if ext in IMAGE_EXT:
        return "image"
    if ext in VIDEO_EXT:
        return "video"
    if ext in TEXT_EXT:
        return "text"
    return None


def walk(paths: Sequence[Path], recursive: bool) -> tuple[list[Source], list[Path]]:
    """The media files under ``paths`` (sorted, deduplicated) and the files ignored."""
    found: dict[Path, Source] = {}
    ignored: list[Path] = []
    for root in paths:
        if root.is_dir():
            files = sorted(root.rglob("*") if recursive else root.iterdir())
        elif root.exists():
            files = [root]
        else:
            raise FileNotFoundError(f"no such file or folder: {root}")
        for f in files:
            if not f.is_file() or f.name.startswith("."):
                continue
            if f.suffix.lower() == ".jsonl" and f == root:
                for s in from_captions(f, texts=False):
                    found.setdefault(s.path or f, s)
                continue
            modality = modality_of(f)
            if modality is None:
                ignored.append(f)
                continue
            key = f.resolve()
            if key not in found:
                meta = {"path": str(key), "name": f.name}
                found[key] = Source(item_id(f), modality, f, metadata=meta)
    return list(found.values()), ignored


def from_captions(path: Path, texts: bool) -> list[Source]:
    """Images listed in a captions.jsonl (rows ``{"image", "captions"}``; images beside it or
    in ``images/``), captions in their metadata; with ``texts``, the captions as text items."""
    out: list[Source] = []
    base = path.parent
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, captions = row["image"], list(row.get("captions") or [])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not a captions row ({exc})") from exc
        image = next((p for p in (base / "images" / name, base / name) if p.is_file()), None)
        if image is None:
            raise FileNotFoundError(f"{path}:{n}: image {name!r} not found beside it")
        iid = item_id(image)
        meta: dict[str, Any] = {"path": str(image.resolve()), "name": image.name}
        if captions:
            meta["caption"] = captions[0]
        out.append(Source(iid, "image", image, metadata=meta))
        if texts:
            for i, caption in enumerate(captions):
                out.append(
                    Source(
                        f"{iid}.c{i}",
                        "text",
                        None,
                        text=caption,
                        metadata={"text": caption, "image": iid},
                    )
                )
    return out


def read(source: Source, max_chars: int) -> tuple[dict[str, Any], str]:
    """The API item for ``source`` and its content hash (as the service computes it)."""
    from service.media import clean_text, content_hash

    meta = dict(source.metadata)
    if source.modality == "text":
        raw = source.text
        if raw is None:
            assert source.path is not None
            raw = source.path.read_bytes().decode("utf-8", "replace")
        try:
            text = clean_text(raw, max_chars)
        except Exception:  # noqa: BLE001 - the service will refuse it with its reason
            text = raw
        meta.setdefault("text", text[:TEXT_PREVIEW])
        item = {"id": source.id, "modality": "text", "text": text, "metadata": meta}
        return item, content_hash(text)
    assert source.path is not None
    data = source.path.read_bytes()
    media: dict[str, Any] = {"id": source.id, "modality": source.modality, "metadata": meta}
    media["data"] = data
    return media, content_hash(data)


def build_parser() -> Any:
    p = common.parser("xmodal ingest", __doc__.split("\n\n")[0], EXAMPLE)
    p.add_argument("paths", nargs="*", type=Path, help="files and folders (or captions.jsonl)")
    common.add_client_args(p)
    p.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    p.add_argument(
        "--captions",
        type=Path,
        action="append",
        default=[],
        help="a captions.jsonl: its images, with their captions as metadata",
    )
    p.add_argument("--texts", action="store_true", help="with --captions: index captions too")
    p.add_argument("--batch", type=int, default=64, help="items per request (default 64)")
    p.add_argument("--no-wait", action="store_true", help="return once queued")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help="re-send items already indexed")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(None if argv is None else list(argv))
    prog = "xmodal ingest"
    if not args.paths and not args.captions:
        sys.stderr.write(f"{prog}: give at least one PATH or --captions FILE\n")
        return 2
    try:
        sources, ignored = walk(args.paths, args.recursive)
        for cap in args.captions:
            sources += from_captions(cap, args.texts)
    except (FileNotFoundError, ValueError) as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return 2
    unique: dict[str, Source] = {}
    for s in sources:
        unique.setdefault(s.id, s)
    sources = list(unique.values())
    with common.client(args) as xm:
        try:
            limits = xm.limits()
            limits.max_batch_items = max(1, min(args.batch, limits.max_batch_items))
            max_chars = limits.max_text_chars
            known = {} if args.force else xm.content_hashes([s.id for s in sources])
            report = _run(xm, sources, known, max_chars, args)
        except XmodalError as exc:
            return common.fail(prog, exc)
    skipped, queued_report = report
    by_id = {s.id: s for s in sources}
    summary = {
        "indexed": len(queued_report.indexed),
        "failed": {
            i: {"path": str(by_id[i].path) if i in by_id else None, "reason": r}
            for i, r in sorted(queued_report.failed.items())
        },
        "pending": len(queued_report.pending),
        "skipped": skipped,
        "ignored": [str(p) for p in ignored],
        "jobs": queued_report.jobs,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"indexed {summary['indexed']}, failed {len(summary['failed'])}, "
            f"skipped {skipped} (already indexed), ignored {len(ignored)} (not media)"
            + (f", {summary['pending']} still queued" if summary["pending"] else "")
        )
        for i, f in summary["failed"].items():
            print(f"  failed: {f['path'] or i}: {f['reason']}")
    if queued_report.failed or (queued_report.pending and not args.no_wait):
        return 1
    return 0


def _run(xm: Any, sources: list[Source], known: dict[str, str], max_chars: int, args: Any) -> Any:
    todo: list[tuple[Source, str]] = []
    skipped = 0
    read_errors: dict[str, str] = {}
    for s in sources:
        try:
            if s.id in known:
                _, digest = read(s, max_chars)
                if known[s.id] == digest:
                    skipped += 1
                    continue
        except OSError as exc:
            read_errors[s.id] = f"cannot read: {exc}"
            continue
        todo.append((s, ""))

    def items() -> Iterator[dict[str, Any]]:
        for s, _ in todo:
            try:
                yield read(s, max_chars)[0]
            except OSError as exc:
                read_errors[s.id] = f"cannot read: {exc}"

    report = xm.ingest(
        items(), wait=not args.no_wait, progress=not args.no_progress, total=len(todo)
    )
    report.failed.update(read_errors)
    return skipped, report
