"""The fast CPU inference path: a model's encoders exported to ONNX Runtime.

    pixels [B,3,H,W]          -> image.onnx -> [B,D] or [B,K,D]  (trunk, tuned blocks, heads)
    input_ids, mask [B,L]     -> text.onnx  -> [B,D] or [B,K,D]  (tokens, tuned layers, heads)

The graphs are exported from the eager model the first time a set of weights is served and
cached under ``cache_dir/<model name>-<weights hash>/``; the hash covers the config and every
tensor of the state dict, so new weights never meet an old graph. Eager PyTorch stays the
training path (autograd), the GPU path and the fallback when onnxruntime is absent or an export
fails. Outputs match eager within float32 rounding (tests/models/test_runtime.py).

``precision="bf16"`` (opt-in, ``XMODAL_MODEL__PRECISION``) runs the same graphs in OpenVINO on
AMX-BF16 CPUs instead (models/runtime_bf16.py): faster, but only within ~1e-1 of eager.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from models.runtime_bf16 import OpenVinoBf16Encoder, bf16_unavailable

if TYPE_CHECKING:
    from models.model import XModal

logger = logging.getLogger(__name__)
_export_lock = threading.Lock()

__all__ = [
    "FORMAT_VERSION",
    "PRECISIONS",
    "OnnxRuntimeEncoder",
    "Precision",
    "enable_onnx",
    "export_graphs",
    "weights_hash",
]

# Bump when the exported graphs change meaning (inputs, outputs, opset): old caches are ignored.
FORMAT_VERSION = 1
OPSET = 17


# Parts of a model that the exported graphs (and the embeddings of images and texts) do not
# depend on: pooling over frame embeddings runs in torch beside the graphs.
_NOT_ENCODER_STATE = ("video_pool.",)


def weights_hash(model: XModal) -> str:
    """sha256 of the image and text encoders: the architecture config (less its ``video``
    section) and every state-dict tensor (name, dtype, shape, bytes) outside ``video_pool.``.
    It keys the exported graphs, and querybanks and calibrations record it, so it covers
    exactly what an image or text embedding depends on: retraining the video pooling keeps it.
    """
    h = hashlib.sha256()
    h.update(f"xmodal-onnx-v{FORMAT_VERSION}".encode())
    h.update(model.config.model_dump_json(exclude={"video"}).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(_NOT_ENCODER_STATE):
            continue
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _ImageGraph(nn.Module):
    def __init__(self, model: XModal) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels, normalize=True)


class _TextGraph(nn.Module):
    def __init__(self, model: XModal) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.encode_text(input_ids, attention_mask, normalize=True)


def _export(module: nn.Module, args: tuple[Tensor, ...], names: list[str], path: Path) -> None:
    """Export to a temporary file beside ``path`` and rename it into place (atomic: a crash
    mid-export never leaves a half graph that a later start would load)."""
    axes: dict[str, dict[int, str]] = {n: {0: "batch"} for n in names}
    if "input_ids" in names:
        axes = {n: {0: "batch", 1: "tokens"} for n in names}
    axes["embedding"] = {0: "batch"}
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.onnx.export(
            module,
            args,
            tmp,
            input_names=names,
            output_names=["embedding"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


IMAGE_GRAPH, TEXT_GRAPH = "image.onnx", "text.onnx"

# Arithmetic of the CPU fast path: "fp32" (ONNX Runtime; matches eager within 1e-3 relative,
# the default) or "bf16" (OpenVINO on AMX, models/runtime_bf16.py: ~1e-1 relative, opt-in).
Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")


def export_graphs(model: XModal, cache_dir: Path) -> Path:
    """The folder ``cache_dir/<model name>-<weights hash>/`` holding ``model``'s image and
    text graphs, exported on the first call for these weights (every engine reads them)."""
    folder = Path(cache_dir) / f"{model.name}-{weights_hash(model)[:16]}"
    folder.mkdir(parents=True, exist_ok=True)
    image_path, text_path = folder / IMAGE_GRAPH, folder / TEXT_GRAPH
    if image_path.is_file() and text_path.is_file():
        logger.info("onnx graphs found in %s", folder)
        return folder
    size = model.config.image.image_size
    tokens = model.tokenize(["a dog runs on the beach", "two people"])
    with torch.no_grad(), _export_lock:
        if not image_path.is_file():
            pixels = torch.zeros(2, 3, size, size)
            _export(_ImageGraph(model), (pixels,), ["pixels"], image_path)
        if not text_path.is_file():
            ids, mask = tokens["input_ids"], tokens["attention_mask"]
            _export(_TextGraph(model), (ids, mask), ["input_ids", "attention_mask"], text_path)
    meta = {"model": model.name, "format": FORMAT_VERSION, "opset": OPSET}
    (folder / "meta.json").write_text(json.dumps(meta))
    logger.info("exported onnx graphs of %s to %s", model.name, folder)
    return folder


# Batches of at least this many rows per thread run data-parallel (see _ShardedSession).
MIN_SHARD = 8


class _ShardedSession:
    """One graph in two ONNX Runtime sessions: a *wide* one (``threads`` intra-op threads)
    for small batches, and a *narrow* one (one thread) that runs a large batch as ``threads``
    row shards at once, one per thread (ORT releases the GIL; a session may run concurrently).

    Why: an intra-op parallel section waits for its slowest thread, so each time the OS lends
    one of its cores to other work (the ingest route's decoding, thumbnails) the other thread
    spins idle. Shards share nothing until they are joined: on 2 cores beside a photo-decoding
    thread the shards encoded 46.9 img/s against 40.1 for one 2-thread run, and 57.2 against
    55.9 idle (docs/BENCHMARKS.md, "Issue #12, third pass"). Rows are independent, so the
    output is the row-wise concatenation of the shards' outputs (in order)."""

    def __init__(self, path: Path, threads: int, options: Any) -> None:
        import onnxruntime as ort

        self.threads = threads
        providers = ["CPUExecutionProvider"]
        options.intra_op_num_threads = threads
        self.wide = ort.InferenceSession(str(path), options, providers=providers)
        self.narrow: Any = None
        self._pool: ThreadPoolExecutor | None = None
        if threads > 1:
            options.intra_op_num_threads = 1
            self.narrow = ort.InferenceSession(str(path), options, providers=providers)
            self._pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="xmodal-onnx")

    def shards(self, rows: int) -> int:
        """How many row shards a batch of ``rows`` runs as (1: the wide session)."""
        if self.narrow is None or rows < self.threads * MIN_SHARD:
            return 1
        return self.threads

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The graph's single output for ``feeds`` (arrays sharing their first axis)."""
        rows = len(next(iter(feeds.values())))
        n = self.shards(rows)
        if n == 1:
            return self.wide.run(None, feeds)[0]
        assert self._pool is not None
        bounds = np.linspace(0, rows, n + 1).astype(int)
        parts = [{k: v[a:b] for k, v in feeds.items()} for a, b in itertools.pairwise(bounds)]
        rest = [self._pool.submit(self.narrow.run, None, part) for part in parts[1:]]
        first = self.narrow.run(None, parts[0])[0]  # the calling thread runs a shard too
        return np.concatenate([first] + [f.result()[0] for f in rest])


class OnnxRuntimeEncoder:
    """ONNX Runtime sessions for one model's image and text encoders (thread-safe: sessions
    may be run from several threads at once). Large batches run as data-parallel shards
    (:class:`_ShardedSession`).

    Args:
        model: the eager model (CPU, eval mode); its weights are exported once and cached.
        cache_dir: where exported graphs live, one folder per weights hash.
        threads: CPU threads per batch (default: torch's CPU thread count).
    """

    precision: Precision = "fp32"

    def __init__(self, model: XModal, cache_dir: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.folder = export_graphs(model, cache_dir)
        threads = threads or torch.get_num_threads()
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Workers spin while a Run is on (its many small ops hand off faster than a wake-up),
        # but not after it: by default they spin on for ~65 ms, a core's worth of CPU after
        # every query that the event loop, the search, a decoding thread or the next client
        # would otherwise get (docs/BENCHMARKS.md, "Issue #12, fourth pass").
        options.add_session_config_entry("session.force_spinning_stop", "1")
        self.image = _ShardedSession(self.folder / IMAGE_GRAPH, threads, options)
        self.text = _ShardedSession(self.folder / TEXT_GRAPH, threads, options)

    def encode_image(self, pixels: Tensor) -> Tensor:
        """Pixels `[B,3,H,W]` -> unit embeddings `[B,D]` / `[B,K,D]` (CPU float32)."""
        x = np.ascontiguousarray(pixels.detach().cpu().float().numpy())
        return torch.from_numpy(self.image.run({"pixels": x}))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids and mask `[B,L]` -> unit embeddings `[B,D]` / `[B,K,D]`."""
        feeds: dict[str, Any] = {
            "input_ids": input_ids.detach().cpu().long().numpy(),
            "attention_mask": attention_mask.detach().cpu().long().numpy(),
        }
        return torch.from_numpy(self.text.run(feeds))


def enable_onnx(
    model: XModal, cache_dir: Path, threads: int | None = None, precision: Precision = "fp32"
) -> bool:
    """Serve ``model``'s encoders through the exported graphs (``model.runtime``): ONNX Runtime
    in float32, or with ``precision="bf16"`` OpenVINO in bfloat16 where the CPU has AMX-BF16
    and openvino is installed (else, logged, float32 ONNX Runtime). Keep eager on a GPU,
    without onnxruntime, or when the export fails (logged). Returns whether it is on."""
    if model.device.type != "cpu" or model.dtype != torch.float32:
        logger.info("onnx fast path off: the model runs on %s/%s", model.device, model.dtype)
        return False
    if precision == "bf16":
        why = bf16_unavailable()
        if why is None:
            try:
                folder = export_graphs(model.eval(), cache_dir)
                model.runtime = OpenVinoBf16Encoder(
                    folder / IMAGE_GRAPH, folder / TEXT_GRAPH, threads
                )
                return True
            except Exception:
                logger.exception("openvino bf16 engine failed: trying float32 onnx runtime")
        else:
            logger.warning("bf16 fast path off (%s): float32 onnx runtime instead", why)
    try:
        model.runtime = OnnxRuntimeEncoder(model.eval(), cache_dir, threads)
    except ImportError:
        logger.warning("onnxruntime is not installed: encoding with eager PyTorch")
        return False
    except Exception:
        logger.exception("onnx export failed: encoding with eager PyTorch")
        return False
    return True
