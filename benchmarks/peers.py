"""tensorsam side by side with its peers: tensorly-torch (tltorch), tednet, pytorch-optimizer's SAM, dense torch.

    pip install -e '.[bench]'               # the peers, pinned: see the `bench` extra in pyproject.toml
    python benchmarks/peers.py              # batch 128, 15 interleaved rounds
    python benchmarks/peers.py --quick      # tiny sizes and 3 rounds: a smoke run, not a measurement
    python benchmarks/peers.py --skip-networks   # the layer rows only (--skip-layers: the networks only)
    python benchmarks/peers.py --threads 1 --clock cpu   # CPU time, on a machine shared with other jobs

Everything runs in one process.  For each row, our layer (``forward_mode='auto'``: the mode it
picks is shown) and every peer that can build it run forward+backward (input gradients included)
one after another in each round, in an order reversed every round, after a warm-up; the ratio
ours / peer is taken within each round and summarised over the rounds (median, quartiles, min and
max: :func:`spread.summary`), so load from other processes hits both sides of a ratio alike.  A
ratio below 1 means tensorsam is faster.

- Layers (batch 128): linear 1024->1024 (modes 4x16x16 on each side) in CP, TT-matrix, Tucker and
  TR; 3x3 convs 32->32 and 64->64 on 16x16 inputs in CP, TT, TR and Tucker.  Each peer is built at
  the rank whose parameter count is closest to ours (``params`` columns), with tltorch in both its
  ``factorized`` and ``reconstructed`` implementations; a peer without the format is left out
  with the reason.  The dense ``nn.Linear``/``nn.Conv2d`` is a row of its own.
- Outputs are checked equal where the same cores can be loaded into both: our CP and Tucker
  linear weights copied into tltorch's factorized linear (float64, max abs difference shown).
- Networks: one SGD step (forward, cross-entropy, backward, step) of our TR-ResNet-32 at rank 15
  against tednet's TRResNet32 (ranks 15) and our dense ResNet-32; and SAM's full step (two passes)
  of our ``SAM`` over SGD against ``pytorch_optimizer.SAM`` over SGD on the same TR-ResNet-32.

The table is printed as Markdown and written with the machine, the command and the raw per-round
timings to ``benchmarks/results/peers.json``, and the table to ``peers.md`` beside it (atomically;
once after the layer rows with ``"complete": false``, again at the end).  A peer that cannot be imported is
skipped, and the reason is printed and recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import math
import os
import platform
import statistics
import sys
import warnings
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import layers  # sibling scripts
from layers import fwd_bwd, interleaved_samples, machine, train_step
from spread import load_avg, summary

from tensorsam.models import resnet
from tensorsam.nn import TensorizedConv2d, TensorizedLinear, count_parameters
from tensorsam.optim import SAM

RESULTS = HERE / "results" / "peers.json"
# import name -> (distribution, pinned version): the `bench` extra
SUBMODULES = {"tednet": ("tnn.cp", "tnn.tensor_ring", "tnn.tucker2", "tnn.tensor_train")}  # imported too
PEERS = {"tltorch": ("tensorly-torch", "0.5.0"), "tednet": ("tednet", "0.1.3"),
         "pytorch_optimizer": ("pytorch-optimizer", "4.1.0")}
PIP = "pip install " + " ".join(f"'{d}=={v}'" for d, v in PEERS.values())
ROUNDS = 15
# SAM's full step is two forward/backward passes that both optimizers run alike; their own work
# (~10 ms) is under 1 % of it, less than one round's ratio scatters: more rounds
SAM_ROUNDS = 31
SGD_KW = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}  # benchmarks/optim.py's base optimizer
RHO = 0.05


def load_peers() -> tuple[dict, dict]:
    """The importable peers (name -> module) and, for the others, why not (name -> reason)."""
    found, skipped = {}, {}
    for name, (dist, pin) in PEERS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
                for sub in SUBMODULES.get(name, ()):
                    importlib.import_module(f"{name}.{sub}")
            version = metadata.version(dist)
        except Exception as e:  # noqa: BLE001 - any failure to import is a reason to skip
            skipped[name] = f"{dist}=={pin} cannot be imported: {type(e).__name__}: {e} ({PIP})"
            continue
        if version != pin:
            print(f"note: {dist} {version} is installed; the numbers here were meant for {pin}")
        found[name] = mod
    return found, skipped


def quiet(build):
    """``build()`` without tednet's per-layer prints and tltorch's warnings."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build()


def match_rank(build, target: int, hi: int = 1024) -> tuple[int, nn.Module] | None:
    """The rank r whose ``build(r)`` has the parameter count closest to ``target``, with its module;
    None where the peer cannot build rank 1.  Counts grow with r: doubling from 1 up to the first
    count >= target, then a bisection, so no build is much larger than the target (a Tucker core
    grows as r**order)."""
    counts: dict[int, float] = {}

    def count(r):
        if r not in counts:
            try:
                counts[r] = count_parameters(quiet(lambda: build(r)))
            except Exception:  # noqa: BLE001 - a rank the peer refuses
                counts[r] = math.inf
        return counts[r]

    if count(1) == math.inf:
        return None
    top = 1
    while count(top) < target and top < hi:
        top *= 2
    lo = max(1, top // 2)
    while lo < top:  # smallest r in [lo, top] with count(r) >= target
        mid = (lo + top) // 2
        if count(mid) >= target:
            top = mid
        else:
            lo = mid + 1
    best = min((r for r in (lo - 1, lo) if r >= 1), key=lambda r: abs(count(r) - target))
    return best, quiet(lambda: build(best))


# --------------------------------------------------------------------------- the rows


def linear_variants(peers: dict, fmt: str, rank: int, modes: tuple[int, ...]) -> tuple[nn.Module, dict, dict]:
    """Ours, the peers' layers (label -> (module, rank)) and the peers left out (label -> reason)."""
    n = math.prod(modes)
    ours = TensorizedLinear(n, n, format=fmt, rank=rank, shape=(modes, modes))
    target = count_parameters(ours)
    built, missing = {}, {}
    tl_fact = {"cp": "cp", "tucker": "tucker", "ttm": "blocktt"}.get(fmt)
    if "tltorch" in peers:
        if tl_fact is None:
            missing["tltorch"] = f"tltorch has no {fmt} linear layer"
        else:
            for impl in ("factorized", "reconstructed"):
                got = match_rank(lambda r, impl=impl: peers["tltorch"].FactorizedLinear(
                    modes, modes, factorization=tl_fact, rank=r, implementation=impl), target)
                if got:
                    built[f"tltorch {tl_fact} ({impl})"] = (got[1], got[0])
    if "tednet" in peers:
        t = peers["tednet"].tnn
        d = len(modes)
        build = {"cp": lambda r: t.cp.CPLinear(list(modes), list(modes), r),
                 "ttm": lambda r: t.tensor_train.TTLinear(list(modes), list(modes), [r] * (d - 1)),
                 "tucker": (lambda r: t.tucker2.TK2Linear(list(modes), n, [r, r])) if d == 3 else None,
                 "tr": lambda r: t.tensor_ring.TRLinear(list(modes), list(modes), [r] * (2 * d))}[fmt]
        name = {"cp": "CPLinear", "ttm": "TTLinear", "tucker": "TK2Linear (Tucker-2)", "tr": "TRLinear"}[fmt]
        got = match_rank(build, target) if build else None
        if got:
            built[f"tednet {name}"] = (got[1], got[0])
        else:
            missing["tednet"] = f"tednet cannot build a {fmt} linear of modes {modes}"
    built["torch nn.Linear (dense)"] = (nn.Linear(n, n), None)
    return ours, built, missing


def tltorch_conv(tltorch, channels: int, fmt: str, rank: int, impl: str) -> nn.Module:
    """tltorch's 3x3 FactorizedConv, initialised: its constructor leaves the factors as
    ``torch.empty`` memory (NaN, 1e38, denormals), which would be timed as they are."""
    conv = tltorch.FactorizedConv(channels, channels, 3, order=2, padding=1, bias=True, factorization=fmt,
                                  rank=rank, implementation=impl)
    with torch.no_grad():
        conv.reset_parameters()     # tltorch's own: weight ~ N(0, 0.02) through the factors, bias 0
    return conv


def check_finite(label: str, module: nn.Module) -> None:
    """Refuse to time a layer with non-finite parameters (uninitialised memory)."""
    bad = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"{label}: non-finite parameters {bad}; initialise the layer before timing it")


def conv_variants(peers: dict, fmt: str, rank: int, channels: int) -> tuple[nn.Module, dict, dict]:
    ours = TensorizedConv2d(channels, channels, 3, format=fmt, rank=rank, padding=1)
    target = count_parameters(ours)
    built, missing = {}, {}
    if "tltorch" in peers:
        if fmt == "tr":
            missing["tltorch"] = "tltorch has no tensor-ring convolution"
        else:
            for impl in ("factorized", "reconstructed"):
                got = match_rank(lambda r, impl=impl: tltorch_conv(
                    peers["tltorch"], channels, fmt, r, impl), target)
                if got:
                    built[f"tltorch {fmt} ({impl})"] = (got[1], got[0])
    if "tednet" in peers:
        t = peers["tednet"].tnn
        ins, outs = list(ours.in_modes), list(ours.out_modes)
        build = {"cp": lambda r: t.cp.CPConv2D(channels, channels, r, 3, padding=1),
                 "tt": lambda r: t.tensor_train.TTConv2D(ins, outs, [r] * len(ins), 3, padding=1),
                 "tucker": lambda r: t.tucker2.TK2Conv2D(channels, channels, [r, r], 3, padding=1),
                 "tr": lambda r: t.tensor_ring.TRConv2D(ins, outs, [r] * (len(ins) + len(outs) + 1), 3, padding=1)}[fmt]
        name = {"cp": "CPConv2D", "tt": "TTConv2D", "tucker": "TK2Conv2D (Tucker-2)", "tr": "TRConv2D"}[fmt]
        got = match_rank(build, target)
        if got:
            built[f"tednet {name}"] = (got[1], got[0])
        else:
            missing["tednet"] = f"tednet cannot build a {fmt} conv of {channels} channels"
    built["torch nn.Conv2d (dense)"] = (nn.Conv2d(channels, channels, 3, padding=1), None)
    return ours, built, missing


@torch.no_grad()
def check_linear(peers: dict, fmt: str, modes: tuple[int, ...]) -> dict | None:
    """Our CP/Tucker linear cores loaded into tltorch's factorized linear (float64): the max abs
    difference of the outputs.  tltorch's weight is (out modes, in modes); ours (in, out)."""
    if "tltorch" not in peers or fmt not in ("cp", "tucker"):
        return None
    torch.manual_seed(1)
    n, d = math.prod(modes), len(modes)
    rank = 3
    ours = TensorizedLinear(n, n, format=fmt, rank=rank, shape=(modes, modes), dtype=torch.float64)
    nn.init.normal_(ours.bias)
    theirs = quiet(lambda: peers["tltorch"].FactorizedLinear(modes, modes, factorization=fmt, rank=rank,
                                                            implementation="factorized")).double()
    cores = [c.detach() for c in ours.cores]
    w = theirs.weight
    if fmt == "cp":
        for f, c in zip(w.factors, cores[d:] + cores[:d]):
            f.copy_(c)
        w.weights.fill_(1.0)
    else:
        core, factors = cores[0], cores[1:]
        w.core.copy_(core.permute(*range(d, 2 * d), *range(d)))
        for f, c in zip(w.factors, factors[d:] + factors[:d]):
            f.copy_(c)
    theirs.bias.copy_(ours.bias)
    x = torch.randn(5, n, dtype=torch.float64)
    diffs = {}
    for mode in ("factorized", "reconstructed"):
        ours.forward_mode = mode
        diffs[mode] = float((ours(x) - theirs(x)).abs().max())
    return {"against": f"tltorch {fmt} (factorized)", "max_abs_diff": max(diffs.values()), "per_mode": diffs,
            "ok": max(diffs.values()) < 1e-10}


@torch.no_grad()
def check_tucker_conv(peer: nn.Module, ours: nn.Module) -> dict:
    """tltorch's Tucker conv (core (r_out, r_in, r, r), factors out, in, kh, kw) loaded into ours of
    ranks (r_in, 9, r_out): the kernel core with the spatial factors absorbed, an identity kernel
    factor.  Max abs difference of the outputs, float64."""
    peer, ours = copy.deepcopy(peer).double(), copy.deepcopy(ours).double()
    w = peer.weight
    u_out, u_in, u_h, u_w = w.factors
    kernel = torch.einsum("bapq,hp,wq->abhw", w.core, u_h, u_w)  # (r_in, r_out, kh, kw)
    core, f_in, f_k, f_out = ours.cores
    core.copy_(kernel.reshape(kernel.shape[0], kernel.shape[1], -1).permute(0, 2, 1))
    f_in.copy_(u_in)
    f_k.copy_(torch.eye(f_k.shape[0], dtype=f_k.dtype))
    f_out.copy_(u_out)
    peer.bias.normal_()
    ours.bias.copy_(peer.bias)
    x = torch.randn(2, u_in.shape[0], 8, 8, dtype=torch.float64)
    diff = float((ours(x) - peer(x)).abs().max())
    return {"against": "tltorch tucker (factorized)", "max_abs_diff": diff, "ok": diff < 1e-10}


def same_rank_tucker_conv(built: dict, channels: int) -> tuple[nn.Module, str, nn.Module, int] | None:
    """Ours at the channel ranks of tltorch's param-matched Tucker conv: the same function class
    (channel ranks r, any 3x3 kernel; tltorch's spatial ranks r > 3 add parameters, not functions)."""
    label = "tltorch tucker (factorized)"
    if label not in built:
        return None
    peer, r = built[label]
    return TensorizedConv2d(channels, channels, 3, format="tucker", rank=(r, 9, r), padding=1), label, peer, r


def time_row(group: str, case: str, ours: nn.Module, ours_fn, peers: dict, rounds: int, warmup: int,
             mode: str | None = None, extra: dict | None = None) -> list[dict]:
    """Interleave ours and every peer (label -> (module, rank, fn)); one row per peer."""
    for label, (module, _, _) in {"ours": (ours, None, None), **peers}.items():
        check_finite(label, module)
    fns = {"ours": ours_fn, **{label: fn for label, (_, _, fn) in peers.items()}}
    samples = interleaved_samples(fns, rounds, warmup)
    rows = []
    for label, (module, rank, _) in peers.items():
        ratio = summary([a / b for a, b in zip(samples["ours"], samples[label])])
        rows.append({"group": group, "case": case, "ours_params": count_parameters(ours), "ours_mode": mode,
                     "ours_ms": 1e3 * statistics.median(samples["ours"]), "peer": label,
                     "peer_params": count_parameters(module), "peer_rank": rank,
                     "peer_ms": 1e3 * statistics.median(samples[label]), "ratio": ratio,
                     "samples_s": {"ours": samples["ours"], "peer": samples[label]}, **(extra or {})})
    return rows


def bench_layers(peers: dict, args, log) -> tuple[list[dict], list[dict]]:
    rows, left_out = [], []
    b = args.batch
    modes = (4, 4, 4) if args.quick else (4, 16, 16)
    lin_ranks = (2,) if args.quick else (8, 16)
    conv_ranks = (2,) if args.quick else (8, 16)
    channels = (8,) if args.quick else (32, 64)
    hw = 8 if args.quick else 16
    cases = [("linear", fmt, r, None) for fmt in ("cp", "ttm", "tucker", "tr") for r in lin_ranks]
    cases += [("conv", fmt, r, c) for c in channels for fmt in ("cp", "tt", "tr", "tucker") for r in conv_ranks]
    cases = [case for case in cases if f"{case[0]}-{case[1]}" in args.only or not args.only]
    for kind, fmt, rank, c in cases:
        torch.manual_seed(0)
        if kind == "linear":
            n = math.prod(modes)
            ours, built, missing = linear_variants(peers, fmt, rank, modes)
            x = torch.randn(b, n, requires_grad=True)
            case = f"Linear {n}->{n} {fmt} rank {rank}, batch {b}"
            check = check_linear(peers, fmt, modes)
        else:
            ours, built, missing = conv_variants(peers, fmt, rank, c)
            x = torch.randn(b, c, hw, hw, requires_grad=True)
            case = f"Conv {c}->{c} 3x3 {fmt} rank {rank}, {b}x{c}x{hw}x{hw}"
            check = None
        g = torch.randn_like(ours(x))  # auto decides here (gradients on, as timed)
        timed = {label: (m, r, fwd_bwd(m, x, g)) for label, (m, r) in built.items()}
        got = time_row(kind, case, ours, fwd_bwd(ours, x, g), timed, args.rounds, args.warmup,
                       ours.choose_mode(x), {"format": fmt, "rank": rank, "check": check})
        if kind == "conv" and fmt == "tucker" and (twin := same_rank_tucker_conv(built, c)):
            mine, label, peer, r = twin
            got += time_row(kind, f"Conv {c}->{c} 3x3 tucker at tltorch's channel rank {r}, {b}x{c}x{hw}x{hw}",
                            mine, fwd_bwd(mine, x, g), {label: (peer, r, fwd_bwd(peer, x, g))}, args.rounds,
                            args.warmup, mine.choose_mode(x),
                            {"format": fmt, "rank": [r, 9, r], "check": check_tucker_conv(peer, mine)})
        rows += got
        left_out += [{"case": case, "peer": p, "reason": why} for p, why in missing.items()]
        for r in got:
            log(f"  {r['case']:44} vs {r['peer']:34} ours/peer {r['ratio']['median']:.2f} "
                f"[{r['ratio']['p25']:.2f}, {r['ratio']['p75']:.2f}]")
    return rows, left_out


def closure_for(model: nn.Module, opt, x, y):
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def bench_networks(peers: dict, args, log) -> tuple[list[dict], list[dict]]:
    rows, left_out = [], []
    depth = 20 if args.quick else 32
    rank = 15
    b, hw = args.net_batch, args.net_hw
    torch.manual_seed(0)
    x, y = torch.randn(b, 3, hw, hw), torch.randint(0, 10, (b,))
    ours = resnet(depth, "tr", rank)
    others = {f"torch ResNet-{depth} (dense, ours)": resnet(depth)}
    if "tednet" in peers:
        cls = getattr(peers["tednet"].tnn.tensor_ring, f"TRResNet{depth}")
        others[f"tednet TRResNet{depth} (ranks {rank})"] = quiet(lambda: cls([rank] * 7, 10))
    else:
        left_out.append({"case": f"TR-ResNet-{depth} SGD step", "peer": "tednet", "reason": "tednet not importable"})
    case = f"TR-ResNet-{depth} rank {rank}, SGD step, {b}x3x{hw}x{hw}"
    if not args.only or "network-tr" in args.only:
        timed = {label: (m, None, train_step(m, x, y)) for label, m in others.items()}
        got = time_row("network", case, ours, train_step(ours, x, y), timed, args.rounds, args.warmup)
        rows += got
        for r in got:
            log(f"  {case:44} vs {r['peer']:34} ours/peer {r['ratio']['median']:.2f}")
    if args.only and "sam" not in args.only:
        return rows, left_out

    case = f"SAM full step (rho {RHO}, over SGD) on TR-ResNet-{depth}, {b}x3x{hw}x{hw}"
    if "pytorch_optimizer" not in peers:
        left_out.append({"case": case, "peer": "pytorch_optimizer", "reason": "pytorch-optimizer not importable"})
        return rows, left_out
    models = {k: copy.deepcopy(ours) for k in ("ours", "peer", "sgd")}
    opts = {"ours": SAM(models["ours"].parameters(), torch.optim.SGD, rho=RHO, **SGD_KW),
            "peer": peers["pytorch_optimizer"].SAM(models["peer"].parameters(), torch.optim.SGD, rho=RHO, **SGD_KW),
            "sgd": torch.optim.SGD(models["sgd"].parameters(), **SGD_KW)}
    closures = {k: closure_for(models[k], opts[k], x, y) for k in models}

    def timed_step(k):
        def run() -> float:
            t0 = layers.clock()
            if k == "ours":
                opts[k].step(closures[k])
            elif k == "peer":  # pytorch-optimizer's SAM wants the gradients at w before step(closure)
                closures[k]()
                opts[k].step(closures[k])
            else:
                closures[k]()
                opts[k].step()
            return layers.clock() - t0

        return run

    samples = interleaved_samples({k: timed_step(k) for k in models}, args.sam_rounds, args.warmup)
    med = {k: statistics.median(v) for k, v in samples.items()}

    def alone(k):  # the optimizer's own work: ascent, restore and base step with the gradients fixed
        def run() -> float:
            t0 = layers.clock()
            opts[k].first_step()
            opts[k].second_step()
            return layers.clock() - t0

        return run

    for k in ("ours", "peer"):
        closures[k]()
    alone_samples = interleaved_samples({k: alone(k) for k in ("ours", "peer")}, args.sam_rounds, args.warmup)
    row = {"group": "optimizer", "case": case, "ours_params": count_parameters(ours), "ours_mode": None,
           "ours_ms": 1e3 * med["ours"], "peer": "pytorch_optimizer.SAM", "peer_params": count_parameters(ours),
           "peer_rank": None, "peer_ms": 1e3 * med["peer"],
           "ratio": summary([a / b for a, b in zip(samples["ours"], samples["peer"])]),
           "ours_over_sgd": summary([a / b for a, b in zip(samples["ours"], samples["sgd"])]),
           "peer_over_sgd": summary([a / b for a, b in zip(samples["peer"], samples["sgd"])]),
           "optimizer_alone_ms": {k: 1e3 * statistics.median(v) for k, v in alone_samples.items()},
           "optimizer_alone_ratio": summary([a / b for a, b in zip(alone_samples["ours"], alone_samples["peer"])]),
           "samples_s": samples}
    rows.append(row)
    log(f"  {case:44} vs {row['peer']:34} ours/peer {row['ratio']['median']:.2f} (SAM/SGD: ours "
        f"{row['ours_over_sgd']['median']:.2f}, peer {row['peer_over_sgd']['median']:.2f}; optimizer alone "
        f"{row['optimizer_alone_ms']['ours']:.1f} against {row['optimizer_alone_ms']['peer']:.1f} ms)")
    return rows, left_out


# --------------------------------------------------------------------------- report


def markdown(rows: list[dict], left_out: list[dict], skipped: dict, meta: dict) -> str:
    lines = [f"Machine: {meta['machine']}; load average before/after: {meta['load_before']} / {meta['load_after']}.",
             f"Command: `{meta['command']}`. Forward+backward (input gradients included) unless said; "
             f"median ms over {meta['rounds']} interleaved rounds; ours / peer is the median of the per-round "
             "ratios with [p25, p75] and (min-max): < 1 means tensorsam is faster."
             + (" QUICK smoke run: tiny sizes, not a measurement." if meta["quick"] else ""), "",
             "| case | ours: params (auto picks) | ours ms | peer | peer params (rank) | peer ms | ours / peer | spread |",
             "|---|---|---:|---|---|---:|---:|---|"]
    for r in rows:
        mode = f" ({r['ours_mode']})" if r.get("ours_mode") else ""
        rank = f" (r={r['peer_rank']})" if r.get("peer_rank") is not None else ""
        q = r["ratio"]
        lines.append(f"| {r['case']} | {r['ours_params']:,}{mode} | {r['ours_ms']:.2f} | {r['peer']} | "
                     f"{r['peer_params']:,}{rank} | {r['peer_ms']:.2f} | **{q['median']:.2f}** | "
                     f"[{q['p25']:.2f}, {q['p75']:.2f}] ({q['min']:.2f}-{q['max']:.2f}) |")
    sam = [r for r in rows if r["group"] == "optimizer"]
    for r in sam:
        lines += ["", (f"SAM row: {r['ratio']['n']} rounds. SAM / SGD full step: ours "
                       f"{r['ours_over_sgd']['median']:.2f}, pytorch-optimizer "
                       f"{r['peer_over_sgd']['median']:.2f} (paired medians). The optimizer's own work with the "
                       f"gradients fixed: ours {r['optimizer_alone_ms']['ours']:.1f} ms, pytorch-optimizer "
                       f"{r['optimizer_alone_ms']['peer']:.1f} ms (paired ratio "
                       f"{r['optimizer_alone_ratio']['median']:.2f}).")]
    checks = {r["case"]: r["check"] for r in rows if r.get("check")}
    if checks:
        lines += ["", "Output checks (same cores loaded into both, float64):"]
        lines += [f"- {case}: against {c['against']}, max abs difference {c['max_abs_diff']:.1e} "
                  f"({'ok' if c['ok'] else 'MISMATCH'})" for case, c in checks.items()]
    if left_out or skipped:
        lines += ["", "Left out:"]
        lines += [f"- {name}: {why}" for name, why in skipped.items()]
        lines += [f"- {o['case']}: {o['peer']}: {o['reason']}" for o in left_out]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 3 rounds: a smoke run")
    p.add_argument("--rounds", type=int, help=f"interleaved rounds per row (default {ROUNDS}; >= 15 unless --quick)")
    p.add_argument("--sam-rounds", type=int,
                   help=f"rounds of the SAM row (default the larger of --rounds and {SAM_ROUNDS})")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON results")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--skip-networks", action="store_true")
    p.add_argument("--only", default="", help="comma-separated rows to time: layer rows as kind-format (e.g. "
                   "conv-tr,linear-ttm), network-tr (the TR-ResNet step), sam (SAM's step); default all")
    p.add_argument("--clock", choices=tuple(layers.CLOCKS), default="wall",
                   help="wall: time.perf_counter; cpu: this process's CPU time (time.process_time), for a "
                   "machine shared with other jobs; needs --threads 1")
    args = p.parse_args(argv)
    args.only = [x for x in args.only.split(",") if x]
    known = {f"{k}-{f}" for k, fs in (("linear", ("cp", "ttm", "tucker", "tr")), ("conv", ("cp", "tt", "tr", "tucker")))
             for f in fs} | {"network-tr", "sam"}
    if set(args.only) - known:
        p.error(f"--only: unknown rows {sorted(set(args.only) - known)}; expected some of {sorted(known)}")
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu needs --threads 1 (CPU time sums over threads)")
    layers.clock = layers.CLOCKS[args.clock]
    args.rounds = args.rounds or (3 if args.quick else ROUNDS)
    if args.rounds < 15 and not args.quick:
        raise SystemExit(f"--rounds must be >= 15 for a measurement, got {args.rounds} (or use --quick)")
    args.sam_rounds = args.sam_rounds or (args.rounds if args.quick else max(args.rounds, SAM_ROUNDS))
    if args.sam_rounds < 15 and not args.quick:
        raise SystemExit(f"--sam-rounds must be >= 15 for a measurement, got {args.sam_rounds}")
    args.warmup = 0 if args.quick else 2
    args.batch = 4 if args.quick else 128
    args.net_batch = 2 if args.quick else 128
    args.net_hw = 8 if args.quick else 32
    torch.set_num_threads(args.threads)
    argv_used = sys.argv[1:] if argv is None else list(argv)
    meta = {"command": " ".join(["python benchmarks/peers.py", *argv_used]), "quick": args.quick,
            "rounds": args.rounds, "sam_rounds": args.sam_rounds, "warmup": args.warmup, "threads": args.threads,
            "clock": args.clock, "machine": machine(),
            "python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "load_before": load_avg()}
    peers, skipped = load_peers()
    meta["peer_versions"] = {n: metadata.version(PEERS[n][0]) for n in peers}
    print(f"peers: {', '.join(f'{n} {v}' for n, v in meta['peer_versions'].items()) or 'none'}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    from tensorsam.run.io import atomic_write_text

    rows, left_out = [], []

    def write(done: bool) -> str:
        """The JSON so far and its table as Markdown beside it (``.md``), each written atomically: a run
        stopped during the networks keeps its layer rows."""
        meta["load_after"] = load_avg()
        text = markdown(rows, left_out, skipped, meta)
        atomic_write_text(args.out, json.dumps({**meta, "complete": done, "skipped": skipped, "left_out": left_out,
                                                "rows": rows, "markdown": text}, indent=1) + "\n")
        atomic_write_text(args.out.with_suffix(".md"), text)
        return text

    if not args.skip_layers:
        r, lo = bench_layers(peers, args, print)
        rows, left_out = rows + r, left_out + lo
        write(False)
    if not args.skip_networks:
        r, lo = bench_networks(peers, args, print)
        rows, left_out = rows + r, left_out + lo
    text = write(True)
    print(text)
    print(f"wrote {args.out}")
    bad = [r["case"] for r in rows if r.get("check") and not r["check"]["ok"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
