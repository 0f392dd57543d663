"""Negative sampling: in-batch hardest vs the adaptive VSE-ens sampler, trained side by side.

    python bench/sampler.py --data ../shared/data/flickr8k --epochs 10 --target-rsum 250 \
        --out runs/sampler --plot docs/results-sampler-convergence.png --json

Runs two ``xmodal train`` processes *at the same time* (same model, data, seed, schedule and
thread count; only ``--sampler`` differs), so machine load from other jobs hits both alike.
Each records, after every epoch, its dev metrics and the training seconds so far
(``history.json``). Reports per sampler: training seconds until dev RSUM first reached
``--target-rsum`` (None if never), the final and best dev RSUM, seconds per epoch, and the
speed-up (in-batch seconds to target / adaptive seconds to target; the VSE-ens paper claims
2-5x). The plot shows dev RSUM against training seconds and against epochs.

Extra arguments after ``--`` go to both ``xmodal train`` commands unchanged.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SAMPLERS = ("in_batch", "adaptive")


def seconds_to(history: list[dict[str, Any]], target: float) -> float | None:
    """Training seconds at the first evaluation with dev RSUM >= target (None: never)."""
    for row in history:
        if row["rsum"] >= target:
            return float(row["seconds"])
    return None


def summarise(histories: dict[str, list[dict[str, Any]]], target: float) -> dict[str, Any]:
    out: dict[str, Any] = {"target_rsum": target}
    for name, hist in histories.items():
        out[name] = {
            "seconds_to_target": seconds_to(hist, target),
            "final_rsum": hist[-1]["rsum"] if hist else None,
            "best_rsum": max((r["rsum"] for r in hist), default=None),
            "epochs": len(hist),
            "seconds_per_epoch": hist[-1]["seconds"] / len(hist) if hist else None,
        }
    a, b = out["in_batch"]["seconds_to_target"], out["adaptive"]["seconds_to_target"]
    out["speedup_to_target"] = a / b if a and b else None
    return out


def plot(histories: dict[str, list[dict[str, Any]]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, hist in histories.items():
        left.plot([r["seconds"] for r in hist], [r["rsum"] for r in hist], marker="o", label=name)
        right.plot([r["epoch"] for r in hist], [r["rsum"] for r in hist], marker="o", label=name)
    for ax, xlabel in ((left, "training seconds"), (right, "epoch")):
        ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("dev RSUM")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/flickr8k"))
    p.add_argument("--model", default="effnet-lite0-minilm-gpo")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epoch-mode", default="one_per_image", choices=["one_per_image", "all"])
    p.add_argument("--target-rsum", type=float, default=250.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    p.add_argument("--out", type=Path, default=Path("runs/sampler"))
    p.add_argument("--plot", type=Path, default=None, help="PNG (default OUT/convergence.png)")
    p.add_argument("--reuse", action="store_true", help="only summarise existing runs in OUT")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = p.parse_args(argv)

    if not args.reuse:
        args.out.mkdir(parents=True, exist_ok=True)
        procs = []
        for name in SAMPLERS:
            cmd = [
                sys.executable, "-m", "service.cli", "train",
                "--model", args.model, "--data", str(args.data),
                "--out", str(args.out / name), "--epochs", str(args.epochs),
                "--lr", str(args.lr), "--lr-decay-epoch", str(args.epochs + 1),
                "--epoch-mode", args.epoch_mode, "--sampler", name,
                "--threads", str(args.threads), "--no-progress", *extra,
            ]  # fmt: skip
            log = (args.out / f"{name}.log").open("w")
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        codes = [proc.wait() for proc in procs]
        if any(codes):
            print(f"training failed: exit codes {codes}; see {args.out}/*.log", file=sys.stderr)
            return 1

    histories = {
        name: json.loads((args.out / name / "history.json").read_text()) for name in SAMPLERS
    }
    summary = summarise(histories, args.target_rsum)
    plot(histories, args.target_rsum, args.plot or args.out / "convergence.png")
    print(json.dumps(summary) if args.json else json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
