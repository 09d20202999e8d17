"""FSDP2 (``fully_shard``, DTensor parameters; gloo, 2 processes on 127.0.0.1) against one process
on the combined batch, for every method of the factory that takes norms.

The model (float64, no BatchNorm) has two tensorized layers under ``fully_shard`` (their cores are
DTensors sharded on dim 0, some with an empty shard on rank 1) and a plain tensorized head,
whose gradients the test averages by hand (a replicated head).  So DAS's groups mix sharded and
plain cores, and a plain core's norm must not be summed over the ranks.  Both workers run every
method in one fork (start-up dominates the cost) and save what they saw; the checks run here.

Checked, over 5 steps: the final parameters equal one process's (tolerance :data:`RTOL` /
:data:`ATOL`; the runs differ only by the order of floating-point sums, ~1e-15); the norm
tracker's Q, Cov, mean s, mean gamma and u equal one process's; and ``CommDebugMode`` sees exactly
one all-reduce in every DAS, nBAR, oBAR and rebalancing step, one in SAM's first step and none in
the rest of SAM's or SGD's step.
"""

import contextlib
import datetime
import os

import pytest
import torch
import torch.distributed as dist
from test_distributed import run_workers
from torch import nn

from tensorsam.dynamics import NormTracker
from tensorsam.groups import scale_invariant_groups
from tensorsam.nn import TensorizedLinear
from tensorsam.optim import SAM, build_optimizer

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

WORLD, STEPS, LR, BATCH = 2, 5, 0.1, 16
RTOL, ATOL = 1e-10, 1e-12
TIMEOUT_S = 90

# method -> (factory name, model kind, options); a "_mixed" method's groups mix sharded and plain
# cores (groups of the body's TR layer and the head swap cores), so that summing a plain core's
# norm over the ranks would change the result even where the maths is invariant to scaling all the
# norms of a group alike (BAR's signs, rebalancing)
METHODS = {
    "sgd": ("sgd", "cores", {}),
    "das": ("das", "cores", {"alpha": 0.5}),
    "das_group": ("das", "cores", {"alpha": 0.5, "normalization": "group"}),
    "das_loop": ("das", "cores", {"alpha": 0.5, "foreach": False, "skip_nonfinite": True}),
    "nbar": ("nbar", "pairs", {"alpha": 0.5}),
    "obar": ("obar", "pairs", {"alpha": 0.5}),
    "nbar_mixed": ("nbar", "pairs", {"alpha": 0.5}),
    "rebalance": ("rebalance", "cores", {"rescale_state": True}),
    "rebalance_mixed": ("rebalance", "cores", {"rescale_state": True}),
    "sam": ("sam", "cores", {"rho": 0.05}),
    "asam": ("asam", "cores", {"rho": 0.2}),
    "sam_loop": ("sam", "cores", {"rho": 0.05, "foreach": False}),
}
ONE_ALL_REDUCE = ("das", "das_group", "nbar", "obar", "nbar_mixed", "rebalance", "rebalance_mixed")


def make_model(kind: str) -> nn.Sequential:
    """Two body layers (sharded under FSDP2) and a plain head.  ``cores``: groups of 4, 2 and 3
    cores (TT, TR, Tucker); ``pairs``: three pairs (CP, TT, TR), for BAR."""
    torch.manual_seed(0)
    opts = {"forward_mode": "factorized", "dtype": torch.float64}
    if kind == "cores":
        layers = [TensorizedLinear(16, 12, format="tt", rank=3, shape=((4, 4), (3, 4)), **opts),
                  TensorizedLinear(12, 8, format="tr", rank=2, **opts),
                  TensorizedLinear(8, 4, format="tucker", rank=2, **opts)]
    else:
        layers = [TensorizedLinear(16, 12, format="cp", rank=3, **opts),
                  TensorizedLinear(12, 8, format="tt", rank=2, **opts),
                  TensorizedLinear(8, 4, format="tr", rank=2, **opts)]
    return nn.Sequential(layers[0], nn.Tanh(), layers[1], nn.Tanh(), layers[2])


def groups_of(model, method):
    """The model's scale-invariant groups; for a ``_mixed`` method, the second group (sharded) and
    the third (plain head) swap their second cores."""
    groups = scale_invariant_groups(model)
    if method.endswith("_mixed"):
        (a, b, *rest_a), (c, d, *rest_b) = groups[1], groups[2]
        groups = [groups[0], [a, d, *rest_a], [c, b, *rest_b]]
    return groups


def batches():
    """STEPS global batches; rank r takes rows [8r, 8r + 8)."""
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 16, generator=gen, dtype=torch.float64),
             torch.randn(BATCH, 4, generator=gen, dtype=torch.float64)) for _ in range(STEPS)]


def shard(batch, rank):
    n = BATCH // WORLD
    return tuple(t[rank * n:(rank + 1) * n] for t in batch)


def loss_fn(model, batch):
    x, y = batch
    return (model(x) - y).square().mean()


def full_params(model) -> dict:
    """name -> the whole parameter (a DTensor gathered: every rank must call this)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def train(model, method, data, average_plain=lambda m: None, count=None, track=None):
    """STEPS steps of ``method``; ``average_plain`` averages the plain parameters' gradients over
    the ranks after each backward, ``count(label)`` is a context counting collectives, ``track``
    gets the tracker's values after each first backward."""
    name, _, options = METHODS[method]
    count = count or (lambda label: contextlib.nullcontext())
    opt = build_optimizer(name, model.parameters(), groups=groups_of(model, method), lr=LR, momentum=0.9, total_steps=STEPS,
                          **options)
    tracker = NormTracker(model) if track is not None else None
    for batch in data:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        average_plain(model)
        if tracker is not None:
            track.append({k: v.clone() for k, v in tracker.compute().items()})
        if isinstance(opt, SAM):
            with count("first_step"):
                opt.first_step(zero_grad=True)
            loss_fn(model, batch).backward()
            average_plain(model)
            with count("second_step"):
                opt.second_step()
        else:
            with count("step"):
                opt.step()
    return full_params(model)


# -- the workers ------------------------------------------------------------------------------
def _average_plain(model):
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if p.grad is not None and not isinstance(p, DTensor):
            dist.all_reduce(p.grad)
            p.grad.div_(WORLD)


def _nonfinite_on_one_rank(rank, batch):
    """A NaN in rank 1's shard only: with skip_nonfinite, every rank skips the step.  Returns
    (skipped steps, whether the parameters stayed the same)."""
    from torch.distributed.fsdp import fully_shard

    model = make_model("cores")
    fully_shard(model[0])
    fully_shard(model[2])
    opt = build_optimizer("das", model.parameters(), groups=model, alpha=0.5, lr=LR, skip_nonfinite=True)
    loss_fn(model, batch).backward()
    _average_plain(model)
    before = full_params(model)
    if rank == 1:
        model[2].weight_factors.cores[0].grad._local_tensor.view(-1)[0] = float("nan")
    opt.step()
    after = full_params(model)
    return opt.skipped_steps, all(torch.equal(before[n], after[n]) for n in before)


def _worker(rank, port, outdir):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        data = [shard(b, rank) for b in batches()]
        out = {}
        for method, (_, kind, _) in METHODS.items():
            model = make_model(kind)
            fully_shard(model[0])
            fully_shard(model[2])
            counts: dict = {}

            @contextlib.contextmanager
            def count(label, counts=counts):
                with CommDebugMode() as mode:
                    yield
                counts.setdefault(label, []).append(
                    {str(op).split(".")[-1]: n for op, n in mode.get_comm_counts().items() if n})

            track = [] if method in ("das", "sgd") else None
            params = train(model, method, data, _average_plain, count, track)
            kinds = {n: type(p).__name__ for n, p in model.named_parameters()}
            out[method] = {"params": params, "counts": counts, "track": track, "kinds": kinds}
        out["nonfinite"] = _nonfinite_on_one_rank(rank, data[0])
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """Fork the workers once (the references computed first also warm the imports they need)."""
    # imported before the fork, not in every worker
    import torch.distributed.fsdp
    import torch.distributed.tensor.debug  # noqa: F401

    outdir = str(tmp_path_factory.mktemp("fsdp2"))
    references()
    return run_workers(_worker, outdir)


_REFS: dict = {}


def references() -> dict:
    """One process, the combined batch: method -> (params, tracker values or None)."""
    if not _REFS:
        for method, (_, kind, _) in METHODS.items():
            track = [] if method in ("das", "sgd") else None
            _REFS[method] = (train(make_model(kind), method, batches(), track=track), track)
    return _REFS


def assert_params_close(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


# -- the checks -------------------------------------------------------------------------------
def test_the_body_is_sharded_and_the_head_plain(replicas):
    kinds = replicas[0]["das"]["kinds"]
    assert {k for n, k in kinds.items() if n.startswith(("0.", "2."))} == {"DTensor"}
    assert {k for n, k in kinds.items() if n.startswith("4.")} == {"Parameter"}


@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp2_equals_one_process_on_the_combined_batch(replicas, method):
    want, _ = references()[method]
    for out in replicas:
        assert_params_close(out[method]["params"], want)
    start = dict(make_model(METHODS[method][1]).named_parameters())
    assert not all(torch.equal(want[n], start[n].detach()) for n in want)   # it trained


@pytest.mark.parametrize("method", ["das", "sgd"])
def test_norm_tracker_reports_the_one_process_values(replicas, method):
    _, want = references()[method]
    for out in replicas:
        got = out[method]["track"]
        assert len(got) == len(want) == STEPS
        for g, w in zip(got, want):
            assert g.keys() == w.keys()
            for key in w:
                torch.testing.assert_close(g[key], w[key], rtol=RTOL, atol=ATOL)


def test_one_all_reduce_per_step_for_all_cores_of_all_groups(replicas):
    for out in replicas:
        for method in ONE_ALL_REDUCE:
            assert out[method]["counts"] == {"step": [{"allreduce_": 1}] * STEPS}, method
        assert out["sgd"]["counts"] == {"step": [{}] * STEPS}
        # skip_nonfinite's finite check takes one more (and its one host sync)
        assert out["das_loop"]["counts"] == {"step": [{"allreduce_": 2}] * STEPS}
        for method in ("sam", "asam", "sam_loop"):
            assert out[method]["counts"] == {"first_step": [{"allreduce_": 1}] * STEPS,
                                             "second_step": [{}] * STEPS}, method


def test_a_nonfinite_shard_on_one_rank_skips_the_step_on_every_rank(replicas):
    assert [out["nonfinite"] for out in replicas] == [(1, True)] * WORLD
