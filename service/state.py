"""What the service holds: :class:`ServiceState` and the typed interfaces routes rely on.

One ``ServiceState`` lives at ``app.state.xmodal``. :mod:`service.lifecycle` fills it at
start-up and empties it at shutdown; routes reach it through :mod:`service.deps`. This module
imports nothing heavy (the concrete classes only for type checking) and nothing above it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from service import metrics
from service.encoder import Overloaded
from service.settings import Settings

if TYPE_CHECKING:
    from index.calibration import ScoreCalibration
    from index.gallery import Gallery
    from index.qbnorm import QBNormalizer
    from index.querybank import QueryBankStore
    from service.encoder import QueryEncoder
    from service.handoff import DecodedPhotos
    from service.jobs import JobStore
    from service.queue import IngestQueue

logger = logging.getLogger(__name__)

R = TypeVar("R")

# QB-Norm at serving time, decided here once. A bank holds queries of one modality
# (index.querybank.BANK_DIRECTION names its key) and normalises searches of these galleries:
QBNORM_TARGETS: dict[str, tuple[str, ...]] = {
    "text": ("image", "video"),
    "image": ("text",),
    "video": ("text",),
}
# ...and a query of a modality is normalised by the first of these banks that is served
# (a video query uses the video bank when one exists, else the image bank: video items are
# embedded from frames, in the image space).
QBNORM_BANKS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "image": ("image",),
    "video": ("video", "image"),
}


class ServingModel(Protocol):
    """What the service reads of the model (``models.XModal``) outside the encoders."""

    @property
    def name(self) -> str: ...

    @property
    def embed_dim(self) -> int: ...

    @property
    def num_vectors(self) -> int: ...


class Runner(Protocol):
    """A background runner the service stops at shutdown (embedded worker, replica applier)."""

    def join(self, timeout: float | None = None) -> None: ...


class Replica(Runner, Protocol):
    """This replica's applier of the workers' vector log (Redis mode)."""

    gap: bool

    def wait_for(self, offset: str, timeout: float = 5.0) -> bool: ...


class DeletePublisher(Protocol):
    """Publishes deletes on the vector log so every replica applies them (Redis mode)."""

    def publish_delete(self, ids: Iterable[str]) -> str | None: ...

    def close(self) -> None: ...


class Pinger(Protocol):
    """A Redis client, as the readiness check uses it."""

    def ping(self) -> Any: ...

    def close(self) -> None: ...


class NormalizerRefresher(Protocol):
    """The background task that refits QB-Norm (:class:`service.normalizers.Refresher`)."""

    def refit_now(self, timeout: float = 60.0) -> bool: ...

    def stop(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...


@dataclass
class ServiceState:
    """Everything heavy the service holds, built in the lifespan (tests may pass a model)."""

    settings: Settings
    executor: ThreadPoolExecutor
    model: ServingModel | None = None  # a models.XModal
    encoder: QueryEncoder | None = None
    galleries: dict[str, Gallery] = field(default_factory=dict)  # modality -> gallery
    querybank: QueryBankStore | None = None
    # bank modality -> target gallery modality -> QB-Norm (see QBNORM_TARGETS)
    normalizers: dict[str, dict[str, QBNormalizer]] = field(default_factory=dict)
    refresher: NormalizerRefresher | None = None  # refits ``normalizers`` in the background
    queue: IngestQueue | None = None
    jobs: JobStore | None = None
    worker: Runner | None = None  # the embedded worker, or None
    handoff: DecodedPhotos | None = None  # photos the API decoded, for the embedded worker
    replica: Replica | None = None  # the replica applier (Redis mode), or None
    publisher: DeletePublisher | None = None  # deletes on the vector log (Redis mode), or None
    redis: Pinger | None = None  # for readiness checks (Redis mode), or None
    ready: bool = False
    error: str | None = None  # why loading failed, when it did
    bank_stale: bool = False  # the last querybank check failed (store unreachable): cached bank
    calibration: ScoreCalibration | None = None  # P(right) of a hit, when the model ships one
    # bank modality -> the store version skipped as unusable (another checkpoint's weights)
    skipped_banks: dict[str, int] = field(default_factory=dict)
    stop_event: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def model_name(self) -> str:
        return str(getattr(self.model, "name", "unknown"))

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        """Run blocking work (model, FAISS, Redis, SQLite) on the pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---- index ------------------------------------------------------------------------------
    def index_version(self) -> int:
        """One monotonic number for the whole index: the sum of the galleries' versions."""
        return int(sum(int(g.version) for g in self.galleries.values()))

    def remove_item(self, item_id: str, modalities: list[str]) -> None:
        """Delete an item everywhere it is indexed.

        Embedded: straight from the galleries. Redis: a tombstone on the vector log, which
        every replica applies; we wait (briefly) for our own replica to read our write.
        """
        if self.publisher is not None:
            offset = self.publisher.publish_delete([item_id])
            replica = self.replica if offset is not None else None
            if replica is not None and offset is not None and not replica.wait_for(offset, 10.0):
                logger.warning("delete of %s not applied locally within 10 s", item_id)
            return
        for modality in modalities:
            self.galleries[modality].remove([item_id])

    # ---- ingest -----------------------------------------------------------------------------
    def check_queue_capacity(self, incoming: int) -> None:
        """429 when the ingest backlog is over the configured cap."""
        cap = self.settings.ingest.max_queue_depth
        depth_fn = getattr(self.queue, "depth", None)
        if not cap or not callable(depth_fn):
            return
        try:
            depth = int(depth_fn())
        except Exception:  # noqa: BLE001 - a failing probe must not block ingestion
            logger.warning("queue depth probe failed", exc_info=True)
            return
        if depth + incoming > cap:
            metrics.REJECTED_OVERLOAD.labels("/ingest").inc()
            raise Overloaded(f"ingest queue holds {depth} items (cap {cap})", retry_after=5)

    def enqueue(self, job_id: str, payloads: list[dict[str, Any]]) -> None:
        """Register the job and queue its items durably, all or nothing (service/enqueue.py)."""
        from service.enqueue import enqueue_job

        assert self.jobs is not None and self.queue is not None
        enqueue_job(self.jobs, self.queue, job_id, payloads)

    # ---- querybank and QB-Norm --------------------------------------------------------------
    def querybank_info(self, modality: str = "text") -> tuple[int, int | None]:
        """(size, version) of the serving model's bank of ``modality`` queries in the store;
        (0, None) when none."""
        from index.querybank import direction_of

        if self.querybank is None:
            return 0, None
        bank = self.querybank.get(self.model_name, direction_of(modality))
        if bank is None:
            return 0, None
        return int(len(bank)), int(bank.version)

    def bank_for(self, query_modality: str) -> str | None:
        """The modality of the served bank that normalises ``query_modality`` queries (see
        QBNORM_BANKS), or None when none is served (or the query kind has no bank)."""
        for bank in QBNORM_BANKS.get(query_modality, ()):
            if self.normalizers.get(bank):
                return bank
        return None

    def serving_bank(self, modality: str = "text") -> tuple[int, int | None]:
        """(size, version) of the live bank of ``modality`` queries, without reading the store
        (cheap: for every search response and metrics scrape); (0, None) when none."""
        current = next(iter(self.normalizers.get(modality, {}).values()), None)
        if current is None:
            return 0, None
        return int(len(current.bank)), int(current.bank_version)

    def append_querybank(self, vectors: Any, texts: list[str], modality: str = "text") -> None:
        """Append encoded queries to the bank; the background refresher refits QB-Norm over
        it, and this returns once it has (so the next search uses the new bank)."""
        from index.querybank import direction_of

        assert self.querybank is not None
        self.querybank.append(self.model_name, direction_of(modality), vectors, texts)
        if self.refresher is not None and not self.refresher.refit_now():
            logger.warning("qbnorm: refit after the querybank append did not finish in time")


__all__ = [
    "QBNORM_BANKS",
    "QBNORM_TARGETS",
    "DeletePublisher",
    "NormalizerRefresher",
    "Pinger",
    "Replica",
    "Runner",
    "ServiceState",
    "ServingModel",
]
