"""POST /search: text, image, video, raw-vector or item-id queries across modalities.

The route parses the request (JSON or multipart upload) and answers; the search itself
(encode -> per-target search -> QB-Norm -> merge and page) is :mod:`service.search`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from service import media
from service.deps import ReadAccess, ReadyState
from service.schemas import SearchRequest, SearchResponse, error_responses
from service.search import SearchError, run_search
from service.state import ServiceState

logger = logging.getLogger(__name__)

router = APIRouter(tags=["search"])

_FORM_FIELDS = {
    "text",
    "item_id",
    "targets",
    "top_k",
    "offset",
    "qbnorm",
    "min_score",
    "min_probability",
    "filter",
}

_OPENAPI_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            # inlined: the route parses the body itself, so FastAPI does not register the model
            "application/json": {"schema": SearchRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "an image or video file to query with",
                        },
                        "targets": {"type": "string", "description": "comma-separated"},
                        "top_k": {"type": "integer"},
                        "offset": {"type": "integer"},
                        "qbnorm": {"type": "boolean"},
                        "min_score": {"type": "number"},
                        "min_probability": {"type": "number"},
                        "filter": {"type": "string", "description": "a JSON object"},
                    },
                }
            },
        },
    }
}


def _bad(message: str, code: int = status.HTTP_400_BAD_REQUEST) -> HTTPException:
    return HTTPException(code, message)


async def _parse_request(request: Request, state: ServiceState) -> tuple[SearchRequest, Any]:
    """The validated request and, for multipart uploads, ``(kind, bytes)`` of the file."""
    content_type = request.headers.get("content-type", "").lower()
    upload: tuple[str, bytes] | None = None
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=len(_FORM_FIELDS) + 1)
        raw: dict[str, Any] = {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):  # an UploadFile
                if upload is not None:
                    raise _bad("upload one file per search")
                data = await value.read()
                kind = _media_kind(data, getattr(value, "content_type", None))
                upload = (kind, data)
            elif key not in _FORM_FIELDS:
                raise _bad(f"unknown form field {key!r}")
            else:
                raw[key] = value
        if upload is not None and ("text" in raw or "item_id" in raw):
            raise _bad("give exactly one of a file, text, item_id")
        raw = _coerce_form(raw)
        if upload is not None:
            raw[upload[0]] = ""  # placeholder so the one-query rule sees the upload
    elif content_type.startswith("application/json") or not content_type:
        body = await request.body()
        if not body:
            raise _bad("empty request body: send a JSON search request")
        try:
            raw = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad(f"request body is not valid JSON: {exc}") from exc
        except RecursionError as exc:  # as /ingest (FastAPI's body parser) answers: 400
            raise _bad("request body is nested too deeply to parse") from exc
        if not isinstance(raw, dict):
            raise _bad("request body must be a JSON object")
    else:
        raise _bad(
            f"unsupported content type {content_type!r}: use application/json or "
            "multipart/form-data",
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        )
    try:
        req = SearchRequest.model_validate(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False), body=None) from exc
    if req.text is not None and upload is None:
        try:
            req.text = media.clean_text(req.text, state.settings.ingest.max_text_chars)
        except media.MediaError as exc:
            raise HTTPException(exc.status, f"text: {exc.message}") from exc
    return req, upload


def _coerce_form(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "targets":
            out[key] = [t.strip() for t in str(value).split(",") if t.strip()]
        elif key == "filter":
            try:
                out[key] = json.loads(value) if value else {}
            except ValueError as exc:
                raise _bad(f"filter is not a JSON object: {exc}") from exc
            except RecursionError as exc:
                raise _bad("filter is nested too deeply to parse") from exc
        elif key == "qbnorm" and str(value).lower() in ("", "null", "default"):
            out[key] = None
        else:
            out[key] = value  # pydantic coerces "10" -> 10, "true" -> True
    return out


def _media_kind(data: bytes, content_type: str | None) -> str:
    """'image' or 'video' for an uploaded file, by its declared type then its magic bytes."""
    if content_type and content_type.startswith("video/"):
        return "video"
    if content_type and content_type.startswith("image/"):
        return "image"
    head = data[:16]
    if (
        head[4:8] == b"ftyp"
        or head.startswith(b"\x1a\x45\xdf\xa3")
        or head[:4] == b"RIFF"
        and (data[8:12] == b"AVI ")
    ):
        return "video"
    return "image"


@router.post(
    "/search",
    response_model=SearchResponse,
    dependencies=[ReadAccess],
    openapi_extra=_OPENAPI_BODY,
    responses=error_responses(
        {
            400: "malformed request",
            404: "unknown item_id",
            413: "query media too large",
            415: "unsupported media",
            422: "invalid request",
            429: "overloaded; retry after Retry-After seconds",
            503: "not ready",
        }
    ),
)
async def search(request: Request, state: ReadyState) -> Response:
    """Search images, videos and texts with a text, image, video, vector or item id."""
    start = time.perf_counter()
    req, upload = await _parse_request(request, state)
    try:
        outcome = await run_search(state, req, upload)
    except SearchError as exc:
        raise HTTPException(exc.status, exc.message) from exc
    answer = SearchResponse(
        results=outcome.results,
        took_ms=round((time.perf_counter() - start) * 1000, 3),
        model=state.model_name,
        index_version=state.index_version(),
        querybank_version=state.serving_bank(outcome.bank)[1] if outcome.bank else None,
        qbnorm_applied=outcome.qbnorm_applied,
        querybank_stale=outcome.qbnorm_applied and state.bank_stale,
    )
    # Serialised once, by pydantic-core. Returned as a model, FastAPI would validate it again
    # and encode it twice more (jsonable_encoder, json.dumps); response_model still documents it.
    return Response(answer.model_dump_json(), media_type="application/json")
