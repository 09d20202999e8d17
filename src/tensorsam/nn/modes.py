"""The forward modes of a tensorized layer and how ``auto`` runs them: the ``forward_mode``
property, the prepared-forward cache (:mod:`.dispatch`), ``auto``'s choice (:mod:`.auto`), and the
choices kept in the layer's ``state_dict`` as extra state.  :class:`ModeDispatch` is the base of
:class:`.layers._TensorizedLayer`, which supplies each mode's ``forward_<mode>`` /
``_prepare_<mode>`` and its cost estimates."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import auto, dispatch
from .contraction import Contraction

FORWARD_MODES = ("auto", "factorized", "reconstructed")  # every layer's
CHAIN_MODE = "chain"  # CP, Tucker, TT and TR convolutions' too (:attr:`TensorizedConv2d.modes`)
_EXTRA_STATE_KEY = "_extra_state"  # torch's key for get_extra_state()


def check_forward_mode(mode: str) -> str:
    if mode not in FORWARD_MODES and mode != CHAIN_MODE:
        raise ValueError(f"forward_mode must be one of {FORWARD_MODES}, got {mode!r} (CP, Tucker, TT "
                         f"and TR convolutions also take {CHAIN_MODE!r})")
    return mode


class ModeDispatch(nn.Module):
    """The mode machinery every tensorized layer shares (see the module docstring)."""

    # auto times both modes only when factorized is estimated at most this many times dearer
    timing_margin_above: float = auto.AUTO_TIMING_MARGIN
    has_chain = False  # whether forward_mode='chain' exists for this layer (TensorizedConv2d)

    @property
    def forward_mode(self) -> str:
        """``'auto'``, ``'factorized'``, ``'reconstructed'`` or (CP, Tucker, TT and TR convolutions)
        ``'chain'``; may be changed after construction."""
        return self._forward_mode

    @forward_mode.setter
    def forward_mode(self, mode: str) -> None:
        check_forward_mode(mode)
        if mode == CHAIN_MODE and not self.has_chain:
            raise ValueError(f"forward_mode={CHAIN_MODE!r} runs CP, Tucker, TT and TR convolutions only, not a "
                             f"{self.format} {type(self).__name__}")
        self._forward_mode = mode

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes ``auto`` chooses among."""
        return ("factorized", "reconstructed")

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The mode's forward.  The first call for an input signature (mode, shape, dtype, device,
        grad) checks the input, makes ``auto``'s choice and prepares the chosen forward with every
        shape-derived constant and contraction bound (:mod:`.dispatch`); later calls look that
        signature up in one dict and run the prepared forward, whose only Python work is the
        chosen path's own op calls.  ``auto`` then costs the same as forcing its choice."""
        if torch.compiler.is_compiling():  # traced each time: no cache to guard on
            return self._forward_unprepared(x)
        mode = self._forward_mode
        grad = torch.is_grad_enabled()
        if grad and mode == "auto" and not x.requires_grad:  # auto's choice depends on it
            grad = dispatch.requires_grad(self)
        key = (mode, x.shape, x.dtype, x.device, grad)
        run = self._prepared.get(key)
        if run is None:
            return dispatch.prepare_and_run(self, x, key)
        return run(self, x)

    def _forward_unprepared(self, x: torch.Tensor) -> torch.Tensor:
        """The forward without the prepared-call cache (under ``torch.compile``)."""
        self._check_input(x)
        self._check_dtype(x)
        mode = self.forward_mode if self.forward_mode != "auto" else self.choose_mode(x)
        return getattr(self, f"forward_{mode}")(x)

    def prepared(self, mode: str, x: torch.Tensor):
        """``run(layer, x)``: ``mode``'s forward for inputs like ``x`` with its shape-derived constants
        bound (the ``_prepare_<mode>`` method), or a call of ``forward_<mode>`` where that was
        overridden (a subclass, a patched instance)."""
        return dispatch.prepared_forward(self, mode, x)

    def _input_contraction(self, x: torch.Tensor) -> Contraction:
        raise NotImplementedError

    def _dense_cost(self, x: torch.Tensor) -> float:
        raise NotImplementedError

    def estimated_costs(self, x: torch.Tensor) -> dict[str, float]:
        """FLOP + weighted memory estimates of the :attr:`modes` for an input like ``x``."""
        w = self._weight_contraction()
        return {"factorized": self._input_contraction(x).cost, "reconstructed": w.cost + self._dense_cost(x)}

    def choose_mode(self, x: torch.Tensor) -> str:
        """The mode ``auto`` takes for ``x``: this layer's recorded choice, else :func:`.auto.choose`'s."""
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        return self._auto.choose(self._signature(), x, grad, lambda: self.estimated_costs(x),
                                 lambda: self.time_modes(x, grad), self.timing_margin_above)

    def _signature(self) -> tuple:
        """What determines the cost of the modes, besides the input: layers that agree on it
        (e.g. the repeated blocks of a ResNet) share one cached choice."""
        conv = tuple(getattr(self, a, None) for a in ("kernel_size", "stride", "padding", "dilation"))
        return (type(self).__name__, self.format, tuple(self.weight_factors.core_shapes()), self.tensor_shape,
                self.bias is not None, conv)

    def time_modes(self, x: torch.Tensor, grad: bool, repeats: int = auto.AUTO_TIMING_REPEATS,
                   modes: Sequence[str] | None = None) -> dict[str, float]:
        """``modes`` timed on ``x`` by :func:`.auto.time_modes` (gradients of the parameters); by
        default those that ``auto`` times, :func:`.auto.contenders` of :meth:`estimated_costs`."""
        if modes is None:
            modes = auto.contenders(self.estimated_costs(x), self.timing_margin_above)
        fns = {m: getattr(self, f"forward_{m}") for m in modes}
        return auto.time_modes(fns, x, self.parameters(), grad, repeats)

    # -- checkpointed state: auto's choices -------------------------------------------------
    def get_extra_state(self) -> torch.Tensor:
        """``auto``'s choices per input (:meth:`.auto.AutoChoices.state`)."""
        return self._auto.state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Replay saved choices: ``auto`` takes them for those inputs without estimating or timing.
        A mode this layer does not have (:attr:`modes`) is a ValueError."""
        self._auto.load(state, self.modes)
        dispatch.reset(self)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a state dict written before auto's choices were saved has no extra state: keep ours
        state_dict.setdefault(prefix + _EXTRA_STATE_KEY, self.get_extra_state())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        dispatch.reset(self)  # assign=True may have changed the cores' dtype

    # -- the prepared forwards: never copied, dropped whenever parameters move or change dtype --
    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        dispatch.reset(self)
        return out

    def __getstate__(self):
        return dispatch.drop_prepared(super().__getstate__())

    def __setstate__(self, state):
        super().__setstate__(state)
        dispatch.reset(self)  # also for pickles written before the prepared forwards existed
