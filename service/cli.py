"""The ``xmodal`` console script.

``xmodal serve [--host H] [--port P] [--data-dir DIR]`` starts the API (and, in embedded mode,
the in-process worker); ``xmodal worker``, ``xmodal train``, ``xmodal eval``, ``xmodal export`` and
``xmodal querybank build`` run ``service.commands.<name>.main(argv)`` with the remaining
arguments. Settings come from ``XMODAL_*`` variables; command-line flags override them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, str] = {
    "serve": "start the HTTP API (embedded mode: with an in-process ingestion worker)",
    "worker": "start an ingestion worker (needs XMODAL_REDIS_URL)",
    "train": "train a model on cached features",
    "eval": "evaluate retrieval (R@K, RSUM), with and without QB-Norm",
    "querybank": "build or inspect the QB-Norm querybank (querybank build --data DIR)",
    "export": "export a checkpoint to ship (rename, float16)",
    "video": "synthetic captioned clips; train and measure the video GPO (clips|train|eval)",
    "ingest": "index folders of images/videos/texts into a running service",
    "search": "search a running service with a text, image or video",
    "jobs": "list recent ingest jobs (or one job's items)",
    "dead-letters": "list or requeue items the workers gave up on",
    "snapshot": "back up a service's index (create) or restore one (restore)",
    "config": "print the configuration reference (--markdown for docs/CONFIG.md)",
}

USAGE = "usage: xmodal <command> [args...]\n\ncommands:\n" + "".join(
    f"  {name:<13} {text}\n" for name, text in COMMANDS.items()
)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a subcommand; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"xmodal: unknown command {name!r}\n\n{USAGE}")
        return 2
    try:
        module = importlib.import_module(f"service.commands.{name.replace('-', '_')}")
    except ModuleNotFoundError as exc:
        if exc.name != f"service.commands.{name.replace('-', '_')}":
            raise
        sys.stderr.write(f"xmodal: command {name!r} is not available in this build\n")
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
