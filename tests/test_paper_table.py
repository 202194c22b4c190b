"""The paper-style quality report (evaluation.paper_table, evaluation.quality.write_results) and portable result paths,
on small synthetic results records (no benchmark is run)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from ftddm_trt.evaluation import paper_table
from ftddm_trt.evaluation.quality import paper_methods, write_results
from ftddm_trt.evaluation.report import PROJECT_ROOT, portable, portable_path, write_json


def _run(method, family, n, protocol, nfe, maps, batch, spm, psnr, rng):
    vals = np.asarray(psnr, float)
    return {"n": n, "s": 64 / n, "protocol": protocol, "method": method, "family": family, "nfe": nfe, "maps": maps,
            "batch": batch, "seconds_per_map": spm,
            "per_map": {"psnr": vals.tolist(), "ssim": (0.5 + 0.01 * vals).tolist(), "nrmse": (1.0 / vals).tolist(),
                        "sharpness": (0.04 * vals).tolist()},
            "all": {"psnr": float(np.mean(vals))}}


@pytest.fixture()
def results(tmp_path):
    rng = np.random.default_rng(0)
    runs = []
    for n in (16, 8):
        for protocol in ("hr", "lr"):
            base = 20 + rng.normal(0, 1, 12)
            runs += [
                _run("zero-filled", "zero-filled", n, protocol, 0, 12, None, 0.0, base - 3, rng),
                _run("DDPM T=1000", "DDPM", n, protocol, 1000, 6, 6, 2.0, base[:6] + 1, rng),
                _run("DDPM respaced 100", "DDPM respaced", n, protocol, 100, 12, 12, 0.2, base, rng),
                _run("DPM-Solver++ 20", "DPM-Solver++", n, protocol, 20, 12, 6, 0.05, base - 0.5, rng),
                _run(
                    "TDPM Ttrunc=100", "TDPM", n, protocol, 101, 12, 6, 0.21, base + 0.5 + rng.normal(0, 0.1, 12), rng
                ),
                _run("FTDDM Ttrunc=100", "FTDDM", n, protocol, 101, 12, 6, 0.2, base + 2 + rng.normal(0, 0.1, 12), rng),
                _run("FTDDM Ttrunc=50", "FTDDM", n, protocol, 51, 12, 6, 0.1, base + 1.5, rng),
            ]
    runs[4]["per_map"]["psnr"][3] = None  # an invalid map (NaN in the record) is skipped, not counted
    return {
        "test_subjects": ["sub-020", "sub-021"],
        "n_maps": 12,
        "ddpm_maps": 6,
        "batch_size": 6,
        "backend": {"backend": "onnxruntime", "path": str(tmp_path / "onnx")},
        "runs": runs,
        "model": {
            "dir": str(PROJECT_ROOT / "ftddm_trt" / "assets" / "model"),
            "manifest": {
                "networks": {
                    "unet": {"step": 1000, "best_val": 0.2, "train_config": {"batch_size": 8, "t_trunc": 100}},
                    "unet_full": {"step": 1000, "best_val": 0.05, "train_config": {"batch_size": 8, "t_trunc": 100}},
                }
            },
        },
        "tau_d_sweep": {
            "method": "FTDDM Ttrunc=100",
            "description": "synthetic",
            "columns": ["tau_d", "psnr", "ssim", "sharpness"],
            "rows": [
                {"tau_d": t, "psnr": 25 - 2 * t, "ssim": 0.9 - 0.1 * t, "sharpness": 0.6 + 0.4 * t}
                for t in (0.0, 0.5, 0.9, 1.2)
            ],
        },
        "s_sweep": {
            "method": "FTDDM + DPM-Solver++ 20",
            "description": "synthetic",
            "columns": ["true_s", "given_s", "psnr", "ssim"],
            "rows": [
                {"true_s": 4.0, "given_s": g, "psnr": 25 - abs(math.log2(g / 4)), "ssim": 0.9} for g in (2.0, 4.0, 8.0)
            ],
        },
    }


def test_mean_std_and_wilcoxon_against_numpy_and_scipy():
    m, sd, k = paper_table.mean_std([1.0, 2.0, None, 4.0, float("nan")])
    assert k == 3 and m == pytest.approx(7 / 3) and sd == pytest.approx(np.std([1, 2, 4], ddof=1))
    a = np.arange(10.0)
    b = a + np.linspace(0.1, 1.0, 10)
    assert paper_table.wilcoxon_p(a, b) == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert paper_table.wilcoxon_p(a, b) < 0.01  # every pair shifted the same way: significant
    assert paper_table.wilcoxon_p(a, a) == 1.0
    assert math.isnan(paper_table.wilcoxon_p([1.0], [2.0]))
    # pairs with a missing value on either side are dropped, the rest stay paired
    assert paper_table.wilcoxon_p([*a, None], [*b, 5.0]) == pytest.approx(stats.wilcoxon(a, b).pvalue)


def test_speedups_only_at_equal_batch(results):
    sp = paper_table.speedups(results)
    assert sp["FTDDM Ttrunc=100"]["speedup"] == pytest.approx(10.0)  # 2.0 / 0.2 s per map, both at batch 6
    assert sp["DDPM respaced 100"]["speedup"] is None  # batch 12 vs DDPM's 6: not compared
    assert sp["DDPM T=1000"]["speedup"] == pytest.approx(1.0)


def test_table_rows_pair_the_ddpm_subset(results):
    rows = {
        r["method"]: r
        for r in paper_table.table_rows(
            results, 16, "hr", {"unet": 2_000_000, "flow": 400_000, "unet_full": 2_000_000, "tdpm": 300_000}
        )
    }
    ref = next(
        r for r in results["runs"] if r["method"] == "FTDDM Ttrunc=100" and r["n"] == 16 and r["protocol"] == "hr"
    )
    ddpm = next(r for r in results["runs"] if r["method"] == "DDPM T=1000" and r["n"] == 16 and r["protocol"] == "hr")
    assert rows["DDPM T=1000"]["p_psnr"] == pytest.approx(
        stats.wilcoxon(ref["per_map"]["psnr"][:6], ddpm["per_map"]["psnr"]).pvalue
    )
    assert rows["DDPM T=1000"]["psnr"][2] == 6 and rows["DPM-Solver++ 20"]["psnr"][2] == 12
    assert "p_psnr" not in rows["FTDDM Ttrunc=100"]
    assert rows["TDPM Ttrunc=100"]["params"] == 2_300_000 and rows["FTDDM Ttrunc=50"]["params"] == 2_400_000
    assert rows["DPM-Solver++ 20"]["params"] == 2_000_000 and rows["zero-filled"]["params"] == 0


def test_write_results_table_figures_and_no_absolute_paths(results, tmp_path):
    out = tmp_path / "res"
    paths = write_results(results, {"unet": 2_000_000, "flow": 400_000, "unet_full": 2_000_000}, out)
    md = paths["md"].read_text()
    assert "±" in md and "Wilcoxon" in md and "first 6 of the 12 maps only" in md
    assert "### s = 4, mask protocol `hr`" in md and "### s = 8, mask protocol `lr`" in md
    assert "tau_d sweep (Fig. 7)" in md and "conditioning on s (Fig. 6)" in md
    assert "**80 per timestep**" in md and "**8 per timestep**" in md  # 8000 images over 100 and over 1000 steps
    assert "| sharpness | p (sharpness) |" in md and "as sharp as the truth" in md
    for key in ("fig5", "fig6", "fig7"):
        assert paths[key].is_file() and paths[key].read_bytes()[:4] == b"\x89PNG"
    text = paths["json"].read_text() + md
    assert str(tmp_path) not in text and str(PROJECT_ROOT) not in text
    record = json.loads(paths["json"].read_text())
    assert record["model"]["dir"] == "ftddm_trt/assets/model" and record["backend"]["path"] == "<abs>/onnx"
    with pytest.raises(ValueError, match="tau_d_sweep"):
        paper_table.plot_tau_d({"runs": []}, tmp_path / "x.png")


def _table(md: str, title: str) -> list[list[str]]:
    """The cells of the table under ``title`` in ``md``: the header row first, then one row per method."""
    lines = md.splitlines()
    start = lines.index(title) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_every_method_row_has_a_sharpness_cell(results):
    md = paper_table.markdown(results, {"unet": 2_000_000, "flow": 400_000, "unet_full": 2_000_000})
    head, *rows = _table(md, "### s = 4, mask protocol `hr` (paper: 64x64 quality mask)")
    col = head.index("sharpness")
    assert head[col + 1] == "p (sharpness)" and head.index("NRMSE") < col
    assert len(rows) == 7 and all(len(r) == len(head) for r in rows)
    cells = {r[0]: r[col] for r in rows}
    ref = next(
        r for r in results["runs"] if r["method"] == "FTDDM Ttrunc=100" and r["n"] == 16 and r["protocol"] == "hr"
    )
    mean, sd, _ = paper_table.mean_std(ref["per_map"]["sharpness"])
    assert cells["FTDDM Ttrunc=100"] == f"{mean:.2f} ± {sd:.2f}"
    assert all("±" in c for c in cells.values())


def test_a_record_without_sharpness_still_renders(results):
    """Records written before the sharpness column existed have no per-map sharpness: its cells show "-"."""
    for r in results["runs"]:
        del r["per_map"]["sharpness"]
    md = paper_table.markdown(results, {"unet": 2_000_000})
    head, *rows = _table(md, "### s = 8, mask protocol `lr` (user: mask from N x N qc maps)")
    col = head.index("sharpness")
    assert all(r[col] == "-" and r[col + 1] == "-" for r in rows)
    assert all("±" in r[head.index("PSNR")] for r in rows)
    # one method with it and the reference without: its mean shows, no p-value
    results["runs"][1]["per_map"]["sharpness"] = [1.0, 0.9, 1.1]
    row = next(c for c in paper_table.table_rows(results, 16, "hr", {}) if c["method"] == "DDPM T=1000")
    assert row["sharpness"][2] == 3 and "p_sharpness" not in row


def test_committed_quality_record_renders():
    """The committed quality.json renders into the tables of quality.md, with a sharpness column either way."""
    record = json.loads((PROJECT_ROOT / "benchmarks" / "results" / "quality.json").read_text())
    md = paper_table.markdown(record, record.get("params", {}))
    heads = [line for line in md.splitlines() if line.startswith("| method |")]
    assert len(heads) == 6 and all("| sharpness | p (sharpness) |" in h for h in heads)


def test_run_quality_records_sharpness_per_method_and_in_the_tau_d_sweep(monkeypatch, tmp_path):
    """run_quality with the samplers replaced by a blur whose width falls as tau_d rises: every run records
    per-map sharpness, and the tau_d sweep's is the mean over maps of that same per-map measure."""
    import torch
    from scipy import ndimage

    from ftddm_trt.data.metrics import sharpness
    from ftddm_trt.engine.pipeline import SamplerSpec
    from ftddm_trt.evaluation import quality

    rng = np.random.default_rng(0)
    truth = ndimage.gaussian_filter(rng.random((4, 64, 64)), (0, 1, 1))
    region = np.zeros(truth.shape, bool)
    region[:, 16:48, 12:52] = True
    truth = truth * region

    def fake_tensors(pool, idx, n, protocol):
        y = torch.from_numpy(truth[:, None])
        return y, torch.full((4,), 64 / n), np.ones(4, np.float32), truth, region, truth * 0.5

    def fake_sample(backend, spec, y, s, batch_size, seed):
        sigma = 2.0 - spec.tau_d
        return torch.from_numpy(ndimage.gaussian_filter(y.numpy(), (0, 0, sigma, sigma))), spec.ttrunc + 1

    class Backend:
        def describe(self):
            return {"backend": "fake"}

    monkeypatch.setattr(quality, "test_maps", lambda n_maps, seed=0: (None, np.arange(4), ["sub-x"]))
    monkeypatch.setattr(quality, "example_tensors", fake_tensors)
    monkeypatch.setattr(quality, "sample_images", fake_sample)
    methods = [quality.Method("FTDDM Ttrunc=100", SamplerSpec("ftddm", ttrunc=100), "FTDDM")]
    res = quality.run_quality(Backend(), methods, n_maps=4, batch_size=4, scales=(16,), protocols=("hr",),
                              log=lambda _: None, tau_d_sweep=(0.0, 1.0), sweep_n=16)
    for run in res["runs"]:
        assert len(run["per_map"]["sharpness"]) == 4 and np.isfinite(run["all"]["sharpness"])
    zf = next(r for r in res["runs"] if r["method"] == "zero-filled")
    assert zf["per_map"]["sharpness"] == pytest.approx([0.5] * 4)  # half the truth: half its gradients
    sweep = {row["tau_d"]: row["sharpness"] for row in res["tau_d_sweep"]["rows"]}
    blurred = ndimage.gaussian_filter(truth, (0, 2.0, 2.0))
    assert sweep[0.0] == pytest.approx(np.mean(sharpness(blurred, truth, region)))
    assert sweep[0.0] < sweep[1.0] < 1.0
    md = quality.write_results(res, {}, tmp_path)["md"].read_text()
    assert "| sharpness | p (sharpness) |" in md


def test_portable_paths(tmp_path):
    assert portable_path(str(PROJECT_ROOT / "benchmarks" / "results")) == "benchmarks/results"
    assert portable_path(str(tmp_path / "a")) == "<abs>/a"
    assert (
        portable_path("relative/path") == "relative/path"
        and portable_path("a note / with spaces") == "a note / with spaces"
    )
    assert portable({"x": [str(PROJECT_ROOT / "a.json")], "n": 3}) == {"x": ["a.json"], "n": 3}
    p = write_json(tmp_path / "r.json", {"model": str(tmp_path / "m"), "v": float("nan")})
    assert json.loads(p.read_text()) == {"model": "<abs>/m", "v": None}


def test_per_nfe_markdown_of_a_committed_record_holds_no_absolute_path():
    """The per_nfe writer renders what it is given: a record made portable leaves no machine path in the md."""
    from benchmarks.harness.per_nfe import per_nfe_markdown

    record = json.loads((PROJECT_ROOT / "benchmarks" / "results" / "per_nfe.json").read_text())
    record["models"]["shipped"]["path"] = "/somewhere/else/model"
    md = per_nfe_markdown(record)  # the writer itself makes the model path portable
    assert "/somewhere" not in md and "`<abs>/model`" in md
    assert "/work/" not in per_nfe_markdown(portable(record))


def test_paper_methods_rows():
    rows = {m.label: m for m in paper_methods(tdpm=True)}
    assert rows["TDPM Ttrunc=100"].spec.name == "tdpm" and rows["DPM-Solver++ 100"].spec.lambda_min == -5.1
    assert rows["DPM-Solver++ 100, clip_x0=none"].spec.clip_x0 is None
    assert rows["DPM-Solver++ 100, lambda_min=none"].spec.lambda_min is None
    none = {m.label: m for m in paper_methods(clip_x0=None, lambda_min=None, solver_variants=False)}
    assert all(m.spec.clip_x0 is None for m in none.values()) and "TDPM Ttrunc=100" not in none


def test_baseline_and_distilled_rows_and_their_parameters():
    rows = {m.label: m for m in paper_methods(munet=True, flow_enhancer=True, distilled_steps=2)}
    assert rows["MUNet-FS-cWGAN"].spec.nfe == 1 and rows["Flow Enhancer (tau_f=0)"].spec.nfe == 2
    distilled = rows["FTDDM distilled, 2 steps"]
    assert distilled.spec.distilled_unet and distilled.spec.nfe == 3 and distilled.spec.tau_f == 0.0
    assert not {"MUNet-FS-cWGAN", "FTDDM distilled, 2 steps"} & {m.label for m in paper_methods()}
    params = {"unet": 10, "flow": 3, "munet": 7, "flow_enhancer": 5}
    assert paper_table.params_of("MUNet-FS-cWGAN", params) == 7
    assert paper_table.params_of("Flow Enhancer", params) == 12
    assert paper_table.params_of("FTDDM distilled", params) == 13


def test_run_quality_runs_the_distilled_row_on_the_students_backend(monkeypatch):
    """The distilled row goes to flow_backends['distilled']; without one it is refused by name. Every method is
    warmed up on one untimed map the first time it runs, so a network's first-call set-up is not timed."""
    import torch

    from ftddm_trt.evaluation import quality

    used = []

    def fake_sample(backend, spec, y, s, batch_size, seed):
        used.append((spec.name, backend.label, len(y)))
        return torch.zeros(len(y), 1, 64, 64), spec.nfe

    class Backend:
        def __init__(self, label):
            self.label = label

        def describe(self):
            return {"backend": self.label}

    def fake_tensors(pool, idx, n, protocol):
        region = np.ones((2, 64, 64), bool)
        return torch.zeros(2, 4, 64, 64), torch.full((2,), 4.0), np.ones(2, np.float32), np.ones((2, 64, 64)), \
            region, np.ones((2, 64, 64))

    monkeypatch.setattr(quality, "test_maps", lambda n_maps, seed=0: (None, np.arange(2), ["sub-x"]))
    monkeypatch.setattr(quality, "example_tensors", fake_tensors)
    monkeypatch.setattr(quality, "sample_images", fake_sample)
    methods = [m for m in paper_methods(distilled_steps=2) if m.family in ("FTDDM distilled", "flow")]
    quality.run_quality(Backend("teacher"), methods, n_maps=2, scales=(16, 8), protocols=("hr",), log=lambda _: None,
                        flow_backends={"distilled": Backend("student")})
    # each method first runs one untimed map (warm-up), only the first time; then its timed maps
    assert used == [("ftddm-distilled", "student", 1), ("ftddm-distilled", "student", 2), ("flow", "teacher", 1),
                    ("flow", "teacher", 2), ("ftddm-distilled", "student", 2), ("flow", "teacher", 2)]
    with pytest.raises(ValueError, match="distilled"):
        quality.run_quality(Backend("teacher"), methods, n_maps=2, scales=(16,), protocols=("hr",),
                            log=lambda _: None)


def test_committed_results_hold_no_absolute_paths():
    import os
    import re

    results = PROJECT_ROOT / "benchmarks" / "results"

    def strings(obj):
        if isinstance(obj, str):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from strings(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from strings(v)

    for path in sorted(results.glob("*.json")):
        bad = [s for s in strings(json.loads(path.read_text())) if os.path.isabs(s) and " " not in s]
        assert not bad, (path.name, bad[:3])
    for path in sorted(results.glob("*.md")):
        assert not re.findall(r"`/[^`\s]+`", path.read_text()), path.name
