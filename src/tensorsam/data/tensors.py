"""Real data tensors: tensorly's bundled data sets and user ``.npy`` files.

What tensorly 0.10's loaders return (checked on this machine):

- ``covid19`` (``load_covid19_serology``): 438 samples x 6 antigens x 11 receptors, float64,
  no missing entries.  The shipped array is already pre-processed: every (antigen, receptor)
  fibre over the samples has mean 0, but it is *not* scaled to unit variance (overall std
  about 1.56, per-fibre std 0.5 to 2.4).  tensorly's loader applies no transform itself.  The
  paper and the authors' code use this array as shipped, so ``standardize`` defaults to False.
- ``il2`` (``load_IL2data``): 13 ligands x 4 times x 12 doses x 8 cells, float64, with 192 NaNs
  (ligands 3 and 4 at the last time point): genuinely missing measurements.
- ``kinetic`` (``load_kinetic``): 64 x 12 x 10 x 60, float64, with a boolean
  ``missing_values_position`` (True = missing; those entries hold 0 in the array).
- ``indian_pines`` (``load_indian_pines``): 145 x 145 x 200 hyperspectral image, float64
  (integer-valued radiances), no missing entries.

Entries that do not exist in the source are ``observed == False`` and hold 0 in ``values``,
so masked arithmetic never meets a NaN.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import numpy as np
import torch

# name -> (tensorly loader, description)
DATASETS: dict[str, tuple[str, str]] = {
    "covid19": (
        "load_covid19_serology",
        "COVID-19 systems serology, 438 samples x 6 antigens x 11 receptors",
    ),
    "il2": ("load_IL2data", "IL-2 mutein signalling, 13 ligands x 4 times x 12 doses x 8 cell types"),
    "kinetic": (
        "load_kinetic",
        "catecholamine kinetic fluorescence, 64 x 12 emission x 10 excitation x 60 times",
    ),
    "indian_pines": ("load_indian_pines", "Indian Pines AVIRIS hyperspectral image, 145 x 145 x 200 bands"),
}


@dataclasses.dataclass
class TensorData:
    """A data tensor and which of its entries exist.

    ``values`` is float64; ``observed`` is a bool tensor of the same shape, False where the
    source has no measurement (those entries hold 0).  ``info`` records where the data came
    from and any transform applied (see :meth:`record`).
    """

    values: torch.Tensor
    observed: torch.Tensor
    name: str
    description: str = ""
    dims: tuple[str, ...] = ()
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def record(self) -> dict:
        """A JSON-ready description of the data for a results file."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "n_observed": int(self.observed.sum()),
            "n_missing": int((~self.observed).sum()),
            **self.info,
        }


def zscore(values: torch.Tensor, observed: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """z-score ``values`` with the mean and (population) std of the observed entries.

    Returns the new values (unobserved entries stay 0), the mean and the std.
    """
    x = values[observed]
    if x.numel() == 0:
        raise ValueError("cannot standardize a tensor with no observed entries")
    mean = x.mean()
    std = x.std(unbiased=False)
    if not bool(std > 0):
        raise ValueError("cannot standardize a tensor whose observed entries are all equal (std 0)")
    out = torch.where(observed, (values - mean) / std, torch.zeros_like(values))
    return out, float(mean), float(std)


def _from_tensorly(name: str) -> TensorData:
    import tensorly.datasets as tld

    loader, description = DATASETS[name]
    bunch = getattr(tld, loader)()
    values = torch.as_tensor(np.asarray(bunch["tensor"], dtype=np.float64))
    if name == "kinetic":
        observed = ~torch.as_tensor(np.asarray(bunch["missing_values_position"], dtype=bool))
    else:
        observed = ~torch.isnan(values)
    dims = tuple(str(d) for d in bunch.get("dims", ()))
    return TensorData(
        values=torch.where(observed, values, torch.zeros_like(values)),
        observed=observed,
        name=name,
        description=description,
        dims=dims,
        info={"source": f"tensorly.datasets.{loader}"},
    )


def _load_npy(path: Path, name: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{name} not found: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{name} {path} is not a readable .npy file: {err}") from None
    if isinstance(arr, np.lib.npyio.NpzFile):
        arr.close()
        raise ValueError(f"{name} {path} is an .npz archive; save one array with numpy.save")  # noqa: TRY004
    return arr


def _from_npy(path: Path, allow_missing: bool, observed=None) -> TensorData:
    arr = _load_npy(path, "data file")
    if arr.dtype.kind not in "biuf" or arr.ndim == 0 or arr.size == 0:
        raise ValueError(
            f"data file {path} must hold a non-empty real numeric array, got dtype {arr.dtype} shape {arr.shape}"
        )
    values = torch.as_tensor(arr.astype(np.float64))
    nan = torch.isnan(values)
    if torch.isinf(values).any():
        raise ValueError(f"data file {path} contains infinite values")
    if observed is not None:
        obs = (
            observed
            if isinstance(observed, (np.ndarray, torch.Tensor))
            else _load_npy(Path(observed), "mask file")
        )
        obs = torch.as_tensor(np.asarray(obs))
        if obs.dtype != torch.bool or tuple(obs.shape) != tuple(values.shape):
            raise ValueError(
                f"observed mask must be a bool array of shape {tuple(values.shape)}, "
                f"got {obs.dtype} {tuple(obs.shape)}"
            )
        if (nan & obs).any():
            raise ValueError(
                f"data file {path} has NaN at {int((nan & obs).sum())} entries the mask marks observed"
            )
    elif nan.any():
        if not allow_missing:
            raise ValueError(
                f"data file {path} contains {int(nan.sum())} NaN entries and no mask was given; "
                "pass allow_missing=True to treat NaNs as missing entries, or give an observed mask"
            )
        obs = ~nan
    else:
        obs = torch.ones_like(nan)
    return TensorData(
        values=torch.where(obs, values, torch.zeros_like(values)),
        observed=obs,
        name=path.stem,
        description=f"user tensor from {path}",
        info={"source": str(path)},
    )


def _is_path(name_or_path) -> bool:
    if isinstance(name_or_path, Path):
        return True
    s = str(name_or_path)
    if s.lower() in DATASETS:
        return False
    return s.lower().endswith(".npy") or "/" in s or "\\" in s or Path(s).exists()


def load_tensor(
    name_or_path, *, standardize: bool = False, allow_missing: bool = False, observed=None
) -> TensorData:
    """Load a named tensorly data set (:data:`DATASETS`) or a user ``.npy`` file.

    For a file, NaNs are refused unless ``allow_missing=True`` (NaNs become unobserved) or an
    ``observed`` mask (bool array, or path to a bool ``.npy``; True = observed) covers them.
    ``standardize=True`` z-scores with the mean and std of the observed entries and records
    both in ``info``.  A missing file raises ``FileNotFoundError``, a corrupt one or an unknown
    name ``ValueError``.
    """
    if _is_path(name_or_path):
        data = _from_npy(Path(name_or_path), allow_missing, observed)
    else:
        key = str(name_or_path).lower()
        if key not in DATASETS:
            raise ValueError(
                f"unknown data set {name_or_path!r}; expected one of {sorted(DATASETS)} or a path to a .npy file"
            )
        if observed is not None:
            raise ValueError(
                f"an observed mask only applies to .npy files, not to the named data set {key!r}"
            )
        data = _from_tensorly(key)
    if standardize:
        data.values, mean, std = zscore(data.values, data.observed)
        data.info["standardized"] = {"mean": mean, "std": std}
    return data
