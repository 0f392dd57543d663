"""Building and refreshing the QB-Norm normalisers: one per (bank, gallery it normalises).

A search only reads ``state.normalizers``. Refits run on one background thread,
:class:`Refresher`: it compares the querybank store's version with the live normalisers' at
most every ``every_s`` seconds (the file store answers from a small version marker, Redis from
one key, so the check never reads the bank) and refits when another replica or
``xmodal querybank build`` changed the bank; ``refit_now()`` asks it for a refit and waits
(``POST /querybank`` uses it so its answer is already served with). Between refits each
normaliser follows its gallery's upserts/removes incrementally (gallery listener).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from index.querybank import direction_of
from service import metrics
from service.loading import model_weights_hash
from service.state import QBNORM_TARGETS, ServiceState

if TYPE_CHECKING:
    from index.qbnorm import QBNormalizer
    from index.querybank import QueryBank

logger = logging.getLogger(__name__)


def _usable(state: ServiceState, bank: QueryBank | None) -> bool:
    """Whether ``bank`` can normalise the serving model's searches: present, non-empty, of the
    model's vector shape, and encoded by these weights (a bank that records another weights
    hash is skipped with one warning per version)."""
    if bank is None or len(bank) == 0 or state.model is None:
        return False
    want_shape: tuple[int, ...] = (state.model.embed_dim,)
    if state.model.num_vectors > 1:
        want_shape = (state.model.num_vectors, state.model.embed_dim)
    problem = None
    if tuple(bank.vectors.shape[1:]) != want_shape:
        problem = (
            f"rows of shape {list(bank.vectors.shape[1:])}, the model's are {list(want_shape)}"
        )
    elif bank.weights_hash is not None:
        have = model_weights_hash(state.model)
        if have is not None and have != bank.weights_hash:
            problem = f"encoded by weights {bank.weights_hash[:12]}, serving {have[:12]}"
    if problem is None:
        return True
    if state.skipped_banks.get(bank.modality) != bank.version:
        state.skipped_banks[bank.modality] = bank.version  # warned once; not re-read
        logger.warning(
            "qbnorm: %s querybank v%d of %s skipped (%s); rebuild it with `xmodal querybank "
            "build --modality %s`",
            bank.modality,
            bank.version,
            state.model_name,
            problem,
            bank.modality,
        )
    return False


def _live_version(state: ServiceState, modality: str) -> int | None:
    current = next(iter(state.normalizers.get(modality, {}).values()), None)
    return current.bank_version if current is not None else None


def build_normalizers(
    state: ServiceState, force: bool = False, only: set[str] | None = None
) -> None:
    """QB-Norm normalisers of every bank (text, image, video queries) over the galleries it
    normalises (``QBNORM_TARGETS``), from the store's current banks.

    A bank is refitted only when its version changed (or ``force``); ``only`` limits the work
    to those bank modalities. No (usable) bank -> no normalisers for it.
    """
    if state.querybank is None or state.model is None:
        return
    with state.lock:
        fresh: dict[str, dict[str, QBNormalizer]] = dict(state.normalizers)
        for modality, targets in QBNORM_TARGETS.items():
            if only is not None and modality not in only:
                continue
            bank = state.querybank.get(state.model_name, direction_of(modality))
            old = fresh.pop(modality, {})
            if not _usable(state, bank):
                for n in old.values():
                    n.detach()
                continue
            assert bank is not None
            if not force and old and _live_version(state, modality) == bank.version:
                fresh[modality] = old
                continue
            from index.qbnorm import QBNormalizer

            fresh[modality] = {
                m: QBNormalizer.from_bank(bank, state.settings.qbnorm).fit(state.galleries[m])
                for m in targets
                if m in state.galleries
            }
            for n in old.values():
                n.detach()
            logger.info(
                "qbnorm: %s bank v%s (%d queries) fitted", modality, bank.version, len(bank)
            )
        state.normalizers = fresh


def changed_banks(state: ServiceState) -> set[str]:
    """Bank modalities whose store version differs from the live normalisers' (cheap: a
    version read per bank, never the bank itself)."""
    if state.querybank is None:
        return set()
    out = set()
    try:
        for modality in QBNORM_TARGETS:
            version = state.querybank.version(state.model_name, direction_of(modality))
            have = _live_version(state, modality)
            if state.skipped_banks.get(modality) == version:
                continue  # the version we skipped (another checkpoint's): nothing new
            if version != have and bool(version or have):
                out.add(modality)
    except Exception:
        # store unreachable: keep serving the bank we have, and say so (querybank_stale)
        state.bank_stale = True
        metrics.QUERYBANK_STALE.set(1)
        raise
    state.bank_stale = False
    metrics.QUERYBANK_STALE.set(0)
    return out


def bank_changed(state: ServiceState) -> bool:
    """Whether any bank's store version differs from the live normalisers' (cheap)."""
    return bool(changed_banks(state))


class Refresher:
    """One background thread that refits QB-Norm when the bank changed, off the request path."""

    def __init__(self, state: ServiceState, every_s: float = 1.0) -> None:
        self.state = state
        self.every_s = every_s
        self._cond = threading.Condition()
        self._requested = 0  # refits asked for (refit_now)
        self._done = 0  # refits asked for that have run
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="xmodal-qbnorm", daemon=True)

    def start(self) -> Refresher:
        self._thread.start()
        return self

    def refit_now(self, timeout: float = 60.0) -> bool:
        """Ask for a refit over the store's current bank and wait for it; False on timeout."""
        with self._cond:
            self._requested += 1
            target = self._requested
            self._cond.notify_all()
            return self._cond.wait_for(
                lambda: self._done >= target or self._stopping, timeout=timeout
            )

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._requested > self._done or self._stopping, timeout=self.every_s
                )
                if self._stopping:
                    return
                target = self._requested
                forced = target > self._done
            try:
                changed = changed_banks(self.state)
                if forced or changed:  # refit the banks whose version moved, only those
                    build_normalizers(self.state, only=None if forced else changed)
            except Exception:  # noqa: BLE001 - keep serving with the normalisers we have
                logger.warning("qbnorm: refit failed", exc_info=True)
            with self._cond:
                self._done = max(self._done, target)
                self._cond.notify_all()


__all__ = ["Refresher", "bank_changed", "build_normalizers", "changed_banks"]
