"""The service's closed vocabularies, defined once: modalities, item states, job states.

Settings, API schemas, the job stores and the worker all import these; nothing here imports
anything of the service.
"""

from __future__ import annotations

from typing import Literal, get_args

Modality = Literal["image", "video", "text"]
MODALITIES: tuple[Modality, ...] = get_args(Modality)

ItemState = Literal["queued", "encoding", "indexed", "failed"]
ITEM_STATES: tuple[ItemState, ...] = get_args(ItemState)
TERMINAL_STATES: frozenset[ItemState] = frozenset({"indexed", "failed"})

JobState = Literal["queued", "running", "done", "failed"]

__all__ = ["ITEM_STATES", "MODALITIES", "TERMINAL_STATES", "ItemState", "JobState", "Modality"]
