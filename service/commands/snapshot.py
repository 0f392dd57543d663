"""``xmodal snapshot create|restore DIR``: back up a service's index, and restore it.

``create DIR`` asks the running service (``--url``) for a consistent snapshot (every
gallery's records and FAISS index, its write-ahead log, the querybank, a manifest with
checksums) and unpacks it into DIR. ``restore DIR`` is offline: it verifies the checksums and
copies the snapshot into a data dir (``--data-dir`` or ``XMODAL_DATA_DIR``) where no service is
running; ``xmodal serve`` there answers every search as the backed-up service did.
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
xmodal snapshot create backups/2026-12-03
xmodal snapshot restore backups/2026-12-03 --data-dir /srv/xmodal/data
"""


def build_parser() -> Any:
    p = common.parser("xmodal snapshot", __doc__.split("\n\n")[0], EXAMPLE)
    sub = p.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", help="download a snapshot of the running service")
    create.add_argument("dir", type=Path, help="an empty or new folder")
    create.add_argument("--json", action="store_true")
    common.add_client_args(create)
    restore = sub.add_parser("restore", help="restore a snapshot into a data dir (offline)")
    restore.add_argument("dir", type=Path, help="a folder written by `snapshot create`")
    restore.add_argument("--data-dir", type=Path, help="target data dir (XMODAL_DATA_DIR)")
    restore.add_argument("--force", action="store_true", help="replace an existing index")
    restore.add_argument("--json", action="store_true")
    return p


def _summary(manifest: dict[str, Any]) -> str:
    parts = [f"{m} {g['items']}" for m, g in manifest["galleries"].items()]
    bank = sum(manifest["querybank"].values())
    return f"model {manifest['model']}: {', '.join(parts)} items; querybank {bank} queries"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(None if argv is None else list(argv))
    prog = f"xmodal snapshot {args.action}"
    from service.snapshots import SnapshotError

    if args.action == "create":
        if args.dir.exists() and any(args.dir.iterdir()):
            sys.stderr.write(f"{prog}: {args.dir} is not empty\n")
            return 2
        with common.client(args) as xm:
            try:
                manifest = xm.snapshot(args.dir)
            except XmodalError as exc:
                return common.fail(prog, exc)
        done = f"snapshot in {args.dir}: {_summary(manifest)}"
        print(json.dumps(manifest) if args.json else done)
        return 0
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        overrides = {"data_dir": args.data_dir} if args.data_dir is not None else {}
        settings = Settings(**overrides)
    except ValidationError as exc:
        sys.stderr.write(f"{prog}: invalid settings:\n{exc}\n")
        return 2
    try:
        from service.snapshots import restore_snapshot

        manifest = restore_snapshot(args.dir, settings, force=args.force)
    except SnapshotError as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return 1
    if args.json:
        print(json.dumps(manifest))
    else:
        print(f"restored into {settings.data_dir}: {_summary(manifest)}")
    return 0
