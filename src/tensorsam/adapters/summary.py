"""What each adapted layer holds: method, rank, TT shapes and rank, trainable parameters."""

from __future__ import annotations

from torch import nn

from tensorsam.adapters.layer import FloraLinear, LorettaLinear


def adapter_summary(model: nn.Module) -> list[dict]:
    """One row per (adapted layer, adapter): ``module``, ``adapter``, ``method`` (lora, flora,
    loretta), ``in``/``out`` features, ``r``, ``params``; LoRETTA adds ``tt_rank`` and the TT mode
    shapes ``a_shape`` (in-factors, r-factors) and ``b_shape`` (out-factors, r-factors)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        LoraLayer = ()
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, FloraLinear | LorettaLinear):
            for ad, group in m.adapter_groups():
                row = {"module": name, "adapter": ad, "method": m.kind, "in": m.in_features,
                       "out": m.out_features, "r": m.r[ad], "params": sum(p.numel() for _, p in group)}
                if isinstance(m, LorettaLinear):
                    a, b = m.tt_shapes[ad]
                    row.update(tt_rank=m.tt_rank[ad], a_shape=list(a), b_shape=list(b))
                rows.append(row)
        elif LoraLayer and isinstance(m, LoraLayer):
            for ad in m.lora_A:
                params = m.lora_A[ad].weight.numel() + m.lora_B[ad].weight.numel()
                rows.append({"module": name, "adapter": ad, "method": "lora", "in": m.in_features,
                             "out": m.out_features, "r": m.r[ad], "params": params})
    return rows


def format_adapter_summary(rows: list[dict]) -> str:
    """``adapter_summary`` as a plain-text table (one line per layer and a total)."""
    lines = []
    for row in rows:
        tt = (f"  TT rank {row['tt_rank']}, A modes {row['a_shape']}, B modes {row['b_shape']}"
              if "tt_rank" in row else "")
        lines.append(f"{row['module']} [{row['adapter']}] {row['method']} r={row['r']} "
                     f"{row['in']}->{row['out']}: {row['params']} params{tt}")
    lines.append(f"total adapter parameters: {sum(r['params'] for r in rows)}")
    return "\n".join(lines)
