"""The search page in a real browser: Debian's chromium, headless, driven by Playwright,
against a real ``xmodal serve`` process (embedded mode, temp data dir, the shipped model) with
20 Flickr8k dev photos, their first captions, one real video and a small query bank ingested.

Checks: a caption finds its photo; the QB-Norm switch changes what the service applies; a
``/?q=...`` URL loads straight to the same results; a picture upload searches; the ingest
panel indexes a file and reports a corrupt one; labels and focus order; phone width; the key
dialog when read keys are configured. Screenshots go to ``$XMODAL_ARTIFACTS`` (default
``/tmp/xmodal-artifacts``); the test prints where.

Skips with the reason when chromium, the playwright package or the data are missing
(``.ci/run`` installs chromium from Debian's packages).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.service.serve_process import ServeProcess

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
N_PHOTOS = 20
TARGET = 3  # the photo whose second caption we search with
ARTIFACTS = Path(os.environ.get("XMODAL_ARTIFACTS", "/tmp/xmodal-artifacts"))


def _chromium() -> str:
    for candidate in (os.environ.get("XMODAL_CHROMIUM"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium not installed (apt-get install -y chromium; .ci/run does it)")
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed (dev extra)"
    )
    path = _chromium()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def photos(flickr_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (flickr_dir / "captions.jsonl").open()]
    dev = [r for r in rows if r["split"] == "dev"][: N_PHOTOS + 1]
    for r in dev:
        r["path"] = flickr_dir / "images" / r["image"]
    bank = [r["captions"][0] for r in rows if r["split"] == "train"][:200]
    return [*dev, {"bank": bank}]


@pytest.fixture(scope="module")
def served(
    browser: Any,
    photos: list[dict[str, Any]],
    video_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServeProcess]:
    """The shipped model serving 20 photos, their first captions, a video and a query bank."""
    tmp = tmp_path_factory.mktemp("page")
    server = ServeProcess(tmp / "data", tmp / "serve.log")
    try:
        server.wait_ready()
        rows, bank = photos[:N_PHOTOS], photos[-1]["bank"]
        items: list[dict[str, Any]] = []
        for r in rows:
            data = base64.b64encode(r["path"].read_bytes()).decode()
            meta = {"filename": r["image"]}
            items.append(
                {"id": f"img:{r['image']}", "modality": "image", "data": data, "metadata": meta}
            )
            items.append({"id": f"txt:{r['image']}", "modality": "text", "text": r["captions"][0]})
        clip = base64.b64encode((video_dir / "sample_demo_3.mp4").read_bytes()).decode()
        items.append({"id": "clip", "modality": "video", "data": clip})
        r = server.client.post("/ingest", json={"items": items})
        assert r.status_code == 202, r.text
        job = server.wait_job(r.json()["job_id"])
        assert job["state"] == "done", job
        r = server.client.post("/querybank", json={"texts": bank})
        assert r.status_code == 200, r.text
        yield server
    finally:
        server.stop()


@pytest.fixture()
def page(browser: Any, served: ServeProcess) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=served.url)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _shot(pg: Any, name: str, capsys: pytest.CaptureFixture[str]) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    pg.screenshot(path=str(path), full_page=True)
    with capsys.disabled():
        print(f"\n[artifact] screenshot: {path}")
    return path


def _wait_results(pg: Any) -> list[str]:
    pg.wait_for_function(
        "() => !document.getElementById('results').hasAttribute('aria-busy')"
        " && /result|No results|failed/.test(document.getElementById('status').textContent)"
    )
    return list(pg.eval_on_selector_all("#results > li", "els => els.map(e => e.dataset.id)"))


def _loaded_images(pg: Any) -> int:
    pg.wait_for_function(
        "() => [...document.querySelectorAll('#results img')].every(i => i.complete)"
    )
    return int(
        pg.eval_on_selector_all("#results img", "els => els.filter(i => i.naturalWidth > 0).length")
    )


# ---- the tests ------------------------------------------------------------------------------


def test_typing_a_caption_finds_the_photo(
    page: Any, photos: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    target = photos[TARGET]
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    page.get_by_label("Search text").fill(target["captions"][1])
    page.keyboard.press("Enter")
    ids = _wait_results(page)
    assert f"img:{target['image']}" in ids, (target["captions"][1], ids)
    assert ids and all(i.startswith(("img:", "clip")) for i in ids)  # default: images, videos
    card = page.locator(f'#results li[data-id="img:{target["image"]}"]')
    assert card.locator(".score").inner_text().startswith("score ")
    assert card.locator(".raw-score").inner_text().startswith("raw ")
    assert card.locator("img").get_attribute("alt") == target["image"]  # the filename label
    assert _loaded_images(page) == len(page.locator("#results img").all()) > 0  # thumbnails
    query = urllib.parse.parse_qs(urllib.parse.urlparse(page.url).query)
    assert query["q"] == [target["captions"][1]] and query["targets"] == ["image,video"]
    _shot(page, "search-desktop", capsys)


def test_qbnorm_switch(page: Any, photos: list[dict[str, Any]]) -> None:
    caption = photos[TARGET]["captions"][1]
    page.goto("/?" + urllib.parse.urlencode({"q": caption, "targets": "image", "qbnorm": "off"}))
    _wait_results(page)
    switch = page.get_by_role("switch", name="QB-Norm")
    assert not switch.is_checked()
    assert page.locator("#results").get_attribute("data-qbnorm-applied") == "false"
    raw = page.eval_on_selector_all("#results li", "els => els.map(e => e.dataset.score)")
    assert "QB-Norm off" in page.locator("#status").inner_text()

    switch.focus()
    page.keyboard.press("Space")  # keyboard-operable
    page.wait_for_function(
        "() => document.getElementById('results').dataset.qbnormApplied === 'true'"
    )
    _wait_results(page)
    assert switch.is_checked() and "qbnorm=on" in page.url
    assert "QB-Norm applied" in page.locator("#status").inner_text()
    cards = page.eval_on_selector_all(
        "#results li", "els => els.map(e => [e.dataset.score, e.dataset.rawScore])"
    )
    assert any(float(s) != float(r) for s, r in cards)  # normalised scores differ from raw
    assert [s for s, _ in cards] != raw

    page.locator("label[for=qbnorm]").click()  # and back off with the mouse
    page.wait_for_function(
        "() => document.getElementById('results').dataset.qbnormApplied === 'false'"
    )
    assert "qbnorm=off" in page.url


def test_url_loads_the_same_results(
    page: Any, photos: list[dict[str, Any]], served: ServeProcess
) -> None:
    caption = photos[TARGET]["captions"][1]
    url = "/?" + urllib.parse.urlencode({"q": caption, "targets": "image"})
    page.goto(url)
    ids = _wait_results(page)
    assert page.get_by_label("Search text").input_value() == caption
    assert (
        page.get_by_role("checkbox", name="Images").is_checked()
        and not page.get_by_role("checkbox", name="Videos").is_checked()
    )
    assert ids and all(i.startswith("img:") for i in ids)
    assert f"img:{photos[TARGET]['image']}" in ids
    # the same answer the API gives with the page's defaults (20 results, QB-Norm default)
    api = served.client.post("/search", json={"text": caption, "targets": ["image"], "top_k": 20})
    assert ids == [h["id"] for h in api.json()["results"]]
    page.reload()
    assert _wait_results(page) == ids

    # min_score from the URL: the slider shows it and every result is at or above it
    page.goto(url + "&min_score=0.25&qbnorm=off")
    kept = _wait_results(page)
    assert page.get_by_role("slider", name="Minimum score").input_value() == "0.25"
    scores = page.eval_on_selector_all("#results li", "els => els.map(e => +e.dataset.score)")
    assert all(s >= 0.25 for s in scores) and len(kept) < len(ids)

    page.go_back()  # history: back to the earlier search
    assert _wait_results(page) == ids


def test_picture_upload_searches(page: Any, photos: list[dict[str, Any]]) -> None:
    target = photos[TARGET]
    page.goto("/?targets=image")
    page.wait_for_selector("body[data-ready=true]")
    page.get_by_label("Search with a picture or a video clip").set_input_files(str(target["path"]))
    ids = _wait_results(page)
    assert ids[0] == f"img:{target['image']}"  # the photo itself, first
    assert page.locator("#query-file-name").inner_text() == target["image"]
    first = page.locator("#results li").first
    assert float(first.get_attribute("data-raw-score")) > 0.99

    # texts: shown as text (the captions the worker stored)
    page.get_by_role("checkbox", name="Texts").check()
    page.get_by_role("checkbox", name="Images").uncheck()
    page.wait_for_function(
        "() => document.querySelectorAll('#results li.card-text').length > 0 && [...document"
        ".querySelectorAll('#results li')].every(l => l.dataset.modality === 'text')"
    )
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results blockquote')]"
        ".every(b => b.textContent !== '…')"
    )
    texts = page.eval_on_selector_all("#results blockquote", "els => els.map(e => e.textContent)")
    captions = {p["captions"][0] for p in photos[:N_PHOTOS]}
    assert texts and set(texts) <= captions


def test_video_card_shows_its_segment(page: Any) -> None:
    page.goto("/?" + urllib.parse.urlencode({"q": "a short video clip", "targets": "video"}))
    ids = _wait_results(page)
    assert ids == ["clip"]
    card = page.locator('#results li[data-id="clip"]')
    segment = card.locator(".segment").inner_text()
    assert "–" in segment  # "0:00–0:04": the matched segment's start–end
    assert _loaded_images(page) == 1  # its poster frame
    src = card.locator("img").get_attribute("src")
    assert src.startswith("/items/clip/thumbnail?at=")


def _serve_bytes(route: Any, body: bytes, content_type: str) -> None:
    """Answer a (range) request the way a media server would, so the video is seekable."""
    headers = {"Accept-Ranges": "bytes", "Content-Type": content_type}
    wanted = route.request.headers.get("range", "")
    if wanted.startswith("bytes="):
        first, _, last = wanted[6:].partition("-")
        a, b = int(first or 0), int(last) if last else len(body) - 1
        headers["Content-Range"] = f"bytes {a}-{b}/{len(body)}"
        route.fulfill(status=206, body=body[a : b + 1], headers=headers)
    else:
        route.fulfill(status=200, body=body, headers=headers)


def test_video_with_a_url_plays_from_the_segment_start(
    page: Any, served: ServeProcess, video_dir: Path
) -> None:
    """Originals are not kept; an item whose metadata has a ``url`` plays from there."""
    raw = (video_dir / "sample_demo_9.mp4").read_bytes()
    item = {
        "id": "clip-play",
        "modality": "video",
        "data": base64.b64encode(raw).decode(),
        "metadata": {"url": "/media/play.mp4"},
    }
    r = served.client.post("/ingest", json={"items": [item]})
    assert served.wait_job(r.json()["job_id"])["state"] == "done"
    segments = served.client.get("/items/clip-play").json()["segments"]
    assert len(segments) >= 2
    page.route("**/media/play.mp4", lambda route: _serve_bytes(route, raw, "video/mp4"))
    # search with the poster frame of a later segment that the API matches to that segment,
    # so the card's start is not 0
    frame, wanted = b"", None
    for i, seg in enumerate(segments[1:], start=1):
        frame = served.client.get(f"/items/clip-play/thumbnail?segment={i}").content
        files = {"file": ("f.jpg", frame, "image/jpeg")}
        hits = served.client.post("/search", files=files, data={"targets": "video"}).json()
        best = next(h for h in hits["results"] if h["id"] == "clip-play")
        if best["start"] == seg["start"]:
            wanted = seg["start"]
            break
    assert wanted is not None, "no later segment is its own poster's best match"
    page.goto("/?targets=video")
    page.wait_for_selector("body[data-ready=true]")
    page.get_by_label("Search with a picture or a video clip").set_input_files(
        {"name": "frame.jpg", "mimeType": "image/jpeg", "buffer": frame}
    )
    _wait_results(page)
    card = page.locator('#results li[data-id="clip-play"]')
    video = card.locator("video")
    start = float(card.get_attribute("data-start") or "nan")
    assert start == wanted > 0
    assert video.get_attribute("src").startswith(f"/media/play.mp4#t={start:g}")
    video.evaluate("v => new Promise(ok => v.readyState >= 1 ? ok() : v.onloadedmetadata = ok)")
    assert abs(video.evaluate("v => v.currentTime") - start) < 0.5
    assert served.client.delete("/items/clip-play").status_code == 200


def test_ingest_panel(
    page: Any,
    photos: list[dict[str, Any]],
    tmp_path: Path,
    served: ServeProcess,
    capsys: pytest.CaptureFixture[str],
) -> None:
    new = photos[N_PHOTOS]  # a dev photo not indexed yet
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    page.locator("#ingest-panel summary").click()
    page.get_by_label("Images, videos or .txt files to index").set_input_files(
        [str(new["path"]), str(corrupt)]
    )
    page.get_by_role("button", name="Index files").click()
    page.wait_for_function(
        "() => document.getElementById('ingest-status').textContent.startsWith('Done')",
        timeout=120_000,
    )
    status = page.locator("#ingest-status").inner_text()
    assert status == "Done: 1 of 2 indexed, 1 failed.", status
    progress = page.locator("#ingest-progress")
    assert progress.get_attribute("value") == progress.get_attribute("max") == "2"
    errors = page.locator("#ingest-errors li").all_inner_texts()
    assert len(errors) == 1 and errors[0].startswith("broken.jpg:")
    _shot(page, "ingest-panel", capsys)
    assert served.client.get(f"/items/{new['image']}").status_code == 200
    assert served.client.get(f"/items/{new['image']}/thumbnail").status_code == 200


def test_labels_and_focus_order(page: Any) -> None:
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    for name in ("Search text", "Images", "Videos", "Texts", "Minimum score", "Results"):
        assert page.get_by_label(name, exact=True).count() >= 1, name
    assert page.get_by_role("switch", name="QB-Norm").count() == 1
    assert page.get_by_role("search").count() == 1
    order = []
    for _ in range(10):
        page.keyboard.press("Tab")
        order.append(
            page.evaluate(
                "() => { const a = document.activeElement; return a.id || a.className || a.value; }"
            )
        )
    assert order[:9] == [
        "skip-link",
        "q",
        "search-button",
        "image",
        "video",
        "text",
        "qbnorm",
        "min-score-on",
        "top-k",  # the disabled slider is skipped
    ], order


def test_phone_width(
    browser: Any,
    served: ServeProcess,
    photos: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, base_url=served.url, is_mobile=True, has_touch=True
    )
    try:
        pg = context.new_page()
        pg.goto("/?" + urllib.parse.urlencode({"q": photos[TARGET]["captions"][1]}))
        ids = _wait_results(pg)
        assert ids
        overflow = pg.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"page is {overflow}px wider than the phone"
        box = pg.locator("#results li").first.bounding_box()
        assert box is not None and box["width"] < 390 / 2 + 10  # two columns
        _shot(pg, "search-phone", capsys)
    finally:
        context.close()


def test_key_dialog_when_reads_need_a_key(
    browser: Any, tmp_path: Path, photos: list[dict[str, Any]]
) -> None:
    server = ServeProcess(
        tmp_path / "data",
        tmp_path / "serve.log",
        XMODAL_MODEL__NAME="tiny-random",
        XMODAL_AUTH__READ_KEYS='["reader-key"]',
        XMODAL_AUTH__WRITE_KEYS='["writer-key"]',
    )
    context = browser.new_context(base_url=server.url)
    try:
        server.wait_ready(120)
        photo = photos[TARGET]
        item = {
            "id": "only",
            "modality": "image",
            "data": base64.b64encode(photo["path"].read_bytes()).decode(),
        }
        r = server.client.post(
            "/ingest", json={"items": [item]}, headers={"X-API-Key": "writer-key"}
        )
        assert r.status_code == 202, r.text
        assert (
            server.wait_job(r.json()["job_id"], headers={"X-API-Key": "reader-key"})["state"]
            == "done"
        )
        pg = context.new_page()
        pg.goto("/?q=a+dog&targets=image")
        dialog = pg.get_by_role("dialog", name="API key")
        dialog.wait_for()
        assert "needs an API key" in dialog.inner_text()
        dialog.get_by_label("Key").fill("wrong")
        dialog.get_by_role("button", name="Use this key").click()
        pg.wait_for_function(
            "() => document.getElementById('key-reason').textContent === 'invalid API key'"
        )
        dialog.get_by_label("Key").fill("reader-key")
        dialog.get_by_role("button", name="Use this key").click()
        assert _wait_results(pg) == ["only"]
        assert not dialog.is_visible()
        # <img src> cannot send the key: the page fetched the thumbnail with it (a blob: URL),
        # asynchronously, so wait until it is set rather than for the (src-less) img to settle
        pg.wait_for_function(
            "() => [...document.querySelectorAll('#results img')].some(i => i.naturalWidth > 0)"
        )
        assert _loaded_images(pg) == 1
        assert pg.locator("#results img").get_attribute("src").startswith("blob:")
    finally:
        context.close()
        server.stop()
