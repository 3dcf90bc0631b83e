"""FAISS side of the system: needs only numpy and faiss."""
from .dups import DuplicateTable, JoinedDuplicates, duplicate_share
from .rows import exact_topk, mapped_rows, recall_at_k, release_pages, rerank, take_rows
from .segmented import SegmentedIndex, merge_topk
from .store import VectorIndex, choose_factory
from .vote import class_shares, class_sums, knn_vote, normalise_rows, prototypes, vote_weights

__all__ = ["VectorIndex", "SegmentedIndex", "merge_topk", "choose_factory", "recall_at_k", "rerank", "take_rows",
           "mapped_rows", "release_pages", "exact_topk", "knn_vote", "vote_weights", "class_shares", "normalise_rows",
           "class_sums", "prototypes",
           "DuplicateTable", "JoinedDuplicates", "duplicate_share"]
