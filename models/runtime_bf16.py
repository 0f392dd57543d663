"""The opt-in bfloat16 CPU path: the exported graphs run by OpenVINO on AMX tiles.

    image.onnx / text.onnx (exported by models/runtime.export_graphs) -> OpenVINO CPU, bf16

On a CPU with AMX-BF16 (Intel Xeon Sapphire Rapids and later) this encodes photos ~1.8x faster
than float32 ONNX Runtime (docs/BENCHMARKS.md), but bf16 keeps 8 bits of mantissa, so outputs
differ from eager float32 by ~1e-1 of the largest component (not the 1e-3 of the default path)
while the retrieval metrics barely move; hence opt-in (``XMODAL_MODEL__PRECISION=bf16``).
openvino is an optional dependency (``pip install 'xmodal[openvino]'``). A leaf module: it
reads graph files, so models.runtime (which exports them and picks the engine) imports it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["OpenVinoBf16Encoder", "bf16_unavailable", "cpu_flags"]

AMX_FLAGS = ("amx_bf16", "amx_tile")  # /proc/cpuinfo flags the bf16 path needs


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def bf16_unavailable() -> str | None:
    """Why the bf16 path cannot run here (no AMX-BF16, no openvino), or None when it can."""
    missing = [f for f in AMX_FLAGS if f not in cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "openvino is not installed (pip install 'xmodal[openvino]')"
    return None


class OpenVinoBf16Encoder:
    """OpenVINO compiled models of one model's exported image and text graphs, inferring in
    bfloat16 (thread-safe: each calling thread gets its own infer requests).

    Args:
        image_graph, text_graph: the exported ``image.onnx`` and ``text.onnx``.
        threads: inference threads (default: torch's CPU thread count).
    """

    precision: Literal["bf16"] = "bf16"

    def __init__(self, image_graph: Path, text_graph: Path, threads: int | None = None) -> None:
        import openvino as ov

        config = {
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "bf16",
        }
        core = ov.Core()
        self.image = core.compile_model(str(image_graph), "CPU", config)
        self.text = core.compile_model(str(text_graph), "CPU", config)
        self._local = threading.local()
        logger.info("openvino bf16 engine on %s", image_graph.parent)

    def _request(self, which: str) -> Any:
        request = getattr(self._local, which, None)
        if request is None:
            request = getattr(self, which).create_infer_request()
            setattr(self._local, which, request)
        return request

    def encode_image(self, pixels: Tensor) -> Tensor:
        """Pixels `[B,3,H,W]` -> unit embeddings `[B,D]` / `[B,K,D]` (CPU float32)."""
        x = np.ascontiguousarray(pixels.detach().cpu().float().numpy())
        out = self._request("image").infer({"pixels": x})
        return torch.from_numpy(np.array(out[0], dtype=np.float32))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids and mask `[B,L]` -> unit embeddings `[B,D]` / `[B,K,D]` (CPU float32)."""
        feeds = {
            "input_ids": input_ids.detach().cpu().long().numpy(),
            "attention_mask": attention_mask.detach().cpu().long().numpy(),
        }
        out = self._request("text").infer(feeds)
        return torch.from_numpy(np.array(out[0], dtype=np.float32))
