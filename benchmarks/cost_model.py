"""A cost model on paper: predicted step-time ratios DAS/Adam and SAM/Adam for LoRETTA on a
6.7B-parameter decoder (OPT-6.7B's shape) at 1, 8 and 64 GPUs, under DDP, FSDP2 (full shard) and
HSDP (shard within a node, replicate across nodes).

    python benchmarks/cost_model.py                 # measure one decoder layer here, then predict
    python benchmarks/cost_model.py --no-measure    # the assumptions alone (backward/forward = 1)

What is measured (on this machine, one OPT-6.7B decoder layer built from a transformers
``OPTConfig`` with random weights, LoRETTA on ``q_proj`` and ``v_proj`` through peft, frozen base):
the forward time, the forward+backward time with the input needing a gradient, as in every layer
but the first (so the backward/forward ratio of a frozen-base fine-tune: the base's
input-gradient GEMMs, none for its weights: about 1, against 2 in a full fine-tune), and the optimizer step of that layer's adapter
cores with AdamW and with DAS over AdamW (``build_optimizer``).  What is assumed (flags): the
GPU's throughput and the link bandwidths, from published figures (``--help``).

The model, per optimizer step and per GPU (T tokens per GPU, weak scaling; N base parameters;
P adapter parameters in K TT cores; n GPUs, g per node):

- compute of one pass: F = 2·N·T / (peak · MFU) forward, F·b backward (b measured here; 1 with
  ``--no-measure``);
- DDP: the base is replicated (13.3 GB in bf16 fits on an 80 GB GPU); the adapter gradients
  (4P bytes) are all-reduced, overlapped with the backward (DDP's buckets), so nothing is exposed;
  DAS's core norms are local (the gradients and cores are replicated): DAS adds only its step;
- FSDP2: every pass all-gathers the bf16 base in the forward and again in the backward
  (2N·(n−1)/n bytes each); prefetching hides it behind compute, so each half costs
  max(compute, all-gather); DAS adds one all-reduce of K floats (latency-bound) and its step;
- HSDP: as FSDP2 with n = g (the all-gathers stay inside a node), plus DDP's all-reduce of the
  adapter gradients across nodes (overlapped);
- SAM (``sam_sync=True``): a second forward and backward, with FSDP2's all-gathers again, plus the
  norm of the gradient (one scalar all-reduce when sharded) and the ascent and restore (elementwise
  over P, negligible): each pass is paid twice.

Prints a Markdown table and writes ``benchmarks/results/cost_model.json`` (atomically) with the
assumptions, the measurements and the predictions.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "results" / "cost_model.json"

# OPT-6.7B (Zhang et al. 2022): 32 layers, d 4096, FFN 16384, vocabulary 50272, 2048 positions
OPT_6_7B = {"layers": 32, "hidden": 4096, "ffn": 16384, "heads": 32, "vocab": 50272, "positions": 2048}


def base_params(shape: dict) -> int:
    """Parameters of an OPT-style decoder: per layer 4 d² + 2 d·f (+ biases, LayerNorms), plus the
    token and position embeddings (the LM head is tied)."""
    d, f = shape["hidden"], shape["ffn"]
    per_layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
    return shape["layers"] * per_layer + (shape["vocab"] + shape["positions"] + 2) * d + 2 * d


def adapter_size(shape: dict, r: int, tt_rank: int) -> tuple[int, int]:
    """(P, K): LoRETTA's trainable parameters and TT cores on every layer's q_proj and v_proj."""
    from tensorsam.adapters.tt import loretta_shapes, tt_params

    a, b = loretta_shapes(shape["hidden"], shape["hidden"], r)
    per_module = tt_params(a, tt_rank) + tt_params(b, tt_rank)
    modules = 2 * shape["layers"]
    return modules * per_module, modules * (len(a) + len(b))


def _median_seconds(fn, repeats: int) -> float:
    """Median CPU time of ``fn()`` in this process: with one thread it is the work done, whatever
    else the shared machine runs (wall time is not)."""
    fn()                                            # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def measure_layer(shape: dict, r: int, tt_rank: int, tokens: int, repeats: int) -> dict:
    """One decoder layer here (float32, random weights): forward, forward+backward with the base
    frozen, and the adapter cores' AdamW and DAS steps, in CPU seconds (medians; one thread)."""
    from peft import get_peft_model
    from transformers import OPTConfig
    from transformers.models.opt.modeling_opt import OPTDecoderLayer

    from tensorsam.adapters import LorettaConfig
    from tensorsam.groups import scale_invariant_groups
    from tensorsam.optim import build_optimizer

    torch.manual_seed(0)
    config = OPTConfig(hidden_size=shape["hidden"], ffn_dim=shape["ffn"], num_attention_heads=shape["heads"],
                       num_hidden_layers=1, vocab_size=8, max_position_embeddings=tokens)

    class OneLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = OPTDecoderLayer(config, layer_idx=0)

        def forward(self, x):
            out = self.layer(x)
            return out[0] if isinstance(out, tuple) else out

    model = get_peft_model(OneLayer(), LorettaConfig(target_modules=["q_proj", "v_proj"], r=r, tt_rank=tt_rank))
    # the input needs a gradient, as every layer's but the first does in the whole model
    x = torch.randn(1, tokens, shape["hidden"], requires_grad=True)

    def forward():
        with torch.no_grad():
            model(x)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    out = {"tokens": tokens, "forward_s": _median_seconds(forward, repeats),
           "forward_backward_s": _median_seconds(forward_backward, repeats)}
    params = [p for p in model.parameters() if p.requires_grad]
    out["adapter_tensors"] = len(params)
    for method in ("adamw", "das"):
        options = {"alpha": 0.1, "base": "adamw"} if method == "das" else {}
        opt = build_optimizer(method, params, groups=scale_invariant_groups(model) if method == "das" else None,
                              lr=1e-4, **options)
        out[f"{method}_step_s"] = _median_seconds(opt.step, 5 * repeats)
    return out


def all_gather_s(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Ring all-gather (or reduce-scatter) of a ``nbytes`` tensor over n ranks."""
    return 0.0 if n == 1 else latency + nbytes * (n - 1) / n / bandwidth


def all_reduce_s(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Ring all-reduce: a reduce-scatter and an all-gather."""
    return 0.0 if n == 1 else 2 * latency + 2 * nbytes * (n - 1) / n / bandwidth


def predict(a: dict, n: int, sharding: str) -> dict:
    """Step times (s) of Adam, DAS and SAM on n GPUs under ``sharding`` (ddp, fsdp, hsdp)."""
    g = min(n, a["gpus_per_node"])
    intra = (a["nvlink_bw"], a["nvlink_latency"])
    link = intra if n <= a["gpus_per_node"] else (a["internode_bw"], a["internode_latency"])
    fwd = 2 * a["base_params"] * a["tokens_per_gpu"] / (a["peak_flops"] * a["mfu"])
    bwd = fwd * a["backward_over_forward"]
    weights = 2 * a["base_params"]                 # bf16
    if sharding == "ddp":
        gather = 0.0
    else:
        shard_over, bw_lat = (n, link) if sharding == "fsdp" else (g, intra)
        gather = all_gather_s(weights, shard_over, *bw_lat)
    one_pass = max(fwd, gather) + max(bwd, gather)
    sharded = sharding != "ddp" and n > 1
    das_extra = a["das_step_extra_s"] + (2 * link[1] if sharded else 0.0)     # K floats: latency-bound
    scalar = 2 * link[1] if sharded else 0.0
    adam = one_pass + a["adam_step_s"]
    return {"gpus": n, "sharding": sharding, "forward_s": fwd, "backward_s": bwd, "all_gather_s": gather,
            "adam_s": adam, "das_s": adam + das_extra, "sam_s": 2 * one_pass + a["adam_step_s"] + scalar}


def assumptions(args, measured: dict | None) -> dict:
    p, k = adapter_size(OPT_6_7B, args.r, args.tt_rank)
    a = {"model": "OPT-6.7B shape", **OPT_6_7B, "base_params": base_params(OPT_6_7B),
         "adapter": f"LoRETTA r={args.r}, TT rank {args.tt_rank}, q_proj and v_proj",
         "adapter_params": p, "cores": k, "tokens_per_gpu": args.tokens_per_gpu,
         "peak_flops": args.peak_tflops * 1e12, "mfu": args.mfu, "gpus_per_node": 8,
         "nvlink_bw": args.nvlink_gbs * 1e9, "nvlink_latency": args.nvlink_us * 1e-6,
         "internode_bw": args.internode_gbs * 1e9, "internode_latency": args.internode_us * 1e-6,
         "backward_over_forward": 1.0, "adam_step_s": args.adam_step_ms * 1e-3,
         "das_step_extra_s": args.das_extra_ms * 1e-3}
    if measured:
        a["backward_over_forward"] = measured["forward_backward_s"] / measured["forward_s"] - 1
    return a


def table(rows: list[dict]) -> str:
    lines = [("| GPUs | sharding | compute ms (fwd + bwd) | all-gather ms / half-pass | Adam step ms | DAS / Adam "
             "| SAM / Adam |"), "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gpus']} | {r['sharding']} | {1e3 * (r['forward_s'] + r['backward_s']):.0f} "
                     f"| {1e3 * r['all_gather_s']:.0f} | {1e3 * r['adam_s']:.0f} | {r['das_s'] / r['adam_s']:.4f} "
                     f"| {r['sam_s'] / r['adam_s']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--r", type=int, default=8, help="adapter rank r")
    p.add_argument("--tt-rank", type=int, default=16, help="LoRETTA's TT rank (the paper's 16)")
    p.add_argument("--tokens-per-gpu", type=int, default=4 * 512, help="tokens per GPU per step")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16 peak")
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of peak achieved")
    p.add_argument("--nvlink-gbs", type=float, default=360.0, help="NCCL bus bandwidth in a node (NVLink 4)")
    p.add_argument("--nvlink-us", type=float, default=15.0, help="collective latency in a node")
    p.add_argument("--internode-gbs", type=float, default=40.0,
                   help="per-GPU bandwidth across nodes (one 400 Gb/s NIC per GPU, 80 %%)")
    p.add_argument("--internode-us", type=float, default=50.0, help="collective latency across nodes")
    p.add_argument("--adam-step-ms", type=float, default=0.3, help="AdamW (foreach) on the adapter cores, GPU")
    p.add_argument("--das-extra-ms", type=float, default=0.15, help="DAS's step over AdamW's, GPU")
    p.add_argument("--no-measure", action="store_true", help="skip the one-layer measurement")
    p.add_argument("--tokens", type=int, default=64, help="tokens of the measured layer's input")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU time is per process: keep 1)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    measured = None if args.no_measure else measure_layer(OPT_6_7B, args.r, args.tt_rank, args.tokens, args.repeats)
    a = assumptions(args, measured)
    rows = [predict(a, n, s) for n in (1, 8, 64) for s in ("ddp", "fsdp", "hsdp") if not (n == 1 and s != "ddp")]
    if measured:
        m = measured
        print(f"measured here (one OPT-6.7B layer, float32, {m['tokens']} tokens, {torch.get_num_threads()} "
              f"thread(s)): forward {1e3 * m['forward_s']:.0f} ms, forward+backward {1e3 * m['forward_backward_s']:.0f} "
              f"ms (backward/forward {a['backward_over_forward']:.2f}); adapter step over {m['adapter_tensors']} "
              f"cores: AdamW {1e3 * m['adamw_step_s']:.2f} ms, DAS {1e3 * m['das_step_s']:.2f} ms")
    print(f"N = {a['base_params'] / 1e9:.2f}B base parameters; LoRETTA: P = {a['adapter_params']:,} parameters "
          f"in K = {a['cores']} cores; {a['tokens_per_gpu']} tokens per GPU per step")
    print(table(rows))
    from tensorsam.run import atomic_write_text

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(["python", "benchmarks/cost_model.py", *(argv or sys.argv[1:])]),
              "machine": platform.platform(), "torch": torch.__version__, "measured": measured,
              "assumptions": a, "predictions": rows}
    atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(math.isfinite(r["sam_s"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
