"""``xmodal worker``: an ingestion worker (Redis mode).

Builds the model, the Redis Streams queue, the job store and the vector-log publisher from
``Settings``, serves Prometheus metrics on ``worker.metrics_port``, and consumes until SIGTERM or
SIGINT; the in-flight batch is finished (encoded, published, acked) before it exits. A second
SIGINT exits at once (the unacked messages are reclaimed by another worker).

Embedded mode (no ``XMODAL_REDIS_URL``) has no separate worker: ``xmodal serve`` runs it
in-process, since only that process may write its galleries.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

from pydantic import ValidationError

logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="xmodal worker",
        description="Consume the ingest queue: decode, encode in batches, publish vectors. "
        "Settings come from XMODAL_* variables; these flags override them.",
    )
    parser.add_argument("--consumer", help="consumer name in the group (XMODAL_WORKER__CONSUMER)")
    parser.add_argument(
        "--batch-size", type=int, help="items per batch (XMODAL_WORKER__BATCH_SIZE)"
    )
    parser.add_argument("--device", help='model device, e.g. "cuda:0" (XMODAL_MODEL__DEVICE)')
    parser.add_argument(
        "--metrics-port", type=int, help="Prometheus port, 0 = off (XMODAL_WORKER__METRICS_PORT)"
    )
    return parser.parse_args(list(argv))


def load_settings(args: argparse.Namespace) -> Any:
    """Settings from the environment, with the given flags on top (validated)."""
    from service.settings import Settings

    settings = Settings()  # type: ignore[call-arg]
    worker: dict[str, Any] = {}
    if args.consumer is not None:
        worker["consumer"] = args.consumer
    if args.batch_size is not None:
        worker["batch_size"] = args.batch_size
    if args.metrics_port is not None:
        worker["metrics_port"] = args.metrics_port
    model: dict[str, Any] = {} if args.device is None else {"device": args.device}
    data = settings.model_dump()
    data["worker"].update(worker)
    data["model"].update(model)
    return Settings(**data)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a worker until SIGTERM/SIGINT; returns the exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_settings(args)
    except ValidationError as exc:
        sys.stderr.write(f"xmodal worker: invalid settings:\n{exc}\n")
        return 2
    from service.backends import backend_mode

    if backend_mode(settings) != "redis":
        sys.stderr.write(
            "xmodal worker: needs XMODAL_REDIS_URL (in embedded mode `xmodal serve` runs the "
            "worker in-process)\n"
        )
        return 2

    from service.logging import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    worker = build_worker(settings)  # its run() beats the heartbeat /readyz and /jobs read

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if worker.stopping:
            if signum == signal.SIGINT:  # Ctrl-C twice: the operator means it
                logger.warning("second interrupt: exiting now; pending messages get reclaimed")
                raise SystemExit(1)
            logger.info("signal %d again: still finishing the in-flight batch", signum)
            return
        logger.info("signal %d: finishing the in-flight batch, then exiting", signum)
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        worker.run()
    finally:
        from service.backends import close_quietly

        for name in ("queue", "jobs", "sink"):
            close_quietly(name, getattr(worker, name))
    return 0


def build_worker(settings: Any) -> Any:
    """Model, queue, job store and vector-log publisher for a Redis-mode worker."""
    import torch

    from models.device import resolve_device
    from service.backends import open_backends
    from service.lifecycle import load_model
    from service.worker import Worker

    backends = open_backends(settings, parts=("queue", "jobs", "sink"))  # fails fast
    queue, jobs, publisher = backends.queue, backends.jobs, backends.sink
    assert queue is not None and jobs is not None and publisher is not None
    if resolve_device(settings.model.device).type == "cpu":  # None: the GPU when present
        torch.set_num_threads(max(1, settings.model.threads))
    model = load_model(settings)
    model.eval()
    if settings.worker.metrics_port:
        from service.metrics import start_worker_server

        start_worker_server(settings.worker.metrics_port)
    logger.info(
        "worker %s: model %s on %s, batch %d, queue %s",
        settings.worker.consumer,
        model.name,
        getattr(model, "device", "cpu"),
        settings.worker.batch_size,
        getattr(queue, "stream", "?"),
    )
    return Worker(model, queue, jobs, publisher, settings)
