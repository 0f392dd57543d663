"""xmodal.index: durable FAISS galleries, multi-vector items, QB-Norm and querybank stores."""

from index.gallery import Gallery, GalleryConfig, Hit, Record, VectorIndex
from index.log import WriteAheadLog, atomic_write

__all__ = [
    "Gallery",
    "GalleryConfig",
    "Hit",
    "Record",
    "VectorIndex",
    "WriteAheadLog",
    "atomic_write",
]
