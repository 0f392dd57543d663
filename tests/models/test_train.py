"""A tiny training run on synthetic cached features: the loss falls, resume continues."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint
from models.data import load_dataset
from models.features import (
    extract_image_features,
    extract_text_features,
    image_cache_dir,
    text_cache_dir,
)
from models.train import TrainConfig, load_split_features, model_config_for, train

NUM_IMAGES, CAPS, DIM = 48, 2, 32  # tiny-random: 32-d image and token features


class _Stub:
    """Backbone stand-in: item i -> features around a random signature of item i."""

    def __init__(self, signatures: np.ndarray, n: int, seed: int) -> None:
        self.sig, self.n = torch.from_numpy(signatures).float(), n
        self.rng = torch.Generator().manual_seed(seed)

    def preprocess(self, items: list) -> torch.Tensor:  # image paths -> their indices
        return torch.tensor([int(Path(p).stem) for p in items])

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([int(t.split()[1]) for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones(len(texts), dtype=torch.long)}

    def __call__(self, idx: torch.Tensor, mask: torch.Tensor | None = None):
        base = self.sig[idx][:, None, :].repeat(1, self.n, 1)
        feats = base + 0.3 * torch.randn(base.shape, generator=self.rng)
        return feats, torch.full((len(idx),), self.n)


def _setup(root: Path, name: str = "data") -> tuple[Path, Path]:
    data, cache = root / name, root / "cache"
    rows = []
    for i in range(NUM_IMAGES):
        split = "train" if i < 32 else "dev"
        caps = [f"item {i} caption {j}" for j in range(CAPS)]
        rows.append({"image": f"{i}.jpg", "split": split, "captions": caps})
    data.mkdir()
    (data / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    sig = np.random.default_rng(0).standard_normal((NUM_IMAGES, DIM)).astype(np.float32)
    mixing = np.random.default_rng(1).standard_normal((DIM, DIM)).astype(np.float32) / DIM**0.5
    mcfg = model_config_for(TrainConfig(model="tiny-random"))
    for split in ("train", "dev"):
        ds = load_dataset(data, split)
        img_dir = image_cache_dir(
            cache, ds, mcfg.image.backbone, mcfg.image.image_size, mcfg.image.mean, mcfg.image.std
        )
        extract_image_features(
            _Stub(sig, 6, 0), ds.images, img_dir, batch_size=8, loader=lambda p: p, progress=False
        )
        txt_dir = text_cache_dir(cache, ds, mcfg.text.backbone, mcfg.text.max_length)
        extract_text_features(_Stub(sig @ mixing, 5, 1), ds.captions, txt_dir, progress=False)
    return data, cache


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _setup(tmp_path_factory.mktemp("train"), name="tiny-pairs")


def _cfg(data: Path, cache: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        model="tiny-random",
        data=data,
        cache_dir=cache,
        out_dir=out,
        epochs=4,
        batch_size=8,
        lr=2e-3,
        progress=False,
        num_threads=1,
    )
    return TrainConfig(**{**base, **kw})


def test_loss_decreases_and_resume_continues(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    data, cache = synthetic
    best = train(_cfg(data, cache, tmp_path, epochs=4))
    assert best.exists() and (tmp_path / "curves.png").stat().st_size > 0
    state = torch.load(tmp_path / "train_state.pt", weights_only=False)
    losses = [loss for _, loss in state["history"]["loss"]]
    per_epoch = len(losses) // 4
    assert np.mean(losses[-per_epoch:]) < 0.7 * np.mean(losses[:per_epoch])
    model = load_checkpoint(best, pretrained=False)  # reloads with no flags
    assert model.name == "tiny-random"
    assert json.loads((tmp_path / "history.json").read_text())[-1]["rsum"] > 100  # chance ~40

    steps_done = state["step"]
    train(_cfg(data, cache, tmp_path, epochs=5, resume=True))
    resumed = torch.load(tmp_path / "train_state.pt", weights_only=False)
    assert resumed["epoch"] == 5
    assert resumed["step"] == steps_done + per_epoch  # continued from the saved step
    assert [d["epoch"] for d in resumed["history"]["dev"]] == list(range(1, 6))


def test_checkpoints_record_the_dataset_that_was_read(
    synthetic: tuple[Path, Path], tmp_path: Path
) -> None:
    data, cache = synthetic
    best = train(_cfg(data, cache, tmp_path, epochs=1))
    for path in (best, tmp_path / "last.safetensors"):
        extra = load_checkpoint(path, pretrained=False).checkpoint_extra
        assert extra["data"] == "tiny-pairs"  # the folder it read, not a hard-coded "flickr8k"


@pytest.mark.parametrize(
    "kw",
    [
        {"sampler": "adaptive", "sampler_bank_size": 32},
        {"sampler": "adaptive", "sampler_refresh_every": 16},
        {
            "model_overrides": {
                "head": {"pooling": "set", "num_slots": 2, "depth": 1, "heads": 2},
                "similarity": {"kind": "smooth_chamfer"},
            }
        },
    ],
    ids=["adaptive-sampler", "adaptive-catalogue-bank", "set-model"],
)
def test_variants_run(synthetic: tuple[Path, Path], tmp_path: Path, kw: dict) -> None:
    data, cache = synthetic
    best = train(_cfg(data, cache, tmp_path, epochs=1, **kw))
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history) == 1 and np.isfinite(history[-1]["rsum"])
    assert best.exists()


class _CosineModel:
    """Just the `similarity` the loss needs."""

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b.t()


@pytest.mark.parametrize("hardest", [False, True])
def test_grouped_loss_is_the_sum_of_per_pair_terms(hardest: bool) -> None:
    from models.train import _loss

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=1)
    owner = torch.tensor([0, 0, 1, 1, 1, 2, 2])  # image row of every caption
    ids = torch.tensor([10, 11, 12])
    cfg = TrainConfig(margin=0.2)
    got = _loss(_CosineModel(), img, txt, ids, cfg, hardest, owner=owner)
    sims = img @ txt.t()
    i2t = t2i = 0.0
    for c in range(7):
        pos = sims[owner[c], c]
        neg_caps = [sims[owner[c], j] for j in range(7) if owner[j] != owner[c]]
        neg_imgs = [sims[b, c] for b in range(3) if b != owner[c]]
        ci = [max(0.0, 0.2 + n - pos) for n in neg_caps]
        ct = [max(0.0, 0.2 + n - pos) for n in neg_imgs]
        i2t += max(ci) if hardest else sum(ci)
        t2i += max(ct) if hardest else sum(ct)
    assert float(got["i2t"]) == pytest.approx(float(i2t), abs=1e-5)
    assert float(got["t2i"]) == pytest.approx(float(t2i), abs=1e-5)
    # One caption per image: the grouped loss is the plain diagonal loss.
    square = _loss(_CosineModel(), img, txt[:3], ids, cfg, hardest)
    same = _loss(_CosineModel(), img, txt[:3], ids, cfg, hardest, owner=torch.arange(3))
    assert float(square["loss"]) == pytest.approx(float(same["loss"]))


def test_grouped_epochs_embed_each_image_once_and_learn(
    synthetic: tuple[Path, Path], tmp_path: Path
) -> None:
    from models.train import _epoch_batches

    data, cache = synthetic
    cfg = _cfg(data, cache, tmp_path, epochs=4, epoch_mode="grouped")
    mcfg = model_config_for(cfg)
    feats = load_split_features(load_dataset(data, "train"), mcfg, cache, progress=False)
    batches = _epoch_batches(feats, cfg, np.random.default_rng(0))
    caps = np.concatenate([c for _, c in batches])
    assert sorted(caps.tolist()) == list(range(32 * CAPS))  # every caption exactly once
    for img_idx, cap in batches:
        assert len(np.unique(img_idx)) == cfg.batch_size  # batch_size images, all captions
        assert (feats.caption_to_image[cap] == img_idx).all()
    train(cfg)
    history = json.loads((tmp_path / "history.json").read_text())
    assert history[-1]["rsum"] > 100  # chance ~40
    with pytest.raises(ValueError, match="grouped"):
        train(_cfg(data, cache, tmp_path / "x", epoch_mode="grouped", sampler="adaptive"))


def test_gpo_warm_start_then_frozen_epoch(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    from models.gpo import GPO, min_rank0_weight
    from models.train import _build_model, warm_start_gpo

    data, cache = synthetic
    overrides = {"head": {"gpo_init": "max"}}
    cfg = _cfg(data, cache, tmp_path, epochs=1, model_overrides=overrides, gpo_freeze_epochs=1)
    best = train(cfg)
    trained = load_checkpoint(best, pretrained=False)
    assert trained.config.head.gpo_init == "max"  # the checkpoint carries the option
    fresh = _build_model(cfg)
    reports = warm_start_gpo(fresh, max_len=6)  # 6 grid cells, 5 tokens in this data
    assert len(reports) == 2 and all(r["min_rank0"] >= 0.989 for r in reports)
    for name in ("image_pool", "text_pool"):
        gpo, ref = getattr(trained, name).gpo, getattr(fresh, name).gpo
        assert isinstance(gpo, GPO) and min_rank0_weight(gpo, 6) >= 0.989  # pools like max
        for p, q in zip(gpo.state_dict().values(), ref.state_dict().values(), strict=True):
            assert torch.equal(p, q)  # frozen for the epoch: exactly the warm start
    # The heads did train (not everything was frozen).
    head_name = next(n for n in fresh.state_dict() if n.startswith("image_proj"))
    assert not torch.equal(trained.state_dict()[head_name], fresh.state_dict()[head_name])


def test_set_model_warm_started_from_a_gpo_checkpoint(
    synthetic: tuple[Path, Path], tmp_path: Path
) -> None:
    """`init_from`: a set model starts at a trained GPO model (every slot its global feature)."""
    from models.train import _build_model, init_from_checkpoint

    data, cache = synthetic
    gpo_best = train(_cfg(data, cache, tmp_path / "gpo", epochs=2))
    gpo = load_checkpoint(gpo_best, pretrained=False)
    set_overrides = {
        "head": {"pooling": "set", "num_slots": 3, "depth": 1, "heads": 2, "set_ff_mult": 1},
        "similarity": {"kind": "smooth_chamfer"},
    }
    cfg = _cfg(data, cache, tmp_path / "set", epochs=1, model_overrides=set_overrides)
    fresh = _build_model(cfg)
    report = init_from_checkpoint(fresh, gpo_best)
    assert report["copied"] > 0 and report["skipped"] == 0  # every GPO tensor found a home
    assert torch.equal(fresh.image_proj.fc.weight, gpo.image_proj.fc.weight)
    for tower in ("image_pool", "text_pool"):
        ours = getattr(fresh, tower).global_pool.gpo.state_dict()
        theirs = getattr(gpo, tower).gpo.state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert fresh.text_pool.set.ff[0].out_features == 64  # set_ff_mult 1 x embed_dim
    # Every slot starts as the normalised, layer-normed global feature of the GPO model.
    x = torch.randn(4, 5, 64)
    lengths = torch.tensor([5, 3, 1, 4])
    with torch.no_grad():
        slots = fresh.text_pool(x, lengths)
        glob = fresh.text_pool.global_pool(x, lengths)
        expected = torch.nn.functional.normalize(fresh.text_pool.set.norm_global(glob), dim=-1)
    assert slots.shape == (4, 3, 64)
    torch.testing.assert_close(slots, expected.unsqueeze(1).expand_as(slots))
    # ...and the training run that uses it keeps learning from there.
    train(cfg.model_copy(update={"init_from": gpo_best}))
    history = json.loads((tmp_path / "set" / "history.json").read_text())
    assert history[-1]["rsum"] > 100  # chance ~40
