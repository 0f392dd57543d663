"""Shared by the deploy tests: is an ``XMODAL_*`` variable a real ``Settings`` field path?

``Settings`` forbids unknown top-level fields, but a typo in a nested name
(``XMODAL_WORKER__BATCHSIZE``) is silently ignored by pydantic-settings, so the deploy files
are checked field by field here.
"""

from __future__ import annotations

from pydantic import BaseModel

from service.settings import Settings


def unknown_xmodal_vars(env: dict[str, str]) -> list[str]:
    """The ``XMODAL_*`` names in ``env`` that name no ``Settings`` field."""
    bad = []
    for key in env:
        if not key.startswith("XMODAL_"):
            continue
        model: type[BaseModel] | None = Settings
        for part in key[len("XMODAL_") :].lower().split("__"):
            field = model.model_fields.get(part) if model is not None else None
            if field is None:
                bad.append(key)
                break
            annotation = field.annotation
            model = (
                annotation
                if isinstance(annotation, type) and issubclass(annotation, BaseModel)
                else None
            )
    return bad
