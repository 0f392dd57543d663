"""``xmodal search``: query a running service with a text, an image or a video file.

Prints a table (rank, score, raw score, modality, id, what it is: a path, a caption, a text,
a video segment), or the service's JSON answer with ``--json``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.client import XmodalError
from service.commands import common

EXAMPLE = """
xmodal search "a dog running on the beach" --top-k 5
xmodal search --image query.jpg --targets image
xmodal search --video clip.mp4 --json
"""


def build_parser() -> Any:
    p = common.parser("xmodal search", __doc__.split("\n\n")[0], EXAMPLE)
    p.add_argument("text", nargs="?", help="a text query")
    p.add_argument("--image", type=Path, help="an image file to query with")
    p.add_argument("--video", type=Path, help="a video file to query with")
    p.add_argument(
        "--targets", help="comma-separated modalities (default: the other side of the query)"
    )
    p.add_argument("--top-k", type=int, default=10)
    qb = p.add_mutually_exclusive_group()
    qb.add_argument("--qbnorm", dest="qbnorm", action="store_true", default=None)
    qb.add_argument("--no-qbnorm", dest="qbnorm", action="store_false")
    p.add_argument("--min-score", type=float)
    p.add_argument("--json", action="store_true", help="print the service's JSON answer")
    common.add_client_args(p)
    return p


def describe(hit: dict[str, Any]) -> str:
    meta = hit.get("metadata") or {}
    keys = ("text", "caption", "path", "name")
    what = str(next((meta[k] for k in keys if meta.get(k)), ""))
    if hit.get("start") is not None:
        what = f"[{hit['start']:.1f}-{hit['end']:.1f}s] {what}"
    return what if len(what) <= 80 else what[:77] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(None if argv is None else list(argv))
    given = [x for x in (args.text, args.image, args.video) if x is not None]
    if len(given) != 1:
        p.error("give exactly one of TEXT, --image FILE, --video FILE")
    for f in (args.image, args.video):
        if f is not None and not f.is_file():
            sys.stderr.write(f"xmodal search: no such file: {f}\n")
            return 2
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    with common.client(args) as xm:
        try:
            answer = xm.search(
                args.text,
                image=args.image,
                video=args.video,
                targets=targets,
                top_k=args.top_k,
                qbnorm=args.qbnorm,
                min_score=args.min_score,
            )
        except XmodalError as exc:
            return common.fail("xmodal search", exc)
    if args.json:
        print(json.dumps(answer))
        return 0
    rows = [
        (i, f"{h['score']:.4f}", f"{h['raw_score']:.4f}", h["modality"], h["id"], describe(h))
        for i, h in enumerate(answer["results"], 1)
    ]
    print(common.table(rows, ("#", "score", "raw", "modality", "id", "what")))
    print(
        f"{len(rows)} results in {answer['took_ms']:.0f} ms (model {answer['model']}, "
        f"QB-Norm {'on' if answer['qbnorm_applied'] else 'off'})"
    )
    return 0
