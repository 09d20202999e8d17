"""Smoke test of benchmarks/finetune.py: its main() with --quick (tiny-bert, no download) writes every
case, finite positive paired ratios to Adam, and BAR on FLoRA / LoRETTA as skipped (no timing asserted)."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")



def test_finetune_benchmark_quick_writes_every_case_and_paired_ratios(tmp_path, capsys, load_benchmark):
    out = tmp_path / "finetune.json"
    threads = torch.get_num_threads()
    try:
        assert load_benchmark("finetune").main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "| adapter |" in printed and "DAS/Adam" in printed and "nbar on flora: skipped" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetune.json"]   # atomic: no temporary file left
    res = json.loads(out.read_text())
    assert res["quick"] and res["model"] == "tiny-bert" and res["device"] == "cpu"
    assert res["settings"]["repeats"] == 2 and res["settings"]["steps_per_repeat"] == 1
    for key in ("command", "torch", "transformers", "peft", "threads", "cpu_model", "date", "settings"):
        assert res[key]

    ok = {(a, m) for a in ("lora", "flora", "loretta") for m in ("adam", "das", "sam")} | {("lora", "nbar")}
    skipped = {("flora", "nbar"), ("loretta", "nbar")}
    assert {(c["adapter"], c["method"]) for c in res["cases"] if c["status"] == "ok"} == ok
    assert {(c["adapter"], c["method"]) for c in res["cases"] if c["status"] == "skipped"} == skipped
    assert {(s["adapter"], s["method"]) for s in res["skipped"]} == skipped
    assert all("pairs" in s["reason"] for s in res["skipped"])

    rows = {(r["adapter"], r["method"]): r for r in res["rows"]}
    assert set(rows) == ok
    for (adapter, method), r in rows.items():
        assert math.isfinite(r["ms_per_step"]) and r["ms_per_step"] > 0
        assert math.isfinite(r["opt_ms_per_step"]) and 0 < r["opt_ms_per_step"] < r["ms_per_step"]
        for key in ("vs_adam", "opt_vs_adam_opt"):
            s = r[key]
            assert s["n"] == 2 and all(math.isfinite(s[k]) and s[k] > 0 for k in ("median", "p25", "p75", "min", "max"))
            assert s["min"] <= s["median"] <= s["max"]
            if method == "adam":
                assert s["median"] == s["min"] == s["max"] == 1.0
        assert len(res["raw_seconds_per_step"][f"{adapter} {method}"]) == 2
        assert len(res["raw_opt_seconds_per_step"][f"{adapter} {method}"]) == 2

    ratios = {(q["adapter"], q["ratio"]): q for q in res["ratios"]}
    assert set(ratios) == {(a, f"{m.upper()}/Adam") for a, m in ok if m != "adam"}
    assert ratios[("lora", "DAS/Adam")]["goal"] == 1.03 and ratios[("lora", "NBAR/Adam")]["goal"] == 1.03
    assert ratios[("lora", "SAM/Adam")]["goal"] is None and ratios[("lora", "SAM/Adam")]["met"] is None


def test_minilm_config_model_has_minilm_sizes_and_adapts_query_value(load_benchmark):
    """--model minilm-config: MiniLM-L6's sizes from a BertConfig (random weights, no package), with
    the adapters and head of minilm."""
    bench = load_benchmark("finetune")
    model = bench.bench_model("minilm-config")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (6, 384, 12, 1536)
    assert bench.vocab_size("minilm-config") == cfg.vocab_size == 30522 and cfg.num_labels == bench.NUM_CLASSES
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert {"query", "value", "classifier"} <= names
    assert 22e6 < sum(p.numel() for p in model.parameters()) < 24e6     # all-MiniLM-L6-v2: 22.7M


def test_rebalance_case_builds_and_steps(tmp_path, load_benchmark):
    """rebalance takes no strength: method_options must not pass alpha (it did, and the factory refused)."""
    out = tmp_path / "f.json"
    threads = torch.get_num_threads()
    try:
        assert load_benchmark("finetune").main(["--quick", "--device", "cpu", "--adapters", "flora", "--methods", "adam,rebalance",
                              "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    assert {(r["adapter"], r["method"]) for r in res["rows"]} == {("flora", "adam"), ("flora", "rebalance")}
