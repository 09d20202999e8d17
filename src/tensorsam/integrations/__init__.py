"""Integrations with other training frameworks.  ``tensorsam.integrations.hf``: the HuggingFace
Trainer (needs the ``hf`` extra; imported on its own, so ``import tensorsam`` stays light)."""
