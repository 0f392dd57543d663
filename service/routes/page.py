"""The search page: ``GET /`` (service/static/index.html), its files under ``/static/``, and
``GET /ui/config``, what the page needs to know before its first call.

Plain HTML, CSS and JavaScript with no build step and nothing fetched from elsewhere (the page
works offline); it calls the REST API itself (``POST /search``, ``POST /ingest``,
``GET /jobs/{id}``, ``GET /items/{id}/thumbnail``).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse
from pydantic import BaseModel

from service.deps import State

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

# Only the page's own origin; blob: for thumbnails fetched with an API key; videos may play
# from wherever an item's metadata ``url`` points.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' blob: data:; media-src 'self' blob: http: https:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["page"])


class AuthInfo(BaseModel):
    """Which calls need an API key."""

    read: bool
    write: bool


class PageConfig(BaseModel):
    """GET /ui/config: what the search page adapts to."""

    auth: AuthInfo
    qbnorm_default: bool
    max_batch_items: int
    max_body_mb: float
    thumbnails: bool


def _static(name: str) -> FileResponse:
    path = STATIC_DIR / name
    # one plain file name of the static folder: no slashes, no dot files, nothing outside
    if "/" in name or "\\" in name or name.startswith(".") or not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no static file {name!r}")
    return FileResponse(path, headers=HEADERS)


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    """The search page."""
    return _static("index.html")


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> FileResponse:
    """The page's script, style sheet and icons."""
    return _static(name)


@router.get("/ui/config", response_model=PageConfig)
def page_config(state: State) -> PageConfig:
    """Whether reads/writes need a key, the QB-Norm default and the ingest limits; open."""
    # No secrets here (a 401 would tell as much); open, so the page can ask for a key first.
    settings = state.settings
    auth = settings.auth
    return PageConfig(
        auth=AuthInfo(read=bool(auth.read_keys), write=bool(auth.read_keys or auth.write_keys)),
        qbnorm_default=settings.qbnorm.mode != "off",
        max_batch_items=settings.ingest.max_batch_items,
        max_body_mb=settings.ingest.max_body_mb,
        thumbnails=settings.thumbnails.enabled,
    )
