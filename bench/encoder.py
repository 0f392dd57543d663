"""Encoder throughput: eager PyTorch against the ONNX Runtime engine, side by side, one run.

    python bench/encoder.py --json            # the shipped model, 128 real photos, batch 64

Prints ``{"eager_images_per_s", "fast_images_per_s", "speedup", "max_rel_error",
"eager_captions_per_s", "fast_captions_per_s", "text_speedup", ...}``. Both engines get the
same threads and the same preprocessed pixels / tokens (preprocessing is not timed), and run
interleaved (eager, fast, eager, fast, ...) so machine noise hits both alike. "fast" is the
default path (float32 ONNX Runtime; a batch of at least 8 rows per thread runs as one shard per
thread); ``one_run_*`` is the same engine running each batch as one intra-op parallel run, and
``shard_gain`` the ratio of the two. Where the CPU has AMX-BF16 and openvino is installed, the
opt-in bf16 path (``XMODAL_MODEL__PRECISION=bf16``, OpenVINO) runs in the same rotation as
``bf16_*`` keys; else ``bf16_skipped`` says why.

The model's FLOPs per image (torch's FlopCounterMode) against a large float32 matmul's FLOP/s
on the same threads, and, on an AMX CPU, a bfloat16 matmul's (oneDNN on AMX tiles: the CPU's
real peak), say how close each path is to this CPU's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models import create_model  # noqa: E402
from models.runtime import OnnxRuntimeEncoder  # noqa: E402
from models.runtime_bf16 import OpenVinoBf16Encoder, bf16_unavailable  # noqa: E402


def load_real(data: Path, n_images: int, n_captions: int) -> tuple[list[Any], list[str]]:
    from PIL import Image

    rows = [json.loads(line) for line in (data / "captions.jsonl").open()]
    rows = [r for r in rows if r.get("split") == "dev"] or rows
    images = [Image.open(data / "images" / r["image"]).convert("RGB") for r in rows[:n_images]]
    captions = [c for r in rows for c in r["captions"]][:n_captions]
    return images, captions


class OneRun:
    """The fast engine without its data-parallel shards: each batch as one intra-op parallel
    run of the wide session (what the engine did before; ``one_run_*`` keys)."""

    def __init__(self, fast: OnnxRuntimeEncoder) -> None:
        self.fast = fast

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        feeds = {"pixels": np.ascontiguousarray(pixels.numpy())}
        return torch.from_numpy(self.fast.image.wide.run(None, feeds)[0])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        return torch.from_numpy(self.fast.text.wide.run(None, feeds)[0])


def best_rate(fn: Any, items: int, repeats: int) -> float:
    """Items per second of the fastest of ``repeats`` calls (the least disturbed one)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return items / best


def matmul_flops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` ``n``-square matmuls in ``dtype`` (torch's threads)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def image_flops(model: Any, pixels: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_image(pixels[:1])
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "flickr8k")
    p.add_argument("--model", default=None, help="registry name (default: the shipped model)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--captions", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dir", type=Path, default=None, help="onnx cache (default: temp)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = create_model(args.model, device="cpu").eval()
    images_, captions = load_real(args.data, args.images, args.captions)
    step = args.batch
    pixels = [model.preprocess(images_[i : i + step]) for i in range(0, len(images_), step)]
    toks = []
    for i in range(0, len(captions), 128):
        t = model.tokenize(sorted(captions[i : i + 128], key=len))
        toks.append((t["input_ids"], t["attention_mask"]))
    bf16_skipped = bf16_unavailable()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fast = OnnxRuntimeEncoder(model, args.cache_dir or Path(tmp), threads=args.threads)
        export_s = time.perf_counter() - t0
        engines: dict[str, Any] = {"fast": fast, "one_run": OneRun(fast)}
        if bf16_skipped is None:
            graphs = (fast.folder / "image.onnx", fast.folder / "text.onnx")
            engines["bf16"] = OpenVinoBf16Encoder(*graphs, threads=args.threads)

        with torch.no_grad():
            eager_img = torch.cat([model.encode_image(x) for x in pixels]).numpy()
            eager_txt = torch.cat([model.encode_text(*t) for t in toks]).numpy()
        outputs = {
            name: (
                torch.cat([e.encode_image(x) for x in pixels]).numpy(),
                torch.cat([e.encode_text(*t) for t in toks]).numpy(),
            )
            for name, e in engines.items()
        }

        def images(engine: Any) -> Any:
            def run() -> None:
                with torch.no_grad():
                    for x in pixels:
                        engine.encode_image(x)

            return run

        def texts(engine: Any) -> Any:
            def run() -> None:
                with torch.no_grad():
                    for t in toks:
                        engine.encode_text(*t)

            return run

        runs = {"eager": model, **engines}
        rates: dict[str, list[float]] = {f"{k}_{m}": [] for k in runs for m in ("img", "txt")}
        eager_cpu = [0.0, 0.0]  # user, system seconds of the eager image runs
        for _ in range(args.repeats):  # interleaved: noise hits every engine alike
            for name, engine in runs.items():
                t0 = os.times()
                rates[f"{name}_img"].append(best_rate(images(engine), len(images_), 1))
                if name == "eager":
                    t1 = os.times()
                    eager_cpu[0] += t1.user - t0.user
                    eager_cpu[1] += t1.system - t0.system
            for name, engine in runs.items():
                rates[f"{name}_txt"].append(best_rate(texts(engine), len(captions), 1))

    best = {k: max(v) for k, v in rates.items()}
    peak = matmul_flops(torch.float32)
    per_image = image_flops(model, pixels[0])

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).max() / np.abs(b).max())

    def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        return round(float(cos.min()), 6)

    out: dict[str, Any] = {
        "model": model.name,
        "batch": args.batch,
        "threads": args.threads,
        "images": len(images_),
        "captions": len(captions),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "eager_images_per_s": round(best["eager_img"], 1),
        "fast_images_per_s": round(best["fast_img"], 1),
        "speedup": round(best["fast_img"] / best["eager_img"], 2),
        "max_rel_error": rel(outputs["fast"][0], eager_img),
        # the eager images' CPU time spent in the kernel (page faults of fresh activation
        # buffers: on some VMs most of it), a caveat on what the speedup measures
        "eager_system_cpu_share": round(eager_cpu[1] / max(1e-9, sum(eager_cpu)), 2),
        "one_run_images_per_s": round(best["one_run_img"], 1),
        "shard_gain": round(best["fast_img"] / best["one_run_img"], 2),
        "eager_captions_per_s": round(best["eager_txt"], 1),
        "fast_captions_per_s": round(best["fast_txt"], 1),
        "text_speedup": round(best["fast_txt"] / best["eager_txt"], 2),
        "text_max_rel_error": rel(outputs["fast"][1], eager_txt),
        "one_run_captions_per_s": round(best["one_run_txt"], 1),
        "export_seconds": round(export_s, 1),
        "image_gflop": round(per_image / 1e9, 3),
        "matmul_gflops": round(peak / 1e9, 1),
        "fast_share_of_matmul_peak": round(best["fast_img"] * per_image / peak, 3),
    }
    if bf16_skipped is None:
        bf16_peak = matmul_flops(torch.bfloat16, n=4096)
        out.update(
            {
                "bf16_images_per_s": round(best["bf16_img"], 1),
                "bf16_speedup": round(best["bf16_img"] / best["eager_img"], 2),
                "bf16_max_rel_error": rel(outputs["bf16"][0], eager_img),
                "bf16_min_cosine": min_cosine(outputs["bf16"][0], eager_img),
                "bf16_captions_per_s": round(best["bf16_txt"], 1),
                "bf16_text_speedup": round(best["bf16_txt"] / best["eager_txt"], 2),
                "bf16_text_max_rel_error": rel(outputs["bf16"][1], eager_txt),
                "bf16_text_min_cosine": min_cosine(outputs["bf16"][1], eager_txt),
                "bf16_matmul_gflops": round(bf16_peak / 1e9, 1),
                "fast_share_of_bf16_matmul_peak": round(
                    best["fast_img"] * per_image / bf16_peak, 3
                ),
                "bf16_share_of_bf16_matmul_peak": round(
                    best["bf16_img"] * per_image / bf16_peak, 3
                ),
            }
        )
    else:
        out["bf16_skipped"] = bf16_skipped
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>28s}  {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
