"""fw_fisher: Fisher-mask selective tuning (FISH) for fw (entry point ``fisher``)."""

from fw_fisher.fisher import empirical_fisher, top_k_indices
from fw_fisher.mask import SparseUpdate
from fw_fisher.method import FisherMask

__all__ = ["FisherMask", "SparseUpdate", "empirical_fisher", "top_k_indices"]
