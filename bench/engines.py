"""ONNX Runtime vs OpenVINO on the exported image graph: which CPU engine is faster here?

The issue allowed either engine for the fast CPU path. Both run the same ``image.onnx`` (the
ONNX cache of the shipped model, exported on first serve or by ``bench/encoder.py``) on the
same batch, interleaved, same thread count; the best of ``--repeats`` runs each, both in
float32. Needs ``pip install 'xmodal[openvino]'`` (an optional extra: in float32 OpenVINO did
not measure faster; its bf16 mode on AMX CPUs is the opt-in path of models/runtime_bf16.py,
measured by bench/encoder.py).

    python bench/engines.py --batch 64 --threads 2 --repeats 3 --json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--graph", type=Path, help="image.onnx (default: the newest cached --model)")
    p.add_argument("--model", default="effnet-lite0-minilm-gpo-tuned")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import onnxruntime as ort
    import openvino as ov

    graph = args.graph or max(
        Path.home().glob(f".cache/xmodal/onnx/{args.model}-*/image.onnx"),
        key=lambda f: f.stat().st_mtime,
    )
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    compiled = ov.Core().compile_model(
        str(graph),
        "CPU",
        {
            "INFERENCE_NUM_THREADS": args.threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
        },
    )
    a, b = session.run(None, {feed: x})[0], compiled(x)[0]
    runs: dict[str, list[float]] = {"onnxruntime": [], "openvino": []}
    for _ in range(args.repeats):  # interleaved: both engines see the same machine load
        t0 = time.perf_counter()
        session.run(None, {feed: x})
        runs["onnxruntime"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        compiled(x)
        runs["openvino"].append(time.perf_counter() - t0)
    report = {
        "graph": str(graph),
        "batch": args.batch,
        "threads": args.threads,
        **{f"{k}_images_per_s": round(args.batch / min(v), 1) for k, v in runs.items()},
        "max_rel_error": float(np.abs(a - b).max() / np.abs(a).max()),
    }
    print(json.dumps(report) if args.json else report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
