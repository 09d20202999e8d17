"""Bad input, one row per kind: what the user sees is a clear error naming the problem, or a defined
result.  :data:`CASES` is the table; ``docs/reliability.md`` lists the same ids in the same order
(:func:`test_the_reliability_doc_lists_every_case`).

A CLI row runs ``tensorsam.cli.main`` in-process; a non-zero exit becomes :class:`CliExit`, whose text
is ``exit N: <stderr>``, so every row is "raises TYPE matching REGEX" or a check."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tensorsam.cli import main
from tensorsam.data.images import load_fashion_mnist
from tensorsam.data.masks import make_masks
from tensorsam.data.noise import symmetric_label_noise
from tensorsam.dynamics import NormTracker
from tensorsam.nn import TensorizedConv2d, TensorizedLinear, tensorize
from tensorsam.optim import build_optimizer
from tensorsam.run.loop import CHECKPOINT_FORMAT, Loop
from tensorsam.run.sweep import Sweep
from tensorsam.tensors import CP, TR, TT, Tucker, get_format

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


class CliExit(Exception):
    """A ``tensorsam`` command that exited with a non-zero status."""


def cli(*argv) -> str:
    """Run ``tensorsam ARGV`` in-process; its stderr, or :class:`CliExit` (``exit N: <stderr>``)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    text = err.getvalue()
    assert "Traceback" not in text
    if code:
        raise CliExit(f"exit {code}: {text.strip()}")
    return text


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    bad: str  # the kind of bad input
    run: Callable[[Path], object]  # called with a fresh tmp_path
    error: type[BaseException] | None = None  # None: a defined result, which run() checks itself
    match: str = ""


def refused(id_, bad, run, error, match) -> Case:
    return Case(id_, bad, run, error, match)


def defined(id_, bad, run) -> Case:
    return Case(id_, bad, run)


# ----------------------------------------------------------------------------- helpers of the rows


def _linear(**kw):
    return TensorizedLinear(16, 8, format="tt", rank=2, **kw)


def _conv():
    return TensorizedConv2d(4, 8, 3, format="tr", rank=2)


def _params():
    return nn.Linear(4, 3).parameters()


def _sam_state():
    """The state dict of a SAM over SGD with momentum on a Linear(4, 3), after one step."""
    model = nn.Linear(4, 3)
    opt = build_optimizer("sam", model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.first_step(zero_grad=True)
    model(torch.randn(2, 4)).sum().backward()
    opt.second_step(zero_grad=True)
    return opt.state_dict()


def _load_sam_state(model, base="sgd"):
    options = {"momentum": 0.9} if base == "sgd" else {}
    build_optimizer("sam", model.parameters(), base=base, lr=0.1, **options).load_state_dict(_sam_state())


def _bar_over_three_cores():
    cores = list(TT((4, 5, 6), 2).parameters())
    return build_optimizer("nbar", cores, groups=[cores], lr=0.1, alpha=0.1, total_steps=10)


def _das(**options):
    layer = _linear()
    return build_optimizer("das", layer.parameters(), groups=layer, lr=0.1, **options)


def _nan_step(method, **options):
    """One step of ``method`` on a TT layer whose gradients are NaN; (params before, layer, optimizer)."""
    torch.manual_seed(0)
    layer = _linear(bias=False)
    opt = build_optimizer(method, layer.parameters(), groups=layer, lr=0.1, **options)
    before = [p.detach().clone() for p in layer.parameters()]

    def nan_backward():
        (layer(torch.randn(2, 16)).sum() * math.nan).backward()

    nan_backward()
    if hasattr(opt, "first_step"):
        opt.first_step(zero_grad=True)
        nan_backward()
        opt.second_step(zero_grad=True)
    else:
        opt.step()
    return before, layer, opt


def nan_grads_propagate(tmp):
    _, layer, opt = _nan_step("sam")
    assert opt.skipped_steps == 0
    assert all(torch.isnan(p).all() for p in layer.parameters())   # as torch.optim.SGD would


def nan_grads_skipped(method, **options):
    def run(tmp):
        before, layer, opt = _nan_step(method, skip_nonfinite=True, **options)
        assert opt.skipped_steps == 1 and opt.step_count == 0
        assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    return run


def tt_rank_capped(tmp):
    tt = TT.from_dense(torch.randn(4, 5, 6), 100)
    assert tt.rank == (4, 6)       # the full TT ranks of a 4 x 5 x 6 tensor


def write_idx(path: Path, arr, magic=None, cut=0) -> Path:
    """``arr`` as an uncompressed IDX file of unsigned bytes; ``magic`` overrides, ``cut`` truncates."""
    arr = np.asarray(arr, dtype=np.uint8)
    raw = struct.pack(f">I{arr.ndim}I", 0x0800 + arr.ndim if magic is None else magic, *arr.shape)
    raw = (raw + arr.tobytes())[: len(raw) + arr.size - cut]
    path.write_bytes(raw)
    return path


def fashion_mnist(tmp: Path, *, magic=None, cut=0, n_labels=20, label=0) -> Path:
    """Four small Fashion-MNIST IDX files in ``tmp``; the training images file can be made bad."""
    for prefix in ("train", "t10k"):
        images = np.zeros((20, 28, 28))
        bad = prefix == "train"
        write_idx(tmp / f"{prefix}-images-idx3-ubyte", images, magic if bad else None, cut if bad else 0)
        write_idx(tmp / f"{prefix}-labels-idx1-ubyte", np.full(n_labels if bad else 20, label if bad else 0))
    return tmp


def task(tmp, name, *args):
    """``tensorsam NAME ARGS`` into ``tmp/out`` (a later ``--out`` in ARGS wins)."""
    return cli(name, "--out", tmp / "out", "--no-progress", *args)


def toy(tmp, *more):
    """A tiny toy command (one GD run of 3 steps) into ``tmp/out``."""
    return task(tmp, "toy", "--iterations", 3, "--methods", "gd", "--noises", 0, *more)


def out_in_file(tmp, *sub):
    (tmp / "f").write_text("x")
    return toy(tmp, "--out", tmp.joinpath("f", *sub))


def toy_resume_from(tmp, checkpoint_bytes=None, checkpoint_obj=None):
    work = tmp / "out" / ".work"
    work.mkdir(parents=True)
    path = work / "gd_noise0_run.ckpt"
    if checkpoint_bytes is not None:
        path.write_bytes(checkpoint_bytes)
    else:
        torch.save(checkpoint_obj, path)
    return toy(tmp, "--resume")


def toy_resume_over_results(tmp, text):
    (tmp / "out").mkdir()
    (tmp / "out" / "results.json").write_text(text)
    return toy(tmp, "--resume")


def toy_resume_other_settings(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "results.json").write_text(json.dumps({"config": {"lr": 1.0}, "runs": []}))
    return toy(tmp, "--resume")


def diverging_run(tmp):
    args = ("--set", "lr=1e6", "--set", "size=6", "--set", "rank=2", "--set", "log_every=5")
    with pytest.raises(CliExit, match=r"^exit 3: 1 of 1 run\(s\) diverged: exit status 3"):
        task(tmp, "toy", "--iterations", 20, "--methods", "gd", "--noises", 0, *args)
    run = json.loads((tmp / "out" / "results.json").read_text())["runs"][0]
    assert run["status"] == "diverged" and run["diverged_at"] >= 1


def loop_checkpoint(tmp, **kw) -> Path:
    """A finished 2-iteration loop checkpoint of a Linear saved under ``model``."""
    path = tmp / "loop.ckpt"
    for _ in Loop(2, state={"model": nn.Linear(2, 2)}, checkpoint=path, progress=False, **kw):
        pass
    return path


def read_only_out(tmp):
    if os.geteuid() == 0:
        pytest.skip("root may write into a read-only folder")
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        toy(tmp, "--out", ro / "x")
    finally:
        ro.chmod(0o755)


def cuda_absent(tmp):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    vision(tmp, "--device", "cuda", "--epochs", 1, "--train-subset", 50, "--methods", "sgd")


def config_file(tmp, name, text, name_of_task="toy"):
    (tmp / name).write_text(text)
    return task(tmp, name_of_task, "--config", tmp / name)


def results_file(tmp, text):
    (tmp / "r.json").write_text(text)
    return cli("report", tmp / "r.json")


def vision(tmp, *args):
    return task(tmp, "vision", *args)


E2 = r"^exit 2: tensorsam [a-z-]+: error: "   # the start of a command's stderr on bad input (exit status 2)
USAGE = r"^exit 2: usage: tensorsam "           # argparse's own refusal (exit status 2), after the usage

# ----------------------------------------------------------------------------- the table

CASES = [
    # tensors and tensorized layers
    refused("float-rank", "float ranks: `Tucker((4,5,6), (2.7,3.9,1.5))`",
            lambda tmp: Tucker((4, 5, 6), (2.7, 3.9, 1.5)), ValueError, r"rank: entry 2\.7 is not an integer"),
    refused("float-shape", "a float in a shape, even a whole one: `Tucker((4.0,5,6), 2)`",
            lambda tmp: Tucker((4.0, 5, 6), 2), ValueError, r"shape: entry 4\.0 is not an integer"),
    refused("negative-shape", "a non-positive mode size", lambda tmp: CP((4, -5, 6), 2), ValueError,
            r"shape must be a non-empty sequence of positive ints, got \(4, -5, 6\)"),
    refused("rank-wrong-length", "a per-mode rank of the wrong length", lambda tmp: Tucker((4, 5, 6), (2, 3)),
            ValueError, r"rank has 2 entries; expected an int or a sequence of 3 positive ints"),
    refused("rank-zero", "rank 0", lambda tmp: TR((4, 5, 6), 0), ValueError, r"rank must be positive"),
    refused("rank-above-mode-size", "a Tucker rank larger than its mode", lambda tmp: Tucker((4, 5, 6), (5, 3, 2)),
            ValueError, r"rank R_1 = 5 exceeds the size 4 of mode 0"),
    defined("tt-rank-above-full-rank", "TT-SVD asked for ranks beyond the full TT ranks", tt_rank_capped),
    refused("tr-rank-too-large", "TR-SVD with r_0 * r_1 above the first unfolding",
            lambda tmp: TR.from_dense(torch.randn(4, 5, 6), 50), ValueError,
            r"rank\[0\] \* rank\[1\] = 2500 is larger than first matricization dimension"),
    refused("integer-dtype", "cores of an integer dtype", lambda tmp: Tucker((4, 5, 6), 2, dtype=torch.int64),
            ValueError, r"dtype must be a floating-point torch dtype .*got torch\.int64"),
    refused("decompose-integer-tensor", "decomposing an integer tensor",
            lambda tmp: Tucker.from_dense(torch.ones(4, 5, 6, dtype=torch.int64), 2), ValueError,
            r"tensor must be a floating-point torch\.Tensor, got Tensor of dtype torch\.int64"),
    refused("decompose-non-finite", "decomposing a tensor that holds NaN",
            lambda tmp: CP.from_dense(torch.full((4, 5, 6), math.nan), 2), ValueError,
            r"tensor holds non-finite values \(NaN or inf\); cannot decompose it"),
    refused("unknown-format", "an unknown tensor format", lambda tmp: get_format("hosvd"), ValueError,
            r"unknown tensor format 'hosvd'; expected one of \['cp', 'tr', 'tt', 'ttm', 'tucker'\]"),
    refused("layer-unknown-format", "a layer in an unknown format",
            lambda tmp: TensorizedLinear(16, 16, format="lowrank", rank=2), ValueError,
            r"unknown tensor format 'lowrank'"),
    refused("layer-shape-mismatch", "a tensor shape whose modes do not multiply to the layer's sizes",
            lambda tmp: _linear(shape=(3, 3, 2, 4)), ValueError,
            r"shape \(3, 3, 2, 4\) does not match the layer: expected \(in modes with product 16, out modes"),
    refused("unknown-forward-mode", "an unknown forward mode", lambda tmp: _linear(forward_mode="fast"),
            ValueError, r"forward_mode must be one of \('auto', 'factorized', 'reconstructed'\), got 'fast'"),
    refused("linear-wrong-input-width", "input of the wrong width to a tensorized Linear",
            lambda tmp: _linear()(torch.randn(3, 15)), ValueError, r"input has shape \(3, 15\); expected \(\.\.\., 16\)"),
    refused("conv-wrong-input-channels", "input with the wrong channels to a tensorized Conv2d",
            lambda tmp: _conv()(torch.randn(2, 3, 8, 8)), ValueError,
            r"input has shape \(2, 3, 8, 8\); expected \(N, 4, H, W\)"),
    refused("conv-input-too-small", "an image smaller than the kernel", lambda tmp: _conv()(torch.randn(2, 4, 2, 2)),
            ValueError, r"input has spatial size \(2, 2\), too small for kernel_size \(3, 3\)"),
    refused("layer-integer-input", "integer input to a tensorized layer",
            lambda tmp: _linear()(torch.ones(2, 16, dtype=torch.int64)), ValueError,
            r"input has dtype torch\.int64; a tensorized layer takes floating-point input"),
    refused("layer-dtype-mismatch", "float64 input to a float32 layer (outside autocast)",
            lambda tmp: _linear()(torch.ones(2, 16, dtype=torch.float64)), ValueError,
            r"input has dtype torch\.float64 but the layer's cores are torch\.float32"),
    refused("load-cores-other-rank", "a state dict of another rank", lambda tmp: TT((4, 5, 6), 2).load_state_dict(
        TT((4, 5, 6), 3).state_dict()), RuntimeError, r"size mismatch for cores\.0: copying a param with shape"),
    refused("tensorize-no-layer", "tensorize a model with no Linear/Conv2d",
            lambda tmp: tensorize(nn.Sequential(nn.BatchNorm1d(4)), "tt", 2), ValueError,
            r"nothing to tensorize: Sequential has no nn\.Linear or nn\.Conv2d layer \(8 parameters\)"),
    refused("tensorize-no-parameters", "tensorize a model with no parameters",
            lambda tmp: tensorize(nn.Sequential(), "tt", 2), ValueError,
            r"nothing to tensorize: .*\(0 parameters\)"),
    refused("tensorize-include-nothing", "an include pattern that matches no layer",
            lambda tmp: tensorize(nn.Sequential(nn.Linear(16, 16)), "tt", 2, include=["head"]), ValueError,
            r"no layer matches include=\['head'\].*the Linear/Conv2d layers are \['0'\]"),
    # optimizers
    refused("unknown-method", "an unknown optimizer method", lambda tmp: build_optimizer("adamax", _params()),
            ValueError, r"unknown method 'adamax'; expected one of \['base', 'sgd'"),
    refused("unknown-option", "an option neither the wrapper nor the base optimizer takes",
            lambda tmp: build_optimizer("sam", _params(), lr=0.1, rhoo=0.1), ValueError,
            r"unknown option\(s\) \['rhoo'\] for method 'sam' over SGD; valid options: \[.*'rho'"),
    refused("unknown-base", "an unknown base optimizer",
            lambda tmp: build_optimizer("sam", _params(), base="rmsprop", lr=0.1), ValueError,
            r"unknown base optimizer 'rmsprop'; expected one of \['adam', 'adamw', 'sgd'\]"),
    refused("negative-lr", "a negative learning rate", lambda tmp: build_optimizer("sam", _params(), lr=-0.1),
            ValueError, r"Invalid learning rate: -0\.1"),
    refused("negative-rho", "a negative rho", lambda tmp: build_optimizer("sam", _params(), lr=0.1, rho=-0.1),
            ValueError, r"rho must be a finite non-negative number, got -0\.1"),
    refused("nan-rho", "rho = NaN", lambda tmp: build_optimizer("sam", _params(), lr=0.1, rho=math.nan),
            ValueError, r"rho must be a finite non-negative number, got nan"),
    refused("negative-alpha", "a negative DAS alpha",
            lambda tmp: _das(alpha=-1.0), ValueError,
            r"alpha must be a finite non-negative number, got -1\.0"),
    refused("das-without-groups", "DAS without its scale-invariant groups",
            lambda tmp: build_optimizer("das", _params(), lr=0.1, alpha=0.1), ValueError,
            r"method 'das' needs groups=: a model or a list of parameter lists"),
    refused("das-without-alpha", "DAS without alpha",
            lambda tmp: _das(), ValueError,
            r"method 'das' needs alpha= \(its strength\)"),
    refused("bar-group-not-a-pair", "nBAR on a group of three cores",
            lambda tmp: _bar_over_three_cores(), ValueError,
            r"pairs\[0\] has 3 parameters; expected 2"),
    refused("sam-every-zero", "`sam-every-0`", lambda tmp: build_optimizer("sam-every-0", _params(), lr=0.1),
            ValueError, r"every must be a positive int, got 0"),
    refused("sam-random-above-one", "`sam-random-2` (a probability above 1)",
            lambda tmp: build_optimizer("sam-random-2", _params(), lr=0.1), ValueError,
            r"prob must be a number in \[0, 1\] or None, got 2\.0"),
    refused("empty-parameters", "an optimizer over no parameters", lambda tmp: build_optimizer("sam", [], lr=0.1),
            ValueError, r"optimizer got an empty parameter list"),
    defined("nan-gradient", "NaN gradients, default settings", nan_grads_propagate),
    defined("nan-gradient-skip-sam", "NaN gradients, SAM with `skip_nonfinite=True`", nan_grads_skipped("sam")),
    defined("nan-gradient-skip-das", "NaN gradients, DAS with `skip_nonfinite=True`",
            nan_grads_skipped("das", alpha=0.1)),
    refused("state-dict-other-shapes", "optimizer state of a differently shaped model",
            lambda tmp: _load_sam_state(nn.Linear(5, 3)), ValueError,
            r"state 'momentum_buffer' of parameter 0 has shape \(3, 4\), expected \(3, 5\): this state dict was "
            r"saved for a differently shaped model"),
    refused("state-dict-other-model", "optimizer state of a model with other parameters",
            lambda tmp: _load_sam_state(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 4))), ValueError,
            r"this state dict has param groups of \[2\] parameters, but this SAM has \[4\]: it was saved for "
            r"another model"),
    refused("state-dict-other-base", "optimizer state saved over another base optimizer",
            lambda tmp: _load_sam_state(nn.Linear(4, 3), base="adam"), ValueError,
            r"this state dict was saved with base optimizer SGD, but this SAM wraps Adam"),
    refused("state-dict-plain-optimizer", "a plain torch optimizer's state into a wrapper",
            lambda tmp: build_optimizer("sam", _params(), lr=0.1).load_state_dict(
                torch.optim.SGD(_params(), lr=0.1).state_dict()), ValueError,
            r"not a tensorsam optimizer state dict: its param groups lack 'base_optimizer'"),
    # configs and the command line
    refused("unknown-command", "an unknown command", lambda tmp: cli("frobnicate"), CliExit,
            USAGE + r".*\ntensorsam: error: argument <command>: invalid choice: 'frobnicate'"),
    refused("unknown-flag", "an unknown flag", lambda tmp: cli("toy", "--frob"), CliExit,
            USAGE + r"toy (.|\n)*tensorsam toy: error: unrecognized arguments: --frob"),
    refused("set-unknown-key", "an unknown config key via `--set`",
            lambda tmp: task(tmp, "toy", "--set", "iters=5"), CliExit,
            E2 + r"unknown config key\(s\) iters for ToyConfig; valid keys: .*iterations"),
    refused("set-wrong-type", "a value of the wrong type", lambda tmp: task(tmp, "toy", "--set", "iterations=many"),
            CliExit, E2 + r"config key 'iterations': expected int, got 'many'"),
    refused("set-float-in-int-list", "a float in a list of ints",
            lambda tmp: task(tmp, "completion", "--set", "rank=[8.5,6,8]"), CliExit,
            E2 + r"config key 'rank': expected int, got 8\.5"),
    refused("set-bool", "a bool spelled wrong", lambda tmp: vision(tmp, "--set", "augment=maybe"), CliExit,
            E2 + r"config key 'augment': expected bool, got 'maybe'"),
    refused("set-without-equals", "`--set` without `=`", lambda tmp: task(tmp, "toy", "--set", "iterations"), CliExit,
            E2 + r"--set expects key=value, got 'iterations'"),
    refused("config-missing", "a config file that does not exist",
            lambda tmp: task(tmp, "toy", "--config", tmp / "none.yaml"), CliExit,
            E2 + r"config file not found: .*none\.yaml"),
    refused("config-unparsable", "a config file that does not parse",
            lambda tmp: config_file(tmp, "c.yaml", "lr: [1, 2\n"), CliExit,
            E2 + r"cannot parse config file .*c\.yaml: while parsing a flow sequence"),
    refused("config-wrong-suffix", "a config file of an unknown kind", lambda tmp: config_file(tmp, "c.ini", "lr=1\n"),
            CliExit, E2 + r"config file .*c\.ini must end in \.yaml, \.yml, \.toml or \.json"),
    refused("config-not-a-mapping", "a config file holding a list", lambda tmp: config_file(tmp, "c.yaml", "- 1\n"),
            CliExit, E2 + r"config file .*c\.yaml must hold a mapping of keys to values at its top level"),
    refused("config-unknown-key", "an unknown key in a config file",
            lambda tmp: config_file(tmp, "c.toml", "iters = 5\n"), CliExit,
            E2 + r"unknown config key\(s\) iters for ToyConfig; valid keys:"),
    refused("out-is-a-file", "`--out` naming a file",
            lambda tmp: out_in_file(tmp), CliExit,
            E2 + r"output directory .*/f is a file, not a directory"),
    refused("out-under-a-file", "`--out` below a file",
            lambda tmp: out_in_file(tmp, "sub"), CliExit,
            E2 + r"output directory .*/f/sub lies under .*/f, which is a file, not a directory"),
    refused("out-read-only", "`--out` in a read-only folder", read_only_out, CliExit,
            E2 + r"output directory .*/ro/x is not writable \(in .*/ro, where it would be made\): Permission denied"),
    refused("toy-rank-above-size", "a toy rank above its size", lambda tmp: task(tmp, "toy", "--set", "rank=40"), CliExit,
            E2 + r"need 1 <= rank <= size, got rank 40 and size 30"),
    refused("toy-negative-noise", "a negative noise level", lambda tmp: task(tmp, "toy", "--noises", "-1"), CliExit,
            E2 + r"noises must be a non-empty list of non-negative numbers, got \[-1\.0\]"),
    refused("completion-unknown-dataset", "an unknown completion data set",
            lambda tmp: task(tmp, "completion", "--set", "dataset=mnist"), CliExit,
            E2 + r"unknown data set 'mnist'; expected one of \['covid19'.*\] or a path to a \.npy file"),
    refused("completion-rank-above-mode", "a Tucker rank above a mode of the data",
            lambda tmp: task(tmp, "completion", "--set", "rank=[8,7,8]", "--iterations", 2, "--seeds", 42,
                             "--methods", "adam"), CliExit,
            E2 + r"rank R_2 = 7 exceeds the size 6 of mode 1"),
    refused("completion-unknown-optimizer", "an unknown torch optimizer for completion",
            lambda tmp: task(tmp, "completion", "--set", "optimizer=Adamm"), CliExit,
            E2 + r"unknown base optimizer 'Adamm'; expected a torch\.optim class: \[.*'Adam'"),
    refused("completion-merge-missing", "`--merge` of a folder without results",
            lambda tmp: task(tmp, "completion", "--merge", tmp / "none"), CliExit,
            E2 + r"no completion results in .*none \(expected .*none/results\.json\)"),
    # vision and its data
    refused("unknown-vision-method", "an unknown vision method", lambda tmp: vision(tmp, "--methods", "sgd,adamx"),
            CliExit, E2 + r"unknown method 'adamx'; expected sgd, sam, asam, das, rebalance, sam-every-K"),
    refused("unknown-image-dataset", "an unknown image data set", lambda tmp: vision(tmp, "--data", "mnist"),
            CliExit, E2 + r"config key 'dataset': unknown dataset 'mnist'; expected one of \['digits'"),
    refused("unknown-vision-format", "an unknown format in `--format`", lambda tmp: vision(tmp, "--format", "tr,lr"),
            CliExit, E2 + r"config key 'formats': unknown format 'lr'; expected one of \['none', 'cp'"),
    refused("vision-rank-zero", "rank 0", lambda tmp: vision(tmp, "--rank", 0), CliExit,
            E2 + r"rank must be a positive int, got 0"),
    refused("vision-float-rank", "a float rank", lambda tmp: vision(tmp, "--rank", 2.5), CliExit,
            E2 + r"config key 'ranks': expected int, got 2\.5"),
    refused("empty-seeds", "no seeds", lambda tmp: vision(tmp, "--seeds", ""), CliExit, E2 + r"seeds is empty"),
    refused("label-noise-one", "label noise 1.0 (outside [0, 1))", lambda tmp: vision(tmp, "--label-noise", 1.0),
            CliExit, E2 + r"label noise must lie in \[0, 1\), got 1\.0"),
    refused("label-noise-negative", "negative label noise", lambda tmp: vision(tmp, "--label-noise", -0.1),
            CliExit, E2 + r"label noise must lie in \[0, 1\), got -0\.1"),
    refused("label-noise-api", "`symmetric_label_noise` with p = 1.5",
            lambda tmp: symmetric_label_noise(torch.tensor([0, 1, 2]), 1.5, 0, 3), ValueError,
            r"label noise rate must be in \[0, 1\], got 1\.5"),
    refused("batch-size-zero", "batch size 0", lambda tmp: vision(tmp, "--set", "batch_size=0"), CliExit,
            E2 + r"batch_size must be a positive int, got 0"),
    refused("epochs-zero", "0 epochs", lambda tmp: vision(tmp, "--epochs", 0), CliExit,
            E2 + r"epochs must be a positive int, got 0"),
    refused("vision-nan-lr", "lr = nan", lambda tmp: vision(tmp, "--set", "lr=nan"), CliExit,
            E2 + r"lr must be a finite non-negative number, got nan"),
    refused("unknown-device", "an unknown device", lambda tmp: vision(tmp, "--device", "tpu"), CliExit,
            E2 + r"device must be auto, cpu or cuda\[:i\], got 'tpu'"),
    refused("cuda-without-gpu", "`--device cuda` on a machine without CUDA", cuda_absent, CliExit,
            E2 + r"device 'cuda' asked for, but torch sees no CUDA device"),
    refused("train-subset-too-large", "a training subset larger than the training split",
            lambda tmp: vision(tmp, "--train-subset", 100000, "--methods", "sgd"), CliExit,
            E2 + r"train_subset must be in \[1, 1293\] \(training images left after the 144-image validation split\)"),
    refused("fashion-mnist-missing", "Fashion-MNIST not where `data_dir` points",
            lambda tmp: vision(tmp, "--data", "fashion-mnist", "--set", "data_dir=/nonexistent"), CliExit,
            E2 + r"Fashion-MNIST not found: no train-images-idx3-ubyte\[\.gz\] in /nonexistent\. Install Debian's "
                 r"package with `apt-get install dataset-fashion-mnist`"),
    refused("cifar10-without-data-dir", "CIFAR-10 without `data_dir`", lambda tmp: vision(tmp, "--data", "cifar10"),
            CliExit, E2 + r"CIFAR-10 needs data_dir: extract cifar-10-python\.tar\.gz"),
    refused("digits-with-data-dir", "a `data_dir` for the bundled digits",
            lambda tmp: vision(tmp, "--set", f"data_dir={tmp}"), CliExit,
            E2 + r"digits is bundled with scikit-learn and takes no data_dir"),
    refused("idx-bad-magic", "an IDX file with a bad magic number",
            lambda tmp: load_fashion_mnist(fashion_mnist(tmp, magic=0x0801)), ValueError,
            r"train-images-idx3-ubyte: bad magic number 0x00000801, expected 0x00000803"),
    refused("idx-truncated", "a truncated IDX file", lambda tmp: load_fashion_mnist(fashion_mnist(tmp, cut=100)),
            ValueError, r"train-images-idx3-ubyte: truncated IDX file: header says \(20, 28, 28\) = 15680 bytes"),
    refused("idx-count-mismatch", "label and image counts that differ",
            lambda tmp: load_fashion_mnist(fashion_mnist(tmp, n_labels=19)), ValueError,
            r"train-labels-idx1-ubyte holds 19 labels but .*train-images-idx3-ubyte holds 20 images"),
    refused("idx-label-out-of-range", "a label outside 0..9",
            lambda tmp: load_fashion_mnist(fashion_mnist(tmp, label=10)), ValueError,
            r"train-labels-idx1-ubyte: label 10 outside 0\.\.9"),
    refused("masks-float-shape", "a float in a completion mask's shape", lambda tmp: make_masks((3.7, 4), 0),
            ValueError, r"shape must be a non-empty sequence of positive ints, got \(3\.7, 4\)"),
    refused("masks-fraction", "a training fraction outside (0, 1)",
            lambda tmp: make_masks((3, 4), 0, train_fraction=1.5), ValueError,
            r"train_fraction must lie in \(0, 1\), got 1\.5"),
    # results, checkpoints, resuming
    refused("report-missing", "`tensorsam report` of a missing file", lambda tmp: cli("report", tmp / "none.json"),
            CliExit, E2 + r"results file not found: .*none\.json"),
    refused("report-not-json", "a results file that is not JSON", lambda tmp: results_file(tmp, "{oops"), CliExit,
            E2 + r"results file .*r\.json is not valid JSON: Expecting property name"),
    refused("report-not-results", "JSON that is not a results file", lambda tmp: results_file(tmp, '{"a": 1}'),
            CliExit, E2 + r".*r\.json is not a tensorsam results file \(no list of 'runs'\)"),
    refused("report-runs-not-objects", "a results file whose runs are not objects",
            lambda tmp: results_file(tmp, '{"runs": [1]}'), CliExit,
            E2 + r"results file .*r\.json: every entry of 'runs' must be an object"),
    refused("resume-corrupt-checkpoint", "`--resume` over a corrupt checkpoint",
            lambda tmp: toy_resume_from(tmp, checkpoint_bytes=b"garbage"), CliExit,
            E2 + r"corrupt or unreadable checkpoint .*gd_noise0_run\.ckpt: UnpicklingError: not a torch file of "
                 r"tensors and plain data \(corrupt, truncated, or holding other objects\)$"),
    refused("resume-results-not-json", "`--resume` into a folder whose results.json is not JSON",
            lambda tmp: toy_resume_over_results(tmp, "{oops"), CliExit,
            E2 + r"cannot resume into .*out: .*results\.json is not valid JSON \(Expecting property name"),
    refused("resume-results-a-list", "`--resume` into a folder whose results.json holds a list",
            lambda tmp: toy_resume_over_results(tmp, "[1]"), CliExit,
            E2 + r"cannot resume into .*out: .*results\.json is not a tensorsam results file"),
    refused("resume-results-runs-not-a-list", "`--resume` where results.json's runs are not a list",
            lambda tmp: toy_resume_over_results(tmp, '{"runs": 5}'), CliExit,
            E2 + r"cannot resume into .*out: .*results\.json is not a tensorsam results file"),
    refused("loop-checkpoint-other-shapes", "a loop checkpoint whose tensors have other shapes",
            lambda tmp: Loop(2, state={"model": nn.Linear(3, 2)}, checkpoint=loop_checkpoint(tmp), resume=True),
            ValueError, r"checkpoint .*loop\.ckpt does not fit this run's model: RuntimeError: .*size mismatch"),
    refused("resume-checkpoint-not-a-dict", "`--resume` over a checkpoint that holds no dict",
            lambda tmp: toy_resume_from(tmp, checkpoint_obj=[1, 2]), CliExit,
            E2 + r"corrupt checkpoint .*gd_noise0_run\.ckpt: expected a dict, got list"),
    refused("resume-checkpoint-without-fingerprint", "`--resume` over a checkpoint not made by this run",
            lambda tmp: toy_resume_from(tmp, checkpoint_obj={"format": CHECKPOINT_FORMAT, "iteration": 1, "total": 3,
                                                            "state": {"net": {}}, "rng": {}, "extra": {}}),
            CliExit, E2 + r"cannot resume from .*gd_noise0_run\.ckpt: it was saved without a fingerprint of its "
                          r"settings; use the same settings, or another output dir"),
    refused("resume-other-settings", "`--resume` into results made with other settings", toy_resume_other_settings,
            CliExit, E2 + r"cannot resume into .*out: its results were made with other settings \(lr: 1\.0 -> 0\.005\)"),
    refused("loop-checkpoint-other-state", "a loop checkpoint of other state (another run)",
            lambda tmp: Loop(2, state={"net": nn.Linear(2, 2)}, checkpoint=loop_checkpoint(tmp), resume=True),
            ValueError, r"checkpoint .*loop\.ckpt holds state \['model'\], but this run has \['net'\]"),
    refused("loop-checkpoint-other-settings", "a loop checkpoint made with other settings",
            lambda tmp: Loop(2, state={"model": nn.Linear(2, 2)}, fingerprint={"lr": 0.2}, resume=True,
                             checkpoint=loop_checkpoint(tmp, fingerprint={"lr": 0.1})), ValueError,
            r"cannot resume from .*loop\.ckpt: it was made with other settings \(lr: 0\.1 -> 0\.2\)"),
    refused("loop-negative-total", "a Loop of -1 iterations", lambda tmp: Loop(-1, state={}), ValueError,
            r"total must be a non-negative int, got -1"),
    refused("tracker-bad-every", "NormTracker with every=0", lambda tmp: NormTracker(TT((4, 5, 6), 2), every=0),
            ValueError, r"every must be a positive int, got 0"),
    refused("tracker-no-groups", "NormTracker on a model without tensorized layers",
            lambda tmp: NormTracker(nn.Linear(3, 3)), ValueError, r"Linear has no scale-invariant groups to track"),
    refused("sweep-duplicate-values", "a grid axis listing a value twice", lambda tmp: Sweep({"seed": [1, 2, 1]}),
            ValueError, r"the grid lists seed 1 twice"),
    refused("sweep-empty-axis", "a grid axis with no values", lambda tmp: Sweep({"seed": []}), ValueError,
            r"the grid's axis 'seed' has no values"),
    defined("diverging-run", "a learning rate so large that the loss overflows", diverging_run),
]

ERRORS = [c for c in CASES if c.error is not None]
RESULTS = [c for c in CASES if c.error is None]


@pytest.mark.parametrize("case", ERRORS, ids=[c.id for c in ERRORS])
def test_bad_input_is_refused_with_a_clear_message(case, tmp_path):
    with pytest.raises(case.error, match=case.match):
        case.run(tmp_path)


@pytest.mark.parametrize("case", RESULTS, ids=[c.id for c in RESULTS])
def test_bad_input_gives_a_defined_result(case, tmp_path):
    case.run(tmp_path)


def test_the_table_has_unique_ids_and_at_least_45_kinds():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) >= 45


def test_the_reliability_doc_lists_every_case():
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", DOC.read_text(), flags=re.MULTILINE)
    assert rows == [c.id for c in CASES]
