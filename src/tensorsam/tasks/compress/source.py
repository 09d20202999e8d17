"""The dense network that ``tensorsam compress`` starts from: ``DIR/models/<run>.pt`` of ``tensorsam
vision --format none`` (architecture and data set from its config and cell), or a plain
``state_dict`` file with the architecture and data set named in the config.  A file whose
weights do not fit the architecture is refused with the keys and shapes that differ."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from tensorsam.run.io import load_checkpoint

VISION_KEYS = {"config", "cell", "final", "best"}   # what `tensorsam vision` saves per cell


@dataclasses.dataclass
class Source:
    """The weights to compress, the architecture and data set they belong to, and a record of where
    they came from (path, kind, sha256 of the file, the vision run's cell)."""

    state: dict
    depth: int
    dataset: str
    data_dir: str
    record: dict


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_source(cfg) -> Source:
    """Read ``cfg.model``: a vision checkpoint or a plain state_dict (see the module docstring)."""
    path = Path(cfg.model)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path} (expected DIR/models/<run>.pt of "
                                "`tensorsam vision`, or a state_dict file)")
    obj = load_checkpoint(path)
    record = {"path": str(path), "sha256": file_sha256(path)}
    if VISION_KEYS <= set(obj):
        return _from_vision(cfg, obj, record)
    if not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{path} is neither a `tensorsam vision` model (keys {sorted(VISION_KEYS)}) nor a "
                         "state_dict (parameter names -> tensors)")
    if not cfg.arch or not cfg.dataset:
        raise ValueError(f"{path} is a plain state_dict: name its architecture and data set "
                         "(--arch resnet20|resnet32 --data digits|fashion-mnist|cifar10)")
    return Source(obj, int(cfg.arch.removeprefix("resnet")), cfg.dataset, cfg.data_dir,
                  {**record, "kind": "state_dict", "arch": cfg.arch, "dataset": cfg.dataset})


def _from_vision(cfg, obj: dict, record: dict) -> Source:
    vcfg, cell = obj["config"], obj["cell"]
    path = record["path"]
    if cell.get("format") != "none":
        raise ValueError(f"{path} is a `tensorsam vision` model in format {cell.get('format')!r}; compress "
                         "starts from a dense one (`tensorsam vision --format none`)")
    arch = f"resnet{vcfg['depth']}"
    for name, mine, theirs in (("--arch", cfg.arch, arch), ("--data", cfg.dataset, vcfg["dataset"])):
        if mine and mine != theirs:
            raise ValueError(f"{path} holds a {arch} trained on {vcfg['dataset']}, but {name} says {mine!r}")
    state = obj[cfg.weights]
    if state is None:
        raise ValueError(f"{path} has no best-on-validation weights (trained without a validation split); "
                         "use --weights final")
    record.update(kind="vision", weights=cfg.weights, arch=arch, dataset=vcfg["dataset"], cell=dict(cell))
    return Source(state, int(vcfg["depth"]), vcfg["dataset"], cfg.data_dir or vcfg.get("data_dir", ""), record)


def _listed(names, limit: int = 6) -> str:
    names = list(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_dense(model: torch.nn.Module, state: dict, what: str) -> None:
    """Load ``state`` into ``model`` exactly; a mismatch is a ValueError naming the missing and
    unexpected keys and the shapes that differ (``what`` names the architecture)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = [f"{label}: {_listed(items)}" for label, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shapes file vs model", shapes)) if items]
    if problems:
        raise ValueError(f"the weights are not those of {what}; " + "; ".join(problems))
    model.load_state_dict(state)
