"""Image classification data: Fashion-MNIST, CIFAR-10 and scikit-learn's digits.

Every loader returns an :class:`ImageData` with uint8 images N x C x H x W (0..255) and int64
labels; :func:`load_images` adds a seeded, stratified validation split, an optional training
subset and symmetric label noise (:mod:`.noise`).  :class:`ChannelNorm` and :func:`augment` work
on batches already on the training device.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import math
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .noise import stratified_split, symmetric_label_noise

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclasses.dataclass
class ImageData:
    """Train / validation / test images (uint8 N x C x H x W) and int64 labels.

    ``train_y`` and ``val_y`` carry any label noise; ``train_y_clean`` and ``val_y_clean`` the
    true labels (the same tensors when there is no noise).  The validation split is empty
    (0 x C x H x W) until :func:`load_images` makes one.  ``info`` records how the splits were made.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    name: str
    source: str
    classes: tuple[str, ...] = ()
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    train_y_clean: torch.Tensor | None = None
    val_y_clean: torch.Tensor | None = None
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.val_x is None:
            self.val_x = self.train_x[:0]
            self.val_y = self.train_y[:0]
        if self.train_y_clean is None:
            self.train_y_clean = self.train_y
        if self.val_y_clean is None:
            self.val_y_clean = self.val_y

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def record(self) -> dict:
        """A JSON-ready description for a results file."""
        return {
            "name": self.name,
            "source": self.source,
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "n_train": len(self.train_y),
            "n_val": len(self.val_y),
            "n_test": len(self.test_y),
            **self.info,
        }


# ----------------------------------------------------------------------------- Fashion-MNIST (IDX)


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with ``ndim`` dimensions (magic 0x0800 + ndim), gzipped or not.

    A bad magic number, a truncated file or trailing bytes raise ``ValueError`` naming the file.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: corrupt or truncated gzip file ({err})") from None
    expected, header = 0x0800 + ndim, 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{path}: truncated IDX file ({len(raw)} bytes, shorter than its {header}-byte header)"
        )
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected:
        raise ValueError(
            f"{path}: bad magic number 0x{magic:08x}, expected 0x{expected:08x} "
            f"(IDX, unsigned bytes, {ndim}-d)"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    size = math.prod(dims)
    if len(raw) - header != size:
        what = "truncated" if len(raw) - header < size else "corrupt (trailing bytes)"
        raise ValueError(
            f"{path}: {what} IDX file: header says {dims} = {size} bytes of data, "
            f"file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, np.uint8, count=size, offset=header).reshape(dims).copy()


def _idx_file(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST not found: no {stem}[.gz] in {root}. Install Debian's package with "
        "`apt-get install dataset-fashion-mnist` (it puts the IDX files in "
        f"{FASHION_MNIST_DIR}), or pass data_dir= a folder holding the four IDX files"
    )


def _checked(images: np.ndarray, labels: np.ndarray, num_classes: int, images_path, labels_path):
    if len(labels) != len(images):
        raise ValueError(
            f"{labels_path} holds {len(labels)} labels but {images_path} holds {len(images)} images"
        )
    if labels.size and int(labels.max()) >= num_classes:
        raise ValueError(f"{labels_path}: label {int(labels.max())} outside 0..{num_classes - 1}")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(data_dir: str | Path | None = None) -> ImageData:
    """Fashion-MNIST (60 000 train / 10 000 test, 1 x 28 x 28, 10 classes) from its four IDX files.

    ``data_dir`` defaults to :data:`FASHION_MNIST_DIR`; files may be gzipped (``*.gz``) or not.
    """
    root = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    split = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        images_path = _idx_file(root, f"{prefix}-images-idx3-ubyte")
        labels_path = _idx_file(root, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
        split[part] = _checked(images[:, None], labels, 10, images_path, labels_path)
    return ImageData(
        *split["train"],
        *split["test"],
        num_classes=10,
        name="fashion-mnist",
        source=f"IDX files in {root}",
        classes=FASHION_MNIST_CLASSES,
    )


# ----------------------------------------------------------------------------- CIFAR-10 (python pickles)


def _pickle_allowlist() -> dict:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Builds only builtin containers and numpy arrays: any other global is refused."""

    def find_class(self, module, name):
        obj = _pickle_allowlist().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only "
                "numpy arrays, lists, bytes and numbers"
            )
        return obj


def _read_cifar_batch(path: Path):
    try:
        with open(path, "rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="bytes").load()
    except Exception as err:  # noqa: BLE001 - a corrupt pickle fails in many types
        raise ValueError(
            f"{path}: not a readable CIFAR-10 python batch ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: not a CIFAR-10 batch (expected a dict with b'data' and b'labels')")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(
            f"{path}: b'data' must be a uint8 N x 3072 array, got "
            f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
        raise ValueError(f"{path}: b'labels' must be a list of class indices")
    return _checked(data.reshape(-1, 3, 32, 32), labels, 10, path, path)


def load_cifar10(data_dir: str | Path | None) -> ImageData:
    """CIFAR-10 (50 000 train / 10 000 test, 3 x 32 x 32, 10 classes) in its python-pickle format.

    ``data_dir`` is the extracted ``cifar-10-batches-py`` folder (``data_batch_1..5``,
    ``test_batch``) or its parent.  This package never downloads it.  The pickles are read with an
    unpickler that builds only numpy arrays and builtin containers, but pickle is not a safe format:
    load only files from a trusted source (the official archive).
    """
    if data_dir is None:
        raise FileNotFoundError(
            "CIFAR-10 needs data_dir: extract cifar-10-python.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html and pass its cifar-10-batches-py folder"
        )
    root = Path(data_dir)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found: {', '.join(missing)} missing in {root} "
            "(expected the extracted cifar-10-batches-py folder)"
        )
    batches = [_read_cifar_batch(root / n) for n in names]
    train_x, train_y = (torch.cat(t) for t in zip(*batches[:5]))
    return ImageData(
        train_x,
        train_y,
        *batches[5],
        num_classes=10,
        name="cifar10",
        source=f"python batches in {root}",
        classes=CIFAR10_CLASSES,
    )


# ----------------------------------------------------------------------------- digits (scikit-learn)


def load_digits(data_dir: None = None) -> ImageData:
    """scikit-learn's bundled digits (1797 images, 1 x 8 x 8, 10 classes): the built-in default.

    It has no official test split, so this one is fixed: 360 images, stratified, seed 0 (the
    same for every run).  Pixels 0..16 are scaled to 0..255 (``round(v * 255 / 16)``, lossless).
    """
    if data_dir is not None:
        raise ValueError("digits is bundled with scikit-learn and takes no data_dir")
    from sklearn import __version__
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = torch.from_numpy(np.rint(bunch.images * (255 / 16)).astype(np.uint8))[:, None]
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train, test = stratified_split(y, 360, seed=0)
    return ImageData(
        x[train],
        y[train],
        x[test],
        y[test],
        num_classes=10,
        name="digits",
        source=f"sklearn.datasets.load_digits (scikit-learn {__version__}); fixed stratified "
        "1437/360 train/test split, seed 0",
        classes=tuple("0123456789"),
    )


# ----------------------------------------------------------------------------- splits


def _with_splits(data: ImageData, val_size: int, train_subset: int | None, label_noise: float, seed: int):
    rest, val = stratified_split(data.train_y, val_size, seed, stream=1)
    if train_subset is not None:
        if not 0 < train_subset <= len(rest):
            raise ValueError(
                f"train_subset must be in [1, {len(rest)}] (training images left after "
                f"the {val_size}-image validation split), got {train_subset}"
            )
        rest = rest[stratified_split(data.train_y[rest], train_subset, seed, stream=2)[1]]
    info = {"seed": seed, "val_size": val_size, "train_subset": train_subset, "label_noise": label_noise}
    splits = {}
    for part, idx, noise_seed in (("train", rest, seed), ("val", val, seed + 1)):
        noisy = symmetric_label_noise(data.train_y[idx], label_noise, noise_seed, data.num_classes)
        splits[part] = (data.train_x[idx], noisy.noisy, noisy.clean)
        info[f"{part}_labels_flipped"] = noisy.n_flipped
        info[f"{part}_labels_sha256"] = noisy.sha256
    return dataclasses.replace(
        data,
        train_x=splits["train"][0],
        train_y=splits["train"][1],
        train_y_clean=splits["train"][2],
        val_x=splits["val"][0],
        val_y=splits["val"][1],
        val_y_clean=splits["val"][2],
        info={**data.info, **info},
    )


# name -> (loader, default validation size)
IMAGE_DATASETS = {
    "digits": (load_digits, 144),
    "fashion-mnist": (load_fashion_mnist, 6000),
    "cifar10": (load_cifar10, 5000),
}


def load_images(
    name: str = "digits",
    data_dir: str | Path | None = None,
    *,
    val_size: int | None = None,
    train_subset: int | None = None,
    label_noise: float = 0.0,
    seed: int = 0,
) -> ImageData:
    """Load an image data set of :data:`IMAGE_DATASETS` and make its splits; ``digits`` is the default.

    The validation split (``val_size``, default 6000 for Fashion-MNIST, 5000 for CIFAR-10, 144 for
    digits) is drawn from the training set, seeded and stratified; ``train_subset`` then keeps that
    many training images (seeded, stratified).  ``label_noise`` flips exactly ``round(p * n)``
    labels of the training split (seed ``seed``) and of the validation split (seed ``seed + 1``);
    the test split is untouched.
    """
    key = name.lower()
    if key not in IMAGE_DATASETS:
        raise ValueError(f"unknown image data set {name!r}; expected one of {sorted(IMAGE_DATASETS)}")
    loader, default_val = IMAGE_DATASETS[key]
    data = loader(data_dir)
    return _with_splits(data, default_val if val_size is None else val_size, train_subset, label_noise, seed)


# ----------------------------------------------------------------------------- batches on the device


@dataclasses.dataclass(frozen=True)
class ChannelNorm:
    """Per-channel normalisation with the training split's own mean and std (float32, on its device)."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, train_x: torch.Tensor, chunk: int = 2048) -> ChannelNorm:
        """Mean and population std per channel of ``train_x`` (N x C x H x W), in float64 chunks."""
        n, c = train_x.shape[:2]
        total = torch.zeros(c, dtype=torch.float64, device=train_x.device)
        squares = torch.zeros_like(total)
        for i in range(0, n, chunk):
            b = train_x[i : i + chunk].to(torch.float64)
            total += b.sum((0, 2, 3))
            squares += (b * b).sum((0, 2, 3))
        count = train_x.numel() // c
        mean = total / count
        std = (squares / count - mean * mean).clamp_min(0).sqrt()
        if not bool((std > 0).all()):
            raise ValueError(
                f"cannot normalise: a channel of the training images is constant (std {std.tolist()})"
            )
        return cls(mean.float(), std.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel, as float32."""
        return (x.float() - self.mean[:, None, None]) / self.std[:, None, None]

    def record(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}


def augment(x: torch.Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None):
    """Random crop after zero padding by ``padding`` pixels, and random horizontal flip, for a batch.

    Batched tensor ops on ``x``'s device (N x C x H x W, any dtype; apply before :class:`ChannelNorm`
    for torchvision's black padding).  Randomness comes from ``generator`` (a ``torch.Generator`` on
    ``x.device``) or, when it is None, from the global RNG of that device (``torch.manual_seed``).
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, _, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    oy, ox = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=generator, device=dev)
    rows = oy + torch.arange(h, device=dev)
    cols = ox + torch.arange(w, device=dev)
    if flip:
        flipped = torch.randint(0, 2, (n, 1), generator=generator, device=dev).bool()
        cols = torch.where(flipped, cols.flip(1), cols)
    out = padded[torch.arange(n, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
