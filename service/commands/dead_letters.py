"""``xmodal dead-letters list|requeue``: items the workers gave up on, and putting them back.

``list`` shows each dead letter's message id, item, deliveries and last error. ``requeue
MESSAGE_ID...`` (or ``--all``) queues them again as one new job and, unless ``--no-wait``,
follows that job to the end; the exit code is 1 if any of them failed again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from service.client import XmodalError
from service.commands import common

EXAMPLE = """
xmodal dead-letters list
xmodal dead-letters requeue 17 18
xmodal dead-letters requeue --all --json
"""


def build_parser() -> Any:
    p = common.parser("xmodal dead-letters", __doc__.split("\n\n")[0], EXAMPLE)
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="show the dead letters, newest first")
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--json", action="store_true")
    common.add_client_args(ls)
    rq = sub.add_parser("requeue", help="queue dead letters again")
    rq.add_argument("ids", nargs="*", help="message ids (from `list`)")
    rq.add_argument("--all", action="store_true", help="every dead letter")
    rq.add_argument("--no-wait", action="store_true", help="do not follow the new job")
    rq.add_argument("--json", action="store_true")
    common.add_client_args(rq)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(None if argv is None else list(argv))
    prog = f"xmodal dead-letters {args.action}"
    with common.client(args) as xm:
        try:
            if args.action == "list":
                letters = xm.dead_letters(args.limit)
                if args.json:
                    print(json.dumps(letters))
                    return 0
                rows = [
                    (
                        d["message_id"],
                        d["item_id"],
                        d["modality"],
                        d["deliveries"],
                        time.strftime("%Y-%m-%d %H:%M", time.localtime(d["at"])),
                        "yes" if d["requeueable"] else "no",
                        d["error"][:70],
                    )
                    for d in letters
                ]
                header = ("message", "item", "modality", "tries", "at", "requeue", "error")
                print(common.table(rows, header))
                print(f"{len(letters)} dead letter(s)")
                return 0
            if bool(args.ids) == bool(args.all):
                p.error("give message ids or --all (not both)")
            result = xm.requeue(None if args.all else args.ids)
            final: dict[str, Any] | None = None
            if result["job_id"] and not args.no_wait:
                while True:
                    final = xm.job(result["job_id"])
                    if final["state"] in ("done", "failed"):
                        break
                    time.sleep(0.5)
        except XmodalError as exc:
            return common.fail(prog, exc)
    failed = [it for it in (final or {}).get("items", []) if it["state"] == "failed"]
    if args.json:
        print(json.dumps({**result, "job": final}))
    else:
        print(f"requeued {len(result['requeued'])} as job {result['job_id']}")
        for mid, why in result["skipped"].items():
            print(f"  skipped {mid}: {why}")
        for mid in result["not_found"]:
            print(f"  not found: {mid}")
        if final is not None:
            indexed = sum(it["state"] == "indexed" for it in final["items"])
            print(f"job {final['job_id']}: {indexed} indexed, {len(failed)} failed")
            for it in failed:
                print(f"  failed: {it['id']}: {it.get('error')}")
    return 1 if failed or result["skipped"] or result["not_found"] else 0
