"""Run from the root of the first wave's checkout (commit 631a170), with its src/ on PYTHONPATH:
state dicts in the first layout ("base" + "wrapper"), the weights they go with, and the weights
after two more steps, for tests/test_optim_factory.py."""

import copy
import sys

import torch

sys.path.insert(0, "tests")
from test_optim_common import make, toy, train

out = {}
for kind, base in [("sam", torch.optim.SGD), ("das", torch.optim.SGD), ("nbar", torch.optim.Adam),
                   ("rebalance", torch.optim.Adam)]:
    params, groups, loss_fn = toy()
    opt = make(kind, params, groups, base=base)
    train(opt, loss_fn, 3)
    sd = copy.deepcopy(opt.state_dict())
    at3 = [p.detach().clone() for p in params]
    train(opt, loss_fn, 2)
    out[f"{kind}-{base.__name__}"] = {"state_dict": sd, "params": at3,
                                      "expected": [p.detach().clone() for p in params]}
torch.save(out, "optim_v1_state_dicts.pt")
