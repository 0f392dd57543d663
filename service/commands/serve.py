"""``xmodal serve``: the HTTP API (and the in-process worker in embedded mode)."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="xmodal serve",
        description="Start the xmodal API. Settings come from XMODAL_* variables; "
        "these flags override them.",
    )
    parser.add_argument("--host", help="bind address (XMODAL_HOST)")
    parser.add_argument("--port", type=int, help="port (XMODAL_PORT)")
    parser.add_argument("--data-dir", type=Path, help="index, queue, querybank (XMODAL_DATA_DIR)")
    return parser.parse_args(list(argv))


def load_settings(args: argparse.Namespace) -> Any:
    """Settings from the environment, with the given flags on top (validated)."""
    from service.settings import Settings

    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    return Settings(**overrides)


def main(argv: Sequence[str]) -> int:
    """Run the API until SIGINT/SIGTERM; returns the exit code."""
    args = parse_args(argv)
    try:
        settings = load_settings(args)
    except ValidationError as exc:
        sys.stderr.write(f"xmodal serve: invalid settings:\n{exc}\n")
        return 2
    import uvicorn

    from service.app import create_app
    from service.backends import backend_mode
    from service.logging import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    try:  # before the model loads: a busy port is a one-line error, not a slow start and exit
        sock = listen_socket(settings.host, settings.port)
    except OSError as exc:
        sys.stderr.write(f"xmodal serve: cannot listen on {settings.host}:{settings.port}: {exc}\n")
        return 1
    mode = backend_mode(settings)
    logger.info(
        "starting xmodal API on %s:%d (%s mode, data dir %s)",
        settings.host,
        settings.port,
        mode,
        settings.data_dir,
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # our handlers (configure_logging), not uvicorn's
        access_log=False,  # RequestContextMiddleware writes the access line with a request id
        timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(config)
    with sock:
        server.run(sockets=[sock])
    return 0 if server.started else 3  # 3: uvicorn's "startup failed"


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (IPv4 or IPv6, as the host resolves); uvicorn
    listens on it. Raises OSError when the address is taken or not this machine's."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
