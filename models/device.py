"""The one place that decides which device a model runs on."""

from __future__ import annotations

import torch


def resolve_device(requested: str | torch.device | None = None) -> torch.device:
    """The model device: ``requested`` when given (``"cpu"``, ``"cuda"``, ``"cuda:1"``),
    otherwise ``cuda`` when a CUDA device is available, else ``cpu``.

    Raises:
        ValueError: a CUDA device was asked for and none is available, or the string is
            not a device torch knows.
    """
    if requested is None or str(requested) in {"", "auto"}:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as e:
        raise ValueError(f"unknown device {requested!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} asked for, but no CUDA device is available")
    return device
