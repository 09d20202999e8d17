"""Two "nodes" on 127.0.0.1: two torchrun invocations (``--nnodes 2``, ``--node-rank`` 0 and 1,
``--nproc-per-node 1``) meet through a c10d rendezvous and run ``tensorsam vision --distributed
fsdp`` on a digits subset together.  Both finish; the one that got rank 0 alone speaks and writes;
every cell split the data over the two ranks; and the final weights, gathered from both ranks'
shards into ``models/<cell>.pt``, score on the test set what the run reported."""

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from test_distributed import _free_port

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")
pytest.importorskip("sklearn.datasets", reason="scikit-learn provides the digits data")

TIMEOUT_S = 240
SET = {"train_subset": 64, "batch_size": 16, "test_subset": 50, "val_size": 32, "threads": 1}
ARGS = [*(a for k, v in SET.items() for a in ("--set", f"{k}={v}")), "--epochs", "1", "--rank", "2",
        "--methods", "sgd,das", "--distributed", "fsdp", "--no-progress"]


def _node(rank: int, port: int, out, run_id: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
           "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", run_id, "--rdzv-conf", "join_timeout=90", "--max-restarts", "0",
           "-m", "tensorsam", "vision", "--out", str(out), *ARGS]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_two_nodes_on_localhost_train_vision_together(tmp_path):
    port, run_id = _free_port(), f"tensorsam-test-{os.getpid()}"
    nodes = [_node(r, port, tmp_path, run_id) for r in (0, 1)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    for p, (_, err) in zip(nodes, outputs):
        assert p.returncode == 0, err[-3000:]
    speakers = [out for out, _ in outputs if "results.json" in out]
    assert len(speakers) == 1                                     # the process of rank 0 writes, once
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["world_size"] == 2 and res["config"]["distributed"] == "fsdp"
    assert [r["status"] for r in res["runs"]] == ["ok", "ok"]
    assert all(r["history"][-1]["step"] == 64 // 2 // 16 for r in res["runs"])   # each rank took half
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / ".work").exists()
    for run in res["runs"]:
        acc, n = _rescored(tmp_path, run)                         # up to one image's argmax tie
        assert acc == pytest.approx(run["final_test_acc"], abs=1.5 / n)


def _rescored(out, run) -> tuple[float, int]:
    """The test accuracy of the final weights in ``models/<cell>.pt`` in this one process, and the
    number of test images."""
    import torch

    from tensorsam.models import resnet
    from tensorsam.run import load_checkpoint, load_config
    from tensorsam.tasks.vision.config import VisionConfig
    from tensorsam.tasks.vision.experiment import _Data
    from tensorsam.train import evaluate

    cfg = load_config(VisionConfig, overrides=[f"{k}={v}" for k, v in SET.items()])
    data = _Data(cfg, 0.0, run["seed"], torch.device("cpu"))
    saved = load_checkpoint(out / "models" / f"{run['method']}_tr2_p0_seed{run['seed']}.pt")
    model = resnet(20, "tr", 2, data.num_classes, data.in_channels)
    model.load_state_dict(saved["final"])
    return evaluate(model, data.test)["acc"], len(data.test[1])
