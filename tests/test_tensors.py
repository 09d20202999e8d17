"""Factorized tensor formats: agreement with tensorly, scale invariance, decompositions,
gradients, the unified initialisation, validation and parameter counts."""

import math
import re

import pytest
import tensorly as tl
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorly.decomposition import parafac, tensor_ring, tensor_train, tensor_train_matrix, tucker

from tensorsam.tensors import (
    CP,
    FORMATS,
    TR,
    TT,
    TTM,
    Tucker,
    balanced_factors,
    get_format,
    matrix_to_tensor,
    tensor_to_matrix,
)
from tensorsam.tensors.base import tensorly_pytorch

TO_TENSOR = {"cp": tl.cp_to_tensor, "tucker": tl.tucker_to_tensor, "tt": tl.tt_to_tensor,
             "ttm": tl.tt_matrix_to_tensor, "tr": tl.tr_to_tensor}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def tensorly_full(m):
    with tensorly_pytorch():
        return TO_TENSOR[m.format](m.to_tensorly())


@st.composite
def factorized(draw, formats=tuple(TO_TENSOR)):
    """A random float64 module of a random format, shape and rank."""
    fmt = draw(st.sampled_from(formats))
    dims, ranks = st.integers(1, 4), st.integers(1, 4)
    torch.manual_seed(draw(st.integers(0, 2**16)))
    if fmt == "ttm":
        d = draw(st.integers(1, 3))
        rows, cols = (draw(st.lists(dims, min_size=d, max_size=d)) for _ in range(2))
        return TTM(rows, cols, draw(st.lists(ranks, min_size=d - 1, max_size=d - 1)), dtype=torch.float64)
    n = draw(st.integers(2 if fmt in ("tr", "tucker") else 1, 4))  # tensorly needs N >= 2 there
    shape = draw(st.lists(dims, min_size=n, max_size=n))
    n_ranks = {"cp": 1, "tucker": n, "tt": n - 1, "tr": n}[fmt]
    rank = draw(st.lists(ranks, min_size=n_ranks, max_size=n_ranks))
    if fmt == "tucker":
        rank = [min(r, i) for r, i in zip(rank, shape)]
    return get_format(fmt)(shape, rank, dtype=torch.float64)


@given(factorized())
def test_reconstruct_matches_tensorly(m):
    full = m.reconstruct()
    assert tuple(full.shape) == m.shape
    assert rel(full, tensorly_full(m)) < 1e-10


@given(factorized())
def test_subscript_convention(m):
    ins, out = m.subscripts()
    n = m.order
    assert out == tuple(range(n))
    for labels, core in zip(ins, m.cores):
        assert len(labels) == core.ndim
        for lab, size in zip(labels, core.shape):
            assert lab >= n or size == m.shape[lab]


@given(factorized(), st.data())
def test_scale_invariance(m, data):
    z = torch.tensor(data.draw(st.lists(st.floats(-2, 2), min_size=len(m.cores), max_size=len(m.cores))),
                     dtype=torch.float64)
    c = torch.exp(z - z.mean())  # prod c_k = 1
    before = m.reconstruct().detach()
    with torch.no_grad():
        for core, ck in zip(m.cores, c):
            core.mul_(ck)
    assert torch.allclose(m.reconstruct(), before, rtol=1e-10, atol=1e-12 * before.abs().max())


@given(factorized(("tucker", "tt", "ttm")))
def test_from_dense_recovers_exact_low_rank(m):
    x = m.reconstruct().detach()
    out = type(m).from_dense(x, m.rank)
    assert rel(out.reconstruct(), x) < 1e-8
    assert all(r <= s for r, s in zip(out.rank, m.rank))


def test_cp_als_recovers_exact_low_rank():
    torch.manual_seed(0)
    x = CP((6, 7, 8), 3, dtype=torch.float64).reconstruct().detach()
    assert rel(CP.from_dense(x, 3, n_iter_max=300, tol=0).reconstruct(), x) < 1e-8


def test_tr_recovers_ring_with_closing_rank_one():
    torch.manual_seed(1)
    x = TR((4, 5, 6, 3), (1, 3, 4, 2), dtype=torch.float64).reconstruct().detach()
    out = TR.from_dense(x, (1, 3, 4, 2))
    assert rel(out.reconstruct(), x) < 1e-8


def _tensorly_error(fmt, x, rank):
    with tensorly_pytorch():
        if fmt == "cp":
            return rel(tl.cp_to_tensor(parafac(x, rank, n_iter_max=30, normalize_factors=True)), x)
        if fmt == "tucker":
            return rel(tl.tucker_to_tensor(tucker(x, [rank] * x.ndim)), x)
        if fmt == "tt":
            return rel(tl.tt_to_tensor(tensor_train(x, [1, *[rank] * (x.ndim - 1), 1])), x)
        if fmt == "ttm":
            return rel(tl.tt_matrix_to_tensor(tensor_train_matrix(x, [1, rank, 1])), x)
        return rel(tl.tr_to_tensor(tensor_ring(x, [rank] * (x.ndim + 1))), x)


@pytest.mark.parametrize("fmt", sorted(TO_TENSOR))
def test_from_dense_error_equals_tensorlys(fmt):
    torch.manual_seed(2)
    x = torch.randn(4, 5, 3, 6, dtype=torch.float64)
    kw = {"n_iter_max": 30, "normalize_factors": True} if fmt == "cp" else {}  # weights != 1 get absorbed
    m = get_format(fmt).from_dense(x, 2, **kw)
    err = rel(m.reconstruct(), x)
    assert 0.05 < err < 1
    assert err == pytest.approx(_tensorly_error(fmt, x, 2), rel=1e-9)
    assert m.cores[0].dtype == torch.float64


def test_from_dense_keeps_dtype_and_tucker_hosvd():
    x = torch.randn(5, 6, 4, 3)
    for fmt in TO_TENSOR:
        assert all(c.dtype == torch.float32 for c in get_format(fmt).from_dense(x, 2).cores)
    x = x.double()
    hooi, hosvd = (rel(Tucker.from_dense(x, 3, method=mth).reconstruct(), x) for mth in ("hooi", "hosvd"))
    assert hooi <= hosvd + 1e-12


def test_ttm_layout_matches_tensorly_matrix():
    torch.manual_seed(3)
    m = TTM((2, 3, 2), (4, 1, 5), (3, 2), dtype=torch.float64)
    assert m.shape == (2, 3, 2, 4, 1, 5) and m.row_labels == (0, 1, 2) and m.col_labels == (3, 4, 5)
    with tensorly_pytorch():
        ref = tl.tt_matrix_to_matrix(m.to_tensorly())
    assert m.to_matrix().shape == (12, 20)
    assert rel(m.to_matrix(), ref) < 1e-12
    # from_matrix reads the rows/cols of the matrix correctly: exact at the generating ranks
    back = TTM.from_matrix(m.to_matrix().detach(), (2, 3, 2), (4, 1, 5), (3, 2))
    assert rel(back.to_matrix(), ref) < 1e-10


def test_gradcheck_reconstruct():
    torch.manual_seed(4)
    mods = [CP((3, 4, 5), 4), Tucker((3, 4, 5), (2, 3, 2)), TT((3, 4, 5), (2, 3)), TTM((2, 3), (3, 2), 2),
            TR((3, 4, 5), (2, 2, 3))]
    for m in mods:
        m = m.double()
        names = [f"cores.{k}" for k in range(len(m.cores))]
        params = tuple(c.detach().clone().requires_grad_() for c in m.cores)
        assert sum(p.numel() for p in params) <= 250

        def f(*cores, m=m, names=names):
            return torch.func.functional_call(m, dict(zip(names, cores)), ())

        assert torch.autograd.gradcheck(f, params), m.format


@pytest.mark.parametrize("m,target", [
    (CP((16, 9, 16), 20), 0.01), (Tucker((6, 7, 8), (3, 4, 5)), 1.0), (TT((4, 5, 6, 7), (3, 4, 5)), 1.0),
    (TTM((4, 4), (4, 4), 6), 0.1), (TR((4, 4, 2, 9, 4, 4, 2), 5), 2 / 288),
])
def test_unified_init_variance(m, target):
    # E[W^2] = target exactly; heavy tails of core products need an average over draws (SE ~ 6%)
    m = m.double()
    torch.manual_seed(5)
    second_moments = []
    for _ in range(40):
        m.reset_parameters(target)
        second_moments.append((m.reconstruct().detach() ** 2).mean())
    assert torch.stack(second_moments).mean() / target == pytest.approx(1.0, rel=0.25)


@pytest.mark.parametrize("build,words", [
    (lambda: TT((3, 4, 5), (2, 2, 2)), "rank has 3 entries"),
    (lambda: TR((3, 4, 5), (2, 2)), "rank has 2 entries"),
    (lambda: CP((3, 4), 0), "positive"),
    (lambda: TTM((2, 2), (2, 2), (-1,)), "positive"),
    (lambda: Tucker((3, 4), (2, 5)), "mode 1"),
    (lambda: Tucker((3, 0), 2), "shape"),
    (lambda: TT("ab", 2), "shape"),
    (lambda: TTM((2, 2), (2,), 1), "same number of modes"),
    (lambda: get_format("hssvd"), "unknown tensor format"),
    (lambda: Tucker.from_dense(torch.randn(3, 4), 2, method="svd"), "method"),
    (lambda: TT.from_dense([[1.0]], 1), "torch.Tensor"),
    (lambda: TTM.from_dense(torch.randn(2, 3, 4), 1), "even number of modes"),
    (lambda: TTM.from_matrix(torch.randn(6, 5), (2, 3), (2, 2), 1), "does not match"),
    (lambda: balanced_factors(0, 2), "n must be"),
])
def test_bad_input_raises_value_error(build, words):
    with pytest.raises(ValueError, match=words):
        build()


def test_numpy_integer_ranks_are_ints():
    np = pytest.importorskip("numpy")
    r = np.int64(3)
    assert CP((4, 5), r).rank == 3 and TT((4, 5, 6), r).rank == (3, 3)
    assert Tucker((2, 5), r).rank == (2, 3)  # an int rank is capped at the mode size
    assert TR((4, 5), [np.int32(2), r]).rank == (2, 3)


def test_dof_and_compression_ratio():
    cases = [
        (CP((4, 5, 6), 3), 3 * (4 + 5 + 6)),
        (Tucker((4, 5, 6), 2), 8 + 2 * (4 + 5 + 6)),
        (TT((4, 5, 6), (2, 3)), 4 * 2 + 2 * 5 * 3 + 3 * 6),
        (TTM((2, 3), (4, 5), 3), 2 * 4 * 3 + 3 * 3 * 5),
        (TR((4, 5, 6), (2, 3, 4)), 2 * 4 * 3 + 3 * 5 * 4 + 4 * 6 * 2),
    ]
    for m, dof in cases:
        assert m.dof() == dof, m.format
        assert m.compression_ratio() == pytest.approx(120 / dof)
    assert Tucker((2, 5, 6), 3).rank == (2, 3, 3)
    assert [m.num_rank_combinations for m, _ in cases] == [3, 8, 6, 3, 24]
    assert set(FORMATS) >= {"cp", "tucker", "tt", "ttm", "tr"}


@settings(max_examples=30)
@given(st.integers(1, 5000), st.integers(1, 5))
def test_balanced_factors(n, k):
    f = balanced_factors(n, k)
    assert len(f) == k and math.prod(f) == n and list(f) == sorted(f, reverse=True)


def test_balanced_factors_match_resnet_tensorization():
    assert [balanced_factors(c, 3) for c in (16, 32, 64)] == [(4, 2, 2), (4, 4, 2), (4, 4, 4)]


def test_matrix_tensor_round_trip():
    w = torch.randn(6, 20)  # (out, in)
    t = matrix_to_tensor(w, (4, 5), (2, 3))
    assert t.shape == (4, 5, 2, 3)
    assert t[1, 2, 1, 0] == w[1 * 3 + 0, 1 * 5 + 2]
    assert torch.equal(tensor_to_matrix(t, (4, 5), (2, 3)), w)
    with pytest.raises(ValueError, match="modes do not match"):
        matrix_to_tensor(w, (4, 4), (2, 3))


def test_cp_from_dense_rank_above_a_mode_size():
    """tensorly's SVD init fails when R exceeds a mode; from_dense falls back to a seeded random init."""
    from tensorsam.tensors import CP

    x = torch.randn(64, 10, dtype=torch.float64)
    t = CP.from_dense(x, 20, n_iter_max=200)
    assert t.rank == 20
    assert torch.linalg.norm(t.reconstruct() - x) / torch.linalg.norm(x) < 1e-3


@pytest.mark.parametrize("fmt", ["cp", "tucker", "tt", "tr"])
def test_from_dense_draws_nothing_from_the_global_rng(fmt):
    """Building around a decomposition's cores skips the random initialisation (FactorizedTensor.around)."""
    x = torch.randn(4, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rank = {"cp": 3, "tucker": (2, 2, 2), "tt": (2, 2), "tr": (1, 2, 2)}[fmt]
    before = torch.get_rng_state()
    get_format(fmt).from_dense(x, rank)
    assert torch.equal(torch.get_rng_state(), before)


# -- a size that is not an integer is refused, never truncated ------------------------------------
X = torch.randn(4, 5, 6)


@pytest.mark.parametrize("build,bad", [
    (lambda: Tucker((4, 5, 6), (2.7, 3.9, 1.5)), "2.7"),     # was silently (2, 3, 1)
    (lambda: Tucker((4, 5, 6), (2, 3.0, 1)), "3.0"),         # whole floats too
    (lambda: CP((4, 5, 6), 2.7), "2.7"),
    (lambda: CP((4, 5, 6), [3.0]), "3.0"),
    (lambda: TT((4, 5, 6), (2, 2.5)), "2.5"),
    (lambda: TT((4, 5, 6), (2, True)), "True"),
    (lambda: TTM((2, 3), (2, 3), (1.5,)), "1.5"),
    (lambda: TR((4, 5, 6), (2, 3, 1.99)), "1.99"),
    (lambda: Tucker.from_dense(X, (2.7, 3.9, 1.5)), "2.7"),
    (lambda: CP.from_dense(X, 2.5), "2.5"),
    (lambda: TT.from_dense(X, (2.0, 2)), "2.0"),
    (lambda: TR.from_dense(X, (1, 2.2, 2)), "2.2"),
    (lambda: TTM.from_matrix(torch.randn(6, 6), (2, 3), (2, 3), (2.5,)), "2.5"),
])
def test_float_rank_is_refused_not_truncated(build, bad):
    with pytest.raises(ValueError, match=rf"rank.*{re.escape(bad)}"):
        build()


@pytest.mark.parametrize("build,name,bad", [
    (lambda: CP((4, 5.5, 6), 2), "shape", "5.5"),
    (lambda: Tucker((4.0, 5, 6), 2), "shape", "4.0"),
    (lambda: TT((4, 5, 6.9), 2), "shape", "6.9"),
    (lambda: TR((4, 5, 2.5), 2), "shape", "2.5"),
    (lambda: TT((4, False, 6), 2), "shape", "False"),
    (lambda: TTM((2, 3.5), (2, 3), 1), "row_modes", "3.5"),
    (lambda: TTM((2, 3), (2.0, 3), 1), "col_modes", "2.0"),
    (lambda: TTM.from_matrix(torch.randn(6, 6), (2, 3), (2, 3.0), 1), "col_modes", "3.0"),
])
def test_float_shape_is_refused_not_truncated(build, name, bad):
    with pytest.raises(ValueError, match=rf"{name}.*{re.escape(bad)}"):
        build()


def test_integer_sizes_of_every_integer_type_still_work():
    np = pytest.importorskip("numpy")
    assert Tucker(torch.Size([4, 5, 6]), (np.int64(2), torch.tensor(3), 1)).rank == (2, 3, 1)
    assert TT(np.array([4, 5, 6]), 2).shape == (4, 5, 6)
