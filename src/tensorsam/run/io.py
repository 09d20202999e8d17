"""Files: every atomic write of the package (temporary file in the same folder, fsync,
``os.replace``), checkpoints loaded with ``weights_only=True``, and JSON conversion.  A crash
never leaves a half-written file."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def atomic_write(path, write, check=None) -> None:
    """Write through a temporary file in the same folder; ``check(tmp)`` may veto before ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON through a temporary file and ``os.replace``.

    Tensors, numpy values, dataclasses and paths are converted; non-finite floats are
    written as JSON ``NaN``/``Infinity``, which Python's ``json`` reads back.
    """
    data = json.dumps(to_jsonable(obj), indent=2).encode() + b"\n"
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8) through a temporary file and ``os.replace``."""
    data = text.encode()
    atomic_write(path, lambda fh: fh.write(data))


def atomic_torch_save(obj, path, *, verify: bool = False) -> None:
    """``torch.save`` through a temporary file and ``os.replace``.

    With ``verify=True`` the temporary file is first read back with ``weights_only=True``;
    if that fails, a ``ValueError`` is raised and the existing file is left untouched.
    """

    def check(tmp: Path) -> None:
        try:
            load_checkpoint(tmp)
        except ValueError as err:
            raise ValueError(
                f"not saving {path}: it could not be loaded back with weights_only=True; keep state to "
                f"tensors, numbers, strings, lists and dicts ({err})"
            ) from None

    atomic_write(path, lambda fh: torch.save(obj, fh), check if verify else None)


def load_checkpoint(path) -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)`` onto the CPU.

    A missing file raises ``FileNotFoundError``; an unreadable one a ``ValueError`` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling/zip errors come in many types
        raise ValueError(f"corrupt or unreadable checkpoint {path}: {type(err).__name__}: {err}") from None
    if not isinstance(obj, dict):
        raise ValueError(  # noqa: TRY004 - a bad file is bad input, not a caller's type error
            f"corrupt checkpoint {path}: expected a dict, got {type(obj).__name__}"
        )
    return obj




def atomic_save_figure(fig, path, **savefig_kwargs) -> Path:
    """``fig.savefig`` (format from the suffix, PNG without one) through :func:`atomic_write`."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, **savefig_kwargs))
    return path
