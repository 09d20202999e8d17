import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tensorsam.run import (
    Loop,
    add_config_arguments,
    atomic_torch_save,
    atomic_write_json,
    config_from_args,
    config_to_dict,
    load_checkpoint,
    load_config,
    provenance,
    seed_everything,
    write_results,
)

# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass
class Inner:
    lr: float = 0.1
    momentum: float = 0.0


@dataclasses.dataclass
class Cfg:
    rank: tuple[int, ...] = (8, 6, 8)
    seeds: tuple[int, ...] = (42, 87, 100)
    lr: float = 1e-3
    iterations: int = 100
    methods: list[str] = dataclasses.field(default_factory=lambda: ["adam", "sam"])
    name: str = "covid19"
    mean_loss: bool = False
    alpha: float | None = None
    opt: Inner = dataclasses.field(default_factory=Inner)


def test_defaults_and_overrides_are_parsed_and_coerced():
    cfg = load_config(
        Cfg,
        overrides=[
            "rank=[4,3,4]",
            "seeds=1,2",
            "lr=1e-2",
            "iterations=5e4",
            "methods=adam",
            "name=123",
            "mean_loss=true",
            "alpha=0.5",
            "opt.lr=0.3",
        ],
    )
    assert cfg.rank == (4, 3, 4) and cfg.seeds == (1, 2)
    assert cfg.lr == 0.01 and cfg.iterations == 50000 and isinstance(cfg.iterations, int)
    assert cfg.methods == ["adam"] and cfg.name == "123" and cfg.mean_loss is True
    assert cfg.alpha == 0.5 and cfg.opt == Inner(lr=0.3)
    assert load_config(Cfg) == Cfg()
    assert load_config(Cfg, overrides=["alpha=null"]).alpha is None
    assert load_config(Cfg, overrides=["alpha=None"]).alpha is None


@pytest.mark.parametrize(
    ("suffix", "text"),
    [
        (".yaml", "rank: [2, 2, 2]\nlr: 1.0e-4\nopt:\n  momentum: 0.9\n"),
        (".toml", "rank = [2, 2, 2]\nlr = 1e-4\n[opt]\nmomentum = 0.9\n"),
        (".json", '{"rank": [2, 2, 2], "lr": 1e-4, "opt": {"momentum": 0.9}}'),
    ],
)
def test_config_files_then_overrides(tmp_path, suffix, text):
    path = tmp_path / f"cfg{suffix}"
    path.write_text(text)
    cfg = load_config(Cfg, path, overrides=["lr=0.5"])
    assert cfg.rank == (2, 2, 2) and cfg.lr == 0.5 and cfg.opt == Inner(momentum=0.9)
    assert load_config(Cfg, path).lr == 1e-4


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key\(s\) rnak.*valid keys: .*rank"):
        load_config(Cfg, overrides=["rnak=[1,2,3]"])
    path = tmp_path / "c.yaml"
    path.write_text("bogus: 1\n")
    with pytest.raises(ValueError, match="bogus.*valid keys"):
        load_config(Cfg, path)
    with pytest.raises(ValueError, match=r"opt\.nesterov.*opt\.lr"):
        load_config(Cfg, overrides=["opt.nesterov=true"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("iterations=abc", "iterations"),
        ("iterations=1.5", "iterations"),
        ("lr=fast", "lr"),
        ("mean_loss=3", "mean_loss"),
        ("rank=[1,x]", "rank"),
        ("opt=7", "opt"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ValueError, match=f"config key '{key}'"):
        load_config(Cfg, overrides=[override])


def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(Cfg, tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(Cfg, bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{rank: ")
    with pytest.raises(ValueError, match="cannot parse config file"):
        load_config(Cfg, broken)
    other = tmp_path / "c.ini"
    other.write_text("[x]")
    with pytest.raises(ValueError, match=r"\.yaml"):
        load_config(Cfg, other)
    with pytest.raises(ValueError, match="key=value"):
        load_config(Cfg, overrides=["lr"])


def test_command_line_config_flags(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--seeds", default=None)
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.2\niterations: 7\n")
    args = parser.parse_args(
        ["--config", str(path), "--set", "lr=0.3", "--set", "rank=[1,1,1]", "--seeds", "5,6"]
    )
    cfg = config_from_args(Cfg, args, iterations=args.iterations, seeds=args.seeds)
    assert (cfg.lr, cfg.iterations, cfg.rank, cfg.seeds) == (0.3, 7, (1, 1, 1), (5, 6))
    args = parser.parse_args(["--iterations", "9"])
    assert config_from_args(Cfg, args, iterations=args.iterations).iterations == 9
    with pytest.raises(ValueError, match="unknown config key"):
        config_from_args(Cfg, parser.parse_args([]), epochs=3)


def test_config_to_dict_is_json_ready():
    d = config_to_dict(Cfg(rank=(1, 2, 3)))
    assert d["rank"] == [1, 2, 3] and d["opt"] == {"lr": 0.1, "momentum": 0.0}
    assert json.loads(json.dumps(d)) == d


# ----------------------------------------------------------------------------- seeding, files


def test_seed_everything_repeats_all_three_generators():
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(3)

    seed_everything(7)
    a = draw()
    seed_everything(7)
    b = draw()
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])


def test_provenance_fields():
    p = provenance(started=0.0)
    for key in ("tensorsam", "torch", "tensorly", "python", "git_commit", "hostname", "argv", "device"):
        assert key in p
    assert p["started_utc"].startswith("1970-01-01")


def _no_tmp(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_torch_save({"x": torch.ones(2)}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises
        atomic_torch_save({"f": lambda: 0}, path)
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(2))
    assert _no_tmp(tmp_path)
    atomic_write_json(tmp_path / "r.json", {"t": torch.tensor([1.0, 2.0]), "n": np.int64(3), "p": tmp_path})
    assert json.loads((tmp_path / "r.json").read_text()) == {"t": [1.0, 2.0], "n": 3, "p": str(tmp_path)}


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(bad)
    full = tmp_path / "full.pt"
    atomic_torch_save({"state": torch.arange(1000)}, full)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(full.read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated.pt"):
        load_checkpoint(truncated)


def test_write_results_layout(tmp_path):
    started = time.time()
    out = write_results(
        tmp_path / "sub" / "results.json",
        task="completion",
        config=Cfg(),
        runs=[{"method": "adam", "seed": 42, "train_r2": torch.tensor(0.9)}],
        extra={"masks": {"seed": 42}},
        started=started,
    )
    on_disk = json.loads((tmp_path / "sub" / "results.json").read_text())
    assert on_disk == out
    assert set(out) == {"task", "config", "runs", "provenance", "wall_seconds", "masks"}
    assert out["runs"][0]["train_r2"] == pytest.approx(0.9) and out["config"]["rank"] == [8, 6, 8]
    assert 0 <= out["wall_seconds"] < 60
    with pytest.raises(ValueError, match="clash"):
        write_results(tmp_path / "x.json", task="t", config={}, runs=[], extra={"runs": 1}, started=started)
    with pytest.raises(ValueError, match="runs must be a list"):
        write_results(tmp_path / "x.json", task="t", config={}, runs={"a": 1}, started=started)
    assert not (tmp_path / "x.json").exists()


# ----------------------------------------------------------------------------- the loop, in process


class Counter:
    """A tracker-like object: anything with state_dict/load_state_dict can be checkpointed."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, sd):
        self.n = sd["n"]


def _train(total, ckpt, resume=False, every=4, interrupt_at=None, progress=False):
    """Adam on a small MLP with fresh torch/numpy/python randomness in every iteration."""
    seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    counter = Counter()
    loop = Loop(
        total,
        state={"model": model, "opt": opt, "sched": sched, "counter": counter},
        checkpoint=ckpt,
        every=every,
        resume=resume,
        desc="test",
        progress=progress,
    )
    loop.extra.setdefault("losses", [])
    for it in loop:
        x = torch.randn(16, 3) * (1 + np.random.rand()) + random.random()
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        counter.n += 1
        loop.extra["losses"].append(loss.item())
        loop.log(loss=loss.detach(), it=it)
        if it == interrupt_at:
            os.kill(os.getpid(), signal.SIGTERM)
    return model, loop, counter


def test_sigterm_saves_at_the_boundary_and_resume_is_bit_identical(tmp_path):
    reference, ref_loop, _ = _train(13, tmp_path / "ref.pt")
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        _train(13, ckpt, interrupt_at=6)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert _no_tmp(tmp_path)
    saved = load_checkpoint(ckpt)
    assert saved["iteration"] == 7 and saved["state"]["counter"] == {"n": 7}

    model, loop, counter = _train(13, ckpt, resume=True)
    assert loop.start == 7 and counter.n == 13
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    assert loop.extra["losses"] == ref_loop.extra["losses"]
    assert load_checkpoint(ckpt)["iteration"] == 13

    # resuming a finished run runs nothing and restores the final state
    again, done, _ = _train(13, ckpt, resume=True)
    assert done.start == 13 and all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters()))


def test_without_resume_a_checkpoint_is_overwritten(tmp_path):
    ckpt = tmp_path / "run.pt"
    _train(8, ckpt)
    _, loop, counter = _train(3, ckpt, every=100)
    assert loop.start == 0 and counter.n == 3 and load_checkpoint(ckpt)["iteration"] == 3


def test_loop_refuses_mismatched_checkpoints_and_bad_arguments(tmp_path):
    ckpt = tmp_path / "run.pt"
    _train(8, ckpt)
    with pytest.raises(ValueError, match="beyond this run's total 5"):
        _train(5, ckpt, resume=True)
    with pytest.raises(ValueError, match="holds state"):
        Loop(8, state={"model": torch.nn.Linear(1, 1)}, checkpoint=ckpt, resume=True)
    with pytest.raises(ValueError, match="state entry 'x'"):
        Loop(3, state={"x": object()})
    with pytest.raises(ValueError, match="every"):
        Loop(3, state={}, every=0)
    with pytest.raises(ValueError, match="total"):
        Loop(-1, state={})
    foreign = tmp_path / "foreign.pt"
    torch.save({"a": 1}, foreign)
    with pytest.raises(ValueError, match="not a tensorsam loop checkpoint"):
        Loop(3, state={}, checkpoint=foreign, resume=True)


def test_unloadable_state_is_refused_before_replacing_a_checkpoint(tmp_path):
    ckpt = tmp_path / "run.pt"
    _train(4, ckpt)
    good = ckpt.read_bytes()
    loop = Loop(3, state={}, checkpoint=ckpt, progress=False)
    loop.extra["when"] = np.float64(1.5)  # numpy values are converted
    loop.extra["bad"] = Counter()  # an arbitrary object could not be resumed from
    with pytest.raises(ValueError, match="weights_only"):
        for _ in loop:
            pass
    assert ckpt.read_bytes() == good and _no_tmp(tmp_path)
    del loop.extra["bad"]
    loop.save()
    assert load_checkpoint(ckpt)["extra"] == {"when": 1.5}


def test_progress_bar_runs_and_saves_at_every(tmp_path, capsys):
    ckpt = tmp_path / "run.pt"
    _, loop, _ = _train(10, ckpt, every=3, progress=True)
    assert "test" in capsys.readouterr().err
    assert load_checkpoint(ckpt)["iteration"] == 10
    # a checkpoint only after multiples of `every` and at the end: stop before the end
    seen = []
    loop = Loop(10, state={}, checkpoint=tmp_path / "e.pt", every=3, progress=False)
    for it in loop:
        seen.append(it)
        if it == 7:
            break
    assert seen == list(range(8)) and load_checkpoint(tmp_path / "e.pt")["iteration"] == 6


# ----------------------------------------------------------------------------- SIGKILL + resume, subprocess

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from tensorsam.run import Loop, seed_everything
    torch.set_num_threads(1)
    ckpt, total, kill_at, resume, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
    seed_everything(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loop = Loop(total, state={"model": model, "opt": opt}, checkpoint=ckpt, every=25, resume=resume, progress=False)
    for it in loop:
        x = torch.randn(32, 4)
        loss = (model(x) - x[:, :2] * x[:, 2:]).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    torch.save({k: v for k, v in model.state_dict().items()}, out)
    """
)


def _start(tmp_path, *args):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, str(script), *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_sigkill_at_a_random_iteration_then_resume_is_bit_identical(tmp_path):
    total = 200
    kill_at = random.Random(1234).randrange(30, total - 1)  # after at least one checkpoint
    full = _start(tmp_path, tmp_path / "a.pt", total, -1, 0, tmp_path / "full.pt")
    killed = _start(tmp_path, tmp_path / "b.pt", total, kill_at, 0, tmp_path / "never.pt")
    code, err = _finish(full)
    assert code == 0, err
    assert _finish(killed)[0] == -signal.SIGKILL
    assert load_checkpoint(tmp_path / "b.pt")["iteration"] == (kill_at + 1) // 25 * 25
    assert not (tmp_path / "never.pt").exists()

    code, err = _finish(_start(tmp_path, tmp_path / "b.pt", total, -1, 1, tmp_path / "resumed.pt"))
    assert code == 0, err
    a = torch.load(tmp_path / "full.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
