"""FLoRA and LoRETTA layers: peft ``BaseTunerLayer`` wrappers of a ``torch.nn.Linear``.

One base class holds what the two share: forward (base output plus each active adapter's
s·up(down(dropout(x)))), merge/unmerge through :meth:`get_delta_weight`, and the scale-invariant
group of each adapter (:meth:`adapter_groups`, read by ``tensorsam.groups``).  Never is the
out×in ΔW formed in the forward pass.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from tensorsam.adapters.tt import TensorTrain, default_tt_rank, loretta_shapes, rank_factors


def _check_rank(r) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r (the adapter rank) must be a positive int, got {r!r}")
    return r


class TensorAdapterLayer(BaseTunerLayer):
    """Shared machinery; subclasses define the adapter's parameters, ``_output`` and ``get_delta_weight``."""

    kind: str = "?"               # the Group kind in tensorsam.groups
    other_param_names = ("r", "alpha", "scaling", "adapter_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r, self.alpha, self.scaling = {}, {}, {}
        self.adapter_dropout = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} adapts torch.nn.Linear layers only, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features

    # -- what a method defines --------------------------------------------------------------
    def _output(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """s·ΔW x for one adapter, without forming ΔW."""
        raise NotImplementedError

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW (out × in) of one adapter, scaling included."""
        raise NotImplementedError

    def adapter_groups(self) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
        """(adapter, [(name, parameter), ...]) per adapter: the cores of its scale-invariant group,
        in the order the input meets them (x → … → output)."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------
    def _common_update(self, adapter: str, config) -> None:
        self.r[adapter] = config.r
        self.alpha[adapter] = float(config.alpha)
        self.scaling[adapter] = float(config.alpha) / config.r
        self.adapter_dropout[adapter] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def _finish_update(self, adapter: str, config) -> None:
        self._move_adapter_to_device_of_base_layer(adapter)
        self.set_adapter(self.active_adapters)
        if config.inference_mode:
            for name in self.adapter_layer_names:
                if adapter in getattr(self, name):
                    getattr(self, name)[adapter].requires_grad_(False)

    def _has(self, adapter: str) -> bool:
        return adapter in getattr(self, self.adapter_layer_names[0])

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or named) adapters' ΔW to the base weight."""
        weight = self.get_base_layer().weight
        for adapter in check_adapters_to_merge(self, adapter_names):
            if not self._has(adapter):
                continue
            delta = self.get_delta_weight(adapter).detach().to(weight.dtype)
            with torch.no_grad():
                if safe_merge:
                    merged = weight + delta
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"merging adapter {adapter!r} gives non-finite weights")
                    weight.copy_(merged)
                else:
                    weight.add_(delta)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ΔW again (last merged first)."""
        if not self.merged:
            warnings.warn("already unmerged; nothing to do", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if self._has(adapter):
                with torch.no_grad():
                    weight.sub_(self.get_delta_weight(adapter).detach().to(weight.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if self._has(adapter):
                out = self._output(adapter, self.adapter_dropout[adapter](x))
                result = result + out.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return f"{self.kind}." + nn.Module.__repr__(self)


class FloraLinear(nn.Module, TensorAdapterLayer):
    """FLoRA on a Linear: ΔW = s·B·G·A (A r×in, G r×r, B out×r, s = α/r).

    In the DAS paper's notation (appendix B) ΔW = A G Bᵀ with A out×r and B in×r: their A is our
    B, their B our Aᵀ.  The group is (A, G, B).
    """

    kind = "flora"
    forward, __repr__ = TensorAdapterLayer.forward, TensorAdapterLayer.__repr__   # nn.Module's come first
    adapter_layer_names = ("flora_A", "flora_G", "flora_B")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__()
        TensorAdapterLayer.__init__(self, base_layer, **kwargs)
        self.flora_A, self.flora_G, self.flora_B = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter: str, config) -> None:
        r = _check_rank(config.r)
        self._common_update(adapter, config)
        dtype = self.get_base_layer().weight.dtype
        a = torch.empty(r, self.in_features, dtype=dtype)
        b = torch.empty(self.out_features, r, dtype=dtype)
        g = torch.zeros(r, r, dtype=dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))   # LoRA's A: U(±1/sqrt(in))
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))   # U(±1/sqrt(r))
        if not config.init_weights:
            nn.init.kaiming_uniform_(g, a=math.sqrt(5))
        self.flora_A[adapter], self.flora_G[adapter], self.flora_B[adapter] = (
            nn.Parameter(a), nn.Parameter(g), nn.Parameter(b))
        self._finish_update(adapter, config)

    def _output(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        a = self.flora_A[adapter]
        h = F.linear(F.linear(x.to(a.dtype), a), self.flora_G[adapter])
        return F.linear(h, self.flora_B[adapter]) * self.scaling[adapter]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.flora_B[adapter] @ self.flora_G[adapter] @ self.flora_A[adapter]) * self.scaling[adapter]

    def adapter_groups(self):
        return [(ad, [(f"{n}.{ad}", getattr(self, n)[ad]) for n in self.adapter_layer_names])
                for ad in self.flora_A if ad in self.flora_G and ad in self.flora_B]


class LorettaLinear(nn.Module, TensorAdapterLayer):
    """LoRETTA (``loretta_rep``) on a Linear: ΔW = s·B·A, A (in→r) and B (r→out) tensor-trains.

    A's train has modes (in-factors, r-factors), B's (out-factors, r-factors); each is contracted
    to its in×r / out×r matrix, so the forward costs LoRA's plus two small contractions.  The
    group is A's cores in order, then B's in reverse (the input meets B's r-modes first).
    """

    kind = "loretta"
    forward, __repr__ = TensorAdapterLayer.forward, TensorAdapterLayer.__repr__
    adapter_layer_names = ("loretta_A", "loretta_B")
    other_param_names = (*TensorAdapterLayer.other_param_names, "tt_rank", "tt_shapes")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__()
        TensorAdapterLayer.__init__(self, base_layer, **kwargs)
        self.loretta_A, self.loretta_B = nn.ModuleDict(), nn.ModuleDict()
        self.tt_rank, self.tt_shapes = {}, {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter: str, config) -> None:
        r = _check_rank(config.r)
        a_shape, b_shape = loretta_shapes(self.in_features, self.out_features, r, config.tt_factors)
        rank = config.tt_rank or default_tt_rank(self.in_features, self.out_features, r, config.tt_factors)
        self._common_update(adapter, config)
        self.tt_rank[adapter], self.tt_shapes[adapter] = rank, (a_shape, b_shape)
        dtype = self.get_base_layer().weight.dtype
        n_r = len(rank_factors(r))
        a = TensorTrain(a_shape, rank, split=len(a_shape) - n_r, dtype=dtype)
        b = TensorTrain(b_shape, rank, split=len(b_shape) - n_r, dtype=dtype)
        a.init_normal_((3 * self.in_features) ** -0.5)   # LoRA's A: U(±1/sqrt(in)), variance 1/(3 in)
        b.init_normal_(float(config.init_std))
        if config.zero_init:
            with torch.no_grad():
                b.cores[-1].zero_()                        # B = 0, so ΔW = 0
        self.loretta_A[adapter], self.loretta_B[adapter] = a, b
        self._finish_update(adapter, config)

    def _output(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        a = self.loretta_A[adapter].matrix()     # in × r
        b = self.loretta_B[adapter].matrix()     # out × r
        return (x.to(a.dtype) @ a) @ b.T * self.scaling[adapter]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.loretta_B[adapter].matrix() @ self.loretta_A[adapter].matrix().T) * self.scaling[adapter]

    def adapter_groups(self):
        out = []
        for ad in self.loretta_A:
            if ad not in self.loretta_B:
                continue
            a = [(f"loretta_A.{ad}.core{k}", c) for k, c in enumerate(self.loretta_A[ad].cores)]
            b = [(f"loretta_B.{ad}.core{k}", c) for k, c in enumerate(self.loretta_B[ad].cores)]
            out.append((ad, a + b[::-1]))
        return out
