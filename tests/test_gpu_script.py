"""The GPU session script without a GPU: benchmarks/sync_check.py's CPU dry run and environment record,
the vision benchmark's ``+compile`` methods, and benchmarks/gpu.sh's step and budget logic (DEVICE=cpu)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_sync_check_cpu_dry_run_runs_every_method_and_says_it_needs_cuda(tmp_path, monkeypatch, threads, capsys,
                                                                           load_benchmark):
    monkeypatch.setenv("TENSORSAM_AUTO_TIMING", "0")
    sync_check = load_benchmark("sync_check")
    out = tmp_path / "sync.json"
    assert sync_check.main(["--device", "cpu", "--steps", "2", "--out", str(out)]) == 0
    assert "DRY RUN" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sync.json"]     # atomic: no temporary file left
    res = json.loads(out.read_text())
    assert res["dry_run"] and res["all_pass"] is None and not res["failed"] and "needs CUDA" in res["note"]
    cases = {c["case"]: c for c in res["cases"]}
    assert set(cases) == {c[0] for c in sync_check.CASES}
    assert {"sgd", "sam", "asam", "das", "nbar", "obar", "rebalance", "sam-every-2", "sam-random-0.5"} <= set(cases)
    for c in cases.values():
        assert c["status"] == "dry-run", c
        assert c["first_step_guarded"]["ok"] and c["first_step_guarded"]["steps"] == 2
    assert cases["sam"]["first_step_guarded"]["sam_steps"] == 2
    assert cases["sam-every-2"]["first_step_guarded"]["sam_steps"] == 1
    assert res["environment"]["torch"] == torch.__version__


def test_sync_check_records_errors_per_case_and_writes_the_environment(tmp_path, monkeypatch, threads, load_benchmark):
    sync_check = load_benchmark("sync_check")
    rec = sync_check.check_method("bad", "no-such-method", "sgd", 2, torch.device("cpu"))
    assert rec["status"] == "error" and "unknown method" in rec["error"]
    env = tmp_path / "env.json"
    assert sync_check.main(["--env", str(env)]) == 0
    res = json.loads(env.read_text())
    for key in ("torch", "torch_cuda", "cuda_available", "gpus", "python", "packages", "commit"):
        assert key in res
    with pytest.raises(SystemExit):
        sync_check.main(["--cases", "nope", "--out", str(tmp_path / "x.json")])


def test_vision_compile_suffix_sets_compile_and_keeps_the_base_method(load_benchmark):
    vision = load_benchmark("vision")
    from tensorsam.models import resnet
    from tensorsam.tasks.vision.config import VisionConfig

    model, cfg = resnet(20, "tr", 2), VisionConfig(dataset="fashion-mnist")
    assert vision.base_method("das+compile") == "das"
    opts = vision.method_options(cfg, "das+compile", model)
    assert opts["compile"] is True and opts["alpha"] == cfg.alpha
    assert "compile" not in vision.method_options(cfg, "das", model)
    with pytest.raises(ValueError, match="suffix"):
        vision.method_options(cfg, "das+fast", model)


def _gpu_sh(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, str]:
    out = tmp_path / "out"
    full = {**os.environ, "DEVICE": "cpu", "OUT": str(out), "PYTHON": sys.executable, **env}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True,
                          timeout=300, env=full, check=False)
    log = (out / "gpu.log").read_text() if (out / "gpu.log").exists() else ""
    return proc, log


needs_shell = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                 reason="needs bash and coreutils' timeout")


@needs_shell
def test_gpu_sh_with_no_budget_skips_every_step(tmp_path):
    proc, log = _gpu_sh(tmp_path, BUDGET="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("env", "sync", "layers", "vision", "finetune", "compile", "e5"):
        assert f"status: {name}: skipped" in log, log
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu.log"]


@needs_shell
def test_gpu_sh_dry_run_of_the_sync_step(tmp_path):
    proc, log = _gpu_sh(tmp_path, BUDGET="240", STEPS="sync")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "status: sync: exit status 0" in log and "DRY RUN" in log
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu.log", "sync.json"]
    assert json.loads((tmp_path / "out" / "sync.json").read_text())["dry_run"]
