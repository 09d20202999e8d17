"""Markdown rows of the E5 analogue tables in docs/results/vision.md from merged results files:
per (noise, method) the test accuracy (%) final and at best validation as mean ± sample std over
seeds, the per-seed final values, the mean accuracy on the noisy / clean training labels, and the
per-seed differences to SGD.

    python experiments/e5_table.py docs/results/e5/noise-0.4/results.json docs/results/e5/noise-0.8/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tensorsam.tasks.vision.report import methods_of, noises_of, select, stats


def _ms(runs, key: str) -> str:
    mean, std, k, _ = stats(runs, key, 100.0)
    return f"{mean:.1f}" if k == 1 else f"{mean:.1f} ± {std:.1f}"


def rows(results: dict) -> list[str]:
    out, diffs = [], []
    for p in noises_of(results["runs"]):
        at_p = [r for r in select(results["runs"], label_noise=p) if r.get("status", "ok") == "ok"]
        sgd = {r["seed"]: r for r in select(at_p, method="sgd")}
        for m in methods_of({**results, "runs": at_p}):
            rs = sorted(select(at_p, method=m), key=lambda r: r["seed"])
            seeds = ", ".join(f"{100 * r['final_test_acc']:.1f}" for r in rs)
            noisy, clean = stats(rs, "final_train_acc_noisy", 100.0)[0], stats(rs, "final_train_acc_clean", 100.0)[0]
            out.append(f"| {100 * p:.0f} % | {m} | {len(rs)} | {_ms(rs, 'final_test_acc')} | "
                       f"{_ms(rs, 'test_acc_at_best_val')} | {seeds} | {noisy:.0f} / {clean:.0f} |")
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
    runs, methods = [], ["sgd", "sam", "das", "rebalance", "sam-every-2", "sam-every-5"]
    for f in parser.parse_args().results:
        data = json.loads(f.read_text())
        authors = (data.get("config") or {}).get("das_variant") == "authors"
        # the authors' DAS variant is a column of its own
        runs += [{**r, "method": "das (authors)"} if authors and r["method"] == "das" else r for r in data["runs"]]
    print("| noise | method | n | final | at best val | per seed (final) | noisy / clean train |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows({"config": {"methods": methods}, "runs": runs})))


if __name__ == "__main__":
    main()
