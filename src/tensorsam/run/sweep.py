"""Sweeps: a grid of runs (cells, e.g. method x seed), each resumable on its own, that grows.

``Sweep({"seed": [42, 87], "method": ["adam", "sam"]}, out_dir, resume=True).run(fn, write=...)``
calls ``fn(cell) -> (record, payload)`` for every cell in grid order (the first axis outermost)
and returns a :class:`SweepResult`.  Each finished cell is kept at once under
``out_dir/.work/<tag>.pt``; a cell's own checkpoints go next to it (:meth:`Sweep.checkpoint`).
At the end the payloads of every cell are written to ``out_dir/<payload_file>`` (a dict tag ->
payload), ``write(result)`` writes the results file, and ``.work`` is removed.  Under
``torch.distributed`` every rank runs every cell (each its shard of the data) and rank 0 alone
writes; the ranks meet at a barrier before :meth:`Sweep.run` returns.

With ``resume=True`` a cell is not run again when it is finished, either in ``.work`` (an
interrupted sweep) or in the output dir itself (``results.json`` holds a run whose record has the
cell's coordinates and the payload file holds its payload): a rerun with more values on an axis
runs only the new cells.  Finished runs of an earlier grid that the new one lacks (in the results
file, or in ``.work`` from an interrupted grid) are carried into the results file after the grid's
own, with their payloads and where they were made (:attr:`SweepResult.carried_runs`,
:meth:`SweepResult.all_runs`, ``carried_from``): nothing already written is lost.  Without
``resume`` the grid's cells run afresh and replace their old runs; an output dir holding runs
outside the grid is then refused, since they were made under settings that may differ.  One
invocation at a time writes an output dir (:func:`tensorsam.run.io.claim_directory`); under
``torch.distributed`` every rank gets rank 0's refusal.  ``same`` (the config fields a cell depends on
besides its coordinates, e.g. :func:`tensorsam.run.config.result_fields` with ``grid=False``)
must equal those of the earlier results file, else resuming is refused: a grid never mixes runs
made with different settings.  A cell's fingerprint (:meth:`Sweep.fingerprint`: ``same`` plus its
coordinates) is kept with its finished record in ``.work`` and should be passed to the
:class:`~tensorsam.run.Loop` of its checkpoints, so an interrupted cell is never resumed under
other settings either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tensorsam.run.io import (
    atomic_torch_save,
    atomic_write_json,
    claim_directory,
    load_checkpoint,
    remove_stale_temporaries,
    to_jsonable,
)
from tensorsam.run.loop import fingerprint_changes

WORK = ".work"
SETTINGS = "settings.json"   # in .work: the ``same`` settings of the interrupted grid


@dataclasses.dataclass
class Cell:
    """One point of the grid: ``coords`` (axis -> value, as the run record names them) and ``tag``,
    the file-name-safe name of its files (``adam_seed42``)."""

    coords: dict[str, Any]
    tag: str

    def __getitem__(self, axis: str) -> Any:
        return self.coords[axis]

    def matches(self, record: Mapping) -> bool:
        """Whether ``record`` (a run record) is this cell's run."""
        return all(axis in record and record[axis] == v for axis, v in self.coords.items())


@dataclasses.dataclass
class SweepResult:
    """The runs of every cell in grid order, their payloads by tag, and where each came from."""

    runs: list[dict]
    payloads: dict[str, Any]
    kept: list[str]  # tags of cells finished by an earlier invocation
    ran: list[str]  # tags of cells run now
    carried_runs: list[dict] = dataclasses.field(default_factory=list)  # finished runs outside this grid
    carried_from: list[dict] = dataclasses.field(default_factory=list)  # where they were made (config, provenance)

    @property
    def carried(self) -> int:
        return len(self.carried_runs)

    def all_runs(self) -> list[dict]:
        """What the results file holds: this grid's runs, then the carried ones."""
        return [*self.runs, *self.carried_runs]

    def record(self) -> dict:
        """What a results file keeps of it: ``{"kept": [tags], "ran": [tags], "carried": n, "carried_from": [...]}``."""
        out = {"kept": list(self.kept), "ran": list(self.ran), "carried": self.carried}
        return {**out, "carried_from": self.carried_from} if self.carried else out

    def summary(self) -> str:
        """``4 cells: kept 3 finished earlier, ran 1`` (and the earlier runs carried over, if any)."""
        text = f"{len(self.runs)} cells: kept {len(self.kept)} finished earlier, ran {len(self.ran)}"
        return text + (f"; {self.carried} earlier run(s) outside this grid carried over" if self.carried else "")


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def _writes() -> bool:
    """Whether this process writes the sweep's files: always, except on ranks other than 0 of
    ``torch.distributed`` (every rank runs every cell; rank 0 keeps them)."""
    return not _distributed() or torch.distributed.get_rank() == 0


def default_tag(coords: Mapping[str, Any]) -> str:
    """``method=adam, seed=42`` -> ``method-adam_seed-42``."""
    return "_".join(f"{axis}-{value}" for axis, value in coords.items())


class Sweep:
    """A grid of cells over ``axes`` (axis -> values, the first axis outermost); see the module
    docstring.  Without ``out_dir`` nothing is kept and every cell runs."""

    def __init__(self, axes: Mapping[str, Sequence], out_dir=None, *, resume: bool = False,
                 tag: Callable[[dict], str] = default_tag, payload_file: str | None = None,
                 results_file: str = "results.json", same: Mapping[str, Any] | None = None):
        if not axes:
            raise ValueError("a sweep needs at least one axis")
        for axis, values in axes.items():
            values = list(values)
            if not values:
                raise ValueError(f"the grid's axis {axis!r} has no values")
            twice = sorted({repr(v) for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"the grid lists {axis} {', '.join(twice)} twice")
        self.axes = {axis: list(values) for axis, values in axes.items()}
        self.cells = [Cell(dict(zip(self.axes, combo)), "")
                      for combo in itertools.product(*self.axes.values())]
        for cell in self.cells:
            cell.tag = tag(cell.coords)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.resume = resume
        self._held = False      # inside claimed()
        self.payload_file = payload_file
        self.results_file = results_file
        self.same = None if same is None else to_jsonable(dict(same))

    @property
    def work(self) -> Path | None:
        """The folder of finished cells and checkpoints (``out_dir/.work``), None without out_dir."""
        return None if self.out_dir is None else self.out_dir / WORK

    def checkpoint(self, cell: Cell, suffix: str) -> Path | None:
        """The path of one of ``cell``'s checkpoints, ``.work/<tag>_<suffix>.ckpt`` (None without out_dir)."""
        return None if self.work is None else self.work / f"{cell.tag}_{suffix}.ckpt"

    def _check_work_settings(self) -> None:
        """Refuse to resume an interrupted grid (its ``.work``) under other settings, even where no cell
        checkpoint would be found (a changed rank renames a cell's checkpoints)."""
        file = self.work / SETTINGS
        if not (self.resume and self.same is not None and file.is_file()):
            return
        old = json.loads(file.read_text())
        if old != self.same:
            raise ValueError(f"cannot resume into {self.out_dir}: its interrupted runs (in {self.work}) were made "
                             f"with other settings ({fingerprint_changes(old, self.same)}); use the same settings, "
                             "or another output dir (or no --resume) to start afresh")

    def fingerprint(self, cell: Cell, **more) -> dict:
        """What ``cell``'s results depend on: ``same``, its coordinates and ``more`` (e.g. the rank
        of one of its candidate runs); see :class:`tensorsam.run.Loop`'s ``fingerprint``."""
        return to_jsonable({**(self.same or {}), **cell.coords, **more})

    def _done_file(self, cell: Cell) -> Path | None:
        return None if self.work is None else self.work / f"{cell.tag}.pt"

    def _results(self, *, check_settings: bool) -> dict | None:
        """The output dir's results file (None if there is none), checked to be one; with
        ``check_settings`` results made with other ``same`` settings are refused."""
        path = None if self.out_dir is None else self.out_dir / self.results_file
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot resume into {self.out_dir}: {path} is not valid JSON ({err})") from None
        if not isinstance(data, dict) or not isinstance(data.get("runs", []), list) \
                or not all(isinstance(r, dict) for r in data.get("runs", [])):
            raise ValueError(f"cannot resume into {self.out_dir}: {path} is not a tensorsam results file "
                             "(expected an object whose 'runs' is a list of objects)")
        if check_settings and self.same is not None:
            old = data.get("config") or {}
            differ = sorted(k for k, v in self.same.items() if k in old and old[k] != v)
            if differ:
                changes = ", ".join(f"{k}: {old[k]!r} -> {self.same[k]!r}" for k in differ)
                raise ValueError(f"cannot resume into {self.out_dir}: its results were made with other "
                                 f"settings ({changes}); use the same settings or another output dir")
        return data

    def _payloads(self) -> dict:
        file = None if self.payload_file is None else self.out_dir / self.payload_file
        return load_checkpoint(file) if file is not None and file.is_file() else {}

    def _outside(self, runs: list[dict]) -> list[dict]:
        return [r for r in runs if not any(cell.matches(r) for cell in self.cells)]

    def earlier(self) -> tuple[dict[str, tuple[dict, Any]], list[dict]]:
        """Finished cells recorded in the output dir ({tag: (record, payload)}), and its runs that
        are no cell of this grid.  Refuses results made with other settings."""
        data = self._results(check_settings=True)
        if data is None:
            return {}, []
        payloads = self._payloads()
        runs = list(data.get("runs") or [])
        found = {}
        for cell in self.cells:
            record = next((r for r in runs if cell.matches(r)), None)
            if record is not None and (self.payload_file is None or cell.tag in payloads):
                found[cell.tag] = (record, payloads.get(cell.tag))
        return found, self._outside(runs)

    def _outside_work(self) -> dict[str, tuple[dict, Any]]:
        """Finished cells of an interrupted earlier grid (``.work/<tag>.pt``) that are no cells of this
        one: {tag: (record, payload)}."""
        if self.work is None or not self.work.is_dir():
            return {}
        tags = {cell.tag for cell in self.cells}
        found = {}
        for file in sorted(self.work.glob("*.pt")):
            if file.stem not in tags:
                saved = load_checkpoint(file)
                found[file.stem] = (json.loads(saved["record"]), saved["payload"])
        return found

    def _refuse_loss(self) -> None:
        """Without resume: refuse an output dir holding finished runs outside this grid (in the
        results file, or in ``.work`` from an interrupted grid)."""
        data = self._results(check_settings=False)
        outside = len(self._outside(list(data.get("runs") or []))) if data else 0
        outside += sum(1 for f in self.work.glob("*.pt") if f.stem not in {c.tag for c in self.cells}) \
            if self.work is not None and self.work.is_dir() else 0
        if outside:
            raise ValueError(f"{self.out_dir} holds {outside} finished run(s) outside this grid; starting afresh "
                             "would lose them: resume (--resume) to add this grid to them, or use another output dir")

    def _carry(self, result: SweepResult) -> dict:
        """Put the output dir's finished runs outside this grid (results file and ``.work``) into
        ``result``, with where they were made; returns their payloads by tag."""
        data = self._results(check_settings=True) or {}
        outside = self._outside(list(data.get("runs") or []))
        tags = {cell.tag for cell in self.cells}
        payloads = {t: p for t, p in self._payloads().items() if t not in tags}
        if outside:
            result.carried_from = [{"config": data.get("config"), "provenance": data.get("provenance")},
                                   *(data.get("sweep") or {}).get("carried_from", [])]
        work = {t: rp for t, rp in self._outside_work().items() if rp[0] not in outside}
        if work:
            result.carried_from.append({"interrupted grid in this dir, same settings": sorted(work)})
        result.carried_runs = [*outside, *(record for record, _ in work.values())]
        return {**payloads, **{t: p for t, (_, p) in work.items()}}

    def run(self, fn: Callable[[Cell], tuple[dict, Any]],
            write: Callable[[SweepResult], Any] | None = None, *, progress: bool = False) -> SweepResult:
        """Run every cell not finished yet with ``fn(cell) -> (record, payload)``; then (with an
        output dir) write the payload file, call ``write(result)`` (the results file) and remove
        ``.work``.  ``progress`` prints a line per cell to stderr (``[3/12] sam_seed2``)."""
        with self.claimed():
            return self._run(fn, write, progress=progress, writes=self.out_dir is not None and _writes())

    @contextlib.contextmanager
    def claimed(self):
        """Hold the output dir (:func:`~tensorsam.run.io.claim_directory`) and, without resume,
        refuse one holding finished runs outside this grid: what :meth:`run` does first.  A task
        that writes into the dir before its cells run (compressed models) writes inside this, and
        calls :meth:`run` inside it too."""
        if self._held:
            yield self
            return
        with contextlib.ExitStack() as held:
            error = None
            if self.out_dir is not None and _writes():
                try:
                    held.enter_context(claim_directory(self.out_dir))
                    if not self.resume:
                        self._refuse_loss()
                except ValueError as err:
                    error = str(err)
            if self.out_dir is not None and _distributed():   # every rank refuses, not rank 0 alone
                box = [error]
                torch.distributed.broadcast_object_list(box, src=0)
                error = box[0]
            if error is not None:
                raise ValueError(error)
            self._held = True
            try:
                yield self
            finally:
                self._held = False

    def _run(self, fn, write, *, progress: bool, writes: bool) -> SweepResult:
        earlier, _ = self.earlier() if self.resume else ({}, [])
        if writes:
            remove_stale_temporaries(self.out_dir)     # left by a process killed mid-write
        if self.work is not None:
            self._check_work_settings()
            self.work.mkdir(parents=True, exist_ok=True)
            if _writes() and self.same is not None:
                atomic_write_json(self.work / SETTINGS, self.same)
        result = SweepResult([], {}, [], [])
        for i, cell in enumerate(self.cells):
            done = self._done_file(cell)
            if progress:
                print(f"[{i + 1}/{len(self.cells)}] {cell.tag}", file=sys.stderr, flush=True)
            if self.resume and done is not None and done.exists():
                saved = load_checkpoint(done)
                old = json.loads(saved.get("fingerprint") or "null")
                if old != self.fingerprint(cell):
                    changes = "no fingerprint" if old is None else fingerprint_changes(old, self.fingerprint(cell))
                    raise ValueError(f"cannot resume cell {cell.tag} from {done}: it was finished with other "
                                     f"settings ({changes}); use the same settings or another output dir")
                record, payload = json.loads(saved["record"]), saved["payload"]
            elif cell.tag in earlier:
                record, payload = earlier[cell.tag]
            else:
                record, payload = fn(cell)
                for axis, value in cell.coords.items():
                    record.setdefault(axis, value)
                if done is not None and _writes():
                    atomic_torch_save({"record": json.dumps(to_jsonable(record)), "payload": payload,
                                       "fingerprint": json.dumps(self.fingerprint(cell))}, done)
                result.ran.append(cell.tag)
            if cell.tag not in result.ran:
                result.kept.append(cell.tag)
            result.runs.append(record)
            result.payloads[cell.tag] = payload
        if writes:
            carried = self._carry(result) if self.resume else {}   # read now: nothing outside the grid is lost
            if self.payload_file is not None:
                atomic_torch_save({**carried, **result.payloads}, self.out_dir / self.payload_file)
            if write is not None:
                write(result)
            shutil.rmtree(self.work, ignore_errors=True)
        if _distributed():
            torch.distributed.barrier()       # the files are there when any rank returns
        return result
