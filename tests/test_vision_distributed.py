"""`torchrun --nproc-per-node 2 -m tensorsam vision` on digits: DDP over gloo, rank 0 writes the
results, models and checkpoints once, and a grown grid resumes under DDP running only the new cells.
(That fit under DDP follows one process, for SGD and DAS, is tests/test_train_distributed.py.)"""

import json
import subprocess
import sys

import pytest
import torch.distributed as dist
from test_distributed import _free_port

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")
pytest.importorskip("sklearn.datasets", reason="scikit-learn provides the digits data")

TINY = ["--set", "train_subset=128", "--set", "batch_size=16", "--set", "test_subset=100", "--set", "threads=1",
        "--set", "val_size=64", "--epochs", "1", "--rank", "2", "--methods", "sgd,das", "--no-progress"]


def _torchrun(out, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "tensorsam", "vision", "--out", str(out), *TINY, *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_vision_under_torchrun_runs_ddp_writes_once_and_resumes_a_grown_grid(tmp_path):
    proc = _torchrun(tmp_path, "--seeds", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == proc.stdout.count("results.json") + proc.stdout.count(".png")
    assert proc.stdout.count("results.json") == 1                   # rank 0 alone speaks and writes
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["world_size"] == 2 and [r["status"] for r in res["runs"]] == ["ok", "ok"]
    # each rank took its half of the 128 training images: 4 steps of 16 per epoch
    assert all(r["history"][-1]["step"] == 4 for r in res["runs"])
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["das_tr2_p0_seed1.pt", "sgd_tr2_p0_seed1.pt"]
    proc = _torchrun(tmp_path, "--seeds", "1,2", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 cells: kept 2 finished earlier, ran 2" in proc.stdout
    grown = json.loads((tmp_path / "results.json").read_text())
    key = lambda r: (r["method"], r["seed"])
    assert sorted(map(key, grown["runs"])) == [("das", 1), ("das", 2), ("sgd", 1), ("sgd", 2)]
    assert [r for r in grown["runs"] if r["seed"] == 1] == res["runs"]   # kept as they were
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / ".work").exists()
