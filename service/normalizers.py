"""Building and refreshing the QB-Norm normalisers of the visual galleries.

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

from service import metrics
from service.state import QBNORM_TARGETS, QUERYBANK_DIRECTION, ServiceState

logger = logging.getLogger(__name__)


def build_normalizers(state: ServiceState, force: bool = False) -> None:
    """QB-Norm normalisers for the visual galleries over the current text->visual bank.

    Rebuilt only when the bank version changed (or ``force``); no bank -> no normalisers.
    """
    if state.querybank is None or state.model is None:
        return
    with state.lock:
        bank = state.querybank.get(state.model_name, QUERYBANK_DIRECTION)
        current = next(iter(state.normalizers.values()), None)
        if bank is None or len(bank) == 0:
            for old in state.normalizers.values():
                old.detach()
            state.normalizers = {}
            return
        if not force and current is not None and current.bank_version == bank.version:
            return
        from index.qbnorm import QBNormalizer

        fresh = {
            m: QBNormalizer.from_bank(bank, state.settings.qbnorm).fit(state.galleries[m])
            for m in QBNORM_TARGETS
            if m in state.galleries
        }
        for old in state.normalizers.values():
            old.detach()
        state.normalizers = fresh
        logger.info("qbnorm: bank v%s (%d queries) fitted", bank.version, len(bank))


def bank_changed(state: ServiceState) -> bool:
    """Whether the store's bank version differs from the live normalisers' (cheap)."""
    if state.querybank is None:
        return False
    try:
        version = state.querybank.version(state.model_name, QUERYBANK_DIRECTION)
    except Exception:
        # store unreachable: keep serving the bank we have, and say so (querybank_stale)
        state.bank_stale = True
        metrics.QUERYBANK_STALE.set(1)
        raise
    state.bank_stale = False
    metrics.QUERYBANK_STALE.set(0)
    current = next(iter(state.normalizers.values()), None)
    have = current.bank_version if current is not None else None
    return version != have and bool(version or have)


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
                if forced or bank_changed(self.state):
                    build_normalizers(self.state, force=True)
            except Exception:  # noqa: BLE001 - keep serving with the normalisers we have
                logger.warning("qbnorm: refit failed", exc_info=True)
            with self._cond:
                self._done = max(self._done, target)
                self._cond.notify_all()


__all__ = ["Refresher", "bank_changed", "build_normalizers"]
