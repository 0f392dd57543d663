"""Synthetic captioned video clips built from real photos (issue #11: no captioned video set
exists offline).

A clip is 4-8 s of slow pan/zoom ("Ken Burns") over 2-4 distinct photos of one split, shown one
after another with hard cuts, encoded as H.264 MP4 with PyAV. Each photo holds an equal share
of the clip; the caption of one photo is a query whose answer is the clip, and the photo's time
span is where in the clip the answer lies. Everything is drawn from one seeded generator, so a
(split, clips, seed) triple always builds the same plans and the same frames.

    plans = plan_clips(load_dataset(data, "dev"), num_clips=150, seed=0)
    manifest = build_clips(plans, ds, out_dir)          # out_dir/clips.jsonl + clip-00000.mp4 ...
    clips = load_manifest(manifest)

``clips.jsonl`` holds one object per clip::

    {"clip": "clip-00000.mp4", "duration": 6.0, "split": "dev", "seed": 0,
     "photos": [{"image": "1000268201_693b08cb0e.jpg", "start": 0.0, "end": 3.0,
                 "captions": ["A child in a pink dress ...", ...]}, ...]}

Photos are never reused: within a build every photo appears in one clip only, so a caption has
exactly one right clip. Train clips come from ``train`` photos, evaluation clips from ``dev``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from models.data import CaptionDataset

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST",
    "ClipPhoto",
    "ClipPlan",
    "build_clips",
    "load_manifest",
    "plan_clips",
    "render_frames",
    "spans_overlap",
]

MANIFEST = "clips.jsonl"
FPS = 12  # frames per second of the encoded clips (slow motion needs few)
SIZE = (320, 240)  # width, height of the encoded clips (the encoders resize to ~224 px)
ZOOM = (1.0, 1.25)  # crop zoom range: 1 = the largest 4:3 crop of the photo
CRF = 23  # x264 constant rate factor (visually clean at this size)


@dataclass(frozen=True)
class ClipPhoto:
    """One photo of a clip: its file, its ``[start, end)`` seconds, its captions and motion."""

    image: str
    start: float
    end: float
    captions: list[str]
    # Ken Burns motion: zoom and crop centre (fractions of the free margin, 0..1) at the
    # start and the end of the photo's span; linearly interpolated in between.
    zoom: tuple[float, float] = (1.0, 1.0)
    centre_from: tuple[float, float] = (0.5, 0.5)
    centre_to: tuple[float, float] = (0.5, 0.5)


@dataclass(frozen=True)
class ClipPlan:
    """Everything needed to render one clip (and what its manifest line records)."""

    clip: str
    duration: float
    split: str
    seed: int
    photos: list[ClipPhoto]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, row: dict) -> ClipPlan:
        photos = [
            ClipPhoto(
                image=p["image"],
                start=float(p["start"]),
                end=float(p["end"]),
                captions=list(p["captions"]),
                zoom=tuple(p.get("zoom", (1.0, 1.0))),  # type: ignore[arg-type]
                centre_from=tuple(p.get("centre_from", (0.5, 0.5))),  # type: ignore[arg-type]
                centre_to=tuple(p.get("centre_to", (0.5, 0.5))),  # type: ignore[arg-type]
            )
            for p in row["photos"]
        ]
        return cls(row["clip"], float(row["duration"]), row["split"], int(row["seed"]), photos)


def spans_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """True when the half-open intervals ``[a0, a1)`` and ``[b0, b1)`` share some time."""
    return min(a[1], b[1]) > max(a[0], b[0])


def plan_clips(
    ds: CaptionDataset,
    num_clips: int,
    seed: int = 0,
    photos: tuple[int, int] = (2, 4),
    seconds: tuple[float, float] = (4.0, 8.0),
) -> list[ClipPlan]:
    """Deterministic plans of ``num_clips`` clips over distinct photos of ``ds``.

    Args:
        ds: the split the photos come from (``train`` for training clips, ``dev`` for reports).
        num_clips: how many clips; they need at most ``num_clips * photos[1]`` photos.
        seed: seeds every random choice (photos, counts, durations, motion).
        photos: inclusive range of photos per clip.
        seconds: range of clip durations (rounded to 0.5 s).

    Raises:
        ValueError: the split has too few photos for that many clips, or a bad range.
    """
    lo, hi = photos
    if not 1 <= lo <= hi:
        raise ValueError(f"photos per clip must satisfy 1 <= min <= max, got {photos}")
    if not 0 < seconds[0] <= seconds[1]:
        raise ValueError(f"clip seconds must satisfy 0 < min <= max, got {seconds}")
    rng = np.random.default_rng(seed)
    counts = rng.integers(lo, hi + 1, size=num_clips)
    if int(counts.sum()) > ds.num_images:
        raise ValueError(
            f"{num_clips} clips need {int(counts.sum())} distinct photos; split {ds.split!r} "
            f"of {ds.name} has {ds.num_images}"
        )
    order = rng.permutation(ds.num_images)
    by_image: list[list[str]] = [[] for _ in range(ds.num_images)]
    for caption, owner in zip(ds.captions, ds.caption_to_image, strict=True):
        by_image[int(owner)].append(caption)
    plans, taken = [], 0
    for c in range(num_clips):
        n = int(counts[c])
        duration = float(np.round(rng.uniform(*seconds) * 2) / 2)
        span = duration / n
        members = []
        for j, idx in enumerate(order[taken : taken + n]):
            z = rng.uniform(*ZOOM, size=2)
            if rng.random() < 0.5:  # zoom in or out, at random
                z = z[::-1]
            members.append(
                ClipPhoto(
                    image=ds.image_ids[int(idx)],
                    start=round(j * span, 3),
                    end=round((j + 1) * span, 3),
                    captions=by_image[int(idx)],
                    zoom=(round(float(z[0]), 3), round(float(z[1]), 3)),
                    centre_from=tuple(round(float(v), 3) for v in rng.random(2)),  # type: ignore[arg-type]
                    centre_to=tuple(round(float(v), 3) for v in rng.random(2)),  # type: ignore[arg-type]
                )
            )
        taken += n
        plans.append(ClipPlan(f"clip-{c:05d}.mp4", duration, ds.split, seed, members))
    return plans


def _crop_box(
    width: int, height: int, zoom: float, centre: tuple[float, float]
) -> tuple[float, float, float, float]:
    """The ``SIZE``-shaped crop at ``zoom`` (1 = largest that fits) placed at ``centre``."""
    aspect = SIZE[0] / SIZE[1]
    cw = min(width, height * aspect) / zoom
    ch = cw / aspect
    x0 = (width - cw) * centre[0]
    y0 = (height - ch) * centre[1]
    return (x0, y0, x0 + cw, y0 + ch)


def render_frames(plan: ClipPlan, paths: dict[str, Path], fps: int = FPS) -> list[Image.Image]:
    """The RGB frames of a clip at ``fps`` (frame ``i`` shows time ``i / fps``); ``paths``
    maps each photo's image id to its file."""
    n_frames = max(1, round(plan.duration * fps))
    frames: list[Image.Image] = []
    photos = iter(plan.photos)
    photo = next(photos)
    with Image.open(paths[photo.image]) as im:
        current = im.convert("RGB")
    for i in range(n_frames):
        t = i / fps
        while t >= photo.end and photo is not plan.photos[-1]:
            photo = next(photos)
            with Image.open(paths[photo.image]) as im:
                current = im.convert("RGB")
        a = min(max((t - photo.start) / max(photo.end - photo.start, 1e-9), 0.0), 1.0)
        zoom = photo.zoom[0] + a * (photo.zoom[1] - photo.zoom[0])
        centre = (
            photo.centre_from[0] + a * (photo.centre_to[0] - photo.centre_from[0]),
            photo.centre_from[1] + a * (photo.centre_to[1] - photo.centre_from[1]),
        )
        box = _crop_box(current.width, current.height, zoom, centre)
        frames.append(current.resize(SIZE, Image.Resampling.BILINEAR, box=box))
    return frames


def _encode_mp4(frames: list[Image.Image], path: Path, fps: int) -> None:
    """H.264 (yuv420p) in MP4 via PyAV, one encoder thread. The frames are deterministic; the
    encoded bytes of a rebuild can still differ slightly (seen with libx264 in one process)."""
    import av

    tmp = path.with_name(f".{path.name}.tmp")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        # PyAV sets the codec's thread count itself when it opens it (overriding a "threads"
        # option), so both are pinned: several x264 threads made the bytes vary with load.
        stream.codec_context.thread_count = 1
        stream.codec_context.options = {"crf": str(CRF), "preset": "veryfast", "threads": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


def build_clips(
    plans: list[ClipPlan],
    ds: CaptionDataset,
    out_dir: Path,
    fps: int = FPS,
    progress: bool = True,
) -> Path:
    """Render and encode every planned clip (photos of ``ds``) into ``out_dir`` and write
    ``clips.jsonl``.

    Clips already present (same file name) are kept, so an interrupted build resumes; the
    manifest is written last (atomically), so its presence means the build is complete.

    Returns:
        The manifest path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = dict(zip(ds.image_ids, ds.images, strict=True))
    for plan in tqdm(plans, desc="clips", disable=not progress):
        path = out_dir / plan.clip
        if not path.is_file():
            _encode_mp4(render_frames(plan, paths, fps), path, fps)
    manifest = out_dir / MANIFEST
    tmp = manifest.with_name(f".{MANIFEST}.tmp")
    tmp.write_text("".join(p.to_json() + "\n" for p in plans), encoding="utf-8")
    tmp.replace(manifest)
    logger.info("built %d clips in %s", len(plans), out_dir)
    return manifest


def load_manifest(path: Path) -> tuple[Path, list[ClipPlan]]:
    """``(folder of the clips, plans)`` from a ``clips.jsonl`` file (or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no clip manifest at {path} (build one: xmodal video clips)")
    plans = [
        ClipPlan.from_dict(json.loads(line))
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    return path.parent, plans
