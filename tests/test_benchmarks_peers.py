"""Smoke test of benchmarks/peers.py: ``--quick`` on tiny sizes writes its JSON atomically with
every row, the output checks pass and the table is printed (no timing is asserted).  Skipped
when the peers (the ``bench`` extra) are not installed."""

import importlib.util
import json

import pytest
import torch

PEERS = {"tltorch": "tensorly-torch==0.5.0", "tednet": "tednet==0.1.3", "pytorch_optimizer": "pytorch-optimizer==4.1.0"}
PIP = "pip install " + " ".join(f"'{v}'" for v in PEERS.values()) + "  (or pip install -e '.[bench]')"


def test_peers_benchmark_quick(tmp_path, capsys, load_benchmark):
    missing = [name for name in PEERS if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"peers not installed ({', '.join(missing)}): {PIP}")
    script = load_benchmark("peers")
    threads = torch.get_num_threads()
    out = tmp_path / "peers.json"
    try:
        assert script.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "| case |" in printed and "ours / peer" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peers.json", "peers.md"]  # atomic: no temporary left
    res = json.loads(out.read_text())
    assert res["quick"] and res["complete"] and res["rounds"] == res["sam_rounds"] == 3 and res["skipped"] == {}
    assert res["command"].startswith("python benchmarks/peers.py --quick") and res["machine"]
    assert set(res["peer_versions"]) == set(PEERS)
    peers_by_case = {}
    for r in res["rows"]:
        peers_by_case.setdefault(r["case"], set()).add(r["peer"])
        q = r["ratio"]
        assert q["n"] == 3 and q["min"] <= q["median"] <= q["max"] and r["ours_ms"] > 0 and r["peer_ms"] > 0
    groups = {r["group"] for r in res["rows"]}
    assert groups == {"linear", "conv", "network", "optimizer"}
    # 4 linear formats, 4 conv formats, Tucker conv at tltorch's channel rank, SGD step, SAM step
    assert len(peers_by_case) == 4 + 4 + 1 + 2
    assert any("at tltorch's channel rank" in c for c in peers_by_case)
    assert all(any("dense" in p for p in ps) for c, ps in peers_by_case.items()
               if not c.startswith("SAM") and "channel rank" not in c)
    assert any(p.startswith("tednet TRResNet") for ps in peers_by_case.values() for p in ps)
    checks = [r["check"] for r in res["rows"] if r.get("check")]
    assert checks and all(c["ok"] and c["max_abs_diff"] < 1e-10 for c in checks)
    assert {o["peer"] for o in res["left_out"]} == {"tltorch"}  # no tensor-ring layer in tltorch
    assert res["clock"] == "wall" and (tmp_path / "peers.md").read_text() == res["markdown"]
    with pytest.raises(SystemExit):  # CPU time sums over threads: --clock cpu needs one
        script.main(["--quick", "--threads", "2", "--clock", "cpu", "--out", str(out)])
    assert "--clock cpu needs --threads 1" in capsys.readouterr().err


def test_peers_are_timed_initialised(load_benchmark):
    """tltorch's convs start as torch.empty memory: the benchmark initialises them, and refuses to
    time any layer with non-finite parameters."""
    if importlib.util.find_spec("tltorch") is None:
        pytest.skip(f"tltorch not installed: {PIP}")
    script = load_benchmark("peers")
    peers, _ = script.load_peers()
    for fmt in ("cp", "tt", "tucker"):
        for impl in ("factorized", "reconstructed"):
            conv = script.tltorch_conv(peers["tltorch"], 8, fmt, 3, impl)
            params = dict(conv.named_parameters())
            assert all(torch.isfinite(p).all() and float(p.abs().max()) < 10 for p in params.values())
            assert all(float(p.abs().max()) > 0 for n, p in params.items() if n != "bias")
    bad = torch.nn.Linear(3, 3)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="layer x: non-finite parameters \\['weight'\\]"):
        script.check_finite("layer x", bad)
