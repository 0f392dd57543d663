"""What the client commands (ingest, search, jobs, dead-letters, snapshot) share: the
``--url``/``--api-key`` flags, building a :class:`service.client.Client`, and error output."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence

from service.client import DEFAULT_URL, Client, XmodalError


def parser(prog: str, description: str, example: str) -> argparse.ArgumentParser:
    """An argparse parser whose ``--help`` ends with an example."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="example:\n" + textwrap.indent(example.strip("\n"), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=os.environ.get("XMODAL_URL", DEFAULT_URL),
        help=f"the service (env XMODAL_URL, default {DEFAULT_URL})",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("XMODAL_API_KEY"),
        help="API key, when the service requires one (env XMODAL_API_KEY)",
    )


def client(args: argparse.Namespace) -> Client:
    return Client(args.url, args.api_key)


def fail(prog: str, exc: XmodalError) -> int:
    """Print an API error the way a person can act on; returns the exit code 1."""
    where = f" (request {exc.request_id})" if exc.request_id else ""
    sys.stderr.write(f"{prog}: {exc}{where}\n")
    return 1


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A plain fixed-width table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
