"""The run loop shared by every task: configs, seeding, checkpoints, resume, progress, results.

A task writes its training loop as ``for it in Loop(total, state=..., checkpoint=..., resume=...)``.
The loop saves every object in ``state`` (anything with ``state_dict``/``load_state_dict``),
the torch/numpy/python RNG states, the iteration counter and a user dict ``loop.extra``
atomically every ``every`` iterations, at the end, and on SIGINT/SIGTERM.  Resuming from
such a checkpoint continues to a bit-identical result on the CPU, because the process
state that decides the next step (parameters, optimizer moments, RNG streams) is exactly
what was saved at an iteration boundary.

Everything written to disk goes through a temporary file in the same directory and
``os.replace``, so a crash never leaves a half-written checkpoint or results file.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FORMAT = "tensorsam-loop-1"
_IMPORT_TIME = time.time()


# --------------------------------------------------------------------------- configs


def _read_config_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    suffix = path.suffix.lower()
    import tomllib

    import yaml

    readers = {".yaml": yaml.safe_load, ".yml": yaml.safe_load, ".toml": tomllib.loads, ".json": json.loads}
    if suffix not in readers:
        raise ValueError(f"config file {path} must end in .yaml, .yml, .toml or .json")
    try:
        data = readers[suffix](text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot parse config file {path}: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(  # noqa: TRY004 - bad file content is a value error for the CLI
            f"config file {path} must hold a mapping of keys to values at its top level"
        )
    return data


def _parse_override(item: str) -> tuple[str, str]:
    key, sep, raw = str(item).partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--set expects key=value, got {item!r}")
    return key, raw.strip()


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise a ValueError naming ``key``."""
    bad = ValueError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or value in ("None", "none")):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError:
                continue
        raise bad
    if origin is typing.Literal:
        if value in args:
            return value
        raise ValueError(f"config key {key!r}: expected one of {list(args)}, got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):  # "42,87,100" from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
            value = [_yaml_scalar(v) for v in value]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ValueError(f"config key {key!r}: expected {len(args)} entries, got {value!r}")
            items = [_coerce(v, a, key) for v, a in zip(value, args)]
        else:
            elem = args[0] if args else Any
            items = [_coerce(v, elem, key) for v in value]
        return origin(items)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, (float, str)):
            try:
                as_float = float(value)  # 5e4: YAML 1.1 reads it as a string
            except ValueError:
                raise bad from None
            if as_float.is_integer():
                return int(as_float)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # "1e-3": YAML 1.1 reads it as a string
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if tp is Path or (isinstance(tp, type) and issubclass(tp, os.PathLike)):
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise bad
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise bad
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _yaml_scalar(raw: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def _build(cls, values: dict, prefix: str = ""):
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)} for {cls.__name__}; "
            f"valid keys: {', '.join(prefix + k for k in sorted(fields))}"
        )
    hints = _field_types(cls)
    kwargs = {name: _coerce(v, hints.get(name, Any), prefix + name) for name, v in values.items()}
    return cls(**kwargs)


def _field_types(cls) -> dict:
    """Resolved field annotations; an unresolvable one (a TYPE_CHECKING-only name) counts as Any."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {f.name: (Any if isinstance(f.type, str) else f.type) for f in dataclasses.fields(cls)}


def load_config(cls, path=None, overrides: Iterable[str] = ()):
    """Build the dataclass ``cls`` from its defaults, a config file, then ``key=value`` overrides.

    ``path`` is a ``.yaml``/``.yml``/``.toml``/``.json`` file holding a top-level mapping.
    Override values are parsed as YAML scalars (``1e-3``, ``[8,6,8]``, ``true``); a
    comma-separated string is accepted for list/tuple fields (``seeds=42,87,100``); a
    dotted key (``opt.lr=0.1``) reaches into a nested dataclass field.  Unknown keys raise
    a ``ValueError`` listing the valid ones; a value of the wrong type raises one naming the key.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config expects a dataclass type, got {cls!r}")
    values: dict = {}
    if path is not None:
        values.update(_read_config_file(Path(path)))
    hints = _field_types(cls)
    for item in overrides or ():
        key, raw = _parse_override(item)
        parsed = raw if hints.get(key.split(".")[0]) is str else _yaml_scalar(raw)
        target = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = target.get(p)
            if not isinstance(node, dict):
                node = {}
                target[p] = node
            target = node
        target[leaf] = parsed
    return _build(cls, values)


def add_config_arguments(parser) -> None:
    """Add ``--config FILE`` and repeatable ``--set key=value`` to an argparse parser."""
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML/TOML/JSON file of config values")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value (repeatable), e.g. --set lr=1e-3 --set rank=[8,6,8]",
    )


def config_from_args(cls, args, **explicit):
    """The config from ``args.config`` and ``args.overrides``; ``explicit`` (dedicated flags
    such as ``--iterations``, None = not given) are applied last, as if given with ``--set``."""
    config = getattr(args, "config", None)
    overrides = list(getattr(args, "overrides", None) or [])
    cfg = load_config(cls, config, overrides)
    given = {k: v for k, v in explicit.items() if v is not None}
    if not given:
        return cfg
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}
    unknown = sorted(set(given) - set(values))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(values))}"
        )
    hints = _field_types(cls)
    values.update({k: _coerce(v, hints.get(k, Any), k) for k, v in given.items()})
    return cls(**values)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def config_to_dict(cfg) -> dict:
    """A JSON-ready dict of a config dataclass (tuples become lists, paths strings)."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)) and not isinstance(cfg, Mapping):
        raise TypeError(f"config_to_dict expects a dataclass instance or mapping, got {type(cfg).__name__}")
    return _jsonable(cfg)


# --------------------------------------------------------------------------- seeding, provenance


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and CUDA)."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _git(*args: str) -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _utc(stamp: float) -> str:
    return _dt.datetime.fromtimestamp(stamp, _dt.UTC).isoformat(timespec="seconds")


def provenance(started: float | None = None) -> dict:
    """How a result was made: versions, git commit (None outside a checkout), host, argv, time, device.

    ``started`` is a ``time.time()`` stamp; without it, the time this module was imported.
    """
    import tensorly

    from . import __version__

    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name(0)}"
    else:
        device = f"cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    commit = _git("rev-parse", "HEAD") or None
    dirty = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "tensorsam": __version__,
        "torch": torch.__version__,
        "tensorly": tensorly.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": None if dirty is None else bool(dirty),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "argv": list(sys.argv),
        "started_utc": _utc(_IMPORT_TIME if started is None else started),
        "written_utc": _utc(time.time()),
        "device": device,
    }


# --------------------------------------------------------------------------- atomic files


def _atomic_write(path, write, check=None) -> None:
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
    data = json.dumps(_jsonable(obj), indent=2).encode() + b"\n"
    _atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8) through a temporary file and ``os.replace``."""
    data = text.encode()
    _atomic_write(path, lambda fh: fh.write(data))


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

    _atomic_write(path, lambda fh: torch.save(obj, fh), check if verify else None)


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


# --------------------------------------------------------------------------- RNG state


def _plain(obj: Any) -> Any:
    """numpy scalars and arrays in ``loop.extra`` become python numbers and tensors."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    return obj


def _rng_state() -> dict:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["mt"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- the loop


def _rate_column():
    """A progress-bar column showing iterations per second."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text("-- it/s" if not speed else f"{speed:,.0f} it/s", style="progress.data.speed")

    return RateColumn()


def _fmt_metric(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().cpu().item() if v.numel() == 1 else v.detach().cpu().tolist()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Loop:
    """Iterate ``start .. total-1`` with atomic checkpoints, resume, signals and a progress bar.

    ``state`` maps names to objects with ``state_dict()``/``load_state_dict()`` (modules,
    optimizers, schedulers, trackers).  With ``resume=True`` and an existing ``checkpoint``,
    their states, ``extra`` and the iteration counter are restored here and the RNG states
    when iteration starts, so the loop continues exactly where the saved run stopped.
    Without ``resume`` an existing checkpoint is overwritten by the new run.

    A checkpoint is saved after every ``every``-th iteration and after the last one.  On
    SIGINT/SIGTERM the loop finishes the current iteration, saves, restores the previous
    handlers and raises ``KeyboardInterrupt``; a second signal interrupts at once.
    """

    def __init__(
        self,
        total: int,
        *,
        state: dict,
        checkpoint=None,
        every: int = 1000,
        resume: bool = False,
        desc: str = "",
        progress: bool = True,
    ):
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ValueError(f"total must be a non-negative int, got {total!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        for name, obj in state.items():
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise ValueError(f"state entry {name!r} has no state_dict()/load_state_dict()")
        self.total = total
        self.state = dict(state)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.every = every
        self.desc = desc
        self.progress = progress
        self.extra: dict = {}
        self.metrics: dict = {}
        self.start = 0
        self.iteration = 0
        self.resumed = False
        self._rng: dict | None = None
        self._signal: int | None = None
        self._verified = False
        if resume and self.checkpoint is not None and self.checkpoint.exists():
            self._restore(load_checkpoint(self.checkpoint))
        self.iteration = self.start

    # ---- checkpoint content
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "iteration": self.iteration,
            "total": self.total,
            "state": {name: obj.state_dict() for name, obj in self.state.items()},
            "rng": _rng_state(),
            "extra": _plain(self.extra),
        }

    def _restore(self, ckpt: dict) -> None:
        where = self.checkpoint
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{where} is not a tensorsam loop checkpoint (format {ckpt.get('format')!r})")
        saved = set(ckpt["state"])
        if saved != set(self.state):
            raise ValueError(
                f"checkpoint {where} holds state {sorted(saved)}, but this run has {sorted(self.state)}"
            )
        if ckpt["iteration"] > self.total:
            raise ValueError(
                f"checkpoint {where} is at iteration {ckpt['iteration']}, beyond this run's total {self.total}"
            )
        for name, obj in self.state.items():
            obj.load_state_dict(ckpt["state"][name])
        self.extra = dict(ckpt.get("extra") or {})
        self._rng = ckpt["rng"]
        self.start = int(ckpt["iteration"])
        self.resumed = True

    def save(self) -> None:
        """Write a checkpoint of the current state now (no-op without a checkpoint path).

        The first save of a loop reads the file back with ``weights_only=True`` before it
        replaces anything, so state that could not be resumed from (an arbitrary Python object
        in a ``state_dict`` or in ``extra``) is reported at once, not at resume time.
        """
        if self.checkpoint is None:
            return
        atomic_torch_save(self.state_dict(), self.checkpoint, verify=not self._verified)
        self._verified = True

    # ---- metrics
    def log(self, **metrics) -> None:
        """Remember metrics to show in the progress bar; tensors are only read at refresh time."""
        self.metrics.update(metrics)

    # ---- signals
    def _handler(self, signum, frame):
        if self._signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self._signal = signum

    def _install(self) -> dict:
        if self.checkpoint is None or threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, self._handler)
        return old

    # ---- iteration
    def __iter__(self) -> Iterator[int]:
        if self._rng is not None:
            _set_rng_state(self._rng)
            self._rng = None
        old = self._install()
        bar = task = None
        try:
            if self.progress and self.start < self.total:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )

                bar = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    _rate_column(),
                    TimeElapsedColumn(),
                    TimeRemainingColumn(),
                    TextColumn("{task.fields[metrics]}"),
                    console=Console(stderr=True),
                    auto_refresh=False,
                    transient=False,
                )
                bar.start()
                task = bar.add_task(self.desc, total=self.total, completed=self.start, metrics="")
            next_refresh = 0.0
            for i in range(self.start, self.total):
                yield i
                self.iteration = i + 1
                if bar is not None:
                    now = time.perf_counter()
                    if now >= next_refresh or self.iteration == self.total:
                        text = " ".join(f"{k}={_fmt_metric(v)}" for k, v in self.metrics.items())
                        bar.update(task, completed=self.iteration, metrics=text)
                        bar.refresh()
                        next_refresh = now + 0.2
                if self._signal is not None:
                    self.save()
                    raise KeyboardInterrupt(
                        f"stopped by signal {signal.Signals(self._signal).name} after iteration "
                        f"{self.iteration}; checkpoint saved to {self.checkpoint}"
                    )
                if self.iteration % self.every == 0 or self.iteration == self.total:
                    self.save()
            if self.start == self.total and self.checkpoint is not None and not self.resumed:
                self.save()  # a zero-length run still leaves a checkpoint
        finally:
            if bar is not None:
                bar.stop()
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self._signal = None


# --------------------------------------------------------------------------- results


_RESERVED = ("task", "config", "runs", "provenance", "wall_seconds")


def write_results(
    path, *, task: str, config, runs: list[dict], extra: dict | None = None, started: float
) -> dict:
    """Atomically write a results JSON and return the dict written.

    Layout: ``{"task", "config", "runs", "provenance", "wall_seconds", **extra}``.
    ``started`` is the ``time.time()`` stamp taken when the task began.
    """
    if not isinstance(runs, list) or not all(isinstance(r, Mapping) for r in runs):
        raise ValueError("runs must be a list of dicts (one record per run)")
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra keys {clash} clash with the results file's own keys {list(_RESERVED)}")
    wall = time.time() - float(started)
    out = {
        "task": str(task),
        "config": config_to_dict(config),
        "runs": _jsonable(runs),
        "provenance": provenance(started),
        "wall_seconds": wall if math.isfinite(wall) else None,
        **_jsonable(extra),
    }
    atomic_write_json(path, out)
    return out
