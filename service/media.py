"""Decode and validate ingested media: images, videos and text, under the limits in settings.

Every failure is a :class:`MediaError` with the HTTP status the API answers with:

- 400 ``invalid``: malformed request data (bad base64, a path outside the media root, no content);
- 413 ``too_large``: a decompression bomb (pixel cap) or a video over the duration cap;
- 415 ``unsupported``: bytes that are not an image/video format we decode;
- 422 ``unprocessable``: a recognised format that fails to decode (corrupt, truncated), or text
  that is empty or over-long.

The same functions run twice for an item: in the API (checks before the job is queued, so bad
input gets its 4xx synchronously: :func:`verify_image` refuses exactly what :func:`load_image`
refuses, decoding a JPEG at 1/8 scale) and in the worker (the full decode before encoding;
embedded mode hands the worker the API's full decode instead, :mod:`service.handoff`).
Nothing here touches the network; URLs are not fetched.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from service.settings import IngestSettings

logger = logging.getLogger(__name__)

# Formats decoded for image items; anything else PIL might open (EPS, PSD, ...) is refused (415).
IMAGE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
# Container formats (FFmpeg demuxer names) decoded for video items. An allow-list: FFmpeg
# also opens still images, playlists (hls, concat) and other formats that have no business here.
VIDEO_CONTAINERS = frozenset(
    {
        "mov",
        "mp4",
        "m4a",
        "3gp",
        "3g2",
        "mj2",
        "matroska",
        "webm",
        "avi",
        "mpegts",
        "flv",
        "mpeg",
        "ogg",
        "gif",
    }
)
# Frames of a video are downscaled to this longest side before they are kept: the encoders
# resize to ~224 px anyway, and 36 full-resolution 4K frames would cost ~1 GB of RAM.
MAX_FRAME_SIDE = 512
# A video whose decodable frames end before this fraction of its declared duration is
# truncated (an interrupted upload), and refused rather than indexed half.
TRUNCATED_FRACTION = 0.9
# Never let a careless global setting disable PIL's own bomb guard; ours (settings) is stricter.
if Image.MAX_IMAGE_PIXELS is None:
    Image.MAX_IMAGE_PIXELS = 89_478_485
ImageFile.LOAD_TRUNCATED_IMAGES = False

_KINDS = {400: "invalid", 413: "too_large", 415: "unsupported", 422: "unprocessable"}


class MediaError(ValueError):
    """Bad media: ``status`` is the HTTP status to answer, ``kind`` a stable machine tag."""

    def __init__(self, message: str, status: int = 422, kind: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind or _KINDS.get(status, "invalid")

    def __str__(self) -> str:
        return self.message


@dataclass
class VideoSegment:
    """One segment of a video: ``[start, end)`` seconds and the frames sampled inside it."""

    start: float
    end: float
    frames: list[Image.Image] = field(default_factory=list)


@dataclass
class DecodedVideo:
    """A decoded video: its duration (s) and its segments, in order."""

    duration: float
    segments: list[VideoSegment]

    @property
    def spans(self) -> list[tuple[float, float]]:
        """``(start, end)`` seconds of each segment (what a gallery Record stores)."""
        return [(s.start, s.end) for s in self.segments]

    @property
    def frames(self) -> list[Image.Image]:
        """All sampled frames, segment after segment."""
        return [f for s in self.segments for f in s.frames]


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learns from the container without decoding frames."""

    duration: float
    width: int
    height: int
    codec: str


# ---------------------------------------------------------------------------------- raw bytes


def content_hash(raw: bytes | str) -> str:
    """sha256 hex of an item's content (the raw media bytes, or the cleaned text in UTF-8)."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8")
    return hashlib.sha256(raw).hexdigest()


def decode_base64(data: str, max_bytes: int | None = None) -> bytes:
    """Decode standard or URL-safe base64, optionally behind a ``data:...;base64,`` prefix.

    Raises MediaError 400 on malformed input, 413 when the decoded size would exceed
    ``max_bytes`` (checked on the encoded length, before decoding).
    """
    if not isinstance(data, str):
        raise MediaError("data must be a base64 string", 400)
    if data.startswith("data:"):
        head, sep, data = data.partition(",")
        if not sep or ";base64" not in head:
            raise MediaError("data URL must be base64-encoded", 400)
    data = "".join(data.split())  # tolerate wrapped base64
    if not data:
        raise MediaError("data is empty", 400)
    if max_bytes is not None and len(data) * 3 // 4 > max_bytes:
        raise MediaError(f"decoded data exceeds {max_bytes} bytes", 413)
    if "-" in data or "_" in data:
        data = data.replace("-", "+").replace("_", "/")
    data += "=" * (-len(data) % 4)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"data is not valid base64: {exc}", 400) from exc


def resolve_media_path(path: str | os.PathLike[str], media_root: Path | None) -> Path:
    """Resolve ``path`` (relative to, or absolute inside, ``media_root``) to an existing file.

    Symlinks are resolved before the containment check, so neither ``..`` nor a link that
    points outside the root escapes it. With no media root configured, paths are refused.
    """
    if media_root is None:
        raise MediaError("items by path are disabled (no media_root configured)", 400)
    raw = os.fspath(path)
    if not raw or "\x00" in raw:
        raise MediaError("invalid path", 400)
    root = Path(media_root).resolve()
    candidate = Path(raw)
    if not candidate.is_absolute():
        candidate = root / candidate
    try:
        # Containment is checked before existence: no probing of files outside the root.
        resolved = candidate.resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop on older Pythons
        raise MediaError(f"invalid path: {raw}", 400) from exc
    if not resolved.is_relative_to(root):
        raise MediaError(f"path is outside the media root: {raw}", 400)
    try:
        exists, is_file = resolved.exists(), resolved.is_file()
    except OSError as exc:  # ENAMETOOLONG and kin: the path itself is unusable
        shown = raw if len(raw) <= 200 else f"{raw[:200]}... ({len(raw)} characters)"
        raise MediaError(f"invalid path ({exc.strerror or exc}): {shown}", 422) from exc
    if not exists:
        raise MediaError(f"path not found: {raw}", 400)
    if not is_file:
        raise MediaError(f"path is not a regular file: {raw}", 400)
    return resolved


def read_media_file(path: Path, max_bytes: int | None = None) -> bytes:
    """Read a resolved media file, refusing files larger than ``max_bytes`` (413)."""
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise MediaError(f"file is {size} bytes, over the {max_bytes} byte cap", 413)
    return path.read_bytes()


# ------------------------------------------------------------------------------------- images


def check_image(raw: bytes, settings: IngestSettings) -> tuple[str, int, int]:
    """Identify an image from its header only: ``(format, width, height)``.

    Cheap (no pixel decode): the API calls it before queueing. Raises 415 for unknown or
    refused formats and 413 when ``width * height`` exceeds ``settings.max_image_pixels``.
    """
    with _open_image(raw, settings) as img:
        return str(img.format), img.width, img.height


def load_image(source: bytes | Path, settings: IngestSettings) -> Image.Image:
    """Fully decode an image to RGB (EXIF orientation applied; first frame of animations).

    ``source`` is the raw bytes or a path already resolved by :func:`resolve_media_path`.
    """
    raw = source.read_bytes() if isinstance(source, Path) else source
    return _decode_image(raw, settings, reduced=False)


def verify_image(raw: bytes, settings: IngestSettings) -> None:
    """Refuse, with :func:`load_image`'s status and message, an image it would refuse; decode
    no more than the format needs to tell.

    ``POST /ingest`` calls it so a corrupt or truncated upload is a 4xx at once, while the
    worker does the full decode. A JPEG is decoded at 1/8 scale in grey (``Image.draft``):
    libjpeg still reads every marker and entropy-decodes every block of every component,
    which is where truncation and broken data show, and skips most of the inverse DCT and the
    colour conversion (about 40% of a 224 px photo's decode). Other formats decode in full.
    """
    _decode_image(raw, settings, reduced=True).close()


def _decode_image(raw: bytes, settings: IngestSettings, *, reduced: bool) -> Image.Image:
    with _open_image(raw, settings) as img:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                if reduced:
                    img.draft("L", (1, 1))  # JPEG only (a no-op elsewhere): 1/8 scale, grey
                img.load()
                out = ImageOps.exif_transpose(img)
                if out is None:  # pragma: no cover - exif_transpose(in_place=False) returns
                    out = img
                return out.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise MediaError(f"image exceeds the decompression-bomb limit: {exc}", 413) from exc
        except MemoryError as exc:
            raise MediaError("image is too large to decode", 413) from exc
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
            # PIL reports truncation as OSError, bad chunks as SyntaxError/ValueError.
            raise MediaError(f"corrupt or truncated {img.format} image: {exc}", 422) from exc


def _open_image(raw: bytes, settings: IngestSettings) -> Image.Image:
    if not raw:
        raise MediaError("image data is empty", 400)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(f"image exceeds the decompression-bomb limit: {exc}", 413) from exc
    except UnidentifiedImageError as exc:
        raise MediaError("not a recognised image format", 415) from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct_error()) as exc:
        raise MediaError(f"corrupt image header: {exc}", 422) from exc
    if img.format not in IMAGE_FORMATS:
        img.close()
        raise MediaError(f"unsupported image format {img.format}", 415)
    pixels = img.width * img.height
    if img.width <= 0 or img.height <= 0:
        img.close()
        raise MediaError("image has no pixels", 422)
    if pixels > settings.max_image_pixels:
        img.close()
        raise MediaError(
            f"image is {img.width}x{img.height} = {pixels} pixels, over the "
            f"{settings.max_image_pixels} pixel cap",
            413,
        )
    return img


def struct_error() -> type[Exception]:
    import struct

    return struct.error


# ------------------------------------------------------------------------------------- videos


def probe_video(source: bytes | Path, settings: IngestSettings) -> VideoInfo:
    """Open a video container and check it without decoding frames (the API's cheap check).

    415 when it is not a container with a decodable video stream, 413 when its duration is
    over ``settings.max_video_seconds`` or its frame size over the pixel cap.
    """
    with _open_container(source) as container:
        stream = _video_stream(container)
        duration = _container_duration(container, stream)
        _check_video_limits(stream, duration, settings)
        return VideoInfo(
            duration=duration or 0.0,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            codec=stream.codec_context.name,
        )


def load_video(
    source: bytes | Path, settings: IngestSettings, max_frame_side: int = MAX_FRAME_SIDE
) -> DecodedVideo:
    """Decode a video into segments of ``settings.video_segment_seconds``.

    Each segment keeps ``settings.video_frames_per_segment`` RGB frames, sampled at evenly
    spaced times inside it (the frame on screen at each target time), downscaled to at most
    ``max_frame_side`` pixels on the longest side. A last segment shorter than a quarter
    segment joins the one before. Frames are picked while decoding, so memory holds one
    decoded frame at a time. A video whose frames stop well before its declared duration is
    truncated (422).
    """
    with _open_container(source) as container:
        stream = _video_stream(container)
        duration = declared = _container_duration(container, stream)
        _check_video_limits(stream, duration, settings)
        if duration is None or duration <= 0:
            declared = None
            duration = _demux_duration(container, stream, settings.max_video_seconds)
            container.seek(0)
        segments = _segment_spans(duration, settings)
        targets = [
            (s, start + (j + 0.5) * (end - start) / settings.video_frames_per_segment)
            for s, (start, end) in enumerate(segments)
            for j in range(settings.video_frames_per_segment)
        ]
        stream.thread_type = "AUTO"
        picked: list[list[Image.Image]] = [[] for _ in segments]
        last_t = 0.0
        try:
            previous: Any = None
            next_target = 0
            for t, frame in _decode_frames(container, stream, settings.max_video_seconds):
                # Every target before this frame's time shows the previous frame.
                while next_target < len(targets) and targets[next_target][1] < t:
                    chosen = previous if previous is not None else frame
                    picked[targets[next_target][0]].append(_to_image(chosen, max_frame_side))
                    next_target += 1
                previous, last_t = frame, t
            if previous is None:
                raise MediaError("video has no decodable frames", 422)
            while next_target < len(targets):  # targets past the last frame
                picked[targets[next_target][0]].append(_to_image(previous, max_frame_side))
                next_target += 1
        except MediaError:
            raise
        except MemoryError as exc:
            raise MediaError("video is too large to decode", 413) from exc
        except (av_errors(), OSError, ValueError) as exc:
            raise MediaError(f"corrupt or truncated video: {exc}", 422) from exc
    rate = float(stream.average_rate) if stream.average_rate else 25.0
    if declared is not None and last_t + 1 / rate < declared * TRUNCATED_FRACTION - 0.5:
        raise MediaError(
            f"video is truncated: frames end at {last_t:.1f} s of a declared {declared:.1f} s", 422
        )
    # Metadata can overstate the length a little: drop segments after the last frame.
    out = [
        VideoSegment(start=start, end=end, frames=frames)
        for (start, end), frames in zip(segments, picked, strict=True)
        if start <= last_t or start == 0.0
    ]
    return DecodedVideo(duration=round(duration, 3), segments=out)


def _segment_spans(duration: float, settings: IngestSettings) -> list[tuple[float, float]]:
    seg_len = settings.video_segment_seconds
    n_segments = max(1, math.ceil(duration / seg_len - 1e-6))
    spans = []
    for s in range(n_segments):
        start, end = s * seg_len, min((s + 1) * seg_len, duration)
        spans.append((round(start, 3), round(max(end, start + 1e-3), 3)))
    # A sliver at the end (under a quarter segment) joins the previous segment.
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < seg_len / 4:
        spans[-2:] = [(spans[-2][0], spans[-1][1])]
    return spans


def _open_container(source: bytes | Path) -> Any:
    import av

    if isinstance(source, (bytes, bytearray)) and not source:
        raise MediaError("video data is empty", 400)
    target: Any = str(source) if isinstance(source, Path) else io.BytesIO(source)
    try:
        container = av.open(target, mode="r", metadata_errors="ignore")
    except av.error.InvalidDataError as exc:
        raise MediaError("not a recognised video format", 415) from exc
    except (av_errors(), OSError, ValueError) as exc:
        raise MediaError(f"cannot open video: {exc}", 415) from exc
    names = set(container.format.name.split(","))
    if not names & VIDEO_CONTAINERS:
        container.close()
        raise MediaError(f"unsupported video container {container.format.name!r}", 415)
    return container


def _video_stream(container: Any) -> Any:
    if not container.streams.video:
        raise MediaError("no video stream in the container", 415)
    stream = container.streams.video[0]
    if stream.codec_context is None or not stream.codec_context.name:
        raise MediaError("video codec is not supported", 415)
    return stream


def _container_duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration) / 1_000_000  # AV_TIME_BASE
    return None


def _demux_duration(container: Any, stream: Any, max_seconds: float) -> float:
    """Duration from packet timestamps (no decoding), for containers without metadata."""
    last = 0.0
    try:
        for packet in container.demux(stream):
            if packet.pts is not None and packet.time_base is not None:
                end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
                last = max(last, end)
                if last > max_seconds:
                    raise MediaError(f"video runs past the {max_seconds:.0f} s cap", 413)
    except (av_errors(), OSError, ValueError) as exc:
        raise MediaError(f"corrupt or truncated video: {exc}", 422) from exc
    if last <= 0:
        raise MediaError("video has no timed frames", 422)
    return last


def _check_video_limits(stream: Any, duration: float | None, settings: IngestSettings) -> None:
    if duration is not None and duration > settings.max_video_seconds:
        raise MediaError(
            f"video is {duration:.1f} s long, over the {settings.max_video_seconds:.0f} s cap", 413
        )
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > settings.max_image_pixels:
        raise MediaError(f"video frames are {width}x{height}, over the pixel cap", 413)


def _decode_frames(container: Any, stream: Any, max_seconds: float) -> Iterator[tuple[float, Any]]:
    """Yield ``(time_s, av.VideoFrame)`` in presentation order, stopping past the cap."""
    rate = float(stream.average_rate) if stream.average_rate else 25.0
    for index, frame in enumerate(container.decode(stream)):
        t = frame.time if frame.time is not None else index / rate
        if t > max_seconds:
            raise MediaError(f"video runs past the {max_seconds:.0f} s cap", 413)
        yield float(t), frame


def _to_image(frame: Any, max_side: int) -> Image.Image:
    w, h = frame.width, frame.height
    scale = min(1.0, max_side / max(w, h))
    if scale < 1.0:
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        image: Image.Image = frame.to_image(width=w, height=h)
    else:
        image = frame.to_image()
    return image.convert("RGB")


def av_errors() -> type[Exception]:
    import av

    return av.error.FFmpegError


# --------------------------------------------------------------------------------------- text


def clean_text(text: Any, max_chars: int) -> str:
    """Strip whitespace; refuse (422) non-strings, empty text and text over ``max_chars``."""
    if not isinstance(text, str):
        raise MediaError("text must be a string", 422)
    cleaned = text.strip()
    if not cleaned:
        raise MediaError("text is empty", 422)
    if "\x00" in cleaned:
        raise MediaError("text contains NUL characters", 422)
    if len(cleaned) > max_chars:
        raise MediaError(f"text is {len(cleaned)} characters, over the {max_chars} cap", 422)
    return cleaned


@dataclass(frozen=True)
class ResolvedItem:
    """An ingested item's content, read once: the cleaned text or the raw media bytes."""

    modality: str
    text: str | None  # text items: the cleaned text
    raw: bytes | None  # image and video items: the media bytes
    path: Path | None  # the resolved file under the media root, when the item gave a path
    content_hash: str  # sha256 of the cleaned text (UTF-8) or of the raw bytes


def resolve_item(item: Mapping[str, Any], settings: IngestSettings) -> ResolvedItem:
    """Resolve an ingest item (``modality`` plus ``text``, ``data``, ``path``, or a queue's
    spilled ``content``) into its content and content hash. ``POST /ingest`` (to validate and
    queue) and the worker (to encode and skip unchanged content) both use it, so both hash the
    same thing. Raises :class:`MediaError` with the status to answer."""
    max_bytes = settings.max_body_bytes
    modality = item.get("modality")
    path: Path | None = None
    if modality == "text":
        text = item.get("text")
        if text is None and item.get("path"):
            path = resolve_media_path(item["path"], settings.media_root)
            text = read_media_file(path, max_bytes).decode("utf-8", "replace")
        cleaned = clean_text(text, settings.max_text_chars)
        return ResolvedItem("text", cleaned, None, path, content_hash(cleaned))
    if modality not in ("image", "video"):
        raise MediaError(f"unknown modality {modality!r}", 422)
    if item.get("blob_missing"):
        raise MediaError("the item's payload expired before it was processed", 400)
    if item.get("content") is not None:
        raw = bytes(item["content"])
    elif item.get("data") is not None:
        data = item["data"]
        raw = (
            bytes(data) if isinstance(data, (bytes, bytearray)) else decode_base64(data, max_bytes)
        )
    elif item.get("path"):
        path = resolve_media_path(item["path"], settings.media_root)
        raw = read_media_file(path, max_bytes)
    else:
        raise MediaError("item has no data, path or text", 400)
    return ResolvedItem(str(modality), None, raw, path, content_hash(raw))
