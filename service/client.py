"""A Python client for the xmodal HTTP API (what ``xmodal ingest``/``search``/... use).

    from service.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as xm:
        report = xm.ingest([{"id": "dog", "modality": "image", "data": Path("dog.jpg")}])
        hits = xm.search(text="a dog on the beach", top_k=5)

- ``ingest`` splits the items into batches under the server's limits (``GET /limits``: items per
  request and body bytes), sends them, and with ``wait=True`` follows the jobs to the end
  (a tqdm progress bar with ``progress=True``). A batch the server refuses because of one item
  (``item 'x': corrupt image``) is resent without that item, which is reported as failed with
  the server's reason; nothing else in the batch is lost.
- 429 and 503 answers are retried after their ``Retry-After`` (bounded by ``max_wait_s``).
- Every other error is raised as a typed :class:`XmodalError` subclass carrying the server's
  message, status and request id.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_MAX_ITEMS = 256  # the server's defaults, used when it cannot tell us (old server)
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
BODY_MARGIN = 0.9  # fill a request to at most this share of the server's body cap
_ITEM_IN_MESSAGE = re.compile(r"^item '((?:[^'\\]|\\.)*)': (.*)$", re.S)


# ---------------------------------------------------------------------------------- errors


class XmodalError(Exception):
    """An error answer of the API: ``status``, the server's ``message``, ``detail``, request id."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        detail: Any = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{status} {message}" if status else message)
        self.message = message
        self.status = status
        self.detail = detail
        self.request_id = request_id


class Unreachable(XmodalError):
    """No answer at all (connection refused, DNS, timeout)."""


class BadRequest(XmodalError):
    """400: malformed request."""


class Unauthorized(XmodalError):
    """401/403: missing, invalid or read-only API key."""


class NotFound(XmodalError):
    """404: unknown job, item or route."""


class Conflict(XmodalError):
    """409: the operation conflicts with the server's state."""


class TooLarge(XmodalError):
    """413: batch, body or media over the server's limits."""


class UnsupportedMedia(XmodalError):
    """415: a media format the server cannot decode."""


class InvalidRequest(XmodalError):
    """422: invalid item or query (corrupt media, empty text, bad field)."""


class Overloaded(XmodalError):
    """429 after the retries ran out."""


class NotReady(XmodalError):
    """503 after the retries ran out (still loading, or a dependency is down)."""


class ServerError(XmodalError):
    """5xx: a bug or outage on the server."""


_BY_STATUS: dict[int, type[XmodalError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    415: UnsupportedMedia,
    422: InvalidRequest,
    429: Overloaded,
    503: NotReady,
}


def error_from_response(response: httpx.Response) -> XmodalError:
    """The typed error for an error answer, with the server's message."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message = response.reason_phrase or "error"
    detail: Any = None
    request_id = response.headers.get("x-request-id")
    if isinstance(body, dict):
        detail = body.get("detail")
        message = str(body.get("error") or message)
        request_id = body.get("request_id") or request_id
    elif response.text:
        message = response.text[:500]
    cls = _BY_STATUS.get(response.status_code)
    if cls is None:
        cls = ServerError if response.status_code >= 500 else XmodalError
    return cls(message, response.status_code, detail, request_id)


# ---------------------------------------------------------------------------------- results


@dataclass
class Limits:
    """What one ``POST /ingest`` may carry."""

    max_batch_items: int = DEFAULT_MAX_ITEMS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_text_chars: int = 2_000


@dataclass
class IngestReport:
    """The outcome of :meth:`Client.ingest`."""

    indexed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # item id -> reason
    pending: list[str] = field(default_factory=list)  # not terminal (wait=False, or timed out)
    jobs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.pending


def _item_payload(item: Mapping[str, Any]) -> dict[str, Any]:
    """An item as the API wants it: ``data`` bytes (or a Path to read) become base64."""
    out = {k: v for k, v in item.items() if v is not None}
    data = out.get("data")
    if isinstance(data, Path):
        data = data.read_bytes()
    if isinstance(data, (bytes, bytearray, memoryview)):
        out["data"] = base64.b64encode(bytes(data)).decode("ascii")
    return out


def _size(payload: Mapping[str, Any]) -> int:
    return len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()) + 1


def split_batches(
    payloads: Iterable[dict[str, Any]], limits: Limits
) -> Iterator[list[dict[str, Any]]]:
    """Group item payloads into requests under both the item-count and the body-size cap.

    An item alone over the body cap is still sent alone (the server answers 413 for it,
    which :meth:`Client.ingest` reports as that item's failure).
    """
    budget = int(limits.max_body_bytes * BODY_MARGIN) - 64  # the {"items":[...]} envelope
    batch: list[dict[str, Any]] = []
    used = 0
    for p in payloads:
        n = _size(p)
        if batch and (len(batch) >= limits.max_batch_items or used + n > budget):
            yield batch
            batch, used = [], 0
        batch.append(p)
        used += n
    if batch:
        yield batch


def _blamed_item(err: XmodalError, batch: Sequence[Mapping[str, Any]]) -> int | None:
    """Which item of ``batch`` the server refused it for, when the answer says."""
    m = _ITEM_IN_MESSAGE.match(err.message or "")
    if m:
        item_id = m.group(1)
        for i, p in enumerate(batch):
            if p.get("id") == item_id:
                return i
    if isinstance(err.detail, list):  # a 422 validation error: loc = ["body", "items", i, ...]
        for d in err.detail:
            loc = d.get("loc", []) if isinstance(d, dict) else []
            for a, b in zip(loc, loc[1:], strict=False):
                if a == "items" and isinstance(b, int) and 0 <= b < len(batch):
                    return b
    return None


# ---------------------------------------------------------------------------------- client


class Client:
    """A synchronous client of one xmodal service.

    Args:
        url: the service's base URL.
        api_key: sent as ``Authorization: Bearer <key>`` when given.
        timeout: seconds per request.
        retries: how many times a 429/503 (or a refused connection) is retried.
        max_wait_s: the longest single wait, whatever ``Retry-After`` says.
        transport: an httpx transport for the default client.
        http: an httpx.Client to use as is (e.g. a FastAPI TestClient around the app).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        retries: int = 8,
        max_wait_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.retries, self.max_wait_s = retries, max_wait_s
        self._http = http or httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )
        if http is not None:
            self._http.headers.update(headers)
        self._limits: Limits | None = None
        self.sleep: Callable[[float], None] = time.sleep

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transport ---------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call with the retry policy; returns a 2xx response or raises a typed error."""
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt >= self.retries or not isinstance(exc, httpx.ConnectError):
                    raise Unreachable(f"{self.url}{path}: {exc}") from exc
                self.sleep(min(2.0**attempt * 0.25, self.max_wait_s))
                attempt += 1
                continue
            if response.status_code in (429, 503) and attempt < self.retries:
                self.sleep(self._retry_after(response, attempt))
                attempt += 1
                continue
            if response.status_code >= 400:
                raise error_from_response(response)
            return response

    def _retry_after(self, response: httpx.Response, attempt: int) -> float:
        raw = response.headers.get("retry-after")
        try:
            wait = float(raw) if raw is not None else 2.0**attempt * 0.5
        except ValueError:
            wait = 2.0**attempt * 0.5
        return max(0.0, min(wait, self.max_wait_s))

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs).json()

    # ---- service -----------------------------------------------------------------------

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until ``/readyz`` answers 200 (raises NotReady after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise NotReady(f"{self.url} not ready after {timeout:g} s", 503)
            self.sleep(0.5)

    def limits(self) -> Limits:
        """The server's ingest limits (``GET /limits``), defaults for a server without it."""
        if self._limits is None:
            try:
                body = self.get("/limits")
                self._limits = Limits(
                    max_batch_items=int(body["max_batch_items"]),
                    max_body_bytes=int(body["max_body_bytes"]),
                    max_text_chars=int(body.get("max_text_chars", 2_000)),
                )
            except NotFound:
                self._limits = Limits()
        return self._limits

    # ---- search ------------------------------------------------------------------------

    def search(
        self,
        text: str | None = None,
        *,
        image: bytes | Path | None = None,
        video: bytes | Path | None = None,
        item_id: str | None = None,
        vector: Sequence[float] | None = None,
        targets: Sequence[str] | None = None,
        top_k: int = 10,
        offset: int = 0,
        qbnorm: bool | None = None,
        min_score: float | None = None,
        filter: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``POST /search`` with one query; returns the response body (``results`` etc.)."""
        body: dict[str, Any] = {"top_k": top_k, "offset": offset}
        for name, media in (("image", image), ("video", video)):
            if media is not None:
                raw = media.read_bytes() if isinstance(media, Path) else bytes(media)
                body[name] = base64.b64encode(raw).decode("ascii")
        if text is not None:
            body["text"] = text
        if item_id is not None:
            body["item_id"] = item_id
        if vector is not None:
            body["vector"] = list(vector)
        if targets:
            body["targets"] = list(targets)
        if qbnorm is not None:
            body["qbnorm"] = qbnorm
        if min_score is not None:
            body["min_score"] = min_score
        if filter:
            body["filter"] = dict(filter)
        return self.post("/search", json=body)  # type: ignore[no-any-return]

    # ---- items -------------------------------------------------------------------------

    def item(self, item_id: str) -> dict[str, Any] | None:
        try:
            return self.get(f"/items/{item_id}")  # type: ignore[no-any-return]
        except NotFound:
            return None

    def content_hashes(self, ids: Sequence[str]) -> dict[str, str]:
        """``{id: content_hash}`` of those ``ids`` that are indexed (``POST /items/hashes``)."""
        out: dict[str, str] = {}
        for start in range(0, len(ids), 1000):
            body = self.post("/items/hashes", json={"ids": list(ids[start : start + 1000])})
            out.update(body["hashes"])
        return out

    def delete(self, item_id: str) -> dict[str, Any]:
        return self.request("DELETE", f"/items/{item_id}").json()  # type: ignore[no-any-return]

    # ---- ingest and jobs ---------------------------------------------------------------

    def submit(self, items: Sequence[Mapping[str, Any]]) -> str:
        """One ``POST /ingest`` (no splitting); returns the job id."""
        body = self.post("/ingest", json={"items": [_item_payload(i) for i in items]})
        return str(body["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get(f"/jobs/{job_id}")  # type: ignore[no-any-return]

    def jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        """The most recent jobs, newest first (``GET /jobs``)."""
        return list(self.get("/jobs", params={"limit": limit})["jobs"])

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        return list(self.get("/dead-letters", params={"limit": limit})["dead_letters"])

    def requeue(self, ids: Sequence[str] | None = None) -> dict[str, Any]:
        """Re-queue dead letters (by message id; all when ``ids`` is None)."""
        body = {"ids": list(ids)} if ids is not None else {"all": True}
        return self.post("/dead-letters/requeue", json=body)  # type: ignore[no-any-return]

    def snapshot(self, dest: Path) -> dict[str, Any]:
        """Download a consistent snapshot of the service (``POST /snapshots``) into ``dest``."""
        import tarfile

        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        tmp = dest / ".download.tar"
        try:
            with self._http.stream("POST", "/snapshots") as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_from_response(response)
                with tmp.open("wb") as f:
                    for chunk in response.iter_bytes(1 << 20):
                        f.write(chunk)
            with tarfile.open(tmp, mode="r") as tar:
                for member in tar.getmembers():
                    if (
                        not (member.isfile() or member.isdir())
                        or member.name.startswith(("/", ".."))
                        or ".." in Path(member.name).parts
                    ):
                        raise XmodalError(f"unsafe entry in the snapshot: {member.name!r}")
                tar.extractall(dest)  # noqa: S202 - every member checked above
        finally:
            tmp.unlink(missing_ok=True)
        return json.loads((dest / "manifest.json").read_text())  # type: ignore[no-any-return]

    def ingest(
        self,
        items: Iterable[Mapping[str, Any]],
        *,
        wait: bool = True,
        progress: bool = True,
        total: int | None = None,
        timeout: float | None = None,
        poll_s: float = 0.5,
    ) -> IngestReport:
        """Send ``items`` in batches under the server's limits; with ``wait``, follow the jobs.

        Items are dicts like the API's (``id``, ``modality``, ``data``/``text``/``path``,
        ``metadata``); ``data`` may be bytes or a Path. Items the server refuses are reported
        in ``failed`` with its reason; the rest of their batch is resent without them.
        """
        from tqdm import tqdm

        limits = self.limits()
        report = IngestReport()
        open_jobs: dict[str, set[str]] = {}  # job -> its item ids not terminal yet
        bar = tqdm(total=total, unit="item", disable=not progress, dynamic_ncols=True)
        last_poll = 0.0

        def poll(block: bool) -> None:
            nonlocal last_poll
            deadline = None if timeout is None else time.monotonic() + timeout
            while open_jobs:
                for job_id in list(open_jobs):
                    job = self.job(job_id)
                    for it in job["items"]:
                        if it["id"] not in open_jobs[job_id] or it["state"] not in (
                            "indexed",
                            "failed",
                        ):
                            continue
                        open_jobs[job_id].discard(it["id"])
                        if it["state"] == "indexed":
                            report.indexed.append(it["id"])
                        else:
                            report.failed[it["id"]] = it.get("error") or "failed"
                        bar.update(1)
                    if not open_jobs[job_id]:
                        del open_jobs[job_id]
                last_poll = time.monotonic()
                bar.set_postfix(failed=len(report.failed), refresh=False)
                if not block or (deadline is not None and time.monotonic() > deadline):
                    return
                if open_jobs:
                    self.sleep(poll_s)

        payloads = (_item_payload(i) for i in items)
        try:
            for batch in split_batches(payloads, limits):
                for job_id, ids in self._send(batch, report, bar):
                    report.jobs.append(job_id)
                    if wait:
                        open_jobs[job_id] = set(ids)
                    else:
                        report.pending.extend(ids)
                        bar.update(len(ids))
                if wait and time.monotonic() - last_poll > 1.0:
                    poll(block=False)
            if wait:
                poll(block=True)
        finally:
            bar.close()
        for left in open_jobs.values():
            report.pending.extend(sorted(left))
        return report

    def _send(
        self, batch: list[dict[str, Any]], report: IngestReport, bar: Any
    ) -> list[tuple[str, list[str]]]:
        """POST one batch, dropping (and reporting) the items the server blames for a 4xx."""
        batch = list(batch)
        while batch:
            try:
                body = self.post("/ingest", json={"items": batch})
            except (BadRequest, TooLarge, UnsupportedMedia, InvalidRequest) as exc:
                if len(batch) == 1:
                    bad = 0
                else:
                    found = _blamed_item(exc, batch)
                    if found is None:  # cannot tell which: send one by one
                        out: list[tuple[str, list[str]]] = []
                        for p in batch:
                            out += self._send([p], report, bar)
                        return out
                    bad = found
                item = batch.pop(bad)
                m = _ITEM_IN_MESSAGE.match(exc.message or "")
                report.failed[str(item.get("id"))] = m.group(2) if m else exc.message
                bar.update(1)
                continue
            return [(str(body["job_id"]), [str(p["id"]) for p in batch])]
        return []


__all__ = [
    "BadRequest",
    "Client",
    "Conflict",
    "IngestReport",
    "InvalidRequest",
    "Limits",
    "NotFound",
    "NotReady",
    "Overloaded",
    "ServerError",
    "TooLarge",
    "Unauthorized",
    "Unreachable",
    "UnsupportedMedia",
    "XmodalError",
    "error_from_response",
    "split_batches",
]
