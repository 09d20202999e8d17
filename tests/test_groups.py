"""Scale-invariant group discovery: factorized tensors, tensorized layers, peft LoRA, custom."""

import pytest
import torch
from torch import nn

from tensorsam.groups import named_scale_invariant_groups, scale_invariant_groups
from tensorsam.nn import TensorizedConv2d, TensorizedLinear
from tensorsam.optim import BAR, DAS
from tensorsam.tensors import CP, TR, TT, Tucker


def ids(groups):
    return [[id(p) for p in g] for g in groups]


def test_tensorized_layers_give_one_group_each_and_nothing_else():
    model = nn.Sequential(
        TensorizedConv2d(4, 8, 3, format="tr", rank=3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), TensorizedLinear(8 * 4 * 4, 10, format="tt", rank=3), nn.Linear(10, 2))
    groups = scale_invariant_groups(model)
    assert ids(groups) == [[id(p) for p in model[0].weight_factors.cores],
                           [id(p) for p in model[4].weight_factors.cores]]
    grouped = {id(p) for g in groups for p in g}
    others = [model[0].bias, model[1].weight, model[1].bias, model[4].bias, model[5].weight, model[5].bias]
    assert not grouped & {id(p) for p in others}
    named = named_scale_invariant_groups(model)
    assert named[0].names[0] == "0.weight_factors.cores.0" and named[0].kind == "factorized"


def test_scaling_a_discovered_group_keeps_the_tensor():
    for ft in (CP((3, 4, 5), rank=2), Tucker((3, 4, 5), rank=2), TT((3, 4, 5), rank=2), TR((3, 4, 5), rank=2)):
        (group,) = scale_invariant_groups(ft)
        dense = ft.reconstruct().detach()
        cs = torch.tensor([2.0, 0.25] + [1.0] * (len(group) - 3) + [2.0])
        with torch.no_grad():
            for p, c in zip(group, cs):
                p.mul_(c)
        torch.testing.assert_close(ft.reconstruct().detach(), dense, rtol=1e-5, atol=1e-6)


def test_frozen_groups_left_out_and_custom_groups():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(2, 3))
            self.inner = TT((2, 3), rank=2)   # not searched: the module declares its own groups

        def scale_invariant_groups(self):
            return [[("a", self.a), ("b", self.b)]]

    frozen = TT((2, 3, 4), rank=2).requires_grad_(False)
    model = nn.ModuleDict({"p": Pair(), "f": frozen, "t": Tucker((2, 3), rank=2)})
    named = named_scale_invariant_groups(model)
    assert [g.names for g in named] == [("p.a", "p.b"), ("t.cores.0", "t.cores.1", "t.cores.2")]
    assert [g.kind for g in named] == ["custom", "factorized"]
    with pytest.raises(ValueError, match="Module"):
        scale_invariant_groups([torch.zeros(2)])


def tiny_peft_bert(adapters=("default",)):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install tensorsam[hf])")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    base = transformers.BertModel(config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    model = peft.get_peft_model(base, lora, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, lora)
    return model


def test_peft_lora_pairs():
    model = tiny_peft_bert(("default", "other"))     # "other" is inactive, hence frozen
    named = named_scale_invariant_groups(model)
    assert len(named) == 4                           # 2 layers x (query, value), active adapter only
    for g in named:
        a, b = g.params
        assert g.kind == "lora" and g.names[0].endswith("lora_A.default.weight")
        assert g.names[1].endswith("lora_B.default.weight")
        assert a.shape == (4, 16) and b.shape == (16, 4)
    x = torch.randint(0, 50, (2, 5))
    model.eval()                                     # no dropout
    out = model(input_ids=x).last_hidden_state.detach()
    with torch.no_grad():                            # (cA, B/c) leaves the model unchanged
        for g in named:
            g.params[0].mul_(3.0)
            g.params[1].div_(3.0)
    torch.testing.assert_close(model(input_ids=x).last_hidden_state, out, rtol=1e-5, atol=1e-5)


def test_optimizers_take_a_peft_model_as_groups():
    model = tiny_peft_bert()
    trainable = [p for p in model.parameters() if p.requires_grad]
    x = torch.randint(0, 50, (2, 5))
    for opt in (BAR(trainable, torch.optim.AdamW, pairs=model, alpha=0.1, total_steps=3, lr=1e-3),
                DAS(trainable, torch.optim.AdamW, groups=model, alpha=0.1, lr=1e-3)):
        assert len(opt.plan.groups) == 4
        before = [p.detach().clone() for p in trainable]
        opt.zero_grad()
        model(input_ids=x).last_hidden_state.pow(2).mean().backward()
        opt.step()
        assert any(not torch.equal(a, p) for a, p in zip(before, trainable))


@pytest.mark.parametrize("bad", [[[]], [["a", "b"]], [[torch.zeros(2)]]])
def test_malformed_custom_groups_are_refused_with_the_module_named(bad):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(2))

        def scale_invariant_groups(self):
            return bad

    with pytest.raises(ValueError, match=r"Odd.scale_invariant_groups\(\) \(module 'odd'\)"):
        scale_invariant_groups(nn.ModuleDict({"odd": Odd()}))
