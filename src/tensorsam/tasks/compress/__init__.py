"""Compress (E6): compress a trained dense ResNet to a budget, then fine-tune it with SGD, SAM, DAS, ..."""

from tensorsam.tasks.compress.config import CompressConfig

__all__ = ["CompressConfig"]
