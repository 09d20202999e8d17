"""FLoRA and LoRETTA as native peft tuners: start, merge, save/load, targets, TT shapes and ranks."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
peft = pytest.importorskip("peft", reason="peft is not importable (pip install tensorsam[hf])")
pytest.importorskip("aenum", reason="aenum is not importable (pip install tensorsam[hf])")

from tensorsam.adapters import (
    FloraConfig,
    LorettaConfig,
    TensorTrain,
    adapter_summary,
    default_tt_rank,
    flora_params,
    format_adapter_summary,
    lora_params,
    loretta_params,
    loretta_shapes,
    tt_factors,
)

QV = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}


def tiny(kind="bert", dtype=torch.float32, seed=0):
    """A 2-layer model built from a config (no download); llama's v_proj is 32 -> 16."""
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=16)
        model = transformers.BertModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=16)
        model = transformers.LlamaModel(cfg)
    return model.to(dtype).eval()


def out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def configs(kind):
    return {"flora": FloraConfig(target_modules=QV[kind], r=4, alpha=8),
            "loretta-zero": LorettaConfig(target_modules=QV[kind], r=4, alpha=8, zero_init=True)}


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_flora_and_zero_init_loretta_start_as_the_base_model(kind):
    want = out(tiny(kind), IDS)
    for name, cfg in configs(kind).items():
        model = peft.get_peft_model(tiny(kind), cfg)
        assert torch.equal(out(model, IDS), want), name
        assert model.get_nb_trainable_parameters()[0] > 0


def test_loretta_init_small_noise_trains_every_core_zero_init_only_the_zeroed_one():
    base = out(tiny(), IDS)
    for zero in (False, True):
        model = peft.get_peft_model(tiny(), LorettaConfig(target_modules=["query", "value"], r=4, zero_init=zero))
        layer = model.base_model.model.encoder.layer[0].attention.self.query
        delta, weight = layer.get_delta_weight("default"), layer.base_layer.weight
        assert (delta.norm() == 0) == zero and delta.norm() < 0.1 * weight.norm()
        assert torch.equal(out(model, IDS), base) == zero
        model(input_ids=IDS).last_hidden_state.square().sum().backward()
        cores = [*layer.loretta_A["default"].cores, *layer.loretta_B["default"].cores]
        live = [bool(c.grad.abs().max() > 0) for c in cores]
        assert live == ([False] * (len(cores) - 1) + [True] if zero else [True] * len(cores))


def nonzero(kind="bert", method="flora", dtype=torch.float64):
    """A model whose adapters have ΔW != 0 (FLoRA's G random, LoRETTA's default init, scaled up)."""
    cfg = (FloraConfig(target_modules=QV[kind], r=4, alpha=8, init_weights=False) if method == "flora"
           else LorettaConfig(target_modules=QV[kind], r=4, alpha=8, init_std=0.1))
    return peft.get_peft_model(tiny(kind, dtype), cfg)


@pytest.mark.parametrize("method", ["flora", "loretta"])
def test_merge_then_unmerge_restores_weights_and_merged_forward_matches(method):
    model = nonzero("llama", method)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    adapted = out(model, IDS)
    model.merge_adapter()
    changed = [n for n, p in model.named_parameters() if n in weights and not torch.equal(p, weights[n])]
    assert len(changed) == 4                                    # q and v of 2 layers
    torch.testing.assert_close(out(model, IDS), adapted, rtol=1e-12, atol=1e-12)
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-15)
    merged = model.merge_and_unload()
    assert not any("flora_" in n or "loretta_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(out(merged, IDS), adapted, rtol=1e-12, atol=1e-12)


def test_delta_weight_is_s_b_g_a_and_drives_the_forward():
    model = nonzero()
    layer = model.base_model.model.encoder.layer[1].attention.self.value
    a, g, b = (layer.flora_A["default"], layer.flora_G["default"], layer.flora_B["default"])
    assert a.shape == (4, 32) and g.shape == (4, 4) and b.shape == (32, 4)
    torch.testing.assert_close(layer.get_delta_weight("default"), (8 / 4) * b @ g @ a)
    x = torch.randn(3, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ layer.get_delta_weight("default").T)


@pytest.mark.parametrize("method", ["flora", "loretta"])
def test_save_load_round_trip_is_bit_exact(method, tmp_path):
    model = nonzero("bert", method, torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))               # as after training
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved and all(f".{method}_" in k for k in saved)    # adapter-only
    loaded = peft.PeftModel.from_pretrained(tiny("bert"), tmp_path)
    assert type(loaded.peft_config["default"]) is type(model.peft_config["default"])
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(out(loaded, IDS), out(model, IDS))


def test_loretta_config_round_trips_tt_overrides(tmp_path):
    cfg = LorettaConfig(target_modules=["query"], r=4, tt_rank=3, tt_factors={32: [8, 4]})
    cfg.save_pretrained(tmp_path)
    back = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(back, LorettaConfig) and back.tt_factors == {32: [8, 4]} and back.tt_rank == 3
    model = peft.get_peft_model(tiny(), back)
    (row, *_) = adapter_summary(model)
    assert row["a_shape"] == [8, 4, 4] and row["tt_rank"] == 3


@pytest.mark.parametrize(("targets", "n"), [
    (["query", "value"], 4),                                     # suffixes
    (["encoder.layer.0.attention.self.query"], 1),               # an exact name
    (r".*\.1\.attention\.self\.(query|key)", 2),                 # a regex (full match)
    ("all-linear", 2 * 6 + 1),                                   # 6 linears a layer, and the pooler
])
def test_target_modules_follow_peft(targets, n):
    model = peft.get_peft_model(tiny(), FloraConfig(target_modules=targets, r=2))
    assert len(adapter_summary(model)) == n


def test_unknown_target_module_and_bad_ranks_are_clear_errors():
    with pytest.raises(ValueError, match=r"\['qeury'\] match no module"):
        peft.get_peft_model(tiny(), FloraConfig(target_modules=["query", "qeury"]))
    with pytest.raises(ValueError, match="matches no module"):
        peft.get_peft_model(tiny(), LorettaConfig(target_modules=r".*\.q_proj"))
    for bad in (0, -3):
        with pytest.raises(ValueError, match="r .*must be a positive int"):
            FloraConfig(target_modules=["query"], r=bad)
        with pytest.raises(ValueError, match="r .*must be a positive int"):
            LorettaConfig(target_modules=["query"], r=bad)
        with pytest.raises(ValueError, match="tt_rank must be a positive int"):
            LorettaConfig(target_modules=["query"], tt_rank=bad)
    with pytest.raises(ValueError, match="prime factor"):
        tt_factors(11008)


def test_tt_shape_rule():
    assert tt_factors(384) == (16, 6, 4)
    assert tt_factors(768) == (16, 16, 3)
    assert tt_factors(1024) == (16, 16, 4)
    assert tt_factors(4096) == (16, 16, 4, 4)      # the authors' OPT-6.7B shape
    assert tt_factors(4000) == (16, 10, 5, 5)      # no 3 factors <= 16 exist
    assert tt_factors(32) == (4, 4, 2)
    for n in (12, 32, 96, 384, 576, 768, 1024, 3072, 4096, 5632, 65536):
        f = tt_factors(n)
        assert torch.tensor(f).prod() == n and max(f) <= 16 and list(f) == sorted(f, reverse=True)
        assert len(f) == (3 if n < 4096 else 4)
    a, b = loretta_shapes(4096, 4096, 8)
    assert a == b == (16, 16, 4, 4, 8)              # 5 cores each, as run on OPT-6.7B


@pytest.mark.parametrize(("n_in", "n_out", "r"), [(384, 384, 8), (768, 768, 8), (4096, 4096, 8),
                                                   (4096, 1024, 16), (32, 16, 4)])
def test_default_tt_rank_is_the_largest_within_loras_budget(n_in, n_out, r):
    rank = default_tt_rank(n_in, n_out, r)
    assert loretta_params(n_in, n_out, r, rank) <= lora_params(n_in, n_out, r)
    assert loretta_params(n_in, n_out, r, rank + 1) > lora_params(n_in, n_out, r)


def test_loretta_layers_stay_within_lora_budget_and_print_their_shapes():
    model = peft.get_peft_model(tiny("llama"), LorettaConfig(target_modules=["q_proj", "v_proj"], r=4))
    rows = adapter_summary(model)
    assert [r["b_shape"] for r in rows[:2]] == [[4, 4, 2, 4], [4, 2, 2, 4]]   # q: 32 out, v: 16 out
    for row in rows:
        assert row["params"] <= lora_params(row["in"], row["out"], 4)
        assert row["params"] == loretta_params(row["in"], row["out"], 4, row["tt_rank"])
    assert "TT rank" in format_adapter_summary(rows)
    assert sum(r["params"] for r in rows) == model.get_nb_trainable_parameters()[0]


def test_parameter_counts_at_minilm_dims():
    # hidden 384, r = 8, one adapted 384x384 projection
    assert lora_params(384, 384, 8) == 6144
    assert flora_params(384, 384, 8) == 6208
    assert default_tt_rank(384, 384, 8) == 16
    assert loretta_params(384, 384, 8, 16) == 5888


def test_tensor_train_contraction_matches_a_dense_reference():
    tt = TensorTrain((4, 3, 2, 5), rank=3, split=2, dtype=torch.float64)
    tt.init_normal_(1.0, generator=torch.Generator().manual_seed(0))
    dense = tt.cores[0].reshape(4, 3)
    for core in tt.cores[1:]:                                    # left to right, one mode at a time
        dense = (dense @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
    torch.testing.assert_close(tt.matrix(), dense.reshape(12, 10))
