"""train/: the SAM two-pass step (BatchNorm, accumulation as m-sharpness, GradScaler, clipping),
and ``fit``: evaluation, best state, and a run killed with SIGKILL mid-epoch that resumes
bit-identically."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tensorsam.models import resnet
from tensorsam.optim import SAM, build_optimizer
from tensorsam.optim.sam import disable_running_stats
from tensorsam.run import load_checkpoint, seed_everything
from tensorsam.train import fit, train_step

HERE = Path(__file__).parent


def small_net(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8, dtype=dtype), nn.BatchNorm1d(8, dtype=dtype), nn.Tanh(),
                         nn.Linear(8, 3, dtype=dtype))


def data(n=16, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def state(model):
    return [t.detach().clone() for t in model.state_dict().values()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# -- steps ---------------------------------------------------------------------------------------
def test_sam_step_is_the_two_step_style_with_batchnorm_kept_out_of_the_perturbed_pass():
    x, y = data()
    model = small_net()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for _ in range(2):
        train_step(model, opt, F.cross_entropy, [(x, y)])

    ref = small_net()
    ropt = SAM(ref.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for _ in range(2):
        ropt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        ropt.first_step(zero_grad=True)
        with disable_running_stats(ref):
            F.cross_entropy(ref(x), y).backward()
        ropt.second_step()
    assert same(state(model), state(ref))               # running stats included
    assert ref[1].num_batches_tracked.item() == 2      # only the first passes counted


def test_accumulation_with_sam_is_per_micro_batch_ascent():
    """Two micro-batches: each perturbs with its own gradient; the base step uses the mean of the
    gradients at the two perturbed points (m-sharpness), not full-batch SAM."""
    x, y = data()
    model = nn.Sequential(nn.Linear(6, 8, dtype=torch.float64), nn.Tanh(), nn.Linear(8, 3, dtype=torch.float64))
    ref = nn.Sequential(nn.Linear(6, 8, dtype=torch.float64), nn.Tanh(), nn.Linear(8, 3, dtype=torch.float64))
    ref.load_state_dict(model.state_dict())
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    loss = train_step(model, opt, F.cross_entropy, [(x[:8], y[:8]), (x[8:], y[8:])])

    params = list(ref.parameters())
    total = [torch.zeros_like(p) for p in params]
    for xb, yb in ((x[:8], y[:8]), (x[8:], y[8:])):
        g = torch.autograd.grad(F.cross_entropy(ref(xb), yb) / 2, params)
        norm = torch.cat([t.reshape(-1) for t in g]).norm()
        w = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, t in zip(params, g):
                p.add_(0.1 * t / norm)
        for acc, t in zip(total, torch.autograd.grad(F.cross_entropy(ref(xb), yb) / 2, params)):
            acc.add_(t)
        with torch.no_grad():
            for p, w_ in zip(params, w):
                p.copy_(w_)
    with torch.no_grad():
        for p, t in zip(params, total):
            p.sub_(0.1 * t)
    for a, b in zip(model.parameters(), params):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert loss.ndim == 0 and not loss.requires_grad


def test_grad_scaler_gives_the_unscaled_step_and_skips_non_finite_ones():
    x, y = data()

    def run(scaler, poison=False):
        model = small_net()
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)

        def loss_fn(out, t):
            loss = F.cross_entropy(out, t)
            return loss * float("inf") if poison else loss

        train_step(model, opt, loss_fn, [(x, y)], scaler=scaler, clip_grad_norm=0.5)
        return model

    plain = run(None)
    scaled = run(torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
    assert same(state(plain), state(scaled))
    before = small_net()
    skipped = run(torch.amp.GradScaler("cpu", init_scale=2.0 ** 8), poison=True)
    params = lambda m: [p.detach() for p in m.parameters()]
    assert same(params(skipped), params(before))


def test_clipping_applies_to_the_gradient_the_base_step_uses():
    x, y = data()
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train_step(model, opt, F.cross_entropy, [(x, y)], clip_grad_norm=1e-3)
    norm = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
    assert norm <= 1e-3 * (1 + 1e-9)


def test_bf16_autocast_runs():
    x, y = data(dtype=torch.float32)
    model = small_net(dtype=torch.float32)
    opt = build_optimizer("sam", model.parameters(), lr=0.1)
    loss = train_step(model, opt, F.cross_entropy, [(x, y)], autocast=lambda: torch.autocast("cpu", torch.bfloat16))
    assert torch.isfinite(loss)


# -- fit -----------------------------------------------------------------------------------------
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1).expand(-1, 3, -1, -1) / 16.0
    x = ((x - x.mean()) / x.std()).contiguous()
    y = torch.tensor(d.target)
    return (x[:320], y[:320]), (x[320:480], y[320:480])


def run_digits(method: str, checkpoint, resume: bool = False, kill_at: int | None = None):
    """TR-ResNet-20 (rank 3) on 8x8 digits through ``fit``: 2 epochs of 10 steps, evaluation every 5,
    checkpoints every 3, a cosine schedule per step and noise augmentation from the global RNG."""
    torch.set_num_threads(1)
    seed_everything(0)
    train, val = digits()
    model = resnet(20, "tr", rank=3)
    options = {"das": {"alpha": 0.1, "groups": model}, "sam": {"rho": 0.05}, "sam-every-2": {"rho": 0.05}}
    opt = build_optimizer(method, model.parameters(), base="sgd", lr=0.05, momentum=0.9, **options.get(method, {}))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)

    def on_step(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    result = fit(model, opt, train, val=val, epochs=2, batch_size=32, eval_every=5, scheduler=sched,
                 batch_transform=lambda xb: xb + 0.05 * torch.randn_like(xb), seed=3, checkpoint=checkpoint,
                 checkpoint_every=3, resume=resume, progress=False, on_step=on_step)
    return state(model), result


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sgd", "sam", "das", "sam-every-2"])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(method, tmp_path, monkeypatch):
    # auto by its estimate alone: its timing could pick another forward mode (other rounding) in the
    # uninterrupted run than in the killed one, whose choices the resume replays from the checkpoint
    monkeypatch.setenv("TENSORSAM_AUTO_TIMING", "0")
    ckpt = tmp_path / "run.ckpt"
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from test_train import run_digits; "
            f"run_digits({method!r}, {str(ckpt)!r}, kill_at=13)")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(ckpt)["iteration"] == 12      # last saved after step 12: epoch 2, batch 3
    resumed, res_r = run_digits(method, ckpt, resume=True)
    straight, res_s = run_digits(method, None)
    assert same(resumed, straight)
    assert res_r.history == res_s.history and len(res_s.history) == 4
    assert res_s.best_val_acc == max(r["val_acc"] for r in res_s.history)
    assert res_s.best_state is not None and res_s.seconds_per_step > 0


def test_progress_in_a_log_is_plain_lines_under_100_columns(capsys):
    from tensorsam.run.loop import _LineProgress

    lines = _LineProgress("a long description of the run", 50, 0, seconds=0.0)
    lines.update(50, {"loss": torch.tensor(1234.5678), "train_r2": 0.95, "Q": 2.0954e-3, "x": 1.0, "y": 2.0,
                      "zzzzzzzzzzzz": 3.0})
    out = capsys.readouterr().err.strip().splitlines()
    assert len(out) == 1 and len(out[0]) <= 100 and "50/50 (100%)" in out[0] and "loss=1235" in out[0]
    assert not out[0].endswith("e-0")                    # no metric is cut in the middle


def test_accuracies_scores_one_forward_against_several_label_sets():
    from tensorsam.train import accuracies

    model = torch.nn.Linear(3, 2)
    x = torch.randn(50, 3)
    pred = model(x).argmax(1)
    got = accuracies(model, x, {"same": pred, "flipped": 1 - pred, "half": torch.where(torch.arange(50) < 25, pred, 1 - pred)},
                     batch_size=16)
    assert got == {"same": 1.0, "flipped": 0.0, "half": 0.5} and model.training
