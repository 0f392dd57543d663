"""Media decoding and limits: real bytes, corrupt and hostile inputs, a real video."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from service.media import (
    MediaError,
    check_image,
    clean_text,
    content_hash,
    decode_base64,
    load_image,
    load_video,
    probe_video,
    resolve_media_path,
    verify_image,
)
from service.settings import IngestSettings


def _png(width: int = 32, height: int = 24, color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(width: int = 64, height: int = 48) -> bytes:
    buf = io.BytesIO()
    img = Image.effect_noise((width, height), 40).convert("RGB")
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming ``width x height`` and a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture()
def settings() -> IngestSettings:
    return IngestSettings(max_image_pixels=4_000_000, max_video_seconds=60)


def test_images_decode_to_rgb(settings: IngestSettings) -> None:
    img = load_image(_png(), settings)
    assert img.mode == "RGB" and img.size == (32, 24)
    assert img.getpixel((0, 0)) == (200, 10, 10)
    assert load_image(_jpeg(), settings).size == (64, 48)
    assert check_image(_jpeg(), settings) == ("JPEG", 64, 48)


def test_real_photo(flickr_dir: Path, settings: IngestSettings) -> None:
    path = sorted((flickr_dir / "images").glob("*.jpg"))[0]
    img = load_image(path.read_bytes(), settings)
    assert img.mode == "RGB" and min(img.size) > 100


def test_truncated_and_corrupt_images(settings: IngestSettings) -> None:
    noisy = io.BytesIO()
    Image.effect_noise((64, 48), 40).convert("RGB").save(noisy, format="PNG")
    for good in (noisy.getvalue(), _jpeg()):
        for cut in (len(good) // 4, len(good) // 2, len(good) - 40):
            with pytest.raises(MediaError) as err:
                load_image(good[:cut], settings)
            assert err.value.status in (415, 422)
    # corrupt the compressed body of a JPEG: header parses, decoding must fail or survive,
    # but never raise anything but MediaError
    rng = random.Random(0)
    good = _jpeg()
    for _ in range(40):
        bad = bytearray(good)
        for _ in range(20):
            bad[rng.randrange(20, len(bad))] = rng.randrange(256)
        try:
            load_image(bytes(bad), settings)
        except MediaError as exc:
            assert exc.status in (413, 415, 422)


def _outcome(fn: object, raw: bytes, settings: IngestSettings) -> tuple[int, str] | None:
    try:
        fn(raw, settings)  # type: ignore[operator]
    except MediaError as exc:
        return exc.status, exc.message
    return None


def _jpeg_variants() -> list[bytes]:
    """JPEGs of the kinds a reduced-scale decode treats differently: progressive, grey, CMYK,
    4:4:4, odd sizes, an EXIF orientation."""
    base = Image.effect_noise((75, 41), 60).convert("RGB")
    out = []
    for img, kw in (
        (base, {"progressive": True}),
        (base.convert("L"), {}),
        (base.convert("CMYK"), {}),
        (base, {"subsampling": 0}),
        (base.resize((9, 300)), {}),
    ):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85, **kw)
        out.append(buf.getvalue())
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    buf = io.BytesIO()
    base.save(buf, format="JPEG", exif=exif.tobytes())
    out.append(buf.getvalue())
    return out


def test_verify_image_refuses_exactly_what_load_image_refuses(
    flickr_dir: Path, settings: IngestSettings
) -> None:
    """The route's reduced-scale check (verify_image) and the worker's full decode agree on
    every input: valid, truncated anywhere, or with bytes flipped (same status, same message),
    so a corrupt photo is still refused at POST /ingest and never fails later in the worker."""
    photos = [p.read_bytes() for p in sorted((flickr_dir / "images").glob("*.jpg"))[:4]]
    rng = random.Random(12)
    cases: list[bytes] = []
    for good in photos + _jpeg_variants() + [_png(), _png_bomb(3000, 3000)]:
        cases.append(good)
        cases += [good[:cut] for cut in rng.sample(range(1, len(good)), min(12, len(good) - 1))]
        for _ in range(20):
            bad = bytearray(good)
            for _ in range(rng.choice((1, 4, 30))):
                bad[rng.randrange(2, len(bad))] = rng.randrange(256)
            cases.append(bytes(bad))
    refused = 0
    for raw in cases:
        full = _outcome(load_image, raw, settings)
        assert _outcome(verify_image, raw, settings) == full
        refused += full is not None
    assert 0 < refused < len(cases)  # both kinds were exercised
    for good in photos + _jpeg_variants():
        assert verify_image(good, settings) is None


def test_garbage_is_unsupported(settings: IngestSettings) -> None:
    for blob in (b"hello world, not an image", bytes(range(256)) * 4, b"%PDF-1.4\n..."):
        with pytest.raises(MediaError) as err:
            load_image(blob, settings)
        assert err.value.status == 415 and err.value.kind == "unsupported"
    with pytest.raises(MediaError) as err:
        load_image(b"", settings)
    assert err.value.status == 400


def test_refused_format(settings: IngestSettings) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="ICO")
    with pytest.raises(MediaError) as err:
        load_image(buf.getvalue(), settings)
    assert err.value.status == 415


def test_pixel_bomb_rejected_before_decode(settings: IngestSettings) -> None:
    bomb = _png_bomb(50_000, 50_000)  # 2.5 Gpx claimed in a ~100 byte file
    assert len(bomb) < 200
    for fn in (load_image, check_image):
        with pytest.raises(MediaError) as err:
            fn(bomb, settings)
        assert err.value.status == 413 and err.value.kind == "too_large"
    # over our cap but under PIL's own guard: our cap still applies
    with pytest.raises(MediaError) as err:
        load_image(_png_bomb(2100, 2000), settings)
    assert err.value.status == 413


def test_base64(settings: IngestSettings) -> None:
    raw = _png()
    b64 = base64.b64encode(raw).decode()
    assert decode_base64(b64) == raw
    assert decode_base64("data:image/png;base64," + b64) == raw
    assert decode_base64(base64.urlsafe_b64encode(raw).decode().rstrip("=")) == raw
    for bad in ("not base64 !!", "", "data:image/png,abc"):
        with pytest.raises(MediaError) as err:
            decode_base64(bad)
        assert err.value.status == 400
    with pytest.raises(MediaError) as err:
        decode_base64(b64, max_bytes=10)
    assert err.value.status == 413


def test_paths_stay_inside_the_media_root(tmp_path: Path) -> None:
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(_png())
    secret = tmp_path / "secret.txt"
    secret.write_text("no")
    (root / "link").symlink_to(secret)
    (root / "dirlink").symlink_to(tmp_path)

    assert resolve_media_path("sub/a.png", root) == (root / "sub" / "a.png").resolve()
    assert resolve_media_path(str(root / "sub" / "a.png"), root).name == "a.png"
    for bad in (
        "../secret.txt",
        "sub/../../secret.txt",
        str(secret),
        "link",
        "dirlink/secret.txt",
        "missing.png",
        "sub",
        "a\x00b",
    ):
        with pytest.raises(MediaError) as err:
            resolve_media_path(bad, root)
        assert err.value.status == 400, bad
    with pytest.raises(MediaError):
        resolve_media_path("sub/a.png", None)


def test_text() -> None:
    assert clean_text("  a dog runs \n", 100) == "a dog runs"
    for bad in ("", "   \n\t", None, 3, "x" * 101):
        with pytest.raises(MediaError) as err:
            clean_text(bad, 100)
        assert err.value.status == 422
    assert content_hash("abc") == content_hash(b"abc")


def test_real_video_segments(video_dir: Path, settings: IngestSettings) -> None:
    path = video_dir / "sample_demo_3.mp4"  # 6.09 s, 640x360
    info = probe_video(path.read_bytes(), settings)
    assert info.width == 640 and 6.0 < info.duration < 6.2
    video = load_video(path, IngestSettings(video_segment_seconds=2.0, video_frames_per_segment=3))
    assert video.spans[0] == (0.0, 2.0) and video.spans[-1][1] == pytest.approx(6.089, abs=0.01)
    assert len(video.segments) == 3  # the 0.09 s sliver joins the last segment
    assert all(len(s.frames) == 3 for s in video.segments)
    assert all(f.mode == "RGB" and max(f.size) <= 512 for f in video.frames)
    # frames differ over time (sampled across the clip, not the first frame repeated)
    first, last = video.frames[0].tobytes(), video.frames[-1].tobytes()
    assert first != last
    # from bytes too
    assert load_video(path.read_bytes(), settings).spans == [(0.0, 4.0), (4.0, 6.089)]


def test_video_limits_and_corruption(video_dir: Path) -> None:
    raw = (video_dir / "sample_demo_1.mp4").read_bytes()  # 9.7 s
    short = IngestSettings(max_video_seconds=5)
    for fn in (probe_video, load_video):
        with pytest.raises(MediaError) as err:
            fn(raw, short)
        assert err.value.status == 413
    with pytest.raises(MediaError) as err:
        load_video(raw, IngestSettings(max_image_pixels=1000))
    assert err.value.status == 413
    with pytest.raises(MediaError) as err:
        load_video(b"definitely not a video" * 10, IngestSettings())
    assert err.value.status == 415
    with pytest.raises(MediaError) as err:
        load_video(_png(), IngestSettings())  # an image is no video
    assert err.value.status == 415
    # an interrupted upload: the container says 9.7 s, the frames stop at ~3 s
    with pytest.raises(MediaError) as err:
        load_video(raw[: len(raw) // 3], IngestSettings())
    assert err.value.status == 422 and "truncated" in err.value.message
    # other cuts: refused or decoded as far as they go, never another exception
    for cut in (100, len(raw) // 2, len(raw) - 1000):
        try:
            video = load_video(raw[:cut], IngestSettings())
            assert video.segments
        except MediaError as exc:
            assert exc.status in (413, 415, 422)
