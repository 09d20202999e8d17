"""Image data: Fashion-MNIST IDX and CIFAR-10 pickle loaders on small files written here, digits,
seeded stratified splits, symmetric label noise, and the on-device normalisation and augmentation."""

import gzip
import pickle
import struct
import time

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tensorsam.data import (
    IMAGE_DATASETS,
    ChannelNorm,
    augment,
    labels_sha256,
    load_cifar10,
    load_digits,
    load_fashion_mnist,
    load_images,
    read_idx,
    stratified_split,
    symmetric_label_noise,
)
from tensorsam.data.images import FASHION_MNIST_DIR

# ----------------------------------------------------------------------------- Fashion-MNIST (IDX)


def write_idx(path, arr, magic=None, cut=0, gz=False):
    """``arr`` (uint8) as an IDX file; ``magic`` overrides the header, ``cut`` drops trailing bytes."""
    arr = np.asarray(arr, dtype=np.uint8)
    magic = 0x0800 + arr.ndim if magic is None else magic
    raw = struct.pack(f">I{arr.ndim}I", magic, *arr.shape) + arr.tobytes()
    raw = raw[: len(raw) - cut]
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def fake_fmnist(root, n_train=200, n_test=40, gz=True, seed=0):
    """Four IDX files in Fashion-MNIST's names; balanced labels (n/10 a class)."""
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, gz=gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz=gz)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files_gzipped_or_not(tmp_path, gz):
    arrays = fake_fmnist(tmp_path, gz=gz)
    d = load_fashion_mnist(tmp_path)
    assert d.train_x.shape == (200, 1, 28, 28) and d.train_x.dtype == torch.uint8
    assert d.test_x.shape == (40, 1, 28, 28) and d.train_y.dtype == torch.int64
    assert np.array_equal(d.train_x[:, 0].numpy(), arrays["train"][0])
    assert np.array_equal(d.test_y.numpy(), arrays["t10k"][1])
    assert d.num_classes == 10 and d.name == "fashion-mnist" and len(d.classes) == 10
    assert d.val_x.shape == (0, 1, 28, 28) and d.train_y_clean is d.train_y


def test_missing_fashion_mnist_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")


def test_bad_magic_number_names_the_file(tmp_path):
    fake_fmnist(tmp_path, gz=False)
    bad = write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(200), magic=0x0803)
    with pytest.raises(ValueError, match=rf"{bad}: bad magic number 0x00000803, expected 0x00000801"):
        load_fashion_mnist(tmp_path)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_file_names_the_file(tmp_path, gz):
    arrays = fake_fmnist(tmp_path, gz=gz)
    name = "t10k-images-idx3-ubyte" + (".gz" if gz else "")
    bad = write_idx(tmp_path / name, arrays["t10k"][0], cut=100, gz=gz)
    with pytest.raises(ValueError, match=rf"{bad}: truncated IDX file"):
        load_fashion_mnist(tmp_path)
    bad.write_bytes(gzip.compress(b"\x00" * 500)[:-9] if gz else b"\x00\x00")  # cut gzip / header
    with pytest.raises(ValueError, match=rf"{bad}: (corrupt or truncated gzip|truncated IDX)"):
        load_fashion_mnist(tmp_path)


def test_label_and_image_counts_must_agree(tmp_path):
    fake_fmnist(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(199))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte holds 199 labels but .*train-images"):
        load_fashion_mnist(tmp_path)


def test_label_out_of_range_and_trailing_bytes(tmp_path):
    path = write_idx(tmp_path / "l", np.array([1, 2, 3]))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match="trailing bytes"):
        read_idx(path, 1)
    fake_fmnist(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(40, 10))
    with pytest.raises(ValueError, match="label 10 outside 0..9"):
        load_fashion_mnist(tmp_path)


def test_real_fashion_mnist():
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not in {FASHION_MNIST_DIR}: `apt-get install dataset-fashion-mnist`")
    start = time.perf_counter()
    d = load_images("fashion-mnist", label_noise=0.2, seed=3)
    seconds = time.perf_counter() - start
    assert seconds < 30, seconds
    raw = load_fashion_mnist()
    assert raw.train_x.shape == (60000, 1, 28, 28) and raw.test_x.shape == (10000, 1, 28, 28)
    assert raw.num_classes == 10 and raw.train_y.bincount().tolist() == [6000] * 10
    assert d.train_x.shape[0] == 54000 and d.val_x.shape[0] == 6000
    assert d.val_y_clean.bincount().tolist() == [600] * 10
    assert torch.equal(d.test_x, raw.test_x) and torch.equal(d.test_y, raw.test_y)
    assert d.info["train_labels_flipped"] == 10800 and d.info["val_labels_flipped"] == 1200
    # Fashion-MNIST's well-known statistics (0.2860, 0.3530 on a 0..1 scale), here on 54k images
    norm = ChannelNorm.fit(d.train_x)
    assert abs(norm.mean.item() / 255 - 0.286) < 2e-3 and abs(norm.std.item() / 255 - 0.353) < 2e-3


# ----------------------------------------------------------------------------- CIFAR-10 (python pickles)


def write_cifar(root, n=30, seed=0):
    """The true format: pickled dicts with bytes keys, b'data' uint8 N x 3072, b'labels' a list."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.permutation(np.arange(n) % 10)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [b"img%d.png" % i for i in range(n)]}  # fmt: skip
        with open(root / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
        batches[name] = (data, labels)
    return batches


def test_cifar10_reads_the_python_batches(tmp_path):
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    d = load_cifar10(tmp_path)  # the parent folder works too
    assert d.train_x.shape == (150, 3, 32, 32) and d.test_x.shape == (30, 3, 32, 32)
    assert d.train_x.dtype == torch.uint8 and d.num_classes == 10 and d.classes[0] == "airplane"
    data, labels = batches["data_batch_2"]
    row = data[4]  # sample 4 of batch 2: red plane = first 1024 bytes, row-major
    assert np.array_equal(d.train_x[34, 0].numpy(), row[:1024].reshape(32, 32))
    assert np.array_equal(d.train_x[34, 2].numpy(), row[2048:].reshape(32, 32))
    assert d.train_y[30:60].tolist() == labels and d.test_y.tolist() == batches["test_batch"][1]
    assert torch.equal(load_cifar10(tmp_path / "cifar-10-batches-py").train_x, d.train_x)
    s = load_images("cifar10", tmp_path, val_size=50, train_subset=60)
    assert (len(s.train_y), len(s.val_y), len(s.test_y)) == (60, 50, 30)
    assert IMAGE_DATASETS["cifar10"][1] == 5000


def test_cifar10_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_cifar10(None)
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3 missing"):
        load_cifar10(tmp_path)
    write_cifar(tmp_path)
    bad = tmp_path / "test_batch"
    bad.write_bytes(bad.read_bytes()[:5000])
    with pytest.raises(ValueError, match=rf"{bad}: not a readable CIFAR-10 python batch"):
        load_cifar10(tmp_path)
    with open(bad, "wb") as fh:
        pickle.dump({b"data": np.zeros((3, 3072), np.float32), b"labels": [0, 1, 2]}, fh, protocol=2)
    with pytest.raises(ValueError, match=rf"{bad}: b'data' must be a uint8 N x 3072"):
        load_cifar10(tmp_path)
    with open(bad, "wb") as fh:
        pickle.dump({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}, fh, protocol=4)
    with pytest.raises(ValueError, match=rf"{bad} holds 2 labels but {bad} holds 3 images"):
        load_cifar10(tmp_path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_cifar10_refuses_pickles_that_build_other_objects(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "written-by-pickle"
    with open(tmp_path / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": _Payload(marker), b"labels": []}, fh, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_1: .*refusing to load io.open"):
        load_cifar10(tmp_path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- digits and splits


def test_digits_is_the_default_with_a_fixed_test_split():
    sk = pytest.importorskip("sklearn.datasets")
    d = load_images()
    assert d.name == "digits" and d.image_shape == (1, 8, 8) and d.num_classes == 10
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (1293, 144, 360)
    other = load_images(seed=5)
    assert torch.equal(other.test_x, d.test_x) and torch.equal(other.test_y, d.test_y)
    assert not torch.equal(other.val_y, d.val_y)
    raw = load_digits()
    bunch = sk.load_digits()
    assert len(raw.train_y) == 1437 and raw.train_x.dtype == torch.uint8 and raw.train_x.max() == 255
    assert raw.test_y.bincount().min() >= 35  # stratified: about 36 a class
    pixels = torch.cat([raw.train_x, raw.test_x]).flatten(1).double() * 16 / 255
    assert sorted(map(tuple, pixels.round().tolist())) == sorted(map(tuple, bunch.data.tolist()))


def test_load_images_splits_subsets_and_keeps_test_untouched(tmp_path):
    fake_fmnist(tmp_path, n_train=400, n_test=40)
    raw = load_fashion_mnist(tmp_path)
    d = load_images("fashion-mnist", tmp_path, val_size=40, train_subset=100, seed=1)
    assert d.val_y.bincount().tolist() == [4] * 10 and d.train_y.bincount().tolist() == [10] * 10
    assert torch.equal(d.test_x, raw.test_x) and torch.equal(d.test_y, raw.test_y)
    rows = {bytes(x.numpy()) for x in raw.train_x}
    train_rows = {bytes(x.numpy()) for x in d.train_x}
    val_rows = {bytes(x.numpy()) for x in d.val_x}
    assert train_rows <= rows and val_rows <= rows and not train_rows & val_rows
    again = load_images("fashion-mnist", tmp_path, val_size=40, train_subset=100, seed=1)
    assert torch.equal(again.train_x, d.train_x) and torch.equal(again.val_x, d.val_x)
    assert not torch.equal(load_images("fashion-mnist", tmp_path, val_size=40, seed=2).val_x, d.val_x)
    record = d.record()
    assert record["n_train"] == 100 and record["val_size"] == 40 and record["train_subset"] == 100
    with pytest.raises(ValueError, match=r"train_subset must be in \[1, 360\]"):
        load_images("fashion-mnist", tmp_path, val_size=40, train_subset=361)
    with pytest.raises(ValueError, match="unknown image data set"):
        load_images("imagenet")
    assert IMAGE_DATASETS["fashion-mnist"][1] == 6000


def test_load_images_label_noise_flips_each_split_separately(tmp_path):
    fake_fmnist(tmp_path, n_train=400, n_test=40)
    d = load_images("fashion-mnist", tmp_path, val_size=100, label_noise=0.25, seed=7)
    assert int((d.train_y != d.train_y_clean).sum()) == 75 and int((d.val_y != d.val_y_clean).sum()) == 25
    assert d.info["train_labels_sha256"] == labels_sha256(d.train_y)
    assert d.info["val_labels_sha256"] == labels_sha256(d.val_y)
    assert torch.equal(d.test_y, load_fashion_mnist(tmp_path).test_y)
    assert d.val_y_clean.bincount().tolist() == [10] * 10  # stratified on the clean labels


@given(
    counts=st.lists(st.integers(1, 30), min_size=1, max_size=6),
    frac=st.floats(0, 1),
    seed=st.integers(0, 2**31),
)
def test_stratified_split_is_exact_proportional_and_seeded(counts, frac, seed):
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    n = len(labels)
    size = round(frac * n)
    rest, taken = stratified_split(labels, size, seed)
    assert len(taken) == size and len(rest) == n - size
    assert torch.equal(torch.sort(torch.cat([rest, taken])).values, torch.arange(n))
    got = labels[taken].bincount(minlength=len(counts)).numpy()
    assert np.all(np.abs(got - np.array(counts) * size / n) < 1)
    assert torch.equal(stratified_split(labels, size, seed)[1], taken)


# ----------------------------------------------------------------------------- label noise

labels_strategy = st.integers(2, 10).flatmap(
    lambda k: st.tuples(st.just(k), st.lists(st.integers(0, k - 1), min_size=0, max_size=300))
)


@given(kl=labels_strategy, p=st.floats(0, 1), seed=st.integers(0, 2**32 - 1))
def test_noise_flips_exactly_round_pn_labels_to_other_classes(kl, p, seed):
    k, labels = kl
    y = torch.tensor(labels, dtype=torch.int64)
    out = symmetric_label_noise(y, p, seed, k)
    assert out.n_flipped == round(p * len(y)) == int((out.noisy != y).sum())
    assert torch.equal(out.clean, y) and torch.equal(out.flipped, out.noisy != y)
    assert bool(((out.noisy >= 0) & (out.noisy < k)).all())
    again = symmetric_label_noise(y.int(), p, seed, k)
    assert torch.equal(again.noisy, out.noisy) and again.sha256 == out.sha256 == labels_sha256(out.noisy)


@given(kl=labels_strategy, seed=st.integers(0, 2**32 - 1))
def test_noise_p0_is_identity(kl, seed):
    k, labels = kl
    y = torch.tensor(labels, dtype=torch.int64)
    out = symmetric_label_noise(y, 0.0, seed, k)
    assert torch.equal(out.noisy, y) and out.n_flipped == 0 and out.sha256 == labels_sha256(y)


def test_noise_depends_on_the_seed_and_is_uniform_over_other_classes():
    y = torch.arange(90000) % 10
    a, b = symmetric_label_noise(y, 1.0, 0, 10), symmetric_label_noise(y, 0.5, 1, 10)
    assert not torch.equal(b.noisy, symmetric_label_noise(y, 0.5, 2, 10).noisy)
    assert b.sha256 != symmetric_label_noise(y, 0.5, 2, 10).sha256
    moves = torch.zeros(10, 10)
    moves.index_put_((y, a.noisy), torch.ones(len(y)), accumulate=True)
    assert torch.all(moves.diagonal() == 0)
    off = moves[~torch.eye(10, dtype=torch.bool)]  # 1000 expected each
    assert off.min() > 850 and off.max() < 1150
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        symmetric_label_noise(y, 1.5, 0, 10)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        symmetric_label_noise(y, 0.1, 0, 5)


def test_labels_hash_is_sha256_of_int64_bytes():
    import hashlib

    y = torch.tensor([3, 1, 2], dtype=torch.int32)
    assert labels_sha256(y) == hashlib.sha256(np.array([3, 1, 2], "<i8").tobytes()).hexdigest()


# ----------------------------------------------------------------------------- on-device batches


def test_channel_norm_uses_the_training_splits_own_statistics():
    x = torch.randint(0, 256, (50, 3, 6, 5), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x[:, 1] //= 4
    norm = ChannelNorm.fit(x, chunk=7)
    xf = x.double()
    assert torch.allclose(norm.mean.double(), xf.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(norm.std.double(), xf.transpose(0, 1).flatten(1).std(1, unbiased=False), atol=1e-4)
    z = norm(x)
    assert z.dtype == torch.float32 and z.shape == x.shape
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5)
    assert len(norm.record()["mean"]) == 3
    with pytest.raises(ValueError, match="constant"):
        ChannelNorm.fit(torch.zeros(4, 1, 2, 2))


def _images(n=64, c=3, h=10, w=9):
    return torch.randint(1, 256, (n, c, h, w), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_flip_only_is_a_horizontal_permutation():
    x = _images()
    out = augment(x, padding=0, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 10 < int(mirrored.sum()) < 54
    assert torch.equal(augment(x, padding=0, flip=False), x)


@pytest.mark.parametrize("padding", [2, 4])
def test_crop_is_a_zero_filled_shift(padding):
    x = _images(n=24)
    out = augment(x, padding=padding, flip=False, generator=torch.Generator().manual_seed(3))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    h, w = x.shape[-2:]
    offsets = set()
    for i in range(len(x)):
        found = [
            (dy, dx)
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + h, dx : dx + w])
        ]
        assert len(found) == 1  # pixels are >= 1, so the zero border pins the shift
        offsets.add(found[0])
    assert len(offsets) > 5


def test_augment_is_deterministic_under_a_seed():
    x = _images()
    a = augment(x, padding=4, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, augment(x, padding=4, generator=torch.Generator().manual_seed(11)))
    assert not torch.equal(a, augment(x, padding=4, generator=torch.Generator().manual_seed(12)))
    torch.manual_seed(5)
    b = augment(x.float(), padding=2)
    torch.manual_seed(5)
    assert torch.equal(b, augment(x.float(), padding=2))
    with pytest.raises(ValueError, match="padding"):
        augment(x, padding=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augment_and_norm_on_cuda():
    x = _images().cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    out = augment(x, padding=4, generator=g)
    assert out.device == x.device and out.shape == x.shape
    flipped = augment(x, padding=0, generator=torch.Generator(device="cuda").manual_seed(0))
    assert bool(((flipped == x).flatten(1).all(1) | (flipped == x.flip(-1)).flatten(1).all(1)).all())
    norm = ChannelNorm.fit(x)
    assert norm.mean.device == x.device
    assert torch.allclose(norm(x).mean((0, 2, 3)), torch.zeros(3, device="cuda"), atol=1e-5)
