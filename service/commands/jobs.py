"""``xmodal jobs``: the most recent ingest jobs of a running service, newest first, or one
job's items with ``xmodal jobs JOB_ID``."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from service.client import XmodalError
from service.commands import common

EXAMPLE = """
xmodal jobs --limit 5
xmodal jobs 3f2c9a0e4b1d4c6a8e7f0b2a1c3d5e7f --json
"""


def build_parser() -> Any:
    p = common.parser("xmodal jobs", __doc__.split("\n\n")[0], EXAMPLE)
    p.add_argument("job_id", nargs="?", help="show this job's items")
    p.add_argument("--limit", type=int, default=20, help="how many jobs (default 20)")
    p.add_argument("--json", action="store_true")
    common.add_client_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(None if argv is None else list(argv))
    with common.client(args) as xm:
        try:
            if args.job_id:
                job = xm.job(args.job_id)
                if args.json:
                    print(json.dumps(job))
                else:
                    rows: list[tuple[object, ...]] = [
                        (it["id"], it["state"], it.get("error") or "") for it in job["items"]
                    ]
                    print(f"job {job['job_id']}: {job['state']}")
                    print(common.table(rows, ("item", "state", "error")))
                return 0
            jobs = xm.jobs(args.limit)
        except XmodalError as exc:
            return common.fail("xmodal jobs", exc)
    if args.json:
        print(json.dumps(jobs))
        return 0
    listing: list[tuple[object, ...]] = [
        (
            j["job_id"],
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["created_at"])),
            j["state"],
            j["items"],
            j["counts"].get("indexed", 0),
            j["counts"].get("failed", 0),
            j["counts"].get("queued", 0) + j["counts"].get("encoding", 0),
        )
        for j in jobs
    ]
    print(
        common.table(listing, ("job", "created", "state", "items", "indexed", "failed", "waiting"))
    )
    return 0
