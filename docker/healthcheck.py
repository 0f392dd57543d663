"""Container HEALTHCHECK: exit 0 when an HTTP GET of the URL answers 2xx, else 1.

Standard library only (the slim image has no curl). Default URL: the API's liveness route on
``$XMODAL_PORT`` (8000); the worker's compose service passes its metrics URL instead
(``python /app/docker/healthcheck.py http://127.0.0.1:9100/metrics``).
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main(argv: list[str]) -> int:
    port = os.environ.get("XMODAL_PORT", "8000")
    url = argv[1] if len(argv) > 1 else f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 - local URL
            ok = 200 <= response.status < 300
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    print(f"{'healthy' if ok else 'unhealthy'}: {url}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
