"""The ``forward_mode='auto'`` policy: the cheapest of a layer's forward implementations per input.

A layer hands over callables (its cost estimates, its forwards) and never its internals.  Every
layer has ``'factorized'`` and ``'reconstructed'``; CP, Tucker, TT and TR convolutions also ``'chain'``.
The modes whose FLOP and memory estimates are close to the cheapest one are the contenders
(:func:`contenders`: ``'reconstructed'`` within :data:`AUTO_TIMING_MARGIN` times the cheapest
estimate, every other mode within the layer's ``margin_above`` times it); when there are two or
more, they are timed once (forward and, when gradients are on, backward via
``torch.autograd.grad`` on detached inputs, so ``.grad`` and the graph are untouched), and a
timing within :data:`AUTO_TIE` of the fastest keeps the estimate's choice.  The choice is
cached per layer signature (format, core shapes, conv settings), input shape, dtype, device
and grad mode, so identical layers are timed once (on every DDP rank alike: all modes use the
same parameters, so ranks may even differ in their choice).  Under ``torch.compile``/``torch.jit``
tracing, or with the environment variable ``TENSORSAM_AUTO_TIMING=0``, the estimate alone decides
and nothing is cached.

Each layer also keeps its own choices (:class:`AutoChoices`) in its checkpointed state, so a
resumed process replays them without estimating or timing again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping

import torch

MODES = ("factorized", "reconstructed", "chain")
REFERENCE_MODE = "reconstructed"  # the dense op: its estimate is the most reliable
# the choice of forward_mode='auto', keyed by layer signature and input (see choose)
_MODE_CACHE: dict[tuple, str] = {}
AUTO_TIMING_ENV = "TENSORSAM_AUTO_TIMING"
AUTO_TIMING_MARGIN = 16.0  # estimates further apart than this are trusted without timing
AUTO_TIMING_REPEATS = 3
AUTO_CLEAR_WIN = 2.0
# timings closer than this are a tie (noise, or a cold allocator: on a fresh process the first
# few calls of any mode can take 10-40x their steady time, hiding a 25x faster factorized linear)
AUTO_TIE = 1.10


def timing_allowed() -> bool:
    """False under ``TENSORSAM_AUTO_TIMING=0`` and while scripting, tracing or compiling."""
    if os.environ.get(AUTO_TIMING_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling())


def contenders(est: Mapping[str, float], margin_above: float) -> tuple[str, ...]:
    """The modes of ``est`` worth timing: :data:`REFERENCE_MODE` within :data:`AUTO_TIMING_MARGIN`
    times the cheapest estimate, any other mode within ``margin_above`` times it.  With two modes
    this times factorized when it lies between 1/:data:`AUTO_TIMING_MARGIN` and ``margin_above``
    times reconstructed."""
    best = min(est.values())
    return tuple(m for m, c in est.items()
                 if c <= (AUTO_TIMING_MARGIN if m == REFERENCE_MODE else margin_above) * best)


def choose(key: tuple, estimate: Callable[[], Mapping[str, float]], time_modes: Callable[[], Mapping[str, float]],
           margin_above: float) -> str:
    """The mode for ``key`` (cached): the lowest of ``estimate()``, or the fastest of
    ``time_modes()`` (which times the :func:`contenders`) when there are two or more contenders
    and the estimate's choice is not within :data:`AUTO_TIE` of the fastest."""
    mode = _MODE_CACHE.get(key)
    if mode is not None:
        return mode
    est = estimate()
    mode = min(est, key=est.get)
    timing = timing_allowed()
    if timing and len(contenders(est, margin_above)) > 1:
        times = time_modes()
        fast = min(times, key=times.get)
        if mode not in times or times[mode] > AUTO_TIE * times[fast]:  # a tie keeps the estimate's choice
            mode = fast
    if timing:  # under compile/tracing the cache is left alone
        _MODE_CACHE[key] = mode
    return mode


def time_modes(fns: Mapping[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor,
               params: Iterable[torch.Tensor], grad: bool, repeats: int = AUTO_TIMING_REPEATS) -> dict[str, float]:
    """Fastest of ``repeats`` interleaved runs of each of ``fns`` on ``x`` (forward, plus the
    gradients of ``params`` and ``x`` when ``grad``), in seconds, after one untimed warm-up
    run each; when one mode's first timed run is already over :data:`AUTO_CLEAR_WIN` times
    faster than every other's, those are returned.

    The warm-up is not timed because first calls pay one-time costs (allocator growth,
    library set-up) that once made a 25x faster factorized linear lose on a cold process.
    Runs on a detached copy of ``x`` and takes gradients with ``torch.autograd.grad``, so
    no ``.grad`` is accumulated and the caller's graph is not touched.
    """
    x = x.detach().requires_grad_(grad and x.requires_grad)
    params = [p for p in params if p.requires_grad] + ([x] if x.requires_grad else [])
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def once(fn) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.set_grad_enabled(grad):
            y = fn(x)
            if grad and params:
                torch.autograd.grad(y, params, torch.ones_like(y))
        sync()
        return time.perf_counter() - t0

    for fn in fns.values():
        once(fn)  # warm-up
    times = {m: [once(fn)] for m, fn in fns.items()}
    first = sorted(t[0] for t in times.values())
    if len(first) < 2 or first[1] > AUTO_CLEAR_WIN * first[0]:  # a clear win needs no repeats
        return {m: t[0] for m, t in times.items()}
    for _ in range(repeats - 1):
        for m, fn in fns.items():
            times[m].append(once(fn))
    return {m: min(t) for m, t in times.items()}


class AutoChoices:
    """One layer's choices, keyed by input (shape, dtype, device type, grad mode).

    A choice is recorded when the process-wide cache holds it (not while compiling or with
    timing off).  :meth:`state` and :meth:`load` carry the record through a checkpoint as a
    uint8 tensor of UTF-8 JSON: a tensor like every other ``state_dict`` value (code that
    copies one with ``.detach().cpu().clone()`` keeps working) that ``weights_only`` loads read.
    """

    def __init__(self) -> None:
        self.modes: dict[tuple, str] = {}

    def choose(self, signature: tuple, x: torch.Tensor, grad: bool, estimate, time_modes,
               margin_above: float) -> str:
        """The recorded mode for ``x``, else :func:`choose`'s (recorded once cached)."""
        mine = (tuple(x.shape), str(x.dtype), x.device.type, grad)
        mode = self.modes.get(mine)
        if mode is None:
            key = (signature, tuple(x.shape), x.dtype, x.device, grad)
            mode = choose(key, estimate, time_modes, margin_above)
            if key in _MODE_CACHE:
                self.modes[mine] = mode
        return mode

    def state(self) -> torch.Tensor:
        """``[[shape, dtype, device type, grad, mode], ...]`` as JSON in a uint8 tensor."""
        entries = [[list(shape), dtype, device, grad, mode] for (shape, dtype, device, grad), mode in self.modes.items()]
        return torch.tensor(list(json.dumps(entries, separators=(",", ":")).encode()), dtype=torch.uint8)

    def load(self, state: torch.Tensor, allowed: tuple[str, ...] = MODES) -> None:
        """Replace the record by a :meth:`state`; a mode not in ``allowed`` is a ValueError."""
        modes = {}
        for shape, dtype, device, grad, mode in json.loads(bytes(state.cpu().to(torch.uint8).tolist()) or b"[]"):
            if mode not in allowed:
                raise ValueError(f"saved auto choice must be one of {allowed}, got {mode!r}")
            modes[(tuple(int(s) for s in shape), str(dtype), str(device), bool(grad))] = mode
        self.modes = modes
