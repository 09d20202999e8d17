"""Tensor adapters as native peft tuners: FLoRA and LoRETTA (LoRA stays peft's own).

Importing this package registers both with peft (``peft.utils.register_peft_method``, after
adding ``FLORA`` and ``LORETTA`` to peft's ``PeftType`` enum with ``aenum``).  Import it before
``PeftModel.from_pretrained`` on a saved FLoRA/LoRETTA adapter, or peft will not know the type::

    import peft
    import tensorsam.adapters
    from tensorsam.adapters import FloraConfig, LorettaConfig

    model = peft.get_peft_model(base, FloraConfig(target_modules=["query", "value"], r=8, alpha=16))
    model.save_pretrained("out")                      # adapter weights and config only
    model = peft.PeftModel.from_pretrained(fresh_base, "out")
    merged = model.merge_and_unload()

``tensorsam.groups.scale_invariant_groups(model)`` gives one group per adapter: FLoRA's (A, G, B),
LoRETTA's TT cores of A and B together.  Needs the ``hf`` extra (peft, transformers, aenum).
"""

try:
    import peft  # noqa: F401
except ImportError as e:  # pragma: no cover
    raise ImportError("tensorsam.adapters needs peft, transformers and aenum: pip install 'tensorsam[hf]'") from e

from tensorsam.adapters.config import FloraConfig, LorettaConfig, TensorAdapterConfig
from tensorsam.adapters.layer import FloraLinear, LorettaLinear, TensorAdapterLayer
from tensorsam.adapters.model import FloraModel, LorettaModel
from tensorsam.adapters.peft_types import register as _register
from tensorsam.adapters.summary import adapter_summary, format_adapter_summary
from tensorsam.adapters.tt import (
    TensorTrain,
    default_tt_rank,
    flora_params,
    lora_params,
    loretta_params,
    loretta_shapes,
    tt_factors,
)

_register("flora", FloraConfig, FloraModel)
_register("loretta", LorettaConfig, LorettaModel)

__all__ = [
    "FloraConfig", "FloraLinear", "FloraModel", "LorettaConfig", "LorettaLinear", "LorettaModel",
    "TensorAdapterConfig", "TensorAdapterLayer", "TensorTrain", "adapter_summary", "default_tt_rank",
    "flora_params", "format_adapter_summary", "lora_params", "loretta_params", "loretta_shapes", "tt_factors",
]
