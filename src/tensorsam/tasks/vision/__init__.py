"""Vision (E4, E5): tensorized ResNets on image data under symmetric label noise."""

from tensorsam.tasks.vision.config import VisionConfig

__all__ = ["VisionConfig"]
