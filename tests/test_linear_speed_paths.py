"""The matrix-product chains of Tucker and TT-matrix linear layers (:mod:`tensorsam.nn.contraction`):
equal to the reconstructed weight's ``F.linear`` in float64, gradients by gradcheck, picked by the
layer only where they need no more FLOPs than the opt_einsum path."""

import copy
import math
import pickle

import pytest
import torch

from tensorsam.nn import TensorizedLinear
from tensorsam.nn.contraction import Contraction, TTMLinearChain, TuckerLinearChain

F64 = torch.float64
CHAINS = {"tucker": TuckerLinearChain, "ttm": TTMLinearChain}

# (format, rank, (in modes, out modes), batch): every Tucker split of in/out modes, and TTM
# shapes whose kept-apart core j is the first, the middle and the last, padded sides included
CASES = [
    ("tucker", 100, ((2, 3), (2, 2)), 3),
    ("tucker", 2, ((2, 3), (2, 2)), 5),
    ("tucker", 100, ((3,), (2, 2)), 2),
    ("tucker", 100, ((2, 2, 2), (3,)), 3),
    ("tucker", (2, 1, 3), ((4,), (2, 3)), 4),
    ("ttm", 2, ((2, 3), (2, 2)), 3),       # j = 0
    ("ttm", 2, ((6, 2), (2, 3)), 3),       # j = 1 (last of two)
    ("ttm", 2, ((2, 6, 2), (2, 3, 2)), 3),  # j = 2
    ("ttm", (2, 3), ((2, 3, 2), (3, 2, 2)), 3),
    ("ttm", 2, ((4,), (2, 3)), 2),         # padded input side
    ("ttm", 2, ((2, 3), (4,)), 2),         # padded output side
]


def layer_for(fmt, rank, shape, seed=0):
    torch.manual_seed(seed)
    layer = TensorizedLinear(math.prod(shape[0]), math.prod(shape[1]), format=fmt, rank=rank, shape=shape, dtype=F64)
    torch.nn.init.normal_(layer.bias)
    return layer


def chain_of(layer, batch):
    chain = layer.layout.linear_chain(layer.weight_factors, batch)
    assert isinstance(chain, CHAINS[layer.format])
    return chain


@pytest.mark.parametrize(("fmt", "rank", "shape", "batch"), CASES)
def test_chain_equals_reconstructed(fmt, rank, shape, batch):
    layer = layer_for(fmt, rank, shape)
    x = torch.randn(batch, layer.in_size, dtype=F64)
    chain = chain_of(layer, batch)
    y = chain(*layer.cores, x.reshape(batch, *layer.in_modes)) + layer.bias
    assert y.shape == (batch, layer.out_size) and y.is_contiguous()
    torch.testing.assert_close(y, layer.forward_reconstructed(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("fmt", "rank", "shape", "batch"), CASES)
def test_chain_gradcheck(fmt, rank, shape, batch):
    layer = layer_for(fmt, rank, shape)
    chain = chain_of(layer, batch)
    x = torch.randn(batch, *layer.in_modes, dtype=F64, requires_grad=True)
    cores = [c.detach().clone().requires_grad_(True) for c in layer.cores]
    assert torch.autograd.gradcheck(lambda *ops: chain(*ops), (*cores, x), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(("fmt", "rank", "shape", "batch"),
                         [("tucker", 100, ((2, 2, 2), (3,)), 3), ("ttm", 2, ((2, 6, 2), (2, 3, 2)), 3)])
def test_chain_gradgradcheck(fmt, rank, shape, batch):
    layer = layer_for(fmt, rank, shape)
    chain = chain_of(layer, batch)
    x = torch.randn(batch, *layer.in_modes, dtype=F64, requires_grad=True)
    cores = [c.detach().clone().requires_grad_(True) for c in layer.cores]
    assert torch.autograd.gradgradcheck(lambda *ops: chain(*ops), (*cores, x))


@pytest.mark.parametrize(("fmt", "rank", "shape", "batch"),
                         [("tucker", 100, ((2, 3), (2, 2)), 3), ("tucker", 100, ((2, 2, 2), (3,)), 1),
                          ("ttm", 2, ((2, 6, 2), (2, 3, 2)), 8), ("ttm", (2, 3), ((2, 3, 2), (3, 2, 2)), 3)])
def test_layer_picks_chain_and_matches(fmt, rank, shape, batch):
    """Where the chain needs no more FLOPs the factorized mode runs it: same outputs as the
    reconstructed mode, gradcheck through the layer (input, cores and bias), torch.func, and
    a copied or pickled layer keeps working."""
    layer = layer_for(fmt, rank, shape)
    x = torch.randn(batch, layer.in_size, dtype=F64, requires_grad=True)
    assert isinstance(layer._input_contraction(x), CHAINS[fmt])
    torch.testing.assert_close(layer.forward_factorized(x), layer.forward_reconstructed(x), rtol=1e-12, atol=1e-12)

    layer.forward_mode = "factorized"
    names = [n for n, _ in layer.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)
    grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x.detach(),)).square().sum())(
        {n: p.detach() for n, p in layer.named_parameters()})
    layer.zero_grad()
    layer(x.detach()).square().sum().backward()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-10, atol=1e-12)
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)


def test_leading_batch_dims_and_non_contiguous_input():
    layer = layer_for("tucker", 100, ((2, 3), (2, 2)))
    layer.forward_mode = "factorized"
    base = torch.randn(3, layer.in_size * 2, dtype=F64)
    x = base[:, ::2]  # not contiguous
    assert isinstance(layer._input_contraction(x), TuckerLinearChain)
    torch.testing.assert_close(layer(x), layer.forward_reconstructed(x.contiguous()), rtol=1e-12, atol=1e-12)
    x3 = torch.randn(1, 3, layer.in_size, dtype=F64)
    torch.testing.assert_close(layer(x3), layer.forward_reconstructed(x3), rtol=1e-12, atol=1e-12)


def test_chain_only_where_no_more_flops():
    """The benchmark's 1024 -> 1024 layers (modes 4x16x16) at batch 128: Tucker rank 16 and TTM
    rank 8 run the chain (same FLOPs as the path, no permute copies); TTM rank 16, where the
    chain would cost more FLOPs, keeps the path; so does every layer the chain does not cover."""
    modes = ((4, 16, 16), (4, 16, 16))
    x = torch.zeros(128, 1024)
    for fmt, rank, want in (("tucker", 16, TuckerLinearChain), ("ttm", 8, TTMLinearChain), ("ttm", 16, Contraction)):
        layer = TensorizedLinear(1024, 1024, format=fmt, rank=rank, shape=modes)
        got = layer._input_contraction(x)
        assert isinstance(got, want), (fmt, rank, type(got))
        chain = layer.layout.linear_chain(layer.weight_factors, 128)
        path = layer._contractions[("input", 128)]
        assert (chain.flops <= path.flops) == (want is not Contraction)
    for fmt in ("cp", "tt", "tr"):
        layer = TensorizedLinear(64, 64, format=fmt, rank=2)
        assert layer.layout.linear_chain(layer.weight_factors, 4) is None
