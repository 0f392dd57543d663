"""QB-Norm on out of the box: the model's shipped querybanks go into an empty store on start.

A model may ship its banks beside its weights (``models/weights/<model>.querybank-text.
safetensors``, ``...-image...``; :mod:`index.bankfile`). On start-up, :func:`seed_querybanks`
loads each one into the querybank store (the file store in embedded mode, Redis in distributed
mode: whatever :func:`service.backends.open_backends` opened) **only if that store never held a
bank for the model and modality** (:meth:`~index.querybank.QueryBankStore.seed`, atomic: of
several replicas starting at once one writes, the others find it there; a bank a user built or
deleted is left alone). A file encoded by another checkpoint (its weights hash differs from the
serving model's) is skipped with a warning. :func:`load_calibration` reads the model's shipped
score calibration (``<model>.calibration.json``, :mod:`index.calibration`) the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from index.bankfile import bank_filename, read_bank_file
from index.calibration import ScoreCalibration, calibration_filename
from index.querybank import BANK_DIRECTION, QueryBankStore, direction_of
from service.loading import model_weights_hash

logger = logging.getLogger(__name__)

__all__ = ["load_calibration", "seed_querybanks", "shipped_bank_dir"]


def shipped_bank_dir(configured: Path | None) -> Path:
    """Where shipped bank files are looked for: the configured folder, else the shipped model
    weights' folder (``models/weights``)."""
    if configured is not None:
        return Path(configured)
    from models.factory import WEIGHTS_DIR

    return WEIGHTS_DIR


def seed_querybanks(
    store: QueryBankStore, model: Any, bank_dir: Path | None = None
) -> dict[str, int | None]:
    """Seed every shipped bank of ``model`` into ``store`` where it has none.

    Returns modality -> the seeded version, or None where the store already had a bank (or
    the file was skipped); modalities without a shipped file are absent.
    """
    folder = shipped_bank_dir(bank_dir)
    name = str(model.name)
    out: dict[str, int | None] = {}
    for modality in BANK_DIRECTION:
        path = folder / bank_filename(name, modality)
        if not path.is_file():
            continue
        direction = direction_of(modality)
        if store.version(name, direction) != 0:  # cheap check first; seed() decides atomically
            out[modality] = None
            continue
        try:
            bank = read_bank_file(path)
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("querybank file %s unreadable, not seeded: %s", path, exc)
            out[modality] = None
            continue
        want = model_weights_hash(model)
        if bank.model != name or bank.modality != modality or bank.weights_hash != want:
            logger.warning(
                "querybank file %s was encoded by another checkpoint (model %s, weights %s; "
                "serving %s, weights %s): not seeded; rebuild it with `xmodal querybank ship`",
                path,
                bank.model,
                bank.weights_hash[:12],
                name,
                (want or "?")[:12],
            )
            out[modality] = None
            continue
        version = store.seed(name, direction, bank.vectors, bank.texts, bank.weights_hash)
        out[modality] = version
        if version is not None:
            logger.info(
                "querybank %s/%s seeded from %s (%d rows, %s)",
                name,
                modality,
                path.name,
                len(bank),
                bank.source,
            )
    return out


def load_calibration(model: Any, bank_dir: Path | None = None) -> ScoreCalibration | None:
    """The model's shipped score calibration (``<model>.calibration.json`` beside the banks),
    or None when there is none, or it belongs to other weights (warned)."""
    path = shipped_bank_dir(bank_dir) / calibration_filename(str(model.name))
    if not path.is_file():
        return None
    try:
        cal = ScoreCalibration.load(path)
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("score calibration %s unreadable, not used: %s", path, exc)
        return None
    if cal.model != model.name or cal.weights_hash != model_weights_hash(model):
        logger.warning("score calibration %s was fitted for other weights: not used", path)
        return None
    logger.info("score calibration %s loaded (%s)", path.name, ", ".join(cal.coefficients))
    return cal
