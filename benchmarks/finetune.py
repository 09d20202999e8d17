"""Optimizer step time of the finetune task on the HF Trainer path: ms per step per (adapter, method),
paired ratios to Adam, and the optimizer step alone.

    python benchmarks/finetune.py                              # MiniLM, lora/flora/loretta x adam/das/nbar/sam
    python benchmarks/finetune.py --methods adam,das,nbar,sam,rebalance --device cuda
    python benchmarks/finetune.py --quick --out /tmp/f.json     # a smoke run (tiny-bert, no measurement)
    python benchmarks/finetune.py --model minilm-config --adapters flora --methods adam,sam,das,rebalance --device cuda
                                                               # MiniLM's sizes, random weights: no package needed

Each case (adapter, method) is a real :class:`~tensorsam.integrations.hf.SAMTrainer` built as
``tensorsam finetune`` builds it (``tasks.finetune.experiment``: ``load_model``, peft with
``adapter_config``, ``method_options``, the same ``TrainingArguments``: AdamW at the config's lr, linear
schedule, ``max_grad_norm`` 1.0, batch 16; ``report_to=[]``, ``use_cpu`` on the CPU), and set up as
``Trainer.train`` sets it up: ``create_optimizer`` (``build_trainer_optimizer``, with the Trainer's
step count as ``total_steps``), ``accelerator.prepare(model, optimizer)`` (the optimizer is then
accelerate's wrapper, as in training), ``create_scheduler``.  The timed step is what the Trainer's
inner loop does per optimizer step with one micro-batch (``Trainer._run_epoch``, transformers 5.x):

    trainer.training_step(model, batch, num_items_in_batch)   # forward + backward; SAM: both passes
    accelerator.clip_grad_norm_(model.parameters(), 1.0)        # what Trainer._clip_grad_norm calls
    optimizer.step()                                            # DAS / BAR: their whole extra cost
    lr_scheduler.step()                                         # unless the step was skipped
    model.zero_grad()

Left out: the Trainer's bookkeeping around it (loss accumulation and its NaN check, the FLOs count,
callbacks, logging), which costs every method the same, so leaving it out can only raise the ratios
to Adam (the conservative side).  ``num_items_in_batch`` comes from ``trainer.get_batch_samples``.
The batch is fixed: 16 sequences of ``--max-length`` (64) random token ids, no padding, labels in
0..44 (no dataset needed).  Every case starts from the same weights (seed 0, the head too).
BAR (nbar, obar) is defined for LoRA's pairs only: its FLoRA / LoRETTA cases are recorded as skipped
with the reason ``check_method`` gives, as the experiment records those cells.

"optimizer step alone" is ``optimizer.step()`` timed inside the same steps (on CPU; the brackets cost
nothing there).  On CUDA it is timed in a second block of steps, with ``torch.cuda.synchronize``
around each ``optimizer.step()``, so the full-step block holds no sync but at its two ends.  For SAM
it is the base (AdamW) step only: SAM's ascent step happens inside ``training_step``.

Repeats are interleaved: each repeat times every case once, in an order rotated each repeat,
``--steps`` steps each after ``--warmup`` untimed steps per case.  Ratios to Adam (of the same
adapter) are taken within one repeat (paired) and summarised over repeats (median, IQR, min-max).

Prints a Markdown table and writes ``benchmarks/results/finetune.json`` (atomically) with the raw
per-repeat timings and how they were made.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import tensorsam
from tensorsam.run import seed_everything
from tensorsam.run.io import atomic_write_json
from tensorsam.run.meta import git_commit
from tensorsam.tasks.finetune.config import FinetuneConfig
from tensorsam.tasks.finetune.experiment import (
    MINILM_PACKAGE,
    NUM_CLASSES,
    adapter_config,
    load_model,
    method_options,
    minilm_dir,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vision import cpu_model, summary, sync

RESULTS = Path(__file__).resolve().parent / "results" / "finetune.json"
ADAPTERS = ("lora", "flora", "loretta")
METHODS = ("adam", "das", "nbar", "sam")      # rebalance, obar, asam, sam-every-K: on request
GOALS = {"das": 1.03, "nbar": 1.03}           # full-step time / Adam's, median of paired repeats (issue E7)
TINY_VOCAB = 1000                             # tiny-bert's (load_model)
# minilm-config: a BERT of all-MiniLM-L6-v2's sizes built from a BertConfig, random weights (timing only,
# no package or download); its adapters and head are MiniLM's (query / value, classifier)
MINILM_SIZES = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                "intermediate_size": 1536, "max_position_embeddings": 512}
MODELS = ("minilm", "minilm-config", "tiny-bert")


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def vocab_size(model_name: str) -> int:
    if model_name == "minilm-config":
        return MINILM_SIZES["vocab_size"]
    if model_name == "tiny-bert":
        return TINY_VOCAB
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(minilm_dir(), local_files_only=True).vocab_size)


def bench_model(name: str):
    """The model with a 45-way head: ``load_model``'s, or minilm-config built from a BertConfig."""
    if name != "minilm-config":
        return load_model(name)[0]
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(**MINILM_SIZES, num_labels=NUM_CLASSES))


def make_batch(batch_size: int, length: int, vocab: int, seed: int = 0) -> dict:
    """A fixed batch: random token ids (no padding), labels in 0..NUM_CLASSES-1."""
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, vocab, (batch_size, length), generator=gen),
            "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
            "labels": torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)}


class Skipped(Exception):
    """The method is not defined for the adapter (BAR on FLoRA / LoRETTA)."""


class Case:
    """One (adapter, method): its own peft model, SAMTrainer, optimizer and scheduler, set up as
    ``Trainer.train`` sets them up.  ``step()`` is the timed unit (see the module docstring)."""

    def __init__(self, cfg: FinetuneConfig, adapter: str, method: str, batch: dict, device: torch.device,
                 out_dir: str, max_steps: int, model_name: str | None = None):
        import peft
        from transformers import TrainingArguments

        import tensorsam.adapters  # noqa: F401  (registers FLoRA / LoRETTA with peft)
        from tensorsam.integrations.hf import SAMTrainer, UnsupportedMethod, check_method

        self.adapter, self.method = adapter, method
        seed_everything(0)                              # the same weights and head for every case
        model = bench_model(model_name or cfg.model)
        model = peft.get_peft_model(model, adapter_config(cfg, adapter))
        self.params = sum(p.numel() for p in model.parameters())
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        factory_method = "adamw" if method == "adam" else method
        try:
            check_method(factory_method, model)
        except UnsupportedMethod as err:
            raise Skipped(str(err)) from None
        # train_cell's arguments (no evaluation, no callbacks: nothing of theirs is timed)
        args = TrainingArguments(
            out_dir, max_steps=max_steps, per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.lr,
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm or 0.0, lr_scheduler_type="linear",
            logging_steps=cfg.log_every, logging_first_step=True, report_to=[], save_strategy="no",
            eval_strategy="no", disable_tqdm=True, use_cpu=device.type == "cpu", seed=0, data_seed=0,
            dataloader_num_workers=0, remove_unused_columns=False)
        t = SAMTrainer(model=model, args=args, method=factory_method, method_options=method_options(cfg, method))
        # what Trainer.train does before its loop (_init_training_state, _prepare_for_training)
        t.state.max_steps = max_steps                   # create_optimizer's total_steps
        t.create_optimizer()
        self.model, t.optimizer = t.accelerator.prepare(t.model, t.optimizer)
        t.model_wrapped = self.model
        t.create_scheduler(num_training_steps=max_steps)
        t.current_gradient_accumulation_steps = 1       # one micro-batch per step (_run_epoch sets it)
        if not t.accelerator.sync_gradients:
            raise RuntimeError("accelerate's gradient state says no sync: optimizer.step() would do nothing")
        samples, self.num_items = t.get_batch_samples(iter([batch]), 1, args.device)
        self.batch = t._prepare_inputs(samples[0])      # on the device once, as the dataloader delivers it
        self.trainer, self.max_grad_norm = t, args.max_grad_norm
        self.model.zero_grad()
        self.sam = t.sam_optimizer() is not None

    def step(self, opt_times: list | None = None, device: torch.device | None = None) -> None:
        t = self.trainer
        t.training_step(self.model, dict(self.batch), self.num_items)
        if self.max_grad_norm > 0:
            t.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        if opt_times is None:
            t.optimizer.step()
        else:
            sync(device)
            t0 = clock()
            t.optimizer.step()
            sync(device)
            opt_times.append(clock() - t0)
        if not t.accelerator.optimizer_step_was_skipped:
            t.lr_scheduler.step()
        self.model.zero_grad()


clock = time.perf_counter  # --clock cpu: time.process_time


def time_case(case: Case, n: int, device: torch.device) -> tuple[float, float]:
    """(seconds per full step, seconds per optimizer.step()) over ``n`` steps.  On CPU both come from
    the same steps; on CUDA the optimizer step alone is timed in ``n`` further steps, so that the
    full-step block is synchronised only at its ends."""
    opt: list[float] = []
    cpu = device.type != "cuda"
    sync(device)
    t0 = clock()
    for _ in range(n):
        case.step(opt if cpu else None, device)
    sync(device)
    full = (clock() - t0) / n
    if not cpu:
        for _ in range(n):
            case.step(opt, device)
    return full, sum(opt) / len(opt)


def parse_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def run(args, cfg: FinetuneConfig, device: torch.device, log) -> dict:
    batch = make_batch(cfg.batch_size, cfg.max_length, vocab_size(args.model))
    # the schedule spans at least the experiment's steps, and every step this run takes
    max_steps = max(cfg.steps, args.warmup + args.repeats * args.steps * (1 if device.type == "cpu" else 2))
    cases, skipped, info = [], [], {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tensorsam-finetune-bench-") as tmp:
        for adapter in args.adapters:
            for m in args.methods:
                try:
                    case = Case(cfg, adapter, m, batch, device, tmp, max_steps, args.model)
                except Skipped as err:
                    skipped.append({"adapter": adapter, "method": m, "reason": str(err)})
                    log(f"{adapter} {m}: skipped ({str(err)[:90]}...)")
                    continue
                cases.append(case)
                info.setdefault(adapter, {"params": case.params, "trainable_params": case.trainable, "methods": []})
                info[adapter]["methods"].append(m)
        log(f"{len(cases)} cases built in {time.perf_counter() - t0:.1f} s ({len(skipped)} skipped); "
            f"warm-up: {args.warmup} steps each on {device}")
        for c in cases:
            for _ in range(args.warmup):
                c.step()
        sync(device)
        log(f"warm-up done at {time.perf_counter() - t0:.1f} s; {args.repeats} repeats of {len(cases)} cases "
            f"x {args.steps} steps")

        full: dict = {(c.adapter, c.method): [] for c in cases}
        opt: dict = {(c.adapter, c.method): [] for c in cases}
        t_start = time.perf_counter()
        for r in range(args.repeats):
            k = r % len(cases)
            for c in cases[k:] + cases[:k]:
                f, o = time_case(c, args.steps, device)
                full[(c.adapter, c.method)].append(f)
                opt[(c.adapter, c.method)].append(o)
            done = time.perf_counter() - t_start
            log(f"repeat {r + 1}/{args.repeats}: {done:.1f} s, about {done / (r + 1) * (args.repeats - r - 1):.0f} s left")
            if args.max_seconds and time.perf_counter() - t0 > args.max_seconds and r + 1 >= 3 and r + 1 < args.repeats:
                log(f"stopping after {r + 1} repeats: --max-seconds {args.max_seconds:g} reached")
                break
        sam_in_trainer = {f"{c.adapter} {c.method}": c.sam for c in cases}
    return {"adapters": info, "full": full, "opt": opt, "skipped": skipped, "sam": sam_in_trainer}


def analyse(res: dict, batch: int) -> dict:
    full, opt, rows, ratios = res["full"], res["opt"], [], []
    for adapter, info in res["adapters"].items():
        fa, oa = full.get((adapter, "adam")), opt.get((adapter, "adam"))
        for m in info["methods"]:
            fs, os_ = full[(adapter, m)], opt[(adapter, m)]
            step = statistics.median(fs)
            row = {"adapter": adapter, "method": m, "status": "ok", "trainable_params": info["trainable_params"],
                   "ms_per_step": 1e3 * step, "sequences_per_s": batch / step,
                   "opt_ms_per_step": 1e3 * statistics.median(os_),
                   "opt_share_of_step": statistics.median([o / f for o, f in zip(os_, fs)]),
                   "vs_adam": None if fa is None else summary([a / b for a, b in zip(fs, fa)]),
                   "opt_vs_adam_opt": None if oa is None else summary([a / b for a, b in zip(os_, oa)]),
                   # the optimizer step's extra time over Adam's, as a share of Adam's full step
                   "opt_extra_vs_adam_step": None if oa is None else summary(
                       [(o - a) / f for o, a, f in zip(os_, oa, fa)])}
            rows.append(row)
            if m != "adam" and row["vs_adam"] is not None:
                goal = GOALS.get(m)
                ratios.append({"adapter": adapter, "ratio": f"{m.upper()}/Adam", **row["vs_adam"], "goal": goal,
                               "met": None if goal is None else row["vs_adam"]["median"] <= goal})
    return {"rows": rows, "ratios": ratios}


def markdown(out: dict, skipped: list[dict], head: str) -> str:
    def f3(v):
        return "—" if v is None else f"{v:.3f}"

    columns = ("adapter | trainable | method | ms/step | × Adam (paired median) | IQR | min–max | opt step ms | "
               "opt step × Adam's | opt extra / Adam step")
    lines = [head, "", f"| {columns} |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out["rows"]:
        s, o, e = r["vs_adam"] or {}, r["opt_vs_adam_opt"] or {}, r["opt_extra_vs_adam_step"]
        lines.append(f"| {r['adapter']} | {r['trainable_params']:,} | {r['method']} | {r['ms_per_step']:.1f} | "
                     f"{f3(s.get('median'))} | {f3(s.get('p25'))}–{f3(s.get('p75'))} | "
                     f"{f3(s.get('min'))}–{f3(s.get('max'))} | {r['opt_ms_per_step']:.2f} | {f3(o.get('median'))} | "
                     f"{'—' if e is None else format(100 * e['median'], '+.1f') + ' %'} |")
    lines += ["", "| quantity | adapter | median | IQR | min–max | goal | met |", "|---|---|---:|---:|---:|---:|---|"]
    for q in out["ratios"]:
        goal = "reference" if q["goal"] is None else f"≤ {q['goal']}"
        met = "—" if q["met"] is None else ("yes" if q["met"] else "NO")
        lines.append(f"| {q['ratio']} (full step) | {q['adapter']} | {q['median']:.3f} | {q['p25']:.3f}–{q['p75']:.3f} | "
                     f"{q['min']:.3f}–{q['max']:.3f} | {goal} | {met} |")
    if skipped:
        lines.append("")
        for s in skipped:
            lines.append(f"- {s['method']} on {s['adapter']}: skipped ({s['reason'].split(':')[0]})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm", choices=MODELS,
                   help="minilm (the package's weights), minilm-config (its sizes, random weights) or tiny-bert")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:i] or auto")
    p.add_argument("--adapters", default=",".join(ADAPTERS), help="comma-separated: lora, flora, loretta")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated methods of `tensorsam finetune` (adam first is added if missing)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64, help="tokens per sequence (all real, no padding)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved repeats")
    p.add_argument("--steps", type=int, default=5, help="steps per case per repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per case first")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: time.perf_counter; cpu: this process's CPU time (time.process_time), for a "
                        "machine shared with other jobs (CPU device, --threads 1)")
    p.add_argument("--max-seconds", type=float, default=0,
                   help="stop repeating (after at least 3 repeats) once building, warm-up and repeats took this long")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    p.add_argument("--quick", action="store_true", help="tiny-bert, 2 repeats of 1 step: a smoke run, not a measurement")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.repeats, args.steps, args.warmup = "tiny-bert", 2, 1, 1
    args.adapters, args.methods = parse_list(args.adapters), parse_list(args.methods)
    if "adam" not in args.methods:
        args.methods.insert(0, "adam")          # the reference of every ratio
    args.methods = list(dict.fromkeys(args.methods))
    if not set(args.adapters) <= set(ADAPTERS) or not args.adapters:
        p.error(f"--adapters must be among {', '.join(ADAPTERS)}, got {args.adapters}")
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        p.error("--clock cpu needs --device cpu and --threads 1 (CPU time sums over threads and misses the GPU)")
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if min(args.batch_size, args.max_length, args.repeats, args.steps, args.warmup + 1) < 1 or args.threads < 0:
        p.error("--batch-size, --max-length, --repeats and --steps must be positive, --warmup and --threads >= 0")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        p.error(f"--device must be cpu, cuda[:i] or auto, got {args.device!r}")
    try:
        # minilm-config adapts the same modules as minilm, with the same head
        cfg = FinetuneConfig(model=args.model.removesuffix("-config"), adapters=args.adapters, methods=args.methods,
                             batch_size=args.batch_size, max_length=args.max_length, device=args.device)
    except ValueError as err:
        p.error(str(err))
    if args.model == "minilm":
        try:
            minilm_dir()
        except ValueError as err:
            p.error(f"{err} (or run with --model tiny-bert / --quick)")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)           # the Trainer puts the model on the current device
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg):
        print(f"[finetune bench] {msg}", file=sys.stderr, flush=True)

    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # MiniLM's "newly initialized classifier" warning, per case
    started = datetime.datetime.now(datetime.UTC)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    try:
        res = run(args, cfg, device, log)
        threads = torch.get_num_threads()
    finally:
        transformers.logging.set_verbosity(verbosity)
        with contextlib.suppress(RuntimeError):
            torch.set_num_threads(threads_before)
    out = analyse(res, args.batch_size)
    repeats_done = len(next(iter(res["full"].values())))
    argv_used = sys.argv[1:] if argv is None else list(argv)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    model_label = {"minilm": "MiniLM-L6 (all-MiniLM-L6-v2)",
                   "minilm-config": "MiniLM-L6's sizes from a BertConfig (random weights)"}.get(args.model, args.model)
    head = (f"Finetune optimizer step, HF Trainer path ({'QUICK smoke run, not a measurement; ' if args.quick else ''}"
            f"{model_label}, {device}: {where}, {threads} threads, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, peft {version('peft')}): batch {args.batch_size} x {args.max_length} tokens, "
            f"adapters r{cfg.rank} on {'/'.join(cfg.target_modules)}, {repeats_done} interleaved repeats x "
            f"{args.steps} steps, {started:%Y-%m-%d %H:%M} UTC.")
    table = markdown(out, res["skipped"], head)
    record = {
        "benchmark": "finetune",
        "command": shlex.join(["python", "benchmarks/finetune.py", *argv_used]),
        "date": f"{started:%Y-%m-%d %H:%M:%S} UTC",
        "seconds": (datetime.datetime.now(datetime.UTC) - started).total_seconds(),
        "quick": args.quick,
        "tensorsam": tensorsam.__version__, "commit": git_commit(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": version("peft"), "accelerate": version("accelerate"),
        "python": platform.python_version(),
        "model": args.model, "model_package": {MINILM_PACKAGE: version(MINILM_PACKAGE)} if args.model == "minilm" else None,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads, "clock": args.clock,
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")},
        "load_average_at_start": load,
        "settings": {"adapters": args.adapters, "methods": args.methods, "batch_size": args.batch_size,
                     "max_length": args.max_length, "repeats": args.repeats, "repeats_done": repeats_done,
                     "steps_per_repeat": args.steps, "warmup_steps": args.warmup,
                     "config": {k: getattr(cfg, k) for k in ("rank", "adapter_alpha", "tt_rank", "target_modules",
                                                             "lr", "weight_decay", "max_grad_norm", "rho", "alpha",
                                                             "das_variant")},
                     "opt_step_timed": "within the same steps" if device.type == "cpu" else "in a second block, synced"},
        "adapters": res["adapters"],
        "cases": [{"adapter": r["adapter"], "method": r["method"], "status": "ok"} for r in out["rows"]]
                 + [{**s, "status": "skipped"} for s in res["skipped"]],
        "skipped": res["skipped"],
        **out,
        "raw_seconds_per_step": {f"{a} {m}": ts for (a, m), ts in res["full"].items()},
        "raw_opt_seconds_per_step": {f"{a} {m}": ts for (a, m), ts in res["opt"].items()},
        "markdown": table,
    }
    bad = [k for k, ts in record["raw_seconds_per_step"].items() if not all(math.isfinite(t) and t > 0 for t in ts)]
    if bad:
        log(f"WARNING: non-positive or non-finite timings for {bad}")
    print(table)
    atomic_write_json(args.out, record)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
