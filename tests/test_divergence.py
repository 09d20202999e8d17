"""Divergence is a result: a non-finite loss is caught on the device without a host sync in the
step, read at the evaluation cadence; the run stops there and is recorded with ``status:
"diverged"`` and its step, the grid carries on, results files stay strict JSON, and the command
exits 3 unless ``--allow-divergence``."""

import importlib
import json
import math
from types import SimpleNamespace

import pytest
import test_optim_common
import torch
import torch.nn.functional as F
from torch import nn

from tensorsam.cli import main
from tensorsam.run import write_results
from tensorsam.run.io import atomic_write_json
from tensorsam.run.loop import Divergence
from tensorsam.tasks.completion import CompletionConfig, run_completion
from tensorsam.train import fit

fit_module = importlib.import_module("tensorsam.train.fit")     # (tensorsam.train.fit is the function)
objective = importlib.import_module("tensorsam.tasks.completion.objective")

forbid_sync = test_optim_common.forbid_sync   # the fixture: Tensor.item/tolist/__bool__/__float__ refused

FAST = ["--set", "compile=false", "--no-progress"]
# SGD at lr 1e3 on the completion loss: the first step sends the cores to inf, the loss of step 2 is NaN
EXPLODE = ["--set", "optimizer=SGD", "--set", "lr=1000.0"]


def strict_json(text: str):
    """``json.loads`` that refuses the non-standard NaN / Infinity constants."""
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


# -- the clock ---------------------------------------------------------------------------------------


def test_divergence_clock_keeps_the_first_non_finite_step_and_tolerates_skipped_steps():
    losses = [1.0, math.inf, 2.0, math.nan, math.nan, 3.0]
    plain, tolerant = Divergence({}, "cpu"), Divergence({}, "cpu", tolerant=True)
    reads = []
    for step, v in enumerate(losses, start=1):
        plain.update(torch.tensor(v), step)
        tolerant.update(torch.tensor(v), step)
        reads.append((plain.read(step), tolerant.read(step)))
    assert [p for p, _ in reads] == [None, 2, 2, 2, 2, 2]
    # tolerant: one skipped step (2) is not a divergence; the streak 4-5 is, while it lasts
    assert [t for _, t in reads] == [None, None, None, None, 4, None]
    store = {}
    Divergence(store, "cpu").update(torch.tensor(math.inf), 7)
    assert Divergence(store, "cpu").read(9) == 7          # kept in the store: a resumed run continues


# -- the generic epoch loop ------------------------------------------------------------------------


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def blobs(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g)


def exploding_loss(out, y, reduction="mean"):
    """Cross-entropy times 1e30: finite at the start, and SGD's first step sends the weights to inf."""
    return F.cross_entropy(out, y, reduction=reduction) * 1e30


def test_a_diverged_fit_stops_at_the_next_evaluation_and_says_where():
    model = tiny()
    ran = []
    res = fit(model, torch.optim.SGD(model.parameters(), lr=1.0), blobs(), val=blobs(32, 2), epochs=4,
              batch_size=8, eval_every=5, loss_fn=exploding_loss, progress=False, on_step=ran.append)
    assert res.status == "diverged" and res.diverged_at == 2
    assert len(ran) == 4                 # steps 1..5 ran; the read after step 5 stopped the run
    assert res.history == [] and res.final == {} and res.best_state is None
    good = fit(tiny(), torch.optim.SGD(tiny().parameters(), lr=0.1), blobs(), epochs=1, batch_size=8,
               progress=False)
    assert good.status == "ok" and good.diverged_at is None


@pytest.mark.parametrize("skipper", ["scaler", "skip_nonfinite"])
def test_a_step_skipped_on_purpose_is_not_a_divergence_but_a_persistent_one_is(skipper):
    from tensorsam.optim import build_optimizer

    def run(poison):
        model = tiny()
        if skipper == "scaler":
            opt, scaler = torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu")
        else:
            opt = build_optimizer("sam", model.parameters(), rho=0.05, lr=0.1, skip_nonfinite=True)
            scaler = None
        now = {"step": 1}                # the step being taken (1-based)

        def loss_fn(out, y, reduction="mean"):          # +inf on the steps in ``poison``
            loss = F.cross_entropy(out, y, reduction=reduction)
            return loss * math.inf if reduction == "mean" and now["step"] in poison else loss

        return fit(model, opt, blobs(), epochs=2, batch_size=8, eval_every=4, scaler=scaler, loss_fn=loss_fn,
                   progress=False, on_step=lambda step: now.update(step=step + 2))

    once = run({4})                      # skipped, right before a read, then finite again
    assert once.status == "ok" and len(once.history) == 4
    persistent = run(set(range(6, 17)))
    assert persistent.status == "diverged" and persistent.diverged_at == 6


# -- no host sync in the step --------------------------------------------------------------------


@pytest.fixture
def reads_refused(forbid_sync, monkeypatch):
    """Host reads of a tensor refused (``forbid_sync``) from the start of a training step until the
    next evaluation point: ``arm(owner, name)`` makes a call of ``owner.name`` start a step,
    ``disarm(owner, name)`` an evaluation point.  Between them lie the step, the divergence clock's
    update and whatever the loop does between evaluation points.  ``seen`` counts both."""
    seen = {"steps": 0, "reads": 0}

    def wrap(owner, name, on):
        original = getattr(owner, name)

        def call(*a, **k):
            forbid_sync["on"] = on
            seen["steps" if on else "reads"] += 1
            return original(*a, **k)

        monkeypatch.setattr(owner, name, call)

    yield SimpleNamespace(arm=lambda o, n: wrap(o, n, True), disarm=lambda o, n: wrap(o, n, False), seen=seen,
                          state=forbid_sync)
    forbid_sync["on"] = False


def test_step_has_no_host_sync_for_divergence_detection(reads_refused):
    reads_refused.arm(fit_module, "train_step")
    reads_refused.disarm(Divergence, "read")
    model = tiny()
    res = fit(model, torch.optim.SGD(model.parameters(), lr=1.0), blobs(), epochs=2, batch_size=8, eval_every=5,
              loss_fn=exploding_loss, progress=False)
    assert res.status == "diverged" and res.diverged_at == 2
    assert reads_refused.seen == {"steps": 5, "reads": 1}
    model = tiny()
    res = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), blobs(), val=blobs(16, 2), epochs=2,
              batch_size=8, eval_every=5, progress=False)
    assert res.status == "ok" and reads_refused.seen == {"steps": 5 + 16, "reads": 1 + 4}


def test_completion_step_has_no_host_sync_for_divergence_detection(reads_refused, monkeypatch):
    cfg = CompletionConfig(methods=["adam", "sam"], seeds=[42], iterations=30, log_every=10, compile=False,
                           dtype="float64")
    plain = run_completion(cfg)["runs"]
    original = objective.Objective.step_fn

    def step_fn(self, method, opt):
        step = original(self, method, opt)

        def armed():                     # a training step: reads refused from here to the next read
            reads_refused.state["on"] = True
            reads_refused.seen["steps"] += 1
            return step()

        return armed

    monkeypatch.setattr(objective.Objective, "step_fn", step_fn)
    reads_refused.disarm(Divergence, "read")
    guarded = run_completion(cfg)["runs"]
    assert [r["status"] for r in guarded] == ["ok", "ok"]
    assert [r["trace"]["loss"] for r in guarded] == [r["trace"]["loss"] for r in plain]
    assert reads_refused.seen == {"steps": 60, "reads": 6}


# -- the completion grid, its results file and the command -------------------------------------------


def test_a_diverged_run_is_recorded_with_its_step_and_the_grid_carries_on(tmp_path, capsys):
    out = tmp_path / "e1"
    args = ["completion", "--methods", "adam,hooi", "--seeds", "42,87", "--iterations", "30", "--out", str(out),
            "--set", "log_every=10", "--set", "hooi_iterations=5", *EXPLODE, *FAST]
    assert main(args) == 3
    printed = capsys.readouterr()
    res = strict_json((out / "results.json").read_text())
    runs = {(r["method"], r["seed"]): r for r in res["runs"]}
    assert list(runs) == [("adam", 42), ("hooi", 42), ("adam", 87), ("hooi", 87)]
    for seed in (42, 87):
        adam, hooi = runs[("adam", seed)], runs[("hooi", seed)]
        assert adam["status"] == "diverged" and adam["diverged_at"] == 2
        assert adam["train_r2"] is None and adam["info"]["iterations"] == 0
        assert hooi["status"] == "ok" and "diverged_at" not in hooi and math.isfinite(hooi["train_r2"])
        assert f"diverged: method=adam seed={seed} at step 2" in printed.out
    assert "2 of 4 run(s) diverged" in printed.err
    # the diverged cells are finished results: resuming keeps them, and the flag allows them
    assert main([*args, "--resume", "--allow-divergence"]) == 0
    assert "diverged: method=adam seed=42 at step 2" in capsys.readouterr().out


def test_a_short_divergence_free_run_says_ok_and_exits_0(tmp_path):
    rc = main(["completion", "--methods", "adam", "--seeds", "42", "--iterations", "20", "--out", str(tmp_path),
               "--set", "log_every=10", *FAST])
    assert rc == 0
    (run,) = strict_json((tmp_path / "results.json").read_text())["runs"]
    assert run["status"] == "ok" and "diverged_at" not in run


def test_the_toy_records_divergence_too(tmp_path, capsys):
    rc = main(["toy", "--noises", "0", "--iterations", "40", "--out", str(tmp_path), "--set", "lr=5.0",
               "--set", "log_every=10", "--no-progress"])
    assert rc == 3
    runs = strict_json((tmp_path / "results.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["diverged", "diverged"]
    assert all(isinstance(r["diverged_at"], int) and r["diverged_at"] <= 10 for r in runs)
    assert "diverged: gd noise=0 at step" in capsys.readouterr().out


def test_results_json_is_strict(tmp_path):
    nan, inf = math.nan, math.inf
    atomic_write_json(tmp_path / "a.json", {"a": nan, "b": [inf, -inf, 1.5], "t": torch.tensor([nan, 2.0]),
                                            "n": __import__("numpy").float64(nan)})
    text = (tmp_path / "a.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert strict_json(text) == {"a": None, "b": [None, None, 1.5], "t": [None, 2.0], "n": None}
    runs = [{"method": "sam", "seed": 1, "status": "diverged", "diverged_at": 3, "train_r2": nan}]
    written = write_results(tmp_path / "results.json", task="t", config={}, runs=runs, started=0.0)
    on_disk = strict_json((tmp_path / "results.json").read_text())
    assert on_disk["runs"][0]["train_r2"] is None and on_disk["runs"][0]["status"] == "diverged"
    assert written["runs"] == on_disk["runs"]
