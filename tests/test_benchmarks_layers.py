"""benchmarks/layers.py's measure of auto's dispatch: auto minus forced per call, on a small layer
(the full benchmark is run by hand, never as a timed test)."""

import torch

from tensorsam.nn import TensorizedLinear


def test_dispatch_cost_is_small_and_leaves_the_layer_on_auto(load_benchmark):
    script = load_benchmark("layers")
    torch.manual_seed(0)
    layer = TensorizedLinear(16, 16, format="tt", rank=2, shape=((4, 4), (4, 4)))
    x = torch.randn(8, 16)
    cost = script.dispatch_cost(layer, x)
    assert isinstance(cost, float) and abs(cost) < 1e-3    # seconds per call: both sides run one closure
    assert layer.forward_mode == "auto"
    forced = {k[0] for k in layer._prepared}
    assert "auto" in forced and len(forced) == 2            # auto's entry and the forced mode's, nothing else
