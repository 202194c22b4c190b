"""evaluation.robustness.score_cell: each system runs its own sampler; the first one gets every row."""

from __future__ import annotations

import pytest

from ftddm_trt.engine.pipeline import SamplerSpec
from ftddm_trt.engine.torch_backend import TorchBackend
from ftddm_trt.evaluation.robustness import System, family_maps, family_subjects, score_cell
from ftddm_trt.models.model_set import ModelSet

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_a_system_with_its_own_sampler_gets_its_default_row_from_that_sampler(tiny_model_dir):
    models = ModelSet.open(tiny_model_dir, 20)
    pool, idx = family_maps(family_subjects("tissue", 1, seed=5), 3, seed=5)
    same = System("again", TorchBackend(models), None, spec=SamplerSpec(ttrunc=20, steps=2, tau_f=0.0))
    other = System("distilled", TorchBackend(models), None,
                   spec=SamplerSpec("ftddm-distilled", ttrunc=20, steps=1, tau_f=0.0))
    first = System("shipped", TorchBackend(models), None, spec=SamplerSpec(ttrunc=20, steps=2, tau_f=0.0))
    rows = score_cell([first, same, other], pool, idx, 16, ["ours"])
    by = {r["method"]: r for r in rows}
    assert {"shipped: default", "shipped: without the qc step", "shipped: 2 solver passes (checked)",
            "again: default", "distilled: default"} <= set(by)
    assert "again: without the qc step" not in by  # only the first system gets every row
    assert by["again: default"]["psnr"] == pytest.approx(by["shipped: default"]["psnr"])  # same sampler, same maps
    assert by["distilled: default"]["psnr"] != pytest.approx(by["shipped: default"]["psnr"])
