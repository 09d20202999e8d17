"""``fit`` under DDP (gloo, 2 processes): SGD and DAS follow ``fit`` in one process on the combined
batch; SAM with a per-replica first pass (``no_sync``, the default) matches the per-replica hand
reference of test_distributed, and with ``sam_sync=True`` the one-process run.  float64, 3 steps,
a model without BatchNorm."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_distributed import (
    LR,
    RHO,
    WORLD,
    _free_port,
    assert_params_close,
    batches,
    make_model,
    params_of,
    per_replica_reference,
    run_workers,
)
from torch import nn

from tensorsam.optim import build_optimizer
from tensorsam.train import fit, unwrap

TIMEOUT_S = 90
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")
SEED = 5


def dataset():
    """Rows laid out so that fit's shuffle gives rank r, at step s, rows [8r, 8r + 8) of global batch s
    of test_distributed (rank r takes every WORLD-th index of the epoch's permutation)."""
    data = batches()
    n = sum(len(x) for x, _ in data)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SEED * 1_000_003))
    x, y = torch.empty(n, 16, dtype=torch.float64), torch.empty(n, 4, dtype=torch.float64)
    for s, (xb, yb) in enumerate(data):
        for r in range(WORLD):
            for j in range(8):
                x[perm[16 * s + r + WORLD * j]] = xb[8 * r + j]
                y[perm[16 * s + r + WORLD * j]] = yb[8 * r + j]
    return x, y


def train(model, method, batch_size, sam_sync=False):
    options = {"das": {"alpha": 0.5, "groups": unwrap(model)}, "sam": {"rho": RHO}}[method] if method != "sgd" else {}
    opt = build_optimizer(method, model.parameters(), lr=LR, momentum=0.9, **options)
    fit(model, opt, dataset(), epochs=1, batch_size=batch_size, loss_fn=F.mse_loss, seed=SEED, progress=False,
        sam_sync=sam_sync)
    return params_of(model)


RUNS = {"sgd": ("sgd", False), "das": ("das", False), "sam_no_sync": ("sam", False), "sam_sync": ("sam", True)}


def _worker(rank, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        out = {name: train(nn.parallel.DistributedDataParallel(make_model()), m, 8, sync)
               for name, (m, sync) in RUNS.items()}
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("ddp_fit"))
    train(make_model(), "sgd", 16)                      # warm the imports, then fork
    return run_workers(_worker, outdir)


@pytest.mark.parametrize("name", ["sgd", "das", "sam_sync"])
def test_fit_under_ddp_follows_one_process_on_the_combined_batch(replicas, name):
    method, sync = RUNS[name]
    ref = train(make_model(), method, 16, sync)
    assert not all(torch.equal(a, b) for a, b in zip(ref, params_of(make_model())))  # it trained
    for out in replicas:
        assert_params_close(out[name], ref)            # rtol 1e-10 (summation order differs)


def test_fit_sam_no_sync_is_the_per_replica_reference(replicas):
    ref, _ = per_replica_reference(batches())
    for out in replicas:
        assert_params_close(out["sam_no_sync"], ref)


TORCHRUN_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_distributed import make_model
from test_train_distributed import train_in
from tensorsam.train import cleanup, setup, wrap
info = setup("cpu")
torch.set_num_threads(1)
params = train_in(wrap(make_model(), info), {ckpt!r}, resume={resume})
torch.save(params, {out!r}.format(info.rank))
assert info.world_size == 2
cleanup()
"""


def train_in(model, checkpoint, resume, batch_size=8):
    """SGD through ``fit`` with a checkpoint every step (rank 0 writes, every rank waits)."""
    from test_distributed import params_of as params

    opt = build_optimizer("sgd", model.parameters(), lr=LR, momentum=0.9)
    fit(model, opt, dataset(), epochs=2, batch_size=batch_size, loss_fn=F.mse_loss, seed=SEED, progress=False,
        checkpoint=checkpoint, checkpoint_every=1, resume=resume)
    return params(model)


@pytest.mark.slow
def test_torchrun_setup_wraps_in_ddp_and_rank0_checkpoints(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    ckpt, out = tmp_path / "run.ckpt", str(tmp_path / "rank{}.pt")
    script = tmp_path / "job.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(Path(__file__).parent), ckpt=str(ckpt), out=out,
                                             resume=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), str(script)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(out.format(r)) for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*ranks))          # DDP kept the replicas identical
    assert_params_close(ranks[0], train_in(make_model(), None, False, batch_size=16))  # = one process
    from tensorsam.run import load_checkpoint

    assert load_checkpoint(ckpt)["iteration"] == 6                   # 2 epochs x 3 steps, written once
