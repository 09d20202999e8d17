"""The finetune path (SAMTrainer on the HF Trainer) under FSDP2, on the CPU with 2 gloo processes.

accelerate (1.16) turns ``TrainingArguments(fsdp=..., fsdp_config={"fsdp_version": 2})`` into FSDP
only for accelerator process groups (``MULTI_GPU``, ``MULTI_XPU``, ...): on the CPU (``use_cpu``,
``MULTI_CPU``) it drops the FSDP plugin and wraps the model in DDP.  So this test stands in for the GPU
path by setting accelerate's state to FSDP itself (:class:`ForcedFSDP`, what accelerate does on GPUs);
everything after that is the Trainer's and accelerate's own code: ``fsdp2_prepare_model`` shards the
peft model (``fully_shard`` per ``BertLayer``), then SAMTrainer runs SAM's two passes and DAS on the
DTensor parameters.  Three steps of SAM and DAS (tiny BERT, LoRA) must give the parameters of the same
run under DDP with ``sam_sync=True``.  See docs/scaling.md, "Fine-tuning (tensorsam finetune) under FSDP".

The worker is this file run by torchrun: ``python -m torch.distributed.run --standalone
--nproc-per-node 2 tests/test_finetune_fsdp.py OUT.json``; it trains under DDP first, then under
FSDP2, in one launch (two launches would double the start-up, most of the test's time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("sam", "das")
STEPS, BATCH, LENGTH = 3, 4, 12


class _Tokens(torch.utils.data.Dataset):
    """32 fixed rows of random token ids, labels in 0..44."""

    def __init__(self, n: int = 32):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, 1000, (n, LENGTH), generator=gen)
        self.labels = torch.randint(0, 45, (n,), generator=gen)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long),
                "labels": self.labels[i]}


def _trainer(method: str, mode: str, out_dir: str):
    import peft
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    from tensorsam.integrations.hf import SAMTrainer
    from tensorsam.run import seed_everything
    from tensorsam.tasks.finetune.config import FinetuneConfig
    from tensorsam.tasks.finetune.experiment import adapter_config, load_model, method_options

    class ForcedFSDP(SAMTrainer):
        """accelerate's state set to FSDP2 on the CPU, as accelerate sets it on GPUs."""

        def _force(self):
            state = self.accelerator.state
            state.distributed_type = DistributedType.FSDP
            if getattr(state, "fsdp_plugin", None) is None:
                state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            self._force()

        def training_step(self, *args, **kwargs):
            self._force()       # something in train() puts MULTI_CPU back after the model is prepared
            return super().training_step(*args, **kwargs)

    cfg = FinetuneConfig(model="tiny-bert", adapters=["lora"], methods=[method], batch_size=BATCH, steps=STEPS)
    seed_everything(0)
    model, _ = load_model("tiny-bert")
    model = peft.get_peft_model(model, adapter_config(cfg, "lora"))
    fsdp = {"fsdp": True, "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}}
    args = TrainingArguments(out_dir, max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=5e-3,
                             max_grad_norm=1.0, report_to=[], save_strategy="no", eval_strategy="no",
                             disable_tqdm=True, use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
                             remove_unused_columns=False, logging_steps=1, **(fsdp if mode == "fsdp" else {}))
    cls = ForcedFSDP if mode == "fsdp" else SAMTrainer
    return cls(model=model, args=args, train_dataset=_Tokens(), method=method,
               method_options=method_options(cfg, method), sam_sync=mode == "ddp")


def _worker(out: str) -> None:
    import tempfile

    from torch.distributed.tensor import DTensor

    record = {"ddp": {}, "fsdp": {}}
    for mode, method in [(mode, m) for mode in record for m in METHODS]:    # DDP first: FSDP's forced state stays
        with tempfile.TemporaryDirectory() as tmp:
            t = _trainer(method, mode, tmp)
            t.train()
        model = t.model_wrapped
        params = {n.removeprefix("module."): (p.full_tensor() if isinstance(p, DTensor) else p).detach()
                  for n, p in model.named_parameters() if p.requires_grad}
        record[mode][method] = {"wrapper": type(model).__name__,
                                "dtensors": sum(isinstance(p, DTensor) for p in model.parameters()),
                                "losses": [h["loss"] for h in t.state.log_history if "loss" in h],
                                "params": {n: p.flatten().tolist() for n, p in params.items()}}
    if int(os.environ["RANK"]) == 0:
        Path(out).write_text(json.dumps(record))


def _launch(out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def test_trainer_fsdp2_matches_ddp_with_sam_sync_for_sam_and_das(tmp_path):
    import pytest

    pytest.importorskip("peft")
    pytest.importorskip("accelerate")
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torchrun needs torch.distributed with gloo")
    record = _launch(tmp_path / "record.json")
    fsdp, ddp = record["fsdp"], record["ddp"]
    for method in METHODS:
        f, d = fsdp[method], ddp[method]
        assert f["wrapper"].startswith("FSDP") and f["dtensors"] > 0, f["wrapper"]
        assert d["wrapper"] == "DistributedDataParallel" and d["dtensors"] == 0
        assert len(f["losses"]) == STEPS and torch.allclose(torch.tensor(f["losses"]), torch.tensor(d["losses"]), atol=1e-5)
        assert set(f["params"]) == set(d["params"]) and len(f["params"]) > 4
        for name in f["params"]:
            torch.testing.assert_close(torch.tensor(f["params"][name]), torch.tensor(d["params"][name]),
                                       atol=1e-5, rtol=1e-4, msg=lambda m, n=name, k=method: f"{k} {n}: {m}")


if __name__ == "__main__":
    _worker(sys.argv[1])
