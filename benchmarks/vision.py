"""Training speed of the vision task: images/s per method on dense and TR ResNets, paired ratios to SGD.

    python benchmarks/vision.py                          # ResNet-20, dense and TR rank 10, batch 128
    python benchmarks/vision.py --depth 20,32 --device cuda --steps 20
    python benchmarks/vision.py --quick --out /tmp/v.json    # a smoke run (tiny settings, no measurement)

Each timed step is what ``tensorsam vision`` does per batch in ``train.fit``: index a batch of the uint8
images held on the device with a slice of a CPU permutation, ``augment`` (crop with 2-pixel padding,
flip) and ``ChannelNorm``, then ``train.train_step`` with the optimizer of
``build_optimizer(method, **optimizer_options(VisionConfig, method, model))`` and the cosine schedule's
step.  Data are random uint8 images of Fashion-MNIST's shape (1 x 28 x 28), so no dataset is needed.

Repeats are interleaved: each repeat times every (model, method) once, and the data pipeline alone
once per model, in an order rotated each repeat, ``--steps`` steps each after a warm-up (sam-every-K
takes a multiple of K steps, so every repeat holds the same mix of SAM and plain steps).  Ratios to SGD
are taken within one repeat (paired) and summarised over repeats (median, IQR, min-max).  On CUDA every
timed block is bracketed by ``torch.cuda.synchronize``; nothing inside it reads a device value.  After
timing, one step of each case runs under ``torch.cuda.set_sync_debug_mode('warn')`` and the host syncs
it makes are counted and located (pipeline and training step separately).

Prints a Markdown table and writes ``benchmarks/results/vision.json`` (atomically) with the raw
per-repeat timings and how they were made.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import tensorsam
from tensorsam.data.images import ChannelNorm, augment
from tensorsam.models import resnet
from tensorsam.nn import count_parameters
from tensorsam.optim import build_optimizer
from tensorsam.run.io import atomic_write_json
from tensorsam.run.meta import git_commit
from tensorsam.tasks.vision.config import NEEDS_GROUPS, VisionConfig
from tensorsam.tasks.vision.experiment import optimizer_options
from tensorsam.train.steps import train_step

RESULTS = Path(__file__).resolve().parent / "results" / "vision.json"
METHODS = ("sgd", "sam", "das", "rebalance", "sam-every-2")
GOALS = {"das": 1.02, "sam": 2.05}   # full-step time / SGD's, median of paired repeats
PIPELINE_GOAL = 0.05                  # pipeline time / SGD full step
# a tensorized ResNet's SGD step / the dense one's of the same depth (CP and Tucker run their convs as
# chains; TR at rank 15 rebuilds each weight: the authors' code took 1.45x)
DENSE_GOALS = {"cp": 0.9, "tucker": 0.9, "tr": 1.03}
IMAGE_SHAPE = (1, 28, 28)             # Fashion-MNIST
PADDING = 2                           # the vision task's crop padding


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Pipeline:
    """The vision task's batches: a permutation drawn on the CPU and moved to the images' device once
    per pass, sliced per step as in ``fit``, then augment + normalise."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, norm: ChannelNorm, batch: int, seed: int):
        self.x, self.y, self.norm, self.batch = x, y, norm, batch
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(len(y), generator=self.gen).to(x.device), 0

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch > len(self.order):
            self.order, self.pos = torch.randperm(len(self.y), generator=self.gen).to(self.x.device), 0
        idx = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        dev = self.x.device
        xb, yb = self.x[idx].to(dev, non_blocking=True), self.y[idx].to(dev, non_blocking=True)
        return self.norm(augment(xb, padding=PADDING)), yb


class Case:
    """One (model, method): its own model copy (same initial weights for every method), optimizer,
    scheduler and batch stream.  ``step()`` is the timed unit."""

    def __init__(self, label: str, depth: int, fmt: str, rank: int, method: str, cfg: VisionConfig,
                 data, device: torch.device, seed: int = 0):
        self.label, self.method = label, method
        torch.manual_seed(seed)
        self.model = resnet(depth, None if fmt == "none" else fmt, rank, 10, IMAGE_SHAPE[0]).to(device)
        self.opt = build_optimizer(base_method(method), self.model.parameters(), **method_options(cfg, method, self.model))
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=10**6)
        self.pipeline = Pipeline(*data, cfg.batch_size, seed)
        self.loss_sum = torch.zeros((), device=device)   # fit accumulates the loss on the device
        self.every = int(method.rsplit("-", 1)[1]) if method.startswith("sam-every-") else 1
        self.model.train()

    def update(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        self.loss_sum += train_step(self.model, self.opt, F.cross_entropy, [(xb, yb)])
        self.sched.step()

    def step(self) -> None:
        self.update(*self.pipeline())


def base_method(method: str) -> str:
    """``das`` of ``das+compile``: the factory's method name."""
    return method.partition("+")[0]


def method_options(cfg: VisionConfig, method: str, model) -> dict:
    """The vision task's factory options; ``<method>+compile`` adds ``compile=True`` (SAM's ascent or
    DAS's scaling as one ``torch.compile``'d function)."""
    options = optimizer_options(cfg, base_method(method), model)
    suffix = method.partition("+")[2]
    if suffix not in ("", "compile"):
        raise ValueError(f"unknown method suffix {suffix!r} in {method!r}; expected <method>+compile")
    return {**options, "compile": True} if suffix else options


def steps_for(case, steps: int) -> int:
    """``steps`` rounded up to a multiple of the case's SAM period."""
    return -(-steps // case.every) * case.every


clock = time.perf_counter  # --clock cpu: time.process_time (this process's CPU time)


def time_block(fn, n: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``n`` calls, synchronised on CUDA before and after."""
    sync(device)
    t0 = clock()
    for _ in range(n):
        fn()
    sync(device)
    return (clock() - t0) / n


def count_syncs(fn, device: torch.device) -> list[str]:
    """The host syncs ``fn`` makes on CUDA, as 'file:line' of the Python line that caused each."""
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    return [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    p25, p75 = (statistics.quantiles(xs, n=4, method="inclusive")[::2] if len(xs) >= 2 else (xs[0], xs[0]))
    return {"n": len(xs), "median": statistics.median(xs), "p25": p25, "p75": p75, "min": xs[0], "max": xs[-1]}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def model_label(depth: int, fmt: str, rank: int) -> str:
    return f"ResNet-{depth}" if fmt == "none" else f"{fmt.upper()}-ResNet-{depth} r{rank}"


def parse_list(text: str, kind=str) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def run(args, device: torch.device, log) -> dict:
    cfg = VisionConfig(dataset="fashion-mnist", depth=args.depth[0], batch_size=args.batch_size,
                       device=str(device))
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, *IMAGE_SHAPE), dtype=torch.uint8, generator=gen).to(device)
    y = torch.randint(0, 10, (args.images,), generator=gen).to(device)
    data = (x, y, ChannelNorm.fit(x))

    models, cases, pipes = {}, [], {}
    for depth in args.depth:
        for fmt in args.formats:
            label = model_label(depth, fmt, args.rank)
            methods = [m for m in args.methods if not (fmt == "none" and base_method(m) in NEEDS_GROUPS)]
            for m in methods:
                cases.append(Case(label, depth, fmt, args.rank, m, cfg, data, device))
            models[label] = {"depth": depth, "format": fmt, "rank": None if fmt == "none" else args.rank,
                             "params": count_parameters(cases[-1].model), "methods": methods}
            pipes[label] = Pipeline(x, y, data[2], args.batch_size, seed=1)
    # the rotation: every case, and the pipeline alone once per model
    items = [((c.label, c.method), c.step, steps_for(c, args.steps)) for c in cases]
    # the pipeline is cheap: more calls per repeat, for a steadier share
    items += [((label, "pipeline"), p, max(10, args.steps)) for label, p in pipes.items()]

    t0 = time.perf_counter()
    log(f"warm-up: {len(cases)} cases x {args.warmup} steps on {device}")
    for c in cases:
        time_block(c.step, steps_for(c, args.warmup), device)
    for p in pipes.values():
        time_block(p, args.warmup, device)
    log(f"warm-up done in {time.perf_counter() - t0:.1f} s; {args.repeats} repeats of {len(items)} timings")

    times: dict = {key: [] for key, _, _ in items}
    t_start = time.perf_counter()
    for r in range(args.repeats):
        k = r % len(items)
        for key, fn, n in items[k:] + items[:k]:
            times[key].append(time_block(fn, n, device))
        done = time.perf_counter() - t_start
        log(f"repeat {r + 1}/{args.repeats}: {done:.1f} s, about {done / (r + 1) * (args.repeats - r - 1):.0f} s left")
        if args.max_seconds and time.perf_counter() - t0 > args.max_seconds and r + 1 >= 3 and r + 1 < args.repeats:
            log(f"stopping after {r + 1} repeats: --max-seconds {args.max_seconds:g} reached")
            break

    syncs = None
    if device.type == "cuda":  # after timing: the debug mode itself costs time
        syncs = {}
        for c in cases:
            xb, yb = c.pipeline()
            syncs[f"{c.label} {c.method}"] = {
                "pipeline": count_syncs(c.pipeline, device),
                "train_step": count_syncs(lambda c=c, xb=xb, yb=yb: [c.update(xb, yb) for _ in range(c.every)], device),
                "steps": c.every}
    return {"models": models, "times": times, "syncs": syncs}


def analyse(res: dict, batch: int) -> dict:
    times, rows, ratios, pipeline = res["times"], [], [], []
    for label, info in res["models"].items():
        sgd, pipe = times.get((label, "sgd")), times[(label, "pipeline")]
        for m in info["methods"]:
            ts = times[(label, m)]
            step = statistics.median(ts)
            row = {"model": label, "method": m, "params": info["params"], "ms_per_step": 1e3 * step,
                   "images_per_s": batch / step, "pipeline_share": statistics.median(pipe) / step,
                   "vs_sgd": None if sgd is None else summary([a / b for a, b in zip(ts, sgd)])}
            rows.append(row)
            goal = GOALS.get(base_method(m))
            if goal is not None and row["vs_sgd"] is not None:
                ratios.append({"model": label, "ratio": f"{m.upper()}/SGD", **row["vs_sgd"], "goal": goal,
                               "met": row["vs_sgd"]["median"] <= goal})
        if sgd is not None:
            s = summary([p / t for p, t in zip(pipe, sgd)])
            pipeline.append({"model": label, "ms_per_batch": 1e3 * statistics.median(pipe), "share_of_sgd_step": s,
                             "goal": PIPELINE_GOAL, "met": s["median"] < PIPELINE_GOAL})
        dense = times.get((model_label(info["depth"], "none", 0), "sgd"))
        if info["format"] != "none" and sgd is not None and dense is not None:
            goal = DENSE_GOALS.get(info["format"])
            s = summary([a / b for a, b in zip(sgd, dense)])
            ratios.append({"model": label, "ratio": "SGD / dense SGD", **s, "goal": goal,
                           "met": None if goal is None else s["median"] <= goal})
    return {"rows": rows, "ratios": ratios, "pipeline": pipeline}


def markdown(out: dict, head: str) -> str:
    def f3(v):
        return "—" if v is None else f"{v:.3f}"

    lines = [head, "", "| model | params | method | ms/step | images/s | × SGD (paired median) | IQR | min–max | pipeline share |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in out["rows"]:
        s = r["vs_sgd"] or {}
        lines.append(f"| {r['model']} | {r['params']:,} | {r['method']} | {r['ms_per_step']:.1f} | "
                     f"{r['images_per_s']:.0f} | {f3(s.get('median'))} | "
                     f"{f3(s.get('p25'))}–{f3(s.get('p75'))} | {f3(s.get('min'))}–{f3(s.get('max'))} | "
                     f"{100 * r['pipeline_share']:.1f} % |")
    lines += ["", "| quantity | model | median | IQR | min–max | goal | met |", "|---|---|---:|---:|---:|---:|---|"]
    for q in out["ratios"]:
        goal = "–" if q["goal"] is None else f"≤ {q['goal']}"
        met = "–" if q["met"] is None else "yes" if q["met"] else "NO"
        lines.append(f"| {q['ratio']} (full step) | {q['model']} | {q['median']:.3f} | {q['p25']:.3f}–{q['p75']:.3f} | "
                     f"{q['min']:.3f}–{q['max']:.3f} | {goal} | {met} |")
    for p in out["pipeline"]:
        s = p["share_of_sgd_step"]
        lines.append(f"| pipeline / SGD step ({p['ms_per_batch']:.2f} ms per batch) | {p['model']} | "
                     f"{100 * s['median']:.1f} % | {100 * s['p25']:.1f}–{100 * s['p75']:.1f} % | "
                     f"{100 * s['min']:.1f}–{100 * s['max']:.1f} % | < {100 * p['goal']:.0f} % | "
                     f"{'yes' if p['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    p.add_argument("--depth", default="20", help="ResNet depths, comma-separated (20, 32)")
    p.add_argument("--formats", default="none,tr", help="comma-separated: none (dense), tr, tt, cp, tucker")
    p.add_argument("--rank", type=int, default=10, help="rank of the tensorized convs")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated methods (dense skips das, rebalance); <method>+compile: with compile=True")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15, help="interleaved repeats")
    p.add_argument("--steps", type=int, default=4, help="steps per case per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per case first")
    p.add_argument("--images", type=int, default=4096, help="random uint8 training images held on the device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2, --quick 1; 0 = torch's default)")
    p.add_argument("--max-seconds", type=float, default=0,
                   help="stop repeating (after at least 3 repeats) once warm-up and repeats took this long")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke run, not a measurement")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: time.perf_counter; cpu: this process's CPU time (time.process_time), for a "
                   "machine shared with other jobs; needs --device cpu and --threads 1")
    args = p.parse_args(argv)
    if args.clock == "cpu" and (args.device.startswith("cuda") or args.threads != 1):
        p.error("--clock cpu needs --device cpu and --threads 1 (CPU time sums over threads and misses the GPU)")
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.quick:
        args.batch_size, args.repeats, args.steps, args.warmup, args.images = 4, 2, 1, 1, 16
        args.rank = min(args.rank, 4)
        os.environ.setdefault("TENSORSAM_AUTO_TIMING", "0")   # auto's one-time timing of each conv takes seconds
        # one thread: on a loaded machine two spin-waiting OpenMP threads made tiny TR steps 5-10x slower
        args.threads = 1 if args.threads is None else args.threads
    args.threads = 2 if args.threads is None else args.threads
    args.depth, args.formats, args.methods = parse_list(args.depth, int), parse_list(args.formats), parse_list(args.methods)
    if not set(args.depth) <= {20, 32}:
        p.error(f"--depth must be 20 and/or 32, got {args.depth}")
    if min(args.batch_size, args.repeats, args.steps, args.rank, args.warmup + 1) < 1 or args.images < args.batch_size:
        p.error("--batch-size, --repeats, --steps and --rank must be positive, --images >= --batch-size")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() and args.clock == "wall" else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg):
        print(f"[vision bench] {msg}", file=sys.stderr, flush=True)

    started = datetime.datetime.now(datetime.UTC)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    res = run(args, device, log)
    out = analyse(res, args.batch_size)
    argv_used = sys.argv[1:] if argv is None else list(argv)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    head = (f"Vision training step ({'QUICK smoke run, not a measurement; ' if args.quick else ''}{device}: {where}, "
            f"{torch.get_num_threads()} threads, {args.clock} clock, torch {torch.__version__}): batch {args.batch_size} of 1x28x28 uint8 "
            f"images, {len(next(iter(res['times'].values())))} interleaved repeats x {args.steps} steps, {started:%Y-%m-%d %H:%M} UTC.")
    table = markdown(out, head)
    record = {
        "benchmark": "vision",
        "command": shlex.join(["python", "benchmarks/vision.py", *argv_used]),
        "date": f"{started:%Y-%m-%d %H:%M:%S} UTC",
        "seconds": (datetime.datetime.now(datetime.UTC) - started).total_seconds(),
        "quick": args.quick,
        "tensorsam": tensorsam.__version__, "commit": git_commit(), "torch": torch.__version__, "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "clock": args.clock,
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")},
        "load_average_at_start": load,
        "settings": {"depths": args.depth, "formats": args.formats, "rank": args.rank, "methods": args.methods,
                     "batch_size": args.batch_size, "repeats": args.repeats,
                     "repeats_done": len(next(iter(res["times"].values()))), "steps_per_repeat": args.steps,
                     "warmup_steps": args.warmup, "images": args.images, "image_shape": list(IMAGE_SHAPE),
                     "augment_padding": PADDING},
        "models": res["models"],
        **out,
        "host_syncs": res["syncs"],
        "raw_seconds_per_step": {f"{label} {m}": ts for (label, m), ts in res["times"].items()},
        "markdown": table,
    }
    print(table)
    if res["syncs"] is not None:
        for case, s in res["syncs"].items():
            print(f"host syncs, {case}: pipeline {len(s['pipeline'])} {s['pipeline']}, "
                  f"{s['steps']} train step(s) {len(s['train_step'])} {sorted(set(s['train_step']))}")
    atomic_write_json(args.out, record)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
