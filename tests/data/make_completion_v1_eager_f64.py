"""Run with the first wave's checkout on PYTHONPATH (commit 631a170): the golden final cores of a
short eager float64 completion run, which every later refactor must reproduce bit for bit."""
import torch

from tensorsam.tasks.completion import CompletionConfig, run_completion

cfg = CompletionConfig(methods=["adam", "sam", "das", "rebalance"], seeds=[42], iterations=200, log_every=100,
                       checkpoint_every=100, compile=False, dtype="float64")
out = run_completion(cfg)
torch.save({"config": {"iterations": 200, "log_every": 100, "checkpoint_every": 100, "compile": False,
                       "dtype": "float64", "methods": cfg.methods, "seeds": cfg.seeds},
            "solutions": {k: [c.clone() for c in v] for k, v in out["solutions"].items()}},
           "tests/data/completion_v1_eager_f64.pt")
