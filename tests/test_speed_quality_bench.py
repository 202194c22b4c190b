"""benchmarks/speed_quality.py: how a sampler's per-slice latency is put together from one evaluation's time."""

from __future__ import annotations

import pytest

from benchmarks.speed_quality import best_batch, evaluations, latency_rows, samplers, summary_lines
from ftddm_trt.engine.pipeline import SamplerSpec


@pytest.mark.parametrize(("spec", "expected"), [
    (SamplerSpec("ddpm"), (1000, 0)),
    (SamplerSpec("ddpm-respaced", steps=100), (100, 0)),
    (SamplerSpec("dpmpp", steps=20), (20, 0)),
    (SamplerSpec("ftddm", ttrunc=100), (100, 1)),
    (SamplerSpec("ftddm-dpmpp", steps=20), (20, 1)),
    (SamplerSpec("ftddm-distilled", steps=2), (2, 1)),
])
def test_evaluations_split_the_nfe_into_unet_and_flow(spec, expected):
    assert evaluations(spec) == expected


def test_latency_is_unet_evaluations_times_the_unet_plus_the_flow_per_image():
    times = {"fp32": {1: {"unet": 0.010, "flow": 0.030}, 8: {"unet": 0.040, "flow": 0.080}},
             "int8": {1: {"unet": 0.005, "flow": 0.030}, 8: {"unet": 0.030, "flow": 0.080}}}
    assert best_batch(times) == 8  # 5 ms per image at batch 8 against 10 at batch 1
    rows_spec = [r for r in samplers(2) if r[1].name == "ftddm-distilled"]
    rows = latency_rows("m", times, rows_spec, 8, {(rows_spec[0][0], 1): {"fp32": 0.07}})
    got = {(r["precision"], r["batch"]): r for r in rows}
    assert got[("fp32", 1)]["seconds_per_slice"] == pytest.approx(2 * 0.010 + 0.030)
    assert got[("int8", 8)]["seconds_per_slice"] == pytest.approx((2 * 0.030 + 0.080) / 8)
    assert got[("fp32", 1)]["measured_seconds_per_slice"] == 0.07
    assert got[("int8", 1)]["measured_seconds_per_slice"] is None


def test_summary_compares_the_distilled_rows_with_the_fp32_default():
    label = samplers(1)[-1][0]
    cell = {"s": 4.0, "protocol": "lr"}
    quality = [{**cell, "method": samplers(1)[-2][0], "precision": "fp32", "psnr": 20.0, "seconds_per_map": 0.2},
               {**cell, "method": label, "precision": "int8", "psnr": 19.9, "seconds_per_map": 0.02}]
    text = "\n".join(summary_lines({"quality": quality}))
    assert "| s = 4, lr | int8 | -0.100 | 10.0x |" in text
