"""DCP checkpoints of sharded (FSDP2) training, for every method of the factory: ``fit`` on a sharded
model writes ``torch.distributed.checkpoint`` directories (a temporary directory renamed into place,
an atomic ``latest`` pointer), and a run stopped after its first step resumes on another number of
processes (2 -> 1 and 1 -> 2) to the parameters of one process that never stopped (float64, 3
steps, the same global batch of 16; tolerance :data:`RTOL`, the runs differing only in the order of
floating-point sums).  DCP's state initialisation (a zero-gradient, lr-0 ``step()``) changes no
weight, counter or RNG stream, on DTensors and on plain tensors.

The two workers run every scenario in one fork (start-up dominates the cost): rank 0 alone trains
in a world of 1 (stopping after the first step), both resume that and train in a world of 2
(stopping likewise), and rank 0 alone resumes the latter.  The checks run here, in the parent."""

import datetime
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_distributed import run_workers
from test_fsdp2 import make_model
from test_train_distributed import SEED, dataset

from tensorsam.optim import WrappedOptimizer, build_optimizer
from tensorsam.optim.wrapper import GROUP_KEYS

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

RTOL, ATOL, TIMEOUT_S = 1e-10, 1e-12, 90
GLOBAL_BATCH, STOP_AFTER = 16, 1      # 48 examples: 3 steps; the interrupted runs keep step 1's checkpoint
# method -> (model kind, base optimizer, options): every method of build_optimizer
METHODS = {
    "sgd": ("cores", "sgd", {"momentum": 0.9}),
    "adam": ("cores", "adam", {}),
    "adamw": ("cores", "adamw", {"weight_decay": 0.1}),
    "base": ("cores", "adam", {}),
    "sam": ("cores", "sgd", {"rho": 0.05, "momentum": 0.9}),
    "asam": ("cores", "sgd", {"rho": 0.2, "momentum": 0.9}),
    "das": ("cores", "sgd", {"alpha": 0.5, "alpha_schedule": "cosine", "momentum": 0.9}),
    "nbar": ("pairs", "adamw", {"alpha": 0.5}),
    "obar": ("pairs", "sgd", {"alpha": 0.5, "momentum": 0.9}),
    "rebalance": ("cores", "adam", {"rescale_state": True, "every": 2}),
    "sam-every-2": ("cores", "sgd", {"rho": 0.05, "momentum": 0.9}),
    "sam-random-0.5": ("cores", "sgd", {"rho": 0.05, "seed": 1, "momentum": 0.9}),   # base, SAM, SAM
}


def optimizer(method, model):
    _, base, options = METHODS[method]
    groups = model if method not in ("sgd", "adam", "adamw", "base", "sam", "asam") else None
    return build_optimizer(method, model.parameters(), groups=groups, base=base, lr=0.05, total_steps=3, **options)


class Stop(Exception):
    """Ends a run as a kill would, after the checkpoint of step STOP_AFTER."""


def train(model, method, checkpoint=None, resume=False, stop=False):
    """``fit`` on :func:`~test_train_distributed.dataset` with the global batch of 16 (over the ranks);
    returns the whole parameters (gathered: every rank must call this), None when stopped."""
    from tensorsam.train import fit, full_state_dict

    _, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def on_step(step):
        if stop and step == STOP_AFTER:
            raise Stop

    opt = optimizer(method, model)
    try:
        fit(model, opt, dataset(), epochs=1, batch_size=GLOBAL_BATCH // world, loss_fn=F.mse_loss, seed=SEED,
            progress=False, checkpoint=checkpoint, checkpoint_every=1, resume=resume, on_step=on_step)
    except Stop:
        return None
    return full_state_dict(model)


def sharded(method):
    from tensorsam.train import shard

    return shard(make_model(METHODS[method][0]))


def rng_streams():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def init_changes_nothing(method, model) -> dict:
    """DCP's get_state_dict on a fresh optimizer runs torch's _init_optim_state (zero gradients, lr 0,
    step()): what it left unchanged."""
    from tensorsam.train import full_state_dict
    from tensorsam.train.checkpoint import sharded_state

    opt = optimizer(method, model)
    before, counters, streams = full_state_dict(model), _counters(opt), rng_streams()
    sharded_state(model, opt)
    after = full_state_dict(model)
    return {"weights": all(torch.equal(before[k], after[k]) for k in before),
            "counters": _counters(opt) == counters,
            "rng": all(_same(a, b) for a, b in zip(rng_streams(), streams)),
            "state": bool(opt.state),        # created (every base here keeps state)
            "lr": all(g["lr"] == 0.05 for g in opt.param_groups)}


def _counters(opt):
    return [{k: g[k] for k in GROUP_KEYS} for g in opt.param_groups] if isinstance(opt, WrappedOptimizer) else None


def _same(a, b):
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else np.array_equal(a, b) if isinstance(a, np.ndarray) \
        else a == b


def _join(world, rank, how):
    dist.init_process_group("gloo", init_method=how, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))


def _worker(rank, port, outdir):
    torch.set_num_threads(1)
    out = Path(outdir)
    result = {"1to2": {}, "2to1": {}, "init": {}, "layout": {}}
    if rank == 0:                                   # a world of 1: train, stop after step 1
        _join(1, 0, f"file://{out / 'store1'}")
        for method in METHODS:
            train(sharded(method), method, out / "one" / method, stop=True)
        dist.destroy_process_group()
    _join(2, rank, f"tcp://127.0.0.1:{port}")       # a world of 2
    for method in METHODS:
        result["init"][method] = init_changes_nothing(method, sharded(method))
        result["1to2"][method] = train(sharded(method), method, out / "one" / method, resume=True)
        train(sharded(method), method, out / "two" / method, stop=True)
        result["layout"][method] = _layout(out / "two" / method)
    result["keys"] = _saved_keys(out / "two" / "sam-random-0.5")
    dist.destroy_process_group()
    if rank == 0:                                   # a world of 1 again: resume what the two wrote
        _join(1, 0, f"file://{out / 'store3'}")
        for method in METHODS:
            result["2to1"][method] = train(sharded(method), method, out / "two" / method, resume=True)
            result["layout"][method + "/end"] = _layout(out / "two" / method)
        dist.destroy_process_group()
    torch.save(result, out / f"rank{rank}.pt")


def _saved_keys(path: Path) -> set:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(path / (path / "latest").read_text().strip()).read_metadata().state_dict_metadata)


def _layout(path: Path) -> dict:
    return {"latest": (path / "latest").read_text().strip(), "entries": sorted(p.name for p in path.iterdir()),
            "files": sorted(p.name for p in (path / (path / "latest").read_text().strip()).iterdir())}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.distributed.checkpoint
    import torch.distributed.fsdp  # noqa: F401 - imported before the fork, not in every worker

    outdir = str(tmp_path_factory.mktemp("dcp"))
    references()
    return run_workers(_worker, outdir)


_REFS: dict = {}


def references() -> dict:
    """One process, no sharding, never stopped: method -> parameters after 3 steps."""
    if not _REFS:
        for method in METHODS:
            model = make_model(METHODS[method][0])
            train(model, method)
            _REFS[method] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return _REFS


def assert_close(got: dict, want: dict):
    assert got is not None and got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_on_another_number_of_processes_takes_the_same_next_steps(ranks, method):
    want = references()[method]
    start = make_model(METHODS[method][0]).state_dict()
    assert not all(torch.equal(want[k], start[k]) for k in want)           # it trained
    assert_close(ranks[0]["2to1"][method], want)                           # written by 2, resumed by 1
    for r in ranks:
        assert_close(r["1to2"][method], want)                              # written by 1, resumed by 2


@pytest.mark.parametrize("method", list(METHODS))
def test_dcp_state_initialisation_changes_nothing_on_dtensors(ranks, method):
    for r in ranks:
        assert r["init"][method] == {"weights": True, "counters": True, "rng": True, "state": True, "lr": True}


def test_checkpoint_layout_latest_pointer_and_no_temporaries(ranks):
    layout = ranks[0]["layout"]
    for method in METHODS:
        stopped, done = layout[method], layout[method + "/end"]
        assert stopped["latest"] == "step-00000001" and stopped["entries"] == ["latest", "step-00000001"]
        assert stopped["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "loop.pt"]   # one file per rank
        assert done["latest"] == "step-00000003" and done["entries"] == ["latest", "step-00000003"]
        assert done["files"] == [".metadata", "__0_0.distcp", "loop.pt"]


def test_param_groups_keep_the_counters_and_sams_seed(ranks):
    """DCP flattens the optimizer's state dict; the param groups' entries are kept, one by one."""
    for key in (*GROUP_KEYS, "sam_seed", "rho", "lr"):
        assert f"optimizer.param_groups.0.{key}" in ranks[0]["keys"]


# -- on plain tensors, without workers ----------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_dcp_state_initialisation_changes_nothing_on_plain_tensors(method):
    model = make_model(METHODS[method][0])
    assert init_changes_nothing(method, model) == {"weights": True, "counters": True, "rng": True, "state": True,
                                                   "lr": True}


@pytest.mark.parametrize("method", ["das", "sam-every-2", "rebalance"])
def test_a_first_step_at_lr_0_with_gradients_is_a_real_step(method):
    """A warm-up from lr 0 looks like DCP's initialisation except for its non-zero gradients: it counts."""
    model = make_model(METHODS[method][0])
    opt = optimizer(method, model)
    for g in opt.param_groups:
        g["lr"] = 0.0
    F.mse_loss(model(dataset()[0][:4]), dataset()[1][:4]).backward()
    if method.startswith("sam"):
        opt.first_step(zero_grad=True)
        F.mse_loss(model(dataset()[0][:4]), dataset()[1][:4]).backward()
    opt.step()
    assert opt.step_count == 1


def test_an_unsharded_run_refuses_to_resume_a_dcp_directory(tmp_path):
    (tmp_path / "ckpt" / "step-00000001").mkdir(parents=True)
    (tmp_path / "ckpt" / "latest").write_text("step-00000001\n")
    with pytest.raises(ValueError, match="DCP checkpoints of a sharded run.*--distributed fsdp"):
        train(make_model("cores"), "sgd", tmp_path / "ckpt", resume=True)


def test_distributed_fsdp_without_torchrun_says_to_launch_it_with_torchrun(tmp_path, capsys, monkeypatch):
    from tensorsam.cli import main

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert main(["vision", "--distributed", "fsdp", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--distributed fsdp" in err and "torchrun --nproc-per-node" in err
    assert not os.path.exists(tmp_path / "out" / "results.json")
