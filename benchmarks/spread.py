"""Spread (median, IQR, min/max over rounds) of paired per-round timing ratios of a tensorsam tree:
the before/after check of a change to a hot path.

    git worktree add --detach ../before <old commit>
    python3 benchmarks/spread.py --tree ../before      # then
    python3 benchmarks/spread.py --tree .              # run them back to back, then in reverse order

Puts ``<tree>/src`` first on sys.path (and checks that ``tensorsam`` is imported from there),
imports ``<tree>/benchmarks/optim.py`` and ``<tree>/benchmarks/completion.py`` by file path and
reuses their functions:

- optim: ``run(args)`` (TR-ResNet-32 rank 15, batch 128, 2 torch threads) returns the raw
  per-round timings ``res["full"]`` / ``res["alone"]`` (dicts name -> list of seconds, one entry
  per interleaved round, via the script's ``interleaved``); the ratios here are taken within each
  round (round i of DAS / round i of SGD), as the script's ``paired`` does, and summarised.
- completion: the script's ``measure`` only returns aggregates, so this file has its own small
  interleaving driver around the script's ``our_loop(method, cfg, values, masks, seed)`` and
  ``plain_loop(values, mask, init)`` step callables: each variant is built and warmed up (this
  includes torch.compile), then every round times one block of steps of each variant, in an order
  rotated each round; per-round ratios of time per step are summarised.  1 torch thread.

Writes a Markdown table (also printed) to --out (default benchmarks/results/spread_<tree name>.md).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def sh(cmd, cwd=None) -> str:
    try:
        return subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=cwd, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_avg() -> str:
    out = sh(["uptime"])
    return out.split("load average:")[-1].strip() if "load average" in out else out


def tree_commit(tree: Path) -> str:
    commit = sh(["git", "rev-parse", "HEAD"], cwd=tree)
    dirty = sh(["git", "status", "--porcelain"], cwd=tree)
    return f"{commit[:12]}{' + uncommitted changes' if dirty else ''}"


def load(path: Path, name: str):
    """A script imported as a module by file path."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def import_tree(tree: Path):
    """``<tree>/src`` first on sys.path; the two benchmark scripts as modules."""
    sys.path.insert(0, str(tree / "src"))
    import tensorsam

    where = Path(tensorsam.__file__).resolve()
    if not where.is_relative_to((tree / "src").resolve()):
        raise SystemExit(f"error: tensorsam imported from {where}, not from {tree / 'src'}")
    mods = {name: load(tree / "benchmarks" / f"{name}.py", f"bench_{name}") for name in ("optim", "completion")}
    return tensorsam, mods["optim"], mods["completion"]


def summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    if len(xs) >= 2:
        p25, _, p75 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        p25 = p75 = xs[0]
    return {"n": len(xs), "median": statistics.median(xs), "p25": p25, "p75": p75, "min": xs[0], "max": xs[-1]}


def paired_ratios(times: dict, num: str, den: str) -> list[float]:
    return [a / b for a, b in zip(times[num], times[den])]


# --------------------------------------------------------------------------- optim


def optim_spread(bench, quick: bool, rounds: int, threads: int):
    import torch

    torch.set_num_threads(threads)
    args = argparse.Namespace(quick=quick, device="cpu", threads=threads, batch=128, rounds=rounds)
    res = bench.run(args)  # full: SGD/SAM/DAS/Rebalance full steps; alone: SGD/DAS/Rebalance opt.step()
    full, alone, lr_full, lr_alone = res["full"], res["alone"], res["lr_full"], res["lr_alone"]
    sgd_full_med = statistics.median(full["SGD"])
    rows = [
        ("optim", "DAS.step / SGD.step (opt step alone)", summary(paired_ratios(alone, "DAS", "SGD"))),
        ("optim", "SAM / SGD (full step)", summary(paired_ratios(full, "SAM", "SGD"))),
        ("optim", "DAS / SGD (full step)", summary(paired_ratios(full, "DAS", "SGD"))),
        ("optim", "Rebalance.step / SGD.step (opt step alone)", summary(paired_ratios(alone, "Rebalance", "SGD"))),
        ("optim", "Rebalance / SGD (full step)", summary(paired_ratios(full, "Rebalance", "SGD"))),
        ("optim", "DAS extra step (DAS.step-SGD.step per round), % of median SGD full step",
         summary([100 * (a - b) / sgd_full_med for a, b in zip(alone["DAS"], alone["SGD"])])),
        ("optim", "nBAR.step / SGD.step (LoRA-like MLP)", summary(paired_ratios(lr_alone, "nBAR", "SGD"))),
        ("optim", "nBAR / SGD (full step, LoRA-like MLP)", summary(paired_ratios(lr_full, "nBAR", "SGD"))),
    ]
    absolute = [(f"TR-ResNet-32 full step {k}", 1e3 * statistics.median(v), len(v)) for k, v in full.items()]
    absolute += [(f"TR-ResNet-32 opt.step {k}", 1e3 * statistics.median(v), len(v)) for k, v in alone.items()]
    return rows, absolute


# --------------------------------------------------------------------------- completion


def completion_spread(bench, quick: bool, rounds: int, block: int, warmup: int, compile_: bool,
                      clock=time.perf_counter):
    import torch

    torch.set_num_threads(1)
    from tensorsam.tasks.completion import CompletionConfig, build_model, prepare

    # the same setup as benchmarks/completion.py main()
    cfg = CompletionConfig(seeds=[42], compile=compile_, threads=1)
    data, masks = prepare(cfg)
    values = data.values.float()
    m = masks[42]
    init = [c.detach() for c in build_model(cfg, values.shape, cfg.rank, 42).cores]
    makers = {
        "plain": lambda: bench.plain_loop(values, m.train, init),
        "adam": lambda: bench.our_loop("adam", cfg, values, m, 42),
        "sam": lambda: bench.our_loop("sam", cfg, values, m, 42),
        "das": lambda: bench.our_loop("das", cfg, values, m, 42),
    }
    # this script's own build_and_warm: it only calls the tree's step makers, and older trees lack it
    own = load(Path(__file__).resolve().parent / "completion.py", "bench_completion_own")
    steps, setup = own.build_and_warm(makers, warmup)
    names = list(steps)
    per_step = {n: [] for n in names}
    for i in range(rounds):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            step = steps[n]
            t0 = clock()
            for _ in range(block):
                step()
            per_step[n].append((clock() - t0) / block)
    rows = [
        ("completion", "DAS / Adam (ours, time per step)", summary(paired_ratios(per_step, "das", "adam"))),
        ("completion", "SAM / Adam (ours, time per step)", summary(paired_ratios(per_step, "sam", "adam"))),
        ("completion", "plain / ours Adam (time per step; >1 = ours faster)",
         summary(paired_ratios(per_step, "plain", "adam"))),
    ]
    absolute = [(f"completion {n}: µs/step (setup+warm-up {setup[n]:.1f} s)", 1e6 * statistics.median(v), len(v))
                for n, v in per_step.items()]
    return rows, absolute


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", required=True, type=Path, help="a tensorsam checkout")
    ap.add_argument("--quick", action="store_true", help="few rounds: a smoke test, not a measurement")
    ap.add_argument("--out", type=Path, help="Markdown output (default benchmarks/results/spread_<tree name>.md)")
    ap.add_argument("--only", choices=("optim", "completion"), help="run one of the two benchmarks")
    ap.add_argument("--rounds", type=int, default=20,
                    help="optim full-step rounds (opt-step rounds = 5x, as in benchmarks/optim.py)")
    ap.add_argument("--comp-rounds", type=int, default=15, help="completion rounds")
    ap.add_argument("--comp-block", type=int, default=200, help="completion steps per variant per round")
    ap.add_argument("--comp-warmup", type=int, default=300, help="completion warm-up steps per variant")
    ap.add_argument("--no-compile", action="store_true", help="completion: eager autograd (compile=False)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="completion (1 thread): wall = time.perf_counter, cpu = this process's CPU time "
                    "(time.process_time), for a machine shared with other jobs")
    args = ap.parse_args(argv)
    tree = args.tree.resolve()
    if args.quick:
        args.comp_rounds, args.comp_block, args.comp_warmup = 3, 50, 50
    results = Path(__file__).resolve().parent / "results"
    out = args.out or results / f"spread_{tree.resolve().name}{'_quick' if args.quick else ''}.md"

    load_before = load_avg()
    started = datetime.datetime.now(datetime.UTC)
    tensorsam, bench_optim, bench_completion = import_tree(tree)
    import torch

    rows, absolute = [], []
    if args.only in (None, "optim"):
        r, a = optim_spread(bench_optim, args.quick, args.rounds, threads=2)
        rows += r
        absolute += a
    if args.only in (None, "completion"):
        r, a = completion_spread(bench_completion, args.quick, args.comp_rounds, args.comp_block,
                                 args.comp_warmup, not args.no_compile,
                                 time.process_time if args.clock == "cpu" else time.perf_counter)
        rows += r
        absolute += a
    load_after = load_avg()
    finished = datetime.datetime.now(datetime.UTC)

    keys = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    md = [
        f"# Timing spread: {tree}{' (QUICK smoke run: few rounds, not a measurement)' if args.quick else ''}",
        "",
        f"- command: `python3 {' '.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}`",
        f"- date: {started:%Y-%m-%d %H:%M:%S} – {finished:%H:%M:%S} UTC",
        f"- tree: {tree}, commit {tree_commit(tree)}; tensorsam {tensorsam.__version__} from {Path(tensorsam.__file__).parent}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} logical cores; "
        + ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in keys),
        f"- load average (1, 5, 15 min) before: {load_before}; after: {load_after}",
        (f"- optim: benchmarks/optim.py run() with {'--quick (5 full / 20 opt-step rounds)' if args.quick else f'{args.rounds} full-step / {5 * args.rounds} opt-step rounds'}, "
         "batch 128, 2 threads; completion: "
         f"{args.comp_rounds} rounds x {args.comp_block} steps per variant after {args.comp_warmup} warm-up steps, "
         f"order rotated per round, 1 thread, compile={not args.no_compile}"),
        "- every ratio is taken within one round (paired), then summarised over rounds",
        "",
        "| bench | paired per-round ratio | rounds | median | p25 | p75 | IQR (p75-p25) | min | max |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for bench, label, s in rows:
        md.append(f"| {bench} | {label} | {s['n']} | {s['median']:.3f} | {s['p25']:.3f} | {s['p75']:.3f} | "
                  f"{s['p75'] - s['p25']:.3f} | {s['min']:.3f} | {s['max']:.3f} |")
    md += ["", "| absolute (median over rounds) | value | rounds |", "|---|---:|---:|"]
    md += [f"| {label}{'' if 'µs' in label else ', ms'} | {v:.2f} | {n} |" for label, v, n in absolute]
    text = "\n".join(md) + "\n"
    print(text)
    # tensorsam's atomic write, from this script's own checkout (the tree measured may predate it)
    io = load(Path(__file__).resolve().parents[1] / "src" / "tensorsam" / "run" / "io.py", "spread_io")
    io.atomic_write_text(out, text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
