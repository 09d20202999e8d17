"""Data: real tensors for completion and seeded entry masks."""

from .masks import Masks, make_masks, masks_from_record
from .tensors import DATASETS, TensorData, load_tensor, zscore

__all__ = ["DATASETS", "Masks", "TensorData", "load_tensor", "make_masks", "masks_from_record", "zscore"]
