import numpy as np
import pytest
import tensorly.datasets as tld
import torch
from hypothesis import given
from hypothesis import strategies as st

from tensorsam.data import DATASETS, load_tensor, make_masks, masks_from_record, zscore

# ----------------------------------------------------------------------------- named data sets


def test_covid19_is_the_papers_tensor_as_shipped():
    d = load_tensor("covid19")
    assert d.shape == (438, 6, 11) and d.values.dtype == torch.float64
    assert bool(d.observed.all())
    assert torch.equal(d.values, torch.as_tensor(tld.load_covid19_serology()["tensor"]))
    # shipped centred per (antigen, receptor) fibre but not scaled to unit variance
    assert d.values.mean(0).abs().max() < 1e-10
    assert 1.4 < float(d.values.std()) < 1.7
    assert d.dims == ("samples", "antigens", "receptors")


def test_il2_nans_become_unobserved_zeros():
    raw = torch.as_tensor(tld.load_IL2data()["tensor"])
    d = load_tensor("il2")
    assert d.shape == (13, 4, 12, 8)
    assert torch.equal(~d.observed, torch.isnan(raw)) and int((~d.observed).sum()) == 192
    assert not torch.isnan(d.values).any() and bool((d.values[~d.observed] == 0).all())
    assert torch.equal(d.values[d.observed], raw[d.observed])


def test_kinetic_uses_the_shipped_missing_mask():
    bunch = tld.load_kinetic()
    d = load_tensor("kinetic")
    assert d.shape == (64, 12, 10, 60)
    assert torch.equal(d.observed, ~torch.as_tensor(bunch["missing_values_position"]))
    assert d.record()["n_missing"] == int(bunch["missing_values_position"].sum()) > 0


def test_indian_pines_and_unknown_names():
    assert load_tensor("Indian_Pines").shape == (145, 145, 200)
    with pytest.raises(ValueError, match=r"unknown data set 'covid'.*covid19.*il2.*\.npy"):
        load_tensor("covid")
    assert set(DATASETS) == {"covid19", "il2", "kinetic", "indian_pines"}


def test_standardize_over_observed_entries():
    d = load_tensor("il2", standardize=True)
    x = d.values[d.observed]
    assert abs(float(x.mean())) < 1e-12 and abs(float(x.std(unbiased=False)) - 1) < 1e-12
    assert bool((d.values[~d.observed] == 0).all())
    assert set(d.info["standardized"]) == {"mean", "std"}
    with pytest.raises(ValueError, match="std 0"):
        zscore(torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.bool))


# ----------------------------------------------------------------------------- .npy files


def test_npy_round_trip_and_observed_mask(tmp_path):
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.save(tmp_path / "t.npy", arr)
    d = load_tensor(tmp_path / "t.npy")
    assert d.values.dtype == torch.float64 and torch.equal(
        d.values, torch.as_tensor(arr, dtype=torch.float64)
    )
    assert bool(d.observed.all()) and d.name == "t"

    arr[0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", arr)
    with pytest.raises(ValueError, match=r"nan\.npy contains 1 NaN entries and no mask"):
        load_tensor(str(tmp_path / "nan.npy"))
    d = load_tensor(tmp_path / "nan.npy", allow_missing=True)
    assert int((~d.observed).sum()) == 1 and float(d.values[0, 0, 0]) == 0.0

    mask = np.ones(arr.shape, dtype=bool)
    mask[0, 0, 0] = False
    mask[1, 2, 3] = False
    np.save(tmp_path / "mask.npy", mask)
    d = load_tensor(tmp_path / "nan.npy", observed=tmp_path / "mask.npy")
    assert int((~d.observed).sum()) == 2
    with pytest.raises(ValueError, match="NaN at 1 entries the mask marks observed"):
        load_tensor(tmp_path / "nan.npy", observed=np.ones(arr.shape, dtype=bool))
    with pytest.raises(ValueError, match="observed mask must be a bool array"):
        load_tensor(tmp_path / "t.npy", observed=np.ones((2, 3), dtype=bool))


def test_an_existing_file_without_the_npy_suffix_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("plain", "wb") as fh:
        np.save(fh, np.ones((2, 2)))
    assert load_tensor("plain").shape == (2, 2)


def test_bad_npy_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npy"):
        load_tensor(tmp_path / "absent.npy")
    (tmp_path / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="corrupt.npy is not a readable .npy"):
        load_tensor(tmp_path / "corrupt.npy")
    good = tmp_path / "good.npy"
    np.save(good, np.ones((50, 50)))
    (tmp_path / "cut.npy").write_bytes(good.read_bytes()[:500])
    with pytest.raises(ValueError, match="cut.npy"):
        load_tensor(tmp_path / "cut.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="obj.npy"):
        load_tensor(tmp_path / "obj.npy")
    np.save(tmp_path / "str.npy", np.array(["a", "b"]))
    with pytest.raises(ValueError, match="real numeric array"):
        load_tensor(tmp_path / "str.npy")
    np.save(tmp_path / "inf.npy", np.array([1.0, np.inf]))
    with pytest.raises(ValueError, match="infinite"):
        load_tensor(tmp_path / "inf.npy")


# ----------------------------------------------------------------------------- masks


shapes = st.lists(st.integers(1, 7), min_size=1, max_size=4).map(tuple)


@given(shape=shapes, seed=st.integers(0, 2**31 - 1), tf=st.floats(0.05, 0.95))
def test_train_mask_is_the_authors_protocol(shape, seed, tf):
    torch.manual_seed(seed)
    authors = torch.rand(shape) < tf
    if not authors.any():
        with pytest.raises(ValueError, match="no training entries"):
            make_masks(shape, seed, tf)
        return
    state = torch.get_rng_state()
    m = make_masks(shape, seed, tf)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is left alone
    assert torch.equal(m.train, authors) and torch.equal(m.heldout, ~authors) and not m.val.any()


@given(seed=st.integers(0, 10_000), vf=st.floats(0.1, 0.9))
def test_validation_is_carved_out_of_training(seed, vf):
    observed = torch.rand((9, 8, 7), generator=torch.Generator().manual_seed(seed)) > 0.1
    plain = make_masks((9, 8, 7), seed, 0.4, observed=observed)
    m = make_masks((9, 8, 7), seed, 0.4, vf, observed=observed)
    assert torch.equal(m.heldout, plain.heldout)
    assert torch.equal(m.train | m.val, plain.train) and not (m.train & m.val).any()
    assert torch.equal(m.train | m.val | m.heldout, observed)
    again = masks_from_record(m.record(), observed=observed)
    assert all(
        torch.equal(a, b)
        for a, b in zip((m.train, m.val, m.heldout), (again.train, again.val, again.heldout))
    )


def test_mask_record_on_the_papers_split():
    rec = make_masks((438, 6, 11), 42).record()
    assert rec["seed"] == 42 and rec["train_fraction"] == 0.3 and rec["val_fraction"] == 0.0
    assert rec["n_train"] + rec["n_heldout"] == 438 * 6 * 11
    assert 0.29 < rec["n_train"] / (438 * 6 * 11) < 0.31
    assert "torch.manual_seed(seed)" in rec["protocol"]


@pytest.mark.parametrize("tf", [0, 1, -0.1, 1.5, "x", float("nan")])
def test_bad_train_fraction(tf):
    with pytest.raises(ValueError, match="train_fraction"):
        make_masks((4, 4), 0, tf)


def test_bad_mask_arguments():
    with pytest.raises(ValueError, match="val_fraction"):
        make_masks((4, 4), 0, 0.5, 1.0)
    with pytest.raises(ValueError, match="seed must be an int"):
        make_masks((4, 4), 1.5)
    with pytest.raises(ValueError, match="shape"):
        make_masks((4, 0), 0)
    with pytest.raises(ValueError, match="observed must be a bool tensor"):
        make_masks((4, 4), 0, observed=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="lacks key 'seed'"):
        masks_from_record({"shape": [2, 2], "train_fraction": 0.5})
