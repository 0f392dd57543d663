"""Photos ``POST /ingest`` decoded to validate them, handed to the in-process worker.

The route must decode an uploaded photo to refuse a corrupt one at once (a 4xx, not a failed
item later). In embedded mode the worker that encodes it runs in the same process, so the
route keeps the decoded picture here, keyed by its content hash (sha256 of the bytes), and the
worker takes it instead of decoding the same bytes a second time.

Only a shortcut, never a second source of truth: the queue still holds every item's bytes,
so durability, redelivery and restarts are what they were. A miss (evicted, another process,
a restart, a redelivery, a second item with the same bytes) decodes the bytes as before, and
a hit is the picture that decode would give (the same function on the same bytes). Bounded:
at most ``max_bytes`` of decoded pixels, oldest out first; a photo over an eighth of that is
not kept (the route only verifies it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

from PIL import Image

__all__ = ["DecodedPhotos"]


def pixel_bytes(width: int, height: int) -> int:
    """Bytes of a decoded RGB picture of this size."""
    return 3 * width * height


class DecodedPhotos:
    """Decoded photos by content hash, at most ``max_bytes`` of pixels; thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._lock = threading.Lock()
        self._images: OrderedDict[str, Image.Image] = OrderedDict()
        self._bytes = 0

    def wants(self, width: int, height: int) -> bool:
        """Whether a photo of this size would be kept (so the route decodes it in full)."""
        return 0 < pixel_bytes(width, height) <= self.max_bytes // 8

    def put(self, digest: str, image: Image.Image) -> None:
        """Keep ``image`` (an RGB decode of the bytes whose sha256 is ``digest``)."""
        size = pixel_bytes(*image.size)
        if not self.wants(*image.size):
            return
        with self._lock:
            old = self._images.pop(digest, None)
            if old is not None:
                self._bytes -= pixel_bytes(*old.size)
            self._images[digest] = image
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._images.popitem(last=False)
                self._bytes -= pixel_bytes(*dropped.size)

    def take(self, digest: str) -> Image.Image | None:
        """The kept decode of ``digest``, removed from here; None when there is none."""
        with self._lock:
            image = self._images.pop(digest, None)
            if image is not None:
                self._bytes -= pixel_bytes(*image.size)
            return image

    def discard(self, digests: Iterable[str]) -> None:
        """Forget these (their request was refused or not queued)."""
        for digest in digests:
            self.take(digest)

    def __len__(self) -> int:
        return len(self._images)

    @property
    def nbytes(self) -> int:
        """Decoded pixels kept now."""
        return self._bytes
