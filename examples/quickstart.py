"""Quick start: a TR-tensorized CIFAR ResNet-20 trained with DAS, SAM and plain SGD on random
data for a few steps, with the norm dynamics tracked. (The README shows this file.)"""

import torch
import torch.nn.functional as F

from tensorsam.dynamics import NormTracker, norm_deviation
from tensorsam.groups import scale_invariant_groups
from tensorsam.models import resnet
from tensorsam.optim import DAS, SAM, disable_running_stats

torch.manual_seed(0)
x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))

# DAS: one gradient per step, Eq. 9 scaling of every core group before the base SGD step.
model = resnet(20, format="tr", rank=5)
groups = scale_invariant_groups(model)  # one group (the TR cores) per tensorized conv
opt = DAS(model.parameters(), torch.optim.SGD, groups=groups, alpha=0.1, lr=0.05, momentum=0.9)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3)  # drives the base lr, and DAS's eta
tracker = NormTracker(groups, every=1)
for step in range(3):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    tracker.record(step)  # Q, Cov(s, gamma), u_D at the current gradients
    opt.step()
    sched.step()
print("DAS: Q of the first conv's cores", float(norm_deviation(groups[0])))

# SAM (Algorithm 1) in the two-step style; BatchNorm statistics skip the perturbed pass.
model = resnet(20, format="tr", rank=5)
opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
for step in range(3):
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)  # w <- w + rho g/||g||
    with disable_running_stats(model):
        F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)  # restore w, base step with the perturbed gradient
print("SAM: done", sum(p.numel() for p in model.parameters()), "parameters")
