"""A tensorized net learns real data: TR-ResNet-20 on scikit-learn's bundled digits."""

import math

import pytest
import torch
import torch.nn.functional as F

from tensorsam.models import resnet

sklearn_datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn provides the digits data")

STEPS, BATCH, LR = 120, 32, 0.05  # ~0.3 s a step on one idle core; 0.92 held-out at seed 0


def digits_32x32(seed: int = 0):
    """Digits (1797 images, 8x8, 10 classes) upsampled to 3x32x32, standardised, split 80/20."""
    data = sklearn_datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train].contiguous(), y[train], x[test].contiguous(), y[test]


@pytest.fixture
def one_thread():
    """One intra-op thread (restored afterwards): this test shares 2 cores with the rest of the
    suite, and many small ops on 2 oversubscribed threads mostly wait on each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tr_resnet20_learns_digits(one_thread):
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits_32x32()
    model = resnet(20, "tr", rank=5)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=STEPS, pct_start=0.2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    model.train()
    for step in range(STEPS):
        idx = torch.randint(0, len(ytr), (BATCH,), generator=gen)
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())
    losses = torch.stack(losses)
    assert torch.isfinite(losses).all(), "NaN/inf training loss"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    assert losses[-10:].mean() < losses[:10].mean()
    assert acc >= 0.80, f"held-out accuracy {acc:.3f} < 0.80 (chance is 0.10; final loss {losses[-1]:.3f})"
    assert not math.isnan(acc)
