"""The one configuration object of the service.

Every knob is read once, here, from ``XMODAL_*`` environment variables (``__`` separates nested
fields, e.g. ``XMODAL_WORKER__BATCH_SIZE=64``) or passed explicitly, validated at start-up, and
handed down as typed objects. Nothing below ``service`` reads the environment itself.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from index.gallery import GalleryConfig
from index.qbnorm import QBNormConfig
from service.kinds import MODALITIES, Modality

__all__ = ["MODALITIES", "Modality"]  # re-exported: many modules take them from here


class ModelSettings(BaseModel):
    """Which encoder serves queries and ingestion."""

    name: str | None = None  # a name from models.list_models(); None = the shipped default
    checkpoint: Path | None = None  # a local .safetensors checkpoint; its config wins over name
    device: str | None = None  # "cpu", "cuda", "cuda:1"; None = cuda when available, else cpu
    query_batch_size: int = Field(32, ge=1)  # micro-batch cap for concurrent text queries
    # extra wait for batch-mates; 0 = none: queries that queue while one batch encodes form
    # the next batch, so batching costs an idle service no latency
    query_batch_wait_ms: float = Field(0.0, ge=0)
    threads: int = Field(4, ge=1)  # thread pool for blocking model / FAISS work
    max_pending_queries: int = Field(256, ge=1)  # queries waiting to encode; beyond: 429
    # Inference engine on the CPU: "onnx" (ONNX Runtime, exported once per weights and cached)
    # or "eager" (PyTorch). A model on a GPU always runs eager.
    runtime: Literal["onnx", "eager"] = "onnx"
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="arithmetic of the CPU fast path: `fp32` (ONNX Runtime, matches eager "
        "within 1e-3) or `bf16` (OpenVINO on AMX-BF16 CPUs, ~1.8x faster photo encoding, "
        "outputs within ~1e-1 of eager, dev RSUM within 1 point; needs `xmodal[openvino]`, "
        "else fp32 runs); vectors already indexed keep theirs",
    )
    onnx_cache_dir: Path | None = None  # None = $XDG_CACHE_HOME/xmodal/onnx (~/.cache/...)
    video_pooling: Literal["mean", "gpo"] | None = Field(
        None,
        description="how video frames pool into segment/clip vectors: null = the model's own "
        "(the shipped default: its trained GPO), `mean`, or `gpo` (needs a model with a video "
        "GPO); videos already indexed keep their vectors, so re-index them after a change",
    )


class IngestSettings(BaseModel):
    """Limits on what POST /ingest accepts."""

    max_batch_items: int = Field(256, ge=1)  # items per POST /ingest
    max_body_mb: float = Field(64.0, gt=0)  # request body cap
    max_image_pixels: int = Field(40_000_000, ge=1)  # decompression-bomb guard
    max_text_chars: int = Field(2_000, ge=1)  # longer text is rejected, not truncated
    max_video_seconds: float = Field(600.0, gt=0)
    media_root: Path | None = None  # items may give a `path` only inside this folder
    video_segment_seconds: float = Field(4.0, gt=0)  # one vector per segment of this length
    video_frames_per_segment: int = Field(4, ge=1)
    max_queue_depth: int = Field(1_000_000, ge=0)  # ingest backlog cap (0 = none); beyond: 429

    @property
    def max_body_bytes(self) -> int:
        """``max_body_mb`` in bytes: the one conversion (body limit, base64 media, files)."""
        return int(self.max_body_mb * 2**20)


class WorkerSettings(BaseModel):
    """The ingestion worker: dynamic batching and delivery guarantees."""

    batch_size: int = Field(32, ge=1)  # items encoded together, across jobs
    batch_wait_ms: int = Field(200, ge=0)  # how long to wait to fill a batch
    max_deliveries: int = Field(3, ge=1)  # after this many failed tries: dead-letter
    claim_idle_ms: int = Field(60_000, ge=1)  # reclaim messages pending longer than this
    consumer: str = Field(default_factory=socket.gethostname)  # consumer name in the group
    embedded: bool = True  # serve runs an in-process worker when no Redis URL is set
    metrics_port: int = Field(9100, ge=0, le=65535)  # `xmodal worker` serves /metrics here; 0 = off
    heartbeat_interval_s: float = Field(1.0, gt=0)  # Redis heartbeat (service.heartbeat) period
    # a worker silent this long is not live: /readyz drops it, peers reclaim its pending work
    heartbeat_ttl_s: float = Field(5.0, gt=0)
    read_block_ms: int = Field(500, ge=1)  # idle read timeout: how fast an idle worker notices stop
    video_frame_budget: int = Field(1024, ge=1)  # sampled frames decoded at once, across videos
    # threads decoding media (PIL, FFmpeg release the GIL); 0 = min(4, CPU count); 1 = inline
    decode_threads: int = Field(0, ge=0)
    # service/handoff.py: the embedded worker takes the photos POST /ingest decoded to validate
    handoff_mb: float = Field(64.0, ge=0)  # MiB of decoded uploads kept for the worker; 0 = off


class ThumbnailSettings(BaseModel):
    """Previews the worker stores per item (service/thumbnails.py): image thumbnails, video
    poster frames (one per segment), text snippets."""

    enabled: bool = True
    size: int = Field(256, ge=16, le=2048)  # longer side of a thumbnail, pixels
    quality: int = Field(80, ge=1, le=95)  # JPEG quality


class QueueSettings(BaseModel):
    """The ingest queue and job store (Redis Streams / SQLite): sizes and lifetimes."""

    spill_bytes: int = Field(32 * 1024, ge=0)  # base64 strings longer go to the blob store
    blob_ttl_s: int = Field(7 * 24 * 3600, ge=1)  # spilled payloads expire after this (Redis)
    stream_maxlen: int = Field(1_000_000, ge=1)  # safety cap on the stream (acked are deleted)
    dead_maxlen: int = Field(100_000, ge=1)  # dead-letter stream cap
    job_ttl_s: int = Field(7 * 24 * 3600, ge=1)  # job status kept this long after its last change


class QBNormSettings(QBNormConfig):
    """QB-Norm: the normaliser's knobs (:class:`index.qbnorm.QBNormConfig`) and where the
    service's banks come from."""

    seed_shipped: bool = Field(
        default=True,
        description="on start, load the model's shipped querybanks (<model>.querybank-"
        "{text,image}.safetensors) into a store that never held a bank for it",
    )
    bank_dir: Path | None = Field(
        default=None,
        description="folder of shipped bank and calibration files; None = models/weights",
    )


class AuthSettings(BaseModel):
    """Optional API keys: with none configured, the API is open."""

    read_keys: list[str] = Field(default_factory=list)  # may search and read
    write_keys: list[str] = Field(default_factory=list)  # may also ingest, delete, edit the bank
    protect_metrics: bool = False  # /metrics then needs a read or write key (when keys are set)


class Settings(BaseSettings):
    """xmodal configuration (env prefix ``XMODAL_``, nested with ``__``)."""

    model_config = SettingsConfigDict(
        env_prefix="XMODAL_", env_nested_delimiter="__", extra="forbid"
    )

    data_dir: Path = Path("data")  # index, local queue, job store and file querybank live here
    redis_url: str | None = None  # unset = embedded mode (local queue, file querybank)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "INFO"
    log_json: bool = True
    model: ModelSettings = Field(default_factory=ModelSettings)
    index: GalleryConfig = Field(default_factory=GalleryConfig)
    qbnorm: QBNormSettings = Field(default_factory=QBNormSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    thumbnails: ThumbnailSettings = Field(default_factory=ThumbnailSettings)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"XMODAL_REDIS_URL must start with redis://, rediss:// or unix://, got {value!r}"
            )
        return value

    @property
    def embedded(self) -> bool:
        """True when no Redis is configured: local queue, file querybank, in-process worker."""
        return self.redis_url is None
