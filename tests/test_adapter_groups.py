"""Scale-invariant groups of tensor adapters, DAS's Eq. 9 on them, and zero-norm cores at the start."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
peft = pytest.importorskip("peft", reason="peft is not importable (pip install tensorsam[hf])")
pytest.importorskip("aenum", reason="aenum is not importable (pip install tensorsam[hf])")

from tensorsam.adapters import FloraConfig, LorettaConfig
from tensorsam.groups import named_scale_invariant_groups, scale_invariant_groups
from tensorsam.optim import build_optimizer

IDS = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(3))


def tiny_bert(cfg, extra_adapter=None):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)
    model = peft.get_peft_model(transformers.BertModel(config).double(), cfg)
    if extra_adapter is not None:
        model.add_adapter("other", extra_adapter)             # inactive, hence frozen
    return model


def loss(model):
    return model(input_ids=IDS).last_hidden_state.square().mean()


def test_flora_gives_one_a_g_b_triple_per_adapter():
    cfg = FloraConfig(target_modules=["query", "value"], r=4)
    model = tiny_bert(cfg, extra_adapter=cfg)
    named = named_scale_invariant_groups(model)
    assert len(named) == 4 and {g.kind for g in named} == {"flora"}
    g = named[0]
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    assert g.module.endswith("encoder.layer.0.attention.self.query")
    assert [n.rsplit(".", 2)[-2:] for n in g.names] == [["flora_A", "default"], ["flora_G", "default"],
                                                       ["flora_B", "default"]]
    assert [id(p) for p in g.params] == [id(layer.flora_A["default"]), id(layer.flora_G["default"]),
                                         id(layer.flora_B["default"])]


def test_loretta_gives_all_cores_of_an_adapter_as_one_group_and_rescaling_keeps_delta():
    model = tiny_bert(LorettaConfig(target_modules=["value"], r=4))
    (g, _) = named_scale_invariant_groups(model)
    layer = model.base_model.model.encoder.layer[0].attention.self.value
    a, b = layer.loretta_A["default"].cores, layer.loretta_B["default"].cores
    assert g.kind == "loretta" and len(g) == len(a) + len(b) == 8
    assert [id(p) for p in g.params] == [id(p) for p in a + b[::-1]]   # the order the input meets them
    delta = layer.get_delta_weight("default").detach()
    c = torch.linspace(0.5, 2.0, len(g), dtype=torch.float64)
    c[-1] = 1 / c[:-1].prod()                                          # prod c_k = 1
    with torch.no_grad():
        for p, ck in zip(g.params, c):
            p.mul_(ck)
    torch.testing.assert_close(layer.get_delta_weight("default"), delta)


def expected_das(groups, eta, alpha):
    """(1 + lambda_k) G_k - eta g_k, lambda_k = eta alpha u (gamma_k - gamma_bar) / s_k (Eq. 9), u over
    every core of every group (the paper's u_D), in plain python floats; a zero core has lambda 0."""
    s = [[(p.detach() ** 2).sum().item() for p in grp] for grp in groups]
    gam = [[(p.grad ** 2).sum().item() for p in grp] for grp in groups]
    u = sum(map(sum, gam)) ** -0.5
    out = []
    for grp, ss, gs in zip(groups, s, gam):
        gbar = sum(gs) / len(gs)
        for p, sk, gk in zip(grp, ss, gs):
            lam = 0.0 if sk == 0 else eta * alpha * u * (gk - gbar) / sk
            out.append((1 + lam) * p.detach() - eta * p.grad)
    return out


@pytest.mark.parametrize("cfg", [FloraConfig(target_modules=["query", "value"], r=4, init_weights=False),
                                 FloraConfig(target_modules=["query", "value"], r=4),          # G = 0
                                 LorettaConfig(target_modules=["query", "value"], r=4, init_std=0.05)],
                         ids=["flora", "flora-zero-G", "loretta"])
def test_das_one_step_is_eq9_on_adapter_groups(cfg):
    model = tiny_bert(cfg)
    groups = scale_invariant_groups(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert sorted(map(id, params)) == sorted(id(p) for g in groups for p in g)   # nothing else trains
    loss(model).backward()
    want = expected_das(groups, eta=0.1, alpha=0.7)
    opt = build_optimizer("das", params, groups=model, base="sgd", alpha=0.7, lr=0.1)
    opt.step()
    for p, w in zip((p for g in groups for p in g), want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("method", ["das", "rebalance", "sam", "nbar", "obar"])
def test_zero_norm_cores_at_the_start_give_finite_steps(method):
    """FLoRA's G = 0 (and zero-init LoRETTA's last B core; LoRA's B = 0 for BAR, which takes pairs)."""
    if method in ("nbar", "obar"):
        cfgs = [peft.LoraConfig(target_modules=["query", "value"], r=4, lora_alpha=8)]
    else:
        cfgs = [FloraConfig(target_modules=["query", "value"], r=4),
                LorettaConfig(target_modules=["query", "value"], r=4, zero_init=True)]
    options = {"sam": {"rho": 0.05}, "rebalance": {}}.get(method, {"alpha": 0.5})
    for cfg in cfgs:
        model = tiny_bert(cfg)
        zero = [p for g in scale_invariant_groups(model) for p in g if p.norm() == 0]
        assert len(zero) == 4                                             # one per adapter
        params = [p for p in model.parameters() if p.requires_grad]
        opt = build_optimizer(method, params, groups=model, base="sgd", lr=0.1, total_steps=10, **options)
        for _ in range(2):
            opt.zero_grad()
            loss(model).backward()
            if method == "sam":
                opt.first_step(zero_grad=True)
                loss(model).backward()
                opt.second_step()
            else:
                opt.step()
        assert all(torch.isfinite(p).all() for p in params)
        assert all(p.norm() > 0 for p in zero)                            # the zero cores moved
        assert math.isfinite(loss(model).item())
