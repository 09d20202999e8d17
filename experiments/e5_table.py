"""Markdown rows of the E5 analogue tables in docs/results/vision.md from merged results files:
per (noise, method) the test accuracy (%) final and at best validation as mean ± sample std over
seeds, the per-seed final values, the mean accuracy on the noisy / clean training labels, and the
per-seed differences to SGD.

    python experiments/e5_table.py docs/results/e5/noise-0.4/results.json docs/results/e5/noise-0.8/results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

METHODS = ("sgd", "sam", "das", "rebalance", "sam-every-2", "sam-every-5")


def _ms(values: list[float], bold: bool = False) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    text = f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
    return f"**{text}**" if bold else text


def rows(runs: list[dict]) -> list[str]:
    out, diffs = [], []
    for p in sorted({r["label_noise"] for r in runs}):
        at_p = [r for r in runs if r["label_noise"] == p and r.get("status", "ok") == "ok"]
        sgd = {r["seed"]: r for r in at_p if r["method"] == "sgd"}
        for m in [m for m in METHODS if any(r["method"] == m for r in at_p)] + sorted(
                {r["method"] for r in at_p} - set(METHODS)):
            rs = sorted((r for r in at_p if r["method"] == m), key=lambda r: r["seed"])
            final = [100 * r["final_test_acc"] for r in rs]
            best = [100 * r["test_acc_at_best_val"] for r in rs]
            noisy = statistics.mean(100 * r["final_train_acc_noisy"] for r in rs)
            clean = statistics.mean(100 * r["final_train_acc_clean"] for r in rs)
            seeds = ", ".join(f"{v:.1f}" for v in final)
            out.append(f"| {100 * p:.0f} % | {m} | {len(rs)} | {_ms(final)} | {_ms(best)} | {seeds} | {noisy:.0f} / {clean:.0f} |"
                       )
            if m != "sgd":
                d = [(r["seed"], 100 * (r["final_test_acc"] - sgd[r["seed"]]["final_test_acc"]),
                      100 * (r["test_acc_at_best_val"] - sgd[r["seed"]]["test_acc_at_best_val"]))
                     for r in rs if r["seed"] in sgd]
                diffs.append(f"- {100 * p:.0f} % {m} − sgd per seed (final; best val): "
                             + "; ".join(f"seed {s}: {a:+.1f}, {b:+.1f}" for s, a, b in d))
    return out + [""] + diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    runs = []
    for f in parser.parse_args().results:
        data = json.loads(f.read_text())
        authors = (data.get("config") or {}).get("das_variant") == "authors"
        # the authors' DAS variant is a column of its own
        runs += [{**r, "method": "das (authors)"} if authors and r["method"] == "das" else r for r in data["runs"]]
    print("| noise | method | n | final | at best val | per seed (final) | noisy / clean train |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows(runs)))


if __name__ == "__main__":
    main()
