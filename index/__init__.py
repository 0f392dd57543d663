"""xmodal.index: durable FAISS galleries, multi-vector items, QB-Norm and querybank stores.

Modules, lowest first: ``records`` (data types and knobs), ``log`` + ``snapshot`` (on-disk
formats), ``vector_index`` (FAISS + recall tuning), ``multivector`` (set-item search over
any gallery), ``gallery`` (the durable store), ``querybank`` and ``qbnorm`` (on top).
"""

from index.gallery import Gallery
from index.log import WriteAheadLog, atomic_write
from index.multivector import brute_force_multivector, search_multivector, set_similarity
from index.qbnorm import (
    QBNormalizer,
    QBNormConfig,
    dynamic_inverted_softmax,
    inverted_softmax,
)
from index.querybank import (
    FileQueryBankStore,
    QueryBank,
    QueryBankStore,
    RedisQueryBankStore,
)
from index.records import Candidates, GalleryConfig, Hit, Record
from index.vector_index import VectorIndex

__all__ = [
    "Candidates",
    "FileQueryBankStore",
    "Gallery",
    "GalleryConfig",
    "Hit",
    "QBNormConfig",
    "QBNormalizer",
    "QueryBank",
    "QueryBankStore",
    "Record",
    "RedisQueryBankStore",
    "VectorIndex",
    "WriteAheadLog",
    "atomic_write",
    "brute_force_multivector",
    "dynamic_inverted_softmax",
    "inverted_softmax",
    "search_multivector",
    "set_similarity",
]
