"""The one place the service turns settings into a serving model: device, weights, engine."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from models import XModal, create_model
from models.device import resolve_device
from models.runtime import enable_onnx, weights_hash
from service.settings import ModelSettings

logger = logging.getLogger(__name__)

__all__ = ["default_onnx_cache", "load_serving_model", "model_weights_hash"]


def default_onnx_cache() -> Path:
    """``$XDG_CACHE_HOME/xmodal/onnx``, else ``~/.cache/xmodal/onnx``: shared by every data
    dir, since the graphs are keyed by the weights they were exported from."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xmodal" / "onnx"


def load_serving_model(settings: ModelSettings, *, device: str | None = None) -> XModal:
    """Build the configured model in eval mode on its device (``settings.device``, or ``device``
    when given; None = the GPU when present, else the CPU), with the ONNX Runtime engine on
    the CPU when ``settings.runtime == "onnx"`` (eager is the fallback), in
    ``settings.precision``."""
    target = resolve_device(device if device is not None else settings.device)
    model = create_model(
        settings.name,
        checkpoint=settings.checkpoint,
        device=target,
        video_pooling=settings.video_pooling,
    ).eval()
    if settings.runtime == "onnx" and target.type == "cpu":
        cache = settings.onnx_cache_dir or default_onnx_cache()
        on = enable_onnx(model, cache, precision=settings.precision)
        logger.info("model %s: %s engine", model.name, "onnx" if on else "eager")
        if on:
            single_thread_blas()
    return model


def single_thread_blas() -> None:
    """Run numpy's (and scipy's) BLAS on the calling thread only, for the rest of the process.

    The service's own BLAS work is small (a QB-Norm update is a 5000 x 384 by 384 x 32
    matmul per ingest batch), but OpenBLAS hands it to a pool whose threads then spin for
    ~0.1 s waiting for more, on the cores the encoder's threads need: during a 300-photo
    ingest on 2 cores that pool's spinning took 0.55-0.75 s of CPU (docs/BENCHMARKS.md,
    "Issue #12, third pass")."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")  # kept: the limit lasts for the process


def model_weights_hash(model: object) -> str | None:
    """:func:`models.runtime.weights_hash` of ``model``, computed once and kept on it (a
    querybank records it, so a bank encoded by another checkpoint is never applied); None for
    an object that is not a model with weights."""
    cached = getattr(model, "_xmodal_weights_hash", None)
    if cached is None:
        if not isinstance(model, XModal):
            return None
        cached = weights_hash(model)
        setattr(model, "_xmodal_weights_hash", cached)  # noqa: B010 - nn.Module keeps it
    return str(cached)
