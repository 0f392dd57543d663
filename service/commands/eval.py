"""``xmodal eval``: retrieval metrics of a checkpoint (or the shipped default) on a split.

    xmodal eval --checkpoint runs/x/best.safetensors --data ../shared/data/flickr8k \
        --split dev [--querybank-data DIR --querybank-split train] --json

prints one JSON object with ``i2t_r1 i2t_r5 i2t_r10 t2i_r1 t2i_r5 t2i_r10 rsum medr_i2t
medr_t2i``; with query banks, the same keys prefixed ``qbnorm_`` (QB-Norm Dynamic Inverted
Softmax; ``qbnorm_t2i_*`` with the text bank = captions of the query-bank split,
``qbnorm_i2t_*`` with the image bank = its photos; ``--querybank-directions t2i`` normalises
text-to-image only), ``qbnorm_beta`` and the bank sizes. ``--shipped-querybanks`` uses the
model's shipped bank files instead (what a fresh service serves). Backbone features come from
(and go to) the feature cache, so a second run is fast.

``--end-to-end`` instead evaluates what the service serves: photos decoded and preprocessed as
ingest does, encoded with the serving engine (ONNX Runtime on the CPU, ``--engine eager`` for
PyTorch), captions through ``embed_texts``; ``--embed-cache DIR`` keeps those embeddings
(``service/commands/embed_cache.py``) so another bank or beta costs seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.data import load_dataset
from models.evaluate import embed_cached, renormed_metrics, similarity_matrix
from models.runtime import PRECISIONS
from models.train import REPO, load_split_features

logger = logging.getLogger(__name__)

DEFAULT_BETA = 20.0  # QB-Norm paper's default inverse temperature


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xmodal eval", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, help=".safetensors; default: the shipped model")
    p.add_argument("--model", help="model name when no checkpoint is given (default: shipped)")
    p.add_argument("--data", type=Path, required=True, help="dataset folder")
    p.add_argument("--split", default="dev")
    p.add_argument("--querybank-data", type=Path, help="dataset whose captions/photos form banks")
    p.add_argument("--querybank-split", default="train")
    p.add_argument(
        "--querybank-directions",
        default="t2i,i2t",
        help="searches QB-Norm normalises: t2i (text bank), i2t (image bank); default both",
    )
    p.add_argument(
        "--querybank-limit", type=int, help="text bank rows, round-robin (default: every caption)"
    )
    p.add_argument(
        "--image-querybank-limit", type=int, help="image bank rows (default: every photo)"
    )
    p.add_argument(
        "--shipped-querybanks",
        action="store_true",
        help="use the model's shipped bank files (models/weights) as the banks",
    )
    p.add_argument("--beta", type=float, default=DEFAULT_BETA, help="QB-Norm inverse temperature")
    p.add_argument("--max-images", type=int, help="first N images of each split only")
    p.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "features")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--end-to-end",
        action="store_true",
        help="encode photos and captions with the serving model and engine (no feature cache)",
    )
    p.add_argument("--engine", choices=["onnx", "eager"], default="onnx", help="--end-to-end")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="--end-to-end --engine onnx: the fast path's arithmetic (XMODAL_MODEL__PRECISION)",
    )
    p.add_argument("--embed-cache", type=Path, help="--end-to-end: keep/reuse embeddings here")
    p.add_argument("--plot", type=Path, help="write recall@K curves (raw vs QB-Norm) to a PNG")
    p.add_argument(
        "--calibration",
        type=Path,
        help="with banks: the score-threshold study (half A picks one threshold, half B "
        "reports precision/recall) for raw, QB-Norm and calibrated scores; its PR curves here",
    )
    p.add_argument(
        "--calibration-out",
        type=Path,
        help="with --calibration: write the fitted coefficients (<model>.calibration.json)",
    )
    return p


def _directions(args: argparse.Namespace) -> set[str]:
    dirs = {d.strip() for d in args.querybank_directions.split(",") if d.strip()}
    if not dirs <= {"t2i", "i2t"}:
        raise SystemExit(f"--querybank-directions: t2i and/or i2t, got {args.querybank_directions}")
    return dirs


def shipped_banks(model: Any, directions: set[str]) -> dict[str, torch.Tensor]:
    """The model's shipped bank files of ``directions`` (modality -> vectors), each checked
    against the model's weights."""
    from index.bankfile import bank_filename, read_bank_file
    from service.loading import model_weights_hash
    from service.seeding import shipped_bank_dir

    out = {}
    for modality, direction in (("text", "t2i"), ("image", "i2t")):
        if direction not in directions:
            continue
        path = shipped_bank_dir(None) / bank_filename(model.name, modality)
        if not path.is_file():
            continue
        bank = read_bank_file(path)
        if bank.weights_hash != model_weights_hash(model):
            raise SystemExit(f"{path} was encoded by other weights: xmodal querybank ship")
        out[modality] = torch.from_numpy(bank.vectors)
    if not out:
        raise SystemExit(f"no shipped querybanks for {model.name}")
    return out


def qbnorm_renorms(
    model: Any,
    img: torch.Tensor,
    txt: torch.Tensor,
    banks: dict[str, torch.Tensor],
    beta: float,
) -> tuple[Any, Any]:
    """``(t2i_renorm, i2t_renorm)`` for :func:`models.evaluate.renormed_metrics`: Dynamic
    Inverted Softmax with the text bank over the gallery images, and with the image bank over
    the gallery captions (None for a direction without a bank)."""
    from index.qbnorm import dynamic_inverted_softmax

    t2i = i2t = None
    if "text" in banks:
        text_sims = similarity_matrix(model, img, banks["text"]).T  # [bank, gallery images]

        def t2i(sims_t2i: np.ndarray) -> np.ndarray:
            return dynamic_inverted_softmax(sims_t2i, text_sims, beta)

    if "image" in banks:
        image_sims = similarity_matrix(model, banks["image"], txt)  # [bank, gallery captions]

        def i2t(sims_i2t: np.ndarray) -> np.ndarray:
            return dynamic_inverted_softmax(sims_i2t, image_sims, beta)

    return t2i, i2t


def _bank_rows(args: argparse.Namespace, bank_ds: Any) -> dict[str, np.ndarray]:
    """Rows of the bank split per bank: every row without a limit, else the deterministic
    pick of ``xmodal querybank`` (round-robin captions, evenly spaced photos)."""
    from service.commands.querybank import caption_rows, image_rows

    dirs = _directions(args)
    out = {}
    if "t2i" in dirs:
        lim = args.querybank_limit
        out["text"] = np.array(
            caption_rows(bank_ds.captions, bank_ds.caption_to_image, lim)
            if lim
            else range(bank_ds.num_captions)
        )
    if "i2t" in dirs:
        lim = args.image_querybank_limit
        out["image"] = np.array(image_rows(bank_ds.num_images, lim or bank_ds.num_images))
    return out


def _qbnorm_info(args: argparse.Namespace, banks: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {
        "qbnorm_beta": args.beta,
        "qbnorm_directions": ",".join(
            d for d, m in (("t2i", "text"), ("i2t", "image")) if m in banks
        ),
        **{f"qbnorm_bank_{m}": len(v) for m, v in banks.items()},
    }


def load_model(checkpoint: Path | None, name: str | None, device: str | torch.device) -> Any:
    """A checkpoint (config from its metadata), else the named / default shipped model."""
    if checkpoint is not None:
        from models.checkpoint import load_checkpoint

        return load_checkpoint(checkpoint, device=device)
    from models.factory import create_model

    return create_model(name, device=device)


def main(argv: list[str] | None = None) -> int:
    """Evaluate and print the metrics (JSON with ``--json``, else a small table)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    start = time.perf_counter()
    from models.device import resolve_device

    args.device = resolve_device(args.device)
    model = load_model(args.checkpoint, args.model, args.device).eval()
    ds = load_dataset(args.data, args.split)
    if args.max_images:
        ds = ds.subset(args.max_images)
    if args.end_to_end:
        return _end_to_end(args, model, ds, start)
    feats = load_split_features(ds, model.config, args.cache_dir, args.device, progress=False)
    banks: dict[str, torch.Tensor] = {}
    if args.shipped_querybanks:
        banks = shipped_banks(model, _directions(args))
    elif args.querybank_data is not None:
        bank_ds = load_dataset(args.querybank_data, args.querybank_split)
        if args.max_images:  # "of each split": the bank's too
            bank_ds = bank_ds.subset(args.max_images)
        bank_feats = load_split_features(bank_ds, model.config, args.cache_dir, args.device, False)
        banks = _cached_banks(model, bank_feats, _bank_rows(args, bank_ds), args.device)
    img, txt = embed_cached(model, feats, device=args.device)
    sims = similarity_matrix(model, img, txt)  # [n_img, n_cap]
    t2i, i2t = qbnorm_renorms(model, img, txt, banks, args.beta)
    metrics: dict[str, Any] = renormed_metrics(sims, feats.caption_to_image, t2i, i2t)
    if banks:
        metrics.update(_qbnorm_info(args, banks))
    if args.plot is not None:
        plot_recall(model, sims, feats, t2i, i2t, args)
        metrics["plot"] = str(args.plot)
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    _report(metrics, args.json)
    return 0


def _cached_banks(
    model: Any, bank_feats: Any, rows: dict[str, np.ndarray], device: Any
) -> dict[str, torch.Tensor]:
    """Bank vectors from the bank split's cached trunk features (the rows picked per bank)."""
    out = {}
    with torch.no_grad():
        for modality, idx in rows.items():
            get, embed = (
                (bank_feats.texts, model.embed_text_cache)
                if modality == "text"
                else (bank_feats.images, model.embed_image_cache)
            )
            parts = [
                embed(*(t.to(device) for t in get(chunk))).float().cpu()
                for chunk in np.array_split(idx, max(1, len(idx) // 512))
            ]
            out[modality] = torch.cat(parts)
    return out


def end_to_end_embeddings(
    args: argparse.Namespace, model: Any, ds: Any
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Gallery images, captions and the banks of ``args``, all through the serving path
    (cached under ``--embed-cache`` when given)."""
    from service.commands.embed_cache import embed_split

    if args.engine == "onnx" and args.device.type == "cpu":
        from models.runtime import enable_onnx
        from service.loading import default_onnx_cache

        enable_onnx(model, default_onnx_cache(), precision=args.precision)
    img, txt = embed_split(model, ds, args.embed_cache, progress=False)
    assert img is not None and txt is not None
    banks: dict[str, torch.Tensor] = {}
    if args.shipped_querybanks:
        banks = shipped_banks(model, _directions(args))
    elif args.querybank_data is not None:
        bank_ds = load_dataset(args.querybank_data, args.querybank_split)
        if args.max_images:
            bank_ds = bank_ds.subset(args.max_images)
        rows = _bank_rows(args, bank_ds)
        bank_img, bank_txt = embed_split(
            model,
            bank_ds,
            args.embed_cache,
            images="image" in rows,
            captions="text" in rows,
            progress=False,
        )
        for modality, vectors in (("text", bank_txt), ("image", bank_img)):
            if modality in rows and vectors is not None:
                banks[modality] = torch.from_numpy(vectors[rows[modality]])
    return torch.from_numpy(img), torch.from_numpy(txt), banks


def calibration_study(
    args: argparse.Namespace,
    model: Any,
    img: torch.Tensor,
    txt: torch.Tensor,
    sims: np.ndarray,
    ds: Any,
    banks: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """The threshold study per direction with a bank (``service/commands/calibration.py``):
    its numbers, the PR-curve PNG, and optionally the fitted coefficients file."""
    from index.calibration import ScoreCalibration
    from index.qbnorm import normalised_scores
    from service.commands.calibration import plot_study, run_study
    from service.loading import model_weights_hash

    c2i = np.asarray(ds.caption_to_image)
    right = c2i[:, None] == np.arange(len(img))[None, :]  # [captions, images]
    studies = []
    if "text" in banks:
        bank_sims = similarity_matrix(model, img, banks["text"]).T
        raw = np.ascontiguousarray(sims.T)
        studies.append(
            run_study("t2i", raw, normalised_scores(raw, bank_sims, args.beta), right, c2i)
        )
    if "image" in banks:
        bank_sims = similarity_matrix(model, banks["image"], txt)
        norm = normalised_scores(sims, bank_sims, args.beta)
        studies.append(run_study("i2t", sims, norm, right.T, np.arange(len(img))))
    if not studies:
        raise SystemExit(
            "--calibration needs querybanks (--querybank-data or --shipped-querybanks)"
        )
    name = getattr(model, "name", "model")
    title = f"{name} on {Path(args.data).name} {args.split}: one global threshold per score"
    plot_study(studies, args.calibration, title)
    out: dict[str, Any] = {"calibration_plot": str(args.calibration)}
    for st in studies:
        out.update(st.summary())
    if args.calibration_out is not None:
        bank_of = {"t2i": "text", "i2t": "image"}
        ScoreCalibration(
            model=name,
            weights_hash=str(model_weights_hash(model)),
            coefficients={bank_of[st.direction]: (st.weights, st.bias) for st in studies},
            meta={
                "fitted_on": f"{Path(args.data).name} {args.split}, half A (even image index)",
                "beta": args.beta,
                "banks": {m: len(v) for m, v in banks.items()},
                "half_b": {st.direction: st.half_b for st in studies},
            },
        ).save(args.calibration_out)
        out["calibration_out"] = str(args.calibration_out)
    return out


def _end_to_end(args: argparse.Namespace, model: Any, ds: Any, start: float) -> int:
    img, txt, banks = end_to_end_embeddings(args, model, ds)
    sims = similarity_matrix(model, img, txt)
    t2i, i2t = qbnorm_renorms(model, img, txt, banks, args.beta)
    metrics: dict[str, Any] = renormed_metrics(sims, ds.caption_to_image, t2i, i2t)
    if banks:
        metrics.update(_qbnorm_info(args, banks))
    if args.calibration is not None:
        metrics.update(calibration_study(args, model, img, txt, sims, ds, banks))
    metrics["engine"] = "onnx" if model.runtime is not None else "eager"
    metrics["precision"] = getattr(model.runtime, "precision", "fp32")  # what ran (fallbacks)
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    _report(metrics, args.json)
    return 0


def _report(metrics: dict[str, Any], as_json: bool) -> None:
    """One JSON object, or a small table (floats to 2 decimals)."""
    if as_json:
        print(json.dumps(metrics))
        return
    for key, value in metrics.items():
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{key:>20s}  {shown}")


def plot_recall(
    model: Any, sims: np.ndarray, feats: Any, t2i: Any, i2t: Any, args: argparse.Namespace
) -> None:
    """Recall@K for K = 1..50 per direction, raw (and QB-Norm where a bank normalises it)."""
    from models.evaluate import rank_i2t, rank_t2i
    from service.commands.plots import plot_recall_curves

    c2i = feats.caption_to_image
    label = f"QB-Norm (beta {args.beta:g})"
    t2i_curves = {"raw": rank_t2i(np.ascontiguousarray(sims.T), c2i)}
    if t2i is not None:
        t2i_curves[label] = rank_t2i(t2i(np.ascontiguousarray(sims.T)), c2i)
    i2t_curves = {"raw": rank_i2t(sims, c2i)}
    if i2t is not None:
        i2t_curves[label] = rank_i2t(i2t(np.ascontiguousarray(sims)), c2i)
    curves = {"text -> image": t2i_curves, "image -> text": i2t_curves}
    name = getattr(model, "name", None) or getattr(model.config, "name", "model")
    title = f"{name} on {Path(args.data).name} {args.split} ({feats.num_images} images)"
    plot_recall_curves(curves, args.plot, title)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
