import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorsam.cli import main
from tensorsam.data import make_masks
from tensorsam.tasks import metrics
from tensorsam.tasks.completion import (
    CompletionConfig,
    Objective,
    build_model,
    contraction_plan,
    figures,
    make_optimizer,
    reconstruct,
    run_completion,
)

FAST = ["--set", "compile=false", "--no-progress"]


@settings(max_examples=20)
@given(st.lists(st.floats(-10, 10), min_size=3, max_size=30), st.integers(0, 2**31 - 1))
def test_metrics_match_hand_computation(xs, seed):
    target = torch.tensor(xs, dtype=torch.float64)
    if float((target - target.mean()).square().sum()) < 1e-6 or float(target.square().sum()) < 1e-6:
        return
    pred = target + torch.randn(len(xs), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    t, p = np.array(xs), pred.numpy()
    assert metrics.r2(pred, target) == pytest.approx(1 - ((p - t) ** 2).sum() / ((t - t.mean()) ** 2).sum())
    assert metrics.r2_uncentred(pred, target) == pytest.approx(1 - ((p - t) ** 2).sum() / (t**2).sum())
    assert metrics.rmse(pred, target) == pytest.approx(math.sqrt(((p - t) ** 2).mean()))
    assert metrics.r2(target, target) == 1.0


@pytest.mark.parametrize("model,rank", [("tucker", [3, 2, 4]), ("cp", [4]), ("tt", [3, 2]), ("tr", [2, 3, 2])])
def test_plan_reconstructs_like_the_format_and_gradient_is_the_masked_loss(model, rank):
    cfg = CompletionConfig(model=model, rank=rank, compile=False)
    m = build_model(cfg, (7, 5, 6), rank, 3)
    plan = contraction_plan(m)
    torch.testing.assert_close(reconstruct(list(m.cores), plan), m.reconstruct())
    values = torch.randn(7, 5, 6)
    train = make_masks((7, 5, 6), 1).train
    obj = Objective(m, values, train, loss="mean")
    loss = obj.closure()
    dense = ((m.reconstruct() - values)[train]).square().mean()
    grads = torch.autograd.grad(dense, list(m.cores))
    torch.testing.assert_close(loss, dense.detach())
    for p, g in zip(m.cores, grads):
        torch.testing.assert_close(p.grad, g)
        assert p.grad.is_contiguous()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adam", "das", "sam"])
def test_fused_compiled_step_matches_the_eager_wrappers(method):
    """Compiled, DAS's scaling, SAM's two passes and Adam's step run inside the gradient function
    (Adam's own step only for the first, which makes its state); the steps (cores, Adam moments,
    DAS's schedule counter) match the eager optimizer wrappers, and the fused path really compiles
    (a fallback would warn, an error here)."""
    values = torch.rand(7, 5, 6, generator=torch.Generator().manual_seed(0))
    train = make_masks((7, 5, 6), 1).train
    got = []
    for compile in (False, True):
        cfg = CompletionConfig(rank=[2, 3, 2], alpha=0.05, rho=0.05, compile=compile)
        model = build_model(cfg, values.shape, cfg.rank, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            obj = Objective(model, values, train, compile=compile)
            assert obj.compiled == compile
            opt = make_optimizer(method, obj.cores, cfg, total_steps=10)
            base = getattr(opt, "base_optimizer", opt)
            calls, adam_step = [], base.step
            base.step = lambda *a, **k: calls.append(1) or adam_step(*a, **k)
            step = obj.step_fn(method, opt)
            losses = [step() for _ in range(5)]
        assert len(calls) == (1 if compile else 5)
        got.append(([c.detach().clone() for c in obj.cores], torch.stack(losses),
                    getattr(opt, "step_count", None), [opt.state[c]["exp_avg_sq"].clone() for c in obj.cores],
                    [float(opt.state[c]["step"]) for c in obj.cores]))
    (c0, l0, n0, v0, s0), (c1, l1, n1, v1, s1) = got
    assert n0 == n1 == (None if method == "adam" else 5) and s0 == s1 == [5.0] * len(s0)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=0)
    for a, b in zip(c0 + v0, c1 + v1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_fused_das_step_follows_the_step_count_after_eager_steps():
    """The compiled DAS step keeps alpha_t's step on the device; when eager steps (or a reload)
    move opt.step_count, it restarts from there: 3 fused + 2 eager + 2 fused steps equal 7 eager
    steps."""
    values = torch.rand(7, 5, 6, generator=torch.Generator().manual_seed(0))
    train = make_masks((7, 5, 6), 1).train
    got = []
    for compile in (False, True):
        cfg = CompletionConfig(rank=[2, 3, 2], alpha=0.5, compile=compile)
        model = build_model(cfg, values.shape, cfg.rank, 1)
        obj = Objective(model, values, train, compile=compile)
        opt = make_optimizer("das", obj.cores, cfg, total_steps=8)
        step = obj.step_fn("das", opt)
        for n in (3, 2, 2):
            for _ in range(n):
                step()
            for _ in range(2 if n == 3 else 0):
                obj.closure()
                opt.step()
        got.append([c.detach().clone() for c in obj.cores])
    for a, b in zip(*got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_adam_in_the_graph_picks_up_a_reloaded_state():
    """A state reload replaces Adam's state tensors: the compiled step writes the new ones (a step
    on stale tensors would leave the reloaded state behind): 3 steps, reload, 2 steps, as eager."""
    values = torch.rand(7, 5, 6, generator=torch.Generator().manual_seed(0))
    train = make_masks((7, 5, 6), 1).train
    got = []
    for compile in (False, True):
        cfg = CompletionConfig(rank=[2, 3, 2], alpha=0.5, compile=compile)
        obj = Objective(build_model(cfg, values.shape, cfg.rank, 1), values, train, compile=compile)
        opt = make_optimizer("das", obj.cores, cfg, total_steps=8)
        step = obj.step_fn("das", opt)
        for _ in range(3):
            step()
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))   # new state tensors
        for _ in range(2):
            step()
        got.append([c.detach().clone() for c in obj.cores]
                   + [opt.state[c][k].clone() for c in obj.cores for k in ("exp_avg", "exp_avg_sq", "step")])
    for a, b in zip(*got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_fused_step_falls_back_to_the_eager_wrapper_with_a_warning(monkeypatch):
    values = torch.rand(7, 5, 6, generator=torch.Generator().manual_seed(0))
    train = make_masks((7, 5, 6), 1).train
    cfg = CompletionConfig(rank=[2, 3, 2], alpha=0.5, compile=False)
    obj = Objective(build_model(cfg, values.shape, cfg.rank, 1), values, train)
    obj.compiled = True               # as if the gradient compiled, but the fused DAS graph fails

    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(obj, "_compiled", lambda kind: broken)
    opt = make_optimizer("das", obj.cores, cfg, total_steps=4)
    before = [c.detach().clone() for c in obj.cores]
    with pytest.warns(UserWarning, match="fused das step failed.*no compiler here"):
        step = obj.step_fn("das", opt)
    assert all(torch.equal(a, c.detach()) for a, c in zip(before, obj.cores))   # nothing moved
    step()
    assert opt.step_count == 1


def test_merge_joins_seeds_and_refuses_an_out_holding_runs_it_leaves_out(tmp_path, capsys):
    short = ["--methods", "adam", "--iterations", "30", "--set", "log_every=10", *FAST]
    for seed in (42, 43):
        assert main(["completion", *short, "--seeds", str(seed), "--out", str(tmp_path / f"s{seed}")]) == 0
    merged = tmp_path / "merged"
    assert main(["completion", "--merge", str(tmp_path / "s42"), str(tmp_path / "s43"), "--out", str(merged)]) == 0
    res = json.loads((merged / "results.json").read_text())
    assert [r["seed"] for r in res["runs"]] == [42, 43] and res["config"]["seeds"] == [42, 43]
    assert sorted(torch.load(merged / "solutions.pt", weights_only=True)) == ["adam_seed42", "adam_seed43"]
    # into a source: allowed (its runs are merged); into s43 from s42 alone: s43's run would be lost
    assert main(["completion", "--merge", str(tmp_path / "s42"), str(tmp_path / "s43"),
                 "--out", str(tmp_path / "s43")]) == 0
    kept = (tmp_path / "s42" / "results.json").read_bytes()
    capsys.readouterr()
    assert main(["completion", "--merge", str(tmp_path / "s42"), "--out", str(merged)]) == 2
    assert "merging there would lose them" in capsys.readouterr().err
    assert json.loads((merged / "results.json").read_text())["runs"] == res["runs"]
    assert (tmp_path / "s42" / "results.json").read_bytes() == kept


def test_tucker_init_is_tensorlys_random_init_seeded_with_the_mask_seed():
    import tensorly as tl
    from tensorly.decomposition._tucker import initialize_tucker

    m = build_model(CompletionConfig(), (438, 6, 11), [8, 6, 8], 87)
    with tl.backend_context("numpy"):
        core, factors = initialize_tucker(np.zeros((438, 6, 11)), [8, 6, 8], [0, 1, 2], random_state=87,
                                          init="random")
    torch.testing.assert_close(m.cores[0].detach(), torch.as_tensor(core, dtype=torch.float32))
    assert float(m.cores[0].detach().min()) >= 0.01 and float(m.cores[1].detach().max()) < 1.0
    for c, f in zip(m.cores[1:], factors):
        torch.testing.assert_close(c.detach(), torch.as_tensor(f, dtype=torch.float32))


def test_cli_short_paper_protocol_writes_every_metric(tmp_path):
    out = tmp_path / "e1"
    rc = main(["completion", "--methods", "hooi,adam,sam,das,rebalance", "--seeds", "42", "--iterations", "150",
               "--out", str(out), "--set", "hooi_iterations=20", "--set", "log_every=50", *FAST])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in res["runs"]] == ["hooi", "adam", "sam", "das", "rebalance"]
    for r in res["runs"]:
        for key in ("train_r2", "heldout_r2", "train_r2_uncentred", "heldout_r2_uncentred", "train_rmse",
                    "heldout_rmse", "wall_seconds"):
            assert math.isfinite(r[key]), (r["method"], key)
        assert r["seed"] == 42 and r["masks"]["seed"] == 42 and r["masks"]["n_val"] == 0
    adam = res["runs"][1]["trace"]
    assert adam["iteration"] == [50, 100, 150] and adam["loss"][-1] < adam["loss"][0]
    assert res["config"]["iterations"] == 150 and not (out / ".work").exists()
    sol = torch.load(out / "solutions.pt", weights_only=True)
    assert sorted(sol) == sorted(f"{m}_seed42" for m in ("hooi", "adam", "sam", "das", "rebalance"))
    paths = figures(res, tmp_path / "fig")
    assert all(p.stat().st_size > 1000 for p in paths) and len(paths) == 2


def test_validated_protocol_selects_rank_and_iteration_on_validation():
    cfg = CompletionConfig(methods=["adam"], seeds=[87], iterations=400, protocol="validated",
                           rank_grid=[[2, 2, 2], [4, 3, 4]], log_every=50, patience=3, compile=False)
    (run,) = run_completion(cfg)["runs"]
    cands = run["info"]["candidates"]
    assert [c["rank"] for c in cands] == [[2, 2, 2], [4, 3, 4]]
    assert run["val_r2"] == max(c["val_r2"] for c in cands)
    assert run["info"]["rank"] == cands[[c["val_r2"] for c in cands].index(run["val_r2"])]["rank"]
    assert run["masks"]["n_val"] > 0 and math.isfinite(run["heldout_r2"])


@pytest.mark.parametrize("model,rank", [("cp", "[5]"), ("tt", "[3,3]"), ("tr", "[2,2,2]")])
def test_other_formats_complete(tmp_path, model, rank):
    rc = main(["completion", "--methods", "adam,das", "--seeds", "42", "--iterations", "100", "--out",
               str(tmp_path), "--set", f"model={model}", "--set", f"rank={rank}", *FAST])
    assert rc == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert all(math.isfinite(r["train_r2"]) for r in runs)


def _bad_npy(tmp_path):
    p = tmp_path / "corrupt.npy"
    p.write_bytes(b"not a numpy file")
    return p


def _nan_npy(tmp_path):
    p = tmp_path / "nan.npy"
    a = np.random.default_rng(0).normal(size=(4, 5, 6))
    a[0, 0, 0] = np.nan
    np.save(p, a)
    return p


@pytest.mark.parametrize("args,message", [
    (lambda t: ["--set", f"dataset={t / 'missing.npy'}"], "not found"),
    (lambda t: ["--set", f"dataset={_bad_npy(t)}"], "not a readable .npy"),
    (lambda t: ["--set", "train_fraction=1.5"], "train_fraction"),
    (lambda t: ["--set", "rank=[8,7,8]"], "exceeds the size"),
    (lambda t: ["--methods", "adam,lbfgs"], "unknown method"),
    (lambda t: ["--set", "learning_rate=0.1"], "unknown config key"),
    (lambda t: ["--set", f"dataset={_nan_npy(t)}", "--set", "rank=[2,2,2]"], "NaN"),
    (lambda t: ["--set", "optimizer=Adamm"], "unknown base optimizer"),
])
def test_bad_input_is_refused_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    rc = main(["completion", "--iterations", "10", "--out", str(out), *args(tmp_path), *FAST])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_eager_float64_run_is_bit_identical_to_the_first_wave():
    """Golden cores written by the first wave's code (tests/data/make_completion_v1_eager_f64.py):
    refactors of the optimizers or the task must reproduce a short eager float64 run bit for bit."""
    from pathlib import Path

    golden = torch.load(Path(__file__).parent / "data" / "completion_v1_eager_f64.pt", weights_only=True)
    out = run_completion(CompletionConfig(**golden["config"]))
    assert set(out["solutions"]) == set(golden["solutions"])
    for tag, cores in golden["solutions"].items():
        assert all(torch.equal(a, b) for a, b in zip(cores, out["solutions"][tag])), tag
