import json

import torch

from tensorsam.cli import main
from tensorsam.data import make_masks
from tensorsam.tasks.completion import CompletionConfig, build_model, contraction_plan
from tensorsam.tasks.flatness import curve, filter_normalised, random_direction


def _setup():
    cfg = CompletionConfig(rank=[3, 2, 3])
    m = build_model(cfg, (6, 5, 4), [3, 2, 3], 0)
    cores = [c.detach().double() for c in m.cores]
    values = torch.randn(6, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return cores, contraction_plan(m), values, make_masks((6, 5, 4), 42)


def test_direction_has_unit_global_norm_and_is_fixed_by_its_seed():
    shapes = [(3, 2, 3), (6, 3), (5, 2), (4, 3)]
    d = random_direction(shapes, 5, torch.float64)
    assert abs(float(torch.sqrt(sum(x.square().sum() for x in d))) - 1) < 1e-12
    assert all(torch.equal(a, b) for a, b in zip(d, random_direction(shapes, 5, torch.float64)))


def test_filter_normalised_curve_is_scale_invariant_and_raw_is_not():
    cores, plan, values, masks = _setup()
    c = [2.0, 0.5, 4.0, 0.25]  # product 1: the tensor is unchanged
    scaled = [x * k for x, k in zip(cores, c)]
    d = random_direction([x.shape for x in cores], 0, torch.float64)
    ts = torch.linspace(-1, 1, 5, dtype=torch.float64)
    a = curve(cores, filter_normalised(d, cores), ts, plan, values, masks)
    b = curve(scaled, filter_normalised(d, scaled), ts, plan, values, masks)
    torch.testing.assert_close(torch.tensor(a["loss"]), torch.tensor(b["loss"]))
    raw_a, raw_b = curve(cores, d, ts, plan, values, masks), curve(scaled, d, ts, plan, values, masks)
    assert raw_a["loss"][2] == raw_b["loss"][2] or abs(raw_a["loss"][2] / raw_b["loss"][2] - 1) < 1e-9
    assert abs(raw_a["loss"][0] - raw_b["loss"][0]) > 1e-6 * raw_a["loss"][0]


def test_cli_curves_from_a_completion_run(tmp_path):
    src = tmp_path / "c"
    assert main(["completion", "--methods", "hooi,adam,sam", "--seeds", "87", "--iterations", "60", "--out",
                 str(src), "--set", "compile=false", "--set", "hooi_iterations=5", "--no-progress"]) == 0
    out = tmp_path / "f"
    assert main(["flatness", "--from", str(src), "--methods", "hooi,adam,sam", "--seed", "87", "--out", str(out),
                 "--set", "points=11"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["direction"]) for r in res["runs"]] == [
        (m, k) for m in ("hooi", "adam", "sam") for k in ("raw", "filter")]
    solved = json.loads((src / "results.json").read_text())["runs"]
    for r in res["runs"]:
        assert len(r["trace"]["d"]) == 11 and r["trace"]["d"][5] == 0.0
        # at d = 0 the curve is the solution itself
        ho = next(s["heldout_r2"] for s in solved if s["method"] == r["method"])
        assert abs(r["heldout_r2_at_0"] - ho) < 1e-3 * max(1.0, abs(ho))
    assert (out / "fig2_flatness.png").stat().st_size > 1000
    assert main(["flatness", "--from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "g")]) == 2
