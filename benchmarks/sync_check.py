"""Host-sync check of every optimizer method: no optimizer step may make the host wait for the GPU.

    python benchmarks/sync_check.py --out sync.json          # on CUDA: the check; on CPU: a dry run
    python benchmarks/sync_check.py --env env.json           # the environment record alone

A small tensorized model (a TR conv, a CP linear and a plain (A, B) pair, no BatchNorm) is trained
for ``--steps`` full steps (``tensorsam.train.train_step``: forward, backward, SAM's two passes)
with every method of ``build_optimizer``.  The optimizer's calls (``first_step``, ``restore``,
``second_step``, ``step``) run under ``torch.cuda.set_sync_debug_mode("error")``, so a host sync
inside any of them raises; the forward and backward passes run as usual.  A method passes when no
guarded call raised.  When the first step fails (lazy state set up once), the method is run again
with its first step unguarded, to tell a one-time sync from one on every step.

On the CPU nothing can sync: the same steps run unguarded and the record says ``dry_run: true``
(the check needs CUDA).  The JSON record is written atomically; the exit status is 1 when a method
failed on CUDA, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import tensorsam
from tensorsam.nn import TensorizedConv2d, TensorizedLinear
from tensorsam.optim import build_optimizer
from tensorsam.run.io import atomic_write_json
from tensorsam.run.meta import git_commit
from tensorsam.train.steps import train_step

# (case name, factory method, base optimizer): every method of the factory over SGD, the main ones over AdamW too
CASES = [(m, m, "sgd") for m in ("sgd", "adam", "sam", "asam", "das", "nbar", "obar", "rebalance",
                                 "sam-every-2", "sam-random-0.5")]
CASES += [(f"{m}/adamw", m, "adamw") for m in ("sam", "das", "rebalance")]
GUARDED = ("first_step", "restore", "second_step", "step")   # the optimizer calls checked
PACKAGES = ("numpy", "opt_einsum", "tensorly", "transformers", "peft", "accelerate", "scipy")


class Net(nn.Module):
    """TR conv 3->16 (8x8 images) -> CP linear 1024->32 -> a plain pair B @ A (10 classes)."""

    def __init__(self):
        super().__init__()
        self.conv = TensorizedConv2d(3, 16, 3, format="tr", rank=4, padding=1)
        self.fc = TensorizedLinear(1024, 32, format="cp", rank=4)
        self.a = nn.Parameter(torch.randn(8, 32) / 32 ** 0.5)
        self.b = nn.Parameter(torch.randn(10, 8) / 8 ** 0.5)

    def forward(self, x):
        h = self.fc(F.relu(self.conv(x)).flatten(1))
        return F.linear(F.linear(F.relu(h), self.a), self.b)


def options(method: str, base: str, model: Net) -> dict:
    """Factory options of ``method``: groups (the model, or the (A, B) pair for BAR), strengths, lr."""
    opts = {"base": base, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4} if base == "sgd" else \
        {"base": base, "lr": 1e-3}
    if method in ("adam", "sgd"):
        return {k: v for k, v in opts.items() if k != "base" and (method == "sgd" or k == "lr")}
    if method.startswith("sam") or method == "asam":
        opts["rho"] = 0.05
    if method in ("das", "nbar", "obar"):
        opts["alpha"] = 0.1
    if method in ("das", "rebalance"):
        opts["groups"] = model
    if method in ("nbar", "obar"):
        opts["groups"] = [[model.a, model.b]]
    return opts


@contextlib.contextmanager
def sync_errors(on: bool):
    """``set_sync_debug_mode("error")`` for the block (nested blocks restore the outer mode)."""
    if not on:
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def guard(opt, flag: dict) -> None:
    """Run the optimizer's calls :data:`GUARDED` under ``sync_errors(flag["on"])``."""
    def wrap(fn):
        def call(*args, **kwargs):
            with sync_errors(flag["on"]):
                return fn(*args, **kwargs)
        return call

    for name in GUARDED:
        if hasattr(opt, name):
            setattr(opt, name, wrap(getattr(opt, name)))


def where(err: BaseException) -> list[str]:
    """The innermost frames of ``err`` (file:line function), tensorsam's and torch.optim's first."""
    frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_tb(err.__traceback__)
              if "tensorsam" in f.filename or "optim" in f.filename]
    return frames[-4:]


def run_case(method: str, base: str, steps: int, device: torch.device, first_guarded: bool) -> dict:
    """``steps`` full steps of ``method``; the guard is on from the first step (or the second)."""
    torch.manual_seed(0)
    model = Net().to(device)
    opt = build_optimizer(method, model.parameters(), total_steps=steps, **options(method, base, model))
    flag = {"on": False}
    guard(opt, flag)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 8, 8, generator=gen).to(device), torch.randint(0, 10, (16,), generator=gen).to(device))
               for _ in range(steps)]
    check = device.type == "cuda"
    sam_steps = 0
    for i, batch in enumerate(batches):
        flag["on"] = check and (first_guarded or i > 0)
        sam_steps += int(hasattr(opt, "perturbs_this_step") and opt.perturbs_this_step())
        try:
            loss = train_step(model, opt, F.cross_entropy, [batch])
        except RuntimeError as err:
            if not flag["on"]:
                raise
            return {"ok": False, "step": i + 1, "error": str(err).strip()[:600], "where": where(err)}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    finite = bool(torch.isfinite(loss))
    return {"ok": finite, "steps": steps, "sam_steps": sam_steps, "final_loss": float(loss),
            **({} if finite else {"error": "non-finite loss"})}


def check_method(name: str, method: str, base: str, steps: int, device: torch.device) -> dict:
    """One case's record: ``status`` pass / fail / dry-run, with the first failure's text."""
    t0 = time.perf_counter()
    try:
        first = run_case(method, base, steps, device, first_guarded=True)
    except Exception as err:       # noqa: BLE001  (any error of one case is recorded, the others still run)
        return {"case": name, "method": method, "base": base, "status": "error",
                "error": f"{type(err).__name__}: {err}"[:600], "where": where(err)}
    rec = {"case": name, "method": method, "base": base, "first_step_guarded": first}
    if device.type != "cuda":
        rec["status"] = "dry-run" if first["ok"] else "error"
    elif first["ok"]:
        rec["status"] = "pass"
    else:
        rec["status"] = "fail"
        if first.get("step") == 1:      # is it only the first step (state set up once)?
            rec["first_step_unguarded"] = run_case(method, base, steps, device, first_guarded=False)
            rec["later_steps_ok"] = rec["first_step_unguarded"]["ok"]
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                               "--format=csv,noheader"], check=False, capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        return f"nvidia-smi failed: {err}"


def environment() -> dict:
    """Versions and the GPU: what a result on another machine needs next to it."""
    cuda = torch.cuda.is_available()
    gpus = [{"name": torch.cuda.get_device_name(i), "capability": list(torch.cuda.get_device_capability(i)),
             "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2 ** 30, 1)}
            for i in range(torch.cuda.device_count())] if cuda else []
    return {"date": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC", "host": platform.node(),
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "tensorsam": tensorsam.__version__, "commit": git_commit(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "cuda_available": cuda, "gpus": gpus, "nvidia_smi": nvidia_smi(),
            "packages": {p: version(p) for p in PACKAGES},
            "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF", "OMP_NUM_THREADS")}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] (cpu: a dry run)")
    p.add_argument("--steps", type=int, default=4, help="full steps per method (>= 2)")
    p.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    p.add_argument("--out", type=Path, default=Path("sync.json"), help="JSON record")
    p.add_argument("--env", type=Path, metavar="PATH", help="write the environment record to PATH and stop")
    args = p.parse_args(argv)
    if args.env is not None:
        env = environment()
        atomic_write_json(args.env, env)
        print(f"torch {env['torch']} (CUDA {env['torch_cuda']}), GPUs: "
              f"{', '.join(g['name'] for g in env['gpus']) or 'none'}; wrote {args.env}")
        return 0
    if args.steps < 2:
        p.error(f"--steps must be >= 2, got {args.steps}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    wanted = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(wanted) - {c[0] for c in CASES})
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {[c[0] for c in CASES]}")
    cases = [c for c in CASES if not wanted or c[0] in wanted]
    dry = device.type != "cuda"
    os.environ.setdefault("TENSORSAM_AUTO_TIMING", "0")    # the forward mode by estimate: no timing per model
    if dry:
        torch.set_num_threads(1)        # tiny steps: one thread is fastest on a shared CPU
    if dry:
        print("sync check: DRY RUN on the CPU (the check needs CUDA): every method's steps run unguarded")
    records = []
    for name, method, base in cases:
        rec = check_method(name, method, base, args.steps, device)
        records.append(rec)
        print(f"  {name:16} {rec['status']:8} {rec.get('error') or rec['first_step_guarded'].get('error', '')}"[:200])
    failed = [r["case"] for r in records if r["status"] not in ("pass", "dry-run")]
    record = {"check": "sync", "dry_run": dry, "device": str(device),
              "note": "the check needs CUDA: steps ran unguarded on the CPU" if dry else
              "optimizer calls under torch.cuda.set_sync_debug_mode('error')",
              "guarded_calls": list(GUARDED), "steps": args.steps, "all_pass": None if dry else not failed,
              "failed": failed, "cases": records, "environment": environment()}
    atomic_write_json(args.out, record)
    print(f"sync check: {'dry run, ' if dry else ''}{len(records) - len(failed)}/{len(records)} ok"
          f"{'; failed: ' + ', '.join(failed) if failed else ''}; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
