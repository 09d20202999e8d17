import dataclasses
import inspect
import json
import subprocess
import sys

import pytest

from tensorsam.cli import main
from tensorsam.run import NEUTRAL, grid_fields, load_config, result_fields
from tensorsam.tasks import TASKS, get_task
from tensorsam.tasks.completion import CompletionConfig, prepare
from tensorsam.tasks.flatness import FlatnessConfig
from tensorsam.tasks.toy import ToyConfig


def test_every_task_has_its_parts_and_a_typed_config():
    assert list(TASKS)[:3] == ["completion", "toy", "flatness"]
    for name, task in TASKS.items():
        cfg_cls = task.get("config")
        assert dataclasses.is_dataclass(cfg_cls), name
        for f in dataclasses.fields(cfg_cls):
            assert isinstance(f.metadata.get("affects_results"), bool), (name, f.name)
        params = inspect.signature(task.get("run")).parameters
        assert list(params)[:2] == ["cfg", "out_dir"], name
        assert {"resume", "progress", "started"} <= set(params), name
        assert callable(task.get("figures")) and callable(task.get("summary")), name
    with pytest.raises(ValueError, match=r"unknown task 'nope'; expected one of \['completion', 'compress', 'finetune', 'flatness'"):
        get_task("nope")


def test_building_the_command_line_imports_no_torch():
    code = ("import sys; from tensorsam.cli import build_parser; build_parser().format_help(); "
            "assert 'torch' not in sys.modules, 'torch imported'; print('light')")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert out.returncode == 0 and "light" in out.stdout, out.stderr


def test_result_fields_are_those_that_change_results():
    cfg = CompletionConfig()
    fields = result_fields(cfg)
    assert "checkpoint_every" not in fields
    assert {"compile", "threads", "dtype", "lr", "log_every", "methods", "seeds"} <= set(fields)
    assert list(fields) == [f.name for f in dataclasses.fields(cfg) if f.name != "checkpoint_every"]
    assert fields["rank"] == [8, 6, 8]
    cell = result_fields(cfg, grid=False)
    assert "methods" not in cell and "seeds" not in cell and "lr" in cell
    assert grid_fields(cfg) == {"methods": "method", "seeds": "seed"}
    assert grid_fields(ToyConfig()) == {"noises": "noise", "methods": "method"}
    assert set(result_fields(FlatnessConfig())) == {f.name for f in dataclasses.fields(FlatnessConfig)}

    @dataclasses.dataclass
    class Plain:  # no metadata: every field counts
        a: int = 1
        b: int = dataclasses.field(default=2, metadata=NEUTRAL)

    assert result_fields(Plain()) == {"a": 1}


@pytest.mark.parametrize("make,message", [
    (lambda: CompletionConfig(model="foo"), "unknown model 'foo'; expected one of ['tucker', 'cp', 'tt',"),
    (lambda: CompletionConfig(methods=["adam", "lbfgs"]), "unknown method 'lbfgs'"),
    (lambda: load_config(CompletionConfig, overrides=["methods=adam,lbfgs"]),
     "config key 'methods': unknown method 'lbfgs'"),
    (lambda: load_config(CompletionConfig, overrides=["dtype=float16"]), "config key 'dtype': unknown dtype"),
    (lambda: CompletionConfig(seeds=[]), "seeds is empty"),
    (lambda: CompletionConfig(lr=-1.0), "lr must be a non-negative number"),
    (lambda: CompletionConfig(optimizer="Adamm"), "unknown base optimizer"),
    (lambda: ToyConfig(methods=["adam"]), "unknown method 'adam'"),
    (lambda: FlatnessConfig(directions=["up"]), "unknown direction 'up'"),
    (lambda: FlatnessConfig(points=1), "points must be at least 2"),
])
def test_bad_values_are_refused_on_construction(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert message in str(err.value)


def test_a_combination_no_run_can_use_is_refused_before_running():
    cfg = CompletionConfig(model="cp", rank=[4])  # fine for building a model
    with pytest.raises(ValueError, match="method 'hooi' fits a Tucker model"):
        prepare(cfg)
    cfg.methods, cfg.lr = ["adam"], float("nan")  # assigned after construction: still refused
    with pytest.raises(ValueError, match="lr must be"):
        prepare(cfg)


def test_toy_grid_grows_by_a_noise_level(tmp_path, capsys):
    base = ["toy", "--iterations", "20", "--out", str(tmp_path), "--set", "size=6", "--set", "rank=2",
            "--set", "log_every=10"]
    assert main([*base, "--noises", "0"]) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    capsys.readouterr()
    assert main([*base, "--noises", "0,1", "--resume"]) == 0
    assert "4 cells: kept 2 finished earlier, ran 2" in capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())
    cells = [(r["method"], r["noise"]) for r in res["runs"]]
    assert cells == [("gd", 0.0), ("sam", 0.0), ("gd", 1.0), ("sam", 1.0)]
    assert res["runs"][:2] == first["runs"] and res["group_by"] == ["method", "noise"]
