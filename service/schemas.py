"""Request and response bodies of the HTTP API (the contract of issue #5).

Requests reject unknown fields (``extra="forbid"``) so a typo is a clear 422, not a silently
ignored knob. Limits that depend on settings (batch size, text length, media size) are checked
in the routes, where the settings are at hand.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from service.kinds import ItemState, JobState, Modality
from service.text_checks import check_encodable, check_text

# A query or item text: refused (422) when it has lone surrogates or nothing visible.
CheckedText = Annotated[str, AfterValidator(check_text)]
FilterValue = str | int | float | bool | None

# Ids are keys in the index, the queue, Redis and URLs (/items/{id}): no slashes, no spaces.
ITEM_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._:@+=-]{0,255}$"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- search ------------------------------------------------------------------------------------
_QUERY_KINDS = ("text", "image", "video", "vector", "item_id")


def _one_query_schema(schema: dict[str, Any]) -> None:
    """State the exactly-one-query rule (and visible text) in the schema (issue #15)."""
    branches = []
    for kind in _QUERY_KINDS:
        others = [{"required": [o]} for o in _QUERY_KINDS if o != kind]
        branch: dict[str, Any] = {"required": [kind], "not": {"anyOf": others}}
        if kind == "text":
            branch["properties"] = {"text": {"type": "string", "pattern": "[A-Za-z0-9]"}}
        elif kind == "item_id":
            branch["properties"] = {"item_id": {"type": "string", "minLength": 1}}
        branches.append(branch)
    schema["oneOf"] = branches


class SearchRequest(_Request):
    """POST /search: exactly one query (text, image, video, vector or item_id) plus options."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_query_schema)

    text: CheckedText | None = Field(None, description="a text query")
    image: str | None = Field(None, description="a base64-encoded image (JPEG, PNG, WebP...)")
    video: str | None = Field(None, description="a base64-encoded video (MP4, WebM...)")
    vector: list[float] | list[list[float]] | None = Field(
        None, description="a raw query embedding: [D] (or [K, D] for set models)"
    )
    item_id: str | None = Field(None, description="query with the vectors of an indexed item")
    targets: list[Modality] | None = Field(
        None,
        min_length=1,
        description="modalities to search; default: the other modalities for text/visual "
        "queries, all for vector and item_id queries",
    )
    top_k: int = Field(10, ge=1, le=1000)
    offset: int = Field(0, ge=0, le=10_000)
    qbnorm: bool | None = Field(
        None, description="apply QB-Norm: true, false, or null for the server default"
    )
    min_score: float | None = Field(
        None,
        allow_inf_nan=False,
        description="drop results whose `score` (QB-Norm-normalised when applied) is below",
    )
    min_probability: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="drop results whose calibrated `probability` is below (or null: results "
        "QB-Norm did not normalise, or a model without a shipped calibration)",
    )
    filter: dict[str, FilterValue] = Field(
        default_factory=dict, description="equality filter on item metadata"
    )

    @field_validator("filter")
    @classmethod
    def _valid_filter(cls, flt: dict[str, FilterValue]) -> dict[str, FilterValue]:
        return check_encodable(flt, "filter")  # type: ignore[no-any-return]

    @field_validator("vector")
    @classmethod
    def _rectangular(
        cls, vector: list[float] | list[list[float]] | None
    ) -> list[float] | list[list[float]] | None:
        if vector and isinstance(vector[0], list):
            lengths = {len(row) for row in vector if isinstance(row, list)}
            if len(lengths) > 1:
                raise ValueError(f"vector rows differ in length ({sorted(lengths)})")
        return vector

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        given = [
            name
            for name in ("text", "image", "video", "vector", "item_id")
            if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of text, image, video, vector, item_id"
                + (f" (got {', '.join(given)})" if given else " (got none)")
            )
        if self.targets is not None and len(set(self.targets)) != len(self.targets):
            raise ValueError("targets must not repeat a modality")
        return self

    @property
    def query_kind(self) -> str:
        """Which field holds the query."""
        for name in ("text", "image", "video", "vector", "item_id"):
            if getattr(self, name) is not None:
                return name
        raise AssertionError("validated request has a query")


class SearchResult(BaseModel):
    """One hit."""

    id: str
    modality: Modality
    score: float = Field(description="QB-Norm-normalised score when applied, else raw_score")
    raw_score: float = Field(description="cosine (or Smooth-Chamfer for set models)")
    probability: float | None = Field(
        None,
        description="calibrated P(this is a right answer) from raw score, QB-Norm score and the "
        "margin to the next hit (a per-model logistic fit on dev); the same meaning for every "
        "query. Null when QB-Norm did not normalise the hit or the model ships no calibration",
    )
    metadata: dict[str, Any] = Field(default_factory=dict)
    start: float | None = Field(None, description="videos: best segment start, seconds")
    end: float | None = Field(None, description="videos: best segment end, seconds")


class SearchResponse(BaseModel):
    """POST /search answer."""

    results: list[SearchResult]
    took_ms: float
    model: str
    index_version: int
    querybank_version: int | None
    qbnorm_applied: bool
    querybank_stale: bool = Field(
        False,
        description="QB-Norm used the cached bank because the querybank store was unreachable "
        "(the bank may be out of date)",
    )


# --- ingest ------------------------------------------------------------------------------------
_VISIBLE_TEXT: dict[str, Any] = {"type": "string", "minLength": 1, "pattern": "[A-Za-z0-9]"}


def _one_source_schema(schema: dict[str, Any]) -> None:
    """State the rule the validator enforces, so clients and fuzzers can see it: exactly one
    of ``data``/``text``/``path``, ``text`` only for text items, visible text."""
    only = {
        "text": {"not": {"anyOf": [{"required": ["data"]}, {"required": ["path"]}]}},
        "data": {"not": {"anyOf": [{"required": ["text"]}, {"required": ["path"]}]}},
        "path": {"not": {"anyOf": [{"required": ["text"]}, {"required": ["data"]}]}},
    }
    schema["oneOf"] = [
        {
            "required": ["text"],
            "properties": {"modality": {"const": "text"}, "text": _VISIBLE_TEXT},
            **only["text"],
        },
        {
            "required": ["data"],
            "properties": {
                "modality": {"enum": ["image", "video"]},
                "data": {"type": "string", "minLength": 4},
            },
            **only["data"],
        },
        {
            "required": ["path"],
            "properties": {"path": {"type": "string", "minLength": 1, "maxLength": 4096}},
            **only["path"],
        },
    ]


class IngestItem(_Request):
    """One item to index: an image/video (base64 ``data`` or ``path``) or a ``text``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_source_schema)

    id: str = Field(pattern=ITEM_ID_PATTERN, description="stable id; re-ingesting replaces")
    modality: Modality
    data: str | None = Field(None, description="base64 media bytes (image, video)")
    text: CheckedText | None = Field(None, description="the text of a text item")
    path: str | None = Field(None, description="a file under the server's media root")
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _valid_metadata(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        return check_encodable(metadata, "metadata")  # type: ignore[no-any-return]

    @model_validator(mode="after")
    def _one_source(self) -> IngestItem:
        sources = [n for n in ("data", "text", "path") if getattr(self, n) is not None]
        if len(sources) != 1:
            raise ValueError(f"item {self.id!r}: give exactly one of data, text, path")
        if self.modality == "text" and self.text is None and self.path is None:
            raise ValueError(f"item {self.id!r}: a text item needs `text` (or a `path`)")
        if self.modality != "text" and self.text is not None:
            raise ValueError(f"item {self.id!r}: `text` is only for modality 'text'")
        return self


class IngestRequest(_Request):
    """POST /ingest: a batch of items."""

    items: list[IngestItem] = Field(min_length=1)

    @field_validator("items")
    @classmethod
    def _unique_ids(cls, items: list[IngestItem]) -> list[IngestItem]:
        seen: set[str] = set()
        for item in items:
            if item.id in seen:
                raise ValueError(f"duplicate item id {item.id!r} in one batch")
            seen.add(item.id)
        return items


class IngestResponse(BaseModel):
    """202 answer: the batch is durably queued."""

    job_id: str
    accepted: int


class JobItem(BaseModel):
    """State of one item of a job."""

    id: str
    state: ItemState
    error: str | None = None


class JobResponse(BaseModel):
    """GET /jobs/{job_id} answer."""

    job_id: str
    state: JobState
    items: list[JobItem]
    live_workers: int | None = Field(
        None, description="ingest workers alive now (Redis mode); null when embedded"
    )
    detail: str | None = Field(
        None, description="why the job is not progressing, e.g. no live worker"
    )


# --- items -------------------------------------------------------------------------------------
class Segment(BaseModel):
    """A video segment in seconds."""

    start: float
    end: float


class ItemResponse(BaseModel):
    """GET /items/{id}: an indexed (searchable) item."""

    id: str
    modality: Modality
    metadata: dict[str, Any] = Field(default_factory=dict)
    content_hash: str
    num_vectors: int
    segments: list[Segment] | None = None


class DeleteResponse(BaseModel):
    """DELETE /items/{id} answer."""

    id: str
    deleted: bool
    modalities: list[Modality]


# --- querybank ---------------------------------------------------------------------------------
class QueryBankAppend(_Request):
    """POST /querybank: text queries to append to the text->visual bank."""

    texts: list[str] = Field(min_length=1, max_length=10_000)

    @field_validator("texts")
    @classmethod
    def _valid_texts(cls, texts: list[str]) -> list[str]:
        for i, text in enumerate(texts):
            try:
                check_text(text)
            except ValueError as exc:
                raise ValueError(f"texts[{i}]: {exc}") from None
        return texts


class QueryBankResponse(BaseModel):
    """GET/POST /querybank answer."""

    size: int
    version: int
    model: str


# --- health ------------------------------------------------------------------------------------
class HealthResponse(BaseModel):
    """GET /healthz."""

    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    """GET /readyz: readiness and what it depends on."""

    ready: bool
    checks: dict[str, bool]
    detail: str | None = None
    workers: list[str] | None = Field(
        None, description="live ingest workers (Redis mode, by heartbeat); null when embedded"
    )


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer."""

    error: str
    detail: Any = None
    request_id: str | None = None


def error_responses(codes: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route's error statuses, all with the ErrorResponse body."""
    return {code: {"model": ErrorResponse, "description": text} for code, text in codes.items()}
