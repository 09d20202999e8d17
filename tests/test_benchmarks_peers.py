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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peers.json"]  # atomic: no temporary file left
    res = json.loads(out.read_text())
    assert res["quick"] and res["complete"] and res["rounds"] == 3 and res["skipped"] == {}
    assert res["command"].startswith("python benchmarks/peers.py --quick") and res["machine"]
    assert set(res["peer_versions"]) == set(PEERS)
    peers_by_case = {}
    for r in res["rows"]:
        peers_by_case.setdefault(r["case"], set()).add(r["peer"])
        q = r["ratio"]
        assert q["n"] == 3 and q["min"] <= q["median"] <= q["max"] and r["ours_ms"] > 0 and r["peer_ms"] > 0
    groups = {r["group"] for r in res["rows"]}
    assert groups == {"linear", "conv", "network", "optimizer"}
    assert len(peers_by_case) == 4 + 4 + 2  # 4 linear formats, 4 conv formats, SGD step, SAM step
    assert all(any("dense" in p for p in ps) for c, ps in peers_by_case.items() if not c.startswith("SAM"))
    assert any(p.startswith("tednet TRResNet") for ps in peers_by_case.values() for p in ps)
    checks = [r["check"] for r in res["rows"] if r.get("check")]
    assert checks and all(c["ok"] and c["max_abs_diff"] < 1e-10 for c in checks)
    assert {o["peer"] for o in res["left_out"]} == {"tltorch"}  # no tensor-ring layer in tltorch
    assert res["clock"] == "wall"
    with pytest.raises(SystemExit):  # CPU time sums over threads: --clock cpu needs one
        script.main(["--quick", "--threads", "2", "--clock", "cpu", "--out", str(out)])
    assert "--clock cpu needs --threads 1" in capsys.readouterr().err
