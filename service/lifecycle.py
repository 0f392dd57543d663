"""Building and closing what the service holds: backends, galleries, QB-Norm, worker, replica.

The stores come from :func:`service.backends.open_backends`, the one place that chooses
embedded or Redis mode (the worker and the CLI commands use it too).

:func:`build_state` loads everything onto a :class:`~service.state.ServiceState` (on the pool
at start-up); :func:`shutdown_state` stops ingestion after the in-flight batch, snapshots and
closes the galleries, then closes the backends.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.backends import Backends, backend_mode, close_quietly, open_backends
from service.normalizers import Refresher, build_normalizers
from service.seeding import load_calibration, seed_querybanks
from service.settings import MODALITIES, Settings
from service.state import ServiceState

if TYPE_CHECKING:
    from index.gallery import Gallery

logger = logging.getLogger(__name__)


def load_model(settings: Settings) -> Any:
    """The configured model on the configured device (the GPU when there is one, else the CPU
    with the ONNX Runtime engine): :func:`service.loading.load_serving_model`."""
    from service.loading import load_serving_model

    return load_serving_model(settings.model)


def build_state(state: ServiceState, model: Any = None) -> None:
    """Blocking: load everything onto ``state`` (runs on the pool at start-up)."""
    settings = state.settings
    t0 = time.perf_counter()
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    if model is None:
        model = load_model(settings)
    if hasattr(model, "eval"):
        model.eval()
    state.model = model
    logger.info(
        "model %s loaded on %s (dim %d, %d vector(s) per item)",
        state.model_name,
        getattr(model, "device", "?"),
        model.embed_dim,
        model.num_vectors,
    )
    state.galleries = open_galleries(settings, model)
    backends = open_backends(settings, parts=("queue", "jobs", "querybank"))
    state.querybank = backends.querybank
    if settings.qbnorm.seed_shipped and state.querybank is not None:
        try:
            seed_querybanks(state.querybank, model, settings.qbnorm.bank_dir)
        except Exception:  # noqa: BLE001 - serve without QB-Norm rather than not at all
            logger.warning("qbnorm: seeding the shipped querybanks failed", exc_info=True)
    state.calibration = load_calibration(model, settings.qbnorm.bank_dir)
    build_normalizers(state, force=True)
    state.refresher = Refresher(state).start()
    state.queue, state.jobs = backends.queue, backends.jobs
    if backends.mode == "redis":
        import redis

        assert settings.redis_url is not None
        state.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=2)
        state.replica = start_replica(state)
    elif settings.worker.embedded:
        state.worker = start_worker(state)
    logger.info(
        "ready in %.1fs: %s",
        time.perf_counter() - t0,
        ", ".join(f"{m}={len(g)}" for m, g in state.galleries.items()),
    )


def open_galleries(settings: Settings, model: Any) -> dict[str, Gallery]:
    """One durable gallery per modality under ``<data_dir>/index/<model name>/<modality>``:
    vectors of different models never share (or corrupt) an index."""
    from index.gallery import Gallery

    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(getattr(model, "name", "model"))) or "model"
    root = Path(settings.data_dir) / "index" / safe
    return {
        m: Gallery(root / m, model.embed_dim, model.num_vectors, settings.index) for m in MODALITIES
    }


def start_worker(state: ServiceState) -> Any:
    """The in-process ingestion worker of embedded mode (and the hand-off of the photos the
    API decodes to validate, so the worker does not decode them again)."""
    from service.handoff import DecodedPhotos
    from service.worker import start_embedded_worker

    handoff_bytes = int(state.settings.worker.handoff_mb * 2**20)
    state.handoff = DecodedPhotos(handoff_bytes) if handoff_bytes > 0 else None
    return start_embedded_worker(
        state.settings,
        model=state.model,
        galleries=state.galleries,
        queue=state.queue,
        jobs=state.jobs,
        stop_event=state.stop_event,
        handoff=state.handoff,
    )


def start_replica(state: ServiceState) -> Any:
    """Tail the workers' vector log into this replica's galleries (Redis mode); deletes are
    published on the same log so every replica applies them in the same order."""
    from service.replication import ReplicaApplier, ReplicationPublisher

    assert state.settings.redis_url is not None
    sink = open_backends(state.settings, parts=("sink",)).sink
    assert isinstance(sink, ReplicationPublisher)
    state.publisher = sink
    return ReplicaApplier(state.settings.redis_url, state.galleries).start()


def stop_worker(obj: Any, timeout: float = 60.0) -> None:
    """Stop a background runner (embedded worker, replica applier) after its current batch."""
    if hasattr(obj, "close"):
        obj.close()
    elif hasattr(obj, "stop"):
        obj.stop()
    if hasattr(obj, "join"):
        obj.join(timeout=timeout)


def shutdown_state(state: ServiceState) -> None:
    """Blocking, graceful: stop ingestion (finishing the in-flight batch), then close."""
    state.ready = False
    state.stop_event.set()
    runners: tuple[tuple[str, object], ...] = (
        ("worker", state.worker),
        ("replica applier", state.replica),
        ("qbnorm refresher", state.refresher),
    )
    for name, obj in runners:
        if obj is None:
            continue
        try:
            stop_worker(obj)
        except Exception:
            logger.exception("stopping the %s failed", name)
    for modality, gallery in state.galleries.items():
        try:
            gallery.snapshot()
        except Exception:
            logger.exception("snapshot of the %s gallery failed", modality)
        finally:
            gallery.close()
    closables: tuple[tuple[str, object], ...] = (
        ("queue", state.queue),
        ("job store", state.jobs),
        ("querybank store", state.querybank),
        ("replication publisher", state.publisher),
        ("redis", state.redis),
    )
    for name, obj in closables:
        close_quietly(name, obj)


__all__ = [
    "Backends",
    "backend_mode",
    "build_state",
    "load_model",
    "open_backends",
    "open_galleries",
    "shutdown_state",
    "start_replica",
    "start_worker",
    "stop_worker",
]
