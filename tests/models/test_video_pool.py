"""The video GPO: exactly mean at its warm start, selectable, measured and trained on cached
frame embeddings (tiny-random model, synthetic clips with known answers; seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import create_model
from models.checkpoint import load_checkpoint
from models.gpo import GPO, init_mean_pooling, length_mask
from models.video_pool import ClipSet, VideoTrainConfig, train_video_pool, video_metrics

D = 64  # tiny-random's embed_dim


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def synthetic_clips(num_clips: int, seed: int, noise: float = 0.6) -> ClipSet:
    """Clips of 2-3 photos (random directions) over 4 s segments of 4 frames each; a frame
    shows its photo's direction plus noise, a caption is its photo's direction plus noise."""
    rng = np.random.default_rng(seed)
    frames, seg_off, seg_spans, clip_off = [], [0], [], [0]
    photo_spans, photo_clip, captions, caption_photo = [], [], [], []
    for c in range(num_clips):
        n = int(rng.integers(2, 4))
        duration = 8.0
        directions = _unit(rng.normal(size=(n, D)))
        for p in range(n):
            photo_spans.append((p * duration / n, (p + 1) * duration / n))
            photo_clip.append(c)
            for _ in range(3):
                captions.append(_unit(directions[p] + noise * rng.normal(size=D) / np.sqrt(D)))
                caption_photo.append(len(photo_spans) - 1)
        for s in range(2):  # segments [0, 4) and [4, 8), 4 frames each at their centres
            for j in range(4):
                t = s * 4 + (j + 0.5)
                p = min(int(t / (duration / n)), n - 1)
                frames.append(_unit(directions[p] + noise * rng.normal(size=D) / np.sqrt(D)))
            seg_off.append(len(frames))
            seg_spans.append((s * 4.0, s * 4.0 + 4.0))
        clip_off.append(len(seg_spans))
    return ClipSet(
        frames=np.asarray(frames, dtype=np.float16),
        segment_offsets=np.asarray(seg_off),
        segment_spans=np.asarray(seg_spans, dtype=np.float32),
        clip_offsets=np.asarray(clip_off),
        photo_spans=np.asarray(photo_spans, dtype=np.float32),
        photo_clip=np.asarray(photo_clip),
        captions=np.asarray(captions, dtype=np.float16),
        caption_photo=np.asarray(caption_photo),
    )


@pytest.fixture()
def model():  # type: ignore[no-untyped-def]
    m = create_model("tiny-random", pretrained=False)
    m.new_video_gpo()
    return m


def test_mean_warm_start_pools_exactly_like_the_mean() -> None:
    torch.manual_seed(0)
    gpo = GPO(d_pe=16, d_hidden=16)
    init_mean_pooling(gpo)
    lengths = torch.tensor([1, 2, 4, 7, 32])
    x = torch.randn(len(lengths), 32, 48)
    pooled, weights = gpo(x, lengths)
    mask = length_mask(lengths, 32).unsqueeze(-1)
    mean = (x * mask).sum(1) / lengths[:, None]
    torch.testing.assert_close(pooled, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(1), torch.ones(len(lengths)))


def test_video_pooling_is_selectable(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    frames = torch.nn.functional.normalize(torch.randn(2, 5, D), dim=-1)
    lengths = torch.tensor([5, 3])
    with torch.no_grad():
        gpo = model.pool_frames(frames, lengths)  # fresh GPO = mean
        mean = model.pool_frames(frames, lengths, pooling="mean")
    torch.testing.assert_close(gpo, mean, atol=1e-5, rtol=1e-5)
    assert model.config.video.pooling == "gpo"
    other = create_model("tiny-random", pretrained=False)
    torch.manual_seed(123)  # the global RNG does not matter: the fresh GPO is seeded
    other.new_video_gpo()
    for key, value in model.video_pool.state_dict().items():
        assert torch.equal(value, other.video_pool.state_dict()[key]), key
    model.set_video_pooling("mean")
    assert model.video_pool is None and model.config.video.pooling == "mean"
    with pytest.raises(ValueError, match="no trained video GPO"):
        model.set_video_pooling("gpo")
    with pytest.raises(ValueError, match="no video GPO"):
        model.pool_frames(frames, lengths, pooling="gpo")
    with pytest.raises(ValueError, match="no trained video GPO"):
        create_model("tiny-random", pretrained=False, video_pooling="gpo")


def test_metrics_find_the_right_clip_and_segment(model) -> None:  # type: ignore[no-untyped-def]
    clips = synthetic_clips(12, seed=0, noise=0.3)
    m = video_metrics(model, clips, "mean")
    assert m["t2v_r1"] > 90 and m["v2t_r1"] > 90
    assert m["segment_acc"] > 90 and m["segment_acc_at_1"] > 90
    assert 50 <= m["segment_chance"] < 100  # photos straddling the 4 s cut overlap both
    assert m["rsum"] == pytest.approx(
        sum(m[f"{d}_r{k}"] for d in ("t2v", "v2t") for k in (1, 5, 10))
    )
    assert m["queries"] == len(clips.captions) and m["clips"] == 12
    # Shuffled captions: the right clip is chance, not found.
    wrong = ClipSet(**{**clips.__dict__, "caption_photo": np.roll(clips.caption_photo, 7)})
    assert video_metrics(model, wrong, "mean")["t2v_r1"] < m["t2v_r1"] / 2


def test_clip_set_round_trips(tmp_path: Path) -> None:
    clips = synthetic_clips(3, seed=1)
    back = ClipSet.load(clips.save(tmp_path / "frames.npz"))
    for name, value in clips.__dict__.items():
        np.testing.assert_array_equal(getattr(back, name), value)
    assert back.clip_frames(1).shape == (8, D)


def test_training_moves_only_the_video_gpo_and_reloads(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = VideoTrainConfig(epochs=3, batch_size=16, lr=1e-2, out_dir=tmp_path, progress=False)
    best = train_video_pool(model, synthetic_clips(48, seed=2), synthetic_clips(16, seed=3), cfg)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("video_pool.") for k in changed), changed
    # The trained GPO no longer pools like the mean: its rank weights moved.
    lengths = torch.tensor([4, 8])
    with torch.no_grad():
        weights = model.video_pool.gpo.compute_pool_weights(lengths, 8, torch.float32)
    assert float((weights[0, :4] - 0.25).abs().max()) > 1e-4
    # The best checkpoint is a full model with its video GPO, never below the warm start.
    reloaded = load_checkpoint(best, pretrained=False)
    assert reloaded.config.video.pooling == "gpo" and reloaded.video_pool is not None
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]  # epoch 0 = the mean warm start
    dev = synthetic_clips(16, seed=3)
    assert video_metrics(reloaded, dev)["rsum"] == pytest.approx(max(h["rsum"] for h in history))


def test_training_needs_a_video_gpo(tmp_path: Path) -> None:
    plain = create_model("tiny-random", pretrained=False)
    clips = synthetic_clips(4, seed=0)
    with pytest.raises(ValueError, match="no video GPO"):
        train_video_pool(plain, clips, clips, VideoTrainConfig(out_dir=tmp_path, progress=False))
