"""GET and POST /querybank: the text->visual query bank that QB-Norm normalises with."""

from __future__ import annotations

import logging

from fastapi import APIRouter

from service import media
from service.deps import ReadAccess, ReadyState, WriteAccess
from service.schemas import QueryBankAppend, QueryBankResponse, error_responses

logger = logging.getLogger(__name__)

router = APIRouter(tags=["querybank"])


@router.get(
    "/querybank",
    response_model=QueryBankResponse,
    dependencies=[ReadAccess],
    responses=error_responses({503: "not ready"}),
)
async def get_querybank(state: ReadyState) -> QueryBankResponse:
    """Size and version of the serving model's text->visual bank."""
    size, version = await state.run(state.querybank_info)
    return QueryBankResponse(size=size, version=version or 0, model=state.model_name)


@router.post(
    "/querybank",
    response_model=QueryBankResponse,
    dependencies=[WriteAccess],
    responses=error_responses({422: "empty or over-long text", 503: "not ready"}),
)
async def append_querybank(body: QueryBankAppend, state: ReadyState) -> QueryBankResponse:
    """Append text queries (encoded with the serving model) to the text->visual bank."""
    max_chars = state.settings.ingest.max_text_chars
    texts = []
    for i, text in enumerate(body.texts):
        try:
            texts.append(media.clean_text(text, max_chars))
        except media.MediaError as exc:
            raise media.MediaError(f"texts[{i}]: {exc.message}", exc.status) from exc
    assert state.encoder is not None
    vectors = await state.encoder.encode_texts(texts)
    await state.run(state.append_querybank, vectors, texts)
    size, version = await state.run(state.querybank_info)
    logger.info("querybank: appended %d queries (size %d, version %s)", len(texts), size, version)
    return QueryBankResponse(size=size, version=version or 0, model=state.model_name)
