"""xmodal.index: durable FAISS galleries, multi-vector items, QB-Norm and querybank stores."""

from index.gallery import Candidates, Gallery, GalleryConfig, Hit, Record, VectorIndex
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
    open_querybank_store,
)

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
    "open_querybank_store",
    "search_multivector",
    "set_similarity",
]
