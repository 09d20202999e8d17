"""Files: every atomic write of the package (temporary file in the same folder, fsync,
``os.replace``), checkpoints loaded with ``weights_only=True``, strict JSON conversion, and the
check that an output folder can be written before any work starts.  A crash never leaves a
half-written file, and a file written here gets the mode a plain ``open`` would give it (the
user's umask for a new file, the old mode for a replaced one), not ``mkstemp``'s 0600."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import pickle
import shutil
import socket
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


def to_jsonable(obj: Any) -> Any:
    """``obj`` as JSON-ready Python: dataclasses, mappings, sequences, tensors, numpy values and paths
    converted; a non-finite float (NaN, ±inf) becomes ``None`` (JSON ``null``), so the result is
    strict JSON.  Anything else becomes its ``repr``."""
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
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
        return to_jsonable(obj.item())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return repr(obj)


def current_umask() -> int:
    """The process's umask, read from ``/proc/self/status`` where Linux has it (no change to the
    process state), else by setting and restoring it."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """The mode ``open(path, "w")`` would leave: the old file's, or 0o666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def atomic_write(path, write, check=None) -> None:
    """Write through a temporary file in the same folder; ``check(tmp)`` may veto before ``os.replace``.
    The file gets the mode a plain ``open`` would give it (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _mode_for(path))
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


def remove_stale_temporaries(folder) -> list[Path]:
    """Remove the temporary files (and :func:`publish_directory` folders) that :func:`atomic_write`
    leaves when its process is killed between writing and ``os.replace`` (``.<name>.<random>.tmp``),
    anywhere under ``folder``; returns what was removed.  Call it when a run (re)starts in a folder
    no other process writes to."""
    removed = []
    for path in sorted(Path(folder).rglob(".*.tmp")) if Path(folder).is_dir() else []:
        if path.name.count(".") >= 3:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write_json(path, obj) -> None:
    """Write ``obj`` as indented, strict JSON through a temporary file and ``os.replace``.

    Tensors, numpy values, dataclasses and paths are converted (:func:`to_jsonable`); a non-finite
    float is written as ``null`` (never the non-standard ``NaN``/``Infinity``), so a results file
    must say elsewhere (a run's ``status``) why a value is missing.
    """
    data = json.dumps(to_jsonable(obj), indent=2, allow_nan=False).encode() + b"\n"
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
        # torch's own text advises weights_only=False, which is wrong for a corrupt file: say what it is
        detail = ("not a torch file of tensors and plain data (corrupt, truncated, or holding other objects)"
                  if isinstance(err, pickle.UnpicklingError) else str(err).strip().splitlines()[0])
        raise ValueError(f"corrupt or unreadable checkpoint {path}: {type(err).__name__}: {detail}") from None
    if not isinstance(obj, dict):
        raise ValueError(  # noqa: TRY004 - a bad file is bad input, not a caller's type error
            f"corrupt checkpoint {path}: expected a dict, got {type(obj).__name__}"
        )
    return obj


def check_writable_dir(path) -> Path:
    """Refuse, before any work, an output folder that cannot be written; returns it as a ``Path``.

    ``path`` may not exist yet (it is not created here): then its nearest existing ancestor must
    be a folder.  A path (or ancestor) that is a file, or a folder where no file can be created
    (probed with a temporary file, so read-only mounts and ACLs count too), raises a
    ``ValueError`` whose one line names ``path``.
    """
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe == path else f"lies under {probe}, which is a file"
        raise ValueError(f"output directory {path} {what}, not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".tensorsam-probe."):
            pass
    except OSError as err:
        where = "" if probe == path else f" (in {probe}, where it would be made)"
        raise ValueError(f"output directory {path} is not writable{where}: "
                         f"{err.strerror or type(err).__name__}") from None
    return path


LOCK = ".tensorsam.lock"


@contextlib.contextmanager
def claim_directory(folder):
    """Hold ``folder`` (created if missing) for one writer: an exclusive ``flock`` on its lock file
    ``.tensorsam.lock``, which names the holder and is removed on exit.  Another holder is refused
    with a ``ValueError``.  The kernel drops the lock when its process dies, however it dies, so a
    killed run never blocks the next one.  Two invocations writing one output dir at once would each
    rewrite its results file from their own view, and delete each other's temporaries."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ValueError(f"output directory {folder} is in use by {holder} (lock file {path}); wait for "
                             "it to finish or use another output dir") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)        # the holder removed the file between our open and flock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield folder
    finally:
        path.unlink(missing_ok=True)    # while still locked: a waiting opener then sees another inode
        os.close(fd)


def atomic_save_figure(fig, path, **savefig_kwargs) -> Path:
    """``fig.savefig`` (format from the suffix, PNG without one) through :func:`atomic_write`."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, **savefig_kwargs))
    return path


LATEST = "latest"


def publish_directory(parent, name: str, write, *, drop_previous: bool = True) -> Path:
    """Make ``parent/name`` a directory filled by another library (e.g. a
    ``torch.distributed.checkpoint``), atomically, and point ``parent/latest`` at it.

    ``write(tmp)`` fills a fresh temporary directory beside it; then its files are fsynced, it is
    renamed to ``name`` and the text file ``latest`` (written with :func:`atomic_write_text`) is
    made to name it; with ``drop_previous`` the directory ``latest`` named before is removed after.
    A process killed at any point leaves ``latest`` naming a complete directory (the previous one
    or the new one); :func:`latest_directory` reads it.  ``name`` must be new (e.g. numbered by
    step): the directory ``latest`` names is never replaced; a leftover ``name`` that ``latest``
    does not name (from a killed process) is removed first.  Returns ``parent/name``.

    Several processes filling one directory (each its own files, as DCP's ranks do) split this
    into :func:`begin_directory` (one process), their writes, and :func:`finish_directory` (the
    same process, after every writer is done).
    """
    tmp = begin_directory(parent, name)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish_directory(parent, name, tmp, drop_previous=drop_previous)


def begin_directory(parent, name: str) -> Path:
    """The fresh temporary directory (``parent/.<name>.<random>.tmp``) that
    :func:`finish_directory` publishes as ``parent/name``; refuses a name that is not new."""
    parent = Path(parent)
    if not name or "/" in name or name.startswith(".") or name == LATEST:
        raise ValueError(f"not a directory name to publish: {name!r}")
    previous = latest_directory(parent)
    if previous is not None and previous.name == name:
        raise ValueError(f"{parent / name} is the directory {parent / LATEST} names; publish under a new name")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def finish_directory(parent, name: str, tmp, *, drop_previous: bool = True) -> Path:
    """Fsync the files of the filled ``tmp`` (from :func:`begin_directory`), rename it to
    ``parent/name``, point ``parent/latest`` at it and, with ``drop_previous``, remove the
    directory ``latest`` named before.  On failure ``tmp`` is removed and ``latest`` unchanged."""
    parent, tmp = Path(parent), Path(tmp)
    final = parent / name
    try:
        previous = latest_directory(parent)
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as fh:
                    os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(parent / LATEST, name + "\n")
    if drop_previous and previous is not None and previous != final:
        shutil.rmtree(previous, ignore_errors=True)
    return final


def latest_directory(parent) -> Path | None:
    """The directory ``parent/latest`` names (see :func:`publish_directory`), or None without one."""
    pointer = Path(parent) / LATEST
    if not pointer.is_file():
        return None
    target = Path(parent) / pointer.read_text().strip()
    if not target.is_dir():
        raise ValueError(f"{pointer} names {target.name!r}, which is not a directory in {parent}")
    return target
