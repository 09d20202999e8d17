"""Data: real tensors for completion, seeded entry masks, image classification data, and WordNet
glosses (45-class text classification)."""

from .images import (
    IMAGE_DATASETS,
    ChannelNorm,
    ImageData,
    augment,
    load_cifar10,
    load_digits,
    load_fashion_mnist,
    load_images,
    read_idx,
)
from .masks import Masks, make_masks, masks_from_record
from .noise import NoisyLabels, labels_sha256, stratified_split, symmetric_label_noise
from .tensors import DATASETS, TensorData, load_tensor, zscore
from .wordnet import LEXNAMES, TextSplit, WordNetGlosses, load_wordnet_glosses, read_glosses

__all__ = [
    "DATASETS",
    "IMAGE_DATASETS",
    "LEXNAMES",
    "ChannelNorm",
    "ImageData",
    "Masks",
    "NoisyLabels",
    "TensorData",
    "TextSplit",
    "WordNetGlosses",
    "augment",
    "labels_sha256",
    "load_cifar10",
    "load_digits",
    "load_fashion_mnist",
    "load_images",
    "load_tensor",
    "load_wordnet_glosses",
    "make_masks",
    "masks_from_record",
    "read_glosses",
    "read_idx",
    "stratified_split",
    "symmetric_label_noise",
    "zscore",
]
