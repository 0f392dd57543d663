"""``xmodal querybank build|info``: the QB-Norm querybank of the serving model.

``xmodal querybank build --data DIR --split train [--limit 5000]`` encodes training captions
with the configured model (``XMODAL_MODEL__*``) and stores them as the text->visual bank in
the querybank store the service uses (Redis when ``XMODAL_REDIS_URL`` is set, else the file
store under ``XMODAL_DATA_DIR``), replacing the previous bank (``--append`` to add instead).
Captions are taken round-robin (every image's first caption, then every second caption...)
so a limit below the caption count still covers as many images as possible, as in the QB-Norm
paper's 5,000-caption bank.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="xmodal querybank", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="encode training captions into the bank")
    build.add_argument(
        "--data", type=Path, required=True, help="folder with captions.jsonl (e.g. flickr8k/)"
    )
    build.add_argument("--split", default="train", help="captions of this split (default train)")
    build.add_argument("--limit", type=int, default=5000, help="bank size (default 5000)")
    build.add_argument("--batch-size", type=int, default=256)
    build.add_argument("--append", action="store_true", help="append instead of replacing")
    build.add_argument("--data-dir", type=Path, help="override XMODAL_DATA_DIR")
    info = sub.add_parser("info", help="print the bank's size and version")
    info.add_argument("--data-dir", type=Path, help="override XMODAL_DATA_DIR")
    return parser.parse_args(list(argv))


def read_captions(data: Path, split: str, limit: int) -> list[str]:
    """Up to ``limit`` distinct captions of ``split``, round-robin over images."""
    path = data / "captions.jsonl"
    if not path.is_file() and (data / "flickr8k" / "captions.jsonl").is_file():
        path = data / "flickr8k" / "captions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no captions.jsonl under {data}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if row.get("split") == split:
                    rows.append(row["captions"])
    if not rows:
        raise ValueError(f"no captions of split {split!r} in {path}")
    out: list[str] = []
    seen: set[str] = set()
    for round_ in range(max(len(c) for c in rows)):
        for captions in rows:
            if round_ < len(captions):
                text = " ".join(str(captions[round_]).split())
                if text and text not in seen:
                    seen.add(text)
                    out.append(text)
                    if len(out) >= limit:
                        return out
    return out


def _settings(args: argparse.Namespace) -> Any:
    from service.settings import Settings

    overrides: dict[str, Any] = {}
    if getattr(args, "data_dir", None) is not None:
        overrides["data_dir"] = args.data_dir
    return Settings(**overrides)


def _store(settings: Any) -> Any:
    """The querybank store of the configured mode (the one the service reads)."""
    from service.backends import open_backends

    return open_backends(settings, parts=("querybank",)).querybank


def build(args: argparse.Namespace) -> int:
    from service.backends import backend_mode
    from service.lifecycle import load_model
    from service.state import QUERYBANK_DIRECTION

    settings = _settings(args)
    texts = read_captions(args.data, args.split, args.limit)
    model = load_model(settings)
    logger.info("encoding %d %s captions with %s", len(texts), args.split, model.name)
    t0 = time.perf_counter()
    parts = [
        np.asarray(model.embed_texts(texts[i : i + args.batch_size]), dtype=np.float32)
        for i in range(0, len(texts), args.batch_size)
    ]
    vectors = np.concatenate(parts, axis=0)
    elapsed = time.perf_counter() - t0
    store = _store(settings)
    if args.append:
        store.append(model.name, QUERYBANK_DIRECTION, vectors, texts)
    else:
        store.replace(model.name, QUERYBANK_DIRECTION, vectors, texts)
    bank = store.get(model.name, QUERYBANK_DIRECTION)
    summary = {
        "model": model.name,
        "direction": QUERYBANK_DIRECTION,
        "encoded": len(texts),
        "size": len(bank) if bank is not None else 0,
        "version": getattr(bank, "version", None),
        "encode_s": round(elapsed, 2),
        "store": "redis" if backend_mode(settings) == "redis" else str(settings.data_dir),
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def info(args: argparse.Namespace) -> int:
    from service.state import QUERYBANK_DIRECTION

    settings = _settings(args)
    store = _store(settings)
    name = settings.model.name
    if name is None:
        from models import create_model

        name = create_model(None, checkpoint=settings.model.checkpoint, device="cpu").name
    bank = store.get(name, QUERYBANK_DIRECTION)
    sys.stdout.write(
        json.dumps(
            {
                "model": name,
                "direction": QUERYBANK_DIRECTION,
                "size": len(bank) if bank is not None else 0,
                "version": getattr(bank, "version", None),
            }
        )
        + "\n"
    )
    return 0


def main(argv: Sequence[str]) -> int:
    """Entry point of ``xmodal querybank``."""
    args = parse_args(argv)
    from service.logging import configure_logging

    configure_logging("INFO", json_logs=False)
    try:
        return build(args) if args.action == "build" else info(args)
    except (FileNotFoundError, ValueError) as exc:
        sys.stderr.write(f"xmodal querybank: {exc}\n")
        return 2
