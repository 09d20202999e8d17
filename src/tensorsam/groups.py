"""Scale-invariant groups: the single place that knows which parameters belong together.

A group is one ordered list of parameters composed multilinearly, so that scaling them by
c_1..c_K with prod c_k = 1 leaves the model unchanged (the DAS paper, Problem (1)).  Discovery walks a model:

- every :class:`~tensorsam.tensors.base.FactorizedTensor` (a bare format, or inside a
  tensorized layer) gives the group of its ``cores``, in order;
- every LoRA layer of a HuggingFace peft model gives one (lora_A, lora_B) pair per adapter
  (also the embedding variant ``lora_embedding_A``/``lora_embedding_B``);
- every FLoRA / LoRETTA layer (``tensorsam.adapters``) gives one group per adapter: FLoRA's
  (A, G, B); LoRETTA's TT cores of A and of B together (ΔW = s·B·A is multilinear in all of
  them), in the order the input meets them: A's cores, then B's in reverse;
- any module may declare its own groups by defining ``scale_invariant_groups()`` returning
  lists of ``(name, parameter)`` pairs; its submodules are then not searched.

Only groups whose parameters all require gradients are returned (inactive peft adapters and
frozen layers are left out).  Bias, normalisation and dense parameters are in no group.
Optimizers (``tensorsam.optim``) take the result, or the model itself, as ``groups=``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import nn

from tensorsam.tensors.base import FactorizedTensor


@dataclass(frozen=True)
class Group:
    """One scale-invariant group: its parameters in order, their qualified names, the kind
    (``'factorized'``, ``'lora'``, ``'flora'``, ``'loretta'`` or ``'custom'``) and the owning
    module's name."""

    names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]
    kind: str
    module: str

    def __len__(self) -> int:
        return len(self.params)


def _lora_layer_type():
    """peft's LoraLayer if peft is loaded (a peft model implies it; importing it costs seconds)."""
    if "peft" not in sys.modules:
        return None
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return None
    return LoraLayer


def _tensor_adapter_type():
    """tensorsam's FLoRA/LoRETTA layer base if ``tensorsam.adapters`` is loaded (it imports peft)."""
    layer = sys.modules.get("tensorsam.adapters.layer")
    return getattr(layer, "TensorAdapterLayer", None)


def _tensor_adapter_groups(name: str, module) -> list[Group]:
    """One group per adapter of a FLoRA/LoRETTA layer, as the layer orders it."""
    prefix = f"{name}." if name else ""
    return [Group(tuple(prefix + n for n, _ in cores), tuple(p for _, p in cores), module.kind, name)
            for _, cores in module.adapter_groups()]


def _lora_pairs(name: str, module) -> list[Group]:
    """(A, B) per adapter of a peft LoRA layer, in adapter order."""
    out = []
    for a_attr, b_attr, suffix in (("lora_A", "lora_B", ".weight"),
                                   ("lora_embedding_A", "lora_embedding_B", "")):
        a_dict, b_dict = getattr(module, a_attr, None), getattr(module, b_attr, None)
        if a_dict is None or b_dict is None:
            continue
        for adapter in a_dict:
            if adapter not in b_dict:
                continue
            a, b = a_dict[adapter], b_dict[adapter]
            a = getattr(a, "weight", a)
            b = getattr(b, "weight", b)
            prefix = f"{name}." if name else ""
            out.append(Group((f"{prefix}{a_attr}.{adapter}{suffix}", f"{prefix}{b_attr}.{adapter}{suffix}"),
                             (a, b), "lora", name))
    return out


def named_scale_invariant_groups(model: nn.Module) -> list[Group]:
    """All scale-invariant groups of ``model`` as :class:`Group` records (see module docs)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")  # noqa: TRY004
    lora_type = _lora_layer_type()
    adapter_type = _tensor_adapter_type()
    found: list[Group] = []
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        custom = getattr(module, "scale_invariant_groups", None)
        if callable(custom) and not isinstance(module, FactorizedTensor):
            prefix = f"{name}." if name else ""
            for grp in custom():
                grp = list(grp)
                if not grp or not all(isinstance(item, (tuple, list)) and len(item) == 2
                                      and isinstance(item[0], str) and isinstance(item[1], nn.Parameter)
                                      for item in grp):
                    raise ValueError(f"{type(module).__name__}.scale_invariant_groups() (module {name!r}) "
                                     "must return non-empty lists of (name, parameter) pairs")
                found.append(Group(tuple(prefix + n for n, _ in grp), tuple(p for _, p in grp),
                                   "custom", name))
            skip_prefixes.append(prefix if name else "")
            continue
        if isinstance(module, FactorizedTensor):
            prefix = f"{name}." if name else ""
            found.append(Group(tuple(f"{prefix}cores.{i}" for i in range(len(module.cores))),
                               tuple(module.cores), "factorized", name))
        elif lora_type is not None and isinstance(module, lora_type):
            found.extend(_lora_pairs(name, module))
        elif adapter_type is not None and isinstance(module, adapter_type):
            found.extend(_tensor_adapter_groups(name, module))
    seen: set[int] = set()
    out = []
    for g in found:
        if not all(p.requires_grad for p in g.params):
            continue
        ids = [id(p) for p in g.params]
        if any(i in seen for i in ids):
            raise ValueError(f"parameter {g.names} found in two scale-invariant groups")
        seen.update(ids)
        out.append(g)
    return out


def scale_invariant_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """The scale-invariant groups of ``model``, each an ordered list of parameters.

    Example::

        tensorsam.nn.tensorize(model, format="tr", rank=15)   # in place (returns a summary)
        groups = scale_invariant_groups(model)    # one group per tensorized layer
        opt = DAS(model.parameters(), torch.optim.SGD, groups=groups, alpha=0.1, lr=0.1)
    """
    return [list(g.params) for g in named_scale_invariant_groups(model)]
