"""tensorsam: sharpness-aware training of tensorized models."""

__version__ = "0.1.0"
