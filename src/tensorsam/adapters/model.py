"""FLoRA and LoRETTA tuners: peft ``BaseTuner`` subclasses that find targets and swap in the layers.

peft's ``BaseTuner`` does the matching (``target_modules`` as a list of names/suffixes, a regex
or ``"all-linear"``; ``exclude_modules``; ``layers_to_transform``), freezing, merge/unload and
adapter bookkeeping; a tuner only creates and replaces layers.  We add one check peft's LoRA
lacks: every listed target must match some module.
"""

from __future__ import annotations

import re

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from tensorsam.adapters.layer import FloraLinear, LorettaLinear, TensorAdapterLayer


def check_targets(config, model: nn.Module) -> None:
    """Refuse ``target_modules`` entries that name no module of ``model`` (before any injection)."""
    targets = config.target_modules
    if targets is None or (isinstance(targets, str) and targets.lower() == "all-linear"):
        return
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            raise ValueError(f"target_modules regex {targets!r} matches no module of {type(model).__name__}"
                             f"; linear modules are e.g. {_linear_suffixes(model)}")
        return
    missing = sorted(t for t in targets if not any(n == t or n.endswith("." + t) for n in names))
    if missing:
        raise ValueError(f"target_modules {missing} match no module of {type(model).__name__} (by name or "
                         f"suffix); its linear modules end in {_linear_suffixes(model)}")


def _linear_suffixes(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})[:20]


class _TensorAdapterModel(BaseTuner):
    prefix: str
    tuner_layer_cls: type[TensorAdapterLayer]
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        check_targets(peft_config, model)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key=None,
                            **optional_kwargs) -> None:
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, peft_config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__}: module {current_key or target_name!r} is a "
                            f"{type(base).__name__}; only torch.nn.Linear layers can be adapted")
        new = self.tuner_layer_cls(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)   # an added adapter is not trainable until set active
        self._replace_module(parent, target_name, new, target)


class FloraModel(_TensorAdapterModel):
    """FLoRA tuner (``peft.get_peft_model(model, FloraConfig(...))``)."""

    prefix = "flora_"
    tuner_layer_cls = FloraLinear


class LorettaModel(_TensorAdapterModel):
    """LoRETTA tuner (``peft.get_peft_model(model, LorettaConfig(...))``)."""

    prefix = "loretta_"
    tuner_layer_cls = LorettaLinear
