"""Smoke test of benchmarks/vision.py: runs with --quick and writes its results file (no timing asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_vision_benchmark_quick_writes_rows_ratios_and_pipeline_share(tmp_path):
    out = tmp_path / "vision.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vision.py"), "--quick", "--device", "cpu",
                           "--out", str(out)], check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "| model |" in proc.stdout and "DAS/SGD" in proc.stdout
    res = json.loads(out.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision.json"]   # atomic: no temporary file left
    assert res["quick"] and res["device"] == "cpu" and res["settings"]["repeats"] == 2
    for key in ("command", "torch", "threads", "cpu_model", "date", "settings"):
        assert res[key]
    rows = {(r["model"], r["method"]) for r in res["rows"]}
    dense, tr = "ResNet-20", "TR-ResNet-20 r4"
    assert rows == {(dense, m) for m in ("sgd", "sam", "sam-every-2")} | {
        (tr, m) for m in ("sgd", "sam", "das", "rebalance", "sam-every-2")}
    for r in res["rows"]:
        assert r["images_per_s"] > 0 and 0 < r["pipeline_share"] < 1 and r["vs_sgd"]["n"] == 2
    assert {(q["model"], q["ratio"]) for q in res["ratios"]} == {(dense, "SAM/SGD"), (tr, "SAM/SGD"), (tr, "DAS/SGD"),
                                                             (tr, "SGD / dense SGD")}  # paired across models
    assert all(q["goal"] in (1.02, 2.05, 1.03) and q["min"] <= q["median"] <= q["max"] for q in res["ratios"])
    assert {p["model"] for p in res["pipeline"]} == {dense, tr}
    assert all(0 < p["share_of_sgd_step"]["median"] < 1 for p in res["pipeline"])
    assert res["host_syncs"] is None                 # counted on CUDA only
    assert len(res["raw_seconds_per_step"][f"{tr} das"]) == 2
