"""`tensorsam compress-demo`: decompose one dense layer's weight in every tensor format.

The (out, in) weight of a Linear layer is tensorized by permutation to (in modes..., out
modes...) with balanced mode sizes (TT-matrix takes the matrix itself, rows = out features),
decomposed with tensorly at each rank, and a table reports parameters, compression ratio and
relative reconstruction error ||W_hat - W|| / ||W||.  Each (format, rank) row is a cell of a
resumable :class:`~tensorsam.run.Sweep` in ``--out`` (``results.json``), with a progress line per row.
"""

from __future__ import annotations

import math
import time

import torch

from tensorsam.commands import resumable
from tensorsam.run import Sweep, write_results
from tensorsam.run.io import check_writable_dir
from tensorsam.tensors import FORMATS, TTM, balanced_factors, get_format, matrix_to_tensor, tensor_to_matrix

FORMAT_ORDER = ("cp", "tucker", "tt", "ttm", "tr")


def structured_weight(out_features: int, in_features: int, seed: int = 0, rank: int = 8,
                      noise: float = 0.05) -> torch.Tensor:
    """A weight with real structure: a rank-``rank`` product of smooth factors (random mixtures
    of low-frequency cosines) plus ``noise`` times its RMS of Gaussian noise.  float64."""
    g = torch.Generator().manual_seed(seed)

    def smooth(n):
        t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        freqs = torch.arange(6, dtype=torch.float64)
        basis = torch.cos(math.pi * t[:, None] * freqs)  # (n, 6)
        return basis @ torch.randn(6, rank, generator=g, dtype=torch.float64)

    w = smooth(out_features) @ smooth(in_features).T
    w = w / w.pow(2).mean().sqrt()
    return w + noise * torch.randn(out_features, in_features, generator=g, dtype=torch.float64)


def _rank_str(rank) -> str:
    ranks = (rank,) if isinstance(rank, int) else tuple(rank)
    return str(ranks[0]) if len(set(ranks)) == 1 else ",".join(map(str, ranks))


def compress_one(weight: torch.Tensor, in_modes, out_modes, fmt: str, rank: int) -> dict:
    """Decompose ``weight`` (out, in) in format ``fmt`` at the uniform int ``rank``: the module's
    actual rank (TT-SVD and TR-SVD cap ranks an unfolding cannot support), parameters, compression
    ratio and relative error, or ``skipped`` with tensorly's reason when it refuses the rank."""
    rec = {"format": fmt, "rank": rank}
    try:
        if fmt == "ttm":
            m = TTM.from_matrix(weight, out_modes, in_modes, rank)
            approx = m.to_matrix()
        else:
            m = get_format(fmt).from_dense(matrix_to_tensor(weight, in_modes, out_modes), rank)
            approx = tensor_to_matrix(m.reconstruct(), in_modes, out_modes)
    except ValueError as err:
        return {**rec, "skipped": str(err).splitlines()[0]}
    err = (approx.detach() - weight).norm() / weight.norm()
    return {**rec, "actual_rank": m.rank, "params": m.dof(), "ratio": m.compression_ratio(), "error": float(err)}


def compress_weight(weight: torch.Tensor, in_modes, out_modes, ranks, formats=FORMAT_ORDER) -> list[dict]:
    """:func:`compress_one` in each format at each rank."""
    return [compress_one(weight, in_modes, out_modes, fmt, r) for fmt in formats for r in ranks]


def add_arguments(parser) -> None:
    parser.add_argument("--in-features", type=int, default=256, help="input features of the Linear layer")
    parser.add_argument("--out-features", type=int, default=256, help="output features of the Linear layer")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16],
                        help="uniform ranks to try in every format")
    parser.add_argument("--modes", type=int, default=2, help="tensor modes per side (in and out)")
    parser.add_argument("--formats", nargs="+", default=list(FORMAT_ORDER), help="formats to try")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weight")
    parser.add_argument("--out", default="runs/compress-demo", help="output directory (results.json)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the (format, rank) rows already finished in --out; run only the others")
    parser.add_argument("--no-progress", action="store_true", help="no per-row progress lines")


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    for name in ("in_features", "out_features", "modes"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if any(r <= 0 for r in args.ranks):
        raise ValueError(f"--ranks must be positive ints, got {args.ranks}")
    for fmt in args.formats:
        get_format(fmt)
    started = time.time()
    out = check_writable_dir(args.out)
    if args.resume and not resumable(out):
        print(f"--resume: nothing to resume in {out} (no results.json, no checkpoints); starting fresh")
    weight = structured_weight(args.out_features, args.in_features, args.seed)
    in_modes = balanced_factors(args.in_features, args.modes)
    out_modes = balanced_factors(args.out_features, args.modes)
    config = {k: getattr(args, k) for k in ("in_features", "out_features", "modes", "seed")}
    sweep = Sweep({"format": [f.lower() for f in args.formats], "rank": list(args.ranks)}, out,
                  resume=args.resume, tag=lambda c: f"{c['format']}_rank{c['rank']}", same=config)

    def write(result):
        write_results(out / "results.json", task="compress-demo", config={**config, "formats": args.formats,
                      "ranks": args.ranks}, runs=result.all_runs(), extra={"sweep": result.record()}, started=started)

    result = sweep.run(lambda c: (compress_one(weight, in_modes, out_modes, c["format"], c["rank"]), None),
                       write, progress=not args.no_progress)
    rows = result.runs

    table = Table(title=f"Linear {args.in_features}->{args.out_features}, weight = rank-8 smooth + 5% noise "
                        f"(seed {args.seed}); modes in {in_modes} out {out_modes}")
    for col in ("format", "rank", "params", "ratio", "rel. error"):
        table.add_column(col, justify="left" if col == "format" else "right")
    table.add_row("dense", "-", str(weight.numel()), "1.00", "0")
    reasons: list[str] = []
    for row in rows:
        name = FORMATS[row["format"]].__name__
        if "skipped" in row:
            reason = f"{name}: {row['skipped']}"
            reasons += [reason] if reason not in reasons else []
            table.add_row(name, str(row["rank"]), "-", "-", f"n/a [{reasons.index(reason) + 1}]")
        else:
            table.add_row(name, _rank_str(row["actual_rank"]), str(row["params"]), f"{row['ratio']:.2f}",
                          f"{row['error']:.3g}")
    table.caption = "\n".join(f"[{i + 1}] skipped by {r}" for i, r in enumerate(reasons)) or None
    Console().print(table)
    if args.resume:
        print(result.summary())
    print(f"wrote {out / 'results.json'} ({time.time() - started:.1f} s)")
    return 0
