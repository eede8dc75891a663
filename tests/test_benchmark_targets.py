"""``benchmarks/certified_accuracy.py``'s verdict on issue 17's targets: gmfast's default
route against the best smoothing model at each target radius, counted in images (a tie is
met, one image short is not), on smoothing's images and, from ``<stem>_all.tsv`` files, on
the whole held-out split; the clean-accuracy and evaluation-ratio targets; malformed
whole-split files refused."""

import pytest
import torch
from helpers import benchmark_module

from gmfast.tsv import write_certification_tsv


def _bench():
    return benchmark_module("certified_accuracy")


def _results(bench, yte, sub, gm_all, gm_sub, smoothing):
    methods = {"gmfast (auto)": dict(accuracy=gm_all, accuracy_subset=gm_sub, evaluations=1)}
    for name, (stem, acc) in smoothing.items():
        methods[name] = dict(accuracy_subset=acc, evaluations=100_100, stem=stem)
    return dict(methods=methods, smoothing_subset=dict(size=len(sub)))


def test_targets_compare_in_images_with_the_best_model_per_radius(tmp_path):
    bench = _bench()
    yte = torch.arange(10).repeat_interleave(10)  # 100 held-out images
    sub = torch.arange(0, 100, 5)  # smoothing's 20
    # smoothing's subset: model a certifies 15 of 20 at 0.5, model b 12 of 20 at 1.0 and 1.58
    a = [0.9, 0.75, 0.2, 0.0, 0.0]
    b = [0.8, 0.7, 0.6, 0.6, 0.0]
    gm_sub = [0.95, 0.75, 0.6, 0.55, 0.1]  # tie at 0.5 and 1.0, one image short at 1.58
    res = _results(bench, yte, sub, [0.9] * 5, gm_sub,
                   {"smoothing σ=0.25": ("s25", a), "smoothing σ=0.5": ("s50", b)})
    v = bench.targets("mnist", res, yte, tmp_path)
    rows = {r["radius"]: r for r in v["subset"]["radii"]}
    assert [r["radius"] for r in v["subset"]["radii"]] == [0.5, 1.0, 1.58]
    assert rows[0.5]["model"] == "smoothing σ=0.25" and rows[0.5]["met"] and rows[0.5]["images_ahead"] == 0
    assert rows[1.0]["model"] == "smoothing σ=0.5" and rows[1.0]["met"] and rows[1.0]["images_ahead"] == 0
    assert rows[1.58]["model"] == "smoothing σ=0.5" and not rows[1.58]["met"] and rows[1.58]["images_ahead"] == -1
    assert "all" not in v and v["evaluations"]["ratio"] == 100_100 and v["evaluations"]["met"]
    assert not v["met"] and "clean" not in v
    lines = bench.targets_lines("mnist", v)
    assert "target r=1.58 on smoothing's images (20): gmfast 55.0 vs best smoothing 60.0 (smoothing σ=0.5): " \
           "NOT met (-1 images)" in lines
    assert lines[-1] == "all targets NOT met"
    # gmfast one image above at 1.58: every target met
    res["methods"]["gmfast (auto)"]["accuracy_subset"] = [0.95, 0.75, 0.6, 0.65, 0.1]
    assert bench.targets("mnist", res, yte, tmp_path)["met"]

    # the whole split, from the model that was extended to it: 80 of 100 certified at 0.6
    pred = yte.clone()
    pred[:20] = (pred[:20] + 1) % 10  # 20 wrong
    radius = torch.full((100,), 0.6)
    write_certification_tsv(tmp_path / "s25_all.tsv", (pred, radius), yte, idx=torch.arange(100))
    full = bench.smoothing_all("mnist", res, yte, tmp_path)
    assert list(full) == ["smoothing σ=0.25"]
    assert full["smoothing σ=0.25"] == [pytest.approx(x) for x in [0.8, 0.8, 0.0, 0.0, 0.0]]
    res["methods"]["gmfast (auto)"]["accuracy"] = [0.9, 0.79, 0.5, 0.3, 0.1]  # one image short at 0.5
    v = bench.targets("mnist", res, yte, tmp_path)
    assert v["all"]["images"] == 100 and v["all"]["models"] == ["smoothing σ=0.25"]
    whole = {r["radius"]: r for r in v["all"]["radii"]}
    assert whole[0.5]["images_ahead"] == -1 and not whole[0.5]["met"]
    assert whole[1.0]["met"] and whole[1.58]["met"]  # that model certifies nothing there
    assert not v["met"]  # the subset's targets are met, the whole split's are not

    # a whole-split file that misses an image, or has another label, is refused
    write_certification_tsv(tmp_path / "s25_all.tsv", (pred[1:], radius[1:]), yte[1:], idx=torch.arange(1, 100))
    with pytest.raises(ValueError, match="expected every one of the 100 held-out images once"):
        bench.targets("mnist", res, yte, tmp_path)
    wrong = yte.clone()
    wrong[3] = (wrong[3] + 1) % 10
    write_certification_tsv(tmp_path / "s25_all.tsv", (pred, radius), wrong, idx=torch.arange(100))
    with pytest.raises(ValueError, match="with its label"):
        bench.targets("mnist", res, yte, tmp_path)


def test_targets_clean_accuracy_and_missing_methods(tmp_path):
    bench = _bench()
    yte = torch.arange(10).repeat_interleave(3)
    sub = torch.arange(30)
    acc = [0.96, 0.9, 0.7, 0.3, 0.0]
    res = _results(bench, yte, sub, acc, acc, {"smoothing σ=0.25": ("d25", [0.96, 0.9, 0.7, 0.3, 0.0])})
    v = bench.targets("digits", res, yte, tmp_path)
    assert v["clean"] == dict(accuracy=0.96, target=0.95, met=True) and v["met"]
    assert "all" not in v  # smoothing ran on the whole split already: nothing to extend
    res["methods"]["gmfast (auto)"]["accuracy"] = [0.94, 0.9, 0.7, 0.3, 0.0]
    v = bench.targets("digits", res, yte, tmp_path)
    assert not v["clean"]["met"] and not v["met"]
    assert "target clean accuracy ≥ 95%: 94.0% NOT met" in bench.targets_lines("digits", v)
    del res["methods"]["gmfast (auto)"]
    assert bench.targets("digits", res, yte, tmp_path) is None


def test_recipe_overrides_reach_the_benchmark_run(tmp_path, monkeypatch):
    """``--recipe-overrides``: a candidate recipe's fields reach ``run_data`` (which builds the
    recipe with them, smoothing bases included); anything but a JSON object is refused."""
    bench = _bench()
    seen = {}

    class Stop(Exception):
        pass

    def fake_run_data(data, out, quick, log, **kw):
        seen[data] = kw["overrides"]
        raise Stop

    monkeypatch.setattr(bench, "run_data", fake_run_data)
    monkeypatch.setattr(bench.torch, "set_num_threads", lambda n: None)  # main sets the process's threads
    monkeypatch.setitem(bench.DEVICE, "device", bench.DEVICE["device"])  # and its device: restored after
    with pytest.raises(Stop):
        bench.main(["--data", "mnist", "--out", str(tmp_path), "--threads", "1", "--device", "cpu",
                    "--recipe-overrides", '{"target": 0.9, "epochs": 7}'])
    assert seen == {"mnist": {"target": 0.9, "epochs": 7}}
    with pytest.raises(Stop):
        bench.main(["--data", "digits", "--out", str(tmp_path), "--threads", "1", "--device", "cpu"])
    assert seen["digits"] is None
    with pytest.raises(ValueError, match="--recipe-overrides: expected a JSON object of recipe fields"):
        bench.main(["--data", "mnist", "--out", str(tmp_path), "--recipe-overrides", "[1]"])
