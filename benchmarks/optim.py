"""Optimizer overhead on TR-ResNet-32 (rank 15, batch 128) and on a LoRA-like MLP.

    python benchmarks/optim.py [--quick] [--device cuda] [--threads 2]

Measures, interleaved in one run (each round times every optimizer once, in a rotating order, so
that load from other processes hits all of them alike):

- the median full training step (zero_grad, forward, backward, optimizer step) of SGD, SAM,
  DAS and Rebalance (every step), and their ratios to SGD;
- the optimizer step alone (``opt.step()`` on fixed gradients) of SGD, DAS and Rebalance, and
  DAS's extra time per step as a percentage of the median SGD full step;
- the same for SGD vs nBAR on an MLP of two-factor layers x @ A @ B.

Prints a rich table and writes ``benchmarks/results/optim.md`` (machine, versions, settings).
Timings use ``time.perf_counter`` with ``torch.cuda.synchronize`` around each on CUDA.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from tensorsam import __version__
from tensorsam.groups import scale_invariant_groups
from tensorsam.models import resnet
from tensorsam.optim import BAR, DAS, SAM, Rebalance
from tensorsam.run.meta import git_commit

BASE = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}
TARGETS = {  # issue 3, CPU targets
    "DAS.step / SGD.step": 1.5,
    "DAS extra step, % of SGD full step": 1.0,
    "SAM / SGD (full step)": 2.03,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def make_optimizer(name: str, model: nn.Module, pairs=None):
    params = list(model.parameters())
    if name == "SGD":
        return torch.optim.SGD(params, **BASE)
    if name == "SAM":
        return SAM(params, torch.optim.SGD, rho=0.05, **BASE)
    if name == "DAS":
        return DAS(params, torch.optim.SGD, groups=scale_invariant_groups(model), alpha=0.1, **BASE)
    if name == "Rebalance":
        return Rebalance(params, torch.optim.SGD, groups=scale_invariant_groups(model), every=1, **BASE)
    if name == "nBAR":
        return BAR(params, torch.optim.SGD, pairs=pairs, mode="n", alpha=0.1,
                   alpha_schedule="constant", **BASE)
    raise ValueError(f"unknown optimizer {name!r}")


class Runner:
    """One model copy + optimizer; ``full_step`` and ``opt_step`` are what gets timed."""

    def __init__(self, name, model, x, y, loss_fn, pairs=None):
        self.name, self.model, self.x, self.y, self.loss_fn = name, model, x, y, loss_fn
        self.opt = make_optimizer(name, model, pairs)

    def closure(self):
        self.opt.zero_grad()
        loss = self.loss_fn(self.model(self.x), self.y)
        loss.backward()
        return loss

    def full_step(self):
        if self.name == "SAM":
            self.opt.step(self.closure)
        else:
            self.closure()
            self.opt.step()

    def opt_step(self):
        self.opt.step()


def interleaved(runners, fn_name, rounds, device, warmup=2) -> dict[str, list[float]]:
    """Time ``fn_name`` of every runner once per round, rotating the order each round."""
    times = {r.name: [] for r in runners}
    for i in range(warmup + rounds):
        k = i % len(runners)
        for r in runners[k:] + runners[:k]:
            t = timed(getattr(r, fn_name), device)
            if i >= warmup:
                times[r.name].append(t)
    return times


def resnet_runners(names, device, batch, seed=0):
    torch.manual_seed(seed)
    model = resnet(32, "tr", 15).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return [Runner(n, copy.deepcopy(model), x, y, F.cross_entropy) for n in names], model


class LowRank(nn.Module):
    """x @ A @ B: a two-factor (LoRA-like) layer; (A, B) is a scale-invariant pair."""

    def __init__(self, d_in, d_out, rank):
        super().__init__()
        self.A = nn.Parameter(torch.randn(d_in, rank) / d_in**0.5)
        self.B = nn.Parameter(torch.randn(rank, d_out) / rank**0.5)

    def forward(self, x):
        return x @ self.A @ self.B


def lowrank_runners(names, device, batch, width=512, rank=16, depth=8, seed=0):
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [LowRank(width, width, rank), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10)).to(device)
    x = torch.randn(batch, width, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    runners = []
    for n in names:
        m = copy.deepcopy(model)
        pairs = [(mod.A, mod.B) for mod in m.modules() if isinstance(mod, LowRank)]
        runners.append(Runner(n, m, x, y, F.cross_entropy, pairs=pairs))
    return runners


def prepare_grads(runners):
    """Fill gradients once so that ``opt.step()`` alone can be timed on them."""
    for r in runners:
        r.closure()


def med(xs) -> float:
    return statistics.median(xs)


def machine(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


def omp_env() -> str:
    """The threading variables that change CPU timings (an oversubscribed machine with OpenMP's
    default spin-waiting makes every parallel region cost milliseconds; OMP_WAIT_POLICY=PASSIVE
    avoids that)."""
    keys = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    return ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in keys)


def run(args) -> dict:
    device = torch.device(args.device)
    full_rounds, step_rounds = (5, 20) if args.quick else (args.rounds, 5 * args.rounds)
    names = ["SGD", "SAM", "DAS", "Rebalance"]
    runners, model = resnet_runners(names, device, args.batch)
    n_groups = len(scale_invariant_groups(model))
    n_params = sum(p.numel() for p in model.parameters())
    full = interleaved(runners, "full_step", full_rounds, device)
    stepped = [r for r in runners if r.name != "SAM"]
    prepare_grads(stepped)
    alone = interleaved(stepped, "opt_step", step_rounds, device, warmup=3)

    lr_names = ["SGD", "nBAR"]
    lr_runners = lowrank_runners(lr_names, device, args.batch)
    lr_full = interleaved(lr_runners, "full_step", 4 * full_rounds, device)
    prepare_grads(lr_runners)
    lr_alone = interleaved(lr_runners, "opt_step", step_rounds, device, warmup=3)
    return {"device": device, "full": full, "alone": alone, "lr_full": lr_full, "lr_alone": lr_alone,
            "n_groups": n_groups, "n_params": n_params, "full_rounds": full_rounds,
            "step_rounds": step_rounds}


def paired(times, name, op=lambda t, s: t / s) -> float:
    """Median over rounds of ``op(t_name, t_SGD)`` within the same round (robust to load drifts)."""
    return med([op(t, s) for t, s in zip(times[name], times["SGD"])])


def rows_of(res) -> tuple[list[tuple], list[tuple]]:
    """(table rows, target rows): medians in ms, median ratios and median paired ratios to SGD."""
    rows = []
    for label, full, alone in (("TR-ResNet-32", res["full"], res["alone"]),
                               ("LoRA-like MLP", res["lr_full"], res["lr_alone"])):
        for name, ts in full.items():
            step = alone.get(name)
            rows.append((label, name, med(ts) * 1e3, med(ts) / med(full["SGD"]), paired(full, name),
                         None if step is None else med(step) * 1e3,
                         None if step is None else paired(alone, name)))
    f, a = res["full"], res["alone"]
    diff = paired(a, "DAS", lambda t, s: t - s)
    measured = {
        "DAS.step / SGD.step": paired(a, "DAS"),
        "DAS extra step, % of SGD full step": 100 * diff / med(f["SGD"]),
        "SAM / SGD (full step)": paired(f, "SAM"),
    }
    targets = [(k, v, TARGETS[k], v <= TARGETS[k]) for k, v in measured.items()]
    cuda = res["device"].type == "cuda"
    das_full = paired(f, "DAS")
    targets.append(("DAS / SGD (full step)", das_full, 1.03 if cuda else None, das_full <= 1.03 if cuda else None))
    lr_diff = paired(res["lr_alone"], "nBAR", lambda t, s: t - s)
    targets.append(("nBAR extra step, % of SGD full step (LoRA-like MLP)",
                    100 * lr_diff / med(res["lr_full"]["SGD"]), None, None))
    return rows, targets


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


COLUMNS = ("model", "optimizer", "full step ms (median)", "× SGD", "× SGD (paired)",
           "opt.step ms (median)", "× SGD.step (paired)")


def cells(r) -> list[str]:
    return [r[0], r[1], fmt(r[2], ".1f"), fmt(r[3], ".3f"), fmt(r[4], ".3f"), fmt(r[5], ".2f"), fmt(r[6], ".2f")]


def render(res, args) -> tuple[Table, Table, str]:
    rows, targets = rows_of(res)
    table = Table(title=f"optimizer overhead ({machine(res['device'])})")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("model", "optimizer") else "right")
    for r in rows:
        table.add_row(*cells(r))
    check = Table(title="targets (issue 3)")
    for col in ("quantity", "measured", "target", "met"):
        check.add_column(col)
    for name, v, t, ok in targets:
        check.add_row(name, f"{v:.3f}", fmt(t, "") if t is None else f"≤ {t}",
                      "—" if ok is None else ("yes" if ok else "NO"))

    md = [
        "# Optimizer overhead benchmark",
        "",
        (f"`python benchmarks/optim.py{' --quick' if args.quick else ''} --device {args.device}` — "
         f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, tensorsam {__version__} "
         f"(commit {git_commit()}), torch {torch.__version__}, Python {platform.python_version()}."),
        "",
        f"Environment: {omp_env()}.",
        "",
        (f"Machine: {machine(res['device'])}. Batch {args.batch}, random CIFAR-shaped data; "
         f"TR-ResNet-32 rank 15 ({res['n_params']} parameters, {res['n_groups']} groups). "
         f"Base optimizer SGD(lr=0.1, momentum=0.9, weight_decay=1e-4); SAM rho=0.05, DAS alpha=0.1 "
         f"(global u), Rebalance every step, nBAR alpha=0.1. Medians of {res['full_rounds']} interleaved "
         f"full steps (LoRA-like MLP: {4 * res['full_rounds']}) and {res['step_rounds']} interleaved "
         "optimizer steps. The LoRA-like MLP is 8 layers x @ A @ B (512 -> 16 -> 512) and a linear head."),
        "",
        ("Ratios: '× SGD' divides medians; 'paired' is the median over rounds of the ratio within one "
         "round (each round times every optimizer back to back), which is what the targets use, being "
         "less sensitive to the machine's load drifting between rounds."),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---:|" * (len(COLUMNS) - 2),
    ]
    md += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    md += ["", "| quantity | measured | target | met |", "|---|---:|---:|---|"]
    md += [f"| {n} | {v:.3f} | {'—' if t is None else f'≤ {t}'} | {'—' if ok is None else ('yes' if ok else 'NO')} |"
           for n, v, t, ok in targets]
    md += ["", ("Timings on a shared machine are noisy (other processes ran at the same time); the "
                "interleaving spreads that noise over all optimizers alike, but single ratios can move by "
                "a few percent between runs."), ""]
    return table, check, "\n".join(md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few rounds (a smoke run, noisier)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=20, help="interleaved full-step rounds")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "optim.md"))
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads < 1 or args.batch < 1 or args.rounds < 1:
        print("error: --threads, --batch and --rounds must be positive", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    res = run(args)
    table, check, md = render(res, args)
    console = Console()
    console.print(table)
    console.print(check)
    from tensorsam.run.io import atomic_write_text

    out = Path(args.out)
    atomic_write_text(out, md)
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
